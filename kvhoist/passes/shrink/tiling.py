"""Recognising a tiled value and re-expanding it: the analysis the smallest cache rests on.

A value is *tiled* when it is a smaller value expanded ``k`` times along one axis (:class:`Tiling`):
``reshape(broadcast(x))``, ``jnp.tile``, ``jnp.repeat``, ``concatenate([x, x])``, a size-1 broadcast
(:func:`tiling_of`). :func:`expansion_eqns` builds the cheap shape ops that expand the small value again
(inside a loop body), :func:`unexpansion_eqns` the inverse (the first copy); :func:`traced_eqns` turns a
``lax`` function into equations on given variables.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from kvhoist import compat
from kvhoist.ir import clone_eqns, is_var


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


def shape_of(v) -> tuple:
    """``v``'s shape as a tuple of ints."""
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
    full = shape_of(var)
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
        xs = shape_of(x)
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
        b = shape_of(src)
        xs = shape_of(x)
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


def resized_var(v, shape) -> Any:
    """A fresh variable like ``v`` (dtype, sharding) with ``shape``."""
    return compat.new_var(compat.resize_aval(v.aval, shape))


def free_dims(rank: int, contract: Sequence[int], batch: Sequence[int]) -> list:
    """The axes of a ``dot_general`` operand of ``rank`` that are neither contracted nor batched, in order."""
    return [d for d in range(rank) if d not in contract and d not in batch]


def expansion_eqns(small_var, t: Tiling, full_var) -> list:
    """Equations defining ``full_var`` from ``small_var`` (inside the loop body)."""
    import jax
    from jax import lax

    small_shape = shape_of(small_var)
    full_shape = shape_of(full_var)
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


def traced_eqns(fn, in_vars: Sequence, out_var) -> list:
    """Equations of ``fn`` traced on ``in_vars``' avals, reading ``in_vars`` and defining ``out_var``."""
    import jax

    specs = [jax.ShapeDtypeStruct(shape_of(v), v.aval.dtype, weak_type=getattr(v.aval, "weak_type", False))
             for v in in_vars]
    closed = jax.make_jaxpr(fn)(*specs)
    _cv, _c, invars, outvars, eqns = compat.split_closed(closed)
    if not eqns:
        return []
    new, sub = clone_eqns(eqns, dict(zip(invars, in_vars)))
    last = sub[outvars[0]]
    new[-1] = new[-1].replace(outvars=[out_var if o is last else o for o in new[-1].outvars])
    return new


def split_axis(t: Tiling, n_small: int) -> tuple:
    """How an axis of size ``n_small * t.k`` indexes the copies: ``(sizes, small_first)``."""
    return ((n_small, t.k), True) if t.mode == "repeat" else ((t.k, n_small), False)


def unexpansion_eqns(full_var, t: Tiling, small_var) -> list:
    """Equations defining ``small_var`` as the first copy in ``full_var`` (the inverse of
    :func:`expansion_eqns` on a tiled value)."""
    from jax import lax

    full = shape_of(full_var)
    a, n_small = t.axis, shape_of(small_var)[t.axis]
    (s0, s1), small_first = split_axis(t, n_small)

    def first_copy(x):
        x = lax.reshape(x, full[:a] + (s0, s1) + full[a + 1:])
        return lax.index_in_dim(x, 0, a + 1 if small_first else a, keepdims=False)

    return traced_eqns(first_copy, [full_var], small_var)
