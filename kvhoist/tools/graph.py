"""The dependence graph of what was hoisted, as Graphviz DOT (and SVG where ``dot`` is installed).

Nodes are the equations that arrived in front of a loop (found as in :func:`kvhoist.tools.jaxpr_lines.moved_marks`),
the program inputs they read (weights, text embeddings) and the loop that consumes their results.
A loop created by fission (a scan of only hoisted work) is one node. Matmuls are highlighted. A value
that only one branch of a ``cond`` reads (Wan 2.2's two experts) is labelled with that branch, in the words
of :attr:`kvhoist.report.HoistedValue.branch` (``branch 1 of cond at sample.py:144``).

Example:
    >>> g = hoisted_graph(before, after)       # inputs named from the trace: model.blocks.attn2.to_k.kernel
    >>> open("kv.dot", "w").write(to_dot(g, title="wan2.1-t2v-14b"))
"""

from __future__ import annotations

import re
import shutil
import subprocess
from typing import Any, Sequence

import networkx as nx

from kvhoist import compat, speculation
from kvhoist.ir import dependence_graph, is_var
from kvhoist.tools.jaxpr_lines import LOOPS, moved_marks, short_type, walk_eqn


def _hoisted_like(e: Any, marks: dict) -> bool:
    if id(e) in marks:
        return True
    if e.primitive is speculation.speculate_p:  # speculated work: one wrapped equation
        return any(id(x) in marks for x in walk_eqn(e))
    if e.primitive.name not in LOOPS:
        return False
    inner = [x for x in walk_eqn(e) if x is not e]
    dots = [x for x in inner if x.primitive.name == "dot_general"]
    return bool(dots) and all(id(x) in marks for x in dots)


def _label(e: Any, hoisted: bool = True) -> str:
    e = speculation.unwrap(e)
    name = e.primitive.name
    if name == "scan":
        name = f"scan(length={e.params['length']})"
    outs = ", ".join(short_type(v.aval) for v in e.outvars[:2]) + (" …" if len(e.outvars) > 2 else "")
    scope = compat.name_stack(e)
    if e.primitive.name in LOOPS and not hoisted:
        scope = "reads the hoisted values"
    elif e.primitive.name in LOOPS:  # a fissioned scan: name the projections it computes
        dots = sorted({compat.name_stack(x) for x in walk_eqn(e) if x.primitive.name == "dot_general"})
        if dots:
            scope = "computes " + ", ".join(dots[:4]) + (" …" if len(dots) > 4 else "")
    return "\\n".join(x for x in (name, scope, outs, compat.source_line(e)) if x)


def _inner_invars(e: Any) -> list[tuple[Any, list]]:
    """``(sub-jaxpr, the sub-jaxpr variable each operand of e becomes — or None)`` per sub-jaxpr of ``e``."""
    name, ins = e.primitive.name, list(e.invars)
    if name == "cond":
        return [(b, [None] + list(compat.split_closed(b)[2])) for b in e.params["branches"]]
    if name == "while":
        cn, bn = e.params["cond_nconsts"], e.params["body_nconsts"]
        cj, bj = e.params["cond_jaxpr"], e.params["body_jaxpr"]
        civ, biv = list(compat.split_closed(cj)[2]), list(compat.split_closed(bj)[2])
        carry = len(ins) - cn - bn
        return [(cj, civ[:cn] + [None] * bn + civ[cn:cn + carry]), (bj, [None] * cn + biv)]
    out = []
    for s in compat.subjaxprs_of(e):
        iv = list(compat.split_closed(s)[2])
        out.append((s, iv if len(iv) == len(ins) else [None] * len(ins)))
    return out


class _Readers:
    """Which equations of a jaxpr read each variable (and which variables it returns), indexed once per
    jaxpr: a 40-layer unrolled program has thousands of hoisted values to trace into the loop."""

    def __init__(self) -> None:
        self._index: dict = {}

    def __call__(self, j: Any) -> tuple[dict, set]:
        key = id(j)
        if key not in self._index:
            _cv, _c, _iv, outvars, eqns = compat.split_closed(j)
            readers: dict = {}
            for e in eqns:
                for a in e.invars:
                    if is_var(a):
                        readers.setdefault(id(a), []).append(e)
            self._index[key] = (j, readers, {id(v) for v in outvars if is_var(v)})
        return self._index[key][1:]


