"""How the benchmarks measure: interleaved runs with the order rotated, process CPU time beside wall time,
peak RSS, XLA's temporaries, the machine a run happened on."""

from __future__ import annotations

import gc
import logging
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

__all__ = ["time_interleaved", "per_call_times", "timed", "tree_bytes", "peak_rss_mib", "xla_temp_bytes", "machine", "quartiles",
           "iqr_overlap", "spread", "watch_first_call", "first_call_jit_vs_hoisted", "compiled_temp_bytes", "checkout_commit", "fmt_ms", "fmt_mib"]


def quartiles(xs: list[float]) -> tuple[float, float]:
    """``(lower, upper)`` quartile of ``xs`` (inclusive method, as ``kvhoist demo`` prints them; one value: both)."""
    import statistics

    if len(xs) < 2:
        return xs[0], xs[0]
    q1, _med, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q3


def iqr_overlap(a: list[float], b: list[float]) -> bool:
    """Whether the interquartile ranges of two timing samples overlap: their ratio is then within the
    machine's noise (a loaded machine gave plain 10.7 / 11.4 ms and hoisted 15.3 / 11.1 ms in two runs)."""
    (a1, a3), (b1, b3) = quartiles(a), quartiles(b)
    return a1 <= b3 and b1 <= a3


def time_interleaved(fns: dict[str, Callable[[], Any]], *, repeats: int, warmup: int = 1,
                     cpu_times: dict[str, list[float]] | None = None,
                     on_call: Callable[[str], None] | None = None) -> dict[str, list[float]]:
    """Wall times of each ``fns[name]()`` (blocked until ready), interleaved, order rotated per repeat.

    Interleaving spreads the noise of a shared machine over all variants instead of one. ``warmup``
    untimed rounds run first (compilation happens there). If ``cpu_times`` is given, it is filled with
    the process CPU time (all threads, ``time.process_time``) of each call: on a machine shared with
    other jobs that is far steadier than wall time (it does not count time spent waiting for a core).
    ``on_call(name)`` runs after every call, warm-up ones included (``(warmup + repeats) * len(fns)``
    calls: a progress bar's count), outside the timed region.

    Returns:
      ``{name: [seconds per repeat]}``.
    """
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            jax.block_until_ready(fns[n]())
            if on_call is not None:
                on_call(n)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            c0, t0 = time.process_time(), time.perf_counter()
            jax.block_until_ready(fns[n]())
            times[n].append(time.perf_counter() - t0)
            if cpu_times is not None:
                cpu_times.setdefault(n, []).append(time.process_time() - c0)
            if on_call is not None:
                on_call(n)
    return times


def per_call_times(fns: dict[str, Callable[[], Any]], *, repeats: int, calls: int = 1,
                   collect: bool = True) -> dict[str, dict[str, list[float]]]:
    """Per-call times of each ``fns[name]()``: batches of ``calls`` calls, interleaved, order rotated per repeat.

    The calls of a batch run back to back (not chained, not waited for one by one: with ``calls > 1`` this
    is dispatch throughput) and the batch's last output is waited for; a batch's time / ``calls`` is one
    sample. Three clocks per sample: process CPU time (all threads: steadier than wall time on a machine
    shared with other jobs), the calling thread's CPU time (the Python and C++ dispatch work alone: XLA
    runs the step on other threads) and wall time. ``collect``: ``gc.collect()`` before every batch (each
    starts from the same collector state). Run warm-up calls first (compilation is not excluded here).

    Returns:
      ``{"cpu" | "thread" | "wall": {name: [microseconds per call, one per repeat]}}``.

    Example:
      >>> t = per_call_times({"jit": lambda: f(x), "host": lambda: g(x)}, repeats=15, calls=100)
      >>> statistics.median(t["cpu"]["host"]) - statistics.median(t["cpu"]["jit"])
    """
    names = list(fns)
    out: dict[str, dict[str, list[float]]] = {m: {n: [] for n in names} for m in ("cpu", "thread", "wall")}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn = fns[name]
            if collect:
                gc.collect()
            c0, h0, t0 = time.process_time(), time.thread_time(), time.perf_counter()
            for _ in range(calls):
                last = fn()
            h1 = time.thread_time()
            jax.block_until_ready(last)
            t1, c1 = time.perf_counter(), time.process_time()
            out["cpu"][name].append((c1 - c0) / calls * 1e6)
            out["thread"][name].append((h1 - h0) / calls * 1e6)
            out["wall"][name].append((t1 - t0) / calls * 1e6)
    return out


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - t0


def tree_bytes(tree: Any) -> int:
    return int(sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree)
                   if hasattr(x, "shape")))


def peak_rss_mib() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def xla_temp_bytes(lowered: Any) -> int | None:
    """XLA's temporary buffer bytes for a lowered program (None where the backend does not say)."""
    try:
        return compiled_temp_bytes(lowered.compile())
    except Exception:  # noqa: BLE001 - a backend may refuse; the figure is optional
        return None


