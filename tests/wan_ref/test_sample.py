"""wan_ref.sample: parity with diffusers' Wan pipelines, and agreement of its loop / cache / layout forms.

Tiny shapes throughout: 2 layers, D = 24, latents [1, 4, 2, 4, 4] (8 tokens), 4 steps.
"""

from __future__ import annotations

import functools
import importlib
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from wan_ref import WanModel, get_preset, load_diffusers
from wan_ref.sample import LOOPS, sample
from wan_ref.schedulers import make_scheduler

LATENT_SHAPE = (1, 4, 2, 4, 4)  # tiny presets: 32x32 pixels, 5 frames
STEPS = 4
PARITY_TOL = 1e-4  # max |ours - diffusers| <= PARITY_TOL * max |diffusers|
FORMS_TOL = 1e-5  # loop forms, kv_cache, scan_layers (observed: bit-identical)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


# ----------------------------------------------------------------------------------- fixtures


def _random_inputs(preset, seed=0, batch=1):
    """latents, prompt / negative embeddings, image embeddings, condition for `preset` (numpy float32)."""
    rng = np.random.default_rng(seed)
    cfg = preset.config
    text_len = 512 if cfg.image_dim is not None else 8  # image-branch models split at seq - 512
    shape = (batch, *LATENT_SHAPE[1:])

    def randn(*s):
        return rng.standard_normal(s).astype(np.float32)

    inputs = dict(latents=randn(*shape), prompt_embeds=randn(batch, text_len, cfg.text_dim),
                  negative_prompt_embeds=randn(batch, text_len, cfg.text_dim), image_embeds=None, condition=None)
    if cfg.image_dim is not None:
        inputs["image_embeds"] = randn(batch, 5, cfg.image_dim)
    if preset.expand_timesteps:
        inputs["condition"] = randn(batch, shape[1], 1, *shape[3:])
    elif cfg.in_channels > cfg.out_channels:
        mask = np.zeros((batch, 4, *shape[2:]), np.float32)
        mask[:, :, 0] = 1
        inputs["condition"] = np.concatenate([mask, randn(batch, cfg.in_channels - 4 - shape[1], *shape[2:])], 1)
    return inputs


def _kwargs(preset, **over):
    kw = dict(num_inference_steps=STEPS, guidance_scale=preset.guidance_scale, flow_shift=preset.flow_shift,
              expand_timesteps=preset.expand_timesteps)
    if preset.boundary_ratio is not None:
        kw.update(boundary_ratio=preset.boundary_ratio, guidance_scale_2=preset.guidance_scale_2)
    kw.update(over)
    return kw


VARIANTS = ["tiny-t2v", "tiny-i2v", "tiny-t2v-a14b", "tiny-ti2v"]


def _unrolled_copy(model: WanModel) -> WanModel:
    """The same weights with `scan_layers=False` (no checkpoint round trip: runs without safetensors)."""
    cfg = model.config
    unrolled = WanModel(cfg.replace(scan_layers=False), rngs=nnx.Rngs(123))
    pure = nnx.state(model).to_pure_dict()
    pure["blocks"] = {i: jax.tree.map(lambda x: x[i], pure["blocks"]) for i in range(cfg.num_layers)}
    state = nnx.state(unrolled)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(unrolled, state)
    return unrolled


@functools.lru_cache(maxsize=None)
def _models(name: str, scan_layers: bool = True):
    """(model, model_2 or None) with random weights; scan_layers=False: the same weights, unrolled."""
    preset = get_preset(name)
    if not scan_layers:
        return tuple(None if m is None else _unrolled_copy(m) for m in _models(name, True))
    model = WanModel(preset.config, rngs=nnx.Rngs(0))
    model_2 = WanModel(preset.config_2, rngs=nnx.Rngs(1)) if preset.config_2 is not None else None
    return model, model_2


