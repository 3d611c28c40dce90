"""``python -m kvhoist.bench.passtime``: the LICM pass's own time against program size, and the first call it adds.

Issue 20 item 9: trace + rewrite time grew faster than the program. Two families of programs whose size grows with
one number:

* ``nested(depth)``: ``depth`` nested ``fori_loop``s (2 trips each); every level computes invariant work
  (``sin(w * (d + 1)) @ w``) and holds the next level, so what is hoisted rises through every level above it;
* ``counter(depth)``: the same nest whose invariant work reads each level's own counter (``sin(w * i) @ w``):
  every level is fissioned into a table over its counter (one more scan per level), which rises to the top;
* ``layers(n)``: a 4-step ``fori_loop`` around ``n`` layers written out in Python (not a layer ``scan``, whose
  program does not grow with its length), each projecting the invariant context with its own weight.

Measured, all as process CPU time (all threads; steadier than wall time on a shared machine), medians of repeats
with the spread (min–max):

* **pass**: ``kvhoist.licm(closed)`` on the traced program;
* **first call**: what a first call costs before it runs — trace, pass, lower, compile
  (``.lower(*args).compile()``) — under ``jax.jit`` and under ``hoist_invariants``, a fresh function each time (no
  cache shared), the two interleaved with the order rotated; and their ratio (the goal: at most 1.5);
* **fuzzer**: the same first-call ratio on programs drawn (deterministically) from the differential fuzzer's
  generator (``tests/compiler/test_differential.py``, one program per function), when that file and hypothesis are there.

The file imports only ``jax``, ``numpy`` and ``kvhoist``'s public API, so it runs against an older checkout when run
as a file with that checkout first on ``PYTHONPATH``; ``--before`` then adds that run's figures as columns.
A benchmark, not a test: nothing here asserts a figure.

Example:
    $ git worktree add /tmp/kvh-old ba40b57
    $ PYTHONPATH=/tmp/kvh-old python kvhoist/bench/passtime.py --out /tmp/passtime_before.json
    $ python -m kvhoist.bench.passtime --before /tmp/passtime_before.json --out docs/passtime_bench.json
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    # Run as a file (against another checkout): this folder's modules must not shadow top-level ones.
    sys.path.pop(0)

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from typing import Any, Callable  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import kvhoist  # noqa: E402

__all__ = ["nested", "counter", "layers", "pass_time", "first_call", "run", "render_markdown", "main"]

DEPTHS = (10, 20, 40, 80)
LAYERS = (10, 50, 100, 200)
D = 8


def nested(depth: int) -> tuple[Callable, tuple]:
    """``depth`` nested 2-trip ``fori_loop``s, each level with invariant work; ``(fun, args)``."""
    def f(w, x):
        def level(d, x):
            if d == depth:
                return jnp.tanh(x @ w)

            def body(i, x):
                k = jnp.sin(w * (d + 1.0)) @ w
                return level(d + 1, x + k[0] * 0.1)
            return jax.lax.fori_loop(0, 2, body, x)
        return level(0, x)
    rng = np.random.default_rng(0)
    return f, (jnp.asarray(rng.standard_normal((D, D)), jnp.float32), jnp.ones((D,), jnp.float32))


def counter(depth: int) -> tuple[Callable, tuple]:
    """As :func:`nested`, but each level's invariant work reads its own loop counter (``sin(w * i) @ w``): it is
    invariant in every loop further out only as a table over the counter, so each level is fissioned."""
    def f(w, x):
        def level(d, x):
            if d == depth:
                return jnp.tanh(x @ w)

            def body(i, x):
                k = jnp.sin(w * i.astype(jnp.float32)) @ w
                return level(d + 1, x + k[0] * 0.1)
            return jax.lax.fori_loop(0, 2, body, x)
        return level(0, x)
    rng = np.random.default_rng(0)
    return f, (jnp.asarray(rng.standard_normal((D, D)), jnp.float32), jnp.ones((D,), jnp.float32))


def layers(n: int) -> tuple[Callable, tuple]:
    """A 4-step loop around ``n`` written-out layers, each projecting the invariant context; ``(fun, args)``."""
    def f(ws, ctx, x):
        def step(i, h):
            for l in range(n):
                k = ctx @ ws[l]                       # invariant: the layer's "K projection"
                h = jnp.tanh(h + (h @ k.T).sum(-1) * 0.01)
            return h
        return jax.lax.fori_loop(0, 4, step, x)
    rng = np.random.default_rng(0)
    return f, (jnp.asarray(rng.standard_normal((n, D, D)) * 0.1, jnp.float32),
               jnp.asarray(rng.standard_normal((4, D)), jnp.float32), jnp.ones((D,), jnp.float32))


def _spread(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def pass_time(make: Callable[[], tuple[Callable, tuple]], repeats: int) -> dict:
    """CPU seconds of ``kvhoist.licm`` on the traced program (one untimed run first) and its equation count."""
    fun, args = make()
    closed = jax.make_jaxpr(fun)(*args)
    kvhoist.licm(closed)
    times = []
    for _ in range(repeats):
        t = time.process_time()
        kvhoist.licm(closed)
        times.append(time.process_time() - t)
    return {**_spread(times), "eqns": _count_eqns(closed)}


def _count_eqns(closed: Any) -> int:
    n = 0
    for e in closed.jaxpr.eqns:
        n += 1
        for v in e.params.values():
            for sub in (v if isinstance(v, tuple) else (v,)):
                if hasattr(sub, "jaxpr") and hasattr(sub, "consts"):
                    n += _count_eqns(sub)
                elif hasattr(sub, "eqns") and hasattr(sub, "invars"):
                    n += _count_eqns(jax.extend.core.ClosedJaxpr(sub, ()))
    return n


def first_call(make: Callable[[], tuple[Callable, tuple]], repeats: int, **jit_kwargs) -> dict:
    """CPU seconds of trace + (pass +) lower + compile, ``jax.jit`` vs ``hoist_invariants``, interleaved."""
    times: dict[str, list[float]] = {"jit": [], "hoisted": []}
    for r in range(repeats):
        order = ("jit", "hoisted") if r % 2 == 0 else ("hoisted", "jit")
        for who in order:
            fun, args = make()                     # a fresh function: nothing cached from the last round
            g = jax.jit(fun, **jit_kwargs) if who == "jit" else kvhoist.hoist_invariants(fun, **jit_kwargs)
            t = time.process_time()
            g.lower(*args).compile()
            times[who].append(time.process_time() - t)
    out = {k: _spread(v) for k, v in times.items()}
    out["ratio"] = out["hoisted"]["median"] / out["jit"]["median"]
    return out


def _fuzzer_programs(count: int) -> list:
    """``count`` programs of the differential fuzzer's generator, drawn deterministically, or ``[]``."""
    tests = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "tests")
    if not os.path.isdir(tests):
        return []
    paths = [tests, os.path.join(tests, "compiler")]  # the shared helpers, then the fuzzer's own module
    sys.path[:0] = paths
    try:
        from hypothesis import HealthCheck, given, settings

        import test_differential as td
    except Exception:
        return []
    finally:
        for path in paths:
            sys.path.remove(path)
    drawn: list = []

    @settings(max_examples=count, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(td.PROGRAMS)
    def draw(program):
        if len(drawn) < count:
            drawn.append(program)

    draw()
    return [(td, p) for p in drawn]


def run(*, depths=DEPTHS, layer_counts=LAYERS, repeats: int = 3, pass_repeats: int = 5, fuzzer: int = 12,
        on_row: Callable[[str], None] | None = None) -> dict:
    """Every measurement; ``{"machine", "kvhoist", "rows": [...], "fuzzer": {...}}``."""
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 20000))  # jax's lowering of an 80-deep nest recurses deeply
    rows = []
    for family, sizes, make in (("nested", depths, nested), ("counter", depths, counter),
                                ("layers", layer_counts, layers)):
        for n in sizes:
            row = {"program": family, "size": n, "pass": pass_time(lambda: make(n), pass_repeats),
                   "first_call": first_call(lambda: make(n), repeats)}
            rows.append(row)
            if on_row:
                on_row(f"{family} {n}: pass {row['pass']['median']:.3f} s, first call ratio "
                       f"{row['first_call']['ratio']:.2f}")
    fz: dict = {"programs": 0}
    progs = _fuzzer_programs(fuzzer)
    if progs:
        ratios = []
        for td, program in progs:
            def make(program=program, td=td):
                fun = td._make_fun([program])
                return (lambda *a: fun(*a, 2.0)), td._inputs()
            ratios.append(first_call(make, max(1, repeats - 1))["ratio"])
        fz = {"programs": len(ratios), "ratio": _spread(ratios), "at_most_1_5": sum(r <= 1.5 for r in ratios),
              "ratios": ratios}
        if on_row:
            on_row(f"fuzzer: {len(ratios)} programs, median ratio {fz['ratio']['median']:.2f}, "
                   f"max {fz['ratio']['max']:.2f}")
    return {"machine": {"platform": platform.platform(), "python": platform.python_version(),
                        "jax": jax.__version__, "cpus": os.cpu_count()},
            "kvhoist": os.path.dirname(os.path.abspath(kvhoist.__file__)), "rows": rows, "fuzzer": fz}


