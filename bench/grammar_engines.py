"""`thaw bench grammar-engines`: llguidance against outlines-core and xgrammar on our
vocabularies, the measurement behind the worker's choice of grammar engine.

For each engine that imports (llguidance always; outlines-core and xgrammar from
requirements/bench-grammar.txt, installed apart) and each tokenizer (SmolLM2's 49k vocabulary,
Gemma 3's 262k):

- setup: what the engine needs once per tokenizer. llguidance reads tokenizer.json itself
  (`LLTokenizer`, what the worker does); outlines-core (`Vocabulary`) and xgrammar
  (`TokenizerInfo`) are given every token's bytes, extracted once beforehand (that extraction
  is timed apart, as `vocab_bytes_s`).
- compile: per schema, from the JSON schema to something that can produce a mask
  (llguidance: the grammar string and an `LLMatcher`; outlines-core: the schema's regex and its
  `Index` over the whole vocabulary; xgrammar: `compile_json_schema`).
- mask per token: walking a valid JSON document of each schema token by token (its canonical
  tokenization under that tokenizer), the time to fill the next-token bitmask before each token,
  p50 and p99 over every step; the first mask of a walk is counted apart (`first_mask_ms`).

Every engine is given compact JSON (no free whitespace): the documents are compact, and all
three then accept the same token sequences. The schemas and documents come from the test corpus
(bench/schema_corpus.py): each document is its `example()`, every property present and
every array full.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.structured import load_corpus

TOKENIZERS = {
    "smollm2": Path(".thaw/snapshots/default"),
    "gemma3": Path(".thaw/snapshots/gemma3-270m-f32"),
}
# Corpus kinds measured: one schema of each.
KINDS = (
    "nested",
    "array_of_objects",
    "patterns",
    "any_of",
    "enums",
    "numbers",
    "string_lengths",
    "free_string",
)
RECORDS = 4  # the largest schema: an array of exactly this many objects of a corpus schema
COMPACT_SEPARATORS = (",", ":")


@dataclass
class Vocab:
    """A tokenizer's tokens as bytes (None for special tokens) and its EOS ids."""

    name: str
    path: Path
    tokens: list[bytes | None]
    eos_ids: list[int]
    extract_s: float


@dataclass
class EngineResult:
    engine: str
    tokenizer: str
    vocab_size: int
    setup_s: float
    vocab_bytes_s: float | None
    compile_ms: dict[str, float] = field(default_factory=dict)
    first_mask_ms: dict[str, float] = field(default_factory=dict)
    mask_us_p50: float = 0.0
    mask_us_p99: float = 0.0
    mask_us_mean: float = 0.0
    steps: int = 0
    error: str | None = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument(
        "--engines", default="llguidance,outlines-core,xgrammar", help="comma-separated"
    )
    parser.add_argument("--tokenizers", default="smollm2,gemma3", help="comma-separated")
    parser.add_argument("--threads", type=int, default=2, help="xgrammar's compile threads")
    parser.add_argument("--repeat", type=int, default=3, help="fastest of N per compile, step")


def run(args: argparse.Namespace) -> int:
    engines = [e for e in args.engines.split(",") if e]
    unknown = set(engines) - set(ENGINES)
    if unknown:
        print(f"error: unknown engines {sorted(unknown)}; known: {sorted(ENGINES)}")
        return 2
    schemas = _schemas()
    documents = _documents(schemas)
    results: list[EngineResult] = []
    for name in [t for t in args.tokenizers.split(",") if t]:
        if name not in TOKENIZERS or not (TOKENIZERS[name] / "tokenizer.json").is_file():
            _log(args, f"skipping {name}: no {TOKENIZERS.get(name)}/tokenizer.json")
            continue
        vocab = _vocab(name, TOKENIZERS[name])
        ids = _tokenize(vocab.path, documents)
        for engine in engines:
            result = _measure(ENGINES[engine], engine, vocab, schemas, ids, args)
            results.append(result)
            _log(args, _describe(result))
    if args.json:
        print(json.dumps({"results": [asdict(r) for r in results]}, indent=2))
    return 0


