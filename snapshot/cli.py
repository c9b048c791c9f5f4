"""`thaw snapshot build|verify|inspect|push|pull`.

Heavy modules (torch, transformers, boto3) are imported inside the subcommand that needs them.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from snapshot.build import DTYPES, QUANTIZE
from snapshot.errors import SnapshotError
from snapshot.writer import DEFAULT_SHARD_BYTES

SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}


def parse_size(text: str) -> int:
    """'16M', '16MiB', '16MB' or '16777216' -> bytes (binary units, as S3 part sizes are)."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 16M or 8388608")
    return int(match.group(1)) * SIZE_UNITS[match.group(2).upper()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="snapshot_command", metavar="COMMAND")
    sub.required = True

    build = sub.add_parser("build", help="build a snapshot from a model")
    build.add_argument(
        "--from",
        dest="source",
        default="default",
        help="'default' (SmolLM2-135M-Instruct), 'gemma3-270m' (Gemma 3 270M), a Hugging Face "
        "directory or hub cache entry (models--ORG--NAME), or a .gguf file",
    )
    build.add_argument("--out", required=True, type=Path, help="snapshot directory to create")
    build.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    build.add_argument(
        "--shard-size",
        type=parse_size,
        default=DEFAULT_SHARD_BYTES,
        help="largest weight file (default 2G)",
    )
    build.add_argument(
        "--quantize",
        default="auto",
        choices=QUANTIZE,
        help="'source': keep the source's quantized weights (GGUF Q8_0/Q4_0/Q4_1/Q5_0/Q4_K/Q6_K,"
        " AWQ, GPTQ, compressed-tensors, FP8); 'int8'/'int4': round to nearest with group scales;"
        " 'none': all dense in --dtype; 'auto' (default): 'source' for AWQ/GPTQ/compressed-tensors"
        "/FP8 checkpoints, else 'none'",
    )
    build.add_argument("--force", action="store_true", help="replace --out if it exists")

    verify = sub.add_parser("verify", help="check checksums, tensors and tokenizer")
    verify.add_argument("directory", type=Path)

    inspect = sub.add_parser("inspect", help="show what a snapshot holds")
    inspect.add_argument("directory", type=Path)
    inspect.add_argument("--json", action="store_true", help="print one JSON object")

    push = sub.add_parser("push", help="upload a snapshot to S3")
    push.add_argument("directory", type=Path)
    push.add_argument("url", help="s3://bucket/prefix")
    _add_transfer_options(push)

    pull = sub.add_parser("pull", help="download a snapshot from S3, verified, all or nothing")
    pull.add_argument("url", help="s3://bucket/prefix")
    pull.add_argument("directory", type=Path)
    pull.add_argument(
        "--expect-manifest-sha256",
        metavar="SHA256",
        help="refuse the pull unless manifest.json has this sha256 (push prints it)",
    )
    _add_transfer_options(pull)


def _add_transfer_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--concurrency", type=int, default=16, help="parallel requests per file")
    parser.add_argument(
        "--part-size",
        type=parse_size,
        default=16 * 1024**2,
        help="multipart part / ranged GET size (default 16M, at least 5M)",
    )


def run(args: argparse.Namespace) -> int:
    command = {
        "build": _build,
        "verify": _verify,
        "inspect": _inspect,
        "push": _transfer,
        "pull": _transfer,
    }[args.snapshot_command]
    try:
        return command(args)
    except SnapshotError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a full disk or a read-only target, say: still one line
        print(
            f"error: {exc.filename or args.snapshot_command}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return 1


def _build(args: argparse.Namespace) -> int:
    from snapshot.build import BuildRequest, build_snapshot

    request = BuildRequest(
        args.source, args.out, args.dtype, args.shard_size, args.force, args.quantize
    )
    manifest = build_snapshot(request)
    quantized = (
        f", quantized ({manifest['quantization_source']})" if "quantization" in manifest else ""
    )
    print(
        f"built {args.out}: {manifest['architecture']}, {manifest['parameter_count']:,} parameters,"
        f" {manifest['dtype']}{quantized}, {manifest['total_bytes']:,} bytes"
    )
    return 0


def _verify(args: argparse.Namespace) -> int:
    from snapshot.verify import verify_snapshot

    problems = verify_snapshot(args.directory)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        return 1
    print(f"ok: {args.directory}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from snapshot.manifest import load_manifest
    from snapshot.summary import render, summary

    manifest = load_manifest(args.directory)
    print(json.dumps(summary(manifest), indent=2) if args.json else render(manifest))
    return 0


def _transfer(args: argparse.Namespace) -> int:
    from snapshot import s3

    settings = s3.TransferSettings(args.concurrency, args.part_size)
    location = s3.S3Location.parse(args.url)
    if args.snapshot_command == "push":
        report = s3.push(args.directory, location, settings)
    else:
        report = s3.pull(location, args.directory, settings, args.expect_manifest_sha256)
    # The digest to pin with --expect-manifest-sha256 or THAW_SNAPSHOT_SHA256.
    print(f"manifest sha256: {report.manifest_sha256}")
    print(
        f"{args.snapshot_command}: {len(report.transferred)} files"
        f" ({report.bytes_transferred:,} bytes) transferred, {len(report.skipped)} already there"
    )
    return 0
