"""``python -m kvhoist.bench.probes``: the probes of issue 20 as small programs, ``jax.jit`` vs ``hoist_invariants``.

Issue 20 lists thirteen problems found on programs written elsewhere. Each one that a CPU host can show in a few
seconds is a small program here, measured under ``jax.jit`` and under ``hoist_invariants``:

* 1: a traced ``jax.random.PRNGKey(0)`` in a decode ``while_loop`` (Hugging Face's ``init_cache``): refused? what
  left the loop (matmuls per step);
* 4: ``jnp.linalg.svd`` of a 512x512 invariant in a never-taken ``cond`` branch of a loop: ms per call;
* 5: fission of ``k = ctx @ w`` used as ``h @ k.T ... @ k`` in a layer scan: cache bytes (K once, or K and K.T),
  XLA's temporary bytes, the report's share of FLOPs saved;
* 6: the same program with a step loop of length 1: XLA's temporary bytes (nothing can pay);
* 7: ``fission="vmap"`` of a layer whose per-layer intermediate is wide: XLA's temporary bytes;
* 8: 20 signatures, then ``clear_cache()`` + ``jax.clear_caches()``: Python memory held (tracemalloc) and live
  ``ClosedJaxpr`` objects (a gc walk);
* 10, 11: a beam cache tiled with ``jnp.tile`` / with ``broadcast_to`` and a projection bias: cache bytes in
  copies of the untiled K/V;
* 12: a remat'd layer scan naming K/V with ``checkpoint_name``: cache bytes against the hand K/V.

Item 2 (the untiled cache's speed) is quoted from :mod:`kvhoist.bench.decode`'s results (docs/decode_bench.json,
docs/decode.md) instead of measured again; items 3, 9 and 13 are measured elsewhere (rows say where).

*Before and after*: the file imports only ``jax``, ``numpy`` and ``kvhoist``'s public API, so it runs against an
older checkout when run as a file with that checkout first on ``PYTHONPATH``; ``--before`` then adds that run's
figures as a column. Timings are process CPU time (all threads), medians of interleaved repeats with the order
rotated. A benchmark, not a test: nothing here asserts a figure.

Example:
    $ git worktree add /tmp/kvh-before fd120bc
    $ PYTHONPATH=/tmp/kvh-before python kvhoist/bench/probes.py --out /tmp/probes_before.json
    $ python -m kvhoist.bench.probes --before /tmp/probes_before.json --out docs/probes_bench.json
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    # Run as a file (against another checkout): this folder's modules must not shadow top-level ones.
    sys.path.pop(0)

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
import warnings  # noqa: E402
from typing import Any, Callable  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

import kvhoist  # noqa: E402

__all__ = ["PROBES", "run", "render_markdown", "main"]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MIB = 1024 * 1024


# ------------------------------------------------------------------------------------------------------
# measuring
# ------------------------------------------------------------------------------------------------------


def _rand(*shape: int, seed: int, scale: float = 1.0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, dtype=np.float32) * scale)


def _cpu_ms(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, dict]:
    """Process CPU ms per call of each function (all threads; median, min, max, and the wall median): one
    warm-up round, then ``repeats`` interleaved rounds with the order rotated."""
    names = list(fns)
    for n in names:
        jax.block_until_ready(fns[n]())
    cpu: dict[str, list[float]] = {n: [] for n in names}
    wall: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names):] + names[:r % len(names)]:
            c0, t0 = time.process_time(), time.perf_counter()
            jax.block_until_ready(fns[n]())
            wall[n].append((time.perf_counter() - t0) * 1e3)
            cpu[n].append((time.process_time() - c0) * 1e3)
    return {n: {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v),
                "wall_median_ms": statistics.median(wall[n])} for n, v in cpu.items()}


def _temp_bytes(jitted: Any, *args: Any) -> int | None:
    """XLA's temporary bytes for the compiled program (None where the backend does not say)."""
    stats = jitted.lower(*args).compile().memory_analysis()
    return None if stats is None else int(stats.temp_size_in_bytes)