def _run(name, *, scan_layers=True, inputs=None, **over):
    preset = get_preset(name)
    model, model_2 = _models(name, scan_layers)
    inputs = inputs or _random_inputs(preset)
    kw = _kwargs(preset, **over)
    if model_2 is not None and "model_2" not in kw:
        kw["model_2"] = model_2
    arrays = {k: (None if v is None else jnp.asarray(v)) for k, v in inputs.items()}
    latents = arrays.pop("latents")
    pe, npe = arrays.pop("prompt_embeds"), arrays.pop("negative_prompt_embeds")
    return np.asarray(sample(model, latents, pe, npe, **arrays, **kw))


# ------------------------------------------------------------------ forms agree (torch-free)


@functools.lru_cache(maxsize=None)
def _default_run(name, scan_layers=True, loop="scan", kv_cache=False):
    """`_run` on the default inputs, memoised: compiling is most of the cost, so tests share the runs."""
    out = _run(name, scan_layers=scan_layers, loop=loop, kv_cache=kv_cache)
    out.setflags(write=False)
    return out


# Each (loop, kv_cache) form is compared with scan + no cache. Every loop form and both cache settings are
# covered for each variant, not their full cross product (compiles dominate the test time).
_FORMS = {
    "tiny-t2v": [("fori", False), ("python", False), ("scan", True), ("python", True)],
    "tiny-i2v": [("fori", False), ("python", False), ("scan", True)],
    "tiny-t2v-a14b": [("fori", False), ("python", False), ("scan", True), ("python", True)],
    "tiny-ti2v": [("fori", False), ("python", False), ("scan", True)],
}


@pytest.mark.parametrize("name", VARIANTS)
def test_loop_forms_and_kv_cache_agree(name):
    assert {loop for loop, _ in _FORMS[name]} | {"scan"} == set(LOOPS)
    assert {kv for _, kv in _FORMS[name]} == {False, True}
    base = _default_run(name)
    assert np.all(np.isfinite(base))
    for loop, kv_cache in _FORMS[name]:
        got = _default_run(name, loop=loop, kv_cache=kv_cache)
        assert _rel(got, base) <= FORMS_TOL, (loop, kv_cache, _rel(got, base))


@pytest.mark.parametrize("name,kv_caches", [("tiny-t2v", (False, True)), ("tiny-i2v", (False, True)),
                                             ("tiny-t2v-a14b", (True,)), ("tiny-ti2v", (False,))])
def test_scan_layers_on_and_off_agree(name, kv_caches):
    # Unrolled layers take other model code paths (a Python loop over blocks, per-layer cache tuples).
    for kv_cache in kv_caches:
        scanned = _default_run(name, kv_cache=kv_cache)
        unrolled = _default_run(name, scan_layers=False, kv_cache=kv_cache)
        assert _rel(unrolled, scanned) <= FORMS_TOL, kv_cache


def test_matches_a_direct_two_forward_loop():
    """sample == the textbook pipeline loop: two separate forwards (cond, uncond), then the scheduler."""
    preset = get_preset("tiny-t2v")
    model, _ = _models("tiny-t2v")
    inputs = _random_inputs(preset)
    sched = make_scheduler("unipc", num_inference_steps=STEPS, flow_shift=preset.flow_shift)
    x = jnp.asarray(inputs["latents"])
    state = sched.init(x)
    forward = jax.jit(lambda m, x, t, c: m(x, t, c))
    for t in sched.timesteps:
        ts = jnp.full((1,), float(t), jnp.float32)
        cond = forward(model, x, ts, jnp.asarray(inputs["prompt_embeds"]))
        uncond = forward(model, x, ts, jnp.asarray(inputs["negative_prompt_embeds"]))
        x, state = sched.step(state, uncond + preset.guidance_scale * (cond - uncond), x)
    assert _rel(_default_run("tiny-t2v"), x) <= 1e-5


