"""Rules for call-like primitives: ``jit``, ``closed_call``, ``remat2`` (checkpoint),
``custom_jvp_call``, ``custom_vjp_call``, ``shard_map``.

* ``jit``, ``closed_call``, ``remat2``: a call's body sees exactly the call's operands, so invariant
  work inside can be computed in front of the call and passed in as extra operands. For ``jit`` the
  new operands get unspecified shardings; for ``remat2`` the lifted work is simply not
  rematerialised (it is computed once anyway).
* ``custom_jvp_call`` / ``custom_vjp_call``: the body must stay the function the custom derivative
  rule was written for, so nothing is lifted out of it; loops *inside* it are still optimised, and
  the whole call moves when all its operands are invariant.
* ``shard_map``: the body runs per shard; lifting work out would change what is sharded, so the same
  as custom calls: inner loops optimised, the whole equation movable, no split.
"""

from __future__ import annotations

from kvhoist import compat
from kvhoist.ir import Block, clone_eqns
from kvhoist.rules.base import Split
from kvhoist.rules.common import invariant_invars, map_subjaxprs

_BODY_PARAM = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "remat2": "jaxpr"}


class _Recurse:
    def optimize(self, eqn, engine):
        key = _BODY_PARAM.get(eqn.primitive.name)
        if key is not None:  # known operand values flow into the body (for branch counting)
            engine.bind_known(compat.split_closed(eqn.params[key])[2], eqn.invars)
        return [map_subjaxprs(eqn, engine.optimize_sub)]

    def split(self, eqn, mask, engine):
        return None


class CallRule(_Recurse):
    def split(self, eqn, mask, engine):

        name = eqn.primitive.name
        key = _BODY_PARAM[name]
        body_j = eqn.params[key]
        body = Block.from_jaxpr(body_j)
        if body is None:
            return None
        ext = engine.extract(body, invariant_invars(body, mask))
        if ext.empty:
            return None
        outer_of = {b: o for b, o, m in zip(body.invars, eqn.invars, mask) if m}
        pre, sub = clone_eqns(ext.hoisted, outer_of)
        new_body = Block(body.invars + ext.crossing, body.outvars, ext.residual)
        params = compat.extend_call_params(name, eqn.params, len(ext.crossing))
        params[key] = new_body.like(body_j)
        post = eqn.replace(invars=list(eqn.invars) + [sub[v] for v in ext.crossing], params=params)
        return Split(pre, [post], "call", f"lifted {len(pre)} invariant equation(s) out of {name}",
                     nested=ext.kinds)


class OpaqueBodyRule(_Recurse):
    """Optimise inside; never split (see module docstring)."""
