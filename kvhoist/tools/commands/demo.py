"""``kvhoist demo``: a small random Wan sampled with plain ``jax.jit``, the hand-written cache and
``@hoist_invariants``; latents compared, the three timed as ``kvhoist bench`` times them."""

from __future__ import annotations

import argparse
import os
import statistics
from typing import Any, Sequence

__all__ = ["run", "demo_config", "random_model", "spread", "DEMO_VARIANTS"]


def demo_config(layers: int = 4) -> Any:
    """The demo model: Wan T2V layout at D=256 (4 heads x 64), 1024-wide text embeddings, FFN 1024."""
    from wan_ref.config import WanConfig

    return WanConfig(num_attention_heads=4, attention_head_dim=64, in_channels=16, out_channels=16, text_dim=1024,
                     freq_dim=256, ffn_dim=1024, num_layers=layers, scan_layers=True)


def random_model(config: Any, seed: int = 0) -> Any:
    """A ``WanModel`` with random weights drawn by NumPy over the abstract model's shapes.

    Much faster than running the initialisers eagerly (seconds on a loaded 2-core machine):
    matrices ~ N(0, 1/fan_in), norm weights 1, biases 0, modulation tables ~ N(0, 0.02).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from kvhoist.tools.specs import abstract_model

    graphdef, state = nnx.split(abstract_model(config))
    rng = np.random.default_rng(seed)

    def draw(path: Any, s: Any) -> Any:
        name = jax.tree_util.keystr(path).lower()
        if "scale_shift" in name or "pos_embed" in name:
            x = 0.02 * rng.standard_normal(s.shape)
        elif len(s.shape) >= 2 + (1 if "blocks" in name and config.scan_layers else 0):
            x = rng.standard_normal(s.shape) / np.sqrt(s.shape[-2])
        elif "norm" in name:
            x = np.ones(s.shape)
        else:
            x = np.zeros(s.shape)
        return jnp.asarray(x, s.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, state))


def spread(xs: Sequence[float]) -> tuple[float, float, float]:
    """``(median, lower quartile, upper quartile)`` of ``xs`` (inclusive quartiles; one value: all three)."""
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q1, med, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return med, q1, q3


DEMO_VARIANTS = ("plain jax.jit(sample)", "hand-written cache (kv_cache=True)", "@hoist_invariants")


def run(args: argparse.Namespace) -> int:
    """``kvhoist demo``: plain vs hand-written cache vs ``@hoist_invariants`` on a small random Wan.

    Measured as ``kvhoist bench`` measures (:func:`kvhoist.bench.timing.time_interleaved`): the three variants
    run interleaved, the order rotating every repeat, after one compiling call and one warm-up round each;
    per variant the median and interquartile range of the process CPU time (all threads: steady on a shared
    machine) and the median wall time; speed-ups are ratios of CPU medians."""
    import functools

    import jax
    import jax.numpy as jnp
    import kvhoist
    from kvhoist.bench.timing import time_interleaved
    from kvhoist.tools.progress import Progress
    from wan_ref.sample import sample

    with Progress("demo", enabled=args.progress) as bar:
        bar.phase("building a random model")
        cfg = demo_config(args.layers)
        model = random_model(cfg, args.seed)
        keys = jax.random.split(jax.random.key(args.seed), 3)
        latents = jax.random.normal(keys[0], (1, 16, 2, 8, 8), jnp.float32)   # 2x4x4 = 32 latent tokens
        pe = jax.random.normal(keys[1], (1, 512, cfg.text_dim), jnp.float32)
        npe = jax.random.normal(keys[2], (1, 512, cfg.text_dim), jnp.float32)
        common = dict(num_inference_steps=args.steps, guidance_scale=5.0, flow_shift=3.0)
        hoisted = kvhoist.hoist_invariants(functools.partial(sample, **common))
        jitted = dict(zip(DEMO_VARIANTS, (jax.jit(functools.partial(sample, **common)),
                                          jax.jit(functools.partial(sample, **common, kv_cache=True)), hoisted)))
        fns = {label: functools.partial(fn, model, latents, pe, npe) for label, fn in jitted.items()}
        outs = {}
        for label, fn in fns.items():  # the first call traces (and rewrites) and compiles
            bar.phase(f"tracing and compiling {label}")
            outs[label] = jax.block_until_ready(fn())
        bar(0, args.repeats * len(fns))                 # the bar counts timed runs; the warm-ups come first
        bar.phase(f"running {args.repeats} repetitions x {len(fns)} variants, interleaved (after a warm-up each)")
        cpu: dict[str, list[float]] = {}
        calls = iter(range(1 << 62))
        wall = time_interleaved(fns, repeats=args.repeats, warmup=1, cpu_times=cpu,
                                on_call=lambda _n: next(calls) >= len(fns) and bar.update())
    print(f"demo: random Wan T2V, {cfg.num_layers} scanned layers, D={cfg.inner_dim}, 512 text tokens, "
          f"32 latent tokens, CFG, {args.steps} UniPC steps")
    print(f"timing: as kvhoist bench - the 3 variants interleaved, {args.repeats} timed runs each after a warm-up; "
          "process CPU time (all threads), median [interquartile range]; wall-clock median; speed-up = CPU ratio")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > (os.cpu_count() or 1):
        print(f"note: load average {load:.1f} on {os.cpu_count()} cores: other work is running, timings are noisy")
    ref = outs[DEMO_VARIANTS[0]]
    base = statistics.median(cpu[DEMO_VARIANTS[0]])
    worst = 0.0
    for label in DEMO_VARIANTS:
        med, q1, q3 = spread(cpu[label])
        diff = float(jnp.max(jnp.abs(outs[label] - ref)))
        worst = max(worst, diff)
        print(f"  {label:<36} CPU {med * 1e3:8.1f} ms [{q1 * 1e3:.1f}-{q3 * 1e3:.1f}]  wall "
              f"{statistics.median(wall[label]) * 1e3:8.1f} ms  ({base / med:4.2f}x)   max |latents - plain| = "
              f"{diff:.2e}")
    tol = 1e-3 * max(1.0, float(jnp.max(jnp.abs(ref))))
    print(f"latents agree: {'yes' if worst <= tol else 'NO'} (max diff {worst:.2e}, tolerance {tol:.1e})")
    print(hoisted.report(model, latents, pe, npe).summary())
    return 0 if worst <= tol else 1
