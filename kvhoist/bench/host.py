"""Benchmark of host-loop hoisting: wan_ref's Python-loop sampler, plain vs automatic vs hand-written.

Three variants of ``wan_ref.sample.sample(..., loop="python")`` run in ONE process, interleaved (the
order rotates every repeat, :func:`kvhoist.bench.timing.per_call_times`), after one warm-up call each
(compilation); the median wall time (and process CPU time) of the repeats is reported:

* ``plain``: the default jitted step — recomputes the text embedding and every layer's cross-attention
  K/V in every call;
* ``auto``: ``step_fn=kvhoist.hoist_invariants(one_step, invariant_argnames=("expert", "shared"))`` —
  the prologue (text embedding, K/V, RoPE tables, ...) runs once per sample call (per expert);
* ``hand``: ``kv_cache=True`` — wan_ref's hand-written cache (``model.compute_kv_cache`` once per run).

The ``small`` config is one where cross-attention dominates: few latent tokens (16) and 512 text tokens
with CFG, so the invariant work is most of a step. It is a measurement, not a test: nothing asserts a
speed; ``targets`` in the result says whether "auto within 5% of hand" held.

Example:
    $ python -m kvhoist.bench.host --config small --out docs/host_loop_bench.json
    >>> from kvhoist.bench.host import run_host_benchmark
    >>> result = run_host_benchmark(config="small", path="host.json")
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from kvhoist.bench.timing import machine, per_call_times

__all__ = ["CONFIGS", "run_host_benchmark"]


@dataclasses.dataclass(frozen=True)
class HostBenchConfig:
    """A model and input size for :func:`run_host_benchmark`."""

    name: str
    heads: int
    head_dim: int
    layers: int
    ffn: int
    text_dim: int
    text_tokens: int
    latent_shape: tuple  # [B, z, F, H, W]; tokens = F * H/2 * W/2
    steps: int
    description: str


CONFIGS: dict[str, HostBenchConfig] = {
    "tiny": HostBenchConfig("tiny", 2, 12, 2, 48, 32, 8, (1, 4, 2, 4, 4), 4,
                            "the tiny-t2v test model (smoke run)"),
    "small": HostBenchConfig("small", 4, 64, 4, 1024, 1024, 512, (1, 16, 1, 8, 8), 10,
                             "D=256 (4x64), 4 layers, ffn 1024, text 512x1024 with CFG, 16 latent tokens, "
                             "10 UniPC steps, fp32"),
}


def run_host_benchmark(config: str = "small", *, repeats: int = 7, path: str | os.PathLike | None = None,
                       steps: int | None = None, seed: int = 0) -> dict:
    """Times plain / automatic / hand-written K/V caching of wan_ref's Python-loop sampler.

    Args:
      config: a key of :data:`CONFIGS` ("small": cross-attention dominated; "tiny": smoke run).
      repeats: timed runs per variant (after one warm-up each), interleaved with rotating order.
      path: if given, the result is written there as JSON.
      steps: overrides the config's number of denoising steps.
      seed: for the random weights and inputs.
    Returns:
      A JSON-ready dict: ``config``, ``machine``, ``seconds`` (median wall time per variant), ``all_seconds``,
      ``cpu_seconds`` (median process CPU time per variant),
      ``ratios`` (``plain/auto``, ``plain/hand``, ``auto/hand``), ``max_rel_diff`` of each variant's
      latents vs ``plain``, ``prologue_runs_per_sample``, ``cache_bytes`` and ``targets``.
    """
    from flax import nnx

    import kvhoist
    from wan_ref import WanConfig, WanModel
    from wan_ref.sample import one_step, sample

    if config not in CONFIGS:
        raise ValueError(f"unknown host benchmark config {config!r}; known: {', '.join(CONFIGS)}")
    c = CONFIGS[config]
    n_steps = steps or c.steps
    z = c.latent_shape[1]
    mcfg = WanConfig(num_attention_heads=c.heads, attention_head_dim=c.head_dim, in_channels=z, out_channels=z,
                     text_dim=c.text_dim, freq_dim=256, ffn_dim=c.ffn, num_layers=c.layers)
    model = WanModel(mcfg, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    latents = jnp.asarray(rng.standard_normal(c.latent_shape).astype(np.float32))
    pe = jnp.asarray(rng.standard_normal((1, c.text_tokens, c.text_dim)).astype(np.float32))
    npe = jnp.asarray(rng.standard_normal((1, c.text_tokens, c.text_dim)).astype(np.float32))
    kw = dict(num_inference_steps=n_steps, guidance_scale=5.0, flow_shift=3.0, loop="python")
    step = kvhoist.hoist_invariants(one_step, static_argnames=("plan",), invariant_argnames=("expert", "shared"))

    variants = {
        "plain": lambda: sample(model, latents, pe, npe, **kw),
        "auto": lambda: sample(model, latents, pe, npe, step_fn=step, **kw),
        "hand": lambda: sample(model, latents, pe, npe, kv_cache=True, **kw),
    }
    outputs = {k: np.asarray(jax.block_until_ready(f())) for k, f in variants.items()}  # warm-up: compile
    runs_before = step.prologue_runs
    series = per_call_times(variants, repeats=repeats, collect=False)
    times = {k: [us * 1e-6 for us in v] for k, v in series["wall"].items()}
    cpu = {k: [us * 1e-6 for us in v] for k, v in series["cpu"].items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    ref = outputs["plain"].astype(np.float64)
    rel = {k: float(np.abs(v - ref).max() / np.abs(ref).max()) for k, v in outputs.items()}
    info = step.cache_info()
    result = {
        "config": dataclasses.asdict(c) | {"steps": n_steps, "latent_tokens": int(np.prod(c.latent_shape[2:]) // 4)},
        "machine": machine(),
        "repeats": repeats,
        "seconds": med,
        "all_seconds": times,
        "cpu_seconds": {k: statistics.median(v) for k, v in cpu.items()},
        "ratios": {"plain/auto": med["plain"] / med["auto"], "plain/hand": med["plain"] / med["hand"],
                   "auto/hand": med["auto"] / med["hand"]},
        "max_rel_diff_vs_plain": rel,
        "prologue_runs_per_sample": (step.prologue_runs - runs_before) / repeats,
        "cache_bytes": {"auto_peak": info.peak_bytes},
        "targets": {"auto within 5% of hand": med["auto"] <= 1.05 * med["hand"]},
    }
    if path is not None:
        with open(path, "w") as fh:
            json.dump(result, fh, indent=2, default=str)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvhoist.bench.host", allow_abbrev=False, description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="small", choices=sorted(CONFIGS))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--out", default=None, help="write the JSON result here")
    args = ap.parse_args(argv)
    res = run_host_benchmark(args.config, repeats=args.repeats, path=args.out, steps=args.steps)
    print(json.dumps({k: res[k] for k in ("seconds", "ratios", "max_rel_diff_vs_plain", "prologue_runs_per_sample",
                                          "cache_bytes", "targets")}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