def test_guidance_scale_one_or_no_negative_disables_cfg():
    preset = get_preset("tiny-t2v")
    inputs = _random_inputs(preset)
    no_cfg = _run("tiny-t2v", inputs=inputs, guidance_scale=1.0)
    without_negative = _run("tiny-t2v", inputs={**inputs, "negative_prompt_embeds": None})
    np.testing.assert_array_equal(no_cfg, without_negative)
    assert _rel(_run("tiny-t2v", inputs=inputs), no_cfg) > 1e-3  # CFG does change the result


def test_expert_switch_follows_the_boundary():
    name = "tiny-t2v-a14b"
    preset = get_preset(name)
    model, model_2 = _models(name)
    inputs = _random_inputs(preset)
    # Schedule with shift 12, 4 steps: t = 999, 973, 923, 800 -> only the last step is below 875.
    assert list(make_scheduler("unipc", num_inference_steps=STEPS, flow_shift=12.0).timesteps) == [999, 973, 923, 800]
    only_1 = _run_model(model, inputs, preset)
    only_2 = _run_model(model_2, inputs, preset, guidance_scale=preset.guidance_scale_2)
    both = _default_run(name)
    # boundary 0 keeps `model` for every step; boundary > 1 hands every step to model_2 with guidance_scale_2.
    assert _rel(_run(name, inputs=inputs, boundary_ratio=0.0), only_1) <= FORMS_TOL
    assert _rel(_run(name, inputs=inputs, boundary_ratio=1.01), only_2) <= FORMS_TOL
    assert _rel(both, only_1) > 1e-4 and _rel(both, only_2) > 1e-4
    # guidance_scale_2 defaults to guidance_scale (diffusers); with model_2 := model the switch is invisible.
    assert _rel(_run(name, inputs=inputs, model_2=model, guidance_scale_2=None), only_1) <= FORMS_TOL


def _run_model(model, inputs, preset, **over):
    arrays = {k: (None if v is None else jnp.asarray(v)) for k, v in inputs.items()}
    return np.asarray(sample(model, arrays.pop("latents"), arrays.pop("prompt_embeds"),
                             arrays.pop("negative_prompt_embeds"), **arrays,
                             **_kwargs(preset, boundary_ratio=None, guidance_scale_2=None, **over)))


def test_ti2v_first_frame_is_the_condition():
    preset = get_preset("tiny-ti2v")
    inputs = _random_inputs(preset)
    out = _run("tiny-ti2v", inputs=inputs)
    np.testing.assert_array_equal(out[:, :, :1], inputs["condition"])
    assert np.abs(out[:, :, 1:]).max() > 0


# ------------------------------------------------------------------------------- traceability


def _all_consts(closed):
    """Constants of a ClosedJaxpr and of every jaxpr nested in its equations' params."""
    out = list(closed.consts)

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    if hasattr(sub, "consts") and hasattr(sub, "jaxpr"):  # ClosedJaxpr
                        out.extend(sub.consts)
                        walk(sub.jaxpr)
                    elif hasattr(sub, "eqns"):  # open Jaxpr
                        walk(sub)

    walk(closed.jaxpr)
    return out


@pytest.mark.parametrize("name,kv_cache", [("tiny-t2v", False), ("tiny-t2v-a14b", True), ("tiny-i2v", False)])
@pytest.mark.parametrize("loop", ["scan", "fori"])
def test_make_jaxpr_has_weights_as_inputs_not_constants(name, kv_cache, loop):
    preset = get_preset(name)
    model, model_2 = _models(name)
    inputs = {k: (None if v is None else jnp.asarray(v)) for k, v in _random_inputs(preset).items()}
    kw = _kwargs(preset, loop=loop, kv_cache=kv_cache)

    def fn(model, model_2, latents, pe, npe, image_embeds, condition):
        return sample(model, latents, pe, npe, model_2=model_2, image_embeds=image_embeds, condition=condition,
                      **kw)

    closed = jax.make_jaxpr(fn)(model, model_2, inputs["latents"], inputs["prompt_embeds"],
                                inputs["negative_prompt_embeds"], inputs["image_embeds"], inputs["condition"])
    n_data = sum(x is not None for x in (inputs["image_embeds"], inputs["condition"])) + 3
    n_weights = len(jax.tree_util.tree_leaves(model)) * (2 if model_2 is not None else 1)
    assert len(closed.jaxpr.invars) == n_weights + n_data
    weight_shapes = {tuple(x.shape) for x in jax.tree_util.tree_leaves(model) if x.ndim >= 2}
    consts = _all_consts(closed)
    big = [tuple(np.shape(c)) for c in consts if np.size(c) > 64 or tuple(np.shape(c)) in weight_shapes]
    assert not big, f"weight-like constants baked into the jaxpr: {big}"


