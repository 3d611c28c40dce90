"""``cond`` / ``switch``: optimise loops inside branches; speculate invariant branch work.

Inside a loop, a ``cond`` whose index changes per iteration (Wan 2.2's expert switch) hides the
branches' invariant work from XLA. The split computes every branch's invariant work in front of the
``cond`` — unconditionally, which is *speculation* — and passes the results to all branches (each
uses its own). Speculation is only proposed while optimising an enclosing loop, so the speculated
work is then hoisted out of that loop and runs once in total rather than once per iteration; the
price is memory for every branch's results (both experts' caches), reported as a note.

Only *speculatable* equations are speculated (:mod:`kvhoist.analysis.motion`): pure, deterministic,
allowlisted primitives that cannot trap and terminate — no ``while`` loop, no callback — and no
value larger than a small multiple of the branch's inputs (a never-taken branch may not allocate), and
at most as many FLOPs as the enclosing loop surely runs (its body with every cond at its cheapest
branch, times its trip count): a never-taken branch may not add unbounded work.

The speculated equations are computed for the primal program only (``kvhoist_speculate``); each
branch starts with a ``kvhoist_attach`` of its values, where JVP, checkify and vmap see the work as
under jit (:mod:`kvhoist.speculation`).
"""

from __future__ import annotations

from kvhoist import compat, speculation
from kvhoist.analysis import cost, motion
from kvhoist.report import human_bytes
from kvhoist.ir import Block, aval_bytes, clone_eqns
from kvhoist.rules.base import Split
from kvhoist.rules.common import map_subjaxprs


class CondRule:
    def optimize(self, eqn, engine):
        return [map_subjaxprs(eqn, engine.optimize_sub)]

    def split(self, eqn, mask, engine):

        branches = eqn.params["branches"]
        ops, opmask = list(eqn.invars[1:]), list(mask[1:])
        if not any(opmask):
            return None
        blocks = [Block.from_jaxpr(b) for b in branches]
        if any(b is None for b in blocks):
            return None
        exts = [engine.extract(b, [v for v, m in zip(b.invars, opmask) if m], speculative=True) for b in blocks]
        if all(x.empty for x in exts):
            return None
        spec_flops = sum(cost.eqn_flops(q) for x in exts for q in x.hoisted)
        loop = engine.loops[-1] if engine.loops else None
        budget = motion.speculation_budget(loop.surely_flops if loop else None, loop.trip_count if loop else None)
        if spec_flops > budget:
            engine.refuse_speculation(eqn, spec_flops, budget)
            return None
        pre, outer_new, branch_of = [], [], {}
        known_runs = engine.branch_runs.get(id(eqn))
        for j, (b, x) in enumerate(zip(blocks, exts)):
            outer_of = {v: o for v, o, m in zip(b.invars, ops, opmask) if m}
            p, sub = clone_eqns(x.hoisted, outer_of)
            p = [speculation.wrap(q) for q in p]   # primal only: transformations see the attach below
            runs = None if known_runs is None else known_runs[1].get(j)
            branch_of.update({id(q): (q, id(eqn), j, runs, compat.source_line(eqn)) for q in p})
            pre.extend(p)
            outer_new.append([sub[v] for v in x.crossing])
        new_branches = []
        for j, (b, x) in enumerate(zip(blocks, exts)):
            extra, top = [], []
            for k, xk in enumerate(exts):
                if k == j and xk.crossing:
                    # The branch's values arrive speculated; the attach makes transformations (JVP,
                    # checkify, vmap) compute them here, only when this branch runs.
                    c_in, att = speculation.attach_eqn(xk.hoisted, xk.used_invars, xk.crossing)
                    extra.extend(c_in)
                    top.append(att)
                else:
                    extra.extend(compat.new_var(v.aval) for v in xk.crossing)
            new_branches.append(Block(b.invars + extra, b.outvars, top + x.residual).like(branches[j]))
        flat_new = [v for vs in outer_new for v in vs]
        post = eqn.replace(invars=list(eqn.invars) + flat_new,
                           params={**eqn.params, "branches": tuple(new_branches)})
        nbytes = sum(aval_bytes(v.aval) for v in flat_new)
        return Split(pre, [post], "speculation",
                     f"speculated {len(pre)} invariant equation(s) out of a {len(branches)}-way cond "
                     f"({human_bytes(nbytes)} of results for all branches"
                     + (f"; branch runs per loop: {known_runs[1]}" if known_runs else "") + ")", nbytes,
                     frozenset().union(*(x.kinds for x in exts)), branch_of)
