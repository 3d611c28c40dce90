"""Before/after jaxprs as a readable diff: a line renderer, folding, moved-equation marks, renderers.

A jaxpr is rendered one equation per line, sub-jaxprs indented under the equation that holds them,
each line ending in its ``named_scope`` path and source line. Variables get short names (``a``, ``b``,
... ``ba``) in order of definition; the diff itself aligns lines on a *key* in which every variable is
replaced by its type (``bf16[2,512,5120]``), so renumbering does not turn every line into a change.

Equations that left a loop are found by counting each key per *loop depth* (how many ``scan`` /
``while`` bodies enclose the line) before and after: a key that lost occurrences at one depth and
gained them at a shallower one is a moved equation — marked ``moved`` on the before side and
``hoisted`` on the after side (the HTML page uses those as CSS classes).

Folding keeps 40-layer programs readable: consecutive groups of equations named ``blocks/<i>/...``
that are identical to the first group up to variable names become one line, ``… 39 more blocks like
blocks/0 (folded; --full to expand)``; bodies of calls (``jit``, ``custom_jvp_call``, ...) that hold
no loop and no moved equation are summarised on their equation's line. ``full=True`` expands both.

Example:
    >>> d = JaxprDiff(before, after, report)
    >>> print(d.summary_table())
    >>> print(d.unified(color=False))
    >>> open("diff.html", "w").write(d.html(title="tiny-t2v"))
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
import html as _html
import re
from typing import Any, Iterator, Sequence

from kvhoist import compat
from kvhoist.analysis import cost
from kvhoist.ir import is_var
from kvhoist.report import (COLUMN_NAMES, COLUMNS, COLUMNS_DOC, Report, _fmt_rows, hoisted_rows, human_bytes,
                             human_flops)

LOOPS = ("scan", "while")
_CALLS = ("jit", "pjit", "closed_call", "core_call", "remat2", "checkpoint", "custom_jvp_call",
          "custom_vjp_call", "custom_vjp_call_jaxpr")
_DTYPE_SHORT = {"float32": "f32", "bfloat16": "bf16", "float16": "f16", "float64": "f64", "int32": "i32",
                "int64": "i64", "uint32": "u32", "uint8": "u8", "int8": "i8", "bool": "bool"}
_SKIP_PARAMS = ("jaxpr", "branches", "cond_jaxpr", "body_jaxpr", "call_jaxpr", "fun_jaxpr", "jvp_jaxpr_fun",
                "jvp_jaxpr_thunk", "fwd_jaxpr_thunk", "bwd", "in_shardings", "out_shardings", "in_layouts",
                "out_layouts", "donated_invars", "ctx_mesh", "compiler_options_kvs", "keep_unused", "inline",
                "precision", "preferred_element_type", "out_sharding", "sharding", "debug_info", "policy",
                "_split_transpose", "jaxpr_known", "linear", "unroll", "algorithm", "transpose_algorithm")


#: The gutter of :meth:`JaxprDiff.side_by_side` between its two columns (header line), and its legend.
SIDE_BY_SIDE_GUTTER = "  |  "
SIDE_BY_SIDE_LEGEND = ("gutter: '|' changed, '<' only before, '>' only after; M = moved out of its loop, "
                       "H = hoisted in front of it")


# -- rendering --------------------------------------------------------------------------------------

@dataclasses.dataclass
class Line:
    """One rendered line.

    Attributes:
      text: what is printed (real variable names, trailing ``# scope  file:line``).
      key: ``text`` with variables replaced by their types: what the diff aligns on.
      indent: nesting level (two spaces each).
      loop_depth: number of enclosing ``scan`` / ``while`` bodies.
      kind: ``'eqn'``, ``'header'`` (a sub-jaxpr's parameter line), ``'return'`` or ``'fold'``.
      mark: ``''``, ``'moved'`` (before: this equation left its loop) or ``'hoisted'`` (after: it
        arrived here from inside a loop).
      eqn: the equation (``kind == 'eqn'``).
    """

    text: str
    key: str
    indent: int
    loop_depth: int
    kind: str = "eqn"
    mark: str = ""
    eqn: Any = None
    folded_marks: int = 0

    def render(self) -> str:
        return "  " * self.indent + self.text


def _short_type(aval: Any) -> str:
    dtype = str(getattr(aval, "dtype", "?"))
    shape = getattr(aval, "shape", ())
    return f"{_DTYPE_SHORT.get(dtype, dtype)}[{','.join(str(d) for d in shape)}]"


def _param_str(eqn: Any) -> str:
    parts = []
    for k, v in eqn.params.items():
        if k in _SKIP_PARAMS or v is None or v == () or "sharding" in k:
            continue
        if k == "dimension_numbers" and eqn.primitive.name == "dot_general":
            (lc, rc), (lb, rb) = v
            r = f"contract={tuple(lc)}x{tuple(rc)}" + (f" batch={tuple(lb)}x{tuple(rb)}" if lb else "")
            parts.append(r)
            continue
        if k == "reverse" and v is False:
            continue
        r = getattr(v, "__name__", None) or (str(v) if hasattr(v, "itemsize") else repr(v))
        if len(r) > 40:
            r = r[:37] + "..."
        parts.append(f"{k}={r}")
    return ("[" + " ".join(parts) + "]") if parts else ""


class _Names:
    """Short variable names in order of first appearance: a, b, ..., z, ba, bb, ..."""

    def __init__(self) -> None:
        self.names: dict = {}

    def __call__(self, v: Any) -> str:
        if compat.is_literal(v):
            val = getattr(v, "val", v)
            try:
                return repr(val.item()) if hasattr(val, "item") and getattr(val, "ndim", 1) == 0 else repr(val)
            except Exception:
                return "lit"
        if compat.is_dropvar(v):
            return "_"
        n = self.names.get(id(v))
        if n is None:
            n = self.names[id(v)] = _letters(len(self.names))
        return n


def _letters(i: int) -> str:
    s = ""
    while True:
        s = chr(ord("a") + i % 26) + s
        i //= 26
        if i == 0:
            return s


def _key_atom(v: Any) -> str:
    if compat.is_literal(v):
        return repr(getattr(v, "val", v))[:20]
    return _short_type(v.aval)


def _subjaxpr_labels(eqn: Any) -> list[tuple[str, Any]]:
    name = eqn.primitive.name
    p = eqn.params
    if name == "scan":
        return [("body", p["jaxpr"])]
    if name == "while":
        return [("cond", p["cond_jaxpr"]), ("body", p["body_jaxpr"])]
    if name == "cond":
        return [(f"branch {i}", b) for i, b in enumerate(p["branches"])]
    return [("call", j) for j in compat.subjaxprs_of(eqn)]


def _scope_and_source(eqn: Any) -> str:
    ns, src = compat.name_stack(eqn), compat.source_line(eqn)
    return "  # " + "  ".join(x for x in (ns, src) if x) if (ns or src) else ""


def _eqn_key(eqn: Any) -> str:
    outs = " ".join(_key_atom(v) for v in eqn.outvars)
    ins = " ".join(_key_atom(a) for a in eqn.invars)
    return f"{outs} = {eqn.primitive.name}{_param_str(eqn)} {ins}{_scope_and_source(eqn)}"


def _walk(j: Any, loop_depth: int = 0) -> Iterator[tuple[Any, int]]:
    """Every equation of a jaxpr, recursively, with its loop depth."""
    for e in compat.split_closed(j)[4]:
        yield e, loop_depth
        inner = loop_depth + (1 if e.primitive.name in LOOPS else 0)
        for s in compat.subjaxprs_of(e):
            yield from _walk(s, inner)


def _has_loop(j: Any) -> bool:
    return any(e.primitive.name in LOOPS for e, _ in _walk(j))


_BLOCK_RE = re.compile(r"^(.*?)(?:^|/)(\d+)(?:/|$)")


def _block_of(eqn: Any) -> tuple[str, int] | None:
    """``('blocks', 3)`` for an equation named ``blocks/3/attn2/to_k``; None when unnumbered."""
    m = _BLOCK_RE.match(compat.name_stack(eqn))
    if not m:
        return None
    return m.group(1), int(m.group(2))


def _canonical(eqns: Sequence) -> tuple:
    """A group's structure with variables numbered locally: equal for blocks identical up to names."""
    ids: dict = {}

    def cid(v: Any) -> Any:
        if not is_var(v):
            return _key_atom(v)
        return ids.setdefault(id(v), len(ids))

    out = []
    for e in eqns:
        key = re.sub(r"/\d+(/|\b)", r"/#\1", _eqn_key(e))
        key = re.sub(r"\s+[\w.]+:\d+$", "", key)  # the source line may differ per unrolled block
        out.append((key, tuple(cid(a) for a in e.invars), tuple(cid(v) for v in e.outvars)))
    return tuple(out)


def _atoms(names: Sequence[str], full: bool, limit: int = 12) -> str:
    """Space-separated atoms; long lists (a loop's 60 weights) are cut unless ``full``."""
    if full or len(names) <= limit:
        return " ".join(names)
    return " ".join(names[:limit]) + f" … (+{len(names) - limit} more)"


class Renderer:
    """Renders a closed jaxpr to :class:`Line` s; ``marks`` maps ``id(eqn)`` to a mark."""

    def __init__(self, *, full: bool = False, marks: dict | None = None):
        self.full = full
        self.marks = marks or {}
        self.names = _Names()

    def render(self, closed: Any) -> list[Line]:
        constvars, _consts, invars, outvars, eqns = compat.split_closed(closed)
        n = self.names
        params = _atoms([f"{n(v)}:{_short_type(v.aval)}" for v in list(constvars) + list(invars)], self.full)
        tparams = " ".join(_short_type(v.aval) for v in list(constvars) + list(invars))
        lines = [Line(f"inputs {params}", f"inputs {tparams}", 0, 0, "header")]
        lines += self._eqns(eqns, 0, 0)
        lines.append(Line("return " + " ".join(n(v) for v in outvars),
                          "return " + " ".join(_key_atom(v) for v in outvars), 0, 0, "return"))
        return lines

    def _eqns(self, eqns: Sequence, indent: int, depth: int) -> list[Line]:
        out: list[Line] = []
        groups = self._groups(eqns)
        i = 0
        while i < len(groups):
            label, grp = groups[i]
            for e in grp:
                out += self._eqn(e, indent, depth)
            if label is None or self.full:
                i += 1
                continue
            # fold the following groups that repeat this one up to variable names
            canon = _canonical(grp)
            j = i + 1
            while j < len(groups) and groups[j][0] is not None and groups[j][0][0] == label[0] \
                    and _canonical(groups[j][1]) == canon:
                j += 1
            if j > i + 1:
                folded = [e for _lbl, g in groups[i + 1:j] for e in g]
                n_eqns = sum(1 for e in folded for _ in _walk_eqn(e))
                marked = sum(1 for e in folded for x in _walk_eqn(e) if self.marks.get(id(x)))
                family = label[0] or "blocks"
                for e in folded:  # name the variables so later lines read like the real program
                    for v in e.outvars:
                        self.names(v)
                extra = f", {marked} of them {self._fold_mark(folded)}" if marked else ""
                noun = family.split("/")[-1]
                if j - i - 1 == 1 and noun.endswith("s"):
                    noun = noun[:-1]
                text = (f"… {j - i - 1} more {noun} like {family}/{label[1]} "
                        f"({n_eqns} equations{extra}; folded, --full to expand)")
                key = f"fold {family} {j - i - 1} {n_eqns} {marked}"
                mark = self._fold_mark(folded) if marked else ""
                out.append(Line(text, key, indent, depth, "fold", mark, folded_marks=marked))
            i = j
        return out

    def _fold_mark(self, eqns: Sequence) -> str:
        for e in eqns:
            for x in _walk_eqn(e):
                if self.marks.get(id(x)):
                    return self.marks[id(x)]
        return ""

    @staticmethod
    def _groups(eqns: Sequence) -> list[tuple[tuple[str, int] | None, list]]:
        groups: list = []
        for e in eqns:
            b = _block_of(e)
            if b is not None and groups and groups[-1][0] == b:
                groups[-1][1].append(e)
            else:
                groups.append((b, [e]))
        return groups

    def _eqn(self, e: Any, indent: int, depth: int) -> list[Line]:
        n = self.names
        ins = _atoms([n(a) for a in e.invars], self.full)
        outs = _atoms([f"{n(v)}:{_short_type(v.aval)}" for v in e.outvars], self.full)
        head = f"{outs} = {e.primitive.name}{_param_str(e)} {ins}".rstrip()
        subs = _subjaxpr_labels(e)
        if subs and not self.full and e.primitive.name in _CALLS and not any(_has_loop(s) for _, s in subs) \
                and not any(self.marks.get(id(x)) for x in _walk_eqn(e) if x is not e):
            count = sum(1 for _, s in subs for _ in _walk(s))
            head += f" {{{count} equations}}"
            subs = []
        lines = [Line(head + _scope_and_source(e), _eqn_key(e), indent, depth, "eqn", self.marks.get(id(e), ""), e)]
        inner = depth + (1 if e.primitive.name in LOOPS else 0)
        for label, s in subs:
            constvars, _c, invars, outvars, eqns = compat.split_closed(s)
            params = _atoms([f"{n(v)}:{_short_type(v.aval)}" for v in list(constvars) + list(invars)], self.full)
            tparams = " ".join(_short_type(v.aval) for v in list(constvars) + list(invars))
            lines.append(Line(f"{label}({params}):", f"{label}({tparams}):", indent + 1, inner, "header"))
            lines += self._eqns(eqns, indent + 2, inner)
            lines.append(Line("return " + _atoms([n(v) for v in outvars], self.full),
                              "return " + " ".join(_key_atom(v) for v in outvars), indent + 2, inner, "return"))
        return lines


def _walk_eqn(e: Any) -> Iterator[Any]:
    yield e
    for s in compat.subjaxprs_of(e):
        for x, _d in _walk(s):
            yield x


# -- moved equations ----------------------------------------------------------------------------------

def moved_marks(before: Any, after: Any) -> tuple[dict, dict]:
    """``(before_marks, after_marks)``: ``id(eqn) -> 'moved' / 'hoisted'`` for equations that left a loop.

    A key (equation text without variable names, see the module docstring) that occurs fewer times at
    some loop depth after the rewrite and more times at a shallower depth is counted as moved. Loop
    equations themselves are not marked (their bodies are).
    """
    cb: collections.Counter = collections.Counter()
    ca: collections.Counter = collections.Counter()
    eb = [(e, d, _eqn_key(e)) for e, d in _walk(before)]
    ea = [(e, d, _eqn_key(e)) for e, d in _walk(after)]
    for _e, d, k in eb:
        cb[(k, d)] += 1
    for _e, d, k in ea:
        ca[(k, d)] += 1
    depths_b: dict = collections.defaultdict(set)
    depths_a: dict = collections.defaultdict(set)
    for k, d in cb:
        depths_b[k].add(d)
    for k, d in ca:
        depths_a[k].add(d)
    mb, ma = {}, {}
    for e, d, k in eb:
        if e.primitive.name in LOOPS or cb[(k, d)] <= ca[(k, d)]:
            continue
        if any(d2 < d and ca[(k, d2)] > cb[(k, d2)] for d2 in depths_a[k]):
            mb[id(e)] = "moved"
    for e, d, k in ea:
        if e.primitive.name in LOOPS or ca[(k, d)] <= cb[(k, d)]:
            continue
        if any(d2 > d and cb[(k, d2)] > ca[(k, d2)] for d2 in depths_b[k]):
            ma[id(e)] = "hoisted"
    return mb, ma


# -- summary -------------------------------------------------------------------------------------------

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
    return sum(1 for _ in _walk(j))


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
            out += ["  " + line for line in _fmt_rows(rows).splitlines()]
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
    def html(self, *, title: str = "kvhoist diff", description: str = "") -> str:
        """A self-contained HTML page: summary, report, and the two jaxprs aligned side by side.

        Moved equations carry the CSS class ``moved`` on both sides (plus ``hoisted`` on the after
        side); long unchanged stretches are collapsed in ``<details>`` elements.
        """
        esc = _html.escape
        rows = []
        for tag, a1, a2, b1, b2 in self._ops:
            if tag == "equal" and (a2 - a1) > 2 * self.context + 4 and not self.full:
                k = self.context
                rows += [self._row(self.left[a1 + i], self.right[b1 + i], "same") for i in range(k)]
                hidden = "".join(self._row(self.left[a1 + i], self.right[b1 + i], "same")
                                 for i in range(k, a2 - a1 - k))
                rows.append(f'<tr><td colspan="2"><details><summary>{a2 - a1 - 2 * k} unchanged lines</summary>'
                            f'<table class="inner">{hidden}</table></details></td></tr>')
                rows += [self._row(self.left[a2 - k + i], self.right[b2 - k + i], "same") for i in range(k)]
                continue
            n = max(a2 - a1, b2 - b1)
            for i in range(n):
                x = self.left[a1 + i] if a1 + i < a2 else None
                y = self.right[b1 + i] if b1 + i < b2 else None
                rows.append(self._row(x, y, "same" if tag == "equal" else "changed"))
        summary = "".join(f"<tr><th>{esc(a)}</th><td>{esc(b)}</td><td>{esc(c)}</td></tr>"
                          for a, b, c in [("", "before", "after")] + self.summary_rows())
        report = _report_html(self.report) if self.report is not None else ""
        return _HTML.format(title=esc(title), description=esc(description), summary=summary, report=report,
                            rows="\n".join(rows), moved=self.moved_count, hoisted=self.hoisted_count)

    @staticmethod
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
