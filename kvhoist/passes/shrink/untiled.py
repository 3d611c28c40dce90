"""Reading the untiled cache: a loop body's consumers rewritten to read the small value (:func:`read_untiled`).

Re-tiling the small value every iteration is a copy jit does not make. A ``dot_general`` batching over
the tiled axis batches over the small value with the copy axis free (:func:`batched_dot`); other work
that commutes gets small twins (:class:`~kvhoist.passes.shrink.twins.Shrinker`); a ``kvhoist_attach``
attaches the small values and a nested ``scan`` receives them, each rewritten the same way inside.
:func:`retiled_for` finds the operands some consumer still needs whole (then the tiled cache is kept).
"""

from __future__ import annotations

from typing import Sequence

from kvhoist import compat, speculation
from kvhoist.analysis import motion
from kvhoist.ir import is_var, live_eqns
from kvhoist.passes.shrink.tiling import (Tiling, expansion_eqns, free_dims, shape_of, split_axis, traced_eqns,
                                          unexpansion_eqns)
from kvhoist.passes.shrink.twins import Shrinker


def batched_dot(e, tiled: dict) -> list:
    """``dot_general`` of a tiled operand along a *batch* axis, rewritten to read the small value.

    ``dot(O, expand(small))`` with the tiled axis ``a`` batched against ``O``'s axis ``b`` (attention
    logits of every beam against its sequence's keys): ``O``'s axis ``b`` is split into (sequence, copy),
    the sequence part stays batched against ``small`` and the copy part becomes a free axis of ``O``;
    the result is transposed and reshaped back to the original layout. Same products and sums, without
    re-tiling ``small`` every iteration. Returns the equations, or ``[]`` when ``e`` is not such a dot.
    """
    from jax import lax

    if e.primitive.name != "dot_general" or len(e.outvars) != 1 or not is_var(e.outvars[0]):
        return []
    ts = [tiled.get(a) if is_var(a) else None for a in e.invars]
    if (ts[0] is None) == (ts[1] is None):
        return []
    f = 0 if ts[0] is not None else 1   # the tiled operand's side
    t = ts[f]
    (lc, rc), (lb, rb) = e.params["dimension_numbers"]
    contract, batch = (list(lc), list(rc)), (list(lb), list(rb))
    if t.axis not in batch[f]:
        return []
    pos = batch[f].index(t.axis)
    other = e.invars[1 - f]
    b = batch[1 - f][pos]
    o_shape = shape_of(other)
    n_small = shape_of(t.small)[t.axis]
    (s0, s1), small_first = split_axis(t, n_small)
    b_s, b_k = (b, b + 1) if small_first else (b + 1, b)
    o_new_shape = o_shape[:b] + (s0, s1) + o_shape[b + 1:]

    def shift(d):
        return d + 1 if d > b else d

    o_contract = [shift(d) for d in contract[1 - f]]
    o_batch = [b_s if d == b else shift(d) for d in batch[1 - f]]
    new_contract = [None, None]
    new_batch = [None, None]
    new_contract[f], new_batch[f] = contract[f], batch[f]
    new_contract[1 - f], new_batch[1 - f] = o_contract, o_batch
    dn = ((tuple(new_contract[0]), tuple(new_contract[1])), (tuple(new_batch[0]), tuple(new_batch[1])))
    # Where the copy axis lands in the new result: after the batch axes, among the other side's free axes.
    n_batch = len(lb)
    o_free = free_dims(len(o_new_shape), o_contract, o_batch)
    if f == 1:   # other is lhs: its free axes come first
        q = n_batch + o_free.index(b_k)
    else:
        f_free = free_dims(len(shape_of(e.invars[0])), contract[0], batch[0])
        q = n_batch + len(f_free) + o_free.index(b_k)
    out = e.outvars[0]
    out_shape = shape_of(out)
    new_out_shape = list(out_shape)
    new_out_shape[pos] = n_small
    new_out_shape.insert(q, t.k)
    # Move the copy axis next to the batch axis it came from, then merge the two.
    rest = [i for i in range(len(new_out_shape)) if i != q]
    at = rest.index(pos)
    perm = rest[:at] + ([pos, q] if small_first else [q, pos]) + rest[at + 1:]

    o_var = compat.new_var(compat.resize_aval(other.aval, o_new_shape))
    d_var = compat.new_var(compat.resize_aval(out.aval, tuple(new_out_shape)))
    eqns = traced_eqns(lambda x: lax.reshape(x, o_new_shape), [other], o_var)
    ins = [None, None]
    ins[f], ins[1 - f] = t.small, o_var
    eqns.append(e.replace(invars=ins, outvars=[d_var], params={**e.params, "dimension_numbers": dn}))
    eqns += traced_eqns(lambda x: lax.reshape(lax.transpose(x, perm), out_shape), [d_var], out)
    return eqns