def test_jit_of_sample_matches_eager():
    preset = get_preset("tiny-t2v-a14b")
    model, model_2 = _models("tiny-t2v-a14b")
    inputs = {k: (None if v is None else jnp.asarray(v)) for k, v in _random_inputs(preset).items()}
    kw = _kwargs(preset)
    static = tuple(k for k in kw) + ("loop", "kv_cache")
    jitted = jax.jit(sample, static_argnames=static)
    args = (model, inputs["latents"], inputs["prompt_embeds"], inputs["negative_prompt_embeds"])
    got = jitted(*args, model_2=model_2, loop="scan", kv_cache=True, **kw)
    assert _rel(got, _run("tiny-t2v-a14b", inputs=_random_inputs(preset))) <= FORMS_TOL


def test_python_loop_compiles_one_step_and_bakes_no_weights():
    sample_module = importlib.import_module("wan_ref.sample")  # `wan_ref.sample` is the function

    _run("tiny-t2v-a14b", loop="python")  # two experts, same structure: one compiled step
    size = sample_module._one_step_jit._cache_size()
    _run("tiny-t2v-a14b", loop="python")
    assert sample_module._one_step_jit._cache_size() == size
    # Traced from the outside, the weights stay inputs of the unrolled loop.
    preset = get_preset("tiny-t2v")
    model, _ = _models("tiny-t2v")
    inputs = {k: (None if v is None else jnp.asarray(v)) for k, v in _random_inputs(preset).items()}
    closed = jax.make_jaxpr(functools.partial(sample, **_kwargs(preset, loop="python")))(
        model, inputs["latents"], inputs["prompt_embeds"], inputs["negative_prompt_embeds"])
    assert not [c for c in _all_consts(closed) if np.size(c) > 64]


def test_python_loop_step_fn_hook():
    """`step_fn` (the host-loop hoisting hook) is called once per step with the undecorated step's signature."""
    sample_module = importlib.import_module("wan_ref.sample")
    jitted = jax.jit(sample_module.one_step, static_argnames=("plan",))
    calls = []

    def step_fn(plan, expert, shared, latents, state):
        calls.append(plan)
        return jitted(plan, expert, shared, latents, state)

    got = _run("tiny-t2v-a14b", loop="python", step_fn=step_fn)
    assert len(calls) == STEPS
    assert _rel(got, _default_run("tiny-t2v-a14b")) <= FORMS_TOL


# ------------------------------------------------------------------------------------------ errors


