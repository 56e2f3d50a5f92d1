"""The console for people, in a real browser: Playwright drives Debian's Chromium (installed by
.ci/run) against the HTTP server in a subprocess, on both databases. An operator signs in, filters
the board, opens a task's history, approves a changeset an agent's policy held and sees the tasks
change, then undoes it; each step is checked against the tools and the audit log. A read-only
operator can look but not decide; forged and cross-site posts are refused. axe-core checks every
page against WCAG 2 A and AA and its best practices, and no page logs a script or CSP error.

Each page's screenshot is written to $CONSOLE_SCREENSHOTS (else the test's temporary folder); the
README shows the ones written by `CONSOLE_SCREENSHOTS=docs/console pytest tests/test_console.py -k sqlite`.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx2
import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from mcp_server.auth import token_sha256
from mcp_server.console import within_console
from mcp_server.operators import hash_password
from tests.conftest import call, http_client, http_server

pytestmark = pytest.mark.slow

PASSWORD = "a long operator password"
PLANNER_TOKEN = "planner-" + "p" * 40
WORKER_TOKEN = "worker-" + "w" * 40
# As the machine's own probe starts it: these switches keep Chromium off a network it cannot reach.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


AXE = Path(__file__).parent.parent / ".ci" / "axe" / "node_modules" / "axe-core" / "axe.min.js"
AXE_RULES = ["wcag2a", "wcag2aa", "best-practice"]


def chromium() -> str:
    found = os.environ.get("CHROMIUM") or shutil.which("chromium")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true requires Chromium (.ci/run installs Debian's chromium package)")
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    return found


def axe() -> str:
    if not AXE.is_file():
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true requires axe-core (.ci/run installs it: npm install --prefix .ci/axe)")
        pytest.skip("axe-core is not installed (npm install --prefix .ci/axe)")
    return AXE.read_text()


async def violations(page: Page, script: str) -> list[tuple[str, str]]:
    """What axe-core finds on the page against WCAG 2 A and AA and its best practices: rule, element."""
    await page.add_script_tag(content=script)
    found = await page.evaluate(f"axe.run(document, {{runOnly: {AXE_RULES}}})")
    return [(v["id"], node["html"][:120]) for v in found["violations"] for node in v["nodes"]]


def console_config(database_url: str) -> dict[str, Any]:
    hashed = hash_password(PASSWORD)
    return {
        "database_url": database_url,
        "agents": [
            # The planner's bulk changes of more than 2 tasks wait for a person.
            {"id": "planner", "token_sha256": token_sha256(PLANNER_TOKEN), "approval_over_rows": 2},
            {"id": "worker", "token_sha256": token_sha256(WORKER_TOKEN)},
        ],
        "operators": [
            {"id": "alice", "password_scrypt": hashed},
            {"id": "bob", "password_scrypt": hashed, "read_only": True},
        ],
        "console": {},
    }


@asynccontextmanager
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


async def sign_in(page: Page, base: str, operator: str, password: str = PASSWORD) -> None:
    await page.goto(f"{base}/console")
    await expect(page).to_have_url(re.compile(r"/console/sign-in"))
    await page.get_by_label("Operator id").fill(operator)
    await page.get_by_label("Password").fill(password)
    await page.get_by_role("button", name="Sign in").click()


async def statuses(client: Any, ids: list[int]) -> list[str]:
    return [(await call(client, "get_task", {"task_id": task_id}))["status"] for task_id in ids]


def screenshots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("CONSOLE_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.mark.anyio
async def test_an_operator_signs_in_filters_reads_history_approves_a_changeset_and_undoes_it(
    database_url: str, tmp_path: Path
) -> None:
    shots = screenshots(tmp_path)
    with http_server(tmp_path, console_config(database_url)) as url:
        base = url.removesuffix("/mcp")
        async with http_client(url, PLANNER_TOKEN) as planner, http_client(url, WORKER_TOKEN) as worker:
            project = (await call(planner, "create_project", {"name": "Launch"}))["id"]
            titles = ["Write the press release", "Book the venue", "Order badges", "Test the stream"]
            ids = [
                (await call(planner, "create_task", {"title": title, "project_id": project}))["id"]
                for title in titles
            ]
            await call(planner, "update_task", {"task_id": ids[3], "status": "in_progress"})
            await call(worker, "claim_task", {"task_id": ids[3]})
            await call(worker, "add_comment", {"task_id": ids[3], "body": "Stream key is in the vault."})
            held = await call(planner, "bulk_update_status", {"status": "completed", "task_ids": ids[:3]})
            assert held["changeset"]["state"] == "pending" and held["changed_count"] == 0

            script = axe()
            async with browser() as chrome:
                page = await chrome.new_page(viewport={"width": 1200, "height": 900})
                # Anything the pages' own script or the Content-Security-Policy refuses shows here.
                problems: list[str] = []
                page.on(
                    "console",
                    # (the wrong password's 401 aside)
                    lambda message: (
                        problems.append(message.text)
                        if message.type == "error" and "status of 401" not in message.text
                        else None
                    ),
                )
                page.on("pageerror", lambda error: problems.append(str(error)))
                # A wrong password is refused; the right one opens the board.
                await sign_in(page, base, "alice", "not the password at all")
                await expect(page.get_by_role("alert")).to_contain_text("operator id or password is wrong")
                await page.screenshot(path=shots / "sign-in.png")
                await page.get_by_label("Operator id").fill("alice")
                await page.get_by_label("Password").fill(PASSWORD)
                await page.get_by_role("button", name="Sign in").click()
                await expect(page.get_by_role("heading", name="Board")).to_be_visible()
                rows = page.locator("#results tbody tr")
                await expect(rows).to_have_count(4)
                await expect(page.get_by_role("link", name="Approvals")).to_contain_text("1")
                await page.screenshot(path=shots / "board.png", full_page=True)

                # The board filters as search_tasks does, live (htmx) as the choice changes.
                await page.get_by_label("Status").select_option("in_progress")
                await expect(rows).to_have_count(1)
                await expect(rows.first).to_contain_text("Test the stream")
                await expect(rows.first).to_contain_text("worker")  # its claim
                await expect(page).to_have_url(re.compile(r"status=in_progress"))
                await page.get_by_label("Status").select_option("")
                await page.get_by_label("Title contains").fill("venue")
                await expect(rows).to_have_count(1)
                await expect(rows.first).to_contain_text("Book the venue")

                # A task's page: its claim, comment, and history as diffs, by whom.
                await page.get_by_label("Title contains").fill("stream")
                await page.get_by_role("link", name="Test the stream").click()
                await expect(
                    page.get_by_role("heading", name=f"Task {ids[3]}: Test the stream")
                ).to_be_visible()
                history = page.locator(".history > li")
                await expect(history).to_have_count(4)  # commented, claimed, updated, created
                updated = history.filter(has_text="updated by planner")
                await expect(updated.locator(".diff")).to_contain_text("status")
                await expect(updated.locator("del")).to_contain_text("pending")
                await expect(updated.locator("ins")).to_contain_text("in_progress")
                await expect(history.first).to_contain_text("commented by worker")
                await expect(page.locator(".fields")).to_contain_text("worker until")
                await expect(page.locator(".comments")).to_contain_text("Stream key is in the vault.")
                await page.screenshot(path=shots / "task.png", full_page=True)

                # The changeset the planner's policy held: approve it, and the tasks change.
                await page.get_by_role("link", name="Approvals").click()
                await page.get_by_role("link", name="set the status of 3 task(s) to completed").click()
                await expect(page.locator(".fields")).to_contain_text(held["changeset"]["digest"])
                await expect(page.locator("tbody tr")).to_have_count(3)
                await page.screenshot(path=shots / "changeset.png", full_page=True)

                # Every page passes axe-core's checks (in a context of its own that lets the checker's
                # script in past the pages' Content-Security-Policy).
                checking = await chrome.new_context(bypass_csp=True)
                await checking.add_cookies(await page.context.cookies())
                checked = await checking.new_page()
                pages = [
                    "",
                    f"/tasks/{ids[3]}",
                    "/changesets",
                    f"/changesets/{held['changeset']['id']}",
                    "/agents",
                ]
                for path in [*pages, "/audit?verify=1"]:
                    await checked.goto(f"{base}/console{path}")
                    assert await violations(checked, script) == [], path
                await checking.close()

                await page.get_by_role("button", name="Approve and apply").click()
                await expect(page.get_by_role("status")).to_contain_text("Approved and applied")
                assert await statuses(planner, ids) == ["completed"] * 3 + ["in_progress"]
                approved = await call(planner, "get_changeset", {"changeset_id": held["changeset"]["id"]})
                assert (approved["state"], approved["decided_by"]) == ("applied", "operator:alice")
                await expect(page.locator(".history > li")).to_have_count(4)  # approved + 3 updates
                await page.screenshot(path=shots / "approved.png", full_page=True)

                # Undo it, after its preview: every task back, as a change by the operator.
                await expect(page.get_by_text("Undoing it would put back 3 task(s)")).to_be_visible()
                await page.get_by_role("button", name="Undo this request").click()
                await expect(page.get_by_role("heading", name=re.compile("^Request"))).to_be_visible()
                await expect(page.locator(".history > li")).to_have_count(3)
                assert await statuses(planner, ids) == ["pending"] * 3 + ["in_progress"]
                await page.screenshot(path=shots / "undone.png", full_page=True)

                await page.get_by_role("link", name="Agents").click()
                await expect(page.locator("table").first).to_contain_text("planner")
                await expect(page.locator("table").last).to_contain_text("over 2 tasks")
                await page.screenshot(path=shots / "agents.png", full_page=True)
                await page.get_by_role("link", name="Audit log").click()
                await page.get_by_role("button", name="Verify the whole chain now").click()
                await expect(page.get_by_role("status")).to_contain_text("Verified")
                await page.screenshot(path=shots / "audit.png", full_page=True)

                # Readable on a phone.
                phone = await chrome.new_page(viewport={"width": 390, "height": 844})
                await phone.context.add_cookies(await page.context.cookies())
                await phone.goto(f"{base}/console")
                await expect(phone.locator("#results tbody tr")).to_have_count(4)
                width = await phone.evaluate("document.documentElement.scrollWidth")
                assert width <= 390, f"the board is {width} px wide on a 390 px screen"
                await phone.screenshot(path=shots / "board-phone.png", full_page=True)
                assert problems == []

            # Every step is on the record, under the operator's identity.
            trail = await call(planner, "get_audit_trail", {"changed_by": "operator:alice"})
            assert sorted(entry["action"] for entry in trail["items"]) == [
                "approved",
                "signed_in",
                "updated",
                "updated",
                "updated",
            ]
            assert trail["items"][0]["new_value"] == {
                "status": "pending",
                "reverts": approved["applied_request_id"],
            }


@pytest.mark.anyio
async def test_a_read_only_operator_cannot_decide_and_forged_or_cross_site_posts_are_refused(
    database_url: str, tmp_path: Path
) -> None:
    with http_server(tmp_path, console_config(database_url)) as url:
        base = url.removesuffix("/mcp")
        async with http_client(url, PLANNER_TOKEN) as planner:
            project = (await call(planner, "create_project", {"name": "Launch"}))["id"]
            ids = [
                (await call(planner, "create_task", {"title": f"task {n}", "project_id": project}))["id"]
                for n in range(3)
            ]
            held = (await call(planner, "bulk_delete_tasks", {"task_ids": ids}))["changeset"]

            async with browser() as chrome:
                page = await chrome.new_page()
                await sign_in(page, base, "bob")
                await page.goto(f"{base}/console/changesets/{held['id']}")
                await expect(page.get_by_text("read-only operator")).to_be_visible()
                await expect(page.get_by_role("button", name="Approve and apply")).to_have_count(0)
                csrf = await page.locator("input[name=csrf]").first.input_value()
                cookies = {c["name"]: c["value"] for c in await page.context.cookies()}

            decision = {"csrf": csrf, "digest": held["digest"], "decision": "approve"}
            async with httpx2.AsyncClient(base_url=base, cookies=cookies) as http:
                refused = await http.post(f"/console/changesets/{held['id']}", data=decision)
                assert refused.status_code == 403 and "read-only" in refused.text
                forged = await http.post(f"/console/changesets/{held['id']}", data=decision | {"csrf": "x"})
                assert forged.status_code == 403 and "form has expired" in forged.text
                elsewhere = {"Origin": "https://evil.example"}
                cross = await http.post(f"/console/changesets/{held['id']}", data=decision, headers=elsewhere)
                assert cross.status_code == 403
                # Ids the server never makes are none, whatever the database would make of them.
                for odd in ("%00", "x" * 500, "é"):
                    assert (await http.get(f"/console/changesets/{odd}")).status_code == 404
                    assert (await http.get(f"/console/requests/{odd}")).status_code == 404
            async with httpx2.AsyncClient(base_url=base) as stranger:
                signed_out = await stranger.get("/console/agents")
                assert signed_out.status_code == 303 and "/console/sign-in" in signed_out.headers["location"]
            shown = await call(planner, "get_changeset", {"changeset_id": held["id"]})
            assert shown["state"] == "pending"
            assert len((await call(planner, "search_tasks", {}))["items"]) == 3


@pytest.mark.parametrize(
    ("asked", "goes_to"),
    [
        ("/console/tasks/5", "/console/tasks/5"),
        ("/console?status=pending&q=a%20b", "/console?status=pending&q=a%20b"),
        ("//evil.example", "/console"),
        ("https://evil.example/console", "/console"),
        ("/console/..//evil.example", "/console"),
        ("/console/%2e%2e/mcp", "/console"),
        ("/console/../mcp", "/console"),
        ("/console@evil.example", "/console"),
        ("/consolex", "/console"),
        ("\\\\evil.example", "/console"),
    ],
)
def test_after_signing_in_an_operator_goes_to_a_console_page_and_nowhere_else(
    asked: str, goes_to: str
) -> None:
    assert within_console(asked) == goes_to
