"""The smallest cache: what a loop receives from its hoisted work, shrunk to the least bytes.

After LICM has moved work in front of a loop, the values the loop reads (its new consts) are its cache.
Three rewrites make that cache no larger than a hand-written one, without changing any value:

* **Un-tiling.** Beam search tiles the encoder output across beams *before* the decoding loop
  (``reshape(broadcast(x))``, ``jnp.tile``, ``jnp.repeat``, ``concatenate([x, x])``, a size-1 broadcast).
  The hoisted K/V projections then run on the tiled copy and the cache holds ``k`` identical copies.
  Work that treats the tiled axis independently (a matmul where it is a free axis, elementwise math,
  reshapes and transposes that keep it, reductions over other axes) commutes with the tiling, so it is
  recomputed on the small value; the loop receives the small result and re-expands it with the same
  cheap shape ops inside its body (XLA fuses them into their consumers).
* **Reading the untiled cache.** Re-tiling the small value every iteration is a copy jit does not make,
  so the body's consumers read it instead (:func:`read_untiled`): a ``dot_general`` batching over the
  tiled axis batches over the small value with the copy axis free (:func:`batched_dot`), other work gets
  small twins. Where a consumer needs the whole tiled value, that operand keeps the tiled cache.
* **Common values.** Identical hoisted equations (same primitive, parameters and inputs) are computed
  once, and a value passed to the loop twice is passed once.
* **Views.** When the loop receives both a value and a transpose or reshape of it, only the value is
  passed; the body recomputes the view.

Every rewrite keeps the loop's body computing exactly what it computed: the body's original input
variable is defined at its top from the smaller operand.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

from kvhoist import compat
from kvhoist.analysis import motion
from kvhoist.ir import aval_bytes, clone_eqns, is_var, live_eqns, producers


@dataclasses.dataclass(frozen=True)
class Tiling:
    """``full`` is ``small`` expanded ``k`` times along ``axis``.

    ``mode``: ``'tile'`` (whole copies one after another: ``full[j*n + i] = small[i]``), ``'repeat'``
    (each element ``k`` times: ``full[i*k + j] = small[i]``) or ``'bcast'`` (``small`` has size 1 there).
    """

    small: Any
    axis: int
    k: int
    mode: str
    #: The loop operand this tiling comes from (body-side rewrites), for the re-tiled-or-tiled decision.
    origin: Any = None

    def small_shape(self, full_shape: Sequence[int]) -> tuple:
        s = list(full_shape)
        s[self.axis] = 1 if self.mode == "bcast" else s[self.axis] // self.k
        return tuple(s)


def _shape(v) -> tuple:
    return tuple(int(d) for d in v.aval.shape)


def _is_broadcast(e) -> bool:
    """``broadcast_in_dim``, or a ``tile`` that only repeats size-1 axes (Flax's beam search:
    ``tile(expand_dims(x, 1), (1, k, 1, ...))`` is a broadcast of the new axis)."""
    if e.primitive.name == "broadcast_in_dim":
        return len(e.invars) == 1 and e.params.get("sharding") is None
    if e.primitive.name == "tile" and is_var(e.invars[0]):
        shape = getattr(e.invars[0].aval, "shape", ())
        reps = tuple(e.params["reps"])
        return len(reps) == len(shape) and all(r == 1 or int(d) == 1 for r, d in zip(reps, shape))
    return False


def _root_broadcast(var, prod: dict, eqns: Sequence):
    """``(x, m)``: ``var`` = a chain of broadcast_in_dim of ``x``, x's axis i landing on axis m[i]."""
    mapping = None
    cur = var
    while True:
        k = prod.get(cur)
        if k is None or not _is_broadcast(eqns[k]):
            break
        e = eqns[k]
        dims = (tuple(e.params["broadcast_dimensions"]) if e.primitive.name == "broadcast_in_dim"
                else tuple(range(len(e.params["reps"]))))
        mapping = dims if mapping is None else tuple(mapping[d] for d in dims)
        cur = e.invars[0]
        if not is_var(cur):
            return None
    return None if mapping is None else (cur, mapping)


