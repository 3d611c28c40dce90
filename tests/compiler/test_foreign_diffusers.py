"""diffusers' Flax Stable Diffusion pipeline under ``hoist_invariants`` (issue 20: code nobody here wrote).

``FlaxStableDiffusionPipeline._generate`` (prompt ids in, images out) is diffusers' own program: a CLIP text
encoder, classifier-free guidance (``guidance_scale > 1``: the UNet runs on ``concat([uncond, cond])``), a
``fori_loop`` over the scheduler's steps and a VAE decode. Every cross-attention K and V (``attn2.to_k`` /
``attn2.to_v`` of ``encoder_hidden_states``) is invariant in the denoising loop and must leave it; nothing else
that costs a matmul may. Tiny random models built from configs (no downloads); the scheduler is the pipeline's
default (PNDM) and DDIM / Euler-discrete, whose step functions and states differ.

diffusers 0.39 is the last release with the Flax pipeline, and it runs with transformers 4.x (Flax CLIP) only: the
``hf-flax`` extra and CI's Hugging Face job. Elsewhere (diffusers 0.42 in the ``test`` extra) these tests skip;
with ``KVHOIST_REQUIRE_HF_FLAX`` set (that job) a missing piece fails instead.
"""

from __future__ import annotations

import functools
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvhoist
from kvhoist import contract
from kvhoist.analysis.cost import count_primitives
from kvhoist.api import KvhoistWarning
from kvhoist.ir import all_eqns

#: The same switch as tests/compiler/test_foreign_programs.py's Hugging Face section (CI's hf-flax job sets it).
REQUIRE_ENV = "KVHOIST_REQUIRE_HF_FLAX"

STEPS, SIZE, PROMPT_LEN, VOCAB = 3, 32, 8, 100


def _unavailable(reason: str):
    if os.environ.get(REQUIRE_ENV):
        pytest.fail(f"{REQUIRE_ENV} is set but {reason}")
    pytest.skip(reason)


def _random_params(shapes, seed: int):
    """Weights for a tree of ShapeDtypeStructs, in numpy: no eager (or jitted) Flax init, which costs ~15 s here.

    Norm scales are ones, other vectors small, matrices ~ 1/sqrt(fan-in): a well-conditioned random network.
    """
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        name = str(getattr(path[-1], "key", path[-1]))
        if len(s.shape) < 2:
            return jnp.ones(s.shape, s.dtype) if name == "scale" else jnp.asarray(
                0.02 * rng.standard_normal(s.shape), s.dtype)
        fan_in = int(np.prod(s.shape[:-1]))
        return jnp.asarray(rng.standard_normal(s.shape) / np.sqrt(fan_in), s.dtype)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


@functools.cache
def _models():
    """(unet, vae, text encoder, their params): the tiny Flax SD pieces, or a skip/fail naming what is missing."""
    try:
        from diffusers import FlaxAutoencoderKL, FlaxStableDiffusionPipeline, FlaxUNet2DConditionModel  # noqa: F401
        from transformers import CLIPTextConfig, FlaxCLIPTextModel
    except Exception as err:  # diffusers >= 0.40 has no Flax pipeline; transformers >= 5 no Flax CLIP
        return f"no Flax Stable Diffusion (diffusers <= 0.39, transformers 4.x): {type(err).__name__}: {str(err)[:120]}"
    try:
        unet = FlaxUNet2DConditionModel(
            sample_size=SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8)
        vae = FlaxAutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            norm_num_groups=32, sample_size=SIZE)
        cfg = CLIPTextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=16, bos_token_id=0, eos_token_id=2,
                             pad_token_id=1)
        text = FlaxCLIPTextModel(cfg, _do_init=False)
        key = jax.random.PRNGKey(0)
        params = dict(
            unet=_random_params(jax.eval_shape(unet.init_weights, key), 1),
            vae=_random_params(jax.eval_shape(vae.init_weights, key), 2),
            text_encoder=_random_params(
                jax.eval_shape(functools.partial(text.init_weights, input_shape=(1, PROMPT_LEN)), key), 3))
    except Exception as err:
        return f"diffusers' Flax SD does not build with this flax/jax: {type(err).__name__}: {str(err)[:120]}"
    return unet, vae, text, params


def _pipeline(scheduler_name: str):
    """(pipeline, params): diffusers' own FlaxStableDiffusionPipeline on the tiny models and ``scheduler_name``."""
    models = _models()
    if isinstance(models, str):
        _unavailable(models)
    unet, vae, text, params = models
    import diffusers

    scheduler_cls = getattr(diffusers, scheduler_name, None)
    if scheduler_cls is None:
        _unavailable(f"no {scheduler_name} in diffusers {diffusers.__version__}")
    scheduler = scheduler_cls.from_config(dict(num_train_timesteps=1000, beta_schedule="scaled_linear",
                                               beta_start=0.00085, beta_end=0.012, skip_prk_steps=True))
    pipe = diffusers.FlaxStableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=None, unet=unet,
                                                 scheduler=scheduler, safety_checker=None, feature_extractor=None)
    return pipe, dict(params, scheduler=scheduler.create_state())


def _denoising_loop(closed):
    """The loop equation (scan or while) whose body holds the most ``dot_general``s: the UNet's step loop."""
    loops = [e for e in all_eqns(closed) if e.primitive.name in ("scan", "while")]
    assert loops, "no loop in the traced pipeline"
    body = {"scan": "jaxpr", "while": "body_jaxpr"}
    return max((e.params[body[e.primitive.name]] for e in loops), key=lambda b: count_primitives(b, "dot_general"))


