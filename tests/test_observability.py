"""What an operator sees: traces sent over OTLP, logs on stderr, and progress during a long tool.

The traces and logs come from a real server subprocess over stdio, configured only by environment
variables, as an operator would configure it.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from mcp import Client
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from mcp_server.auth import mint_token, token_sha256
from mcp_server.db import Database
from mcp_server.logs import RateLimited
from mcp_server.telemetry import wanted_exporters
from tests.conftest import call, call_error, http_client, http_server
from tests.test_stdio import desktop_client, desktop_entry

pytestmark = pytest.mark.anyio

AGENT = desktop_entry()["env"]["MCP_AGENT_ID"]
CLIENT_TRACE, CLIENT_SPAN = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
TRACEPARENT = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"


def _value(any_value: Any) -> Any:
    return getattr(any_value, any_value.WhichOneof("value"))


@contextmanager
def otlp_collector() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """An OTLP/HTTP endpoint, as a collector serves it: every span it receives, decoded."""
    spans: list[dict[str, Any]] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            request = ExportTraceServiceRequest.FromString(body)
            for resource_spans in request.resource_spans:
                resource = {kv.key: _value(kv.value) for kv in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        spans.append(
                            {
                                "name": span.name,
                                "trace_id": span.trace_id.hex(),
                                "span_id": span.span_id.hex(),
                                "parent_id": span.parent_span_id.hex(),
                                "status": span.status.code,
                                "attributes": {kv.key: _value(kv.value) for kv in span.attributes},
                                "resource": resource,
                            }
                        )
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    collector = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=collector.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{collector.server_address[1]}", spans
    finally:
        collector.shutdown()
        collector.server_close()


async def test_with_an_otlp_endpoint_set_each_tool_call_is_a_span_with_its_caller_outcome_and_sql_beneath(
    database_url: str, tmp_path: Path
) -> None:
    with otlp_collector() as (endpoint, spans), (tmp_path / "stderr").open("w") as errlog:
        env = {
            "DATABASE_URL": database_url,
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_SERVICE_NAME": "tasks-under-test",
        }
        async with desktop_client(env, errlog) as client:
            project = await call(client, "create_project", {"name": "Traced"})
            await call_error(client, "get_task", {"task_id": 999_999})
            # A client's own trace continues through the call.
            traced = await client.call_tool(
                "get_audit_trail", {"entity_id": project["id"]}, meta={"traceparent": TRACEPARENT}
            )
            trail = traced.structured_content
            assert trail is not None
        # The server sends what it holds as it exits; the collector's thread receives it.
        with anyio.fail_after(30):
            while not any(span["name"] == "tools/call get_audit_trail" for span in spans):  # noqa: ASYNC110
                await anyio.sleep(0.05)

    by_name = {span["name"]: span for span in spans}
    created = by_name["tools/call create_project"]
    assert created["resource"]["service.name"] == "tasks-under-test"
    assert created["attributes"]["gen_ai.tool.name"] == "create_project"
    assert created["attributes"]["enduser.id"] == AGENT
    assert created["attributes"]["task_server.outcome"] == "ok"
    # The same request id as the change's audit entry: one id finds the span, the logs and the entry.
    [entry] = trail["items"]
    assert created["attributes"]["task_server.request_id"] == entry["request_id"]
    sql = [
        span
        for span in spans
        if span["parent_id"] == created["span_id"] and span["attributes"].get("db.system") is not None
    ]
    assert len(sql) >= 2, [span["name"] for span in spans]
    assert {span["trace_id"] for span in sql} == {created["trace_id"]}
    expected_system = "sqlite" if database_url.startswith("sqlite") else "postgresql"
    assert {span["attributes"]["db.system"] for span in sql} == {expected_system}

    # Statements are traced as text: the values bound to them (the project's name) stay out.
    assert not [span["name"] for span in spans if "Traced" in json.dumps(span["attributes"])]
    read = by_name["tools/call get_audit_trail"]
    assert (read["trace_id"], read["parent_id"]) == (CLIENT_TRACE, CLIENT_SPAN)

    missed = by_name["tools/call get_task"]
    assert missed["attributes"]["task_server.outcome"] == "error"
    assert missed["status"] == 2  # STATUS_CODE_ERROR


async def test_over_http_the_span_names_the_agent_its_token_proves_and_a_refusal(
    database_url: str, db: Database, tmp_path: Path
) -> None:
    token = mint_token()
    config = {
        "database_url": database_url,
        "agents": [{"id": "planner", "token_sha256": token_sha256(token), "tools": ["create_project"]}],
    }
    with otlp_collector() as (endpoint, spans):
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}
        with http_server(tmp_path, config, env=env) as url:
            async with http_client(url, token) as client:
                await call(client, "create_project", {"name": "Over HTTP"})
                assert "tool:search_tasks" in await call_error(client, "search_tasks", {})
            with anyio.fail_after(30):
                while len([span for span in spans if span["name"].startswith("tools/call")]) < 2:  # noqa: ASYNC110
                    await anyio.sleep(0.05)

    by_name = {span["name"]: span for span in spans}
    created, refused = by_name["tools/call create_project"], by_name["tools/call search_tasks"]
    assert created["attributes"]["enduser.id"] == refused["attributes"]["enduser.id"] == "planner"
    assert created["attributes"]["task_server.outcome"] == "ok"
    assert refused["attributes"]["task_server.outcome"] == "refused"
    beneath = [span for span in spans if span["parent_id"] == created["span_id"]]
    assert any("db.system" in span["attributes"] for span in beneath)


@pytest.mark.parametrize(
    ("env", "exporters"),
    [
        ({}, []),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, ["otlp"]),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, ["otlp"]),
        ({"OTEL_TRACES_EXPORTER": "console, otlp"}, ["console", "otlp"]),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, []),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, []),
    ],
)
def test_tracing_is_off_unless_the_standard_settings_ask_for_it(
    env: dict[str, str], exporters: list[str]
) -> None:
    assert wanted_exporters(env) == exporters


def test_an_exporter_the_server_cannot_send_to_stops_it_with_a_clear_message(tmp_path: Path) -> None:
    served = subprocess.run(
        [sys.executable, "-m", "mcp_server", "serve"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env={"HOME": str(tmp_path), "OTEL_TRACES_EXPORTER": "zipkin"},
        timeout=60,
        check=False,
    )
    assert served.returncode == 1
    assert b"OTEL_TRACES_EXPORTER: 'zipkin' is not supported here; use otlp, console or none" in served.stderr
    assert b"Traceback" not in served.stderr


@pytest.mark.parametrize("log_format", ["json", "text"])
async def test_log_records_of_a_tool_call_carry_its_tool_agent_and_request_id(
    database_url: str, tmp_path: Path, log_format: str
) -> None:
    stderr = tmp_path / "stderr"
    with stderr.open("w") as errlog:
        env = {"DATABASE_URL": database_url, "LOG_FORMAT": log_format, "LOG_LEVEL": "DEBUG"}
        async with desktop_client(env, errlog) as client:
            project = await call(client, "create_project", {"name": "Logged"})
            trail = await call(client, "get_audit_trail", {"entity_id": project["id"]})
    request_id = trail["items"][0]["request_id"]
    lines = stderr.read_text().splitlines()
    assert lines

    if log_format == "text":
        tagged = [line for line in lines if f"request_id={request_id}]" in line]
        assert tagged and all(f"[tool=create_project agent={AGENT} " in line for line in tagged)
        assert any(" mcp_server.sql: " in line for line in tagged)  # the call's statements
        return

    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= record.keys() for record in records)
    of_the_call = [record for record in records if record.get("request_id") == request_id]
    assert of_the_call
    assert {(record["tool"], record["agent_id"]) for record in of_the_call} == {("create_project", AGENT)}
    assert any(record["logger"] == "mcp_server.sql" for record in of_the_call)
    # Outside a call (start-up, shut-down) a record names no call.
    assert any("request_id" not in record for record in records)


async def test_a_bulk_update_reports_its_steps_to_a_client_that_sent_a_progress_token(
    client: Client, db: Database
) -> None:
    project = await call(client, "create_project", {"name": "Progress"})
    for i in range(5):
        await call(client, "create_task", {"title": f"task {i}", "project_id": project["id"]})
    heard: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        heard.append((progress, total, message))

    result = await client.call_tool(
        "bulk_update_status",
        {"status": "completed", "filter": {"field": "project_id", "op": "eq", "value": project["id"]}},
        progress_callback=on_progress,
    )
    assert not result.is_error
    assert result.structured_content is not None and result.structured_content["changed_count"] == 5
    messages = [message or "" for _, _, message in heard]
    if db.is_sqlite:  # three statements, a notification after each
        assert [(progress, total) for progress, total, _ in heard] == [(0, 3), (1, 3), (2, 3), (3, 3)]
        assert "5 audit entries written" in messages[1] and "5 tasks updated" in messages[2]
    else:  # one statement
        assert [(progress, total) for progress, total, _ in heard] == [(0, 1), (1, 1)]
        assert "5 tasks changed and audited" in messages[1]


def test_a_flood_of_one_log_record_is_counted_instead_of_written() -> None:
    """5,000 of one record in 2 s: 20 written, the rest counted; once its window has passed, the
    next record written, of any kind, comes after a line saying how many of what were left out.
    Records that differ (an access log's lines) and DEBUG records are all written."""
    written: list[logging.LogRecord] = []
    sink = logging.Handler()
    sink.emit = written.append  # type: ignore[method-assign]
    limited = RateLimited(sink, burst=20, window=10.0)

    def record(message: str, at: float, *args: object, level: int = logging.ERROR) -> logging.LogRecord:
        made = logging.LogRecord("asyncio", level, __file__, 1, message, args, None)
        made.created = at
        return made

    flood = "socket.accept() out of system resource: %s"
    for n in range(5000):
        limited.handle(record(flood, 1000 + n / 2500, "fd=6"))
    limited.handle(record("another kind of record", 1001.5))
    for n in range(50):
        limited.handle(record("GET /mcp %d", 1001.6, n, level=logging.INFO))
        limited.handle(record("a statement", 1001.7, level=logging.DEBUG))
    limited.handle(record("GET /mcp %d", 1012, 50, level=logging.INFO))
    messages = [entry.getMessage() for entry in written]
    assert messages[:21] == [flood % "fd=6"] * 20 + ["another kind of record"]
    assert messages[21:121] == [message for n in range(50) for message in (f"GET /mcp {n}", "a statement")]
    assert messages[121:] == [
        "4980 more records like this were left out of the log (more than 20 in 10 s): "
        "socket.accept() out of system resource: fd=6",
        "GET /mcp 50",
    ]
    assert written[121].levelno == logging.WARNING and written[121].name == "asyncio"


async def test_over_http_every_log_line_is_json_and_no_token_reaches_the_log(
    database_url: str, tmp_path: Path
) -> None:
    """uvicorn's records (start, access log, connection errors) as JSON like the server's own; a
    token sent where it does not belong (the query string) or refused is written nowhere."""
    token, stray = mint_token(), mint_token()
    config = {
        "database_url": database_url,
        "agents": [{"id": "logged", "token_sha256": token_sha256(token)}],
        "http_header_timeout_seconds": 1,
    }
    with http_server(tmp_path, config, env={"LOG_FORMAT": "json", "LOG_LEVEL": "DEBUG"}) as url:
        async with http_client(url, token) as client:
            await call(client, "create_project", {"name": "Logged over HTTP"})
        async with httpx2.AsyncClient() as raw:
            assert (await raw.get(f"{url}?access_token={stray}&token={token}")).status_code == 401
            assert (await raw.post(url, headers={"Authorization": f"Bearer {stray}"})).status_code == 401
            assert (await raw.get(url.replace("/mcp", f"/nowhere?token={token}"))).status_code == 404
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        for _ in range(100):  # a flood of bad tokens, each on a new connection (a new client port)
            async with await anyio.connect_tcp("127.0.0.1", port) as refused:
                bad = f"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {stray}\r\n"
                await refused.send(f"{bad}Content-Length: 0\r\n\r\n".encode())
                assert (await refused.receive()).startswith(b"HTTP/1.1 401")
        slow = await anyio.connect_tcp("127.0.0.1", port)
        await slow.send(b"GET /mcp HTTP/1.1\r\n")  # and no more: closed after the header timeout
        with anyio.fail_after(10):
            assert (await slow.receive()).startswith(b"HTTP/1.1 408")
        await slow.aclose()
        log = await anyio.Path(tmp_path / f"server-{port}.log").read_text()
    lines = log.splitlines()
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert {"uvicorn.error", "uvicorn.access", "mcp_server.connections"} <= {r["logger"] for r in records}
    assert any("GET /nowhere?…" in record["message"] for record in records)
    refused = [r for r in records if r["message"].endswith('"POST /mcp HTTP/1.1" 401')]
    assert len(refused) == 20  # of 101 refused POSTs: the rest are counted (logs.RateLimited)
    assert token not in log and stray not in log
