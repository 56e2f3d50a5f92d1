"""A tool call's arguments, checked against the tool's own model, and what is wrong with them in
the agent's terms: which argument, what is wrong, and what to send instead. No model names, no
validator internals, no links: the message is read by a language model deciding its next call.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
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
TIME_EXAMPLE = "2026-01-31T09:00:00Z"
MAX_PROBLEMS = 3
# Where a value may be of several types, pydantic tries each and names it in the location.
_TYPE_TAG = re.compile(r"str|int|float|bool|none|(list|dict|tuple|function-[a-z]+)\[.*\]")
_TYPE_WORDS = {
    "str": "text",
    "int": "a whole number",
    "float": "a number",
    "bool": "true or false",
    "none": "null",
}
# pydantic's subject words, which say nothing the argument's path does not.
_SUBJECT = re.compile(r"^(Input|List|String|Tuple|Dictionary|Value error,) ")
_PREVIEW = 60


def explain(tool: str, parameters: Sequence[str], error: ValidationError) -> str:
    """What is wrong with a call of `tool` (whose arguments are `parameters`), one clause per
    problem, the first few; with the shape of a filter when a filter is wrong.

    Two kinds of problem gather several of pydantic's errors into one: a filter object that is
    no condition (its missing and foreign keys), and a value of none of the types a field takes
    (one error per type tried)."""
    said: dict[object, str | _Gathered] = {}  # in the order first met
    filter_wrong = False
    for detail in error.errors(include_url=False):
        loc = detail["loc"]
        in_filter = bool(loc) and loc[0] in FILTER_ARGUMENTS
        filter_wrong |= in_filter
        if len(loc) > 1 and isinstance(loc[-1], str) and _TYPE_TAG.fullmatch(loc[-1]):
            gathered = said.setdefault(("types", loc[:-1]), _Gathered(_path(loc[:-1], in_filter=in_filter)))
            assert isinstance(gathered, _Gathered)
            gathered.types.append(
                _TYPE_WORDS.get(loc[-1], "a list" if loc[-1].startswith("list") else "an object")
            )
        elif in_filter and _is_not_a_node(detail):
            gathered = said.setdefault(("node", loc[:-2]), _Gathered(_path(loc[:-2], in_filter=True)))
            assert isinstance(gathered, _Gathered)
            (gathered.foreign if detail["type"] == "extra_forbidden" else gathered.missing).append(
                str(loc[-1])
            )
        else:
            said[len(said)] = _problem(tool, parameters, detail, in_filter)
    problems = [str(problem) for problem in said.values()]
    text = "invalid arguments: " + "; ".join(problems[:MAX_PROBLEMS])
    if len(problems) > MAX_PROBLEMS:
        text += f" (and {len(problems) - MAX_PROBLEMS} more)"
    if filter_wrong:
        text += ". " + FILTER_HELP
    return text


@dataclass
class _Gathered:
    """One problem told from several errors at one place."""

    where: str
    types: list[str] = field(default_factory=list)  # the types the value is none of
    missing: list[str] = field(default_factory=list)  # a filter object's missing keys
    foreign: list[str] = field(default_factory=list)  # ... and the keys it should not have

    def __str__(self) -> str:
        if self.types:
            kinds = list(dict.fromkeys(self.types))
            return f"{self.where} must be {', '.join(kinds[:-1]) + ' or ' if kinds[:-1] else ''}{kinds[-1]}"
        what = []
        if self.missing:
            what.append(f"it lacks {' and '.join(self.missing)}")
        if self.foreign:
            verb = "is" if len(self.foreign) == 1 else "are"
            what.append(f"{' and '.join(self.foreign)} {verb} not one of its keys")
        return f"{self.where} is not a filter condition ({', '.join(what)}): its keys are field, op and value"


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
        name = str(loc[0]) if loc else ""
        example = f"; {name} is, for example, {EXAMPLES[name]}" if name in EXAMPLES else ""
        return f"{where} must be {expected}, not {_kind(given)}{example}"
    if kind.startswith(("datetime_", "date_")):
        return f"{where} must be an ISO 8601 time such as {TIME_EXAMPLE}, not {_kind(given)}"
    message = _SUBJECT.sub("", detail["msg"]).replace(" after validation", "")
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
        elif i > 0 and _TYPE_TAG.fullmatch(part):
            continue  # the type pydantic tried, not a key the agent wrote
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