def tiling_of(var, prod: dict, eqns: Sequence) -> Tiling | None:
    """Recognise ``var`` as an expansion of a smaller value (patterns in the module docstring)."""
    k = prod.get(var)
    if k is None:
        return None
    e = eqns[k]
    full = _shape(var)
    name = e.primitive.name
    if name == "tile":
        reps = tuple(e.params["reps"])
        big = [i for i, r in enumerate(reps) if r != 1]
        if len(big) == 1 and is_var(e.invars[0]) and len(reps) == len(full):
            return Tiling(e.invars[0], big[0], int(reps[big[0]]), "tile")
        return None
    if name == "concatenate":
        ins = e.invars
        if len(ins) > 1 and is_var(ins[0]) and all(a is ins[0] for a in ins):
            return Tiling(ins[0], int(e.params["dimension"]), len(ins), "tile")
        return None
    if name == "broadcast_in_dim":
        root = _root_broadcast(var, prod, eqns)
        if root is None:
            return None
        x, m = root
        xs = _shape(x)
        if len(xs) != len(full) or m != tuple(range(len(full))):
            return None
        diff = [i for i in range(len(full)) if xs[i] != full[i]]
        if len(diff) == 1 and xs[diff[0]] == 1:
            return Tiling(x, diff[0], full[diff[0]], "bcast")
        return None
    if name == "reshape" and e.params.get("dimensions") is None and e.params.get("sharding") is None:
        src = e.invars[0]
        if not is_var(src):
            return None
        root = _root_broadcast(src, prod, eqns)
        if root is None:
            return None
        x, m = root
        b = _shape(src)
        xs = _shape(x)
        new = [i for i in range(len(b)) if i not in m]
        if len(new) != 1 or len(xs) != len(b) - 1 or any(xs[i] != b[m[i]] for i in range(len(xs))):
            return None
        p = new[0]
        kk = b[p]
        # The reshape must merge axis p with one neighbour and keep every other axis.
        if p > 0 and full == b[:p - 1] + (b[p - 1] * kk,) + b[p + 1:]:
            axis, mode = p - 1, "repeat"
        elif p + 1 < len(b) and full == b[:p] + (kk * b[p + 1],) + b[p + 2:]:
            axis, mode = p, "tile"
        else:
            return None
        if xs != Tiling(x, axis, kk, mode).small_shape(full):
            return None
        return Tiling(x, axis, kk, mode)
    return None


def _resize(v, shape) -> Any:
    return compat.new_var(compat.resize_aval(v.aval, shape))


def _free_dims(rank: int, contract: Sequence[int], batch: Sequence[int]) -> list:
    return [d for d in range(rank) if d not in contract and d not in batch]