# --- schemas and documents ---------------------------------------------------------------------


def _schemas() -> dict[str, dict[str, Any]]:
    items = load_corpus(48)
    picked = {kind: next(i for i in items if i.kind == kind) for kind in KINDS}
    schemas = {f"{kind}": item.schema for kind, item in picked.items()}
    records = {
        "type": "object",
        "properties": {
            "records": {
                "type": "array",
                "items": picked["array_of_objects"].schema,
                "minItems": RECORDS,
                "maxItems": RECORDS,
            }
        },
        "required": ["records"],
        "additionalProperties": False,
    }
    schemas[f"records_x{RECORDS}"] = records
    return schemas


def _documents(schemas: dict[str, dict[str, Any]]) -> dict[str, str]:
    """A valid compact document per schema, filling everything the schema allows."""
    from bench.schema_corpus import example

    return {
        name: json.dumps(example(schema), separators=COMPACT_SEPARATORS, ensure_ascii=False)
        for name, schema in schemas.items()
    }


def _tokenize(path: Path, documents: dict[str, str]) -> dict[str, list[int]]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    return {
        name: tokenizer.encode(text, add_special_tokens=False).ids
        for name, text in documents.items()
    }


def _llg_grammar(schema: dict[str, Any]) -> str:
    import llguidance

    return llguidance.LLMatcher.grammar_from_json_schema(
        schema, overrides={"whitespace_flexible": False}
    )


