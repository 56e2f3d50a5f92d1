"""Project scopes: the projects an agent may read and change (`Permissions.projects`).

An agent without a scope reaches every project. A scoped agent reaches only its projects, in every
tool: a search, a bulk change or a claim of the next task is narrowed to them (`narrow`, one more
condition in the statement, so rows outside never come back and are never touched); a task or
project named by id outside them is refused (`require`), naming the missing scope
(`project:<id>`), and the refusal is recorded like any other. A scoped agent creates no projects:
a new one would be outside its scope (`ANY_PROJECT`).
"""

from __future__ import annotations

from typing import Any

from mcp_server.errors import PermissionDeniedError
from mcp_server.filters import FilterField, Operator, Shape

Scope = frozenset[int] | None  # None: every project
ANY_PROJECT = "project:*"  # the permission of an unscoped agent, which creating a project needs


def permission(project_id: int) -> str:
    return f"project:{project_id}"


def require(scope: Scope, project_id: int, what: str) -> None:
    """Refuse `what` (as "task 12", "project 3") unless project `project_id` is within `scope`."""
    if scope is not None and project_id not in scope:
        where = what if what == f"project {project_id}" else f"{what} is in project {project_id}, which"
        raise PermissionDeniedError(
            permission(project_id),
            f"{where} is outside the projects you may use (permission {permission(project_id)} is "
            "missing); nothing was read or changed. list_projects shows yours",
        )


def require_all(scope: Scope) -> None:
    """Refuse a scoped agent what reaches beyond any one project (creating a project)."""
    if scope is not None:
        raise PermissionDeniedError(
            ANY_PROJECT,
            f"you may use only some projects, so you cannot create one (permission {ANY_PROJECT} is "
            "missing); nothing was changed. Ask an operator, or use one of yours (list_projects)",
        )


def narrow(scope: Scope, shape: Shape | None, params: dict[str, Any]) -> tuple[Shape | None, dict[str, Any]]:
    """A filter's shape and values (filters.parse) narrowed to the tasks of `scope`'s projects: the
    filter AND `project_id in scope`, its list the next value after the filter's own (the order
    filters.clause names them in)."""
    if scope is None:
        return shape, params
    within: Shape = (FilterField.PROJECT_ID, Operator.IN, None)
    narrowed = within if shape is None else ("and", (shape, within))
    return narrowed, params | {f"f{len(params)}": sorted(scope)}
