"""``kvhoist bench``: plain ``jax.jit`` vs a hand-written K/V cache vs ``hoist_invariants``, measured.

For each sampler form (step ``scan`` x layer ``scan``; step ``scan`` x unrolled layers; ``fori_loop``;
Wan 2.2 expert ``cond``; I2V with CFG; a Python loop around a jitted step) and each config, three
variants of :func:`wan_ref.sample.sample` run in ONE process, interleaved (the order rotates every
repeat), and the medians are reported:

* ``plain``: ``jax.jit(sample)`` - whatever XLA hoists on its own;
* ``hand``: wan_ref's hand-written cache, ``sample(..., kv_cache=True)``;
* ``hoisted``: ``kvhoist.hoist_invariants(sample)``.

Beside each measured speed-up sits the FLOP model's prediction
(:func:`kvhoist.analysis.cost.jaxpr_flops` of the traced programs: ``flops_before / flops_after``).
The run also measures the pass's own overhead on the full-size Wan 2.1 14B sampler traced with abstract
shapes (trace + rewrite vs XLA's lower + compile), and the bytes each variant caches.

``--quick`` is a separate, short script for an accelerator machine (< 5 minutes): it asks whether XLA
hoists the invariant K/V projections out of the step loop on its own (structurally: matmuls left in the
while body, plain vs hand-cached; and by timing), on a pure-JAX toy sampler and, when flax is installed,
on wan_ref's unrolled-layer form. That path imports neither torch nor diffusers, and works without
networkx/flax (the variants that need them are then reported as unavailable).

Benchmarks are measurements, not tests: nothing here asserts a speed. The targets are evaluated and
reported (``targets`` in the JSON) so a reader sees which held.

Example:
    $ python -m kvhoist.bench --out docs/benchmarks.json --markdown docs/benchmarks.md
    $ python -m kvhoist.bench --quick            # on a GPU/TPU machine
    $ python kvhoist/bench.py --quick            # the same, with only jax installed (no kvhoist deps)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kvhoist.hlo import MATMUL_PATTERNS, hlo_loop_op_counts

__all__ = [
    "BenchConfig", "CONFIGS", "FORMS", "add_arguments", "main", "run_benchmarks", "render_markdown",
    "time_interleaved", "quick", "toy_sampler",
]

# ------------------------------------------------------------------------------------------------------
# Configs and forms
# ------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """Model and sampling sizes of one benchmark config.

    Attributes:
      name: key in :data:`CONFIGS`.
      description: one line for the report.
      heads, head_dim: attention heads and head width (D = heads * head_dim).
      ffn_dim, num_layers, text_dim: as in ``wan_ref.WanConfig``.
      text_tokens: text context length (the I2V form always uses 512, as diffusers requires).
      latent_fhw: latent (frames, height, width); tokens = F * H/2 * W/2 with patch (1, 2, 2).
      z_dim: latent channels.
      batch: prompts per run (CFG doubles the model batch).
      steps: denoising steps.
      image_dim: CLIP embedding width for the I2V form (257 image tokens).
      i2v: whether the I2V form runs for this config.
    """

    name: str
    description: str
    heads: int
    head_dim: int
    ffn_dim: int
    num_layers: int
    text_dim: int
    text_tokens: int
    latent_fhw: tuple[int, int, int]
    z_dim: int = 16
    batch: int = 1
    steps: int = 10
    image_dim: int = 128
    i2v: bool = True

    @property
    def dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def latent_tokens(self) -> int:
        f, h, w = self.latent_fhw
        return f * (h // 2) * (w // 2)


CONFIGS: dict[str, BenchConfig] = {
    "small": BenchConfig(
        "small", "cross-attention dominates: 16 latent tokens vs 512 text tokens, D=256, 4 layers",
        heads=4, head_dim=64, ffn_dim=1024, num_layers=4, text_dim=256, text_tokens=512,
        latent_fhw=(1, 8, 8), steps=10),
    "realistic-ratio": BenchConfig(
        "realistic-ratio",
        "Wan 2.1 14B 480p proportions (32760 latent : 512 text tokens = 64:1) scaled down 64x: "
        "512 latent tokens vs 8 text tokens, D=128, 4 layers",
        heads=2, head_dim=64, ffn_dim=352, num_layers=4, text_dim=104, text_tokens=8,
        latent_fhw=(2, 32, 32), steps=4,
        # diffusers' I2V needs exactly 512 text tokens; at 64:1 that is ~32k latent tokens.
        i2v=False),
}
"""The benchmark configs (``--config``)."""


@dataclasses.dataclass(frozen=True)
class Form:
    """A sampler form: how the steps and layers loop, and what XLA is expected to do with it."""

    name: str
    loop: str            # wan_ref.sample loop=
    scan_layers: bool
    experts: int = 1
    i2v: bool = False
    xla_hoists: bool = False   # does plain jax.jit (XLA-CPU's while-loop LICM) hoist the K/V dots itself?
    note: str = ""
    variant: str = "wan"       # "vace" (wan_ref.vace) or "animate" (wan_ref.animate; implies the I2V inputs)


FORMS: dict[str, Form] = {f.name: f for f in [
    Form("scan x layer-scan", "scan", True, note="nested layer scan: XLA's LICM does not enter it"),
    Form("scan x unrolled", "scan", False, xla_hoists=True,
         note="top-level ops of the while body: XLA-CPU's WhileLoopInvariantCodeMotion hoists them"),
    Form("fori x layer-scan", "fori", True, note="fori_loop with static bounds is a scan"),
    Form("expert cond (A14B)", "scan", False, experts=2,
         note="two experts behind lax.cond (unrolled layers, so the cond is the only obstacle)"),
    Form("I2V + CFG", "scan", True, i2v=True, note="text + image K/V (257 image tokens padded to 384)"),
    Form("python loop", "python", True, note="a Python loop calling one jitted step"),
    Form("VACE + CFG", "scan", True, variant="vace",
         note="VACE: control video (96 ch) embedded + proj_in, hints after blocks 0 and 2; text K/V of 4 + 2 blocks"),
    Form("Animate + CFG", "scan", True, i2v=True, variant="animate",
         note="Wan Animate: pose latents, 4 face frames through a 32 px motion encoder, face adapters after "
              "blocks 0 and 2 (lax.cond in the layer scan), text + CLIP K/V; 2 latent frames"),
]}
"""The sampler forms (``--forms``)."""

VARIANTS = ("plain", "hand", "hoisted")


# ------------------------------------------------------------------------------------------------------
# Timing and memory helpers
# ------------------------------------------------------------------------------------------------------


def time_interleaved(fns: dict[str, Callable[[], Any]], *, repeats: int, warmup: int = 1,
                     cpu_times: dict[str, list[float]] | None = None,
                     on_call: Callable[[str], None] | None = None) -> dict[str, list[float]]:
    """Wall times of each ``fns[name]()`` (blocked until ready), interleaved, order rotated per repeat.

    Interleaving spreads the noise of a shared machine over all variants instead of one. ``warmup``
    untimed rounds run first (compilation happens there). If ``cpu_times`` is given, it is filled with
    the process CPU time (all threads, ``time.process_time``) of each call: on a machine shared with
    other jobs that is far steadier than wall time (it does not count time spent waiting for a core).
    ``on_call(name)`` runs after every call, warm-up ones included (``(warmup + repeats) * len(fns)``
    calls: a progress bar's count), outside the timed region.

    Returns:
      ``{name: [seconds per repeat]}``.
    """
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            jax.block_until_ready(fns[n]())
            if on_call is not None:
                on_call(n)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            c0, t0 = time.process_time(), time.perf_counter()
            jax.block_until_ready(fns[n]())
            times[n].append(time.perf_counter() - t0)
            if cpu_times is not None:
                cpu_times.setdefault(n, []).append(time.process_time() - c0)
            if on_call is not None:
                on_call(n)
    return times


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - t0


def _tree_bytes(tree: Any) -> int:
    return int(sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree)
                   if hasattr(x, "shape")))


def _peak_rss_mib() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def _temp_bytes(lowered: Any) -> int | None:
    """XLA's temporary buffer bytes for a lowered program (None where the backend does not say)."""
    try:
        stats = lowered.compile().memory_analysis()
        return int(stats.temp_size_in_bytes) if stats is not None else None
    except Exception:  # memory_analysis is optional per backend
        return None


def _machine() -> dict:
    dev = jax.devices()[0]
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "jax": jax.__version__,
            "jaxlib": getattr(__import__("jaxlib"), "__version__", "?"), "backend": jax.default_backend(),
            "device": f"{dev.platform}:{getattr(dev, 'device_kind', '?')}", "device_count": jax.device_count(),
            "loadavg_start": list(load) if load else None}


