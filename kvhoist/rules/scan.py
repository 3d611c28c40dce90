"""``scan``: hoist invariant work out of the body; fission a nested scan.

*Hoisting* (``optimize``): consts are invariant, xs vary, a carry is invariant when the body passes
it through unchanged. The body's loops are optimised first (innermost first); then the invariant
part is moved in front of the scan and its results become new consts.

*Fission* (``split``): the scan sits inside the body of an outer loop and some operands are
invariant with respect to that outer loop — Wan's layer scan inside the step loop: the layer weights
(xs) and the text context (a const) do not change between steps. Work in the layer body that depends
only on such values (the cross-attention K/V projections) differs per layer but not per step. The
split produces two scans of the same length and direction:

* ``scan_A`` computes that work for every layer and returns it stacked (``[L, ...]``); its operands
  are all outer-invariant, so the outer loop's LICM then hoists it out entirely;
* ``scan_B`` is the original scan minus that work, reading the stacked results as extra xs.

Carries of the nested scan that are outer-invariant (a layer counter) are found by a fixpoint
(:func:`kvhoist.analysis.invariance.outer_invariant_carries`); ``scan_A`` updates its own copies.
"""

from __future__ import annotations

import dataclasses

from kvhoist import compat
from kvhoist.analysis import branches, cost, motion
from kvhoist.analysis.invariance import carry_closure, outer_invariant_carries, passthrough_carries
from kvhoist.ir import Block, aval_bytes, clone_eqns, is_var, live_eqns, live_indices, producers, used_vars
from kvhoist.report import human_bytes
from kvhoist.rules.base import LoopInfo, Split


def _loop_info(eqn, kind, trips):

    return LoopInfo(kind, trips, compat.source_line(eqn))


def prune_scan(eqn):
    """Drop consts and xs the body no longer reads (e.g. K/V weights after their projection left)."""
    params = eqn.params
    nc, nk = compat.scan_arity(params)
    _cv, _c, invars, outvars, eqns = compat.split_closed(params["jaxpr"])
    used = used_vars(eqns, outvars)
    keep = [i for i, v in enumerate(invars) if (nc <= i < nc + nk) or v in used]
    if len(keep) == len(invars):
        return eqn
    new_nc = sum(1 for i in keep if i < nc)
    new_nx = sum(1 for i in keep if i >= nc + nk)
    body = Block([invars[i] for i in keep], outvars, eqns)
    new_params = compat.scan_params(params, jaxpr=body.to_closed(), num_consts=new_nc, num_carry=nk,
                                    num_xs=new_nx, num_ys=len(eqn.outvars) - nk)
    return eqn.replace(invars=[eqn.invars[i] for i in keep], params=new_params)