def _attach_small(e, sh: "Shrinker") -> list:
    """A ``kvhoist_attach`` (:mod:`kvhoist.speculation`) of tiled values, attaching the small values instead.

    The attach stays the one place transformations see the moved work: its hidden body computes the full
    values as before and then takes their first copy, so the JVP it computes is the small value's. The full
    outputs are re-expanded after it (and consumers rewritten by :func:`read_untiled` read the small ones).
    """
    cv, c, b_in, b_out, b_eqns = compat.split_closed(speculation.attach_body(e))
    n = len(b_out)
    ts = [sh.tiled.get(a) if is_var(a) else None for a in e.invars[:n]]
    if not any(ts):
        return []
    ins, outs, b_out, b_eqns, after = list(e.invars), list(e.outvars), list(b_out), list(b_eqns), []
    for i, t in enumerate(ts):
        if t is None or not is_var(b_out[i]) or not is_var(outs[i]):
            continue
        small_out, small_b = compat.new_var(t.small.aval), compat.new_var(t.small.aval)
        b_eqns += unexpansion_eqns(b_out[i], t, small_b)
        b_out[i] = small_b
        ins[i] = t.small
        after += expansion_eqns(small_out, t, outs[i])
        sh.tiled[outs[i]] = Tiling(small_out, t.axis, t.k, t.mode, t.origin)
        sh.expanded[outs[i]] = t.origin
        outs[i] = small_out
    if not after:
        return []
    new_body = compat.make_closed(cv, c, b_in, b_out, b_eqns)
    return [speculation.rebuild_attach(e, ins[:n], outs, new_body)] + after


def _scan_small(e, sh: "Shrinker") -> list:
    """A ``scan`` reading tiled consts or xs (the layer scan reading the stacked cross K/V), given the small
    values instead: its body re-expands them at its top and its consumers are rewritten by
    :func:`read_untiled` (recursively)."""
    params = e.params
    if not compat.scan_params_supported(params):
        return []
    nc, nk = compat.scan_arity(params)
    constvars, consts, invars, outvars, beqns = compat.split_closed(params["jaxpr"])
    if constvars or consts:
        return []
    ops, new_invars, prologue, inner = list(e.invars), list(invars), [], {}
    for i, a in enumerate(e.invars):
        t = sh.tiled.get(a) if is_var(a) and not nc <= i < nc + nk else None
        if t is None or (i >= nc + nk and t.axis == 0):
            continue  # carries change; a tiled scanned axis is not a per-iteration tiling
        axis = t.axis if i < nc else t.axis - 1
        small_aval = t.small.aval if i < nc else compat.resize_aval(t.small.aval, shape_of(t.small)[1:])
        small_in = compat.new_var(small_aval)
        inner_t = Tiling(small_in, axis, t.k, t.mode, t.origin)
        prologue += expansion_eqns(small_in, inner_t, invars[i])
        sh.expanded[invars[i]] = t.origin
        inner[invars[i]] = inner_t
        new_invars[i], ops[i] = small_in, t.small
    if not inner:
        return []
    body = live_eqns(prologue + read_untiled(beqns, inner, sh.expanded), outvars,
                     keep=lambda x: not motion.may_move(x))
    new_body = compat.rebuild_like(params["jaxpr"], [], [], new_invars, outvars, body)
    return [e.replace(invars=ops, params={**params, "jaxpr": new_body})]


def read_untiled(eqns: Sequence, tiled: dict, expanded: dict) -> list:
    """A loop body whose inputs ``tiled`` (``{full var: Tiling}``) are expansions of small values, rewritten
    so that its consumers read the small values where they can.

    Work that treats the tiled axis independently is done on the small value and its result re-expanded
    (:class:`Shrinker`'s twins: transposes, reshapes, elementwise ops, dots where the axis is free); a
    ``dot_general`` batching over the tiled axis reads the small value directly (:func:`batched_dot`). The
    original definitions of the full values stay in front; XLA drops them where nothing reads them.
    """
    sh = Shrinker([], [])
    sh.tiled.update(tiled)
    sh.expanded = expanded
    out: list = []
    for e in eqns:
        if speculation.is_attach(e) or e.primitive.name == "scan":
            new = (_attach_small if speculation.is_attach(e) else _scan_small)(e, sh)
            if new:
                out.extend(new)
                continue
        if any(is_var(a) and sh.tiled.get(a) is not None for a in e.invars) and motion.may_move(e):
            new = batched_dot(e, sh.tiled)
            if not new and e.primitive.name in {"dot_general", "transpose", "reshape"} | motion.ELEMENTWISE:
                twins = sh.twin(e)
                if twins:
                    t = sh.tiled[e.outvars[0]]
                    new = twins + expansion_eqns(t.small, t, e.outvars[0])
                    expanded[e.outvars[0]] = t.origin
            if new:
                out.extend(new)
                continue
        out.append(e)
    return out


def retiled_for(eqns: Sequence, outvars: Sequence, expanded: dict) -> set:
    """Origins of the re-expanded values that something other than fusible work reads (recursively):
    a dot contracting the tiled axis, a loop carry, an opaque op. Fusible readers (elementwise and shape
    ops) take the expansion into their fusion for free; these would materialise a tiled copy."""
    bad = {expanded[v] for v in outvars if is_var(v) and v in expanded}

    def walk(eqns):
        for e in eqns:
            if e.primitive.name not in motion.FUSIBLE:
                bad.update(expanded[a] for a in e.invars if is_var(a) and a in expanded)
            for sub in compat.subjaxprs_of(e):
                sub_eqns = compat.split_closed(sub)[4]
                walk(sub_eqns)
                bad.update(expanded[v] for v in compat.split_closed(sub)[3] if is_var(v) and v in expanded)

    walk(eqns)
    return bad
