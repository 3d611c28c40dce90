"""The host-loop wrapper's fast path (internal to :mod:`kvhoist.host`): a cache hit run without jit's
per-argument dispatch.

:func:`fast_key` names what a hit must share with its entry besides the leaves' ids (call shape, static
values and types, the invariant treedef, jax's trace context). :func:`serve` runs the step for a hit:
once ``jax.jit`` has run the program, its compiled executable is called directly on the flat leaves
(:func:`decide_direct` builds that run once per program and checks, once per entry, that the entry's
cached values and invariant leaves fit its inputs); the varying leaves are checked per call as jit
would. Anything it does not check itself goes through ``jax.jit``.
"""

from __future__ import annotations

import threading
from typing import Any, Sequence

import jax

from kvhoist import compat
from kvhoist.host_args import ArgPlan, is_tracer, static_key, trace_context, tree_flatten
from kvhoist.host_cache import UNCHECKED, Cached
from kvhoist.host_program import UNBUILT, Retrace

MISSING = object()  # serve(): the varying arguments do not fit the entry's program
# Bound once: the hit path calls these directly.
spec_matches = compat.spec_matches
special_checks_on = compat.special_checks_on


def fast_key(plan: ArgPlan, args: tuple, kwargs: dict) -> tuple[list, Any, tuple]:
    """``(invariant leaves, their treedef, fast key)``: the key names the call shape, static values
    and types, the invariant arguments' structure and jax's trace context (the leaves' ids are
    compared with a candidate's ``ids`` after the lookup)."""
    inv_leaves, inv_tree = tree_flatten(plan.inv(args, kwargs))
    key = (plan.canon, static_key(plan.static(args, kwargs)) if plan.static_slots else (), inv_tree,
           trace_context())
    return inv_leaves, inv_tree, key


def serve(cached: Cached, inv_leaves: Sequence, var_args: tuple, lock: threading.RLock) -> Any:
    """The step's outputs for a cache hit on ``cached`` (its invariant leaves verified), or MISSING
    when the varying arguments do not fit its program (the slow path finds theirs).

    Direct path: once jit has run the program, its executable is called on the flat leaves without
    jit's per-argument dispatch (flattening and checking every invariant leaf again, ~0.4 us each).
    The invariant leaves and cached values were checked against the executable's inputs once, when
    ``cached.direct`` was decided (the very same objects on every hit: arrays never change aval,
    sharding or layout); the varying leaves are checked here, as jit would: same structure and, per
    leaf, a ``jax.Array`` of the same aval, committedness, sharding and layout. A Python scalar varying
    leaf (``guidance_scale=5.0``) is passed as the device array jit would make of it, converted once
    per scalar object (:func:`_scalars_as_arrays`). Anything else (a numpy varying leaf, a tracer,
    debug_nans) goes through ``jax.jit`` as before.
    """
    prog = cached.program
    run = cached.direct
    if run is not None and run is not UNCHECKED and not special_checks_on():
        var_leaves, var_tree = tree_flatten(var_args)
        if var_tree == prog.var_tree:
            if prog.var_scalars:
                var_leaves = _scalars_as_arrays(prog, var_leaves)
            if var_leaves is not None and all(map(spec_matches, var_leaves, prog.var_specs)):
                try:
                    out = run([*cached.values, *prog.take_step_inv(inv_leaves), *var_leaves])
                except Exception:  # e.g. a deleted invariant array: jit below says so in its words
                    pass
                else:
                    return prog.out_tree.unflatten(out)
    try:
        out = prog.step_call(cached.values, prog.take_step_inv(inv_leaves), *var_args)
    except Retrace:  # varying arguments of another structure / signature than this program's
        return MISSING
    if run is UNCHECKED:
        decide_direct(cached, inv_leaves, var_args, lock)
    return out


_PY_SCALARS = (bool, int, float, complex)


def _as_array(x: Any) -> Any:
    """The device array jit makes of a Python scalar argument (weak-typed, uncommitted, default device)."""
    return jax.device_put(x)


def _scalars_as_arrays(prog: Any, leaves: list) -> list | None:
    """``leaves`` with each Python-scalar varying leaf replaced by its device array, or None (then jit
    runs this call). A scalar is identified by the very object (the memo holds it, so its id is not
    recycled; Python scalars are immutable) and converted the second time the same object comes: a
    constant like ``guidance_scale=5.0`` costs one ``device_put``, a value that changes on every call
    never costs one here (converting it, ~18 us, is what jit's C++ path does cheaper)."""
    memo = prog.scalar_memo
    for k, pos in enumerate(prog.var_scalars):
        x = leaves[pos]
        obj, arr = memo[k]
        if x is not obj:
            memo[k] = (x, None)
            return None
        if arr is None:
            if type(x) not in _PY_SCALARS:
                return None
            try:
                arr = _as_array(x)
            except (OverflowError, TypeError, ValueError):  # jit raises its own error for it
                return None
            memo[k] = (x, arr)
        leaves[pos] = arr
    return leaves


def decide_direct(cached: Cached, inv_leaves: Sequence, var_args: tuple, lock: threading.RLock) -> None:
    """After jit ran ``cached``'s program on these arguments: build the program's direct run (once),
    and decide whether ``cached``'s values and invariant leaves fit it."""
    prog = cached.program
    var_leaves, var_tree = tree_flatten(var_args)
    if any(is_tracer(x) for x in var_leaves):
        return  # under a trace: decide on a concrete call
    head = [*cached.values, *prog.take_step_inv(inv_leaves)]
    if prog.direct is UNBUILT:
        with lock:
            if prog.direct is UNBUILT:
                # Python scalars as the arrays jit makes of them (same aval: the same compiled program).
                scalars = tuple(i for i, x in enumerate(var_leaves) if type(x) in _PY_SCALARS)
                try:
                    arrays = {i: _as_array(var_leaves[i]) for i in scalars}
                except (OverflowError, TypeError, ValueError):
                    built = None
                else:
                    leaves = [arrays.get(i, x) for i, x in enumerate(var_leaves)]
                    built = compat.direct_executable(
                        prog.step_call, (cached.values, prog.take_step_inv(inv_leaves),
                                         *var_tree.unflatten(leaves)))
                if built is not None:
                    run, specs = built
                    prog.head_specs, prog.var_specs = specs[:len(head)], specs[len(head):]
                    prog.var_scalars = scalars
                    prog.scalar_memo = [(var_leaves[i], arrays[i]) for i in scalars]
                prog.direct = None if built is None else run
    run = prog.direct
    cached.direct = (run if run is not None and len(head) == len(prog.head_specs)
                     and all(map(spec_matches, head, prog.head_specs)) else None)
