"""Grammar libraries for constrained decoding, measured on this CPU: xgrammar, llguidance,
outlines-core.

For each library, on the bundled SmolLM2 tokenizer (49k tokens):

* compile time of a 20-property JSON schema, first (fresh compiler) and cached (the same
  schema again through the same compiler / cache);
* per-token cost of computing the allowed-token mask (and advancing the matcher) while
  walking a valid instance of that schema token by token, the work a constrained decode
  adds to every step;
* schema coverage: which of a list of JSON Schema keywords compile (an error, or a
  keyword the library silently ignores, counts as unsupported where it can be told).

Run (a benchmark: under the shared lock on a shared machine)::

    flock /tmp/troupe-ray.lock python -m bench.grammar_bench

Writes ``bench/results/<UTC>-grammar.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"


def schema_20() -> dict:
    """A 20-property object schema of mixed types (the issue's compile-time yardstick)."""
    kinds = [
        {"type": "string"}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"},
        {"type": "string", "enum": ["red", "green", "blue"]},
        {"type": "array", "items": {"type": "string"}, "maxItems": 4},
        {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
         "required": ["x", "y"], "additionalProperties": False},
    ]
    props = {f"field_{i:02d}": kinds[i % len(kinds)] for i in range(20)}
    return {"type": "object", "properties": props, "required": sorted(props),
            "additionalProperties": False}


def instance_20() -> dict:
    """A valid instance of :func:`schema_20`."""
    values = ["hello world", 42, 3.5, True, "green", ["a", "bc"], {"x": 1, "y": -2}]
    return {f"field_{i:02d}": values[i % len(values)] for i in range(20)}


#: keyword -> a schema using it (each should compile in a library that supports it).
COVERAGE: dict[str, dict] = {
    "$ref/$defs": {"type": "object", "$defs": {"P": {"type": "object", "properties": {
        "n": {"type": "string"}}, "required": ["n"]}}, "properties": {"p": {"$ref": "#/$defs/P"}},
        "required": ["p"]},
    "recursive $ref": {"$defs": {"N": {"type": "object", "properties": {"kids": {
        "type": "array", "items": {"$ref": "#/$defs/N"}}}}}, "$ref": "#/$defs/N"},
    "anyOf": {"type": "object", "properties": {"v": {"anyOf": [{"type": "string"},
        {"type": "integer"}]}}, "required": ["v"]},
    "oneOf": {"type": "object", "properties": {"v": {"oneOf": [{"type": "string"},
        {"type": "null"}]}}, "required": ["v"]},
    "allOf": {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}},
        {"required": ["a"]}]},
    "enum": {"type": "string", "enum": ["a", "b", "c"]},
    "const": {"type": "object", "properties": {"k": {"const": "fixed"}}, "required": ["k"]},
    "pattern": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
    "format: date-time": {"type": "string", "format": "date-time"},
    "minLength/maxLength": {"type": "string", "minLength": 2, "maxLength": 5},
    "minimum/maximum": {"type": "integer", "minimum": 1, "maximum": 10},
    "exclusiveMinimum": {"type": "number", "exclusiveMinimum": 0},
    "minItems/maxItems": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3},
    "prefixItems": {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}],
        "items": False},
    "uniqueItems": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
    "additionalProperties schema": {"type": "object", "additionalProperties": {"type": "integer"}},
    "type list": {"type": ["string", "null"]},
    "nullable optional props": {"type": "object", "properties": {"a": {"type": "string"},
        "b": {"type": ["integer", "null"]}}, "required": ["a"]},
    "multipleOf": {"type": "integer", "multipleOf": 5},
    "patternProperties": {"type": "object", "patternProperties": {"^x_": {"type": "integer"}}},
}


#: keyword -> an instance that breaks it: a library that lets every token of it through
#: compiled the keyword but does not enforce it.
VIOLATIONS: dict[str, Any] = {
    "allOf": {},
    "pattern": "abc",
    "format: date-time": "yesterday",
    "minLength/maxLength": "toolong",
    "minimum/maximum": 11,
    "minItems/maxItems": [1],
    "uniqueItems": [1, 1],
    "multipleOf": 7,
    "const": {"k": "other"},
    "prefixItems": [1, "a"],
}


