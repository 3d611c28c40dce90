"""The layout pass's entry points: :func:`repad_tokens` (every provable class to the target's tile) and
:func:`plan_layout` (what ``hoist_invariants(target=)`` runs: the layout the target wants, splash-attention
keys to the tile, XLA-attention tokens at their cheapest length, costed by the model or — ``measure="tpu"`` —
by the TPU compiler through :mod:`kvhoist.tpu_compile`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from kvhoist import compat
from kvhoist.analysis import cost
from kvhoist.analysis.dims import ATTENTION
from kvhoist.ir import aval_bytes
from kvhoist.report import Note, Report, Skipped, human_bytes, human_flops

from kvhoist.passes.layout.candidates import Refused
from kvhoist.passes.layout.rewrite import (Repadded, feeds_kernel, new_length, next_class, pad_primitive, repad,
                                           repad_message)

__all__ = ["repad_tokens", "plan_layout", "align_kernel_operands", "XLA_ALIGNMENTS"]


def repad_tokens(closed_jaxpr: Any, target: Any, *, alignment: int | None = None) -> tuple[Any, Report]:
    """Re-pad masked, alignment-padded token axes of ``closed_jaxpr`` to ``target``'s MXU tile.

    Args:
      closed_jaxpr: e.g. ``jax.make_jaxpr(f)(*args)``.
      target: a name (``"v6e"``, ``"trillium"``, ...) or :class:`kvhoist.targets.Target`; targets without
        a tile (``"cpu"``, ``"gpu"``) leave the program alone unless ``alignment`` is given.
      alignment: overrides the target's tile (e.g. ``256`` on a GPU).
    Returns:
      ``(new_closed_jaxpr, report)``. The report has a ``Note(kind='repad')`` per re-padded axis (old
      and new length, extra FLOPs and bytes) and a ``Skipped`` entry per candidate left alone, with
      the reason. The new program computes the same outputs from the same inputs. Keys re-padded for
      the splash kernel (:func:`kvhoist.kernels.attention`) get the kernel's KV block set to the tile.

    Example:
      >>> new, report = repad_tokens(jax.make_jaxpr(model_fn)(model, x, t, text, image), "v6e")
      >>> [n.message for n in report.notes if n.kind == "repad"]
    """
    from kvhoist.targets import get_target

    compat.require_jaxpr(closed_jaxpr, "repad_tokens")
    tgt = get_target(target)
    align = alignment if alignment is not None else tgt.mxu_tile
    report = Report()
    if align is None:
        report.notes.append(Note("repad", f"target {tgt.name} has no MXU tile: token padding left as traced "
                                          f"(pass alignment= to force one)"))
        return closed_jaxpr, report
    if align < 1:
        raise ValueError(f"alignment must be >= 1, got {align}")
    current = closed_jaxpr
    done: set = set()
    while (found := next_class(current, done)) is not None:
        dims, c, group, klass = found
        new_len = new_length(c.n, align)
        name, src = c.describe(), compat.source_line(c.eqn)
        if any(d.n != c.n or d.length != c.length for d in group):
            report.skipped.append(Skipped(name, src, "pads of different lengths share one axis"))
            continue
        if new_len == c.length:
            report.notes.append(Note("repad", f"{name}: {c.n} -> {c.length} tokens is already "
                                              f"{align}-aligned for {tgt.name}; unchanged"))
            continue
        try:
            r = repad(current, dims, c, group, klass, new_len, align if feeds_kernel(dims, klass) else None)
        except Refused as why:
            report.skipped.append(Skipped(name, src, f"token padding {c.n} -> {c.length} left unchanged: {why}"))
            report.notes.append(Note("repad", f"{name}: left unchanged ({why})"))
            continue
        report.notes.append(Note("repad", repad_message(c, r, align, tgt.name), r.extra_bytes))
        current = r.jaxpr
    return current, report


# --- hoist_invariants(target=): the layout a target wants -------------------------------------------------

#: Alignments tried for token axes that feed XLA's own attention (the compiler keeps them unpadded and
#: pays per token: FACTS/docs/tpu.md measured 28.7 / 42.8 / 57.0 GFLOP and 173 / 504 / 671 MB temp for
#: 257 / 384 / 512 image tokens on v6e, so the cheapest valid length wins).
XLA_ALIGNMENTS = (1, 8, 16, 32, 64, 128, 256)


def plan_layout(closed_jaxpr: Any, target: Any, *, measure: str = "model") -> tuple[Any, Report]:
    """The token layout ``target`` wants, as :func:`kvhoist.hoist_invariants` applies it with ``target=``.

    * Token axes that feed the splash-attention kernel (:func:`kvhoist.kernels.attention` with
      ``impl="splash"``) as keys are re-padded to the target's MXU tile and the kernel's KV block is
      set to the tile: the kernel needs the key count to be a multiple of its block (multiples of 128).
    * Token axes that feed XLA's own attention keep the length that costs least: every valid length
      (unpadded, 8-, 16-, ... tile-aligned, and the traced one) is rewritten and costed (FLOPs of the
      program and bytes of the token-axis values), and the cheapest is kept. The report's ``layout``
      note lists what was chosen and the figures of the alternatives.
    * Then every splash call whose keys are still not a multiple of the tile gets its K and V padded at
      the call (the primitive masks keys ``>= kv_valid``, so this is exact by its definition) and its KV
      block set to the tile.

    A rewrite the analysis cannot prove is refused with its reason (report ``skipped``), never applied.

    Args:
      closed_jaxpr: the program.
      target: a TPU generation name or :class:`kvhoist.targets.Target`; targets without an MXU tile
        leave the program unchanged.
      measure: how XLA-attention layouts are costed: ``"model"`` (kvhoist's cost model: program FLOPs and
        bytes of the token-axis values; the rule the TPU compiler's measured figures support) or ``"tpu"``
        (compile the cheapest candidate and the traced layout with the TPU compiler for one chip of the
        target, libtpu required, and keep the one with fewer temporaries, then fewer FLOPs; slow: two
        full compiles per padded axis).
    Returns:
      ``(new_closed_jaxpr, report)``.
    """
    from kvhoist.targets import get_target

    compat.require_jaxpr(closed_jaxpr, "plan_layout")
    if measure not in ("model", "tpu"):
        raise ValueError(f"measure must be 'model' or 'tpu', got {measure!r}")
    tgt = get_target(target)
    if measure == "tpu":
        from kvhoist.tpu_compile import require_libtpu

        require_libtpu()
    report = Report()
    tile = tgt.mxu_tile
    if tile is None:
        return closed_jaxpr, report
    current = closed_jaxpr
    done: set = set()
    while (found := next_class(current, done)) is not None:
        dims, c, group, klass = found
        name, src = c.describe(), compat.source_line(c.eqn)
        if any(d.n != c.n or d.length != c.length for d in group):
            report.skipped.append(Skipped(name, src, "pads of different lengths share one axis"))
            continue
        if feeds_kernel(dims, klass):
            new_len = new_length(c.n, tile)
            if new_len == c.length:
                report.notes.append(Note("layout", f"{name}: {c.n} -> {c.length} splash-attention keys are "
                                                   f"already {tile}-aligned for {tgt.name}"))
                continue
            try:
                r = repad(current, dims, c, group, klass, new_len, tile)
            except Refused as why:
                report.skipped.append(Skipped(name, src, f"splash keys {c.n} -> {c.length} not re-padded: {why}"))
                continue
            report.notes.append(Note("layout", "splash-attention keys: " + repad_message(c, r, tile, tgt.name),
                                     r.extra_bytes))
            current = r.jaxpr
            continue
        current = _cheapest_xla_layout(current, dims, c, group, klass, tile, tgt, report, measure)
    current, notes = align_kernel_operands(current, tile)
    report.notes.extend(notes)
    return current, report


def _cheapest_xla_layout(current, dims, c, group, klass, tile, tgt, report, measure="model") -> Any:
    """Cost every valid length of a token axis that feeds XLA's attention; keep the cheapest."""
    target_name = tgt.name
    align_of: dict = {}
    for a in XLA_ALIGNMENTS:
        if a <= tile:
            align_of.setdefault(new_length(c.n, a), a)   # the smallest alignment giving that length
    lengths = sorted(set(align_of) | {c.length})
    options: dict = {}
    refusals: dict = {}
    for new_len in lengths:
        if new_len == c.length:
            continue
        try:
            options[new_len] = repad(current, dims, c, group, klass, new_len, None)
        except Refused as why:
            refusals[new_len] = str(why)
    if not options:
        return current
    before = cost.jaxpr_flops_run(current)

    def flops(r):
        return None if r.flops_after is None else r.flops_after.per_run

    traced_bytes = next(iter(options.values())).bytes_after - next(iter(options.values())).extra_bytes
    figures = {c.length: (None if before is None else before.per_run, traced_bytes)}
    figures.update({n: (flops(r), r.bytes_after) for n, r in options.items()})
    best = min(figures, key=lambda n: (figures[n][0] if figures[n][0] is not None else float("inf"),
                                       figures[n][1], n != c.length))
    table = ", ".join(f"{n}: {human_flops(f)} FLOPs, {human_bytes(b)}" + (" (traced)" if n == c.length else "")
                      for n, (f, b) in sorted(figures.items()))
    why_not = "; ".join(f"{n} refused: {w}" for n, w in refusals.items())
    msg = (f"{c.describe()}: {c.n} image tokens feed XLA's attention, which the TPU compiler keeps unpadded and "
           f"pays per token; kept {best} tokens" + (" (as traced)" if best == c.length else "")
           + f" for {target_name}, the cheapest of [{table}] (program FLOPs, bytes of token-axis values)"
           + (f"; {why_not}" if why_not else ""))
    if measure == "tpu" and best != c.length:
        best, line = _compiled_choice(current, options[best], c.length, best, tgt)
        msg += "; " + line
    if best == c.length:
        report.notes.append(Note("layout", msg))
        return current
    r = options[best]
    report.notes.append(Note("layout", msg + "; " + repad_message(c, r, align_of[best], target_name),
                             r.extra_bytes))
    return r.jaxpr


def _compiled_choice(current, candidate: Repadded, traced_len: int, cand_len: int, tgt) -> tuple[int, str]:
    """Compile the traced layout and the candidate with the TPU compiler (one chip of ``tgt``); keep the one
    with fewer temporaries, then fewer FLOPs. Returns ``(chosen length, what the compiler said)``."""
    from kvhoist.errors import KvhoistError
    from kvhoist.tpu_compile import measure_jaxpr

    try:
        figs = {traced_len: measure_jaxpr(current, tgt.name), cand_len: measure_jaxpr(candidate.jaxpr, tgt.name)}
    except KvhoistError as err:  # does not fit one chip, or fails to compile: the cost model decides
        return cand_len, f"the TPU compiler could not compare them ({err}); kept the cost model's choice"
    key = {n: (f["temp_bytes"] if f["temp_bytes"] is not None else float("inf"),
               f["flops"] if f["flops"] is not None else float("inf")) for n, f in figs.items()}
    chosen = min(figs, key=lambda n: key[n])
    said = ", ".join(f"{n}: {human_flops(f['flops'])} FLOPs, temp {human_bytes(f['temp_bytes'])}"
                     for n, f in sorted(figs.items()))
    return chosen, f"TPU compiler ({tgt.name}, one chip): [{said}] -> {chosen}"


def align_kernel_operands(closed_jaxpr: Any, tile: int) -> tuple[Any, list]:
    """Pad the keys and values of every splash-attention call to a multiple of ``tile`` and set the
    kernel's KV block to ``tile`` (exact: the primitive masks every key at position ``>= kv_valid``).

    Returns ``(new_closed_jaxpr, notes)``.
    """
    from kvhoist.rules.common import map_subjaxprs

    if tile % 128:
        raise ValueError(f"the splash kernel's KV block must be a multiple of 128, got tile {tile}")
    notes: list = []

    def walk(j):
        constvars, consts, invars, outvars, eqns = compat.split_closed(j)
        new_eqns, changed = [], False
        for e in eqns:
            ne = map_subjaxprs(e, walk)
            if ne.primitive.name == ATTENTION and ne.params.get("impl") == "splash":
                pre, ne = _align_call(ne, tile, notes)
                new_eqns.extend(pre)
            changed |= ne is not e
            new_eqns.append(ne)
        if not changed:
            return j
        return compat.rebuild_like(j, constvars, consts, invars, outvars, new_eqns)

    new = walk(closed_jaxpr)
    if new is not closed_jaxpr:
        compat.check(new)
    return new, notes


def _align_call(e, tile: int, notes: list) -> tuple[list, Any]:
    q, k, v = e.invars
    s = int(k.aval.shape[1])
    params = dict(e.params)
    kv_valid = params.get("kv_valid")
    padded = new_length(s, tile)
    where = compat.source_line(e) or compat.name_stack(e) or "?"
    if padded == s:
        if params.get("block_kv") == tile:
            return [], e
        params["block_kv"] = tile
        notes.append(Note("layout", f"splash attention at {where}: {s} keys, KV block set to {tile}"))
        return [], e.replace(params=params)
    pre, new_ops = [], []
    for x in (k, v):
        cfg = [(0, 0, 0)] * len(x.aval.shape)
        cfg[1] = (0, padded - s, 0)
        out = compat.new_var(compat.resize_aval(x.aval, tuple(padded if i == 1 else d
                                                                for i, d in enumerate(x.aval.shape))))
        zero = compat.literal(np.zeros((), np.dtype(x.aval.dtype)).item(), compat.resize_aval(x.aval, ()))
        pre.append(compat.make_eqn([x, zero], [out], pad_primitive(), {"padding_config": tuple(cfg)}, like=e))
        new_ops.append(out)
    params["kv_valid"] = s if kv_valid is None else min(kv_valid, s)
    params["block_kv"] = tile
    notes.append(Note("layout", f"splash attention at {where}: keys padded {s} -> {padded} for the kernel's "
                                f"{tile}-block (masked: kv_valid={params['kv_valid']})",
                      sum(aval_bytes(o.aval) - aval_bytes(x.aval) for o, x in zip(new_ops, (k, v)))))
    return pre, e.replace(invars=[q] + new_ops, params=params)
