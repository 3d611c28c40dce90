"""``@hoist_invariants``: ``jax.jit`` with the kvhoist pipeline between tracing and lowering.

The decorated function *is* a ``jax.jit`` of a small wrapper: when jit traces it, the wrapper traces
``fun`` again on the tracers' abstract values to a jaxpr, runs the kvhoist pipeline on it
(:mod:`kvhoist.passes.pipeline`: LICM with fission and speculation; with a ``target``, the token
re-padding layout pass) and evaluates the rewritten jaxpr in jit's trace. Everything else is jit's own:
dispatch (the C++ fast path), the trace cache and its keys (static values *and* their types, weak types,
``jax_enable_x64`` and every other configuration jit keys on), ``static_argnums`` / ``static_argnames``
resolution through the signature, donation, shardings, ``keep_unused``, and ``.lower`` / ``.trace`` /
``.eval_shape``. ``.jaxprs()`` and ``.report()`` read what the pipeline recorded when jit traced that
signature.

If the pipeline itself fails (a kvhoist bug), the original program runs, exactly as under ``jax.jit``,
and a :class:`KvhoistWarning` says so; set ``KVHOIST_STRICT=1`` to raise instead.

What happened is logged to ``logging.getLogger("kvhoist")`` (silent unless configured): for every
traced signature, INFO lines for the trace, the rewrite (with the report's summary) and the compile,
with their timings, and one DEBUG line per hoisted value. With ``KVHOIST_DUMP_TO=dir`` every traced
signature also writes ``<prefix>.before.txt`` / ``.after.txt`` (the jaxprs) and ``.report.json`` there
(see :func:`dump_signature`).
"""

from __future__ import annotations

import collections
import functools
import inspect
import logging
import os
import threading
import time
import warnings
import weakref
from typing import Any, Callable, Sequence

import jax

from kvhoist import compat
from kvhoist.errors import KvhoistError, KvhoistWarning, TraceError, strict
from kvhoist.report import Note, Report
from kvhoist.tracing import (DUMP_ENV, JIT_OPTIONS, LOG_INPUTS, check_jit_options, normalize_argnames,  # noqa: F401
                             normalize_argnums, count_equations, dump_signature, function_name, log_report, logger,
                             signature_text, trace_to_jaxpr)

__all__ = ["hoist_invariants", "HoistedFunction", "KvhoistError", "TraceError", "KvhoistWarning"]













class _CompileLog(threading.local):
    """The signature this thread just traced, waiting for jit to compile it (for the compile log line)."""

    pending: tuple | None = None  # (jit's function name, our name, signature, lowering seconds)


_compile_log = _CompileLog()
_compile_listener_installed = False


def _on_jax_event(event: str, seconds: float, **kwargs: Any) -> None:
    pending = _compile_log.pending
    if pending is None or kwargs.get("fun_name") != f"jit({pending[0]})":
        return
    if event.endswith("/jaxpr_to_mlir_module_duration"):
        _compile_log.pending = (*pending[:3], seconds)
    elif event.endswith("/backend_compile_duration"):
        _compile_log.pending = None
        logger.info("compiled %s (%s) in %.3f s (lowering %.3f s, XLA %.3f s)", pending[1], pending[2],
                    pending[3] + seconds, pending[3], seconds)


def _expect_compile(jit_name: str, name: str, signature: str) -> None:
    """Log the compile that follows this trace (jit compiles right after the trace, in this thread)."""
    global _compile_listener_installed
    if not logger.isEnabledFor(logging.INFO):
        return
    if not _compile_listener_installed:
        _compile_listener_installed = True
        jax.monitoring.register_event_duration_secs_listener(_on_jax_event)
    _compile_log.pending = (jit_name, name, signature, 0.0)






def _check_options(max_cache_bytes: Any, fission: Any) -> None:
    if max_cache_bytes is not None and (not isinstance(max_cache_bytes, int) or isinstance(max_cache_bytes, bool)):
        raise TypeError(f"hoist_invariants: max_cache_bytes must be an int number of bytes or None, got "
                        f"{type(max_cache_bytes).__name__} {max_cache_bytes!r}")
    if max_cache_bytes is not None and max_cache_bytes < 0:
        raise ValueError(f"hoist_invariants: max_cache_bytes must be >= 0, got {max_cache_bytes}")
    if fission not in ("scan", "vmap"):
        raise ValueError(f"hoist_invariants: fission must be 'scan' or 'vmap', got {fission!r}")








