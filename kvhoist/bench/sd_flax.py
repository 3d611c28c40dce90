"""``python -m kvhoist.bench.sd_flax``: diffusers' Flax Stable Diffusion pipeline under ``hoist_invariants``.

Issue 20 on code nobody here wrote: ``FlaxStableDiffusionPipeline._generate`` (diffusers 0.39, the last release
with it) encodes the prompt and the negative prompt with CLIP, runs the UNet in a ``fori_loop`` over the
scheduler's steps with classifier-free guidance (the batch is ``concat([uncond, cond])``) and decodes with the VAE.
Every cross-attention K/V (``attn2.to_k`` / ``to_v`` of the text context) is recomputed on every step under jit;
kvhoist moves them before the loop. Random-weight models built from configs (no download), a small SD-like topology:

* UNet: 3 levels, ``block_out_channels (64, 128, 256)``, 2 layers per block, cross attention on the two upper levels
  (SD 1.x's layout, narrower), head dim 32, ``cross_attention_dim`` 256;
* CLIP text encoder: hidden 256, 2 layers, 77 tokens (SD's prompt length); VAE: 2 levels, ``(32, 64)``;
* latents 4 x 32 x 32 (a 64 x 64 image through this VAE), batch 1, guidance 7.5, PNDM (the pipeline's default).

Measured: outputs (within :mod:`kvhoist.contract`, asserted; bitwise equality recorded); the first call (trace
(+ rewrite) + lower + compile, a fresh function and ``jax.clear_caches()`` before each, interleaved, process CPU,
as :mod:`kvhoist.bench.hf_generate`); the report's cache bytes and XLA's temporaries; the steady state: one
``_generate`` call of jit and hoisted, each compiled with XLA's while-loop LICM on (XLA's default) and off
(:func:`kvhoist.bench.decode.compiler_options`), the four interleaved, process-CPU medians with min-max.

It needs diffusers<=0.39 (the Flax pipeline) and transformers<=4.57.6 (Flax CLIP); without them it exits with one
line. A benchmark, not a test: nothing here asserts a speed. Output: a markdown table (docs/benchmarks.md,
"diffusers Flax Stable Diffusion") and, with ``--out``, the JSON.

Example:
    $ pip install -e ".[hf-flax]"
    $ python -m kvhoist.bench.sd_flax --steps 10 --repeats 9
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from typing import Any, Callable, Sequence

__all__ = ["NEEDS", "build", "run", "render_markdown", "main"]

#: The one line printed (and exited with) when diffusers' Flax Stable Diffusion pipeline is absent.
NEEDS = ("needs diffusers<=0.39 (FlaxStableDiffusionPipeline) and transformers<=4.57.6 (Flax CLIP): "
         "pip install -e '.[hf-flax]'")

UNET_CHANNELS, CROSS_DIM, HEAD_DIM, TEXT_LAYERS, PROMPT_LEN, VOCAB = (64, 128, 256), 256, 32, 2, 77, 1000
LATENT, GUIDANCE = 32, 7.5


def _diffusers() -> tuple[Any, Any]:
    """(diffusers, transformers) if both have their Flax SD pieces, else ``SystemExit(NEEDS)``."""
    try:
        import diffusers
        import transformers
        from diffusers import FlaxAutoencoderKL, FlaxStableDiffusionPipeline, FlaxUNet2DConditionModel  # noqa: F401
        from transformers import FlaxCLIPTextModel  # noqa: F401
    except Exception as err:  # noqa: BLE001 - not installed, diffusers >= 0.40, transformers >= 5
        raise SystemExit(f"{NEEDS} ({type(err).__name__}: {str(err)[:100]})") from None
    return diffusers, transformers


def _random_params(shapes: Any, seed: int) -> Any:
    """Weights for a tree of ShapeDtypeStructs from numpy (no eager Flax init): norm scales 1, other vectors
    small, matrices ~ 1/sqrt(fan-in)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(seed)

    def leaf(path: Any, s: Any) -> Any:
        if len(s.shape) < 2:
            name = str(getattr(path[-1], "key", path[-1]))
            return jnp.ones(s.shape, s.dtype) if name == "scale" else jnp.asarray(
                0.02 * rng.standard_normal(s.shape), s.dtype)
        return jnp.asarray(rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1])), s.dtype)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


