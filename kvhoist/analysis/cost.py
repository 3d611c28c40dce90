"""A FLOP and byte cost model for jaxpr equations.

The numbers rank hoisting candidates and fill reports; they count multiply-adds as two FLOPs for
``dot_general`` and ``conv_general_dilated``, one FLOP per output element for elementwise work,
and recurse through higher-order primitives (a ``scan`` costs ``length`` bodies, a ``cond`` its most
expensive branch, a ``while`` one body per iteration — its trip count is unknown statically).

Per-run totals (:func:`jaxpr_flops_run`) keep the two kinds of work apart: work whose number of executions
is known statically (scan trip counts multiplied) is counted per run; work inside a loop whose trip count
is unknown (a ``while``) is counted per iteration of that loop, never mixed into the per-run figure. Both
sides of a rewrite are counted the same way, so work hoisted out of a ``while`` shows up as what it is: the
per-iteration figure drops and the per-run figure grows by one execution of the hoisted work.
"""

from __future__ import annotations

import math
from typing import Any

from kvhoist import compat
from kvhoist.ir import aval_bytes

#: Primitives that only move, view or re-type data. They are never hoisted on their own, only as
#: part of a hoisted expensive computation (hoisting a broadcast would just cache a bigger array).
SHAPE_ONLY = frozenset({
    "broadcast_in_dim", "reshape", "squeeze", "expand_dims", "transpose", "convert_element_type",
    "iota", "slice", "dynamic_slice", "concatenate", "pad", "copy", "copy_p", "rev",
    "bitcast_convert_type", "device_put", "sharding_constraint", "reduce_precision",
    "gather", "select_n", "stop_gradient", "split", "name",
    "kvhoist_attach",   # identity in the primal (kvhoist.speculation): lowered to nothing
})


def _prod(xs) -> int:
    return int(math.prod(int(x) for x in xs))


def _size(aval: Any) -> int:
    return _prod(getattr(aval, "shape", ()))


def dot_general_flops(eqn) -> int:
    (lc, rc), (lb, _rb) = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    rhs = eqn.invars[1].aval.shape
    contract = _prod(lhs[d] for d in lc)
    out = _size(eqn.outvars[0].aval)
    del rhs, lb
    return 2 * out * contract


def conv_flops(eqn) -> int:
    rhs = eqn.invars[1].aval.shape
    dn = eqn.params.get("dimension_numbers")
    out = _size(eqn.outvars[0].aval)
    # rhs spec: (out feature, in feature, spatial...); per output element: in_features/groups * window.
    try:
        rhs_spec = dn.rhs_spec
        in_feat = rhs[rhs_spec[1]]
        window = _prod(rhs[d] for d in rhs_spec[2:])
    except Exception:
        in_feat, window = rhs[1], _prod(rhs[2:])
    return 2 * out * in_feat * window


def eqn_flops(eqn) -> int:
    """Estimated FLOPs of one execution of ``eqn`` (sub-jaxprs included)."""
    name = eqn.primitive.name
    if name == "dot_general":
        return dot_general_flops(eqn)
    if name == "conv_general_dilated":
        return conv_flops(eqn)
    if name == "kvhoist_attention":
        from kvhoist.kernels import attention_flops

        return attention_flops(eqn.params, eqn.invars[0].aval.shape, eqn.invars[2].aval.shape)
    if name == "scan":
        return int(eqn.params["length"]) * jaxpr_flops(eqn.params["jaxpr"])
    if name == "while":
        return jaxpr_flops(eqn.params["body_jaxpr"]) + jaxpr_flops(eqn.params["cond_jaxpr"])
    if name == "cond":
        return max((jaxpr_flops(b) for b in eqn.params["branches"]), default=0)
    subs = compat.subjaxprs_of(eqn)
    if subs:
        return sum(jaxpr_flops(j) for j in subs[:1])
    if name in SHAPE_ONLY:
        return 0
    if name.startswith("reduce_") or name in ("argmax", "argmin", "cumsum", "cumprod", "cummax"):
        return sum(_size(a.aval) for a in eqn.invars if hasattr(a, "aval"))
    return sum(_size(v.aval) for v in eqn.outvars)


def jaxpr_flops(j: Any) -> int:
    """FLOPs of one evaluation of a (closed or open) jaxpr."""
    _cv, _c, _iv, _ov, eqns = compat.split_closed(j)
    return sum(eqn_flops(e) for e in eqns)


