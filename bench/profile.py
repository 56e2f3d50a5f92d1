"""What the ORM costs per call, step by step, in-process on the loaded PostgreSQL data.

For a search page of 50 tasks and for create_task, the same work is timed at each layer, from the
statements the ORM sends run by hand on asyncpg up to the result serialized as the tool sends it:
the difference between two lines is what that layer adds. The protocol (stdio, the SDK's
dispatcher) is not in here; bench.measure times whole calls.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from mcp_server import filters, identity, server, tasks
from mcp_server.config import Settings
from mcp_server.db import create_database
from mcp_server.filters import AllOf
from mcp_server.identity import Call
from mcp_server.schemas import TaskCreate

logger = logging.getLogger("bench.profile")

SEARCH_FILTER = {
    "and": [
        {"field": "status", "op": "eq", "value": "blocked"},
        {"field": "priority", "op": "eq", "value": "medium"},
    ]
}


async def median_ms(run: Callable[[], Awaitable[Any]], repeat: int) -> float:
    for _ in range(20):
        await run()
    timings = []
    for _ in range(repeat):
        started = time.perf_counter()
        await run()
        timings.append(time.perf_counter() - started)
    return round(statistics.median(timings) * 1000, 3)


def sent_statements(engine: AsyncEngine) -> list[tuple[str, Any]]:
    """Every statement the engine sends from now on, with its parameters, as the driver gets them."""
    sent: list[tuple[str, Any]] = []

    @event.listens_for(engine.sync_engine, "before_cursor_execute")
    def catch(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        sent.append((statement, parameters))

    return sent


async def profile(url: str, repeat: int) -> dict[str, dict[str, float]]:
    settings = Settings(database_url=url, agent_id="bench-profile")
    db = create_database(settings)
    await db.open_schema(upgrade=False)
    raw = await asyncpg.connect(url)
    sent = sent_statements(db.engine)
    call = Call(
        tool="search_tasks",
        agent_id="bench-profile",
        permissions=identity.UNRESTRICTED,
        request_id=identity.new_request_id(),
    )
    filter = AllOf.model_validate(SEARCH_FILTER)
    shape, params = filters.parse(filter)
    try:

        async def search() -> Any:
            async with db.session(write=False) as session:
                return await tasks.search_tasks(
                    session,
                    filter=filter,
                    order_by=[],
                    limit=50,
                    page_token=None,
                    include_deleted=False,
                    include_total=False,
                )

        async def search_loaded() -> list[Any]:
            statement = tasks._search_statement(shape, (("created_at", True),), True, 50)
            async with db.session(write=False) as session:
                return list((await session.exec(statement, params=params)).all())

        sent.clear()
        page = await search()
        [(sql, parameters)] = sent
        loaded = await search_loaded()

        async def build() -> None:
            [tasks.task_public(task) for task in loaded]

        async def serialize() -> None:
            server._result(page)

        search_steps = {
            "raw asyncpg, the ORM's statement": await median_ms(lambda: raw.fetch(sql, *parameters), repeat),
            "ORM: session, statement, 51 Task objects with their projects": await median_ms(
                search_loaded, repeat
            ),
            "results built from the objects (task_public)": await median_ms(build, repeat),
            "the data function, all of the above": await median_ms(search, repeat),
            "serialized as the tool sends it (structured + text)": await median_ms(serialize, repeat),
        }
        project = await raw.fetchval(
            "SELECT min(id) FROM entity WHERE kind = 'project' AND deleted_at IS NULL"
        )
        data = TaskCreate(title="profiled task", project_id=project)

        async def create() -> Any:
            async with db.session(write=True) as session:
                return await tasks.create_task(session, call, data)

        sent.clear()
        await create()
        statements = list(sent)

        async def create_by_hand() -> None:
            async with raw.transaction():
                for sql, parameters in statements:
                    await raw.fetch(sql, *parameters)

        create_steps = {
            "raw asyncpg, the ORM's statements in one transaction": await median_ms(create_by_hand, repeat),
            "ORM: session, the lock, the project, flushed task and audit entry, commit": await median_ms(
                create, repeat
            ),
        }
    finally:
        await raw.close()
        await db.dispose()
    return {"search_tasks, page of 50 (equal on two fields)": search_steps, "create_task": create_steps}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--postgres", required=True, metavar="URL", help="a copy of the loaded data (it writes)"
    )
    parser.add_argument("--repeat", type=int, default=500)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    result = asyncio.run(profile(args.postgres, args.repeat))
    sys.stderr.write(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
