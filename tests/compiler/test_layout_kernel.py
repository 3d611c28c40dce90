"""The layout pass and the splash-attention kernel: keys re-padded to the target's tile with the kernel's
KV block equal to it, exact by the primitive's masking (``kv_valid``); refusals when it is not."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import kvhoist
from kvhoist import compat
from kvhoist.ir import all_eqns
from kvhoist.kernels import attention
from kvhoist.passes.layout import align_kernel_operands, plan_layout

B, N, H, D, N_IMG = 1, 128, 2, 128, 257


def _attention_calls(closed):
    return [e for e in all_eqns(closed) if e.primitive.name == "kvhoist_attention"]


def _args(seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (B, N, H, D))
    img = jax.random.normal(ks[1], (B, N_IMG, 32))
    wk = jax.random.normal(ks[2], (32, H * D)) / 8
    wv = jax.random.normal(ks[3], (32, H * D)) / 8
    return q, img, wk, wv


def _sampler(impl, kv_valid=N_IMG, pad_to=384):
    """Image tokens zero-padded to 128 alignment before a 2-step loop; K/V of the padded tokens."""
    def f(q, img, wk, wv):
        if pad_to:
            img = jnp.pad(img, ((0, 0), (0, pad_to - N_IMG), (0, 0)))
        s = img.shape[1]

        def step(x, _):
            k = (img @ wk).reshape(B, s, H, D)
            v = (img @ wv).reshape(B, s, H, D)
            return x + 0.1 * attention(x, k, v, kv_valid=kv_valid, impl=impl), None
        return lax.scan(step, q, None, length=2)[0]
    return f


def test_splash_keys_take_the_tile():
    f = _sampler("splash")
    args = _args()
    closed = jax.make_jaxpr(f)(*args)
    new, report = plan_layout(closed, "v6e")
    (call,) = _attention_calls(new)
    assert call.invars[1].aval.shape[1] == 512 and call.params["block_kv"] == 256, report.table()
    assert call.params["kv_valid"] == N_IMG
    assert not any(e.invars[1].aval.shape[1] in (257, 384) for e in _attention_calls(new))
    assert any("splash-attention keys" in n.message for n in report.notes if n.kind == "layout")
    ref = jax.jit(compat.jaxpr_as_fun(closed))(*args)[0]
    out = jax.jit(compat.jaxpr_as_fun(new))(*args)[0]
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("target,tile", [("v5e", 128), ("v6e", 256)])
def test_hoisted_splash_sampler_for_target(target, tile):
    f = _sampler("splash")
    args = _args(1)
    hf = kvhoist.hoist_invariants(f, target=target)
    report = hf.report(*args)
    _before, after = hf.jaxprs(*args)
    (call,) = _attention_calls(after)
    expect = -(-N_IMG // tile) * tile
    assert call.invars[1].aval.shape[1] == expect and call.params["block_kv"] == tile
    assert {h.shape[1] for h in report.hoisted if h.name == "dot_general"} == {expect}, report.table()
    np.testing.assert_allclose(hf(*args), jax.jit(f)(*args), rtol=1e-5, atol=1e-5)


def test_unpadded_keys_are_padded_at_the_call():
    """No pad in the program: the call itself gets K/V padded to the tile, masked by kv_valid."""
    f = _sampler("splash", kv_valid=None, pad_to=0)
    args = _args(2)
    closed = jax.make_jaxpr(f)(*args)
    new, notes = align_kernel_operands(closed, 256)
    (call,) = _attention_calls(new)
    assert call.invars[1].aval.shape[1] == 512 and call.params["kv_valid"] == N_IMG and call.params["block_kv"] == 256
    assert notes and "257 -> 512" in notes[0].message
    np.testing.assert_allclose(jax.jit(compat.jaxpr_as_fun(new))(*args)[0],
                               jax.jit(compat.jaxpr_as_fun(closed))(*args)[0], rtol=1e-5, atol=1e-5)


def test_unmasked_padded_keys_are_refused_not_miscompiled():
    """Padded keys the call does not mask (kv_valid=None): re-padding 384 -> 512 would add attended
    zero keys. The pass refuses (reason in the report); the call is only aligned, keeping all 384 keys."""
    f = _sampler("splash", kv_valid=None)
    args = _args(3)
    closed = jax.make_jaxpr(f)(*args)
    new, report = plan_layout(closed, "v6e")
    assert any("unmasked" in s.reason for s in report.skipped), report.table()
    (call,) = _attention_calls(new)
    assert call.invars[1].aval.shape[1] == 512 and call.params["kv_valid"] == 384
    np.testing.assert_allclose(jax.jit(compat.jaxpr_as_fun(new))(*args)[0],
                               jax.jit(compat.jaxpr_as_fun(closed))(*args)[0], rtol=1e-5, atol=1e-5)


def test_xla_attention_primitive_keeps_the_cheapest_length():
    f = _sampler("xla")
    args = _args(4)
    closed = jax.make_jaxpr(f)(*args)
    new, report = plan_layout(closed, "v6e")
    (call,) = _attention_calls(new)
    assert call.invars[1].aval.shape[1] < 384, report.table()
    (note,) = [n for n in report.notes if n.kind == "layout"]
    assert "cheapest" in note.message and "384: " in note.message and "512: " in note.message
    np.testing.assert_allclose(jax.jit(compat.jaxpr_as_fun(new))(*args)[0],
                               jax.jit(compat.jaxpr_as_fun(closed))(*args)[0], rtol=1e-5, atol=1e-5)


def test_measure_option_is_checked():
    closed = jax.make_jaxpr(_sampler("xla"))(*_args())
    with pytest.raises(ValueError, match="measure must be 'model' or 'tpu'"):
        plan_layout(closed, "v6e", measure="guess")
    from kvhoist import tpu_compile

    if tpu_compile.libtpu_version() is None:
        with pytest.raises(tpu_compile.LibtpuMissingError, match="libtpu is not installed"):
            plan_layout(closed, "v6e", measure="tpu")
