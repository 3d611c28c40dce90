"""A small mutable view of a jaxpr that passes rewrite, and the dependence graph over it.

A :class:`Block` is an open jaxpr without constvars: input variables, equations in topological
order, output atoms. Passes build new blocks and turn them back into (closed or open) jaxprs of the
installed JAX version through :mod:`kvhoist.compat`.

Variables are JAX ``Var`` objects and are compared by identity. A block's equations may be moved to
another scope; :func:`clone_eqns` gives them fresh output variables so that no variable is ever
bound twice in one jaxpr.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Any, Callable, Iterable, Iterator, Sequence

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


_NOT_VARS = (compat.Literal, compat.DropVar)


def is_var(atom: Atom) -> bool:
    return not isinstance(atom, _NOT_VARS)


# --------------------------------------------------------------------------------------------------
# Per-run memo: the analyses of one equation (may it move? its FLOPs?) are computed once per pass run
# --------------------------------------------------------------------------------------------------

_MEMO = threading.local()


@contextlib.contextmanager
def analysis_cache() -> Iterator[None]:
    """Within the block, :func:`memoized` analyses are computed once per object (an equation, a jaxpr).

    LICM asks the same questions about the same equations once per enclosing loop (is this nested scan
    movable, what does it cost): without the memo a depth-``d`` nest costs ``d`` times more per equation.
    Jaxpr objects are immutable, so an answer stays valid for the run; the table is dropped at the end so it
    keeps nothing (nor any closed-over constant) alive.
    """
    if getattr(_MEMO, "table", None) is not None:
        yield
        return
    _MEMO.table = {}
    try:
        yield
    finally:
        _MEMO.table = None


def memoized(kind: str, obj: Any, compute: Callable[[], Any]) -> Any:
    """``compute()``, remembered for ``obj`` (by identity) while an :func:`analysis_cache` is open."""
    table = getattr(_MEMO, "table", None)
    if table is None:
        return compute()
    key = (kind, id(obj))
    hit = table.get(key)
    if hit is not None and hit[0] is obj:  # the table holds obj, so its id cannot be reused meanwhile
        return hit[1]
    value = compute()
    table[key] = (obj, value)
    return value


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


class VerifyError(ValueError):
    """A rewritten jaxpr reads a variable that is not in scope, or binds one twice."""


def verify_eqns(eqns: Sequence, bound: Iterable, outvars: Sequence = ()) -> None:
    """Check that ``eqns`` are well scoped given the variables ``bound`` before them.

    Every variable an equation reads must be bound (an input or an earlier result), no variable is
    bound twice, every sub-jaxpr is well scoped on its own (recursively), and ``outvars`` are
    defined at the end. Then JAX's own type checker runs over the same equations. JAX's checker
    does not look at the scoping inside a loop body, so this is the check that refuses a rewrite
    whose body reads a variable of another scope.

    Raises:
      VerifyError or jax's JaxprTypeError.
    """
    scope = set(bound)
    _verify_scope(eqns, scope, outvars, "")
    # JAX types each equation from its inputs' types; an equation whose params and input / output types are
    # those of one already checked in this run (a hoisted equation cloned one loop further out) is not re-typed.
    fresh = [e for e in eqns if not _typed_before(e)]
    if not fresh:
        return
    free = sorted({a for e in fresh for a in e.invars if is_var(a)} - {v for e in fresh for v in e.outvars},
                  key=id)
    defined = [v for e in fresh for v in e.outvars if is_var(v)]
    compat.check(compat.make_open(list(free), defined, list(fresh)))
    _remember_typed(fresh)


def verify_jaxpr(j: Any) -> None:
    """:func:`verify_eqns` for a whole (closed or open) jaxpr, then JAX's checker on it."""
    constvars, _c, invars, outvars, eqns = compat.split_closed(j)
    _verify_scope(eqns, set(constvars) | set(invars), outvars, "")
    compat.check(j)


def _type_key(e: Any) -> tuple:
    return (id(e.params), e.primitive, tuple(getattr(a, "aval", None) for a in e.invars),
            tuple(v.aval for v in e.outvars), e.effects)


def _typed_before(e: Any) -> bool:
    table = getattr(_MEMO, "table", None)
    if table is None:
        return False
    try:
        hit = table.get(("typed", _type_key(e)))
    except TypeError:  # an unhashable aval or effect: check it
        return False
    return hit is not None and hit is e.params


