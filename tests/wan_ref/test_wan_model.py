"""wan_ref.WanModel: parity with diffusers' WanTransformer3DModel, KV cache, layouts, tracing."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.extend.core import jaxprs_in_params

import wan_ref
from wan_ref import KVCache, WanConfig, WanModel, get_preset, load_diffusers, save_diffusers
from wan_ref.presets import PRESETS

FP32_TOL = 1e-4  # max |diff| / max |ref| against diffusers in float32
BF16_TOL = 2e-2  # bf16 wan_ref against float32 diffusers (observed ~6e-3; torch bf16 itself ~1.2e-2)


def _inputs(cfg: WanConfig, *, batch=2, grid=(2, 4, 4), text_len=512, seed=0, per_token=False):
    """Latents, timesteps, text and image embeddings (numpy; diffusers' FLF2V image layout [2B, 257, C])."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, cfg.in_channels, *grid)).astype(np.float32)
    if per_token:
        tokens = int(np.prod([g // p for g, p in zip(grid, cfg.patch_size)]))
        t = rng.uniform(0, 1000, (batch, tokens)).astype(np.float32)
    else:
        t = np.array([999.0, 321.5, 17.0][:batch], np.float32)
    text = rng.standard_normal((batch, text_len, cfg.text_dim)).astype(np.float32)
    image = None
    if cfg.image_dim is not None:
        rows = batch * (2 if cfg.pos_embed_seq_len else 1)
        image = rng.standard_normal((rows, 257, cfg.image_dim)).astype(np.float32)
    return x, t, text, image


def _diffusers_forward(torch_model, x, t, text, image):
    import torch

    with torch.no_grad():
        out = torch_model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(text),
                          None if image is None else torch.from_numpy(image), return_dict=False)[0]
    return out.float().numpy()


def _rel(out, ref) -> float:
    return float(np.abs(np.asarray(out, np.float32) - ref).max() / np.abs(ref).max())


@jax.jit
def _forward(model, x, t, text, image=None):
    """A jitted forward (eager dispatch of the tiny model costs more than compiling it)."""
    return model(x, t, text, image)


def _random_model(name: str, **changes) -> WanModel:
    return WanModel(get_preset(name).config.replace(**changes), rngs=nnx.Rngs(0))


# ---- parity with diffusers --------------------------------------------------------------------------------
PARITY_CASES = [
    # (preset, config changes, input options); scan and unrolled layers, three patch sizes, all tasks.
    ("tiny-t2v", {}, {}),
    ("tiny-t2v", {"patch_size": (1, 1, 1), "scan_layers": False}, {"grid": (2, 3, 5)}),
    ("tiny-t2v", {"patch_size": (2, 2, 2)}, {"grid": (4, 4, 6), "text_len": 7, "batch": 1}),
    ("tiny-i2v", {}, {}),
    ("tiny-i2v", {"scan_layers": False, "image_token_alignment": 1}, {}),
    ("tiny-flf2v", {}, {}),
    ("tiny-ti2v", {"scan_layers": False}, {"per_token": True}),
]


@pytest.mark.torch
@pytest.mark.parametrize("name,changes,opts", PARITY_CASES)
def test_parity_with_diffusers(diffusers_wan, tmp_path, name, changes, opts):
    cfg = get_preset(name).config.replace(**changes)
    torch_model = diffusers_wan(cfg, tmp_path, seed=len(name))
    model = load_diffusers(tmp_path, scan_layers=cfg.scan_layers,
                           image_token_alignment=cfg.image_token_alignment)
    x, t, text, image = _inputs(cfg, **opts)
    ref = _diffusers_forward(torch_model, x, t, text, image)
    out = _forward(model, x, t, text, image)
    assert out.shape == ref.shape and out.dtype == jnp.float32
    assert np.abs(ref).max() > 0.1, "degenerate reference"
    assert _rel(out, ref) <= FP32_TOL


@pytest.mark.torch
def test_bf16_against_fp32_diffusers(diffusers_wan, tmp_path):
    cfg = get_preset("tiny-i2v").config
    torch_model = diffusers_wan(cfg, tmp_path)
    model = load_diffusers(tmp_path, dtype=jnp.bfloat16)
    x, t, text, image = _inputs(cfg)
    out = _forward(model, x, t, text, image)
    assert out.dtype == jnp.bfloat16
    # diffusers' fp32 islands stay float32 in a bf16 model.
    assert model.blocks.scale_shift_table.dtype == jnp.float32
    assert model.condition_embedder.time_embedder.linear_1.kernel.dtype == jnp.float32
    assert model.blocks.attn2.to_k.kernel.dtype == jnp.bfloat16
    assert _rel(out, _diffusers_forward(torch_model, x, t, text, image)) <= BF16_TOL


@pytest.mark.torch
def test_sharded_checkpoint_loads(diffusers_wan, tmp_path):
    cfg = get_preset("tiny-i2v").config
    torch_model = diffusers_wan(cfg, tmp_path, max_shard_size="20KB")
    assert os.path.isfile(tmp_path / "diffusion_pytorch_model.safetensors.index.json")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    model = load_diffusers(tmp_path)
    x, t, text, image = _inputs(cfg)
    assert _rel(_forward(model, x, t, text, image), _diffusers_forward(torch_model, x, t, text, image)) <= FP32_TOL


@pytest.mark.torch
def test_save_diffusers_loads_in_diffusers(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from safetensors.torch import load_file

    model = _random_model("tiny-flf2v")
    save_diffusers(model, tmp_path)
    # from_pretrained needs `accelerate` for fp32-island models; load_state_dict(strict) checks the same keys.
    config = json.loads((tmp_path / "config.json").read_text())
    torch_model = diffusers.WanTransformer3DModel.from_config(config).eval()
    torch_model.load_state_dict(load_file(tmp_path / "diffusion_pytorch_model.safetensors"), strict=True)
    x, t, text, image = _inputs(model.config)
    assert _rel(_forward(model, x, t, text, image), _diffusers_forward(torch_model, x, t, text, image)) <= FP32_TOL


# ---- layout options give the same numbers --------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny-i2v"])
def test_scan_and_unrolled_layers_agree(tmp_path, name):
    pytest.importorskip("safetensors")
    scanned = _random_model(name)
    save_diffusers(scanned, tmp_path)
    unrolled = load_diffusers(tmp_path, scan_layers=False)
    assert isinstance(unrolled.blocks, nnx.List) and len(unrolled.blocks) == 2
    x, t, text, image = _inputs(scanned.config)
    np.testing.assert_allclose(_forward(scanned, x, t, text, image), _forward(unrolled, x, t, text, image),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("name,alignments", [("tiny-i2v", (1, 128, 256)), ("tiny-flf2v", (128, 256))])
def test_image_token_alignment_does_not_change_output(name, alignments):
    x, t, text, image = _inputs(get_preset(name).config)
    # Unrolled i2v models and scanned flf2v ones reuse compilations of the parity tests.
    scan = name == "tiny-flf2v"
    outs = [np.asarray(_forward(_random_model(name, image_token_alignment=a, scan_layers=scan), x, t, text, image))
            for a in alignments]
    for out in outs[1:]:
        assert _rel(out, outs[0]) <= 1e-5


def test_image_tokens_are_padded_and_masked_in_the_jaxpr():
    model = _random_model("tiny-i2v")
    x, t, text, image = _inputs(model.config)
    cache = jax.eval_shape(lambda m: m.compute_kv_cache(text, image), model)
    assert cache.image_k.shape == (2, 2, 384, 24) and cache.image_len == 257
    eqns = list(_all_eqns(jax.make_jaxpr(lambda m: m(x, t, text, image))(model).jaxpr))
    pads = [e for e in eqns if e.primitive.name == "pad"]
    assert len(pads) == 1 and pads[0].outvars[0].aval.shape[1] == 384
    assert any(e.primitive.name == "iota" and "image_token_mask" in str(e.source_info.name_stack) for e in eqns)


@pytest.mark.parametrize("name,scan_layers", [("tiny-t2v", True), ("tiny-i2v", True), ("tiny-i2v", False),
                                              ("tiny-flf2v", False), ("tiny-ti2v", True)])
def test_kv_cache_matches_uncached(name, scan_layers):
    model = _random_model(name, scan_layers=scan_layers)
    x, t, text, image = _inputs(model.config, per_token=name == "tiny-ti2v")

    @jax.jit  # one compile for cache, cached and uncached forward
    def run(m, x, t, text, image):
        cache = m.compute_kv_cache(text, image)
        return cache, m(x, t, None, kv_cache=cache), m(x, t, text, image)

    cache, out, ref = run(model, x, t, text, image)
    assert isinstance(cache, KVCache)
    if scan_layers:
        assert cache.text_k.shape == (2, 2, 512, 24)
    else:
        assert isinstance(cache.text_k, tuple) and cache.text_k[0].shape == (2, 512, 24)
    assert (cache.image_k is None) == (model.config.image_dim is None)
    assert _rel(out, np.asarray(ref)) <= 1e-6


# ---- tracing: model as an argument, weights as jaxpr inputs, named scopes --------------------------------
def _all_eqns(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jaxprs_in_params(eqn.params):
            yield from _all_eqns(sub)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_traces_with_model_as_argument_inside_outer_scan(scan_layers):
    model = _random_model("tiny-i2v", scan_layers=scan_layers)
    x, t, text, image = _inputs(model.config, batch=1)

    def sample(m, x, t, c, img):
        def step(h, _):
            v = m(h, t, c, img)
            return h.at[:, :4].add(-0.1 * v), None
        return jax.lax.scan(step, x, None, length=3)[0]

    closed = jax.make_jaxpr(sample)(model, x, t, text, image)
    n_weights = len(jax.tree.leaves(model))
    assert len(closed.jaxpr.invars) == n_weights + 4
    # Only the small float64-derived RoPE angle tables ([positions, part/2]) may be constants.
    assert all(np.size(c) <= 64 for c in closed.consts)
    names = [(e.primitive.name, str(e.source_info.name_stack)) for e in _all_eqns(closed.jaxpr)]
    for proj in ("to_k", "to_v", "add_k_proj", "add_v_proj"):
        assert any(p == "dot_general" and "attn2" in n and n.endswith(proj) for p, n in names), proj
    assert any(p == "dot_general" and "condition_embedder/text_embedder/linear_1" in n for p, n in names)
    if scan_layers:  # compiling once is enough to show the traced program runs
        assert np.isfinite(jax.jit(sample)(model, x, t, text, image)).all()


def test_scan_layers_is_one_scan():
    model = _random_model("tiny-t2v")
    x, t, text, _ = _inputs(model.config, batch=1)
    top = jax.make_jaxpr(lambda m: m(x, t, text))(model).jaxpr.eqns
    scans = [e for e in top if e.primitive.name == "scan"]
    assert len(scans) == 1 and scans[0].params["length"] == 2
    unrolled = jax.make_jaxpr(lambda m: m(x, t, text))(_random_model("tiny-t2v", scan_layers=False)).jaxpr.eqns
    assert not any(e.primitive.name == "scan" for e in unrolled)


# ---- config and presets ----------------------------------------------------------------------------------
def test_config_round_trips_through_diffusers_dict(tmp_path):
    pytest.importorskip("safetensors")
    for preset in PRESETS.values():
        cfg = preset.config
        assert WanConfig.from_diffusers(cfg.to_diffusers()) == cfg
    model = _random_model("tiny-flf2v")
    save_diffusers(model, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["_class_name"] == "WanTransformer3DModel" and saved["pos_embed_seq_len"] == 514


def test_real_preset_dimensions():
    assert get_preset("wan2.1-t2v-1.3b").config.inner_dim == 1536
    t2v14 = get_preset("wan2.1-t2v-14b").config
    assert (t2v14.inner_dim, t2v14.num_layers, t2v14.ffn_dim) == (5120, 40, 13824)
    i2v = get_preset("wan2.1-i2v-14b").config
    assert (i2v.in_channels, i2v.image_dim, i2v.added_kv_proj_dim) == (36, 1280, 5120)
    assert get_preset("wan2.1-i2v-14b-720p").config == i2v
    assert get_preset("wan2.1-flf2v-14b").config.pos_embed_seq_len == 514
    a14b = get_preset("wan2.2-t2v-a14b")
    assert a14b.two_experts and a14b.boundary_ratio == 0.875 and a14b.config_2 == t2v14
    i2v22 = get_preset("wan2.2-i2v-a14b")
    assert i2v22.boundary_ratio == 0.9 and i2v22.config.image_dim is None and i2v22.config.in_channels == 36
    ti2v = get_preset("wan2.2-ti2v-5b")
    assert (ti2v.config.inner_dim, ti2v.config.num_layers, ti2v.config.ffn_dim) == (3072, 30, 14336)
    assert (ti2v.config.in_channels, ti2v.z_dim, ti2v.vae_scale_factor_spatial, ti2v.expand_timesteps) == \
        (48, 48, 16, True)
    assert get_preset("tiny-t2v").latent_shape() == (1, 4, 2, 4, 4)


def test_real_preset_parameter_count():
    # Abstract build only; diffusers' Wan2.1-T2V-1.3B transformer has ~1.42e9 parameters.
    abstract = nnx.eval_shape(lambda: WanModel(get_preset("wan2.1-t2v-1.3b").config, rngs=nnx.Rngs(0)))
    assert sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(abstract)) == 1_418_996_800


@pytest.mark.parametrize("name", sorted(p for p in PRESETS if p.startswith("tiny")))
def test_tiny_presets_trace(name):
    preset = get_preset(name)
    model = WanModel(preset.config, rngs=nnx.Rngs(0))
    shape = preset.latent_shape()
    x = jnp.ones((shape[0], preset.config.in_channels, *shape[2:]))
    _, t, text, image = _inputs(preset.config, batch=1, per_token=False)
    out = jax.eval_shape(_forward, model, x, t, text, image)
    assert out.shape == (1, preset.config.out_channels, *shape[2:])


def test_public_api():
    for name in ("WanConfig", "WanModel", "KVCache", "PRESETS", "Preset", "get_preset", "load_diffusers",
                 "save_diffusers"):
        assert hasattr(wan_ref, name)
