"""Command line: serve (stdio or HTTP), act as a scripted MCP client, and the operator's commands.

`tools` and `call` start the server as a stdio subprocess and talk to it through the real
protocol, so they show exactly what an agent would see. `migrate`, `doctor`, `mint-token`,
`verify-audit-log` and `grant-app-role` are for the operator and work on the configuration and the
database directly.
"""

from __future__ import annotations

import argparse
import gc
import getpass
import importlib.util
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio
from mcp import Client, StdioServerParameters
from mcp.server.mcpserver import MCPServer
from mcp.server.stdio import stdio_server
from mcp.shared.exceptions import MCPError
from mcp.types import Implementation, TextContent
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from mcp_server import __version__, chain, checkpoints, doctor, identity, logs, sealer, stdio, telemetry
from mcp_server import http as http_transport
from mcp_server.auth import mint_token, token_sha256
from mcp_server.checkpoints import Checkpoint, CheckpointKeys, Signer
from mcp_server.config import (
    LOOPBACK_HOSTS,
    AgentConfig,
    ConfigError,
    OperatorConfig,
    Settings,
    load_settings,
)
from mcp_server.db import create_database, grant_app_role, sqlite_file
from mcp_server.errors import DATABASE_ERRORS, StartupError
from mcp_server.operators import MIN_PASSWORD, hash_password
from mcp_server.server import AppState, check_tool_names, create_server

