"""How often each branch of a ``cond`` inside a loop runs, when that is decidable at trace time.

Speculation computes every branch's invariant work once, in front of the loop. What that saves
depends on how often each branch would have run: ``flops * (runs - 1)``. The pass cannot know that in
general, but samplers often pick the branch from a static schedule — Wan 2.2 selects its expert with
``first_expert[step]``, a constant boolean array indexed by the step counter. When the branch index
depends only on values known at trace time (closed-over constants, literals, small constant folds),
the loop's own xs and carries whose updates are equally known (the step counter), this module
replays just that slice of the loop body for every iteration and counts the branches.

**Folding is numpy, never XLA.** Values are computed by :data:`NUMPY_RULES`, a table from primitive
name to a numpy function with XLA's semantics (integer division truncating, ``rem`` taking the
dividend's sign, clamped ``dynamic_slice`` starts); ``jit`` / ``closed_call`` bodies are evaluated
equation by equation with the same table. A primitive without a rule, an operand whose dtype numpy
does not have (a typed PRNG key), an integer division by zero or anything larger than
:data:`MAX_FOLD_ELEMENTS` is simply not folded. So the analysis launches no XLA compile and cannot
fail on a value it does not understand (a traced ``jax.random.PRNGKey(0)``, as in every Hugging Face
Flax ``generate()``).

Anything else (an index computed from the latents, a slice with loops or effects) returns ``None``
and the report keeps its upper bound.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Sequence

import numpy as np

from kvhoist import compat
from kvhoist.ir import Block, is_var, producers

#: Largest value (in elements) that constant folding computes and remembers.
MAX_FOLD_ELEMENTS = 4096
#: Largest known operand (in elements) folding reads: a closed-over schedule table, not a weight matrix.
MAX_FOLD_INPUT_ELEMENTS = 1 << 16


# --------------------------------------------------------------------------------------------------
# numpy evaluation: a table of primitive -> rule (XLA semantics, numpy arithmetic)
# --------------------------------------------------------------------------------------------------

class _NotFoldable(Exception):
    """This equation is not evaluated at trace time (no rule, or a case the rule does not cover)."""


def _int(x) -> bool:
    return np.issubdtype(x.dtype, np.integer)


def _div(a, b):
    if _int(a) or _int(b):
        if np.any(b == 0):
            raise _NotFoldable  # XLA's value for x/0 is its own; not worth modelling
        q = np.abs(a) // np.abs(b)
        return np.where((a < 0) != (b < 0), -q, q)  # truncation toward zero, as in C and XLA
    return np.divide(a, b)


def _rem(a, b):
    if (_int(a) or _int(b)) and np.any(b == 0):
        raise _NotFoldable
    return np.fmod(a, b)  # the sign of the dividend, as in C and XLA


def _shift(fn):
    def rule(a, b):
        bits = a.dtype.itemsize * 8
        if np.any((b < 0) | (b >= bits)):
            raise _NotFoldable  # XLA defines over-wide shifts; numpy does not
        return fn(a, b)
    return rule


def _shift_right_logical(a, b):
    u = a.view(np.dtype(f"u{a.dtype.itemsize}"))
    return np.right_shift(u, b.astype(u.dtype)).view(a.dtype)


def _convert(x, *, new_dtype, **_):
    new = np.dtype(new_dtype)
    if np.issubdtype(new, np.integer) and not _int(x) and x.dtype != np.bool_:
        info = np.iinfo(new)
        if not np.all(np.isfinite(x)) or np.any(x < info.min) or np.any(x > info.max):
            raise _NotFoldable  # out-of-range float -> int is implementation-defined
        return np.trunc(x).astype(new)
    return x.astype(new)


def _broadcast_in_dim(x, *dyn, shape, broadcast_dimensions, **_):
    if dyn:
        raise _NotFoldable
    expanded = [1] * len(shape)
    for src, dst in enumerate(broadcast_dimensions):
        expanded[dst] = x.shape[src]
    return np.broadcast_to(x.reshape(expanded), tuple(shape))


def _reshape(x, *dyn, new_sizes, dimensions=None, **_):
    if dyn or dimensions is not None:
        raise _NotFoldable
    return x.reshape(tuple(new_sizes))


def _dynamic_slice(x, *starts, slice_sizes):
    if len(starts) != x.ndim:
        raise _NotFoldable
    idx = tuple(slice(s, s + n) for s, n in
                ((int(np.clip(int(s), 0, d - n)), n) for s, d, n in zip(starts, x.shape, slice_sizes)))
    return x[idx]


def _dynamic_update_slice(x, update, *starts):
    if len(starts) != x.ndim:
        raise _NotFoldable
    out = np.array(x, copy=True)
    idx = tuple(slice(s, s + n) for s, n in
                ((int(np.clip(int(s), 0, d - n)), n) for s, d, n in zip(starts, x.shape, update.shape)))
    out[idx] = update
    return out


def _iota(*dyn, dtype, shape, dimension, **_):
    if dyn:
        raise _NotFoldable
    ramp = np.arange(shape[dimension], dtype=np.dtype(dtype))
    expanded = [1] * len(shape)
    expanded[dimension] = shape[dimension]
    return np.broadcast_to(ramp.reshape(expanded), tuple(shape))


def _select_n(which, *cases):
    return np.choose(which.astype(np.int64), cases) if len(cases) > 1 else cases[0]


def _split(x, *, sizes, axis):
    return np.split(x, np.cumsum(sizes)[:-1], axis=axis)


def _reduction(fn):
    return lambda x, *, axes, **_: fn(x, axis=tuple(axes))


def _arg(fn):
    def rule(x, *, axes, index_dtype):
        if len(axes) != 1:
            raise _NotFoldable
        return fn(x, axis=axes[0]).astype(np.dtype(index_dtype))
    return rule


def _identity(x, **_):
    return x


def _identities(*xs, **_):
    return list(xs)


def _elementwise(fn):
    return lambda *xs, **_: fn(*xs)


#: Primitive name -> numpy rule ``(*operands, **params) -> value or list of values``. Only exact
#: operations (integer and boolean arithmetic, comparisons, data movement, IEEE-exact float arithmetic):
#: a folded value is the value XLA would compute. A rule raises :class:`_NotFoldable` for a case it
#: does not model.
NUMPY_RULES: dict[str, Callable] = {
    "add": _elementwise(np.add), "sub": _elementwise(np.subtract), "mul": _elementwise(np.multiply),
    "div": _elementwise(_div), "rem": _elementwise(_rem), "neg": _elementwise(np.negative),
    "abs": _elementwise(np.abs), "sign": _elementwise(np.sign), "max": _elementwise(np.maximum),
    "min": _elementwise(np.minimum), "floor": _elementwise(np.floor), "ceil": _elementwise(np.ceil),
    "sqrt": _elementwise(np.sqrt), "is_finite": _elementwise(np.isfinite),
    "eq": _elementwise(np.equal), "ne": _elementwise(np.not_equal), "lt": _elementwise(np.less),
    "le": _elementwise(np.less_equal), "gt": _elementwise(np.greater), "ge": _elementwise(np.greater_equal),
    "and": _elementwise(np.bitwise_and), "or": _elementwise(np.bitwise_or), "xor": _elementwise(np.bitwise_xor),
    "not": _elementwise(np.invert),
    "shift_left": _elementwise(_shift(np.left_shift)),
    "shift_right_arithmetic": _elementwise(_shift(np.right_shift)),
    "shift_right_logical": _elementwise(_shift(_shift_right_logical)),
    "integer_pow": lambda x, *, y: np.power(x, y) if _int(x) and y >= 0 else _raise(),
    "clamp": _elementwise(lambda lo, x, hi: np.minimum(np.maximum(x, lo), hi)),
    "select_n": _elementwise(_select_n),
    "convert_element_type": _convert,
    "broadcast_in_dim": _broadcast_in_dim, "reshape": _reshape,
    "squeeze": lambda x, *, dimensions: np.squeeze(x, axis=tuple(dimensions)),
    "transpose": lambda x, *, permutation: np.transpose(x, permutation),
    "rev": lambda x, *, dimensions: np.flip(x, axis=tuple(dimensions)),
    "slice": lambda x, *, start_indices, limit_indices, strides: x[tuple(
        slice(s, e, st) for s, e, st in zip(start_indices, limit_indices, strides or [1] * x.ndim))],
    "dynamic_slice": _dynamic_slice, "dynamic_update_slice": _dynamic_update_slice,
    "concatenate": lambda *xs, dimension: np.concatenate(xs, axis=dimension),
    "iota": _iota, "split": _split,
    "reduce_max": _reduction(np.max), "reduce_min": _reduction(np.min),
    "reduce_and": _reduction(np.all), "reduce_or": _reduction(np.any),
    "argmax": _arg(np.argmax), "argmin": _arg(np.argmin),
    # identities: copies, placement and naming (jax.ad_checkpoint.checkpoint_name binds `name`)
    "copy": _identity, "copy_p": _identity, "sharding_constraint": _identity, "name": _identity,
    "device_put": _identities, "optimization_barrier": _identities,
}

#: Call-like primitives whose body is evaluated with the same table.
_CALLS = ("jit", "pjit", "closed_call", "core_call")


def _raise():
    raise _NotFoldable


def _numpy_aval(aval) -> bool:
    """A value numpy can hold exactly: a numpy dtype (bfloat16 and friends included), not a PRNG key."""
    dtype = getattr(aval, "dtype", None)
    return isinstance(dtype, np.dtype) and dtype.kind in "biuf"


def _size(aval) -> int:
    return int(np.prod(getattr(aval, "shape", ()), dtype=np.int64))


def as_numpy(value: Any, aval: Any = None) -> np.ndarray | None:
    """``value`` as a numpy array when numpy can hold it exactly and it is small enough to fold; else ``None``."""
    if value is None:
        return None
    if aval is None:
        aval = getattr(value, "aval", None) or value
    if not _numpy_aval(aval) or _size(aval) > MAX_FOLD_INPUT_ELEMENTS:
        return None
    try:
        return np.asarray(value)
    except Exception:  # anything numpy refuses is simply not folded
        return None


def eval_numpy(eqn: Any, vals: Sequence[np.ndarray]) -> list | None:
    """The outputs of ``eqn`` on the numpy operands ``vals``, or ``None`` when not folded.

    Never compiles, never raises: a primitive without a rule, a dtype numpy lacks, a result larger than
    :data:`MAX_FOLD_ELEMENTS` or a case a rule does not model gives ``None``.
    """
    if eqn.effects or not all(_numpy_aval(v.aval) for v in eqn.outvars):
        return None
    if sum(_size(v.aval) for v in eqn.outvars) > MAX_FOLD_ELEMENTS:
        return None
    name = eqn.primitive.name
    try:
        with np.errstate(all="ignore"):
            if name in _CALLS:
                outs = _eval_call(eqn, vals)
            else:
                rule = NUMPY_RULES.get(name)
                if rule is None or compat.subjaxprs_of(eqn):
                    return None
                out = rule(*vals, **eqn.params)
                outs = list(out) if eqn.primitive.multiple_results else [out]
        if outs is None or len(outs) != len(eqn.outvars):
            return None
        result = []
        for v, o in zip(eqn.outvars, outs):
            o = np.asarray(o, dtype=v.aval.dtype)
            if o.shape != tuple(v.aval.shape):
                return None
            result.append(o)
        return result
    except Exception:  # _NotFoldable, or a parameter layout this jax version spells differently
        return None


def _eval_call(eqn, vals) -> list | None:
    key = "jaxpr" if "jaxpr" in eqn.params else "call_jaxpr"
    sub = eqn.params.get(key)
    if sub is None:
        return None
    constvars, consts, invars, outvars, eqns = compat.split_closed(sub)
    env: dict = {}
    for v, c in zip(constvars, consts):
        c = as_numpy(c, v.aval)
        if c is None:
            return None
        env[v] = c
    env.update(zip(invars, vals))
    for e in eqns:
        ins = [env[a] if is_var(a) else as_numpy(a.val, a.aval) for a in e.invars]
        if any(x is None for x in ins):
            return None
        outs = eval_numpy(e, ins)
        if outs is None:
            return None
        env.update((v, o) for v, o in zip(e.outvars, outs) if is_var(v))
    return [env[a] if is_var(a) else as_numpy(a.val, a.aval) for a in outvars]


def _value(atom, known: dict):
    if not is_var(atom):
        return as_numpy(atom.val, atom.aval)
    return as_numpy(known.get(atom), atom.aval)


def fold(eqn, known: dict) -> None:
    """Record the value of a small, pure equation whose inputs are all known (numpy only: no XLA compile)."""
    if not eqn.invars and eqn.primitive.name != "iota":
        return
    vals = []
    for a in eqn.invars:
        v = _value(a, known)
        if v is None:
            return
        vals.append(v)
    outs = eval_numpy(eqn, vals)
    if outs is None:
        return
    for v, o in zip(eqn.outvars, outs):
        if is_var(v):
            known[v] = o


def branch_runs(body: Block, num_consts: int, num_carry: int, length: int, reverse: bool, cond_eqn: Any,
                outer_value: Callable[[int], Any]) -> dict | None:
    """``{branch index: iterations that take it}`` for ``cond_eqn`` in a scan ``body``, or ``None``.

    Args:
      body: the scan body; ``num_consts`` / ``num_carry`` its arity.
      length, reverse: the scan's.
      cond_eqn: a ``cond`` equation of ``body`` (top level).
      outer_value: maps a body input position to the concrete value of the scan's operand there
        (``None`` if unknown); xs operands give the whole stacked array.
    Returns:
      The counts, or ``None`` when the index is not computable with :func:`eval_numpy` from known values.
    """
    prod = producers(body.eqns)
    pos = {v: i for i, v in enumerate(body.invars)}
    carry_in = body.invars[num_consts:num_consts + num_carry]
    carry_out = body.outvars[:num_carry]
    need_eqns, need_inputs, seen = set(), set(), set()
    work = [cond_eqn.invars[0]]
    while work:
        a = work.pop()
        if not is_var(a) or a in seen:
            continue
        seen.add(a)
        if a in prod:
            e = body.eqns[prod[a]]
            if e.effects or (compat.subjaxprs_of(e) and e.primitive.name not in _CALLS):
                return None
            need_eqns.add(prod[a])
            work.extend(e.invars)
        elif a in pos:
            need_inputs.add(a)
            if a in carry_in:
                work.append(carry_out[carry_in.index(a)])
        else:
            return None
    env: dict = {}
    xs: dict = {}
    for v in need_inputs:
        is_xs = pos[v] >= num_consts + num_carry
        val = outer_value(pos[v])
        val = as_numpy(val, None if is_xs else v.aval)
        if val is None:
            return None
        (xs if is_xs else env)[v] = val
    order = sorted(need_eqns)
    n_branches = len(cond_eqn.params["branches"])
    counts: collections.Counter = collections.Counter()
    for it in range(length):
        for v, arr in xs.items():
            env[v] = arr[length - 1 - it if reverse else it]
        for k in order:
            e = body.eqns[k]
            outs = eval_numpy(e, [env[a] if is_var(a) else as_numpy(a.val, a.aval) for a in e.invars])
            if outs is None:
                return None
            env.update((o, r) for o, r in zip(e.outvars, outs) if is_var(o))
        index = _value(cond_eqn.invars[0], env)
        if index is None:
            return None
        counts[int(np.clip(int(index), 0, n_branches - 1))] += 1
        new = {}
        for cin, cout in zip(carry_in, carry_out):
            if cin in env:
                new[cin] = _value(cout, env)
                if new[cin] is None:
                    return None
        env.update(new)
    return {b: counts.get(b, 0) for b in range(n_branches)}
