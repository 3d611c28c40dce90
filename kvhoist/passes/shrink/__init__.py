"""The smallest cache: what a loop receives from its hoisted work, shrunk to the least bytes.

After LICM has moved work in front of a loop, the values the loop reads (its new consts) are its cache.
Three rewrites make that cache no larger than a hand-written one, without changing any value:

* **Un-tiling.** Beam search tiles the encoder output across beams *before* the decoding loop
  (``reshape(broadcast(x))``, ``jnp.tile``, ``jnp.repeat``, ``concatenate([x, x])``, a size-1 broadcast).
  The hoisted K/V projections then run on the tiled copy and the cache holds ``k`` identical copies.
  Work that treats the tiled axis independently (a matmul where it is a free axis, elementwise math,
  reshapes and transposes that keep it, reductions over other axes) commutes with the tiling, so it is
  recomputed on the small value; the loop receives the small result and re-expands it with the same
  cheap shape ops inside its body (XLA fuses them into their consumers).
* **Reading the untiled cache.** Re-tiling the small value every iteration is a copy jit does not make,
  so the body's consumers read it instead (:func:`read_untiled`): a ``dot_general`` batching over the
  tiled axis batches over the small value with the copy axis free (:func:`batched_dot`), other work gets
  small twins. Where a consumer needs the whole tiled value, that operand keeps the tiled cache.
* **Common values.** Identical hoisted equations (same primitive, parameters and inputs) are computed
  once, and a value passed to the loop twice is passed once.
* **Views.** When the loop receives both a value and a transpose or reshape of it, only the value is
  passed; the body recomputes the view.

Every rewrite keeps the loop's body computing exactly what it computed: the body's original input
variable is defined at its top from the smaller operand.

Modules (each imports only those above it):
  * :mod:`~kvhoist.passes.shrink.tiling`: what a tiled value is (:class:`Tiling`, :func:`tiling_of`) and the
    equations expanding a small value again (:func:`expansion_eqns`);
  * :mod:`~kvhoist.passes.shrink.twins`: small twins of work on tiled values (:class:`Shrinker`);
  * :mod:`~kvhoist.passes.shrink.untiled`: a loop body's consumers reading the small value
    (:func:`read_untiled`, :func:`batched_dot`; attaches and nested scans);
  * :mod:`~kvhoist.passes.shrink.operands`: the entry point :func:`shrink_loop_operands` (un-tiling,
    common values, views, the tiled-or-untiled decision).

Example:
    >>> new_pre, new_loop, sizes = shrink_loop_operands(parent, pre, loop, first, count, "jaxpr", 0)
"""

from kvhoist.passes.shrink.operands import shrink_loop_operands
from kvhoist.passes.shrink.tiling import Tiling, expansion_eqns, tiling_of
from kvhoist.passes.shrink.untiled import batched_dot, read_untiled

__all__ = ["shrink_loop_operands", "read_untiled", "batched_dot", "Tiling", "tiling_of", "expansion_eqns"]
