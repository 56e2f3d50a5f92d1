"""Resource subscriptions: a client hears of another agent's change to what it subscribed to,
from this server process or another, on both databases."""

from __future__ import annotations

import time
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.shared.exceptions import MCPError
from mcp.shared.subscriptions import ResourceUpdated
from mcp.types import INVALID_PARAMS, Implementation, ResourceUpdatedNotification

from mcp_server.config import Settings
from mcp_server.server import create_server
from tests.conftest import call, connect
from tests.test_faults import stdio_server
from tests.test_permissions import with_agent
from tests.test_tools import make_project, make_task

# resources/subscribe belongs to the handshake era; the 2026-07-28 era replaces it.
pytestmark = [
    pytest.mark.anyio,
    pytest.mark.filterwarnings("ignore::mcp.shared.exceptions.MCPDeprecationWarning"),
]

WITHIN_SECONDS = 1.0  # what a subscriber should wait at most, at the default poll and seal intervals


class Listener:
    """A handshake-era client that keeps the resource updates it hears, with when it heard them."""

    def __init__(self, settings: Settings, name: str = "listener") -> None:
        self.heard: list[tuple[str, float]] = []
        self.news = anyio.Event()
        info = Implementation(name=name, version="1")
        as_agent = settings.model_copy(update={"agent_id": name})
        self.client = Client(
            create_server(as_agent), mode="legacy", client_info=info, message_handler=self.hear
        )  # type: ignore[arg-type]

    async def hear(self, message: Any) -> None:
        if isinstance(message, ResourceUpdatedNotification):
            self.heard.append((str(message.params.uri), time.monotonic()))
            self.news.set()

    async def wait_for(self, uris: set[str], since: float, seconds: float = 10) -> float:
        """Wait until every one of `uris` was heard after `since`; the longest it took."""
        with anyio.fail_after(seconds):
            while not uris <= {uri for uri, at in self.heard if at >= since}:
                await self.news.wait()
                self.news = anyio.Event()
        return max(at for uri, at in self.heard if uri in uris and at >= since) - since


async def test_a_subscriber_hears_another_agents_changes_to_what_it_subscribed_to(
    settings: Settings,
) -> None:
    async with connect(settings, "legacy", name="writer") as writer:
        home, away = await make_project(writer, "home"), await make_project(writer, "away")
        task = await make_task(writer, home)
        other = await make_task(writer, away, "not watched")
        listener = Listener(settings)
        async with listener.client as client:
            assert (
                client.server_capabilities.resources is not None
                and client.server_capabilities.resources.subscribe
            )
            for uri in (f"task://{task['id']}", f"project://{home}/tasks"):
                await client.subscribe_resource(uri)
            started = time.monotonic()
            await call(writer, "update_task", {"task_id": task["id"], "status": "blocked"})
            took = await listener.wait_for({f"task://{task['id']}", f"project://{home}/tasks"}, started)
            assert took < WITHIN_SECONDS * 3  # generous: CI machines are slow; the README gives the figure
            # A change elsewhere is not heard; a move out of the project is, by the project it left.
            heard_before = len(listener.heard)
            await call(writer, "update_task", {"task_id": other["id"], "title": "still not watched"})
            started = time.monotonic()
            await call(writer, "update_task", {"task_id": task["id"], "project_id": away})
            await listener.wait_for({f"task://{task['id']}", f"project://{home}/tasks"}, started)
            assert all("not" not in uri for uri, _ in listener.heard[heard_before:])
            assert {uri for uri, _ in listener.heard} <= {f"task://{task['id']}", f"project://{home}/tasks"}
            # After unsubscribing, nothing more. A change to a resource still watched, made after the
            # delete, is heard after it (changes are read in commit order): until then, no waiting.
            await client.unsubscribe_resource(f"task://{task['id']}")
            await client.unsubscribe_resource(f"project://{home}/tasks")
            sentinel = f"task://{other['id']}"
            await client.subscribe_resource(sentinel)
            count = len(listener.heard)
            await call(writer, "soft_delete_task", {"task_id": task["id"]})
            started = time.monotonic()
            await call(writer, "update_task", {"task_id": other["id"], "title": "the sentinel"})
            await listener.wait_for({sentinel}, started)
            assert [uri for uri, _ in listener.heard[count:]] == [sentinel]


async def test_a_change_from_another_server_process_is_heard(settings: Settings, database_url: str) -> None:
    """Two processes on one database: the writer is a stdio server of its own."""
    async with connect(settings, "legacy", name="owner") as owner:
        project = await make_project(owner)
        task = await make_task(owner, project)
    listener = Listener(settings)
    async with listener.client as client, stdio_server(database_url) as other:
        await client.subscribe_resource(f"task://{task['id']}")
        started = time.monotonic()
        reply = await other.request(
            "tools/call", {"name": "update_task", "arguments": {"task_id": task["id"], "priority": "high"}}
        )
        assert not reply["result"].get("isError"), reply
        took = await listener.wait_for({f"task://{task['id']}"}, started)
        assert took < WITHIN_SECONDS * 3


async def test_a_subscription_names_a_resource_the_agent_may_read(settings: Settings) -> None:
    narrow = with_agent(settings, "narrow", tools=frozenset({"get_task"}))
    async with connect(narrow, "legacy", name="narrow") as client:
        for uri, says in (
            ("file:///etc/passwd", "cannot subscribe"),
            ("task://abc", "cannot subscribe"),
            ("task://1/tasks", "cannot subscribe"),
            ("task://02", "cannot subscribe"),  # ids as reads take them (resources.resource_id)
            ("task://9007199254740992", "cannot subscribe"),
            ("project://1/tasks", "tool:search_tasks is missing"),
        ):
            with pytest.raises(MCPError) as refused:
                await client.subscribe_resource(uri)
            assert says in refused.value.error.message, uri
            assert refused.value.error.code != 0
        await client.subscribe_resource("task://1")  # it may read tasks


async def test_a_stateless_server_offers_no_subscriptions(settings: Settings) -> None:
    stateless = settings.model_copy(update={"http_stateless": True})
    async with Client(create_server(stateless), mode="legacy") as client:  # type: ignore[arg-type]
        assert client.server_capabilities.resources is not None
        assert not client.server_capabilities.resources.subscribe
        with pytest.raises(MCPError) as refused:
            await client.subscribe_resource("task://1")
        assert refused.value.error.code != INVALID_PARAMS  # method not found


async def test_in_the_2026_era_a_listen_stream_hears_another_agents_change(settings: Settings) -> None:
    async with connect(settings, "auto", name="writer") as writer:
        project = await make_project(writer)
        task = await make_task(writer, project)
        async with connect(settings, "auto", name="listener") as client:
            watched = [f"task://{task['id']}", f"project://{project}/tasks"]
            async with client.listen(resource_subscriptions=watched) as stream:
                await call(writer, "update_task", {"task_id": task["id"], "title": "renamed"})
                heard: set[str] = set()
                with anyio.fail_after(10):
                    async for event in stream:
                        assert isinstance(event, ResourceUpdated)
                        heard.add(event.uri)
                        if heard == set(watched):
                            break
    narrow = with_agent(settings, "narrow", tools=frozenset({"get_task"}))
    async with connect(narrow, "auto", name="narrow") as client:
        with pytest.raises(MCPError) as refused:
            async with client.listen(resource_subscriptions=[f"project://{project}/tasks"]):
                pass
        assert "tool:search_tasks is missing" in refused.value.error.message
