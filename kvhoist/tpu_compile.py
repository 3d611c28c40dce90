"""Compiling for a TPU on a CPU host: libtpu, topologies, one chip's figures for a jaxpr.

With ``jax[tpu]`` installed (``pip install -e '.[tpu]'``: jax pins the matching ``libtpu``), JAX can
compile for a TPU it does not have: :func:`jax.experimental.topologies.get_topology_desc` describes a
slice, and ``jax.jit(f).lower(*abstract_args).compile()`` runs the TPU compiler over
``jax.ShapeDtypeStruct`` arguments placed on that slice's devices. Nothing executes: what comes back is
the optimized HLO, the memory XLA would allocate per chip, and the compile time.

This is the compiler's own use of that machinery — the layout pass with ``measure="tpu"``
(:func:`measure_jaxpr`) — and what the ``kvhoist compile`` driver (``kvhoist.tools.tpu``) builds on:

* :func:`require_libtpu`: one clear error when ``libtpu`` is missing (:class:`LibtpuMissingError`);
* :data:`DEFAULT_TOPOLOGIES`: a working topology name per target (``kvhoist.targets`` names);
* :func:`get_topology` / :func:`make_mesh`: the devices of a topology, one chip or a 2D
  ``("data", "tensor")`` mesh;
* :func:`raise_compile_error`: a failed compile as :class:`DoesNotFit` (the compiler's
  ``RESOURCE_EXHAUSTED`` as one line, e.g. ``HLO temporaries (1.70T) exceeds available HBM (31.25G)``)
  or :class:`CompileFailed`;
* :func:`measure_jaxpr`: a closed jaxpr compiled for one chip; FLOPs and bytes (:mod:`kvhoist.hlo`).

Environment: ``JAX_PLATFORMS=cpu`` (the host runs on CPU; TPU is only a compile target),
``TPU_SKIP_MDS_QUERY=1`` (no cloud metadata lookups); two processes loading libtpu at once also need
``ALLOW_MULTIPLE_LIBTPU_LOAD=1``. :func:`tpu_environment` sets the last two if unset.

Example:
    >>> from kvhoist import tpu_compile
    >>> tpu_compile.require_libtpu()
    >>> tpu_compile.measure_jaxpr(jax.make_jaxpr(f)(*args), "v6e")["temp_bytes"]
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
from typing import Any, NoReturn

from kvhoist.errors import KvhoistError
from kvhoist.hlo import cost_flops, memory_figures
from kvhoist.targets import get_target

__all__ = ["JAX_TPU_PIN", "DEFAULT_TOPOLOGIES", "LibtpuMissingError", "DoesNotFit", "CompileFailed",
           "libtpu_version", "require_libtpu", "tpu_environment", "default_topology", "check_topology_name",
           "get_topology", "make_mesh", "does_not_fit_line", "raise_compile_error", "measure_jaxpr"]

#: The ``jax[tpu]`` version of the ``tpu`` extra in pyproject.toml (jax pins its libtpu).
JAX_TPU_PIN = "0.10.2"

#: A topology name that ``get_topology_desc`` accepts, per target (the smallest slice that works:
#: ``v5e:1x1`` and ``v6e:1x1`` are refused, "not divisible by host bounds 2x2x1"; v7x is ``tpu7x``).
DEFAULT_TOPOLOGIES: dict[str, str] = {
    "v4": "v4:2x2x1",
    "v5e": "v5e:2x2",
    "v5p": "v5p:2x2x1",
    "v6e": "v6e:2x2",
    "v7x": "tpu7x:2x2x1",
}

#: The topology-name prefixes of each target (``--topology`` must belong to ``--target``).
_TOPOLOGY_PREFIXES: dict[str, tuple[str, ...]] = {
    "v4": ("v4",), "v5e": ("v5e",), "v5p": ("v5p",), "v6e": ("v6e",), "v7x": ("tpu7x",)}

_TOPOLOGY_NAME = re.compile(r"^[a-z0-9]+:\d+(x\d+){1,2}$")


class LibtpuMissingError(KvhoistError):
    """``libtpu`` is not installed, so no TPU compiler is available."""


class DoesNotFit(KvhoistError):
    """The TPU compiler refused the program for lack of memory (``RESOURCE_EXHAUSTED``).

    Attributes:
      line: one line with the compiler's figures, e.g. ``HLO temporaries (1.70T) exceeds available HBM
        (31.25G)``.
      variant: which variant did not fit (``plain``, ``hand``, ``hoisted``), or "".
    """

    def __init__(self, line: str, variant: str = ""):
        super().__init__(line)
        self.line = line
        self.variant = variant


class CompileFailed(KvhoistError):
    """The TPU compiler (or the lowering before it) rejected a variant for a reason other than memory.

    Attributes:
      line: ``ExceptionType: first line of its message``.
      variant: which variant failed.
    """

    def __init__(self, line: str, variant: str = ""):
        super().__init__(line)
        self.line = line
        self.variant = variant


def libtpu_version() -> str | None:
    """The installed ``libtpu`` version, or None when it is not installed."""
    if importlib.util.find_spec("libtpu") is None:
        return None
    try:
        return importlib.metadata.version("libtpu")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def require_libtpu() -> str:
    """The libtpu version; raises :class:`LibtpuMissingError` (with the install command) without it."""
    version = libtpu_version()
    if version is None:
        raise LibtpuMissingError(f"libtpu is not installed: pip install -e '.[tpu]' (compile-only TPU targets "
                                 f"need jax[tpu]=={JAX_TPU_PIN})")
    return version


def tpu_environment() -> None:
    """Sets ``TPU_SKIP_MDS_QUERY=1`` and ``ALLOW_MULTIPLE_LIBTPU_LOAD=1`` unless already set.

    Call before the first topology is built. ``JAX_PLATFORMS=cpu`` must be set before jax is imported
    (the CLI and the tests set it; it is not changed here because jax may already be initialised)."""
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def default_topology(target: str) -> str:
    """The default topology name of a TPU target (``kvhoist.targets`` name or alias, e.g. ``trillium``).

    Raises:
      kvhoist.targets.UnknownTargetError: unknown name.
      KvhoistError: a known target that is not a TPU (``cpu``, ``gpu``).
    """
    t = get_target(target)
    if t.name not in DEFAULT_TOPOLOGIES:
        raise KvhoistError(f"target {t.name!r} is not a TPU; use one of {', '.join(DEFAULT_TOPOLOGIES)}")
    return DEFAULT_TOPOLOGIES[t.name]


def check_topology_name(target: str, topology: str) -> str:
    """``topology`` if it is well formed (``NAME:AxB`` or ``NAME:AxBxC``) and belongs to ``target``;
    raises :class:`KvhoistError` with the expected form otherwise."""
    t = get_target(target)
    if t.name not in DEFAULT_TOPOLOGIES:
        raise KvhoistError(f"target {t.name!r} is not a TPU; use one of {', '.join(DEFAULT_TOPOLOGIES)}")
    if not isinstance(topology, str) or not _TOPOLOGY_NAME.match(topology):
        raise KvhoistError(f"topology {topology!r}: expected NAME:AxB or NAME:AxBxC, e.g. "
                           f"{DEFAULT_TOPOLOGIES[t.name]} or v6e:2x4")
    prefix = topology.split(":", 1)[0]
    if prefix not in _TOPOLOGY_PREFIXES[t.name]:
        raise KvhoistError(f"topology {topology!r} is not a {t.name} topology (expected "
                           f"{_TOPOLOGY_PREFIXES[t.name][0]}:..., e.g. {DEFAULT_TOPOLOGIES[t.name]})")
    return topology


def get_topology(target: str, topology: str | None = None) -> Any:
    """The ``jax.experimental.topologies`` description of ``topology`` (default: the target's).

    Raises:
      LibtpuMissingError: libtpu is not installed.
      KvhoistError: a malformed topology or one the TPU compiler refuses (its message, first line).
    """
    require_libtpu()
    tpu_environment()
    name = check_topology_name(target, topology) if topology else default_topology(target)
    from jax.experimental import topologies

    try:
        return topologies.get_topology_desc(platform="tpu", topology_name=name)
    except Exception as err:  # the PJRT plugin raises XlaRuntimeError / ValueError for unknown names
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise KvhoistError(f"topology {name!r} refused by the TPU compiler: {first}") from None


def make_mesh(topo: Any, chips: int | None = None, shape: tuple[int, int] | None = None) -> Any:
    """A ``jax.sharding.Mesh`` over a topology's devices.

    ``chips=1``: the first chip, axis ``("x",)`` (everything replicated on it). Otherwise (default: all
    chips) a 2D ``("data", "tensor")`` mesh with ``Auto`` axes, the layout of ``tests/compiler/test_multidevice.py``:
    ``shape`` ``(data, tensor)`` (their product must be the chip count), default ``(2, n/2)`` (``(1, n)``
    for an odd count).
    """
    import numpy as np
    from jax.sharding import AxisType, Mesh

    devices = list(topo.devices)
    n = len(devices) if chips is None else chips
    if not isinstance(n, int) or n < 1 or n > len(devices):
        raise KvhoistError(f"chips must be between 1 and {len(devices)}, got {chips!r}")
    if n == 1:
        return Mesh(np.array(devices[:1]), ("x",), axis_types=(AxisType.Auto,))
    rows = 2 if n % 2 == 0 else 1
    if shape is not None:
        if (len(shape) != 2 or not all(isinstance(x, int) and x >= 1 for x in shape)
                or shape[0] * shape[1] != n):
            raise KvhoistError(f"mesh shape {shape!r}: need two positive ints (data, tensor) whose product is the "
                               f"{n} chips of the topology")
        rows = shape[0]
    return Mesh(np.array(devices[:n]).reshape(rows, n // rows), ("data", "tensor"),
                axis_types=(AxisType.Auto,) * 2)


_HBM = re.compile(r"(HLO temporaries \([^)]*\) exceeds available HBM \([^)]*\))")
_USED = re.compile(r"(Used [\d.]+[KMGT]? of [\d.]+[KMGT]? hbm[^.\n]*)", re.IGNORECASE)


def does_not_fit_line(err: BaseException) -> str | None:
    """The compiler's one-line figure when ``err`` is a TPU out-of-memory (``RESOURCE_EXHAUSTED``), else None.

    Prefers ``HLO temporaries (X) exceeds available HBM (Y)``; else ``Used X of Y hbm...``; else the first
    line that mentions RESOURCE_EXHAUSTED."""
    text = str(err)
    if "RESOURCE_EXHAUSTED" not in text and "exceeds available HBM" not in text:
        return None
    for pattern in (_HBM, _USED):
        m = pattern.search(text)
        if m:
            return m.group(1).strip()
    for line in text.splitlines():
        if "RESOURCE_EXHAUSTED" in line:
            return line.strip()[:300]
    return text.strip().splitlines()[0][:300]


def raise_compile_error(err: BaseException, variant: str) -> NoReturn:
    """Raise the lowering / compile error ``err`` of ``variant`` as one line.

    Raises:
      DoesNotFit: the compiler ran out of memory (:func:`does_not_fit_line`; the original is dropped).
      CompileFailed: anything else, as ``ExceptionType: first line`` (chained to ``err``), e.g. a Pallas
        kernel the SPMD partitioner cannot split: "Mosaic kernels cannot be automatically partitioned.".
    """
    line = does_not_fit_line(err)
    if line is not None:
        raise DoesNotFit(line, variant) from None
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    raise CompileFailed(f"{type(err).__name__}: {first}"[:400], variant) from err


def measure_jaxpr(closed: Any, target: str) -> dict:
    """Compile a closed jaxpr for one chip of ``target`` from its input avals; the compiler's figures.

    Args:
      closed: a closed jaxpr (e.g. one candidate layout of a program).
      target: a TPU target name.

    Returns:
      ``{"flops": cost_analysis flops (a loop body counted once), "temp_bytes": ..., "argument_bytes": ...,
      "output_bytes": ...}``.

    Raises:
      LibtpuMissingError: no libtpu. DoesNotFit / CompileFailed: as :func:`raise_compile_error`.
    """
    import jax

    from kvhoist import compat

    topo = get_topology(target)
    mesh = make_mesh(topo, chips=1)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    _cv, _c, invars, _o, _e = compat.split_closed(closed)
    args = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype, sharding=sharding) for v in invars]
    fn = jax.jit(compat.jaxpr_as_fun(closed))
    try:
        compiled = fn.lower(*args).compile()
    except Exception as err:
        raise_compile_error(err, "layout")
    mem = memory_figures(compiled)
    return {"flops": cost_flops(compiled), "temp_bytes": mem["temp_bytes"], "argument_bytes": mem["argument_bytes"],
            "output_bytes": mem["output_bytes"]}
