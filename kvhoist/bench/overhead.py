"""The pass's own cost: tracing + rewriting the full-size Wan 2.1 14B sampler (abstract shapes, nothing
allocated) against XLA lowering + compiling it."""

from __future__ import annotations

import functools
import time
from typing import Sequence

import jax
import jax.numpy as jnp

__all__ = ["pass_overhead"]


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
