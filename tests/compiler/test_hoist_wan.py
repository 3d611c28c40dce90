"""@hoist_invariants on wan_ref samplers: same latents, and every block's cross-attention K/V left the
step loop (T2V, I2V, Wan 2.2 experts; layers scanned and unrolled; step loop as scan and fori)."""

from __future__ import annotations

import dataclasses
import functools
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kvhoist
import wan_ref
from kvhoist import compat
from wan_ref.sample import sample

KV_NAME = re.compile(r"attn2/(to_k|to_v|add_k_proj|add_v_proj)$")
STEPS = 3


def _kv_dots(j, *, loops: bool = True) -> int:
    """K/V projection dot_generals executed by one evaluation of ``j`` (inner scans multiplied,
    every cond branch counted: with experts, each expert's projections count)."""
    n = 0
    for e in compat.split_closed(j)[4]:
        if e.primitive.name == "dot_general" and KV_NAME.search(compat.name_stack(e)):
            n += 1
        subs = compat.subjaxprs_of(e)
        mult = int(e.params["length"]) if e.primitive.name == "scan" else 1
        n += mult * sum(_kv_dots(s) for s in subs)
    return n


def _step_loop(j):
    """The step loop: the (first) scan/while whose trip count is STEPS, searched recursively."""
    for e in compat.split_closed(j)[4]:
        if e.primitive.name == "scan" and int(e.params["length"]) == STEPS:
            return e
        if e.primitive.name == "while":
            return e
        for s in compat.subjaxprs_of(e):
            found = _step_loop(s)
            if found is not None:
                return found
    return None


def _loop_body(e):
    return e.params["jaxpr"] if e.primitive.name == "scan" else e.params["body_jaxpr"]


def _setup(preset: str, scan_layers: bool):
    p = wan_ref.get_preset(preset)
    cfg = dataclasses.replace(p.config, scan_layers=scan_layers)
    model = wan_ref.WanModel(cfg, rngs=nnx.Rngs(0))
    model_2 = None
    if p.config_2 is not None:
        model_2 = wan_ref.WanModel(dataclasses.replace(p.config_2, scan_layers=scan_layers), rngs=nnx.Rngs(1))
    rng = np.random.default_rng(0)
    z = p.z_dim
    latents = jnp.asarray(rng.standard_normal((1, z, 2, 4, 4)), jnp.float32)
    text_len = 512 if cfg.image_dim is not None else 16
    pe = jnp.asarray(rng.standard_normal((1, text_len, cfg.text_dim)), jnp.float32)
    npe = jnp.asarray(rng.standard_normal((1, text_len, cfg.text_dim)), jnp.float32)
    kwargs = dict(num_inference_steps=STEPS, flow_shift=p.flow_shift, guidance_scale=p.guidance_scale)
    if model_2 is not None:
        kwargs.update(model_2=model_2, boundary_ratio=p.boundary_ratio, guidance_scale_2=p.guidance_scale_2)
    if cfg.image_dim is not None:
        kwargs["image_embeds"] = jnp.asarray(rng.standard_normal((1, 257, cfg.image_dim)), jnp.float32)
    if cfg.in_channels > z:
        kwargs["condition"] = jnp.asarray(rng.standard_normal((1, cfg.in_channels - z, 2, 4, 4)), jnp.float32)
    return cfg, model, model_2, (latents, pe, npe), kwargs


CASES = [
    ("tiny-t2v", True, "scan"), ("tiny-t2v", False, "scan"), ("tiny-t2v", True, "fori"),
    ("tiny-t2v", False, "fori"), ("tiny-i2v", True, "scan"), ("tiny-i2v", False, "fori"),
    ("tiny-t2v-a14b", True, "scan"), ("tiny-t2v-a14b", False, "scan"), ("tiny-t2v-a14b", True, "fori"),
]


