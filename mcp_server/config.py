"""Settings: defaults, then a JSON config file, then environment variables."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import platformdirs
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

APP_NAME = "mcp-task-server"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")

# Environment variable -> setting name. The README documents each one.
ENV_VARS: dict[str, str] = {
    "DATABASE_URL": "database_url",
    "MCP_AGENT_ID": "agent_id",
    "MCP_TOOLS": "tools",
    "MCP_HTTP_HOST": "http_host",
    "MCP_HTTP_PORT": "http_port",
    "MCP_ALLOWED_HOSTS": "allowed_hosts",
    "MCP_ALLOWED_ORIGINS": "allowed_origins",
    "MCP_PUBLIC_URL": "public_url",
    "MCP_JWT_SECRET": "jwt_secret",
    "DB_POOL_SIZE": "pool_size",
    "DB_MAX_OVERFLOW": "max_overflow",
    "DB_POOL_TIMEOUT": "pool_timeout",
    "MCP_IDEMPOTENCY_TTL_SECONDS": "idempotency_ttl_seconds",
    "DB_STATEMENT_TIMEOUT_MS": "statement_timeout_ms",
    "DB_LOCK_TIMEOUT_MS": "lock_timeout_ms",
    "DB_IDLE_IN_TRANSACTION_TIMEOUT_MS": "idle_in_transaction_timeout_ms",
    "MCP_AUDIT_SIGNING_KEY_FILE": "audit_signing_key_file",
    "MCP_CHECKPOINT_FILE": "checkpoint_file",
    "MCP_SEAL_INTERVAL_MS": "seal_interval_ms",
    "LOG_LEVEL": "log_level",
    "LOG_FORMAT": "log_format",
}
# Settings that hold a list take a comma-separated environment variable.
_LIST_SETTINGS = {"tools", "allowed_hosts", "allowed_origins"}

# The least scrypt cost an operator's password hash may have (hash-password uses this).
MIN_SCRYPT_N = 2**14

# How an identity was proven, where it is not the config: a JWT's (auth.py) is `jwt:<issuer>#<subject>`,
# an operator's `operator:<id>`, the operating-system user's on stdio `local:<user>`. A configured
# agent id may not take these forms, so no two kinds of proof can name the same identity.
PROVEN_ELSEWHERE = ("jwt:", "operator:", "local:")


def _configured_id(value: str) -> str:
    if value.startswith(PROVEN_ELSEWHERE):
        raise ValueError(
            f"an agent id may not begin with {', '.join(PROVEN_ELSEWHERE)}: those name identities proven "
            "by a JWT, an operator's sign-in or the operating-system user; choose another id"
        )
    return value


AgentId = Annotated[
    str, Field(min_length=1, max_length=200, pattern=r"^\S(.*\S)?$"), AfterValidator(_configured_id)
]


class WriteBudget(BaseModel):
    """How much an agent may write per window of time, across all server processes (budgets.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    calls: int | None = Field(default=None, ge=1, description="Most writing calls per window.")
    rows: int | None = Field(default=None, ge=1, description="Most rows changed per window.")
    window_seconds: int = Field(default=60, ge=1, le=86_400)

    @classmethod
    def largest(cls, budgets: list[WriteBudget]) -> WriteBudget:
        """The most generous of the budgets: each limit taken as a rate over the shortest of their
        windows, and the largest kept (an agent holding several JWT scopes)."""
        window = min(budget.window_seconds for budget in budgets)

        def most(limits: list[tuple[int | None, int]]) -> int | None:
            if any(limit is None for limit, _ in limits):
                return None
            return max(-(-limit * window // seconds) for limit, seconds in limits if limit is not None)

        return cls(
            calls=most([(budget.calls, budget.window_seconds) for budget in budgets]),
            rows=most([(budget.rows, budget.window_seconds) for budget in budgets]),
            window_seconds=window,
        )


class Permissions(BaseModel):
    """What an agent may do. The default grants everything; each field narrows it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    read_only: bool = False
    tools: frozenset[str] | None = Field(default=None, description="Tool names it may call; null: all.")
    max_bulk_rows: int | None = Field(
        default=None, ge=1, description="Most tasks one bulk update may change."
    )
    projects: frozenset[int] | None = Field(
        default=None, description="Ids of the projects it may read and change; null: all (scopes.py)."
    )
    write_budget: WriteBudget | None = Field(
        default=None, description="The most writing calls and changed rows per window (budgets.py)."
    )
    approval_over_rows: int | None = Field(
        default=None,
        ge=0,
        description=(
            "A bulk change of more tasks than this waits for a person's approval (changesets.py); "
            "0: every update and deletion of a task does too; null: none does."
        ),
    )

    @classmethod
    def union(cls, grants: list[Permissions]) -> Permissions:
        """Everything any of the grants allows (an agent holding several JWT scopes)."""
        if not grants:
            return cls(read_only=True, tools=frozenset())
        tools = [grant.tools for grant in grants]
        limits = [grant.max_bulk_rows for grant in grants]
        projects = [grant.projects for grant in grants]
        budgets = [grant.write_budget for grant in grants]
        approvals = [grant.approval_over_rows for grant in grants]
        return cls(
            read_only=all(grant.read_only for grant in grants),
            tools=None if None in tools else frozenset().union(*(t for t in tools if t is not None)),
            max_bulk_rows=None if None in limits else max(limit for limit in limits if limit is not None),
            projects=None if None in projects else frozenset().union(*(p for p in projects if p is not None)),
            write_budget=None
            if None in budgets
            else WriteBudget.largest([b for b in budgets if b is not None]),
            approval_over_rows=None
            if None in approvals
            else max(limit for limit in approvals if limit is not None),
        )

    def narrowed_to(self, projects: frozenset[int]) -> Permissions:
        """These permissions on only those of `projects` they reach (a JWT's project:<id> scopes)."""
        return self.model_copy(
            update={"projects": projects if self.projects is None else self.projects & projects}
        )


class AgentConfig(Permissions):
    """One agent in the static table: its id, the SHA-256 of its bearer token, its permissions."""

    id: AgentId
    token_sha256: str | None = Field(default=None, pattern="^[0-9a-f]{64}$")


class JwtConfig(BaseModel):
    """Signed JWTs from an identity provider: the key, the claims checked, and scope -> permissions."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    issuer: str = Field(min_length=1)
    audience: str = Field(min_length=1)
    algorithms: tuple[str, ...] = ("RS256",)
    public_key_file: Path | None = None
    jwks_file: Path | None = None
    identity_claim: str = "sub"
    leeway_seconds: int = Field(default=30, ge=0, le=600)
    scopes: dict[str, Permissions] = Field(default_factory=dict)


class OperatorConfig(BaseModel):
    """A person who may sign in to the server's own pages (the OAuth consent page): an id, recorded
    as `operator:<id>` for what they do, and a password hash made by `hash-password`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: AgentId
    password_scrypt: str = Field(pattern=r"^scrypt:\d+:\d+:\d+:[A-Za-z0-9+/=]+:[A-Za-z0-9+/=]+$")
    # A read-only operator may look but not grant: it cannot authorize an OAuth client.
    read_only: bool = False

    @model_validator(mode="after")
    def _strong_enough(self) -> OperatorConfig:
        _, n, r, p, _, _ = self.password_scrypt.split(":")
        if int(n) < MIN_SCRYPT_N or int(r) < 8 or not 1 <= int(p) <= 16 or int(n) > 2**20:
            raise ValueError(
                f"operators[{self.id}].password_scrypt: its scrypt cost is out of range (N from "
                f"{MIN_SCRYPT_N} to 2^20, r at least 8); make a new one with hash-password"
            )
        return self


class OAuthConfig(BaseModel):
    """The built-in OAuth 2.1 authorization server (oauth.py): how long what it issues lasts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    access_token_seconds: int = Field(default=3600, ge=60, le=86_400)
    refresh_token_days: int = Field(default=30, ge=1, le=365)
    # How long the operator has to decide on the consent page, and the client to redeem its code.
    consent_seconds: int = Field(default=600, ge=60, le=3600)
    code_seconds: int = Field(default=300, ge=30, le=600)


class ConsoleConfig(BaseModel):
    """The console for people (console/): served by the HTTP server under /console to operators
    who sign in. Off unless configured."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # How long a sign-in lasts without being used again.
    session_minutes: int = Field(default=480, ge=5, le=7 * 24 * 60)
    # Cookies only over HTTPS. Null: when public_url is https:// (behind a TLS proxy).
    secure_cookies: bool | None = None


class ConfigError(Exception):
    """The configuration cannot be used; the message says which setting and why."""


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    database_url: str = Field(default_factory=lambda: default_database_url())
    agent_id: AgentId | None = None
    tools: frozenset[str] | None = None
    agents: tuple[AgentConfig, ...] = ()
    jwt: JwtConfig | None = None
    # The built-in OAuth authorization server, for teams without an identity provider: operators
    # sign in on its consent page and choose which configured agent a client acts as.
    oauth: OAuthConfig | None = None
    operators: tuple[OperatorConfig, ...] = ()
    console: ConsoleConfig | None = None
    jwt_secret: SecretStr | None = None
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8000, ge=0, le=65535)
    http_stateless: bool = False
    # Development only, and only on loopback: HTTP without tokens, every call as the configured
    # (local) agent, so tools like the MCP conformance suite, which send no headers, can connect.
    http_dev_without_auth: bool = False
    allowed_hosts: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()
    # HTTP: where clients reach the server (behind a proxy, its https:// address), without /mcp.
    # OAuth clients learn of the token issuer from the metadata published for this URL.
    public_url: str | None = Field(default=None, pattern=r"^https?://[^\s?#]+$")
    http_max_body_bytes: int = Field(default=1_048_576, ge=1024, le=64 * 1_048_576)
    # What an HTTP server process serves at once, and how long it waits (http.py): beyond the
    # connections, a new one gets a fast 503; a client that sends no complete headers, or stops
    # sending its body, in time is cut off; an idle kept-alive connection is closed.
    http_max_connections: int = Field(default=1000, ge=1, le=1_000_000)
    http_header_timeout_seconds: float = Field(default=10.0, gt=0, le=600)
    http_body_timeout_seconds: float = Field(default=10.0, gt=0, le=3600)
    http_keep_alive_seconds: int = Field(default=5, ge=1, le=3600)
    # What one agent may take of a process (limits.py): requests a second (0: no limit), and
    # stateful sessions, per agent and in all; a session without requests ends after the idle time.
    http_requests_per_second: float = Field(default=50.0, ge=0, le=1_000_000)
    http_max_sessions_per_agent: int = Field(default=20, ge=1, le=100_000)
    http_max_sessions: int = Field(default=1000, ge=1, le=100_000)
    http_session_idle_seconds: float = Field(default=1800.0, gt=0, le=7 * 86_400)
    idempotency_ttl_seconds: int = Field(default=86_400, ge=60, le=30 * 86_400)
    # verify_audit_log: at most once per agent per this many seconds (verifications.py; 0: no limit).
    verify_interval_seconds: float = Field(default=10.0, ge=0, le=86_400)
    # ... and walks on from where the last one ended, but the whole chain again this often.
    verify_full_interval_seconds: float = Field(default=3600.0, ge=0, le=30 * 86_400)
    # Refused calls: per agent, tool and missing permission, one audit entry per window, the
    # repeats counted (refusals.py).
    refusal_window_seconds: int = Field(default=60, ge=1, le=86_400)
    # How long a changeset (a preview, or a change held for approval) may still be applied.
    changeset_ttl_seconds: int = Field(default=86_400, ge=60, le=30 * 86_400)
    statement_timeout_ms: int = Field(default=30_000, ge=0)
    lock_timeout_ms: int = Field(default=10_000, ge=0)
    # PostgreSQL sessions that cannot stall others (db.py): a transaction left idle this long (a
    # frozen server process) is ended with its locks; the server checks during a statement that
    # its client is still there; TCP keepalives find a peer that vanished.
    idle_in_transaction_timeout_ms: int = Field(default=30_000, ge=0)
    connection_check_interval_ms: int = Field(default=1_000, ge=0)
    tcp_keepalive_seconds: int = Field(default=30, ge=1, le=7200)
    pool_size: int = Field(default=5, ge=1, le=100)
    max_overflow: int = Field(default=10, ge=0, le=100)
    pool_timeout: float = Field(default=30.0, gt=0, le=600)
    # The audit chain's sealer (sealer.py): how often it looks for committed entries, how many it
    # seals per transaction, and how long its lease lasts when its process stops renewing it.
    sealer: bool = True
    seal_interval_ms: int = Field(default=100, ge=5, le=60_000)
    seal_batch: int = Field(default=10_000, ge=1, le=100_000)
    seal_lease_seconds: float = Field(default=10.0, ge=0.5, le=600)
    # Resource subscriptions (changes.py): how often a process whose clients subscribed reads
    # what the sealer has sealed since.
    change_poll_ms: int = Field(default=250, ge=20, le=60_000)
    # Signed checkpoints of the chain's head (checkpoints.py): the Ed25519 key, how often, and
    # where copies go besides the database (a file appended to, a command given each on stdin).
    audit_signing_key_file: Path | None = None
    audit_public_key_files: tuple[Path, ...] = ()
    checkpoint_interval_seconds: float = Field(default=60.0, ge=0.1, le=86_400)
    checkpoint_file: Path | None = None
    checkpoint_command: tuple[str, ...] = ()
    log_level: str = Field(default="INFO", pattern="^(DEBUG|INFO|WARNING|ERROR|CRITICAL)$")
    log_format: Literal["text", "json"] = "text"

    @model_validator(mode="after")
    def _check(self) -> Settings:
        ids = [agent.id for agent in self.agents]
        if len(set(ids)) != len(ids):
            raise ValueError("agents: each agent id may appear once")
        hashes = [agent.token_sha256 for agent in self.agents if agent.token_sha256]
        if len(set(hashes)) != len(hashes):
            raise ValueError("agents: two agents share one token")
        if self.jwt is not None:
            keys = [self.jwt.public_key_file, self.jwt.jwks_file, self.jwt_secret]
            if sum(key is not None for key in keys) != 1:
                raise ValueError(
                    "jwt: give exactly one key: jwt.public_key_file, jwt.jwks_file, or MCP_JWT_SECRET"
                )
        if len({operator.id for operator in self.operators}) != len(self.operators):
            raise ValueError("operators: each operator id may appear once")
        if self.console is not None and not self.operators:
            raise ValueError("console: add the operators who may sign in to it (see hash-password)")
        if self.oauth is not None:
            if self.jwt is not None:
                raise ValueError(
                    "oauth and jwt: choose one authorization server for OAuth clients to find: "
                    "the built-in one (oauth) or your identity provider (jwt)"
                )
            if not any(not operator.read_only for operator in self.operators):
                raise ValueError("oauth: add an operator (see hash-password) who may authorize clients")
            if not self.agents:
                raise ValueError("oauth: add the agents an operator may authorize a client to act as")
        return self

    @property
    def issuer_url(self) -> str:
        """The built-in authorization server's issuer: where the server is reached, without /mcp."""
        return self.resource_url.removesuffix("/mcp")

    @property
    def resource_url(self) -> str:
        """The MCP endpoint's URL as clients reach it: the resource an OAuth token is for."""
        if self.public_url is not None:
            return self.public_url.rstrip("/") + "/mcp"
        host = f"[{self.http_host}]" if ":" in self.http_host else self.http_host
        return f"http://{host}:{self.http_port}/mcp"

    @property
    def secure_cookies(self) -> bool:
        """Whether the console's cookies are sent over HTTPS only."""
        configured = self.console.secure_cookies if self.console is not None else None
        if configured is not None:
            return configured
        return self.public_url is not None and self.public_url.startswith("https://")

    @property
    def async_database_url(self) -> str:
        return to_async_url(self.database_url)

    @property
    def accepts_tokens(self) -> bool:
        """Whether any bearer token could be verified: an agent with a token hash, or JWTs."""
        return (
            self.jwt is not None or self.oauth is not None or any(agent.token_sha256 for agent in self.agents)
        )

    @property
    def checks_tokens(self) -> bool:
        """Whether HTTP requests must carry a verified token: always, but in development mode."""
        return self.accepts_tokens and not self.http_dev_without_auth

    def agent(self, agent_id: str) -> AgentConfig | None:
        return next((agent for agent in self.agents if agent.id == agent_id), None)


def default_database_url() -> str:
    data_dir = Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))
    return f"sqlite:///{data_dir / 'tasks.db'}"


def to_async_url(url: str) -> str:
    """Map the URLs people paste (`postgresql://`, `sqlite:///`) to the async drivers."""
    for prefix, driver in (
        ("postgresql+asyncpg://", "postgresql+asyncpg://"),
        ("postgresql://", "postgresql+asyncpg://"),
        ("postgres://", "postgresql+asyncpg://"),
        ("sqlite+aiosqlite://", "sqlite+aiosqlite://"),
        ("sqlite://", "sqlite+aiosqlite://"),
    ):
        if url.startswith(prefix):
            return driver + url[len(prefix) :]
    raise ConfigError(
        "database_url must start with postgresql:// or sqlite:/// "
        f"(got a URL starting with {url.split(':', 1)[0]!r})"
    )


def load_settings(config_file: Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    if config_file is not None:
        values.update(_read_config_file(config_file))
    if "http_dev_without_auth" in values:
        # A file can outlive the moment it was meant for; switching tokens off takes the flag,
        # typed each time (serve --transport http --dev-without-auth).
        raise ConfigError(
            "http_dev_without_auth cannot be set in a config file; "
            "pass --dev-without-auth to serve --transport http instead"
        )
    for env_name, setting in ENV_VARS.items():
        if environ.get(env_name):
            value = environ[env_name]
            values[setting] = (
                [v.strip() for v in value.split(",") if v.strip()] if (setting in _LIST_SETTINGS) else value
            )
    try:
        settings = Settings(**values)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid settings: {problems}") from None
    to_async_url(settings.database_url)
    return settings


def _read_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"config file {path} is not readable JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a JSON object of settings")
    return data