logger = logging.getLogger("mcp_server")
T = TypeVar("T")


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C where no clean stop is set up: stop without a traceback
        sys.stderr.write("mcp-task-server: interrupted\n")
        return 130


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
        if args.command == "serve" and args.transport == "http":
            settings = _http_settings(settings, args)
    except ConfigError as exc:
        sys.stderr.write(f"mcp-task-server: {exc}\n")
        return 2
    logs.configure(settings.log_level, settings.log_format)  # stderr: stdout carries the protocol
    command = args.command or "serve"
    if command != "migrate":  # Alembic says at INFO what it checked; only migrate's steps are news
        logging.getLogger("alembic").setLevel(max(logging.WARNING, logging.getLogger().level))
    try:
        if command == "serve":
            telemetry.setup()
            return _serve(settings, http=args.transport == "http")
        if command == "mint-token":
            return _mint_token(args)
        if command == "migrate":
            return anyio.run(_migrate, settings)
        if command == "doctor":
            return anyio.run(_doctor, settings, args.json)
        if command == "verify-audit-log":
            return anyio.run(_verify_audit_log, settings, args.wait, args.checkpoints, tuple(args.public_key))
        if command == "keygen":
            return _keygen(args.path)
        if command == "hash-password":
            return _hash_password(args.operator, args.read_only)
        if command == "grant-app-role":
            return anyio.run(_grant_app_role, settings, args.role)
    except ConfigError as exc:
        sys.stderr.write(f"mcp-task-server: {exc}\n")
        return 2
    except StartupError as exc:
        sys.stderr.write(f"mcp-task-server: {exc}\n")
        return 1
    server = _server_parameters(args.config)
    if command == "tools":
        return anyio.run(_list_tools, server)
    try:
        arguments = json.loads(args.arguments)
    except ValueError as exc:
        sys.stderr.write(f"mcp-task-server: the arguments are not valid JSON: {exc}\n")
        return 2
    if not isinstance(arguments, dict):
        sys.stderr.write("mcp-task-server: the arguments must be a JSON object\n")
        return 2
    return anyio.run(_call_tool, server, args.tool, arguments)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mcp-task-server", description="MCP server for an audited task database (stdio by default)."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.set_defaults(transport="stdio")
    parser.add_argument("--config", type=Path, help="JSON settings file; environment variables override it")
    commands = parser.add_subparsers(dest="command")
    serve = commands.add_parser("serve", help="serve MCP over stdio (the default) or streamable HTTP")
    serve.add_argument("--transport", choices=["stdio", "http"], default="stdio")
    serve.add_argument("--host", help="HTTP: address to listen on (default 127.0.0.1, setting http_host)")
    serve.add_argument("--port", type=int, help="HTTP: port to listen on (default 8000, setting http_port)")
    serve.add_argument(
        "--dev-without-auth",
        action="store_true",
        default=None,
        help="HTTP, development only: no tokens, on loopback only, every call as the configured agent",
    )
    serve.add_argument(
        "--stateless",
        action="store_true",
        default=None,
        help="HTTP: keep no session state, so several server processes can share one database",
    )
    mint = commands.add_parser(
        "mint-token", help="make a bearer token for an agent and print the config entry that admits it"
    )
    mint.add_argument("agent", help="the agent's identity, recorded as changed_by")
    mint.add_argument("--read-only", action="store_true", help="the agent may only read")
    mint.add_argument(
        "--tool", action="append", dest="tools", help="a tool it may call (repeat); default all"
    )
    mint.add_argument("--max-bulk-rows", type=int, help="most tasks one bulk update of its may change")
    commands.add_parser(
        "migrate", help="upgrade the database's schema to this version's (the server refuses one behind)"
    )
    doctor_command = commands.add_parser(
        "doctor",
        help="show the settings in effect and check the database, its schema, the pool and the audit "
        "log's protections; exit 1 on a problem",
    )
    doctor_command.add_argument("--json", action="store_true", help="print the report as JSON")
    verify = commands.add_parser(
        "verify-audit-log",
        help="walk the audit log's hash chain and check its signed checkpoints; exit 1 at the first problem",
    )
    verify.add_argument(
        "--wait",
        type=float,
        metavar="SECONDS",
        help="first wait up to SECONDS until every entry committed so far is sealed (sealing them "
        "here when no server is sealing); exit 1 if some are not",
    )
    verify.add_argument(
        "--checkpoints",
        type=Path,
        metavar="FILE",
        help="also check the checkpoints kept in FILE (one JSON object a line, as checkpoint_file writes)",
    )
    verify.add_argument(
        "--public-key",
        type=Path,
        action="append",
        default=[],
        metavar="PEM",
        help="a public key checkpoints may be signed with (repeatable); the signing key's is always one",
    )
    operator = commands.add_parser(
        "hash-password",
        help="hash an operator's password (asked for, or read from stdin) and print the config entry",
    )
    operator.add_argument("operator", help="the operator's id, recorded as operator:<id> for what they do")
    operator.add_argument("--read-only", action="store_true", help="the operator may look but not authorize")
    keygen = commands.add_parser(
        "keygen", help="write a new Ed25519 key for signing audit checkpoints, and print its public key"
    )
    keygen.add_argument("path", type=Path, help="where to write the private key (PEM); it must not exist")
    grant = commands.add_parser(
        "grant-app-role",
        help="PostgreSQL: migrate the schema and grant an existing role what the server needs, and no more",
    )
    grant.add_argument("role", help="the role the server will connect as")
    commands.add_parser("tools", help="start the server and list its tools")
    call = commands.add_parser("call", help="start the server, call one tool, print its structured result")
    call.add_argument("tool", help="tool name, e.g. search_tasks")
    call.add_argument("arguments", nargs="?", default="{}", help="tool arguments as a JSON object")
    return parser


def _http_settings(settings: Settings, args: argparse.Namespace) -> Settings:
    """The settings with the command line's HTTP options over them, checked for serving HTTP."""
    overrides = {
        "http_host": args.host,
        "http_port": args.port,
        "http_stateless": args.stateless,
        "http_dev_without_auth": args.dev_without_auth,
    }
    settings = settings.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    if settings.http_dev_without_auth:
        if settings.http_host not in LOOPBACK_HOSTS:
            raise ConfigError(
                f"--dev-without-auth serves only on loopback (127.0.0.1, localhost, ::1), not on "
                f"{settings.http_host}: anyone who reaches the port could act as the local agent"
            )
        return settings
    if not settings.accepts_tokens:
        raise ConfigError(
            "serving HTTP needs a way to check tokens: add agents with token_sha256 (see mint-token), "
            "a jwt section, or an oauth section with operators (see hash-password) to the config file"
        )
    public_https = (settings.public_url or "").startswith("https://")
    if settings.oauth is not None and settings.http_host not in LOOPBACK_HOSTS and not public_https:
        raise ConfigError(
            f"the built-in OAuth server on {settings.http_host} needs public_url, the https:// address "
            "clients reach it at (OAuth 2.1 sends codes and tokens only over HTTPS off loopback)"
        )
    if settings.http_host not in LOOPBACK_HOSTS and not settings.allowed_hosts:
        raise ConfigError(
            f"serving on {settings.http_host} needs allowed_hosts (the host:port names clients use, "
            "e.g. tasks.example.com:443) so that DNS-rebinding protection can check them"
        )
    return settings


