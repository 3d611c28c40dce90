"""The loop's operands shrunk (:func:`shrink_loop_operands`): un-tiled, common values once, views recomputed.

The entry point of :mod:`kvhoist.passes.shrink`, called by LICM after a loop rule has moved work in front
of a loop: small twins of the hoisted work (:mod:`~kvhoist.passes.shrink.twins`), identical hoisted
equations computed once, a value passed twice passed once, a transpose / reshape of another operand
recomputed in the body, and the body's consumers reading the small values
(:mod:`~kvhoist.passes.shrink.untiled`).
"""

from __future__ import annotations

from typing import Any, Sequence

from kvhoist import compat
from kvhoist.analysis import motion
from kvhoist.ir import aval_bytes, is_var, live_eqns, producers
from kvhoist.passes.shrink.tiling import Tiling, expansion_eqns, shape_of
from kvhoist.passes.shrink.twins import Shrinker
from kvhoist.passes.shrink.untiled import read_untiled, retiled_for


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


def _literal_key(x) -> tuple:
    """A hashable key of a literal operand: its shape, dtype and (for a scalar) its value."""
    value = getattr(x, "val", None)
    try:
        scalar = value.item() if getattr(value, "ndim", 0) == 0 and hasattr(value, "item") else value
        hash(scalar)
    except Exception:  # an array literal (or an unhashable value): the bucket compares it
        scalar = None
    return (getattr(x.aval, "shape", None), str(getattr(x.aval, "dtype", None)), scalar)


def _params_key(params) -> tuple:
    """The hashable parameters (``start_indices`` of one of many slices of the same array); the others are
    compared within the bucket. Python's hash contract (equal values hash equal) keeps equal equations in one
    bucket."""
    out = []
    for k in sorted(params):
        try:
            hash(params[k])
        except Exception:
            continue
        out.append((k, params[k]))
    return tuple(out)


def _bucket_key(e) -> tuple:
    """Equations that :func:`_same_eqn` may call equal share this key (primitive, operands, hashable
    parameters); only the equations of one bucket are compared, so the common-values dedupe is linear in the
    work hoisted."""
    return (e.primitive, tuple(("v", id(a)) if is_var(a) else ("l",) + _literal_key(a) for a in e.invars),
            _params_key(e.params))


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
    sh = Shrinker(parent, pre)
    new_pre: list = []
    for e in pre:
        new_pre.extend(sh.twin(e))
        new_pre.append(e)
    new_pre = sh.lifted + new_pre
    # Common values: identical hoisted equations computed once.
    # Compared only within a bucket of the same primitive and operands (linear, not quadratic, in the
    # work hoisted out of one loop; a nest hoists through every level).
    subst: dict = {}
    kept: list = []
    buckets: dict = {}
    for e in new_pre:
        e = e.replace(invars=[subst.get(a, a) if is_var(a) else a for a in e.invars]) if subst else e
        twin = None
        if not compat.subjaxprs_of(e):
            bucket = buckets.setdefault(_bucket_key(e), [])
            twin = next((k for k in bucket if _same_eqn(k, e)), None)
            if twin is None:
                bucket.append(e)
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
                sizes[i] = (old_bytes, shape_of(small), aval_bytes(small.aval))
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
            retiled = retiled_for(body_eqns, boutvars, expanded)
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
