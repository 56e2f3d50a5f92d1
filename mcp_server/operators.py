"""Operators: the people who sign in to the server's own pages, and their passwords.

A password is kept only as a scrypt hash (`hash-password` makes one for the config file). Signing
in costs the same whether or not the operator exists, so the time taken does not tell which ids do.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from functools import cache

from mcp_server.config import OperatorConfig, Settings

# scrypt's cost: 16 MiB and about 50 ms a check, enough to make guessing slow, cheap to sign in.
_N, _R, _P = 2**14, 8, 1
_MAX_PASSWORD = 1024
MIN_PASSWORD = 12
RECORDED_AS = "operator:"


def hash_password(password: str) -> str:
    salt = os.urandom(16)
    digest = _scrypt(password, salt, _N, _R, _P)
    return f"scrypt:{_N}:{_R}:{_P}:{base64.b64encode(salt).decode()}:{base64.b64encode(digest).decode()}"


def sign_in(settings: Settings, operator_id: str, password: str) -> OperatorConfig | None:
    """The operator whose id and password these are, or None."""
    operator = next((o for o in settings.operators if o.id == operator_id), None)
    stored = operator.password_scrypt if operator is not None else _unknown()
    if len(password) > _MAX_PASSWORD:
        return None
    _, n, r, p, salt, digest = stored.split(":")
    tried = _scrypt(password, base64.b64decode(salt), int(n), int(r), int(p))
    matches = hmac.compare_digest(tried, base64.b64decode(digest))
    return operator if matches and operator is not None else None


def recorded_id(operator: OperatorConfig) -> str:
    """How the audit log names what an operator did: never mistaken for an agent's identity."""
    return f"{RECORDED_AS}{operator.id}"


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=64 * 1024 * 1024, dklen=32)


@cache
def _unknown() -> str:
    """Checked against when the operator id is unknown, so that case costs a full check too."""
    return hash_password(os.urandom(16).hex())
