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

import functools
import inspect
import itertools
import json
import logging
import os
import re
import threading
import time
import warnings
from typing import Any, Callable, Sequence

import jax

from kvhoist import compat
from kvhoist.errors import KvhoistError, TraceError, strict
from kvhoist.report import Note, Report

__all__ = ["hoist_invariants", "HoistedFunction", "KvhoistError", "TraceError", "KvhoistWarning"]


class KvhoistWarning(UserWarning):
    """The pipeline could not optimise a program; it runs unoptimised (as under ``jax.jit``)."""


#: The logger of the whole package; configure it (``logging.basicConfig(level=logging.INFO)``) to see
#: trace / rewrite / compile timings and what moved.
logger = logging.getLogger("kvhoist")

#: Environment variable: a folder to which every traced signature's before/after jaxprs and report go.
DUMP_ENV = "KVHOIST_DUMP_TO"

#: How many traced inputs a log line lists (the largest; a model contributes one input per weight).
LOG_INPUTS = 6

_dump_counter = itertools.count(1)
_dump_lock = threading.Lock()
_dump_failed: set = set()


def signature_text(specs: Sequence[Any], limit: int | None = None) -> str:
    """``f32[1,16,2,8,8], bf16[1,512,32]``: the traced inputs of one signature, for logs and dumps.

    With ``limit``, at most that many inputs are listed, the largest first (a model's weights are many
    leaves), then ``... (+N more; 48 inputs, 1.2 MiB)``."""
    if limit is not None and len(specs) > limit:
        import math

        from kvhoist.report import human_bytes

        def size(s: Any) -> int:
            return math.prod(getattr(s, "shape", ())) * jax.numpy.dtype(getattr(s, "dtype", "float32")).itemsize

        largest = sorted(range(len(specs)), key=lambda i: -size(specs[i]))[:limit]
        total = sum(size(s) for s in specs)
        return (signature_text([specs[i] for i in sorted(largest)]) +
                f", ... (+{len(specs) - limit} more; {len(specs)} inputs, {human_bytes(total)})")
    out = []
    for s in specs:
        dtype = getattr(s, "dtype", None)
        name = jax.numpy.dtype(dtype).name if dtype is not None else type(s).__name__
        short = {"float32": "f32", "bfloat16": "bf16", "float16": "f16", "float64": "f64", "int32": "i32",
                 "int64": "i64", "bool": "bool", "uint32": "u32"}.get(name, name)
        out.append(f"{short}[{','.join(map(str, getattr(s, 'shape', ())))}]")
    return ", ".join(out) if out else "(no traced inputs)"


def log_report(name: str, report: Report, seconds: float) -> None:
    """The rewrite's INFO line (the report's summary) and one DEBUG line per hoisted value."""
    if not logger.isEnabledFor(logging.INFO):
        return
    logger.info("rewrote %s in %.3f s: %s", name, seconds, report.summary())
    if logger.isEnabledFor(logging.DEBUG):
        for h in report.hoisted:
            via = "+".join(h.via) if isinstance(h.via, (tuple, list)) else h.via
            logger.debug("  moved %s %s[%s] (%d bytes) out of %s via %s (from %s)", h.name, h.dtype,
                         ",".join(map(str, h.shape)), h.bytes, h.loop, via, h.source)
        for sk in report.skipped:
            logger.debug("  kept %s in %s: %s (from %s)", sk.name, sk.loop or "its loop", sk.reason, sk.source)


def dump_signature(name: str, signature: str, before: Any, after: Any, report: Report, *,
                   kind: str = "jit") -> str | None:
    """Write one traced signature to ``$KVHOIST_DUMP_TO`` (nothing when it is unset).

    Files: ``<prefix>.before.txt`` and ``<prefix>.after.txt`` (the jaxprs as text; for a host-loop step
    ``after`` is the prologue and the step, one after the other) and ``<prefix>.report.json`` (the report,
    plus the function, the signature and ``kind``). ``<prefix>`` is ``kvhoist-<pid>-<n>-<function>``, ``n``
    counting signatures in this process, so every signature gets its own files.

    Returns:
      The prefix's path, or None when nothing was written. A folder that cannot be written is reported
      once per folder as a :class:`KvhoistWarning`; the program itself runs on.
    """
    folder = os.environ.get(DUMP_ENV)
    if not folder:
        return None
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:60] or "fun"
    suffixes = (".before.txt", ".after.txt", ".report.json")
    try:
        os.makedirs(folder, exist_ok=True)
        with _dump_lock:
            while True:  # skip names an earlier process with the same pid left in this folder
                prefix = os.path.join(folder, f"kvhoist-{os.getpid()}-{next(_dump_counter):04d}-{safe}")
                if not any(os.path.exists(prefix + x) for x in suffixes):
                    break
        data = {"function": name, "kind": kind, "signature": signature, **report.to_dict()}
        for suffix, text in zip(suffixes, (str(before), str(after), json.dumps(data, indent=2, default=str))):
            with open(prefix + suffix, "x", encoding="utf-8") as f:
                f.write(text if text.endswith("\n") else text + "\n")
    except OSError as err:
        if folder not in _dump_failed:
            _dump_failed.add(folder)
            warnings.warn(f"{DUMP_ENV}={folder}: cannot write the dump ({err.strerror or err}); the program runs "
                          "on without it", KvhoistWarning, stacklevel=2)
        logger.warning("%s=%s: cannot write the dump of %s: %s", DUMP_ENV, folder, name, err)
        return None
    logger.info("dumped %s to %s.{before.txt,after.txt,report.json}", name, prefix)
    return prefix


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