def _remember_typed(eqns: Sequence) -> None:
    table = getattr(_MEMO, "table", None)
    if table is None:
        return
    for e in eqns:
        try:
            table[("typed", _type_key(e))] = e.params  # holds params, so its id is not reused meanwhile
        except TypeError:
            pass


def _verify_scope(eqns: Sequence, scope: set, outvars: Sequence, where: str) -> None:
    for e in eqns:
        for a in e.invars:
            if is_var(a) and a not in scope:
                raise VerifyError(f"{e.primitive.name}{where} reads {a} ({a.aval}), which is not in scope")
        for sub in compat.subjaxprs_of(e):
            # A sub-jaxpr is its own scope: checked once per run, however many loops it is rebuilt into.
            memoized("scoped", sub, lambda sub=sub, e=e: _verify_sub(sub, f" in {e.primitive.name}{where}"))
        for v in e.outvars:
            if is_var(v):
                if v in scope:
                    raise VerifyError(f"{e.primitive.name}{where} binds {v} a second time")
                scope.add(v)
    for a in outvars:
        if is_var(a) and a not in scope:
            raise VerifyError(f"output {a}{where} is not defined")


def _verify_sub(sub: Any, where: str) -> bool:
    constvars, _c, invars, souts, seqns = compat.split_closed(sub)
    _verify_scope(seqns, set(constvars) | set(invars), souts, where)
    return True


def live_indices(eqns: Sequence, roots: Iterable, keep: Callable[[Any], bool] | None = None) -> set:
    """Indices of ``eqns`` whose results reach ``roots`` (variables), that have effects, or for which
    ``keep(eqn)`` is true (e.g. stateful primitives without a jaxpr effect, such as ``rng_uniform``)."""
    need = {a for a in roots if is_var(a)}
    live = set()
    for k in range(len(eqns) - 1, -1, -1):
        e = eqns[k]
        if e.effects or any(is_var(v) and v in need for v in e.outvars) or (keep is not None and keep(e)):
            live.add(k)
            need.update(a for a in e.invars if is_var(a))
    return live


def live_eqns(eqns: Sequence, roots: Iterable, keep: Callable[[Any], bool] | None = None) -> list:
    """``eqns`` without the dead ones (see :func:`live_indices`), in order."""
    live = live_indices(eqns, roots, keep)
    return [e for k, e in enumerate(eqns) if k in live]


#: Call-like primitives whose params say nothing per operand: an operand the body does not read can be dropped
#: by rebuilding the body alone (``jit`` carries per-operand shardings and donations and is left as is).
_PLAIN_CALLS = {"remat2": "jaxpr", "checkpoint": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr"}


def prune_call_operands(eqn: Any) -> Any:
    """``eqn`` without the operands its body never reads, for ``remat2`` / ``closed_call``; else ``eqn``.

    After LICM lifts work out of a ``jax.checkpoint`` body, the body may no longer read an operand (the text
    context whose K/V projections left): passing it anyway keeps the value alive in the loop, i.e. cached.
    """
    key = _PLAIN_CALLS.get(eqn.primitive.name)
    if key is None or key not in eqn.params:
        return eqn
    body = eqn.params[key]
    constvars, consts, invars, outvars, eqns = compat.split_closed(body)
    used = used_vars(eqns, outvars)
    keep = [i for i, v in enumerate(invars) if v in used]
    if len(keep) == len(invars) or len(invars) != len(eqn.invars):
        return eqn
    new_body = compat.rebuild_like(body, constvars, consts, [invars[i] for i in keep], outvars, eqns)
    return eqn.replace(invars=[eqn.invars[i] for i in keep], params={**eqn.params, key: new_body})


def all_eqns(j: Any) -> Iterator[Any]:
    """Every equation of a (closed) jaxpr and of all its sub-jaxprs, depth first, in program order."""
    from kvhoist import compat

    for e in compat.split_closed(j)[4]:
        yield e
        for sub in compat.subjaxprs_of(e):
            yield from all_eqns(sub)


def producers(eqns: Sequence) -> dict:
    """Map each variable to the index of the equation defining it."""
    prod = {}
    for i, e in enumerate(eqns):
        for v in e.outvars:
            if is_var(v):
                prod[v] = i
    return prod


def dependence_graph(eqns: Sequence) -> "networkx.DiGraph":
    """Directed graph over equation indices: an edge ``i -> j`` when ``j`` reads an output of ``i``.

    For the graph tool (:mod:`kvhoist.tools.graph`); networkx is imported here, not when the compiler loads.
    """
    import networkx as nx

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
