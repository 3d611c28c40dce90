"""``python -m kvhoist.bench.hf_generate``: Hugging Face's Flax ``generate()`` under ``hoist_invariants``.

Issue 20 items 1-3 on code nobody here wrote: every Flax encoder-decoder ``generate()`` of transformers recomputes
each decoder layer's cross-attention K/V from the encoder output on every step of its ``lax.while_loop``, traces
``module.init(jax.random.PRNGKey(0), ...)`` in ``init_cache`` and, for beam search, tiles the encoder output with
``broadcast_to`` + ``reshape``. Models are built from config classes with random weights (no download):

* ``bart-greedy`` / ``bart-beam4``: BART, d_model 512, 6 + 6 layers, 8 heads, FFN 2048 (projections with bias);
* ``t5-beam4``: T5-small-like, d_model 512, d_kv 64, 6 + 6 layers, 8 heads, FFN 2048 (no projection bias);
* ``marian-beam4``: Marian with BART's sizes (sinusoidal positions, scaled embeddings).

A vocabulary of 1024, batch 1, 64 source tokens, ``max_length = min_length = 24`` (every run decodes the same
number of steps: end-of-sequence is masked until the last one). Per case:

* **outputs**: tokens of the hoisted program equal jit's (asserted), beam scores within :mod:`kvhoist.contract`
  (asserted; bitwise equality recorded);
* **first call**: trace + rewrite + lower + compile (``.lower(*args).compile()``) of ``jax.jit`` vs
  ``hoist_invariants``, process CPU seconds, a fresh function and ``jax.clear_caches()`` before each, interleaved;
  the XLA compiles each launches (jax's ``backend_compile_duration`` events: the rewrite should add none) and the
  seconds of XLA's own compile of the program; kvhoist's re-trace and rewrite seconds (its INFO log lines);
* **cache**: the report's ``cache_bytes``, its cross K/V and one untiled copy of every layer's cross K/V; XLA's
  temporaries of both compiled programs;
* **steady state**: one decode (``generate`` call) of jit and hoisted, each compiled with XLA's while-loop LICM on
  (XLA's default, what XLA-CPU does) and off (:func:`kvhoist.bench.decode.compiler_options`; a compiler that does
  not hoist these loops itself), the four interleaved; process CPU medians with min-max.

It needs ``transformers<=4.57.6`` (5.x has no Flax models) and ``flax``; without them it exits with one line. A
benchmark, not a test: nothing here asserts a speed. Output: ``docs/hf_generate_bench.json`` and a markdown table
(docs/benchmarks.md, "Hugging Face Flax generate()").

Example:
    $ python -m venv /tmp/hfvenv && /tmp/hfvenv/bin/pip install "jax==0.10.2" "jaxlib==0.10.2" flax \\
        "transformers==4.57.6" numpy pytest && /tmp/hfvenv/bin/pip install -e . --no-deps
    $ /tmp/hfvenv/bin/python -m kvhoist.bench.hf_generate --out docs/hf_generate_bench.json
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import kvhoist
from kvhoist import contract
from kvhoist.bench.decode import compiler_options
from kvhoist.bench.timing import (checkout_commit, compiled_temp_bytes, first_call_jit_vs_hoisted, fmt_mib, fmt_ms,
                                   iqr_overlap, machine, spread, time_interleaved)

__all__ = ["NEEDS", "Case", "CASES", "build_model", "first_call", "bench_case", "run", "render_markdown", "main"]

#: The one line printed (and exited with) when transformers has no Flax models.
NEEDS = "needs transformers<=4.57.6 with Flax models (and flax): pip install 'transformers==4.57.6' flax"

VOCAB, D_MODEL, LAYERS, HEADS, FFN = 1024, 512, 6, 8, 2048
SRC_LEN, MAX_LENGTH = 64, 24


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmarked ``generate()``: a model family and a beam count (1: greedy search)."""

    name: str
    family: str  # "bart" | "t5" | "marian"
    beams: int


CASES = {c.name: c for c in (Case("bart-greedy", "bart", 1), Case("bart-beam4", "bart", 4),
                             Case("t5-beam4", "t5", 4), Case("marian-beam4", "marian", 4))}


