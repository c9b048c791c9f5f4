"""push/pull against moto's S3 server, started as a real subprocess and spoken to over HTTP."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from snapshot.verify import verify_snapshot
from tests.support.snapshot_fixtures import build, save_tiny_model
from thaw.cli import main as thaw

BUCKET = "models"
PART = 5 * 1024 * 1024  # S3's smallest multipart part


@pytest.fixture(scope="module")
def big_snapshot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~10 MB of float32 weights, so the weight file travels in several parts."""
    root = tmp_path_factory.mktemp("s3")
    source = save_tiny_model(
        root / "src",
        "llama",
        vocab_size=8192,
        hidden_size=256,
        intermediate_size=256,
        num_attention_heads=4,
    )
    build(source, root / "snapshot", dtype="float32")
    assert (root / "snapshot" / "model.safetensors").stat().st_size > 2 * PART
    return root / "snapshot"


@pytest.fixture
def s3(moto_s3_env: dict[str, str]) -> Any:
    import boto3

    client = boto3.client("s3")
    if BUCKET not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
        client.create_bucket(Bucket=BUCKET)
    return client


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = thaw(["snapshot", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def files_of(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.iterdir()}


def test_push_pull_round_trip_resume_and_corruption(
    s3, big_snapshot: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"s3://{BUCKET}/round-trip/v1"
    count = len(json.loads((big_snapshot / "manifest.json").read_text())["files"])
    flags = ["--part-size", "5M", "--concurrency", "4"]
    code, out, err = run(capsys, "push", str(big_snapshot), url, *flags)
    assert code == 0, err
    head = s3.head_object(Bucket=BUCKET, Key="round-trip/v1/model.safetensors")
    parts = -(-(big_snapshot / "model.safetensors").stat().st_size // PART)
    assert head["ETag"].strip('"').endswith(f"-{parts}"), "expected a multipart upload"
    assert run(capsys, "push", str(big_snapshot), url, *flags)[1].endswith(
        f"0 files (0 bytes) transferred, {count} already there\n"
    )

    pulled = tmp_path / "pulled"
    code, out, err = run(capsys, "pull", url, str(pulled), *flags)
    assert code == 0, err
    assert files_of(pulled) == files_of(big_snapshot)
    assert verify_snapshot(pulled) == []
    assert "0 files (0 bytes) transferred" in run(capsys, "pull", url, str(pulled), *flags)[1]

    # Corrupt the weights on the server: the pull fails, names the object, leaves DIR alone.
    good = (big_snapshot / "model.safetensors").read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 3] ^= 0xFF
    s3.put_object(Bucket=BUCKET, Key="round-trip/v1/model.safetensors", Body=bytes(bad))
    fresh = tmp_path / "fresh"
    code, out, err = run(capsys, "pull", url, str(fresh), *flags)
    assert code == 1
    assert err.strip().splitlines()[-1] == (
        f"error: {url}/model.safetensors: sha256 after download differs from the manifest"
        f" (object corrupted or replaced); {fresh} left as it was"
    )
    assert not fresh.exists()
    before = files_of(pulled)
    (pulled / "model.safetensors").unlink()  # make the existing DIR need the corrupted object
    before.pop("model.safetensors")
    assert run(capsys, "pull", url, str(pulled), *flags)[0] == 1
    assert files_of(pulled) == before

    # Repair the object: the retry resumes; what the failed pull verified is not fetched again.
    files = json.loads((big_snapshot / "manifest.json").read_text())["files"]
    names, sizes = [f["name"] for f in files], [f["size"] for f in files]
    done_before = names.index("model.safetensors")  # files are fetched in manifest order
    assert done_before > 0
    s3.put_object(Bucket=BUCKET, Key="round-trip/v1/model.safetensors", Body=good)
    code, out, err = run(capsys, "pull", url, str(fresh), *flags)
    assert code == 0, err
    assert out.endswith(
        f"{count - done_before} files ({sum(sizes[done_before:]):,} bytes) transferred,"
        f" {done_before} already there\n"
    )
    assert verify_snapshot(fresh) == []
    assert not (tmp_path / ".fresh.pull-partial").exists()


def test_pull_errors_are_one_line(s3, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "pull", f"s3://{BUCKET}/nothing-here", str(tmp_path / "d"))
    assert code == 1
    assert err.strip() == f"error: s3://{BUCKET}/nothing-here/manifest.json: not found"
    s3.put_object(Bucket=BUCKET, Key="junk/manifest.json", Body=b"<html>")
    code, _, err = run(capsys, "pull", f"s3://{BUCKET}/junk", str(tmp_path / "d"))
    assert code == 1 and err.startswith(f"error: s3://{BUCKET}/junk/manifest.json: not valid JSON")
    code, _, err = run(capsys, "pull", "https://example.com/x", str(tmp_path / "d"))
    assert code == 1 and "expected s3://bucket/prefix" in err
    code, _, err = run(capsys, "pull", f"s3://{BUCKET}/x", str(tmp_path / "d"), "--part-size", "1M")
    assert code == 1 and "--part-size" in err
    assert not (tmp_path / "d").exists()


def test_push_refuses_a_damaged_snapshot(
    s3, tiny_llama_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tiny_llama_copy / "tokenizer.json").unlink()
    code, _, err = run(capsys, "push", str(tiny_llama_copy), f"s3://{BUCKET}/damaged")
    assert code == 1 and "does not verify, not pushing (tokenizer.json: missing)" in err
    assert "Contents" not in s3.list_objects_v2(Bucket=BUCKET, Prefix="damaged")


def test_push_to_a_missing_bucket(
    moto_s3_env: dict[str, str], tiny_llama_snapshot: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "push", str(tiny_llama_snapshot), "s3://no-such-bucket/x")
    assert code == 1
    assert err.strip().splitlines()[-1] == "error: bucket no-such-bucket: not found"


# ------------------------------------------------- pinning the manifest, and the swap into place


def manifest_digest(directory: Path) -> str:
    return hashlib.sha256((directory / "manifest.json").read_bytes()).hexdigest()


def test_push_prints_the_digest_and_pull_checks_it(
    s3, tiny_llama_snapshot: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"s3://{BUCKET}/pinned"
    digest = manifest_digest(tiny_llama_snapshot)
    code, out, err = run(capsys, "push", str(tiny_llama_snapshot), url)
    assert code == 0, err
    assert f"manifest sha256: {digest}\n" in out

    # A wrong pin: refused before anything is fetched; the target is not created.
    target = tmp_path / "snap"
    wrong = "0" * 64
    code, out, err = run(capsys, "pull", url, str(target), "--expect-manifest-sha256", wrong)
    assert code == 1
    assert err.strip() == (
        f"error: {url}/manifest.json: sha256 {digest} is not the expected {wrong}"
        f" (tampered with, or another snapshot); {target} left as it was"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == []

    code, out, err = run(capsys, "pull", url, str(target), "--expect-manifest-sha256", "nope")
    assert code == 1 and err.strip() == "error: 'nope' is not a sha256 (64 hex digits)"

    # The right pin (as printed, or upper case with a prefix) pulls.
    code, out, err = run(capsys, "pull", url, str(target), "--expect-manifest-sha256", digest)
    assert code == 0, err
    assert f"manifest sha256: {digest}\n" in out
    assert files_of(target) == files_of(tiny_llama_snapshot)
    pin = f"sha256:{digest.upper()}"
    assert run(capsys, "pull", url, str(target), "--expect-manifest-sha256", pin)[0] == 0


def test_a_tampered_bucket_is_refused_and_the_old_snapshot_kept(
    s3, tiny_llama_snapshot: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Whoever writes the bucket rewrites a file and the manifest to match: the checksums pass,
    the pin does not."""
    url = f"s3://{BUCKET}/tampered"
    digest = manifest_digest(tiny_llama_snapshot)
    assert run(capsys, "push", str(tiny_llama_snapshot), url)[0] == 0
    target = tmp_path / "snap"
    assert run(capsys, "pull", url, str(target), "--expect-manifest-sha256", digest)[0] == 0
    before = files_of(target)

    manifest = json.loads((tiny_llama_snapshot / "manifest.json").read_text())
    evil = b'{"model": "evil"}'
    for entry in manifest["files"]:
        if entry["name"] == "tokenizer.json":
            entry["size"], entry["sha256"] = len(evil), hashlib.sha256(evil).hexdigest()
    s3.put_object(Bucket=BUCKET, Key="tampered/tokenizer.json", Body=evil)
    s3.put_object(Bucket=BUCKET, Key="tampered/manifest.json", Body=json.dumps(manifest))

    code, _, err = run(capsys, "pull", url, str(target), "--expect-manifest-sha256", digest)
    assert code == 1 and "is not the expected" in err
    assert files_of(target) == before
    assert not (tmp_path / ".snap.pull-partial").exists()


def test_an_interrupted_pull_leaves_the_old_snapshot_in_place(
    s3,
    tiny_llama_snapshot: Path,
    big_snapshot: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from snapshot import s3 as s3_module

    old_url, new_url = f"s3://{BUCKET}/swap/old", f"s3://{BUCKET}/swap/new"
    assert run(capsys, "push", str(tiny_llama_snapshot), old_url)[0] == 0
    assert run(capsys, "push", str(big_snapshot), new_url)[0] == 0
    target = tmp_path / "snap"
    assert run(capsys, "pull", old_url, str(target))[0] == 0
    old_files = files_of(target)

    real_download = s3_module._download
    calls = 0

    def interrupted(*args, **kwargs) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise KeyboardInterrupt  # Ctrl-C, or the container stopped, mid-pull
        real_download(*args, **kwargs)

    monkeypatch.setattr(s3_module, "_download", interrupted)
    assert run(capsys, "pull", new_url, str(target))[0] == 130
    assert files_of(target) == old_files
    assert verify_snapshot(target) == []
    # Not monkeypatch.undo(): that would also drop the variables pointing boto3 at moto.
    monkeypatch.setattr(s3_module, "_download", real_download)

    code, out, err = run(capsys, "pull", new_url, str(target))
    assert code == 0, err
    assert files_of(target) == files_of(big_snapshot)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["snap"]
