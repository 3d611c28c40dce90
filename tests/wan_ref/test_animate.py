"""wan_ref.animate: parity with diffusers' WanAnimateTransformer3DModel / WanAnimatePipeline, loading, the hand
cache, and @hoist_invariants moving the pose embedding, the motion + face encoders and every K/V out of the
step loop."""

from __future__ import annotations

import json
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kvhoist
from kvhoist import compat
from wan_ref import get_preset, load_diffusers, save_diffusers
from wan_ref.animate import AnimateCache, WanAnimateModel
from wan_ref.sample import sample

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: conftest
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # test_vace
from conftest import make_diffusers_transformer  # noqa: E402
from test_vace import heavy_ops, step_loop_body  # noqa: E402

FP32_TOL = 1e-4
HOIST_TOL = 1e-5  # hoisted vs jit, relative (XLA compiles the moved convolutions outside the loop)
CLASS = "WanAnimateTransformer3DModel"
STEPS = 4


def _rel(out, ref) -> float:
    return float(np.abs(np.asarray(out, np.float32) - ref).max() / np.abs(ref).max())


@jax.jit
def _forward(model, x, t, text, image, pose, face):
    return model(x, t, text, image, pose_hidden_states=pose, face_pixel_values=face, motion_encode_batch_size=3)


def _inputs(cfg, batch=2, seed=0):
    """Latents [B, 12, 3, 4, 4], pose [B, 4, 2, 4, 4], 5 face frames of 16x16 (-> 3 motion frames)."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((batch, cfg.in_channels, 3, 4, 4)).astype(np.float32),
            np.array([999.0, 321.5][:batch], np.float32),
            rng.standard_normal((batch, 512, cfg.text_dim)).astype(np.float32),
            rng.standard_normal((batch, 257, cfg.image_dim)).astype(np.float32),
            rng.standard_normal((batch, cfg.latent_channels, 2, 4, 4)).astype(np.float32),
            rng.uniform(-1, 1, (batch, 3, 5, 16, 16)).astype(np.float32))


@pytest.fixture(scope="module")
def torch_and_ours(tmp_path_factory):
    """A random tiny diffusers Animate transformer (motion-encoder weights ~ N(0, 1) as diffusers initialises
    them; they rescale themselves) saved with save_pretrained, and wan_ref's load of it (scanned layers)."""
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    path = tmp_path_factory.mktemp("animate") / "transformer"
    tm = make_diffusers_transformer(CLASS, get_preset("tiny-animate").config, path, seed=3,
                                    unit_std_prefixes=("motion_encoder.",))
    return tm, path, load_diffusers(path)


@pytest.mark.torch
def test_forward_parity_load_and_cache(torch_and_ours):
    """One forward vs diffusers (CLIP branch, pose on frames 1.., motion encoder in batches of 3 over 10 face
    frames, face adapters after blocks 0 and 2), scanned and unrolled layers."""
    import torch

    tm, path, scanned = torch_and_ours
    x, t, text, image, pose, face = _inputs(scanned.config)
    with torch.no_grad():
        ref = tm(*(torch.from_numpy(a) for a in (x, t, text, image)), pose_hidden_states=torch.from_numpy(pose),
                 face_pixel_values=torch.from_numpy(face), motion_encode_batch_size=3, return_dict=False)[0].numpy()
    unrolled = load_diffusers(path, scan_layers=False)
    for model in (scanned, unrolled):
        assert isinstance(model, WanAnimateModel)
        out = _forward(model, x, t, text, image, pose, face)
        assert _rel(out, ref) <= FP32_TOL, model.config.scan_layers
    # (the hand-written cache is checked through the sampler below)
    # The face path matters: a blank face video changes the output.
    assert _rel(_forward(unrolled, x, t, text, image, pose, face * 0 - 1), ref) > 1e-3