class _Shrinker:
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
        out = _resize(v, small_shape)
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
                new_axis = len(lb) + _free_dims(len(_shape(e.invars[0])), lc, lb).index(t0.axis)
                ins[0] = t0.small
            elif ts[1] and not ts[0]:
                if t0.axis in rc or t0.axis in rb:
                    return []
                n_lhs_free = len(_free_dims(len(_shape(e.invars[0])), lc, lb))
                new_axis = len(lb) + n_lhs_free + _free_dims(len(_shape(e.invars[1])), rc, rb).index(t0.axis)
                ins[1] = t0.small
            else:
                return []
        elif name in motion.ELEMENTWISE:
            if e.params.get("sharding") is not None:
                return []
            for i, (a, t) in enumerate(zip(e.invars, ts)):
                if t is not None:
                    if (t.axis, t.k, t.mode) != (t0.axis, t0.k, t0.mode) or _shape(t.small) != _shape(t0.small):
                        return []
                    ins[i] = t.small
                elif is_var(a):
                    if len(_shape(a)) == len(_shape(out_full)) and _shape(a)[t0.axis] == 1:
                        continue  # size 1 along the tiled axis (a bias ``[1, 1, D]``): the same for every copy
                    if _shape(a) != _shape(out_full):
                        return []
                    twin = self.constant_along(a, t0, _shape(out_full))
                    if twin is None:
                        return []
                    ins[i] = twin
                elif getattr(a.aval, "shape", ()) != ():
                    return []
            new_axis = t0.axis
        elif name == "reshape":
            if e.params.get("dimensions") is not None or e.params.get("sharding") is not None or t0.mode == "bcast":
                return []
            src, dst = _shape(e.invars[0]), _shape(out_full)
            before = math.prod(src[:t0.axis])
            cands = [b for b in range(len(dst)) if math.prod(dst[:b]) == before and dst[b] == src[t0.axis]]
            if not cands:
                return []
            new_axis = cands[0]
            small_dst = list(dst)
            small_dst[new_axis] = _shape(t0.small)[t0.axis]
            small_out = _resize(out_full, small_dst)
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
            if _shape(out_full)[new_axis] != _shape(e.invars[0])[t0.axis]:
                return []
            small_dst = list(_shape(out_full))
            small_dst[new_axis] = _shape(t0.small)[t0.axis]
            small_out = _resize(out_full, small_dst)
            self.out.append(e.replace(invars=[t0.small], outvars=[small_out],
                                      params={**e.params, "shape": tuple(small_dst)}))
            return self._done(out_full, small_out, t0, new_axis)
        else:
            return []
        small_shape = list(_shape(out_full))
        small_shape[new_axis] = _shape(t0.small)[t0.axis]
        small_out = _resize(out_full, small_shape)
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
        inner = _Shrinker([], beqns)
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


def expansion_eqns(small_var, t: Tiling, full_var) -> list:
    """Equations defining ``full_var`` from ``small_var`` (inside the loop body)."""
    import jax
    from jax import lax

    small_shape = _shape(small_var)
    full_shape = _shape(full_var)
    r, a, k = len(small_shape), t.axis, t.k

    def expand(s):
        if t.mode == "bcast":
            return lax.broadcast_in_dim(s, full_shape, tuple(range(r)))
        if t.mode == "repeat":
            b = lax.broadcast_in_dim(s, small_shape[:a + 1] + (k,) + small_shape[a + 1:],
                                     tuple(range(a + 1)) + tuple(range(a + 2, r + 1)))
        else:
            b = lax.broadcast_in_dim(s, small_shape[:a] + (k,) + small_shape[a:],
                                     tuple(range(a)) + tuple(range(a + 1, r + 1)))
        return lax.reshape(b, full_shape)

    aval = small_var.aval
    spec = jax.ShapeDtypeStruct(small_shape, aval.dtype, weak_type=getattr(aval, "weak_type", False))
    closed = jax.make_jaxpr(expand)(spec)
    _cv, _c, invars, outvars, eqns = compat.split_closed(closed)
    new, sub = clone_eqns(eqns, {invars[0]: small_var})
    last = sub[outvars[0]]
    new[-1] = new[-1].replace(outvars=[full_var if o is last else o for o in new[-1].outvars])
    return new


def _traced_eqns(fn, in_vars: Sequence, out_var) -> list:
    """Equations of ``fn`` traced on ``in_vars``' avals, reading ``in_vars`` and defining ``out_var``."""
    import jax

    specs = [jax.ShapeDtypeStruct(_shape(v), v.aval.dtype, weak_type=getattr(v.aval, "weak_type", False))
             for v in in_vars]
    closed = jax.make_jaxpr(fn)(*specs)
    _cv, _c, invars, outvars, eqns = compat.split_closed(closed)
    if not eqns:
        return []
    new, sub = clone_eqns(eqns, dict(zip(invars, in_vars)))
    last = sub[outvars[0]]
    new[-1] = new[-1].replace(outvars=[out_var if o is last else o for o in new[-1].outvars])
    return new