def _normalize_argnums(static_argnums, what: str = "static_argnums") -> tuple[int, ...]:
    if static_argnums is None:
        return ()
    if isinstance(static_argnums, int) and not isinstance(static_argnums, bool):
        return (static_argnums,)
    try:
        nums = tuple(static_argnums)
    except TypeError:
        nums = None
    if nums is None or not all(isinstance(i, int) and not isinstance(i, bool) for i in nums):
        raise TypeError(f"hoist_invariants: {what} must be an int or a sequence of ints, got {static_argnums!r}")
    return nums


def _normalize_argnames(static_argnames, what: str = "static_argnames") -> tuple[str, ...]:
    if static_argnames is None:
        return ()
    if isinstance(static_argnames, str):
        return (static_argnames,)
    try:
        names = tuple(static_argnames)
    except TypeError:
        names = None
    if names is None or not all(isinstance(n, str) for n in names):
        raise TypeError(f"hoist_invariants: {what} must be a str or a sequence of str, got {static_argnames!r}")
    return names


def _check_options(max_cache_bytes: Any, fission: Any) -> None:
    if max_cache_bytes is not None and (not isinstance(max_cache_bytes, int) or isinstance(max_cache_bytes, bool)):
        raise TypeError(f"hoist_invariants: max_cache_bytes must be an int number of bytes or None, got "
                        f"{type(max_cache_bytes).__name__} {max_cache_bytes!r}")
    if max_cache_bytes is not None and max_cache_bytes < 0:
        raise ValueError(f"hoist_invariants: max_cache_bytes must be >= 0, got {max_cache_bytes}")
    if fission not in ("scan", "vmap"):
        raise ValueError(f"hoist_invariants: fission must be 'scan' or 'vmap', got {fission!r}")


_TRACE_ERRORS = (jax.errors.ConcretizationTypeError, jax.errors.TracerBoolConversionError,
                 jax.errors.TracerIntegerConversionError, jax.errors.TracerArrayConversionError)


def trace_to_jaxpr(flat_fun: Callable, leaves: Sequence, name: str, *, return_shape: bool = False):
    """``jax.make_jaxpr(flat_fun)(*leaves)``, turning tracing errors into one :class:`TraceError`
    that names the function and the fix."""
    try:
        return jax.make_jaxpr(flat_fun, return_shape=return_shape)(*leaves)
    except _TRACE_ERRORS as err:
        raise TraceError(
            f"hoist_invariants could not trace {name}: it uses Python control flow or a Python "
            f"conversion on a traced value ({type(err).__name__}). Mark that argument static "
            f"(static_argnums=/static_argnames=) or use jax.lax.cond / jax.lax.fori_loop. "
            f"Original error: {str(err).splitlines()[0]}") from err


def function_name(fun: Callable) -> str:
    """A readable name for messages, also for ``functools.partial`` objects and callable instances."""
    while isinstance(fun, functools.partial):
        fun = fun.func
    return getattr(fun, "__name__", None) or type(fun).__name__


def count_equations(j) -> int:
    """Equations of a (closed) jaxpr, those of its sub-jaxprs (loop bodies, branches, calls) included."""
    return sum(1 + sum(count_equations(sub) for sub in compat.subjaxprs_of(e)) for e in compat.split_closed(j)[4])


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
        a = x.aval if _is_tracer(x) else jax.typeof(x)
        return ("d", tuple(a.shape), str(a.dtype), bool(getattr(a, "weak_type", False)))
    return ("s", type(x), _hashable(x))  # a static value and its type, as jit keys them


