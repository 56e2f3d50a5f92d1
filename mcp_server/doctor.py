"""`doctor`: what an operator checks when something is wrong, in one command.

The settings in effect (secrets masked), then one finding per check: the database answers, its
schema is this server's, the pool fits the database, and the audit log's protections are in
place. A finding that stops the server or leaves the log unprotected is a problem (the command
exits 1); one that weakens something is a warning. Each says what to do. It changes nothing: it
never creates, migrates or writes to a database.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from sqlalchemy import inspect, make_url, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import create_async_engine

from mcp_server import schema, telemetry
from mcp_server.config import Settings

# The audit log's tables, and the triggers migrations 0001 and 0005 put on them: stamping each
# entry with its transaction and content hash, and refusing changes to entries, seals and
# checkpoints.
AUDIT_TABLES = ("audit_entry", "audit_seal", "audit_checkpoint")
AUDIT_TRIGGERS = {
    "postgresql": tuple(
        ["audit_entry_stamp"]
        + [f"{table}_{kind}" for table in AUDIT_TABLES for kind in ("append_only", "no_truncate")]
    ),
    "sqlite": tuple(
        ["audit_entry_stamp"]
        + [f"{table}_no_{kind}" for table in AUDIT_TABLES for kind in ("update", "delete")]
    ),
}
APP_ROLE_ADVICE = (
    "connect as a role made for the server: create one, run `mcp-task-server grant-app-role ROLE` "
    "as the owner, and put that role in DATABASE_URL"
)


class Level(StrEnum):
    OK = "ok"
    WARNING = "warning"
    PROBLEM = "problem"


@dataclass(frozen=True)
class Finding:
    check: str
    level: Level
    text: str
    advice: str = ""


@dataclass(frozen=True)
class Report:
    settings: dict[str, Any]
    findings: list[Finding]

    @property
    def healthy(self) -> bool:
        return all(finding.level is not Level.PROBLEM for finding in self.findings)

    def as_json(self) -> dict[str, Any]:
        findings = [asdict(finding) for finding in self.findings]
        return {"settings": self.settings, "findings": findings, "healthy": self.healthy}


def masked(settings: Settings) -> dict[str, Any]:
    """The settings in effect, with the database password, the JWT secret, token hashes and
    operators' password hashes hidden."""
    shown = settings.model_dump(mode="json")
    shown["database_url"] = make_url(settings.database_url).render_as_string(hide_password=True)
    shown["jwt_secret"] = "***" if settings.jwt_secret is not None else None
    for agent in shown["agents"]:
        agent["token_sha256"] = "***" if agent["token_sha256"] else None
    for operator in shown["operators"]:
        operator["password_scrypt"] = "***"
    return shown


async def diagnose(settings: Settings, env: Mapping[str, str] = os.environ) -> Report:
    findings = await _database(settings)
    findings += [_pool_settings(settings), _telemetry(env)]
    return Report(masked(settings), findings)


async def _database(settings: Settings) -> list[Finding]:
    url = make_url(settings.async_database_url)
    where = make_url(settings.database_url).render_as_string(hide_password=True)
    if url.get_backend_name() == "sqlite" and (not_yet := _sqlite_file(url.database)) is not None:
        return [not_yet]
    # A plain engine, not the server's: the server's would switch a SQLite file to WAL mode.
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(_database_checks, settings, where)
    except (SQLAlchemyError, OSError) as exc:
        reason = exc.orig if isinstance(exc, DBAPIError) else exc
        advice = "check DATABASE_URL, that the database server runs, and that this host may connect"
        return [Finding("database", Level.PROBLEM, f"cannot reach {where}: {reason}", advice)]
    finally:
        await engine.dispose()


def _sqlite_file(database: str | None) -> Finding | None:
    """A SQLite file that is not there yet: the server makes it, if it can write the folder."""
    if not database or database == ":memory:":
        return None
    path = Path(database).expanduser()
    if path.exists():
        return None
    folder = next((parent for parent in path.parents if parent.exists()), None)
    if folder is None or not folder.is_dir() or not _writable(folder):
        return Finding(
            "database",
            Level.PROBLEM,
            f"{path} does not exist and cannot be created",
            "point DATABASE_URL at a folder this user may write",
        )
    return Finding("database", Level.OK, f"{path} does not exist yet; the server creates it when it starts")


