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

Modules: this one holds the wrapper (:class:`HostHoistedFunction`, :class:`PreparedStep`); the argument
plans and binding are in :mod:`kvhoist.host_args`, tracing and splitting a signature in
:mod:`kvhoist.host_program`, the cache of prologue results and leaf identity in :mod:`kvhoist.host_cache`,
the direct run of a hit in :mod:`kvhoist.host_fast` (each imports only those listed before it).
"""

from __future__ import annotations

import functools
import weakref
import threading
from typing import Any, Callable, NamedTuple, Sequence

import jax

from kvhoist.errors import KvhoistError
from kvhoist.host_args import INVARIANT, ArgBinder, ArgPlan, Call, is_tracer, static_key, trace_context, tree_flatten
from kvhoist.host_cache import Cached, PrologueCache, entry_key, set_fast_key
from kvhoist.host_fast import MISSING, fast_key, serve
from kvhoist.host_program import Program, build_program, run_step
from kvhoist.report import Report
from kvhoist.tracing import check_jit_options, normalize_argnames, normalize_argnums, function_name

__all__ = ["HostHoistedFunction", "PreparedStep", "CacheInfo", "StaleHandleError"]


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
        check_jit_options(jit_options)
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
        functools.update_wrapper(self, fun)
        self.__name__ = function_name(fun)
        self._args = ArgBinder(fun, self.__name__, normalize_argnums(invariant_argnums),
                               normalize_argnames(invariant_argnames), normalize_argnums(static_argnums),
                               normalize_argnames(static_argnames),
                               normalize_argnums(donate_argnums, "donate_argnums"),
                               normalize_argnames(donate_argnames, "donate_argnames"))
        a = self._args
        self.invariant_argnums, self.invariant_argnames = a.invariant_argnums, a.invariant_argnames
        self.static_argnums, self.static_argnames = a.static_argnums, a.static_argnames
        self.donate_argnums, self.donate_argnames = a.donate_argnums, a.donate_argnames
        self._lock = threading.RLock()
        self._programs: dict = {}         # program key -> Program
        self._cache = PrologueCache(max_cache_entries, self._lock)
        self._fast = self._cache.fast     # fast key -> (Entry, ...): read on every call
        self._plans = self._args.plans    # call shape -> ArgPlan: read on every call
        self.prologue_runs = 0

    # -- calls ------------------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        # The fast path (a cache hit with the very same invariant objects): pick the arguments by the
        # call shape's plan, flatten the invariant ones once, look the candidates up by structure and
        # compare their ids, then run the step (host_fast.serve: its executable directly when the
        # varying leaves fit it, else its jax.jit). Everything else goes to _slow_call. No per-leaf
        # Python work but id() and C-level compares. (Inlined host_fast.fast_key: this runs on every call.)
        plan = self._plans.get((len(args), *kwargs) if kwargs else len(args)) or self._args.plan(args, kwargs)
        inv_leaves, inv_tree = tree_flatten(plan.inv(args, kwargs))
        key = (plan.canon, static_key(plan.static(args, kwargs)) if plan.static_slots else (), inv_tree,
               trace_context())
        try:
            cands = self._fast.get(key)
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
            out = serve(entry, inv_leaves, plan.var(args, kwargs), self._lock)
            if out is not MISSING:
                with self._lock:
                    self._cache.hit(entry)
                return out
        return self._slow_call(plan, args, kwargs, (inv_leaves, inv_tree), key)

    def _slow_call(self, plan: ArgPlan, args: tuple, kwargs: dict, inv_flat: tuple, key: tuple):
        call = self._args.bind(args, kwargs, plan, inv_flat)
        if any(is_tracer(x) for x in call.inv_leaves):  # under a transformation: nothing to cache
            prog = self._program(call)
            return run_step(prog, self._run_prologue(prog, call.inv_leaves), call)
        ekey = entry_key(call)
        entry = self._cache.lookup(ekey, call.inv_leaves, key)
        if entry is not None:
            return run_step(entry.program, entry.values, call)
        prog = self._program(call)
        values = self._run_prologue(prog, call.inv_leaves)
        if any(is_tracer(v) for v in values):
            # Concrete invariants but called inside a trace (e.g. a jit over the varying arguments): the
            # prologue's results belong to that trace and must not outlive it.
            return run_step(prog, values, call)
        self._cache.insert(ekey, prog, values, call.inv_leaves, call.inv_avals, key)
        return run_step(prog, values, call)

    def _program(self, call: Call) -> Program:
        """The program of ``call``'s signature: compiled before, or traced and split now."""
        try:
            key = call.key  # computes the invariant leaves' avals
        except TypeError as err:
            inv = jax.tree_util.tree_unflatten(call.layout.inv_tree, list(call.inv_leaves))
            hint = self._args.not_an_array_error(call.layout, INVARIANT, inv)
            if hint is None:
                raise
            raise hint from err
        with self._lock:
            prog = self._programs.get(key)
        if prog is None:
            prog = build_program(self.fun, self._args, call, target=self.target,
                                 max_cache_bytes=self.max_cache_bytes, jit_options=self.jit_options)
            with self._lock:
                prog = self._programs.setdefault(key, prog)
        return prog

    def _run_prologue(self, prog: Program, inv_leaves: Sequence) -> tuple:
        if prog.prologue_fn is None:
            return ()
        with self._lock:
            self.prologue_runs += 1
        return tuple(prog.prologue_fn(*(inv_leaves[i] for i in prog.prologue_inv)))

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
        plan = self._args.plan(args, kwargs)
        inv_leaves, inv_tree, key = fast_key(plan, args, kwargs)
        call = self._args.bind(args, kwargs, plan, (inv_leaves, inv_tree))
        if any(is_tracer(x) for x in call.inv_leaves):
            raise KvhoistError("prepare() needs concrete invariant arguments, not tracers")
        prog = self._program(call)
        values = self._run_prologue(prog, call.inv_leaves)
        return PreparedStep(self, call, prog, values, key)

    def jaxprs(self, *args, **kwargs) -> tuple[Any, Any, Any]:
        """``(before, prologue, step)`` closed jaxprs for this input signature.

        ``prologue`` maps the invariant leaves it reads to the cached values; ``step`` takes the cached
        values, then the invariant leaves it still reads, then the varying leaves it reads.
        """
        prog = self._program(self._args.bind(args, kwargs))
        return prog.before, prog.prologue, prog.step

    def report(self, *args, **kwargs) -> Report:
        """What moved into the prologue for this input signature (see :class:`kvhoist.Report`).

        ``flops_saved`` of each value is per call served from the cache; totals are per call.
        """
        return self._program(self._args.bind(args, kwargs)).report

    def cache_info(self) -> CacheInfo:
        """Hits, misses (prologue runs), entries, bytes and compiled programs; see :class:`CacheInfo`."""
        with self._lock:
            entries = list(self._cache.entries.values())
            return CacheInfo(self._cache.hits, self.prologue_runs, len(entries), self.max_cache_entries,
                             sum(e.nbytes for e in entries), len(self._programs), self._cache.peak_bytes)

    @property
    def cache_bytes(self) -> int:
        """Bytes of the cached prologue results held now."""
        return self.cache_info().bytes

    def clear_cache(self, programs: bool = True) -> None:
        """Drop every cached prologue result (and, with ``programs=True``, the compiled programs)."""
        with self._lock:
            self._cache.clear()
            if programs:
                self._programs.clear()

    def __repr__(self) -> str:
        return (f"<hoist_invariants {self.__name__} invariant={self.invariant_argnames or self.invariant_argnums}"
                f">")


