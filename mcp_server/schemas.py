"""What the tools take and return: the structured output and its schema."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import (
    Annotated,
    Any,
    Literal,
    NotRequired,  # pydantic reads typing's TypedDict only from 3.12
)

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, WithJsonSchema
from typing_extensions import TypedDict

from mcp_server.models import AuditAction, EntityKind, Priority, TaskStatus

# Ids are 64-bit columns, but JSON numbers past 2**53 lose digits in many clients (JavaScript's).
MAX_ID = 2**53 - 1
MAX_VERSION = 2**31 - 1  # a row's version is an INTEGER column: 32 bits on PostgreSQL
COUNT_CAP = 10_000  # search_tasks counts matches this far and no further


def no_nul(value: str) -> str:
    # PostgreSQL cannot store U+0000 in text; refuse it everywhere so both databases agree.
    if "\x00" in value:
        raise ValueError("must not contain the NUL character (U+0000)")
    return value


# Text as tools accept it, shared by the tool signatures and the models below so both enforce the same.
Text = Annotated[str, AfterValidator(no_nul)]
Name = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200), AfterValidator(no_nul)
]
Description = Annotated[str, StringConstraints(max_length=10_000), AfterValidator(no_nul)]
CommentBody = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=4000), AfterValidator(no_nul)
]
# The bounds are enforced, and their errors name them, but not advertised: no agent comes near
# them, and every id parameter in the tool list would carry them.
Id = Annotated[int, Field(ge=1, le=MAX_ID), WithJsonSchema({"type": "integer"})]
RowVersion = Annotated[int, Field(ge=1, le=MAX_VERSION), WithJsonSchema({"type": "integer"})]


def _as_utc(value: datetime) -> datetime:
    """The time in UTC (one without an offset is taken as UTC). A time that falls outside the years
    1 to 9999 once in UTC (0001-01-01T00:00:00+14:00) is refused, naming the range."""
    return utc(value)


def utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError(
            "the time falls outside the years 1 to 9999 once converted to UTC; send a time within them"
        ) from None


# A time an agent gives: ISO 8601, in UTC unless it says its offset, as in search filters.
UTCTime = Annotated[datetime, AfterValidator(_as_utc)]


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TaskCreate(_Input):
    title: Name
    project_id: Id
    description: Description = ""
    status: TaskStatus = TaskStatus.PENDING
    priority: Priority = Priority.MEDIUM


class TaskUpdate(_Input):
    title: Name | None = None
    description: Description | None = None
    status: TaskStatus | None = None
    priority: Priority | None = None
    project_id: Id | None = None


class OrderBy(_Input):
    field: Literal["created_at", "updated_at", "title", "priority", "id"]
    direction: Literal["asc", "desc"] = "asc"


# Tool results. They are TypedDicts: the output schema comes from them, and the data functions
# build them straight from database rows, with no model to validate and dump again per item. Their
# values are plain JSON already, times included (the database writes them as text, see
# db.iso_text), so each of the SDK's passes over a result stays cheap.

Time = Annotated[str, WithJsonSchema({"type": "string", "format": "date-time"})]


def iso_time(value: datetime) -> str:
    """A time as the tools write it: RFC 3339 in UTC with microseconds, 2026-08-02T16:46:40.000000Z.
    (isoformat ends a UTC time in +00:00, which becomes Z: a third quicker than strftime.)"""
    return value.astimezone(UTC).isoformat(timespec="microseconds")[:-6] + "Z"


class ProjectRef(TypedDict):
    id: int
    name: str


# A field that would be null is left out instead (its description says when it is there): every
# field in a result is one an agent can use, and costs it tokens only then.


class Claim(TypedDict):
    """A live claim: who holds the task, until when, and the fencing token its writes must name."""

    holder: str
    expires_at: Time
    fencing_token: int


class BlockerRef(TypedDict):
    id: int
    title: str
    status: TaskStatus


ShownState = Literal["proposed", "pending", "applied", "rejected", "expired"]


class ChangesetRef(TypedDict):
    id: Annotated[str, Field(description="apply_changeset takes it; get_changeset shows it.")]
    state: Annotated[
        ShownState,
        Field(description="proposed: yours to apply; pending: waits for a person's approval."),
    ]
    summary: str
    task_count: Annotated[int, Field(description="How many tasks it changes.")]
    digest: Annotated[str, Field(description="SHA-256 of every task, version, before and after in it.")]
    expires_at: Time


class ChangesetItemPublic(TypedDict):
    task_id: int
    version: Annotated[int, Field(description="The version it must still have when applied.")]
    before: dict[str, Any]
    after: dict[str, Any]


class ChangesetPublic(ChangesetRef):
    tool: str
    created_by: str
    created_at: Time
    items: Annotated[list[ChangesetItemPublic], Field(description="Its tasks by id, the first 100.")]
    items_truncated: bool
    current: NotRequired[
        Annotated[bool, Field(description="Undecided: whether every task is still at its version.")]
    ]
    decided_by: NotRequired[str]
    decided_at: NotRequired[Time]
    applied_request_id: NotRequired[
        Annotated[str, Field(description="The request whose audit entries are its changes.")]
    ]


class ChangesetApplied(TypedDict):
    changeset: ChangesetRef
    changed_count: int
    changed_ids: Annotated[list[int], Field(description="Ids of the changed tasks, at most 500.")]
    changed_ids_truncated: bool
    request_id: str


Held = Annotated[
    ChangesetRef,
    Field(
        description=(
            "On a preview: apply it with apply_changeset. On a change your policy holds for a "
            "person's approval (state pending): nothing changed yet; poll get_changeset."
        )
    ),
]


class TaskPublic(TypedDict):
    id: int
    title: str
    description: str
    status: TaskStatus
    priority: Priority
    project: ProjectRef
    created_at: Time
    updated_at: Time
    deleted_at: NotRequired[Annotated[Time, Field(description="Only on a soft-deleted task: when.")]]
    version: Annotated[int, Field(description="Grows by one with every change; pass it as expected_version.")]
    claim: NotRequired[
        Annotated[Claim, Field(description="Only while an agent holds the task (claim_task).")]
    ]
    blocked_by: NotRequired[
        Annotated[list[BlockerRef], Field(description="get_task: the tasks it waits for (add_dependency).")]
    ]
    unblocked: NotRequired[
        Annotated[list[int], Field(description="On finishing it: the tasks that now wait for nothing.")]
    ]


class TaskHeld(TaskPublic):
    """A task whose change an approval policy holds: as it is, with the pending changeset."""

    changeset: Held


class TaskWritten(TypedDict):
    """What the tool list says of the task a write returns: the fields an agent's next call needs.
    The result is the whole task, as get_task gives it; its output schema names every field once
    for all of them, at a quarter of the tokens."""

    id: int
    version: Annotated[int, Field(description="Pass it as expected_version.")]


class TaskClaimed(TypedDict):
    """What the tool list says of the task a claim tool returns (the whole task, as get_task gives it)."""

    id: int
    version: int
    claim: NotRequired[Annotated[Claim, Field(description="Pass claim.fencing_token with your changes.")]]


HasMore = Annotated[bool, Field(description="True when another page follows.")]


class CommentPublic(TypedDict):
    id: int
    task_id: int
    author: Annotated[str, Field(description="The agent that wrote it.")]
    body: str
    created_at: Time


class CommentPage(TypedDict):
    items: list[CommentPublic]
    has_more: Annotated[bool, Field(description="More follow: ask again with after=last_id.")]
    last_id: NotRequired[Annotated[int, Field(description="Pass it as after to read only what comes later.")]]


NextPageToken = Annotated[str, Field(description="When has_more: pass it as page_token for the next page.")]


class TaskPage(TypedDict):
    items: list[TaskPublic]
    has_more: HasMore
    next_page_token: NotRequired[NextPageToken]
    total: NotRequired[
        Annotated[
            int, Field(description=f"With include_total: how many tasks match, counted up to {COUNT_CAP:,}.")
        ]
    ]
    total_exact: NotRequired[
        Annotated[
            bool,
            Field(
                description=f"With include_total: false when over {COUNT_CAP:,} match and total stops there."
            ),
        ]
    ]


class ProjectPublic(TypedDict):
    id: int
    name: str
    description: str
    created_at: Time
    updated_at: Time


class ProjectPage(TypedDict):
    items: list[ProjectPublic]
    has_more: HasMore
    next_page_token: NotRequired[NextPageToken]


class LastChange(TypedDict):
    action: str
    changed_by: str
    changed_at: Time
    request_id: str


class TaskAsOf(TypedDict):
    id: int
    as_of: Time
    title: str
    description: str
    status: TaskStatus
    priority: Priority
    project_id: int
    deleted: Annotated[bool, Field(description="Whether it was deleted at that time.")]
    last_change: Annotated[LastChange, Field(description="The last change at or before that time.")]


class LeftAsItIs(TypedDict):
    task_id: int
    reason: str


class RevertResult(TypedDict):
    reverted_request: str
    changed_count: Annotated[int, Field(description="How many tasks were put back.")]
    reverted: Annotated[list[int], Field(description="Tasks put back.")]
    left: Annotated[list[LeftAsItIs], Field(description="Tasks left as they are, and why.")]
    request_id: str


class BulkDeleteResult(TypedDict):
    dry_run: Annotated[
        bool, Field(description="True for a preview: nothing was changed and nothing audited.")
    ]
    changed_count: Annotated[int, Field(description="How many tasks were deleted, or would be.")]
    changed_ids: Annotated[list[int], Field(description="Ids of those tasks, ascending, at most 500.")]
    changed_ids_truncated: Annotated[
        bool, Field(description="True when more tasks were deleted than changed_ids lists.")
    ]
    changeset: NotRequired[Held]
    request_id: NotRequired[
        Annotated[str, Field(description="Not on a preview: shared by the audit entries of this call.")]
    ]


class ProjectChanged(TypedDict):
    project: ProjectPublic
    deleted: Annotated[bool, Field(description="Whether the project is deleted now.")]
    tasks: NotRequired[
        Annotated[
            Literal["deleted", "moved", "restored"],
            Field(description="What happened to its live tasks (deleted ones, on a restore)."),
        ]
    ]
    changed_count: Annotated[int, Field(description="How many of its tasks that changed.")]
    request_id: Annotated[str, Field(description="Shared by the audit entries of this call.")]


class BulkUpdateResult(TypedDict):
    status: Annotated[TaskStatus, Field(description="The status the changed tasks now have.")]
    dry_run: Annotated[
        bool, Field(description="True for a preview: nothing was changed and nothing audited.")
    ]
    changed_count: Annotated[
        int,
        Field(description="How many tasks changed, or would change (tasks already in the status do not)."),
    ]
    changed_ids: Annotated[list[int], Field(description="Ids of those tasks, ascending, at most 500.")]
    changed_ids_truncated: Annotated[
        bool, Field(description="True when more tasks changed than changed_ids lists.")
    ]
    changeset: NotRequired[Held]
    request_id: NotRequired[
        Annotated[str, Field(description="Not on a preview: shared by the audit entries of this call.")]
    ]


class EntityRef(TypedDict):
    id: int
    type: EntityKind
    name: str
    deleted: bool


class AuditEntryPublic(TypedDict):
    id: int
    entity_id: NotRequired[
        Annotated[
            int,
            Field(description="The task or project changed; not on a refusal, nor in a trail of one entity."),
        ]
    ]
    action: AuditAction
    changed_by: Annotated[str, Field(description="The verified identity of the agent.")]
    client_name: NotRequired[
        Annotated[str, Field(description="The name the agent's client gave itself, if any; not verified.")]
    ]
    changed_at: Time
    request_id: Annotated[str, Field(description="Shared by every entry one tool call wrote.")]
    old_value: NotRequired[dict[str, Any]]
    new_value: NotRequired[dict[str, Any]]


class AuditTrail(TypedDict):
    entity: NotRequired[Annotated[EntityRef, Field(description="With entity_id: that task or project.")]]
    items: Annotated[list[AuditEntryPublic], Field(description="Newest first.")]
    has_more: HasMore
    next_page_token: NotRequired[NextPageToken]


# --- the schemas as tools/list sends them ------------------------------------------------------
# Every agent pays for the tool list in every conversation. pydantic's schemas spell the same
# contract at length: a title on every node, `$ref`s into `$defs`, an optional parameter as
# `anyOf [its type, null]` with `default: null`. These are the short spellings.


def compact(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` with every `$ref` inlined and no titles, an optional value as its own type (a null
    is accepted all the same), and no length limits on text (the server enforces them and its
    errors name them): nearly the same contract in a fraction of the tokens, and plainer for
    clients with weak JSON Schema support. A recursive schema needs a plain one of its own."""
    defs: dict[str, Any] = schema.get("$defs", {})

    def walk(node: Any, inside: frozenset[str]) -> Any:
        if isinstance(node, list):
            return [walk(item, inside) for item in node]
        if not isinstance(node, dict):
            return node
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            name = ref.removeprefix("#/$defs/")
            if name in inside:
                raise ValueError(f"{name} refers to itself; give it a schema of its own (WithJsonSchema)")
            return walk({**defs[name], **{k: v for k, v in node.items() if k != "$ref"}}, inside | {name})
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key in ("title", "$defs", "minLength", "maxLength") or (key == "default" and value is None):
                continue
            if key == "properties":
                out[key] = {name: walk(sub, inside) for name, sub in value.items()}
            else:
                out[key] = walk(value, inside)
        options = out.get("anyOf")
        optional = node.get("default", ...) is None  # a parameter that may be left out
        if optional and isinstance(options, list) and len(options) == 2 and {"type": "null"} in options:
            [kept] = [option for option in options if option != {"type": "null"}]
            del out["anyOf"]
            out = {**kept, **out}
        return out

    compacted: dict[str, Any] = walk(schema, frozenset())
    return compacted


def outline(schema: dict[str, Any]) -> dict[str, Any]:
    """An output schema's top level: each field and its JSON type. What is nested inside the
    fields, and which are left out when empty, the results show."""
    full = compact(schema)
    return {
        "type": "object",
        "properties": {name: _json_type(sub) for name, sub in full.get("properties", {}).items()},
    }


def _json_type(schema: dict[str, Any]) -> dict[str, Any]:
    if "anyOf" in schema:
        return {"anyOf": [_json_type(option) for option in schema["anyOf"]]}
    return {"type": schema.get("type", "object")}