def _transformers():
    """The transformers module if it has Flax encoder-decoders, else ``SystemExit(NEEDS)``."""
    try:
        import transformers
    except Exception as err:  # noqa: BLE001 - not installed, or it does not import here
        raise SystemExit(f"{NEEDS} (transformers does not import: {type(err).__name__})") from None
    try:
        from transformers import FlaxBartForConditionalGeneration  # noqa: F401  (5.x: ImportError)
    except Exception as err:  # noqa: BLE001 - 5.x, or its flax/jax do not import
        raise SystemExit(f"{NEEDS} (found transformers {transformers.__version__}: {type(err).__name__})") from None
    return transformers


def build_model(family: str) -> Any:
    """A random-weight Flax encoder-decoder of ``family`` (``bart``, ``t5``, ``marian``), built from its config."""
    tf = _transformers()
    if family == "bart":
        cfg = tf.BartConfig(vocab_size=VOCAB, d_model=D_MODEL, encoder_layers=LAYERS, decoder_layers=LAYERS,
                            encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=FFN,
                            decoder_ffn_dim=FFN, max_position_embeddings=128, pad_token_id=1, bos_token_id=0,
                            eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None)
        return tf.FlaxBartForConditionalGeneration(cfg, seed=0)
    if family == "t5":
        cfg = tf.T5Config(vocab_size=VOCAB, d_model=D_MODEL, d_kv=D_MODEL // HEADS, d_ff=FFN, num_layers=LAYERS,
                          num_decoder_layers=LAYERS, num_heads=HEADS, pad_token_id=0, eos_token_id=1,
                          decoder_start_token_id=0)
        _clip_keywords(sys.modules[tf.FlaxT5ForConditionalGeneration.__module__])
        return tf.FlaxT5ForConditionalGeneration(cfg, seed=0)
    if family == "marian":
        cfg = tf.MarianConfig(vocab_size=VOCAB, d_model=D_MODEL, encoder_layers=LAYERS, decoder_layers=LAYERS,
                              encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=FFN,
                              decoder_ffn_dim=FFN, max_position_embeddings=128, pad_token_id=VOCAB - 1,
                              eos_token_id=0, decoder_start_token_id=VOCAB - 1, forced_eos_token_id=None)
        return tf.FlaxMarianMTModel(cfg, seed=0)
    raise ValueError(f"unknown model family {family!r}: use bart, t5 or marian")


class _ClipKeywords:
    """``jax.numpy`` whose ``clip`` also takes numpy's old ``a_min`` / ``a_max`` keywords (removed in jax 0.8)."""

    def __getattr__(self, name: str) -> Any:
        return getattr(jnp, name)

    @staticmethod
    def clip(arr: Any, a_min: Any = None, a_max: Any = None, **kw: Any) -> Any:
        return jnp.clip(arr, kw.pop("min", a_min), kw.pop("max", a_max), **kw)


def _clip_keywords(module: Any) -> None:
    """transformers 4.57's Flax T5 calls ``jnp.clip(x, a_max=...)``, a TypeError on this jax: give that module
    (only it) a ``jnp`` accepting the keyword. Same ops, same program: the benchmark measures T5 as written."""
    try:
        jnp.clip(jnp.zeros(1), a_max=0)
    except TypeError:
        module.jnp = _ClipKeywords()


def _generate_fn(model: Any, beams: int) -> Callable:
    """A fresh ``generate(params, ids)`` closure (a new function: nothing cached from an earlier one)."""
    def generate(params, ids):
        out = model.generate(ids, params=params, max_length=MAX_LENGTH, min_length=MAX_LENGTH, num_beams=beams,
                             do_sample=False, early_stopping=False)
        return (out.sequences, out.scores) if beams > 1 else (out.sequences,)
    return generate


def first_call(model: Any, beams: int, args: tuple, repeats: int) -> dict:
    """trace (+ rewrite) + lower + compile of ``generate``, jit vs hoisted (:func:`first_call_jit_vs_hoisted`)."""
    return first_call_jit_vs_hoisted(lambda: _generate_fn(model, beams), args, repeats)


