"""MCP log notifications: a client hears the server's own records of its own calls, at its level."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from mcp import Client
from mcp.types import LoggingMessageNotificationParams

from mcp_server.config import AgentConfig, Settings
from mcp_server.server import create_server
from tests.conftest import call_error

# The logging feature is deprecated from the 2026-07-28 era on; the handshake era still has it.
pytestmark = [
    pytest.mark.anyio,
    pytest.mark.filterwarnings("ignore::mcp.shared.exceptions.MCPDeprecationWarning"),
]


def viewer(settings: Settings, heard: list[LoggingMessageNotificationParams], **client: Any) -> Client:
    """An in-process client of a read-only agent, whose log notifications land in `heard`."""
    as_viewer = settings.model_copy(
        update={"agent_id": "viewer", "agents": (AgentConfig(id="viewer", read_only=True),)}
    )

    async def hear(params: LoggingMessageNotificationParams) -> None:
        heard.append(params)

    return Client(create_server(as_viewer), logging_callback=hear, **client)  # type: ignore[arg-type]


async def test_a_session_hears_its_calls_records_from_the_level_it_set(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mcp_server")
    heard: list[LoggingMessageNotificationParams] = []
    async with viewer(settings, heard, mode="legacy") as client:
        assert client.server_capabilities.logging is not None
        await call_error(client, "create_project", {"name": "no"})
        assert heard == []  # warning and above until the session says otherwise
        await client.set_logging_level("info")
        await call_error(client, "create_project", {"name": "no"})
        [record] = heard
        assert record.level == "info" and record.logger == "mcp_server.server"
        assert record.data == "refused: permission write is missing"
        await client.set_logging_level("error")
        await call_error(client, "create_project", {"name": "no"})
        assert len(heard) == 1


@pytest.mark.parametrize("level", [None, "info"])
async def test_in_the_2026_era_a_request_hears_records_only_when_it_asks(
    settings: Settings, caplog: pytest.LogCaptureFixture, level: str | None
) -> None:
    caplog.set_level(logging.INFO, logger="mcp_server")
    heard: list[LoggingMessageNotificationParams] = []
    async with viewer(settings, heard, mode="auto", log_level=level) as client:
        await call_error(client, "create_project", {"name": "no"})
    assert [record.data for record in heard] == (
        [] if level is None else ["refused: permission write is missing"]
    )


async def test_the_sql_log_never_reaches_a_client(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="mcp_server")  # statements are logged at DEBUG
    heard: list[LoggingMessageNotificationParams] = []
    async with viewer(settings, heard, mode="legacy") as client:
        await client.set_logging_level("debug")
        await call_error(client, "create_project", {"name": "no"})
    assert any(r.name == "mcp_server.sql" for r in caplog.records), "the SQL log was on"
    assert heard and all(record.logger != "mcp_server.sql" for record in heard)
    assert not any("INSERT" in str(record.data) or "SELECT" in str(record.data) for record in heard)
