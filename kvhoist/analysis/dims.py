"""Which array dimensions of a jaxpr must have the same size: a union-find over ``(var, axis)`` slots.

Every equation ties some of its input axes to some of its output axes (an elementwise op ties all of
them, ``dot_general`` ties batch and contracting axes, ``reshape`` ties the axes it keeps intact, a
scan ties its operands to its body's inputs...). Joining all those ties gives, for one dimension,
the class of every slot in the program — across ``scan`` / ``cond`` / ``while`` / ``jit`` bodies —
that must change size with it. The layout pass resizes such a class.

Each occurrence of a sub-jaxpr is its own *scope* (a path of ``(eqn index, param, branch)`` steps
from the top), because JAX shares one jaxpr object between call sites (e.g. every ``jnp.where``):
resizing one call site must not resize the others.

Equations whose dimension rules are unknown (``gather``, ``conv``, custom primitives) are recorded
as *opaque*; a class that touches an opaque equation cannot be resized.

Example:
    >>> dims = DimAnalysis(jax.make_jaxpr(f)(x))
    >>> cls = dims.class_of(((), pad_out, 1))
    >>> sorted(str(v) for _scope, v, _ax in cls)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

from kvhoist import compat

ScopeKey = tuple
Slot = tuple  # (scope key, Var, axis)

#: Primitives whose output has its operands' shape (operands of lower rank, or size-1 axes, broadcast).
ELEMENTWISE = frozenset("""
add sub mul div rem pow max min neg sign floor ceil round is_finite exp exp2 log log1p expm1 tanh logistic
sin cos tan asin acos atan atan2 sinh cosh asinh acosh atanh sqrt rsqrt cbrt integer_pow square abs erf erfc
erf_inv lgamma digamma select_n and or xor not eq ne lt le gt ge convert_element_type stop_gradient copy copy_p
reduce_precision nextafter clamp imag real conj complex population_count shift_left shift_right_logical
shift_right_arithmetic sharding_constraint optimization_barrier
""".split())

#: Reductions with an ``axes`` param.
REDUCTIONS = frozenset({"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or",
                        "reduce_xor", "argmax", "argmin"})

#: Cumulative / sorting ops: same shape in and out, positions mix along one axis.
SAME_SHAPE_AXIS_OPS = frozenset({"cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp", "rev", "sort"})

#: kvhoist's attention primitive (:mod:`kvhoist.kernels`): its dimension and masking rules are known.
ATTENTION = "kvhoist_attention"

#: Call-like primitives: inner invars/outvars are the equation's invars/outvars, one to one.
CALLS = frozenset({"jit", "pjit", "closed_call", "core_call", "remat2", "remat", "checkpoint"})


def is_jaxpr(v: Any) -> bool:
    return isinstance(v, (compat.Jaxpr, compat.ClosedJaxpr))


def sub_jaxprs(eqn) -> list[tuple[str, int | None, Any]]:
    """``(param, branch index or None, jaxpr)`` for every jaxpr in ``eqn``'s params, in param order."""
    out = []
    for k, v in eqn.params.items():
        if is_jaxpr(v):
            out.append((k, None, v))
        elif isinstance(v, tuple) and v and all(is_jaxpr(x) for x in v):
            out.extend((k, i, x) for i, x in enumerate(v))
    return out


def is_var(a: Any) -> bool:
    return not compat.is_literal(a) and not compat.is_dropvar(a)


def _rank(a) -> int:
    return len(getattr(a.aval, "shape", ()))


def _shape(a) -> tuple:
    return tuple(getattr(a.aval, "shape", ()))


Edge = tuple  # (atom_a, axis_a, atom_b, axis_b): the two slots always have the same size