class ScanRule:
    def optimize(self, eqn, engine):
        params = eqn.params
        body = Block.from_jaxpr(params["jaxpr"])
        if body is None or not compat.scan_params_supported(params):
            engine.note("opaque", f"scan at {compat.source_line(eqn)} left alone: its body closes over "
                        "constants or uses structured (mutable) operands")
            return [eqn]
        nc, nk = compat.scan_arity(params)
        nx = len(eqn.invars) - nc - nk
        ny = len(eqn.outvars) - nk
        length = int(params["length"])
        if length == 0:
            return [eqn]  # its body never runs: anything moved out of it would only add work
        engine.bind_known(body.invars[:nc], eqn.invars[:nc])
        with engine.in_loop(_loop_info(eqn, "scan", length)) as info:
            body = engine.optimize_block(body)
            info.surely_flops = motion.surely_run_flops(body.eqns)
            for be in body.eqns:
                if be.primitive.name == "cond":
                    try:
                        runs = branches.branch_runs(body, nc, nk, length, bool(params["reverse"]), be,
                                                    lambda i: engine.value_of(eqn.invars[i]))
                    except Exception:  # counting is best effort: the report keeps its upper bound
                        runs = None
                    if runs is not None:
                        engine.branch_runs[id(be)] = (be, runs)
            through = passthrough_carries(body, nc, nk)
            inv_invars = body.invars[:nc] + [body.invars[nc + k] for k in range(nk) if through[k]]
            ext = engine.extract(body, inv_invars, charge=True)
        if ext.empty:
            new_params = compat.scan_params(params, jaxpr=body.to_closed(), num_consts=nc,
                                            num_carry=nk, num_xs=nx, num_ys=ny)
            return [eqn.replace(params=new_params)]
        outer_of = dict(zip(body.invars[:nc], eqn.invars[:nc]))
        outer_of.update({body.invars[nc + k]: eqn.invars[nc + k] for k in range(nk) if through[k]})
        pre, sub = clone_eqns(ext.hoisted, outer_of)
        new_body = Block(body.invars[:nc] + ext.crossing + body.invars[nc:], body.outvars, ext.residual)
        new_params = compat.scan_params(params, jaxpr=new_body.to_closed(), num_consts=nc + len(ext.crossing),
                                        num_carry=nk, num_xs=nx, num_ys=ny)
        new_eqn = eqn.replace(invars=list(eqn.invars[:nc]) + [sub[v] for v in ext.crossing]
                              + list(eqn.invars[nc:]), params=new_params)
        pre, new_eqn = engine.shrink(pre, new_eqn, nc, len(ext.crossing))
        return pre + [prune_scan(new_eqn)]

    def split(self, eqn, mask, engine):

        params = eqn.params
        body = Block.from_jaxpr(params["jaxpr"])
        if body is None or not compat.scan_params_supported(params):
            return None
        nc, nk = compat.scan_arity(params)
        nx = len(eqn.invars) - nc - nk
        ny = len(eqn.outvars) - nk
        length = int(params["length"])
        consts_b, carry_b, xs_b = body.invars[:nc], body.invars[nc:nc + nk], body.invars[nc + nk:]
        carry_out = body.outvars[:nk]
        inv_in = {v for v, m in zip(consts_b, mask[:nc]) if m}
        inv_in |= {v for v, m in zip(xs_b, mask[nc + nk:]) if m}
        cinv = outer_invariant_carries(body, inv_in, carry_b, carry_out, mask[nc:nc + nk],
                                       lambda e: motion.can_move(e, engine.speculating))
        inv_carries = [k for k in range(nk) if cinv[k]]
        inv_all = inv_in | {carry_b[k] for k in inv_carries}
        ext = engine.extract(body, [v for v in body.invars if v in inv_all],
                             carry_pairs=[(carry_b[k], carry_out[k]) for k in inv_carries])
        if ext.empty:
            return None
        ext = _views_stay(ext, carry_out)
        ext = _counters_stay(ext, [(carry_b[k], carry_out[k]) for k in inv_carries],
                             {carry_b[k] for k in inv_carries if not is_var(eqn.invars[nc + k])})
        if ext.empty or not ext.crossing:
            return None
        pairs = [(carry_b[k], carry_out[k]) for k in inv_carries]
        read = carry_closure({a for e in ext.hoisted for a in e.invars if is_var(a)}, pairs)
        a_carries = [k for k in inv_carries if carry_b[k] in read]
        a_carry_outs = [carry_out[k] for k in a_carries]
        # scan_A's body may also return an invariant input directly (a carry set to a const).
        direct = {a for a in a_carry_outs if is_var(a) and a in set(body.invars)}
        a_consts = [k for k, v in enumerate(consts_b) if v in read or v in direct]
        a_xs = [k for k, v in enumerate(xs_b) if v in read or v in direct]
        a_body = Block([consts_b[k] for k in a_consts] + [carry_b[k] for k in a_carries]
                       + [xs_b[k] for k in a_xs],
                       list(a_carry_outs) + list(ext.crossing), ext.hoisted)
        # scan_A reuses the body's variables in a new scope; clone so no var is bound twice anywhere.
        a_eqns, a_sub = clone_eqns(a_body.eqns, {})
        a_body = Block(a_body.invars, [a_sub.get(v, v) if is_var(v) else v for v in a_body.outvars], a_eqns)
        stacked = [compat.new_var(compat.stacked_aval(v.aval, length)) for v in ext.crossing]
        a_operands = ([eqn.invars[k] for k in a_consts] + [eqn.invars[nc + k] for k in a_carries]
                      + [eqn.invars[nc + nk + k] for k in a_xs])
        pre, fallback = None, ""
        counters = _inductions(ext.hoisted, [(carry_b[k], carry_out[k], eqn.invars[nc + k]) for k in a_carries])
        # Counter-only work (consts and induction variables, no xs) needs no loop at all: computed for every
        # iteration at once over the counters' values (start + step * iota), one extra loop fewer per level.
        vectorise = (engine.fission == "vmap" and not a_carries) or (counters is not None and a_carries and not a_xs)
        if vectorise:
            pre = _vmapped(a_body, len(a_consts), a_operands, length, counters=counters if a_carries else None,
                           reverse=bool(params["reverse"]))
            if pre is not None:
                widest = _widest_intermediate(pre[0], pre[1])
                cache = sum(aval_bytes(v.aval) for v in pre[1])
                loop = engine.loops[-1] if engine.loops else None
                flops = sum(cost.eqn_flops(e) for e in pre[0])
                reason = motion.why_not_pays(loop.trip_count if loop else None, flops, peak_bytes=widest,
                                             cache_bytes=cache, loop_free=bool(a_carries))
                if reason is not None:
                    # The motion model's "pays" (one predicate for every form): e.g. every layer's intermediate
                    # at once would outgrow the cache it computes; the scan form holds one layer's at a time.
                    form = "fission='vmap'" if engine.fission == "vmap" else "vectorising its counters"
                    fallback = (f"; {form} fell back to a scan: vectorised over all {length} iterations, "
                                + (f"an intermediate would take {human_bytes(widest)}, more than the "
                                   f"{human_bytes(cache)} cached" if "more than" in reason else reason))
                    pre = None
                else:
                    pre, stacked = pre
        a_params = compat.scan_params(params, jaxpr=a_body.to_closed(), num_consts=len(a_consts),
                                      num_carry=len(a_carries), num_xs=len(a_xs), num_ys=len(ext.crossing))
        if pre is None:
            pre = [eqn.replace(invars=a_operands,
                               outvars=[compat.drop_var(carry_b[k].aval) for k in a_carries] + stacked,
                               params=a_params, effects=compat.join_effects(a_eqns))]
        b_body = Block(body.invars + list(ext.crossing), body.outvars, ext.residual)
        b_params = compat.scan_params(params, jaxpr=b_body.to_closed(), num_consts=nc, num_carry=nk,
                                      num_xs=nx + len(ext.crossing), num_ys=ny)
        b_eqn = prune_scan(eqn.replace(invars=list(eqn.invars) + stacked, params=b_params))
        nbytes = sum(aval_bytes(v.aval) for v in stacked)
        return Split(pre, [b_eqn], "fission",
                     f"fissioned scan(length={length}) at {compat.source_line(eqn)}: "
                     f"{len(ext.hoisted)} equation(s) per iteration moved to a separate scan "
                     f"producing {len(stacked)} stacked value(s), {human_bytes(nbytes)}{fallback}", nbytes,
                     ext.kinds)


