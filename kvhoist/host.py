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
* Static arguments key compiled programs by value and type, as in ``jax.jit`` (``f(x, 2)``,
  ``f(x, 2.0)`` and ``f(x, True)`` are three programs), and so does ``jax_enable_x64``.
* Tracers (the wrapped step called under ``jit``/``grad``/...): no caching; prologue and step both run.

Per call (a cache hit costs one flatten of the invariant arguments plus one run of the compiled step,
without jit's per-argument dispatch):

* the call's shape (number of positional arguments, keyword names) selects a cached plan saying
  where each static / invariant / varying value sits (``inspect.Signature.bind`` runs once per shape);
* the invariant arguments are flattened once; candidates are looked up by (shape, static values *and
  their types*, the invariant treedef, jax's trace context — x64 and every other setting jit keys on),
  and the one whose recorded leaf ``id``s equal the call's (a list compare) is the entry. An id is
  trusted only while the entry is alive: the weakref callbacks above clear its ids (first) and drop it
  with its arrays, and scalar leaves are pinned by the entry. What remains to check per call: the bytes
  of each numpy leaf against its snapshot, and ``is_deleted`` of each array the step does not receive;
* the step's executable (the one ``jax.jit`` compiled) runs directly on ``[*cached values, *invariant
  leaves it reads, *varying leaves]``: values and invariant leaves were checked against its inputs once
  per entry, the varying leaves are checked per call (treedef; aval, committedness, sharding, layout).
  Otherwise (a numpy / scalar / tracer varying leaf, debug_nans, ...) the step is
  ``jax.jit(run)(cached values, invariant leaves it reads, *varying arguments as passed)``; when those
  no longer match the program (another shape or structure), the retrace raises internally and the call
  takes the slow path, which binds, computes avals, and finds or builds that signature's program
  (varying shapes that alternate call by call pay that failed retrace each time).

The cache is a small LRU over (compiled signature, invariant identity) holding ``max_cache_entries``
prologue results (default 2: both Wan 2.2 experts). ``clear_cache()`` drops them (and the compiled
programs), ``cache_info()`` / ``cache_bytes`` report them. :meth:`HostHoistedFunction.prepare` returns an
explicit :class:`PreparedStep` handle whose prologue results live as long as the handle, outside the LRU.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import inspect
import itertools
import logging
import operator
import os
import threading
import time
import weakref
from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np

from kvhoist import compat
from kvhoist.analysis import cost
from kvhoist.errors import KvhoistError
from kvhoist.tracing import (DUMP_ENV, LOG_INPUTS, _check_jit_options, _normalize_argnames,
                         _normalize_argnums, count_equations, dump_signature, function_name, log_report, logger,
                         signature_text, trace_to_jaxpr)
from kvhoist.ir import Block, used_vars
from kvhoist.report import Report

__all__ = ["HostHoistedFunction", "PreparedStep", "CacheInfo", "StaleHandleError"]

_STATIC, _INVARIANT, _VARYING = "static", "invariant", "varying"
# Bound once: the hit path calls these directly (jax.tree_util.tree_flatten is a Python wrapper of this).
_tree_flatten = jax.tree_util.default_registry.flatten
_spec_matches = compat.spec_matches
_special_checks_on = compat.special_checks_on
_trace_context = compat.trace_context  # what jax.jit keys its traces on (x64, default device, ...)


class StaleHandleError(KvhoistError):
    """A :class:`PreparedStep` was called with invariant arguments other than those it was prepared for."""


class CacheInfo(NamedTuple):
    """Counters and sizes of a :class:`HostHoistedFunction`'s caches.

    Attributes:
      hits: calls served from a cached prologue.
      misses: calls that ran the prologue (``prologue_runs``), including calls with tracers.
      entries: prologue results held now (at most ``max_entries``; a signature with nothing to hoist
        holds a 0-byte entry, which lets its calls take the fast path too).
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


class _Retrace(Exception):
    """Raised while ``jax.jit`` traces a program's step for varying arguments of another signature:
    the call falls back to the slow path, which picks (or builds) the program for them."""


# --------------------------------------------------------------------------------------------------
# Argument layout: which argument is static / invariant / varying
# --------------------------------------------------------------------------------------------------


def _picker(sources: Sequence) -> Callable[[tuple, dict], tuple]:
    """``(args, kwargs) -> values`` at ``sources`` (an int: a position; a str: a keyword)."""
    sources = tuple(sources)
    if all(isinstance(s, int) for s in sources):
        if not sources:
            return lambda args, kwargs: ()
        if len(sources) == 1:
            (i,) = sources
            return lambda args, kwargs: (args[i],)
        get = operator.itemgetter(*sources)
        return lambda args, kwargs: get(args)
    return lambda args, kwargs: tuple(args[s] if isinstance(s, int) else kwargs[s] for s in sources)


class _ArgPlan:
    """Where the static, invariant and varying values of one call shape (number of positional
    arguments, keyword names) come from. Built once per call shape with ``inspect.Signature.bind``;
    calls of that shape then pick their values with ``operator.itemgetter``.

    ``canon`` is shared by the plans of every call shape that binds the same slots (``f(a, b=1)`` and
    ``f(b=1, a=a)`` are the same program), so it can stand for the slots in a dictionary key.
    """

    __slots__ = ("slots", "canon", "static_slots", "static", "inv", "var")

    def __init__(self, slots: tuple, sources: Sequence, canon: object):
        self.slots = slots          # ((slot id, class), ...) in canonical (signature) order
        self.canon = canon
        self.static_slots = tuple(s for s, c in slots if c == _STATIC)
        self.static = _picker([src for (_s, c), src in zip(slots, sources) if c == _STATIC])
        self.inv = _picker([src for (_s, c), src in zip(slots, sources) if c == _INVARIANT])
        self.var = _picker([src for (_s, c), src in zip(slots, sources) if c == _VARYING])


@dataclasses.dataclass(frozen=True)
class _Layout:
    """The structure of one call: its slots, static values, and the pytree structures of the rest."""

    slots: tuple            # ((slot id, class), ...) in call order; a slot id is a name or ("*", k) / ("**", key)
    static: tuple           # ((slot id, value), ...): hashable
    static_types: tuple     # type of each static value: like jax.jit, f(x, 2) and f(x, 2.0) differ
    inv_tree: Any
    var_tree: Any


def _static_key(values: tuple) -> tuple:
    """Static values keyed by value AND type (``2 == 2.0 == True`` but they trace differently)."""
    return tuple([(v.__class__, v) for v in values]) if values else ()


class _Call:
    """One call's arguments, flattened (the slow path). Avals are computed lazily: on a cache hit the
    invariant leaves' avals are those recorded with the entry (same objects)."""

    __slots__ = ("layout", "inv_leaves", "var_leaves", "var_args", "context", "var_avals", "_inv_avals")

    def __init__(self, layout: _Layout, inv_leaves: list, var_leaves: list, var_args: tuple, context: tuple):
        self.layout, self.inv_leaves, self.var_leaves = layout, inv_leaves, var_leaves
        self.var_args, self.context = var_args, context
        self.var_avals = _avals(var_leaves)
        self._inv_avals = None

    @property
    def inv_avals(self) -> tuple:
        if self._inv_avals is None:
            self._inv_avals = _avals(self.inv_leaves)
        return self._inv_avals

    @property
    def key(self) -> tuple:
        """The program key: layout (structure, static values and types), jax's trace context (x64,
        ...) and every leaf's aval."""
        return (self.layout, self.context, self.inv_avals, self.var_avals)

    @property
    def entry_key(self) -> tuple:
        """The cache key of a prologue result (verified by :meth:`_Identity.matches` on a hit)."""
        return (self.layout, self.context, self.var_avals, _Identity.key_of(self.inv_leaves))


def _avals(leaves: Sequence) -> tuple:
    try:
        return tuple(jax.typeof(x) for x in leaves)
    except TypeError as err:
        raise TypeError(f"hoist_invariants: an argument has a leaf that is not an array or scalar: {err}") from err


def _is_jax_type(x: Any) -> bool:
    """Whether jax can trace ``x`` (an array, a scalar, a tracer)."""
    try:
        jax.typeof(x)
    except TypeError:
        return False
    return True


def _signature(leaves: Sequence) -> tuple:
    """Shape, dtype and weak type of each leaf (concrete or traced): what the step was traced for."""
    return tuple((a.shape, a.dtype, getattr(a, "weak_type", False)) for a in map(jax.typeof, leaves))


def _taker(indices: Sequence[int], n: int) -> Callable[[Sequence], Sequence]:
    """``leaves -> [leaves[i] for i in indices]`` of ``n`` leaves, with ``operator.itemgetter`` (C speed);
    the leaves themselves when that is all of them, in order (the step reads every weight)."""
    indices = tuple(indices)
    if indices == tuple(range(n)):
        return lambda leaves: leaves
    if not indices:
        return lambda leaves: ()
    if len(indices) == 1:
        (i,) = indices
        return lambda leaves: (leaves[i],)
    return operator.itemgetter(*indices)


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
    step_call: Callable      # jax.jit: (cached values, step_inv leaves, *varying arguments) -> outputs
    step_flat: Callable      # jax.jit: (*cached values, *step_inv leaves, *step_var leaves) -> flat outputs
    take_step_inv: Callable  # invariant leaves -> the step_inv ones (all of them: the list itself)
    var_tree: Any = None     # the varying arguments' structure this program was traced for
    # The compiled step called without jit's per-argument dispatch (see _direct): _UNBUILT until the
    # first cache hit builds it, None when it cannot run that way; with the arg_specs of its inputs
    # (cached values + step_inv leaves, checked once per entry; varying leaves, checked per call).
    direct: Any = None
    head_specs: tuple = ()
    var_specs: tuple = ()


def _step_call(name: str, step: Any, out_tree: Any, var_tree: Any, var_signature: tuple,
               step_var: Sequence[int], donate: tuple = (), jit_options: dict | None = None) -> Callable:
    """The step as ``jax.jit(run)(values, inv, *varying arguments as passed)``.

    jit's C++ fast path then flattens and checks the varying arguments itself (no ``jax.typeof`` per
    leaf in Python) and unflattens the outputs. When it retraces for varying arguments of another
    structure or signature (they no longer match this program), :class:`_Retrace` sends the call to the
    slow path instead.
    """
    step_fun = compat.jaxpr_as_fun(step)
    take_var = _taker(step_var, -1)

    def run(values, inv, *var_args):
        leaves, tree = _tree_flatten(var_args)
        if tree != var_tree or _signature(leaves) != var_signature:
            raise _Retrace()
        out = step_fun(*values, *inv, *take_var(leaves))
        return jax.tree_util.tree_unflatten(out_tree, list(out))

    run.__name__ = run.__qualname__ = f"{name}_step"
    # ``donate``: positions in (values, inv, *varying arguments) of the donated varying arguments.
    return jax.jit(run, donate_argnums=tuple(donate) or None, **(jit_options or {}))


# --------------------------------------------------------------------------------------------------
# Leaf identity
# --------------------------------------------------------------------------------------------------


def _is_tracer(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


class _Identity:
    """What must hold for a cached prologue result to be valid for new invariant leaves."""

    __slots__ = ("key", "_checks", "snapshots", "__weakref__")

    def __init__(self, leaves: Sequence, on_death: Callable | None = None):
        keys, checks, snapshots = [], [], []
        for i, x in enumerate(leaves):
            k, check, snap = _leaf_identity(x, on_death)
            keys.append(k)
            checks.append(check)
            if snap is not None:
                snapshots.append((i, snap))
        self.key = tuple(keys)
        self._checks = checks
        self.snapshots = tuple(snapshots)  # ((index, private copy), ...) of the numpy leaves

    @staticmethod
    def key_of(leaves: Sequence) -> tuple:
        return tuple(_leaf_key(x) for x in leaves)

    def matches(self, leaves: Sequence) -> bool:
        return len(leaves) == len(self._checks) and all(c(x) for c, x in zip(self._checks, leaves))


_PY_SCALARS = (bool, int, float, complex)
_SCALARS = (*_PY_SCALARS, np.generic)


def _leaf_key(x: Any) -> Any:
    """The value of an immutable scalar (a tuple), else the object's id (an int; verified on a hit)."""
    if isinstance(x, _SCALARS):
        return ("v", type(x), repr(x) if isinstance(x, _PY_SCALARS) else (str(x.dtype), x.tobytes()))
    return id(x)


def _same_numpy(y: Any, snap: np.ndarray) -> bool:
    return (y.shape == snap.shape and y.dtype == snap.dtype
            and np.ascontiguousarray(y).tobytes() == snap.tobytes())


def _leaf_identity(x: Any, on_death: Callable | None) -> tuple[Any, Callable, np.ndarray | None]:
    key = _leaf_key(x)
    if isinstance(key, tuple):  # immutable scalars: the key is the value
        return key, lambda y, key=key: _leaf_key(y) == key, None
    if isinstance(x, np.ndarray):  # mutable: keep a snapshot, compare contents on every call
        snap = np.array(x, copy=True)
        ref = weakref.ref(x, on_death) if on_death is not None else weakref.ref(x)
        return key, lambda y, snap=snap, ref=ref: ref() is y and _same_numpy(y, snap), snap
    try:  # jax.Array and other immutable objects: the very same object, alive and not deleted
        ref = weakref.ref(x, on_death) if on_death is not None else weakref.ref(x)
    except TypeError:  # not weak-referenceable: hold it (the entry keeps it alive; LRU-bounded)
        return key, lambda y, x=x: y is x, None

    def check_obj(y, ref=ref):
        if ref() is not y:
            return False
        deleted = getattr(y, "is_deleted", None)
        return not (deleted is not None and deleted())
    return key, check_obj, None


class _Cached:
    """Prologue results for one set of invariant leaves, and what a fast-path hit must still check.

    The fast path finds this object by ``fast_key`` (call shape, static values, invariant treedef,
    trace context) and then the ``id``s of the invariant leaves (``ids``, a list compared with the
    call's). An id is only trusted while the object is known alive: jax/numpy arrays are watched by
    weak references whose callbacks set ``ids`` to None (first, atomically) and drop this object from
    every index when one dies (so a recycled id is never matched), and scalar leaves, compared by value
    in the slow path, are pinned here (``pins``) for as long as ``ids`` refers to their ids. Same objects then leave only two things to check per call: numpy
    leaves were not mutated (their snapshots) and arrays the step does not receive (jit would reject
    a deleted one it receives) were not deleted.
    """

    __slots__ = ("program", "values", "identity", "snapshots", "deletable", "checks", "fast_key", "ids",
                 "pins", "direct", "__weakref__")

    def __init__(self, program: _Program, values: tuple, leaves: Sequence, on_death: Callable | None):
        self.program = program
        self.values = values
        self.identity = _Identity(leaves, on_death)
        self.snapshots = self.identity.snapshots
        passed = set(program.step_inv)
        self.deletable = tuple(i for i, x in enumerate(leaves)
                               if i not in passed and hasattr(x, "is_deleted") and not isinstance(x, np.ndarray))
        self.checks = bool(self.snapshots or self.deletable)
        self.fast_key: tuple | None = None
        self.ids: list | None = None  # ids of the leaves, while trusted; None never equals a list
        self.pins: tuple = ()
        self.direct: Any = _UNCHECKED  # the program's direct run when these leaves fit it, else None

    def still_valid(self, leaves: Sequence) -> bool:
        """For leaves whose ids equal ``ids``: not mutated, not deleted."""
        for i, snap in self.snapshots:
            if not _same_numpy(leaves[i], snap):
                return False
        for i in self.deletable:
            if leaves[i].is_deleted():
                return False
        return True


class _Entry(_Cached):
    __slots__ = ("serial", "key", "nbytes", "inv_avals")

    def __init__(self, serial: int, key: tuple, program: _Program, values: tuple, leaves: Sequence,
                 inv_avals: tuple, on_death: Callable | None):
        super().__init__(program, values, leaves, on_death)
        self.serial, self.key, self.inv_avals = serial, key, inv_avals
        self.nbytes = sum(int(getattr(v, "nbytes", 0)) for v in values)


_MISSING = object()
_UNBUILT = object()    # _Program.direct not built yet
_UNCHECKED = object()  # _Cached.direct not decided yet


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
                 max_cache_entries: int = 2, donate_argnums=None, donate_argnames=None, **jit_options: Any):
        if not callable(fun):
            raise TypeError(f"hoist_invariants expects a callable, got {type(fun).__name__}: {fun!r}")
        if not isinstance(max_cache_entries, int) or max_cache_entries < 1:
            raise ValueError(f"max_cache_entries must be a positive int, got {max_cache_entries!r}")
        _check_jit_options(jit_options)
        placed = sorted(k for k in ("in_shardings", "out_shardings") if k in jit_options)
        if placed:
            raise KvhoistError(f"hoist_invariants: {placed[0]} is not supported with host-loop hoisting "
                               "(invariant_argnums/argnames): it names the step's arguments, but the compiled "
                               "programs are a prologue and a step with other arguments; place the arrays "
                               "with jax.device_put (shardings follow the committed inputs)")
        # Program-wide jax.jit options (keep_unused, device, backend, inline, compiler_options, ...) go to
        # every program compiled here (prologue and step).
        self.jit_options = dict(jit_options)
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
        (self.invariant_argnums, self.invariant_argnames, self.static_argnums,
         self.static_argnames) = self._resolve(_normalize_argnums(invariant_argnums),
                                               _normalize_argnames(invariant_argnames),
                                               _normalize_argnums(static_argnums),
                                               _normalize_argnames(static_argnames))
        self.donate_argnums, self.donate_argnames = self._resolve_donated(
            _normalize_argnums(donate_argnums, "donate_argnums"), _normalize_argnames(donate_argnames, "donate_argnames"))
        self._programs: dict = {}         # program key -> _Program
        self._entries: collections.OrderedDict = collections.OrderedDict()  # serial -> _Entry, LRU order
        self._index: dict = {}            # entry key (program key, identity key) -> _Entry (slow path)
        self._fast: dict = {}             # fast key (shape, statics, treedef, context) -> (_Entry, ...)
        self._plans: dict = {}            # call shape (len(args), *kwargs names) -> _ArgPlan
        self._canon: dict = {}            # slots -> token shared by the plans binding the same slots
        self._serials = itertools.count()
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

    def _resolve_donated(self, nums: tuple, names: tuple) -> tuple[tuple, tuple]:
        """``donate_argnums`` / ``donate_argnames`` completed through the signature; only varying arguments
        may be donated (one error naming why for an invariant or static one)."""
        pos = self._positional_params()
        what = f"{self.__name__}{self._signature if self._signature is not None else '(...)'}"
        params = {} if self._signature is None else dict(self._signature.parameters)
        has_varkw = any(p.kind == p.VAR_KEYWORD for p in params.values())
        for n in names:
            if self._signature is not None and not has_varkw and n not in params:
                raise ValueError(f"hoist_invariants: donate_argnames={n!r} is not a parameter of {what}")
        idx = {p.name: i for i, p in enumerate(pos)}
        if self._signature is not None and not any(p.kind == p.VAR_POSITIONAL for p in params.values()):
            for i in nums:
                if not -len(pos) <= i < len(pos):
                    raise ValueError(f"hoist_invariants: donate_argnums={i} is out of range: {what} has "
                                     f"{len(pos)} positional parameter(s)")
            nums = tuple(i % len(pos) for i in nums)
        nums = tuple(sorted(set(nums) | {idx[n] for n in names if n in idx}))
        names = tuple(sorted(set(names) | {pos[i].name for i in nums if 0 <= i < len(pos)}))
        for i, n in [(i, None) for i in nums] + [(None, n) for n in names]:
            label = repr(n) if n is not None else f"{i}" + (f" ({pos[i].name!r})" if 0 <= i < len(pos) else "")
            if (i is not None and i in self.invariant_argnums) or n in self.invariant_argnames:
                raise KvhoistError(
                    f"hoist_invariants: argument {label} of {what} is invariant and cannot be donated: its "
                    "arrays stay cached across calls (the prologue's results are keyed on them and the step "
                    "may read them again), so they must stay alive; donate only varying arguments")
            if (i is not None and i in self.static_argnums) or n in self.static_argnames:
                raise ValueError(f"hoist_invariants: argument {label} of {what} is static and cannot be donated")
        return nums, names

    def _donated(self, slot: Any) -> bool:
        """Whether the argument in ``slot`` (a name, ``("*", k)`` or ``("**", key)``) is donated."""
        if isinstance(slot, str):
            name, position = slot, {p.name: i for i, p in enumerate(self._positional_params())}.get(slot)
        elif slot[0] == "*":
            name = None
            position = len(self._positional_params()) + slot[1] if self._signature is not None else slot[1]
        else:
            name, position = slot[1], None
        return (position is not None and position in self.donate_argnums) or name in self.donate_argnames

    # -- binding a call ---------------------------------------------------------------------------
    def _classify(self, slot: Any, position: int | None) -> str:
        name = slot if isinstance(slot, str) else (slot[1] if slot[0] == "**" else None)
        if (position is not None and position in self.static_argnums) or name in self.static_argnames:
            return _STATIC
        if (position is not None and position in self.invariant_argnums) or name in self.invariant_argnames:
            return _INVARIANT
        return _VARYING

    def _plan(self, args: tuple, kwargs: dict) -> _ArgPlan:
        """The :class:`_ArgPlan` of this call's shape: cached, or bound now (raising the signature's
        ``TypeError`` for a call that does not fit)."""
        shape = (len(args), *kwargs) if kwargs else len(args)
        plan = self._plans.get(shape)
        if plan is not None:
            return plan
        sig = self._signature
        slots, sources = [], []
        if sig is None:
            if kwargs:
                raise TypeError(f"{self.__name__} has no inspectable signature; pass arguments positionally")
            for i in range(len(args)):
                slots.append((("*", i), self._classify(("*", i), i)))
                sources.append(i)
        else:
            try:
                bound = sig.bind(*args, **kwargs)
            except TypeError as err:
                raise TypeError(f"{self.__name__}{sig}: {err}") from None
            pos_index = {p.name: i for i, p in enumerate(self._positional_params())}
            npos = len(pos_index)
            for name, value in bound.arguments.items():
                kind = sig.parameters[name].kind
                if kind == inspect.Parameter.VAR_POSITIONAL:
                    for k in range(len(value)):
                        slots.append((("*", k), self._classify(("*", k), npos + k)))
                        sources.append(npos + k)
                elif kind == inspect.Parameter.VAR_KEYWORD:
                    for key in value:
                        slots.append((("**", key), self._classify(("**", key), None)))
                        sources.append(key)
                else:
                    i = pos_index.get(name)
                    slots.append((name, self._classify(name, i)))
                    sources.append(i if i is not None and i < len(args) else name)
        slots = tuple(slots)
        with self._lock:
            canon = self._canon.setdefault(slots, object())
            plan = _ArgPlan(slots, sources, canon)
            if len(self._plans) >= 256:  # call shapes are few; bound the table anyway
                self._plans.clear()
            self._plans[shape] = plan
        return plan

    def _bind(self, args: tuple, kwargs: dict, plan: _ArgPlan | None = None,
              inv_flat: tuple | None = None) -> _Call:
        plan = self._plan(args, kwargs) if plan is None else plan
        statics = plan.static(args, kwargs)
        for slot, v in zip(plan.static_slots, statics):
            try:
                hash(v)
            except TypeError as err:
                raise TypeError(f"hoist_invariants: static argument {slot!r} of {self.__name__} is not "
                                f"hashable ({type(v).__name__}); pass a hashable value") from err
        inv_leaves, inv_tree = _tree_flatten(plan.inv(args, kwargs)) if inv_flat is None else inv_flat
        var_args = plan.var(args, kwargs)
        var_leaves, var_tree = _tree_flatten(var_args)
        layout = _Layout(plan.slots, tuple(zip(plan.static_slots, statics)), tuple(type(v) for v in statics),
                         inv_tree, var_tree)
        try:
            return _Call(layout, inv_leaves, var_leaves, var_args, _trace_context())
        except TypeError as err:
            hint = self._not_an_array_error(layout, _VARYING, var_args)
            if hint is None:
                raise
            raise hint from err

    def _not_an_array_error(self, layout: _Layout, cls: str, values: Sequence) -> TypeError | None:
        """The error for an argument of class ``cls`` (varying or invariant; ``values`` in slot order) that
        holds something jax cannot trace (a settings object, a string): it names the argument and the
        ``static_argnames`` / ``static_argnums`` that would fix it. None if every leaf is an array or scalar."""
        slots = [slot for slot, c in layout.slots if c == cls]
        for slot, value in zip(slots, values):
            bad = next((leaf for leaf in jax.tree_util.tree_leaves(value) if not _is_jax_type(leaf)), _MISSING)
            if bad is _MISSING:
                continue
            if isinstance(slot, str) or slot[0] == "**":
                name = slot if isinstance(slot, str) else slot[1]
                label, fix = repr(name), f'static_argnames=("{name}",)'
            else:
                pos = len(self._positional_params()) + slot[1] if self._signature is not None else slot[1]
                label, fix = f"at position {pos}", f"static_argnums=({pos},)"
            what = type(value).__name__ + ("" if bad is value else f" holding a {type(bad).__name__}")
            role = ("a traced (varying) input" if cls == _VARYING
                    else "an invariant input (invariant arguments are arrays whose results are cached)")
            return TypeError(
                f"hoist_invariants: argument {label} of {self.__name__} is a {what}, not an array or scalar, so it "
                f"cannot be {role}; if it is a setting that is the same for a compiled program (like wan_ref's "
                f"`plan`), declare it static: hoist_invariants({self.__name__}, {fix}, ...)")
        return None

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
        try:
            key = call.key  # computes the invariant leaves' avals
        except TypeError as err:
            inv = jax.tree_util.tree_unflatten(call.layout.inv_tree, list(call.inv_leaves))
            hint = self._not_an_array_error(call.layout, _INVARIANT, inv)
            if hint is None:
                raise
            raise hint from err
        with self._lock:
            prog = self._programs.get(key)
        if prog is None:
            prog = self._build(call)
            with self._lock:
                prog = self._programs.setdefault(key, prog)
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

        def as_jit():  # what jax.jit(fun) does with these arguments: raises jit's own error for a mistake
            args, kwargs = self._rebuild(layout, call.inv_leaves, call.var_leaves)
            jax.jit(self.fun, static_argnums=self.static_argnums or None,
                    static_argnames=self.static_argnames or None).trace(*args, **kwargs)

        t0 = time.perf_counter()
        before = trace_to_jaxpr(flat_fun, [*call.inv_leaves, *call.var_leaves], self.__name__, as_jit=as_jit)
        t1 = time.perf_counter()
        leaves = [*call.inv_leaves, *call.var_leaves]
        signature = signature_text(leaves, LOG_INPUTS) if logger.isEnabledFor(logging.INFO) else ""
        if logger.isEnabledFor(logging.INFO):
            logger.info("traced host-loop step %s (%s) in %.3f s: %d equations", self.__name__, signature,
                        t1 - t0, count_equations(before))
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
        from kvhoist.analysis.motion import surely_run_flops

        with engine.in_loop(LoopInfo("host loop", None, f"calls of {self.__name__}",
                                     surely_run_flops(block.eqns))):
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
        step_inv = [position[v] for v in st_inv]
        step_var = [var_position[v] for v in st_var]
        var_slots = [slot for slot, cls in layout.slots if cls == _VARYING]
        donate = tuple(2 + k for k, slot in enumerate(var_slots) if self._donated(slot))
        log_report(f"host-loop step {self.__name__}", report, time.perf_counter() - t1)
        if os.environ.get(DUMP_ENV):
            dump_signature(self.__name__, signature_text(leaves), before,
                           f"# prologue: once per set of invariant arguments\n{prologue}\n# step: every call\n{step}",
                           report, kind="host")
        return _Program(
            before=before, prologue=prologue, step=step, report=report, out_tree=out_tree,
            prologue_inv=[position[v] for v in pro_inv], step_inv=step_inv, step_var=step_var,
            prologue_fn=None if ext.empty else jax.jit(compat.jaxpr_as_fun(prologue), **self.jit_options),
            step_call=_step_call(self.__name__, step, out_tree, layout.var_tree, _signature(call.var_leaves),
                                 step_var, donate, self.jit_options),
            step_flat=jax.jit(compat.jaxpr_as_fun(step), **self.jit_options), take_step_inv=_taker(step_inv, n_inv),
            var_tree=layout.var_tree, direct=None if donate else _UNBUILT)

    # -- running -------------------------------------------------------------------------------
    def _run_prologue(self, prog: _Program, inv_leaves: Sequence) -> tuple:
        if prog.prologue_fn is None:
            return ()
        with self._lock:
            self.prologue_runs += 1
        return tuple(prog.prologue_fn(*(inv_leaves[i] for i in prog.prologue_inv)))

    def _run_step(self, prog: _Program, values: Sequence, call: _Call):
        try:
            return prog.step_call(tuple(values), prog.take_step_inv(call.inv_leaves), *call.var_args)
        except _Retrace:
            # The program was built for these very arguments, so this means jit's view of them differs
            # from jax.typeof's; run the flat form, which takes the leaves as traced.
            out = prog.step_flat(*values, *prog.take_step_inv(call.inv_leaves),
                                 *(call.var_leaves[i] for i in prog.step_var))
            return jax.tree_util.tree_unflatten(prog.out_tree, list(out))

    def _fast_key(self, plan: _ArgPlan, args: tuple, kwargs: dict) -> tuple[list, Any, tuple]:
        """``(invariant leaves, their treedef, fast key)``: the key names the call shape, static values
        and types, the invariant arguments' structure and jax's trace context (the leaves' ids are
        compared with a candidate's ``ids`` after the lookup)."""
        inv_leaves, inv_tree = _tree_flatten(plan.inv(args, kwargs))
        key = (plan.canon, _static_key(plan.static(args, kwargs)) if plan.static_slots else (), inv_tree,
               _trace_context())
        return inv_leaves, inv_tree, key

    def _forget(self, entry: _Entry) -> None:
        """Drop ``entry`` from every index. Runs in weakref callbacks too: no lock; ``ids = None`` first
        (one attribute store: from then on no call matches it), then best-effort removals (a candidate
        tuple that loses a race keeps an unmatchable entry until its next rewrite, which drops it)."""
        entry.ids = None
        self._entries.pop(entry.serial, None)
        try:
            if self._index.get(entry.key) is entry:
                self._index.pop(entry.key, None)
            head = entry.fast_key
            cands = self._fast.get(head) if head is not None else None
            if cands is not None and any(c is entry for c in cands):
                rest = tuple(c for c in cands if c is not entry)
                if rest:
                    self._fast[head] = rest
                else:
                    self._fast.pop(head, None)
        except TypeError:  # pragma: no cover - keys are hashable when stored
            pass

    def _on_death(self, serial: int) -> Callable:
        self_ref = weakref.ref(self)

        def drop(_ref):
            me = self_ref()
            if me is not None:
                entry = me._entries.get(serial)
                if entry is not None:
                    me._forget(entry)
        return drop

    def _set_fast_key(self, cached: _Cached, fast_key: tuple, leaves: Sequence, index: dict | None) -> None:
        """Let later calls with these very leaves find ``cached`` by ``fast_key`` and their ids (one
        candidate per key and ids). ``index`` (``self._fast``, under ``self._lock``) or None (a prepared
        handle, which compares its own key)."""
        if any(_is_tracer(x) for x in leaves):
            return
        try:
            hash(fast_key)
        except TypeError:
            return
        ids = list(map(id, leaves))
        if index is not None and cached.fast_key is not None and cached.fast_key != fast_key:
            old = index.get(cached.fast_key, ())
            rest = tuple(c for c in old if c is not cached)
            if len(rest) != len(old):
                if rest:
                    index[cached.fast_key] = rest
                else:
                    index.pop(cached.fast_key, None)
        cached.pins = tuple(x for x in leaves if isinstance(x, _SCALARS))  # keeps their ids unique
        cached.fast_key = fast_key
        cached.ids = ids
        if index is not None:
            # Newest first; drop candidates with the same ids (replaced) and any no longer trusted or
            # no longer held (a removal in a weakref callback that lost a race).
            index[fast_key] = (cached, *(c for c in index.get(fast_key, ())
                                         if c is not cached and c.ids is not None and c.ids != ids
                                         and self._entries.get(c.serial) is c))

    def _serve(self, cached: _Cached, inv_leaves: list, var_args: tuple) -> Any:
        """The step's outputs for a cache hit on ``cached`` (its invariant leaves verified), or _MISSING
        when the varying arguments do not fit its program (the slow path finds theirs).

        Direct path: once jit has run the program, its executable is called on the flat leaves without
        jit's per-argument dispatch (flattening and checking every invariant leaf again, ~0.4 us each).
        The invariant leaves and cached values were checked against the executable's inputs once, when
        ``cached.direct`` was decided (the very same objects on every hit: arrays never change aval,
        sharding or layout); the varying leaves are checked here, as jit would: same structure and, per
        leaf, a ``jax.Array`` of the same aval, committedness, sharding and layout. Anything else (a
        numpy or scalar varying leaf, a tracer, debug_nans) goes through ``jax.jit`` as before.
        """
        prog = cached.program
        run = cached.direct
        if run is not None and run is not _UNCHECKED and not _special_checks_on():
            var_leaves, var_tree = _tree_flatten(var_args)
            if var_tree == prog.var_tree and all(map(_spec_matches, var_leaves, prog.var_specs)):
                try:
                    out = run([*cached.values, *prog.take_step_inv(inv_leaves), *var_leaves])
                except Exception:  # e.g. a deleted invariant array: jit below says so in its words
                    pass
                else:
                    return prog.out_tree.unflatten(out)
        try:
            out = prog.step_call(cached.values, prog.take_step_inv(inv_leaves), *var_args)
        except _Retrace:  # varying arguments of another structure / signature than this program's
            return _MISSING
        if run is _UNCHECKED:
            self._decide_direct(cached, inv_leaves, var_args)
        return out

    def _decide_direct(self, cached: _Cached, inv_leaves: list, var_args: tuple) -> None:
        """After jit ran ``cached``'s program on these arguments: build the program's direct run (once),
        and decide whether ``cached``'s values and invariant leaves fit it."""
        prog = cached.program
        if any(_is_tracer(x) for x in jax.tree_util.tree_leaves(var_args)):
            return  # under a trace: decide on a concrete call
        head = [*cached.values, *prog.take_step_inv(inv_leaves)]
        if prog.direct is _UNBUILT:
            with self._lock:
                if prog.direct is _UNBUILT:
                    built = compat.direct_executable(
                        prog.step_call, (cached.values, prog.take_step_inv(inv_leaves), *var_args))
                    if built is not None:
                        run, specs = built
                        prog.head_specs, prog.var_specs = specs[:len(head)], specs[len(head):]
                    prog.direct = None if built is None else run
        run = prog.direct
        cached.direct = (run if run is not None and len(head) == len(prog.head_specs)
                         and all(map(_spec_matches, head, prog.head_specs)) else None)

    def __call__(self, *args, **kwargs):
        # The fast path (a cache hit with the very same invariant objects): pick the arguments by the
        # call shape's plan, flatten the invariant ones once, look the candidates up by structure and
        # compare their ids, then run the step (_serve: its executable directly when the varying
        # leaves fit it, else its jax.jit). Everything else goes to _slow_call. No per-leaf Python
        # work but id() and C-level compares. (Inlined _fast_key: this runs on every call.)
        plan = self._plans.get((len(args), *kwargs) if kwargs else len(args)) or self._plan(args, kwargs)
        inv_leaves, inv_tree = _tree_flatten(plan.inv(args, kwargs))
        fast_key = (plan.canon, _static_key(plan.static(args, kwargs)) if plan.static_slots else (), inv_tree,
                    _trace_context())
        try:
            cands = self._fast.get(fast_key)
        except TypeError:  # an unhashable static argument: the slow path names it
            cands = None
        entry = None
        if cands is not None:  # a tuple: one candidate per set of invariant objects (e.g. two experts)
            ids = list(map(id, inv_leaves))
            for c in cands:
                if c.ids == ids:
                    entry = c
                    break
        if entry is not None and (not entry.checks or entry.still_valid(inv_leaves)):
            out = self._serve(entry, inv_leaves, plan.var(args, kwargs))
            if out is not _MISSING:
                with self._lock:
                    self._hits += 1
                    if entry.serial in self._entries:
                        self._entries.move_to_end(entry.serial)
                return out
        return self._slow_call(plan, args, kwargs, (inv_leaves, inv_tree), fast_key)

    def _slow_call(self, plan: _ArgPlan, args: tuple, kwargs: dict, inv_flat: tuple, fast_key: tuple):
        call = self._bind(args, kwargs, plan, inv_flat)
        if any(_is_tracer(x) for x in call.inv_leaves):  # under a transformation: nothing to cache
            prog = self._program(call)
            return self._run_step(prog, self._run_prologue(prog, call.inv_leaves), call)
        entry_key = call.entry_key
        with self._lock:
            entry = self._index.get(entry_key)
            hit = entry is not None and entry.identity.matches(call.inv_leaves)
            if hit:
                self._hits += 1
                if entry.serial in self._entries:
                    self._entries.move_to_end(entry.serial)
                self._set_fast_key(entry, fast_key, call.inv_leaves, self._fast)
        if hit:
            return self._run_step(entry.program, entry.values, call)
        prog = self._program(call)
        values = self._run_prologue(prog, call.inv_leaves)
        if any(_is_tracer(v) for v in values):
            # Concrete invariants but called inside a trace (e.g. a jit over the varying arguments): the
            # prologue's results belong to that trace and must not outlive it.
            return self._run_step(prog, values, call)
        with self._lock:
            serial = next(self._serials)
            entry = _Entry(serial, entry_key, prog, values, call.inv_leaves, call.inv_avals,
                           self._on_death(serial))
            old = self._index.get(entry_key)
            if old is not None:
                self._forget(old)
            self._entries[serial] = entry
            self._index[entry_key] = entry
            self._set_fast_key(entry, fast_key, call.inv_leaves, self._fast)
            while len(self._entries) > self.max_cache_entries:
                self._forget(next(iter(self._entries.values())))
            held = sum(e.nbytes for e in list(self._entries.values()))
            self._peak_bytes = max(self._peak_bytes, held)
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
        plan = self._plan(args, kwargs)
        inv_leaves, inv_tree, fast_key = self._fast_key(plan, args, kwargs)
        call = self._bind(args, kwargs, plan, (inv_leaves, inv_tree))
        if any(_is_tracer(x) for x in call.inv_leaves):
            raise KvhoistError("prepare() needs concrete invariant arguments, not tracers")
        prog = self._program(call)
        values = self._run_prologue(prog, call.inv_leaves)
        return PreparedStep(self, call, prog, values, fast_key)

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
        """Hits, misses (prologue runs), entries, bytes and compiled programs; see :class:`CacheInfo`."""
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
            self._index.clear()
            self._fast.clear()
            self._peak_bytes = 0
            if programs:
                self._programs.clear()

    def __repr__(self) -> str:
        return (f"<hoist_invariants {self.__name__} invariant={self.invariant_argnames or self.invariant_argnums}"
                f">")


class PreparedStep:
    """An explicit prologue result from :meth:`HostHoistedFunction.prepare`; call it like the function."""

    def __init__(self, owner: HostHoistedFunction, call: _Call, program: _Program, values: tuple,
                 fast_key: tuple):
        self._owner = owner
        self._key = call.key
        self._cached = _Cached(program, values, call.inv_leaves, self._on_death())
        owner._set_fast_key(self._cached, fast_key, call.inv_leaves, None)

    def _on_death(self) -> Callable:
        self_ref = weakref.ref(self)

        def forget_ids(_ref):  # a prepared array died: its id may be reused, so stop trusting ids
            me = self_ref()
            if me is not None:
                me._cached.ids = None
        return forget_ids

    @property
    def cache_bytes(self) -> int:
        """Bytes of the prologue results this handle holds."""
        return sum(int(getattr(v, "nbytes", 0)) for v in self._cached.values)

    def __call__(self, *args, **kwargs):
        owner, cached = self._owner, self._cached
        prog = cached.program
        plan = owner._plan(args, kwargs)
        inv_leaves, inv_tree, fast_key = owner._fast_key(plan, args, kwargs)
        try:
            fast = (cached.ids is not None and fast_key == cached.fast_key
                    and cached.ids == list(map(id, inv_leaves)))
        except TypeError:
            fast = False
        if fast and cached.still_valid(inv_leaves):
            out = owner._serve(cached, inv_leaves, plan.var(args, kwargs))
            if out is not _MISSING:
                return out
        call = owner._bind(args, kwargs, plan, (inv_leaves, inv_tree))
        if call.key != self._key or not cached.identity.matches(call.inv_leaves):
            raise StaleHandleError(
                f"this prepared {owner.__name__} was made for other invariant arguments "
                f"({', '.join(map(str, owner.invariant_argnames or owner.invariant_argnums))}) or shapes; "
                "call prepare() again with the new ones, or call the function itself")
        owner._set_fast_key(cached, fast_key, call.inv_leaves, None)  # the very objects: ids are theirs
        return owner._run_step(prog, cached.values, call)


def _note(kind: str, message: str):
    from kvhoist.report import Note

    return Note(kind, message)