def _split_axis(t: Tiling, n_small: int) -> tuple:
    """How an axis of size ``n_small * t.k`` indexes the copies: ``(sizes, small_first)``."""
    return ((n_small, t.k), True) if t.mode == "repeat" else ((t.k, n_small), False)


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
    o_shape = _shape(other)
    n_small = _shape(t.small)[t.axis]
    (s0, s1), small_first = _split_axis(t, n_small)
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
    o_free = _free_dims(len(o_new_shape), o_contract, o_batch)
    if f == 1:   # other is lhs: its free axes come first
        q = n_batch + o_free.index(b_k)
    else:
        f_free = _free_dims(len(_shape(e.invars[0])), contract[0], batch[0])
        q = n_batch + len(f_free) + o_free.index(b_k)
    out = e.outvars[0]
    out_shape = _shape(out)
    new_out_shape = list(out_shape)
    new_out_shape[pos] = n_small
    new_out_shape.insert(q, t.k)
    # Move the copy axis next to the batch axis it came from, then merge the two.
    rest = [i for i in range(len(new_out_shape)) if i != q]
    at = rest.index(pos)
    perm = rest[:at] + ([pos, q] if small_first else [q, pos]) + rest[at + 1:]

    o_var = compat.new_var(compat.resize_aval(other.aval, o_new_shape))
    d_var = compat.new_var(compat.resize_aval(out.aval, tuple(new_out_shape)))
    eqns = _traced_eqns(lambda x: lax.reshape(x, o_new_shape), [other], o_var)
    ins = [None, None]
    ins[f], ins[1 - f] = t.small, o_var
    eqns.append(e.replace(invars=ins, outvars=[d_var], params={**e.params, "dimension_numbers": dn}))
    eqns += _traced_eqns(lambda x: lax.reshape(lax.transpose(x, perm), out_shape), [d_var], out)
    return eqns


def unexpansion_eqns(full_var, t: Tiling, small_var) -> list:
    """Equations defining ``small_var`` as the first copy in ``full_var`` (the inverse of
    :func:`expansion_eqns` on a tiled value)."""
    from jax import lax

    full = _shape(full_var)
    a, n_small = t.axis, _shape(small_var)[t.axis]
    (s0, s1), small_first = _split_axis(t, n_small)

    def first_copy(x):
        x = lax.reshape(x, full[:a] + (s0, s1) + full[a + 1:])
        return lax.index_in_dim(x, 0, a + 1 if small_first else a, keepdims=False)

    return _traced_eqns(first_copy, [full_var], small_var)


def _attach_small(e, sh: "_Shrinker") -> list:
    """A ``kvhoist_attach`` (:mod:`kvhoist.speculation`) of tiled values, attaching the small values instead.

    The attach stays the one place transformations see the moved work: its hidden body computes the full
    values as before and then takes their first copy, so the JVP it computes is the small value's. The full
    outputs are re-expanded after it (and consumers rewritten by :func:`read_untiled` read the small ones).
    """
    from kvhoist import speculation

    body = e.params["body"]
    cv, c, b_in, b_out, b_eqns = compat.split_closed(body.jaxpr)
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
    new_body = speculation.Body(compat.make_closed(cv, c, b_in, b_out, b_eqns))
    return [e.replace(invars=ins, outvars=outs, params={**e.params, "body": new_body})] + after


