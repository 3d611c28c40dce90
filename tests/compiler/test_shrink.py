"""The smallest cache (kvhoist.passes.shrink): untiled copies, common values, views."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import kvhoist
from kvhoist import compat, contract

B, K, S, D = 2, 4, 32, 64


def _tile(enc, mode):
    if mode == "broadcast+reshape":   # Flax's flat_batch_beam_expand
        return jnp.broadcast_to(enc[:, None], (B, K, S, D)).reshape(B * K, S, D)
    if mode == "expand_dims+tile+reshape":  # Flax examples/wmt beam search: broadcast_in_dim -> tile -> reshape
        return jnp.tile(jnp.expand_dims(enc, 1), (1, K, 1, 1)).reshape(B * K, S, D)
    if mode == "tile":
        return jnp.tile(enc, (K, 1, 1))
    if mode == "concatenate":
        return jnp.concatenate([enc] * K, 0)
    if mode == "repeat":
        return jnp.repeat(enc, K, axis=0)
    raise ValueError(mode)


def _decode(enc, wk, wv, x0, n, *, mode, loop):
    enc_t = _tile(enc, mode)                      # tiled across beams before the loop

    def step(h):
        k = (enc_t @ wk).reshape(B * K, S, 4, D // 4)  # split into heads: a reshape of the projection
        v = enc_t @ wv
        att = jax.nn.softmax(jnp.einsum("bd,bsd->bs", h, k.reshape(B * K, S, D)) / 8, -1)
        return h + jnp.tanh(jnp.einsum("bs,bsd->bd", att, v))

    if loop == "while":
        return lax.while_loop(lambda c: c[0] < n, lambda c: (c[0] + 1, step(c[1])), (0, x0))[1]
    return lax.scan(lambda h, _: (step(h), None), x0, None, length=5)[0]


def _args():
    ks = jax.random.split(jax.random.key(0), 4)
    return (jax.random.normal(ks[0], (B, S, D)), jax.random.normal(ks[1], (D, D)) / 8,
            jax.random.normal(ks[2], (D, D)) / 8, jax.random.normal(ks[3], (B * K, D)), 5)


@pytest.mark.parametrize("loop", ["while", "scan"])
@pytest.mark.parametrize("mode", ["broadcast+reshape", "expand_dims+tile+reshape", "tile", "concatenate", "repeat"])
def test_tiled_encoder_output_is_cached_once(mode, loop):
    f = functools.partial(_decode, mode=mode, loop=loop)
    args = _args()
    hf = kvhoist.hoist_invariants(f)
    report = hf.report(*args)
    one_copy = 2 * B * S * D * 4                  # K and V of the untiled encoder output, f32
    assert report.cache_bytes == one_copy, report.table()
    assert all("untiled" in h.via for h in report.hoisted)
    # Less work too: the projections run on B rows, not B * K (a hand-written cache's FLOPs).
    assert all(h.shape[0] == B for h in report.hoisted)
    contract.assert_close(hf(*args), jax.jit(f)(*args))
    # The loop body re-expands the small values: no dot_general on the tiled encoder output inside.
    _before, after = hf.jaxprs(*args)
    loop_eqn = next(e for e in compat.split_closed(after)[4] if e.primitive.name in ("while", "scan"))
    body = loop_eqn.params["body_jaxpr" if loop == "while" else "jaxpr"]
    shapes = [tuple(e.outvars[0].aval.shape) for e in compat.split_closed(body)[4] if e.primitive.name == "dot_general"]
    assert (B * K, S, D) not in shapes


def _biased_decode(enc, wk, wv, bk, bv, x0, *, where, fission):
    """Beam decoding whose K/V projections have a bias (BART/Marian ``k_proj``/``v_proj``), optionally with
    elementwise work on the tiled value before the loop, optionally in a layer scan (fission)."""
    enc_t = _tile(enc, "expand_dims+tile+reshape")
    if where == "before the loop":
        enc_t = jnp.tanh(enc_t) * 2.0 + bk.reshape(-1, D)[0]   # elementwise after the tiling, outside the loop

    def project(x, wk, wv, bk, bv):
        k = x @ wk + bk                               # tiled @ w + b
        v = jax.nn.gelu(x @ wv + bv)                  # and an elementwise op after the bias
        return k.reshape(B * K, S, 4, D // 4).reshape(B * K, S, D), v

    def attend(h, k, v):
        att = jax.nn.softmax(jnp.einsum("bd,bsd->bs", h, k) / 8, -1)
        return h + jnp.tanh(jnp.einsum("bs,bsd->bd", att, v))

    def step(h):
        if not fission:
            return attend(h, *project(enc_t, wk, wv, bk, bv))
        return lax.scan(lambda h, w: (attend(h, *project(enc_t, *w)), None), h, (wk, wv, bk, bv))[0]

    return lax.while_loop(lambda c: c[0] < 4, lambda c: (c[0] + 1, step(c[1])), (0, x0))[1]


@pytest.mark.parametrize("fission", [False, True], ids=["flat", "fission"])
@pytest.mark.parametrize("where", ["in the loop", "before the loop"])
def test_biased_projection_of_a_tiled_value_is_cached_once(where, fission):
    """Issue 20 items 10 and 11: ``jnp.tile``-tiled encoder output, ``tiled @ w + b`` and elementwise ops after
    the tiling: the cache is one untiled copy (it was beams-times)."""
    L = 3 if fission else 1
    lead = (L,) if fission else ()
    ks = jax.random.split(jax.random.key(7), 6)
    args = (jax.random.normal(ks[0], (B, S, D)), jax.random.normal(ks[1], lead + (D, D)) / 8,
            jax.random.normal(ks[2], lead + (D, D)) / 8, jax.random.normal(ks[3], lead + (D,)),
            jax.random.normal(ks[4], lead + (D,)), jax.random.normal(ks[5], (B * K, D)))
    f = functools.partial(_biased_decode, where=where, fission=fission)
    hf = kvhoist.hoist_invariants(f)
    report = hf.report(*args)
    assert report.cache_bytes == 2 * L * B * S * D * 4, report.table()   # K and V of one copy, every layer
    assert all("untiled" in h.via for h in report.hoisted)
    contract.assert_close(hf(*args), jax.jit(f)(*args))


def _loop_body_shapes(hf, args) -> list:
    """Shapes of every value computed inside the loop (recursively: nested scans, the attach's body aside)."""
    from kvhoist.ir import all_eqns

    _before, after = hf.jaxprs(*args)
    loop = next(e for e in compat.split_closed(after)[4] if e.primitive.name in ("while", "scan"))
    body = loop.params["body_jaxpr" if loop.primitive.name == "while" else "jaxpr"]
    return [tuple(v.aval.shape) for e in all_eqns(body) for v in e.outvars]


@pytest.mark.parametrize("loop", ["while", "scan"])
@pytest.mark.parametrize("mode", ["broadcast+reshape", "expand_dims+tile+reshape", "tile", "repeat"])
def test_loop_reads_the_untiled_cache_without_re_tiling_it(mode, loop):
    """Issue 20 item 2: the cache is one copy *and* the body does not rebuild the tiled copy every iteration
    (re-tiling made the smallest cache slower than jit): the attention dots batch over the untiled keys."""
    f = functools.partial(_decode, mode=mode, loop=loop)
    args = _args()
    hf = kvhoist.hoist_invariants(f)
    assert hf.report(*args).cache_bytes == 2 * B * S * D * 4
    shapes = _loop_body_shapes(hf, args)
    tiled = {(B * K, S, D), (B, K, S, D), (K, B, S, D), (B * K, S, 4, D // 4), (B, K, S, 4, D // 4)}
    assert not tiled & set(shapes), shapes
    contract.assert_close(hf(*args), jax.jit(f)(*args))
    # Derivatives and batching see the same function (the while loop's speculated cache included).
    g = lambda enc, wk: f(enc, wk, *args[2:])  # noqa: E731
    tangents = (jnp.full_like(args[0], 0.1), jnp.full_like(args[1], 0.01))
    (p1, t1), (p2, t2) = (jax.jvp(fn, args[:2], tangents) for fn in (kvhoist.hoist_invariants(g), jax.jit(g)))
    contract.assert_close(p1, p2)
    contract.assert_close(t1, t2)
    encs = jnp.stack([args[0], 2 * args[0]])
    contract.assert_close(jax.vmap(kvhoist.hoist_invariants(g), (0, None))(encs, args[1]),
                          jax.vmap(jax.jit(g), (0, None))(encs, args[1]))


def test_consumer_that_needs_the_tiled_value_keeps_a_tiled_cache():
    """When a body op reads the whole tiled value (here a dot contracting the beam axis with a per-beam vector),
    re-tiling a small cache would copy it every iteration where jit's tiled cache is read in place: the
    cache stays tiled (the pass picks the loop's speed)."""
    def f(enc, w, x):
        enc_t = _tile(enc, "broadcast+reshape")
        def body(h, _):
            g = jnp.einsum("nsd,n->sd", enc_t @ w, h[:, 0])
            return h + jnp.tanh(g.sum(0))[None] * 0.1, None
        return lax.scan(body, x, None, length=3)[0]

    ks = jax.random.split(jax.random.key(4), 3)
    args = (jax.random.normal(ks[0], (B, S, D)), jax.random.normal(ks[1], (D, D)) / 8,
            jax.random.normal(ks[2], (B * K, D)))
    hf = kvhoist.hoist_invariants(f)
    report = hf.report(*args)
    assert report.cache_bytes == B * K * S * D * 4, report.table()
    assert not any("untiled" in h.via for h in report.hoisted)
    contract.assert_close(hf(*args), jax.jit(f)(*args))


def test_size_one_broadcast_is_untiled():
    def f(enc, w, x):
        big = jnp.broadcast_to(enc, (K, S, D))     # enc has a size-1 leading axis
        def body(h, _):
            kk = big @ w
            att = jnp.einsum("bd,bsd->bs", h, kk)
            return h + jnp.tanh(jnp.einsum("bs,bsd->bd", att, kk)) * 0.1, None
        return lax.scan(body, x, None, length=3)[0]

    ks = jax.random.split(jax.random.key(1), 3)
    args = (jax.random.normal(ks[0], (1, S, D)), jax.random.normal(ks[1], (D, D)) / 8,
            jax.random.normal(ks[2], (K, D)))
    hf = kvhoist.hoist_invariants(f)
    assert hf.report(*args).cache_bytes == S * D * 4
    contract.assert_close(hf(*args), jax.jit(f)(*args))


def test_value_and_its_transpose_are_cached_once():
    """A body that reads an invariant projection as k and as k.T gets one cache, the view recomputed."""
    def f(ctx, w, x):
        def body(h, _):
            k = ctx @ w
            kt = k.T
            return h + jnp.tanh(h @ kt) @ k * 0.01, None
        return lax.scan(body, x, None, length=3)[0]

    ks = jax.random.split(jax.random.key(2), 3)
    args = (jax.random.normal(ks[0], (S, D)), jax.random.normal(ks[1], (D, D)) / 8, jax.random.normal(ks[2], (4, D)))
    hf = kvhoist.hoist_invariants(f)
    report = hf.report(*args)
    assert report.cache_bytes == S * D * 4, report.table()
    assert any("shared" in h.via for h in report.hoisted)
    contract.assert_close(hf(*args), jax.jit(f)(*args))


def test_identical_values_are_computed_and_stored_once():
    def f(ctx, w, x):
        def body(h, _):
            a = jnp.tanh(ctx @ w)        # the same projection written twice (two attention calls, say)
            b = jnp.tanh(ctx @ w)
            return h + jnp.sum(a * h[:1]) + jnp.sum(b * h[1:2]), None
        return lax.scan(body, x, None, length=3)[0]

    ks = jax.random.split(jax.random.key(3), 3)
    args = (jax.random.normal(ks[0], (S, D)), jax.random.normal(ks[1], (D, D)) / 8, jax.random.normal(ks[2], (S, D)))
    hf = kvhoist.hoist_invariants(f)
    _before, after = hf.jaxprs(*args)
    outside = [e for e in compat.split_closed(after)[4] if e.primitive.name == "dot_general"]
    assert len(outside) == 1
    assert hf.report(*args).cache_bytes == S * D * 4
    contract.assert_close(hf(*args), jax.jit(f)(*args))


def test_tiled_axis_contracted_stays_tiled_and_correct():
    """When the tiled axis is contracted, the work does not commute with the tiling: nothing shrinks."""
    def f(enc, w, x):
        enc_t = jnp.tile(enc, (K, 1))               # [K*S, D]
        def body(h, _):
            g = enc_t.T @ enc_t @ w                 # contracts the tiled axis
            return h + jnp.tanh(h @ g) * 0.1, None
        return lax.scan(body, x, None, length=3)[0]

    ks = jax.random.split(jax.random.key(4), 3)
    args = (jax.random.normal(ks[0], (S, D)) / 8, jax.random.normal(ks[1], (D, D)) / 8, jax.random.normal(ks[2], (2, D)))
    hf = kvhoist.hoist_invariants(f)
    report = hf.report(*args)
    assert report.hoisted and not any("untiled" in h.via for h in report.hoisted)
    np.testing.assert_allclose(hf(*args), jax.jit(f)(*args), rtol=1e-6)


@pytest.mark.parametrize("form", ["scan x layer-scan", "scan x unrolled", "expert cond (A14B)", "I2V + CFG"])
def test_wan_cache_is_no_larger_than_the_hand_written_one(form):
    """The automatic cache holds exactly what sample(kv_cache=True) holds: the K/V, nothing more (constant
    tables such as the timestep frequencies are left to XLA's constant folding)."""
    import dataclasses

    from kvhoist.bench.forms import CONFIGS, FORMS, build_case, hand_cache_bytes, split_kwargs
    from wan_ref.sample import sample

    cfg = dataclasses.replace(CONFIGS["small"], steps=2, num_layers=2)
    case = build_case(cfg, FORMS[form])
    static, traced = split_kwargs(case.kwargs)
    report = kvhoist.hoist_invariants(functools.partial(sample, **static)).report(*case.args, **traced)
    assert report.hoisted
    assert report.cache_bytes <= hand_cache_bytes(case, FORMS[form], cfg), report.table()


def test_fissioned_layer_scan_over_a_tiled_value_caches_one_copy():
    """Beam search with a layer scan: the per-layer K of a tiled encoder output leaves the step loop by
    fission; the stacked cache is computed on the untiled value ([L, B, ...], not [L, B*K, ...])."""
    L = 3

    def f(enc, w, x):
        tiled = jnp.broadcast_to(enc[:, None], (B, K, S, D)).reshape(B * K, S, D)

        def layer(h, wl):
            k = tiled @ wl
            p = jax.nn.softmax(jnp.einsum("nd,nsd->ns", h, k), -1)
            return h + jnp.einsum("ns,nsd->nd", p, k), None

        def body(c):
            i, h = c
            return i + 1, lax.scan(layer, h, w)[0]
        return lax.while_loop(lambda c: c[0] < 3, body, (0, x))[1]

    ks = jax.random.split(jax.random.key(5), 3)
    args = (jax.random.normal(ks[0], (B, S, D)), jax.random.normal(ks[1], (L, D, D)) * 0.1,
            jax.random.normal(ks[2], (B * K, D)))
    hf = kvhoist.hoist_invariants(f)
    report = hf.report(*args)
    assert report.cache_bytes == L * B * S * D * 4, report.table()
    assert [h.shape for h in report.hoisted] == [(L, B, S, D)]
    contract.assert_close(hf(*args), jax.jit(f)(*args))


def test_sunk_broadcasts_leave_no_dead_cache():
    """Sinking ``bcast(x) * 0.1`` leaves the broadcasts dead in the body; they must not keep their
    small operands crossing into the loop (one [1, 4] row is cached, not three)."""
    def f(w, x):
        h = jnp.tanh(w @ w)

        def body(c, _):
            a = jnp.broadcast_to(h.sum(0, keepdims=True), (4, 4)) * 0.1
            b = jnp.broadcast_to(h.sum(0, keepdims=True), (4, 4)) * 0.1
            return jnp.tanh(c + a * b), None
        return lax.scan(body, x, None, length=3)[0]

    ks = jax.random.split(jax.random.key(4), 2)
    args = (jax.random.normal(ks[0], (4, 4)), jax.random.normal(ks[1], (4, 4)))
    hf = kvhoist.hoist_invariants(f)
    assert hf.report(*args).cache_bytes == 4 * 4, hf.report(*args).table()
    contract.assert_close(hf(*args), jax.jit(f)(*args))


def test_different_tilings_with_one_small_twin():
    """``tile(x) @ w`` and ``repeat(x) @ w`` differ but share their small twin ``x @ w``: the loop
    must read the twin that survives common-value elimination (it read the dropped one)."""
    def f(enc, w, x):
        def body(c, _):
            a = jnp.tile(enc, (4, 1)) @ w
            b = jnp.repeat(enc, 4, axis=0) @ w
            return jnp.tanh(c + a) * b, None
        return lax.scan(body, x, None, length=3)[0]

    ks = jax.random.split(jax.random.key(5), 3)
    args = (jax.random.normal(ks[0], (2, 8)), jax.random.normal(ks[1], (8, 8)), jax.random.normal(ks[2], (8, 8)))
    hf = kvhoist.hoist_invariants(f)
    report = hf.report(*args)
    assert report.cache_bytes == 2 * 8 * 4, report.table()   # x @ w once, re-expanded both ways
    assert not [n for n in report.notes if n.kind == "refused"]
    np.testing.assert_allclose(hf(*args), jax.jit(f)(*args), rtol=1e-5, atol=1e-6)  # [2,8]@ vs [8,8]@ rounding


def test_zero_length_scan_is_left_alone():
    """Its body never runs: hoisting anything out of it could only add work."""
    def f(w, x):
        return lax.scan(lambda c, _: (c + jnp.tanh(w @ w), None), x, None, length=0)[0]

    args = (jnp.ones((4, 4)), jnp.ones((4, 4)))
    hf = kvhoist.hoist_invariants(f)
    report = hf.report(*args)
    assert not report.hoisted
    before, after = hf.jaxprs(*args)
    assert str(after) == str(before)
    contract.assert_close(hf(*args), jax.jit(f)(*args))
