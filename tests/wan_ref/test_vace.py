"""wan_ref.vace: parity with diffusers' WanVACETransformer3DModel / WanVACEPipeline, loading, the hand cache,
and @hoist_invariants moving the control embedding and every cross-attention K/V out of the step loop."""

from __future__ import annotations

import collections
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kvhoist
import wan_ref
from kvhoist import compat, contract
from wan_ref import get_preset, load_diffusers, save_diffusers
from wan_ref.sample import sample
from wan_ref.vace import VACECache, WanVACEConfig, WanVACEModel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: conftest
from conftest import make_diffusers_transformer  # noqa: E402

FP32_TOL = 1e-4
CLASS = "WanVACETransformer3DModel"
STEPS = 4


def _rel(out, ref) -> float:
    return float(np.abs(np.asarray(out, np.float32) - ref).max() / np.abs(ref).max())


@jax.jit
def _forward(model, x, t, text, control, scale):
    return model(x, t, text, control_hidden_states=control, control_hidden_states_scale=scale)


@jax.jit
def _cached(model, cache, x, t):
    return model(x, t, None, kv_cache=cache)


def _inputs(cfg, batch=2, frames=2, control_frames=1, text_len=7, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((batch, cfg.in_channels, frames, 4, 4)).astype(np.float32),
            np.array([999.0, 321.5][:batch], np.float32),
            rng.standard_normal((batch, text_len, cfg.text_dim)).astype(np.float32),
            rng.standard_normal((batch, cfg.vace_in_channels, control_frames, 4, 4)).astype(np.float32),
            np.array([0.7, 1.3], np.float32))


@pytest.fixture(scope="module")
def torch_and_ours(tmp_path_factory):
    """A random tiny diffusers VACE transformer saved sharded, and wan_ref's load of it (scanned layers)."""
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    path = tmp_path_factory.mktemp("vace") / "transformer"
    tm = make_diffusers_transformer(CLASS, get_preset("tiny-vace").config, path, seed=3, max_shard_size="20KB")
    assert os.path.isfile(path / "diffusion_pytorch_model.safetensors.index.json")
    return tm, path, load_diffusers(path)


@pytest.mark.torch
def test_forward_parity_load_and_cache(torch_and_ours):
    """One forward vs diffusers (control shorter than the latents: zero-padded tokens; per-hint scales),
    scanned and unrolled layers from a sharded checkpoint; the hand cache gives the same output."""
    import torch

    tm, path, scanned = torch_and_ours
    x, t, text, control, scale = _inputs(scanned.config)
    with torch.no_grad():
        ref = tm(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(text),
                 control_hidden_states=torch.from_numpy(control),
                 control_hidden_states_scale=torch.from_numpy(scale), return_dict=False)[0].numpy()
    unrolled = load_diffusers(path, scan_layers=False)
    for model in (scanned, unrolled):
        assert isinstance(model, WanVACEModel) and model.config.vace_layers == (0, 2)
        out = _forward(model, x, t, text, control, scale)
        assert _rel(out, ref) <= FP32_TOL, model.config.scan_layers
    # (scanned layers: the cache is checked through the sampler below)
    cache = jax.jit(lambda m, *a: m.compute_kv_cache(a[0], control_hidden_states=a[1],
                                                     control_hidden_states_scale=a[2], num_latent_frames=2)
                    )(unrolled, text, control, scale)
    assert isinstance(cache, VACECache) and len(cache.vace_kv) == 2
    assert _rel(_cached(unrolled, cache, x, t), np.asarray(out)) <= 1e-6
    # The control branch matters: zero scales change the output.
    assert _rel(_forward(unrolled, x, t, text, control, scale * 0), ref) > 1e-3


