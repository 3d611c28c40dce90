"""What the diff's summary table counts: the step loop of a program, its dots and FLOPs per step, equation
counts, and the hoisted values grouped by layer-free name.

``kvhoist report`` and ``kvhoist compile`` use :func:`step_loop` too (the loop whose per-step work they
compare before and after).

Example:
    >>> loop = step_loop(before)
    >>> dots_per_step(before), dots_per_step(after, like=loop)
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

from kvhoist import compat
from kvhoist.analysis import cost
from kvhoist.tools.jaxpr_lines import LOOPS, walk

__all__ = ["count_eqns", "dots_per_step", "flops_per_step", "group_hoisted", "step_loop"]

def _loops(j: Any) -> list[Any]:
    """The outermost loop equations of a program (looking through calls and conds)."""
    found = []
    for e in compat.split_closed(j)[4]:
        if e.primitive.name in LOOPS:
            found.append(e)
        else:
            for s in compat.subjaxprs_of(e):
                found += _loops(s)
    return found


def step_loop(j: Any, like: Any | None = None) -> Any | None:
    """The sampler's step loop among the outermost loops of a program.

    A step loop carries state from one iteration to the next, so loops without a carry (a scan that
    fission put in front of the step loop to compute every layer's K/V is a map) are passed over when a
    carrying loop exists. A ``while`` is preferred next: its trip count is unknown, so its FLOPs per run
    cannot be compared with a scan's, and a ``while`` at the top level of a sampler or decoder is its
    step loop. Otherwise the scan doing the most work per run wins. With ``like`` (the step loop of the
    program before a rewrite) the outermost loop of the same kind from the same source line is taken
    when there is one, so before and after are compared on the same loop.
    """
    loops = _loops(j)
    if not loops:
        return None
    if like is not None:
        same = [e for e in loops if e.primitive.name == like.primitive.name
                and compat.source_line(e) == compat.source_line(like)]
        if same:
            loops = same
    return max(loops, key=lambda e: (_carries(e), e.primitive.name == "while", cost.eqn_flops(e)))


def _carries(loop: Any) -> bool:
    return loop.primitive.name == "while" or int(loop.params.get("num_carry", 0)) > 0


def _body(loop: Any) -> Any:
    return loop.params["jaxpr"] if loop.primitive.name == "scan" else loop.params["body_jaxpr"]


def dots_per_step(j: Any, like: Any | None = None) -> int | None:
    """``dot_general`` executions in one iteration of the step loop (inner scans multiplied);
    ``like`` as in :func:`step_loop`."""
    loop = step_loop(j, like)
    if loop is None:
        return None
    return cost.count_primitives(_body(loop), "dot_general", multiply_trips=True)


def flops_per_step(j: Any, like: Any | None = None) -> int | None:
    """FLOPs of one iteration of the step loop (:func:`step_loop`), or None without a loop."""
    loop = step_loop(j, like)
    return None if loop is None else cost.jaxpr_flops(_body(loop))


def count_eqns(j: Any) -> int:
    """Equations of a jaxpr at every nesting level."""
    return sum(1 for _ in walk(j))


def group_hoisted(hoisted: Sequence[Any]) -> list[Any]:
    """Hoisted values grouped by name with layer numbers replaced by ``#`` (``blocks/#/attn2/to_k``) and by
    branch (two experts' K/V stay apart).

    Returns :class:`~kvhoist.report.HoistedValue` s named ``'blocks/#/attn2/to_k ×40'`` for groups of more
    than one, bytes and FLOPs summed over the group (``flops_saved`` None when any member's is unknown),
    so they render with the same columns as everything else (:func:`kvhoist.report.hoisted_rows`).
    """
    groups: dict = {}
    for h in hoisted:
        name = re.sub(r"(^|/)\d+(?=/|$)", r"\1#", h.name)
        key = (name, h.branch, h.loop)
        if key not in groups:
            groups[key] = [dataclasses.replace(h, name=name), 1]
            continue
        g, n = groups[key]
        saved = None if (g.flops_saved is None or h.flops_saved is None) else g.flops_saved + h.flops_saved
        groups[key] = [dataclasses.replace(g, bytes=g.bytes + h.bytes, flops_saved=saved,
                                           flops_per_iteration=g.flops_per_iteration + h.flops_per_iteration,
                                           upper_bound=g.upper_bound or h.upper_bound), n + 1]
    return [dataclasses.replace(g, name=f"{g.name} ×{n}") if n > 1 else g for g, n in groups.values()]

