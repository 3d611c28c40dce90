"""``kvhoist compile``'s driver: a sampler compiled for a TPU topology three ways on a CPU host.

The compiler side — libtpu, topologies, meshes of a topology's chips, a failed compile as one line —
is :mod:`kvhoist.tpu_compile`; reading the optimized HLO is :mod:`kvhoist.hlo`. This module adds what
only the command (and its tests and docs) needs:

* :func:`wan_partition_spec` / :func:`shard_abstract`: Megatron-style sharding of a Wan model's
  parameters (as ``tests/compiler/test_multidevice.py`` tests on 8 CPU devices) on abstract arguments;
* :func:`compile_variant`: lower + compile one variant and return a :class:`CompileResult` with the
  matmul executions inside / outside the step loop (:func:`kvhoist.hlo.hlo_op_executions`, weighted
  by loop trip counts, every ``cond`` branch counted), memory and compile time;
* :func:`compile_three_ways`: plain ``jax.jit``, a hand-written cache and ``hoist_invariants``.

Run times cannot be known this way: nothing executes.

Example:
    >>> from kvhoist import tpu_compile
    >>> from kvhoist.tools import tpu
    >>> mesh = tpu_compile.make_mesh(tpu_compile.get_topology("v6e"), chips=1)
    >>> res = tpu.compile_variant("plain", jax.jit(f), args, {}, steps=10)
    >>> res.matmuls_inside, res.temp_bytes
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import time
from typing import Any, Callable

from kvhoist.errors import KvhoistError
from kvhoist.hlo import TPU_MATMUL_PATTERNS, cost_flops, hlo_op_executions, memory_figures
from kvhoist.targets import get_target
from kvhoist.tpu_compile import default_topology, get_topology, make_mesh, raise_compile_error

__all__ = ["CompileResult", "wan_partition_spec", "shard_abstract", "compile_variant", "compile_three_ways",
           "native_stderr"]


@contextlib.contextmanager
def native_stderr(verbose: bool) -> Any:
    """Hold back what native code (libtpu, XLA) writes to file descriptor 2 unless ``verbose``.

    libtpu logs through absl before its flags are read (``E0000 ... unexpected worker hostname`` on a host
    that is no TPU VM, ``Failed to find host bounds``): environment variables cannot silence it, so fd 2 is
    pointed at a temporary file while the block runs. Yields a writable text stream on the real stderr for
    the command's own lines; Ctrl-C's line goes there too (:data:`kvhoist.tools.interrupt.stderr_fd`). On an
    exception the held-back text is kept in a file named by one stderr line, so nothing is lost.
    """
    import os
    import sys
    import tempfile

    from kvhoist.tools import interrupt

    if verbose:
        yield sys.stderr
        return
    sys.stderr.flush()
    saved = os.dup(2)
    held = tempfile.NamedTemporaryFile(prefix="kvhoist-libtpu-", suffix=".log", delete=False)
    real = os.fdopen(os.dup(saved), "w", buffering=1)
    os.dup2(held.fileno(), 2)
    interrupt.stderr_fd = saved
    failed = False
    try:
        yield real
    except BaseException:
        failed = True
        raise
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        interrupt.stderr_fd = 2
        os.close(saved)
        real.close()
        held.close()
        if failed and os.path.getsize(held.name):
            print(f"(libtpu's own messages: {held.name})", file=sys.stderr)
        else:
            os.unlink(held.name)

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
    (``scan_layers``) parameters get a leading None. The rules of ``tests/compiler/test_multidevice.py``.
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
    import jax

    mesh = _mesh_of(args, kwargs)
    t0 = time.perf_counter()
    try:
        # The mesh is ambient while lowering: kernels that must run per chip (the splash attention
        # kernel, kvhoist.kernels) lower into a shard_map over it.
        with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
            compiled = fn.lower(*args, **kwargs).compile()
    except Exception as err:
        raise_compile_error(err, variant)
    seconds = time.perf_counter() - t0
    counts = hlo_op_executions(compiled.as_text(), TPU_MATMUL_PATTERNS, step_trip_count=steps)
    rep = report() if report is not None else None
    return CompileResult(
        variant=variant, matmuls_inside=sum(counts["inside"].values()),
        matmuls_outside=sum(counts["outside"].values()), step_loops=counts["step_loops"],
        **memory_figures(compiled), cache_bytes=rep.cache_bytes if rep is not None else None,
        hoisted_values=len(rep.hoisted) if rep is not None else None, compile_seconds=seconds,
        flops=cost_flops(compiled))


def _mesh_of(args: tuple, kwargs: dict) -> Any:
    """The mesh of the first abstract argument placed with a NamedSharding over more than one device."""
    import jax

    for leaf in jax.tree_util.tree_leaves((args, kwargs)):
        sharding = getattr(leaf, "sharding", None)
        mesh = getattr(sharding, "mesh", None)
        if mesh is not None and getattr(mesh, "size", 1) > 1:
            return mesh
    return None


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
      log: called with a line when each variant's compile starts and ends (its time, the time elapsed).

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
    started = time.perf_counter()
    for i, (name, fn, rep) in enumerate(variants, 1):
        if log is not None:
            log(f"[{i}/{len(variants)}] compiling {name} for {out['topology']} ({out['chips']} chip(s)) ...")
        res = compile_variant(name, fn, placed_args, placed_kwargs, steps=steps, report=rep)
        out["variants"][name] = res.to_dict()
        if log is not None:
            log(f"[{i}/{len(variants)}] compiled {name} in {res.compile_seconds:.1f} s ({res.matmuls_inside:,} "
                f"matmul executions in the step loop; {time.perf_counter() - started:.1f} s elapsed)")
    return out