def first_order_edges(eqn) -> list[Edge] | None:
    """The axis ties of a primitive without sub-jaxprs, or ``None`` when its rule is unknown.

    An output axis that no edge reaches is *created* by the equation (an ``iota``'s axes, a
    ``broadcast_in_dim``'s new axes, a ``pad``'s padded axis, a ``slice``'s cut axis, ...).
    """
    name = eqn.primitive.name
    p = eqn.params
    ins, outs = eqn.invars, eqn.outvars
    edges: list[Edge] = []
    if name in ELEMENTWISE or name in SAME_SHAPE_AXIS_OPS:
        for o in outs:
            for a in ins:
                if _rank(a) == _rank(o):
                    edges.extend((a, k, o, k) for k, (x, y) in enumerate(zip(_shape(a), _shape(o))) if x == y)
        return edges
    if name in REDUCTIONS:
        axes = set(p["axes"])
        kept = [k for k in range(_rank(ins[0])) if k not in axes]
        return [(ins[0], k, outs[0], j) for j, k in enumerate(kept)]
    if name in ("iota",):
        return []
    if name == "broadcast_in_dim":
        a, o = ins[0], outs[0]
        return [(a, i, o, d) for i, d in enumerate(p["broadcast_dimensions"]) if _shape(a)[i] == _shape(o)[d]]
    if name == "reshape":
        if p.get("dimensions") is not None:
            return None
        return _reshape_edges(ins[0], outs[0])
    if name == "transpose":
        return [(ins[0], src, outs[0], j) for j, src in enumerate(p["permutation"])]
    if name == "squeeze":
        dims = {d % _rank(ins[0]) for d in p["dimensions"]}
        kept = [k for k in range(_rank(ins[0])) if k not in dims]
        return [(ins[0], k, outs[0], j) for j, k in enumerate(kept)]
    if name == "expand_dims":
        return None
    if name == "dot_general":
        (lc, rc), (lb, rb) = p["dimension_numbers"]
        lhs, rhs, o = ins[0], ins[1], outs[0]
        edges = [(lhs, a, rhs, b) for a, b in zip(lc, rc)]
        edges += [(lhs, a, o, j) for j, a in enumerate(lb)]
        edges += [(rhs, b, o, j) for j, b in enumerate(rb)]
        j = len(lb)
        for a in range(_rank(lhs)):
            if a not in lc and a not in lb:
                edges.append((lhs, a, o, j))
                j += 1
        for b in range(_rank(rhs)):
            if b not in rc and b not in rb:
                edges.append((rhs, b, o, j))
                j += 1
        return edges
    if name == "pad":
        return [(ins[0], k, outs[0], k) for k, cfg in enumerate(p["padding_config"]) if tuple(cfg) == (0, 0, 0)]
    if name == "slice":
        strides = p.get("strides") or (1,) * _rank(ins[0])
        return [(ins[0], k, outs[0], k) for k in range(_rank(ins[0]))
                if p["start_indices"][k] == 0 and p["limit_indices"][k] == _shape(ins[0])[k] and strides[k] == 1]
    if name == "concatenate":
        d = p["dimension"]
        return [(a, k, outs[0], k) for a in ins for k in range(_rank(a)) if k != d]
    if name == "dynamic_slice":
        a = ins[0]
        return [(a, k, outs[0], k) for k, s in enumerate(p["slice_sizes"]) if s == _shape(a)[k]]
    if name == "dynamic_update_slice":
        a, u = ins[0], ins[1]
        edges = [(a, k, outs[0], k) for k in range(_rank(a))]
        return edges + [(u, k, a, k) for k in range(_rank(a)) if _shape(u)[k] == _shape(a)[k]]
    if name == "split":
        d = p["axis"]
        return [(ins[0], k, o, k) for o in outs for k in range(_rank(o)) if k != d]
    if name in ("device_put",):
        return [(a, k, o, k) for a, o in zip(ins, outs) for k in range(_rank(a))]
    if name == ATTENTION:
        # q [B, N, H, d], k [B, S, H, d], v [B, S, H, dv] -> [B, N, H, dv]; S (keys) is contracted.
        q, k, v = ins
        o = outs[0]
        return [(q, 0, k, 0), (q, 0, v, 0), (q, 0, o, 0), (q, 1, o, 1), (q, 2, k, 2), (q, 2, v, 2),
                (q, 2, o, 2), (q, 3, k, 3), (k, 1, v, 1), (v, 3, o, 3)]
    return None