def _eqns(closed: Any):
    """Every equation of a (closed) jaxpr, sub-jaxprs included (not the hidden bodies of kvhoist's own
    ``kvhoist_attach`` / ``kvhoist_speculate``: what transformations see, not what a loop step runs)."""
    jaxpr = getattr(closed, "jaxpr", closed)
    for e in jaxpr.eqns:
        yield e
        if e.primitive.name.startswith("kvhoist_"):
            continue
        for v in e.params.values():
            for s in (v if isinstance(v, (tuple, list)) else (v,)):
                if hasattr(s, "eqns") or hasattr(getattr(s, "jaxpr", None), "eqns"):
                    yield from _eqns(s)


def _loop_dots(closed: Any, primitive: str = "while") -> int:
    """``dot_general`` equations in the body of the first ``primitive`` loop."""
    loop = next(e for e in _eqns(closed) if e.primitive.name == primitive)
    body = loop.params["body_jaxpr" if primitive == "while" else "jaxpr"]
    return sum(1 for e in _eqns(body) if e.primitive.name == "dot_general")


def _notes(report: Any) -> list[str]:
    return [f"[{n.kind}] {n.message}" for n in getattr(report, "notes", [])]


def _hoisted(f: Callable, args: tuple, **options: Any) -> tuple[Any, Any, list[str]]:
    """``(hoisted function, report, KvhoistWarning lines)`` of ``f`` on ``args``."""
    hf = kvhoist.hoist_invariants(f, **options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = hf.report(*args)
    return hf, report, [str(w.message)[:300] for w in caught if "Kvhoist" in w.category.__name__]


def _max_diff(a: Any, b: Any) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# ------------------------------------------------------------------------------------------------------
# the probes: each returns {"jit": {...}, "hoisted": {...}, ...}
# ------------------------------------------------------------------------------------------------------


def probe_prng_key() -> dict:
    """1: a traced PRNGKey(0) in a decode while_loop (HF init_cache): refused? matmuls per step."""
    def generate(enc, wk, wv, wq, x0):
        key = jax.random.PRNGKey(0)
        init = jax.random.normal(key, x0.shape) * 1e-3

        def body(c):
            i, h = c
            k, v = enc @ wk, enc @ wv  # cross K/V: the same every step
            return i + 1, jnp.tanh(jax.nn.softmax((h @ wq) @ k.T, axis=-1) @ v + h)

        return lax.while_loop(lambda c: c[0] < 5, body, (0, x0 + init))[1]

    args = (_rand(64, 32, seed=1), _rand(32, 32, seed=2, scale=0.2), _rand(32, 32, seed=3, scale=0.2),
            _rand(32, 32, seed=4, scale=0.2), _rand(4, 32, seed=5))
    hf, report, warned = _hoisted(generate, args)
    before, after = hf.jaxprs(*args)
    return {"jit": {"dots_per_step": _loop_dots(before)},
            "hoisted": {"refused": bool(warned), "warning": warned[0] if warned else "",
                        "dots_per_step": _loop_dots(after), "values": len(report.hoisted),
                        "cache_bytes": report.cache_bytes,
                        "max_abs_diff_vs_jit": _max_diff(hf(*args), jax.jit(generate)(*args))}}


def probe_svd_branch(repeats: int) -> dict:
    """4: svd(512x512) of an invariant in a never-taken cond branch of a step scan: ms per call."""
    def f(a, w, h):
        def body(h, t):  # the svd is invariant, but only in a branch that never runs (t < 100)
            h = lax.cond(t > 100, lambda h: h * jnp.linalg.svd(a, compute_uv=False).sum(),
                         lambda h: jnp.tanh(h @ w), h)
            return h, None
        return lax.scan(body, h, jnp.arange(6))[0]

    args = (_rand(512, 512, seed=6), _rand(512, 512, seed=7, scale=512 ** -0.5), _rand(2, 512, seed=8))
    hf, report, warned = _hoisted(f, args)
    jf = jax.jit(f)
    cpu = _cpu_ms({"jit": lambda: jf(*args), "hoisted": lambda: hf(*args)}, repeats)
    speculated = [h.name for h in report.hoisted]
    return {"jit": {"cpu": cpu["jit"]},
            "hoisted": {"cpu": cpu["hoisted"], "values": len(report.hoisted), "speculated": speculated,
                        "warning": warned[0] if warned else ""},
            "hoisted_over_jit_cpu": cpu["hoisted"]["median_ms"] / cpu["jit"]["median_ms"]}


def _layer_scan(layer: Callable, steps: int) -> Callable:
    def f(ctx, w, x):
        def step(h, _):
            return lax.scan(lambda h, wl: layer(ctx, h, wl), h, w)[0], None
        return lax.scan(step, x, None, length=steps)[0]
    return f


def _kkt_layer(ctx, h, wl):
    k = ctx @ wl
    return h + jnp.tanh(h @ k.T) @ k * 0.01, None


FISSION = dict(layers=8, tokens=512, d=128, steps=4)


def _fission_args(layers: int, tokens: int, d: int) -> tuple:
    return _rand(tokens, d, seed=8), _rand(layers, d, d, seed=9, scale=d ** -0.5), _rand(4, d, seed=10)


def probe_fission_k_kt(steps: int = FISSION["steps"]) -> dict:
    """5 (steps 4) and 6 (steps 1): K and K.T of one projection in a layer scan under fission."""
    c = FISSION
    f = _layer_scan(_kkt_layer, steps)
    args = _fission_args(c["layers"], c["tokens"], c["d"])
    hf, report, warned = _hoisted(f, args)
    return {"config": dict(c, steps=steps),
            "intended_cache_bytes": c["layers"] * c["tokens"] * c["d"] * 4 if steps > 1 else 0,
            "jit": {"temp_bytes": _temp_bytes(jax.jit(f), *args)},
            "hoisted": {"temp_bytes": _temp_bytes(hf, *args), "cache_bytes": report.cache_bytes,
                        "values": len(report.hoisted), "shapes": [list(h.shape) for h in report.hoisted],
                        "flops_saved_fraction": report.flops_saved_fraction,
                        "warning": warned[0] if warned else ""}}


def probe_vmap_wide() -> dict:
    """7: fission='vmap' of a layer with a wide [S, H] intermediate (K is [S, D]): XLA temp bytes."""
    layers, tokens, d, hidden = 8, 512, 32, 512

    def layer(ctx, h, w):
        wi, wo = w
        k = jax.nn.gelu(ctx @ wi) @ wo
        return h + jnp.tanh(h @ k.T) @ k * 0.01, None

    f = _layer_scan(layer, 4)
    args = (_rand(tokens, d, seed=11), (_rand(layers, d, hidden, seed=12, scale=d ** -0.5),
                                         _rand(layers, hidden, d, seed=13, scale=hidden ** -0.5)),
            _rand(4, d, seed=14))
    out: dict = {"config": {"layers": layers, "tokens": tokens, "d": d, "hidden": hidden, "steps": 4},
                 "wide_intermediate_all_layers_bytes": layers * tokens * hidden * 4,
                 "jit": {"temp_bytes": _temp_bytes(jax.jit(f), *args)}}
    for fission in ("vmap", "scan"):
        hf, report, warned = _hoisted(f, args, fission=fission)
        out[f"hoisted_{fission}"] = {"temp_bytes": _temp_bytes(hf, *args), "cache_bytes": report.cache_bytes,
                                     "notes": [n for n in _notes(report) if "vmap" in n or "fission" in n],
                                     "warning": warned[0] if warned else ""}
    out["hoisted"] = out["hoisted_vmap"]
    return out


def _held(make_calls: Callable[[], Callable[[], None]]) -> dict:
    """Python memory (tracemalloc) and live ClosedJaxpr objects held after 20 signatures, then after clearing."""
    def live_jaxprs() -> int:
        return sum(1 for o in gc.get_objects() if type(o).__name__ == "ClosedJaxpr")

    jax.clear_caches()
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    base_jaxprs = live_jaxprs()
    clear = make_calls()
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - base
    jaxprs = live_jaxprs() - base_jaxprs
    clear()
    jax.clear_caches()
    gc.collect()
    after = tracemalloc.get_traced_memory()[0] - base
    jaxprs_after = live_jaxprs() - base_jaxprs
    tracemalloc.stop()
    return {"held_bytes": held, "live_jaxprs": jaxprs, "held_bytes_after_clear": after,
            "live_jaxprs_after_clear": jaxprs_after}


def probe_records(signatures: int = 20) -> dict:
    """8: 20 signatures, then clear_cache() + jax.clear_caches(): what is still held."""
    def f(ws, x):  # an unrolled 8-layer body: each traced program is a few hundred equations
        def body(i, h):
            for w in ws:
                h = jnp.tanh(h @ (w @ w.T) * 0.1 + jnp.sin(w).sum())
            return h
        return lax.fori_loop(0, 3, body, x)

    ws = tuple(_rand(32, 32, seed=20 + i, scale=0.2) for i in range(8))
    xs = [_rand(n, 32, seed=40 + n) for n in range(1, signatures + 1)]

    def with_jit():
        jf = jax.jit(f)
        for x in xs:
            jax.block_until_ready(jf(ws, x))
        return lambda: None

    records: dict = {}

    def with_hoisted():
        hf = kvhoist.hoist_invariants(f)
        for x in xs:
            jax.block_until_ready(hf(ws, x))
        twin = getattr(hf, "_twin", None)
        recs = getattr(twin, "records", None) if twin is not None else getattr(hf, "_records", None)
        records["count"] = None if recs is None else len(recs)
        return hf.clear_cache

    out = {"signatures": signatures, "jit": _held(with_jit), "hoisted": _held(with_hoisted)}
    out["hoisted"]["records"] = records.get("count")
    return out


BEAM = dict(beams=4, tokens=256, d=64, steps=6)


def _beam_decode(tiling: str, bias: bool) -> Callable:
    b = BEAM["beams"]

    def decode(enc, wk, wv, bk, bv, wq, x0):
        e = enc[:, None]  # [1, 1, S, D]
        if tiling == "tile":  # Flax examples/wmt: expand_dims -> jnp.tile -> reshape
            e = jnp.tile(e, (1, b, 1, 1))
        else:  # Hugging Face's Flax beam search: broadcast_to -> reshape
            e = jnp.broadcast_to(e, (1, b) + enc.shape[1:])
        e = e.reshape((b,) + enc.shape[1:])

        def body(c):
            i, h = c
            k, v = e @ wk, e @ wv
            if bias:
                k, v = k + bk, v + bv
            p = jax.nn.softmax(jnp.einsum("bqd,bsd->bqs", h @ wq, k), axis=-1)
            return i + 1, jnp.tanh(jnp.einsum("bqs,bsd->bqd", p, v) + h)

        return lax.while_loop(lambda c: c[0] < BEAM["steps"], body, (0, x0))[1]
    return decode


def probe_beam_cache(tiling: str, bias: bool) -> dict:
    """10 (jnp.tile) and 11 (a projection bias): the beam cache in copies of the untiled cross K/V."""
    s, d = BEAM["tokens"], BEAM["d"]
    f = _beam_decode(tiling, bias)
    args = (_rand(1, s, d, seed=50), _rand(d, d, seed=51, scale=d ** -0.5), _rand(d, d, seed=52, scale=d ** -0.5),
            _rand(d, seed=53, scale=0.1), _rand(d, seed=54, scale=0.1), _rand(d, d, seed=55, scale=d ** -0.5),
            _rand(BEAM["beams"], 1, d, seed=56))
    hf, report, warned = _hoisted(f, args)
    one_copy = 2 * s * d * 4
    return {"config": dict(BEAM, tiling=tiling, bias=bias), "one_untiled_copy_bytes": one_copy,
            "jit": {"temp_bytes": _temp_bytes(jax.jit(f), *args)},
            "hoisted": {"temp_bytes": _temp_bytes(hf, *args), "cache_bytes": report.cache_bytes,
                        "copies": report.cache_bytes / one_copy, "values": len(report.hoisted),
                        "warning": warned[0] if warned else ""}}


def probe_checkpoint_name() -> dict:
    """12: a remat'd layer scan whose K/V carry checkpoint_name: cache bytes vs the hand K/V."""
    from jax.ad_checkpoint import checkpoint_name

    layers, s, d = 4, 128, 64

    def sampler(params, ctx, x):
        def step(x, _t):
            ctx_p = checkpoint_name(jnp.tanh(ctx @ params["w_text"]), "context")

            def layer(h, lw):
                wq, wk, wv = lw
                k = checkpoint_name(ctx_p @ wk, "key_proj")
                v = checkpoint_name(ctx_p @ wv, "value_proj")
                return h + jax.nn.softmax((h @ wq) @ k.T, axis=-1) @ v, None

            layer = jax.checkpoint(layer, policy=jax.checkpoint_policies.save_only_these_names("key_proj",
                                                                                                "value_proj"))
            h, _ = lax.scan(layer, x, (params["wq"], params["wk"], params["wv"]))
            return h * 0.9, None
        return lax.scan(step, x, jnp.arange(4))[0]

    params = {"w_text": _rand(d, d, seed=60, scale=0.2), "wq": _rand(layers, d, d, seed=61, scale=0.1),
              "wk": _rand(layers, d, d, seed=62, scale=0.1), "wv": _rand(layers, d, d, seed=63, scale=0.1)}
    args = (params, _rand(s, d, seed=64), _rand(5, d, seed=65))
    hf, report, warned = _hoisted(sampler, args)
    hand = 2 * layers * s * d * 4
    return {"config": {"layers": layers, "tokens": s, "d": d}, "hand_kv_bytes": hand,
            "jit": {"temp_bytes": _temp_bytes(jax.jit(sampler), *args)},
            "hoisted": {"temp_bytes": _temp_bytes(hf, *args), "cache_bytes": report.cache_bytes,
                        "over_hand": report.cache_bytes / hand, "values": [h.name for h in report.hoisted],
                        "skipped": [getattr(x, "reason", str(x))[:120] for x in report.skipped][:4],
                        "warning": warned[0] if warned else ""}}


def quote_untiled_speed() -> dict:
    """2: quoted from kvhoist.bench.decode's own run (docs/decode_bench.json; before: docs/decode.md)."""
    path = os.path.join(REPO, "docs", "decode_bench.json")
    try:
        with open(path, encoding="utf-8") as f:
            rows = json.load(f)["rows"]
    except (OSError, KeyError, ValueError) as err:
        return {"quoted": False, "error": f"{type(err).__name__}: {err}"}
    row = next((r for r in rows if r["form"] == "unrolled" and r["enc_len"] == 512 and r["beams"] == 4
                and r["xla_licm"] == "on"), None)
    if row is None:
        return {"quoted": False, "error": "no unrolled / 512 / beam 4 / LICM on row in docs/decode_bench.json"}
    return {"quoted": True, "source": "docs/decode_bench.json (unrolled, encoder 512, beam 4, XLA LICM on)",
            "jit": {"cpu": row["cpu"]["plain"]}, "hoisted": {"cpu": row["cpu"]["hoisted"]},
            "plain_over_hoisted_cpu": row["plain_over_hoisted_cpu"],
            "before": {"plain_over_hoisted_cpu": 0.87, "source": "docs/decode.md, the before/after table (fd120bc)"}}


#: ``(item, probe, runner)``; a runner takes ``quick`` (fewer repeats).
PROBES: tuple[tuple[int, str, Callable[[bool], dict]], ...] = (
    (1, "traced PRNGKey(0) in a decode while_loop", lambda q: probe_prng_key()),
    (2, "untiled beam cache, speed (XLA LICM on)", lambda q: quote_untiled_speed()),
    (4, "svd(512x512) in a never-taken branch", lambda q: probe_svd_branch(3 if q else 9)),
    (5, "fission: K and K.T of one projection", lambda q: probe_fission_k_kt(FISSION["steps"])),
    (6, "step loop of length 1", lambda q: probe_fission_k_kt(1)),
    (7, "fission='vmap', wide intermediate", lambda q: probe_vmap_wide()),
    (8, "20 signatures, then clear_cache() + jax.clear_caches()", lambda q: probe_records(8 if q else 20)),
    (10, "beam cache tiled by jnp.tile", lambda q: probe_beam_cache("tile", False)),
    (11, "beam cache, broadcast_to + projection bias", lambda q: probe_beam_cache("broadcast", True)),
    (12, "checkpoint_name on K/V in a remat'd layer scan", lambda q: probe_checkpoint_name()),
)

#: Items measured by other benchmarks: where their figures are.
ELSEWHERE = {
    3: ("XLA compiles launched by the rewrite", "docs/benchmarks.md, pass-time section (and "
        "tests/compiler/test_foreign_programs.py::test_rewrite_adds_no_xla_compile)"),
    9: ("trace + rewrite time vs program size", "docs/benchmarks.md, pass-time section"),
    13: ("host-loop overhead, NNX step with kwargs", "docs/benchmarks.md, ## Per-call dispatch"),
}


def _code_version() -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(kvhoist.__file__)))
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"kvhoist": os.path.abspath(kvhoist.__file__), "commit": commit or "?"}