@pytest.mark.torch
def test_save_diffusers_round_trips_through_diffusers(torch_and_ours, tmp_path):
    """save_diffusers writes what WanVACETransformer3DModel loads strictly, tensor for tensor."""
    diffusers = pytest.importorskip("diffusers")
    from safetensors.torch import load_file

    tm, _, scanned = torch_and_ours
    save_diffusers(scanned, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["_class_name"] == CLASS and config["vace_layers"] == [0, 2]
    back = diffusers.WanVACETransformer3DModel.from_config(config)
    back.load_state_dict(load_file(tmp_path / "ours" / "diffusion_pytorch_model.safetensors"), strict=True)
    theirs = tm.state_dict()
    for key, value in back.state_dict().items():
        assert np.array_equal(value.numpy(), theirs[key].numpy()), key
    # The plain loader routes on `_class_name` and refuses classes it does not implement.
    assert type(load_diffusers(tmp_path / "ours", scan_layers=False)) is WanVACEModel
    config["_class_name"] = "WanVACETransformer3DModelV2"
    (tmp_path / "ours" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="holds a WanVACETransformer3DModelV2; wan_ref loads"):
        load_diffusers(tmp_path / "ours")


def test_config_and_input_errors():
    cfg = get_preset("tiny-vace").config
    # A VACE config dict read through the plain WanConfig keeps its VACE fields.
    assert wan_ref.WanConfig.from_diffusers(cfg.to_diffusers()) == cfg
    assert type(wan_ref.WanConfig.from_diffusers({**cfg.to_diffusers(), "_class_name": CLASS})) is WanVACEConfig
    with pytest.raises(ValueError, match="include layer 0"):
        cfg.replace(vace_layers=(1, 2))
    with pytest.raises(ValueError, match="num_layers=3"):
        cfg.replace(vace_layers=(0, 3))
    model = nnx.eval_shape(lambda: WanVACEModel(cfg, rngs=nnx.Rngs(0)))  # errors come before any math
    x, t, text, control, scale = (jnp.asarray(a) for a in _inputs(cfg, batch=1))
    with pytest.raises(ValueError, match="needs control_hidden_states"):
        model(x, t[:1], text)
    with pytest.raises(ValueError, match="vace_in_channels=72"):
        model(x, t[:1], text, control_hidden_states=control[:, :8])
    with pytest.raises(ValueError, match="F_c <= 2"):
        model(x, t[:1], text, control_hidden_states=jnp.concatenate([control] * 3, axis=2))
    with pytest.raises(ValueError, match=r"\[len\(vace_layers\)=2\]"):
        model(x, t[:1], text, control_hidden_states=control, control_hidden_states_scale=jnp.ones(3))
    with pytest.raises(ValueError, match="needs a WanVACEConfig"):
        WanVACEModel(get_preset("tiny-t2v").config, rngs=nnx.Rngs(0))
    lat = jnp.zeros((1, 4, 2, 4, 4))
    with pytest.raises(ValueError, match="a VACE model needs control_hidden_states"):
        sample(model, lat, text, num_inference_steps=1)
    t2v = nnx.eval_shape(lambda: wan_ref.WanModel(get_preset("tiny-t2v").config, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="control_hidden_states given to a 'wan' model"):
        sample(t2v, lat, text, num_inference_steps=1, control_hidden_states=control)
    with pytest.raises(ValueError, match="same kind"):
        sample(model, lat, text, num_inference_steps=1, control_hidden_states=control, model_2=t2v,
               boundary_ratio=0.5)


# ---- sampler --------------------------------------------------------------------------------------------
def _tiny_vae(torch, diffusers):
    torch.manual_seed(0)
    return diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                      latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 2.0, 1.0]).eval()


def _capture_first_call(torch_model):
    """Records the keyword arguments of the transformer's first forward (the pipeline's own inputs)."""
    seen = []

    def hook(module, args, kwargs):
        if not seen:
            seen.append({k: (v.clone() if hasattr(v, "clone") else v) for k, v in kwargs.items()})

    torch_model.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def _has_patch_embedding(j) -> bool:
    for e in compat.split_closed(j)[4]:
        if e.primitive.name == "dot_general" and compat.name_stack(e) == "patch_embedding":
            return True
        if any(_has_patch_embedding(s) for s in compat.subjaxprs_of(e)):
            return True
    return False


def step_loop_body(j):
    """The body of the denoising loop: the outermost scan whose body runs the latent patch embedding."""
    for e in compat.split_closed(j)[4]:
        if e.primitive.name == "scan" and _has_patch_embedding(e.params["jaxpr"]):
            return e.params["jaxpr"]
        for s in compat.subjaxprs_of(e):
            found = step_loop_body(s)
            if found is not None:
                return found
    return None


