"""Before/after jaxprs as a readable diff: alignment, the summary table, the unified and side-by-side views.

Both jaxprs are rendered to lines by :mod:`kvhoist.tools.jaxpr_lines` (one equation per line, 40-layer
programs folded, equations that left a loop marked ``moved`` / ``hoisted``); the diff aligns the lines on
their keys (variables replaced by types, so renumbering is no change). The summary's counts come from
:mod:`kvhoist.tools.diff_summary`, the HTML page from :mod:`kvhoist.tools.diff_html`.

Example:
    >>> d = JaxprDiff(before, after, report)
    >>> print(d.summary_table())
    >>> print(d.unified(color=False))
    >>> open("diff.html", "w").write(d.html(title="tiny-t2v"))
"""

from __future__ import annotations

import difflib
from typing import Any, Sequence

from kvhoist.analysis import cost
from kvhoist.report import COLUMN_NAMES, COLUMNS_DOC, Report, format_rows, hoisted_rows, human_bytes, human_flops
from kvhoist.tools import diff_html
from kvhoist.tools.diff_summary import count_eqns, dots_per_step, flops_per_step, group_hoisted, step_loop
from kvhoist.tools.jaxpr_lines import Line, Renderer, moved_marks

__all__ = ["JaxprDiff", "SIDE_BY_SIDE_GUTTER", "SIDE_BY_SIDE_LEGEND", "count_eqns", "dots_per_step",
           "flops_per_step", "group_hoisted", "step_loop"]


#: The gutter of :meth:`JaxprDiff.side_by_side` between its two columns (header line), and its legend.
SIDE_BY_SIDE_GUTTER = "  |  "
SIDE_BY_SIDE_LEGEND = ("gutter: '|' changed, '<' only before, '>' only after; M = moved out of its loop, "
                       "H = hoisted in front of it")


