"""``kvhoist_attention``: one attention primitive, lowered per target to XLA math or Pallas splash attention.

:func:`attention` binds :data:`attention_p`, a JAX primitive that computes, per batch element and head,
``softmax(q k^T / sqrt(d)) v`` with float32 logits and softmax. Keys at positions ``>= kv_valid`` are masked
out for every query (the padded image tokens of Wan's CLIP branch, say).

Why a primitive and not a function: the equation survives tracing as ONE ``kvhoist_attention`` eqn whose
params (``impl``, ``kv_valid``, ``block_q``, ``block_kv``) a jaxpr rewrite can read and change before the
jaxpr is lowered (kvhoist's layout pass re-pads the key axis and picks the kernel's ``block_kv``). The
implementation is chosen only at lowering time ("late per target"):

* ``impl="xla"``: einsum + float32 softmax, the padded keys removed by ``where(iota < kv_valid, ...)``.
* ``impl="splash"``: ``jax.experimental.pallas.ops.tpu.splash_attention``. On TPU the Mosaic kernel; on
  every other platform the same kernel in Pallas interpret mode (slow, for tests and CPU parity checks).
  The kernel needs the query length to be a multiple of ``block_q`` and the key length a multiple of
  ``block_kv`` (both multiples of 128): q is zero-padded to a multiple of ``block_q`` and k / v to a
  multiple of ``block_kv``; padded and invalid keys are masked by segment ids (queries segment 0, keys
  ``where(arange(S_padded) < kv_valid, 0, 1)``) and the padded query rows are sliced off. The kernel does
  not scale the logits: q is multiplied by ``1/sqrt(d)`` (in float32, then cast back to q's dtype) first.

Differentiation: the JVP is that of the ``xla`` math (the primal still runs the chosen implementation), so
``jax.grad`` works for both implementations; vmap folds the mapped axis into the batch axis.
"""

from __future__ import annotations

import functools
import math
import operator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

__all__ = ["attention", "attention_p", "head_axes", "IMPLS", "LANES"]

#: The implementations ``impl`` selects.
IMPLS = ("xla", "splash")
#: Splash-attention block sizes must be multiples of this (the TPU lane width).
LANES = 128
#: Largest default block (a multiple of LANES); defaults never add padding beyond the next multiple of 128.
_MAX_DEFAULT_BLOCK = 512
_F32 = jnp.float32

attention_p = Primitive("kvhoist_attention")


# --------------------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------------------
def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, kv_valid: int | None = None, impl: str = "xla",
              block_q: int | None = None, block_kv: int | None = None) -> jax.Array:
    """Multi-head attention ``softmax(q k^T / sqrt(d)) v`` as one ``kvhoist_attention`` equation.

    Logits and softmax are float32 (the matmuls accumulate in float32); the result is cast to q's dtype.

    Args:
      q: queries [B, N, H, d].
      k: keys [B, S, H, d] (same B, H and d as q).
      v: values [B, S, H, dv] (same B, S, H as k). q, k and v share one floating dtype.
      kv_valid: keys at positions >= kv_valid are masked out for every query; an int with
        1 <= kv_valid <= S, or None (all S keys are valid).
      impl: ``"xla"`` (einsum + softmax) or ``"splash"`` (Pallas TPU splash attention; interpret mode
        off TPU).
      block_q, block_kv: splash block sizes along the queries / keys, positive multiples of 128; None picks
        the largest multiple of 128 up to 512 that divides the length rounded up to 128. The ``xla``
        implementation ignores them (they are still validated and kept in the equation).

    Returns:
      [B, N, H, dv] in q's dtype.

    Raises:
      TypeError: q, k or v not arrays of one floating dtype; kv_valid / block sizes not Python ints;
        impl not a string.
      ValueError: ranks or shapes that do not match, an empty axis, an unknown impl, kv_valid outside
        [1, S], a block size that is not a positive multiple of 128.

    Example:
      >>> q = jnp.ones((1, 8, 2, 64)); kv = jnp.ones((1, 384, 2, 64))
      >>> attention(q, kv, kv, kv_valid=257, impl="splash").shape
      (1, 8, 2, 64)
    """
    q, k, v = (_check_array(x, name) for x, name in ((q, "q"), (k, "k"), (v, "v")))
    _check_shapes(q.shape, k.shape, v.shape)
    if len({q.dtype, k.dtype, v.dtype}) != 1:
        raise TypeError(f"q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}; cast them "
                        "(e.g. k.astype(q.dtype)) before calling attention")
    params = _check_params(impl=impl, kv_valid=kv_valid, block_q=block_q, block_kv=block_kv, keys=k.shape[1])
    return attention_p.bind(q, k, v, **params)


