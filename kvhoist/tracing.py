"""What both wrappers share (:mod:`kvhoist.api`'s jit twin and :mod:`kvhoist.host`'s host-loop split): jax.jit's
keywords and argnum/argname normalisation, tracing a function to a jaxpr, and the log lines and dumps of one
traced signature. Neither wrapper imports the other for these.
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
import warnings
from typing import Any, Callable, Sequence

import jax

from kvhoist import compat
from kvhoist.errors import KvhoistWarning
from kvhoist.report import Report


#: The logger of the whole package; configure it (``logging.basicConfig(level=logging.INFO)``) to see
#: trace / rewrite / compile timings and what moved.
logger = logging.getLogger("kvhoist")
__import__("kvhoist.log").log.configure_from_env()  # KVHOIST_LOG=debug|info: kvhoist's lines only (kvhoist/log.py)


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


def normalize_argnums(static_argnums, what: str = "static_argnums") -> tuple[int, ...]:
    """``jax.jit``'s int-or-sequence argnums option as a tuple (``None`` -> ``()``).

    Args:
      static_argnums: the user's value (``None``, an int, or a sequence of ints; bools are refused).
      what: the option's name, for the error.

    Returns:
      The positions as a tuple; one ``TypeError`` naming ``what`` for anything else.
    """
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


def normalize_argnames(static_argnames, what: str = "static_argnames") -> tuple[str, ...]:
    """``jax.jit``'s str-or-sequence argnames option as a tuple (``None`` -> ``()``).

    Args:
      static_argnames: the user's value (``None``, a str, or a sequence of str).
      what: the option's name, for the error.

    Returns:
      The names as a tuple; one ``TypeError`` naming ``what`` for anything else.
    """
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


def trace_to_jaxpr(flat_fun: Callable, leaves: Sequence, name: str, *, return_shape: bool = False,
                   as_jit: Callable[[], Any] | None = None):
    """``jax.make_jaxpr(flat_fun)(*leaves)``, failing with ``jax.jit``'s own error.

    ``flat_fun`` takes flat leaves, so an error raised while tracing it would name ``flat_fun`` and its
    ``dyn_leaves[3]`` instead of the user's function and argument. When tracing fails, ``as_jit()`` — a
    zero-argument callable doing what ``jax.jit`` of the user's function does on the same arguments (e.g.
    ``jax.jit(fun, static_argnums=...).trace(*args, **kwargs)``) — runs, and its exception propagates:
    the same type (``ConcretizationTypeError``, ``TracerBoolConversionError``, a shape ``TypeError``, ...)
    and message as under jit. If it does not fail, the original error is raised.
    """
    try:
        return jax.make_jaxpr(flat_fun, return_shape=return_shape)(*leaves)
    except Exception as err:  # noqa: BLE001 - re-raised below, or replaced by jit's own error
        failure = err
    if as_jit is not None:
        as_jit()  # raises jit's own exception for the same mistake (outside the except: no chained context)
    raise failure


def function_name(fun: Callable) -> str:
    """A readable name for messages, also for ``functools.partial`` objects and callable instances."""
    while isinstance(fun, functools.partial):
        fun = fun.func
    return getattr(fun, "__name__", None) or type(fun).__name__


def count_equations(j) -> int:
    """Equations of a (closed) jaxpr, those of its sub-jaxprs (loop bodies, branches, calls) included."""
    return sum(1 + sum(count_equations(sub) for sub in compat.subjaxprs_of(e)) for e in compat.split_closed(j)[4])


#: The keyword options of ``jax.jit`` in the installed JAX; :func:`hoist_invariants` passes each one through.
JIT_OPTIONS: tuple[str, ...] = tuple(
    n for n, p in inspect.signature(jax.jit).parameters.items() if p.kind == inspect.Parameter.KEYWORD_ONLY)


def check_jit_options(options: dict, who: str = "hoist_invariants") -> None:
    """Refuse a keyword that neither kvhoist nor the installed ``jax.jit`` knows, with jit's ``TypeError`` form.

    Args:
      options: the keyword arguments meant for ``jax.jit``.
      who: the public function's name, for the message.
    """
    unknown = sorted(set(options) - set(JIT_OPTIONS))
    if unknown:
        raise TypeError(f"{who}() got an unexpected keyword argument {unknown[0]!r} (kvhoist's options: target, "
                        f"max_cache_bytes, fission, invariant_argnums, invariant_argnames; jax.jit's: "
                        f"{', '.join(JIT_OPTIONS)})")