def _widest_intermediate(eqns: list, outs: list) -> int:
    """Bytes of the largest value ``eqns`` compute that is not one of ``outs`` (0 if none)."""
    out_set = set(outs)
    return max((aval_bytes(v.aval) for e in eqns for v in e.outvars if is_var(v) and v not in out_set),
               default=0)


_VIEWS = ("transpose", "reshape", "squeeze", "expand_dims")


def _views_stay(ext, carry_out):
    """``ext`` without stacking views of values it already stacks.

    A value the fissioned scan would stack that is only a transpose / reshape of another stacked value (``k`` and
    ``k.T`` of one projection) is recomputed from it in ``scan_B`` instead: the cache holds the projection once,
    as the flat-loop ``views`` rewrite of :mod:`kvhoist.passes.shrink` does. The view is a copy per iteration,
    which jit pays too.
    """
    prod = producers(ext.hoisted)
    crossing = set(ext.crossing)
    moved: list = []             # view equations re-done in scan_B, in order
    for v in ext.crossing:
        chain, cur = [], v
        while cur in prod and ext.hoisted[prod[cur]].primitive.name in _VIEWS:
            e = ext.hoisted[prod[cur]]
            if len(e.invars) != 1 or not is_var(e.invars[0]):
                break
            chain.append(e)
            cur = e.invars[0]
            if cur in crossing:
                break
        if chain and cur in crossing and cur is not v:
            moved.extend(e for e in reversed(chain) if all(e is not m for m in moved))
    if not moved:
        return ext
    out_vars = {o for e in moved for o in e.outvars}
    keep = [v for v in ext.crossing if v not in out_vars]
    residual = [e for e in moved] + list(ext.residual)
    hoisted = live_eqns(ext.hoisted, keep + [v for v in carry_out if is_var(v)])
    return dataclasses.replace(ext, hoisted=hoisted, residual=residual, crossing=keep,
                               via={v: ext.via[v] for v in keep if v in ext.via})


def _counters_stay(ext, pairs: list, literal_carries: set):
    """``ext`` without stacking constants of the nest: values computed from literals and ``literal_carries``
    alone (the loop counter of a ``fori_loop``, ``i + 1`` from ``i = 0``: an iota). Stacking one saves an
    integer add per iteration and costs a buffer and a separate scan; ``scan_B`` computes it as before
    (:func:`kvhoist.analysis.motion.reads_inputs`: a constant is never cached)."""
    if not literal_carries:
        return ext
    prod = producers(ext.hoisted)
    consts = frozenset(literal_carries)
    stay = [v for v in ext.crossing if not motion.reads_inputs(v, ext.hoisted, prod, consts)]
    if not stay:
        return ext
    keep = [v for v in ext.crossing if all(v is not s for s in stay)]
    chain = [ext.hoisted[k] for k in sorted(live_indices(ext.hoisted, stay))]
    # What still moves: the work behind the other values, and the carries it reads (updated in scan_A too).
    roots: list = list(keep)
    while True:
        live = live_eqns(ext.hoisted, roots)
        read = carry_closure({a for e in live for a in e.invars if is_var(a)}, pairs)
        more = [cout for cin, cout in pairs if cin in read and is_var(cout) and all(cout is not r for r in roots)]
        if not more:
            break
        roots.extend(more)
    return dataclasses.replace(ext, hoisted=live if keep else [], residual=chain + list(ext.residual),
                               crossing=keep, via={v: ext.via[v] for v in keep if v in ext.via})


