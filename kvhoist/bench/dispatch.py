"""Per-call dispatch benchmark: what a wrapper costs per call on top of ``jax.jit`` when the step
itself does almost nothing.

Three variants of a step function (``step(params, context, x)`` below) are timed in ONE process,
interleaved (the order rotates every repeat) after warm-up calls (compilation):

* ``jit``: ``jax.jit(step)``;
* ``hoisted``: ``kvhoist.hoist_invariants(step)`` through the public API — whatever
  :mod:`kvhoist.api` is when this runs (re-run it after the API changes);
* ``host``: ``kvhoist.hoist_invariants(step, invariant_argnums=(0, 1))`` — host-loop mode
  (:class:`kvhoist.host.HostHoistedFunction`), every timed call a cache hit.

The step reads every leaf of ``params`` in a way that depends on ``x`` (so host-loop mode must still
pass every leaf to its step) and does one tiny invariant computation on ``context`` (which host-loop
mode caches). Its compute is negligible next to the dispatch: the numbers are the per-call cost of
flattening the arguments, checking them, and launching one executable.

Argument sets (workloads):

* ``pytree16``: ``params`` a dict of 16 small arrays;
* ``dict555``: a dict of 555 small arrays — as many leaves as the NNX model, but flattened by jax's
  C++ pytree code, so the per-leaf costs of each wrapper show instead of NNX's flattening;
* ``nnx555``: ``params`` a wan_ref ``WanModel`` (flax NNX; the tiny-t2v config with 20 unscanned
  layers) of 555 leaves. Flattening an NNX module is Python work in flax (~4 ms here), and every
  variant pays it once per call;
* ``wan_step``: not the synthetic step but ``wan_ref.sample.one_step(plan, expert, shared, latents,
  state)`` on that model, with the arguments of a real ``sample(..., loop="python")`` step (tiny
  shapes, CFG): ``jax.jit(one_step, static_argnames=("plan",))`` vs the two kvhoist forms (host-loop
  with ``invariant_argnames=("expert", "shared")``, as in docs/host_loop.md). Its compute is included,
  so host-loop mode also gains what it hoists (the text embedding and cross-attention K/V);
* ``nnx_kwargs``: a maxdiffusion-style Wan step (:func:`wan_cfg_step`): ``step(model, latents, t, *,
  context=..., negative_context=..., guidance_scale=5.0, sched_state=...)``, the NNX model (tiny-t2v,
  42 leaves) passed as an argument, CFG and the scheduler state by keyword; host-loop mode with
  ``invariant_argnames=("model", "context", "negative_context")`` (issue 20, item 13); ``nnx_kwargs177``
  the same with 6 unscanned layers (177 model leaves).

Per repeat and variant, ``calls`` calls run back to back (outputs are not chained: dispatch is
asynchronous, so this is dispatch throughput) and the last output is waited for; the per-call time is
the batch's time / ``calls``, in process CPU time (all threads, steadier on a shared machine), the
calling thread's CPU time (the Python and C++ dispatch work alone: XLA runs the step on other threads)
and wall time. Reported: median over repeats and the spread (min, max, and the interquartile range).
It is a measurement, not a test: nothing asserts a speed.

Example:
    $ python -m kvhoist.bench.dispatch --out docs/dispatch_bench.json
    >>> from kvhoist.bench.dispatch import run_dispatch_benchmark, markdown_table
    >>> print(markdown_table(run_dispatch_benchmark(repeats=5)))
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from kvhoist.bench.timing import machine, per_call_times

__all__ = ["WORKLOADS", "VARIANTS", "run_dispatch_benchmark", "markdown_table"]

VARIANTS: tuple[str, ...] = ("jit", "hoisted", "host")


def _step(params: Any, context: jax.Array, x: jax.Array) -> jax.Array:
    """Reads every leaf of ``params`` (each read depends on ``x``); ``tanh(context)`` is invariant."""
    kv = jnp.tanh(context).sum()
    acc = x
    for leaf in jax.tree_util.tree_leaves(params):
        acc = acc + x * jnp.ravel(leaf)[0].astype(x.dtype)
    return acc + kv


@dataclasses.dataclass(frozen=True)
class Workload:
    """One argument set for :func:`run_dispatch_benchmark`: ``setup() -> (variants, args)``."""

    name: str
    description: str
    calls: int                                          # calls per timed batch
    setup: Callable[[], tuple]                          # -> (variants, args) or (variants, args, kwargs)


def _pytree(n: int) -> dict:
    rng = np.random.default_rng(0)
    return {f"w{i:03d}": jnp.asarray(rng.standard_normal((8, 8)).astype(np.float32)) for i in range(n)}


def _wan_model(layers: int = 20) -> Any:
    """The tiny-t2v WanModel with ``layers`` unscanned layers (20: 555 leaves)."""
    from flax import nnx

    from wan_ref import WanModel, get_preset

    config = dataclasses.replace(get_preset("tiny-t2v").config, num_layers=layers, scan_layers=False)
    return WanModel(config, rngs=nnx.Rngs(0))


def _step_variants() -> dict[str, Callable]:
    import kvhoist

    return {
        "jit": jax.jit(_step),
        "hoisted": kvhoist.hoist_invariants(_step),
        "host": kvhoist.hoist_invariants(_step, invariant_argnums=(0, 1)),
    }


def _step_setup(build: Callable[[], Any]) -> Callable[[], tuple[dict, tuple]]:
    def setup():
        return _step_variants(), (build(), jnp.ones((8, 16), jnp.float32), jnp.ones((4,), jnp.float32))
    return setup


def _wan_step_setup() -> tuple[dict, tuple]:
    """wan_ref's Python-loop step ``one_step(plan, expert, shared, latents, state)`` on the 555-leaf
    model: the arguments of the first step of a real ``sample`` call (tiny shapes, CFG)."""
    import kvhoist
    from wan_ref.sample import one_step, sample

    model = _wan_model()
    rng = np.random.default_rng(0)
    latents = jnp.asarray(rng.standard_normal((1, 4, 2, 4, 4)).astype(np.float32))
    text = [jnp.asarray(rng.standard_normal((1, 8, model.config.text_dim)).astype(np.float32)) for _ in range(2)]
    jit_step = jax.jit(one_step, static_argnames=("plan",))
    seen: list = []

    def spy(*args):
        seen.append(args)
        return jit_step(*args)

    sample(model, latents, *text, num_inference_steps=2, loop="python", step_fn=spy)
    variants = {
        "jit": jit_step,
        "hoisted": kvhoist.hoist_invariants(one_step, static_argnames=("plan",)),
        "host": kvhoist.hoist_invariants(one_step, static_argnames=("plan",),
                                         invariant_argnames=("expert", "shared")),
    }
    return variants, seen[0]


def wan_cfg_step(model: Any, latents: jax.Array, t: jax.Array, *, context: jax.Array,
                 negative_context: jax.Array, guidance_scale: float, sched_state: dict) -> tuple:
    """A maxdiffusion-style Wan denoising step: the NNX model passed as an argument, classifier-free
    guidance by keyword, a flow-matching Euler update driven by a scheduler state (sigmas, step index).

    Returns ``(latents, sched_state)`` after one step. ``model``, ``context`` and ``negative_context`` are
    the same on every call of a sampling loop (host-loop mode caches the cross-attention K/V of both
    contexts); ``latents``, ``t``, ``guidance_scale`` and ``sched_state`` vary.
    """
    x = jnp.concatenate([latents, latents])
    noise = model(x, jnp.broadcast_to(t, (2,)), jnp.concatenate([context, negative_context]))
    cond, uncond = jnp.split(noise, 2)
    pred = uncond + guidance_scale * (cond - uncond)
    i = sched_state["step"]
    sigmas = sched_state["sigmas"]
    latents = latents + (sigmas[i + 1] - sigmas[i]) * pred
    return latents, {"sigmas": sigmas, "step": i + 1}


def _nnx_kwargs_setup(layers: int = 2, scan_layers: bool = True) -> tuple[dict, tuple, dict]:
    """:func:`wan_cfg_step` on the tiny-t2v WanModel (2 scanned layers: 42 leaves; 6 unscanned: 177),
    8 latent tokens."""
    from flax import nnx

    import kvhoist
    from wan_ref import WanModel, get_preset

    config = dataclasses.replace(get_preset("tiny-t2v").config, num_layers=layers, scan_layers=scan_layers)
    model = WanModel(config, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    latents = jnp.asarray(rng.standard_normal((1, 4, 2, 4, 4)).astype(np.float32))
    context, negative = (jnp.asarray(rng.standard_normal((1, 8, model.config.text_dim)).astype(np.float32))
                         for _ in range(2))
    sched = {"sigmas": jnp.linspace(1.0, 0.0, 11), "step": jnp.asarray(3, jnp.int32)}
    variants = {
        "jit": jax.jit(wan_cfg_step),
        "hoisted": kvhoist.hoist_invariants(wan_cfg_step),
        "host": kvhoist.hoist_invariants(wan_cfg_step, invariant_argnames=("model", "context", "negative_context")),
    }
    kwargs = {"context": context, "negative_context": negative, "guidance_scale": 5.0, "sched_state": sched}
    return variants, (model, latents, jnp.asarray(0.7, jnp.float32)), kwargs


WORKLOADS: dict[str, Workload] = {
    "pytree16": Workload("pytree16", "dict of 16 arrays (8x8 f32); step reads each leaf x-dependently", 400,
                         _step_setup(lambda: _pytree(16))),
    "dict555": Workload("dict555", "dict of 555 arrays (8x8 f32): the NNX model's leaf count without NNX's "
                        "Python flattening; step reads each leaf x-dependently", 100, _step_setup(lambda: _pytree(555))),
    "nnx555": Workload("nnx555", "wan_ref WanModel (flax NNX), tiny-t2v with 20 unscanned layers; step reads "
                       "each leaf x-dependently", 40, _step_setup(_wan_model)),
    "wan_step": Workload("wan_step", "wan_ref.sample.one_step (CFG, 8 latent tokens) on that 555-leaf model: "
                         "a real step, its compute included", 20, _wan_step_setup),
    "nnx_kwargs": Workload("nnx_kwargs", "maxdiffusion-style step(model, latents, t, *, context=..., "
                           "negative_context=..., guidance_scale=5.0, sched_state=...) on the tiny-t2v WanModel "
                           "(NNX, 42 leaves): CFG and scheduler state by keyword, its compute included", 100,
                           _nnx_kwargs_setup),
    "nnx_kwargs177": Workload("nnx_kwargs177", "the same step on tiny-t2v with 6 unscanned layers (184 leaves in "
                              "all): what grows with the model's leaf count", 50,
                              functools.partial(_nnx_kwargs_setup, 6, False)),
}


def _load() -> list | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def _summary(values: list[float]) -> dict:
    q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "q1": q[0], "q3": q[2]}


def run_dispatch_benchmark(workloads: tuple[str, ...] = ("pytree16", "dict555", "nnx555", "wan_step", "nnx_kwargs", "nnx_kwargs177"), *, repeats: int = 15,
                           calls_scale: float = 1.0, path: str | os.PathLike | None = None) -> dict:
    """Times per-call dispatch of ``jax.jit`` / ``hoist_invariants`` / host-loop mode.

    Args:
      workloads: keys of :data:`WORKLOADS`.
      repeats: timed batches per variant and workload, interleaved with rotating order.
      calls_scale: multiplies each workload's calls per batch (shorter or steadier runs).
      path: if given, the result is written there as JSON.
    Returns:
      A JSON-ready dict: ``machine``, ``load_average`` (start, end), ``repeats`` and per workload
      ``leaves``, ``calls``, ``failed`` (variant -> error, for a form that could not run the step) and,
      per variant that ran, ``cpu_us`` / ``thread_us`` / ``wall_us`` summaries
      (``median``, ``min``, ``max``, ``q1``, ``q3``: microseconds per call) and the raw lists
      (``all_cpu_us``, ...); plus ``overhead_us``: per variant and measure, the summary of the paired
      per-call differences from ``jit`` (variant minus jit in the same repeat).
    """
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        raise ValueError(f"unknown dispatch workload(s) {unknown}; known: {', '.join(WORKLOADS)}")
    result: dict = {"machine": machine(), "load_average": {"start": _load()}, "repeats": repeats,
                    "variants": {"jit": "jax.jit(step)", "hoisted": "kvhoist.hoist_invariants(step)",
                                 "host": "kvhoist.hoist_invariants(step, invariant_argnums=(0, 1))"},
                    "workloads": {}}
    t_start = time.perf_counter()
    for wname in workloads:
        w = WORKLOADS[wname]
        fns, args, *rest = w.setup()
        kwargs = rest[0] if rest else {}
        ref = jax.tree_util.tree_leaves(fns["jit"](*args, **kwargs))
        failed = {}
        for name, fn in list(fns.items()):  # warm-up: compile, fill the host cache, check the numbers
            try:
                for _ in range(3):
                    out = fn(*args, **kwargs)
            except Exception as err:  # e.g. a kvhoist form that cannot run this step yet: report it
                failed[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
                del fns[name]
                continue
            for a, b in zip(jax.tree_util.tree_leaves(out), ref, strict=True):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5,
                                           err_msg=f"{wname}/{name} differs from jax.jit")
        calls = max(1, int(w.calls * calls_scale))
        names = list(fns)
        series = per_call_times({k: functools.partial(fns[k], *args, **kwargs) for k in names}, repeats=repeats,
                                calls=calls)
        cpu, thread, wall = series["cpu"], series["thread"], series["wall"]
        entry = {"description": w.description, "leaves": len(jax.tree_util.tree_leaves((args, kwargs))),
                 "calls": calls, "cpu_us": {k: _summary(v) for k, v in cpu.items()},
                 "thread_us": {k: _summary(v) for k, v in thread.items()},
                 "wall_us": {k: _summary(v) for k, v in wall.items()},
                 "all_cpu_us": cpu, "all_thread_us": thread, "all_wall_us": wall, "failed": failed}
        host = fns["host"]
        if hasattr(host, "cache_info"):
            entry["host_cache_info"] = host.cache_info()._asdict()
        # Paired: variant minus jit within each repeat (the two batches ran back to back), which
        # cancels most of the load drift of a shared machine; median and IQR over repeats.
        entry["overhead_us"] = {
            k: {m: _summary([a - b for a, b in zip(series[m][k], series[m]["jit"])]) for m in series}
            for k in names if k != "jit"}
        result["workloads"][wname] = entry
    result["load_average"]["end"] = _load()
    result["seconds"] = time.perf_counter() - t_start
    if path is not None:
        with open(path, "w") as fh:
            json.dump(result, fh, indent=2, default=str)
    return result


def markdown_table(result: dict) -> str:
    """The result as a markdown table: per-call us, median (IQR; min-max), per workload and variant."""
    lines = ["| workload | leaves | variant | process CPU us/call | caller-thread CPU us/call | wall us/call "
             "| over jit, paired: CPU | thread | wall |",
             "|---|---|---|---|---|---|---|---|---|"]

    def cell(s: dict, sign: str = "") -> str:
        return (f"{s['median']:{sign}.1f} ({s['q1']:{sign}.1f} to {s['q3']:{sign}.1f}; "
                f"{s['min']:{sign}.1f} to {s['max']:{sign}.1f})")

    for wname, e in result["workloads"].items():
        for k in e["cpu_us"]:
            over = e["overhead_us"].get(k)
            diff = " |  | " if over is None else " | ".join(cell(over[m], "+") for m in ("cpu", "thread", "wall"))
            lines.append(f"| {wname} | {e['leaves']} | {k} | {cell(e['cpu_us'][k])} | {cell(e['thread_us'][k])} "
                         f"| {cell(e['wall_us'][k])} | {diff} |")
        for k, why in e.get("failed", {}).items():
            lines.append(f"| {wname} | {e['leaves']} | {k} | failed: {why.replace('|', '/')} | | | | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvhoist.bench.dispatch", allow_abbrev=False, description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", nargs="+", default=["pytree16", "dict555", "nnx555", "wan_step", "nnx_kwargs", "nnx_kwargs177"], choices=sorted(WORKLOADS))
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--calls-scale", type=float, default=1.0)
    ap.add_argument("--out", default=None, help="write the JSON result here")
    args = ap.parse_args(argv)
    res = run_dispatch_benchmark(tuple(args.workloads), repeats=args.repeats, calls_scale=args.calls_scale,
                                 path=args.out)
    print(markdown_table(res))
    print(f"load average: start {res['load_average']['start']}, end {res['load_average']['end']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
