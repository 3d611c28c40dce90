"""Speculated work under JAX transformations: computed early for the primal, observed where it ran.

When kvhoist moves work out of a region that might not run — a ``cond`` branch, a ``while`` body
(:mod:`kvhoist.analysis.motion`, "speculation") — the *primal* value is computed unconditionally in
front of the region. Every transformation that observes computation must still see that work where it
originally ran, or a never-taken branch's ``sqrt(w)`` at ``w = 0`` poisons a gradient (its JVP computed
outside the branch gets a zero cotangent, and ``0 * inf = NaN`` in the transpose) and
``checkify`` reports a NaN that jit never produces. Two primitives carry this, nothing else does:

* ``kvhoist_speculate`` wraps each equation moved out of the region (``jaxpr`` param: that one
  equation). Evaluation and lowering evaluate it (XLA sees exactly the wrapped op); abstract eval: its
  outputs; **JVP: the primal call and symbolic-zero tangents** (no tangent is computed, so no
  ``0 * inf``); vmap: the vmapped equation, still wrapped; ``checkify``: evaluated without checks (no
  ``call_jaxpr`` param, so checkify binds it unchanged). Eager evaluation (``jax.disable_jit``, the
  debug_nans re-run) runs it with NaN/inf checks off: it is not the user's computation yet. It is
  speculatable when the wrapped equation is, so LICM moves it further out like any other.
* ``kvhoist_attach`` sits at the top of the region (each branch that uses the values, the ``while``
  body): ``attach(*s, *inputs)`` with a hidden ``body`` (the moved equations as a jaxpr of the region's
  own inputs) returns ``s`` — identity in the primal, lowered to nothing. **JVP: ``jax.jvp`` of the body
  at the region's inputs, there** (so the derivative is computed, and transposed, only when and as
  often as the region runs, exactly as under jit); ``checkify``: the body checked there (errors only
  when the region runs); vmap: the body vmapped. It may move out of a loop that surely runs, but is
  never speculated (it must not leave its branch or ``while`` body).

The body of ``attach`` is held in a :class:`Body` (a hashable holder, not a jaxpr param), so analyses
that walk sub-jaxprs (FLOP counts, the motion model, the verifier) see an identity, as XLA does.

Passes that change what a region receives (the smallest cache, :mod:`kvhoist.passes.shrink`) go through
:func:`is_attach`, :func:`attach_body` and :func:`rebuild_attach`, never the primitive's params.

Example:
    >>> eqns = [wrap(e) for e in hoisted]                       # in front of the region
    >>> c_in, att = attach_eqn(hoisted, used_invars, crossing)   # at the top of the region
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
from jax.interpreters import ad, batching, mlir

from kvhoist import compat

speculate_p = compat.Primitive("kvhoist_speculate")
speculate_p.multiple_results = True
attach_p = compat.Primitive("kvhoist_attach")
attach_p.multiple_results = True


class Body:
    """The moved equations an ``attach`` recomputes for transformations (a closed jaxpr), hidden from
    sub-jaxpr walkers. Hashed and compared by identity, like jaxprs in params."""

    __slots__ = ("jaxpr",)

    def __init__(self, jaxpr: Any):
        self.jaxpr = jaxpr

    def __repr__(self) -> str:
        eqns = compat.split_closed(self.jaxpr)[4]
        names = sorted({e.primitive.name for e in eqns})
        return f"<{len(eqns)} moved eqn(s): {', '.join(names[:4])}{', ...' if len(names) > 4 else ''}>"


# -- building equations (the rules call these) ---------------------------------------------------------

def wrap(eqn: Any) -> Any:
    """``eqn`` as a ``kvhoist_speculate`` equation: same inputs, outputs, source info and value."""
    if eqn.primitive is speculate_p:
        return eqn
    ins = [compat.new_var(a.aval) for a in eqn.invars if _is_var(a)]
    it = iter(ins)
    inner_in = [next(it) if _is_var(a) else a for a in eqn.invars]
    inner_out = [compat.new_var(v.aval) for v in eqn.outvars]
    inner = eqn.replace(invars=inner_in, outvars=inner_out)
    jaxpr = compat.make_closed([], [], ins, inner_out, [inner])
    return eqn.replace(invars=[a for a in eqn.invars if _is_var(a)], primitive=speculate_p,
                       params={"jaxpr": jaxpr}, effects=compat.join_effects([]))


def unwrap(eqn: Any) -> Any:
    """The equation a ``kvhoist_speculate`` equation wraps, on its outer variables (for reports);
    any other equation unchanged."""
    if eqn.primitive is not speculate_p:
        return eqn
    _cv, _c, ins, outs, eqns = compat.split_closed(eqn.params["jaxpr"])
    if len(eqns) != 1:
        return eqn
    sub = dict(zip(ins, eqn.invars))
    inner = eqns[0]
    if list(inner.outvars) != list(outs):
        return eqn
    return inner.replace(invars=[sub.get(a, a) if _is_var(a) else a for a in inner.invars],
                         outvars=list(eqn.outvars))


def attach_eqn(moved: Sequence, inputs: Sequence, outputs: Sequence) -> tuple[list, Any]:
    """``(new_inputs, eqn)``: the region receives ``new_inputs`` (fresh variables, one per output) in
    place of ``outputs`` and starts with ``eqn``, which defines ``outputs`` from them.

    Args:
      moved: the equations moved out of the region, in order, reading only ``inputs`` and each other.
      inputs: the region's own inputs they read (they stay inputs of the region).
      outputs: the moved values the region still reads.
    """
    from kvhoist.ir import clone_eqns

    fresh_in = [compat.new_var(v.aval) for v in inputs]
    copies, sub = clone_eqns(moved, dict(zip(inputs, fresh_in)))
    body = compat.make_closed([], [], fresh_in, [sub.get(v, v) for v in outputs], copies)
    new_inputs = [compat.new_var(v.aval) for v in outputs]
    eqn = compat.new_jaxpr_eqn([*new_inputs, *inputs], list(outputs), attach_p, {"body": Body(body)},
                               compat.join_effects([]))
    return new_inputs, eqn


def is_attach(eqn: Any) -> bool:
    """Whether ``eqn`` is a ``kvhoist_attach`` (built by :func:`attach_eqn`)."""
    return eqn.primitive is attach_p


def attach_body(eqn: Any) -> Any:
    """The moved work a ``kvhoist_attach`` recomputes for transformations, as a closed jaxpr.

    It reads the region's inputs (``eqn.invars[n:]``) and returns one value per attached value
    (``eqn.invars[:n]``, ``n = len(eqn.outvars)``), of the same type.

    Raises:
      ValueError: ``eqn`` is not a ``kvhoist_attach``.
    """
    _require_attach(eqn)
    return eqn.params["body"].jaxpr


def rebuild_attach(eqn: Any, values: Sequence, outputs: Sequence, body: Any) -> Any:
    """``eqn`` (a ``kvhoist_attach``) attaching ``values`` as ``outputs``, recomputing ``body`` for
    transformations; the region's inputs it reads stay those of ``eqn``.

    For a pass that changes what the region receives (the smallest cache passes a smaller value in place
    of a tiled one): the primal still forwards ``values``, and the JVP / checkify / vmap of the region
    still see the moved work, now ``body``.

    Args:
      eqn: the ``kvhoist_attach`` equation to rebuild.
      values: the new attached values (one per output).
      outputs: the variables they define in the region.
      body: a closed jaxpr of the region's inputs returning one value per attached value, each of its type
        (from :func:`attach_body`, changed).
    Returns:
      The new equation (same source info and region inputs).
    Raises:
      ValueError: ``eqn`` is not an attach, or ``values`` / ``outputs`` / ``body`` do not match.

    Example:
        >>> body = attach_body(eqn)                       # edit its outputs, e.g. take a slice of each
        >>> new = rebuild_attach(eqn, small_values, small_outputs, new_body)
    """
    _require_attach(eqn)
    inputs = list(eqn.invars[len(eqn.outvars):])
    want = [_type(v.aval) for v in values]
    got = [_type(a) for a in compat.out_avals(body)]
    if len(values) != len(outputs) or want != got:
        raise ValueError(f"rebuild_attach: {len(values)} value(s), {len(outputs)} output(s) and a body returning "
                         f"{len(got)} must match one for one in type ({want} vs {got})")
    if len(compat.split_closed(body)[2]) != len(inputs):
        raise ValueError(f"rebuild_attach: the body must read the region's {len(inputs)} input(s)")
    return eqn.replace(invars=[*values, *inputs], outvars=list(outputs), params={**eqn.params, "body": Body(body)})


def _type(aval: Any) -> tuple:
    return tuple(getattr(aval, "shape", ())), str(getattr(aval, "dtype", aval))


def _require_attach(eqn: Any) -> None:
    if not is_attach(eqn):
        raise ValueError(f"expected a kvhoist_attach equation, got `{eqn.primitive.name}`")


def primal(j: Any) -> Any:
    """``j`` without kvhoist_speculate / kvhoist_attach (each speculated equation inlined, each attach's
    outputs replaced by its inputs): the same primal program, as a reader (or a structural test) sees it."""
    from kvhoist.rules.common import map_subjaxprs

    constvars, consts, invars, outvars, eqns = compat.split_closed(j)
    subst: dict = {}
    out = []
    for e in eqns:
        e = e.replace(invars=[subst.get(a, a) if _is_var(a) else a for a in e.invars])
        if e.primitive is attach_p:
            subst.update(zip(e.outvars, e.invars[:len(e.outvars)]))
            continue
        e = unwrap(e)
        out.append(map_subjaxprs(e, primal) if compat.subjaxprs_of(e) else e)
    outvars = [subst.get(a, a) if _is_var(a) else a for a in outvars]
    return compat.rebuild_like(j, constvars, consts, invars, outvars, out)


def _is_var(a: Any) -> bool:
    return not compat.is_literal(a)


# -- kvhoist_speculate ----------------------------------------------------------------------------------

def _speculate_impl(*args, jaxpr):
    # Eager (disable_jit, the debug_nans re-run): speculated work is not the user's yet, so it must
    # not trip NaN/inf checks.
    with jax.debug_nans(False), jax.debug_infs(False):
        return compat.jaxpr_as_fun(jaxpr)(*args)


def _speculate_abstract_eval(*avals, jaxpr):
    return list(compat.out_avals(jaxpr))


def _speculate_jvp(primals, tangents, *, jaxpr):
    del tangents
    out = speculate_p.bind(*primals, jaxpr=jaxpr)
    return out, [ad.Zero(compat.tangent_aval(a)) for a in compat.out_avals(jaxpr)]


def _speculate_batch(args, dims, *, jaxpr):
    batched = compat.vmap_closed(jaxpr, args, dims)
    return speculate_p.bind(*args, jaxpr=batched), [0] * len(compat.out_avals(batched))


speculate_p.def_impl(_speculate_impl)
speculate_p.def_abstract_eval(_speculate_abstract_eval)
ad.primitive_jvps[speculate_p] = _speculate_jvp
batching.primitive_batchers[speculate_p] = _speculate_batch
mlir.register_lowering(speculate_p, mlir.lower_fun(
    lambda *args, jaxpr: compat.jaxpr_as_fun(jaxpr)(*args), multiple_results=True))


# -- kvhoist_attach -------------------------------------------------------------------------------------

def _n_out(body: Body) -> int:
    return len(compat.out_avals(body.jaxpr))


def _attach_impl(*args, body):
    return list(args[:_n_out(body)])


def _attach_abstract_eval(*avals, body):
    return list(avals[:_n_out(body)])


def _attach_jvp(primals, tangents, *, body):
    """Primal: ``attach`` again (an outer transformation sees it too); tangent: the moved work's JVP at
    the region's inputs, computed here. Inputs with symbolic-zero tangents stay constants (no ``0 * inf``)."""
    n = _n_out(body)
    out = attach_p.bind(*primals, body=body)
    ins, dins = primals[n:], tangents[n:]
    live = [type(t) is not ad.Zero for t in dins]
    if not any(live):
        return out, [ad.Zero(compat.tangent_aval(a)) for a in compat.out_avals(body.jaxpr)]
    fun = compat.jaxpr_as_fun(body.jaxpr)

    def moved(*live_ins):
        it = iter(live_ins)
        return list(fun(*[next(it) if m else x for x, m in zip(ins, live)]))

    _, t_out = jax.jvp(moved, [x for x, m in zip(ins, live) if m], [t for t, m in zip(dins, live) if m])
    return out, list(t_out)


def _attach_batch(args, dims, *, body):
    n = _n_out(body)
    size = next(x.shape[d] for x, d in zip(args, dims) if d is not None)
    import jax.numpy as jnp

    s = [jnp.broadcast_to(x, (size, *x.shape)) if d is None else jnp.moveaxis(x, d, 0)
         for x, d in zip(args[:n], dims[:n])]
    batched = compat.vmap_closed(body.jaxpr, args[n:], dims[n:], size=size)
    return attach_p.bind(*s, *args[n:], body=Body(batched)), [0] * n


def _attach_checkify(check_jaxpr, error, enabled_errors, *args, body):
    n = _n_out(body)
    error, _ = check_jaxpr(body.jaxpr, enabled_errors, error, *args[n:])
    return error, list(args[:n])


attach_p.def_impl(_attach_impl)
attach_p.def_abstract_eval(_attach_abstract_eval)
ad.primitive_jvps[attach_p] = _attach_jvp
batching.primitive_batchers[attach_p] = _attach_batch
compat.register_checkify_rule(attach_p, _attach_checkify)
mlir.register_lowering(attach_p, lambda ctx, *args, body: list(args[:_n_out(body)]))
