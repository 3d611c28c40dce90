"""The pass pipeline: a short list of named passes run in order.

Order: the layout pass (:func:`kvhoist.passes.layout.plan_layout`: the token layout a target wants)
runs *before* LICM, so that the values
LICM hoists — the image K/V cache — already have the target's padded length and the cache is built
once at the right size. Both orders are correct (each pass preserves results on its own); this one
avoids re-padding a hoisted cache every iteration.
"""

from __future__ import annotations

from typing import Any

from kvhoist.report import Report


def optimize(closed: Any, *, target: Any = None, max_cache_bytes: int | None = None,
             hoist: bool = True, fission: str = "scan", layout_measure: str = "model") -> tuple[Any, Report]:
    """Run the kvhoist pipeline on a closed jaxpr; returns ``(new_closed, report)``.

    ``layout_measure``: how the layout pass costs token layouts that feed XLA's attention (``"model"`` or
    ``"tpu"``: compiled with libtpu; see :func:`kvhoist.passes.layout.plan_layout`).

    Raises:
      TypeError: ``closed`` is not a jaxpr.
    """
    from kvhoist import compat

    compat.require_jaxpr(closed, "optimize")
    report = Report()
    if target is not None:
        from kvhoist.passes.layout import plan_layout

        closed, r = plan_layout(closed, target, measure=layout_measure)
        report = report.merge(r)
    if hoist:
        from kvhoist.passes.licm import licm

        closed, r = licm(closed, max_cache_bytes=max_cache_bytes, fission=fission)
        report = report.merge(r)
    return closed, report
