"""Small twins: work on a tiled value recomputed on the small value (:class:`Shrinker`).

Work that treats the tiled axis independently commutes with the tiling: a matmul where the axis is
free, elementwise math (a bias that is the same for every copy included), reshapes and transposes that
keep the axis, reductions over other axes, and a ``scan`` whose tiled consts feed such work (fission's
per-layer K/V). :meth:`Shrinker.twin` emits the equations computing it on the small operands and records
the result's :class:`~kvhoist.passes.shrink.tiling.Tiling`; work that does not commute gets no twin.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from kvhoist import compat
from kvhoist.analysis import motion
from kvhoist.ir import is_var, live_eqns, producers
from kvhoist.passes.shrink.tiling import Tiling, expansion_eqns, free_dims, resized_var, shape_of, tiling_of


class Shrinker:
    """Forward pass over the hoisted equations: a small twin for every value that stays tiled."""

    def __init__(self, parent: Sequence, pre: Sequence):
        self.eqns = list(parent) + list(pre)
        self.prod = producers(self.eqns)
        self.tiled: dict = {}
        self.n_parent = len(parent)
        #: Small twins of the enclosing block's elementwise / shape work on a tiled value (``tile(x) * s``
        #: computed before the loop): computed again on the small value in front of the loop.
        self.lifted: list = []
        #: Body-side rewrites: full values re-expanded from small ones -> the loop operand they come from.
        self.expanded: dict = {}

    def tiling(self, v) -> Tiling | None:
        if not is_var(v):
            return None
        if v not in self.tiled:
            self.tiled[v] = None  # no cycles: a value is looked at once
            t = tiling_of(v, self.prod, self.eqns)
            k = self.prod.get(v)
            if t is None and k is not None and k < self.n_parent and self.eqns[k].primitive.name in motion.FUSIBLE:
                # Work in the enclosing block after the tiling (a scale, a bias): XLA fuses it into its
                # consumers anyway, so a twin on the small value costs nothing and keeps the cache small.
                twin = self.twin(self.eqns[k])
                if twin:
                    self.lifted.extend(twin)
                t = self.tiled.get(v)
            self.tiled[v] = t
        return self.tiled[v]

    def constant_along(self, v, t: Tiling, full_shape) -> Any | None:
        """A small twin of an untiled operand that is the same along ``t.axis`` (a broadcast of a value
        without that axis), for elementwise partners such as a bias; new equations in ``self.out``."""
        k = self.prod.get(v)
        if k is None:
            return None
        e = self.eqns[k]
        if e.primitive.name != "broadcast_in_dim" or t.axis in tuple(e.params["broadcast_dimensions"]):
            return None
        small_shape = t.small_shape(full_shape)
        out = resized_var(v, small_shape)
        self.out.append(e.replace(outvars=[out], params={**e.params, "shape": small_shape}))
        return out

    def twin(self, e) -> list:
        """Small equations computing ``e`` on the small operands, or [] when ``e`` does not commute."""
        ts = [self.tiling(a) for a in e.invars]
        if not any(ts) or e.effects:
            return []
        if e.primitive.name == "scan":
            return self._twin_scan(e, ts)
        if len(e.outvars) != 1 or not is_var(e.outvars[0]):
            return []
        out_full = e.outvars[0]
        name = e.primitive.name
        self.out = []
        new_axis = None
        t0 = next(t for t in ts if t)
        ins = list(e.invars)
        if name == "dot_general":
            (lc, rc), (lb, rb) = e.params["dimension_numbers"]
            if ts[0] and not ts[1]:
                if t0.axis in lc or t0.axis in lb:
                    return []
                new_axis = len(lb) + free_dims(len(shape_of(e.invars[0])), lc, lb).index(t0.axis)
                ins[0] = t0.small
            elif ts[1] and not ts[0]:
                if t0.axis in rc or t0.axis in rb:
                    return []
                n_lhs_free = len(free_dims(len(shape_of(e.invars[0])), lc, lb))
                new_axis = len(lb) + n_lhs_free + free_dims(len(shape_of(e.invars[1])), rc, rb).index(t0.axis)
                ins[1] = t0.small
            else:
                return []
        elif name in motion.ELEMENTWISE:
            if e.params.get("sharding") is not None:
                return []
            for i, (a, t) in enumerate(zip(e.invars, ts)):
                if t is not None:
                    if (t.axis, t.k, t.mode) != (t0.axis, t0.k, t0.mode) or shape_of(t.small) != shape_of(t0.small):
                        return []
                    ins[i] = t.small
                elif is_var(a):
                    if len(shape_of(a)) == len(shape_of(out_full)) and shape_of(a)[t0.axis] == 1:
                        continue  # size 1 along the tiled axis (a bias ``[1, 1, D]``): the same for every copy
                    if shape_of(a) != shape_of(out_full):
                        return []
                    twin = self.constant_along(a, t0, shape_of(out_full))
                    if twin is None:
                        return []
                    ins[i] = twin
                elif getattr(a.aval, "shape", ()) != ():
                    return []
            new_axis = t0.axis
        elif name == "reshape":
            if e.params.get("dimensions") is not None or e.params.get("sharding") is not None or t0.mode == "bcast":
                return []
            src, dst = shape_of(e.invars[0]), shape_of(out_full)
            before = math.prod(src[:t0.axis])
            cands = [b for b in range(len(dst)) if math.prod(dst[:b]) == before and dst[b] == src[t0.axis]]
            if not cands:
                return []
            new_axis = cands[0]
            small_dst = list(dst)
            small_dst[new_axis] = shape_of(t0.small)[t0.axis]
            small_out = resized_var(out_full, small_dst)
            self.out.append(e.replace(invars=[t0.small], outvars=[small_out],
                                      params={**e.params, "new_sizes": tuple(small_dst)}))
            return self._done(out_full, small_out, t0, new_axis)
        elif name == "transpose":
            new_axis = tuple(e.params["permutation"]).index(t0.axis)
            ins[0] = t0.small
        elif name in ("reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "argmax", "argmin"):
            axes = tuple(e.params["axes"])
            if t0.axis in axes or len(e.invars) != 1:
                return []
            new_axis = t0.axis - sum(1 for ax in axes if ax < t0.axis)
            ins[0] = t0.small
        elif name == "broadcast_in_dim":
            if len(e.invars) != 1 or e.params.get("sharding") is not None:
                return []
            dims = tuple(e.params["broadcast_dimensions"])
            new_axis = dims[t0.axis]
            if shape_of(out_full)[new_axis] != shape_of(e.invars[0])[t0.axis]:
                return []
            small_dst = list(shape_of(out_full))
            small_dst[new_axis] = shape_of(t0.small)[t0.axis]
            small_out = resized_var(out_full, small_dst)
            self.out.append(e.replace(invars=[t0.small], outvars=[small_out],
                                      params={**e.params, "shape": tuple(small_dst)}))
            return self._done(out_full, small_out, t0, new_axis)
        else:
            return []
        small_shape = list(shape_of(out_full))
        small_shape[new_axis] = shape_of(t0.small)[t0.axis]
        small_out = resized_var(out_full, small_shape)
        self.out.append(e.replace(invars=ins, outvars=[small_out]))
        return self._done(out_full, small_out, t0, new_axis)

    def _twin_scan(self, e, ts) -> list:
        """A scan whose tiled *consts* (fission's per-layer K/V of a tiled encoder output) become small:
        the body gets the small const, re-expands it at its top for whatever still needs the full value,
        and returns small twins of the ys that have one (stacked: the tiled axis moves one right)."""
        params = e.params
        if not compat.scan_params_supported(params):
            return []
        nc, nk = compat.scan_arity(params)
        if any(t is not None for t in ts[nc:]):
            return []
        constvars, consts, invars, outvars, beqns = compat.split_closed(params["jaxpr"])
        if constvars or consts:
            return []
        inner = Shrinker([], beqns)
        new_invars, prologue = list(invars), []
        for i in range(nc):
            t = ts[i]
            if t is None:
                continue
            small_in = compat.new_var(t.small.aval)
            inner.tiled[invars[i]] = Tiling(small_in, t.axis, t.k, t.mode)
            prologue.extend(expansion_eqns(small_in, t, invars[i]))
            new_invars[i] = small_in
        body: list = []
        for be in beqns:
            body.extend(inner.twin(be))
            body.append(be)
        new_outvars, out_tilings = list(outvars), {}
        for j in range(nk, len(outvars)):
            t = inner.tiled.get(outvars[j]) if is_var(outvars[j]) else None
            if t is not None and outvars[j] not in set(invars):
                new_outvars[j] = t.small
                out_tilings[j] = t
        if not out_tilings:
            return []
        body = live_eqns(prologue + body, new_outvars)
        new_body = compat.rebuild_like(params["jaxpr"], [], [], new_invars, new_outvars, body)
        length = int(params["length"])
        new_outs = list(e.outvars)
        for j, t in out_tilings.items():
            full = e.outvars[j]
            if not is_var(full):
                continue
            small = compat.new_var(compat.stacked_aval(t.small.aval, length))
            new_outs[j] = small
            self.tiled[full] = Tiling(small, t.axis + 1, t.k, t.mode)
        new_outs = [o if o is not e.outvars[j] or j in out_tilings else compat.drop_var(o.aval) if is_var(o) else o
                    for j, o in enumerate(new_outs)]
        ops = [ts[i].small if (i < nc and ts[i] is not None) else a for i, a in enumerate(e.invars)]
        return [e.replace(invars=ops, outvars=new_outs, params={**params, "jaxpr": new_body})]

    def _done(self, out_full, small_out, t0: Tiling, new_axis: int) -> list:
        self.tiled[out_full] = Tiling(small_out, new_axis, t0.k, t0.mode, t0.origin)
        return self.out