def _check_array(x: Any, name: str) -> Any:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an array [B, seq, H, head_dim], got {type(x).__name__}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must have a floating dtype (float32, bfloat16, ...), got {x.dtype}")
    return x


def _check_shapes(qs: tuple, ks: tuple, vs: tuple) -> None:
    for name, s in (("q", qs), ("k", ks), ("v", vs)):
        if len(s) != 4:
            raise ValueError(f"{name} must have rank 4 ([B, seq, H, head_dim]), got shape {tuple(s)}")
        if 0 in s:
            raise ValueError(f"{name} has an empty axis: shape {tuple(s)}; every axis needs at least one entry")
    if ks[0] != qs[0] or ks[2] != qs[2] or ks[3] != qs[3]:
        raise ValueError(f"k {tuple(ks)} must be [B={qs[0]}, S, H={qs[2]}, d={qs[3]}] to match q {tuple(qs)}")
    if vs[:3] != ks[:3]:
        raise ValueError(f"v {tuple(vs)} must be [B={ks[0]}, S={ks[1]}, H={ks[2]}, dv] to match k {tuple(ks)}")


def _static_int(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a Python int or None, got a bool ({value})")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be a static Python int or None, got {type(value).__name__}; a traced "
                        "value cannot choose a mask or a kernel block") from None


def _check_params(*, impl: Any, kv_valid: Any, block_q: Any, block_kv: Any, keys: int) -> dict:
    """The validated equation params: exactly impl, kv_valid, block_q, block_kv."""
    if not isinstance(impl, str):
        raise TypeError(f"impl must be a string, one of {', '.join(map(repr, IMPLS))}; got {type(impl).__name__}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(map(repr, IMPLS))}, got {impl!r}")
    if kv_valid is not None:
        kv_valid = _static_int(kv_valid, "kv_valid")
        if not 1 <= kv_valid <= keys:
            raise ValueError(f"kv_valid must satisfy 1 <= kv_valid <= S={keys} (the number of keys), got {kv_valid}; "
                             "pass None when every key is valid")
    blocks = {}
    for name, b in (("block_q", block_q), ("block_kv", block_kv)):
        if b is not None:
            b = _static_int(b, name)
            if b <= 0 or b % LANES:
                raise ValueError(f"{name} must be a positive multiple of {LANES} (splash-attention tiles), got {b}; "
                                 f"pass None for the default")
        blocks[name] = b
    return dict(impl=impl, kv_valid=kv_valid, **blocks)


