"""``kvhoist report``: what was hoisted, what it costs and saves (tables, or JSON with ``--json``)."""

from __future__ import annotations

import argparse
import re
from typing import Any

from kvhoist.tools.commands import common

__all__ = ["run", "report_dict", "totals_lines", "kv_projection_flops"]

_KV_SCOPE = re.compile(r"(attn2/(to_k|to_v|add_k_proj|add_v_proj))(/|$)")


def kv_projection_flops(closed: Any) -> Any:
    """FLOPs of the cross-attention K/V projections (``attn2/to_k|to_v|add_k_proj|add_v_proj`` matmuls)
    in one run of a program, counted as the program's totals are (:func:`kvhoist.analysis.cost.jaxpr_flops_run`:
    scan trip counts multiplied, a ``cond`` its costliest branch, a ``while`` body per iteration in
    ``.per_iteration``)."""
    from kvhoist import compat
    from kvhoist.analysis import cost

    def kv(e: Any) -> int:
        return cost.eqn_flops(e) if e.primitive.name == "dot_general" and _KV_SCOPE.search(compat.name_stack(e)) else 0

    return cost.jaxpr_flops_run(closed, kv)


def _ratio(part: int | None, whole: int | None) -> float | None:
    return part / whole if (part is not None and whole) else None


def report_dict(prog: Any, before: Any, after: Any, report: Any) -> dict:
    """The ``report`` command's data: :meth:`~kvhoist.Report.to_dict` plus each value's ``share_of_run``
    (the 'share of run' column), the program's step count and the K/V projections' share of its FLOPs."""
    from kvhoist.tools.diff import step_loop

    loop = step_loop(before)
    steps = int(loop.params["length"]) if loop is not None and loop.primitive.name == "scan" else None
    total = report.total_flops_before
    kv = kv_projection_flops(before)
    d = report.to_dict()
    for row in d["hoisted"]:
        row["share_of_run"] = _ratio(row["flops_saved"], total)
    d["program"] = {"spec": prog.name, "description": prog.description, "real_size": prog.real_size,
                    "steps": steps}
    d["totals"]["kv_projection_flops"] = int(kv)
    d["totals"]["kv_projection_share"] = _ratio(int(kv), total)
    d["totals"]["kv_projection_flops_per_unknown_iteration"] = kv.per_iteration
    d["totals"]["kv_projection_share_of_unknown_iteration"] = _ratio(kv.per_iteration,
                                                                     report.unknown_trip_flops_before)
    return d


def totals_lines(d: dict) -> list[str]:
    """The totals under ``kvhoist report``'s table: FLOPs per run before/after (and per iteration of loops
    with an unknown trip count, counted apart), then the one-line summary."""
    from kvhoist.report import human_flops

    t, steps = d["totals"], d["program"]["steps"]
    before, after = t["total_flops_before"], t["total_flops_after"]
    line = f"program: {human_flops(before)} FLOPs per run before, {human_flops(after)} after"
    if steps:
        line += f" ({steps} steps, {human_flops((before or 0) / steps)} per step before)"
    out = [line]
    ib, ia = t["unknown_trip_flops_before"], t["unknown_trip_flops_after"]
    if ib or ia:
        out[0] += " outside while loops (work hoisted out of one runs once per run, in front of it)"
        out.append(f"         + {human_flops(ib)} FLOPs per iteration of loops with an unknown trip count (while) "
                   f"before, {human_flops(ia)} after")
    return out


def run(args: argparse.Namespace) -> int:
    """``kvhoist report``: the hoisting report as tables (``--json``: :func:`report_dict`)."""
    import json

    from kvhoist.report import percent

    prog = common.program(args)
    before, after, report = prog.optimize()
    d = report_dict(prog, before, after, report)
    if args.json:
        print(json.dumps(d, indent=2, default=str))
        return 0
    t = d["totals"]
    out = [prog.description, "", report.hoisted_table()]
    details = report.detail_lines()
    if details:
        out += [""] + details
    out += [""] + totals_lines(d) + ["hoisted: " + report.summary().removeprefix("hoisted ")]
    if t["kv_projection_flops"] or t["kv_projection_flops_per_unknown_iteration"]:
        shares = []
        if t["kv_projection_flops"]:
            shares.append(f"{percent(t['kv_projection_share'])} of this sampler's FLOPs per run")
        if t["kv_projection_flops_per_unknown_iteration"]:
            shares.append(f"{percent(t['kv_projection_share_of_unknown_iteration'])} of each iteration of its while "
                          "loop(s)")
        out.append(f"K/V projections are {' and '.join(shares)}; hoisting saves at most that (plus the context "
                   f"embedders it also moved).")
    if any(h.get("upper_bound") for h in d["hoisted"]):
        out.append("Values speculated out of a cond (two experts) are counted as if their branch ran every step: "
                   "their 'saved' figures are upper bounds; each step runs one branch.")
    elif any("speculation" in h["via"] for h in d["hoisted"]):
        out.append("Values speculated out of a cond (two experts, see 'branch'): 'FLOPs saved/run' counts each "
                   "branch's own runs, replayed from the static schedule (see the [speculation] note); a branch "
                   "that runs once saves nothing per run, though its FLOPs/iteration left the loop.")
    if prog.real_size:
        out.append("These are real-size numbers: at full resolution self-attention and the FFN dominate, so the "
                   "gain from hoisting is small; the cache costs memory.")
    else:
        out.append("(A tiny/user program: its shares do not represent a real checkpoint; use a full-size preset "
                   "for those.)")
    print("\n".join(out))
    return 0