def branches_reading(j: Any, v: Any, readers: _Readers | None = None) -> set[str]:
    """``'branch i of cond at file.py:line'`` for every cond branch (looking into loops and calls) that
    reads ``v``, a variable of ``j``: which expert a hoisted value belongs to."""
    readers = readers or _Readers()
    found: set = set()
    eqns = readers(j)[0].get(id(v), [])
    for e in dict.fromkeys(eqns):
        for k, (sub, inner) in enumerate(_inner_invars(e)):
            for a, w in zip(e.invars, inner):
                if a is not v or w is None:
                    continue
                if e.primitive.name == "cond":
                    used, returned = readers(sub)
                    if id(w) in used or id(w) in returned:
                        src = compat.source_line(e)
                        found.add(f"branch {k} of cond" + (f" at {src}" if src else ""))
                else:
                    found |= branches_reading(sub, w, readers)
    return found


def readable_input_name(name: str | None) -> str | None:
    """An input's name as jax records it, shortened for a label: NNX's ``.value`` suffix dropped
    (``model.blocks.attn2.to_k.kernel.value`` -> ``model.blocks.attn2.to_k.kernel``)."""
    if not name:
        return None
    return re.sub(r"\.value$", "", name)


def _input_labels(before: Any, after: Any, input_names: Sequence[str | None] | None) -> dict[int, str]:
    """``id(var) -> name`` for the program's inputs, and for every variable of a sub-jaxpr (loop body,
    cond branch, call) that an input becomes there: a hoisted equation inside a call reads the call's
    parameter, which is named after the argument passed to it. Top-level inputs without a name are
    ``in[k]`` (their position); ``after``'s inputs are ``before``'s, as the pipeline keeps the signature."""
    invars = list(compat.split_closed(after)[2])
    names = list(input_names) if input_names is not None else list(compat.arg_names(before) or ())
    if input_names is not None and len(names) != len(invars):
        raise ValueError(f"input_names has {len(names)} names for a program of {len(invars)} inputs")
    if len(names) != len(invars):
        names = [None] * len(invars)
    labels = {id(v): readable_input_name(n) or f"in[{k}]" for k, (v, n) in enumerate(zip(invars, names))}
    for cv in compat.split_closed(after)[0]:
        labels.setdefault(id(cv), "constant")

    def walk(j: Any) -> None:
        for e in compat.split_closed(j)[4]:
            subs = _inner_invars(e)
            for sub, inner in subs:
                for a, w in zip(e.invars, inner):
                    if w is not None and is_var(a) and id(a) in labels:
                        labels.setdefault(id(w), labels[id(a)])
                walk(sub)

    walk(after)
    return labels