# ------------------------------------------------------------------------------------------------------
# Building one benchmark case
# ------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    """Everything a form needs to run: models, inputs and ``sample`` keyword arguments."""

    args: tuple
    kwargs: dict
    models: tuple
    context_batch: int


# The small Animate face path of the "Animate + CFG" form: 32 px faces, 4 frames (-> 2 motion frames).
_ANIMATE_FACE = dict(motion_encoder_size=32, motion_encoder_channel_sizes={"4": 128, "8": 128, "16": 64, "32": 32},
                     motion_style_dim=128, motion_dim=20, motion_encoder_dim=128, face_encoder_hidden_dim=128,
                     face_encoder_num_heads=4, inject_face_latents_blocks=2, motion_encoder_batch_size=8)
_ANIMATE_FACE_FRAMES = 4


def _wan_config(cfg: BenchConfig, form: Form):
    from wan_ref.config import WanConfig

    extra = {}
    in_channels = cfg.z_dim
    if form.i2v:
        in_channels = 2 * cfg.z_dim + 4
        extra = dict(image_dim=cfg.image_dim, added_kv_proj_dim=cfg.dim)
    base = dict(num_attention_heads=cfg.heads, attention_head_dim=cfg.head_dim, in_channels=in_channels,
                out_channels=cfg.z_dim, text_dim=cfg.text_dim, ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers,
                scan_layers=form.scan_layers, **extra)
    if form.variant == "vace":
        from wan_ref.vace import WanVACEConfig

        return WanVACEConfig(**base, vace_layers=(0, 2), vace_in_channels=2 * cfg.z_dim + 64)
    if form.variant == "animate":
        from wan_ref.animate import WanAnimateConfig

        return WanAnimateConfig(**base, latent_channels=cfg.z_dim, **_ANIMATE_FACE)
    return WanConfig(**base)


