"""The sampler benchmark (``kvhoist bench``): each form at each config run three ways — plain ``jax.jit``,
wan_ref's hand-written K/V cache, ``hoist_invariants`` — interleaved, beside the FLOP model's prediction and a
prediction from the K/V work timed alone; the targets evaluated on the results.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import statistics
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kvhoist.bench.forms import (CONFIGS, FORMS, VARIANTS, BenchConfig, Case, Form, build_case, hand_cache_bytes,
                                 split_kwargs, variant_cache_kwargs)
from kvhoist.bench.markdown import cpu_ratio, fmt_value
from kvhoist.bench.overhead import pass_overhead
from kvhoist.bench.timing import iqr_overlap, machine, peak_rss_mib, time_interleaved, timed, xla_temp_bytes

__all__ = ["bench_form", "check_targets", "run_benchmarks"]


def _kv_seconds(case: Case, form: Form, cfg: BenchConfig, repeats: int) -> tuple[float, float]:
    """(wall, CPU) median seconds of one expert's K/V work run alone: ``model.compute_kv_cache`` on the
    CFG-batched context, jitted — the work hoisting removes from every forward but one per expert."""
    text_tokens = case.args[2].shape[1]
    ctx = jnp.ones((case.context_batch, text_tokens, cfg.text_dim), jnp.float32)
    img = jnp.ones((case.context_batch, 257, cfg.image_dim), jnp.float32) if form.i2v else None
    extra = variant_cache_kwargs(case)
    static = {k: extra.pop(k) for k in [k for k in extra if k == "num_latent_frames"]}
    fn = jax.jit(lambda m, c, i, e: m.compute_kv_cache(c, i, **e, **static))
    cpu: dict[str, list[float]] = {}
    wall = time_interleaved({"kv": lambda: fn(case.models[0], ctx, img, extra)}, repeats=max(repeats, 5), warmup=2,
                            cpu_times=cpu)
    return statistics.median(wall["kv"]), statistics.median(cpu["kv"])


def _host_hoisted(case: Case) -> tuple[Callable[[], Any] | None, Callable[[], int | None], str]:
    """The Python-loop form with automatic (host-loop) hoisting, when kvhoist.host provides it.

    Uses the documented hook: ``sample(..., loop="python", step_fn=hoist_invariants(one_step,
    static_argnames=("plan",), invariant_argnames=("expert", "shared")))``. Returns ``(run, cache_bytes,
    why_not)``; ``run`` is None (and ``why_not`` says why) where that API is missing or fails.
    """
    import importlib
    import inspect

    import kvhoist
    sample_mod = importlib.import_module("wan_ref.sample")  # wan_ref re-exports the function as wan_ref.sample

    def unavailable(why: str):
        return None, lambda: None, "not available: " + why

    if not hasattr(sample_mod, "one_step") or "step_fn" not in inspect.signature(sample_mod.sample).parameters:
        return unavailable("wan_ref.sample has no one_step / step_fn hook (host-loop hoisting not merged yet)")
    if "invariant_argnames" not in inspect.signature(kvhoist.hoist_invariants).parameters:
        return unavailable("kvhoist.hoist_invariants does not take invariant_argnames yet (kvhoist.host not wired)")
    try:
        step = kvhoist.hoist_invariants(sample_mod.one_step, static_argnames=("plan",),
                                        invariant_argnames=("expert", "shared"))
        static, traced = split_kwargs(case.kwargs)

        def run():
            return sample_mod.sample(*case.args, **static, **traced, step_fn=step)

        jax.block_until_ready(run())  # fail here, not in the timing loop
    except Exception as err:  # an API still in flux must not break the whole run
        return unavailable(f"host-loop hoisting failed: {type(err).__name__}: {str(err).splitlines()[0]}")
    return run, lambda: step.cache_info().peak_bytes, ""


def bench_form(cfg: BenchConfig, form: Form, *, repeats: int, warmup: int = 1) -> dict:
    """Times the three variants of one form at one config; returns the JSON-ready result."""
    import kvhoist
    from kvhoist.analysis.cost import jaxpr_flops
    from wan_ref.sample import sample

    case = build_case(cfg, form)
    static, traced = split_kwargs(case.kwargs)
    args = case.args
    result: dict = {"config": cfg.name, "form": form.name, "loop": form.loop,
                    "layers": "scan" if form.scan_layers else "unrolled", "experts": form.experts,
                    "xla_hoists_expected": form.xla_hoists, "note": form.note, "variants": {}}

    fns: dict[str, Callable[[], Any]] = {}
    flops: dict[str, int] = {}
    cache_bytes: dict[str, int] = {"plain": 0, "hand": hand_cache_bytes(case, form, cfg)}
    temp_bytes: dict[str, int | None] = {}
    unavailable: dict[str, str] = {}

    def partial_sample(**more):
        return functools.partial(sample, **static, **more)

    plain_fn = partial_sample()
    hand_fn = partial_sample(kv_cache=True)
    flops["hand"] = jaxpr_flops(jax.make_jaxpr(hand_fn)(*args, **traced))
    if form.loop == "python":  # the Python loop traces to one jitted step call per step
        flops["plain"] = jaxpr_flops(jax.make_jaxpr(plain_fn)(*args, **traced))

    if form.loop == "python":
        # The step is jitted inside sample(); the Python loop itself stays Python.
        fns["plain"] = lambda: plain_fn(*args, **traced)
        fns["hand"] = lambda: hand_fn(*args, **traced)
        host_fn, host_cache_bytes, why = _host_hoisted(case)
        if host_fn is None:
            unavailable["hoisted"] = why
        else:
            fns["hoisted"] = host_fn
    else:
        plain_jit = jax.jit(plain_fn)
        hand_jit = jax.jit(hand_fn)
        hoisted = kvhoist.hoist_invariants(plain_fn)
        t0 = time.perf_counter()
        before, after = hoisted.jaxprs(*args, **traced)
        result["hoist_trace_rewrite_s"] = time.perf_counter() - t0
        report = hoisted.report(*args, **traced)
        flops["plain"] = jaxpr_flops(before)  # what hoist_invariants traced is exactly jax.jit's program
        flops["hoisted"] = jaxpr_flops(after)
        cache_bytes["hoisted"] = report.cache_bytes
        result["hoisted_values"] = len(report.hoisted)
        result["rewrites"] = sorted({n.kind for n in report.notes})
        fns = {"plain": lambda: plain_jit(*args, **traced), "hand": lambda: hand_jit(*args, **traced),
               "hoisted": lambda: hoisted(*args, **traced)}
        for name, low in (("plain", lambda: plain_jit.lower(*args, **traced)),
                          ("hand", lambda: hand_jit.lower(*args, **traced)),
                          ("hoisted", lambda: hoisted.lower(*args, **traced))):
            temp_bytes[name] = None
            result["variants"].setdefault(name, {})
            t0 = time.perf_counter()
            lowered = low()
            temp_bytes[name] = xla_temp_bytes(lowered)
            result["variants"][name]["lower_compile_s"] = time.perf_counter() - t0

    outs = {}
    for name, fn in fns.items():
        outs[name], first = timed(fn)
        result["variants"].setdefault(name, {})["first_call_s"] = first
    ref = np.asarray(outs["plain"])
    result["max_abs_diff_vs_plain"] = {n: float(np.max(np.abs(np.asarray(o) - ref))) for n, o in outs.items()
                                       if n != "plain"}

    cpu: dict[str, list[float]] = {}
    times = time_interleaved(fns, repeats=repeats, warmup=warmup, cpu_times=cpu)
    if form.loop == "python" and "hoisted" in fns:
        cache_bytes["hoisted"] = host_cache_bytes()
    for name in VARIANTS:
        v = result["variants"].setdefault(name, {})
        if name in unavailable:
            v["status"] = unavailable[name]
            continue
        ts = times[name]
        v.update(median_s=statistics.median(ts), min_s=min(ts), max_s=max(ts), times_s=ts,
                 cpu_median_s=statistics.median(cpu[name]), cpu_times_s=cpu[name],
                 flops=flops.get(name), cache_bytes=cache_bytes.get(name), xla_temp_bytes=temp_bytes.get(name))
    med = {n: result["variants"][n].get("median_s") for n in VARIANTS}

    def ratio(a, b):
        return None if a is None or b is None else a / b

    result["ratios"] = {"hoisted_over_hand": ratio(med["hoisted"], med["hand"]),
                        "plain_over_hoisted": ratio(med["plain"], med["hoisted"]),
                        "plain_over_hand": ratio(med["plain"], med["hand"])}
    cpu_med = {n: result["variants"][n].get("cpu_median_s") for n in VARIANTS}
    result["ratios_cpu"] = {"hoisted_over_hand": ratio(cpu_med["hoisted"], cpu_med["hand"]),
                            "plain_over_hoisted": ratio(cpu_med["plain"], cpu_med["hoisted"]),
                            "plain_over_hand": ratio(cpu_med["plain"], cpu_med["hand"])}
    # A CPU ratio whose two samples' interquartile ranges overlap is within the noise: marked, not trusted.
    pairs = {"hoisted_over_hand": ("hoisted", "hand"), "plain_over_hoisted": ("plain", "hoisted"),
             "plain_over_hand": ("plain", "hand")}
    result["ratios_cpu_within_noise"] = {k: iqr_overlap(cpu[a], cpu[b]) for k, (a, b) in pairs.items()
                                         if cpu.get(a) and cpu.get(b)}
    # The same ratios from the fastest repeat: less sensitive to other processes on a shared machine.
    best = {n: result["variants"][n].get("min_s") for n in VARIANTS}
    result["ratios_min"] = {"hoisted_over_hand": ratio(best["hoisted"], best["hand"]),
                            "plain_over_hoisted": ratio(best["plain"], best["hoisted"]),
                            "plain_over_hand": ratio(best["plain"], best["hand"])}
    result["predicted"] = {"plain_over_hoisted": ratio(flops.get("plain"), flops.get("hoisted")),
                           "plain_over_hand": ratio(flops.get("plain"), flops.get("hand"))}
    # A second prediction from measurement instead of FLOPs: hoisting removes the K/V work of every
    # forward but one per expert; its cost is timed alone. Expected plain/hoisted if that is all that
    # changes = T_plain / (T_plain - removed). Counts memory traffic and per-op overhead the FLOP
    # model ignores; exact only if the K/V work costs inside the loop what it costs alone.
    kv_wall, kv_cpu = _kv_seconds(case, form, cfg, repeats)
    removed = max(cfg.steps - form.experts, 0)
    result["kv_seconds"] = {"wall": kv_wall, "cpu": kv_cpu, "forwards_removed": removed}

    def measured_prediction(t_plain, t_kv):
        if t_plain is None or t_plain <= removed * t_kv:
            return None
        return t_plain / (t_plain - removed * t_kv)

    result["predicted"]["measured_kv_plain_over_hoisted"] = measured_prediction(cpu_med["plain"], kv_cpu)
    result["predicted"]["measured_kv_plain_over_hoisted_wall"] = measured_prediction(med["plain"], kv_wall)
    result["peak_rss_mib_after"] = peak_rss_mib()
    return result



def check_targets(results: list[dict]) -> list[dict]:
    """The brief's targets, on CPU-time medians (``value``/``ok``) and on wall-time medians
    (``value_wall``/``ok_wall``); each row says which held and by how much."""
    checks = []

    def add(target, where, test, cpu, wall):
        checks.append({"target": target, "where": where, "value": cpu, "ok": None if cpu is None else test(cpu),
                       "value_wall": wall, "ok_wall": None if wall is None else test(wall)})

    for r in results:
        rat, rcpu, pred = r["ratios"], r["ratios_cpu"], r["predicted"]
        where = f"{r['config']} / {r['form']}"
        add("hoisted <= 1.03x hand-written", where, lambda x: x <= 1.03, rcpu["hoisted_over_hand"],
            rat["hoisted_over_hand"])
        pp = pred["plain_over_hoisted"]
        if rcpu["plain_over_hoisted"] is None or pp is None:
            continue
        if r["xla_hoists_expected"]:
            add("plain/hoisted ~ 1.0 where XLA hoists (0.95..1.05)", where, lambda x: 0.95 <= x <= 1.05,
                rcpu["plain_over_hoisted"], rat["plain_over_hoisted"])
        elif r["loop"] != "python":
            add("(plain/hoisted) / predicted >= 0.9 where XLA misses", where, lambda x: x >= 0.9,
                rcpu["plain_over_hoisted"] / pp, rat["plain_over_hoisted"] / pp)
        mp, mpw = pred.get("measured_kv_plain_over_hoisted"), pred.get("measured_kv_plain_over_hoisted_wall")
        if mp and not r["xla_hoists_expected"]:
            add("(plain/hoisted) / measured-K/V prediction >= 0.9 where XLA misses", where, lambda x: x >= 0.9,
                rcpu["plain_over_hoisted"] / mp, (rat["plain_over_hoisted"] / mpw) if mpw else None)
    return checks


def run_benchmarks(configs: Sequence[str], forms: Sequence[str], *, repeats: int = 7, warmup: int = 1,
                   overhead: bool = True, overhead_layers: int | None = None,
                   log: Callable[[str], None] = print, progress: Any = None) -> dict:
    """Runs every (config, form) and the pass-overhead measurement; returns the JSON-ready dict.

    ``progress``: a :class:`kvhoist.tools.progress.Progress` (or None): its count is the cases done (plus the
    overhead measurement), its phase the case running.
    """
    t_start = time.perf_counter()
    cases = [(c, f) for c in configs for f in forms if not (FORMS[f].i2v and not CONFIGS[c].i2v)]
    if progress is not None:
        progress(0, len(cases) + bool(overhead))
    data: dict = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M %Z"), "repeats": repeats,
                  "warmup": warmup, "configs": {}, "results": [], "pass_overhead": [], "notes": []}
    for cname in configs:
        cfg = CONFIGS[cname]
        data["configs"][cname] = {**dataclasses.asdict(cfg), "latent_tokens": cfg.latent_tokens}
        for fname in forms:
            form = FORMS[fname]
            if form.i2v and not cfg.i2v:
                data["notes"].append(
                    f"{cname} / {fname}: skipped - diffusers' I2V needs exactly 512 text tokens, which at this "
                    "config's latent:text ratio means ~32k latent tokens (too slow for a CPU run); see 'small'.")
                continue
            log(f"[bench] {cname} / {fname} ...")
            if progress is not None:
                progress.phase(f"{cname} / {fname}: trace, compile, {repeats} interleaved repeats")
            t0 = time.perf_counter()
            r = bench_form(cfg, form, repeats=repeats, warmup=warmup)
            if progress is not None:
                progress.update()
            data["results"].append(r)
            rat, pred = r["ratios"], r["predicted"]
            rc, noise = r["ratios_cpu"], r.get("ratios_cpu_within_noise", {})
            log(f"[bench]   {time.perf_counter() - t0:.0f} s; CPU time: hoisted/hand "
                f"{cpu_ratio(rc, noise, 'hoisted_over_hand')}, plain/hoisted {cpu_ratio(rc, noise, 'plain_over_hoisted')} "
                f"(predicted {fmt_value(pred['plain_over_hoisted'])}); "
                f"wall: {fmt_value(rat['hoisted_over_hand'])}, {fmt_value(rat['plain_over_hoisted'])}")
    if overhead:
        log("[bench] pass overhead on wan2.1-t2v-14b (abstract shapes) ...")
        if progress is not None:
            progress.phase("pass overhead on wan2.1-t2v-14b (abstract shapes)")
        data["pass_overhead"] = pass_overhead(num_layers=overhead_layers)
        if progress is not None:
            progress.update()
    if any(r["loop"] == "python" and "median_s" not in r["variants"]["hoisted"] for r in data["results"]):
        data["notes"].append("python loop / hoisted: " + next(
            r["variants"]["hoisted"]["status"] for r in data["results"] if r["loop"] == "python"))
    data["targets"] = check_targets(data["results"])
    data["machine"]["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    data["peak_rss_mib"] = peak_rss_mib()
    data["total_s"] = time.perf_counter() - t_start
    return data
