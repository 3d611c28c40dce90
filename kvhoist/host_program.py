"""The host-loop wrapper's programs (internal to :mod:`kvhoist.host`): one traced input signature split
into a PROLOGUE and a STEP.

:func:`build_program` traces the step with the invariant leaves as its first inputs, runs the pipeline's
passes before hoisting (the layout pass, with a target), optimizes the loops inside the step (innermost
first, as for any traced program) and then runs LICM's extraction on the top-level block with the
invariant leaves and the constants as the invariant inputs. The hoisted equations become the prologue
(invariant leaves -> cached values), the rest the step (cached values + the leaves it still reads ->
outputs); both are ``jax.jit``-compiled. :class:`Program` holds them with the index maps a call needs.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Callable, Sequence

import jax

from kvhoist import compat
from kvhoist.analysis import cost
from kvhoist.host_args import VARYING, ArgBinder, Call, signature_of, taker, tree_flatten
from kvhoist.ir import Block, used_vars
from kvhoist.report import Note, Report
from kvhoist.tracing import (DUMP_ENV, LOG_INPUTS, count_equations, dump_signature, log_report, logger,
                             signature_text, trace_to_jaxpr)

UNBUILT = object()    # Program.direct not built yet


class Retrace(Exception):
    """Raised while ``jax.jit`` traces a program's step for varying arguments of another signature:
    the call falls back to the slow path, which picks (or builds) the program for them."""


@dataclasses.dataclass
class Program:
    """One traced input signature: the split jaxprs and their compiled forms."""

    before: Any
    prologue: Any
    step: Any
    report: Report
    out_tree: Any
    prologue_inv: list       # indices into the invariant leaves read by the prologue
    step_inv: list           # ... read by the step directly
    step_var: list           # indices into the varying leaves read by the step
    prologue_fn: Callable | None  # None when nothing was hoisted
    step_call: Callable      # jax.jit: (cached values, step_inv leaves, *varying arguments) -> outputs
    step_flat: Callable      # jax.jit: (*cached values, *step_inv leaves, *step_var leaves) -> flat outputs
    take_step_inv: Callable  # invariant leaves -> the step_inv ones (all of them: the list itself)
    var_tree: Any = None     # the varying arguments' structure this program was traced for
    # The compiled step called without jit's per-argument dispatch (host_fast.serve): UNBUILT until the
    # first cache hit builds it, None when it cannot run that way; with the arg_specs of its inputs
    # (cached values + step_inv leaves, checked once per entry; varying leaves, checked per call).
    direct: Any = None
    head_specs: tuple = ()
    var_specs: tuple = ()
    # Varying leaves that were Python scalars (``guidance_scale=5.0``) when the direct run was built:
    # their positions, and per position the last scalar object seen with its device array (or None).
    var_scalars: tuple = ()
    scalar_memo: list = dataclasses.field(default_factory=list)


def _step_call(name: str, step: Any, out_tree: Any, var_tree: Any, var_signature: tuple,
               step_var: Sequence[int], donate: tuple = (), jit_options: dict | None = None) -> Callable:
    """The step as ``jax.jit(run)(values, inv, *varying arguments as passed)``.

    jit's C++ fast path then flattens and checks the varying arguments itself (no ``jax.typeof`` per
    leaf in Python) and unflattens the outputs. When it retraces for varying arguments of another
    structure or signature (they no longer match this program), :class:`Retrace` sends the call to the
    slow path instead.
    """
    step_fun = compat.jaxpr_as_fun(step)
    take_var = taker(step_var, -1)

    def run(values, inv, *var_args):
        leaves, tree = tree_flatten(var_args)
        if tree != var_tree or signature_of(leaves) != var_signature:
            raise Retrace()
        out = step_fun(*values, *inv, *take_var(leaves))
        return jax.tree_util.tree_unflatten(out_tree, list(out))

    run.__name__ = run.__qualname__ = f"{name}_step"
    # ``donate``: positions in (values, inv, *varying arguments) of the donated varying arguments.
    return jax.jit(run, donate_argnums=tuple(donate) or None, **(jit_options or {}))


def build_program(fun: Callable, binder: ArgBinder, call: Call, *, target: Any = None,
                  max_cache_bytes: int | None = None, jit_options: dict | None = None) -> Program:
    """Trace ``fun`` for ``call``'s signature and split it into a prologue and a step.

    Args:
      fun: the wrapped step function.
      binder: its arguments (static / invariant / varying, donated ones).
      call: one call of that signature (its leaves fix shapes, dtypes and structure).
      target, max_cache_bytes, jit_options: as given to ``hoist_invariants``.
    Returns:
      The :class:`Program`; both of its jaxprs pass ``compat.check``.
    """
    from kvhoist import rules  # noqa: F401  (registers the LICM rules)
    from kvhoist.analysis.motion import surely_run_flops
    from kvhoist.passes.licm import Licm, LoopInfo
    from kvhoist.passes.pipeline import optimize

    name, jit_options = binder.name, dict(jit_options or {})
    layout, n_inv = call.layout, len(call.inv_leaves)
    out_store = []

    def flat_fun(*flat):
        args, kwargs = binder.rebuild(layout, flat[:n_inv], flat[n_inv:])
        out = fun(*args, **kwargs)
        leaves, tree = jax.tree_util.tree_flatten(out)
        out_store.append(tree)
        return leaves

    def as_jit():  # what jax.jit(fun) does with these arguments: raises jit's own error for a mistake
        args, kwargs = binder.rebuild(layout, call.inv_leaves, call.var_leaves)
        jax.jit(fun, static_argnums=binder.static_argnums or None,
                static_argnames=binder.static_argnames or None).trace(*args, **kwargs)

    t0 = time.perf_counter()
    before = trace_to_jaxpr(flat_fun, [*call.inv_leaves, *call.var_leaves], name, as_jit=as_jit)
    t1 = time.perf_counter()
    leaves = [*call.inv_leaves, *call.var_leaves]
    signature = signature_text(leaves, LOG_INPUTS) if logger.isEnabledFor(logging.INFO) else ""
    if logger.isEnabledFor(logging.INFO):
        logger.info("traced host-loop step %s (%s) in %.3f s: %d equations", name, signature,
                    t1 - t0, count_equations(before))
    out_tree = out_store[-1]
    # The pipeline's passes before hoisting (the layout pass, with a target); the split below is
    # this module's hoisting.
    closed, report = optimize(before, target=target, hoist=False)
    constvars, consts, invars, outvars, eqns = compat.split_closed(closed)
    inv_vars, var_vars = invars[:n_inv], invars[n_inv:]
    engine = Licm(max_cache_bytes=max_cache_bytes)
    # Loops inside the step first (innermost-first LICM, as for traced loops), then the split
    # across calls: work invariant to an inner loop but not across calls still leaves that loop.
    block = engine.optimize_block(Block(list(constvars) + list(invars), list(outvars), list(eqns)))
    n_inner = len(engine.report.hoisted)
    with engine.in_loop(LoopInfo("host loop", None, f"calls of {name}", surely_run_flops(block.eqns))):
        ext = engine.extract(block, set(constvars) | set(inv_vars), charge=True)
    outvars = block.outvars
    const_of = dict(zip(constvars, consts))
    position = {v: i for i, v in enumerate(inv_vars)}
    var_position = {v: i for i, v in enumerate(var_vars)}

    # PROLOGUE: invariant leaves (and constants) -> the values the step still needs.
    read = set(ext.used_invars)  # the block inputs (constants, invariant leaves) the prologue reads
    pro_consts = [v for v in constvars if v in read]
    pro_inv = [v for v in inv_vars if v in read]
    prologue = compat.make_closed(pro_consts, [const_of[v] for v in pro_consts], pro_inv,
                                  list(ext.crossing), list(ext.hoisted))
    # STEP: cached values + the leaves it still reads -> outputs.
    needed = used_vars(ext.residual, outvars)
    st_consts = [v for v in constvars if v in needed]
    st_inv = [v for v in inv_vars if v in needed]
    st_var = [v for v in var_vars if v in needed]
    step = compat.make_closed(st_consts, [const_of[v] for v in st_consts],
                              list(ext.crossing) + st_inv + st_var, list(outvars), list(ext.residual))
    for j in (prologue, step):
        compat.check(j)

    # One "run" of a host-hoisted step is one call: a value moved into the prologue saves its work on
    # every call after the one that filled the cache (values hoisted out of loops *inside* the step
    # keep their own figures).
    engine.report.hoisted = engine.report.hoisted[:n_inner] + [
        dataclasses.replace(h, flops_saved=h.flops_per_iteration, loop=f"calls of {name}")
        for h in engine.report.hoisted[n_inner:]]
    report = report.merge(engine.report)
    report.total_flops_before = cost.jaxpr_flops_run(before)
    report.total_flops_after = cost.jaxpr_flops_run(step)
    if ext.empty:
        report.notes.append(Note("host", f"nothing in {name} depends only on the invariant "
                                         "arguments; every call runs the whole step"))
    step_inv = [position[v] for v in st_inv]
    step_var = [var_position[v] for v in st_var]
    var_slots = [slot for slot, cls in layout.slots if cls == VARYING]
    donate = tuple(2 + k for k, slot in enumerate(var_slots) if binder.donated(slot))
    log_report(f"host-loop step {name}", report, time.perf_counter() - t1)
    if os.environ.get(DUMP_ENV):
        dump_signature(name, signature_text(leaves), before,
                       f"# prologue: once per set of invariant arguments\n{prologue}\n# step: every call\n{step}",
                       report, kind="host")
    return Program(
        before=before, prologue=prologue, step=step, report=report, out_tree=out_tree,
        prologue_inv=[position[v] for v in pro_inv], step_inv=step_inv, step_var=step_var,
        prologue_fn=None if ext.empty else jax.jit(compat.jaxpr_as_fun(prologue), **jit_options),
        step_call=_step_call(name, step, out_tree, layout.var_tree, signature_of(call.var_leaves),
                             step_var, donate, jit_options),
        step_flat=jax.jit(compat.jaxpr_as_fun(step), **jit_options), take_step_inv=taker(step_inv, n_inv),
        var_tree=layout.var_tree, direct=None if donate else UNBUILT)


def run_step(prog: Program, values: Sequence, call: Call) -> Any:
    """The step's outputs for ``call`` with the prologue's ``values`` (through ``jax.jit``)."""
    try:
        return prog.step_call(tuple(values), prog.take_step_inv(call.inv_leaves), *call.var_args)
    except Retrace:
        # The program was built for these very arguments, so this means jit's view of them differs
        # from jax.typeof's; run the flat form, which takes the leaves as traced.
        out = prog.step_flat(*values, *prog.take_step_inv(call.inv_leaves),
                             *(call.var_leaves[i] for i in prog.step_var))
        return jax.tree_util.tree_unflatten(prog.out_tree, list(out))
