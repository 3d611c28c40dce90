"""Benchmarks for "never worse than jax.jit": sub-millisecond samplers and peak memory.

Two measurements, written to ``docs/trust_bench.json`` and printed as markdown (docs/benchmarks.md):

* **Sub-millisecond samplers** (:func:`submillisecond`): wan_ref samplers so small that a whole sample takes
  well under a millisecond of compute, in the three forms where kvhoist rewrites the most (nested layer scan,
  I2V + CFG, Wan 2.2 expert ``cond``). Plain ``jax.jit``, the hand-written cache (``kv_cache=True``) and
  ``hoist_invariants`` are called interleaved; per variant the median of process CPU time per call, and the
  ratio hoisted / hand with its spread (the ratio of each repeat's pair). Here dispatch and program structure
  dominate, so any overhead of the wrapper or any worse program shows.
* **Peak memory** (:func:`memory`): programs where a careless hoist materialises what XLA fuses (a broadcast
  under a reduction) or allocates for a loop that never runs (a zero-trip ``while``, a never-taken ``cond``
  branch). Compiled ``memory_analysis()`` at a large abstract size (never executed), and the peak RSS of a
  fresh process running each variant at a size that fits this machine.

Run: ``python -m kvhoist.bench.trust [--repeats N] [--out docs/trust_bench.json]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

TINY = None  # built lazily (imports wan_ref)


def _tiny_config():
    from kvhoist.bench.forms import BenchConfig

    return BenchConfig("sub-ms", "2 heads x 16, 2 layers, 16 text tokens, 16 latent tokens, 4 steps",
                       heads=2, head_dim=16, ffn_dim=64, num_layers=2, text_dim=32, text_tokens=16,
                       latent_fhw=(1, 8, 8), steps=4, image_dim=32)


SUBMS_FORMS = ("scan x layer-scan", "I2V + CFG", "expert cond (A14B)")


def submillisecond(*, repeats: int = 300, log: Callable[[str], None] = print) -> dict:
    """Interleaved CPU-time medians of plain / hand / hoisted on tiny wan_ref samplers."""
    import kvhoist
    from kvhoist.bench.forms import FORMS, build_case, split_kwargs
    from kvhoist.bench.timing import time_interleaved
    from wan_ref.sample import sample

    cfg = _tiny_config()
    rows = []
    for form_name in SUBMS_FORMS:
        form = FORMS[form_name]
        case = build_case(cfg, form)
        static, traced = split_kwargs(case.kwargs)
        args = case.args
        plain = jax.jit(functools.partial(sample, **static))
        hand = jax.jit(functools.partial(sample, **static, kv_cache=True))
        hoisted = kvhoist.hoist_invariants(functools.partial(sample, **static))
        fns = {"plain": lambda: plain(*args, **traced), "hand": lambda: hand(*args, **traced),
               "hoisted": lambda: hoisted(*args, **traced)}
        outs = {k: np.asarray(f()) for k, f in fns.items()}
        cpu: dict = {}
        wall = time_interleaved(fns, repeats=repeats, warmup=5, cpu_times=cpu)
        ratios = sorted(h / c for h, c in zip(cpu["hoisted"], cpu["hand"]))
        row = {
            "form": form_name,
            "cpu_median_us": {k: 1e6 * statistics.median(v) for k, v in cpu.items()},
            "wall_median_us": {k: 1e6 * statistics.median(v) for k, v in wall.items()},
            "hoisted_over_hand_cpu": statistics.median(cpu["hoisted"]) / statistics.median(cpu["hand"]),
            "hoisted_over_hand_pairs_p25_p75": [ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]],
            "hoisted_over_plain_cpu": statistics.median(cpu["hoisted"]) / statistics.median(cpu["plain"]),
            "max_abs_diff_vs_plain": {k: float(np.max(np.abs(o - outs["plain"]))) for k, o in outs.items()},
            "hoisted_values": len(hoisted.report(*args, **traced).hoisted),
        }
        log(f"[sub-ms] {form_name}: " + ", ".join(f"{k} {v:.0f} us" for k, v in row["cpu_median_us"].items())
            + f"; hoisted/hand {row['hoisted_over_hand_cpu']:.3f}")
        rows.append(row)
    return {"config": dataclasses.asdict(cfg), "repeats": repeats, "rows": rows}


# ------------------------------------------------------------------------------------------------------
# Memory
# ------------------------------------------------------------------------------------------------------

def broadcast_under_reduction(x, a, *, n: int, steps: int = 4):
    """``x + sum(sin(broadcast(a, n)) * x)`` in a scan: XLA fuses the broadcast into the reduction."""
    def body(c, _):
        return c + jnp.sum(jnp.sin(jnp.broadcast_to(a, (n,))) * c), None
    return lax.scan(body, x, None, length=steps)[0]


def zero_trip_while(x, a, trips, *, n: int):
    """The same work in a ``while_loop`` whose trip count is a traced value (0 here)."""
    def body(c):
        i, v = c
        return i + 1, v + jnp.sum(jnp.sin(jnp.broadcast_to(a, (n,))) * v)
    return lax.while_loop(lambda c: c[0] < trips, body, (0, x))[1]


def never_taken_branch(x, a, *, n: int, steps: int = 4):
    """A ``cond`` in a scan whose never-taken branch holds an invariant expansion of ``a``."""
    def body(c, _):
        def big(c):
            return c + jnp.sum(jnp.outer(jnp.broadcast_to(a, (n // 1024,)), jnp.ones(1024)) * c)
        return lax.cond(c > 1e30, big, lambda c: c + 1.0, c), None
    return lax.scan(body, x, None, length=steps)[0]


PROGRAMS: dict[str, tuple[Callable, Callable[[int], tuple]]] = {
    "broadcast under reduction (scan)": (broadcast_under_reduction, lambda n: (jnp.float32(0.5), jnp.float32(0.3))),
    "broadcast in a zero-trip while": (zero_trip_while, lambda n: (jnp.float32(0.5), jnp.float32(0.3), jnp.int32(0))),
    "expansion in a never-taken branch": (never_taken_branch, lambda n: (jnp.float32(0.5), jnp.float32(0.3))),
}


def _compiled_bytes(fn, args) -> dict:
    specs = [jax.ShapeDtypeStruct(np.shape(a), jnp.asarray(a).dtype) for a in args]
    m = fn.lower(*specs).compile().memory_analysis()
    return {"temp": int(m.temp_size_in_bytes), "arguments": int(m.argument_size_in_bytes),
            "output": int(m.output_size_in_bytes)}


_RSS_CHILD = r"""
import resource, sys, jax, kvhoist
from kvhoist.bench import trust as b
fn, make = b.PROGRAMS[sys.argv[1]]
n = int(sys.argv[2])
f = jax.jit(fn, static_argnames=("n",)) if sys.argv[3] == "jit" else kvhoist.hoist_invariants(fn, static_argnames=("n",))
args = make(n)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
jax.block_until_ready(f(*args, n=n))
print(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _peak_rss_mib(program: str, n: int, variant: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _RSS_CHILD, program, str(n), variant], capture_output=True,
                         text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"rc {out.returncode}"}
    before, after = (int(v) for v in out.stdout.split()[-2:])
    return {"peak_rss_mib": after / 1024, "rss_before_call_mib": before / 1024}


