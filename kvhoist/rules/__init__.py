"""One rule per higher-order primitive: how LICM optimises it and how it splits out invariant work.

A rule has two methods:

* ``optimize(eqn, engine) -> list[eqn]``: rewrite the equation where it stands — for loops, hoist
  out of the body (:mod:`.scan`, :mod:`.while_`); for everything else, optimise the loops inside its
  sub-jaxprs.
* ``split(eqn, invariant_mask, engine) -> Split | None``: the equation sits in the body of a loop
  being optimised and some of its inputs are invariant; return the invariant work to compute in
  front of it (fission for ``scan``, speculation for ``cond``, lifting out of ``jit`` / ``remat`` /
  ``closed_call``), or ``None`` when the rule cannot prove a split safe.

Primitives without a rule are left alone; unknown primitives holding sub-jaxprs are opaque. A rule receives the
engine as an argument (:class:`kvhoist.rules.base.Engine`) and never imports the pass.
"""

from __future__ import annotations

from kvhoist.rules.base import Rule

#: The registry: primitive name -> rule object (data, like a pattern table; filled by ``@register``).
_RULES: dict[str, Rule] = {}


def register(*names: str):
    def deco(cls):
        inst = cls()
        for n in names:
            _RULES[n] = inst
        return cls
    return deco


def get_rule(eqn) -> Rule | None:
    return _RULES.get(eqn.primitive.name)


from kvhoist.rules import call, cond, scan, while_  # noqa: E402,F401  (registration)
