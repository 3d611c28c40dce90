"""Speculated and hoisted work under JAX transformations (issue 18 items 1-3; docs/design.md §2a).

Every test runs a transformation around ``hoist_invariants(f)`` and around ``jax.jit(f)`` and compares
(``kvhoist.contract``: NaN/inf positions exact, values within the per-dtype bound). The programs hold
invariant work that produces NaN/inf where it would not run under jit: a never-taken ``cond`` branch,
a ``while`` body that runs zero times.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.experimental import checkify

import kvhoist
from kvhoist import compat, speculation
from kvhoist.contract import assert_close

#: Invariant work that is NaN/inf (or a NaN/inf derivative) at w <= 0.
UNSAFE = {
    "sqrt": jnp.sqrt,
    "log": jnp.log,
    "div": lambda w: 1.0 / w,
    "pow": lambda w: w ** 0.5,
}
W = jnp.array([0.0, -1.0, 1.0, 2.0])
X = jnp.array([1.0, 2.0, 3.0, 4.0])


def _scan_cond(op, taken_at=None):
    """A 4-step scan whose cond runs ``op(w)`` only at iteration ``taken_at`` (never when None)."""
    def f(w, x):
        def body(c, t):
            pred = (t == taken_at) if taken_at is not None else jnp.isnan(c).any()
            y = lax.cond(pred, lambda c: c + op(w) * c, lambda c: jnp.sin(c) * 2.0 + w, c)
            return y, None
        return lax.scan(body, x, jnp.arange(4))[0].sum()
    return f


def _while(op):
    def f(w, x, n):
        def body(c):
            i, v = c
            return i + 1, v + op(w) * v
        return lax.while_loop(lambda c: c[0] < n, body, (0, x))[1].sum()
    return f


def _hoisted(f, **kw):
    return kvhoist.hoist_invariants(f, **kw)


@pytest.mark.parametrize("op", sorted(UNSAFE))
def test_grad_through_never_taken_branch_is_jits(op):
    f = _scan_cond(UNSAFE[op])
    want = jax.grad(jax.jit(f), argnums=(0, 1))(W, X)
    got = jax.grad(_hoisted(f), argnums=(0, 1))(W, X)
    assert np.isfinite(np.asarray(want[0])).all()
    assert_close(got, want)
    report = _hoisted(f).report(W, X)
    assert report.hoisted and all("speculation" in h.via for h in report.hoisted)


@pytest.mark.parametrize("taken_at", [0, 2])
def test_grad_through_a_branch_taken_once_is_jits(taken_at):
    """The attach computes the derivative where the branch ran, with that iteration's cotangent."""
    f = _scan_cond(lambda w: jnp.sqrt(w * w + 1.0), taken_at)
    want = jax.grad(jax.jit(f), argnums=(0, 1))(W, X)
    got = jax.grad(_hoisted(f), argnums=(0, 1))(W, X)
    assert_close(got, want)
    assert _hoisted(f).report(W, X).hoisted


@pytest.mark.parametrize("trips", [0, 2])
def test_jvp_through_while_is_jits(trips):
    f = _while(jnp.log)
    w = jnp.abs(W) + 0.5
    for tangent in (jnp.ones(4), jnp.zeros(4)):
        want = jax.jvp(lambda w: jax.jit(f)(w, X, trips), (w,), (tangent,))
        got = jax.jvp(lambda w: _hoisted(f)(w, X, trips), (w,), (tangent,))
        assert_close(got, want)
    assert _hoisted(f).report(w, X, trips).hoisted


