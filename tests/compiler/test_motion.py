"""The motion model (kvhoist.analysis.motion) and the verification that refuses ill-formed rewrites."""

from __future__ import annotations

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import kvhoist
from kvhoist import compat
from kvhoist.analysis import motion
from kvhoist.rules import scan as scan_rule


def _eqns(f, *args):
    return compat.split_closed(jax.make_jaxpr(f)(*args))[4]


def _find(eqns, name):
    for e in eqns:
        if e.primitive.name == name:
            return e
        for s in compat.subjaxprs_of(e):
            hit = _find(compat.split_closed(s)[4], name)
            if hit is not None:
                return hit
    return None


def test_every_public_primitive_is_classified():
    """A primitive JAX exports must be allowlisted or explicitly kept in place, never silently unknown."""
    prims = {v.name for v in vars(jex.primitives).values() if isinstance(v, jex.Primitive)}
    assert len(prims) > 100
    unclassified = sorted(p for p in prims
                          if p not in motion.PURE_PRIMITIVES | motion.HIGHER_ORDER and p not in motion.STAYS)
    assert not unclassified, f"classify these in kvhoist/analysis/motion.py: {unclassified}"
    assert not (set(motion.STAYS) & motion.PURE_PRIMITIVES)


def test_stateful_and_callbacks_do_not_move():
    x = jnp.ones(3)
    rng = _find(_eqns(lambda: lax.rng_uniform(0.0, 1.0, (3,))), "rng_uniform")
    assert not motion.may_move(rng) and "stateful" in motion.why_not_movable(rng)
    cb = _find(_eqns(lambda x: jax.pure_callback(np.sin, jax.ShapeDtypeStruct((3,), jnp.float32), x), x),
               "pure_callback")
    assert not motion.may_move(cb) and "callback" in motion.why_not_movable(cb)
    # A jit around a callback is as immovable as the callback.
    call = _eqns(jax.jit(lambda x: jax.pure_callback(np.sin, jax.ShapeDtypeStruct((3,), jnp.float32), x)), x)[0]
    assert "pure_callback" in motion.why_not_movable(call)


def test_while_may_move_but_is_not_speculatable():
    w = _eqns(lambda a: lax.while_loop(lambda v: v < 10.0, lambda v: v + 1.0, a), 1.0)[0]
    assert motion.may_move(w) and not motion.speculatable(w)
    assert "may not terminate" in motion.why_not_speculatable(w)
    # A scan of pure work has a static trip count: speculatable. A scan holding a while is not.
    s = _eqns(lambda a: lax.scan(lambda c, _: (jnp.sin(c), None), a, None, length=3)[0], 1.0)[0]
    assert motion.speculatable(s)
    s2 = _eqns(lambda a: lax.scan(lambda c, _: (lax.while_loop(lambda v: v < 1.0, jnp.sin, c), None),
                                  a, None, length=3)[0], 1.0)[0]
    assert motion.may_move(s2) and not motion.speculatable(s2)
    mm = _eqns(lambda a, b: a @ b, jnp.ones((2, 2)), jnp.ones((2, 2)))[0]
    assert motion.speculatable(mm) and motion.can_move(mm, True)


def test_unknown_primitive_stays_and_is_reported():
    """An effect-free primitive kvhoist does not know stays in the loop, and the report says why."""
    p = jex.Primitive("mystery_pure")
    p.def_impl(lambda x: x * 2.0)
    p.def_abstract_eval(lambda x: x)
    jax.interpreters.mlir.register_lowering(p, jax.interpreters.mlir.lower_fun(lambda x: x * 2.0, False))

    def f(x, w):
        def body(c, _):
            return c + p.bind(w) @ w, None
        return lax.scan(body, x, None, length=3)[0]

    x, w = jnp.ones((2, 2)), jnp.eye(2)
    hf = kvhoist.hoist_invariants(f)
    _before, after = hf.jaxprs(x, w)
    scan = _find(compat.split_closed(after)[4], "scan")
    assert _find(compat.split_closed(scan.params["jaxpr"])[4], "mystery_pure") is not None
    skipped = hf.report(x, w).skipped
    assert any("unknown primitive 'mystery_pure'" in s.reason for s in skipped), skipped
    np.testing.assert_array_equal(hf(x, w), jax.jit(f)(x, w))


