"""The engine's in-process API: add requests, step, abort, stats."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from handler.attention import create_backend
from handler.attention.registry import (
    GRAPH_SAFE_BACKENDS,
    missing_features,
    resolve_backend_name,
)
from handler.engine.block_manager import BlockManager
from handler.engine.config import DEVICE_AUTO, EngineConfig
from handler.engine.constraint import GrammarMatcher, GrammarTokenizer, MaskTiming
from handler.engine.device_start import DeviceStart, plan_device_start
from handler.engine.faults import FaultInjector
from handler.engine.kv_cache import (
    allocate_kv_caches,
    cache_shape,
    longest_fitting,
    resolve_num_blocks,
)
from handler.engine.params import EngineStats, SamplingParams, TokenOutput
from handler.engine.runner import ModelRunner, profile_step
from handler.engine.sampler import Sampler
from handler.engine.scheduler import Scheduler
from handler.engine.sequence import Sequence
from handler.kernels.cpu import load_cpu_kernels
from handler.model import LlamaModel, MissingWeightError, ModelConfig
from snapshot.quant.format import QuantizedTensor
from warmup.cuda_graphs import CaptureTiming
from warmup.kv_sizing import cuda_free_bytes, measured_headroom
from warmup.warm_start import GpuKind


class LLMEngine:
    def __init__(
        self,
        model_config: ModelConfig,
        weights: dict[str, torch.Tensor | QuantizedTensor],
        eos_token_ids: list[int],
        config: EngineConfig,
        on_phase: Callable[[str], None] | None = None,
        tokenizer_path: str | Path | None = None,
    ) -> None:
        """on_phase(name) is called as start-up phases end: "kv_allocated", then
        "graphs_captured" when decode graphs were captured (docs/protocol.md names).
        tokenizer_path: a tokenizer.json for constrained requests (read on the first one)."""
        self.model_config = model_config
        self.config = config
        self.model_name = ""  # what the snapshot says it was built from (from_snapshot)
        self.eos_token_ids = sorted(set(eos_token_ids))
        self._eos = set(eos_token_ids)
        device = resolve_device(config.device)
        if "model.embed_tokens.weight" not in weights:
            raise MissingWeightError("weight 'model.embed_tokens.weight' is missing")
        embed = weights["model.embed_tokens.weight"]
        # A quantized table has no serving dtype of its own; the final norm always has it.
        dtype = (embed if isinstance(embed, torch.Tensor) else weights["model.norm.weight"]).dtype
        if config.dtype is not None:
            dtype = getattr(torch, config.dtype)
        context = model_config.max_position_embeddings
        if config.max_model_len is not None:
            context = min(context, config.max_model_len)
        kernels = None
        # The fused CPU kernels run the dense families with the attention features their cpu
        # backend has; the others run torch ops (and the attention backend their features need).
        needs = model_config.attention_needs(context)
        fused = model_config.fused_cpu_supported and not missing_features("cpu", needs)
        if device.type == "cpu" and dtype == torch.bfloat16 and config.cpu_kernels and fused:
            kernels = load_cpu_kernels()
        self.attention_backend = resolve_backend_name(
            config.attention_backend, device, config.block_size, kernels is not None, needs
        )
        if self.attention_backend == "cpu" and (device.type != "cpu" or dtype != torch.bfloat16):
            raise ValueError("the cpu attention backend runs bfloat16 on the CPU only")
        model = LlamaModel(
            model_config,
            weights,
            dtype,
            device,
            create_backend(self.attention_backend),
            context,
            pack_weights=config.pack_cpu_weights,
            kernels=kernels,
        )
        layout = model.kv_layout
        chunk = config.max_num_batched_tokens
        # On CUDA without an explicit size: the memory left after the weights, or the warm profile.
        self.device_start: DeviceStart | None = None
        if device.type == "cuda" and config.num_kv_blocks is None and config.kv_cache_bytes is None:
            with torch.inference_mode():
                self.device_start = _plan_device_start(model, config, context)
            self.num_blocks = self.device_start.num_kv_blocks
        else:
            self.num_blocks = resolve_num_blocks(
                model_config,
                config.block_size,
                dtype,
                config.num_kv_blocks,
                config.kv_cache_bytes,
                config.max_num_seqs,
                context,
                layout,
                chunk,
            )
        # One sequence must always fit in the whole cache, or preemption could never end.
        self.max_model_len = longest_fitting(
            layout, self.num_blocks, config.block_size, chunk, context
        )
        kv_caches = allocate_kv_caches(
            model_config, self.num_blocks, config.block_size, dtype, device, layout
        )
        if on_phase is not None:
            on_phase("kv_allocated")
        self.block_manager = BlockManager(
            self.num_blocks,
            config.block_size,
            # LongRoPE KV depends on the prompt's length, not only on the prefix.
            config.enable_prefix_caching and model_config.exact_prefix_caching,
            layout.group_windows,
        )
        self.scheduler = Scheduler(
            self.block_manager, config.max_num_seqs, config.max_num_batched_tokens
        )
        faults = config.fault_injection
        # Only when a fault acts in the step: otherwise the step tests `is None` and no more.
        self.faults = FaultInjector(faults) if faults is not None and faults.in_engine else None
        self.runner = ModelRunner(
            model, kv_caches, config.block_size, Sampler(kernels), self.faults
        )
        self.graph_timings: list[CaptureTiming] = []
        if (
            device.type == "cuda"
            and self.attention_backend in GRAPH_SAFE_BACKENDS
            and model.supports_cuda_graphs
        ):
            self.graph_timings = self._capture_decode_graphs(config.graph_max_batch)
            if self.graph_timings and on_phase is not None:
                on_phase("graphs_captured")
        if self.device_start is not None:
            self.device_start.record(self.graph_timings)
        self.device = device
        self.dtype = dtype
        self._live: dict[int, Sequence] = {}
        self._steps = 0
        self._prompt_tokens_computed = 0
        self._generated_tokens = 0
        self._last_step_tokens = 0
        self._last_step_seqs = 0
        self._weight_backing: list[object] = []
        self.grammar_tokenizer: GrammarTokenizer | None = None
        if tokenizer_path is not None:
            self.grammar_tokenizer = GrammarTokenizer(
                tokenizer_path, model_config.vocab_size, self.eos_token_ids
            )
        self._constrained_tokens = 0

    def _capture_decode_graphs(self, max_batch: int) -> list[CaptureTiming]:
        """Decode graphs up to max_batch (none for 0), at the warm profile's sizes if it has them;
        after the KV cache is allocated, since the graphs address it."""
        if max_batch == 0:
            return []
        plan = self.device_start.plan if self.device_start else None
        with torch.inference_mode():
            return self.runner.capture_decode_graphs(
                max_batch,
                -(-self.max_model_len // self.config.block_size),
                plan.capture_sizes if plan and plan.capture_sizes else None,
            )

    @classmethod
    def from_snapshot(
        cls,
        path: str | Path,
        config: EngineConfig,
        on_phase: Callable[[str], None] | None = None,
    ) -> LLMEngine:
        """The engine of a snapshot directory: the one way the worker and callers build one.
        on_phase also hears "weights_mapped" once the weights are mapped."""
        from snapshot.loader import load_snapshot

        snap = load_snapshot(path, str(resolve_device(config.device)))
        if on_phase is not None:
            on_phase("weights_mapped")
        if config.snapshot_dir is None:
            # The warm profile lives in this snapshot's manifest.
            config = replace(config, snapshot_dir=str(path))
        engine = cls(
            ModelConfig.from_hf_config(snap.config),
            snap.weights,
            eos_token_ids(snap.generation_config, snap.config),
            config,
            on_phase,
            Path(path) / "tokenizer.json",
        )
        engine.model_name = str(
            snap.manifest.get("source") or snap.config.get("_name_or_path") or ""
        )
        # Weights may be views of the snapshot's mapped files: keep the mappings alive.
        engine._weight_backing = snap.backing
        return engine

    def add_request(
        self,
        request_id: int,
        prompt_token_ids: list[int],
        params: SamplingParams,
        fork_of: int | None = None,
    ) -> None:
        """Queue a request; ValueError (engine unchanged) when it cannot be served.

        fork_of: an earlier request with the same prompt; while it is live and in its prefill,
        this one waits, then takes the prompt's blocks from the prefix cache."""
        if request_id in self._live:
            raise ValueError(f"request {request_id} is already running")
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        params.validate(self.model_config.vocab_size)
        self._validate_prompt(prompt_token_ids)
        matcher = None
        if params.constraint is not None:
            if self.grammar_tokenizer is None:
                raise ValueError("constraint: this engine has no tokenizer to run grammars with")
            matcher = GrammarMatcher.build(self.grammar_tokenizer, params.constraint)
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(params.seed)
        seq = Sequence(request_id, prompt_token_ids, params, generator)
        seq.matcher = matcher
        seq.eos_ids = self.eos_token_ids
        seq.end_ids = sorted(self._eos | set(params.stop_token_ids))
        parent = self._live.get(fork_of) if fork_of is not None else None
        if parent is not None and parent.token_ids[: parent.num_prompt_tokens] == list(
            prompt_token_ids
        ):
            seq.fork_parent = parent
        self._live[request_id] = seq
        self.scheduler.add(seq)

    def _validate_prompt(self, prompt: list[int]) -> None:
        if not isinstance(prompt, list | tuple) or not prompt:
            raise ValueError("the prompt must be a non-empty list of token ids")
        if not all(type(t) is int for t in prompt):
            raise ValueError("prompt token ids must be integers")
        vocab = self.model_config.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if len(prompt) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(prompt)} tokens; the context limit is {self.max_model_len} "
                "tokens, prompt and at least one new token included"
            )

    def step(self) -> list[TokenOutput]:
        """Run one scheduler step; one output per request that produced a token or finished.

        A request whose row fails (non-finite logits, a sampler error of its own) ends with
        finish_reason "error" and its error, its blocks freed; the rest of the batch goes on.
        An exception that no single request can be blamed for propagates."""
        with torch.inference_mode():
            batch = self.scheduler.schedule()
            if not batch.items:
                return []
            if self.faults is not None:
                self.faults.on_schedule(batch.items)
            sampled, result = self.runner.run(batch.items)
        self._steps += 1
        self._last_step_tokens = batch.num_tokens
        self._last_step_seqs = len(batch.items)
        for seq, num_new in batch.items:
            if seq.num_computed_tokens < seq.num_prompt_tokens:
                self._prompt_tokens_computed += num_new
            seq.num_computed_tokens += num_new
            self.block_manager.register_full_blocks(seq)
        if result is None:
            return []
        outputs = []
        failed = self._advance_matchers(sampled, result.token_ids, result.failed)
        for row, seq in enumerate(sampled):
            token = result.token_ids[row]
            error = failed.get(row) if failed else None
            if error is not None:
                self._finish(seq, failed=True)
                outputs.append(TokenOutput(seq.request_id, None, None, None, "error", error))
                continue
            seq.token_ids.append(token)
            self._generated_tokens += 1
            finish = self._finish_reason(seq, token)
            if finish is not None:
                self._finish(seq)
            out = TokenOutput(
                seq.request_id, token, result.logprobs[row], result.top_logprobs[row], finish
            )
            if seq.wants_prompt_logprobs:
                out.prompt_logprobs = seq.prompt_logprobs
                seq.prompt_logprobs, seq.prompt_logprobs_done = None, True
            outputs.append(out)
        return outputs

    def _advance_matchers(
        self, sampled: list[Sequence], tokens: list[int], failed: dict[int, str]
    ) -> dict[int, str]:
        """Feed each constrained row's token to its grammar; failed, plus the rows it refused."""
        rows = [
            row for row, seq in enumerate(sampled) if seq.matcher is not None and row not in failed
        ]
        if not rows:
            return failed
        self._constrained_tokens += len(rows)
        pairs = [(sampled[row].matcher, tokens[row]) for row in rows]
        errors = self.runner.masker.consume(pairs)  # type: ignore[arg-type]
        refused = {row: error for row, error in zip(rows, errors, strict=True) if error}
        return {**failed, **refused} if refused else failed

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        params = seq.params
        if token in params.stop_token_ids:
            return "eos_token"
        # Under a grammar EOS is only allowed once the grammar accepts: it always ends.
        if token in self._eos and (not params.ignore_eos or seq.matcher is not None):
            return "eos_token"
        if seq.num_output_tokens >= params.max_new_tokens or len(seq) >= self.max_model_len:
            return "length"
        return None

    def _finish(self, seq: Sequence, failed: bool = False) -> None:
        self.scheduler.remove(seq, failed)
        del self._live[seq.request_id]

    def abort(self, request_id: int) -> TokenOutput | None:
        """Stop a request and free its blocks; None when it is not live."""
        seq = self._live.get(request_id)
        if seq is None:
            return None
        self._finish(seq)
        return TokenOutput(request_id, None, None, None, "cancelled")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def stats(self) -> EngineStats:
        return EngineStats(
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            kv_used_blocks=self.block_manager.num_used_blocks,
            kv_total_blocks=self.num_blocks,
            prefix_hit_tokens=self.block_manager.prefix_hit_tokens,
            preemptions=self.scheduler.num_preemptions,
            steps=self._steps,
            prompt_tokens_computed=self._prompt_tokens_computed,
            generated_tokens=self._generated_tokens,
            last_step_tokens=self._last_step_tokens,
            last_step_seqs=self._last_step_seqs,
            constrained_tokens=self._constrained_tokens,
            mask_seconds=self.runner.masker.compute_seconds,
            mask_wait_seconds=self.runner.masker.wait_seconds,
            grammar_consume_seconds=self.runner.masker.consume_seconds,
        )

    @property
    def mask_timings(self) -> list[MaskTiming]:
        """Per step with constrained rows (the latest steps, bounded): rows masked, seconds the
        mask thread computed, seconds the sampler then waited. compute_s / rows is the mask
        time per constrained token."""
        return list(self.runner.masker.timings)

    def generate(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
    ) -> list[list[int]]:
        """Run the prompts to completion on an idle engine; their generated token ids, in order."""
        if self.has_unfinished():
            raise RuntimeError("generate() needs an idle engine; use add_request/step instead")
        per_prompt = params if isinstance(params, list) else [params] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise ValueError("give one SamplingParams, or one per prompt")
        results: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
        try:
            for i, (prompt, p) in enumerate(zip(prompts, per_prompt, strict=True)):
                self.add_request(i, prompt, p)
            while self.has_unfinished():
                for out in self.step():
                    if out.token_id is not None:
                        results[out.request_id].append(out.token_id)
        finally:
            for i in range(len(prompts)):
                self.abort(i)
        return [results[i] for i in range(len(prompts))]


def resolve_device(name: str) -> torch.device:
    """ "auto" is CUDA when a device is there, else the CPU."""
    if name == DEVICE_AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def eos_token_ids(generation_config: dict[str, Any], model_config: dict[str, Any]) -> list[int]:
    """generation_config.json's eos_token_id (one id or a list), else config.json's."""
    eos = generation_config.get("eos_token_id", model_config.get("eos_token_id"))
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


def _plan_device_start(model: LlamaModel, config: EngineConfig, max_seq_len: int) -> DeviceStart:
    """KV blocks on CUDA: measured (a profiling step at the largest batch, then the free memory)
    or taken from the snapshot's warm profile for this GPU kind."""
    device = model.device

    def largest_step() -> None:
        profile_step(
            model,
            config.block_size,
            config.max_num_batched_tokens,
            config.max_num_seqs,
            max_seq_len,
        )

    return plan_device_start(
        config,
        cache_shape(model.config, config.block_size, model.dtype, model.kv_layout),
        str(model.dtype).removeprefix("torch."),
        GpuKind.of(device),
        lambda: measured_headroom(largest_step, device),
        lambda: cuda_free_bytes(device),
    )
