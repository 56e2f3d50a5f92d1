"""The sealer and its signed checkpoints: a deleted tail and a forged checkpoint are found, and a
sealer killed mid-round loses nothing."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

import anyio
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy import text

from mcp_server import checkpoints
from mcp_server.config import Settings
from mcp_server.db import Database
from mcp_server.errors import StartupError
from mcp_server.schemas import iso_time
from mcp_server.sealer import Sealer
from tests.conftest import call, connect, count_rows, seal_all
from tests.test_audit_log import some_history, triggers_off

pytestmark = pytest.mark.anyio


@pytest.fixture
def signing(settings: Settings, tmp_path: Path) -> Settings:
    """The settings with a signing key, a checkpoint at every round, and a file of checkpoints."""
    key = tmp_path / "audit-key.pem"
    checkpoints.generate(key)
    return settings.model_copy(
        update={
            "audit_signing_key_file": key,
            "checkpoint_interval_seconds": 0.1,
            "checkpoint_file": tmp_path / "checkpoints.jsonl",
        }
    )


def cli(settings: Settings, tmp_path: Path) -> list[str]:
    """The command line of `mcp-task-server` with these settings."""
    path = tmp_path / "server.json"
    path.write_text(settings.model_dump_json(exclude_defaults=True))
    return [sys.executable, "-m", "mcp_server", "--config", str(path)]


async def test_a_deleted_tail_is_caught_by_the_checkpoints_even_when_they_are_deleted_too(
    signing: Settings, db: Database, tmp_path: Path
) -> None:
    await some_history(signing)
    await seal_all(signing, db)
    await anyio.sleep(signing.checkpoint_interval_seconds)
    await Sealer(db, signing, checkpoints.Signer.of(signing)).step()  # the checkpoint now due: the head
    kept = (await anyio.Path(str(signing.checkpoint_file)).read_text()).splitlines()
    assert json.loads(kept[-1])["seq"] == 8
    async with connect(signing, "auto") as client:
        report = await call(client, "verify_audit_log")
    assert report["ok"] and report["checkpoints_checked"] >= 1

    async with triggers_off(db), db.engine.begin() as conn:  # a superuser removes the newest two
        await conn.execute(text("DELETE FROM audit_seal WHERE seq > 6"))
        await conn.execute(text("DELETE FROM audit_entry WHERE id > 6"))
    async with connect(signing, "auto") as client:
        report = await call(client, "verify_audit_log")
    assert not report["ok"] and "newest entries were removed" in report["first_problem"]["problem"]

    async with triggers_off(db), db.engine.begin() as conn:  # ... and the checkpoints in the database
        await conn.execute(text("DELETE FROM audit_checkpoint"))
    verify = [*cli(signing, tmp_path), "verify-audit-log"]
    missing = await anyio.run_process(
        [*verify, "--checkpoints", str(tmp_path / "nowhere.jsonl")], check=False
    )
    assert missing.returncode != 0 and b"cannot read" in missing.stderr
    alone = await anyio.run_process(verify, check=False)
    assert alone.returncode == 0, "without a copy kept elsewhere, a shorter chain is valid in itself"
    caught = await anyio.run_process([*verify, "--checkpoints", str(signing.checkpoint_file)], check=False)
    assert caught.returncode == 1 and b"newest entries were removed" in caught.stderr, caught.stderr


async def test_a_forged_checkpoint_is_found(signing: Settings, db: Database, tmp_path: Path) -> None:
    await some_history(signing)
    await seal_all(signing, db)
    assert signing.audit_signing_key_file is not None
    ours = checkpoints.Signer.load(signing.audit_signing_key_file)
    forger = checkpoints.generate(tmp_path / "forger.pem")
    when = datetime(2026, 12, 7, 10, tzinfo=UTC)
    by_forger = forger.sign(20, "f" * 64, iso_time(when))
    cases = {
        "unknown key": by_forger,
        "does not verify": checkpoints.Checkpoint(
            20, "f" * 64, iso_time(when), ours.key_id, by_forger.signature
        ),
    }
    for finding, forged in cases.items():
        async with db.engine.begin() as conn:  # the application's role may insert checkpoints
            await conn.execute(
                text(
                    "INSERT INTO audit_checkpoint (seq, head_hash, signed_at, key_id, signature) "
                    "VALUES (:seq, :head_hash, :signed_at, :key_id, :signature)"
                ),
                {**asdict(forged), "signed_at": when},
            )
        async with connect(signing.model_copy(update={"sealer": False}), "auto") as client:
            report = await call(client, "verify_audit_log")
        assert not report["ok"] and finding in report["first_problem"]["problem"], report
        async with triggers_off(db), db.engine.begin() as conn:
            await conn.execute(text("DELETE FROM audit_checkpoint WHERE seq = 20"))


async def test_a_sealer_killed_mid_round_loses_nothing_and_the_next_one_resumes(
    settings: Settings, db: Database, tmp_path: Path
) -> None:
    await some_history(settings)
    async with db.engine.begin() as conn:  # many entries, so that the kill lands between rounds
        await conn.execute(
            text(
                "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < 60000) "
                "INSERT INTO audit_entry (action, changed_by, changed_at, request_id) "
                "SELECT 'refused', 'bulk-writer', CURRENT_TIMESTAMP, 'r' || n FROM c"
            )
        )
    quick = settings.model_copy(update={"seal_batch": 20000, "seal_lease_seconds": 1.0})
    async with await anyio.open_process(
        [*cli(quick, tmp_path), "verify-audit-log", "--wait", "120"]
    ) as sealer:
        with anyio.fail_after(60):
            while True:  # until its first round has committed
                async with db.engine.connect() as conn:
                    if (await conn.execute(text("SELECT count(*) FROM audit_seal"))).scalar_one():
                        break
        sealer.kill()
    async with db.engine.connect() as conn:
        sealed_before = (await conn.execute(text("SELECT count(*) FROM audit_seal"))).scalar_one()
    assert 0 < sealed_before < 60008, "the kill should land between the first round and the last"
    await seal_all(quick, db)  # takes over once the dead sealer's lease runs out
    async with db.engine.connect() as conn:
        seqs = (await conn.execute(text("SELECT seq FROM audit_seal ORDER BY seq"))).scalars().all()
    assert seqs == list(range(1, 60008 + 1))
    async with connect(settings, "auto") as client:
        report = await call(client, "verify_audit_log")
    assert report["ok"] and report["entries_checked"] == 60008 and report["unsealed"] == 0


async def test_a_round_cut_at_the_batch_size_passes_over_nothing(settings: Settings, db: Database) -> None:
    """Entry ids far above transaction ids, as after bulk changes (one transaction, many ids): a
    round stopped at the batch size must not move the horizon past entries it has not sealed."""
    if not db.is_sqlite:  # (SQLite's horizon is an entry id itself)
        async with db.engine.begin() as conn:
            await conn.execute(
                text("SELECT setval(pg_get_serial_sequence('audit_entry', 'id'), 1000000000000)")
            )
    await some_history(settings)
    await seal_all(settings.model_copy(update={"seal_batch": 3}), db)
    assert await count_rows(db, "audit_seal") == await count_rows(db, "audit_entry") == 8
    async with connect(settings, "auto") as client:
        report = await call(client, "verify_audit_log")
    assert report["ok"] and report["entries_checked"] == 8 and report["unsealed"] == 0


def rsa_pem() -> bytes:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "cannot be read (No such file or directory)"),
        (b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n", "not a PEM private key"),
        (rsa_pem(), "the key must be Ed25519"),
    ],
    ids=["missing", "garbled", "rsa"],
)
async def test_a_bad_signing_key_file_is_named_with_what_is_wrong_and_no_library_text(
    tmp_path: Path, content: bytes | None, problem: str
) -> None:
    path = tmp_path / "audit-key.pem"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(StartupError) as refused:
        checkpoints.Signer.load(path)
    assert str(refused.value).startswith(f"audit_signing_key_file {path}: ")
    assert problem in str(refused.value)
    assert "cryptography" not in str(refused.value) and "Could not deserialize" not in str(refused.value)