def test_vmap_jacrev_hessian_match_jit():
    f = _scan_cond(lambda w: jnp.sqrt(w * w + 1.0), 1)
    ws = jnp.stack([W, W + 1.0, -W])
    for name, t in [
        ("vmap", lambda g: jax.vmap(g, in_axes=(0, None))),
        ("vmap-grad", lambda g: jax.vmap(jax.grad(g), in_axes=(0, None))),
        ("jacrev", lambda g: lambda w, x: jax.jacrev(g)(w[0], x)),
        ("hessian", lambda g: lambda w, x: jax.hessian(g)(w[0], x)),
        ("jvp-of-grad", lambda g: lambda w, x: jax.jvp(jax.grad(g), (w[0], x), (jnp.ones(4), jnp.ones(4)))),
    ]:
        assert_close(t(_hoisted(f))(ws, X), t(jax.jit(f))(ws, X), err_msg=name)
    g = _scan_cond(jnp.log)   # never taken: NaN-producing under vmap too
    assert_close(jax.vmap(jax.grad(_hoisted(g)), in_axes=(0, None))(ws, X),
                 jax.vmap(jax.grad(jax.jit(g)), in_axes=(0, None))(ws, X))


def _check(f, errors, *args):
    err, out = checkify.checkify(f, errors=errors)(*args)
    return err.get(), out


def test_checkify_sees_speculated_work_only_where_it_ran():
    f = _scan_cond(jnp.log)
    assert _check(jax.jit(f), checkify.float_checks, -jnp.ones(4), X)[0] is None
    assert _check(_hoisted(f), checkify.float_checks, -jnp.ones(4), X)[0] is None
    # Taken once: the same error as jit's.
    g = _scan_cond(jnp.log, 2)
    want = _check(jax.jit(g), checkify.float_checks, -jnp.ones(4), X)[0]
    assert want is not None and "log" in want
    assert _check(_hoisted(g), checkify.float_checks, -jnp.ones(4), X)[0] == want


def test_checkify_div_in_zero_trip_while():
    def f(w, x, n):
        def body(c):
            i, v = c
            return i + 1, v + x // w
        return lax.while_loop(lambda c: c[0] < n, body, (0, x))[1].sum()

    args = (jnp.zeros((), jnp.int32), jnp.ones(4, jnp.int32))
    assert _check(jax.jit(f), checkify.div_checks, *args, 0)[0] is None
    assert _check(_hoisted(f), checkify.div_checks, *args, 0)[0] is None
    want = _check(jax.jit(f), checkify.div_checks, *args, 2)[0]
    assert want is not None and _check(_hoisted(f), checkify.div_checks, *args, 2)[0] == want
    assert _hoisted(f).report(*args, 0).hoisted


@jax.custom_vjp
def clip_gradient(lo, hi, x):
    return x


def _clip_fwd(lo, hi, x):
    return x, (lo, hi)


CALLS: list = []


def _clip_bwd(res, g):
    lo, hi = res
    jax.debug.callback(lambda g: CALLS.append(float(g)), g)
    return None, None, jnp.clip(g, lo, hi)


clip_gradient.defvjp(_clip_fwd, _clip_bwd)


def test_custom_vjp_keeps_its_backward_per_iteration():
    """The JAX docs' clip_gradient on invariant work in a fori_loop: the bwd clips each iteration's
    cotangent under jit; moved out of the loop it would clip their sum once. It stays, reported."""
    def f(w, x):
        def body(i, c):
            return c + jnp.sin(clip_gradient(-0.5, 0.5, jnp.sin(w) * 3.0)) * c
        return lax.fori_loop(0, 4, body, x)

    CALLS.clear()
    want = jax.grad(jax.jit(f))(1.0, 0.5)
    jax.effects_barrier()
    n_jit = len(CALLS)
    CALLS.clear()
    got = jax.grad(_hoisted(f))(1.0, 0.5)
    jax.effects_barrier()
    assert n_jit == 4 and len(CALLS) == n_jit
    assert_close(got, want)
    report = _hoisted(f).report(1.0, 0.5)
    assert any("custom_vjp" in s.reason for s in report.skipped)


def _flops(compiled) -> float:
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return float(ca.get("flops", 0.0))


