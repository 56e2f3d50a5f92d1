"""What a token costs per HTTP call: a minted (static) token, checked by its hash in the
configuration, against a token from the built-in OAuth server, looked up in the database on every
request. One HTTP server process, one agent at a time, the same tool call.

The OAuth token is obtained as a client obtains it: dynamic registration, /authorize, the consent
page signed in as an operator, the code redeemed with PKCE.

    python -m bench.auth [--database URL] [--calls N]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from bench.stdio import cpu_seconds
from bench.writers import _free_port, _listening
from mcp_server.auth import mint_token, token_sha256
from mcp_server.operators import hash_password

PASSWORD = "a benchmark operator's password"
REDIRECT = "http://127.0.0.1:9/callback"


async def oauth_token(base: str) -> str:
    """An access token through the whole authorization-code flow, as a client and a person do it."""
    async with httpx2.AsyncClient() as http:
        registered = await http.post(
            base + "/register",
            json={"redirect_uris": [REDIRECT], "token_endpoint_auth_method": "none", "client_name": "bench"},
        )
        client_id = registered.json()["client_id"]
        verifier = secrets.token_urlsafe(48)
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        params = {
            "response_type": "code",
            "client_id": client_id,
            "redirect_uri": REDIRECT,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        }
        page = (await http.get(base + "/authorize", params=params)).headers["location"]
        request = parse_qs(urlsplit(page).query)["request"][0]
        form = {"request": request, "operator": "bench", "password": PASSWORD, "agent": "oauth-agent"}
        decided = await http.post(base + "/oauth/consent", data=form | {"decision": "allow"})
        code = parse_qs(urlsplit(decided.headers["location"]).query)["code"][0]
        redeemed = await http.post(
            base + "/token",
            data={
                "grant_type": "authorization_code",
                "client_id": client_id,
                "code": code,
                "redirect_uri": REDIRECT,
                "code_verifier": verifier,
            },
        )
        token: str = redeemed.json()["access_token"]
        return token


async def timed_calls(url: str, token: str, calls: int, pid: int) -> dict[str, float]:
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=60) as http,
        Client(streamable_http_client(url, http_client=http)) as client,  # type: ignore[arg-type]
    ):
        for _ in range(20):  # warm up
            await client.call_tool("search_tasks", {"limit": 1})
        times = []
        cpu_before = cpu_seconds(pid)
        for _ in range(calls):
            started = time.perf_counter()
            result = await client.call_tool("search_tasks", {"limit": 1})
            times.append(time.perf_counter() - started)
            assert not result.is_error
        cpu = cpu_seconds(pid) - cpu_before
    return {
        "p50_ms": round(statistics.median(times) * 1000, 2),
        "p99_ms": round(statistics.quantiles(times, n=100)[98] * 1000, 2),
        "server_cpu_ms_per_call": round(cpu * 1000 / calls, 2),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="bench-auth-"))
    static = mint_token()
    config = {
        "database_url": args.database or f"sqlite:///{folder / 'auth.db'}",
        "log_level": "WARNING",
        "http_requests_per_second": 0,  # measured: the server's speed, not the agent's rate limit
        "agents": [{"id": "static-agent", "token_sha256": token_sha256(static)}, {"id": "oauth-agent"}],
        "operators": [{"id": "bench", "password_scrypt": hash_password(PASSWORD)}],
        "oauth": {},
    }
    (folder / "config.json").write_text(json.dumps(config))
    port = _free_port()
    command = [sys.executable, "-m", "mcp_server", "--config", str(folder / "config.json")]
    migrating = await asyncio.create_subprocess_exec(
        *command, "migrate"
    )  # PostgreSQL is not migrated by serve
    if await migrating.wait() != 0:
        raise RuntimeError("mcp-task-server migrate failed")
    command += ["serve", "--transport", "http", "--port", str(port)]
    with (folder / "server.log").open("wb") as log:
        process = await asyncio.create_subprocess_exec(*command, stdout=log, stderr=asyncio.subprocess.STDOUT)
    try:
        await _listening(port)
        base = f"http://127.0.0.1:{port}"
        issued = await oauth_token(base)
        results: dict[str, Any] = {"database": config["database_url"].split(":")[0], "calls": args.calls}
        for _ in range(2):  # alternate, so neither kind always runs on the warmer process
            for name, token in (("static token", static), ("OAuth token", issued)):
                results.setdefault(name, []).append(
                    await timed_calls(base + "/mcp", token, args.calls, process.pid)
                )
        return results
    finally:
        if process.returncode is None:
            process.terminate()
        await asyncio.wait_for(process.wait(), 20)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database", metavar="URL", help="default: a new SQLite file")
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args(argv)
    sys.stderr.write(json.dumps(asyncio.run(run(args)), indent=2) + "\n")


if __name__ == "__main__":
    main()
