"""The final table of scripts/gpu_check.sh, read from the files a run leaves in its $OUT."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.gpu_models import MODELS

NANO_VLLM_A100_1B_TOK_S = 14_297  # nano-vllm's published Llama-3.2-1B figure on an A100


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def summary_rows(out_dir: Path) -> list[tuple[str, str, str]]:
    """(check, measured, target or anchor) for the final table of scripts/gpu_check.sh."""
    gpu = _read_json(out_dir / "gpu.json")
    load = _read_json(out_dir / "load.json")
    cold = gpu.get("coldstart", {})
    h2d, kernels = gpu.get("h2d", {}), gpu.get("kernels", {})
    graphs, tput = gpu.get("graphs", {}), gpu.get("throughput", {})

    def fmt(value: Any, unit: str = "", digits: int = 3) -> str:
        if isinstance(value, int | float):
            return f"{value:.{digits}g}{unit}"
        return "n/a" if value is None else str(value)

    rows = [("device", str(gpu.get("device", "n/a")), "")]
    tests = (
        (out_dir / "pytest.log").read_text().strip().splitlines()[-1:]
        if (out_dir / "pytest.log").exists()
        else ["n/a"]
    )
    rows.append(("pytest on CUDA (kernels, warmup)", tests[0][-60:], "all pass"))
    rows.append(("pinned H2D", fmt(h2d.get("h2d_pinned_gbps"), " GB/s"), "Gen5 ~50-56 GB/s"))
    rows.append(("device copy (read+write)", fmt(h2d.get("d2d_gbps"), " GB/s"), "~4300 GB/s"))
    rows.append(
        (
            "Triton vs reference, bf16 rel err",
            f"decode {fmt(kernels.get('decode_rel_err'))}, "
            f"prefill {fmt(kernels.get('prefill_rel_err'))}",
            "< 1e-2",
        )
    )
    rows.append(
        (
            "decode kernel, B64 ctx1024",
            fmt(kernels.get("decode_kv_gbps"), " GB/s of KV read"),
            f"copy ceiling {fmt(h2d.get('d2d_gbps'), ' GB/s')}",
        )
    )
    rows.append(
        (
            "prefill kernel, 4x2048 causal",
            fmt(kernels.get("prefill_tflops"), " TFLOP/s"),
            f"SDPA dense {fmt(kernels.get('sdpa_dense_tflops'), ' TFLOP/s')}",
        )
    )
    measured = {**graphs, **tput}
    models = [m for m in MODELS if any(k.startswith(f"{m}_") for k in measured)]
    for model in models or ["smollm2-135m", "llama-1b"]:
        rows.append(
            (
                f"{model} decode b1 eager/graph",
                f"{fmt(graphs.get(f'{model}_b1_eager_ms'), ' ms')} / "
                f"{fmt(graphs.get(f'{model}_b1_graph_ms'), ' ms')} = "
                f"{fmt(graphs.get(f'{model}_b1_graph_speedup'), 'x')}",
                ">= 2x",
            )
        )
        rows.append(
            (
                f"{model} engine decode b1 eager/graph",
                f"{fmt(graphs.get(f'{model}_engine_b1_eager_ms'), ' ms')} / "
                f"{fmt(graphs.get(f'{model}_engine_b1_graph_ms'), ' ms')} = "
                f"{fmt(graphs.get(f'{model}_engine_b1_graph_speedup'), 'x')}",
                ">= 2x",
            )
        )
        anchor = f"nano-vllm A100 1B: {NANO_VLLM_A100_1B_TOK_S}" if model == "llama-1b" else ""
        rows.append(
            (
                f"{model} nano-vllm shape (engine, decode graphs)",
                fmt(tput.get(f"{model}_thaw_nano_tok_s"), " tok/s", 4),
                anchor,
            )
        )
        rows.append(
            (
                f"{model} thaw vs generate_batch",
                f"{fmt(tput.get(f'{model}_thaw_same_tok_s'), '', 4)} vs "
                f"{fmt(tput.get(f'{model}_hf_cb_tok_s'), '', 4)} tok/s = "
                f"{fmt(tput.get(f'{model}_thaw_vs_hf_cb'), 'x')}",
                ">= 10x",
            )
        )
    rows.append(
        (
            "loader vs pinned H2D",
            f"{fmt(load.get('ours_gbps'), ' GB/s')} vs {fmt(load.get('h2d_gbps'), ' GB/s')}",
            ">= 80%",
        )
    )
    rows.append(
        (
            "worker cold start exec->first token",
            f"{fmt(cold.get('first_token_s'), ' s')} (torch {fmt(cold.get('torch_imported_s'))}, "
            f"ready {fmt(cold.get('engine_ready_s'))})",
            "first start, Triton cache as found",
        )
    )
    rows.append(
        (
            "  again, kernels cached",
            f"{fmt(cold.get('cached_kernels_first_token_s'), ' s')} "
            f"(ready {fmt(cold.get('cached_kernels_engine_ready_s'))})",
            "",
        )
    )
    for section, values in gpu.items():
        if isinstance(values, dict) and "error" in values:
            rows.append((f"{section} FAILED", values["error"][:80], ""))
    return rows


def print_summary(out_dir: Path) -> None:
    rows = summary_rows(out_dir)
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    print("\n== GPU check summary ==")
    for check, value, target in rows:
        print(f"{check:<{widths[0]}} | {value:<{widths[1]}} | {target}")