def _has_loop(j) -> bool:
    for e in compat.split_closed(j)[4]:
        if e.primitive.name in ("scan", "while"):
            return True
        if any(_has_loop(s) for s in compat.subjaxprs_of(e)):
            return True
    return False


class _Traced:
    """What the pipeline did for one traced signature."""

    __slots__ = ("before", "after", "report")

    def __init__(self, before, after, report):
        self.before, self.after, self.report = before, after, report


def _is_tracer(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def _hashable(x: Any) -> Any:
    try:
        hash(x)
        return x
    except TypeError:
        return ("id", id(x))


def _leaf_key(x: Any, dynamic: bool) -> tuple:
    if dynamic:
        return ("d", compat.aval_key(x.aval if _is_tracer(x) else jax.typeof(x)))
    return ("s", type(x), _hashable(x))  # a static value and its type, as jit keys them



#: Recorded signatures (``.jaxprs()`` / ``.report()``) kept per function and options, least recently traced
#: dropped first; a dropped signature's ``.report()`` traces it again. ``clear_cache()`` and
#: ``jax.clear_caches()`` drop them all.
MAX_RECORDS = 32




def _freeze(x: Any) -> Any:
    """A hashable stand-in for an option value (dicts and lists by content), to share one jit per options."""
    if isinstance(x, dict):
        return ("dict", tuple(sorted(((k, _freeze(v)) for k, v in x.items()), key=lambda kv: repr(kv[0]))))
    if isinstance(x, (list, tuple)):
        return (type(x).__name__, tuple(_freeze(v) for v in x))
    return x


class _SourceInfo:
    """What jax reads from a traced function for messages and HLO metadata (``__name__``, ``__code__``:
    "while tracing the function f at model.py:12"), without a reference to the function itself."""

    def __init__(self, fun: Callable):
        base = fun
        while isinstance(base, functools.partial):
            base = base.func
        base = inspect.unwrap(base)
        self.__name__ = function_name(fun)
        code = getattr(base, "__code__", None)
        if code is not None:
            self.__code__ = code

    def __repr__(self) -> str:
        return f"<function {self.__name__}>"


class _LastTraced(threading.local):
    """What this thread's latest trace of a hoisted function recorded, while ``listening`` (``.report()``
    tracing a signature whose record it needs); never held otherwise (records are freed with the cache)."""

    listening: bool = False
    record: "_Traced | None" = None


_last_traced = _LastTraced()


class _Twin:
    """The ``jax.jit`` of one function with one set of options, shared by every :class:`HoistedFunction`
    made from them — so ``hoist_invariants(f)(x)`` called five times traces once, as ``jax.jit(f)(x)``
    does. jit keys its caches on the function it wraps; that function is ``traced`` below, made once per
    (function, options) and held in :data:`_TWINS` only as long as the user's function lives. It reaches the
    user's function through a weak reference (so the table never keeps it alive) and carries its signature
    and source location (so jit resolves static/donated argument names and names the function in its
    errors exactly as for ``jax.jit(fun)``).
    """

    def __init__(self, fun: Callable, name: str, target: Any, max_cache_bytes: int | None, fission: str,
                 jit_options: dict, shared: bool):
        self.name = name
        self.target, self.max_cache_bytes, self.fission = target, max_cache_bytes, fission
        if shared:
            self._fun = weakref.ref(fun)
        else:
            self._fun = lambda: fun
        self.records: collections.OrderedDict = collections.OrderedDict()
        self.lock = threading.Lock()
        twin = self

        def traced(*args, **kwargs):
            return twin.rewrite_and_eval(args, kwargs)

        traced.__name__ = traced.__qualname__ = name
        traced.__module__ = getattr(fun, "__module__", None) or __name__
        traced.__doc__ = getattr(fun, "__doc__", None)
        try:
            traced.__signature__ = inspect.signature(fun)
        except (TypeError, ValueError):
            pass
        traced.__wrapped__ = _SourceInfo(fun)
        self.jit_name = name  # jax's events name the compile `jit(<this>)` (compile log line)
        self.jitted = jax.jit(traced, **jit_options)
        _ALL_TWINS.add(self)

    def fun(self) -> Callable:
        f = self._fun()
        if f is None:  # only reachable through a kept `.jitted` whose HoistedFunction and function died
            raise KvhoistError(f"hoist_invariants: {self.name} was garbage-collected; keep the decorated function")
        return f

    # -- inside jit's trace ----------------------------------------------------------------------
    def rewrite_and_eval(self, args: tuple, kwargs: dict):
        """Run by ``jax.jit`` while it traces: trace ``fun`` on the abstract inputs, rewrite, evaluate."""
        fun = self.fun()
        leaves, tree = jax.tree_util.tree_flatten((args, kwargs))
        dyn = [i for i, x in enumerate(leaves) if _is_tracer(x)]
        dyn_set = set(dyn)
        key = (tree, tuple(_leaf_key(x, i in dyn_set) for i, x in enumerate(leaves)), compat.trace_context())

        def flat_fun(*dyn_leaves):
            full = list(leaves)
            for i, v in zip(dyn, dyn_leaves):
                full[i] = v
            a, k = jax.tree_util.tree_unflatten(tree, full)
            return fun(*a, **k)

        # Exactly the types of jit's tracers: sharding (Explicit axes) and varying manual axes included.
        specs = [compat.abstract_arg(leaves[i].aval) for i in dyn]
        t0 = time.perf_counter()
        try:
            before, out_shape = jax.make_jaxpr(flat_fun, return_shape=True)(*specs)
        except Exception as err:  # noqa: BLE001 - jit's own trace below raises its own error
            failure = err
        else:
            failure = None
        if failure is not None:
            return self._as_jit(fun, args, kwargs, failure)
        t1 = time.perf_counter()
        signature = signature_text(specs, LOG_INPUTS) if logger.isEnabledFor(logging.INFO) else ""
        if logger.isEnabledFor(logging.INFO):
            logger.info("traced %s (%s) in %.3f s: %d equations", self.name, signature, t1 - t0,
                        count_equations(before))
        after, report = self._optimize(before)
        log_report(self.name, report, time.perf_counter() - t1)
        if os.environ.get(DUMP_ENV):
            dump_signature(self.name, signature_text(specs), before, after, report)
        _expect_compile(self.jit_name, self.name, signature)
        record = _Traced(before, after, report)
        with self.lock:
            self.records[key] = record
            self.records.move_to_end(key)
            while len(self.records) > MAX_RECORDS:
                self.records.popitem(last=False)
        out = compat.jaxpr_as_fun(after)(*(leaves[i] for i in dyn))
        if _last_traced.listening:
            _last_traced.record = record
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), list(out))

    def _as_jit(self, fun: Callable, args: tuple, kwargs: dict, failure: Exception):
        """The re-trace failed: trace ``fun`` on jit's own tracers, as ``jax.jit(fun)`` does. A mistake in
        ``fun`` (Python ``if`` on a traced value, a shape error) raises jit's own exception, type and
        message; if ``fun`` traces there, the re-trace was kvhoist's failure and the program runs as traced."""
        out = fun(*args, **kwargs)
        if strict():
            raise KvhoistError(f"hoist_invariants could not re-trace {self.name} on the abstract values jit "
                               f"traces it with ({type(failure).__name__}: {str(failure).splitlines()[0][:300]})"
                               ) from failure
        warnings.warn(f"kvhoist could not re-trace {self.name} ({type(failure).__name__}: "
                      f"{str(failure).splitlines()[0][:300]}); it runs unoptimised, as under jax.jit. Please "
                      "report this.", KvhoistWarning, stacklevel=4)
        return out

    def _optimize(self, before):
        from kvhoist.passes.pipeline import optimize

        try:
            after, report = optimize(before, target=self.target, max_cache_bytes=self.max_cache_bytes,
                                     fission=self.fission)
        except Exception as err:
            if strict():
                raise
            warnings.warn(f"kvhoist could not optimise {self.name} ({type(err).__name__}: "
                          f"{str(err).splitlines()[0][:300]}); it runs unoptimised, as under jax.jit. "
                          "Please report this.", KvhoistWarning, stacklevel=4)
            report = Report(notes=[Note("refused", f"the pipeline failed ({type(err).__name__}); "
                                                   "the program runs as traced")])
            return before, report
        if not report.hoisted and not _has_loop(before):
            report.notes.append(Note("hint", (
                f"{self.name} traces to a program without a scan/fori_loop/while_loop, so there is no loop "
                "to hoist out of. If the denoising loop is a Python loop that calls a jitted step, decorate the "
                "step with hoist_invariants(step, invariant_argnames=(...)) instead (host-loop hoisting).")))
        return after, report

    def clear_records(self) -> None:
        with self.lock:
            self.records.clear()