# --- vocabularies --------------------------------------------------------------------------------


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character standing for each byte."""
    visible = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = list(visible)
    extra = 0
    for b in range(256):
        if b not in visible:
            visible.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(visible, chars, strict=True)}


def _vocab(name: str, path: Path) -> Vocab:
    """Every token's bytes from tokenizer.json (byte-level BPE, or sentencepiece-style with
    "▁" for spaces and <0xNN> byte fallback)."""
    start = time.perf_counter()
    data = json.loads((path / "tokenizer.json").read_text())
    model = data["model"]
    size = max(
        [*model["vocab"].values(), *(t["id"] for t in data.get("added_tokens", []))], default=0
    )
    tokens: list[bytes | None] = [None] * (size + 1)
    byte_level = "ByteLevel" in json.dumps(data.get("decoder"))
    decoder = _byte_level_decoder()
    for text, token in model["vocab"].items():
        if byte_level:
            tokens[token] = bytes(decoder[c] for c in text)
        elif len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            tokens[token] = bytes([int(text[3:5], 16)])
        else:
            tokens[token] = text.replace("\u2581", " ").encode()
    for added in data.get("added_tokens", []):
        if added.get("special"):
            tokens[added["id"]] = None
        elif tokens[added["id"]] is None:
            tokens[added["id"]] = added["content"].encode()
    generation = path / "generation_config.json"
    eos = json.loads(generation.read_text()).get("eos_token_id") if generation.is_file() else 0
    eos_ids = eos if isinstance(eos, list) else [eos]
    return Vocab(name, path, tokens, eos_ids, time.perf_counter() - start)


# --- engines -------------------------------------------------------------------------------------


@dataclass
class Walker:
    """One compiled schema: fill(buffer) computes the next mask, advance(token) takes a token,
    done() says the document was accepted."""

    fill: Callable[[], None]
    advance: Callable[[int], bool]
    done: Callable[[], bool]
    buffer: Any  # the mask's memory: the engines write through a raw pointer, so keep it alive


@dataclass
class Engine:
    setup: Callable[[Vocab, argparse.Namespace], Any]
    compile: Callable[[Any, dict[str, Any]], Any]
    walker: Callable[[Any, Any, int], Walker]
    uses_vocab_bytes: bool


def _llg_setup(vocab: Vocab, args: argparse.Namespace) -> Any:
    import llguidance

    return llguidance.LLTokenizer(str(vocab.path / "tokenizer.json"), eos_token=vocab.eos_ids)


def _llg_compile(tokenizer: Any, schema: dict[str, Any]) -> Any:
    import llguidance

    matcher = llguidance.LLMatcher(tokenizer, _llg_grammar(schema), log_level=0)
    if matcher.is_error():
        raise ValueError(matcher.get_error())
    return matcher


def _llg_walker(tokenizer: Any, matcher: Any, vocab_size: int) -> Walker:
    words = -(-tokenizer.vocab_size // 32)
    buffer = np.zeros(words, dtype=np.int32)
    pointer = buffer.ctypes.data
    return Walker(
        fill=lambda: matcher.unsafe_compute_mask_ptr(pointer, words * 4),
        advance=matcher.consume_token,
        done=matcher.is_accepting,
        buffer=buffer,
    )


def _outlines_setup(vocab: Vocab, args: argparse.Namespace) -> Any:
    from outlines_core import Vocabulary

    by_bytes: dict[bytes, list[int]] = {}
    for token, text in enumerate(vocab.tokens):
        if text is not None and token not in vocab.eos_ids:
            by_bytes.setdefault(text, []).append(token)
    return Vocabulary(vocab.eos_ids[0], by_bytes)


def _outlines_compile(vocabulary: Any, schema: dict[str, Any]) -> Any:
    from outlines_core import Index
    from outlines_core.json_schema import build_regex_from_schema

    regex = build_regex_from_schema(json.dumps(schema), whitespace_pattern="")
    return Index(regex, vocabulary)


def _outlines_walker(vocabulary: Any, index: Any, vocab_size: int) -> Walker:
    from outlines_core import Guide

    guide = Guide(index)
    words = -(-vocab_size // 32)
    buffer = np.zeros(words, dtype=np.int32)
    pointer = buffer.ctypes.data

    def advance(token: int) -> bool:
        guide.advance(token, return_tokens=False)
        return True

    return Walker(
        fill=lambda: guide.write_mask_into(pointer, words, 4),
        advance=advance,
        done=guide.is_finished,
        buffer=buffer,
    )


def _xgr_setup(vocab: Vocab, args: argparse.Namespace) -> Any:
    import xgrammar

    # Special tokens get an empty string: never allowed inside JSON.
    encoded = [text if text is not None else b"" for text in vocab.tokens]
    info = xgrammar.TokenizerInfo(encoded, stop_token_ids=vocab.eos_ids)
    return xgrammar.GrammarCompiler(info, max_threads=args.threads, cache_enabled=False)


def _xgr_compile(compiler: Any, schema: dict[str, Any]) -> Any:
    return compiler.compile_json_schema(
        json.dumps(schema), any_whitespace=False, separators=COMPACT_SEPARATORS
    )


def _xgr_walker(compiler: Any, compiled: Any, vocab_size: int) -> Walker:
    import xgrammar

    matcher = xgrammar.GrammarMatcher(compiled)
    bitmask = xgrammar.allocate_token_bitmask(1, vocab_size)
    return Walker(
        fill=lambda: matcher.fill_next_token_bitmask(bitmask),
        advance=matcher.accept_token,
        done=lambda: (
            matcher.accept_token(compiled.tokenizer_info.stop_token_ids[0])
            or matcher.is_terminated()
        ),
        buffer=bitmask,
    )


ENGINES = {
    "llguidance": Engine(_llg_setup, _llg_compile, _llg_walker, uses_vocab_bytes=False),
    "outlines-core": Engine(
        _outlines_setup, _outlines_compile, _outlines_walker, uses_vocab_bytes=True
    ),
    "xgrammar": Engine(_xgr_setup, _xgr_compile, _xgr_walker, uses_vocab_bytes=True),
}


def _measure(
    engine: Engine,
    name: str,
    vocab: Vocab,
    schemas: dict[str, dict[str, Any]],
    ids: dict[str, list[int]],
    args: argparse.Namespace,
) -> EngineResult:
    result = EngineResult(
        name,
        vocab.name,
        len(vocab.tokens),
        0.0,
        round(vocab.extract_s, 3) if engine.uses_vocab_bytes else None,
    )
    try:
        _warm(engine, vocab, args)
        start = time.perf_counter()
        state = engine.setup(vocab, args)
        result.setup_s = round(time.perf_counter() - start, 3)
        per_token: list[float] = []
        for schema_name, schema in schemas.items():
            compiles, walks = [], []
            # The machine is shared: a busy neighbour only ever makes a run slower, so each
            # compile and each step keeps its fastest of --repeat.
            for _ in range(args.repeat):
                start = time.perf_counter()
                compiled = engine.compile(state, schema)
                compiles.append(time.perf_counter() - start)
                walks.append(_walk(engine, state, compiled, vocab, ids[schema_name]))
                if walks[-1] is None:
                    raise RuntimeError(f"{name} refused the {schema_name} document")
            result.compile_ms[schema_name] = round(min(compiles) * 1e3, 2)
            steps = [min(times) for times in zip(*walks, strict=True)]
            result.first_mask_ms[schema_name] = round(steps[0] * 1e3, 3)
            per_token.extend(t * 1e6 for t in steps[1:])
        ordered = sorted(per_token)
        result.steps = len(ordered)
        result.mask_us_p50 = round(statistics.median(ordered), 1)
        result.mask_us_p99 = round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 1)
        result.mask_us_mean = round(statistics.fmean(ordered), 1)
    except ImportError as exc:
        result.error = f"not installed ({exc.name}): pip install -r requirements/bench-grammar.txt"
    except Exception as exc:  # a failing engine is reported, the others still run
        result.error = f"{type(exc).__name__}: {exc}"
    return result


def _walk(
    engine: Engine, state: Any, compiled: Any, vocab: Vocab, ids: list[int]
) -> list[float] | None:
    """Seconds to fill each step's mask along the document; None if the engine refuses it."""
    walker = engine.walker(state, compiled, len(vocab.tokens))
    times = []
    for token in ids:
        start = time.perf_counter()
        walker.fill()
        times.append(time.perf_counter() - start)
        if not walker.advance(token):
            return None
    return times if walker.done() else None