def _cross_kv_names(unet_params) -> set[str]:
    """Every cross-attention K/V projection in the UNet: ``.../attn2/to_k`` and ``.../attn2/to_v``."""
    names = set()
    for path, _ in jax.tree_util.tree_flatten_with_path(unet_params)[0]:
        keys = [str(getattr(p, "key", p)) for p in path]
        if "attn2" in keys:
            i = keys.index("attn2")
            if keys[i + 1] in ("to_k", "to_v"):
                names.add("/".join(keys[: i + 2]))
    return names


# PNDM (the pipeline's default: a multistep buffer in its state) and Euler-discrete (sigma-scaled model input) in CI
# (~10 s each); DDIM is the same program shape as far as the UNet goes.
@pytest.mark.parametrize("scheduler", ["FlaxPNDMScheduler", "FlaxEulerDiscreteScheduler",
                                       pytest.param("FlaxDDIMScheduler", marks=pytest.mark.slow)])
def test_flax_stable_diffusion_cross_kv_leave_the_denoising_loop(scheduler):
    pipe, params = _pipeline(scheduler)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(3, VOCAB, (1, PROMPT_LEN)), jnp.int32)
    neg_ids = jnp.ones((1, PROMPT_LEN), jnp.int32)  # given, so _generate needs no tokenizer
    key = jax.random.PRNGKey(3)

    def generate(params, ids, neg_ids, key):
        return pipe._generate(ids, params, key, STEPS, SIZE, SIZE, 7.5, None, neg_ids)

    hoisted = kvhoist.hoist_invariants(generate)
    with warnings.catch_warnings():
        warnings.simplefilter("error", KvhoistWarning)
        got = hoisted(params, ids, neg_ids, key)
    want = jax.jit(generate)(params, ids, neg_ids, key)
    assert got.shape == (1, SIZE, SIZE, 3)
    assert np.isfinite(np.asarray(want)).all() and float(np.ptp(np.asarray(want))) > 0  # a real image, not a constant
    contract.assert_close(got, want)  # moved matmuls sit in other fusions: the bound, not bits

    report = hoisted.report(params, ids, neg_ids, key)
    assert not report.skipped, report.table()
    cross_kv = _cross_kv_names(params["unet"])
    assert len(cross_kv) == 8  # 1 (down) + 1 (mid) + 2 (up: layers_per_block + 1) cross-attention blocks x K, V
    hoisted_kv = {n for h in report.hoisted for n in cross_kv if h.name.endswith(n)}
    assert hoisted_kv == cross_kv, report.table()
    # Not the self-attention's K/V: they read the latents, which the loop updates.
    assert not any("attn1" in h.name for h in report.hoisted), report.table()

    before, after = hoisted.jaxprs(params, ids, neg_ids, key)
    in_loop_before = count_primitives(_denoising_loop(before), "dot_general")
    in_loop_after = count_primitives(_denoising_loop(after), "dot_general")
    assert in_loop_before - in_loop_after == len(cross_kv)  # exactly these matmuls left the body, no other
    # ... and they run once instead of once per step: the whole program's matmul executions drop by (STEPS-1)x8.
    runs_before = count_primitives(before, "dot_general", multiply_trips=True)
    runs_after = count_primitives(after, "dot_general", multiply_trips=True)
    assert runs_before - runs_after == (STEPS - 1) * len(cross_kv)


def test_a_hijax_primitive_in_a_rewritten_loop_body_still_lowers():
    """Found on this pipeline with jax 0.12 (Euler-discrete: ``jnp.interp`` -> ``jnp.searchsorted``, a "hijax"
    primitive there): a loop body rebuilt by the rewrite lost jax's ``is_high`` flag, so jit never lowered the
    primitive to plain ones and XLA lowering failed (``MLIR translation rule for primitive 'call_hi_primitive' not
    found``) instead of running or falling back. On jax 0.10 ``searchsorted`` is a plain primitive."""
    from jax import lax

    def f(ctx, w, x, grid):
        def step(h, t):
            k = ctx @ w  # invariant: leaves the loop, so the body is rebuilt
            i = jnp.searchsorted(grid, t * 0.1 + h[0, 0] * 0)  # loop-variant
            return jnp.tanh(h @ k.T @ k) + 1e-3 * i.astype(h.dtype), None
        return lax.scan(step, x, jnp.arange(4.0))[0]

    rng = np.random.default_rng(0)
    args = tuple(jnp.asarray(rng.standard_normal(s) * 0.3, jnp.float32) for s in ((16, 8), (8, 8), (2, 8)))
    args += (jnp.linspace(0.0, 1.0, 5),)
    hoisted = kvhoist.hoist_invariants(f)
    contract.assert_close(hoisted(*args), jax.jit(f)(*args))
    before, after = hoisted.jaxprs(*args)
    assert count_primitives(_denoising_loop(before), "dot_general") - count_primitives(
        _denoising_loop(after), "dot_general") == 1
    for j in (after, _denoising_loop(after)):  # the flag jax would have set, on the program and the rebuilt body
        assert j.is_high == any(e.primitive.is_high(*(v.aval for v in e.invars), **e.params) for e in all_eqns(j))