class HoistedFunction:
    """The result of :func:`hoist_invariants`: a ``jax.jit`` whose trace goes through kvhoist.

    Call it like the original function. Attributes: ``fun`` (the wrapped function), ``jitted`` (the
    underlying ``jax.jit`` object), ``static_argnums`` / ``static_argnames`` (resolved through the
    signature, as jit resolves them), ``target``, ``max_cache_bytes``, ``fission``.
    """

    def __init__(self, fun: Callable, *, target: Any = None, static_argnums=None, static_argnames=None,
                 donate_argnums=None, donate_argnames=None, in_shardings: Any = None,
                 out_shardings: Any = None, keep_unused: bool = False, max_cache_bytes: int | None = None,
                 fission: str = "scan"):
        if not callable(fun):
            raise TypeError(f"hoist_invariants expects a callable, got {type(fun).__name__}: {fun!r}")
        _check_options(max_cache_bytes, fission)
        self.fun = fun
        self.max_cache_bytes = max_cache_bytes
        self.fission = fission
        self.target = target
        if target is not None:
            from kvhoist.targets import get_target

            self.target = get_target(target)  # an unknown name fails now, listing the known ones
        self.__name__ = function_name(fun)
        nums = _normalize_argnums(static_argnums)
        names = _normalize_argnames(static_argnames)
        self.static_argnums, self.static_argnames = _resolve_static(fun, nums, names, self.__name__)
        self._records: dict = {}
        self._last: list = []
        self._lock = threading.Lock()

        @functools.wraps(fun)
        def traced(*args, **kwargs):
            return self._rewrite_and_eval(args, kwargs)

        jit_kwargs: dict = dict(static_argnums=self.static_argnums or None,
                                static_argnames=self.static_argnames or None, keep_unused=keep_unused)
        if donate_argnums is not None:
            jit_kwargs["donate_argnums"] = donate_argnums
        if donate_argnames is not None:
            jit_kwargs["donate_argnames"] = donate_argnames
        if in_shardings is not None:
            jit_kwargs["in_shardings"] = in_shardings
        if out_shardings is not None:
            jit_kwargs["out_shardings"] = out_shardings
        self._jit_name = traced.__name__  # jax's events name the compile `jit(<this>)` (compile log line)
        self.jitted = jax.jit(traced, **jit_kwargs)
        functools.update_wrapper(self, fun, updated=())
        self.__name__ = function_name(fun)

    # -- inside jit's trace ----------------------------------------------------------------------
    def _rewrite_and_eval(self, args: tuple, kwargs: dict):
        """Run by ``jax.jit`` while it traces: trace ``fun`` on the abstract inputs, rewrite, evaluate."""
        leaves, tree = jax.tree_util.tree_flatten((args, kwargs))
        dyn = [i for i, x in enumerate(leaves) if _is_tracer(x)]
        key = (tree, tuple(_leaf_key(x, i in set(dyn)) for i, x in enumerate(leaves)), compat.trace_context())
        fun = self.fun

        def flat_fun(*dyn_leaves):
            full = list(leaves)
            for i, v in zip(dyn, dyn_leaves):
                full[i] = v
            a, k = jax.tree_util.tree_unflatten(tree, full)
            return fun(*a, **k)

        specs = [jax.ShapeDtypeStruct(leaves[i].aval.shape, leaves[i].aval.dtype,
                                      weak_type=getattr(leaves[i].aval, "weak_type", False)) for i in dyn]
        t0 = time.perf_counter()
        before, out_shape = trace_to_jaxpr(flat_fun, specs, self.__name__, return_shape=True)
        t1 = time.perf_counter()
        signature = signature_text(specs, LOG_INPUTS) if logger.isEnabledFor(logging.INFO) else ""
        if logger.isEnabledFor(logging.INFO):
            logger.info("traced %s (%s) in %.3f s: %d equations", self.__name__, signature, t1 - t0,
                        count_equations(before))
        after, report = self._optimize(before)
        log_report(self.__name__, report, time.perf_counter() - t1)
        if os.environ.get(DUMP_ENV):
            dump_signature(self.__name__, signature_text(specs), before, after, report)
        _expect_compile(self._jit_name, self.__name__, signature)
        record = _Traced(before, after, report)
        with self._lock:
            self._records[key] = record
            self._last.append(record)
        out = compat.jaxpr_as_fun(after)(*(leaves[i] for i in dyn))
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), list(out))

    def _optimize(self, before):
        from kvhoist.passes.pipeline import optimize

        try:
            after, report = optimize(before, target=self.target, max_cache_bytes=self.max_cache_bytes,
                                     fission=self.fission)
        except Exception as err:
            if strict():
                raise
            warnings.warn(f"kvhoist could not optimise {self.__name__} ({type(err).__name__}: "
                          f"{str(err).splitlines()[0][:300]}); it runs unoptimised, as under jax.jit. "
                          "Please report this.", KvhoistWarning, stacklevel=4)
            report = Report(notes=[Note("refused", f"the pipeline failed ({type(err).__name__}); "
                                                   "the program runs as traced")])
            return before, report
        if not report.hoisted and not _has_loop(before):
            report.notes.append(Note("hint", (
                f"{self.__name__} traces to a program without a scan/fori_loop/while_loop, so there is no loop "
                "to hoist out of. If the denoising loop is a Python loop that calls a jitted step, decorate the "
                "step with hoist_invariants(step, invariant_argnames=(...)) instead (host-loop hoisting).")))
        return after, report

    # -- reading what tracing recorded -----------------------------------------------------------
    def _key_of_call(self, args: tuple, kwargs: dict) -> tuple:
        """The key ``_rewrite_and_eval`` computes for this call, from concrete arguments."""
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
        try:
            hit = self._records.get(self._key_of_call(args, kwargs))
        except Exception:
            hit = None
        if hit is not None:
            return hit
        with self._lock:
            self._last.clear()
        self.jitted.trace(*args, **kwargs)
        _compile_log.pending = None
        with self._lock:
            if self._last:
                return self._last[-1]
        # jit had this signature cached under a key we could not reproduce: trace once more, fresh.
        fresh = HoistedFunction(self.fun, target=self.target, static_argnums=self.static_argnums,
                                static_argnames=self.static_argnames, max_cache_bytes=self.max_cache_bytes,
                                fission=self.fission)
        fresh.jitted.trace(*args, **kwargs)
        _compile_log.pending = None
        return fresh._last[-1]

    # -- public ----------------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
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
        """Drop jit's compiled programs and the recorded jaxprs/reports."""
        self.jitted.clear_cache()
        with self._lock:
            self._records.clear()

    def __get__(self, obj, objtype=None):
        if obj is None:
            return self
        return functools.partial(self, obj)

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


