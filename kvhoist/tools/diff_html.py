"""The HTML page of ``kvhoist diff --html``: summary, report, and the two jaxprs aligned side by side.

Moved equations carry the CSS class ``moved`` on both sides (plus ``hoisted`` on the after side); long
unchanged stretches are collapsed in ``<details>`` elements. The page is built from a
:class:`kvhoist.tools.diff.JaxprDiff` (its aligned lines, opcodes and summary rows), which calls :func:`page`.

Example:
    >>> open("diff.html", "w").write(JaxprDiff(before, after, report).html(title="tiny-t2v"))
"""

from __future__ import annotations

import html as _html
from typing import Any

from kvhoist.report import COLUMNS, COLUMNS_DOC, Report
from kvhoist.tools.jaxpr_lines import Line

__all__ = ["page"]


def page(diff: Any, *, title: str = "kvhoist diff", description: str = "") -> str:
    """A self-contained HTML page of a :class:`kvhoist.tools.diff.JaxprDiff`.

    Args:
      diff: the diff (its ``left`` / ``right`` lines, ``ops`` opcodes, ``context``, ``full``, ``report``,
        ``summary_rows()`` and moved / hoisted counts).
      title: the page's title and heading.
      description: a paragraph under the heading.

    Returns:
      The page's HTML.
    """
    esc = _html.escape
    rows = []
    for tag, a1, a2, b1, b2 in diff.ops:
        if tag == "equal" and (a2 - a1) > 2 * diff.context + 4 and not diff.full:
            k = diff.context
            rows += [_row(diff.left[a1 + i], diff.right[b1 + i], "same") for i in range(k)]
            hidden = "".join(_row(diff.left[a1 + i], diff.right[b1 + i], "same")
                             for i in range(k, a2 - a1 - k))
            rows.append(f'<tr><td colspan="2"><details><summary>{a2 - a1 - 2 * k} unchanged lines</summary>'
                        f'<table class="inner">{hidden}</table></details></td></tr>')
            rows += [_row(diff.left[a2 - k + i], diff.right[b2 - k + i], "same") for i in range(k)]
            continue
        n = max(a2 - a1, b2 - b1)
        for i in range(n):
            x = diff.left[a1 + i] if a1 + i < a2 else None
            y = diff.right[b1 + i] if b1 + i < b2 else None
            rows.append(_row(x, y, "same" if tag == "equal" else "changed"))
    summary = "".join(f"<tr><th>{esc(a)}</th><td>{esc(b)}</td><td>{esc(c)}</td></tr>"
                      for a, b, c in [("", "before", "after")] + diff.summary_rows())
    report = _report_html(diff.report) if diff.report is not None else ""
    return _HTML.format(title=esc(title), description=esc(description), summary=summary, report=report,
                        rows="\n".join(rows), moved=diff.moved_count, hoisted=diff.hoisted_count)


def _row(x: Line | None, y: Line | None, kind: str) -> str:
    def td(line: Line | None, side: str) -> str:
        if line is None:
            return '<td class="empty"></td>'
        cls = [side, kind if kind == "same" else ("del" if side == "before" else "add")]
        if line.mark:
            cls += ["moved"] + (["hoisted"] if side == "after" else [])
        if line.kind == "fold":
            cls.append("fold")
        text = _html.escape(line.render())
        return f'<td class="{" ".join(cls)}"><pre>{text}</pre></td>'

    return f"<tr>{td(x, 'before')}{td(y, 'after')}</tr>"


def _report_html(report: Report) -> str:
    """The report on the HTML page: the hoisted values as a table with the shared columns (each header's
    meaning as its tooltip), skipped candidates and notes, the one-line summary, and where the columns are
    documented."""
    esc = _html.escape
    meaning = dict(COLUMNS)
    parts = ['<h2>hoisted values</h2>']
    if report.hoisted:
        header, *rows = report.rows()
        parts.append('<table class="report"><tr>' + "".join(f'<th title="{esc(meaning[c])}">{esc(c)}</th>'
                                                             for c in header) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows]
        parts.append("</table>")
    else:
        parts.append("<p>nothing was hoisted</p>")
    details = report.detail_lines()
    if details:
        parts.append(f'<pre class="report">{esc(chr(10).join(details))}</pre>')
    parts.append(f'<p class="summary">{esc(report.summary())}</p>')
    parts.append(f'<p class="columns">Columns are explained in <a href="{esc(COLUMNS_DOC)}">{esc(COLUMNS_DOC)}</a> '
                 f'(hover a header for its meaning).</p>')
    return "\n".join(parts)


_HTML = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1em; }}
pre {{ margin: 0; font-family: ui-monospace, monospace; font-size: 12px; white-space: pre-wrap;
       overflow-wrap: anywhere; }}
table.diff, table.inner {{ border-collapse: collapse; width: 100%; table-layout: fixed; }}
table.diff td {{ vertical-align: top; overflow: hidden; padding: 0 4px; border-right: 1px solid #ddd; }}
td.del {{ background: #ffecec; }} td.add {{ background: #eaffea; }} td.empty {{ background: #f6f6f6; }}
td.moved {{ background: #fff3b0; outline: 1px solid #e0b000; }}
td.moved.hoisted {{ background: #ffe07a; font-weight: bold; }}
td.fold pre {{ color: #666; font-style: italic; }}
table.summary td, table.summary th {{ padding: 2px 10px; text-align: right; }}
table.summary th {{ text-align: left; }}
table.report {{ border-collapse: collapse; font-size: 12px; }}
table.report td, table.report th {{ padding: 2px 8px; border-bottom: 1px solid #eee; text-align: left; }}
.legend span {{ padding: 2px 6px; margin-right: 8px; }}
</style></head><body>
<h1>{title}</h1>
<p>{description}</p>
<table class="summary">{summary}</table>
<p class="legend"><span class="moved" style="background:#fff3b0">moved out of a loop ({moved})</span>
<span class="moved hoisted" style="background:#ffe07a">hoisted in front of it ({hoisted})</span>
<span style="background:#ffecec">removed</span><span style="background:#eaffea">added</span></p>
{report}
<table class="diff"><colgroup><col style="width:50%"><col style="width:50%"></colgroup>
<tr><th>before</th><th>after</th></tr>
{rows}
</table>
<script>
// Record what the browser actually rendered for the first moved line (tests read it from the DOM).
(function () {{
  var m = document.querySelector("td.moved");
  document.body.setAttribute("data-moved-count", document.querySelectorAll("td.moved").length);
  if (m) document.body.setAttribute("data-moved-background", getComputedStyle(m).backgroundColor);
  // Lines wider than their column would be clipped: with pre-wrap there must be none.
  var clipped = 0;
  document.querySelectorAll("table.diff pre").forEach(function (p) {{
    if (p.scrollWidth > p.clientWidth + 1) clipped += 1;
  }});
  document.body.setAttribute("data-clipped-lines", clipped);
}})();
</script></body></html>
"""
