"""The layout pass (being split into modules; see prove.py)."""

from kvhoist.passes.layout.prove import (LARGE_NEGATIVE_BIAS, MIN_ALIGNMENT, XLA_ALIGNMENTS, Refused,
                                         align_kernel_operands, plan_layout, repad_tokens)

__all__ = ["repad_tokens", "plan_layout", "align_kernel_operands", "Refused", "MIN_ALIGNMENT", "LARGE_NEGATIVE_BIAS",
           "XLA_ALIGNMENTS"]
