"""``kvhoist bench --quick``: does the backend's XLA hoist loop-invariant K/V matmuls by itself? A short
accelerator check on a pure-JAX toy sampler and, when flax is installed, on wan_ref's unrolled-layer form.

Imports neither torch nor diffusers, and works without networkx/flax (the variants that need them are then
reported as unavailable).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import statistics
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp

from kvhoist.bench.forms import CONFIGS, FORMS, build_case, split_kwargs
from kvhoist.bench.timing import machine, time_interleaved
from kvhoist.hlo import MATMUL_PATTERNS, hlo_loop_op_counts

__all__ = ["quick", "toy_sampler"]


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
    summary: dict = {"machine": machine(), "forms": {}}
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
        static, traced = split_kwargs(case.kwargs)

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
