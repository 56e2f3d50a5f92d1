"""The server as a desktop client starts it: a subprocess speaking MCP over stdio."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, TextIO

import anyio
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.types import Implementation

from mcp_server.auth import token_sha256
from tests.conftest import call, call_error, initialize_message

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def desktop_entry() -> dict[str, Any]:
    entry: dict[str, Any] = json.loads((ROOT / "config.example.json").read_text())["mcpServers"]["tasks"]
    return entry


def desktop_client(extra_env: dict[str, str], errlog: TextIO = sys.stderr) -> Client:
    """Start the server from config.example.json's entry, as installed in this environment, with
    `extra_env` over its environment and its stderr in `errlog`."""
    entry = desktop_entry()
    command = str(BIN / entry["command"])  # a desktop client finds it on PATH or by absolute path
    params = StdioServerParameters(command=command, args=entry["args"], env={**entry["env"], **extra_env})
    info = Implementation(name="desktop", version="1")
    return Client(stdio_client(params, errlog=errlog), mode="legacy", client_info=info)


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


async def test_a_result_larger_than_the_pipe_buffer_arrives_whole_over_stdio(database_url: str) -> None:
    """A pipe holds 64 KiB; a bigger response is written in parts as the client reads."""
    description = "x" * 10_000
    # A response cut short would leave the client waiting for the rest; fail instead of hanging.
    with anyio.fail_after(60):
        async with desktop_client({"DATABASE_URL": database_url}) as client:
            project = await call(client, "create_project", {"name": "Big pages"})
            for i in range(12):
                await call(
                    client,
                    "create_task",
                    {"title": f"big {i}", "project_id": project["id"], "description": description},
                )
            filter = {"field": "project_id", "op": "eq", "value": project["id"]}
            page = await call(client, "search_tasks", {"filter": filter, "limit": 100})
            again = await call(client, "search_tasks", {"filter": filter, "limit": 1})
    assert len(page["items"]) == 12
    assert all(item["description"] == description for item in page["items"])
    assert again["items"][0]["id"] == page["items"][0]["id"]  # the stream is still in step afterwards


async def test_over_stdio_a_configured_read_only_agent_is_refused_writes_and_the_refusal_recorded(
    database_url: str, tmp_path: Path
) -> None:
    config = tmp_path / "server.json"
    config.write_text(json.dumps({"agents": [{"id": "viewer", "read_only": True}]}))
    entry = desktop_entry()
    params = StdioServerParameters(
        command=str(BIN / entry["command"]),
        args=["--config", str(config), *entry["args"]],
        env={"MCP_AGENT_ID": "viewer", "DATABASE_URL": database_url},
    )
    async with Client(
        params, mode="legacy", client_info=Implementation(name="desktop", version="1")
    ) as client:
        message = await call_error(client, "create_project", {"name": "Not allowed"})
        assert "permission write" in message
        assert (await call(client, "list_projects", {}))["items"] == []
        refused = await call(client, "get_audit_trail", {"action": "refused"})
    [entry] = refused["items"]
    assert entry["changed_by"] == "viewer" and entry["client_name"] == "desktop"
    assert entry["new_value"] == {
        "tool": "create_project",
        "missing_permission": "write",
        "arguments": {"name": "Not allowed", "description": ""},
    }


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
    token = "mts_" + "x" * 43
    config = tmp_path / "http.json"
    config.write_text(json.dumps({"agents": [{"id": "a", "token_sha256": token_sha256(token)}]}))
    for command in (["serve"], ["--config", str(config), "serve", "--transport", "http", "--port", "1"]):
        served = run_cli(*command, env=env)
        assert served.returncode == 1, command
        assert "cannot open the database" in served.stderr and "127.0.0.1:1" in served.stderr
        assert "hunter2" not in served.stderr and "Traceback" not in served.stderr
    called = run_cli("call", "list_projects", "{}", env=env)
    assert called.returncode == 1 and "stopped before answering" in called.stderr
    assert "Traceback" not in called.stderr


def test_mint_token_prints_a_token_and_the_config_entry_that_admits_it(tmp_path: Path) -> None:
    minted = run_cli(
        "mint-token", "planner", "--read-only", "--tool", "search_tasks", env={"HOME": str(tmp_path)}
    )
    assert minted.returncode == 0, minted.stderr
    lines = minted.stdout.splitlines()
    token, entry = lines[1], json.loads(lines[3])
    assert entry == {
        "id": "planner",
        "token_sha256": token_sha256(token),
        "read_only": True,
        "tools": ["search_tasks"],
    }
    assert token not in json.dumps(entry)
    again = run_cli("mint-token", "planner", env={"HOME": str(tmp_path)})
    assert again.stdout.splitlines()[1] != token
    unknown = run_cli("mint-token", "planner", "--tool", "drop_everything", env={"HOME": str(tmp_path)})
    assert unknown.returncode == 2 and "unknown tools" in unknown.stderr


def test_http_refuses_to_start_without_token_checks_or_on_a_public_address_without_allowed_hosts(
    tmp_path: Path,
) -> None:
    env = {"HOME": str(tmp_path), "DATABASE_URL": f"sqlite:///{tmp_path / 't.db'}"}
    no_tokens = run_cli("serve", "--transport", "http", env=env)
    assert no_tokens.returncode == 2 and "needs a way to check tokens" in no_tokens.stderr
    config = tmp_path / "http.json"
    config.write_text(json.dumps({"agents": [{"id": "a", "token_sha256": "0" * 64}]}))
    public = run_cli("--config", str(config), "serve", "--transport", "http", "--host", "0.0.0.0", env=env)
    assert public.returncode == 2 and "allowed_hosts" in public.stderr
    dev = run_cli("serve", "--transport", "http", "--dev-without-auth", "--host", "0.0.0.0", env=env)
    assert dev.returncode == 2 and "serves only on loopback" in dev.stderr
    # Development mode is the flag's alone: a config file cannot switch the tokens off.
    config.write_text(
        json.dumps({"agents": [{"id": "a", "token_sha256": "0" * 64}], "http_dev_without_auth": True})
    )
    from_file = run_cli("--config", str(config), "serve", "--transport", "http", env=env)
    assert from_file.returncode == 2 and "--dev-without-auth" in from_file.stderr


async def test_a_file_redirected_to_stdin_is_read_to_its_end_and_the_server_exits_cleanly(
    database_url: str, tmp_path: Path
) -> None:
    """A regular file cannot be polled like a pipe; the server falls back to the SDK's reader."""
    script = tmp_path / "requests.jsonl"
    script.write_text(json.dumps(initialize_message("f")) + "\n")
    with script.open() as stdin:
        served = await anyio.run_process(
            [sys.executable, "-m", "mcp_server", "serve"],
            stdin=stdin,
            env={"HOME": str(tmp_path), "DATABASE_URL": database_url},
            check=False,
        )
    assert served.returncode == 0, served.stderr.decode()
    [answer] = [json.loads(line) for line in served.stdout.decode().splitlines()]
    assert answer["id"] == 1 and "result" in answer