class JaxprDiff:
    """The diff of two closed jaxprs (before / after the kvhoist pipeline) and its renderers.

    Args:
      before, after: closed jaxprs.
      report: the pipeline's :class:`~kvhoist.Report` (for the summary), or None.
      full: expand folded blocks and call bodies.
      context: context lines around each change in the unified / side-by-side views.
    """

    def __init__(self, before: Any, after: Any, report: Report | None = None, *, full: bool = False,
                 context: int = 3):
        self.before, self.after, self.report = before, after, report
        self.full, self.context = full, context
        mb, ma = moved_marks(before, after)
        self.moved_count, self.hoisted_count = len(mb), len(ma)
        self.left = Renderer(full=full, marks=mb).render(before)
        self.right = Renderer(full=full, marks=ma).render(after)
        self._ops = difflib.SequenceMatcher(None, self._keys(self.left), self._keys(self.right),
                                            autojunk=False).get_opcodes()

    @staticmethod
    def _keys(lines: Sequence[Line]) -> list[str]:
        # The indent is part of the key: an equation that moved out of a loop is a change, not context.
        return [f"{x.indent}|{x.key}" for x in lines]

    # -- summary ---------------------------------------------------------------------------------
    def summary_rows(self) -> list[tuple[str, str, str]]:
        """``(label, before, after)`` rows of the summary table."""
        b, a = self.before, self.after
        rows = [("equations (all levels)", f"{count_eqns(b):,}", f"{count_eqns(a):,}"),
                ("dot_general equations", f"{cost.count_primitives(b, 'dot_general'):,}",
                 f"{cost.count_primitives(a, 'dot_general'):,}")]
        loop = step_loop(b)
        db, da = dots_per_step(b), dots_per_step(a, like=loop)
        if db is not None:
            rows.append(("dots per step", f"{db:,}", f"{da:,}" if da is not None else "?"))
            rows.append(("FLOPs per step", human_flops(flops_per_step(b)),
                         human_flops(flops_per_step(a, like=loop))))
        rb, ra = cost.jaxpr_flops_run(b), cost.jaxpr_flops_run(a)
        rows.append(("FLOPs per run", human_flops(rb), human_flops(ra)))
        if rb.per_iteration or ra.per_iteration:
            rows.append(("FLOPs per iteration of while loops", human_flops(rb.per_iteration),
                         human_flops(ra.per_iteration)))
        rows.append(("equations moved out of a loop", "", f"{self.hoisted_count:,}"))
        if self.report is not None:
            cache = human_bytes(self.report.cache_bytes)
            rows.append(("hoisted values (cache)", "", f"{len(self.report.hoisted)} ({cache})"))
        return rows

    def summary_table(self, max_values: int = 12) -> str:
        """The summary as text: counts before/after, then the hoisted values grouped by layer-free name."""
        rows = [("", "before", "after")] + self.summary_rows()
        w0 = max(len(r[0]) for r in rows)
        w1 = max(len(r[1]) for r in rows)
        out = [f"{r[0]:<{w0}}  {r[1]:>{w1}}  {r[2]}".rstrip() for r in rows]
        if self.report is not None and self.report.hoisted:
            out.append("hoisted:")
            groups = group_hoisted(self.report.hoisted)
            rows = [COLUMN_NAMES] + hoisted_rows(groups[:max_values], self.report.total_flops_before)
            out += ["  " + line for line in format_rows(rows).splitlines()]
            if len(groups) > max_values:
                out.append(f"  ... {len(groups) - max_values} more (kvhoist report lists all)")
            out.append(f"  (columns: {COLUMNS_DOC})")
        return "\n".join(out)

    # -- unified -----------------------------------------------------------------------------------
    def unified(self, *, color: bool = False, names: tuple[str, str] = ("before", "after")) -> str:
        """A unified diff (``-``/``+``, ``@@`` hunks); moved lines end in ``<< moved`` / ``>> hoisted``."""
        c = _Colors(color)
        out = [c.bold(f"--- {names[0]}"), c.bold(f"+++ {names[1]}")]
        for group in self._hunks():
            i1, i2, j1, j2 = group[0][1], group[-1][2], group[0][3], group[-1][4]
            out.append(c.cyan(f"@@ -{i1 + 1},{i2 - i1} +{j1 + 1},{j2 - j1} @@"))
            for tag, a1, a2, b1, b2 in group:
                if tag == "equal":
                    out += [" " + x.render() for x in self.right[b1:b2]]
                    continue
                for x in self.left[a1:a2]:
                    out.append(c.moved("-" + x.render() + "  << moved out of loop") if x.mark
                               else c.red("-" + x.render()))
                for x in self.right[b1:b2]:
                    out.append(c.hoisted("+" + x.render() + "  >> hoisted") if x.mark
                               else c.green("+" + x.render()))
        if len(out) == 2:
            out.append("(no differences)")
        return "\n".join(out)

    def _hunks(self) -> list:
        if self.full:
            return [self._ops] if self._ops else []
        return list(difflib.SequenceMatcher(None, self._keys(self.left), self._keys(self.right),
                                            autojunk=False).get_grouped_opcodes(self.context))

    # -- side by side --------------------------------------------------------------------------------
    def side_by_side(self, *, width: int = 200, color: bool = False) -> str:
        """Two columns, before and after, aligned; only the hunks unless ``full``.

        A five-character gutter between the columns marks every line, so the view reads the same without
        colour (``NO_COLOR``, a pipe): the middle character is ``diff -y``'s (blank: same, ``|``:
        changed, ``<``: only before, ``>``: only after); ``M`` left of it marks an equation that moved
        out of its loop, ``H`` right of it the same equation hoisted in front of the loop.
        """
        c = _Colors(color)
        col = max(20, (width - len(SIDE_BY_SIDE_GUTTER)) // 2)

        def cell(x: Line | None, fn) -> str:
            if x is None:
                return " " * col
            s = x.render()
            s = s if len(s) <= col else s[:col - 1] + "…"
            return fn(s.ljust(col))

        def gutter(x: Line | None, y: Line | None, tag: str) -> str:
            if tag == "equal":
                return "     "
            mid = "<" if y is None else (">" if x is None else "|")
            return f" {'M' if x is not None and x.mark else ' '}{mid}{'H' if y is not None and y.mark else ' '} "

        out = [c.bold("before".ljust(col) + SIDE_BY_SIDE_GUTTER + "after"),
               f"({SIDE_BY_SIDE_LEGEND})"]
        for group in self._hunks():
            out.append(c.cyan("-" * col + "--+--" + "-" * col))
            for tag, a1, a2, b1, b2 in group:
                n = max(a2 - a1, b2 - b1)
                for k in range(n):
                    x = self.left[a1 + k] if a1 + k < a2 else None
                    y = self.right[b1 + k] if b1 + k < b2 else None
                    if tag == "equal":
                        out.append((cell(x, str) + gutter(x, y, tag) + cell(y, str)).rstrip())
                        continue
                    fl = c.moved if (x is not None and x.mark) else c.red
                    fr = c.hoisted if (y is not None and y.mark) else c.green
                    out.append((cell(x, fl) + gutter(x, y, tag) + cell(y, fr)).rstrip())
        return "\n".join(out)
    # -- HTML ------------------------------------------------------------------------------------------
    @property
    def ops(self) -> list:
        """``difflib`` opcodes aligning :attr:`left` with :attr:`right` (every line, no context cut)."""
        return self._ops

    def html(self, *, title: str = "kvhoist diff", description: str = "") -> str:
        """A self-contained HTML page: summary, report, and the two jaxprs aligned side by side
        (:func:`kvhoist.tools.diff_html.page`).

        Moved equations carry the CSS class ``moved`` on both sides (plus ``hoisted`` on the after
        side); long unchanged stretches are collapsed in ``<details>`` elements.
        """
        return diff_html.page(self, title=title, description=description)


class _Colors:
    """ANSI colours, or identity functions when disabled."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def _wrap(self, code: str, s: str) -> str:
        return f"\x1b[{code}m{s}\x1b[0m" if self.enabled else s

    def red(self, s: str) -> str:
        return self._wrap("31", s)

    def green(self, s: str) -> str:
        return self._wrap("32", s)

    def cyan(self, s: str) -> str:
        return self._wrap("36", s)

    def bold(self, s: str) -> str:
        return self._wrap("1", s)

    def moved(self, s: str) -> str:
        return self._wrap("33", s)

    def hoisted(self, s: str) -> str:
        return self._wrap("1;33", s)