def _writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK | os.X_OK)


def _pool_settings(settings: Settings) -> Finding:
    return Finding(
        "pool",
        Level.OK,
        f"pool_size {settings.pool_size}, max_overflow {settings.max_overflow}, pool_timeout "
        f"{settings.pool_timeout:g} s; statement_timeout {settings.statement_timeout_ms} ms, "
        f"lock_timeout {settings.lock_timeout_ms} ms",
    )


def _telemetry(env: Mapping[str, str]) -> Finding:
    exporters = telemetry.wanted_exporters(env)
    if not exporters:
        return Finding("telemetry", Level.OK, "traces off (no OTEL_* setting asks for them)")
    if importlib.util.find_spec("opentelemetry.sdk") is None:
        refused = "OTEL_* settings ask for traces, but the SDK is not installed: the server will not start"
        return Finding("telemetry", Level.PROBLEM, refused, telemetry.EXTRA_HINT)
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    to = ", ".join(f"{name} ({endpoint})" if name == "otlp" and endpoint else name for name in exporters)
    return Finding("telemetry", Level.OK, f"traces on, sent to {to}")


def _database_checks(conn: Connection, settings: Settings, where: str) -> list[Finding]:
    conn.execute(text("SELECT 1"))
    started = time.perf_counter()
    conn.execute(text("SELECT 1"))
    round_trip = (time.perf_counter() - started) * 1000
    postgres = conn.dialect.name == "postgresql"
    if postgres:
        product = "PostgreSQL " + str(conn.execute(text("SHOW server_version")).scalar_one()).split()[0]
    else:
        product = "SQLite " + str(conn.execute(text("SELECT sqlite_version()")).scalar_one())
    findings = [Finding("database", Level.OK, f"{where} answers: {product}, round trip {round_trip:.1f} ms")]
    findings.append(_schema(conn, sqlite=not postgres))
    if postgres:
        findings.append(_connections(conn, settings))
    if inspect(conn).has_table("audit_entry"):
        findings += _audit_protections(conn)
    return findings


def _schema(conn: Connection, *, sqlite: bool) -> Finding:
    try:
        version = schema.version(conn)
    except schema.SchemaError as exc:
        return Finding("schema", Level.PROBLEM, str(exc), exc.remedy)
    if not version.behind:
        return Finding("schema", Level.OK, f"at version {version.head}, this server's")
    at = version.current or "none (the database is empty)"
    if sqlite:  # the server upgrades its embedded file itself when it starts
        upgraded = f"at version {at}; the server upgrades it to {version.head} when it starts"
        return Finding("schema", Level.OK, upgraded)
    return Finding(
        "schema",
        Level.PROBLEM,
        f"at version {at}; this server needs {version.head} and refuses to start",
        schema.MIGRATE,
    )


def _connections(conn: Connection, settings: Settings) -> Finding:
    limit = int(conn.execute(text("SHOW max_connections")).scalar_one())
    reserved = int(conn.execute(text("SHOW superuser_reserved_connections")).scalar_one())
    most = settings.pool_size + settings.max_overflow
    if most > limit - reserved:
        return Finding(
            "connections",
            Level.WARNING,
            f"one server may open {most} connections (pool_size + max_overflow); PostgreSQL allows "
            f"{limit - reserved} in all",
            "lower DB_POOL_SIZE or DB_MAX_OVERFLOW, or raise max_connections",
        )
    fits = f"at most {most} connections per server; PostgreSQL allows {limit - reserved}"
    return Finding("connections", Level.OK, fits)


