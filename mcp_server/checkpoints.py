"""Signed checkpoints of the audit chain's head, and the keys that sign and check them.

A checkpoint says "the chain's entry at position `seq` has hash `head_hash`", at `signed_at`,
signed with Ed25519 (the `cryptography` library) by the key the settings name
(`audit_signing_key_file`). The sealer writes one to the database every
`checkpoint_interval_seconds` while the chain grows, and hands each to a file or a command the
operator chooses, so that a copy lives where the database's owner cannot rewrite it. `verify`
checks every checkpoint's signature and that the chain still holds its head: a rewritten chain
or a deleted tail no longer does.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from mcp_server.config import Settings
from mcp_server.errors import StartupError
from mcp_server.schemas import iso_time

_CONTEXT = "mcp-task-server audit checkpoint v1"


@dataclass(frozen=True)
class Checkpoint:
    seq: int
    head_hash: str
    signed_at: str  # ISO 8601, UTC
    key_id: str
    signature: str  # base64 of the Ed25519 signature over `message()`

    @classmethod
    def of(cls, row: Any) -> Checkpoint:
        """From an AuditCheckpoint row."""
        return cls(row.seq, row.head_hash, iso_time(row.signed_at), row.key_id, row.signature)

    @classmethod
    def from_json(cls, line: str) -> Checkpoint:
        data = json.loads(line)
        return cls(int(data["seq"]), data["head_hash"], data["signed_at"], data["key_id"], data["signature"])

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    def message(self) -> bytes:
        return message(self.seq, self.head_hash, self.signed_at)


def message(seq: int, head_hash: str, signed_at: str) -> bytes:
    """What a checkpoint's signature covers: a fixed context line, then each field on its line."""
    return f"{_CONTEXT}\n{seq}\n{head_hash}\n{signed_at}\n".encode()


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


class Signer:
    """The sealer's signing key."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.key_id = key_id(private.public_key())

    @classmethod
    def of(cls, settings: Settings) -> Signer | None:
        """The key the settings name, if any."""
        path = settings.audit_signing_key_file
        return None if path is None else cls.load(path)

    @classmethod
    def load(cls, path: Path) -> Signer:
        private = _load_key(path, "audit_signing_key_file", "private", _private_key)
        if not isinstance(private, Ed25519PrivateKey):
            raise StartupError(f"audit_signing_key_file {path}: the key must be Ed25519")
        return cls(private)

    def sign(self, seq: int, head_hash: str, signed_at: str) -> Checkpoint:
        signature = self._private.sign(message(seq, head_hash, signed_at))
        return Checkpoint(seq, head_hash, signed_at, self.key_id, base64.b64encode(signature).decode())

    @property
    def public(self) -> Ed25519PublicKey:
        return self._private.public_key()


class CheckpointKeys:
    """The public keys a checkpoint may be signed with, by key id."""

    def __init__(self, keys: list[Ed25519PublicKey]) -> None:
        self._keys = {key_id(key): key for key in keys}

    @classmethod
    def load(cls, signer: Signer | None, public_keys: tuple[Path, ...] = ()) -> CheckpointKeys:
        """The signer's own key and the public keys in `public_keys`."""
        keys = [] if signer is None else [signer.public]
        for path in public_keys:
            public = _load_key(path, "audit public key", "public", serialization.load_pem_public_key)
            if not isinstance(public, Ed25519PublicKey):
                raise StartupError(f"audit public key {path}: the key must be Ed25519")
            keys.append(public)
        return cls(keys)

    def __bool__(self) -> bool:
        return bool(self._keys)

    def check(self, checkpoint: Checkpoint) -> str | None:
        """What is wrong with `checkpoint`'s signature, or None when one of the keys made it."""
        public = self._keys.get(checkpoint.key_id)
        if public is None:
            return (
                f"checkpoint signed by an unknown key {checkpoint.key_id!r}: forged, or its key is not given"
            )
        try:
            public.verify(base64.b64decode(checkpoint.signature, validate=True), checkpoint.message())
        except (InvalidSignature, ValueError):
            return "checkpoint's signature does not verify: it was forged or altered"
        return None


def _private_key(pem: bytes) -> Any:
    return serialization.load_pem_private_key(pem, password=None)


def _load_key(path: Path, setting: str, kind: str, loader: Callable[[bytes], Any]) -> Any:
    """The key in the PEM file at `path`, or a StartupError that names `setting` and the file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise StartupError(f"{setting} {path}: cannot be read ({exc.strerror or 'no access'})") from None
    try:
        return loader(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise StartupError(
            f"{setting} {path}: not a PEM {kind} key without a password; "
            "`mcp-task-server keygen PATH` writes a signing key and prints its public key"
        ) from None


def generate(path: Path) -> Signer:
    """A new Ed25519 key, written to `path` (PEM, readable by its owner only)."""
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(pem)
    return Signer(private)


def public_pem(public: Ed25519PublicKey) -> str:
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