# Every twin alive, for jax.clear_caches(); and the shared twins by function identity:
# id(fun) -> (weak reference to fun, {options key: _Twin}). An entry goes when its function dies.
_ALL_TWINS: "weakref.WeakSet[_Twin]" = weakref.WeakSet()
_TWINS: dict = {}
_TWINS_LOCK = threading.Lock()


class _ClearRecords:
    """Registered with ``jax.clear_caches()`` (jax's cache registry): it drops every twin's records."""

    def cache_clear(self) -> None:
        for twin in list(_ALL_TWINS):
            twin.clear_records()

    def cache_info(self) -> int:
        return sum(len(t.records) for t in list(_ALL_TWINS))

    def cache_keys(self) -> list:
        return [k for t in list(_ALL_TWINS) for k in list(t.records)]


_clear_records = _ClearRecords()  # jax's registry holds it weakly
try:
    compat.register_cache_clear(_clear_records, "kvhoist recorded jaxprs")
except Exception:  # pragma: no cover - a jax without the registry: clear_cache() still frees them
    pass


def _forget_function(fid: int, ref: Any) -> None:
    with _TWINS_LOCK:
        entry = _TWINS.get(fid)
        if entry is not None and entry[0] is ref:
            del _TWINS[fid]


def _twin_for(fun: Callable, name: str, options_key: Any, make: Callable[[bool], _Twin]) -> _Twin:
    """The shared :class:`_Twin` of ``fun`` (by identity, as jit's caches) and these options; a private one
    when ``fun`` cannot be weakly referenced or an option value cannot be hashed."""
    try:
        hash(options_key)
        ref = weakref.ref(fun, functools.partial(_forget_function, id(fun)))
    except TypeError:
        return make(False)
    with _TWINS_LOCK:
        entry = _TWINS.get(id(fun))
        if entry is None or entry[0]() is not fun:
            entry = (ref, {})
            _TWINS[id(fun)] = entry
        twin = entry[1].get(options_key)
        if twin is None:
            twin = entry[1][options_key] = make(True)
    return twin


