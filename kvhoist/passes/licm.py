"""Loop-invariant code motion over jaxprs, with loop fission and speculation out of conds.

The pass visits every loop (``scan``, ``while``), innermost first, so that a value hoisted out of an
inner loop can keep rising out of the outer one (MLIR LICM's order). For each loop body it

1. marks the body inputs that are the same in every iteration (consts, passed-through carries),
2. walks the body; an equation is invariant when it is pure and all its inputs are invariant
   (:mod:`kvhoist.analysis.invariance`); a higher-order equation with *some* invariant inputs is
   offered to its rule, which may split it (:mod:`kvhoist.rules`): a nested ``scan`` is fissioned
   into a scan of the invariant part (stacked per inner iteration) and the rest, a ``cond`` has its
   branches' invariant work speculated in front of it, a ``jit``/``remat``/``closed_call`` has its
   invariant part lifted out of the call,
3. selects what to move: every invariant equation that does real work (not a shape-only op) plus
   what it needs; cheap shape-only ops follow only when they feed from that work and do not grow the
   data; a ``max_cache_bytes`` budget keeps the most FLOPs per cached byte,
4. moves the selection in front of the loop and passes the values the body still needs in as new
   loop consts.

Nothing with effects moves, and nothing moves across an effect in a way that changes how often it
runs: effectful equations stay where they are; only pure work is moved or speculated.

Example:
    >>> closed = jax.make_jaxpr(sampler)(params, x, ctx)
    >>> new_closed, report = kvhoist.licm(closed)
    >>> print(report.table())
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
from typing import Any, Iterable, Sequence

from kvhoist import compat
from kvhoist.analysis import branches, cost, motion
from kvhoist.passes import provenance
from kvhoist.passes.provenance import ancestors, describe
from kvhoist.errors import PassError, strict
from kvhoist.analysis.invariance import atom_invariant
from kvhoist.ir import (Block, analysis_cache, aval_bytes, clone_eqns, is_var, live_eqns, live_indices, memoized, producers,
                        prune_call_operands, verify_eqns, verify_jaxpr)
from kvhoist.report import Note, Report, Skipped, human_bytes, human_flops
from kvhoist.rules.base import Extraction, LoopInfo, Split  # noqa: F401  (the engine/rule interface, re-exported)
from kvhoist.analysis.invariance import carry_closure


class Licm:
    """One run of the LICM pass. Create, call :meth:`run`, read :attr:`report`."""

    def __init__(self, *, max_cache_bytes: int | None = None, min_flops: int = 1,
                 fission: str = "scan"):
        if fission not in ("scan", "vmap"):
            raise ValueError(f"fission must be 'scan' or 'vmap', got {fission!r}")
        self.fission = fission
        self.max_cache_bytes = max_cache_bytes
        self.budget_left = max_cache_bytes
        self.min_flops = min_flops
        self.report = Report()
        self.loops: list[LoopInfo] = []
        self._charged: set = set()
        # Values known at trace time (closed-over constants, small folds): only used to count how
        # often each cond branch runs (kvhoist.analysis.branches), never to change the program.
        self.known: dict = {}
        self.branch_runs: dict = {}    # id(cond eqn) -> (eqn, {branch: runs})
        self.branch_of: dict = {}      # id(speculated eqn) -> (eqn, id(cond eqn), branch, runs or None, cond source)
        # True while extracting work that will run where it might not have run (a cond branch, a while
        # body): only speculatable equations move (kvhoist.analysis.motion).
        self.speculating = False
        self._stayed: set = set()
        self._emitted: list = []       # stack: the equations emitted so far in each block being optimised
        # Splits that found nothing, by (equation, invariance mask, speculating, loop budget): a nested scan is
        # offered to its rule once per enclosing loop; the answer is the same, so the pass stays linear in depth.
        self._no_split: dict = {}
        #: Structural counters, what tests and the pass-time benchmark read: ``splits`` / ``split_memo_hits``
        #: (rule.split calls, memo hits), ``walked`` (equations an extraction classified: every level a value
        #: crosses walks it again) and ``moved`` (equations placed in front of a loop, per loop crossed).
        self.counts: collections.Counter = collections.Counter()

    # -- entry points ------------------------------------------------------------------------
    def run(self, closed: Any) -> tuple[Any, Report]:
        from kvhoist import rules  # noqa: F401  (registers the rules)

        compat.require_jaxpr(closed, "licm")
        with analysis_cache():  # each equation's motion and cost questions answered once per run
            new = self.optimize_sub(closed)
            try:
                verify_jaxpr(new)
            except Exception as err:  # a bug in a rule that per-loop verification missed; never hand it out
                raise PassError(f"kvhoist produced an ill-formed jaxpr; please report this: {err}") from err
            self.report.total_flops_before = cost.jaxpr_flops_run(closed)
            self.report.total_flops_after = cost.jaxpr_flops_run(new)
        return new, self.report

    def optimize_block(self, block: Block) -> Block:
        """Optimise every loop in ``block`` (recursively); top-level equations do not move."""
        from kvhoist.rules import get_rule

        eqns: list = []
        bound = set(block.invars)
        self._emitted.append(eqns)
        try:
            for e in block.eqns:
                branches.fold(e, self.known)
                rule = get_rule(e)
                new = [e] if rule is None else self._rewrite_checked(rule, e, bound)
                eqns.extend(new)
                bound.update(v for n in new for v in n.outvars if is_var(v))
        finally:
            self._emitted.pop()
        return Block(block.invars, block.outvars, eqns)

    def shrink(self, pre: list, loop: Any, first: int, count: int) -> tuple[list, Any]:
        """The smallest cache (:mod:`kvhoist.passes.shrink`) for a loop whose operands
        ``first .. first + count`` are the values just hoisted out of it (the last ``count`` report
        entries, in order). Returns the new hoisted equations and loop; updates the report."""
        from kvhoist.passes.shrink import shrink_loop_operands

        self.counts["moved"] += len(pre)
        if not count:
            return pre, loop
        name = loop.primitive.name
        parent = self._emitted[-1] if self._emitted else []
        if name == "scan":
            key, offset = "jaxpr", 0
        else:
            cn = loop.params["cond_nconsts"]
            key, offset = "body_jaxpr", cn
        new_pre, new_loop, sizes = shrink_loop_operands(parent, pre, loop, first, count, key, offset)
        if not sizes:
            return pre, loop
        dropped = sum(1 for _old, shape, _new in sizes.values() if shape is None)
        if name == "scan":
            nc, nk = compat.scan_arity(loop.params)
            n_ops = len(loop.invars)
            new_loop = new_loop.replace(params=compat.scan_params(
                new_loop.params, jaxpr=new_loop.params["jaxpr"], num_consts=nc - dropped, num_carry=nk,
                num_xs=n_ops - nc - nk, num_ys=len(loop.outvars) - nk))
        else:
            new_loop = new_loop.replace(params=compat.while_params(
                new_loop.params, body_jaxpr=new_loop.params["body_jaxpr"],
                body_nconsts=loop.params["body_nconsts"] - dropped))
        entries = self.report.hoisted[len(self.report.hoisted) - count:]
        for i, (old, shape, nbytes) in sizes.items():
            h = entries[i - first]
            tag = "shared" if shape is None else "untiled"
            entries[i - first] = dataclasses.replace(
                h, bytes=nbytes, shape=h.shape if shape is None else tuple(shape), via=h.via + (tag,))
        self.report.hoisted[len(self.report.hoisted) - count:] = entries
        saved = sum(old - nbytes for old, _shape, nbytes in sizes.values())
        self.note("shrink", f"{name} at {compat.source_line(loop) or '?'}: cache {human_bytes(saved)} smaller "
                  f"({sum(1 for _o, s, _n in sizes.values() if s is not None)} value(s) kept untiled, "
                  f"{dropped} shared with another value or recomputed as a view)", -saved)
        return new_pre, new_loop

    def _rewrite_checked(self, rule, eqn, bound: set) -> list:
        """``rule.optimize(eqn)``, or ``[eqn]`` unchanged when the rewrite fails or does not check.

        Every rewritten equation list is verified (scoping of every variable in every sub-jaxpr, and
        JAX's own type checker) before it replaces the original: a rewrite that cannot be proven
        well-formed is refused and reported, never lowered.
        """
        n_hoisted, n_skipped, n_notes = len(self.report.hoisted), len(self.report.skipped), len(self.report.notes)
        try:
            new = rule.optimize(eqn, self)
            if new != [eqn]:
                verify_eqns(new, bound, eqn.outvars)
            return new
        except Exception as err:  # a kvhoist bug: keep the original equation, say so
            if strict():
                raise
            del self.report.hoisted[n_hoisted:], self.report.skipped[n_skipped:], self.report.notes[n_notes:]
            self.note("refused", f"{eqn.primitive.name} at {compat.source_line(eqn) or '?'} left unchanged: "
                      f"the rewrite did not verify ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                      "please report this")
            return [eqn]

    def optimize_sub(self, j: Any) -> Any:
        """Optimise the loops inside a sub-jaxpr, returning the same kind of jaxpr."""
        constvars, consts, invars, outvars, eqns = compat.split_closed(j)
        if not (constvars or consts):
            return self.optimize_block(Block(invars, outvars, eqns)).like(j)
        if not compat.is_closed(j):
            return j  # an open jaxpr with constvars: nothing binds them here, leave it alone
        # Closed-over constants are loop-invariant inputs like any other: optimise with them as
        # leading inputs, then bind them again.
        self.known.update(zip(constvars, consts))
        block = self.optimize_block(Block(list(constvars) + list(invars), outvars, eqns))
        return compat.make_closed(constvars, consts, invars, block.outvars, block.eqns)

    def value_of(self, atom: Any) -> Any:
        """The trace-time value of ``atom`` if known (a literal or a known variable), else ``None``."""
        if not is_var(atom):
            return atom.val
        return self.known.get(atom)

    def bind_known(self, inner_invars: Sequence, outer_atoms: Sequence) -> None:
        """A call's body inputs take the known values of the call's operands."""
        for v, a in zip(inner_invars, outer_atoms):
            val = self.value_of(a)
            if val is not None:
                self.known[v] = val

    @contextlib.contextmanager
    def in_loop(self, info: LoopInfo):
        self.loops.append(info)
        try:
            yield info
        finally:
            self.loops.pop()

    def note(self, kind: str, message: str, nbytes: int = 0) -> None:
        self.report.notes.append(Note(kind, message, nbytes))

    # -- the analysis + selection core -----------------------------------------------------------
    def extract(self, block: Block, invariant_invars: Iterable, *, carry_pairs: Sequence = (),
                charge: bool = False, speculative: bool = False) -> Extraction:
        """Find, split out and select the invariant part of ``block``.

        Args:
          block: a loop body (or a branch / call body inside one).
          invariant_invars: the block inputs that are the same in every iteration of the loop.
          carry_pairs: ``(carry_in, carry_out)`` of a nested scan's outer-invariant carries; when the
            selection reads ``carry_in`` it must also compute ``carry_out`` (fission needs both).
          charge: this extraction moves values across a loop boundary (they become a cache): apply
            the ``max_cache_bytes`` budget and record :class:`HoistedValue` entries.
          speculative: the extracted work will run even when ``block`` would not have run (a cond
            branch, a while body): only speculatable equations move. Nested extractions (fission,
            calls) inherit it.
        Returns:
          The :class:`Extraction` (possibly empty).
        """
        outer = self.speculating
        self.speculating = outer or speculative
        try:
            return self._extract(block, invariant_invars, carry_pairs, charge, self.speculating)
        finally:
            self.speculating = outer

    def _extract(self, block: Block, invariant_invars: Iterable, carry_pairs: Sequence, charge: bool,
                 spec: bool) -> Extraction:
        from kvhoist.rules import get_rule

        inv_in = set(invariant_invars)
        inv = set(inv_in)
        eqns: list = []
        invariant_idx: set = set()
        units: list = []            # (original eqn, pre indices, post index, Split)
        expansions: dict = {}       # var -> its invariant, expanding broadcast_in_dim equation
        self.counts["walked"] += len(block.eqns)
        work = collections.deque(block.eqns)
        while work:
            e = work.popleft()
            all_inv = all(atom_invariant(a, inv) for a in e.invars)
            if all_inv:
                sunk = _sink_broadcast(e, expansions)
                if sunk is not None:  # f(broadcast(x)) -> broadcast(f(x)): hoist the small value
                    work.extendleft(reversed(sunk))
                    continue
            if all_inv and motion.can_move(e, spec):
                invariant_idx.add(len(eqns))
                eqns.append(e)
                inv.update(v for v in e.outvars if is_var(v))
                if _is_expansion(e):
                    expansions[e.outvars[0]] = e
                continue
            if all_inv:
                self._stays(e, spec)
            rule = get_rule(e)
            mask = [atom_invariant(a, inv) for a in e.invars]
            split = None
            if rule is not None and any(mask) and any(is_var(a) for a, m in zip(e.invars, mask) if m):
                split = self._split(rule, e, mask, spec)
            if split is None:
                eqns.append(e)
                continue
            pre_idx = list(range(len(eqns), len(eqns) + len(split.pre)))
            for p in split.pre:
                invariant_idx.add(len(eqns))
                eqns.append(p)
                inv.update(v for v in p.outvars if is_var(v))
            post_idx = list(range(len(eqns), len(eqns) + len(split.post)))
            eqns.extend(split.post)
            units.append((e, pre_idx, post_idx, split))

        selected = self._select(eqns, invariant_idx, inv_in, units, carry_pairs, block.outvars)
        selected = self._fit_memory(eqns, selected, units, block.outvars, spec)
        if charge and selected and self.loops and not motion.pays(
                self.loops[-1].trip_count, sum(cost.eqn_flops(eqns[k]) for k in selected)):
            selected = set()  # a loop that runs once: caching saves nothing and costs the cache
        if charge and self.max_cache_bytes is not None and selected:
            selected = self._apply_budget(eqns, selected, block.outvars)
        # Undo splits whose invariant part is not moved: the original equation is never worse.
        kept_units = []
        for unit in units:
            orig, pre_idx, post_idx, split = unit
            if any(i in selected for i in pre_idx):
                kept_units.append(unit)
                self.note(split.kind, split.note, split.extra_bytes)
                self.branch_of.update(split.branch_of)
            else:
                for i in pre_idx:
                    eqns[i] = None
                eqns[post_idx[0]] = orig
                for i in post_idx[1:]:
                    eqns[i] = None
        hoisted = [eqns[i] for i in sorted(selected)]
        residual = [e for i, e in enumerate(eqns) if e is not None and i not in selected]
        residual = _rematerialize_constants(hoisted, residual, block.outvars)
        # Dead residual work (e.g. the expansions left behind when a broadcast was sunk below its
        # consumers) must not keep a value crossing into the loop. Only pure work is dropped: a dead
        # rng_uniform still advances the generator's state.
        residual = live_eqns(residual, block.outvars, keep=lambda e: not motion.may_move(e))
        # A call whose lifted work no longer reads an operand must not keep it crossing either.
        residual = [prune_call_operands(e) for e in residual]
        hoisted = live_eqns(hoisted, [a for e in residual for a in e.invars] + list(block.outvars))
        defined = {v for e in hoisted for v in e.outvars if is_var(v)}
        needed = set()
        for e in residual:
            needed.update(a for a in e.invars if is_var(a))
        needed.update(a for a in block.outvars if is_var(a))
        crossing = [v for e in hoisted for v in e.outvars if is_var(v) and v in needed]
        read = {a for e in hoisted for a in e.invars if is_var(a)}
        used_invars = [v for v in block.invars if v in read]
        assert not (read - defined - inv_in), "hoisted equations read a variant value"
        via = provenance.via_kinds(hoisted, crossing, kept_units, eqns)
        kinds = frozenset(k for _o, _p, _q, sp in kept_units for k in ({sp.kind} | set(sp.nested)))
        ext = Extraction(hoisted, residual, crossing, used_invars, via, kinds)
        if charge and not ext.empty:
            self._record(ext)
        return ext

    def _split(self, rule, e, mask: list, spec: bool):
        """``rule.split(e, mask, self)``, remembering a ``None`` answer.

        A split's answer depends on the equation, which of its inputs are invariant and whether the work would be
        speculated; a ``cond`` inside also on the enclosing loop's speculation budget (its trip count and surely-run
        FLOPs). Nothing else (no budget: a split is never charged). So "nothing to split" is remembered under that
        key: a depth-``d`` nest asks about its innermost scan ``d`` times and pays for one.
        """
        loop = self.loops[-1] if self.loops else None
        budget = (loop.trip_count, loop.surely_flops) if loop is not None and _holds_cond(e) else None
        key = (id(e), tuple(mask), spec, budget)
        hit = self._no_split.get(key)
        if hit is not None and hit is e:  # the table holds e, so its id cannot be reused meanwhile
            self.counts["split_memo_hits"] += 1
            return None
        self.counts["splits"] += 1
        split = rule.split(e, mask, self)
        if split is None:
            self._no_split[key] = e
        return split

    def _select(self, eqns, invariant_idx, inv_in, units, carry_pairs, block_outvars) -> set:
        prod = producers(eqns)
        selected: set = set()

        def close(start: Iterable[int]) -> None:
            stack = list(start)
            while stack:
                k = stack.pop()
                if k in selected:
                    continue
                assert k in invariant_idx
                selected.add(k)
                for a in eqns[k].invars:
                    if is_var(a) and a in prod and prod[a] not in selected:
                        stack.append(prod[a])

        live = live_indices(eqns, block_outvars)  # dead work is XLA's to drop
        seeds = [k for k in sorted(invariant_idx & live)
                 if not cost.is_shape_only(eqns[k]) and cost.eqn_flops(eqns[k]) >= self.min_flops]
        close(seeds)
        # A split is all-or-nothing: its pre-equations only make sense together.
        for _orig, pre_idx, _post, _split in units:
            if any(i in selected for i in pre_idx):
                close(pre_idx)
        # Cheap shape-only ops follow the hoisted work when they do not grow the data (the cache
        # then holds e.g. K already split into heads instead of re-splitting it every iteration).
        changed = True
        while changed:
            changed = False
            for k in sorted(invariant_idx - selected):
                e = eqns[k]
                ins = [a for a in e.invars if is_var(a)]
                from_sel = [a for a in ins if a in prod and prod[a] in selected]
                if not from_sel:
                    continue
                if not all(a in inv_in or (a in prod and prod[a] in selected) for a in ins):
                    continue
                if cost.out_bytes(e) <= sum(aval_bytes(a.aval) for a in from_sel):
                    selected.add(k)
                    changed = True
        # Fission: a hoisted part that reads an (outer-invariant) carry must also update it.
        changed = bool(carry_pairs)
        while changed:
            changed = False
            read = carry_closure({a for k in selected for a in eqns[k].invars if is_var(a)}, carry_pairs)
            for cin, cout in carry_pairs:
                if cin in read and is_var(cout) and cout in prod and prod[cout] not in selected:
                    close([prod[cout]])
                    changed = True
        return selected

    def _stays(self, eqn, spec: bool) -> None:
        """Report an equation with invariant inputs that the motion model keeps in place."""
        reason = motion.why_not_speculatable(eqn) if spec else motion.why_not_movable(eqn)
        if reason is None or reason == "has effects" or eqn.primitive.name in ("scan", "while", "cond"):
            return  # effects stay by design; loops and conds are split by their rules instead
        what = "speculated" if spec and motion.may_move(eqn) else "moved"
        self._skip(eqn, f"not {what}: {reason}", cost.out_bytes(eqn), cost.eqn_flops(eqn))

    def _skip(self, eqn, reason: str, nbytes: int, flops: int, key: str | None = None) -> None:
        """Record in ``report.skipped`` that ``eqn`` stays, once per (equation name, source, ``key or reason``)."""
        name, src = describe(eqn)
        if (name, src, key or reason) in self._stayed:
            return
        self._stayed.add((name, src, key or reason))
        self.report.skipped.append(Skipped(name, src, reason, nbytes, flops,
                                           self.loops[-1].describe() if self.loops else ""))

    def refuse_speculation(self, cond_eqn, flops: int, budget: int) -> None:
        """Report a cond whose branches' invariant work is too expensive to speculate."""
        self._skip(cond_eqn, f"not speculated: its branches' invariant work ({human_flops(flops)} FLOPs) would run "
                   f"even if the branch never does, more than the loop surely runs ({human_flops(budget)} FLOPs)",
                   0, flops, key="speculation budget")

    def _fit_memory(self, eqns, selected: set, units, block_outvars, spec: bool) -> set:
        """Drop selected work whose results would be cached expansions (the memory model).

        A value that crosses out of the block must pass :func:`kvhoist.analysis.motion.inflation_ok`
        against its sources; otherwise its producer and everything selected after it stay in the
        block, and the values they read become the candidates (the small value before a broadcast).
        """
        selected = set(selected)
        prod = producers(eqns)
        while True:
            needed = set()
            for i, e in enumerate(eqns):
                if i not in selected:
                    needed.update(a for a in e.invars if is_var(a))
            needed.update(a for a in block_outvars if is_var(a))
            bad: dict = {}
            for k in selected:
                for v in eqns[k].outvars:
                    if not (is_var(v) and v in needed):
                        continue
                    if not motion.reads_inputs(v, eqns, prod):
                        continue  # a constant: recomputed in the block, never cached (_rematerialize_constants)
                    src = motion.source_bytes(v, eqns, prod, speculative=spec, aval_bytes=aval_bytes)
                    if not motion.inflation_ok(aval_bytes(v.aval), src):
                        bad[k] = ("not cached: an expansion (its result is more than "
                                  f"{motion.MAX_INFLATION:g}x the bytes it is computed from and over "
                                  f"{motion.SMALL_BYTES >> 20} MiB{'; speculative' if spec else ''})")
            if not bad:
                return selected
            for k, reason in bad.items():
                self._skip(eqns[k], reason, cost.out_bytes(eqns[k]), cost.eqn_flops(eqns[k]))
            selected -= set(bad)
            # Whatever read a dropped result cannot move either; a split is all-or-nothing.
            changed = True
            while changed:
                changed = False
                dropped = {v for i, e in enumerate(eqns) if i not in selected for v in e.outvars if is_var(v)}
                for k in sorted(selected):
                    if any(is_var(a) and a in dropped for a in eqns[k].invars):
                        selected.discard(k)
                        changed = True
                for _orig, pre_idx, _post, _split in units:
                    if any(i in selected for i in pre_idx) and not all(i in selected for i in pre_idx):
                        selected.difference_update(pre_idx)
                        changed = True

    def _apply_budget(self, eqns, selected: set, block_outvars) -> set:
        """Keep the groups of hoisted work with the most FLOPs per cached byte within the budget."""
        idx = sorted(selected)
        prod = producers([eqns[k] for k in idx])
        pos = {i: k for i, k in enumerate(idx)}
        root = {k: k for k in idx}     # union-find over the selected equations: a group is a connected component

        def find(k):
            while root[k] != k:
                root[k] = root[root[k]]
                k = root[k]
            return k

        for k in idx:
            for a in eqns[k].invars:
                if is_var(a) and a in prod:
                    root[find(pos[prod[a]])] = find(k)
        components: dict = {}
        for k in idx:
            components.setdefault(find(k), []).append(k)
        needed = set()
        for i, e in enumerate(eqns):
            if i not in selected:
                needed.update(a for a in e.invars if is_var(a))
        needed.update(a for a in block_outvars if is_var(a))
        groups = []
        for comp in components.values():
            cross = [v for k in comp for v in eqns[k].outvars if is_var(v) and v in needed]
            nbytes = sum(aval_bytes(v.aval) for v in cross if v not in self._charged)
            flops = sum(cost.eqn_flops(eqns[k]) for k in comp)
            groups.append((flops / max(nbytes, 1), comp, cross, nbytes, flops))
        groups.sort(key=lambda t: -t[0])
        keep: set = set()
        for _value, comp, cross, nbytes, flops in groups:
            if nbytes <= self.budget_left:
                self.budget_left -= nbytes
                self._charged.update(cross)
                keep.update(comp)
            else:
                name, src = describe(max((eqns[k] for k in comp), key=cost.eqn_flops))
                self.report.skipped.append(Skipped(
                    name, src,
                    f"over the max_cache_bytes budget: needs {human_bytes(nbytes)}, {human_bytes(self.budget_left)} left",
                    nbytes, flops, self.loops[-1].describe() if self.loops else ""))
        return keep

    def _record(self, ext: Extraction) -> None:
        self.report.hoisted.extend(provenance.hoisted_values(ext, self.loops, self.branch_of))