def build(steps: int, scheduler: str = "FlaxPNDMScheduler") -> tuple[Callable, tuple, dict]:
    """``(generate, args, config)``: a fresh ``generate(params, ids, neg_ids, key)`` calling the pipeline's own
    ``_generate`` with ``steps`` denoising steps, its arguments, and the sizes (for the JSON).

    Example:
        >>> generate, args, cfg = build(steps=4)  # doctest: +SKIP
        >>> images = jax.jit(generate)(*args)      # doctest: +SKIP  (1, 64, 64, 3)
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    diffusers, transformers = _diffusers()
    levels = len(UNET_CHANNELS)
    unet = diffusers.FlaxUNet2DConditionModel(
        sample_size=LATENT, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=UNET_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
        cross_attention_dim=CROSS_DIM, attention_head_dim=tuple(c // HEAD_DIM for c in UNET_CHANNELS))
    vae = diffusers.FlaxAutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32,
        sample_size=2 * LATENT)
    text = transformers.FlaxCLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=CROSS_DIM, intermediate_size=4 * CROSS_DIM, num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=CROSS_DIM // 64, max_position_embeddings=PROMPT_LEN, bos_token_id=0, eos_token_id=2,
        pad_token_id=1), _do_init=False)
    sched = getattr(diffusers, scheduler).from_config(dict(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        skip_prk_steps=True))
    pipe = diffusers.FlaxStableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=None, unet=unet,
                                                 scheduler=sched, safety_checker=None, feature_extractor=None)
    key = jax.random.PRNGKey(0)
    params = dict(
        unet=_random_params(jax.eval_shape(unet.init_weights, key), 1),
        vae=_random_params(jax.eval_shape(vae.init_weights, key), 2),
        text_encoder=_random_params(jax.eval_shape(
            functools.partial(text.init_weights, input_shape=(1, PROMPT_LEN)), key), 3),
        scheduler=sched.create_state())
    ids = jnp.asarray(np.random.default_rng(0).integers(3, VOCAB, (1, PROMPT_LEN)), jnp.int32)
    neg_ids = jnp.ones((1, PROMPT_LEN), jnp.int32)  # given, so _generate needs no tokenizer
    size = LATENT * pipe.vae_scale_factor

    def generate(params, ids, neg_ids, key):
        return pipe._generate(ids, params, key, steps, size, size, GUIDANCE, None, neg_ids)

    cfg = {"unet_channels": list(UNET_CHANNELS), "cross_attention_dim": CROSS_DIM, "head_dim": HEAD_DIM,
           "text_layers": TEXT_LAYERS, "prompt_len": PROMPT_LEN, "latent": [4, LATENT, LATENT], "image": size,
           "steps": steps, "scheduler": scheduler, "guidance": GUIDANCE}
    return generate, (params, ids, neg_ids, jax.random.PRNGKey(3)), cfg


def run(steps: int = 10, *, repeats: int = 7, first_call_repeats: int = 3, scheduler: str = "FlaxPNDMScheduler",
        log: Callable[[str], None] = print) -> dict:
    """Every measurement (module docstring); raises ``AssertionError`` if hoisted's images break the contract."""
    import flax
    import jax
    import numpy as np

    import kvhoist
    from kvhoist import contract
    from kvhoist.bench.decode import compiler_options
    from kvhoist.bench.timing import (checkout_commit, compiled_temp_bytes, first_call_jit_vs_hoisted, iqr_overlap,
                                       machine, spread, time_interleaved)

    diffusers, transformers = _diffusers()
    t0 = time.perf_counter()
    _generate, args, cfg = build(steps, scheduler)

    first = first_call_jit_vs_hoisted(lambda: build(steps, scheduler)[0], args, first_call_repeats)
    log(f"[sd] first call jit {first['jit']['cpu_s']['median']:.2f} s, hoisted "
        f"{first['hoisted']['cpu_s']['median']:.2f} s")

    hoisted = kvhoist.hoist_invariants(_generate)
    compiled = {}
    for licm in ("on", "off"):
        opts = compiler_options(licm)
        compiled[f"jit/{licm}"] = jax.jit(_generate).lower(*args).compile(compiler_options=opts)
        compiled[f"hoisted/{licm}"] = hoisted.lower(*args).compile(compiler_options=opts)
    outs = {k: np.asarray(c(*args)) for k, c in compiled.items()}
    for licm in ("on", "off"):
        contract.assert_close(outs[f"hoisted/{licm}"], outs[f"jit/{licm}"], err_msg=f"XLA LICM {licm}")
    bitwise = all(np.array_equal(outs[f"hoisted/{licm}"], outs[f"jit/{licm}"]) for licm in ("on", "off"))
    report = hoisted.report(*args)
    cross = [h for h in report.hoisted if "/attn2/" in h.name]

    cpu: dict[str, list[float]] = {}
    time_interleaved({k: functools.partial(c, *args) for k, c in compiled.items()}, repeats=repeats, warmup=1,
                     cpu_times=cpu)
    steady = {k: spread(v, 1e3) for k, v in cpu.items()}
    med = {k: v["median"] for k, v in steady.items()}

    result = {
        "machine": machine(), "kvhoist_commit": checkout_commit(), "diffusers": diffusers.__version__,
        "transformers": transformers.__version__, "flax": flax.__version__, "jax": jax.__version__,
        "config": cfg, "repeats": repeats, "first_call_repeats": first_call_repeats,
        "within_contract": True, "bitwise": bool(bitwise), "first_call": first,
        "cache": {"report_bytes": report.cache_bytes, "values": len(report.hoisted), "cross_kv_values": len(cross),
                  "cross_kv_bytes": sum(h.bytes for h in cross), "skipped": len(report.skipped),
                  "flops_saved": report.flops_saved, "flops_saved_fraction": report.flops_saved_fraction},
        "xla_temp_bytes": {k: compiled_temp_bytes(c) for k, c in compiled.items()},
        "steady_cpu_ms": steady,
        "jit_over_hoisted": {licm: med[f"jit/{licm}"] / med[f"hoisted/{licm}"] for licm in ("on", "off")},
        "within_noise": {licm: iqr_overlap(cpu[f"jit/{licm}"], cpu[f"hoisted/{licm}"]) for licm in ("on", "off")},
        "steady_cpu_ms_samples": {k: [1e3 * x for x in v] for k, v in cpu.items()},
        "summary": report.summary(),
        "total_s": time.perf_counter() - t0,
    }
    log(f"[sd] _generate CPU ms jit/hoisted LICM on {med['jit/on']:.0f}/{med['hoisted/on']:.0f}, off "
        f"{med['jit/off']:.0f}/{med['hoisted/off']:.0f}; cache {report.cache_bytes} B ({len(cross)} cross K/V)")
    return result


