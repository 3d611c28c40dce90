"""How often each branch of a ``cond`` inside a loop runs, when that is decidable at trace time.

Speculation computes every branch's invariant work once, in front of the loop. What that saves
depends on how often each branch would have run: ``flops * (runs - 1)``. The pass cannot know that in
general, but samplers often pick the branch from a static schedule — Wan 2.2 selects its expert with
``first_expert[step]``, a constant boolean array indexed by the step counter. When the branch index
depends only on values known at trace time (closed-over constants, literals, small constant folds),
the loop's own xs and carries whose updates are equally known (the step counter), this module
replays just that slice of the loop body for every iteration and counts the branches.

Anything else (an index computed from the latents, a slice with sub-jaxprs or effects) returns
``None`` and the report keeps its upper bound.
"""

from __future__ import annotations

import collections
from typing import Any, Callable

import numpy as np

from kvhoist import compat
from kvhoist.ir import Block, is_var, producers

#: Largest constant (in elements) that constant folding evaluates and remembers.
MAX_FOLD_ELEMENTS = 4096


def _value(atom, known: dict):
    if not is_var(atom):
        return np.asarray(atom.val)
    return known.get(atom)


def fold(eqn, known: dict) -> None:
    """Record the value of a small, pure, first-order equation whose inputs are all known."""
    vals = [_value(a, known) for a in eqn.invars]
    if any(v is None for v in vals) or eqn.effects or compat.subjaxprs_of(eqn):
        return
    size = sum(int(np.prod(v.aval.shape)) for v in eqn.outvars if is_var(v))
    if size > MAX_FOLD_ELEMENTS:
        return
    try:
        out = compat.eval_primitive(eqn.primitive, vals, eqn.params)
    except Exception:
        return
    outs = out if eqn.primitive.multiple_results else [out]
    for v, o in zip(eqn.outvars, outs):
        if is_var(v):
            known[v] = np.asarray(o)


def branch_runs(body: Block, num_consts: int, num_carry: int, length: int, reverse: bool, cond_eqn: Any,
                outer_value: Callable[[int], Any]) -> dict | None:
    """``{branch index: iterations that take it}`` for ``cond_eqn`` in a scan ``body``, or ``None``.

    Args:
      body: the scan body; ``num_consts`` / ``num_carry`` its arity.
      length, reverse: the scan's.
      cond_eqn: a ``cond`` equation of ``body`` (top level).
      outer_value: maps a body input position to the concrete value of the scan's operand there
        (``None`` if unknown); xs operands give the whole stacked array.
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
            if e.effects or compat.subjaxprs_of(e):
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
        val = outer_value(pos[v])
        if val is None:
            return None
        if pos[v] >= num_consts + num_carry:
            xs[v] = np.asarray(val)
        else:
            env[v] = np.asarray(val)
    order = sorted(need_eqns)
    n_branches = len(cond_eqn.params["branches"])
    counts: collections.Counter = collections.Counter()
    for it in range(length):
        for v, arr in xs.items():
            env[v] = arr[length - 1 - it if reverse else it]
        for k in order:
            e = body.eqns[k]
            vals = [env[a] if is_var(a) else np.asarray(a.val) for a in e.invars]
            out = compat.eval_primitive(e.primitive, vals, e.params)
            outs = out if e.primitive.multiple_results else [out]
            for o, r in zip(e.outvars, outs):
                if is_var(o):
                    env[o] = np.asarray(r)
        index = _value(cond_eqn.invars[0], env)
        counts[int(np.clip(int(index), 0, n_branches - 1))] += 1
        new = {}
        for cin, cout in zip(carry_in, carry_out):
            if cin in env:
                new[cin] = _value(cout, env)
        env.update(new)
    return {b: counts.get(b, 0) for b in range(n_branches)}
