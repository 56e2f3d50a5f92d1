"""The server as a desktop client starts it: a subprocess speaking MCP over stdio."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client, StdioServerParameters
from mcp.types import Implementation

from tests.conftest import call, call_error

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def desktop_entry() -> dict[str, Any]:
    entry: dict[str, Any] = json.loads((ROOT / "config.example.json").read_text())["mcpServers"]["tasks"]
    return entry


def desktop_client(extra_env: dict[str, str]) -> Client:
    """Start the server from config.example.json's entry, as installed in this environment."""
    entry = desktop_entry()
    command = str(BIN / entry["command"])  # a desktop client finds it on PATH or by absolute path
    params = StdioServerParameters(command=command, args=entry["args"], env={**entry["env"], **extra_env})
    return Client(params, mode="legacy", client_info=Implementation(name="desktop", version="1"))


async def test_the_desktop_config_starts_a_server_that_serves_and_audits_under_the_configured_id(
    database_url: str,
) -> None:
    async with desktop_client({"DATABASE_URL": database_url}) as client:
        names = {tool.name for tool in (await client.list_tools()).tools}
        assert {"search_tasks", "create_task", "bulk_update_status", "get_audit_trail"} <= names
        project = await call(client, "create_project", {"name": "From the desktop"})
        task = await call(client, "create_task", {"title": "stdio works", "project_id": project["id"]})
        await call_error(client, "create_task", {"title": "", "project_id": project["id"]})
        trail = await call(client, "get_audit_trail", {"entity_id": task["id"]})
    assert [e["changed_by"] for e in trail["items"]] == [desktop_entry()["env"]["MCP_AGENT_ID"]]


async def test_with_no_database_url_the_server_creates_its_sqlite_database_in_the_user_data_dir(
    tmp_path: Path,
) -> None:
    env = {"HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path / "data")}
    async with desktop_client(env) as client:
        page = await call(client, "search_tasks", {})
    assert page["items"] == []
    assert (tmp_path / "data" / "mcp-task-server" / "tasks.db").is_file()


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mcp_server", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


async def test_the_call_command_prints_the_result_as_json_and_fails_on_a_tool_error(
    database_url: str, tmp_path: Path
) -> None:
    env = {"PATH": str(BIN), "HOME": str(tmp_path), "DATABASE_URL": database_url}
    created = await anyio.to_thread.run_sync(
        lambda: run_cli("call", "create_project", '{"name": "cli"}', env=env)
    )
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["name"] == "cli"
    failed = await anyio.to_thread.run_sync(
        lambda: run_cli("call", "search_tasks", '{"limit": 500}', env=env)
    )
    assert failed.returncode == 1 and failed.stdout == ""
    assert "less than or equal to 100" in failed.stderr
    listed = await anyio.to_thread.run_sync(lambda: run_cli("tools", env=env))
    assert listed.returncode == 0 and "search_tasks:" in listed.stdout


def test_a_named_config_file_that_does_not_exist_is_an_error(tmp_path: Path) -> None:
    result = run_cli("--config", str(tmp_path / "missing.json"), "serve", env={"HOME": str(tmp_path)})
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_an_unreachable_database_at_start_is_one_clear_line_and_a_failing_exit(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path), "DATABASE_URL": "postgresql://postgres:hunter2@127.0.0.1:1/nowhere"}
    served = run_cli("serve", env=env)
    assert served.returncode == 1
    assert "cannot open the database" in served.stderr and "127.0.0.1:1" in served.stderr
    assert "hunter2" not in served.stderr and "Traceback" not in served.stderr
    called = run_cli("call", "list_projects", "{}", env=env)
    assert called.returncode == 1 and "stopped before answering" in called.stderr
    assert "Traceback" not in called.stderr
