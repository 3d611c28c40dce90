"""The smallest cache (moved from ``passes/shrink.py``; split by concern in the next commit)."""

from kvhoist.passes.shrink.tiling import shrink_loop_operands

__all__ = ["shrink_loop_operands"]