def _reshape_edges(a, o) -> list[Edge]:
    """Axes a row-major reshape keeps intact: same size, same product of the axes before them."""
    sa, so = _shape(a), _shape(o)
    pre_a, acc = [], 1
    for d in sa:
        pre_a.append(acc)
        acc *= d
    pre_o, acc = {}, 1
    for j, d in enumerate(so):
        pre_o.setdefault((acc, d), j)
        acc *= d
    edges = []
    for k, d in enumerate(sa):
        if d == 1:
            continue
        j = pre_o.get((pre_a[k], d))
        if j is not None:
            edges.append((a, k, o, j))
    return edges


# --- higher-order binders -------------------------------------------------------------------------

# A binder lists (outer atom, inner var, axis offset) ties between an equation and one of its sub-jaxprs
# (inner axis k <-> outer axis k + offset), plus ties inside the sub-jaxpr (loop-carried values) and
# "scanned" outer slots (the loop axis of xs / ys).

@dataclasses.dataclass
class Binding:
    outer_inner: list  # (outer atom, inner var, offset); inner axis k <-> outer axis k+offset
    inner_inner: list  # (inner var a, inner var b): all axes tied
    scanned: list      # (outer atom, axis): a loop axis (iterated over: positions mix)


def _call_binding(eqn, sub) -> Binding:
    _cv, _c, inv, outv, _e = compat.split_closed(sub)
    return Binding([(a, v, 0) for a, v in zip(eqn.invars, inv)] + [(o, v, 0) for o, v in zip(eqn.outvars, outv)],
                   [], [])


def _scan_binding(eqn, sub) -> Binding:
    nc, nk = compat.scan_arity(eqn.params)
    _cv, _c, inv, outv, _e = compat.split_closed(sub)
    ties, inner, scanned = [], [], []
    for i, (a, v) in enumerate(zip(eqn.invars, inv)):
        ties.append((a, v, 0 if i < nc + nk else 1))
        if i >= nc + nk:
            scanned.append((a, 0))
    for j, (o, v) in enumerate(zip(eqn.outvars, outv)):
        ties.append((o, v, 0 if j < nk else 1))
        if j >= nk:
            scanned.append((o, 0))
    for k in range(nk):
        inner.append((inv[nc + k], outv[k]))
    return Binding(ties, inner, scanned)


def _cond_binding(eqn, sub) -> Binding:
    _cv, _c, inv, outv, _e = compat.split_closed(sub)
    return Binding([(a, v, 0) for a, v in zip(eqn.invars[1:], inv)] + [(o, v, 0) for o, v in zip(eqn.outvars, outv)],
                   [], [])


def _while_binding(eqn, sub, param) -> Binding:
    cn, bn = eqn.params["cond_nconsts"], eqn.params["body_nconsts"]
    carry = eqn.invars[cn + bn:]
    _cv, _c, inv, outv, _e = compat.split_closed(sub)
    if param == "cond_jaxpr":
        return Binding([(a, v, 0) for a, v in zip(eqn.invars[:cn] + carry, inv)], [], [])
    ties = [(a, v, 0) for a, v in zip(eqn.invars[cn:cn + bn] + carry, inv)]
    ties += [(o, v, 0) for o, v in zip(eqn.outvars, outv)]
    return Binding(ties, [(a, b) for a, b in zip(inv[bn:], outv)], [])