def _model_class(form: Form):
    if form.variant == "vace":
        from wan_ref.vace import WanVACEModel
        return WanVACEModel
    if form.variant == "animate":
        from wan_ref.animate import WanAnimateModel
        return WanAnimateModel
    from wan_ref.model import WanModel
    return WanModel


def build_case(cfg: BenchConfig, form: Form, seed: int = 0) -> Case:
    """Random models and inputs for ``form`` at ``cfg`` (CFG on, UniPC, float32)."""
    from flax import nnx

    wcfg = _wan_config(cfg, form)
    models = tuple(_model_class(form)(wcfg, rngs=nnx.Rngs(seed + i)) for i in range(form.experts))
    keys = jax.random.split(jax.random.key(seed + 100), 7)
    f, h, w = cfg.latent_fhw
    if form.variant == "animate":
        f = max(f, 2)  # frame 0 is the reference; the pose latents cover frames 1..F-1
    b = cfg.batch
    text_tokens = 512 if form.i2v else cfg.text_tokens
    latents = jax.random.normal(keys[0], (b, cfg.z_dim, f, h, w), jnp.float32)
    pe = jax.random.normal(keys[1], (b, text_tokens, cfg.text_dim), jnp.float32)
    npe = jax.random.normal(keys[2], (b, text_tokens, cfg.text_dim), jnp.float32)
    kwargs: dict = dict(num_inference_steps=cfg.steps, guidance_scale=5.0, flow_shift=3.0, loop=form.loop)
    if form.experts == 2:
        kwargs.update(model_2=models[1], boundary_ratio=0.875, guidance_scale_2=3.0, flow_shift=12.0)
    if form.i2v:
        kwargs["image_embeds"] = jax.random.normal(keys[3], (b, 257, cfg.image_dim), jnp.float32)
        kwargs["condition"] = jax.random.normal(keys[4], (b, cfg.z_dim + 4, f, h, w), jnp.float32)
    if form.variant == "vace":
        kwargs["control_hidden_states"] = jax.random.normal(keys[5], (b, wcfg.vace_in_channels, f, h, w),
                                                            jnp.float32)
    elif form.variant == "animate":
        size = wcfg.motion_encoder_size
        kwargs["pose_hidden_states"] = jax.random.normal(keys[5], (b, cfg.z_dim, f - 1, h, w), jnp.float32)
        kwargs["face_pixel_values"] = jax.random.uniform(keys[6], (b, 3, _ANIMATE_FACE_FRAMES, size, size),
                                                         jnp.float32, -1.0, 1.0)
    return Case((models[0], latents, pe, npe), kwargs, models, 2 * b)


def _variant_cache_kwargs(case: Case, abstract: bool = False) -> dict:
    """The VACE / Animate keyword inputs of ``compute_kv_cache`` at the CFG batch (abstract: shapes only)."""
    out = {}
    for name in ("control_hidden_states", "pose_hidden_states", "face_pixel_values"):
        if name in case.kwargs:
            x = case.kwargs[name]
            shape = (case.context_batch, *x.shape[1:])
            out[name] = jax.ShapeDtypeStruct(shape, x.dtype) if abstract else jnp.concatenate([x, x])
    if "control_hidden_states" in out:
        out["num_latent_frames"] = case.args[1].shape[2]
    return out


def _split_kwargs(kwargs: dict) -> tuple[dict, dict]:
    """(static, traced) keyword arguments of ``sample``: arrays and models are traced."""
    traced_names = ("model_2", "image_embeds", "condition", "control_hidden_states", "pose_hidden_states",
                    "face_pixel_values")
    return ({k: v for k, v in kwargs.items() if k not in traced_names},
            {k: v for k, v in kwargs.items() if k in traced_names})


def _kv_seconds(case: Case, form: Form, cfg: BenchConfig, repeats: int) -> tuple[float, float]:
    """(wall, CPU) median seconds of one expert's K/V work run alone: ``model.compute_kv_cache`` on the
    CFG-batched context, jitted — the work hoisting removes from every forward but one per expert."""
    text_tokens = case.args[2].shape[1]
    ctx = jnp.ones((case.context_batch, text_tokens, cfg.text_dim), jnp.float32)
    img = jnp.ones((case.context_batch, 257, cfg.image_dim), jnp.float32) if form.i2v else None
    extra = _variant_cache_kwargs(case)
    static = {k: extra.pop(k) for k in [k for k in extra if k == "num_latent_frames"]}
    fn = jax.jit(lambda m, c, i, e: m.compute_kv_cache(c, i, **e, **static))
    cpu: dict[str, list[float]] = {}
    wall = time_interleaved({"kv": lambda: fn(case.models[0], ctx, img, extra)}, repeats=max(repeats, 5), warmup=2,
                            cpu_times=cpu)
    return statistics.median(wall["kv"]), statistics.median(cpu["kv"])


