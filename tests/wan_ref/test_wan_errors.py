"""wan_ref raises one clear ValueError, naming the fix, for each misuse."""

from __future__ import annotations

import json
import re

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


# -- checkpoint files that cannot be used: one error naming the file ---------------------------------------

from wan_ref.load import CONFIG_NAME, INDEX_NAME, CheckpointError  # noqa: E402


@pytest.fixture()
def saved(tmp_path, t2v):
    pytest.importorskip("safetensors")
    save_diffusers(t2v, tmp_path)
    return tmp_path


@pytest.mark.parametrize("damage", [
    lambda b: b[: len(b) // 2],          # truncated in the data
    lambda b: b[:20],                    # truncated in the header
    lambda b: b"",                       # empty
    lambda b: b"hello world " * 50,      # not safetensors at all
    lambda b: b[:9] + b"#" + b[10:],     # header JSON broken (byte 8 is its "{")
])
def test_corrupt_or_truncated_safetensors_names_the_file(saved, damage):
    weights = saved / WEIGHTS_NAME
    weights.write_bytes(damage(weights.read_bytes()))
    with pytest.raises(CheckpointError) as info:
        load_diffusers(saved)
    message = str(info.value)
    assert message.startswith(f"{weights}: not a readable safetensors file (")
    assert "truncated or corrupt" in message and len(message.splitlines()) == 1
    assert isinstance(info.value, ValueError)            # still a ValueError for existing callers


def test_corrupt_shard_names_the_shard(saved):
    (saved / WEIGHTS_NAME).rename(saved / "shard-1.safetensors")
    (saved / INDEX_NAME).write_text(json.dumps({"weight_map": {"proj_out.weight": "shard-1.safetensors"}}))
    (saved / "shard-1.safetensors").write_bytes(b"\0" * 7)
    with pytest.raises(CheckpointError, match=r"shard-1\.safetensors: not a readable safetensors file"):
        load_diffusers(saved)


@pytest.mark.parametrize("text, needle", [
    ("{not json", r"malformed config\.json \(not valid JSON: Expecting property name .* at line 1 column 2\)"),
    ("", r"malformed config\.json \(not valid JSON: Expecting value at line 1 column 1\)"),
    ("[1, 2]", r"malformed config\.json: expected a JSON object \{\.\.\.\}, got a list"),
    (json.dumps({"num_layers": "two"}), r"malformed config\.json: its values do not make a WanModel: TypeError: "),
    (json.dumps({"attention_head_dim": 9}), r"malformed config\.json for WanTransformer3DModel: ValueError: .*RoPE"),
])
def test_malformed_config_json_names_the_file(saved, text, needle):
    (saved / CONFIG_NAME).write_text(text)
    with pytest.raises(CheckpointError) as info:
        load_diffusers(saved)
    assert str(info.value).startswith(f"{saved / CONFIG_NAME}: ")
    assert re.search(needle, str(info.value)), str(info.value)


def test_malformed_index_names_the_file(saved):
    (saved / INDEX_NAME).write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(saved / INDEX_NAME))}: malformed .*weight_map"):
        load_diffusers(saved)
    (saved / INDEX_NAME).write_text("{")
    with pytest.raises(CheckpointError, match=r"index\.json: malformed .*not valid JSON"):
        load_diffusers(saved)


@pytest.mark.parametrize("class_name", ["UNet2DModel", "AutoencoderKL", "AutoencoderKLWan", "CLIPVisionModel"])
def test_other_diffusers_class_is_refused_by_name(saved, class_name):
    config = json.loads((saved / CONFIG_NAME).read_text())
    config["_class_name"] = class_name
    (saved / CONFIG_NAME).write_text(json.dumps(config))
    with _no_warning():
        with pytest.raises(ValueError) as info:
            load_diffusers(saved)
    message = str(info.value)
    assert f"holds a {class_name}; wan_ref loads WanTransformer3DModel, WanVACETransformer3DModel, " \
           "WanAnimateTransformer3DModel only" in message
    assert "is not a Wan transformer" in message and "'transformer'" in message


def test_pipeline_folder_points_to_the_transformer(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    with pytest.raises(ValueError, match=r"no config\.json .*pipeline folder; pass its 'transformer'"):
        load_diffusers(tmp_path)


def _no_warning():
    import contextlib
    import warnings

    @contextlib.contextmanager
    def cm():
        with warnings.catch_warnings():
            warnings.simplefilter("error")   # refused up front: no "ignoring N tensors" warning first
            yield

    return cm()


def test_vace_and_animate_folders_are_routed_not_refused(tmp_path):
    from wan_ref.animate import WanAnimateModel
    from wan_ref.vace import WanVACEModel

    for preset, cls in (("tiny-vace", WanVACEModel), ("tiny-animate", WanAnimateModel)):
        model = nnx.eval_shape(lambda: cls(get_preset(preset).config, rngs=nnx.Rngs(0)))
        config = {"_class_name": model.diffusers_class_name, **model.config.to_diffusers()}
        (tmp_path / preset).mkdir()
        (tmp_path / preset / CONFIG_NAME).write_text(json.dumps(config))
        with pytest.raises(ValueError, match="safe_serialization"):   # past the class check, to the weights
            load_diffusers(tmp_path / preset)


# -- sample(): latents with the wrong channel count ------------------------------------------------------

def test_t2v_given_8_channel_latents_says_so(t2v):
    from wan_ref.sample import sample

    assert t2v.config.in_channels == t2v.config.out_channels == 4
    with pytest.raises(ValueError) as info:
        sample(t2v, jnp.zeros((1, 8, 2, 4, 4)), TEXT, num_inference_steps=1)
    message = str(info.value)
    assert "latents have 8 channels, more than the model's in_channels=4" in message
    assert "pass noise latents [B, 4, F, H, W]" in message and "-4" not in message and "condition=" not in message


def test_condition_for_a_t2v_model(t2v):
    from wan_ref.sample import sample

    with pytest.raises(ValueError, match=r"condition was given but the model is not image-conditioned .*drop "
                                         r"condition"):
        sample(t2v, X, TEXT, condition=jnp.zeros((1, 4, 2, 4, 4)), num_inference_steps=1)
