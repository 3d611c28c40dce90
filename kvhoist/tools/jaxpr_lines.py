"""A jaxpr as lines of text, and which equations left a loop: what ``kvhoist diff`` aligns and marks.

A jaxpr is rendered one equation per line, sub-jaxprs indented under the equation that holds them,
each line ending in its ``named_scope`` path and source line. Variables get short names (``a``, ``b``,
... ``ba``) in order of definition; each line also carries a *key* in which every variable is replaced
by its type (``bf16[2,512,5120]``), so the diff (:mod:`kvhoist.tools.diff`) can align lines without
renumbering turning every line into a change.

Equations that left a loop are found by counting each key per *loop depth* (how many ``scan`` /
``while`` bodies enclose the line) before and after: a key that lost occurrences at one depth and
gained them at a shallower one is a moved equation — marked ``moved`` on the before side and
``hoisted`` on the after side (:func:`moved_marks`).

Folding keeps 40-layer programs readable: consecutive groups of equations named ``blocks/<i>/...``
that are identical to the first group up to variable names become one line, ``… 39 more blocks like
blocks/0 (folded; --full to expand)``; bodies of calls (``jit``, ``custom_jvp_call``, ...) that hold
no loop and no moved equation are summarised on their equation's line. ``full=True`` expands both.

Example:
    >>> before_marks, after_marks = moved_marks(before, after)
    >>> lines = Renderer(marks=after_marks).render(after)
    >>> print("\\n".join(x.render() for x in lines))
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Any, Iterator, Sequence

from kvhoist import compat
from kvhoist.ir import is_var

__all__ = ["LOOPS", "Line", "Renderer", "moved_marks", "short_type", "walk", "walk_eqn"]

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


def short_type(aval: Any) -> str:
    """``bf16[2,512,5120]``: an aval's dtype (short) and shape."""
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
    return short_type(v.aval)


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


def walk(j: Any, loop_depth: int = 0) -> Iterator[tuple[Any, int]]:
    """Every equation of a jaxpr, recursively, with its loop depth."""
    for e in compat.split_closed(j)[4]:
        yield e, loop_depth
        inner = loop_depth + (1 if e.primitive.name in LOOPS else 0)
        for s in compat.subjaxprs_of(e):
            yield from walk(s, inner)


def _has_loop(j: Any) -> bool:
    return any(e.primitive.name in LOOPS for e, _ in walk(j))


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
        params = _atoms([f"{n(v)}:{short_type(v.aval)}" for v in list(constvars) + list(invars)], self.full)
        tparams = " ".join(short_type(v.aval) for v in list(constvars) + list(invars))
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
                n_eqns = sum(1 for e in folded for _ in walk_eqn(e))
                marked = sum(1 for e in folded for x in walk_eqn(e) if self.marks.get(id(x)))
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
            for x in walk_eqn(e):
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
        outs = _atoms([f"{n(v)}:{short_type(v.aval)}" for v in e.outvars], self.full)
        head = f"{outs} = {e.primitive.name}{_param_str(e)} {ins}".rstrip()
        subs = _subjaxpr_labels(e)
        if subs and not self.full and e.primitive.name in _CALLS and not any(_has_loop(s) for _, s in subs) \
                and not any(self.marks.get(id(x)) for x in walk_eqn(e) if x is not e):
            count = sum(1 for _, s in subs for _ in walk(s))
            head += f" {{{count} equations}}"
            subs = []
        lines = [Line(head + _scope_and_source(e), _eqn_key(e), indent, depth, "eqn", self.marks.get(id(e), ""), e)]
        inner = depth + (1 if e.primitive.name in LOOPS else 0)
        for label, s in subs:
            constvars, _c, invars, outvars, eqns = compat.split_closed(s)
            params = _atoms([f"{n(v)}:{short_type(v.aval)}" for v in list(constvars) + list(invars)], self.full)
            tparams = " ".join(short_type(v.aval) for v in list(constvars) + list(invars))
            lines.append(Line(f"{label}({params}):", f"{label}({tparams}):", indent + 1, inner, "header"))
            lines += self._eqns(eqns, indent + 2, inner)
            lines.append(Line("return " + _atoms([n(v) for v in outvars], self.full),
                              "return " + " ".join(_key_atom(v) for v in outvars), indent + 2, inner, "return"))
        return lines


def walk_eqn(e: Any) -> Iterator[Any]:
    """An equation, then every equation of its sub-jaxprs, recursively."""
    yield e
    for s in compat.subjaxprs_of(e):
        for x, _d in walk(s):
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
    eb = [(e, d, _eqn_key(e)) for e, d in walk(before)]
    ea = [(e, d, _eqn_key(e)) for e, d in walk(after)]
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


