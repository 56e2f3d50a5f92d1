"""A tool call's arguments, checked against the tool's own model, and what is wrong with them in
the agent's terms: which argument, what is wrong, and what to send instead. No model names, no
validator internals, no links: the message is read by a language model deciding its next call.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails

# The arguments that hold a filter tree (filters.FilterNode). Inside one, a location names the
# union member it tried ("condition", "and", "or") after the argument and after each list index.
FILTER_ARGUMENTS = frozenset({"filter"})
_NODE_TAGS = frozenset({"condition", "and", "or"})
FILTER_EXAMPLE = '{"field": "status", "op": "eq", "value": "pending"}'
FILTER_HELP = (
    f"A filter is a condition such as {FILTER_EXAMPLE}, or several in "
    '{"and": [...]} or {"or": [...]}, for example {"and": [' + FILTER_EXAMPLE + ", "
    '{"field": "priority", "op": "in", "value": ["high", "critical"]}]}'
)
# Of an argument that takes a list or an object, a value of the right shape.
EXAMPLES = {
    "order_by": '[{"field": "priority", "direction": "desc"}]',
    "task_ids": "[12, 15]",
}
MAX_PROBLEMS = 3
_PREVIEW = 60


def explain(tool: str, parameters: Sequence[str], error: ValidationError) -> str:
    """What is wrong with a call of `tool` (whose arguments are `parameters`), one clause per
    problem, the first few; with the shape of a filter when a filter is wrong."""
    problems: list[str | None] = []  # None: the next object of `nodes`, said once all its keys are known
    nodes: dict[str, tuple[list[str], list[str]]] = {}  # a filter object that is no condition
    filter_wrong = False
    for detail in error.errors(include_url=False):
        loc = detail["loc"]
        in_filter = bool(loc) and loc[0] in FILTER_ARGUMENTS
        filter_wrong |= in_filter
        if in_filter and _is_not_a_node(detail):
            # Keys missing from, or foreign to, one object: one problem for the object.
            node = _path(loc[:-2], in_filter=True)
            if node not in nodes:
                nodes[node] = ([], [])
                problems.append(None)
            nodes[node][detail["type"] == "extra_forbidden"].append(str(loc[-1]))
            continue
        problems.append(_problem(tool, parameters, detail, in_filter))
    objects = iter(nodes.items())
    said = [_not_a_node(*next(objects)) if p is None else p for p in problems]
    text = "invalid arguments: " + "; ".join(said[:MAX_PROBLEMS])
    if len(said) > MAX_PROBLEMS:
        text += f" (and {len(said) - MAX_PROBLEMS} more)"
    if filter_wrong:
        text += ". " + FILTER_HELP
    return text


def _not_a_node(node: str, keys: tuple[list[str], list[str]]) -> str:
    missing, foreign = keys
    what = []
    if missing:
        what.append(f"it lacks {' and '.join(missing)}")
    if foreign:
        what.append(f"{' and '.join(foreign)} {'is' if len(foreign) == 1 else 'are'} not one of its keys")
    return f"{node} is not a filter condition ({', '.join(what)}): its keys are field, op and value"


def _problem(tool: str, parameters: Sequence[str], detail: ErrorDetails, in_filter: bool) -> str:
    loc, kind, given = detail["loc"], detail["type"], detail.get("input")
    where = _path(loc, in_filter=in_filter)
    if kind == "extra_forbidden" and len(loc) == 1:
        return f"{where} is not an argument of {tool}; its arguments are {', '.join(parameters)}"
    if kind == "extra_forbidden":
        return f"{where} is not a field here; leave it out"
    if kind == "missing":
        return f"{where} is missing and required"
    if kind == "union_tag_not_found":
        return f"{where} must be a filter object, not {_kind(given)}"
    if kind in ("list_type", "dict_type", "model_type", "model_attributes_type"):
        expected = "a list" if kind == "list_type" else "an object"
        example = f", for example {EXAMPLES[where]}" if where in EXAMPLES else ""
        return f"{where} must be {expected}, not {_kind(given)}{example}"
    message = detail["msg"].removeprefix("Input ").removeprefix("Value error, ")
    if isinstance(given, dict | list):
        return f"{where}: {message}"
    return f"{where}: {message} (got {_preview(given)})"


def _is_not_a_node(detail: ErrorDetails) -> bool:
    """A key missing from, or foreign to, a filter condition: the object is no condition at all."""
    loc = detail["loc"]
    return detail["type"] in ("missing", "extra_forbidden") and len(loc) >= 3 and loc[-2] == "condition"


def _path(loc: tuple[int | str, ...], *, in_filter: bool) -> str:
    """A location as the agent wrote it: filter.and[0].field, order_by[1].direction."""
    text = ""
    after_node = False  # the next name is the union member tried, not a key the agent wrote
    for i, part in enumerate(loc):
        if isinstance(part, int):
            text += f"[{part}]"
            after_node = in_filter
        elif after_node and part in _NODE_TAGS:
            after_node = False
        else:
            text += part if i == 0 else f".{part}"
            after_node = in_filter and i == 0
    return text


def _kind(value: Any) -> str:
    if isinstance(value, str):
        return f"a string ({_preview(value)})"
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "null"
    return "an object"


def _preview(value: Any) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= _PREVIEW else text[: _PREVIEW - 3] + "..."