def _serve(settings: Settings, *, http: bool) -> int:
    server = create_server(settings)
    # What was built so far lives as long as the process: keep the collector from walking it
    # over and over (every full collection would otherwise visit every imported object).
    gc.collect()
    gc.freeze()
    try:
        if not http:
            anyio.run(_serve_stdio, server, backend_options=_EVENT_LOOP)
            return 0
        if settings.http_dev_without_auth:
            logger.warning(
                "DEVELOPMENT MODE: HTTP on %s:%s WITHOUT AUTHENTICATION; every call acts as %s and "
                "every change is recorded under that identity. Never run it where others reach the port.",
                settings.http_host,
                settings.http_port,
                identity.configured_agent(settings)[0],
            )
        # Fail with one clear line, before uvicorn would report it as a failed startup traceback.
        anyio.run(_open_database, settings)
        if not http_transport.serve(server, settings):
            return 1
    except StartupError as exc:
        logger.error("%s", exc)
        return 1
    except ExceptionGroup as group:
        if (startup := group.subgroup(StartupError)) is None:
            raise
        for problem in _leaves(startup):
            logger.error("%s", problem)
        return 1
    return 0


async def _serve_stdio(server: MCPServer[AppState]) -> None:
    """Serve until stdin closes or SIGTERM arrives. Either way the server stops reading requests,
    a call in flight is cancelled and its transaction rolled back, and the connections close."""
    if not stdio.pollable(sys.stdin.fileno()):
        # A file redirected to stdin (or Windows) cannot be polled; it ends on its own at EOF.
        await server.run_stdio_async()
        return
    stdin = stdio.StdinLines()
    # On a terminal the SDK's own threaded stdout stays: its open file is the shell's too.
    stdout = stdio.StdoutPipe() if stdio.is_pipe(1) else None
    try:
        await _serve_stdio_lines(server, stdin, stdout)
    finally:
        stdin.restore()
        if stdout is not None:
            stdout.restore()
    # A SQLite connection whose statement was cancelled can leave aiosqlite's close waiting forever
    # (omnilib/aiosqlite#259), and the event loop would wait for it at exit. The transaction is
    # already abandoned, so SQLite rolls it back; bound the wait instead of hanging the client.
    deadline = threading.Timer(SHUTDOWN_GRACE_SECONDS, _exit_now)
    deadline.daemon = True  # a clean shutdown exits at once and takes the timer with it
    deadline.start()


async def _serve_stdio_lines(
    server: MCPServer[AppState], stdin: stdio.StdinLines, stdout: stdio.StdoutPipe | None
) -> None:
    async with anyio.create_task_group() as group:

        async def stop_on_signal() -> None:
            # SIGINT is Ctrl-C in a terminal: the same clean stop as a service manager's SIGTERM.
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for received in signals:
                    logger.info("%s: stopping; a call in progress is rolled back", received.name)
                    stdin.close()

        group.start_soon(stop_on_signal)
        # On a pipe, every unreadable request is answered (stdio.serve); on a terminal, the SDK's own.
        transport = (
            stdio.serve(stdin, stdout) if stdout is not None else stdio_server(stdin=stdin)  # type: ignore[arg-type]
        )
        async with transport as (read_stream, write_stream):
            await server._lowlevel_server.run(  # run_stdio_async, with our streams
                read_stream, write_stream, server._lowlevel_server.create_initialization_options()
            )
        group.cancel_scope.cancel()


SHUTDOWN_GRACE_SECONDS = 3.0

