"""The numerical contract of a kvhoist rewrite, as data and as a check.

A rewrite moves equations; it never changes what an equation computes. Each moved value is the same primitive
with the same parameters applied to values equal to the ones the loop would have used. What can still differ from
``jax.jit`` of the undecorated function is how XLA *compiles* the new program:

* a value computed on a smaller shape (the untiled beam cache, a stacked fission cache, ``fission="vmap"``'s one
  matmul over all layers, a re-padded token axis) is a different ``dot``/reduction call, and XLA-CPU picks its
  kernel, blocking and summation order by shape *and by CPU* (the same program is bitwise equal on one x86-64 host
  and differs by 5e-7 relative on an AMD EPYC);
* even with every op and shape kept, the moved op sits in a different fusion (``tanh(ctx @ w).sum(0)`` fused in the
  loop body or computed alone in front of it), and fused and unfused elementwise code may round differently.

So the contract is:

1. **Unchanged program, identical bits.** When the pass moves nothing (the report is empty, or it refuses), the
   program jit compiles is the one it would have compiled: outputs are bitwise equal.
2. **Rewritten program, a bound per dtype.** Otherwise every floating-point output leaf ``got`` satisfies
   ``max |got - want| <= RTOL[dtype] * max |want|`` (``want`` = jit's output, the maximum over its finite
   elements; a normwise bound, because re-associated sums err relative to the sum's scale, not to each small
   element), non-finite values sit at the same positions with the same value (NaN where NaN, +inf where +inf), and
   integer, boolean and PRNG-key outputs are equal. Shapes, dtypes and the pytree are equal.

``RTOL`` is about 170 float32 ulps of the output's scale: room for a loop that carries a re-associated value through
tens of iterations (the largest normwise difference measured in this project's tests is 8.8e-7, a fissioned layer
scan in a while loop on jax 0.12). A chaotic loop can amplify any last-bit difference without bound; the contract
is stated for programs whose outputs are not that sensitive, which is what a test should compare. Integer outputs
*derived* from floats (an ``argmax`` over scores) are equal unless two candidates are within the bound of each other.

Example:
    >>> import numpy as np
    >>> from kvhoist import contract
    >>> contract.assert_close(np.float32([1.0, 2.0]), np.float32([1.0, 2.0 + 1e-6]))
    >>> contract.violations(np.float32([1.0, 2.0]), np.float32([1.0, 2.1]))
    ['[]: max |got - want| = 0.1 > 4.2e-05 (float32 bound 2e-05 x max |want| 2.1)']
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["RTOL", "bound", "violations", "assert_close", "assert_identical"]

#: Normwise relative bound per floating-point dtype name: ``max |got - want| <= RTOL * max |want|``.
RTOL: dict[str, float] = {
    "float64": 1e-12,
    "float32": 2e-5,
    "float16": 4e-3,      # 4 ulps of the scale (eps 2**-10)
    "bfloat16": 3.2e-2,   # 4 ulps of the scale (eps 2**-7)
    "complex64": 2e-5,
    "complex128": 1e-12,
}


def _is_float(a: np.ndarray) -> bool:
    return a.dtype.name in RTOL or np.issubdtype(a.dtype, np.inexact)


def _as_numpy(x: Any) -> np.ndarray:
    # PRNG key arrays compare by their key data; everything else as a host array.
    dtype = getattr(x, "dtype", None)
    if dtype is not None and "key<" in str(dtype):
        import jax

        x = jax.random.key_data(x)
    return np.asarray(x)


def bound(want: Any) -> float:
    """The largest difference the contract allows for one floating-point output ``want`` (jit's)."""
    want = _as_numpy(want)
    rtol = RTOL.get(want.dtype.name, RTOL["float32"])
    finite = np.abs(want[np.isfinite(want)]).astype(np.float64)
    scale = float(finite.max()) if finite.size else 0.0
    return rtol * scale


def _leaf_violation(path: str, got: Any, want: Any) -> str | None:
    got, want = _as_numpy(got), _as_numpy(want)
    if got.shape != want.shape or got.dtype != want.dtype:
        return f"{path}: {got.dtype}{list(got.shape)} != {want.dtype}{list(want.shape)}"
    if not _is_float(want):
        if not np.array_equal(got, want):
            return f"{path}: {int(np.sum(got != want))} of {want.size} elements differ (exact dtype {want.dtype})"
        return None
    g64, w64 = got.astype(np.complex128 if np.iscomplexobj(want) else np.float64), want.astype(
        np.complex128 if np.iscomplexobj(want) else np.float64)
    finite = np.isfinite(w64)
    same_nonfinite = np.array_equal(np.isfinite(g64), finite) and np.array_equal(
        np.isnan(g64), np.isnan(w64)) and np.array_equal(g64[np.isinf(w64)], w64[np.isinf(w64)])
    if not same_nonfinite:
        return f"{path}: non-finite values differ (NaN/inf positions or signs)"
    if not finite.any():
        return None
    diff = float(np.abs(g64[finite] - w64[finite]).max())
    limit = bound(want)
    if diff > limit:
        scale = float(np.abs(w64[finite]).max())
        rtol = RTOL.get(want.dtype.name, RTOL["float32"])
        return (f"{path}: max |got - want| = {diff:.2g} > {limit:.2g} "
                f"({want.dtype.name} bound {rtol:g} x max |want| {scale:.3g})")
    return None


def violations(got: Any, want: Any) -> list[str]:
    """Every way ``got`` (the rewritten program's outputs) breaks the contract against ``want`` (jit's).

    Args:
      got, want: pytrees of arrays (jax or numpy) or scalars.
    Returns:
      One line per violating leaf (its key path first); empty when ``got`` is within the contract.
    """
    import jax

    got_leaves, got_tree = jax.tree_util.tree_flatten_with_path(got)
    want_leaves, want_tree = jax.tree_util.tree_flatten_with_path(want)
    if got_tree != want_tree:
        return [f"pytrees differ: {got_tree} != {want_tree}"]
    out = []
    for (path, g), (_, w) in zip(got_leaves, want_leaves):
        found = _leaf_violation(jax.tree_util.keystr(path) or "[]", g, w)
        if found:
            out.append(found)
    return out


def assert_close(got: Any, want: Any, *, err_msg: str = "") -> None:
    """Raise ``AssertionError`` unless ``got`` is within the contract of ``want`` (clause 2 above).

    Args:
      got: the rewritten program's outputs (``hoist_invariants(f)(...)``).
      want: ``jax.jit(f)(...)``'s outputs.
      err_msg: prefixed to the failure message.
    """
    found = violations(got, want)
    if found:
        raise AssertionError("\n".join(([err_msg] if err_msg else []) + found))


def assert_identical(got: Any, want: Any, *, err_msg: str = "") -> None:
    """Raise ``AssertionError`` unless ``got`` and ``want`` are bitwise equal (clause 1: the program is unchanged)."""
    import jax

    got_leaves, got_tree = jax.tree_util.tree_flatten(got)
    want_leaves, want_tree = jax.tree_util.tree_flatten(want)
    if got_tree != want_tree:
        raise AssertionError(f"{err_msg} pytrees differ: {got_tree} != {want_tree}")
    for i, (g, w) in enumerate(zip(got_leaves, want_leaves)):
        np.testing.assert_array_equal(_as_numpy(g), _as_numpy(w), err_msg=f"{err_msg} leaf {i}")
