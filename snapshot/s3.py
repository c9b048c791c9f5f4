"""`thaw snapshot push|pull`: a snapshot to and from S3 (or anything that speaks its API).

boto3's managed transfers do the parallel work: multipart uploads, and ranged GETs for downloads,
`concurrency` at a time in `part_size` pieces. Configuration is boto3's own (AWS_ENDPOINT_URL,
AWS_PROFILE, the credentials chain). What this module adds: checksums against the manifest,
skipping what is already there, and an all-or-nothing directory at the end of a pull.

Trust: the manifest holds every file's sha256, so a pull checks each file against it; but whoever
can write the bucket can write the manifest too. Pinning the manifest's own sha256 (printed by
push; `pull --expect-manifest-sha256`, THAW_SNAPSHOT_SHA256 for `thaw serve`) closes that: a
manifest with another digest is refused before anything is downloaded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snapshot import manifest as mf
from snapshot.errors import SnapshotError
from snapshot.swap import replace_directory

SHA256_METADATA = "sha256"


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str

    @classmethod
    def parse(cls, url: str) -> S3Location:
        if not url.startswith("s3://"):
            raise SnapshotError(f"{url}: expected s3://bucket/prefix")
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        if not bucket:
            raise SnapshotError(f"{url}: no bucket name")
        return cls(bucket, prefix.strip("/"))

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def url(self, name: str = "") -> str:
        return f"s3://{self.bucket}/{self.key(name)}"


@dataclass(frozen=True)
class TransferSettings:
    concurrency: int = 16
    part_size: int = 16 * 1024 * 1024


@dataclass
class TransferReport:
    transferred: list[str]
    skipped: list[str]
    bytes_transferred: int
    manifest_sha256: str = ""  # of the manifest pushed or pulled: the digest to pin


def parse_sha256(text: str) -> str:
    """A sha256 as 64 hex digits (any case, an optional "sha256:" prefix); lower case."""
    digest = text.strip().removeprefix("sha256:").lower()
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise SnapshotError(f"{text!r} is not a sha256 (64 hex digits)")
    return digest


def push(directory: Path, location: S3Location, settings: TransferSettings) -> TransferReport:
    """Upload a verified snapshot; objects already there with the same sha256 are skipped.

    manifest.json goes last: a pull never sees a manifest whose files are not all there yet,
    and one that overlaps a push over an older snapshot fails its checksums instead of mixing.
    """
    from snapshot.verify import verify_snapshot

    problems = verify_snapshot(directory)
    if problems:
        raise SnapshotError(f"{directory}: does not verify, not pushing ({problems[0]})")
    raw = (directory / mf.MANIFEST).read_bytes()
    manifest = mf.load_manifest(directory)
    client, config = _client(settings)
    _call(f"bucket {location.bucket}", client.head_bucket, Bucket=location.bucket)
    report = TransferReport([], [], 0, mf.manifest_sha256(raw))
    todo = []
    for entry in manifest["files"]:
        if _remote_matches(client, location, entry):
            report.skipped.append(entry["name"])
        else:
            todo.append(entry)
    with _progress(sum(e["size"] for e in todo), "push") as bar:
        for entry in todo:
            key = location.key(entry["name"])
            extra = {"Metadata": {SHA256_METADATA: entry["sha256"]}}
            _call(
                location.url(entry["name"]),
                client.upload_file,
                str(directory / entry["name"]),
                location.bucket,
                key,
                ExtraArgs=extra,
                Config=config,
                Callback=bar.update,
            )
            report.transferred.append(entry["name"])
            report.bytes_transferred += entry["size"]
    # The bytes read above, not the file again: the digest printed is of what was uploaded.
    _call(
        location.url(mf.MANIFEST),
        client.put_object,
        Bucket=location.bucket,
        Key=location.key(mf.MANIFEST),
        Body=raw,
    )
    return report


def pull(
    location: S3Location,
    directory: Path,
    settings: TransferSettings,
    expect_manifest_sha256: str | None = None,
) -> TransferReport:
    """Download into a staging directory beside `directory`, verify, then swap it into place.

    expect_manifest_sha256: refuse a manifest.json with another sha256 before anything is
    downloaded (a tampered bucket, or another snapshot than the one pinned).
    The staging directory survives a failure, so the next pull resumes: files there (or in an
    existing `directory`) whose sha256 matches the manifest are not downloaded again. Until the
    swap (snapshot.swap) `directory` is untouched; the swap leaves no moment without it.
    """
    expected = None if expect_manifest_sha256 is None else parse_sha256(expect_manifest_sha256)
    client, config = _client(settings)
    raw = _call(location.url(mf.MANIFEST), _get_bytes, client, location, mf.MANIFEST)
    digest = mf.manifest_sha256(raw)
    if expected is not None and digest != expected:
        raise SnapshotError(
            f"{location.url(mf.MANIFEST)}: sha256 {digest} is not the expected {expected}"
            f" (tampered with, or another snapshot); {directory} left as it was"
        )
    try:
        manifest = mf.parse_manifest(json.loads(raw))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SnapshotError(f"{location.url(mf.MANIFEST)}: not valid JSON ({exc})") from exc
    if _up_to_date(directory, raw, manifest):
        names = [entry["name"] for entry in manifest["files"]]
        return TransferReport([], names, 0, digest)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.with_name(f".{directory.name}.pull-partial")
    staging.mkdir(exist_ok=True)
    report = TransferReport([], [], 0, digest)
    todo = []
    for entry in manifest["files"]:
        if _local_matches(staging / entry["name"], entry):
            report.skipped.append(entry["name"])
        elif _local_matches(directory / entry["name"], entry):
            _link_or_copy(directory / entry["name"], staging / entry["name"])
            report.skipped.append(entry["name"])
        else:
            todo.append(entry)
    with _progress(sum(e["size"] for e in todo), "pull") as bar:
        for entry in todo:
            _download(client, config, location, staging, entry, bar.update, directory)
            report.transferred.append(entry["name"])
            report.bytes_transferred += entry["size"]
    (staging / mf.MANIFEST).write_bytes(raw)
    _remove_unlisted(staging, manifest)
    replace_directory(staging, directory)
    return report


def _remove_unlisted(staging: Path, manifest: dict[str, Any]) -> None:
    """Drop what an earlier, interrupted pull (maybe of another manifest) left in staging."""
    wanted = {entry["name"] for entry in manifest["files"]} | {mf.MANIFEST}
    for path in staging.iterdir():
        if path.name not in wanted:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()


def _up_to_date(directory: Path, raw_manifest: bytes, manifest: dict[str, Any]) -> bool:
    """`directory` already holds exactly this manifest, and every file checks out."""
    local = directory / mf.MANIFEST
    return (
        local.is_file()
        and local.read_bytes() == raw_manifest
        and all(_local_matches(directory / e["name"], e) for e in manifest["files"])
    )


def _link_or_copy(source: Path, target: Path) -> None:
    """Reuse a verified file of the old directory; a hard link costs no copy (snapshot files
    are never written in place, so sharing the inode is safe)."""
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _download(
    client: Any,
    config: Any,
    location: S3Location,
    staging: Path,
    entry: dict[str, Any],
    on_bytes: Callable[[int], Any],
    directory: Path,
) -> None:
    name = entry["name"]
    part = staging / f"{name}.part"
    _call(
        location.url(name),
        client.download_file,
        location.bucket,
        location.key(name),
        str(part),
        Config=config,
        Callback=on_bytes,
    )
    if part.stat().st_size != entry["size"] or mf.sha256_file(part) != entry["sha256"]:
        part.unlink()
        raise SnapshotError(
            f"{location.url(name)}: sha256 after download differs from the manifest"
            f" (object corrupted or replaced); {directory} left as it was"
        )
    os.replace(part, staging / name)


def _local_matches(path: Path, entry: dict[str, Any]) -> bool:
    return (
        path.is_file()
        and path.stat().st_size == entry["size"]
        and mf.sha256_file(path) == entry["sha256"]
    )


def _remote_matches(client: Any, location: S3Location, entry: dict[str, Any]) -> bool:
    from botocore.exceptions import ClientError

    try:
        head = client.head_object(Bucket=location.bucket, Key=location.key(entry["name"]))
    except ClientError:
        return False
    return (
        head.get("ContentLength") == entry["size"]
        and head.get("Metadata", {}).get(SHA256_METADATA) == entry["sha256"]
    )


def _get_bytes(client: Any, location: S3Location, name: str) -> bytes:
    return client.get_object(Bucket=location.bucket, Key=location.key(name))["Body"].read()


def _call(what: str, function: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a boto3 call; its many exception types become one line naming the object."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return function(*args, **kwargs)
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code = error.get("Code", "?")
        if code in ("NoSuchKey", "404", "NotFound"):
            raise SnapshotError(f"{what}: not found") from exc
        raise SnapshotError(f"{what}: {code} {error.get('Message', '')}".rstrip()) from exc
    except (BotoCoreError, Boto3Error) as exc:
        raise SnapshotError(f"{what}: {exc}") from exc


def _client(settings: TransferSettings) -> tuple[Any, Any]:
    import boto3
    from boto3.s3.transfer import TransferConfig
    from botocore.config import Config

    if settings.concurrency < 1 or settings.part_size < 5 * 1024 * 1024:
        # S3 refuses multipart parts under 5 MiB (except the last).
        raise SnapshotError("--concurrency must be >= 1 and --part-size >= 5MiB")
    config = TransferConfig(
        multipart_threshold=settings.part_size,
        multipart_chunksize=settings.part_size,
        max_concurrency=settings.concurrency,
        use_threads=True,
    )
    client = boto3.client("s3", config=Config(max_pool_connections=settings.concurrency))
    return client, config


def _progress(total: int, label: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=label, file=sys.stderr)
