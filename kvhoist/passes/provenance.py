"""What the report says about a hoisted value: its FLOPs, name, source, primitives and how it got out.

The LICM engine (:mod:`kvhoist.passes.licm`) decides what moves; this module describes it. A hoisted value is named
after the closest matmul / convolution behind it (not a shared embedder further up), is charged the FLOPs of the work
behind it, each equation once per loop (two values sharing a fissioned scan's body matmul, K and K.T, do not both
count it, so the report's share never exceeds 100%), and carries the rewrite kinds it came through (``via``).
"""

from __future__ import annotations

import collections
from typing import Any, Sequence

from kvhoist import compat, speculation
from kvhoist.analysis import cost
from kvhoist.ir import aval_bytes, is_var, memoized, producers
from kvhoist.report import HoistedValue
from kvhoist.rules.base import Extraction, LoopInfo


def via_kinds(hoisted: list, crossing: list, kept_units: list, eqns: list) -> dict:
    """``{crossing var: ("licm", rewrite kinds...)}``: how each value got out (fission, speculation, call)."""
    kinds_of_eqn = {}
    for _orig, pre_idx, _post, split in kept_units:
        for i in pre_idx:
            kinds_of_eqn[id(eqns[i])] = {split.kind} | set(split.nested)
    prod = producers(hoisted)
    via = {}
    for v in crossing:
        kinds = set()
        for k in ancestors(hoisted, prod, prod[v]):
            kinds.update(kinds_of_eqn.get(id(hoisted[k]), ()))
        via[v] = ("licm",) + tuple(sorted(kinds))
    return via


def hoisted_values(ext: Extraction, loops: Sequence, branch_of: dict) -> list:
    """The report's :class:`HoistedValue` entries for what ``ext`` moves out of the innermost of ``loops``.

    ``branch_of``: id(speculated equation) -> (eqn, id(cond eqn), branch, runs or None, cond source).
    """
    out: list = []
    loop = loops[-1] if loops else LoopInfo("loop", None, "")
    outer = 1
    for info in loops[:-1]:
        outer = None if (outer is None or info.trip_count is None) else outer * info.trip_count
    prod = producers(ext.hoisted)
    claimed: set = set()
    # Speculated work is wrapped one equation per kvhoist_speculate: report the equation itself.
    view = [speculation.unwrap(e) for e in ext.hoisted]
    for v in ext.crossing:
        flops, prims, best = _provenance(view, prod, v, claimed)
        nearest = _nearest_work(view, prod, v)
        main = _deepest(nearest or best) if (nearest or best) is not None else None
        name, src = describe(main) if main is not None else ("", "")
        trips = loop.trip_count
        saved = None if (trips is None or outer is None) else flops * max(trips - 1, 0) * outer
        via = ext.via.get(v, ("licm",))
        upper = "speculation" in via
        branch = ""
        if upper:
            info = _branch_of(branch_of, ext.hoisted, prod, v)
            runs = None if info is None else info[1]
            if info is not None:
                branch = f"branch {info[0]} of cond" + (f" at {info[2]}" if info[2] else "")
            if runs is not None and outer is not None:
                # Exact: the branch ran `runs` times before, once now (a loss if it never ran).
                saved, upper = flops * (runs - 1) * outer, False
        out.append(HoistedValue(
            name=name or "(unnamed)", source=src, shape=tuple(int(d) for d in v.aval.shape),
            dtype=str(v.aval.dtype), bytes=aval_bytes(v.aval), flops_per_iteration=int(flops),
            trip_count=trips, flops_saved=saved, loop=loop.describe(), via=via,
            primitives=prims, upper_bound=upper,
            stack=compat.source_stack(main) if main is not None else (), branch=branch))
    return out


def _branch_of(branch_of: dict, hoisted, prod, v) -> tuple | None:
    """``(branch index, runs or None, cond source)`` of the one cond branch ``v`` was speculated out of."""
    infos = {branch_of[id(hoisted[k])][1:] for k in ancestors(hoisted, prod, prod[v])
             if id(hoisted[k]) in branch_of}
    if len(infos) != 1:
        return None
    _cond, branch, runs, src = next(iter(infos))
    return branch, runs, src


def ancestors(eqns, prod, start: int):
    """Indices of ``eqns[start]`` and every equation it transitively reads, each once."""
    stack, seen = [start], set()
    while stack:
        k = stack.pop()
        if k in seen:
            continue
        seen.add(k)
        yield k
        stack.extend(prod[a] for a in eqns[k].invars if is_var(a) and a in prod)