def test_errors_name_the_fix():
    preset = get_preset("tiny-t2v")
    model, _ = _models("tiny-t2v")
    i2v, _ = _models("tiny-i2v")
    x = jnp.zeros(LATENT_SHAPE)
    pe = jnp.zeros((1, 8, 32))
    kw = dict(num_inference_steps=2)
    with pytest.raises(ValueError, match=r"unknown scheduler 'ddim'; valid names: 'unipc', 'euler'"):
        sample(model, x, pe, scheduler="ddim", **kw)
    with pytest.raises(ValueError, match=r"unknown loop 'while'; valid loops: 'scan', 'fori', 'python'"):
        sample(model, x, pe, loop="while", **kw)
    with pytest.raises(ValueError, match=r"model_2 .* needs boundary_ratio"):
        sample(model, x, pe, model_2=model, **kw)
    with pytest.raises(ValueError, match=r"boundary_ratio was given without model_2"):
        sample(model, x, pe, boundary_ratio=0.9, **kw)
    pe512 = jnp.zeros((1, 512, 32))
    cond = jnp.zeros((1, 8, *LATENT_SHAPE[2:]))
    with pytest.raises(ValueError, match=r"image branch .*image_dim=24.* pass image_embeds"):
        sample(i2v, x, pe512, condition=cond, **kw)
    with pytest.raises(ValueError, match=r"condition has 4 channels, expected in_channels - latent channels = "
                                         r"12 - 4 = 8"):
        sample(i2v, x, pe512, condition=jnp.zeros(LATENT_SHAPE), image_embeds=jnp.zeros((1, 5, 24)), **kw)
    with pytest.raises(ValueError, match=r"in_channels=12 but latents have 4 channels.*pass condition"):
        sample(i2v, x, pe512, image_embeds=jnp.zeros((1, 5, 24)), **kw)
    with pytest.raises(ValueError, match=r"TI2V condition must be the first-frame latents"):
        sample(model, x, pe, condition=jnp.zeros((1, 3, 1, 4, 4)), expand_timesteps=True, **kw)
    with pytest.raises(ValueError, match=r"negative_prompt_embeds .* must have the shape of prompt_embeds"):
        sample(model, x, pe, jnp.zeros((1, 9, 32)), **kw)
    with pytest.raises(ValueError, match=r"step_fn is only used by loop='python'"):
        sample(model, x, pe, step_fn=lambda *a: a, **kw)
    with pytest.raises(ValueError, match=r"no model has an image branch"):
        sample(model, x, pe, image_embeds=jnp.zeros((1, 5, 24)), **kw)
    del preset


# ------------------------------------------------------------------------ parity with diffusers

_TESTS_DIR = str(Path(__file__).resolve().parents[1])


def _diffusers_transformer(preset_config, path, seed):
    if _TESTS_DIR not in sys.path:
        sys.path.insert(0, _TESTS_DIR)
    from conftest import make_diffusers_wan  # the model engineer's helper (random weights, save_pretrained)

    return make_diffusers_wan(preset_config, path, seed=seed)


def _diffusers_scheduler(name, shift):
    import diffusers

    if name == "unipc":
        return diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                 num_train_timesteps=1000, flow_shift=shift)
    return diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)


def _torch_inputs(preset, seed=0):
    torch = pytest.importorskip("torch")
    return {k: (None if v is None else torch.from_numpy(v)) for k, v in _random_inputs(preset, seed).items()}


def _pair(preset_name, tmp_path, seeds=(0, 1)):
    """(torch transformers, wan_ref models loaded from their checkpoints) for a preset."""
    preset = get_preset(preset_name)
    torch_models, ours = [], []
    for i, cfg in enumerate(c for c in (preset.config, preset.config_2) if c is not None):
        path = tmp_path / f"transformer_{i}"
        torch_models.append(_diffusers_transformer(cfg, path, seeds[i]))
        ours.append(load_diffusers(path))
    return preset, torch_models, ours


def _ours(models, inputs, preset, **over):
    kw = _kwargs(preset, **over)
    if len(models) == 2:
        kw["model_2"] = models[1]
    arrays = {k: (None if v is None else jnp.asarray(v.numpy())) for k, v in inputs.items()}
    return np.asarray(sample(models[0], arrays.pop("latents"), arrays.pop("prompt_embeds"),
                             arrays.pop("negative_prompt_embeds"), **arrays, **kw))


@pytest.mark.torch
@pytest.mark.parametrize("preset_name,scheduler", [("tiny-t2v", "unipc"), ("tiny-t2v", "euler"),
                                                   ("tiny-t2v-a14b", "unipc"), ("tiny-ti2v", "unipc")])
