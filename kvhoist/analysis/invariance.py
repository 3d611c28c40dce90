"""Which values of a loop body do not depend on the loop.

A value is *invariant* with respect to a loop when it is the same in every iteration. Seeds are the
body inputs known to be invariant: a scan's consts, a while's body consts, and carries the body passes
through unchanged. Invariance then propagates forward: an equation whose inputs are all invariant,
that may move (:mod:`kvhoist.analysis.motion`: pure, deterministic, on the allowlist) produces invariant
outputs.

For a loop *nested* in the body of the loop being analysed, its carries can be invariant with respect
to the *outer* loop even though they change every inner iteration (a layer counter of a
``fori_loop`` over layers, say): :func:`outer_invariant_carries` finds those by a fixpoint.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

from kvhoist.analysis import motion
from kvhoist.ir import Block, is_var

def movable(eqn) -> bool:
    """May ``eqn`` run once instead of once per iteration? (:func:`kvhoist.analysis.motion.may_move`)."""
    return motion.may_move(eqn)


def atom_invariant(atom, inv: set) -> bool:
    return (not is_var(atom)) or atom in inv


def propagate(eqns: Iterable, inv: set, can_move: Callable = motion.may_move) -> set:
    """Forward-propagate invariance through ``eqns``; returns the grown set (``inv`` is not mutated).

    ``can_move`` decides which equations may produce invariant values (the motion model: speculatable
    ones only, when the values will be speculated)."""
    inv = set(inv)
    for e in eqns:
        if can_move(e) and all(atom_invariant(a, inv) for a in e.invars):
            inv.update(v for v in e.outvars if is_var(v))
    return inv


def passthrough_carries(body: Block, first_carry: int, num_carry: int) -> list[bool]:
    """Carries whose body output is exactly the body input: they keep their initial value."""
    return [body.outvars[k] is body.invars[first_carry + k] for k in range(num_carry)]


def outer_invariant_carries(body: Block, inv_inputs: set, carry_invars: Sequence,
                            carry_outvars: Sequence, init_invariant: Sequence[bool],
                            can_move: Callable = motion.may_move) -> list[bool]:
    """Fixpoint: which carries of a nested loop are invariant with respect to the enclosing loop.

    A carry qualifies when its initial value is outer-invariant and its update is computed only
    from outer-invariant values (assuming the qualifying carries themselves are). Start optimistic
    and drop carries until nothing changes.
    """
    ok = list(init_invariant)
    while True:
        inv = set(inv_inputs) | {v for v, o in zip(carry_invars, ok) if o}
        inv = propagate(body.eqns, inv, can_move)
        new = [o and atom_invariant(out, inv) for o, out in zip(ok, carry_outvars)]
        if new == ok:
            return ok
        ok = new


def carry_closure(read: set, carry_pairs: Sequence) -> set:
    """``read`` plus the carry outputs a fissioned scan must compute because it reads their inputs.

    A carry read by the split-out work must be updated there too; its new value may itself be another
    carry's input (carries that swap every iteration), which then must be carried as well.
    """
    read = set(read)
    changed = True
    while changed:
        changed = False
        for cin, cout in carry_pairs:
            if cin in read and is_var(cout) and cout not in read:
                read.add(cout)
                changed = True
    return read