def _provenance(hoisted, prod, v, claimed: set):
    """FLOPs, primitive counts and the most expensive equation behind ``v`` (each eqn counted once).

    A scan behind ``v`` (a fissioned layer scan) is charged only the body work behind the outputs that
    lead to ``v``, each body equation once across all values: two stacked values sharing a body matmul
    (K and K.T) do not both count it, so the report's share never exceeds the program's FLOPs.
    """
    flops = 0
    prims: dict = {}
    best, best_flops = None, -1
    anc = list(ancestors(hoisted, prod, prod[v]))
    read = {a for k in anc for a in hoisted[k].invars if is_var(a)} | {v}
    for k in anc:
        e = hoisted[k]
        part = _scan_output_part(e, [o for o in e.outvars if o in read], claimed, k)
        if part is not None:
            f, p, best_eqn, f_best = part
            flops += f
            for name, n in p.items():
                prims[name] = prims.get(name, 0) + n
        else:
            f = cost.eqn_flops(e)
            if k not in claimed:
                claimed.add(k)
                flops += f
                for name, n in cost.primitive_counts(e).items():
                    prims[name] = prims.get(name, 0) + n
            best_eqn, f_best = e, f
        if f_best > best_flops:
            best, best_flops = best_eqn, f_best
    return flops, prims, best


def _scan_output_part(eqn, outs, claimed: set | None = None, key: Any = None):
    """``(FLOPs, primitive counts, main equation, all FLOPs)`` of the body work behind some outputs of a scan.

    Body equations already in ``claimed`` (as ``("scan", key, index)``) are not charged again; the others are
    claimed. ``None`` when ``eqn`` is not a scan or produces none of ``outs``.
    """
    if eqn.primitive.name != "scan":
        return None
    idx = [i for i, o in enumerate(eqn.outvars) if any(o is v for v in outs)]
    if not idx:
        return None
    jaxpr = eqn.params["jaxpr"]
    length = int(eqn.params["length"])
    flops, total, prims, best, best_f = 0, 0, {}, None, -1
    seen: set = set()
    for i in idx:
        # A fissioned scan is cloned into every loop it rises out of, its body shared: its work per output is
        # walked once per run, not once per enclosing loop.
        for k, e, f in memoized(f"scan_output_work_{i}", jaxpr, lambda i=i: _output_work(jaxpr, i)):
            if k in seen:
                continue
            seen.add(k)
            total += f
            if f > best_f:
                best, best_f = e, f
            if claimed is not None:
                if ("scan", key, k) in claimed:
                    continue
                claimed.add(("scan", key, k))
            flops += f
            for name, n in cost.primitive_counts(e).items():
                prims[name] = prims.get(name, 0) + n * length
    return flops * length, prims, best, total * length


def _output_work(jaxpr: Any, i: int) -> tuple:
    """``((index, eqn, FLOPs), ...)`` of the body equations behind output ``i`` of a scan body ``jaxpr``."""
    _cv, _c, _iv, outvars, body = compat.split_closed(jaxpr)
    bprod = producers(body)
    target = outvars[i]
    if not is_var(target) or target not in bprod:
        return ()
    return tuple((k, body[k], cost.eqn_flops(body[k])) for k in ancestors(body, bprod, bprod[target]))


def _nearest_work(hoisted, prod, v):
    """The closest matmul/conv behind ``v`` (breadth first): the value's own projection, not the
    shared embedder that feeds every layer's projection."""
    queue, seen = collections.deque([prod[v]]), set()
    while queue:
        k = queue.popleft()
        if k in seen:
            continue
        seen.add(k)
        e = hoisted[k]
        part = _scan_output_part(e, [v]) if k == prod[v] else None
        if part is not None and part[2] is not None:
            return part[2]
        if e.primitive.name in cost.COUNTED or (cost.primitive_counts(e) and e.primitive.name != "scan"):
            return e
        queue.extend(prod[a] for a in e.invars if is_var(a) and a in prod)
    return None


def describe(eqn) -> tuple[str, str]:
    return compat.name_stack(eqn) or eqn.primitive.name, compat.source_line(eqn)


def _deepest(eqn):
    """The most expensive leaf equation under ``eqn`` (inside a fissioned scan, say)."""
    while True:
        subs = compat.subjaxprs_of(eqn)
        if not subs:
            return eqn
        inner = []
        for s in subs:
            inner.extend(compat.split_closed(s)[4])
        if not inner:
            return eqn
        eqn = max(inner, key=cost.eqn_flops)
