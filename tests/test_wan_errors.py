"""wan_ref raises one clear ValueError, naming the fix, for each misuse."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from wan_ref import WanConfig, WanModel, get_preset, load_diffusers, save_diffusers
from wan_ref.load import WEIGHTS_NAME


@pytest.fixture(scope="module")
def t2v():
    return WanModel(get_preset("tiny-t2v").config, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def i2v():
    return WanModel(get_preset("tiny-i2v").config, rngs=nnx.Rngs(0))


def _trace(model, x, t, text, image=None, **kw):
    # Shape checks happen at trace time; eval_shape avoids running anything.
    return jax.eval_shape(lambda m: m(x, t, text, image, **kw), model)


X = jnp.zeros((1, 4, 2, 4, 4))
T = jnp.array([999.0])
TEXT = jnp.zeros((1, 512, 32))
IMAGE = jnp.zeros((1, 257, 24))


def test_wrong_channel_count(t2v, i2v):
    with pytest.raises(ValueError, match="in_channels=4"):
        _trace(t2v, jnp.zeros((1, 5, 2, 4, 4)), T, TEXT)
    with pytest.raises(ValueError, match="4 mask channels"):
        _trace(i2v, X, T, TEXT, IMAGE)


def test_latents_not_divisible_by_patch(t2v):
    with pytest.raises(ValueError, match=r"divisible by patch_size=\(1, 2, 2\)"):
        _trace(t2v, jnp.zeros((1, 4, 2, 5, 4)), T, TEXT)


def test_i2v_text_must_be_512_tokens(i2v):
    with pytest.raises(ValueError, match="seq-512.*padded to 512"):
        _trace(i2v, jnp.zeros((1, 12, 2, 4, 4)), T, jnp.zeros((1, 77, 32)), IMAGE)


def test_image_embeddings_for_t2v_model(t2v):
    with pytest.raises(ValueError, match="without an image branch"):
        _trace(t2v, X, T, TEXT, IMAGE)
    with pytest.raises(ValueError, match="without an image branch"):
        t2v.compute_kv_cache(TEXT, IMAGE)


def test_image_branch_without_image_embeddings(i2v):
    with pytest.raises(ValueError, match="needs encoder_hidden_states_image"):
        _trace(i2v, jnp.zeros((1, 12, 2, 4, 4)), T, TEXT)


def test_bad_timestep_and_text_shapes(t2v):
    with pytest.raises(ValueError, match="per-token"):
        _trace(t2v, X, jnp.zeros((1, 3)), TEXT)
    with pytest.raises(ValueError, match="text_dim=32"):
        _trace(t2v, X, T, jnp.zeros((1, 512, 31)))
    with pytest.raises(ValueError, match="required without kv_cache"):
        _trace(t2v, X, T, None)


def test_flf2v_image_token_count():
    model = WanModel(get_preset("tiny-flf2v").config, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"\[1, 514, 24\]"):
        _trace(model, jnp.zeros((1, 12, 2, 4, 4)), T, TEXT, IMAGE)


def test_kv_cache_from_other_layout(t2v):
    unrolled = WanModel(get_preset("tiny-t2v").config.replace(scan_layers=False), rngs=nnx.Rngs(0))
    cache = unrolled.compute_kv_cache(TEXT)
    with pytest.raises(ValueError, match="scan_layers"):
        _trace(t2v, X, T, None, kv_cache=cache)


def test_missing_config_json(tmp_path):
    with pytest.raises(ValueError, match="no config.json.*save_pretrained"):
        load_diffusers(tmp_path)


def test_missing_weights(tmp_path):
    pytest.importorskip("safetensors")
    (tmp_path / "config.json").write_text(json.dumps(get_preset("tiny-t2v").config.to_diffusers()))
    with pytest.raises(ValueError, match="safe_serialization"):
        load_diffusers(tmp_path)


def _edit_checkpoint(path, edit):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(path / WEIGHTS_NAME)
    edit(tensors)
    save_file(tensors, path / WEIGHTS_NAME)


def test_checkpoint_missing_tensor(tmp_path, t2v):
    pytest.importorskip("safetensors")
    save_diffusers(t2v, tmp_path)
    _edit_checkpoint(tmp_path, lambda d: d.pop("blocks.1.attn2.to_k.weight"))
    with pytest.raises(ValueError, match=r"'blocks.1.attn2.to_k.weight' \(expected shape \[24, 24\]\)"):
        load_diffusers(tmp_path)


def test_checkpoint_misshaped_tensor(tmp_path, t2v):
    pytest.importorskip("safetensors")
    save_diffusers(t2v, tmp_path)
    _edit_checkpoint(tmp_path, lambda d: d.update({"proj_out.weight": np.zeros((16, 25), np.float32)}))
    with pytest.raises(ValueError, match=r"'proj_out.weight' has shape \[16, 25\], expected \[16, 24\]"):
        load_diffusers(tmp_path)


def test_unknown_preset_suggests_close_names():
    with pytest.raises(ValueError, match="did you mean.*wan2.1-t2v-14b"):
        get_preset("wan2.1-t2v-14")


def test_bad_config_values():
    with pytest.raises(ValueError, match="RoPE"):
        WanConfig(attention_head_dim=9)
    with pytest.raises(ValueError, match="go together"):
        WanConfig(image_dim=1280)
    with pytest.raises(ValueError, match="image_token_alignment"):
        WanConfig(image_token_alignment=0)