class PreparedStep:
    """An explicit prologue result from :meth:`HostHoistedFunction.prepare`; call it like the function."""

    def __init__(self, owner: HostHoistedFunction, call: Call, program: Program, values: tuple, key: tuple):
        self._owner = owner
        self._key = call.key
        self._cached = Cached(program, values, call.inv_leaves, self._on_death())
        set_fast_key(self._cached, key, call.inv_leaves, None)

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
        plan = owner._args.plan(args, kwargs)
        inv_leaves, inv_tree, key = fast_key(plan, args, kwargs)
        try:
            fast = (cached.ids is not None and key == cached.fast_key
                    and cached.ids == list(map(id, inv_leaves)))
        except TypeError:
            fast = False
        if fast and cached.still_valid(inv_leaves):
            out = serve(cached, inv_leaves, plan.var(args, kwargs), owner._lock)
            if out is not MISSING:
                return out
        call = owner._args.bind(args, kwargs, plan, (inv_leaves, inv_tree))
        if call.key != self._key or not cached.identity.matches(call.inv_leaves):
            raise StaleHandleError(
                f"this prepared {owner.__name__} was made for other invariant arguments "
                f"({', '.join(map(str, owner.invariant_argnames or owner.invariant_argnums))}) or shapes; "
                "call prepare() again with the new ones, or call the function itself")
        set_fast_key(cached, key, call.inv_leaves, None)  # the very objects: ids are theirs
        return run_step(prog, cached.values, call)