def _warm(engine: Engine, vocab: Vocab, args: argparse.Namespace) -> None:
    """Imports and one-time initialisation out of the timings: the whole path once on a
    vocabulary of single bytes."""
    if not engine.uses_vocab_bytes:
        return  # llguidance reads the tokenizer file itself; its import happened already
    tiny = Vocab("warm", vocab.path, [bytes([b]) for b in range(256)], [0], 0.0)
    state = engine.setup(tiny, args)
    compiled = engine.compile(state, {"type": "object"})
    engine.walker(state, compiled, len(tiny.tokens)).fill()


def _log(args: argparse.Namespace, line: str) -> None:
    if not args.json:
        print(line, flush=True)


def _describe(r: EngineResult) -> str:
    head = f"{r.engine:>13} {r.tokenizer:>7} ({r.vocab_size} tokens)"
    if r.error is not None:
        return f"{head}: {r.error}"
    compile_ms = ", ".join(f"{k} {v}" for k, v in r.compile_ms.items())
    extract = "" if r.vocab_bytes_s is None else f" (+{r.vocab_bytes_s}s token bytes)"
    return (
        f"{head}: setup {r.setup_s}s{extract} | mask per token p50 {r.mask_us_p50} us, "
        f"p99 {r.mask_us_p99} us, mean {r.mask_us_mean} us over {r.steps} steps | "
        f"first mask ms {max(r.first_mask_ms.values(), default=0)} max | compile ms: {compile_ms}"
    )