@pytest.mark.torch
def test_save_diffusers_round_trips_through_diffusers(torch_and_ours, tmp_path):
    """save_diffusers (stacked face adapters, plain `to_out`, torch-layout convolutions) writes what
    WanAnimateTransformer3DModel loads strictly, tensor for tensor; the loader routes on `_class_name`."""
    diffusers = pytest.importorskip("diffusers")
    from safetensors.torch import load_file

    tm, _, scanned = torch_and_ours
    save_diffusers(scanned, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["_class_name"] == CLASS
    back = diffusers.WanAnimateTransformer3DModel.from_config(config)
    back.load_state_dict(load_file(tmp_path / "ours" / "diffusion_pytorch_model.safetensors"), strict=True)
    theirs = tm.state_dict()
    for key, value in back.state_dict().items():
        assert np.array_equal(value.numpy(), theirs[key].numpy()), key
    assert type(load_diffusers(tmp_path / "ours", scan_layers=False)) is WanAnimateModel


def test_config_and_input_errors():
    cfg = get_preset("tiny-animate").config
    with pytest.raises(ValueError, match="multiple of inject_face_latents_blocks=3"):
        cfg.replace(inject_face_latents_blocks=3)
    with pytest.raises(ValueError, match="2 \\* latent_channels \\+ 4 = 12"):
        cfg.replace(in_channels=16)
    with pytest.raises(ValueError, match="power of two"):
        cfg.replace(motion_encoder_size=24)
    model = nnx.eval_shape(lambda: WanAnimateModel(cfg, rngs=nnx.Rngs(0)))
    x, t, text, image, pose, face = (jnp.asarray(a) for a in _inputs(cfg, batch=1))
    with pytest.raises(ValueError, match=r"pose_hidden_states must be the pose latents \[1, 4, 2, 4, 4\]"):
        model(x, t, text, image, pose_hidden_states=pose[:, :, :1], face_pixel_values=face)
    with pytest.raises(ValueError, match="face_pixel_values must be the face video"):
        model(x, t, text, image, pose_hidden_states=pose, face_pixel_values=face[..., :8, :8])
    with pytest.raises(ValueError, match="must divide the 12 latent tokens"):
        model(x, t, text, image, pose_hidden_states=pose, face_pixel_values=jnp.concatenate([face] * 3, axis=2))
    with pytest.raises(ValueError, match="motion_encode_batch_size must be a positive int"):
        model(x, t, text, image, pose_hidden_states=pose, face_pixel_values=face, motion_encode_batch_size=-1)
    with pytest.raises(ValueError, match="an Animate model needs pose_hidden_states"):
        sample(model, x[:, :4], text, image_embeds=image, condition=x[:, 4:], num_inference_steps=1)
    with pytest.raises(ValueError, match="control_hidden_states given to a 'animate' model"):
        sample(model, x[:, :4], text, image_embeds=image, condition=x[:, 4:], num_inference_steps=1,
               pose_hidden_states=pose, face_pixel_values=face, control_hidden_states=x)


# ---- sampler --------------------------------------------------------------------------------------------
INVARIANT = ("pose_patch_embedding", "motion_encoder", "face_encoder", "face_adapter/to_k", "face_adapter/to_v",
             "attn2/to_k", "attn2/to_v", "add_k_proj", "add_v_proj", "image_embedder", "text_embedder")


def _primitives(j, acc=None) -> set:
    acc = set() if acc is None else acc
    for e in compat.split_closed(j)[4]:
        acc.add(e.primitive.name)
        for s in compat.subjaxprs_of(e):
            _primitives(s, acc)
    return acc


@pytest.mark.torch
def test_sampler_matches_animate_pipeline_and_hoists(torch_and_ours):
    """WanAnimatePipeline in replacement mode (tiny VAE and CLIP, UniPC, CFG with the blanked face, one
    segment, output_type="latent") vs `wan_ref.sample` on the inputs that pipeline gives its transformer;
    the hand-written cache; @hoist_invariants (same numbers as jit; pose embedding, motion encoder with its
    QR, face encoder, every face-adapter K/V, and with unrolled layers also every text / image K/V leave the
    step loop)."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    PIL = pytest.importorskip("PIL.Image")
    from test_vace import _capture_first_call, _tiny_vae

    tm, path, ours = torch_and_ours
    preset = get_preset("tiny-animate")
    torch.manual_seed(0)
    vae = _tiny_vae(torch, diffusers)
    clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        patch_size=16)).eval()
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    scheduler = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                  num_train_timesteps=1000, flow_shift=preset.flow_shift)
    pipe = diffusers.WanAnimatePipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=scheduler,
                                        image_processor=processor, image_encoder=clip, transformer=tm)
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(11)

    def pil(h, w, mode="RGB"):
        shape = (h, w, 3) if mode == "RGB" else (h, w)
        return PIL.fromarray((rng.random(shape) * 255).astype(np.uint8), mode=mode)

    pe = torch.from_numpy(rng.standard_normal((1, 512, 32)).astype(np.float32))
    npe = torch.from_numpy(rng.standard_normal((1, 512, 32)).astype(np.float32))
    latents = torch.from_numpy(rng.standard_normal((1, 4, 3, 4, 4)).astype(np.float32))
    seen = _capture_first_call(tm)
    with torch.no_grad():
        ref = pipe(image=pil(32, 32), pose_video=[pil(32, 32) for _ in range(5)],
                   face_video=[pil(16, 16) for _ in range(5)], background_video=[pil(32, 32) for _ in range(5)],
                   mask_video=[pil(32, 32, "L") for _ in range(5)], prompt_embeds=pe, negative_prompt_embeds=npe,
                   height=32, width=32, segment_frame_length=5, num_inference_steps=STEPS, mode="replace",
                   guidance_scale=preset.guidance_scale, motion_encode_batch_size=2, latents=latents.clone(),
                   output_type="latent").frames.numpy()
    # The pipeline returns de-standardised latents (x * std + mean, ready for the VAE); undo that.
    mean = np.asarray(vae.config.latents_mean, np.float32).reshape(1, -1, 1, 1, 1)
    std = np.asarray(vae.config.latents_std, np.float32).reshape(1, -1, 1, 1, 1)
    ref = (ref - mean) / std
    kw = {k: jnp.asarray(seen[0][k].numpy()) for k in ("hidden_states", "encoder_hidden_states_image",
                                                         "pose_hidden_states", "face_pixel_values")}
    condition = kw["hidden_states"][:, 4:]  # reference-image + background latents with their masks

    def run(model, latents, pe, npe, image, condition, pose, face, kv_cache=False):
        return sample(model, latents, pe, npe, num_inference_steps=STEPS, guidance_scale=preset.guidance_scale,
                      flow_shift=preset.flow_shift, image_embeds=image, condition=condition,
                      pose_hidden_states=pose, face_pixel_values=face, motion_encode_batch_size=2,
                      kv_cache=kv_cache)

    args = (ours, jnp.asarray(latents.numpy()), jnp.asarray(pe.numpy()), jnp.asarray(npe.numpy()),
            kw["encoder_hidden_states_image"], condition, kw["pose_hidden_states"], kw["face_pixel_values"])
    plain = np.asarray(jax.jit(run)(*args))
    assert _rel(plain, ref) <= FP32_TOL
    cache = jax.eval_shape(lambda m, a: m.compute_kv_cache(a[2], a[4], pose_hidden_states=a[6],
                                                           face_pixel_values=a[7]), ours, args)
    assert isinstance(cache, AnimateCache) and cache.face_k.shape == (2, 3, 3, 2, 12)  # [n, B*T, N, H, d]
    assert _rel(jax.jit(run, static_argnames="kv_cache")(*args, kv_cache=True), plain) <= HOIST_TOL

    # Scanned layers: the face path, pose and context embedders and the blocks' text / CLIP K/V (fissioned out
    # of the layer scan next to the adapter `cond`) all leave the step loop; so do they with unrolled layers.
    hoisted = kvhoist.hoist_invariants(run)
    assert _rel(hoisted(*args), plain) <= HOIST_TOL
    _check_moved(*hoisted.jaxprs(*args), exempt=())
    unrolled = load_diffusers(path, scan_layers=False)  # same weights, unrolled layers and adapters
    args = (unrolled,) + args[1:]
    hoisted = kvhoist.hoist_invariants(run)
    assert _rel(hoisted(*args), plain) <= HOIST_TOL
    _check_moved(*hoisted.jaxprs(*args), exempt=())


def _check_moved(before, after, exempt: tuple[str, ...]) -> None:
    """Every conv / projection on step-invariant inputs (but `exempt`) is in the step body before, not after."""
    def names(j):  # "face_adapter/1/to_k" (unrolled) reads as "face_adapter/to_k"
        return {(prim, re.sub(r"/\d+(?=/)", "", name)) for prim, name in heavy_ops(step_loop_body(j))}

    body_before, body_after = names(before), names(after)
    for name in INVARIANT:
        assert any(name in k[1] for k in body_before), name
    left = [k for k in body_after if any(s in k[1] for s in INVARIANT) and not any(s in k[1] for s in exempt)]
    assert not left, left
    assert any(k[0] == "conv_general_dilated" for k in body_before)
    assert not [k for k in body_after if k[0] == "conv_general_dilated"]
    assert "qr" in _primitives(step_loop_body(before)) and "qr" not in _primitives(step_loop_body(after))
    assert ("dot_general", "patch_embedding") in body_after  # the latent patch embedding stays
    assert any("face_adapter" in k[1] and "to_q" in k[1] for k in body_after)  # adapter queries read the latents