def compiled_temp_bytes(compiled: Any) -> int | None:
    """XLA's temporary buffer bytes of a compiled program (None where the backend does not say)."""
    try:
        stats = compiled.memory_analysis()
        return int(stats.temp_size_in_bytes) if stats is not None else None
    except Exception:  # memory_analysis is optional per backend
        return None


def machine() -> dict:
    dev = jax.devices()[0]
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "jax": jax.__version__,
            "jaxlib": getattr(__import__("jaxlib"), "__version__", "?"), "backend": jax.default_backend(),
            "device": f"{dev.platform}:{getattr(dev, 'device_kind', '?')}", "device_count": jax.device_count(),
            "loadavg_start": list(load) if load else None}


def spread(xs: Sequence[float], scale: float = 1.0) -> dict:
    """``{"median", "min", "max", "n"}`` of ``xs``, each value times ``scale`` (1e3: seconds to ms)."""
    return {"median": scale * statistics.median(xs), "min": scale * min(xs), "max": scale * max(xs), "n": len(xs)}


def fmt_ms(s: dict) -> str:
    """A :func:`spread` as ``median (min-max)``, no decimals (for milliseconds)."""
    return f"{s['median']:.0f} ({s['min']:.0f}-{s['max']:.0f})"


def fmt_mib(b: int | None) -> str:
    """Bytes as MiB with two decimals, ``?`` for unknown."""
    return "?" if b is None else f"{b / 2**20:.2f}"


#: [counting, XLA compiles seen, their seconds]: jax's event listeners cannot be removed, so one is registered once.
_COMPILES: list = [False, 0, 0.0]
_LISTENING: list[bool] = []


def _on_event(event: str, seconds: float, **_kw: Any) -> None:
    if _COMPILES[0] and event == "/jax/core/compile/backend_compile_duration":
        _COMPILES[1] += 1
        _COMPILES[2] += seconds


def watch_first_call(fn: Callable[[], Any]) -> dict:
    """Run ``fn()`` (e.g. ``lambda: f.lower(*args).compile()``) and say what it cost.

    Returns:
      ``cpu_s`` (process CPU seconds), ``compiles`` (XLA compiles it launched: jax's
      ``backend_compile_duration`` events), ``xla_compile_s`` (their wall seconds) and, where kvhoist ran, its
      INFO log's ``retrace_s`` and ``rewrite_s``.
    """
    if not _LISTENING:
        jax.monitoring.register_event_duration_secs_listener(_on_event)
        _LISTENING.append(True)
    seen: dict[str, float] = {}

    class Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.msg.startswith("traced "):
                seen["retrace_s"] = float(record.args[2])
            elif record.msg.startswith("rewrote "):
                seen["rewrite_s"] = float(record.args[1])

    log = logging.getLogger("kvhoist")
    handler, level = Grab(), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    _COMPILES[:] = [True, 0, 0.0]
    try:
        t = time.process_time()
        fn()
        cpu = time.process_time() - t
    finally:
        _COMPILES[0] = False
        log.removeHandler(handler)
        log.setLevel(level)
    return {"cpu_s": cpu, "compiles": _COMPILES[1], "xla_compile_s": _COMPILES[2], **seen}


def first_call_jit_vs_hoisted(make_fun: Callable[[], Callable], args: tuple, repeats: int) -> dict:
    """Trace (+ rewrite) + lower + compile, ``jax.jit`` vs ``kvhoist.hoist_invariants``, measured by
    :func:`watch_first_call`: a fresh function from ``make_fun()`` and ``jax.clear_caches()`` before each, the two
    interleaved with the order rotated, one untimed round first.

    Returns:
      Per variant (``"jit"``, ``"hoisted"``) a :func:`spread` of each measured figure and the sorted distinct
      compile counts; ``"ratio"``: hoisted / jit median process CPU seconds.
    """
    import kvhoist

    runs: dict[str, list[dict]] = {"jit": [], "hoisted": []}
    for r in range(repeats + 1):
        for who in (("jit", "hoisted") if r % 2 == 0 else ("hoisted", "jit")):
            fun = make_fun()
            g = jax.jit(fun) if who == "jit" else kvhoist.hoist_invariants(fun)
            jax.clear_caches()
            seen = watch_first_call(lambda: g.lower(*args).compile())
            if r:
                runs[who].append(seen)
    out: dict = {}
    for who, rs in runs.items():
        out[who] = {k: spread([x[k] for x in rs]) for k in rs[0] if k != "compiles"}
        out[who]["compiles"] = sorted({x["compiles"] for x in rs})
    out["ratio"] = out["hoisted"]["cpu_s"]["median"] / out["jit"]["cpu_s"]["median"]
    return out


def checkout_commit() -> str | None:
    """The checkout's commit (``+dirty`` if kvhoist/ has uncommitted changes), or None outside a git checkout."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "kvhoist"], cwd=root, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")
