"""``python -m kvhoist.bench.decode``: encoder-decoder decoding, plain jit vs hoisted vs a hand-written cross K/V cache.

The model is :mod:`kvhoist.tools.examples.encdec` (T5/Whisper-like). For each encoder length (128 .. 1024), beam count
(1 = greedy decoding, 4 = beam search with the encoder output tiled across beams) and decoder layer form
(unrolled, or a ``lax.scan`` over stacked layers), three variants run interleaved in one process:

* ``plain``: ``jax.jit(decode)`` - whatever XLA hoists on its own;
* ``hoisted``: ``kvhoist.hoist_invariants(decode)``;
* ``hand``: ``decode(..., hand_cache=True)``, every layer's cross K/V computed once before the loop from the
  untiled encoder output.

Reported per row: process CPU time medians with (min-max), wall medians, ratios; bytes cached across the loop
(hoisted: the report's cross K/V and all hoisted values; hand: its K/V pytree); and, from each variant's compiled
HLO, the matmuls left in the decoding ``while`` body: when plain has no more than hand, XLA-CPU's own
WhileLoopInvariantCodeMotion already took the cross K/V projections out. Tokens and scores are checked: hoisted
must equal plain exactly; hand may differ in the last float bits.

Benchmarks are measurements, not tests. The machine is shared: CPU time is the steadier measure.

Example:
    $ python -m kvhoist.bench.decode                      # writes docs/decode_bench.json, prints the table
    $ python -m kvhoist.bench.decode --quick --out /tmp/d.json   # tiny sizes, a smoke test of the script
    $ python -m kvhoist.bench.decode --enc-lens 512 --xla-licm off  # one length, XLA's while-loop LICM off
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import statistics
import sys
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

import kvhoist
from kvhoist import contract
from kvhoist.bench.timing import machine, time_interleaved
from kvhoist.hlo import MATMUL_PATTERNS, hlo_loop_op_counts
from kvhoist.tools.examples import encdec as E

__all__ = ["CONFIG", "run", "render_markdown", "decode_loop_matmuls", "main"]

#: The benchmark model: D=256, 4 heads, 2 encoder and 4 decoder layers, 32 decoding steps, vocabulary 512.
CONFIG = E.EncDecConfig(vocab=512, d_model=256, heads=4, mlp=1024, enc_layers=2, dec_layers=4, max_decode_len=32)
QUICK_CONFIG = E.EncDecConfig(vocab=64, d_model=64, heads=2, mlp=128, enc_layers=1, dec_layers=2, max_decode_len=8)
ENC_LENS = (128, 256, 512, 1024)
BEAMS = (1, 4)
FORMS = ("unrolled", "scan")
BATCH = 1
VARIANTS = ("plain", "hoisted", "hand")


# ------------------------------------------------------------------------------------------------------
# HLO: matmuls in the decoding loop
# ------------------------------------------------------------------------------------------------------


def decode_loop_matmuls(hlo: str) -> dict:
    """Matmuls (``dot`` and cuBLAS calls) inside the outermost ``while`` loops XLA gave no trip count.

    The decoding loop stops on a data-dependent condition, so XLA knows no trip count for it; a layer ``scan`` or
    kvhoist's fission scan in front of it has one and is not counted. Everything reachable from a counted body
    counts (nested layer scans, fusions), once per call site.

    Returns:
      ``{"dots": count, "bytes": bytes of their results (per iteration), "loops": loops counted}``.
    """
    counts = hlo_loop_op_counts(hlo, MATMUL_PATTERNS, data_dependent_only=True)
    return {"dots": sum(counts[k] for k in MATMUL_PATTERNS), "bytes": sum(counts["bytes"].values()),
            "loops": counts["loops"]}


# ------------------------------------------------------------------------------------------------------
# One row
# ------------------------------------------------------------------------------------------------------


def _decoder(cfg: E.EncDecConfig, beams: int, hand_cache: bool, tiling: str = "broadcast") -> Callable:
    if beams == 1:
        def decode(params, src):
            return E.greedy_decode(params, src, cfg=cfg, hand_cache=hand_cache)
    else:
        def decode(params, src):
            return E.beam_search(params, src, cfg=cfg, beam_size=beams, hand_cache=hand_cache, tiling=tiling)
    return decode


def _tree_bytes(tree: Any) -> int:
    return int(sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree)))


def _stats(xs: list[float]) -> dict:
    return {"median_ms": 1e3 * statistics.median(xs), "min_ms": 1e3 * min(xs), "max_ms": 1e3 * max(xs)}


#: XLA's own while-loop LICM pass; ``xla_licm="off"`` compiles without it (what XLA does not hoist on GPU, where
#: the pass is not run on loops like these, or with a different cost model).
XLA_LICM_PASS = "while-loop-invariant-code-motion"


def compiler_options(xla_licm: str) -> dict | None:
    """``compile(compiler_options=...)`` for XLA's while-loop LICM ``"on"`` (XLA's default) or ``"off"``."""
    if xla_licm not in ("on", "off"):
        raise ValueError(f"xla_licm must be 'on' or 'off', got {xla_licm!r}")
    return None if xla_licm == "on" else {"xla_disable_hlo_passes": XLA_LICM_PASS}


def bench_row(cfg: E.EncDecConfig, params: dict, form: str, enc_len: int, beams: int, *, repeats: int,
              log: Callable[[str], None], xla_licm: str = "on", tiling: str = "broadcast") -> dict:
    """Compile the three variants once each (XLA's while-loop LICM on or off), check their outputs, time them
    interleaved."""
    src = jax.random.randint(jax.random.key(enc_len), (BATCH, enc_len), 2, cfg.vocab)
    args = (params, src)
    decode, decode_hand = _decoder(cfg, beams, False, tiling), _decoder(cfg, beams, True, tiling)
    hoisted = kvhoist.hoist_invariants(decode)
    t0 = time.perf_counter()
    opts = compiler_options(xla_licm)
    compiled = {"plain": jax.jit(decode).lower(*args).compile(compiler_options=opts),
                "hoisted": hoisted.lower(*args).compile(compiler_options=opts),
                "hand": jax.jit(decode_hand).lower(*args).compile(compiler_options=opts)}
    compile_s = time.perf_counter() - t0
    report = hoisted.report(*args)
    cross = [h for h in report.hoisted if "cross_attn/" in h.name]
    hand_bytes = _tree_bytes(jax.eval_shape(lambda p, s: E.cross_kv(p, E.encode(p, s, cfg), cfg), *args))

    outs = {k: jax.device_get(c(*args)) for k, c in compiled.items()}
    (tok_p, sc_p), (tok_h, sc_h), (tok_c, sc_c) = (outs[k] for k in VARIANTS)

    cpu: dict[str, list[float]] = {}
    wall = time_interleaved({k: functools.partial(c, *args) for k, c in compiled.items()}, repeats=repeats,
                            warmup=1, cpu_times=cpu)
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    row = {
        "form": form, "enc_len": enc_len, "beams": beams, "decoder": "greedy" if beams == 1 else "beam search",
        "xla_licm": xla_licm, "tiling": tiling, "proj_bias": cfg.proj_bias,
        "cpu": {k: _stats(v) for k, v in cpu.items()}, "wall": {k: _stats(v) for k, v in wall.items()},
        "plain_over_hoisted_cpu": med_cpu["plain"] / med_cpu["hoisted"],
        "hoisted_over_hand_cpu": med_cpu["hoisted"] / med_cpu["hand"],
        "plain_over_hand_cpu": med_cpu["plain"] / med_cpu["hand"],
        "cache_bytes": {"hoisted_cross_kv": sum(h.bytes for h in cross), "hoisted_total": report.cache_bytes,
                        "hand": hand_bytes, "one_untiled_copy": 2 * cfg.dec_layers * BATCH * enc_len * cfg.d_model * 4},
        "hoisted_cross_kv_values": len(cross),
        "loop_matmuls": {k: decode_loop_matmuls(c.as_text()) for k, c in compiled.items()},
        # The numerical contract (kvhoist.contract): equal tokens, scores within the float32 bound.
        "tokens_identical": {"hoisted": bool(np.array_equal(tok_h, tok_p) and not contract.violations(sc_h, sc_p)),
                             "hoisted_bitwise": bool(np.array_equal(tok_h, tok_p) and np.array_equal(sc_h, sc_p)),
                             "hand_tokens": bool(np.array_equal(tok_c, tok_p))},
        "max_abs_score_diff_hand": float(np.max(np.abs(np.asarray(sc_c, np.float64) - sc_p))),
        "compile_s_all_three": compile_s,
    }
    mm = row["loop_matmuls"]
    row["xla_hoisted_cross_kv_itself"] = mm["plain"]["dots"] <= mm["hand"]["dots"]
    log(f"[decode] {form:8s} enc {enc_len:5d} beams {beams} XLA LICM {xla_licm:3s}: CPU ms plain/hoisted/hand "
        + " / ".join(f"{1e3 * med_cpu[k]:.0f}" for k in VARIANTS)
        + f"; loop dots {mm['plain']['dots']}/{mm['hoisted']['dots']}/{mm['hand']['dots']}; compile {compile_s:.0f}s")
    return row


def run(*, quick: bool = False, repeats: int = 5, enc_lens: Sequence[int] | None = None, note: str = "",
        xla_licm: Sequence[str] = ("on", "off"), beams: Sequence[int] = BEAMS, forms: Sequence[str] = FORMS,
        tiling: str = "broadcast", proj_bias: bool = False,
        log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> dict:
    """Every (layer form, encoder length, beam count, XLA LICM setting) row; ``tiling`` and ``proj_bias`` select
    the beam expansion (``"broadcast"`` or Flax's ``"tile"``) and BART-style projection biases."""
    cfg = dataclasses.replace(QUICK_CONFIG if quick else CONFIG, proj_bias=proj_bias)
    enc_lens = tuple(enc_lens or ((16, 32) if quick else ENC_LENS))
    t0 = time.perf_counter()
    data: dict = {"machine": machine(), "config": dataclasses.asdict(cfg), "batch": BATCH, "repeats": repeats,
                  "warmup": 1, "note": note, "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": [],
                  "tiling": tiling}
    for form in forms:
        params = E.init_params(jax.random.key(0), cfg, scan_layers=form == "scan")
        for enc_len in enc_lens:
            for k in beams:
                for licm in xla_licm:
                    data["rows"].append(bench_row(cfg, params, form, enc_len, k, repeats=repeats, log=log,
                                                  xla_licm=licm, tiling=tiling))
    data["total_s"] = time.perf_counter() - t0
    data["machine"]["loadavg_end"] = list(os.getloadavg())
    return data


# ------------------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------------------


def _mib(b: int) -> str:
    return f"{b / 2 ** 20:.2f}"


def render_markdown(data: dict) -> str:
    cfg = data["config"]
    head = (f"Model: D={cfg['d_model']}, {cfg['heads']} heads, {cfg['enc_layers']} encoder + {cfg['dec_layers']} "
            f"decoder layers, MLP {cfg['mlp']}, vocabulary {cfg['vocab']}, up to {cfg['max_decode_len']} decoding "
            f"steps, batch {data['batch']}; f32. {data['repeats']} timed repeats after 1 warm-up, variants "
            f"interleaved. Machine: {data['machine']['cpu_count']} CPUs, jax {data['machine']['jax']}, load "
            f"average {data['machine']['loadavg_start'][0]:.1f} at start, "
            f"{data['machine'].get('loadavg_end', [float('nan')])[0]:.1f} at end; total {data['total_s']:.0f} s; "
            f"started {data['started']}. Beam expansion: {data.get('tiling', 'broadcast')}; projection biases: "
            f"{'yes' if cfg.get('proj_bias') else 'no'}." + (f" {data['note']}" if data.get("note") else ""))
    rows = ["| layers | enc len | beams | XLA LICM | CPU ms plain | CPU ms hoisted | CPU ms hand | plain/hoisted | hoisted/hand "
            "| cache MiB hoisted K/V (all) | cache MiB hand | loop dots plain / hoisted / hand | XLA hoisted K/V itself "
            "| hoisted == plain |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def ms(r: dict, k: str) -> str:
        c = r["cpu"][k]
        return f"{c['median_ms']:.0f} ({c['min_ms']:.0f}-{c['max_ms']:.0f})"

    for r in data["rows"]:
        cb, mm = r["cache_bytes"], r["loop_matmuls"]
        rows.append(
            f"| {r['form']} | {r['enc_len']} | {r['beams']}{' (greedy)' if r['beams'] == 1 else ''} "
            f"| {r.get('xla_licm', 'on')} | {ms(r, 'plain')} "
            f"| {ms(r, 'hoisted')} | {ms(r, 'hand')} | {r['plain_over_hoisted_cpu']:.2f} | {r['hoisted_over_hand_cpu']:.2f} "
            f"| {_mib(cb['hoisted_cross_kv'])} ({_mib(cb['hoisted_total'])}) | {_mib(cb['hand'])} "
            f"| {mm['plain']['dots']} / {mm['hoisted']['dots']} / {mm['hand']['dots']} "
            f"| {'yes' if r['xla_hoisted_cross_kv_itself'] else 'no'} "
            f"| {'yes' if r['tokens_identical']['hoisted'] else '**no**'} |")
    return head + "\n\n" + "\n".join(rows) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvhoist.bench.decode", description=__doc__.split("\n\n")[0],
                                     allow_abbrev=False)
    parser.add_argument("--out", default="docs/decode_bench.json", help="JSON output (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--enc-lens", type=int, nargs="*", default=None)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of the script")
    parser.add_argument("--note", default="", help="free text stored in the JSON and shown in the header "
                        "(e.g. the kvhoist commit measured)")
    parser.add_argument("--xla-licm", nargs="+", choices=("on", "off"), default=["on", "off"],
                        help="XLA's while-loop LICM pass on, off or both (default: both)")
    parser.add_argument("--beams", type=int, nargs="+", default=list(BEAMS), help="beam counts (1 = greedy)")
    parser.add_argument("--forms", nargs="+", choices=FORMS, default=list(FORMS), help="decoder layer forms")
    parser.add_argument("--tiling", choices=("broadcast", "tile"), default="broadcast",
                        help="beam expansion of the encoder output: broadcast_to+reshape or Flax's jnp.tile")
    parser.add_argument("--proj-bias", action="store_true", help="attention projections with biases (BART)")
    args = parser.parse_args(argv)
    data = run(quick=args.quick, repeats=args.repeats, enc_lens=args.enc_lens, note=args.note,
               xla_licm=tuple(args.xla_licm), beams=tuple(args.beams), forms=tuple(args.forms),
               tiling=args.tiling, proj_bias=args.proj_bias)
    with open(args.out, "w") as f:
        json.dump(data, f, indent=1)
    print(render_markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
