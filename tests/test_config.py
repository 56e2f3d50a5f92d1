"""Settings: defaults, a JSON config file, and environment variables over it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mcp_server.config import ConfigError, JwtConfig, Settings, load_settings, to_async_url
from mcp_server.server import create_server


def test_database_urls_people_paste_are_mapped_to_the_async_drivers() -> None:
    assert to_async_url("postgresql://u@h:5432/db") == "postgresql+asyncpg://u@h:5432/db"
    assert to_async_url("postgres://u@h/db") == "postgresql+asyncpg://u@h/db"
    assert to_async_url("sqlite:///tmp/x.db") == "sqlite+aiosqlite:///tmp/x.db"
    assert to_async_url("postgresql+asyncpg://h/db") == "postgresql+asyncpg://h/db"
    with pytest.raises(ConfigError, match="must start with"):
        to_async_url("mysql://h/db")


def test_environment_variables_override_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "settings.json"
    config.write_text(json.dumps({"agent_id": "from-file", "pool_size": 3, "database_url": "sqlite:///f.db"}))
    settings = load_settings(config, {"MCP_AGENT_ID": "from-env", "DB_POOL_TIMEOUT": "2.5"})
    assert settings.agent_id == "from-env"
    assert settings.pool_size == 3 and settings.pool_timeout == 2.5
    assert settings.async_database_url == "sqlite+aiosqlite:///f.db"


def test_the_default_database_is_sqlite_in_the_per_user_data_directory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", "/home/someone/.data")
    settings = load_settings(None, {})
    assert settings.database_url == "sqlite:////home/someone/.data/mcp-task-server/tasks.db"
    assert settings.agent_id is None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not readable JSON"),
        ("[1, 2]", "JSON object"),
        ('{"pool_size": 0}', "pool_size"),
        ('{"pool_sise": 5}', "pool_sise"),
        ('{"database_url": "mysql://x"}', "must start with"),
        ('{"agents": [{"id": "jwt:https://id.example.com#bot"}]}', "may not begin with jwt:"),
        ('{"agent_id": "local:root"}', "may not begin with"),
    ],
)
def test_a_bad_config_file_is_an_error_that_names_the_problem(
    tmp_path: Path, content: str, message: str
) -> None:
    config = tmp_path / "settings.json"
    config.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_settings(config, {})


def test_a_named_config_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.json", {})


def test_security_settings_that_cannot_work_are_refused_with_the_setting_named(tmp_path: Path) -> None:
    problems = {
        "two agents share one token": {
            "agents": [{"id": "a", "token_sha256": "0" * 64}, {"id": "b", "token_sha256": "0" * 64}]
        },
        "each agent id may appear once": {"agents": [{"id": "a"}, {"id": "a"}]},
        "token_sha256": {"agents": [{"id": "a", "token_sha256": "not-a-hash"}]},
        "exactly one key": {"jwt": {"issuer": "i", "audience": "a"}},
    }
    for expected, values in problems.items():
        config = tmp_path / "settings.json"
        config.write_text(json.dumps(values))
        with pytest.raises(ConfigError, match=expected):
            load_settings(config, {})
    assert load_settings(None, {"MCP_TOOLS": "search_tasks, get_task"}).tools == {"search_tasks", "get_task"}
    missing_key = Settings(jwt=JwtConfig(issuer="i", audience="a", public_key_file=tmp_path / "absent.pem"))
    with pytest.raises(ConfigError, match="cannot load the verification key"):
        create_server(missing_key)
