"""``kvhoist graph``: the dependence graph of the hoisted values, as DOT or SVG."""

from __future__ import annotations

import argparse
import sys

from kvhoist.tools.commands import common

__all__ = ["run"]


def run(args: argparse.Namespace) -> int:
    """``kvhoist graph``: the dependence graph of the hoisted values to ``--out``."""
    from kvhoist.tools.graph import hoisted_graph, write_graph

    prog = common.program(args)
    before, after, _report = prog.optimize()
    g = hoisted_graph(before, after, input_names=prog.input_names())
    with common.writing("--out", args.out):
        path, message = write_graph(g, args.out, title=args.spec)
    print(message, file=sys.stderr if path != args.out else sys.stdout)
    return 0
