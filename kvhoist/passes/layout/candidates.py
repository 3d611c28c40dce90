"""Candidates of the layout pass: token axes padded up to an alignment (``pad`` on one axis, or a
``concatenate`` with a uniform fill), grouped by the class of slots that must change size with them."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from kvhoist import compat
from kvhoist.analysis.dims import DimAnalysis, is_var

__all__ = ["Refused", "MIN_ALIGNMENT", "Candidate", "find_candidates"]

#: Smallest alignment a pad must reach to count as token padding (smaller pads are not layout).
MIN_ALIGNMENT = 8


class Refused(Exception):
    """A candidate cannot be re-padded safely; the message is the reason (goes to the report)."""


# --- candidates -------------------------------------------------------------------------------------

@dataclasses.dataclass
class Candidate:
    key: tuple            # scope
    index: int            # eqn index in the scope
    eqn: Any
    axis: int
    n: int                # true length
    length: int           # padded length L
    alignment: int        # the alignment L was padded to
    fill: Any             # the scalar fill atom (concatenate form: the broadcast operand or a literal)

    @property
    def out(self):
        return self.eqn.outvars[0]

    def describe(self) -> str:
        return compat.name_stack(self.eqn) or self.eqn.primitive.name


def _alignment_of(n: int, length: int) -> int | None:
    """The largest power-of-two ``a >= MIN_ALIGNMENT`` with ``length == ceil(n/a)·a``, or None."""
    best = None
    a = MIN_ALIGNMENT
    while a <= length:
        if length % a == 0 and length - n < a:
            best = a
        a *= 2
    return best


def _uniform_fill(dims: DimAnalysis, key, atom):
    """The scalar fill atom of a constant ``fill`` operand of a concatenate, or None."""
    if compat.is_literal(atom):
        return atom
    sc = dims.scopes[key]
    if atom in sc.constvars:
        arr = np.asarray(sc.consts[sc.constvars.index(atom)])
        if arr.size and np.all(arr == arr.flat[0]):
            return compat.literal(arr.flat[0].item(), compat.resize_aval(atom.aval, ()))
        return None
    i = dims.producer.get((key, atom))
    if i is None:
        return None
    e = sc.eqns[i]
    if e.primitive.name == "broadcast_in_dim" and not getattr(e.invars[0].aval, "shape", ()):
        return e.invars[0]
    return None


def find_candidates(dims: DimAnalysis) -> list[Candidate]:
    out = []
    for key, i, e in dims.iter_eqns():
        name = e.primitive.name
        if name == "pad":
            cfg = [tuple(c) for c in e.params["padding_config"]]
            padded = [k for k, c in enumerate(cfg) if c != (0, 0, 0)]
            if len(padded) != 1:
                continue
            k = padded[0]
            lo, hi, interior = cfg[k]
            n = e.invars[0].aval.shape[k]
            if lo != 0 or interior != 0 or hi <= 0:
                continue
            a = _alignment_of(n, n + hi)
            if a is not None:
                out.append(Candidate(key, i, e, k, n, n + hi, a, e.invars[1]))
        elif name == "concatenate" and len(e.invars) == 2:
            k = e.params["dimension"]
            x, z = e.invars
            if not is_var(x):
                continue
            n, h = x.aval.shape[k], z.aval.shape[k]
            a = _alignment_of(n, n + h)
            fill = _uniform_fill(dims, key, z)
            if a is not None and fill is not None:
                out.append(Candidate(key, i, e, k, n, n + h, a, fill))
    return out


