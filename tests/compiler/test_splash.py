"""WanConfig.attention="splash": every attention is one kvhoist_attention equation (Pallas splash attention,
interpret mode on CPU) with the same numbers as the plain-jnp "xla" path, and kvhoist still hoists the
cross-attention K/V projections out of the step loop."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvhoist
import wan_ref
from kvhoist import compat
from wan_ref import WanConfig
from wan_ref.presets import tiny_inputs
from wan_ref.sample import sample

KV_NAME = re.compile(r"attn2/(to_k|to_v|add_k_proj|add_v_proj)$")
STEPS = 3  # not num_layers (2): the step loop is the scan of this length


def _eqns(j):
    """Every equation of ``j``, sub-jaxprs included."""
    for e in compat.split_closed(j)[4]:
        yield e
        for s in compat.subjaxprs_of(e):
            yield from _eqns(s)


def _rel(a, b) -> float:
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def _inputs(name: str, attention: str):
    # T2V with a short prompt keeps interpret mode fast; models with an image branch need 512 text tokens.
    return tiny_inputs(name, num_inference_steps=STEPS, text_len=512 if name == "tiny-i2v" else 16,
                       attention=attention)


def _forward(model, latents, prompt, image, condition):
    """One transformer call: from the hand-written K/V cache when there is an image branch (the cache's
    `image_len` masks the padded image tokens), else with the context (the sampler below covers both)."""
    x = latents if condition is None else jnp.concatenate([latents, condition], axis=1)
    t = jnp.array([500.0])
    if image is None:
        return model(x, t, prompt)
    return model(x, t, None, kv_cache=model.compute_kv_cache(prompt, image))


@pytest.mark.parametrize("name", ["tiny-t2v", "tiny-i2v"])
def test_splash_matches_xla_forward_and_hoisted_sampler(name):
    xla, splash = _inputs(name, "xla"), _inputs(name, "splash")
    cfg = splash.model.config
    assert cfg.attention == "splash" and xla.model.config.attention == "xla"
    image, condition = splash.extra.get("image_embeds"), splash.extra.get("condition")

    # one forward: same numbers, 1e-5 relative
    fwd = jax.jit(_forward)
    want = fwd(xla.model, xla.args[1], xla.args[2], image, condition)
    got = fwd(splash.model, splash.args[1], splash.args[2], image, condition)
    assert _rel(got, want) < 1e-5

    # every attention is a kvhoist_attention equation: self + text (+ image) per block
    jaxpr = jax.make_jaxpr(_forward)(splash.model, splash.args[1], splash.args[2], image, condition)
    att = [e for e in _eqns(jaxpr) if e.primitive.name == "kvhoist_attention"]
    per_block = 3 if cfg.has_image_branch else 2
    assert len(att) == per_block  # scanned layers: one body
    assert all(e.params["impl"] == "splash" for e in att)
    if cfg.has_image_branch:
        image_att = [e for e in att if e.params["kv_valid"] is not None]
        assert len(image_att) == 1 and image_att[0].params["kv_valid"] == 257
        assert all(e.invars[1].aval.shape[1] == 384 for e in image_att)  # padded to image_token_alignment
    assert not any("image_token_mask" in compat.name_stack(e) for e in _eqns(jaxpr))

    # the hoisted sampler: K/V projections leave the step loop, latents match the xla sampler
    f = functools.partial(sample, **splash.options)

    def run(*args, **kwargs):
        return f(*args, **kwargs)

    ref = jax.jit(run)(*xla.args, **xla.extra)
    hoisted = kvhoist.hoist_invariants(run)
    out = hoisted(*splash.args, **splash.extra)
    assert _rel(out, ref) < 1e-5
    report = hoisted.report(*splash.args, **splash.extra)
    names = {h.name for h in report.hoisted}
    assert {"blocks/attn2/to_k", "blocks/attn2/to_v"} <= names
    if cfg.has_image_branch:
        assert {"blocks/attn2/add_k_proj", "blocks/attn2/add_v_proj"} <= names
    _before, after = hoisted.jaxprs(*splash.args, **splash.extra)
    loop = next(e for e in _eqns(after) if e.primitive.name == "scan" and int(e.params["length"]) == STEPS)
    in_loop = list(_eqns(loop.params["jaxpr"]))
    assert not any(e.primitive.name == "dot_general" and KV_NAME.search(compat.name_stack(e)) for e in in_loop)
    assert any(e.primitive.name == "kvhoist_attention" for e in in_loop)  # attention itself reads the latents


@pytest.mark.parametrize("name", ["tiny-vace", "tiny-animate", "tiny-flf2v"])
def test_variants_route_every_attention_through_the_primitive(name):
    """VACE blocks, Animate's face adapters and FLF2V's 514 image tokens: no plain-jnp attention is left."""
    inp = tiny_inputs(name, num_inference_steps=1, attention="splash")
    jaxpr = jax.make_jaxpr(functools.partial(sample, **inp.options))(*inp.args, **inp.extra)
    att = [e for e in _eqns(jaxpr) if e.primitive.name == "kvhoist_attention"]
    assert att and all(e.params["impl"] == "splash" for e in att)
    scopes = {compat.name_stack(e) for e in att}
    if name == "tiny-animate":
        assert any("face_adapter" in s for s in scopes)
    if name == "tiny-flf2v":
        assert {e.params["kv_valid"] for e in att} == {None, 514}
    # the xla path's softmax (reduce_max over logits) is gone from every attention scope
    assert not any(e.primitive.name == "reduce_max" and re.search(r"attn[12]", compat.name_stack(e))
                   for e in _eqns(jaxpr))


def test_attention_option_is_validated_everywhere(tmp_path):
    with pytest.raises(ValueError, match="attention must be one of 'xla', 'splash', got 'flash'"):
        WanConfig(attention="flash")
    with pytest.raises(ValueError, match="attention must be one of 'xla', 'splash', got 'flash'"):
        tiny_inputs("tiny-t2v", attention="flash")
    # the caller's argument is named before any file is read (not blamed on config.json)
    with pytest.raises(ValueError, match="attention must be one of 'xla', 'splash', got 'Splash'"):
        wan_ref.load_diffusers(tmp_path, attention="Splash")
    cfg = WanConfig(attention="splash")
    assert "attention" not in cfg.to_diffusers()
    assert WanConfig.from_diffusers(cfg.to_diffusers(), attention="splash") == cfg
    p = wan_ref.get_preset("tiny-t2v-a14b").inputs(attention="splash")
    assert p.model.config.attention == p.extra["model_2"].config.attention == "splash"


def test_load_diffusers_attention(tmp_path):
    pytest.importorskip("safetensors")
    model = tiny_inputs("tiny-t2v").model
    wan_ref.save_diffusers(model, tmp_path)
    loaded = wan_ref.load_diffusers(tmp_path, attention="splash")
    assert loaded.config.attention == "splash" and loaded.config == model.config.replace(attention="splash")
    leaves = jax.tree.leaves(loaded)
    assert all(np.array_equal(a, b) for a, b in zip(leaves, jax.tree.leaves(model)))