def _hand_cache_bytes(case: Case, form: Form, cfg: BenchConfig) -> int:
    """Bytes of the KVCache pytrees ``sample(kv_cache=True)`` builds (one per expert, CFG batch)."""
    text_tokens = case.args[2].shape[1]
    ctx = jax.ShapeDtypeStruct((case.context_batch, text_tokens, cfg.text_dim), jnp.float32)
    img = None
    if form.i2v:
        img = jax.ShapeDtypeStruct((case.context_batch, 257, cfg.image_dim), jnp.float32)
    extra = _variant_cache_kwargs(case, abstract=True)
    static = {k: extra.pop(k) for k in [k for k in extra if k == "num_latent_frames"]}
    return sum(_tree_bytes(jax.eval_shape(lambda c, i, e: m.compute_kv_cache(c, i, **e, **static), ctx, img, extra))
               for m in case.models)


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
        static, traced = _split_kwargs(case.kwargs)

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
    static, traced = _split_kwargs(case.kwargs)
    args = case.args
    result: dict = {"config": cfg.name, "form": form.name, "loop": form.loop,
                    "layers": "scan" if form.scan_layers else "unrolled", "experts": form.experts,
                    "xla_hoists_expected": form.xla_hoists, "note": form.note, "variants": {}}

    fns: dict[str, Callable[[], Any]] = {}
    flops: dict[str, int] = {}
    cache_bytes: dict[str, int] = {"plain": 0, "hand": _hand_cache_bytes(case, form, cfg)}
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
            temp_bytes[name] = _temp_bytes(lowered)
            result["variants"][name]["lower_compile_s"] = time.perf_counter() - t0

    outs = {}
    for name, fn in fns.items():
        outs[name], first = _timed(fn)
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
    result["peak_rss_mib_after"] = _peak_rss_mib()
    return result


# ------------------------------------------------------------------------------------------------------
# Pass overhead on the full-size Wan 2.1 14B sampler (abstract shapes)
# ------------------------------------------------------------------------------------------------------