def _audit_protections(conn: Connection) -> list[Finding]:
    postgres = conn.dialect.name == "postgresql"
    expected = AUDIT_TRIGGERS[conn.dialect.name]
    if postgres:
        # 'O' and 'A' fire in a normal session; 'D' is disabled and 'R' fires only on a replica.
        rows = conn.execute(
            text(
                "SELECT tgname, tgenabled IN ('O', 'A') FROM pg_trigger WHERE NOT tgisinternal AND "
                "tgrelid IN ('audit_entry'::regclass, 'audit_seal'::regclass, 'audit_checkpoint'::regclass)"
            )
        ).all()
    else:
        # A SQLite trigger cannot be disabled, only dropped.
        rows = conn.execute(
            text(
                "SELECT name, 1 FROM sqlite_master WHERE type = 'trigger' "
                "AND tbl_name IN ('audit_entry', 'audit_seal', 'audit_checkpoint')"
            )
        ).all()
    present = {name: bool(enabled) for name, enabled in rows}
    missing = [name for name in expected if name not in present]
    disabled = [name for name in expected if present.get(name) is False]
    findings = []
    if missing or disabled:
        gaps = [
            f"triggers {what}: {', '.join(names)}"
            for what, names in (("missing", missing), ("disabled", disabled))
            if names
        ]
        repair = (
            "re-create them from migrations 0001 and 0005 (mcp_server/schema_versions/versions/)"
            if missing
            else "re-enable them (ALTER TABLE table ENABLE TRIGGER name)"
        )
        unprotected = "entries can be changed or removed: " + "; ".join(gaps)
        advice = f"check the log with `mcp-task-server verify-audit-log`, then {repair}"
        findings.append(Finding("audit log", Level.PROBLEM, unprotected, advice))
    else:
        sealed = f"append-only and stamped: triggers {', '.join(expected)} in place"
        findings.append(Finding("audit log", Level.OK, sealed))
    if postgres:
        findings.append(_role(conn))
    return findings


def _role(conn: Connection) -> Finding:
    """Whether the role the server connects as could get around the triggers."""
    role, superuser, owner = conn.execute(
        text(
            "SELECT current_user, rolsuper, pg_has_role(current_user, c.relowner, 'MEMBER') "
            "FROM pg_roles r, pg_class c WHERE r.rolname = current_user AND c.oid = 'audit_entry'::regclass"
        )
    ).one()
    held = conn.execute(
        text(
            "SELECT t.name, p.privilege FROM unnest(CAST(:tables AS text[])) AS t(name), "
            "unnest(ARRAY['UPDATE', 'DELETE', 'TRUNCATE']) AS p(privilege) "
            "WHERE has_table_privilege(t.name, p.privilege)"
        ),
        {"tables": list(AUDIT_TABLES)},
    ).all()
    if superuser or owner:
        what = "a superuser" if superuser else "the audit log's owner"
        return Finding(
            "database role",
            Level.WARNING,
            f"the server connects as {role}, {what}, which may disable or drop the audit log's triggers",
            APP_ROLE_ADVICE,
        )
    if held:
        granted = ", ".join(f"{privilege} on {table}" for table, privilege in held)
        return Finding(
            "database role",
            Level.WARNING,
            f"the server's role {role} holds {granted}; only the triggers stop it",
            f"run `mcp-task-server grant-app-role {role}` as the owner",
        )
    return Finding("database role", Level.OK, f"{role} may only read and append to the audit log")


def render(report: Report) -> str:
    """The report as an operator reads it."""
    width = max(len(key) for key in report.settings)
    lines = ["settings in effect:"]
    lines += [f"  {key:<{width}}  {_shown(value)}" for key, value in report.settings.items()]
    lines.append("checks:")
    for finding in report.findings:
        lines.append(f"  {finding.level.value.upper():<8} {finding.check}: {finding.text}")
        if finding.advice:
            lines.append(f"  {'':<8} -> {finding.advice}")
    problems = sum(finding.level is Level.PROBLEM for finding in report.findings)
    warnings = sum(finding.level is Level.WARNING for finding in report.findings)
    lines.append(f"{problems} problem(s), {warnings} warning(s)")
    return "\n".join(lines)


def _shown(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)
