"""Helpers for kvhoist pass tests: run a function before/after a pass and inspect jaxpr structure."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kvhoist import compat, licm


def flat_args(*args):
    return jax.tree_util.tree_leaves(args)


def run_closed(closed, *args):
    return compat.jaxpr_as_fun(closed)(*flat_args(*args))


def licm_and_compare(fun, *args, rtol=1e-5, atol=1e-5, **licm_kwargs):
    """Trace ``fun``, run LICM, check the outputs agree; return (before, after, report)."""
    before = jax.make_jaxpr(fun)(*args)
    after, report = licm(before, **licm_kwargs)
    compat.check(after)
    ref = run_closed(before, *args)
    out = run_closed(after, *args)
    assert len(ref) == len(out)
    for r, o in zip(ref, out):
        np.testing.assert_allclose(np.asarray(o), np.asarray(r), rtol=rtol, atol=atol)
    return before, after, report


def eqns_of(j):
    return compat.split_closed(j)[4]


def find_eqns(j, name):
    """Top-level equations of primitive ``name``."""
    return [e for e in eqns_of(j) if e.primitive.name == name]


def body_of(eqn):
    """The body jaxpr of a loop equation (scan: jaxpr; while: body_jaxpr)."""
    if eqn.primitive.name == "scan":
        return eqn.params["jaxpr"]
    if eqn.primitive.name == "while":
        return eqn.params["body_jaxpr"]
    raise ValueError(eqn.primitive.name)


def count(j, name, *, multiply_trips=False):
    from kvhoist.analysis.cost import count_primitives

    return count_primitives(j, name, multiply_trips=multiply_trips)


def direct_count(j, name):
    """Equations of primitive ``name`` directly in ``j`` (not in sub-jaxprs)."""
    return sum(1 for e in eqns_of(j) if e.primitive.name == name)


def rand(*shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)
