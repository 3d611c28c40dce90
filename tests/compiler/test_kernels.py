"""kvhoist.kernels: the kvhoist_attention primitive, its xla and splash (Pallas interpret mode) implementations."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvhoist import compat
from kvhoist.analysis import cost, motion
from kvhoist.kernels import attention, attention_p, attention_flops, default_block, padded_lengths


def _arrays(shapes, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal(s, np.float32), dtype) for s in shapes]


def _reference(q, k, v, kv_valid=None):
    """float64 NumPy softmax(q k^T / sqrt(d)) v over the first kv_valid keys only (slicing, not masking)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    if kv_valid is not None:
        k, v = k[:, :kv_valid], v[:, :kv_valid]
    logits = np.einsum("bnhd,bshd->bhns", q, k) / math.sqrt(q.shape[-1])
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhns,bshd->bnhd", p, v)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# (B, N, H, d, S, dv, kv_valid, block_q, block_kv): S and N not multiples of 128, kv_valid < S, dv != d,
# several query and key blocks (the kernel's online softmax across blocks).
CASES = [
    (1, 8, 2, 64, 257, 64, None, None, None),
    (2, 130, 2, 32, 300, 16, 100, 128, 128),
]  # (wan_ref's image branch, d=12, S=384, kv_valid=257, runs in tests/compiler/test_splash.py)


@pytest.mark.parametrize("b,n,h,d,s,dv,kv_valid,bq,bkv", CASES)
def test_splash_and_xla_match_a_float64_reference(b, n, h, d, s, dv, kv_valid, bq, bkv):
    q, k, v = _arrays([(b, n, h, d), (b, s, h, d), (b, s, h, dv)])
    ref = _reference(q, k, v, kv_valid)
    outs = {impl: attention(q, k, v, kv_valid=kv_valid, impl=impl, block_q=bq, block_kv=bkv) for impl in ("xla", "splash")}
    for impl, out in outs.items():
        assert out.shape == (b, n, h, dv) and out.dtype == jnp.float32, impl
        assert _rel(out, ref) < 1e-5, impl
    assert _rel(outs["splash"], outs["xla"]) < 1e-5


def test_bf16_parity():
    q, k, v = _arrays([(1, 40, 2, 64), (1, 300, 2, 64), (1, 300, 2, 64)], jnp.bfloat16, seed=1)
    ref = _reference(q, k, v, 257)
    xla = attention(q, k, v, kv_valid=257, impl="xla")
    splash = attention(q, k, v, kv_valid=257, impl="splash")
    assert xla.dtype == splash.dtype == jnp.bfloat16
    assert _rel(xla, ref) < 2e-2 and _rel(splash, ref) < 2e-2
    assert _rel(splash, xla) < 2e-2


def test_jaxpr_is_one_equation_with_exactly_four_params():
    q, k, v = _arrays([(1, 8, 2, 64), (1, 257, 2, 64), (1, 257, 2, 32)])
    jaxpr = jax.make_jaxpr(lambda q, k, v: attention(q, k, v, kv_valid=200, impl="splash", block_kv=128))(q, k, v)
    (eqn,) = jaxpr.jaxpr.eqns
    assert eqn.primitive is attention_p and eqn.primitive.name == "kvhoist_attention"
    assert eqn.params == dict(impl="splash", kv_valid=200, block_q=None, block_kv=128)
    assert eqn.outvars[0].aval.shape == (1, 8, 2, 32)
    # a rewrite may re-bind with another block_kv / kv_valid: same numbers
    out = attention_p.bind(q, k, v, **{**eqn.params, "block_kv": 256})
    assert _rel(out, _reference(q, k, v, 200)) < 1e-5
    # the motion model hoists and speculates it; the cost model counts its matmuls and softmax
    assert motion.may_move(eqn) and motion.speculatable(eqn)
    assert cost.eqn_flops(eqn) == 1 * 2 * 128 * 384 * (2 * 64 + 2 * 32 + 5)  # splash: padded to its blocks
    xla_eqn = jax.make_jaxpr(lambda q, k, v: attention(q, k, v))(q, k, v).jaxpr.eqns[0]
    assert cost.eqn_flops(xla_eqn) == 1 * 2 * 8 * 257 * (2 * 64 + 2 * 32 + 5)


def test_vmap():
    """vmap folds the mapped axis into B: q mapped on axis 0, k on axis 2, v unmapped (broadcast)."""
    q, k, v = _arrays([(3, 1, 8, 2, 64), (1, 200, 2, 64), (1, 200, 2, 64)])
    kk = jnp.stack([k, 2 * k, -k], axis=2)  # [1, 200, 3, 2, 64]
    for impl in ("xla", "splash"):
        out = jax.vmap(lambda q, k: attention(q, k, v, kv_valid=150, impl=impl), in_axes=(0, 2))(q, kk)
        assert out.shape == (3, 1, 8, 2, 64)
        for i in range(3):
            assert _rel(out[i], _reference(q[i], kk[:, :, i], v, 150)) < 1e-5, impl