def run(quick: bool = False, only: set[int] | None = None, progress: Callable[[str], None] | None = None) -> dict:
    """Run every probe (or the items in ``only``); a probe that fails records its error instead.

    Returns:
      ``{"code": ..., "machine": ..., "probes": {item: {...}}, "total_s": ...}``.
    """
    t0 = time.perf_counter()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    out: dict = {"code": _code_version(), "jax": jax.__version__, "cpu_count": os.cpu_count(),
                 "loadavg_start": list(load) if load else None, "quick": quick,
                 "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "probes": {}}
    for item, name, runner in PROBES:
        if only and item not in only:
            continue
        p0 = time.perf_counter()
        try:
            row = runner(quick)
        except Exception as err:  # noqa: BLE001 - an older checkout may not run a probe: record why
            row = {"error": f"{type(err).__name__}: {str(err)[:400]}"}
        row.update(item=item, probe=name, seconds=round(time.perf_counter() - p0, 1))
        out["probes"][str(item)] = row
        if progress is not None:
            progress(f"item {item}: {name} ({row['seconds']} s)")
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    out["loadavg_end"] = list(load) if load else None
    out["total_s"] = round(time.perf_counter() - t0, 1)
    return out


# ------------------------------------------------------------------------------------------------------
# the table
# ------------------------------------------------------------------------------------------------------


def _b(n: Any) -> str:
    if n is None:
        return "?"
    if n >= MIB:
        return f"{n / MIB:.2f} MiB"
    if n >= 1024:
        return f"{n / 1024:.0f} KiB"
    return f"{n} B"


def _ms(c: dict) -> str:
    return f"{c['median_ms']:.2f} ({c['min_ms']:.2f}-{c['max_ms']:.2f})"


def _cells(item: int, r: dict | None) -> tuple[str, str, str]:
    """``(measure, jit, hoisted)`` cells of one probe's result (``r`` from one run)."""
    if r is None:
        return "", "", "not run"
    if "error" in r:
        return "", "", f"cannot run: {r['error'][:90]}"
    j, h = r.get("jit", {}), r.get("hoisted", {})
    if item == 1:
        refused = f"refused ({h['warning'][:70]}…)" if h["refused"] else "not refused"
        return ("matmuls per step; refused?", f"{j['dots_per_step']}",
                f"{h['dots_per_step']}; {refused}; {h['values']} values, {_b(h['cache_bytes'])}")
    if item == 2:
        if not r.get("quoted"):
            return "CPU ms per decode", "", r.get("error", "")
        return ("CPU ms per decode (quoted)", _ms(j["cpu"]),
                f"{_ms(h['cpu'])}; jit/hoisted {r['plain_over_hoisted_cpu']:.2f}")
    if item == 4:
        spec = f"{h['values']} value(s) speculated" if h["values"] else "nothing speculated"
        return ("CPU ms per call", _ms(j["cpu"]), f"{_ms(h['cpu'])} ({r['hoisted_over_jit_cpu']:.1f}x jit; {spec})")
    if item in (5, 6):
        share = h["flops_saved_fraction"]
        share = "" if share is None else f", share {100 * share:.1f}%"
        return ("XLA temp; cache (intended)", _b(j["temp_bytes"]),
                f"temp {_b(h['temp_bytes'])}; cache {_b(h['cache_bytes'])} ({_b(r['intended_cache_bytes'])}), "
                f"{h['values']} values{share}")
    if item == 7:
        fell_back = "falls back to scan" if any("vmap" in n for n in h["notes"]) else "no fallback note"
        return ("XLA temp; cache", _b(j["temp_bytes"]),
                f"temp {_b(h['temp_bytes'])} (scan fission {_b(r['hoisted_scan']['temp_bytes'])}); "
                f"cache {_b(h['cache_bytes'])}; {fell_back}")
    if item == 8:
        recs = h.get("records")
        return (f"Python MiB held after {r['signatures']} signatures / after clearing; live ClosedJaxprs",
                f"{j['held_bytes'] / MIB:.2f} / {j['held_bytes_after_clear'] / MIB:.2f}; "
                f"{j['live_jaxprs']} / {j['live_jaxprs_after_clear']}",
                f"{h['held_bytes'] / MIB:.2f} / {h['held_bytes_after_clear'] / MIB:.2f}; "
                f"{h['live_jaxprs']} / {h['live_jaxprs_after_clear']}"
                + (f"; {recs} records" if recs is not None else ""))
    if item in (10, 11):
        return ("cache (copies of untiled K/V); XLA temp", f"temp {_b(j['temp_bytes'])}",
                f"{_b(h['cache_bytes'])} ({h['copies']:.2f} copies); temp {_b(h['temp_bytes'])}")
    if item == 12:
        unmodelled = "; 'not modelled' skips" if any("not modelled" in x for x in h["skipped"]) else ""
        return ("cache vs hand K/V; XLA temp", f"temp {_b(j['temp_bytes'])}",
                f"{_b(h['cache_bytes'])} in {len(h['values'])} values ({h['over_hand']:.2f}x hand "
                f"{_b(r['hand_kv_bytes'])}){unmodelled}; temp {_b(h['temp_bytes'])}")
    return "", "", ""


def render_markdown(now: dict, before: dict | None = None) -> str:
    """The table: one row per issue-20 item; jit, hoisted before (``before``'s run) and hoisted now."""
    head = ["item", "probe", "measure", "jit", "hoisted before", "hoisted now"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = {int(k): v for k, v in now["probes"].items()}
    old = {int(k): v for k, v in (before or {}).get("probes", {}).items()}
    for item in sorted(set(rows) | set(ELSEWHERE)):
        if item in ELSEWHERE:
            name, where = ELSEWHERE[item]
            lines.append(f"| {item} | {name} | measured elsewhere | | | {where} |")
            continue
        r = rows[item]
        measure, jit_cell, now_cell = _cells(item, r)
        if item == 2 and r.get("quoted"):
            b = f"jit/hoisted {r['before']['plain_over_hoisted_cpu']:.2f} (quoted: {r['before']['source']})"
        elif before is None:
            b = "not run"
        else:
            b = _cells(item, old.get(item))[2]
        lines.append(f"| {item} | {r['probe']} | {measure} | {jit_cell} | {b} | {now_cell} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvhoist.bench.probes", allow_abbrev=False,
                                description="Issue 20's probes as small programs, jax.jit vs hoist_invariants.")
    p.add_argument("--out", default=None, help="write the JSON here (default: print only)")
    p.add_argument("--before", default=None, help="JSON of the same script run against older code: a column")
    p.add_argument("--quick", action="store_true", help="fewer repeats and signatures (a smoke test)")
    p.add_argument("--items", default="", help="comma-separated issue items to run (default: all)")
    args = p.parse_args(argv)
    only = {int(x) for x in args.items.split(",") if x.strip()} or None
    result = run(quick=args.quick, only=only, progress=lambda s: print(s, file=sys.stderr, flush=True))
    before = None
    if args.before:
        with open(args.before, encoding="utf-8") as f:
            before = json.load(f)
        result["before"] = before
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}", file=sys.stderr)
    code = result["code"]["commit"]
    old = f", before: {before['code']['commit']}" if before else ""
    print(f"kvhoist {code}{old}; jax {result['jax']}, {result['cpu_count']} CPUs, load {result['loadavg_start']} "
          f"-> {result['loadavg_end']}, {result['total_s']} s")
    print(render_markdown(result, before))
    return 0


if __name__ == "__main__":
    sys.exit(main())