def test_broadcast_is_sunk_and_the_small_value_hoisted():
    n = 4096

    def f(x, a):
        def body(c, _):
            return c + jnp.sum(jnp.cos(jnp.sin(jnp.broadcast_to(a, (n,)))) * c), None
        return lax.scan(body, x, None, length=3)[0]

    hf = kvhoist.hoist_invariants(f)
    x, a = jnp.float32(0.5), jnp.float32(0.3)
    report = hf.report(x, a)
    assert report.hoisted and all(h.shape == () for h in report.hoisted), report.table()
    np.testing.assert_allclose(hf(x, a), jax.jit(f)(x, a), rtol=1e-6)


def test_expansion_is_not_cached_but_matmul_result_is():
    n = 1 << 19  # 2 MiB of f32: over SMALL_BYTES

    def f(x, a, w, ctx):
        def body(c, _):
            big = jnp.broadcast_to(a, (n,)) * jnp.arange(n, dtype=jnp.float32)  # an expansion of a scalar
            k = ctx @ w                                                          # materialised anyway
            return c + jnp.sum(big * c) * 1e-9 + jnp.sum(k * c), None  # read by variant work
        return lax.scan(body, x, None, length=3)[0]

    args = (jnp.float32(0.0), jnp.float32(2.0), jnp.ones((64, 64)), jnp.ones((64, 64)))
    report = kvhoist.hoist_invariants(f).report(*args)
    assert all(h.bytes <= motion.SMALL_BYTES for h in report.hoisted), report.table()
    assert any(h.shape == (64, 64) for h in report.hoisted)
    assert any("expansion" in s.reason for s in report.skipped), report.table()


def _bad_rewrite(monkeypatch):
    """Make the scan rule return an equation that reads a variable from nowhere."""
    original = scan_rule.ScanRule.optimize

    def broken(self, eqn, engine):
        out = original(self, eqn, engine)
        last = out[-1]
        stray = compat.new_var(last.invars[0].aval)
        return out[:-1] + [last.replace(invars=[stray] + list(last.invars[1:]))]

    monkeypatch.setattr(scan_rule.ScanRule, "optimize", broken)


def _loop(x, w):
    return lax.scan(lambda c, _: (c + jnp.tanh(w @ w), None), x, None, length=3)[0]


def test_ill_scoped_rewrite_is_refused_not_lowered(monkeypatch):
    _bad_rewrite(monkeypatch)
    monkeypatch.setenv("KVHOIST_STRICT", "0")
    x, w = jnp.ones((2, 2)), jnp.eye(2) * 0.5
    closed = jax.make_jaxpr(_loop)(x, w)
    new, report = kvhoist.licm(closed)
    assert any(n.kind == "refused" and "not in scope" in n.message for n in report.notes), report.notes
    assert not report.hoisted
    np.testing.assert_array_equal(compat.jaxpr_as_fun(new)(x, w)[0], _loop(x, w))
    # Under KVHOIST_STRICT the same bug raises instead.
    monkeypatch.setenv("KVHOIST_STRICT", "1")
    with pytest.raises(Exception, match="not in scope"):
        kvhoist.licm(closed)


def test_pipeline_failure_falls_back_to_jit(monkeypatch):
    from kvhoist.passes import pipeline

    def boom(*a, **k):
        raise RuntimeError("simulated kvhoist bug")

    monkeypatch.setattr(pipeline, "optimize", boom)
    monkeypatch.setenv("KVHOIST_STRICT", "0")
    x, w = jnp.ones((2, 2)), jnp.eye(2) * 0.5
    hf = kvhoist.hoist_invariants(_loop)
    with pytest.warns(kvhoist.KvhoistWarning, match="simulated kvhoist bug"):
        out = hf(x, w)
    np.testing.assert_array_equal(out, jax.jit(_loop)(x, w))
    assert any(n.kind == "refused" for n in hf.report(x, w).notes)


