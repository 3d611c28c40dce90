"""``while``: hoist invariant work out of the body.

Body consts are invariant; a carry is invariant when the body passes it through unchanged. The trip
count is unknown statically (reports say so). ``fori_loop`` with static bounds lowers to ``scan`` and
is handled there; with traced bounds it lowers to ``while`` and lands here. The ``cond_jaxpr`` is left
as is (it is typically a comparison). A while body may run zero times, so what leaves it is
*speculated*: only speculatable work moves (:mod:`kvhoist.analysis.motion`), computed for the primal
only (``kvhoist_speculate``, after the cache is shrunk); the body starts with a ``kvhoist_attach`` of
the values, where JVP, checkify and vmap see the work as under jit (:mod:`kvhoist.speculation`). A nested ``while`` inside another loop's body is not fissioned —
its results cannot be stacked without a static trip count — but moves as a whole when invariant.
"""

from __future__ import annotations

from kvhoist import compat, speculation
from kvhoist.analysis import motion
from kvhoist.analysis.invariance import passthrough_carries
from kvhoist.ir import Block, clone_eqns, used_vars
from kvhoist.rules.base import LoopInfo
from kvhoist.rules.common import map_subjaxprs


def prune_while(eqn):
    """Drop body consts the body no longer reads (e.g. K/V weights after their projection left)."""
    params = eqn.params
    cn, bn = params["cond_nconsts"], params["body_nconsts"]
    body_j = params["body_jaxpr"]
    _cv, _c, invars, outvars, eqns = compat.split_closed(body_j)
    if _cv or _c:
        return eqn
    used = used_vars(eqns, outvars)
    keep = [i for i in range(bn) if invars[i] in used]
    if len(keep) == bn:
        return eqn
    body = Block([invars[i] for i in keep] + list(invars[bn:]), outvars, eqns)
    new_params = compat.while_params(params, body_jaxpr=body.like(body_j), body_nconsts=len(keep))
    return eqn.replace(invars=list(eqn.invars[:cn]) + [eqn.invars[cn + i] for i in keep]
                       + list(eqn.invars[cn + bn:]), params=new_params)


class WhileRule:
    def optimize(self, eqn, engine):

        params = eqn.params
        body = Block.from_jaxpr(params["body_jaxpr"])
        if body is None:
            engine.note("opaque", f"while at {compat.source_line(eqn)} left alone: body closes over constants")
            return [map_subjaxprs(eqn, engine.optimize_sub)]
        cn, bn = params["cond_nconsts"], params["body_nconsts"]
        nk = len(eqn.invars) - cn - bn
        with engine.in_loop(LoopInfo("while", None, compat.source_line(eqn))) as info:
            body = engine.optimize_block(body)
            info.surely_flops = motion.surely_run_flops(body.eqns)
            through = passthrough_carries(body, bn, nk)
            inv_invars = body.invars[:bn] + [body.invars[bn + k] for k in range(nk) if through[k]]
            ext = engine.extract(body, inv_invars, charge=True, speculative=True)
        if ext.empty:
            return [eqn.replace(params=compat.while_params(params, body_jaxpr=body.like(params["body_jaxpr"]),
                                                           body_nconsts=bn))]
        outer_of = dict(zip(body.invars[:bn], eqn.invars[cn:cn + bn]))
        outer_of.update({body.invars[bn + k]: eqn.invars[cn + bn + k] for k in range(nk) if through[k]})
        pre, sub = clone_eqns(ext.hoisted, outer_of)
        # The body receives the values speculated; the attach at its top makes transformations compute
        # them there, in the iterations that run (kvhoist.speculation).
        c_in, att = speculation.attach_eqn(ext.hoisted, ext.used_invars, ext.crossing)
        new_body = Block(body.invars[:bn] + c_in + body.invars[bn:], body.outvars, [att] + ext.residual)
        new_params = compat.while_params(params, body_jaxpr=new_body.like(params["body_jaxpr"]),
                                         body_nconsts=bn + len(ext.crossing))
        new_eqn = eqn.replace(invars=list(eqn.invars[:cn + bn]) + [sub[v] for v in ext.crossing]
                              + list(eqn.invars[cn + bn:]), params=new_params)
        pre, new_eqn = engine.shrink(pre, new_eqn, cn + bn, len(ext.crossing))
        return [speculation.wrap(e) for e in pre] + [prune_while(new_eqn)]

    def split(self, eqn, mask, engine):
        return None