def _rematerialize_constants(hoisted: list, residual: list, outvars: Sequence) -> list:
    """The residual block with its own copies of the constants it reads from the hoisted part.

    A value computed from literals alone by first-order equations (an ``iota``-derived table, a mask
    ``iota < n``, a layer index) is a constant: XLA folds it at compile time, so it is never worth a
    cache. Where the block still needs one, it gets a fresh copy of the equations computing it, and the
    value does not cross the loop boundary.
    """
    prod = producers(hoisted)
    needed = {a for e in residual for a in e.invars if is_var(a)}
    out_set = {a for a in outvars if is_var(a)}
    chosen: set = set()
    for v in [v for e in hoisted for v in e.outvars if is_var(v) and v in needed and v not in out_set]:
        chain = list(ancestors(hoisted, prod, prod[v]))
        if any(compat.subjaxprs_of(hoisted[k]) for k in chain):
            continue
        if all(is_var(a) is False or a in prod for k in chain for a in hoisted[k].invars):
            chosen.update(chain)
    if not chosen:
        return residual
    copies, sub = clone_eqns([hoisted[k] for k in sorted(chosen)], {})
    return copies + [e.replace(invars=[sub.get(a, a) if is_var(a) else a for a in e.invars]) for e in residual]


def _holds_cond(eqn) -> bool:
    """Does ``eqn`` hold a ``cond`` anywhere in its sub-jaxprs (memoised per run)?"""
    def compute() -> bool:
        return any(e.primitive.name == "cond" or _holds_cond(e)
                   for sub in compat.subjaxprs_of(eqn) for e in compat.split_closed(sub)[4])
    return memoized("holds_cond", eqn, compute)


