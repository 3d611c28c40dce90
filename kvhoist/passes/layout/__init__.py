"""The layout pass: re-pad masked token axes to a target's MXU tile.

maxdiffusion pads Wan's 257 CLIP image tokens to 384 (128-aligned) for TPU v4/v5 and to 512
(256-aligned) for v6e/v7x by editing model code per device. This pass does it on the traced program:
it finds a token axis padded up to an alignment, proves that the padded positions cannot change any
output, and rewrites the padding — and every shape downstream of it — for the target.

What it looks for (a *candidate*):
  * ``pad`` on one axis with ``(low=0, high=h, interior=0)`` from ``n`` to ``L = n + h`` where ``L`` is
    ``ceil(n/a)·a`` for a power-of-two alignment ``a >= 8``; or
  * ``concatenate([x, fill], axis)`` with a uniform constant ``fill`` (zeros) of the same kind.

What it proves before rewriting (otherwise the program is returned unchanged, reason in the report):
  1. Dimensions (:mod:`kvhoist.analysis.dims`): every slot that must change size with the padded axis
     — through elementwise ops, reshapes, ``dot_general``, the layer ``scan``, expert ``cond``
     branches, ``jit`` calls — is one the pass can resize: no program input or output, no axis that
     a loop iterates over, no opaque primitive, no second ``pad`` / ``concatenate`` creating it.
  2. Values: an abstract interpretation tracks, for each padded value, what its padded positions hold
     (one value repeated at every padded position, sometimes a known constant or one of
     ``{0, ±inf, nan}``; or the position index itself for an ``iota``). Positions ``< n`` only ever
     depend on positions ``< n``. Where positions *mix* — a reduction, a contraction over the axis, a
     slice — the padded positions must provably drop out: ``reduce_max`` sees ``-inf``, ``reduce_sum``
     and ``dot_general`` see ``0`` (or ``nan`` / ``±inf``, which give the same ``nan`` / ``inf`` for
     any padding length > 0), a slice reads only positions ``< n``. The pad's own fill value does
     *not* count as a mask: padded positions must be excluded by a ``select_n`` / ``where`` on a mask
     built from ``iota < n`` or a constant keep-mask, or by an additive bias ``<= -1e4`` (then
     ``exp`` underflowing to 0 is an assumption, stated in the report).
  3. No padded value reaches a program output.

Then the new program has the same real positions, more (or fewer) copies of the same padded
positions, and — by 2 — the same outputs (up to floating-point summation order).

Modules (each imports only those above it):
  * :mod:`~kvhoist.passes.layout.candidates`: what counts as token padding (:class:`Candidate`);
  * :mod:`~kvhoist.passes.layout.prove`: the proof that padded positions drop out (:class:`ValueAnalysis`,
    :func:`check_class`);
  * :mod:`~kvhoist.passes.layout.rewrite`: resizing a proven class (:class:`Rewriter`, :func:`repad`);
  * :mod:`~kvhoist.passes.layout.plan`: the entry points :func:`repad_tokens` and :func:`plan_layout`
    (``measure="tpu"``: the TPU compiler's figures, :mod:`kvhoist.tpu_compile`).

Example:
    >>> closed = jax.make_jaxpr(lambda m, *a: m(*a))(model, x, t, text, image)
    >>> new, report = repad_tokens(closed, "v6e")        # 257 -> 384 becomes 257 -> 512
    >>> print(report.table())
"""

from kvhoist.passes.layout.candidates import MIN_ALIGNMENT, Refused
from kvhoist.passes.layout.plan import XLA_ALIGNMENTS, align_kernel_operands, plan_layout, repad_tokens
from kvhoist.passes.layout.prove import LARGE_NEGATIVE_BIAS

__all__ = ["repad_tokens", "plan_layout", "align_kernel_operands", "Refused", "MIN_ALIGNMENT", "LARGE_NEGATIVE_BIAS",
           "XLA_ALIGNMENTS"]