def count_primitives(j: Any, name: str, *, multiply_trips: bool = False) -> int:
    """How many ``name`` equations a jaxpr holds (recursively); with ``multiply_trips`` how many run."""
    _cv, _c, _iv, _ov, eqns = compat.split_closed(j)
    n = 0
    for e in eqns:
        if e.primitive.name == name:
            n += 1
        subs = compat.subjaxprs_of(e)
        if not subs:
            continue
        mult = int(e.params["length"]) if (multiply_trips and e.primitive.name == "scan") else 1
        if e.primitive.name == "cond":
            n += max(count_primitives(b, name, multiply_trips=multiply_trips) for b in subs)
        else:
            n += mult * sum(count_primitives(s, name, multiply_trips=multiply_trips) for s in subs)
    return n


def out_bytes(eqn) -> int:
    return sum(aval_bytes(v.aval) for v in eqn.outvars)


def is_shape_only(eqn) -> bool:
    """Shape-only ops, and calls (``jit`` of ``jnp.pad``, say) whose bodies are all shape-only."""
    name = eqn.primitive.name
    if name in SHAPE_ONLY:
        return True
    if name in ("jit", "pjit", "closed_call", "remat2", "custom_jvp_call"):
        subs = compat.subjaxprs_of(eqn)
        return bool(subs) and all(is_shape_only(e) for e in compat.split_closed(subs[0])[4])
    return False


#: Primitives worth counting in reports (kvhoist_attention: kvhoist.kernels' attention, two matmuls).
COUNTED = ("dot_general", "conv_general_dilated", "kvhoist_attention")


def primitive_counts(eqn) -> dict:
    """How many dot_general / conv / attention equations one execution of ``eqn`` runs (loops multiplied)."""
    name = eqn.primitive.name
    if name in COUNTED:
        return {name: 1}
    subs = compat.subjaxprs_of(eqn)
    if not subs:
        return {}
    mult = int(eqn.params["length"]) if name == "scan" else 1
    out: dict = {}
    chosen = subs
    if name == "cond":
        chosen = [max(subs, key=jaxpr_flops)]
    elif name not in ("scan", "while"):
        chosen = subs[:1]
    for s in chosen:
        for e in compat.split_closed(s)[4]:
            for k, v in primitive_counts(e).items():
                out[k] = out.get(k, 0) + mult * v
    return out


class RunFlops(int):
    """FLOPs of one run of a program: an ``int`` (the work whose number of executions is known statically)
    that also carries :attr:`per_iteration`, the FLOPs of one iteration of every loop with an unknown trip
    count (``while`` bodies and conditions, multiplied by the known trip counts of loops around them; a
    ``while`` nested in another counts one iteration of each).

    It is an ``int`` so that code reading a total as a number keeps working; arithmetic on it returns plain
    ``int`` s of the per-run part.
    """

    per_iteration: int

    def __new__(cls, per_run: int = 0, per_iteration: int = 0) -> "RunFlops":
        obj = super().__new__(cls, per_run)
        obj.per_iteration = int(per_iteration)
        return obj

    def __reduce__(self):
        return (RunFlops, (int(self), self.per_iteration))

    def __repr__(self) -> str:
        return f"RunFlops(per_run={int(self)}, per_iteration={self.per_iteration})"

    @property
    def per_run(self) -> int:
        return int(self)


def jaxpr_flops_run(j: Any, leaf_flops=None) -> RunFlops:
    """FLOPs of one run of a program, split into per-run and per-unknown-iteration work (:class:`RunFlops`).

    Static trip counts are multiplied; a ``cond`` counts its most expensive branch (each part separately);
    a ``while`` body (and its condition) goes to ``per_iteration``, its trip count being unknown.

    Args:
      j: a closed or open jaxpr.
      leaf_flops: ``eqn -> FLOPs`` for equations without sub-jaxprs (default :func:`eqn_flops`); e.g. a
        filter counting only some matmuls.
    """
    leaf = leaf_flops or eqn_flops
    run = it = 0
    for e in compat.split_closed(j)[4]:
        name = e.primitive.name
        subs = compat.subjaxprs_of(e)
        if not subs:
            run += leaf(e)
            continue
        if name == "scan":
            inner = jaxpr_flops_run(e.params["jaxpr"], leaf)
            n = int(e.params["length"])
            run, it = run + n * inner.per_run, it + n * inner.per_iteration
        elif name == "while":
            for s in (e.params["body_jaxpr"], e.params["cond_jaxpr"]):
                inner = jaxpr_flops_run(s, leaf)
                it += inner.per_run + inner.per_iteration
        elif name == "cond":
            parts = [jaxpr_flops_run(b, leaf) for b in subs]
            run += max(p.per_run for p in parts)
            it += max(p.per_iteration for p in parts)
        else:  # a call (jit, remat, custom_jvp, ...): its body once, as eqn_flops does
            inner = jaxpr_flops_run(subs[0], leaf)
            run, it = run + inner.per_run, it + inner.per_iteration
    return RunFlops(run, it)