def load_tokenizer() -> Any:
    """The bundled SmolLM2 tokenizer from the local conversion cache."""
    from transformers import AutoTokenizer

    from deployments.engines.gguf_cache import resolve_model_dir
    from serve_app.settings import TransformersEngineConfig

    folder = resolve_model_dir(TransformersEngineConfig())
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


class XGrammarLib:
    """xgrammar: token bitmask from a compiled grammar (vLLM's default backend)."""

    name = "xgrammar"

    def __init__(self, tokenizer: Any) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer))
        self.compiler = self.new_compiler()

    def new_compiler(self) -> Any:
        return self.xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=True)

    def compile(self, compiler: Any, schema: dict) -> Any:
        return compiler.compile_json_schema(
            json.dumps(schema), any_whitespace=False, separators=(",", ":"), strict_mode=True
        )

    def walker(self, compiled: Any) -> Callable[[torch.Tensor, int], None]:
        xgr = self.xgr
        matcher = xgr.GrammarMatcher(compiled)
        mask = xgr.allocate_token_bitmask(1, self.info.vocab_size)

        def step(logits: torch.Tensor, token: int) -> None:
            matcher.fill_next_token_bitmask(mask)
            apply_bitmask(logits, mask)
            if not matcher.accept_token(token):
                raise ValueError(f"token {token} rejected")

        return step


class LLGuidanceLib:
    """llguidance: Earley parser with a lexer over the token trie (Guidance, vLLM's guidance backend)."""

    name = "llguidance"

    def __init__(self, tokenizer: Any) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.llg = llguidance
        self.tok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=len(tokenizer))

    def new_compiler(self) -> Any:
        return {}  # llguidance compiles lazily per matcher; a dict stands in for a cache

    def compile(self, compiler: dict, schema: dict) -> Any:
        key = json.dumps(schema, sort_keys=True)
        if key in compiler:
            return compiler[key].deep_copy()
        grammar = self.llg.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False}
        )
        matcher = self.llg.LLMatcher(self.tok, grammar)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        compiler[key] = matcher
        return matcher.deep_copy()

    def walker(self, matcher: Any) -> Callable[[torch.Tensor, int], None]:
        import llguidance.torch as llt

        mask = llt.allocate_token_bitmask(1, self.tok.vocab_size)

        def step(logits: torch.Tensor, token: int) -> None:
            llt.fill_next_token_bitmask(matcher, mask, 0)
            apply_bitmask(logits, mask)
            if not matcher.consume_token(token):
                raise ValueError(f"token {token} rejected: {matcher.get_error()}")

        return step