# uvloop, where it is installed (a dependency everywhere but Windows): its event loop takes about
# 0.05 ms less of each call (bench/).
_EVENT_LOOP = {"use_uvloop": True} if importlib.util.find_spec("uvloop") else {}


def _exit_now() -> None:
    logger.warning(
        "a database connection did not close within %.0f s; exiting anyway", SHUTDOWN_GRACE_SECONDS
    )
    logging.shutdown()
    os._exit(0)


async def _open_database(settings: Settings) -> None:
    db = create_database(settings)
    try:
        await db.open_schema(upgrade=db.is_sqlite)
    finally:
        await db.dispose()


async def _migrate(settings: Settings) -> int:
    db = create_database(settings)
    try:
        before = await db.open_schema(upgrade=True)
    finally:
        await db.dispose()
    if before.behind:
        sys.stderr.write(f"schema upgraded from {before.current or 'none'} to {before.head}\n")
    else:
        sys.stderr.write(f"schema already at {before.head}; nothing to do\n")
    return 0


async def _doctor(settings: Settings, as_json: bool) -> int:
    report = await doctor.diagnose(settings)
    _write(json.dumps(report.as_json(), indent=2) if as_json else doctor.render(report))
    return 0 if report.healthy else 1


def _mint_token(args: argparse.Namespace) -> int:
    token = mint_token()
    entry: dict[str, Any] = {"id": args.agent, "token_sha256": token_sha256(token)}
    if args.read_only:
        entry["read_only"] = True
    if args.tools:
        entry["tools"] = sorted(set(args.tools))
    if args.max_bulk_rows is not None:
        entry["max_bulk_rows"] = args.max_bulk_rows
    agent = AgentConfig.model_validate(entry)  # the same checks the config file gets
    check_tool_names(Settings(agents=(agent,)))
    _write(
        f"token for {args.agent} (give it to the agent as 'Authorization: Bearer <token>'; it is not stored):"
    )
    _write(token)
    _write('add this entry to "agents" in the config file:')
    _write(json.dumps(entry))
    return 0


def _hash_password(operator_id: str, read_only: bool) -> int:
    if sys.stdin.isatty():
        password = getpass.getpass(f"password for {operator_id}: ")
        if getpass.getpass("again: ") != password:
            sys.stderr.write("mcp-task-server: the two passwords differ\n")
            return 2
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if len(password) < MIN_PASSWORD:
        sys.stderr.write(f"mcp-task-server: a password needs at least {MIN_PASSWORD} characters\n")
        return 2
    entry: dict[str, Any] = {"id": operator_id, "password_scrypt": hash_password(password)}
    if read_only:
        entry["read_only"] = True
    OperatorConfig.model_validate(entry)  # the same checks the config file gets
    _write('add this entry to "operators" in the config file:')
    _write(json.dumps(entry))
    return 0


async def _verify_audit_log(
    settings: Settings, wait: float | None, checkpoint_file: Path | None, public_keys: tuple[Path, ...]
) -> int:
    signer = Signer.of(settings)
    keys = CheckpointKeys.load(signer, settings.audit_public_key_files + public_keys)
    external = _read_checkpoints(checkpoint_file) if checkpoint_file is not None else []
    if external and not keys:
        raise ConfigError(
            "--checkpoints: give the key they were signed with (audit_signing_key_file or --public-key)"
        )
    if (path := sqlite_file(settings)) is not None and not path.exists():
        raise StartupError(f"there is no database at {path}, so there is no audit log to verify")
    db = create_database(settings)
    try:
        await db.open_schema(upgrade=False)
        sealed = True
        if wait is not None:
            sealed = await sealer.wait_until_sealed(sealer.Sealer(db, settings, signer), wait)
        async with db.session(write=False) as session:
            report = await chain.verify(session, keys, external)
    except DATABASE_ERRORS as exc:
        raise StartupError(f"cannot read the audit log: {type(exc).__name__}") from exc
    finally:
        await db.dispose()
    _write(json.dumps(report, indent=2))
    if (problem := report.get("first_problem")) is not None:
        where = " ".join(f"{key}={problem[key]}" for key in ("seq", "id") if key in problem)
        sys.stderr.write(f"audit log: at {where}: {problem['problem']}\n")
        return 1
    head = report.get("head_hash", "none (the log is empty)")
    sys.stderr.write(
        f"audit log: {report['entries_checked']} sealed entries, chain intact; head {head}; "
        f"{report['unsealed']} not sealed yet; {report['checkpoints_checked']} signed checkpoints hold\n"
    )
    if not sealed:
        sys.stderr.write(f"audit log: entries were still unsealed after {wait} s: is a sealer failing?\n")
        return 1
    return 0