def bench_case(case: Case, *, repeats: int, first_call_repeats: int, log: Callable[[str], None]) -> dict:
    """Every measurement of one case (see the module docstring); raises ``AssertionError`` if tokens differ."""
    model = build_model(case.family)
    cfg = model.config
    ids = jnp.asarray(np.random.default_rng(0).integers(3, VOCAB - 2, (1, SRC_LEN)), jnp.int32)
    args = (model.params, ids)
    fc = first_call(model, case.beams, args, first_call_repeats)
    log(f"[hf] {case.name}: first call jit {fc['jit']['cpu_s']['median']:.2f} s, hoisted "
        f"{fc['hoisted']['cpu_s']['median']:.2f} s (compiles {fc['jit']['compiles']} / {fc['hoisted']['compiles']})")

    fun = _generate_fn(model, case.beams)
    hoisted = kvhoist.hoist_invariants(fun)
    compiled = {}
    for licm in ("on", "off"):
        opts = compiler_options(licm)
        compiled[f"jit/{licm}"] = jax.jit(fun).lower(*args).compile(compiler_options=opts)
        compiled[f"hoisted/{licm}"] = hoisted.lower(*args).compile(compiler_options=opts)
    outs = {k: jax.device_get(c(*args)) for k, c in compiled.items()}
    for licm in ("on", "off"):
        got, want = outs[f"hoisted/{licm}"], outs[f"jit/{licm}"]
        assert np.array_equal(got[0], want[0]), f"{case.name} (XLA LICM {licm}): hoisted tokens differ from jit's"
        assert not contract.violations(got[1:], want[1:]), contract.violations(got[1:], want[1:])
    bitwise = all(np.array_equal(a, b) for licm in ("on", "off")
                  for a, b in zip(outs[f"hoisted/{licm}"], outs[f"jit/{licm}"]))

    report = hoisted.report(*args)
    cross = [h for h in report.hoisted if "encoder_attn" in h.name or "EncDecAttention" in h.name]
    inner = getattr(cfg, "d_kv", D_MODEL // HEADS) * HEADS
    one_copy = 2 * LAYERS * ids.shape[0] * SRC_LEN * inner * 4

    cpu: dict[str, list[float]] = {}
    time_interleaved({k: functools.partial(c, *args) for k, c in compiled.items()}, repeats=repeats, warmup=1,
                     cpu_times=cpu)
    steady = {k: spread(v, 1e3) for k, v in cpu.items()}
    med = {k: v["median"] for k, v in steady.items()}
    row = {
        "case": case.name, "model": type(model).__name__, "beams": case.beams,
        "config": {"d_model": D_MODEL, "layers": f"{LAYERS}+{LAYERS}", "heads": HEADS, "ffn": FFN, "vocab": VOCAB,
                   "batch": int(ids.shape[0]), "src_len": SRC_LEN, "max_length": MAX_LENGTH},
        "tokens_equal": True, "scores_within_contract": True, "bitwise": bool(bitwise),
        "first_call": fc,
        "cache": {"report_bytes": report.cache_bytes, "values": len(report.hoisted),
                  "cross_kv_bytes": sum(h.bytes for h in cross), "cross_kv_values": len(cross),
                  "one_untiled_copy_bytes": one_copy, "copies": sum(h.bytes for h in cross) / one_copy,
                  "skipped": len(report.skipped), "notes": [f"{n.kind}: {n.message}" for n in report.notes]},
        "xla_temp_bytes": {k: compiled_temp_bytes(c) for k, c in compiled.items()},
        "steady_cpu_ms": steady,
        "jit_over_hoisted": {licm: med[f"jit/{licm}"] / med[f"hoisted/{licm}"] for licm in ("on", "off")},
        # Interquartile ranges of jit and hoisted overlap: their ratio is within this machine's noise.
        "within_noise": {licm: iqr_overlap(cpu[f"jit/{licm}"], cpu[f"hoisted/{licm}"]) for licm in ("on", "off")},
        "steady_cpu_ms_samples": {k: [1e3 * x for x in v] for k, v in cpu.items()},
    }
    log(f"[hf] {case.name}: decode CPU ms jit/hoisted LICM on {med['jit/on']:.0f}/{med['hoisted/on']:.0f}, "
        f"off {med['jit/off']:.0f}/{med['hoisted/off']:.0f}; cache {report.cache_bytes} B "
        f"({row['cache']['copies']:.2f} copies of the cross K/V)")
    return row


def run(cases: Sequence[str] = tuple(CASES), *, repeats: int = 7, first_call_repeats: int = 3,
        log: Callable[[str], None] = print) -> dict:
    """Every case; ``{"machine", "transformers", "flax", "rows": [...], "total_s"}``."""
    tf = _transformers()
    import flax

    t0 = time.perf_counter()
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise ValueError(f"unknown case(s) {unknown}: choose from {sorted(CASES)}")
    rows = [bench_case(CASES[c], repeats=repeats, first_call_repeats=first_call_repeats, log=log) for c in cases]
    return {"machine": machine(), "kvhoist_commit": checkout_commit(), "transformers": tf.__version__, "flax": flax.__version__,
            "repeats": repeats, "first_call_repeats": first_call_repeats, "rows": rows,
            "total_s": time.perf_counter() - t0,
            "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(time.time() - (time.perf_counter() - t0)))}


def render_markdown(result: dict) -> str:
    """The two tables of docs/benchmarks.md's section (first call and cache; steady-state decode)."""
    head = ("| case | first call jit (s) | first call hoisted (s) | ratio | XLA compiles jit / hoisted | XLA compile "
            "jit / hoisted (wall s) | kvhoist trace + rewrite (s) | cache MiB (copies of cross K/V) | XLA temp MiB "
            "jit / hoisted |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in result["rows"]:
        fc, c = r["first_call"], r["cache"]
        j, h = fc["jit"], fc["hoisted"]
        lines.append(
            f"| {r['case']} | {j['cpu_s']['median']:.2f} ({j['cpu_s']['min']:.2f}-{j['cpu_s']['max']:.2f}) "
            f"| {h['cpu_s']['median']:.2f} ({h['cpu_s']['min']:.2f}-{h['cpu_s']['max']:.2f}) | {fc['ratio']:.2f} "
            f"| {'/'.join(map(str, j['compiles']))} / {'/'.join(map(str, h['compiles']))} "
            f"| {j['xla_compile_s']['median']:.2f} / {h['xla_compile_s']['median']:.2f} "
            f"| {h['retrace_s']['median']:.2f} + {h['rewrite_s']['median']:.2f} "
            f"| {fmt_mib(c['report_bytes'])} ({c['copies']:.2f}) "
            f"| {fmt_mib(r['xla_temp_bytes']['jit/on'])} / {fmt_mib(r['xla_temp_bytes']['hoisted/on'])} |")
    lines += ["", "| case | XLA LICM | CPU ms jit | CPU ms hoisted | jit/hoisted | IQRs overlap | tokens equal | bitwise |",
              "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        for licm in ("on", "off"):
            s = r["steady_cpu_ms"]
            lines.append(f"| {r['case']} | {licm} | {fmt_ms(s[f'jit/{licm}'])} | {fmt_ms(s[f'hoisted/{licm}'])} "
                         f"| {r['jit_over_hoisted'][licm]:.2f} | {'yes' if r['within_noise'][licm] else 'no'} "
                         f"| {'yes' if r['tokens_equal'] else 'NO'} "
                         f"| {'yes' if r['bitwise'] else 'no'} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: ``python -m kvhoist.bench.hf_generate [--cases ...] [--repeats N] [--out FILE]``."""
    parser = argparse.ArgumentParser(prog="python -m kvhoist.bench.hf_generate", description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--repeats", type=int, default=7, help="timed decodes per variant (default 7)")
    parser.add_argument("--first-call-repeats", type=int, default=3, help="timed first calls per variant")
    parser.add_argument("--out", help="write the JSON here (docs/hf_generate_bench.json)")
    args = parser.parse_args(argv)
    try:
        _transformers()
    except SystemExit as err:
        print(err, file=sys.stderr)
        return 2
    result = run(args.cases, repeats=args.repeats, first_call_repeats=args.first_call_repeats,
                 log=lambda s: print(s, file=sys.stderr, flush=True))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(render_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