@pytest.mark.parametrize("bad", [None, "not a jaxpr", 3])
def test_passes_reject_non_jaxprs(bad):
    for fn in (kvhoist.licm, kvhoist.optimize):
        with pytest.raises(TypeError, match="expects a closed jaxpr"):
            fn(bad)
    with pytest.raises(TypeError, match="expects a closed jaxpr"):
        kvhoist.repad_tokens(bad, "v6e")


def test_passing_a_function_to_licm_names_the_decorator():
    with pytest.raises(TypeError, match="hoist_invariants"):
        kvhoist.licm(_loop)


@pytest.mark.parametrize("kwargs, exc", [
    (dict(max_cache_bytes="100"), TypeError), (dict(max_cache_bytes=-1), ValueError),
    (dict(max_cache_bytes=True), TypeError), (dict(fission="loop"), ValueError),
    (dict(static_argnums="0"), TypeError), (dict(static_argnames=3), TypeError),
    (dict(static_argnums=5), ValueError), (dict(static_argnames=("nope",)), ValueError),
    (dict(target="v99"), ValueError),
])
def test_options_are_validated_at_construction(kwargs, exc):
    with pytest.raises(exc):
        kvhoist.hoist_invariants(_loop, **kwargs)
    with pytest.raises(exc):
        kvhoist.hoist_invariants(**kwargs)(_loop)


def test_speculated_work_is_bounded_by_what_the_loop_surely_runs():
    """A never-taken branch holding a long (static) fori_loop: no while, yet far too much work to speculate."""
    def f(x, w):
        def body(c, _):
            def heavy(ops):
                c, w = ops
                return c + lax.fori_loop(0, 10**9, lambda i, v: jnp.tanh(v @ w), w).sum()
            return lax.cond(c < 100.0, lambda ops: ops[0] + 1.0, heavy, (c, w)), None
        return lax.scan(body, x, None, length=4)[0]

    hf = kvhoist.hoist_invariants(f)
    args = (jnp.float32(0.0), jnp.eye(8) * 0.5)
    report = hf.report(*args)
    assert not report.hoisted
    assert any("not speculated" in s.reason for s in report.skipped), report.skipped
    assert float(hf(*args)) == 4.0   # returns at once, like jit (the 10**9-step loop is never run)
    assert motion.speculation_budget(10, 4) == 40 and motion.speculation_budget(None, 4) == 0


# -- one notion of "pays" (issue 20 item 6) ----------------------------------------------------------------------


def test_pays_is_one_predicate_for_trips_and_transient_memory():
    assert motion.pays(5, 100) and motion.pays(None, 100)
    assert not motion.pays(1, 100) and not motion.pays(5, 0)
    # vmap-fission: computing the cache may not hold more at once than the cache itself
    assert motion.pays(5, 100, peak_bytes=4096, cache_bytes=4096)
    reason = motion.why_not_pays(5, 100, peak_bytes=4097, cache_bytes=4096)
    assert reason is not None and "4097" in reason and "4096" in reason


@pytest.mark.parametrize("fission", ["scan", "vmap"])
def test_fission_out_of_a_loop_that_runs_once_does_not_pay(fission):
    """A step loop of length 1 around a layer scan: fissioning would stack every layer's K and save nothing."""
    wk = np.random.default_rng(0).standard_normal((3, 8, 8)).astype(np.float32)
    ctx = np.ones((4, 8), np.float32)
    x = np.ones((2, 8), np.float32)

    def f(wk, ctx, x):
        def step(h, t):
            def layer(h, w):
                k = ctx @ w
                return jnp.tanh(h + t * (h @ k.T).sum(-1, keepdims=True)), None
            return lax.scan(layer, h, wk)[0], None
        return lax.scan(step, x, jnp.arange(1.0))[0]

    closed = jax.make_jaxpr(f)(wk, ctx, x)
    new, report = kvhoist.licm(closed, fission=fission)
    assert not report.hoisted and not any(n.kind == "fission" for n in report.notes), report.notes
    assert str(new) == str(closed)