def _read_checkpoints(path: Path) -> list[Checkpoint]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"--checkpoints {path}: cannot read it ({exc.strerror})") from None
    checkpoints = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                checkpoints.append(Checkpoint.from_json(line))
            except (ValueError, KeyError, TypeError):
                raise ConfigError(f"--checkpoints {path}: line {number} is not a checkpoint") from None
    return checkpoints


def _keygen(path: Path) -> int:
    try:
        signer = checkpoints.generate(path)
    except FileExistsError:
        raise ConfigError(f"keygen: {path} exists; choose a new path (a key is never overwritten)") from None
    except OSError as exc:
        raise ConfigError(f"keygen: cannot write {path} ({exc.strerror})") from None
    sys.stderr.write(f"wrote the private key to {path}; set audit_signing_key_file to it. Its public key:\n")
    _write(checkpoints.public_pem(signer.public))
    return 0


async def _grant_app_role(settings: Settings, role: str) -> int:
    db = create_database(settings)
    try:
        if db.is_sqlite:
            raise ConfigError(
                "grant-app-role is for PostgreSQL; on SQLite, file permissions decide who writes"
            )
        await db.open_schema(upgrade=True)
        async with db.engine.begin() as conn:
            await conn.run_sync(lambda sync: grant_app_role(sync, role))
    except SQLAlchemyError as exc:
        reason = exc.orig if isinstance(exc, DBAPIError) else exc
        raise StartupError(f"could not grant {role}: {reason}") from exc
    finally:
        await db.dispose()
    sys.stderr.write(f"{role} may now read and write tasks and append to the audit log, and nothing more\n")
    return 0


def _server_parameters(config: Path | None) -> StdioServerParameters:
    args = ["-m", "mcp_server"]
    if config is not None:
        args += ["--config", str(config.resolve())]
    # The command prints what the server answers; the server's INFO lines would say it again.
    env = {"LOG_LEVEL": "WARNING"} | dict(os.environ)
    return StdioServerParameters(command=sys.executable, args=[*args, "serve"], env=env)


def _client(server: StdioServerParameters) -> Client:
    return Client(server, client_info=Implementation(name="mcp-task-server-cli", version=__version__))


async def _ask(server: StdioServerParameters, request: Callable[[Client], Awaitable[T]]) -> T | None:
    """The answer to one request, or None (said on stderr) when the server died before answering."""
    try:
        async with _client(server) as client:
            return await request(client)
    except ExceptionGroup as group:
        if group.subgroup(MCPError) is None:
            raise
        sys.stderr.write("mcp-task-server: the server stopped before answering; its log above says why\n")
        return None


async def _list_tools(server: StdioServerParameters) -> int:
    result = await _ask(server, lambda client: client.list_tools())
    if result is None:
        return 1
    for tool in result.tools:
        summary = (tool.description or "").strip().splitlines()[0] if tool.description else ""
        _write(f"{tool.name}: {summary}")
    return 0


async def _call_tool(server: StdioServerParameters, tool: str, arguments: dict[str, Any]) -> int:
    result = await _ask(server, lambda client: client.call_tool(tool, arguments))
    if result is None:
        return 1
    if result.is_error:
        text = " ".join(block.text for block in result.content if isinstance(block, TextContent))
        sys.stderr.write(f"{text}\n")
        return 1
    _write(json.dumps(result.structured_content, indent=2, ensure_ascii=False))
    return 0


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    return [
        leaf
        for exc in group.exceptions
        for leaf in (_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    ]


def _write(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