async def test_a_server_given_dev_null_as_stdin_exits_cleanly(database_url: str, tmp_path: Path) -> None:
    """/dev/null is a character device, as a terminal is, but the event loop cannot wait on it
    (a service manager's default stdin)."""
    served = await anyio.run_process(
        [sys.executable, "-m", "mcp_server", "serve"],
        stdin=subprocess.DEVNULL,
        env={"HOME": str(tmp_path), "DATABASE_URL": database_url},
        check=False,
    )
    assert served.returncode == 0, served.stderr.decode()
    assert served.stdout == b"" and b"Traceback" not in served.stderr


async def test_ctrl_c_stops_the_stdio_server_cleanly_without_a_traceback(
    database_url: str, tmp_path: Path
) -> None:
    process = await anyio.open_process(
        [sys.executable, "-m", "mcp_server", "serve"],
        env={"HOME": str(tmp_path), "DATABASE_URL": database_url, "PATH": str(BIN)},
    )
    assert process.stdin is not None and process.stdout is not None and process.stderr is not None
    async with process:
        await process.stdin.send(json.dumps(initialize_message("ctrl-c")).encode() + b"\n")
        with anyio.fail_after(30):
            answer = await process.stdout.receive()  # it is serving
        assert b'"result"' in answer
        process.send_signal(signal.SIGINT)  # what Ctrl-C in a terminal sends
        with anyio.fail_after(20):
            code = await process.wait()
        errors = b""
        async for chunk in process.stderr:
            errors += chunk
    assert code == 0, errors.decode()
    assert b"Traceback" not in errors and b"KeyboardInterrupt" not in errors, errors.decode()


def test_the_call_command_says_a_tool_error_once(tmp_path: Path) -> None:
    env = {"PATH": str(BIN), "HOME": str(tmp_path), "DATABASE_URL": f"sqlite:///{tmp_path / 't.db'}"}
    failed = run_cli("call", "get_task", '{"task_id": 424242}', env=env)
    assert failed.returncode == 1 and failed.stderr.count("does not exist") == 1, failed.stderr


def test_a_sqlite_path_whose_folder_cannot_be_made_is_one_clear_line(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    env = {"HOME": str(tmp_path), "DATABASE_URL": f"sqlite:///{blocker / 'sub' / 'tasks.db'}"}
    for command in (["serve"], ["migrate"]):
        result = run_cli(*command, env=env)
        assert result.returncode == 1, command
        said = result.stderr
        assert (
            "cannot make the folder" in said and str(blocker / "sub") in said and "Traceback" not in said
        ), said
    doctor = run_cli("doctor", env=env)  # a finding of its own, in its report
    assert doctor.returncode == 1 and "Traceback" not in doctor.stderr + doctor.stdout


def test_verify_audit_log_on_a_missing_sqlite_file_says_so_and_creates_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "tasks.db"
    verified = run_cli(
        "verify-audit-log", env={"HOME": str(tmp_path), "DATABASE_URL": f"sqlite:///{missing}"}
    )
    assert verified.returncode == 1 and "no database" in verified.stderr and str(missing) in verified.stderr
    assert "Traceback" not in verified.stderr
    assert not missing.exists() and not missing.parent.exists()
