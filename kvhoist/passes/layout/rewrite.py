"""Rewriting one class of padded slots to a new length (:class:`Rewriter`) once it is proven safe, and
the step both entry points repeat: the next class, its proof and rewrite, the report line (:func:`repad`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from kvhoist import compat
from kvhoist.analysis import cost
from kvhoist.analysis.dims import ATTENTION, DimAnalysis, is_var, sub_jaxprs, sub_key
from kvhoist.ir import aval_bytes
from kvhoist.report import signed

from kvhoist.passes.layout.candidates import Candidate, find_candidates
from kvhoist.passes.layout.prove import ValueAnalysis, check_class

__all__ = ["Rewriter", "Repadded", "new_length", "next_class", "feeds_kernel", "repad", "repad_message",
           "pad_primitive"]

# --- the rewrite ----------------------------------------------------------------------------------------

class Rewriter:
    def __init__(self, dims: DimAnalysis, klass: set, n: int, new_len: int, cands: dict,
                 kernel_block: int | None = None):
        self.dims, self.n, self.new_len, self.cands = dims, n, new_len, cands
        self.kernel_block = kernel_block  # the attention kernel's KV block for resized keys
        self.axes: dict = {}
        for key, var, ax in klass:
            self.axes.setdefault((key, var), set()).add(ax)
        self.old_bytes = 0
        self.new_bytes = 0

    def new_shape(self, key, v):
        axes = self.axes.get((key, v))
        if not axes:
            return None
        return tuple(self.new_len if k in axes else d for k, d in enumerate(v.aval.shape))

    def var(self, key, v, vmap):
        shape = self.new_shape(key, v)
        if shape is None:
            return v
        nv = compat.new_var(compat.resize_aval(v.aval, shape))
        self.old_bytes += aval_bytes(v.aval)
        self.new_bytes += aval_bytes(nv.aval)
        vmap[v] = nv
        return nv

    def extend_const(self, key, v, c):
        (ax,) = self.axes[(key, v)]
        arr = np.asarray(c)
        m = self.new_len - self.n
        pad = np.repeat(np.take(arr, [self.n], axis=ax), m, axis=ax) if m else np.take(arr, [], axis=ax)
        return np.concatenate([np.take(arr, np.arange(self.n), axis=ax), pad], axis=ax).astype(arr.dtype)

    def scope(self, key) -> tuple[Any, bool]:
        sc = self.dims.scopes[key]
        vmap: dict = {}
        changed = False
        constvars, consts = [], []
        for v, c in zip(sc.constvars, sc.consts):
            nv = self.var(key, v, vmap)
            constvars.append(nv)
            consts.append(self.extend_const(key, v, c) if nv is not v else c)
            changed |= nv is not v
        invars = [self.var(key, v, vmap) for v in sc.invars]
        changed |= any(a is not b for a, b in zip(invars, sc.invars))
        eqns = []
        for i, e in enumerate(sc.eqns):
            ne = self.eqn(key, i, e, vmap)
            changed |= ne is not e
            eqns.append(ne)
        outvars = [vmap.get(a, a) if is_var(a) else a for a in sc.outvars]
        if not changed:
            return sc.jaxpr, False
        return compat.rebuild_like(sc.jaxpr, constvars, consts, invars, outvars, eqns), True

    def eqn(self, key, i, e, vmap):
        invars = [vmap.get(a, a) if is_var(a) else a for a in e.invars]
        params = dict(e.params)
        sub_changed = False
        for param, bi, sub in sub_jaxprs(e):
            new, ch = self.scope(sub_key(key, i, param, bi))
            if ch:
                sub_changed = True
                if bi is None:
                    params[param] = new
                else:
                    lst = list(params[param])
                    lst[bi] = new
                    params[param] = tuple(lst)
        outvars = [self.var(key, o, vmap) if is_var(o) else o for o in e.outvars]
        out_changed = any(a is not b for a, b in zip(outvars, e.outvars))
        in_changed = any(a is not b for a, b in zip(invars, e.invars))
        if not (out_changed or in_changed or sub_changed):
            return e
        prim = e.primitive
        name = prim.name
        cand = self.cands.get((key, i))
        if cand is not None:
            cfg = [(0, 0, 0)] * len(outvars[0].aval.shape)
            cfg[cand.axis] = (0, self.new_len - cand.n, 0)
            fill = cand.fill
            fill = vmap.get(fill, fill) if is_var(fill) else fill
            pad_p = prim if name == "pad" else pad_primitive()
            return compat.make_eqn([invars[0], fill], outvars, pad_p, {"padding_config": tuple(cfg)}, like=e)
        new_shape = tuple(outvars[0].aval.shape) if outvars and is_var(outvars[0]) else None
        if name in ("iota", "broadcast_in_dim"):
            params["shape"] = new_shape
        elif name == "reshape":
            params["new_sizes"] = new_shape
        elif name == "slice":
            axes = self.axes.get((key, e.outvars[0]), set())
            params["limit_indices"] = tuple(self.new_len if k in axes else d
                                            for k, d in enumerate(params["limit_indices"]))
        elif name == "dynamic_slice":
            params["slice_sizes"] = new_shape
        elif name == ATTENTION and invars[1] is not e.invars[1] and self.kernel_block \
                and self.new_len % self.kernel_block == 0:
            params["block_kv"] = self.kernel_block
        # Other primitives (elementwise, dot_general, reductions, calls, loops) take their shapes from
        # their operands; effects do not change (resizing adds none).
        return compat.make_eqn(invars, outvars, prim, params, like=e)


def pad_primitive():
    import jax

    return jax.lax.pad_p


# --- the pass -------------------------------------------------------------------------------------------

def new_length(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


@dataclasses.dataclass
class Repadded:
    """One class of padded slots rewritten to ``new_len``."""

    jaxpr: Any
    new_len: int
    resized: int
    extra_bytes: int
    bytes_after: int
    flops_before: Any
    flops_after: Any
    uses: list
    assumptions: list


def next_class(current: Any, done: set):
    """The next class of token-padding candidates not yet handled: ``(dims, first, group, klass)`` or None."""
    dims = DimAnalysis(current)
    every = find_candidates(dims)
    cands = [c for c in every if (c.key, c.index) not in done]
    if not cands:
        return None
    c = cands[0]
    klass = set(dims.class_of((c.key, c.out, c.axis)))
    group = [d for d in every if (d.key, d.out, d.axis) in klass]
    done.update((d.key, d.index) for d in group)
    return dims, c, group, klass


def feeds_kernel(dims: DimAnalysis, klass: set) -> bool:
    """Whether the padded axis is the key axis of a splash-attention call (the kernel needs its block)."""
    for key, _i, e in dims.iter_eqns():
        if e.primitive.name == ATTENTION and e.params.get("impl") == "splash" and \
                any((key, a, 1) in klass for a in e.invars[1:3] if is_var(a)):
            return True
    return False


def repad(current: Any, dims: DimAnalysis, c: Candidate, group: list, klass: set, new_len: int,
           kernel_block: int | None) -> Repadded:
    """Rewrite ``klass`` to ``new_len`` positions, or raise :class:`Refused` with the reason."""
    gmap = {(d.key, d.index): d for d in group}
    check_class(dims, klass, gmap)
    va = ValueAnalysis(dims, klass, c.n, c.length, new_len, group)
    va.run()
    rw = Rewriter(dims, klass, c.n, new_len, gmap, kernel_block)
    new, _changed = rw.scope(())
    compat.check(new)
    return Repadded(new, new_len, len(rw.axes), rw.new_bytes - rw.old_bytes, rw.new_bytes,
                     cost.jaxpr_flops_run(current), cost.jaxpr_flops_run(new), list(va.uses), list(va.assumptions))


def extra_flops(r: Repadded):
    if r.flops_before is None or r.flops_after is None:
        return None
    return r.flops_after - r.flops_before


def repad_message(c: Candidate, r: Repadded, align: int, target_name: str) -> str:
    extra = extra_flops(r)
    per_it = ""
    if r.flops_after is not None and r.flops_before is not None and \
            r.flops_after.per_iteration != r.flops_before.per_iteration:
        per_it = (f" ({signed(r.flops_after.per_iteration - r.flops_before.per_iteration)} per iteration of loops "
                  f"with an unknown trip count)")
    how = "; ".join(dict.fromkeys(r.uses)) or "no position-mixing use"
    msg = (f"{c.describe()}: {c.n} tokens padded to {c.length} ({c.alignment}-aligned) -> {r.new_len} "
           f"({align}-aligned for {target_name}); {r.resized} values resized, {signed(extra)} per run{per_it}, "
           f"{signed(r.extra_bytes, 'bytes')} of padded values; padding provably masked by: {how}")
    if r.assumptions:
        msg += "; assuming " + "; ".join(dict.fromkeys(r.assumptions))
    return msg


