"""`thaw serve` with an s3:// snapshot: pulled into the cache first, refused unless it is the
pinned one when THAW_SNAPSHOT_SHA256 is set (moto's S3 server, on loopback)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from snapshot.s3 import S3Location, TransferSettings, push
from thaw.serve import resolve_snapshot

BUCKET = "serve-pins"


@pytest.fixture
def pushed(moto_s3_env: dict[str, str], tiny_llama_snapshot: Path) -> str:
    import boto3

    client = boto3.client("s3")
    if BUCKET not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
        client.create_bucket(Bucket=BUCKET)
    push(tiny_llama_snapshot, S3Location(BUCKET, "snap"), TransferSettings())
    return f"s3://{BUCKET}/snap"


def test_a_pinned_snapshot_is_pulled(
    pushed: str, tiny_llama_snapshot: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    digest = hashlib.sha256((tiny_llama_snapshot / "manifest.json").read_bytes()).hexdigest()
    monkeypatch.setenv("THAW_SNAPSHOT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("THAW_SNAPSHOT_SHA256", digest)
    resolved = Path(resolve_snapshot(pushed))
    assert resolved == (tmp_path / "cache").resolve()
    assert (resolved / "manifest.json").read_bytes() == (
        tiny_llama_snapshot / "manifest.json"
    ).read_bytes()


def test_another_snapshot_than_the_pinned_one_is_refused(
    pushed: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("THAW_SNAPSHOT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("THAW_SNAPSHOT_SHA256", "ab" * 32)
    with pytest.raises(SystemExit, match=r"^thaw serve: .* is not the expected abab"):
        resolve_snapshot(pushed)
    assert not (tmp_path / "cache").exists()
