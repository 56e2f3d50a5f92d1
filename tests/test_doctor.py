"""`mcp-task-server doctor`, run as an operator runs it: a subprocess, configured by environment."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
from sqlalchemy import make_url, text

from mcp_server.auth import token_sha256
from mcp_server.db import Database
from mcp_server.operators import hash_password
from tests.conftest import free_port

pytestmark = pytest.mark.anyio

SECRET = "jwt-secret-that-must-not-show-0123456789"


def doctor(env: dict[str, str], tmp_path: Path, *args: str) -> tuple[int, Any, str]:
    """Exit code, the JSON report, stderr."""
    ran = subprocess.run(
        [sys.executable, "-m", "mcp_server", *args, "doctor", "--json"],
        capture_output=True,
        env={"HOME": str(tmp_path), **env},
        timeout=120,
        check=False,
        text=True,
    )
    assert "Traceback" not in ran.stderr, ran.stderr
    return ran.returncode, json.loads(ran.stdout), ran.stderr


def levels(report: Any) -> dict[str, str]:
    """Each check's worst level."""
    order = ["ok", "warning", "problem"]
    worst: dict[str, str] = {}
    for finding in report["findings"]:
        check, level = finding["check"], finding["level"]
        if order.index(level) >= order.index(worst.get(check, "ok")):
            worst[check] = level
    return worst


async def test_on_a_sound_database_it_passes_and_shows_the_settings_with_secrets_masked(
    database_url: str, db: Database, tmp_path: Path
) -> None:
    url = database_url
    if url.startswith("postgresql"):  # trust auth takes any password: show that it is masked
        url = make_url(url).set(password="db-password-not-shown").render_as_string(hide_password=False)
    config = tmp_path / "server.json"
    token_hash = token_sha256("some-token")
    password_hash = hash_password("an operator's password")
    config.write_text(
        json.dumps(
            {
                "agents": [{"id": "bot", "token_sha256": token_hash}],
                "operators": [{"id": "alice", "password_scrypt": password_hash}],
                "jwt": {"issuer": "https://idp", "audience": "tasks", "algorithms": ["HS256"]},
            }
        )
    )
    env = {"DATABASE_URL": url, "MCP_JWT_SECRET": SECRET}
    code, report, _ = doctor(env, tmp_path, "--config", str(config))
    assert code == 0, report
    assert report["healthy"] is True
    shown = json.dumps(report)
    for secret in (SECRET, token_hash, "db-password-not-shown", password_hash.split(":")[-1]):
        assert secret not in shown
    assert report["settings"]["jwt_secret"] == "***"
    [agent] = report["settings"]["agents"]
    assert (agent["id"], agent["token_sha256"]) == ("bot", "***")
    assert report["settings"]["operators"] == [{"id": "alice", "password_scrypt": "***", "read_only": False}]
    assert report["settings"]["pool_size"] == 5
    checks = levels(report)
    assert checks["database"] == checks["schema"] == checks["audit log"] == checks["pool"] == "ok"
    assert checks["telemetry"] == "ok"
    if database_url.startswith("postgresql"):
        # The tests connect as the superuser: the triggers are there, but this role could drop them.
        assert checks["database role"] == "warning"
        assert checks["connections"] == "ok"


async def test_a_disabled_or_dropped_audit_trigger_is_a_problem_with_a_remedy(
    database_url: str, db: Database, tmp_path: Path
) -> None:
    async with db.engine.begin() as conn:
        if database_url.startswith("postgresql"):
            await conn.execute(text("ALTER TABLE audit_entry DISABLE TRIGGER audit_entry_append_only"))
        else:
            await conn.execute(text("DROP TRIGGER audit_entry_no_delete"))
    code, report, _ = doctor({"DATABASE_URL": database_url}, tmp_path)
    assert code == 1
    [problem] = [f for f in report["findings"] if f["level"] == "problem"]
    assert problem["check"] == "audit log"
    if database_url.startswith("postgresql"):
        assert "triggers disabled: audit_entry_append_only" in problem["text"]
        assert "ENABLE TRIGGER" in problem["advice"]
    else:
        assert "triggers missing: audit_entry_no_delete" in problem["text"]
        assert "0001" in problem["advice"]


async def test_a_database_behind_names_migrate_and_doctor_changes_nothing(
    empty_database_url: str, tmp_path: Path
) -> None:
    code, report, _ = doctor({"DATABASE_URL": empty_database_url}, tmp_path)
    if empty_database_url.startswith("sqlite"):
        # The embedded file does not exist yet; the server makes it. Doctor does not.
        assert code == 0
        assert "creates it when it starts" in report["findings"][0]["text"]
        assert not await anyio.Path(make_url(empty_database_url).database or "").exists()
        return
    assert code == 1
    [problem] = [f for f in report["findings"] if f["level"] == "problem"]
    assert problem["check"] == "schema" and "none (the database is empty)" in problem["text"]
    assert problem["advice"] == "run `mcp-task-server migrate` with the same settings"
    again, _, _ = doctor({"DATABASE_URL": empty_database_url}, tmp_path)
    assert again == 1  # still empty: doctor migrated nothing


def test_an_unreachable_database_is_a_problem_not_a_traceback(tmp_path: Path) -> None:
    url = f"postgresql://postgres:pw-not-shown@127.0.0.1:{free_port()}/nowhere"
    code, report, _ = doctor({"DATABASE_URL": url}, tmp_path)
    assert code == 1
    [problem] = [f for f in report["findings"] if f["level"] == "problem"]
    assert problem["check"] == "database" and problem["text"].startswith(
        "cannot reach postgresql://postgres:***@"
    )
    assert "pw-not-shown" not in json.dumps(report)


def test_traces_asked_for_are_reported(tmp_path: Path) -> None:
    env = {
        "DATABASE_URL": f"sqlite:///{tmp_path / 'new.db'}",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318",
    }
    code, report, _ = doctor(env, tmp_path)
    assert code == 0
    [telemetry] = [f for f in report["findings"] if f["check"] == "telemetry"]
    assert telemetry["text"] == "traces on, sent to otlp (http://collector:4318)"


def test_the_text_report_reads_as_a_list_of_checks(tmp_path: Path) -> None:
    ran = subprocess.run(
        [sys.executable, "-m", "mcp_server", "doctor"],
        capture_output=True,
        env={"HOME": str(tmp_path), "DATABASE_URL": f"sqlite:///{tmp_path / 'new.db'}"},
        timeout=120,
        check=True,
        text=True,
    )
    assert ran.stdout.startswith("settings in effect:\n")
    assert "\nchecks:\n  OK       database: " in ran.stdout
    assert "\n  OK       pool: pool_size 5, max_overflow 10" in ran.stdout
    assert ran.stdout.rstrip().endswith("0 problem(s), 0 warning(s)")