def binding(eqn, param: str, sub) -> Binding | None:
    """How ``eqn`` binds its sub-jaxpr ``param``, or ``None`` for primitives we do not see through."""
    name = eqn.primitive.name
    if name in CALLS:
        return _call_binding(eqn, sub)
    if name == "scan" and compat.scan_params_supported(eqn.params):
        return _scan_binding(eqn, sub)
    if name == "cond":
        return _cond_binding(eqn, sub)
    if name == "while":
        return _while_binding(eqn, sub, param)
    return None


# --- the analysis -----------------------------------------------------------------------------

@dataclasses.dataclass
class Scope:
    """One occurrence of a (sub-)jaxpr."""

    key: ScopeKey
    jaxpr: Any
    constvars: list
    consts: list
    invars: list
    outvars: list
    eqns: list


class DimAnalysis:
    """Union-find of equal-size dimension slots over a closed jaxpr and all its sub-jaxprs.

    Attributes:
      scopes: every scope by key (``()`` is the top level).
      opaque: ``(scope key, eqn index, reason)`` of equations whose axis ties are unknown.
      scanned: slots that a loop iterates over.
    """

    def __init__(self, closed: Any):
        self._parent: dict = {}
        self.scopes: dict[ScopeKey, Scope] = {}
        self.opaque: list = []
        self.scanned: set = set()
        self.producer: dict = {}  # (scope key, var) -> eqn index
        self._walk((), closed)

    # -- union-find ------------------------------------------------------------------------------
    def find(self, s: Slot) -> Slot:
        # Iterative with path compression: classes in a large program form long chains.
        parent = self._parent
        root = parent.setdefault(s, s)
        while parent[root] != root:
            root = parent[root]
        while s != root:
            parent[s], s = root, parent[s]
        return root

    def union(self, a: Slot, b: Slot) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self._parent[ra] = rb

    def class_of(self, s: Slot) -> list[Slot]:
        """Every slot that must keep the same size as ``s`` (``s`` included)."""
        root = self.find(s)
        return [x for x in list(self._parent) if self.find(x) == root]

    # -- walking -----------------------------------------------------------------------------------
    def _walk(self, key: ScopeKey, j: Any) -> None:
        constvars, consts, invars, outvars, eqns = compat.split_closed(j)
        self.scopes[key] = Scope(key, j, constvars, consts, invars, outvars, eqns)
        for i, e in enumerate(eqns):
            for o in e.outvars:
                if is_var(o):
                    self.producer[(key, o)] = i
            subs = sub_jaxprs(e)
            if not subs:
                edges = first_order_edges(e)
                if edges is None:
                    self.opaque.append((key, i, f"no dimension rule for `{e.primitive.name}`"))
                    continue
                for a, ax, b, bx in edges:
                    if is_var(a) and is_var(b):
                        self.union((key, a, ax), (key, b, bx))
                continue
            for param, bi, sub in subs:
                skey = key + ((i, param, bi),)
                bnd = binding(e, param, sub)
                if bnd is None:
                    self.opaque.append((key, i, f"`{e.primitive.name}` is not seen through"))
                    break
                self._walk(skey, sub)
                for outer, inner, off in bnd.outer_inner:
                    if not is_var(outer) or not is_var(inner):
                        continue
                    for k in range(_rank(inner)):
                        self.union((key, outer, k + off), (skey, inner, k))
                for a, b in bnd.inner_inner:
                    if is_var(a) and is_var(b):
                        for k in range(_rank(a)):
                            self.union((skey, a, k), (skey, b, k))
                for outer, ax in bnd.scanned:
                    if is_var(outer):
                        self.scanned.add((key, outer, ax))
                        self.find((key, outer, ax))

    def iter_eqns(self) -> Iterator[tuple[ScopeKey, int, Any]]:
        for key, sc in self.scopes.items():
            for i, e in enumerate(sc.eqns):
                yield key, i, e


def sub_key(key: ScopeKey, eqn_index: int, param: str, branch: int | None) -> ScopeKey:
    return key + ((eqn_index, param, branch),)