def memory(*, abstract_n: int = 500_000_000, run_n: int = 50_000_000, log: Callable[[str], None] = print) -> dict:
    """Compiled memory at ``abstract_n`` (not executed) and peak RSS at ``run_n`` (executed), jit vs hoisted."""
    import kvhoist

    rows = []
    for name, (fn, make) in PROGRAMS.items():
        row: dict = {"program": name}
        for variant, wrap in (("jit", lambda f: jax.jit(f)), ("hoisted", kvhoist.hoist_invariants)):
            f = wrap(functools.partial(fn, n=abstract_n))
            row[f"{variant}_compiled_bytes_n{abstract_n:.0e}"] = _compiled_bytes(f, make(abstract_n))
            row[f"{variant}_run_n{run_n:.0e}"] = _peak_rss_mib(name, run_n, variant)
        report = kvhoist.hoist_invariants(functools.partial(fn, n=abstract_n)).report(*make(abstract_n))
        row["hoisted_cache_bytes"] = report.cache_bytes
        row["skipped"] = [s.reason for s in report.skipped]
        log(f"[memory] {name}: " + json.dumps({k: v for k, v in row.items() if k not in ("program", "skipped")}))
        rows.append(row)
    return {"abstract_n": abstract_n, "run_n": run_n, "rows": rows}


def render_markdown(data: dict) -> str:
    out = []
    if "submillisecond" in data:
        s = data["submillisecond"]
        out.append(f"Sub-millisecond samplers ({s['config']['description']}; {s['repeats']} interleaved repeats, "
                   "process CPU time per call, median):\n")
        out.append("| form | plain (us) | hand (us) | hoisted (us) | hoisted / hand | p25–p75 of per-repeat ratio |"
                   " hoisted / plain |")
        out.append("|---|---|---|---|---|---|---|")
        for r in s["rows"]:
            c = r["cpu_median_us"]
            lo, hi = r["hoisted_over_hand_pairs_p25_p75"]
            out.append(f"| {r['form']} | {c['plain']:.0f} | {c['hand']:.0f} | {c['hoisted']:.0f} | "
                       f"{r['hoisted_over_hand_cpu']:.3f} | {lo:.2f}–{hi:.2f} | {r['hoisted_over_plain_cpu']:.3f} |")
        out.append("")
    if "memory" in data:
        m = data["memory"]
        na, nr = m["abstract_n"], m["run_n"]
        out.append(f"Peak memory, jit vs hoisted: XLA temp bytes compiled at N = {na:.0e} (not run) and peak RSS "
                   f"of a fresh process running N = {nr:.0e}:\n")
        out.append("| program | jit temp | hoisted temp | jit peak RSS | hoisted peak RSS | hoisted cache |")
        out.append("|---|---|---|---|---|---|")
        for r in m["rows"]:
            jt = r[f"jit_compiled_bytes_n{na:.0e}"]["temp"]
            ht = r[f"hoisted_compiled_bytes_n{na:.0e}"]["temp"]
            jr = r[f"jit_run_n{nr:.0e}"].get("peak_rss_mib")
            hr = r[f"hoisted_run_n{nr:.0e}"].get("peak_rss_mib")
            out.append(f"| {r['program']} | {jt} B | {ht} B | {jr:.0f} MiB | {hr:.0f} MiB | {r['hoisted_cache_bytes']} B |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvhoist.bench.trust", allow_abbrev=False, description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=300, help="interleaved repeats per sub-ms form (default 300)")
    p.add_argument("--out", default="docs/trust_bench.json", help="JSON output path")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-timing", action="store_true")
    a = p.parse_args(argv)
    if a.repeats < 1:
        p.error("--repeats must be >= 1")
    t0 = time.perf_counter()
    data: dict[str, Any] = {"jax": jax.__version__, "backend": jax.default_backend(), "cpus": os.cpu_count()}
    if not a.skip_timing:
        data["submillisecond"] = submillisecond(repeats=a.repeats)
    if not a.skip_memory:
        data["memory"] = memory()
    data["total_s"] = time.perf_counter() - t0
    with open(a.out, "w") as fh:
        json.dump(data, fh, indent=1, default=str)
    print(render_markdown(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