def hoist_invariants(fun: Callable | None = None, *, target: Any = None, static_argnums=None,
                     static_argnames=None, max_cache_bytes: int | None = None,
                     invariant_argnums: int | Sequence[int] | None = None,
                     invariant_argnames: str | Sequence[str] | None = None, fission: str = "scan",
                     donate_argnums=None, donate_argnames=None, in_shardings: Any = None,
                     out_shardings: Any = None, keep_unused: bool = False):
    """Compile ``fun`` with loop-invariant work hoisted out of its loops.

    Usable bare (``@hoist_invariants``) or with options (``@hoist_invariants(target="v6e")``).

    Args:
      fun: the function, typically a diffusion sampler containing a ``lax.scan`` / ``fori_loop`` /
        ``while_loop`` over steps.
      target: a TPU generation name or :class:`kvhoist.targets.Target`; when given, image-token
        padding is re-aligned to the target's MXU tile (see :func:`kvhoist.repad_tokens`).
      static_argnums, static_argnames: as in ``jax.jit`` (resolved through the signature; static values
        are keyed by value and type, as jit keys them).
      donate_argnums, donate_argnames, in_shardings, out_shardings, keep_unused: passed to ``jax.jit``.
      max_cache_bytes: optional budget (an int, bytes) for the hoisted values; checked here.
      fission: ``"scan"`` (default) or ``"vmap"``: how per-layer invariant work split out of a nested
        layer scan is computed (a separate scan, or one batched computation); see :func:`kvhoist.licm`.
      invariant_argnums, invariant_argnames: host-loop hoisting (docs/host_loop.md): these arguments
        stay the same across *calls* (weights, prompt/image embeddings). The work that depends only on
        them runs once per distinct set of them and is cached; later calls run only the rest. Returns a
        :class:`kvhoist.host.HostHoistedFunction` instead.
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

    def wrap(f):
        if invariant_argnums is not None or invariant_argnames is not None:
            from kvhoist.host import HostHoistedFunction

            if any(o is not None for o in (donate_argnums, donate_argnames, in_shardings, out_shardings)):
                raise KvhoistError("hoist_invariants: donate_argnums/donate_argnames/in_shardings/out_shardings "
                                   "are not supported with host-loop hoisting (invariant_argnums/argnames)")

            return HostHoistedFunction(f, invariant_argnums=() if invariant_argnums is None else invariant_argnums,
                                       invariant_argnames=() if invariant_argnames is None else invariant_argnames,
                                       target=target,
                                       static_argnums=() if static_argnums is None else static_argnums,
                                       static_argnames=() if static_argnames is None else static_argnames,
                                       max_cache_bytes=max_cache_bytes)
        return HoistedFunction(f, target=target, static_argnums=static_argnums,
                               static_argnames=static_argnames, max_cache_bytes=max_cache_bytes,
                               fission=fission, donate_argnums=donate_argnums, donate_argnames=donate_argnames,
                               in_shardings=in_shardings, out_shardings=out_shardings, keep_unused=keep_unused)

    if fun is None:
        return wrap
    return wrap(fun)