def hoisted_graph(before: Any, after: Any, *, input_names: Sequence[str | None] | None = None) -> nx.DiGraph:
    """A DiGraph of the hoisted equations, their inputs and their consumers.

    Node attributes: ``label`` (text), ``kind`` (``'hoisted'``, ``'matmul'``, ``'input'``,
    ``'consumer'``), ``branch`` (hoisted nodes read by one cond branch only: ``'branch 1 of cond at
    sample.py:144'``, else ``''``; also the label's last line), and for inputs ``name``: the argument and
    pytree path it came from (``model.blocks.attn2.to_k.kernel``), ``in[k]`` (the program's k-th input)
    when the trace recorded no name, ``constant`` for a captured constant.

    Args:
      before, after: the traced and the rewritten closed jaxprs (``after`` has ``before``'s inputs).
      input_names: one name per input of ``before`` (e.g. :meth:`kvhoist.tools.specs.Program.input_names`);
        default: the names jax recorded when tracing (``jax.make_jaxpr`` keeps them).

    Raises:
      ValueError: ``input_names`` does not have one entry per input.
    """
    _mb, marks = moved_marks(before, after)
    g = nx.DiGraph()
    counter = [0]
    readers = _Readers()
    names = _input_labels(before, after, input_names)

    def visit(j: Any) -> None:
        _cv, _c, invars, _ov, eqns = compat.split_closed(j)
        chosen = [i for i, e in enumerate(eqns) if _hoisted_like(e, marks)]
        if chosen:
            add_level(j, eqns, chosen, set(_cv) | set(invars))
        for i, e in enumerate(eqns):
            if i not in chosen:
                for s in compat.subjaxprs_of(e):
                    visit(s)

    def add_level(j, eqns, chosen, level_inputs) -> None:
        counter[0] += 1
        lvl = counter[0]
        dg = dependence_graph(eqns)
        sel = set(chosen)
        node = {i: f"L{lvl}e{i}" for i in range(len(eqns))}
        for i in chosen:
            e = eqns[i]
            heavy = any(x.primitive.name in ("dot_general", "conv_general_dilated") for x in walk_eqn(e))
            reading = set().union(*(branches_reading(j, v, readers) for v in e.outvars if is_var(v)))
            branch = next(iter(reading)) if len(reading) == 1 else ""
            label = _label(e) + (f"\\n{branch}" if branch else "")
            g.add_node(node[i], label=label, kind="matmul" if heavy else "hoisted", branch=branch)
            for a in e.invars:
                if is_var(a) and a in level_inputs:
                    vid = f"L{lvl}v{id(a)}"
                    name = names.get(id(a), "input")
                    g.add_node(vid, label=f"{name}\\n{short_type(a.aval)}", kind="input", name=name)
                    g.add_edge(vid, node[i])
        for i in chosen:
            for j in dg.successors(i):
                if j not in sel:
                    g.add_node(node[j], label=_label(eqns[j], hoisted=False), kind="consumer")
                g.add_edge(node[i], node[j])

    visit(after)
    return g


_STYLE = {
    "matmul": 'shape=box style="filled,bold" fillcolor="#ffd27a"',
    "hoisted": 'shape=box style=filled fillcolor="#fff3b0"',
    "input": 'shape=ellipse style=filled fillcolor="#e8f0ff"',
    "consumer": 'shape=box3d style=filled fillcolor="#dddddd"',
}


def to_dot(g: nx.DiGraph, *, title: str = "hoisted") -> str:
    """Graphviz DOT text for :func:`hoisted_graph`'s result."""
    out = [f'digraph "{title}" {{', "  rankdir=TB;", '  node [fontname="monospace" fontsize=10];',
           f'  labelloc=t; label="{title}: what kvhoist hoisted (yellow), its inputs (blue), its consumers (grey)";']
    for n, attrs in g.nodes(data=True):
        label = attrs.get("label", n).replace('"', '\\"')
        out.append(f'  "{n}" [label="{label}" {_STYLE.get(attrs.get("kind"), "")}];')
    for a, b in g.edges():
        out.append(f'  "{a}" -> "{b}";')
    out.append("}")
    return "\n".join(out) + "\n"


def write_graph(g: nx.DiGraph, path: str, *, title: str = "hoisted") -> tuple[str, str]:
    """Write ``path`` (``.dot``, or ``.svg`` rendered by Graphviz ``dot``).

    Returns ``(written_path, message)``; when ``.svg`` is asked for and ``dot`` is not installed, the
    DOT text is written to ``path`` with a ``.dot`` suffix instead and the message says so.
    """
    text = to_dot(g, title=title)
    if not path.endswith(".svg"):
        with open(path, "w") as f:
            f.write(text)
        return path, f"wrote {path} ({g.number_of_nodes()} nodes, {g.number_of_edges()} edges)"
    exe = shutil.which("dot")
    if exe is None:
        alt = path[:-4] + ".dot"
        with open(alt, "w") as f:
            f.write(text)
        return alt, (f"Graphviz `dot` is not installed: wrote DOT to {alt} instead of {path} "
                     f"(render it with `dot -Tsvg {alt} -o {path}`)")
    proc = subprocess.run([exe, "-Tsvg", "-o", path], input=text, text=True, capture_output=True, timeout=120)
    if proc.returncode != 0:
        alt = path[:-4] + ".dot"
        with open(alt, "w") as f:
            f.write(text)
        why = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
        return alt, f"dot failed ({why}); wrote {alt}"
    return path, f"wrote {path} ({g.number_of_nodes()} nodes, {g.number_of_edges()} edges)"