# --------------------------------------------------------------------------------------------------------
# Block sizes and cost (pure Python: used by kvhoist.analysis.cost without tracing anything)
# --------------------------------------------------------------------------------------------------------
def default_block(length: int) -> int:
    """The default splash block for a sequence of ``length``: the largest multiple of 128 up to 512 that
    divides ``length`` rounded up to 128 (so the default never pads past the next multiple of 128).

    Args:
      length: the query or key length (>= 1).

    Returns:
      A block size, a multiple of 128.

    Example:
      >>> default_block(257), default_block(512), default_block(640)
      (384, 512, 128)
    """
    padded = -(-length // LANES) * LANES
    return next(b for b in range(_MAX_DEFAULT_BLOCK, 0, -LANES) if padded % b == 0)


def padded_lengths(n: int, s: int, block_q: int | None, block_kv: int | None) -> tuple[int, int, int, int]:
    """What the splash implementation runs: ``(block_q, block_kv, N_padded, S_padded)`` for N queries, S keys.

    Args:
      n, s: query and key lengths.
      block_q, block_kv: the equation's params (None: :func:`default_block`).

    Returns:
      The resolved blocks and the lengths padded up to a multiple of them.

    Example:
      >>> padded_lengths(8, 257, None, None)
      (128, 384, 128, 384)
    """
    bq = default_block(n) if block_q is None else block_q
    bkv = default_block(s) if block_kv is None else block_kv
    return bq, bkv, -(-n // bq) * bq, -(-s // bkv) * bkv


def attention_flops(params: dict, q_shape: tuple, v_shape: tuple) -> int:
    """Estimated FLOPs of one ``kvhoist_attention`` equation.

    ``2 B H N S d`` (q k^T) + ``2 B H N S dv`` (p v) + ``5 B H N S`` (scale, max, exp, sum, divide). With
    ``impl="splash"`` N and S are the lengths the kernel runs on (padded to its blocks).

    Args:
      params: the equation's params (impl, kv_valid, block_q, block_kv).
      q_shape: [B, N, H, d]; v_shape: [B, S, H, dv].

    Returns:
      The FLOP estimate.

    Example:
      >>> attention_flops(dict(impl="xla", kv_valid=None, block_q=None, block_kv=None), (1, 2, 1, 4), (1, 3, 1, 4))
      126
    """
    b, n, h, d = (int(x) for x in q_shape)
    s, dv = int(v_shape[1]), int(v_shape[3])
    if params.get("impl") == "splash":
        _bq, _bkv, n, s = padded_lengths(n, s, params.get("block_q"), params.get("block_kv"))
    return b * h * n * s * (2 * d + 2 * dv + 5)


# --------------------------------------------------------------------------------------------------------
# Implementations
# --------------------------------------------------------------------------------------------------------
def _xla_attention(q, k, v, *, kv_valid):
    """einsum + float32 softmax; the same equations as wan_ref.model.attention with an iota key mask."""
    d = q.shape[-1]
    logits = jnp.einsum("bnhd,bshd->bhns", q, k, preferred_element_type=_F32) * (1.0 / math.sqrt(d))
    if kv_valid is not None and kv_valid < k.shape[1]:
        logits = jnp.where(jnp.arange(k.shape[1]) < kv_valid, logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhns,bshd->bnhd", probs.astype(v.dtype), v, preferred_element_type=_F32)
    return out.astype(q.dtype)


def _splash_attention(q, k, v, *, kv_valid, block_q, block_kv, interpret):
    """Pallas splash attention over [H, S, d] per batch element (vmapped over B), padded to its blocks."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    _b, n, h, d = q.shape
    s = k.shape[1]
    bq, bkv, n_pad, s_pad = padded_lengths(n, s, block_q, block_kv)
    valid = s if kv_valid is None else kv_valid
    # The kernel computes q k^T without a softmax scale: fold 1/sqrt(d) into q.
    q = (q.astype(_F32) * (1.0 / math.sqrt(d))).astype(q.dtype)

    def pad(x, length):
        return x if x.shape[1] == length else jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))

    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (pad(q, n_pad), pad(k, s_pad), pad(v, s_pad)))  # [B, H, S, d]
    mask = sm.MultiHeadMask([sm.FullMask((n_pad, s_pad)) for _ in range(h)])
    kernel = sk.make_splash_mha(mask, block_sizes=sk.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv),
                                head_shards=1, q_seq_shards=1, interpret=interpret)
    segments = sk.SegmentIds(q=jnp.zeros((n_pad,), jnp.int32),
                             kv=jnp.where(jnp.arange(s_pad) < valid, 0, 1).astype(jnp.int32))
    out = jax.vmap(kernel, in_axes=(0, 0, 0, None))(q, k, v, segments)  # [B, H, N_pad, dv]
    return jnp.swapaxes(out, 1, 2)[:, :n].astype(q.dtype)


def _run(q, k, v, *, impl, kv_valid, block_q, block_kv, interpret):
    if impl == "xla":
        return _xla_attention(q, k, v, kv_valid=kv_valid)
    return _splash_attention(q, k, v, kv_valid=kv_valid, block_q=block_q, block_kv=block_kv, interpret=interpret)


def head_axes(mesh: Any, heads: int) -> tuple[str, ...]:
    """The mesh axes the splash kernel splits the heads over: the non-manual axes of size > 1, in mesh
    order, as long as their product divides ``heads`` (each chip then runs the kernel on its own heads).

    Args:
      mesh: a ``jax.sharding.Mesh`` / ``AbstractMesh`` (e.g. ``jax.sharding.get_abstract_mesh()``).
      heads: the number of attention heads.

    Returns:
      Axis names, possibly empty (no mesh, or nothing divides the heads).

    Example:
      >>> from jax.sharding import AbstractMesh
      >>> head_axes(AbstractMesh((2, 4), ("data", "tensor")), 40)
      ('data', 'tensor')
    """
    if mesh is None or getattr(mesh, "empty", True):
        return ()
    manual = set(getattr(mesh, "manual_axes", ()) or ())
    out: list[str] = []
    prod = 1
    for name, size in zip(mesh.axis_names, mesh.axis_sizes):
        if name in manual or size <= 1:
            continue
        if heads % (prod * size) == 0:
            out.append(name)
            prod *= size
    return tuple(out)


def _run_tpu(q, k, v, *, impl, kv_valid, block_q, block_kv):
    """The TPU lowering. A Mosaic kernel cannot be partitioned by XLA's SPMD partitioner, so under a mesh
    (``jax.set_mesh``) the splash kernel runs in a ``shard_map`` over the heads (:func:`head_axes`);
    the partitioner reshards q / k / v to that layout where they arrive otherwise."""
    run = functools.partial(_run, impl=impl, kv_valid=kv_valid, block_q=block_q, block_kv=block_kv,
                            interpret=False)
    if impl != "splash":
        return run(q, k, v)
    mesh = jax.sharding.get_abstract_mesh()
    axes = head_axes(mesh, q.shape[2])
    if not axes:
        return run(q, k, v)
    spec = jax.sharding.PartitionSpec(None, None, axes if len(axes) > 1 else axes[0], None)
    return jax.shard_map(run, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)


# --------------------------------------------------------------------------------------------------------
# Primitive rules
# --------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _jitted(impl: str, kv_valid: int | None, block_q: int | None, block_kv: int | None):
    return jax.jit(functools.partial(attention_p.bind, impl=impl, kv_valid=kv_valid, block_q=block_q,
                                     block_kv=block_kv))


def _eager(q, k, v, **params):
    # Outside a trace: compile the one equation for the default backend (its lowering picks the kernel).
    return _jitted(**params)(q, k, v)


def _abstract_eval(q, k, v, **params):
    del params
    return jax.core.ShapedArray((q.shape[0], q.shape[1], q.shape[2], v.shape[3]), q.dtype)


def _batch(args, dims, **params):
    """vmap: fold the mapped axis into B (an unmapped operand is broadcast), bind, and split it out again."""
    size = next(x.shape[dim] for x, dim in zip(args, dims) if dim is not None)
    folded = []
    for x, dim in zip(args, dims):
        x = jnp.broadcast_to(x, (size, *x.shape)) if dim is None else jnp.moveaxis(x, dim, 0)
        folded.append(x.reshape(size * x.shape[1], *x.shape[2:]))
    out = attention_p.bind(*folded, **params)
    return out.reshape(size, -1, *out.shape[1:]), 0


def _jvp(primals, tangents, **params):
    """Primal: the chosen implementation; tangent: that of the xla math (the same function)."""
    out = attention_p.bind(*primals, **params)
    tangents = [ad.instantiate_zeros(t) for t in tangents]
    _, t_out = jax.jvp(functools.partial(_xla_attention, kv_valid=params["kv_valid"]), tuple(primals),
                       tuple(tangents))
    return out, t_out


attention_p.def_impl(_eager)
attention_p.def_abstract_eval(_abstract_eval)
batching.primitive_batchers[attention_p] = _batch
ad.primitive_jvps[attention_p] = _jvp
# Late per target: the Mosaic kernel on TPU, the same kernel in Pallas interpret mode everywhere else.
mlir.register_lowering(attention_p, mlir.lower_fun(functools.partial(_run, interpret=True), multiple_results=False))
mlir.register_lowering(attention_p, mlir.lower_fun(_run_tpu, multiple_results=False), platform="tpu")
