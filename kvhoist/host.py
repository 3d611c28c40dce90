"""Host-loop hoisting: split a jitted step into a cached PROLOGUE and a STEP.

Most pipelines run the denoising loop in Python and call one jitted step per iteration. No jaxpr
contains that loop, so nothing in it can be hoisted: the text/image K/V projections are recomputed on
every call. Here the user *declares* which arguments stay fixed across calls (weights, prompt and image
embeddings) and kvhoist does the rest:

1. trace the step to a jaxpr whose first inputs are the leaves of the invariant arguments;
2. run LICM's extraction (:meth:`kvhoist.passes.licm.Licm.extract`) on the top-level block, with those
   inputs (and the jaxpr's constants) as the invariant ones — the same engine as for traced loops, so
   layer scans are fissioned (per-layer K/V stacked) and expert ``cond`` branches speculated;
3. the hoisted equations become the PROLOGUE (invariant leaves -> cached values), the rest the STEP
   (cached values + the leaves it still reads -> outputs); both are ``jax.jit``-compiled;
4. on a call, the prologue's results are looked up by the *identity* of the invariant leaves and
   computed only on a miss.

Identity (the cache never serves stale values):

* ``jax.Array`` leaves are immutable; an entry remembers a weak reference to each and matches only the
  very same objects (``weakref() is leaf``). When one of them is garbage-collected its entries are
  dropped at once (weakref callback), so a dead id can never be matched by a new array. A deleted
  (donated) array never matches: the prologue is re-run, and jax reports the deleted buffer.
* ``numpy`` arrays are mutable: an entry keeps a *copy* and compares contents (bytes, dtype, shape) on
  every call — O(size) per call; pass ``jax.Array``s for large invariant arguments.
* Python / numpy scalars compare by type and exact value (``repr``: ``-0.0`` and ``nan`` are exact).
* Tracers (the wrapped step called under ``jit``/``grad``/...): no caching; prologue and step both run.

The cache is a small LRU over (compiled signature, invariant identity) holding ``max_cache_entries``
prologue results (default 2: both Wan 2.2 experts). ``clear_cache()`` drops them (and the compiled
programs), ``cache_info()`` / ``cache_bytes`` report them. :meth:`HostHoistedFunction.prepare` returns an
explicit :class:`PreparedStep` handle whose prologue results live as long as the handle, outside the LRU.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import threading
import weakref
from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np

from kvhoist import compat
from kvhoist.analysis import cost
from kvhoist.api import (KvhoistError, _normalize_argnames, _normalize_argnums, function_name,
                         trace_to_jaxpr)
from kvhoist.ir import Block, used_vars
from kvhoist.report import Report

__all__ = ["HostHoistedFunction", "PreparedStep", "CacheInfo", "StaleHandleError"]

_STATIC, _INVARIANT, _VARYING = "static", "invariant", "varying"


class StaleHandleError(KvhoistError):
    """A :class:`PreparedStep` was called with invariant arguments other than those it was prepared for."""


class CacheInfo(NamedTuple):
    """Counters and sizes of a :class:`HostHoistedFunction`'s caches.

    Attributes:
      hits: calls served from a cached prologue.
      misses: calls that ran the prologue (``prologue_runs``), including calls with tracers.
      entries: prologue results held now (at most ``max_entries``).
      max_entries: the LRU bound.
      bytes: bytes of the prologue results held now.
      programs: compiled (prologue, step) pairs, one per input signature.
      peak_bytes: the most bytes of prologue results held at once since creation / ``clear_cache``.
    """

    hits: int
    misses: int
    entries: int
    max_entries: int
    bytes: int
    programs: int
    peak_bytes: int


# --------------------------------------------------------------------------------------------------
# Argument layout: which argument is static / invariant / varying
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Layout:
    """How the arguments of one call are classified; from :meth:`HostHoistedFunction._bind`."""

    slots: tuple            # ((slot id, class), ...) in call order; a slot id is a name or ("*", k) / ("**", key)
    static: tuple           # ((slot id, value), ...): hashable
    inv_tree: Any
    var_tree: Any


class _Call:
    """One call's arguments, flattened. Avals are computed lazily: on a cache hit the invariant
    leaves' avals are those recorded with the entry (same objects), so the hot path skips them."""

    __slots__ = ("layout", "inv_leaves", "var_leaves", "var_avals", "_inv_avals")

    def __init__(self, layout: _Layout, inv_leaves: list, var_leaves: list):
        self.layout, self.inv_leaves, self.var_leaves = layout, inv_leaves, var_leaves
        self.var_avals = _avals(var_leaves)
        self._inv_avals = None

    @property
    def inv_avals(self) -> tuple:
        if self._inv_avals is None:
            self._inv_avals = _avals(self.inv_leaves)
        return self._inv_avals

    @property
    def key(self) -> tuple:
        """The program key: layout (structure, static values) and every leaf's aval."""
        return (self.layout, self.inv_avals, self.var_avals)

    @property
    def entry_key(self) -> tuple:
        """The cache key of a prologue result (verified by :meth:`_Identity.matches` on a hit)."""
        return (self.layout, self.var_avals, _Identity.key_of(self.inv_leaves))


