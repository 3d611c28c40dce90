"""A small mutable view of a jaxpr that passes rewrite, and the dependence graph over it.

A :class:`Block` is an open jaxpr without constvars: input variables, equations in topological
order, output atoms. Passes build new blocks and turn them back into (closed or open) jaxprs of the
installed JAX version through :mod:`kvhoist.compat`.

Variables are JAX ``Var`` objects and are compared by identity. A block's equations may be moved to
another scope; :func:`clone_eqns` gives them fresh output variables so that no variable is ever
bound twice in one jaxpr.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Sequence

import networkx as nx

from kvhoist import compat

Atom = Any


@dataclasses.dataclass
class Block:
    """An open, constvar-free jaxpr under construction."""

    invars: list
    outvars: list
    eqns: list

    @classmethod
    def from_jaxpr(cls, j: Any) -> "Block | None":
        """The block of a sub-jaxpr, or ``None`` when it closes over constants (left opaque)."""
        constvars, consts, invars, outvars, eqns = compat.split_closed(j)
        if constvars or consts:
            return None
        return cls(list(invars), list(outvars), list(eqns))

    def to_closed(self) -> Any:
        return compat.make_closed([], [], self.invars, self.outvars, self.eqns)

    def to_open(self) -> Any:
        return compat.make_open(self.invars, self.outvars, self.eqns)

    def like(self, original: Any) -> Any:
        """Rebuild as the same kind (closed / open) of jaxpr as ``original``."""
        return self.to_closed() if compat.is_closed(original) else self.to_open()


def is_var(atom: Atom) -> bool:
    return not compat.is_literal(atom) and not compat.is_dropvar(atom)


def subst_atom(atom: Atom, subst: dict) -> Atom:
    if is_var(atom):
        return subst.get(atom, atom)
    return atom




def clone_eqns(eqns: Sequence, subst: dict) -> tuple[list, dict]:
    """Copies of ``eqns`` with inputs renamed through ``subst`` and fresh output variables.

    Returns the copies and the extended substitution (old output var -> new output var).
    """
    subst = dict(subst)
    out = []
    for e in eqns:
        new_in = [subst_atom(a, subst) for a in e.invars]
        new_out = []
        for v in e.outvars:
            if compat.is_dropvar(v):
                new_out.append(compat.drop_var(v.aval))
            else:
                nv = compat.new_var(v.aval)
                subst[v] = nv
                new_out.append(nv)
        out.append(e.replace(invars=new_in, outvars=new_out))
    return out, subst


def producers(eqns: Sequence) -> dict:
    """Map each variable to the index of the equation defining it."""
    prod = {}
    for i, e in enumerate(eqns):
        for v in e.outvars:
            if is_var(v):
                prod[v] = i
    return prod


def dependence_graph(eqns: Sequence) -> nx.DiGraph:
    """Directed graph over equation indices: an edge ``i -> j`` when ``j`` reads an output of ``i``."""
    g = nx.DiGraph()
    g.add_nodes_from(range(len(eqns)))
    prod = producers(eqns)
    for j, e in enumerate(eqns):
        for a in e.invars:
            if is_var(a) and a in prod:
                g.add_edge(prod[a], j)
    return g


def used_vars(eqns: Iterable, outvars: Iterable = ()) -> set:
    """Every variable read by ``eqns`` or listed in ``outvars``."""
    used = set()
    for e in eqns:
        for a in e.invars:
            if is_var(a):
                used.add(a)
    for a in outvars:
        if is_var(a):
            used.add(a)
    return used


def aval_bytes(aval: Any) -> int:
    shape = getattr(aval, "shape", ())
    dtype = getattr(aval, "dtype", None)
    if dtype is None:
        return 0
    n = 1
    for d in shape:
        n *= int(d)
    try:
        return n * dtype.itemsize
    except Exception:
        return n * 4