def render_markdown(data: dict, before: dict | None = None) -> str:
    """The table for docs/benchmarks.md; with ``before``, its pass time and ratio beside the new ones."""
    old = {(r["program"], r["size"]): r for r in (before or {}).get("rows", [])}
    head = "| program | size | eqns | pass (s) |"
    rule = "|---|---:|---:|---:|"
    if before:
        head += " pass before (s) |"
        rule += "---:|"
    head += " first call jit (s) | first call hoisted (s) | ratio |"
    rule += "---:|---:|---:|"
    if before:
        head += " ratio before |"
        rule += "---:|"
    lines = [head, rule]
    for r in data["rows"]:
        p, fc = r["pass"], r["first_call"]
        cells = [r["program"], str(r["size"]), str(p["eqns"]), f"{p['median']:.3f} ({p['min']:.3f}–{p['max']:.3f})"]
        b = old.get((r["program"], r["size"]))
        if before:
            cells.append("—" if b is None else f"{b['pass']['median']:.3f}")
        cells += [f"{fc['jit']['median']:.2f}", f"{fc['hoisted']['median']:.2f}", f"{fc['ratio']:.2f}"]
        if before:
            cells.append("—" if b is None else f"{b['first_call']['ratio']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    fz = data.get("fuzzer", {})
    if fz.get("programs"):
        text = (f"\nFuzzer programs ({fz['programs']}, one per function): first-call ratio median "
                f"{fz['ratio']['median']:.2f}, min {fz['ratio']['min']:.2f}, max {fz['ratio']['max']:.2f}; "
                f"{fz['at_most_1_5']} of {fz['programs']} at most 1.5")
        bf = (before or {}).get("fuzzer", {})
        if bf.get("programs"):
            text += (f" (before: median {bf['ratio']['median']:.2f}, max {bf['ratio']['max']:.2f}, "
                     f"{bf['at_most_1_5']} of {bf['programs']})")
        lines.append(text + ".")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvhoist.bench.passtime", allow_abbrev=False,
                                description="LICM pass time vs program size; first call, jax.jit vs hoisted.")
    p.add_argument("--out", help="write the figures as JSON here")
    p.add_argument("--md", help="write the markdown table here (it is printed either way)")
    p.add_argument("--before", help="a JSON file from an older checkout: add its figures as columns")
    p.add_argument("--repeats", type=int, default=3, help="first-call rounds per program (default 3)")
    p.add_argument("--pass-repeats", type=int, default=5, help="timed pass runs per program (default 5)")
    p.add_argument("--fuzzer", type=int, default=12, help="fuzzer programs to draw (default 12; 0: none)")
    p.add_argument("--depths", type=int, nargs="+", default=list(DEPTHS), help="nesting depths")
    p.add_argument("--layers", type=int, nargs="+", default=list(LAYERS), help="layer counts")
    a = p.parse_args(argv)
    if a.repeats < 1 or a.pass_repeats < 1 or a.fuzzer < 0:
        p.error("--repeats and --pass-repeats must be at least 1, --fuzzer at least 0")
    before = None
    if a.before:
        with open(a.before) as fh:
            before = json.load(fh)
    data = run(depths=a.depths, layer_counts=a.layers, repeats=a.repeats, pass_repeats=a.pass_repeats,
               fuzzer=a.fuzzer, on_row=lambda s: print(s, flush=True))
    if before:
        data["before"] = before
    table = render_markdown(data, before)
    print(table)
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(data, fh, indent=1)
    if a.md:
        with open(a.md, "w") as fh:
            fh.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