def render_markdown(result: dict) -> str:
    """The section's table: first call, cache, temporaries, steady-state ``_generate`` with XLA's LICM on / off."""
    from kvhoist.bench.timing import fmt_mib, fmt_ms

    fc, c, t = result["first_call"], result["cache"], result["xla_temp_bytes"]
    j, h = fc["jit"], fc["hoisted"]
    lines = [
        "| first call jit (s) | first call hoisted (s) | ratio | XLA compiles jit / hoisted | kvhoist trace + rewrite "
        "(s) | cache KiB (cross K/V values) | XLA temp MiB jit / hoisted |",
        "|---|---|---|---|---|---|---|",
        f"| {j['cpu_s']['median']:.2f} ({j['cpu_s']['min']:.2f}-{j['cpu_s']['max']:.2f}) "
        f"| {h['cpu_s']['median']:.2f} ({h['cpu_s']['min']:.2f}-{h['cpu_s']['max']:.2f}) | {fc['ratio']:.2f} "
        f"| {'/'.join(map(str, j['compiles']))} / {'/'.join(map(str, h['compiles']))} "
        f"| {h['retrace_s']['median']:.2f} + {h['rewrite_s']['median']:.2f} "
        f"| {c['report_bytes'] / 1024:.1f} ({c['cross_kv_values']} of {c['values']}) "
        f"| {fmt_mib(t['jit/on'])} / {fmt_mib(t['hoisted/on'])} |",
        "",
        "| XLA LICM | CPU ms jit | CPU ms hoisted | jit/hoisted | IQRs overlap |",
        "|---|---|---|---|---|",
    ]
    for licm in ("on", "off"):
        s = result["steady_cpu_ms"]
        lines.append(f"| {licm} | {fmt_ms(s[f'jit/{licm}'])} | {fmt_ms(s[f'hoisted/{licm}'])} "
                     f"| {result['jit_over_hoisted'][licm]:.2f} | {'yes' if result['within_noise'][licm] else 'no'} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: ``python -m kvhoist.bench.sd_flax [--steps N] [--repeats N] [--out FILE]``."""
    parser = argparse.ArgumentParser(prog="python -m kvhoist.bench.sd_flax", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="denoising steps (default 10)")
    parser.add_argument("--scheduler", default="FlaxPNDMScheduler", help="a diffusers Flax scheduler class")
    parser.add_argument("--repeats", type=int, default=7, help="timed _generate calls per variant (default 7)")
    parser.add_argument("--first-call-repeats", type=int, default=3, help="timed first calls per variant")
    parser.add_argument("--out", help="write the JSON here")
    args = parser.parse_args(argv)
    try:
        _diffusers()
    except SystemExit as err:
        print(err, file=sys.stderr)
        return 2
    result = run(args.steps, repeats=args.repeats, first_call_repeats=args.first_call_repeats,
                 scheduler=args.scheduler, log=lambda s: print(s, file=sys.stderr, flush=True))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(render_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