def _scan_small(e, sh: "_Shrinker") -> list:
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
        small_aval = t.small.aval if i < nc else compat.resize_aval(t.small.aval, _shape(t.small)[1:])
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
    (:class:`_Shrinker`'s twins: transposes, reshapes, elementwise ops, dots where the axis is free); a
    ``dot_general`` batching over the tiled axis reads the small value directly (:func:`batched_dot`). The
    original definitions of the full values stay in front; XLA drops them where nothing reads them.
    """
    sh = _Shrinker([], [])
    sh.tiled.update(tiled)
    sh.expanded = expanded
    out: list = []
    for e in eqns:
        if e.primitive.name in ("kvhoist_attach", "scan"):
            new = (_attach_small if e.primitive.name == "kvhoist_attach" else _scan_small)(e, sh)
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


def _retiled_for(eqns: Sequence, outvars: Sequence, expanded: dict) -> set:
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


def _same_eqn(a, b) -> bool:
    if a.primitive is not b.primitive or len(a.invars) != len(b.invars) or compat.subjaxprs_of(a):
        return False
    for x, y in zip(a.invars, b.invars):
        if is_var(x) or is_var(y):
            if x is not y:
                return False
        elif not (getattr(x.aval, "shape", None) == getattr(y.aval, "shape", None)
                  and str(x.aval.dtype) == str(y.aval.dtype) and _eq(x.val, y.val)):
            return False
    return ([v.aval for v in a.outvars] == [v.aval for v in b.outvars]) and _eq(a.params, b.params)


def _eq(x, y) -> bool:
    try:
        return bool(x == y)
    except Exception:
        return False


def shrink_loop_operands(parent: Sequence, pre: list, loop, first: int, count: int,
                         body_key: str, body_offset: int) -> tuple[list, Any, dict]:
    """Shrink the ``count`` loop operands from position ``first`` (the values hoisted out of it).

    Args:
      parent: the equations already emitted in the enclosing block (where tilings are found).
      pre: the hoisted equations, in order, in front of ``loop``.
      loop: the scan / while equation.
      first, count: position of the hoisted values among ``loop.invars``.
      body_key: ``'jaxpr'`` (scan) or ``'body_jaxpr'`` (while).
      body_offset: ``loop.invars[i]`` is the body's input ``i - body_offset``.
    Returns:
      ``(pre, loop, sizes)``: new hoisted equations and loop, and ``{operand index: (old bytes, new
      shape or None, new bytes)}`` for the operands that shrank (new shape None: no longer passed, the
      body reads another operand or recomputes it from one), for the report. Indices refer to ``loop``'s
      operands before the call.
    """
    sh = _Shrinker(parent, pre)
    new_pre: list = []
    for e in pre:
        new_pre.extend(sh.twin(e))
        new_pre.append(e)
    new_pre = sh.lifted + new_pre
    # Common values: identical hoisted equations computed once.
    subst: dict = {}
    kept: list = []
    for e in new_pre:
        e = e.replace(invars=[subst.get(a, a) if is_var(a) else a for a in e.invars]) if subst else e
        twin = next((k for k in kept if _same_eqn(k, e)), None) if not compat.subjaxprs_of(e) else None
        if twin is not None:
            subst.update(zip(e.outvars, twin.outvars))
            continue
        kept.append(e)
    new_pre = kept
    operands0 = [subst.get(a, a) if is_var(a) else a for a in loop.invars]

    body_j = loop.params[body_key]
    constvars, consts, binvars0, boutvars0, beqns = compat.split_closed(body_j)
    if constvars or consts:
        return pre, loop, {}

    def attempt(kept_tiled: set):
        """``(new loop, sizes, operands the body still re-tiles for a consumer that materialises them)``."""
        boutvars, binvars, operands = boutvars0, list(binvars0), list(operands0)
        prologue: list = []
        rename: dict = {}          # body input passed twice -> the first one's body input
        drop: set = set()
        sizes: dict = {}
        seen_operand: dict = {}
        body_tiled: dict = {}      # body input (full) -> its tiling of the small body input
        pre_prod = producers(new_pre)
        for i in range(first, first + count):
            op = operands[i]
            if not is_var(op):
                continue
            j = i - body_offset
            old_bytes = aval_bytes(op.aval)
            if op in seen_operand:  # passed twice: read the first one's body input
                rename[binvars[j]] = seen_operand[op]
                drop.add(i)
                sizes[i] = (old_bytes, None, 0)
                continue
            t = sh.tiled.get(op)
            if t is not None and op in pre_prod and i not in kept_tiled:
                small = subst.get(t.small, t.small)  # the small twin may itself be a common value
                if small in seen_operand:  # another operand's twin too (tile(x) @ w and repeat(x) @ w)
                    prologue.extend(expansion_eqns(seen_operand[small], t, binvars[j]))
                    body_tiled[binvars[j]] = Tiling(seen_operand[small], t.axis, t.k, t.mode, i)
                    drop.add(i)
                    sizes[i] = (old_bytes, None, 0)
                    continue
                small_in = compat.new_var(small.aval)
                prologue.extend(expansion_eqns(small_in, t, binvars[j]))
                body_tiled[binvars[j]] = Tiling(small_in, t.axis, t.k, t.mode, i)
                binvars[j] = small_in
                operands[i] = small
                sizes[i] = (old_bytes, _shape(small), aval_bytes(small.aval))
            seen_operand[operands[i]] = binvars[j]
        # Views: an operand that is a transpose/reshape of another operand is recomputed in the body.
        position = {operands[i]: i for i in range(first, first + count) if i not in drop and is_var(operands[i])}
        for i in range(first, first + count):
            op = operands[i]
            if i in drop or not is_var(op) or op not in pre_prod:
                continue
            e = new_pre[pre_prod[op]]
            if (e.primitive.name in ("transpose", "reshape") and len(e.invars) == 1 and is_var(e.invars[0])
                    and e.invars[0] in position and position[e.invars[0]] != i
                    and position[e.invars[0]] not in drop):
                src_body = binvars[position[e.invars[0]] - body_offset]
                prologue.append(e.replace(invars=[src_body], outvars=[binvars[i - body_offset]]))
                drop.add(i)
                sizes[i] = (aval_bytes(op.aval), None, 0)
        if not sizes:
            return None, {}, set()
        keep = [i for i in range(len(operands)) if i not in drop]
        new_binvars = [binvars[i - body_offset] for i in keep if i >= body_offset]
        # Body inputs that became locals are defined by the prologue; duplicates read the first copy.
        body_eqns = list(beqns)
        if rename:
            body_eqns = [e.replace(invars=[rename.get(a, a) if is_var(a) else a for a in e.invars]) for e in body_eqns]
            boutvars = [rename.get(a, a) if is_var(a) else a for a in boutvars]
        if body_tiled:
            # The body's consumers read the small values where they can (no re-tiling every iteration); the
            # expansions nothing reads any more are dropped.
            expanded = {v: t.origin for v, t in body_tiled.items()}
            body_eqns = read_untiled(body_eqns, body_tiled, expanded)
            body_eqns = live_eqns(prologue + body_eqns, boutvars, keep=lambda e: not motion.may_move(e))
            retiled = _retiled_for(body_eqns, boutvars, expanded)
        else:
            body_eqns, retiled = prologue + body_eqns, set()
        new_body = compat.rebuild_like(body_j, [], [], new_binvars, boutvars, body_eqns)
        new_loop = loop.replace(invars=[operands[i] for i in keep], params={**loop.params, body_key: new_body})
        return new_loop, sizes, retiled

    new_loop, sizes, retiled = attempt(set())
    if retiled:
        # A consumer reads the whole tiled value (the tiled axis contracted, a carry, an unknown op): the
        # untiled cache would be re-tiled into a full copy every iteration, a copy jit does not make. The
        # tiled cache is then the faster one; keep those operands tiled (the loop's speed over its memory).
        new_loop, sizes, _ = attempt(retiled)
    if new_loop is None:
        return pre, loop, {}
    # Dead hoisted equations (the full-size work the loop no longer reads) are dropped.
    return live_eqns(new_pre, new_loop.invars), new_loop, sizes