def heavy_ops(j, acc=None) -> collections.Counter:
    """(primitive, name stack) -> count of every dot_general / conv in `j` and its sub-jaxprs."""
    acc = collections.Counter() if acc is None else acc
    for e in compat.split_closed(j)[4]:
        if e.primitive.name in ("dot_general", "conv_general_dilated"):
            acc[(e.primitive.name, compat.name_stack(e))] += 1
        for s in compat.subjaxprs_of(e):
            heavy_ops(s, acc)
    return acc


INVARIANT = ("vace_patch_embedding", "proj_in", "attn2/to_k", "attn2/to_v", "text_embedder")


@pytest.mark.torch
def test_sampler_matches_vace_pipeline_and_hoists(torch_and_ours):
    """WanVACEPipeline (tiny VAE, UniPC, CFG, a reference image, conditioning_scale 0.8, output_type="latent")
    vs `wan_ref.sample` on the control latents that pipeline builds; then the same sampler under
    @hoist_invariants (equal within the numerical contract; the control embedding, proj_in and every cross-attention K/V leave
    the step loop) and with the hand-written cache (equal within the same bound)."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    PIL = pytest.importorskip("PIL.Image")
    tm, _, ours = torch_and_ours
    preset = get_preset("tiny-vace")
    scheduler = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                  num_train_timesteps=1000, flow_shift=preset.flow_shift)
    pipe = diffusers.WanVACEPipeline(tokenizer=None, text_encoder=None, vae=_tiny_vae(torch, diffusers),
                                     scheduler=scheduler, transformer=tm)
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(7)
    frames = [PIL.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)) for _ in range(5)]
    masks = [PIL.fromarray(((rng.random((32, 32)) > 0.5) * 255).astype(np.uint8), mode="L") for _ in range(5)]
    reference = PIL.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8))
    pe = torch.from_numpy(rng.standard_normal((1, 7, 32)).astype(np.float32))
    npe = torch.from_numpy(rng.standard_normal((1, 7, 32)).astype(np.float32))
    latents = torch.from_numpy(rng.standard_normal((1, 4, 3, 4, 4)).astype(np.float32))  # 2 frames + 1 reference
    seen = _capture_first_call(tm)
    with torch.no_grad():
        ref = pipe(video=frames, mask=masks, reference_images=[reference], prompt_embeds=pe,
                   negative_prompt_embeds=npe, latents=latents.clone(), height=32, width=32, num_frames=5,
                   num_inference_steps=STEPS, guidance_scale=preset.guidance_scale, conditioning_scale=0.8,
                   output_type="latent").frames.numpy()
    control = jnp.asarray(seen[0]["control_hidden_states"].numpy())
    assert control.shape == (1, 72, 3, 4, 4)

    def run(model, latents, pe, npe, control, kv_cache=False):
        return sample(model, latents, pe, npe, num_inference_steps=STEPS, guidance_scale=preset.guidance_scale,
                      flow_shift=preset.flow_shift, control_hidden_states=control, control_hidden_states_scale=0.8,
                      kv_cache=kv_cache)

    args = (ours, jnp.asarray(latents.numpy()), jnp.asarray(pe.numpy()), jnp.asarray(npe.numpy()), control)
    plain = np.asarray(jax.jit(run)(*args))
    assert _rel(plain, ref) <= FP32_TOL
    hoisted = kvhoist.hoist_invariants(run)
    # Rewritten programs: equal to plain jit within kvhoist's numerical contract (kvhoist/contract.py).
    contract.assert_close(np.asarray(hoisted(*args)), plain)
    contract.assert_close(np.asarray(jax.jit(run, static_argnames="kv_cache")(*args, kv_cache=True)), plain)

    before, after = hoisted.jaxprs(*args)
    body_before, body_after = heavy_ops(step_loop_body(before)), heavy_ops(step_loop_body(after))
    moved = [k for k in body_before if any(s in k[1] for s in INVARIANT)]
    assert any("vace_patch_embedding" in k[1] for k in moved) and any("vace_blocks" in k[1] for k in moved)
    assert not [k for k in body_after if any(s in k[1] for s in INVARIANT)]
    assert not [k for k in body_after if k[0] == "conv_general_dilated"]
    assert ("dot_general", "patch_embedding") in body_after  # the latent patch embedding stays
    assert any("vace_blocks/1/attn1" in k[1] for k in body_after)  # VACE blocks read the latents
    report = hoisted.report(*args)
    names = {h.name for h in report.hoisted}
    assert "vace_blocks/0/proj_in" in names and "vace_blocks/1/attn2/to_k" in names, names