def test_grad_matches_the_reference_math():
    """The JVP (the xla math's; the primal runs the splash kernel) gives the masked softmax's gradient."""
    q, k, v = _arrays([(1, 8, 2, 64), (1, 150, 2, 64), (1, 150, 2, 64)])

    def plain(q, k, v):  # the first 100 keys only
        logits = jnp.einsum("bnhd,bshd->bhns", q, k[:, :100]) / 8.0
        return jnp.einsum("bhns,bshd->bnhd", jax.nn.softmax(logits, -1), v[:, :100])

    def loss(fn):
        return jax.jit(jax.grad(lambda *a: (fn(*a) ** 2).sum(), argnums=(0, 1, 2)))

    want = loss(plain)(q, k, v)
    got = loss(lambda *a: attention(*a, kv_valid=100, impl="splash"))(q, k, v)  # one JVP rule for both impls
    for g, w in zip(got, want):
        assert _rel(g, w) < 1e-5


def test_lowering_is_late_per_target():
    """Off TPU the splash kernel runs in Pallas interpret mode; lowered for TPU it is a Mosaic custom call."""
    spec = jax.ShapeDtypeStruct((1, 8, 2, 128), jnp.bfloat16)
    kspec = jax.ShapeDtypeStruct((1, 257, 2, 128), jnp.bfloat16)
    traced = jax.jit(lambda q, k, v: attention(q, k, v, kv_valid=257, impl="splash")).trace(spec, kspec, kspec)
    assert "tpu_custom_call" not in traced.lower().as_text()
    assert "tpu_custom_call" in traced.lower(lowering_platforms=("tpu",)).as_text()
    xla = jax.jit(lambda q, k, v: attention(q, k, v, impl="xla")).trace(spec, kspec, kspec)
    assert "tpu_custom_call" not in xla.lower(lowering_platforms=("tpu",)).as_text()


def test_default_blocks():
    assert [default_block(n) for n in (1, 128, 257, 384, 512, 513, 640, 1024, 75600)] == \
        [128, 128, 384, 384, 512, 128, 128, 512, 384]
    assert padded_lengths(8, 257, None, None) == (128, 384, 128, 384)
    assert padded_lengths(130, 257, 256, 128) == (256, 128, 256, 384)
    assert attention_flops(dict(impl="xla", kv_valid=None, block_q=None, block_kv=None), (1, 2, 1, 4),
                           (1, 3, 1, 4)) == 126


def test_bad_inputs_raise_one_clear_error():
    q, k, v = _arrays([(1, 8, 2, 64), (1, 100, 2, 64), (1, 100, 2, 64)])
    cases = [
        (dict(impl="flash"), ValueError, "impl must be one of 'xla', 'splash'"),
        (dict(impl=1), TypeError, "impl must be a string"),
        (dict(kv_valid=0), ValueError, "kv_valid must satisfy 1 <= kv_valid <= S=100"),
        (dict(kv_valid=101), ValueError, "kv_valid must satisfy"),
        (dict(kv_valid=True), TypeError, "kv_valid must be a Python int"),
        (dict(kv_valid=2.0), TypeError, "kv_valid must be a static Python int"),
        (dict(block_kv=257), ValueError, "block_kv must be a positive multiple of 128"),
        (dict(block_kv=0), ValueError, "block_kv must be a positive multiple of 128"),
        (dict(block_q=64, impl="splash"), ValueError, "block_q must be a positive multiple of 128"),
    ]
    for kw, err, msg in cases:
        with pytest.raises(err, match=msg):
            attention(q, k, v, **kw)
    with pytest.raises(TypeError, match="kv_valid must be a static Python int"):
        jax.jit(lambda n: attention(q, k, v, kv_valid=n))(5)
    shapes = [
        ((q[0], k, v), ValueError, "q must have rank 4"),
        ((q, k[..., :32], v), ValueError, r"k \(1, 100, 2, 32\) must be \[B=1, S, H=2, d=64\]"),
        ((q, k[:, :, :1], v), ValueError, "must be .B=1, S, H=2"),
        ((q, k, v[:, :50]), ValueError, r"v \(1, 50, 2, 64\) must be \[B=1, S=100, H=2, dv\]"),
        ((q[:, :0], k, v), ValueError, "q has an empty axis"),
        ((q, k.astype(jnp.bfloat16), v), TypeError, "q, k and v must share one dtype"),
        ((q.astype(jnp.int32), k, v), TypeError, "q must have a floating dtype"),
        ((np.asarray(q).tolist(), k, v), TypeError, "q must be an array"),
    ]
    for args, err, msg in shapes:
        with pytest.raises(err, match=msg):
            attention(*args)


def test_hoisted_out_of_a_loop():
    """LICM moves a loop-invariant kvhoist_attention (its K/V projections too) out of a scan."""
    from kvhoist.passes.licm import licm

    q, k, w = _arrays([(1, 8, 2, 64), (1, 130, 2, 64), (64, 64)])

    def f(q, k, w):
        def body(c, _):
            kk = jnp.einsum("bshd,de->bshe", k, w)
            return c + attention(q, kk, kk, kv_valid=129), None
        return jax.lax.scan(body, jnp.zeros_like(q), None, length=3)[0]

    closed = jax.make_jaxpr(f)(q, k, w)
    new, report = licm(closed)
    assert any(h.primitives.get("kvhoist_attention") for h in report.hoisted), report.hoisted
    top = [e.primitive.name for e in compat.split_closed(new)[4]]
    assert "kvhoist_attention" in top and "dot_general" in top
    out = compat.jaxpr_as_fun(new)(q, k, w)[0]
    assert _rel(out, f(q, k, w)) < 1e-5