class OutlinesCoreLib:
    """outlines-core: JSON schema -> regex -> token-level DFA index (Outlines)."""

    name = "outlines-core"

    def __init__(self, tokenizer: Any) -> None:
        import outlines_core

        self.oc = outlines_core
        byte_decoder = _byte_decoder()
        eos = tokenizer.eos_token_id
        entries: dict[bytes, list[int]] = {}
        for token, tid in tokenizer.get_vocab().items():
            if tid == eos or token in tokenizer.all_special_tokens:
                continue
            raw = bytes(byte_decoder[c] for c in token if c in byte_decoder)
            entries.setdefault(raw, []).append(tid)
        self.vocab = outlines_core.Vocabulary(eos, entries)
        self.size = len(tokenizer)

    def new_compiler(self) -> Any:
        return {}

    def compile(self, compiler: dict, schema: dict) -> Any:
        key = json.dumps(schema, sort_keys=True)
        if key not in compiler:
            regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema))
            compiler[key] = self.oc.Index(regex, self.vocab)
        return compiler[key]

    def walker(self, index: Any) -> Callable[[torch.Tensor, int], None]:
        guide = self.oc.Guide(index)
        mask = torch.zeros((1, (self.size + 31) // 32), dtype=torch.int32)

        def step(logits: torch.Tensor, token: int) -> None:
            guide.write_mask_into(mask.data_ptr(), mask.numel(), mask.element_size())
            apply_bitmask(logits, mask)
            if not (int(mask[0, token // 32]) >> (token % 32)) & 1:
                raise ValueError(f"token {token} rejected")
            guide.advance(token)

        return step


def apply_bitmask(logits: torch.Tensor, mask: torch.Tensor) -> None:
    """The same bitmask -> -inf step for every library (their own helpers differ in cost)."""
    allowed = np.unpackbits(mask.numpy().view(np.uint8), bitorder="little")[: logits.shape[1]]
    logits[0, torch.from_numpy(allowed == 0)] = float("-inf")


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, reversed (token characters -> bytes)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {v: k for k, v in bytes_to_unicode().items()}


def measure(lib: Any, tokenizer: Any, repeats: int) -> dict:
    """Compile times, per-token mask cost and coverage of one library."""
    schema = schema_20()
    first = []
    for _ in range(repeats):
        compiler = lib.new_compiler()
        started = time.perf_counter()
        lib.compile(compiler, schema)
        first.append(time.perf_counter() - started)
    cached = []
    for _ in range(repeats * 5):
        started = time.perf_counter()
        compiled = lib.compile(compiler, schema)
        cached.append(time.perf_counter() - started)
    tokens = tokenizer.encode(json.dumps(instance_20(), separators=(",", ":")), add_special_tokens=False)
    per_token = []
    for _ in range(repeats):
        step = lib.walker(lib.compile(compiler, schema))
        logits = torch.zeros((1, len(tokenizer)))
        started = time.perf_counter()
        for token in tokens:
            step(logits, token)
        per_token.append((time.perf_counter() - started) / len(tokens))
    coverage = {keyword: check_keyword(lib, tokenizer, keyword, case) for keyword, case in COVERAGE.items()}
    return {
        "compile_first_ms": statistics.median(first) * 1e3,
        "compile_cached_ms": statistics.median(cached) * 1e3,
        "mask_per_token_us": statistics.median(per_token) * 1e6,
        "tokens_walked": len(tokens),
        "coverage": coverage,
        "coverage_ok": sum(v == "ok" for v in coverage.values()),
    }


def check_keyword(lib: Any, tokenizer: Any, keyword: str, case: dict) -> str:
    """ok / the library's error / "NOT enforced" (compiled, yet let a violation through)."""
    try:
        compiled = lib.compile(lib.new_compiler(), case)
    except Exception as exc:  # the library's own error: record it
        return f"error: {str(exc).splitlines()[0][:120]}"
    if keyword not in VIOLATIONS:
        return "ok"
    text = json.dumps(VIOLATIONS[keyword], separators=(",", ":"))
    step = lib.walker(compiled)
    try:
        # The value, then EOS: a prefix of a valid value (7 of 70) must not end there.
        for token in tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]:
            step(torch.zeros((1, len(tokenizer))), token)
    except Exception:  # a token of the violation was refused: enforced
        return "ok"
    return f"compiles, NOT enforced ({text} accepted)"


def main() -> None:
    """Measure every installed library and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer = load_tokenizer()
    results: dict[str, Any] = {}
    for cls in (XGrammarLib, LLGuidanceLib, OutlinesCoreLib):
        try:
            results[cls.name] = measure(cls(tokenizer), tokenizer, args.repeats)
        except Exception as exc:  # a library that cannot even start is a result too
            results[cls.name] = {"error": repr(exc)}
        print(cls.name, json.dumps(results[cls.name], indent=1))
    if not args.no_write:
        write(results)


def write(results: dict) -> None:
    """The JSON and a markdown table under bench/results/."""
    import importlib.metadata as md

    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    versions = {}
    for dist in ("xgrammar", "llguidance", "outlines-core"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = None
    env = {"python": platform.python_version(), "cpus": os.cpu_count(), "versions": versions,
           "load_avg": os.getloadavg()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stamp}-grammar.json").write_text(json.dumps({"env": env, "results": results}, indent=1))
    names = list(results)
    lines = [f"# Grammar libraries on CPU — {stamp}", "", f"env: {json.dumps(env)}", "",
             "SmolLM2 tokenizer (49152 tokens), one thread. Medians.", "",
             "| measure | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for key in ("compile_first_ms", "compile_cached_ms", "mask_per_token_us", "coverage_ok"):
        row = [f"{results[n].get(key, float('nan')):.3g}" if key in results[n] else "n/a" for n in names]
        lines.append(f"| {key} | " + " | ".join(row) + " |")
    lines += ["", "| keyword | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for keyword in COVERAGE:
        row = [results[n].get("coverage", {}).get(keyword, "n/a").replace("|", "/") for n in names]
        lines.append(f"| {keyword} | " + " | ".join(row) + " |")
    (RESULTS / f"{stamp}-grammar.md").write_text("\n".join(lines) + "\n")
    print("wrote", RESULTS / f"{stamp}-grammar.md")


if __name__ == "__main__":
    main()