class HoistedFunction:
    """The result of :func:`hoist_invariants`: a ``jax.jit`` whose trace goes through kvhoist.

    Call it like the original function. Attributes: ``fun`` (the wrapped function), ``jitted`` (the
    underlying ``jax.jit`` object, shared by every ``hoist_invariants`` of the same function with the same
    options, as ``jax.jit(fun)`` shares its caches), ``static_argnums`` / ``static_argnames`` (resolved
    through the signature, as jit resolves them), ``jit_options`` (what ``jax.jit`` receives), ``target``,
    ``max_cache_bytes``, ``fission``.
    """

    def __init__(self, fun: Callable, *, target: Any = None, max_cache_bytes: int | None = None,
                 fission: str = "scan", **jit_options: Any):
        if not callable(fun):
            raise TypeError(f"hoist_invariants expects a callable, got {type(fun).__name__}: {fun!r}")
        _check_options(max_cache_bytes, fission)
        check_jit_options(jit_options)
        self._given = dict(target=target, max_cache_bytes=max_cache_bytes, fission=fission, **jit_options)
        self.fun = fun
        self.max_cache_bytes = max_cache_bytes
        self.fission = fission
        self.target = target
        if target is not None:
            from kvhoist.targets import get_target

            self.target = get_target(target)  # an unknown name fails now, listing the known ones
        self.__name__ = function_name(fun)
        nums = normalize_argnums(jit_options.get("static_argnums"))
        names = normalize_argnames(jit_options.get("static_argnames"))
        self.static_argnums, self.static_argnames = _resolve_static(fun, nums, names, self.__name__)
        options = dict(jit_options)
        options["static_argnums"] = self.static_argnums or None
        options["static_argnames"] = self.static_argnames or None
        self.jit_options = options
        key = (_freeze(self.target), max_cache_bytes, fission, _freeze(options))
        self._twin = _twin_for(fun, self.__name__, key, lambda shared: _Twin(
            fun, self.__name__, self.target, max_cache_bytes, fission, options, shared))
        self.jitted = self._twin.jitted
        self._jit_name = self._twin.jit_name
        functools.update_wrapper(self, fun, updated=())
        self.__name__ = function_name(fun)

    # -- reading what tracing recorded -----------------------------------------------------------
    def _key_of_call(self, args: tuple, kwargs: dict) -> tuple:
        """The key ``_Twin.rewrite_and_eval`` computes for this call, from concrete arguments."""
        parts, is_static = [], []
        for i, a in enumerate(args):
            leaves = jax.tree_util.tree_leaves(a)
            parts.append(leaves)
            is_static.append(i in self.static_argnums)
        for k in sorted(kwargs):  # a dict flattens in sorted key order
            v = kwargs[k]
            parts.append(jax.tree_util.tree_leaves(v))
            is_static.append(k in self.static_argnames)
        tree = jax.tree_util.tree_structure((args, kwargs))
        keys = tuple(_leaf_key(x, not st) for leaves, st in zip(parts, is_static) for x in leaves)
        return (tree, keys, compat.trace_context())

    def _record(self, args: tuple, kwargs: dict) -> _Traced:
        twin = self._twin
        try:
            key = self._key_of_call(args, kwargs)
            with twin.lock:
                hit = twin.records.get(key)
                if hit is not None:
                    twin.records.move_to_end(key)
        except Exception:
            hit = None
        if hit is not None:
            return hit
        for t in (twin, None):
            if t is None:
                # jit had this signature cached (its record was dropped, or jit keys it differently than
                # we can reproduce): trace once more with a private twin.
                t = _Twin(self.fun, self.__name__, self.target, self.max_cache_bytes, self.fission,
                          self.jit_options, shared=False)
            _last_traced.record, _last_traced.listening = None, True
            try:
                t.jitted.trace(*args, **kwargs)
            finally:
                _compile_log.pending = None
                _last_traced.listening = False
            record, _last_traced.record = _last_traced.record, None
            if record is not None:
                return record
        raise KvhoistError(f"hoist_invariants: tracing {self.__name__} recorded nothing")  # pragma: no cover

    # -- public ----------------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        if compat.jit_disabled():  # jax.disable_jit(): jax.jit calls the function itself, eagerly
            return self.fun(*args, **kwargs)
        return self.jitted(*args, **kwargs)

    def jaxprs(self, *args, **kwargs) -> tuple[Any, Any]:
        """``(before, after)``: the closed jaxprs traced from ``fun`` and produced by the passes."""
        r = self._record(args, kwargs)
        return r.before, r.after

    def report(self, *args, **kwargs) -> Report:
        """What the passes did for this input signature (see :class:`kvhoist.Report`)."""
        return self._record(args, kwargs).report

    def lower(self, *args, **kwargs):
        """``jax.jit(...).lower``: the rewritten program lowered (accepts ``jax.ShapeDtypeStruct`` values)."""
        try:
            return self.jitted.lower(*args, **kwargs)
        finally:
            _compile_log.pending = None  # traced, not compiled here: no compile line to wait for

    def trace(self, *args, **kwargs):
        """``jax.jit(...).trace``: the traced (rewritten) program."""
        try:
            return self.jitted.trace(*args, **kwargs)
        finally:
            _compile_log.pending = None  # traced, not compiled here: no compile line to wait for

    def eval_shape(self, *args, **kwargs):
        """``jax.jit(...).eval_shape``: output shapes and dtypes without running anything."""
        try:
            return self.jitted.eval_shape(*args, **kwargs)
        finally:
            _compile_log.pending = None  # traced, not compiled here: no compile line to wait for

    def clear_cache(self) -> None:
        """Drop jit's compiled programs and the recorded jaxprs/reports (``jax.clear_caches()`` drops both
        too, for every hoisted function)."""
        self.jitted.clear_cache()
        self._twin.clear_records()

    def __get__(self, obj, objtype=None):
        if obj is None:
            return self
        return functools.partial(self, obj)

    def __copy__(self) -> "HoistedFunction":
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new

    def __deepcopy__(self, memo: dict) -> "HoistedFunction":
        """Like ``copy.deepcopy(jax.jit(f))``: a new wrapper of a deep copy of ``f`` (a plain function is
        its own deep copy, so the copy shares the traces and compiled programs)."""
        import copy

        return type(self)(copy.deepcopy(self.fun, memo), **self._given)

    def __repr__(self) -> str:
        return f"<hoist_invariants {self.__name__}>"


