"""Helpers shared by the rules."""

from __future__ import annotations

from typing import Any

from kvhoist import compat
from kvhoist.ir import Block


def map_subjaxprs(eqn, fn) -> Any:
    """``eqn`` with every jaxpr in its params (also inside tuples) replaced by ``fn(jaxpr)``."""
    new_params = {}
    changed = False
    for k, v in eqn.params.items():
        if _is_jaxpr(v):
            nv = fn(v)
            changed |= nv is not v
            new_params[k] = nv
        elif isinstance(v, tuple) and v and all(_is_jaxpr(x) for x in v):
            nv = tuple(fn(x) for x in v)
            changed |= any(a is not b for a, b in zip(nv, v))
            new_params[k] = nv
        else:
            new_params[k] = v
    return eqn.replace(params=new_params) if changed else eqn


def _is_jaxpr(v) -> bool:
    return isinstance(v, (compat.Jaxpr, compat.ClosedJaxpr))


def invariant_invars(block: Block, mask) -> list:
    return [v for v, m in zip(block.invars, mask) if m]