def _avals(leaves: Sequence) -> tuple:
    try:
        return tuple(jax.typeof(x) for x in leaves)
    except TypeError as err:
        raise TypeError(f"hoist_invariants: an argument has a leaf that is not an array or scalar: {err}") from err


@dataclasses.dataclass
class _Program:
    """One traced input signature: the split jaxprs and their compiled forms."""

    before: Any
    prologue: Any
    step: Any
    report: Report
    out_tree: Any
    prologue_inv: list       # indices into the invariant leaves read by the prologue
    step_inv: list           # ... read by the step directly
    step_var: list           # indices into the varying leaves read by the step
    prologue_fn: Callable | None  # None when nothing was hoisted
    step_fn: Callable


# --------------------------------------------------------------------------------------------------
# Leaf identity
# --------------------------------------------------------------------------------------------------


def _is_tracer(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


class _Identity:
    """What must hold for a cached prologue result to be valid for new invariant leaves."""

    __slots__ = ("key", "_checks", "__weakref__")

    def __init__(self, leaves: Sequence, on_death: Callable | None = None):
        keys, checks = [], []
        for x in leaves:
            k, check = _leaf_identity(x, on_death)
            keys.append(k)
            checks.append(check)
        self.key = tuple(keys)
        self._checks = checks

    @staticmethod
    def key_of(leaves: Sequence) -> tuple:
        return tuple(_leaf_key(x) for x in leaves)

    def matches(self, leaves: Sequence) -> bool:
        return len(leaves) == len(self._checks) and all(c(x) for c, x in zip(self._checks, leaves))


_PY_SCALARS = (bool, int, float, complex)


def _leaf_key(x: Any) -> Any:
    """The value of an immutable scalar (a tuple), else the object's id (an int; verified on a hit)."""
    if isinstance(x, (*_PY_SCALARS, np.generic)):
        return ("v", type(x), repr(x) if isinstance(x, _PY_SCALARS) else (str(x.dtype), x.tobytes()))
    return id(x)


def _leaf_identity(x: Any, on_death: Callable | None) -> tuple[tuple, Callable]:
    key = _leaf_key(x)
    if isinstance(key, tuple):  # immutable scalars: the key is the value
        return key, lambda y, key=key: _leaf_key(y) == key
    if isinstance(x, np.ndarray):  # mutable: keep a snapshot, compare contents on every call
        snap = np.array(x, copy=True)
        ref = weakref.ref(x, on_death) if on_death is not None else weakref.ref(x)

        def check_np(y, snap=snap, ref=ref):
            return (ref() is y and y.shape == snap.shape and y.dtype == snap.dtype
                    and np.ascontiguousarray(y).tobytes() == snap.tobytes())
        return key, check_np
    try:  # jax.Array and other immutable objects: the very same object, alive and not deleted
        ref = weakref.ref(x, on_death) if on_death is not None else weakref.ref(x)
    except TypeError:  # not weak-referenceable: hold it (the entry keeps it alive; LRU-bounded)
        return key, lambda y, x=x: y is x

    def check_obj(y, ref=ref):
        if ref() is not y:
            return False
        deleted = getattr(y, "is_deleted", None)
        return not (deleted is not None and deleted())
    return key, check_obj


class _Entry:
    __slots__ = ("identity", "values", "nbytes", "inv_avals")

    def __init__(self, identity: _Identity, values: tuple, inv_avals: tuple):
        self.identity = identity
        self.values = values
        self.inv_avals = inv_avals
        self.nbytes = sum(int(getattr(v, "nbytes", 0)) for v in values)


# --------------------------------------------------------------------------------------------------
# The decorated function
# --------------------------------------------------------------------------------------------------


class HostHoistedFunction:
    """A step function whose invariant-argument work runs once and is cached across calls.

    Created by :func:`kvhoist.hoist_invariants` with ``invariant_argnums`` / ``invariant_argnames``.
    Call it like the original function (as ``jax.jit(fun)`` would be called); see the module docstring
    for the caching and identity rules.

    Attributes:
      fun: the wrapped function.
      invariant_argnums, invariant_argnames, static_argnums, static_argnames: as given (argnames for
        named positional parameters are resolved both ways, as ``jax.jit`` does).
      max_cache_entries: LRU bound on cached prologue results.
      prologue_runs: how many times a prologue ran (for tests and benchmarks).
    """

    def __init__(self, fun: Callable, *, invariant_argnums=(), invariant_argnames=(), static_argnums=(),
                 static_argnames=(), max_cache_bytes: int | None = None, target: Any = None,
                 max_cache_entries: int = 2):
        if not callable(fun):
            raise TypeError(f"hoist_invariants expects a callable, got {type(fun).__name__}: {fun!r}")
        if not isinstance(max_cache_entries, int) or max_cache_entries < 1:
            raise ValueError(f"max_cache_entries must be a positive int, got {max_cache_entries!r}")
        self.fun = fun
        self.max_cache_bytes = max_cache_bytes
        self.max_cache_entries = max_cache_entries
        self.target = target
        if target is not None:
            from kvhoist.targets import get_target

            self.target = get_target(target)
        try:
            self._signature: inspect.Signature | None = inspect.signature(fun)
        except (TypeError, ValueError):
            self._signature = None
        functools.update_wrapper(self, fun)
        self.__name__ = function_name(fun)
        self.__name__ = getattr(fun, "__name__", type(fun).__name__)
        (self.invariant_argnums, self.invariant_argnames, self.static_argnums,
         self.static_argnames) = self._resolve(_normalize_argnums(invariant_argnums),
                                               _normalize_argnames(invariant_argnames),
                                               _normalize_argnums(static_argnums),
                                               _normalize_argnames(static_argnames))
        self._programs: dict = {}
        self._entries: dict = {}          # (program key, identity key) -> _Entry; insertion order = LRU order
        self._lock = threading.RLock()
        self.prologue_runs = 0
        self._hits = 0
        self._peak_bytes = 0

    # -- validation ------------------------------------------------------------------------------
    def _positional_params(self) -> list:
        if self._signature is None:
            return []
        return [p for p in self._signature.parameters.values()
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]

    def _resolve(self, inv_nums, inv_names, st_nums, st_names):
        sig = self._signature
        pos = self._positional_params()
        params = {} if sig is None else dict(sig.parameters)
        has_varargs = any(p.kind == p.VAR_POSITIONAL for p in params.values())
        has_varkw = any(p.kind == p.VAR_KEYWORD for p in params.values())
        what = f"{self.__name__}{sig if sig is not None else '(...)'}"

        def norm_num(i: int, kind: str) -> int:
            if not isinstance(i, int) or isinstance(i, bool):
                raise TypeError(f"hoist_invariants: {kind}_argnums entries must be ints, got {i!r}")
            if sig is None or has_varargs:
                if i < 0:
                    raise ValueError(f"hoist_invariants: {kind}_argnums={i} is negative, but {what} takes "
                                     "*args (or has no signature); use a non-negative position")
                return i
            if not -len(pos) <= i < len(pos):
                raise ValueError(f"hoist_invariants: {kind}_argnums={i} is out of range: {what} has "
                                 f"{len(pos)} positional parameter(s) "
                                 f"({', '.join(p.name for p in pos) or 'none'})")
            return i % len(pos)

        def check_name(n: str, kind: str) -> str:
            if not isinstance(n, str):
                raise TypeError(f"hoist_invariants: {kind}_argnames entries must be str, got {n!r}")
            if sig is not None and not has_varkw and n not in params:
                raise ValueError(f"hoist_invariants: {kind}_argnames={n!r} is not a parameter of {what}")
            if n in params and params[n].kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
                raise ValueError(f"hoist_invariants: {kind}_argnames={n!r} names the variadic parameter of "
                                 f"{what}; name individual arguments instead")
            return n

        inv_nums = tuple(norm_num(i, "invariant") for i in inv_nums)
        st_nums = tuple(norm_num(i, "static") for i in st_nums)
        inv_names = tuple(check_name(n, "invariant") for n in inv_names)
        st_names = tuple(check_name(n, "static") for n in st_names)
        # Resolve argnums <-> argnames through the signature, as jax.jit does.
        idx = {p.name: i for i, p in enumerate(pos)}
        inv_nums = tuple(sorted(set(inv_nums) | {idx[n] for n in inv_names if n in idx}))
        st_nums = tuple(sorted(set(st_nums) | {idx[n] for n in st_names if n in idx}))
        inv_names = tuple(sorted(set(inv_names) | {pos[i].name for i in inv_nums if i < len(pos)}))
        st_names = tuple(sorted(set(st_names) | {pos[i].name for i in st_nums if i < len(pos)}))
        if not inv_nums and not inv_names:
            raise ValueError(f"hoist_invariants: host-loop hoisting of {what} needs at least one invariant "
                             "argument (invariant_argnums= or invariant_argnames=)")
        for i in sorted(set(inv_nums) & set(st_nums)):
            label = f"argument {i}" + (f" ({pos[i].name!r})" if i < len(pos) else "")
            raise ValueError(f"hoist_invariants: {label} of {what} is static (static_argnums/"
                             "static_argnames) and cannot also be invariant: static arguments are already "
                             "compile-time constants; drop it from invariant_argnums/invariant_argnames")
        for n in sorted(set(inv_names) & set(st_names)):
            raise ValueError(f"hoist_invariants: argument {n!r} of {what} is static and cannot also be "
                             "invariant; drop it from invariant_argnums/invariant_argnames")
        return inv_nums, inv_names, st_nums, st_names

    # -- binding a call ---------------------------------------------------------------------------
    def _classify(self, slot: Any, position: int | None) -> str:
        name = slot if isinstance(slot, str) else (slot[1] if slot[0] == "**" else None)
        if (position is not None and position in self.static_argnums) or name in self.static_argnames:
            return _STATIC
        if (position is not None and position in self.invariant_argnums) or name in self.invariant_argnames:
            return _INVARIANT
        return _VARYING

    def _slots(self, args: tuple, kwargs: dict) -> list:
        """``[(slot id, value, class)]`` in a canonical order."""
        sig = self._signature
        if sig is None:
            if kwargs:
                raise TypeError(f"{self.__name__} has no inspectable signature; pass arguments positionally")
            return [(("*", i), v, self._classify(("*", i), i)) for i, v in enumerate(args)]
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError as err:
            raise TypeError(f"{self.__name__}{sig}: {err}") from None
        out = []
        pos_index = {p.name: i for i, p in enumerate(self._positional_params())}
        npos = len(pos_index)
        for name, value in bound.arguments.items():
            kind = sig.parameters[name].kind
            if kind == inspect.Parameter.VAR_POSITIONAL:
                for k, v in enumerate(value):
                    out.append((("*", k), v, self._classify(("*", k), npos + k)))
            elif kind == inspect.Parameter.VAR_KEYWORD:
                for key, v in value.items():
                    out.append((("**", key), v, self._classify(("**", key), None)))
            else:
                out.append((name, value, self._classify(name, pos_index.get(name))))
        return out

    def _bind(self, args: tuple, kwargs: dict) -> _Call:
        slots = self._slots(args, kwargs)
        static = []
        for slot, v, cls in slots:
            if cls == _STATIC:
                try:
                    hash(v)
                except TypeError as err:
                    raise TypeError(f"hoist_invariants: static argument {slot!r} of {self.__name__} is not "
                                    f"hashable ({type(v).__name__}); pass a hashable value") from err
                static.append((slot, v))
        inv_leaves, inv_tree = jax.tree_util.tree_flatten([v for _s, v, c in slots if c == _INVARIANT])
        var_leaves, var_tree = jax.tree_util.tree_flatten([v for _s, v, c in slots if c == _VARYING])
        layout = _Layout(tuple((s, c) for s, _v, c in slots), tuple(static), inv_tree, var_tree)
        return _Call(layout, inv_leaves, var_leaves)

    def _rebuild(self, layout: _Layout, inv_leaves: Sequence, var_leaves: Sequence) -> tuple[tuple, dict]:
        """``(args, kwargs)`` for ``fun`` from the flat leaves (the inverse of :meth:`_bind`)."""
        inv = iter(jax.tree_util.tree_unflatten(layout.inv_tree, list(inv_leaves)))
        var = iter(jax.tree_util.tree_unflatten(layout.var_tree, list(var_leaves)))
        static = dict(layout.static)
        star, starstar, values = [], {}, {}
        for slot, cls in layout.slots:
            v = static[slot] if cls == _STATIC else next(inv) if cls == _INVARIANT else next(var)
            if isinstance(slot, tuple) and slot[0] == "*":
                star.append(v)
            elif isinstance(slot, tuple):
                starstar[slot[1]] = v
            else:
                values[slot] = v
        if self._signature is None:
            return tuple(star), {}
        for p in self._signature.parameters.values():
            if p.kind == p.VAR_POSITIONAL:
                values[p.name] = tuple(star)
            elif p.kind == p.VAR_KEYWORD:
                values[p.name] = starstar
        bound = inspect.BoundArguments(self._signature, {k: values[k] for k in self._signature.parameters
                                                         if k in values})
        return bound.args, bound.kwargs

    # -- tracing and splitting --------------------------------------------------------------------
    def _program(self, call: _Call) -> _Program:
        with self._lock:
            prog = self._programs.get(call.key)
        if prog is None:
            prog = self._build(call)
            with self._lock:
                self._programs[call.key] = prog
        return prog

    def _build(self, call: _Call) -> _Program:
        from kvhoist import rules  # noqa: F401  (registers the LICM rules)
        from kvhoist.passes.licm import Licm, LoopInfo
        from kvhoist.passes.pipeline import optimize

        layout, n_inv = call.layout, len(call.inv_leaves)
        out_store = []

        def flat_fun(*flat):
            args, kwargs = self._rebuild(layout, flat[:n_inv], flat[n_inv:])
            out = self.fun(*args, **kwargs)
            leaves, tree = jax.tree_util.tree_flatten(out)
            out_store.append(tree)
            return leaves

        before = trace_to_jaxpr(flat_fun, [*call.inv_leaves, *call.var_leaves], self.__name__)
        out_tree = out_store[-1]
        # The pipeline's passes before hoisting (the layout pass, with a target); the split below is
        # this module's hoisting.
        closed, report = optimize(before, target=self.target, hoist=False)
        constvars, consts, invars, outvars, eqns = compat.split_closed(closed)
        inv_vars, var_vars = invars[:n_inv], invars[n_inv:]
        engine = Licm(max_cache_bytes=self.max_cache_bytes)
        # Loops inside the step first (innermost-first LICM, as for traced loops), then the split
        # across calls: work invariant to an inner loop but not across calls still leaves that loop.
        block = engine.optimize_block(Block(list(constvars) + list(invars), list(outvars), list(eqns)))
        n_inner = len(engine.report.hoisted)
        with engine.in_loop(LoopInfo("host loop", None, f"calls of {self.__name__}")):
            ext = engine.extract(block, set(constvars) | set(inv_vars), charge=True)
        outvars = block.outvars
        const_of = dict(zip(constvars, consts))
        position = {v: i for i, v in enumerate(inv_vars)}
        var_position = {v: i for i, v in enumerate(var_vars)}

        # PROLOGUE: invariant leaves (and constants) -> the values the step still needs.
        read = set(ext.used_invars)  # the block inputs (constants, invariant leaves) the prologue reads
        pro_consts = [v for v in constvars if v in read]
        pro_inv = [v for v in inv_vars if v in read]
        prologue = compat.make_closed(pro_consts, [const_of[v] for v in pro_consts], pro_inv,
                                      list(ext.crossing), list(ext.hoisted))
        # STEP: cached values + the leaves it still reads -> outputs.
        needed = used_vars(ext.residual, outvars)
        st_consts = [v for v in constvars if v in needed]
        st_inv = [v for v in inv_vars if v in needed]
        st_var = [v for v in var_vars if v in needed]
        step = compat.make_closed(st_consts, [const_of[v] for v in st_consts],
                                  list(ext.crossing) + st_inv + st_var, list(outvars), list(ext.residual))
        for j in (prologue, step):
            compat.check(j)

        # One "run" of a host-hoisted step is one call: a value moved into the prologue saves its work on
        # every call after the one that filled the cache (values hoisted out of loops *inside* the step
        # keep their own figures).
        engine.report.hoisted = engine.report.hoisted[:n_inner] + [
            dataclasses.replace(h, flops_saved=h.flops_per_iteration, loop=f"calls of {self.__name__}")
            for h in engine.report.hoisted[n_inner:]]
        report = report.merge(engine.report)
        report.total_flops_before = cost.jaxpr_flops_run(before)
        report.total_flops_after = cost.jaxpr_flops_run(step)
        if ext.empty:
            report.notes.append(_note("host", f"nothing in {self.__name__} depends only on the invariant "
                                              "arguments; every call runs the whole step"))
        return _Program(
            before=before, prologue=prologue, step=step, report=report, out_tree=out_tree,
            prologue_inv=[position[v] for v in pro_inv], step_inv=[position[v] for v in st_inv],
            step_var=[var_position[v] for v in st_var],
            prologue_fn=None if ext.empty else jax.jit(compat.jaxpr_as_fun(prologue)),
            step_fn=jax.jit(compat.jaxpr_as_fun(step)))

    # -- running -------------------------------------------------------------------------------
    def _run_prologue(self, prog: _Program, inv_leaves: Sequence) -> tuple:
        if prog.prologue_fn is None:
            return ()
        with self._lock:
            self.prologue_runs += 1
        return tuple(prog.prologue_fn(*(inv_leaves[i] for i in prog.prologue_inv)))

    def _run_step(self, prog: _Program, values: Sequence, call: _Call):
        out = prog.step_fn(*values, *(call.inv_leaves[i] for i in prog.step_inv),
                           *(call.var_leaves[i] for i in prog.step_var))
        return jax.tree_util.tree_unflatten(prog.out_tree, list(out))

    def _on_death(self, entry_key):
        self_ref = weakref.ref(self)

        def drop(_ref):
            me = self_ref()
            if me is not None:
                me._entries.pop(entry_key, None)
        return drop

    def _prologue_values(self, call: _Call) -> tuple[_Program, tuple]:
        """The program for this call and its prologue results: cached, or computed now."""
        if any(_is_tracer(x) for x in call.inv_leaves):  # under a transformation: nothing to cache
            prog = self._program(call)
            return prog, self._run_prologue(prog, call.inv_leaves)
        entry_key = call.entry_key
        with self._lock:
            entry = self._entries.pop(entry_key, None)
            if entry is not None and entry.identity.matches(call.inv_leaves):
                self._entries[entry_key] = entry  # most recently used
                self._hits += 1
                call._inv_avals = entry.inv_avals  # the very same objects: same avals
                hit = entry
            else:
                hit = None
        if hit is not None:
            return self._program(call), hit.values
        prog = self._program(call)
        if prog.prologue_fn is None:
            return prog, ()
        values = self._run_prologue(prog, call.inv_leaves)
        if any(_is_tracer(v) for v in values):
            # Concrete invariants but called inside a trace (e.g. a jit over the varying arguments): the
            # prologue's results belong to that trace and must not outlive it.
            return prog, values
        entry = _Entry(_Identity(call.inv_leaves, self._on_death(entry_key)), values, call.inv_avals)
        with self._lock:
            self._entries.pop(entry_key, None)
            self._entries[entry_key] = entry
            while len(self._entries) > self.max_cache_entries:
                self._entries.pop(next(iter(self._entries)))
            held = sum(e.nbytes for e in list(self._entries.values()))
            self._peak_bytes = max(self._peak_bytes, held)
        return prog, values

    def __call__(self, *args, **kwargs):
        call = self._bind(args, kwargs)
        prog, values = self._prologue_values(call)
        return self._run_step(prog, values, call)

    # -- public helpers ---------------------------------------------------------------------------
    def prepare(self, *args, **kwargs) -> "PreparedStep":
        """Run the prologue for these arguments now and return a handle holding its results.

        Args are those of a call; the varying ones only fix shapes and dtypes. The handle is called with
        the same arguments as the function; it checks that the invariant ones are still the prepared
        objects (raising :class:`StaleHandleError` otherwise) and never touches the LRU cache.

        Example:
          >>> handle = step.prepare(params, context, latents)
          >>> for _ in range(n):
          ...     latents = handle(params, context, latents)
        """
        call = self._bind(args, kwargs)
        prog = self._program(call)
        if any(_is_tracer(x) for x in call.inv_leaves):
            raise KvhoistError("prepare() needs concrete invariant arguments, not tracers")
        values = self._run_prologue(prog, call.inv_leaves)
        return PreparedStep(self, call.key, _Identity(call.inv_leaves), values)

    def jaxprs(self, *args, **kwargs) -> tuple[Any, Any, Any]:
        """``(before, prologue, step)`` closed jaxprs for this input signature.

        ``prologue`` maps the invariant leaves it reads to the cached values; ``step`` takes the cached
        values, then the invariant leaves it still reads, then the varying leaves it reads.
        """
        prog = self._program(self._bind(args, kwargs))
        return prog.before, prog.prologue, prog.step

    def report(self, *args, **kwargs) -> Report:
        """What moved into the prologue for this input signature (see :class:`kvhoist.Report`).

        ``flops_saved`` of each value is per call served from the cache; totals are per call.
        """
        return self._program(self._bind(args, kwargs)).report

    def cache_info(self) -> CacheInfo:
        with self._lock:
            entries = list(self._entries.values())
            return CacheInfo(self._hits, self.prologue_runs, len(entries), self.max_cache_entries,
                             sum(e.nbytes for e in entries), len(self._programs), self._peak_bytes)

    @property
    def cache_bytes(self) -> int:
        """Bytes of the cached prologue results held now."""
        return self.cache_info().bytes

    def clear_cache(self, programs: bool = True) -> None:
        """Drop every cached prologue result (and, with ``programs=True``, the compiled programs)."""
        with self._lock:
            self._entries.clear()
            self._peak_bytes = 0
            if programs:
                self._programs.clear()

    def __repr__(self) -> str:
        return (f"<hoist_invariants {self.__name__} invariant={self.invariant_argnames or self.invariant_argnums}"
                f">")


class PreparedStep:
    """An explicit prologue result from :meth:`HostHoistedFunction.prepare`; call it like the function."""

    def __init__(self, owner: HostHoistedFunction, key: tuple, identity: _Identity, values: tuple):
        self._owner = owner
        self._key = key
        self._identity = identity
        self._values = values

    @property
    def cache_bytes(self) -> int:
        """Bytes of the prologue results this handle holds."""
        return sum(int(getattr(v, "nbytes", 0)) for v in self._values)

    def __call__(self, *args, **kwargs):
        owner = self._owner
        call = owner._bind(args, kwargs)
        if call.key != self._key or not self._identity.matches(call.inv_leaves):
            raise StaleHandleError(
                f"this prepared {owner.__name__} was made for other invariant arguments "
                f"({', '.join(map(str, owner.invariant_argnames or owner.invariant_argnums))}) or shapes; "
                "call prepare() again with the new ones, or call the function itself")
        return owner._run_step(owner._program(call), self._values, call)


def _note(kind: str, message: str):
    from kvhoist.report import Note

    return Note(kind, message)