def _resolve_static(fun: Callable, nums: tuple, names: tuple, name: str) -> tuple[tuple, tuple]:
    """``static_argnums`` / ``static_argnames`` completed from each other through the signature."""
    try:
        sig = inspect.signature(fun)
    except (TypeError, ValueError):
        return nums, names
    params = list(sig.parameters.values())
    pos = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    has_varargs = any(p.kind == p.VAR_POSITIONAL for p in params)
    has_varkw = any(p.kind == p.VAR_KEYWORD for p in params)
    out_nums = []
    for i in nums:
        if not has_varargs and not -len(pos) <= i < len(pos):
            raise ValueError(f"hoist_invariants: static_argnums={i} is out of range: {name}{sig} has "
                             f"{len(pos)} positional parameter(s)")
        out_nums.append(i % len(pos) if (i < 0 and pos and not has_varargs) else i)
    by_name = {p.name: i for i, p in enumerate(pos) if p.kind == p.POSITIONAL_OR_KEYWORD}
    for n in names:
        if n not in sig.parameters and not has_varkw:
            raise ValueError(f"hoist_invariants: static_argnames={n!r} is not a parameter of {name}{sig}")
        if n in by_name:
            out_nums.append(by_name[n])
    out_names = list(names) + [pos[i].name for i in out_nums
                               if 0 <= i < len(pos) and pos[i].kind == pos[i].POSITIONAL_OR_KEYWORD]
    return tuple(sorted(set(out_nums))), tuple(dict.fromkeys(out_names))


