"""The worker's loader: zero-copy on the CPU, the chunked device path, and clear errors."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from snapshot.device_copy import BASE_ALIGN, plan_copy, stream_into
from snapshot.errors import SnapshotError
from snapshot.loader import load_snapshot, prefetch_into_page_cache, typed_view
from snapshot.tensorfile import read_header
from tests.support.snapshot_fixtures import rewrite_manifest_checksums


def test_cpu_load_equals_safetensors_and_is_zero_copy(tiny_llama_snapshot: Path) -> None:
    loaded = load_snapshot(tiny_llama_snapshot)
    reference = load_file(tiny_llama_snapshot / "model.safetensors")
    assert loaded.weights.keys() == reference.keys()
    for name, tensor in loaded.weights.items():
        assert tensor.dtype == reference[name].dtype and tensor.shape == reference[name].shape
        assert torch.equal(tensor.view(torch.uint8), reference[name].view(torch.uint8)), name
    # All tensors view one mapping of the file: no tensor owns memory of its own.
    pointers = {t.untyped_storage().data_ptr() for t in loaded.weights.values()}
    assert len(pointers) == 1
    assert loaded.config["architectures"] == ["LlamaForCausalLM"]
    assert loaded.generation_config["eos_token_id"] == [2, 3]
    assert loaded.manifest["format_version"] == 1
    assert loaded.timings["total_s"] > 0 and loaded.timings["bytes"] > 0


def test_cpu_copy_owns_its_memory_and_equals_the_map(tiny_llama_snapshot: Path) -> None:
    mapped = load_snapshot(tiny_llama_snapshot)
    copied = load_snapshot(tiny_llama_snapshot, copy=True)
    assert copied.weights.keys() == mapped.weights.keys()
    for name, tensor in copied.weights.items():
        assert torch.equal(tensor, mapped.weights[name]), name
    assert copied.backing[0].numel() >= copied.timings["bytes"]
    assert "stream_s" in copied.timings


def test_writing_a_loaded_tensor_never_touches_the_file(tiny_llama_copy: Path) -> None:
    before = (tiny_llama_copy / "model.safetensors").read_bytes()
    loaded = load_snapshot(tiny_llama_copy)
    loaded.weights["model.norm.weight"].fill_(7)
    del loaded
    assert (tiny_llama_copy / "model.safetensors").read_bytes() == before


def test_loader_never_imports_transformers(tiny_llama_snapshot: Path) -> None:
    code = (
        "import sys; from snapshot.loader import load_snapshot;"
        f"s = load_snapshot({str(tiny_llama_snapshot)!r}); assert s.weights;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in"
        " ('transformers', 'safetensors', 'tokenizers'));"
        "print(bad)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def _raw_file(path: Path, header: bytes, data: bytes = b"", length: int | None = None) -> Path:
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + data)
    return path


def _entry(dtype: str = "F32", shape: list[int] | None = None, offsets: list[int] | None = None):
    return json.dumps(
        {"x": {"dtype": dtype, "shape": shape or [2], "data_offsets": offsets or [0, 8]}}
    ).encode()


@pytest.mark.parametrize(
    ("header", "data", "length", "message"),
    [
        (b"", b"", 10**12, "header length 1000000000000 does not fit"),
        (b"{not json", b"", None, "header is not valid JSON"),
        (b"\xff\xfe", b"", None, "header is not valid JSON"),
        (b"[1]", b"", None, "header is not a JSON object"),
        (_entry(offsets=[0, 8000]), bytes(8), None, "past the 8-byte data section"),
        (_entry(dtype="F33"), bytes(8), None, "unknown dtype 'F33'"),
        (_entry(shape=[3]), bytes(8), None, "8 bytes do not hold shape \\[3\\]"),
        (_entry(offsets=[8, 0]), bytes(8), None, "are not \\[begin, end\\]"),
        (b'{"x": 5}', b"", None, "entry is not a JSON object"),
    ],
)
def test_foreign_or_corrupted_files_raise_snapshot_error(
    tmp_path: Path, header: bytes, data: bytes, length: int | None, message: str
) -> None:
    path = _raw_file(tmp_path / "w.safetensors", header, data, length)
    with pytest.raises(SnapshotError, match=message):
        read_header(path)


def test_short_file(tmp_path: Path) -> None:
    (tmp_path / "w.safetensors").write_bytes(b"abc")
    with pytest.raises(SnapshotError, match="too short"):
        read_header(tmp_path / "w.safetensors")


def test_corrupted_snapshot_fails_to_load_cleanly(tiny_llama_copy: Path) -> None:
    weights = tiny_llama_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    with pytest.raises(SnapshotError, match="model.safetensors: tensor .* past the"):
        load_snapshot(tiny_llama_copy)
    (tiny_llama_copy / "manifest.json").write_text("nope")
    with pytest.raises(SnapshotError, match="manifest.json: not valid JSON"):
        load_snapshot(tiny_llama_copy)


def test_tensor_missing_from_a_file(tiny_llama_copy: Path) -> None:
    tensors = load_file(tiny_llama_copy / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, tiny_llama_copy / "model.safetensors")
    rewrite_manifest_checksums(tiny_llama_copy)
    with pytest.raises(
        SnapshotError, match="model.safetensors: tensor model.norm.weight is missing"
    ):
        load_snapshot(tiny_llama_copy)


@pytest.mark.parametrize(
    "device", ["tpu", "meta", "cuda:99" if not torch.cuda.is_available() else "xla"]
)
def test_unsupported_device(tiny_llama_snapshot: Path, device: str) -> None:
    with pytest.raises(SnapshotError, match="device"):
        load_snapshot(tiny_llama_snapshot, device=device)


def test_plan_covers_every_byte_once(tmp_path: Path) -> None:
    sizes = [10, 0, 3 * 1000 + 7, 1]
    files = []
    for i, size in enumerate(sizes):
        path = _raw_file(tmp_path / f"f{i}", b"{}" + b" " * 6, bytes(size))
        files.append(read_header(path))
    plan = plan_copy(files, chunk_bytes=1000)
    assert all(base % BASE_ALIGN == 0 for base in plan.file_bases)
    for index, (file, base) in enumerate(zip(files, plan.file_bases, strict=True)):
        mine = sorted(
            (c for c in plan.chunks if c.file_index == index), key=lambda c: c.file_offset
        )
        covered = sum(c.length for c in mine)
        assert covered == file.data_bytes
        assert all(0 < c.length <= 1000 for c in mine)
        if mine:
            assert mine[0].file_offset == file.data_start and mine[0].dest_offset == base
        for a, b in zip(mine, mine[1:], strict=False):
            assert b.file_offset == a.file_offset + a.length
            assert b.dest_offset == a.dest_offset + a.length
    assert plan.total_bytes == plan.file_bases[-1] + files[-1].data_bytes
    with pytest.raises(ValueError):
        plan_copy(files, chunk_bytes=0)


@pytest.mark.parametrize(
    ("threads", "ring", "chunk"), [(1, 1, 4096), (4, 2, 1000), (3, 8, 1 << 20)]
)
def test_streaming_into_one_buffer_matches_the_files(
    tiny_llama_snapshot: Path, tmp_path: Path, threads: int, ring: int, chunk: int
) -> None:
    # The CUDA path's reader threads and ring, run with a CPU destination.
    extra = tmp_path / "extra.safetensors"
    save_file({"a": torch.arange(5000, dtype=torch.int16), "b": torch.ones(3, 7)}, extra)
    files = [read_header(tiny_llama_snapshot / "model.safetensors"), read_header(extra)]
    plan = plan_copy(files, chunk_bytes=chunk)
    buffer = torch.full((plan.total_bytes,), 0xAB, dtype=torch.uint8)
    stream_into(files, plan, buffer, threads=threads, ring=ring)
    for file, base in zip(files, plan.file_bases, strict=True):
        expected = load_file(file.path)
        for entry in file.tensors.values():
            got = typed_view(buffer, base, entry, file.path.name)
            assert torch.equal(got, expected[entry.name]), entry.name


def test_streaming_reports_a_file_that_shrank(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(4096)}, path)
    files = [read_header(path)]
    plan = plan_copy(files, chunk_bytes=1024)
    path.write_bytes(path.read_bytes()[:2000])
    buffer = torch.empty(plan.total_bytes, dtype=torch.uint8)
    with pytest.raises(SnapshotError, match="w.safetensors: ends before byte"):
        stream_into(files, plan, buffer, threads=2, ring=2)


def test_misaligned_tensor_is_copied_not_refused(tmp_path: Path) -> None:
    raw = torch.arange(20, dtype=torch.uint8)
    entry = read_header(_raw_file(tmp_path / "w", _entry(offsets=[1, 9]) + b" ", bytes(9))).tensors[
        "x"
    ]
    got = typed_view(raw, 0, entry, "w")
    assert got.dtype == torch.float32 and got.shape == (2,)
    assert torch.equal(got.view(torch.uint8), raw[1:9])


def test_prefetch_reads_every_weight_byte(tiny_llama_snapshot: Path, tmp_path: Path) -> None:
    size = (tiny_llama_snapshot / "model.safetensors").stat().st_size
    assert prefetch_into_page_cache(tiny_llama_snapshot) == size
    assert prefetch_into_page_cache(tiny_llama_snapshot / "model.safetensors") == size
    with pytest.raises(SnapshotError, match="nothing.safetensors: cannot read"):
        prefetch_into_page_cache(tmp_path / "nothing.safetensors")


def test_prefetch_needs_no_torch(tiny_llama_snapshot: Path) -> None:
    code = (
        "import sys; from snapshot.page_cache import prefetch_into_page_cache;"
        f"assert prefetch_into_page_cache({str(tiny_llama_snapshot)!r}) > 0;"
        "print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_config_that_is_not_an_object(tiny_llama_copy: Path) -> None:
    (tiny_llama_copy / "generation_config.json").write_text("[2]")
    with pytest.raises(SnapshotError, match="generation_config.json: not a JSON object"):
        load_snapshot(tiny_llama_copy)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_load_equals_the_cpu_map(tiny_llama_snapshot: Path) -> None:
    on_gpu = load_snapshot(tiny_llama_snapshot, device="cuda")
    on_cpu = load_snapshot(tiny_llama_snapshot)
    storages = {t.untyped_storage().data_ptr() for t in on_gpu.weights.values()}
    assert len(storages) == 1, "every tensor should view the one device buffer"
    for name, tensor in on_gpu.weights.items():
        assert tensor.is_cuda and tensor.dtype == on_cpu.weights[name].dtype
        assert torch.equal(tensor.cpu(), on_cpu.weights[name]), name
