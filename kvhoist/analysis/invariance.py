"""Which values of a loop body do not depend on the loop.

A value is *invariant* with respect to a loop when it is the same in every iteration. Seeds are the
body inputs known to be invariant: a scan's consts, a while's body consts, and carries the body passes
through unchanged. Invariance then propagates forward: an equation whose inputs are all invariant,
that has no effects and whose primitive we understand, produces invariant outputs.

For a loop *nested* in the body of the loop being analysed, its carries can be invariant with respect
to the *outer* loop even though they change every inner iteration (a layer counter of a
``fori_loop`` over layers, say): :func:`outer_invariant_carries` finds those by a fixpoint.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from kvhoist import compat
from kvhoist.ir import Block, is_var

#: Higher-order primitives whose semantics kvhoist knows; an equation of any *other* primitive that
#: holds sub-jaxprs is opaque: never moved, never looked into.
KNOWN_HIGHER_ORDER = frozenset({
    "scan", "while", "cond", "jit", "pjit", "remat2", "checkpoint", "closed_call", "core_call",
    "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr", "shard_map",
})


def has_effects(eqn) -> bool:
    return bool(eqn.effects)


def is_opaque(eqn) -> bool:
    """An unknown primitive that holds sub-jaxprs: treated as variant, never rewritten."""
    return eqn.primitive.name not in KNOWN_HIGHER_ORDER and bool(compat.subjaxprs_of(eqn))


def movable(eqn) -> bool:
    """Can this equation run at another place or another number of times without changing results?

    Pure (no effects) and understood (not an opaque higher-order primitive). Pure JAX primitives
    cannot fail at run time on XLA (out-of-range work gives inf/NaN, never a trap), so speculating
    one that is never used is safe.
    """
    return not has_effects(eqn) and not is_opaque(eqn)


def atom_invariant(atom, inv: set) -> bool:
    return (not is_var(atom)) or atom in inv


def propagate(eqns: Iterable, inv: set) -> set:
    """Forward-propagate invariance through ``eqns``; returns the grown set (``inv`` is not mutated)."""
    inv = set(inv)
    for e in eqns:
        if movable(e) and all(atom_invariant(a, inv) for a in e.invars):
            inv.update(v for v in e.outvars if is_var(v))
    return inv


def passthrough_carries(body: Block, first_carry: int, num_carry: int) -> list[bool]:
    """Carries whose body output is exactly the body input: they keep their initial value."""
    return [body.outvars[k] is body.invars[first_carry + k] for k in range(num_carry)]


def outer_invariant_carries(body: Block, inv_inputs: set, carry_invars: Sequence,
                            carry_outvars: Sequence, init_invariant: Sequence[bool]) -> list[bool]:
    """Fixpoint: which carries of a nested loop are invariant with respect to the enclosing loop.

    A carry qualifies when its initial value is outer-invariant and its update is computed only
    from outer-invariant values (assuming the qualifying carries themselves are). Start optimistic
    and drop carries until nothing changes.
    """
    ok = list(init_invariant)
    while True:
        inv = set(inv_inputs) | {v for v, o in zip(carry_invars, ok) if o}
        inv = propagate(body.eqns, inv)
        new = [o and atom_invariant(out, inv) for o, out in zip(ok, carry_outvars)]
        if new == ok:
            return ok
        ok = new