def hoist_invariants(fun: Callable | None = None, *, target: Any = None, max_cache_bytes: int | None = None,
                     fission: str = "scan", invariant_argnums: int | Sequence[int] | None = None,
                     invariant_argnames: str | Sequence[str] | None = None, **jit_options: Any):
    """Compile ``fun`` with loop-invariant work hoisted out of its loops.

    Usable bare (``@hoist_invariants``) or with options (``@hoist_invariants(target="v6e")``). The result
    is ``jax.jit``'s twin: same dispatch, trace cache (keyed on ``fun`` itself: decorating the same function
    again reuses its traces), exceptions, ``jax.disable_jit()`` behaviour, ``copy`` / ``deepcopy``, and
    every ``jax.jit`` keyword.

    Args:
      fun: the function, typically a diffusion sampler containing a ``lax.scan`` / ``fori_loop`` /
        ``while_loop`` over steps.
      target: a TPU generation name or :class:`kvhoist.targets.Target`; when given, image-token
        padding is re-aligned to the target's MXU tile (see :func:`kvhoist.repad_tokens`).
      max_cache_bytes: optional budget (an int, bytes) for the hoisted values; checked here.
      fission: ``"scan"`` (default) or ``"vmap"``: how per-layer invariant work split out of a nested
        layer scan is computed (a separate scan, or one batched computation); see :func:`kvhoist.licm`.
      invariant_argnums, invariant_argnames: host-loop hoisting (docs/host_loop.md): these arguments
        stay the same across *calls* (weights, prompt/image embeddings). The work that depends only on
        them runs once per distinct set of them and is cached; later calls run only the rest. Returns a
        :class:`kvhoist.host.HostHoistedFunction` instead.
      **jit_options: any keyword of ``jax.jit`` (:data:`JIT_OPTIONS`: ``static_argnums``,
        ``static_argnames``, ``donate_argnums``, ``donate_argnames``, ``in_shardings``, ``out_shardings``,
        ``keep_unused``, ``device``, ``backend``, ``inline``, ``compiler_options``, ...), passed to it
        unchanged (static arguments are resolved through the signature, as jit resolves them). Host-loop
        mode takes the static and donated arguments (varying ones only) and the program-wide options.

    Returns:
      A :class:`HoistedFunction` — a ``jax.jit`` whose trace goes through kvhoist — with
      ``.jaxprs(...)``, ``.report(...)``, ``.lower(...)``, ``.trace(...)``, ``.eval_shape(...)``. With
      ``invariant_argnums``/``invariant_argnames``: a :class:`kvhoist.host.HostHoistedFunction`.

    Example:
      >>> @kvhoist.hoist_invariants(static_argnames=("steps",))
      ... def sample(model, latents, context, steps):
      ...     ...
      >>> sample(model, latents, context, steps=30)
      >>> print(sample.report(model, latents, context, steps=30).table())
    """
    _check_options(max_cache_bytes, fission)
    check_jit_options(jit_options)

    def wrap(f):
        if invariant_argnums is not None or invariant_argnames is not None:
            from kvhoist.host import HostHoistedFunction

            return HostHoistedFunction(f, invariant_argnums=() if invariant_argnums is None else invariant_argnums,
                                       invariant_argnames=() if invariant_argnames is None else invariant_argnames,
                                       target=target, max_cache_bytes=max_cache_bytes, **jit_options)
        return HoistedFunction(f, target=target, max_cache_bytes=max_cache_bytes, fission=fission, **jit_options)

    if fun is None:
        return wrap
    return wrap(fun)