@pytest.mark.parametrize("preset,scan_layers,loop", CASES)
def test_sampler_kv_leaves_step_loop(preset, scan_layers, loop):
    cfg, model, model_2, (latents, pe, npe), kwargs = _setup(preset, scan_layers)
    f = functools.partial(sample, loop=loop, **{k: v for k, v in kwargs.items() if k != "model_2"
                                                 and k != "image_embeds" and k != "condition"})

    def run(model, latents, pe, npe, model_2, image_embeds, condition):
        return f(model, latents, pe, npe, model_2=model_2, image_embeds=image_embeds, condition=condition)

    args = (model, latents, pe, npe, model_2, kwargs.get("image_embeds"), kwargs.get("condition"))
    hoisted = kvhoist.hoist_invariants(run)
    out = hoisted(*args)
    ref = jax.jit(run)(*args)
    scale = float(jnp.max(jnp.abs(ref)))
    assert float(jnp.max(jnp.abs(out - ref))) <= 1e-5 * scale

    before, after = hoisted.jaxprs(*args)
    loop_before, loop_after = _step_loop(before), _step_loop(after)
    assert loop_before is not None and loop_after is not None
    per_block = 4 if cfg.image_dim is not None else 2
    experts = 2 if model_2 is not None else 1
    assert _kv_dots(_loop_body(loop_before)) == per_block * cfg.num_layers * experts
    assert _kv_dots(_loop_body(loop_after)) == 0
    # ... and they run exactly once each, before the loop.
    assert _kv_dots(after) == per_block * cfg.num_layers * experts

    report = hoisted.report(*args)
    names = {h.name for h in report.hoisted}
    assert any(n.endswith("attn2/to_k") for n in names) and any(n.endswith("attn2/to_v") for n in names)
    to_k = next(h for h in report.hoisted if h.name.endswith("attn2/to_k"))
    assert to_k.source.startswith("model.py:") and to_k.stack[0].startswith(to_k.source)
    assert any("project_kv" in frame for frame in to_k.stack)      # the call site, not just the Linear
    if cfg.image_dim is not None:
        assert any(n.endswith("add_k_proj") for n in names)
    if scan_layers:
        assert any("fission" in h.via for h in report.hoisted)
    if model_2 is not None:
        assert any("speculation" in h.via for h in report.hoisted)
        # The expert schedule is static: savings are counted per expert, not as upper bounds.
        assert not any(h.upper_bound for h in report.hoisted) and report.flops_saved > 0


def test_matches_hand_written_cache():
    cfg, model, _m2, (latents, pe, npe), kwargs = _setup("tiny-t2v", True)
    plain = functools.partial(sample, **kwargs)
    hand = jax.jit(functools.partial(sample, kv_cache=True, **kwargs))(model, latents, pe, npe)
    auto = kvhoist.hoist_invariants(plain)(model, latents, pe, npe)
    np.testing.assert_allclose(auto, hand, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(hand))))


def _hlo_while_bodies(text: str) -> dict:
    """Map computation name -> its text, for the computations used as while bodies."""
    comps = {}
    for m in re.finditer(r"^(?:ENTRY )?%?([\w.\-]+) [^\n]*\{\n(.*?)^\}", text, re.M | re.S):
        comps[m.group(1)] = m.group(2)
    bodies = set(re.findall(r"body=%?([\w.\-]+)", text))
    return {k: v for k, v in comps.items() if k in bodies}


def _dots_in(comp: str, comps: dict, seen=None) -> int:
    seen = set() if seen is None else seen
    n = len(re.findall(r"\bdot\(|convolution\(|custom-call\(.*matmul", comp))
    for callee in re.findall(r"(?:calls|to_apply|body|condition|branch_computations)=\{?%?([\w.\-]+)", comp):
        if callee in comps and callee not in seen:
            seen.add(callee)
            n += _dots_in(comps[callee], comps, seen)
    return n


def test_compiled_outer_while_body_holds_fewer_dots():
    """XLA does not hoist out of the nested layer scan itself; after kvhoist the step loop's compiled
    body has fewer dot ops."""
    cfg, model, _m2, (latents, pe, npe), kwargs = _setup("tiny-t2v", True)
    f = functools.partial(sample, **kwargs)
    plain_hlo = jax.jit(f).lower(model, latents, pe, npe).compile().as_text()
    hoisted_hlo = kvhoist.hoist_invariants(f).lower(model, latents, pe, npe).compile().as_text()

    def step_body_dots(text):
        comps = {}
        for m in re.finditer(r"^(?:ENTRY )?%?([\w.\-]+) [^\n]*\{\n(.*?)^\}", text, re.M | re.S):
            comps[m.group(1)] = m.group(2)
        bodies = set(re.findall(r"body=%?([\w.\-]+)", text))
        # The step loop's body is the while body that itself contains another while (the layers).
        outer = [b for b in bodies if b in comps and re.search(r"\bwhile\(", comps[b])]
        assert outer, "no nested while loop found in HLO"
        return max(_dots_in(comps[b], comps) for b in outer)

    assert step_body_dots(hoisted_hlo) < step_body_dots(plain_hlo)


def test_compile_time_overhead():
    """The hoisted program compiles in no more than ~1.2x the plain program's time (+ slack for noise).

    Process CPU time (all threads), not wall time: other processes on a shared machine do not count."""
    cfg, model, _m2, (latents, pe, npe), kwargs = _setup("tiny-t2v", True)
    f = functools.partial(sample, **kwargs)
    hf = kvhoist.hoist_invariants(f)
    lowered_plain = jax.jit(f).lower(model, latents, pe, npe)
    lowered_hoisted = hf.lower(model, latents, pe, npe)
    plain_t, hoisted_t = [], []
    for _ in range(3):
        t = time.process_time(); lowered_plain.compile(); plain_t.append(time.process_time() - t)
        t = time.process_time(); lowered_hoisted.compile(); hoisted_t.append(time.process_time() - t)
    assert np.median(hoisted_t) <= 1.2 * np.median(plain_t) + 0.25, (plain_t, hoisted_t)
