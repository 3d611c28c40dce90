"""The @hoist_invariants decorator: values, caching, composition with jit/vmap, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvhoist
from licm_util import rand

W = rand(8, 8, seed=1)
CTX = rand(6, 8, seed=3)
X = rand(2, 8, seed=4)


def sampler(params, x, steps=4):
    w, ctx = params["w"], params["ctx"]

    def step(h, t):
        k = ctx @ w
        return jnp.tanh(h + t * (h @ k.T).sum(-1, keepdims=True)), t
    h, ts = jax.lax.scan(step, x, jnp.arange(float(steps)))
    return {"h": h, "ts": ts}


PARAMS = {"w": W, "ctx": CTX}


def test_bare_decorator_same_pytree_and_values():
    f = kvhoist.hoist_invariants(sampler)
    out = f(PARAMS, X)
    ref = sampler(PARAMS, X)
    assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(ref)
    np.testing.assert_allclose(out["h"], ref["h"], rtol=1e-5, atol=1e-6)
    assert f.__name__ == "sampler"


def test_decorator_with_options_and_static_args():
    @kvhoist.hoist_invariants(static_argnames=("steps",))
    def g(params, x, steps):
        return sampler(params, x, steps)["h"]

    np.testing.assert_allclose(g(PARAMS, X, steps=3), sampler(PARAMS, X, 3)["h"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g(PARAMS, X, steps=5), sampler(PARAMS, X, 5)["h"], rtol=1e-5, atol=1e-6)
    before, after = g.jaxprs(PARAMS, X, steps=5)
    report = g.report(PARAMS, X, steps=5)
    assert report.hoisted and report.hoisted[0].trip_count == 5
    assert before is not after

    @kvhoist.hoist_invariants(static_argnums=(2,))
    def h(params, x, steps):
        return sampler(params, x, steps)["h"]

    np.testing.assert_allclose(h(PARAMS, X, 3), sampler(PARAMS, X, 3)["h"], rtol=1e-5, atol=1e-6)


def test_traces_once_per_signature():
    n = {"traces": 0}

    def f(params, x):
        n["traces"] += 1
        return sampler(params, x)["h"]

    hf = kvhoist.hoist_invariants(f)
    hf(PARAMS, X)
    hf(PARAMS, X + 1.0)
    assert n["traces"] == 1
    hf(PARAMS, jnp.ones((3, 8)))
    assert n["traces"] == 2


def test_inside_outer_jit_and_vmap():
    hf = kvhoist.hoist_invariants(lambda p, x: sampler(p, x)["h"])
    out = jax.jit(hf)(PARAMS, X)
    np.testing.assert_allclose(out, sampler(PARAMS, X)["h"], rtol=1e-5, atol=1e-6)
    xs = jnp.stack([X, X * 0.5, -X])
    out = jax.vmap(hf, in_axes=(None, 0))(PARAMS, xs)
    ref = jax.vmap(lambda x: sampler(PARAMS, x)["h"])(xs)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    g = jax.grad(lambda w: hf({"w": w, "ctx": CTX}, X).sum())(W)
    g_ref = jax.grad(lambda w: sampler({"w": w, "ctx": CTX}, X)["h"].sum())(W)
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-4)


def test_error_non_callable():
    with pytest.raises(TypeError, match="expects a callable"):
        kvhoist.hoist_invariants(42)


def test_error_untraceable_is_jits_own_error():
    """Python control flow on a traced value raises exactly jax.jit's exception: its type (a user's
    ``except jax.errors.ConcretizationTypeError`` still catches it) and its message, which names the
    function and the argument (not kvhoist's flattened re-trace), in both the jit twin and host-loop mode."""
    def bad(x, w):
        if x.sum() > 0:            # Python control flow on a traced value
            return x * w
        return -x

    with pytest.raises(jax.errors.TracerBoolConversionError) as want:
        jax.jit(bad)(X, W[0])
    for hf in (kvhoist.hoist_invariants(bad), kvhoist.hoist_invariants(bad, invariant_argnums=1)):
        with pytest.raises(jax.errors.ConcretizationTypeError) as got:
            hf(X, W[0])
        assert type(got.value) is type(want.value)
        assert str(got.value) == str(want.value)
        assert "the function bad at" in str(got.value) and "argument x" in str(got.value)


def test_error_unhashable_static_arg_is_jits_error():
    """A non-hashable static argument gets exactly jax.jit's error (the decorated function is a jit)."""
    for hf, call in [
        (kvhoist.hoist_invariants(lambda x, cfg: x * len(cfg), static_argnames=("cfg",)), lambda f: f(X, cfg=[1, 2])),
        (kvhoist.hoist_invariants(lambda x, cfg: x * len(cfg), static_argnums=(1,)), lambda f: f(X, [1, 2])),
    ]:
        with pytest.raises(ValueError, match="Non-hashable static arguments.*\\[1, 2\\]"):
            call(hf)


def test_licm_function_alone():
    closed = jax.make_jaxpr(lambda p, x: sampler(p, x)["h"])(PARAMS, X)
    new, report = kvhoist.licm(closed)
    assert isinstance(report, kvhoist.Report) and report.hoisted
    out = kvhoist.compat.jaxpr_as_fun(new)(*jax.tree_util.tree_leaves((PARAMS, X)))
    np.testing.assert_allclose(out[0], sampler(PARAMS, X)["h"], rtol=1e-5, atol=1e-6)


def test_loopless_function_gets_a_hint_about_host_loops():
    def step(w, ctx, x):
        return jnp.tanh(x @ (ctx @ w).T)

    report = kvhoist.hoist_invariants(step).report(W, CTX, X)
    assert not report.hoisted
    assert any(n.kind == "hint" and "invariant_argnames" in n.message for n in report.notes)
    assert all(n.kind != "hint" for n in kvhoist.hoist_invariants(sampler).report(PARAMS, X).notes)


def test_functools_partial_and_callable_objects():
    import functools

    hf = kvhoist.hoist_invariants(functools.partial(sampler, steps=3))
    np.testing.assert_allclose(hf(PARAMS, X)["h"], sampler(PARAMS, X, 3)["h"], rtol=1e-5, atol=1e-6)
    assert "sampler" in repr(hf)

    class Step:
        def __call__(self, params, x):
            return sampler(params, x)["h"]

    hc = kvhoist.hoist_invariants(Step())
    np.testing.assert_allclose(hc(PARAMS, X), sampler(PARAMS, X)["h"], rtol=1e-5, atol=1e-6)
    host = kvhoist.hoist_invariants(functools.partial(sampler, steps=2), invariant_argnums=0)
    np.testing.assert_allclose(host(PARAMS, X)["h"], sampler(PARAMS, X, 2)["h"], rtol=1e-5, atol=1e-6)