def test_matches_wan_pipeline(tmp_path, preset_name, scheduler):
    """WanPipeline (T2V; Wan 2.2 A14B with transformer_2; TI2V text-only with expand_timesteps)."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    preset, torch_models, ours = _pair(preset_name, tmp_path)
    pipe = diffusers.WanPipeline(
        tokenizer=None, text_encoder=None, vae=None, scheduler=_diffusers_scheduler(scheduler, preset.flow_shift),
        transformer=torch_models[0], transformer_2=torch_models[1] if len(torch_models) == 2 else None,
        boundary_ratio=preset.boundary_ratio, expand_timesteps=preset.expand_timesteps)
    pipe.set_progress_bar_config(disable=True)
    inputs = _torch_inputs(preset)
    inputs["condition"] = None  # text-to-video
    with torch.no_grad():
        ref = pipe(prompt_embeds=inputs["prompt_embeds"], negative_prompt_embeds=inputs["negative_prompt_embeds"],
                   latents=inputs["latents"].clone(), height=32, width=32, num_frames=5,
                   num_inference_steps=STEPS, guidance_scale=preset.guidance_scale,
                   guidance_scale_2=preset.guidance_scale_2, output_type="latent").frames.numpy()
    got = _ours(ours, inputs, preset, scheduler=scheduler)
    assert _rel(got, ref) <= PARITY_TOL


def _tiny_vae_and_clip(torch, diffusers):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                     latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 2.0, 1.0]).eval()
    clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        patch_size=16)).eval()
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return vae, clip, processor


@pytest.mark.torch
@pytest.mark.parametrize("preset_name", ["tiny-i2v", "tiny-i2v-a14b", "tiny-ti2v"])
def test_matches_image_to_video_pipeline(tmp_path, preset_name):
    """WanImageToVideoPipeline with a tiny VAE (and a tiny CLIP for Wan 2.1 I2V); `condition` and
    `image_embeds` for wan_ref are taken from the same pipeline's `prepare_latents` / `encode_image`."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    PIL = pytest.importorskip("PIL.Image")
    preset, torch_models, ours = _pair(preset_name, tmp_path)
    vae, clip, processor = _tiny_vae_and_clip(torch, diffusers)
    has_image_branch = preset.config.image_dim is not None
    pipe = diffusers.WanImageToVideoPipeline(
        tokenizer=None, text_encoder=None, vae=vae, scheduler=_diffusers_scheduler("unipc", preset.flow_shift),
        image_processor=processor if has_image_branch else None, image_encoder=clip if has_image_branch else None,
        transformer=torch_models[0], transformer_2=torch_models[1] if len(torch_models) == 2 else None,
        boundary_ratio=preset.boundary_ratio, expand_timesteps=preset.expand_timesteps)
    pipe.set_progress_bar_config(disable=True)
    image = PIL.fromarray((np.random.default_rng(3).random((32, 32, 3)) * 255).astype(np.uint8))
    inputs = _torch_inputs(preset)
    with torch.no_grad():
        ref = pipe(image=image, prompt_embeds=inputs["prompt_embeds"],
                   negative_prompt_embeds=inputs["negative_prompt_embeds"], latents=inputs["latents"].clone(),
                   height=32, width=32, num_frames=5, num_inference_steps=STEPS,
                   guidance_scale=preset.guidance_scale, guidance_scale_2=preset.guidance_scale_2,
                   output_type="latent").frames.numpy()
        pixels = pipe.video_processor.preprocess(image, height=32, width=32).to(dtype=torch.float32)
        prepared = pipe.prepare_latents(pixels, 1, 4, 32, 32, 5, torch.float32, "cpu", None,
                                        inputs["latents"].clone(), None)
        inputs["condition"] = prepared[1]  # I2V: mask + latents (8 ch); TI2V: first-frame latents
        inputs["image_embeds"] = pipe.encode_image(image, "cpu") if has_image_branch else None
    got = _ours(ours, inputs, preset)
    assert _rel(got, ref) <= PARITY_TOL
