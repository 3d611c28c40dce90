"""``@hoist_invariants``: trace, rewrite, cache per signature, evaluate.

The decorated function behaves like ``jax.jit(fun)``: same results (pytrees in and out), compiled,
traced once per input signature. Between tracing and compiling, the jaxpr goes through the kvhoist
pipeline (:mod:`kvhoist.passes.pipeline`): LICM with fission and speculation, and, when a ``target``
is given, the token re-padding layout pass.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Sequence

import jax

from kvhoist import compat
from kvhoist.report import Note, Report


class KvhoistError(ValueError):
    """A usage error with a message that names the fix."""


class TraceError(KvhoistError):
    """The function could not be traced to a jaxpr."""


def _normalize_argnums(static_argnums) -> tuple[int, ...]:
    if static_argnums is None:
        return ()
    if isinstance(static_argnums, int):
        return (static_argnums,)
    return tuple(static_argnums)


def _normalize_argnames(static_argnames) -> tuple[str, ...]:
    if static_argnames is None:
        return ()
    if isinstance(static_argnames, str):
        return (static_argnames,)
    return tuple(static_argnames)


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


def _has_loop(j) -> bool:
    for e in compat.split_closed(j)[4]:
        if e.primitive.name in ("scan", "while"):
            return True
        if any(_has_loop(s) for s in compat.subjaxprs_of(e)):
            return True
    return False


class _Traced:
    __slots__ = ("before", "after", "report", "out_tree", "compiled")

    def __init__(self, before, after, report, out_tree, compiled):
        self.before, self.after, self.report = before, after, report
        self.out_tree, self.compiled = out_tree, compiled


class HoistedFunction:
    """The result of :func:`hoist_invariants`. Call it like the original function."""

    def __init__(self, fun: Callable, *, target: Any = None, static_argnums=(), static_argnames=(),
                 max_cache_bytes: int | None = None, fission: str = "scan"):
        if not callable(fun):
            raise TypeError(f"hoist_invariants expects a callable, got {type(fun).__name__}: {fun!r}")
        self.fun = fun
        self.static_argnums = _normalize_argnums(static_argnums)
        self.static_argnames = _normalize_argnames(static_argnames)
        self.max_cache_bytes = max_cache_bytes
        if fission not in ("scan", "vmap"):
            raise ValueError(f"hoist_invariants: fission must be 'scan' or 'vmap', got {fission!r}")
        self.fission = fission
        self.target = target
        if target is not None:
            from kvhoist.targets import get_target

            self.target = get_target(target)  # an unknown name fails now, listing the known ones
        try:
            self._signature = inspect.signature(fun)
        except (TypeError, ValueError):
            self._signature = None
        self._cache: dict = {}
        functools.update_wrapper(self, fun)
        self.__name__ = function_name(fun)

    # -- signature handling ----------------------------------------------------------------------
    def _split_args(self, args: tuple, kwargs: dict):
        static_pos = {}
        dyn_args = list(args)
        for i in self.static_argnums:
            j = i if i >= 0 else len(args) + i
            if j < len(args):
                static_pos[j] = args[j]
        static_kw = {k: v for k, v in kwargs.items() if k in self.static_argnames}
        dyn_kw = {k: v for k, v in kwargs.items() if k not in self.static_argnames}
        for name, val in [*((f"argument {j}", v) for j, v in static_pos.items()),
                          *((f"argument '{k}'", v) for k, v in static_kw.items())]:
            try:
                hash(val)
            except TypeError as err:
                raise TypeError(
                    f"hoist_invariants: static {name} of {self.__name__} is not hashable "
                    f"({type(val).__name__}); pass a hashable value (e.g. a tuple instead of a list) "
                    f"or make it a traced argument") from err
        dyn_positions = [j for j in range(len(args)) if j not in static_pos]
        dyn = ([dyn_args[j] for j in dyn_positions], dyn_kw)
        leaves, treedef = jax.tree_util.tree_flatten(dyn)
        key_static = (tuple(sorted(static_pos.items())), tuple(sorted(static_kw.items())))
        return static_pos, static_kw, dyn_positions, leaves, treedef, key_static

    def _key(self, leaves, treedef, key_static, nargs):
        avals = []
        for x in leaves:
            a = jax.core.get_aval(x) if hasattr(jax.core, "get_aval") else None
            shape = getattr(x, "shape", None)
            dtype = getattr(x, "dtype", None)
            weak = getattr(a, "weak_type", None) if a is not None else None
            avals.append((tuple(shape) if shape is not None else type(x), str(dtype), weak))
        return (treedef, tuple(avals), key_static, nargs)

    def _trace(self, args, kwargs) -> tuple[_Traced, list]:
        static_pos, static_kw, dyn_positions, leaves, treedef, key_static = self._split_args(args, kwargs)
        key = self._key(leaves, treedef, key_static, len(args))
        hit = self._cache.get(key)
        if hit is not None:
            return hit, leaves
        nargs = len(args)
        fun = self.fun

        def flat_fun(*flat):
            dyn_a, dyn_k = jax.tree_util.tree_unflatten(treedef, flat)
            full = [None] * nargs
            for j, v in static_pos.items():
                full[j] = v
            for j, v in zip(dyn_positions, dyn_a):
                full[j] = v
            return fun(*full, **static_kw, **dyn_k)

        before, out_shape = trace_to_jaxpr(flat_fun, leaves, self.__name__, return_shape=True)
        out_tree = jax.tree_util.tree_structure(out_shape)
        from kvhoist.passes.pipeline import optimize

        after, report = optimize(before, target=self.target, max_cache_bytes=self.max_cache_bytes,
                                 fission=self.fission)
        if not report.hoisted and not _has_loop(before):
            report.notes.append(Note("hint", (
                f"{self.__name__} traces to a program without a scan/fori_loop/while_loop, so there is no loop "
                "to hoist out of. If the denoising loop is a Python loop that calls a jitted step, decorate the "
                "step with hoist_invariants(step, invariant_argnames=(...)) instead (host-loop hoisting).")))
        compiled = jax.jit(compat.jaxpr_as_fun(after))
        traced = _Traced(before, after, report, out_tree, compiled)
        self._cache[key] = traced
        return traced, leaves

    # -- public ----------------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        traced, leaves = self._trace(args, kwargs)
        flat = [x for x in leaves]
        out = traced.compiled(*flat)
        return jax.tree_util.tree_unflatten(traced.out_tree, list(out))

    def jaxprs(self, *args, **kwargs) -> tuple[Any, Any]:
        """``(before, after)``: the closed jaxprs traced from ``fun`` and produced by the passes."""
        traced, _ = self._trace(args, kwargs)
        return traced.before, traced.after

    def report(self, *args, **kwargs) -> Report:
        """What the passes did for this input signature (see :class:`kvhoist.Report`)."""
        traced, _ = self._trace(args, kwargs)
        return traced.report

    def lower(self, *args, **kwargs):
        """``jax.jit(...).lower`` of the rewritten program, for inspecting HLO and compile times."""
        traced, leaves = self._trace(args, kwargs)
        return traced.compiled.lower(*leaves)

    def clear_cache(self) -> None:
        self._cache.clear()

    def __repr__(self) -> str:
        return f"<hoist_invariants {self.__name__}>"


def hoist_invariants(fun: Callable | None = None, *, target: Any = None, static_argnums=(),
                     static_argnames=(), max_cache_bytes: int | None = None,
                     invariant_argnums: int | Sequence[int] | None = None,
                     invariant_argnames: str | Sequence[str] | None = None, fission: str = "scan"):
    """Compile ``fun`` with loop-invariant work hoisted out of its loops.

    Usable bare (``@hoist_invariants``) or with options (``@hoist_invariants(target="v6e")``).

    Args:
      fun: the function, typically a diffusion sampler containing a ``lax.scan`` / ``fori_loop`` /
        ``while_loop`` over steps.
      target: a TPU generation name or :class:`kvhoist.targets.Target`; when given, image-token
        padding is re-aligned to the target's MXU tile (see :func:`kvhoist.repad_tokens`).
      static_argnums, static_argnames: as in ``jax.jit``; static values must be hashable.
      max_cache_bytes: optional budget for the hoisted values' bytes.
      fission: ``"scan"`` (default) or ``"vmap"``: how per-layer invariant work split out of a nested
        layer scan is computed (a separate scan, or one batched computation); see :func:`kvhoist.licm`.
      invariant_argnums, invariant_argnames: host-loop hoisting (docs/host_loop.md): these arguments
        stay the same across *calls* (weights, prompt/image embeddings). The work that depends only on
        them runs once per distinct set of them and is cached; later calls run only the rest. Returns a
        :class:`kvhoist.host.HostHoistedFunction` instead.
    Returns:
      A :class:`HoistedFunction`; also ``.jaxprs(...)``, ``.report(...)``, ``.lower(...)``. With
      ``invariant_argnums``/``invariant_argnames``: a :class:`kvhoist.host.HostHoistedFunction`.

    Example:
      >>> @kvhoist.hoist_invariants(static_argnames=("steps",))
      ... def sample(model, latents, context, steps):
      ...     ...
      >>> sample(model, latents, context, steps=30)
      >>> print(sample.report(model, latents, context, steps=30).table())
    """
    def wrap(f):
        if invariant_argnums is not None or invariant_argnames is not None:
            from kvhoist.host import HostHoistedFunction

            return HostHoistedFunction(f, invariant_argnums=() if invariant_argnums is None else invariant_argnums,
                                       invariant_argnames=() if invariant_argnames is None else invariant_argnames,
                                       target=target,
                                       static_argnums=static_argnums, static_argnames=static_argnames,
                                       max_cache_bytes=max_cache_bytes)
        return HoistedFunction(f, target=target, static_argnums=static_argnums,
                               static_argnames=static_argnames, max_cache_bytes=max_cache_bytes,
                               fission=fission)

    if fun is None:
        return wrap
    return wrap(fun)
