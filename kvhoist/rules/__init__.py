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
from kvhoist.rules.call import CallRule, OpaqueBodyRule
from kvhoist.rules.cond import CondRule
from kvhoist.rules.scan import ScanRule
from kvhoist.rules.while_ import WhileRule

_CALL, _OPAQUE = CallRule(), OpaqueBodyRule()

#: The registry is data: primitive name -> rule (like a pattern table). A primitive not listed has no rule: LICM
#: leaves it alone (and treats an unknown one holding sub-jaxprs as opaque).
RULES: dict[str, Rule] = {
    "scan": ScanRule(),
    "while": WhileRule(),
    "cond": CondRule(),
    # calls: optimise inside; split = lift the body's invariant part out in front of the call
    "jit": _CALL, "pjit": _CALL, "closed_call": _CALL, "remat2": _CALL,
    # custom derivatives and shard_map: optimise inside, never split (the body is the function its rule/mesh sees)
    "custom_jvp_call": _OPAQUE, "custom_vjp_call": _OPAQUE, "custom_vjp_call_jaxpr": _OPAQUE, "shard_map": _OPAQUE,
}


def get_rule(eqn) -> Rule | None:
    """The rule for ``eqn``'s primitive, or ``None``."""
    return RULES.get(eqn.primitive.name)