def test_primitives_vanish_without_transformations():
    """Speculated work sits outside the loop, its attach in the branch; compiled, the program costs
    what it costs without the two primitives (speculation.primal)."""
    def f(w, ctx, x):
        def body(c, t):
            y = lax.cond(t > 1, lambda c: jnp.tanh(c @ (ctx @ w).T @ ctx), lambda c: jnp.tanh(c @ w) @ w, c)
            return y, None
        return lax.scan(body, x, jnp.arange(4))[0]

    r = np.random.default_rng(0)
    args = tuple(jnp.asarray(r.standard_normal(s), jnp.float32) for s in ((8, 8), (6, 8), (2, 8)))
    h = _hoisted(f)
    _before, after = h.jaxprs(*args)
    names_top = [e.primitive.name for e in compat.split_closed(after)[4]]
    assert "kvhoist_speculate" in names_top and "dot_general" not in names_top
    plain = speculation.primal(after)
    assert "kvhoist_attach" not in str(plain) and "kvhoist_speculate" not in str(plain)
    assert "kvhoist_attach" in str(after)
    run = lambda j: jax.jit(compat.jaxpr_as_fun(j)).lower(*args).compile()  # noqa: E731
    assert _flops(run(after)) == _flops(run(plain))
    assert_close(h(*args), jax.jit(f)(*args))


def test_motion_model_classifies_the_primitives():
    from kvhoist.analysis import motion

    f = _scan_cond(jnp.log)
    _b, after = _hoisted(f).jaxprs(W, X)
    eqns = list(compat.split_closed(after)[4])
    spec = next(e for e in eqns if e.primitive is speculation.speculate_p)
    assert motion.speculatable(spec)
    loop = next(e for e in eqns if e.primitive.name == "scan")
    cond = next(e for e in compat.split_closed(loop.params["jaxpr"])[4] if e.primitive.name == "cond")
    assert motion.may_move(cond) and not motion.speculatable(cond)
    assert "stay in the region" in motion.why_not_speculatable(cond)


def test_rebuild_attach_changes_the_work_transformations_see():
    """speculation's public attach API (what passes/shrink uses): the primal forwards the attached value, the
    JVP is the (rebuilt) body's; a non-attach or a mismatched body is one clear error."""
    w = jnp.array([1.0, 4.0])
    _cv, _c, (w_var,), (s_var,), moved = compat.split_closed(jax.make_jaxpr(jnp.sqrt)(w))
    (s_in,), att = speculation.attach_eqn(moved, [w_var], [s_var])
    assert speculation.is_attach(att) and not any(speculation.is_attach(e) for e in moved)

    def jvp_of(eqn):
        fun = compat.jaxpr_as_fun(compat.make_closed([], [], list(eqn.invars), list(eqn.outvars), [eqn]))
        s = jnp.array([7.0, 8.0])
        (out,), (t,) = jax.jvp(lambda w: fun(s, w), (w,), (jnp.ones_like(w),))
        np.testing.assert_array_equal(out, s)   # identity in the primal
        return t

    np.testing.assert_allclose(jvp_of(att), 0.5 / jnp.sqrt(w), rtol=1e-6)
    same = speculation.rebuild_attach(att, [s_in], [s_var], speculation.attach_body(att))
    np.testing.assert_allclose(jvp_of(same), 0.5 / jnp.sqrt(w), rtol=1e-6)
    tripled = speculation.rebuild_attach(att, [s_in], [s_var], jax.make_jaxpr(lambda w: jnp.sqrt(w) * 3.0)(w))
    np.testing.assert_allclose(jvp_of(tripled), 1.5 / jnp.sqrt(w), rtol=1e-6)
    with pytest.raises(ValueError, match="expected a kvhoist_attach"):
        speculation.attach_body(moved[0])
    with pytest.raises(ValueError, match="match one for one"):
        speculation.rebuild_attach(att, [s_in], [s_var], jax.make_jaxpr(lambda w: w[:1])(w))
