"""What each layer of a call costs, in-process on the loaded PostgreSQL data.

For a search page of 50 tasks and for create_task, the same work is done at each layer, from the
statements the session sends, run by hand on asyncpg, up to the result as the SDK sends it: the
difference between two lines is what that layer adds. Each line is the CPU time of this process
per call (the least of three blocks of calls, so a busy neighbour shows less) and the median wall
time. The protocol (stdio, the SDK's dispatcher) is not in here: `bench.measure` times whole calls
and the server's CPU per call, and in a server process the same layers cost more than in this
tight loop, where their code stays in the CPU's caches.

    python -m bench.profile --postgres URL   # a copy of the loaded data: create_task writes
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import uvloop
from mcp.server.runner import _dump_result  # the SDK's own steps, to time them as it runs them
from mcp.types import JSONRPCResponse
from mcp_types.methods import serialize_server_result
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import col, select

from mcp_server import db, filters, identity, server, tasks
from mcp_server.config import Settings
from mcp_server.filters import AllOf
from mcp_server.identity import Call
from mcp_server.models import Task
from mcp_server.schemas import TaskCreate

logger = logging.getLogger("bench.profile")

SEARCH_FILTER = {
    "and": [
        {"field": "status", "op": "eq", "value": "blocked"},
        {"field": "priority", "op": "eq", "value": "medium"},
    ]
}
NEWEST_FIRST = (("created_at", True),)
PAGE = 50
PROTOCOL_VERSION = "2025-11-25"


async def cost(run: Callable[[], Awaitable[Any]], repeat: int) -> dict[str, float]:
    """CPU ms per call (least of three blocks) and median wall ms."""
    for _ in range(20):
        await run()
    cpu, wall = [], []
    for _ in range(3):
        started_cpu = time.process_time()
        for _ in range(repeat):
            started = time.perf_counter()
            await run()
            wall.append(time.perf_counter() - started)
        cpu.append((time.process_time() - started_cpu) / repeat)
    return {"cpu_ms": round(min(cpu) * 1000, 3), "wall_ms": round(statistics.median(wall) * 1000, 3)}


def sent_statements(engine: AsyncEngine) -> list[tuple[str, Any]]:
    """Every statement the engine sends from now on, with its parameters, as the driver gets them."""
    sent: list[tuple[str, Any]] = []

    @event.listens_for(engine.sync_engine, "before_cursor_execute")
    def catch(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        sent.append((statement, parameters))

    return sent


async def profile(url: str, repeat: int) -> dict[str, dict[str, dict[str, float]]]:
    settings = Settings(database_url=url, agent_id="bench-profile")
    database = db.create_database(settings)
    await database.open_schema(upgrade=False)
    raw = await asyncpg.connect(url)
    # The server's connections plan each statement for its values (db.create_database).
    await raw.execute("SET plan_cache_mode = force_custom_plan; SET random_page_cost = 1.1")
    sent = sent_statements(database.engine)
    call = Call(
        tool="create_task",
        agent_id="bench-profile",
        permissions=identity.UNRESTRICTED,
        request_id=identity.new_request_id(),
    )
    filter = AllOf.model_validate(SEARCH_FILTER)
    shape, params = filters.parse(filter)
    statement = tasks._search_statement(shape, NEWEST_FIRST, True, PAGE)
    reads = database.engine.execution_options(isolation_level="AUTOCOMMIT")
    try:

        async def search() -> Any:
            async with database.session(write=False) as session:
                return await tasks.search_tasks(
                    session,
                    filter=filter,
                    order_by=[],
                    limit=PAGE,
                    page_token=None,
                    include_deleted=False,
                    include_total=False,
                )

        sent.clear()
        page = await search()
        [(sql, parameters)] = sent

        async def core() -> Any:
            # The statement as the session sends it (with the soft-delete criteria), without the ORM.
            async with reads.connect() as conn:
                return (await conn.execute(db._live_only(statement), params)).mappings().all()

        async def session_rows() -> Any:
            async with database.session(write=False) as session:
                return db.named_rows(await session.exec(statement, params=params))

        objects = (
            select(Task)
            .options(tasks._WITH_PROJECT)
            .where(*tasks._matching(shape))
            .order_by(col(Task.created_at).desc(), col(Task.id).desc())
            .limit(PAGE + 1)
        )

        async def session_objects() -> Any:
            async with database.session(write=False) as session:
                return [tasks._public(task) for task in (await session.exec(objects, params=params)).all()]

        result = server._result(page)

        async def sdk_serializes() -> None:
            dumped = serialize_server_result("tools/call", PROTOCOL_VERSION, _dump_result(result))
            JSONRPCResponse(jsonrpc="2.0", id=1, result=dumped).model_dump_json(
                by_alias=True, exclude_unset=True
            )

        async def serialize() -> None:
            server._result(page)

        search_steps = {
            "raw asyncpg, the session's statement": await cost(lambda: raw.fetch(sql, *parameters), repeat),
            "SQLAlchemy Core: the statement on a connection, rows by name": await cost(core, repeat),
            "ORM session: the statement, rows by name": await cost(session_rows, repeat),
            "the data function: session, statement, page built": await cost(search, repeat),
            "instead: 51 Task objects with their projects, then built": await cost(session_objects, repeat),
            "the result: structured and the same JSON as text (server._result)": await cost(
                serialize, repeat
            ),
            "the SDK's passes over it: dump, check, dump, JSON-RPC frame": await cost(sdk_serializes, repeat),
        }
        project = await raw.fetchval(
            "SELECT min(id) FROM entity WHERE kind = 'project' AND deleted_at IS NULL"
        )

        async def create() -> Any:
            # A distinct title each time, as real work has: the duplicate guard refuses a repeat.
            data = TaskCreate(title=f"profiled task {uuid.uuid4().hex[:12]}", project_id=project)
            async with database.session(write=True) as session:
                return await tasks.create_task(session, call, data)

        sent.clear()
        await create()
        statements = list(sent)

        async def create_by_hand() -> None:
            async with raw.transaction():
                for sql, parameters in statements:
                    await raw.fetch(sql, *parameters)

        create_steps = {
            "raw asyncpg, the session's statements in one transaction": await cost(create_by_hand, repeat),
            "ORM session: the change, its audit entry and the task, committed": await cost(create, repeat),
        }
    finally:
        await raw.close()
        await database.dispose()
    return {f"search_tasks, page of {PAGE} (equal on two fields)": search_steps, "create_task": create_steps}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--postgres", required=True, metavar="URL", help="a copy of the loaded data (it writes)"
    )
    parser.add_argument("--repeat", type=int, default=500, help="calls per block; three blocks per line")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    result = uvloop.run(profile(args.postgres, args.repeat))
    sys.stderr.write(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