def pass_overhead(*, preset: str = "wan2.1-t2v-14b", num_layers: int | None = None, steps: int = 50,
                  height: int = 480, width: int = 832, scan_layers: Sequence[bool] = (True, False)) -> list[dict]:
    """Trace + rewrite time of ``hoist_invariants`` vs XLA lower + compile, on abstract shapes.

    The model comes from ``nnx.eval_shape`` (no weights are allocated); arguments are
    ``jax.ShapeDtypeStruct``; parameters and activations are bfloat16 as in the released checkpoints.
    ``jax.clear_caches()`` runs before each measurement so nothing is reused from the previous one.
    """
    import kvhoist
    from flax import nnx

    from kvhoist import compat
    from kvhoist.analysis.cost import jaxpr_flops
    from wan_ref.model import WanModel
    from wan_ref.presets import get_preset
    from wan_ref.sample import sample

    p = get_preset(preset)
    rows = []
    for sl in scan_layers:
        changes: dict = dict(scan_layers=sl, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
        if num_layers is not None:
            changes["num_layers"] = num_layers
        wcfg = p.config.replace(**changes)
        t0 = time.perf_counter()
        model = nnx.eval_shape(lambda: WanModel(wcfg, rngs=nnx.Rngs(0)))
        eval_shape_s = time.perf_counter() - t0
        lat = jax.ShapeDtypeStruct(p.latent_shape(1, height, width), jnp.float32)
        pe = jax.ShapeDtypeStruct((1, 512, wcfg.text_dim), jnp.bfloat16)
        fn = functools.partial(sample, num_inference_steps=steps, guidance_scale=p.guidance_scale,
                               flow_shift=p.flow_shift)
        jax.clear_caches()
        t0 = time.perf_counter()
        before = jax.make_jaxpr(fn)(model, lat, pe, pe)
        trace_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        after, report = kvhoist.optimize(before)
        rewrite_s = time.perf_counter() - t0
        jax.clear_caches()
        t0 = time.perf_counter()
        lowered = jax.jit(fn).lower(model, lat, pe, pe)
        lower_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        lowered.compile()
        compile_s = time.perf_counter() - t0
        jax.clear_caches()
        t0 = time.perf_counter()
        hlow = jax.jit(compat.jaxpr_as_fun(after)).lower(*jax.tree_util.tree_leaves((model, lat, pe, pe)))
        hlower_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        hlow.compile()
        hcompile_s = time.perf_counter() - t0
        fb, fa = jaxpr_flops(before), jaxpr_flops(after)
        rows.append({
            "preset": preset, "scan_layers": sl, "num_layers": wcfg.num_layers, "steps": steps,
            "video": f"{height}x{width}x{p.num_frames}", "latent_shape": list(lat.shape), "dtype": "bfloat16",
            "eval_shape_s": eval_shape_s, "trace_s": trace_s, "rewrite_s": rewrite_s,
            "xla_lower_s": lower_s, "xla_compile_s": compile_s,
            "hoisted_lower_s": hlower_s, "hoisted_compile_s": hcompile_s,
            "overhead_fraction": (trace_s + rewrite_s) / (lower_s + compile_s),
            "hoisted_values": len(report.hoisted), "cache_bytes": report.cache_bytes,
            "flops_before": fb, "flops_after": fa, "predicted_speedup": fb / fa,
        })
    return rows


# ------------------------------------------------------------------------------------------------------
# Targets and rendering
# ------------------------------------------------------------------------------------------------------


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


def _f(x: float | None, fmt: str = "{:.3f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def _ms(v: dict) -> str:
    if "median_s" not in v:
        return "n/a"
    return f"{1e3 * v['median_s']:.1f} ({1e3 * v['min_s']:.0f}-{1e3 * v['max_s']:.0f})"


def _mib(b: int | None) -> str:
    return "n/a" if b is None else f"{b / 2**20:.2f}"


def render_markdown(data: dict) -> str:
    """The benchmark JSON as a markdown page (docs/benchmarks.md)."""
    m = data["machine"]
    out = ["# kvhoist benchmarks", "",
           f"Generated by `{data['command']}` on {data['date']} ({data['total_s']:.0f} s).", "",
           f"Machine: {m['processor']}, {m['cpu_count']} CPUs, {m['platform']}; Python {m['python']}, "
           f"jax {m['jax']}, jaxlib {m['jaxlib']}, backend {m['backend']} ({m['device']}). "
           f"Load average at start {m['loadavg_start']}, at end {m.get('loadavg_end')} - the machine is shared, "
           "so timings are noisy: the three variants of a form run interleaved in one process (order rotated "
           f"every repeat), {data['repeats']} timed repeats after {data['warmup']} warm-up round(s); medians "
           "are reported, with (min-max) in milliseconds.", "",
           "Variants: **plain** = `jax.jit(sample)`; **hand** = `sample(..., kv_cache=True)` (wan_ref's "
           "hand-written K/V cache); **hoisted** = `kvhoist.hoist_invariants(sample)`. "
           "**predicted** = FLOP model (`kvhoist.analysis.cost.jaxpr_flops`) of the traced programs, "
           "flops(plain) / flops(hoisted); **predicted from measured K/V** = T_plain / (T_plain - r * T_kv), "
           "with T_kv the CPU time of one expert's K/V work (`compute_kv_cache`, jitted) run alone and r the "
           "forwards whose K/V hoisting removes (steps - experts): it counts the memory traffic and per-op "
           "overhead the FLOP model ignores; **measured** = median(plain) / median(hoisted).", ""]
    out += ["## Configs", "", "| config | D | layers | heads | FFN | text tokens | latent tokens | steps | batch (CFG x2) | note |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for c in data["configs"].values():
        out.append(f"| {c['name']} | {c['heads'] * c['head_dim']} | {c['num_layers']} | {c['heads']} | "
                   f"{c['ffn_dim']} | {c['text_tokens']} | {c['latent_tokens']} | {c['steps']} | {c['batch']} | "
                   f"{c['description']} |")
    out += ["", "## Times and ratios", "",
            "CPU = median process CPU time per run (all threads); wall = median wall time. Ratios are of "
            "medians. CPU time is the steadier measure on this shared machine (it does not count waiting "
            "for a core); wall times are shown for completeness.", "",
            "| config | form | layers | CPU ms plain / hand / hoisted | wall ms plain / hand / hoisted "
            "| hoisted/hand CPU (wall) | plain/hoisted CPU (wall) | predicted | CPU/predicted "
            "| predicted from measured K/V (CPU) | plain/hand CPU | plain/hand predicted |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def ms(v, key):
        return f"{1e3 * v[key]:.0f}" if key in v else "n/a"
    for r in data["results"]:
        v, rat, pred, rc = r["variants"], r["ratios"], r["predicted"], r["ratios_cpu"]
        eff = None
        if rc["plain_over_hoisted"] is not None and pred["plain_over_hoisted"]:
            eff = rc["plain_over_hoisted"] / pred["plain_over_hoisted"]
        out.append(f"| {r['config']} | {r['form']} | {r['layers']} | "
                   f"{ms(v['plain'], 'cpu_median_s')} / {ms(v['hand'], 'cpu_median_s')} / "
                   f"{ms(v['hoisted'], 'cpu_median_s')} | {ms(v['plain'], 'median_s')} / "
                   f"{ms(v['hand'], 'median_s')} / {ms(v['hoisted'], 'median_s')} | "
                   f"{_f(rc['hoisted_over_hand'])} ({_f(rat['hoisted_over_hand'])}) | "
                   f"{_f(rc['plain_over_hoisted'])} ({_f(rat['plain_over_hoisted'])}) | "
                   f"{_f(pred['plain_over_hoisted'])} | {_f(eff)} | "
                   f"{_f(pred.get('measured_kv_plain_over_hoisted'))} | {_f(rc['plain_over_hand'])} | "
                   f"{_f(pred['plain_over_hand'])} |")
        if "status" in v["hoisted"]:
            out.append(f"| | | | hoisted: {v['hoisted']['status']} | | | | | | | | |")
    out += ["", "## Memory", "",
            "Cache = bytes held across the step loop: `report.cache_bytes` for hoisted, the `KVCache` pytrees "
            "(one per expert) for hand, nothing for plain. XLA temp = `compiled.memory_analysis()."
            "temp_size_in_bytes`. Peak RSS is the process's `ru_maxrss` after the form ran (cumulative).", "",
            "| config | form | hand cache MiB | hoisted cache MiB | XLA temp MiB plain / hand / hoisted | "
            "peak RSS MiB | max abs diff vs plain (hand, hoisted) |",
            "|---|---|---|---|---|---|---|"]
    for r in data["results"]:
        v = r["variants"]
        diffs = r["max_abs_diff_vs_plain"]
        out.append(f"| {r['config']} | {r['form']} | {_mib(v['hand'].get('cache_bytes'))} | "
                   f"{_mib(v['hoisted'].get('cache_bytes'))} | {_mib(v['plain'].get('xla_temp_bytes'))} / "
                   f"{_mib(v['hand'].get('xla_temp_bytes'))} / {_mib(v['hoisted'].get('xla_temp_bytes'))} | "
                   f"{r['peak_rss_mib_after']:.0f} | {_f(diffs.get('hand'), '{:.1e}')}, "
                   f"{_f(diffs.get('hoisted'), '{:.1e}')} |")
    if data.get("pass_overhead"):
        out += ["", "## Pass overhead (abstract shapes, nothing allocated)", "",
                "`hoist_invariants`' own cost - tracing `sample` to a jaxpr and running the kvhoist pipeline - "
                "against XLA lowering + compiling the same program (plain) and the rewritten one (hoisted).", "",
                "| preset | layers | scan_layers | steps | latent | trace s | rewrite s | XLA lower s | XLA compile s "
                "| hoisted lower + compile s | (trace+rewrite)/(lower+compile) | hoisted values | cache | predicted speedup |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for p in data["pass_overhead"]:
            out.append(f"| {p['preset']} | {p['num_layers']} | {p['scan_layers']} | {p['steps']} | "
                       f"{'x'.join(map(str, p['latent_shape']))} | {p['trace_s']:.2f} | {p['rewrite_s']:.2f} | "
                       f"{p['xla_lower_s']:.2f} | {p['xla_compile_s']:.2f} | "
                       f"{p['hoisted_lower_s'] + p['hoisted_compile_s']:.2f} | {p['overhead_fraction']:.2f} | "
                       f"{p['hoisted_values']} | {p['cache_bytes'] / 2**20:.0f} MiB | {p['predicted_speedup']:.5f} |")
    out += ["", "## Targets", "", "| target | where | CPU-time value | held | wall-time value | held |",
            "|---|---|---|---|---|---|"]

    def held(ok):
        return "n/a" if ok is None else ("yes" if ok else "**no**")
    for c in data["targets"]:
        out.append(f"| {c['target']} | {c['where']} | {_f(c['value'])} | {held(c['ok'])} | "
                   f"{_f(c['value_wall'])} | {held(c['ok_wall'])} |")
    notes = list(data.get("notes", [])) + [
        "Predicted speed-ups count FLOPs only (dots at 2 FLOPs per multiply-add, 1 per elementwise output). "
        "Memory traffic, softmax/normalisation passes, loop and dispatch overhead do not shrink with "
        "hoisting, so measured speed-ups sit below the prediction on small shapes; compare "
        "'plain/hand CPU' with 'plain/hand predicted' for the same gap in the hand-written cache.",
        "The realistic-ratio config predicts ~1.001-1.003x: at Wan's proportions the text K/V are ~0.1% of "
        "the work and any measured difference there is noise.",
        "Python loop: 'hoisted' is host-loop hoisting (`hoist_invariants(one_step, invariant_argnames=...)` "
        "passed as `sample(..., loop='python', step_fn=...)`); no FLOP prediction is made for it.",
        "Regenerate: `kvhoist bench --out docs/benchmarks.json --markdown docs/benchmarks.md` (~10-15 min on "
        "2 busy cores); re-render only: `kvhoist bench --from-json docs/benchmarks.json --markdown "
        "docs/benchmarks.md`.",
    ]
    out += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------------------
# The full run
# ------------------------------------------------------------------------------------------------------


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
    data: dict = {"machine": _machine(), "date": time.strftime("%Y-%m-%d %H:%M %Z"), "repeats": repeats,
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
            rc = r["ratios_cpu"]
            log(f"[bench]   {time.perf_counter() - t0:.0f} s; CPU time: hoisted/hand {_f(rc['hoisted_over_hand'])}, "
                f"plain/hoisted {_f(rc['plain_over_hoisted'])} (predicted {_f(pred['plain_over_hoisted'])}); "
                f"wall: {_f(rat['hoisted_over_hand'])}, {_f(rat['plain_over_hoisted'])}")
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
    data["peak_rss_mib"] = _peak_rss_mib()
    data["total_s"] = time.perf_counter() - t_start
    return data


# ------------------------------------------------------------------------------------------------------
# --quick: the accelerator script
# ------------------------------------------------------------------------------------------------------


def _toy_params(key, *, d: int, ffn: int, text_dim: int, layers: int, stacked: bool):
    names = {"wq": (d, d), "wk": (text_dim, d), "wv": (text_dim, d), "wo": (d, d), "w1": (d, ffn), "w2": (ffn, d)}
    keys = jax.random.split(key, len(names) * layers)
    per_layer = []
    for i in range(layers):
        per_layer.append({n: jax.random.normal(keys[i * len(names) + j], s, jnp.float32) * s[0] ** -0.5
                          for j, (n, s) in enumerate(names.items())})
    if stacked:
        return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *per_layer)
    return per_layer


def _toy_layer(p, x, k, v, heads):
    b, n, d = x.shape
    q = (x @ p["wq"]).reshape(b, n, heads, -1)
    logits = jnp.einsum("bnhd,bshd->bhns", q, k.reshape(b, -1, heads, d // heads)) / math.sqrt(d // heads)
    att = jnp.einsum("bhns,bshd->bnhd", jax.nn.softmax(logits, -1), v.reshape(b, -1, heads, d // heads))
    x = x + att.reshape(b, n, d) @ p["wo"]
    return x + jax.nn.gelu(x @ p["w1"]) @ p["w2"]


def toy_sampler(params, x, ctx, *, steps: int, stacked: bool, hand_cache: bool, heads: int = 8):
    """A pure-JAX stand-in for a DiT sampler: per layer, cross-attention to ``ctx`` + an MLP, ``steps``
    Euler-like updates in a ``lax.scan``; layers in a nested ``lax.scan`` (``stacked``) or unrolled.
    ``hand_cache`` computes every layer's K/V of ``ctx`` once before the loop."""
    def kv(p):
        return ctx @ p["wk"], ctx @ p["wv"]

    cache = None
    if hand_cache:
        cache = jax.lax.map(kv, params) if stacked else [kv(p) for p in params]

    def forward(h):
        if stacked:
            def layer(h, xs):
                p, c = xs
                k, v = kv(p) if c is None else c
                return _toy_layer(p, h, k, v, heads), None
            return jax.lax.scan(layer, h, (params, cache))[0]
        for i, p in enumerate(params):
            k, v = kv(p) if cache is None else cache[i]
            h = _toy_layer(p, h, k, v, heads)
        return h

    def step(h, _):
        return h - 0.05 * forward(h), None

    return jax.lax.scan(step, x, None, length=steps)[0]


def quick(*, repeats: int = 10, log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> dict:
    """Does the backend's XLA hoist loop-invariant K/V matmuls by itself? A < 5 minute device check.

    For each form, three variants: plain ``jax.jit``, hand-cached, ``hoist_invariants`` (if kvhoist's
    dependencies are installed). Structural evidence: matmuls (``dot`` / cuBLAS custom calls) left inside
    the step loop of the optimized HLO - if plain has as many as hand-cached, XLA hoisted the K/V
    projections itself. Timing evidence: medians, interleaved.
    """
    t_start = time.perf_counter()
    summary: dict = {"machine": _machine(), "forms": {}}
    try:
        import kvhoist
        hoist = kvhoist.hoist_invariants
    except Exception as err:  # networkx/flax missing on a bare machine
        hoist = None
        summary["hoisted_unavailable"] = f"{type(err).__name__}: {err}"

    def matmuls(lowered, trip_count: int) -> dict:
        try:
            return hlo_loop_op_counts(lowered.compile().as_text(), MATMUL_PATTERNS, trip_count=trip_count)
        except Exception as err:
            return {"error": f"{type(err).__name__}: {err}"}

    cases: list[tuple[str, Callable, tuple, dict, int]] = []
    key = jax.random.key(0)
    d, text, tokens, layers, steps, batch = 1024, 512, 1024, 8, 20, 2
    if jax.default_backend() == "cpu":  # a smoke-test size: the real sizes are for an accelerator
        d, text, tokens, layers, steps = 128, 64, 64, 2, 4
    summary["toy"] = {"d": d, "text_tokens": text, "latent_tokens": tokens, "layers": layers, "steps": steps,
                      "batch": batch}
    ctx = jax.random.normal(key, (batch, text, d), jnp.float32)
    x = jax.random.normal(jax.random.key(1), (batch, tokens, d), jnp.float32)
    for stacked in (False, True):
        params = _toy_params(jax.random.key(2), d=d, ffn=4 * d, text_dim=d, layers=layers, stacked=stacked)
        name = f"toy scan x {'layer-scan' if stacked else 'unrolled'}"

        def fn(params, x, ctx, hand_cache, stacked=stacked):
            return toy_sampler(params, x, ctx, steps=steps, stacked=stacked, hand_cache=hand_cache)
        cases.append((name, fn, (params, x, ctx), {}, steps))
    try:
        from wan_ref.sample import sample
        cfg = CONFIGS["small"]
        if jax.default_backend() == "cpu":
            cfg = dataclasses.replace(cfg, steps=2, num_layers=2)
        case = build_case(cfg, FORMS["scan x unrolled"])
        static, traced = _split_kwargs(case.kwargs)

        def wan_fn(model, latents, pe, npe, hand_cache, **kw):
            return sample(model, latents, pe, npe, **static, **kw, kv_cache=hand_cache)
        cases.append(("wan_ref small scan x unrolled", wan_fn, case.args, traced, cfg.steps))
    except Exception as err:  # flax missing
        summary["wan_ref_unavailable"] = f"{type(err).__name__}: {err}"

    for name, fn, args, kw, n_steps in cases:
        log(f"[quick] {name}")
        plain = jax.jit(functools.partial(fn, hand_cache=False))
        hand = jax.jit(functools.partial(fn, hand_cache=True))
        fns = {"plain": lambda p=plain: p(*args, **kw), "hand": lambda h=hand: h(*args, **kw)}
        structure = {"plain": matmuls(plain.lower(*args, **kw), n_steps),
                     "hand": matmuls(hand.lower(*args, **kw), n_steps)}
        row: dict = {}
        if hoist is not None:
            try:
                hoisted = hoist(functools.partial(fn, hand_cache=False))
                structure["hoisted"] = matmuls(hoisted.lower(*args, **kw), n_steps)
                fns["hoisted"] = lambda h=hoisted: h(*args, **kw)
                row["hoisted_values"] = len(hoisted.report(*args, **kw).hoisted)
            except Exception as err:
                row["hoisted_error"] = f"{type(err).__name__}: {err}"
        times = time_interleaved(fns, repeats=repeats, warmup=1)
        med = {k: statistics.median(v) for k, v in times.items()}
        row.update(median_ms={k: round(1e3 * v, 3) for k, v in med.items()},
                   plain_over_hand=med["plain"] / med["hand"],
                   matmuls_in_step_loop=structure)
        if "hoisted" in med:
            row["hoisted_over_hand"] = med["hoisted"] / med["hand"]
            row["plain_over_hoisted"] = med["plain"] / med["hoisted"]
        p_mm = structure["plain"]
        h_mm = structure["hand"]
        if "error" not in p_mm and "error" not in h_mm:
            extra = sum(p_mm[k] for k in MATMUL_PATTERNS) - sum(h_mm[k] for k in MATMUL_PATTERNS)
            # Cross-check by FLOP-free size: bytes produced by matmuls per step iteration.
            row["extra_matmul_result_bytes_in_plain_loop"] = (sum(p_mm["bytes"].values())
                                                              - sum(h_mm["bytes"].values()))
            row["xla_hoisted_kv_itself"] = extra <= 0
            row["extra_matmuls_in_plain_loop"] = extra
        summary["forms"][name] = row
    summary["total_s"] = time.perf_counter() - t_start
    return summary


# ------------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``kvhoist bench``'s options to ``parser``.

    Every value is checked by the parser before anything runs: counts must be positive (``--warmup``
    >= 0), ``--config`` / ``--form`` must name known ones, ``--out`` / ``--markdown`` must be writable
    files in existing folders and ``--from-json`` an existing file; a bad one is a usage error (exit 2).
    """
    from kvhoist.tools.cli import input_file, int_at_least, output_file

    positive = int_at_least(1, "a positive integer")
    parser.add_argument("--config", action="append", choices=sorted(CONFIGS), default=None,
                        help="benchmark config(s) (repeatable; default: all)")
    parser.add_argument("--form", action="append", choices=list(FORMS), default=None, metavar="FORM",
                        help="sampler form(s) (repeatable; default: all): " + ", ".join(map(repr, FORMS)))
    parser.add_argument("--repeats", type=positive, default=7, help="timed repeats per variant (default 7)")
    parser.add_argument("--warmup", type=int_at_least(0, "an integer >= 0"), default=1,
                        help="untimed rounds after compiling (default 1)")
    parser.add_argument("--no-overhead", dest="overhead", action="store_false",
                        help="skip the pass-overhead measurement on the abstract 14B sampler")
    parser.add_argument("--overhead-layers", type=positive, default=None,
                        help="layers of the abstract 14B model for the overhead measurement (default: all 40)")
    parser.add_argument("--out", type=output_file("--out"), default=None, help="write the results as JSON here")
    parser.add_argument("--markdown", type=output_file("--markdown"), default=None,
                        help="write the results as a markdown page here")
    parser.add_argument("--from-json", type=input_file, default=None, metavar="JSON",
                        help="re-render --markdown from a previous run's JSON instead of running")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="a progress line on stderr: cases done, the one running, elapsed time (default: when "
                             "stderr is a terminal, unless KVHOIST_PROGRESS=0)")
    parser.add_argument("--quick", action="store_true",
                        help="the short accelerator check (does XLA hoist on its own?); prints a JSON summary")


def main(args: argparse.Namespace) -> int:
    """Runs ``kvhoist bench`` with parsed ``args``; returns the exit status."""
    if args.quick:
        summary = quick(repeats=max(args.repeats, 3))
        text = json.dumps(summary, indent=1, default=str)
        print(text)
        if args.out:
            with open(args.out, "w") as fh:
                fh.write(text + "\n")
        return 0
    if getattr(args, "from_json", None):
        with open(args.from_json) as fh:
            md = render_markdown(json.load(fh))
        if args.markdown:
            with open(args.markdown, "w") as fh:
                fh.write(md)
        else:
            print(md)
        return 0
    from kvhoist.tools.progress import Progress

    configs = args.config or list(CONFIGS)
    forms = args.form or list(FORMS)
    with Progress("bench", enabled=getattr(args, "progress", None)) as bar:
        data = run_benchmarks(configs, forms, repeats=args.repeats, warmup=args.warmup, overhead=args.overhead,
                              overhead_layers=args.overhead_layers, log=bar.write, progress=bar)
    argv = sys.argv[1:]
    data["command"] = ("python -m kvhoist.bench " if os.path.basename(sys.argv[0]) == "bench.py"
                       else "kvhoist ") + " ".join(argv)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(data, fh, indent=1, default=str)
            fh.write("\n")
    md = render_markdown(data)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(md)
    if not args.out and not args.markdown:
        print(md)
    return 0


def _cli(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvhoist.bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return main(parser.parse_args(argv))


if __name__ == "__main__":
    if __package__ in (None, ""):
        # Run as a file (`python kvhoist/bench.py --quick`): importing the kvhoist package needs networkx
        # and flax, which a bare accelerator machine may lack; the file itself needs only jax + numpy.
        here = os.path.dirname(os.path.abspath(__file__))
        sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
        sys.path.insert(0, os.path.dirname(here))
    sys.exit(_cli())