def _is_expansion(eqn) -> bool:
    return (eqn.primitive.name == "broadcast_in_dim" and is_var(eqn.outvars[0])
            and aval_bytes(eqn.outvars[0].aval) > aval_bytes(eqn.invars[0].aval))


def _sink_broadcast(eqn, expansions: dict):
    """``[f(x, ...), broadcast(...)]`` replacing ``f(broadcast(x), ...)``, or ``None``.

    ``f`` is elementwise and every operand is either a scalar literal or the result of an expanding
    broadcast with the same shape, dimensions and operand shape: computing ``f`` on the small operands
    and broadcasting the result is the same value, and the small value is what LICM then caches.
    """
    if eqn.primitive.name not in motion.ELEMENTWISE or eqn.effects or len(eqn.outvars) != 1:
        return None
    if eqn.params.get("sharding") is not None:
        return None
    first, small_in = None, []
    for a in eqn.invars:
        if not is_var(a):
            if getattr(a.aval, "shape", None) != ():
                return None
            small_in.append(a)
            continue
        b = expansions.get(a)
        if b is None:
            return None
        if first is None:
            first = b
        elif (b.params.get("shape") != first.params.get("shape")
              or b.params.get("broadcast_dimensions") != first.params.get("broadcast_dimensions")
              or getattr(b.invars[0].aval, "shape", None) != getattr(first.invars[0].aval, "shape", None)):
            return None
        small_in.append(b.invars[0])
    out = eqn.outvars[0]
    if first is None or not is_var(out) or tuple(out.aval.shape) != tuple(first.outvars[0].aval.shape):
        return None
    small_shape = first.invars[0].aval.shape
    small = compat.new_var(compat.resize_aval(out.aval, small_shape))
    return [eqn.replace(invars=small_in, outvars=[small]), first.replace(invars=[small], outvars=[out])]


def licm(closed_jaxpr: Any, *, max_cache_bytes: int | None = None,
         fission: str = "scan") -> tuple[Any, Report]:
    """Hoist loop-invariant work out of every loop of ``closed_jaxpr``.

    Args:
      closed_jaxpr: e.g. from ``jax.make_jaxpr(fun)(*args)``.
      max_cache_bytes: optional budget for the bytes of hoisted values; the most valuable hoists
        (FLOPs saved per byte) are kept, the rest reported in ``report.skipped``.
      fission: how the invariant part of a nested scan is computed for all its iterations:
        ``"scan"`` (a separate scan of the same length) or ``"vmap"`` (the body slice vectorised
        over the scanned axis: one batched matmul instead of L small ones; falls back to a scan when
        the slice carries state, e.g. a layer counter). See docs/design.md for measurements.
    Returns:
      ``(new_closed_jaxpr, report)``; the new jaxpr computes the same outputs from the same inputs.

    Example:
      >>> closed = jax.make_jaxpr(f)(w, x)
      >>> new, report = licm(closed)
      >>> jax.extend.core.jaxpr_as_fun(new)(w, x)  # same values as f(w, x)
    """
    return Licm(max_cache_bytes=max_cache_bytes, fission=fission).run(closed_jaxpr)
