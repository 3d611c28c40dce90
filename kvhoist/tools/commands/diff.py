"""``kvhoist diff``: the summary table, then the unified / side-by-side diff of the traced and rewritten
jaxprs; ``--html`` writes a page."""

from __future__ import annotations

import argparse
import sys
import time

from kvhoist.tools.commands import common

__all__ = ["run"]


def run(args: argparse.Namespace) -> int:
    """``kvhoist diff``: summary table, then the unified / side-by-side diff; ``--html`` page."""
    from kvhoist.tools.diff import JaxprDiff

    prog = common.program(args)
    t0 = time.perf_counter()
    before, after, report = prog.optimize()
    d = JaxprDiff(before, after, report, full=args.full, context=args.context)
    color = common.use_color(args.color, sys.stdout)
    out = []
    if not args.no_summary:
        out += [prog.description, f"(traced and rewritten in {time.perf_counter() - t0:.1f} s)", "",
                d.summary_table(), ""]
    if args.side_by_side:
        import shutil

        out.append(d.side_by_side(width=args.columns or shutil.get_terminal_size((200, 40)).columns, color=color))
    else:
        out.append(d.unified(color=color, names=(f"{args.spec} (traced)", f"{args.spec} (kvhoist)")))
    print("\n".join(out))
    if args.html:
        page = d.html(title=f"kvhoist diff {args.spec}", description=prog.description)
        with common.writing("--html", args.html):
            with open(args.html, "w", encoding="utf-8") as f:
                f.write(page)
        print(f"wrote {args.html}", file=sys.stderr)
    return 0
