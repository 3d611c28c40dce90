"""Compile-only TPU helpers: compile a function for a TPU topology on a CPU host and read what XLA made.

With ``jax[tpu]`` installed (``pip install -e '.[tpu]'``: jax pins the matching ``libtpu``), JAX can
compile for a TPU it does not have: :func:`jax.experimental.topologies.get_topology_desc` describes a
slice, and ``jax.jit(f).lower(*abstract_args).compile()`` runs the TPU compiler over
``jax.ShapeDtypeStruct`` arguments placed on that slice's devices. Nothing executes: what comes back is
the optimized HLO, the memory XLA would allocate per chip, and the compile time. Run times cannot be
known this way.

What this module adds:

* :func:`require_libtpu`: one clear error when ``libtpu`` is missing (:class:`LibtpuMissingError`);
* :data:`DEFAULT_TOPOLOGIES`: a working topology name per target (``kvhoist.targets`` names);
* :func:`get_topology` / :func:`make_mesh`: the devices of a topology, one chip or a 2D
  ``("data", "tensor")`` mesh;
* :func:`wan_partition_spec` / :func:`shard_abstract`: Megatron-style sharding of a Wan model's
  parameters (as ``tests/test_multidevice.py`` tests on 8 CPU devices) on abstract arguments;
* :func:`compile_variant`: lower + compile one variant and return a :class:`CompileResult` with the
  matmul executions inside / outside the step loop (:func:`kvhoist.bench.hlo_op_executions`, weighted
  by loop trip counts, every ``cond`` branch counted), memory and compile time;
* :class:`DoesNotFit`: the compiler's ``RESOURCE_EXHAUSTED`` as one line (e.g. ``HLO temporaries
  (1.70T) exceeds available HBM (31.25G)``).

Environment: ``JAX_PLATFORMS=cpu`` (the host runs on CPU; TPU is only a compile target),
``TPU_SKIP_MDS_QUERY=1`` (no cloud metadata lookups); two processes loading libtpu at once also need
``ALLOW_MULTIPLE_LIBTPU_LOAD=1``. :func:`tpu_environment` sets the last two if unset.

Example:
    >>> from kvhoist import tpu
    >>> tpu.require_libtpu()
    >>> topo = tpu.get_topology("v6e")
    >>> mesh = tpu.make_mesh(topo, chips=1)
    >>> res = tpu.compile_variant("plain", jax.jit(f), args, {}, steps=10, mesh=mesh)
    >>> res.matmuls_inside, res.temp_bytes
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import importlib.util
import os
import re
import time
from typing import Any, Callable

from kvhoist.errors import KvhoistError
from kvhoist.targets import get_target

__all__ = ["JAX_TPU_PIN", "DEFAULT_TOPOLOGIES", "LibtpuMissingError", "DoesNotFit", "CompileFailed", "CompileResult",
           "libtpu_version", "require_libtpu", "tpu_environment", "default_topology", "check_topology_name",
           "get_topology",
           "make_mesh", "wan_partition_spec", "shard_abstract", "compile_variant", "does_not_fit_line",
           "compile_three_ways"]

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
    chips) a 2D ``("data", "tensor")`` mesh with ``Auto`` axes, the layout of ``tests/test_multidevice.py``:
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


_PARAM_RULES: tuple[tuple[re.Pattern, tuple], ...] = tuple((re.compile(p), spec) for p, spec in (
    (r"\['(to_q|to_k|to_v|add_k_proj|add_v_proj)'\]\['kernel'\]", (None, "tensor")),
    (r"\['(to_q|to_k|to_v|add_k_proj|add_v_proj)'\]\['bias'\]", ("tensor",)),
    (r"\['attn[12]'\]\['to_out'\]\['kernel'\]", ("tensor", None)),
    (r"\['(norm_q|norm_k|norm_added_k)'\]\['scale'\]", ("tensor",)),
    (r"\['net_0_proj'\]\['kernel'\]", (None, "tensor")),
    (r"\['net_0_proj'\]\['bias'\]", ("tensor",)),
    (r"\['net_2'\]\['kernel'\]", ("tensor", None)),
))


def wan_partition_spec(path: str, ndim: int, axis: str = "tensor") -> Any:
    """Megatron-style tensor parallelism for a ``wan_ref`` parameter, from its ``jax.tree_util.keystr`` path.

    The output dim of q/k/v (self- and cross-attention, I2V's add_k/add_v), the input dim of ``to_out``,
    the q/k RMSNorm weights, the FFN's inner dim go on ``axis``; everything else is replicated; stacked
    (``scan_layers``) parameters get a leading None. The rules of ``tests/test_multidevice.py``.
    """
    from jax.sharding import PartitionSpec as P

    for pattern, base in _PARAM_RULES:
        if pattern.search(path):
            base = tuple(axis if a == "tensor" else a for a in base)
            return P(*((None,) * (ndim - len(base)) + base))
    return P()


def shard_abstract(tree: Any, mesh: Any, *, params: bool) -> Any:
    """``tree`` with every ``jax.ShapeDtypeStruct`` / array leaf as a ``ShapeDtypeStruct`` placed on ``mesh``.

    ``params=True``: NNX modules are split and their leaves get :func:`wan_partition_spec` on the mesh's
    last axis (on a one-axis mesh everything is replicated); the other leaves (latents, prompt and image
    embeddings: batch 1, which cannot be split over ``"data"``) are replicated, and the partitioner
    propagates the weights' sharding into the activations (heads / FFN columns on ``"tensor"``).
    Splitting the latents' H over ``"data"`` was tried: the partitioner did not keep it through the
    sampler (v5e:2x4, 14B, 480x832x17: temporaries 16.41G -> 16.38G), so it is not done.
    """
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    tensor = mesh.axis_names[-1] if len(mesh.axis_names) > 1 else None

    def place(path: Any, x: Any, spec_fn: Callable[[str, int], Any]) -> Any:
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            return x
        spec = spec_fn(jax.tree_util.keystr(path), len(x.shape))
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))

    def param_spec(path: str, ndim: int) -> Any:
        return wan_partition_spec(path, ndim, tensor) if (params and tensor) else P()

    def leaf(x: Any) -> Any:
        if isinstance(x, nnx.Module):
            graphdef, state = nnx.split(x)
            state = jax.tree_util.tree_map_with_path(lambda p, v: place(p, v, param_spec), state)
            return nnx.merge(graphdef, state)
        return jax.tree_util.tree_map_with_path(lambda p, v: place(p, v, lambda *_: P()), x)

    return jax.tree_util.tree_map(leaf, tree, is_leaf=lambda x: isinstance(x, nnx.Module))


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


@dataclasses.dataclass
class CompileResult:
    """What the TPU compiler made of one variant (all memory figures per chip, in bytes).

    Attributes:
      variant: ``plain``, ``hand`` or ``hoisted``.
      matmuls_inside, matmuls_outside: matmul executions (``convolution`` + ``dot``) in one run, inside
        the step loop and outside it, weighted by loop trip counts, every ``cond`` branch counted.
      step_loops: step loops found in the HLO (``while`` with the step count as trip count).
      argument_bytes, output_bytes, temp_bytes, generated_code_bytes, alias_bytes: ``memory_analysis()``.
      cache_bytes: global bytes of the hoisted values (kvhoist's report; hoisted variant only, else None).
      hoisted_values: how many values kvhoist hoisted (hoisted variant only).
      compile_seconds: lower + compile wall time on this host.
      flops: ``cost_analysis()["flops"]`` (a while body counted once: not a per-run figure).
    """

    variant: str
    matmuls_inside: int
    matmuls_outside: int
    step_loops: int
    argument_bytes: int | None
    output_bytes: int | None
    temp_bytes: int | None
    generated_code_bytes: int | None
    alias_bytes: int | None
    cache_bytes: int | None
    hoisted_values: int | None
    compile_seconds: float
    flops: float | None

    def to_dict(self) -> dict:
        """A JSON-able dict of the fields."""
        return dataclasses.asdict(self)


def _memory(compiled: Any) -> dict:
    stats = compiled.memory_analysis()
    names = {"argument_bytes": "argument_size_in_bytes", "output_bytes": "output_size_in_bytes",
             "temp_bytes": "temp_size_in_bytes", "generated_code_bytes": "generated_code_size_in_bytes",
             "alias_bytes": "alias_size_in_bytes"}
    return {k: (int(getattr(stats, v)) if stats is not None and hasattr(stats, v) else None) for k, v in names.items()}


def _flops(compiled: Any) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # optional per backend
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def compile_variant(variant: str, fn: Any, args: tuple, kwargs: dict, *, steps: int,
                    report: Callable[[], Any] | None = None) -> CompileResult:
    """Lower and compile ``fn(*args, **kwargs)`` (abstract, placed arguments) and measure the result.

    Args:
      variant: a label (``plain``, ``hand``, ``hoisted``).
      fn: anything with ``.lower(*args, **kwargs)``: a ``jax.jit`` function or a
        ``kvhoist.HoistedFunction``.
      args, kwargs: ``jax.ShapeDtypeStruct`` pytrees with TPU shardings (:func:`shard_abstract`).
      steps: the sampler's step count (identifies the step loop).
      report: for the hoisted variant, returns kvhoist's :class:`~kvhoist.Report` (cache bytes).

    Raises:
      DoesNotFit: the compiler ran out of memory (one line with its figures).
      CompileFailed: any other lowering/compile error (e.g. a Pallas kernel the SPMD partitioner cannot
        split: "Mosaic kernels cannot be automatically partitioned. Please wrap the call in a shard_map.").
    """
    from kvhoist.bench import TPU_MATMUL_PATTERNS, hlo_op_executions

    import jax

    mesh = _mesh_of(args, kwargs)
    t0 = time.perf_counter()
    try:
        # The mesh is ambient while lowering: kernels that must run per chip (the splash attention
        # kernel, kvhoist.kernels) lower into a shard_map over it.
        with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
            compiled = fn.lower(*args, **kwargs).compile()
    except Exception as err:
        line = does_not_fit_line(err)
        if line is not None:
            raise DoesNotFit(line, variant) from None
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CompileFailed(f"{type(err).__name__}: {first}"[:400], variant) from err
    seconds = time.perf_counter() - t0
    counts = hlo_op_executions(compiled.as_text(), TPU_MATMUL_PATTERNS, step_trip_count=steps)
    rep = report() if report is not None else None
    return CompileResult(
        variant=variant, matmuls_inside=sum(counts["inside"].values()),
        matmuls_outside=sum(counts["outside"].values()), step_loops=counts["step_loops"], **_memory(compiled),
        cache_bytes=rep.cache_bytes if rep is not None else None,
        hoisted_values=len(rep.hoisted) if rep is not None else None, compile_seconds=seconds,
        flops=_flops(compiled))


def _mesh_of(args: tuple, kwargs: dict) -> Any:
    """The mesh of the first abstract argument placed with a NamedSharding over more than one device."""
    import jax

    for leaf in jax.tree_util.tree_leaves((args, kwargs)):
        sharding = getattr(leaf, "sharding", None)
        mesh = getattr(sharding, "mesh", None)
        if mesh is not None and getattr(mesh, "size", 1) > 1:
            return mesh
    return None


def measure_jaxpr(closed: Any, target: str) -> dict:
    """Compile a closed jaxpr for one chip of ``target`` from its input avals; the compiler's figures.

    Args:
      closed: a closed jaxpr (e.g. one candidate layout of a program).
      target: a TPU target name.

    Returns:
      ``{"flops": cost_analysis flops (a loop body counted once), "temp_bytes": ..., "argument_bytes": ...,
      "output_bytes": ...}``.

    Raises:
      LibtpuMissingError: no libtpu. DoesNotFit / CompileFailed: as :func:`compile_variant`.
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
        line = does_not_fit_line(err)
        if line is not None:
            raise DoesNotFit(line, "layout") from None
        raise CompileFailed(f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
                            [:400], "layout") from err
    mem = _memory(compiled)
    return {"flops": _flops(compiled), "temp_bytes": mem["temp_bytes"], "argument_bytes": mem["argument_bytes"],
            "output_bytes": mem["output_bytes"]}


def compile_three_ways(fun: Callable, args: tuple, kwargs: dict, *, steps: int, target: str,
                       topology: str | None = None, mesh_shape: tuple[int, int] | None = None,
                       hand: Callable | None = None,
                       log: Callable[[str], None] | None = None) -> dict:
    """Compile a sampler three ways for a TPU topology: plain ``jax.jit``, a hand-written cache, and
    ``kvhoist.hoist_invariants``.

    Args:
      fun: the sampler, called ``fun(*args, **kwargs)`` (static options already bound).
      args, kwargs: abstract arguments (``jax.ShapeDtypeStruct`` leaves, NNX modules of them).
      steps: its step count.
      target: a TPU target name (``v4``, ``v5e``, ``v5p``, ``v6e``, ``v7x`` or an alias).
      topology: a topology name; given, everything is placed on all its chips (parameters tensor-sharded,
        :func:`shard_abstract`); None: one chip of the target's default topology.
      mesh_shape: ``(data, tensor)`` for a topology (default ``(2, chips/2)``), see :func:`make_mesh`.
      hand: the hand-cached sampler (same arguments), or None to skip that variant.
      log: called with a line before each compile.

    Returns:
      ``{"target", "topology", "chips", "mesh", "variants": {name: CompileResult.to_dict()}}``.

    Raises:
      LibtpuMissingError, KvhoistError: no libtpu, bad target/topology.
      DoesNotFit: a variant ran out of memory (later variants are not compiled).
      CompileFailed: a variant failed to lower or compile for another reason.
    """
    import jax

    import kvhoist

    topo = get_topology(target, topology)
    if mesh_shape is not None and not topology:
        raise KvhoistError("a mesh shape needs a topology (one chip has no mesh to shape)")
    mesh = make_mesh(topo, chips=None if topology else 1, shape=mesh_shape)
    placed_args = shard_abstract(tuple(args), mesh, params=True)
    placed_kwargs = shard_abstract(dict(kwargs), mesh, params=True)

    def call(*a: Any, **k: Any) -> Any:
        return fun(*a, **k)

    variants: list[tuple[str, Any, Callable[[], Any] | None]] = [("plain", jax.jit(call), None)]
    if hand is not None:
        variants.append(("hand", jax.jit(hand), None))
    hoisted = kvhoist.hoist_invariants(call)
    variants.append(("hoisted", hoisted, lambda: hoisted.report(*placed_args, **placed_kwargs)))
    out: dict = {"target": get_target(target).name, "topology": topology or default_topology(target),
                 "chips": int(mesh.devices.size), "mesh": dict(zip(mesh.axis_names, mesh.devices.shape)),
                 "device_kind": getattr(mesh.devices.flat[0], "device_kind", ""), "variants": {}}
    for name, fn, rep in variants:
        if log is not None:
            log(f"compiling {name} for {out['topology']} ({out['chips']} chip(s))")
        out["variants"][name] = compile_variant(name, fn, placed_args, placed_kwargs, steps=steps,
                                                report=rep).to_dict()
    return out