def _inductions(eqns: list, carries: list):
    """``[(start, step)]`` per carry if every carry is an integer scalar induction variable, else ``None``.

    ``carries``: ``(body input, body output, initial operand)``. An induction variable starts at a literal and
    is updated by adding a literal (``i + 1`` of a ``fori_loop``), so at iteration ``j`` it is ``start + j *
    step`` (integer arithmetic wraps identically either way).
    """
    prod = producers(eqns)
    out = []
    for cin, cout, init in carries:
        aval = cin.aval
        if (is_var(init) or getattr(aval, "shape", None) != () or getattr(aval, "dtype", None) is None
                or aval.dtype.kind not in "iu" or cout not in prod):
            return None
        e = eqns[prod[cout]]
        if e.primitive.name != "add" or len(e.invars) != 2:
            return None
        a, b = e.invars
        step = b if a is cin else a if b is cin else None
        if step is None or is_var(step) or getattr(step.aval, "shape", None) != ():
            return None
        out.append((int(init.val), int(step.val)))
    return out


def _vmapped(a_body: Block, n_consts: int, operands: list, length: int, *, counters: list | None = None,
             reverse: bool = False):
    """The invariant slice as one vectorised computation over the scanned axis, or ``None``.

    Traces ``jax.vmap`` of the slice (consts unbatched, xs batched on axis 0) and inlines it. The
    ys of a scan are stacked on axis 0 in xs order whatever the scan direction, so the result is
    the same stacked array. ``counters``: the slice's carries (after its consts) are induction variables
    ``(start, step)`` (:func:`_inductions`), batched as ``start + step * iota`` (iteration order reversed
    for a reverse scan: ys position ``p`` is iteration ``length - 1 - p``); their final values are dropped.
    """
    import jax

    if counters:
        n_c = len(counters)
        inner = Block(a_body.invars, a_body.outvars[n_c:], a_body.eqns).to_closed()
        dtypes = [v.aval.dtype for v in a_body.invars[n_consts:n_consts + n_c]]
        body_fun = compat.jaxpr_as_fun(inner)

        def fun(*args):
            consts, xs = args[:n_consts], args[n_consts + n_c:]
            idx = []
            for (start, step), dt in zip(counters, dtypes):
                it = jax.lax.iota(dt, length)
                if reverse:
                    it = (length - 1) - it
                it = it * step if step != 1 else it
                idx.append((it + start if start else it).astype(dt))
            return jax.vmap(body_fun, in_axes=[None] * n_consts + [0] * (n_c + len(xs)), out_axes=0,
                            axis_size=length)(*consts, *idx, *xs)
        avals = [compat.abstract_arg(a.aval) for a in operands]  # sharding, weak type, varying axes kept
        try:
            vm = jax.make_jaxpr(fun)(*avals)
        except Exception:
            return None
        return _inlined(vm, operands)
    closed = a_body.to_closed()
    in_axes = [None] * n_consts + [0] * (len(a_body.invars) - n_consts)
    if n_consts == len(a_body.invars):
        return None  # nothing batched: vmap needs an axis size from somewhere
    avals = [compat.abstract_arg(a.aval) for a in operands]  # sharding, weak type, varying axes kept
    try:
        vm = jax.make_jaxpr(jax.vmap(compat.jaxpr_as_fun(closed), in_axes=in_axes, out_axes=0,
                                     axis_size=length))(*avals)
    except Exception:
        return None
    return _inlined(vm, operands)


def _inlined(vm, operands: list):
    """``vm``'s equations with its inputs renamed to ``operands``; ``(eqns, outputs)`` or ``None``."""
    constvars, consts, invars, outvars, eqns = compat.split_closed(vm)
    if constvars or consts:
        return None
    pre, sub = clone_eqns(eqns, dict(zip(invars, operands)))
    outs = [sub.get(v, v) if is_var(v) else v for v in outvars]
    if not all(is_var(v) for v in outs):
        return None
    return pre, outs
