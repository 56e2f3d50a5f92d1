"""What the tools take and return: the structured output and its schema."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from mcp_server.models import AuditAction, EntityKind, Priority, Project, Task, TaskStatus

MAX_ID = 2**31 - 1  # ids and versions are INTEGER columns: 32 bits on PostgreSQL
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
Id = Annotated[int, Field(ge=1, le=MAX_ID)]


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
    field: Literal["created_at", "updated_at", "title", "priority", "id"] = Field(
        description="Field to sort on; priority sorts by urgency (low < medium < high < critical)."
    )
    direction: Literal["asc", "desc"] = Field(default="asc", description="Sort direction.")


class ProjectRef(BaseModel):
    id: int
    name: str


class TaskPublic(BaseModel):
    id: int
    title: str
    description: str
    status: TaskStatus
    priority: Priority
    project: ProjectRef
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None = Field(description="Set when the task is soft-deleted.")
    version: int = Field(description="Grows by one with every change; pass it as expected_version.")

    @classmethod
    def of(cls, task: Task) -> TaskPublic:
        assert task.id is not None and task.project_id is not None
        assert task.status is not None and task.priority is not None
        return cls(
            id=task.id,
            title=task.title,
            description=task.description,
            status=TaskStatus(task.status),
            priority=task.priority,
            project=ProjectRef(id=task.project_id, name=task.project.title),
            created_at=task.created_at,
            updated_at=task.updated_at,
            deleted_at=task.deleted_at,
            version=task.version,
        )


class _Paged(BaseModel):
    has_more: bool = Field(description="True when another page follows.")
    next_page_token: str | None = Field(description="Pass as page_token to get the next page.")


class TaskPage(_Paged):
    items: list[TaskPublic]
    total: int | None = Field(
        description=f"With include_total: the number of matching tasks, counted up to {COUNT_CAP:,}."
    )
    total_exact: bool | None = Field(
        description=f"With include_total: false when more than {COUNT_CAP:,} match and total stopped there."
    )


class ProjectPublic(BaseModel):
    id: int
    name: str
    description: str
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, project: Project) -> ProjectPublic:
        assert project.id is not None
        return cls(
            id=project.id,
            name=project.title,
            description=project.description,
            created_at=project.created_at,
            updated_at=project.updated_at,
        )


class ProjectPage(_Paged):
    items: list[ProjectPublic]


class BulkUpdateResult(BaseModel):
    status: TaskStatus = Field(description="The status the changed tasks now have.")
    dry_run: bool = Field(description="True for a preview: nothing was changed and nothing audited.")
    changed_count: int = Field(
        description="How many tasks changed, or would change (tasks already in the status do not)."
    )
    changed_ids: list[int] = Field(description="Ids of those tasks, ascending, at most 500.")
    changed_ids_truncated: bool = Field(description="True when more tasks changed than changed_ids lists.")
    request_id: str | None = Field(
        description="Shared by the audit entries of this call; null for a preview."
    )


class EntityRef(BaseModel):
    id: int
    type: EntityKind
    name: str
    deleted: bool

    @classmethod
    def of(cls, entity: Any) -> EntityRef:
        """From an entity, or a row with its id, kind, title and deleted_at."""
        return cls(
            id=entity.id,
            type=EntityKind(entity.kind),
            name=entity.title,
            deleted=entity.deleted_at is not None,
        )


class AuditEntryPublic(BaseModel):
    id: int
    entity_id: int | None = Field(description="The task or project changed; null for a refused call.")
    action: AuditAction
    changed_by: str = Field(description="The verified identity of the agent.")
    client_name: str | None = Field(description="The name the agent's client gave itself; not verified.")
    changed_at: datetime
    request_id: str = Field(description="Shared by every entry one tool call wrote.")
    old_value: dict[str, Any] | None
    new_value: dict[str, Any] | None


class AuditTrail(_Paged):
    entity: EntityRef | None = Field(description="The entity asked for by entity_id, if any.")
    items: list[AuditEntryPublic] = Field(description="Newest first.")
