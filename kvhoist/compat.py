"""The one module that touches ``jax._src`` and version-specific jaxpr details.

kvhoist rewrites jaxprs, whose internals change between JAX releases. Everything that differs
between the versions we support (jax 0.10 on Python 3.11, jax 0.12 on Python 3.12) is isolated here:

* jax 0.12 merged ``ClosedJaxpr`` into ``Jaxpr`` (a jaxpr carries its consts; ``.jaxpr`` returns
  itself), so building and splitting closed jaxprs goes through :func:`split_closed` /
  :func:`make_closed`.
* jax 0.12 replaced scan's ``num_consts`` / ``num_carry`` params by ``ft_in`` / ``ft_out`` flat trees;
  :func:`scan_arity` and :func:`scan_params` read and write both forms.
* ``jit`` (formerly ``pjit``), ``remat2`` and ``shard_map`` primitives are looked up by name.
* Resizing avals, building literals and rebuilding jaxprs go through :func:`resize_aval`, :func:`literal`,
  :func:`rebuild_like`.

Nothing outside this module imports ``jax._src``.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.extend.core as jex
from jax._src import config as _config
from jax._src import core as _core
from jax._src import source_info_util as _siu

Var = jex.Var
Literal = jex.Literal
DropVar = jex.DropVar
JaxprEqn = jex.JaxprEqn
Jaxpr = jex.Jaxpr
ClosedJaxpr = jex.ClosedJaxpr
jaxpr_as_fun = jex.jaxpr_as_fun
new_jaxpr_eqn = jex.new_jaxpr_eqn

JAX_VERSION: tuple[int, ...] = tuple(int(p) for p in jax.__version__.split(".")[:3] if p.isdigit())

_P = jex.primitives
scan_p = _P.scan_p
while_p = _P.while_p
cond_p = _P.cond_p
jit_p = getattr(_P, "jit_p", None) or getattr(_P, "pjit_p")
remat_p = _P.remat_p
closed_call_p = _P.closed_call_p
custom_jvp_call_p = _P.custom_jvp_call_p
custom_vjp_call_p = _P.custom_vjp_call_p
try:  # shard_map moved in and out of jax.experimental over releases.
    from jax._src.shard_map import shard_map_p  # type: ignore
except Exception:  # pragma: no cover - depends on the installed jax
    shard_map_p = None

# `ft_in` / `ft_out` flat trees (jax >= 0.11).
try:
    from jax._src import flattree as _ft  # type: ignore
except Exception:  # pragma: no cover - jax 0.10 has no flattree
    _ft = None


def is_closed(j: Any) -> bool:
    """Whether ``j`` is a closed jaxpr (has a ``consts`` attribute of its own)."""
    if JAX_VERSION >= (0, 11):
        return isinstance(j, Jaxpr)
    return isinstance(j, ClosedJaxpr)


def split_closed(j: Any) -> tuple[list[Var], list[Any], list[Var], list[Any], list[JaxprEqn]]:
    """``(constvars, consts, invars, outvars, eqns)`` of a closed or open jaxpr of any supported jax."""
    if JAX_VERSION >= (0, 11):
        consts = list(getattr(j, "consts", []))
        return list(j.constvars), consts, list(j.invars), list(j.outvars), list(j.eqns)
    if isinstance(j, ClosedJaxpr):
        inner = j.jaxpr
        return list(inner.constvars), list(j.consts), list(inner.invars), list(inner.outvars), list(inner.eqns)
    return list(j.constvars), [], list(j.invars), list(j.outvars), list(j.eqns)


def _debug_info(n_in: int, n_out: int, name: str = "kvhoist"):
    return _core.DebugInfo(
        "kvhoist", name, tuple(f"arg{i}" for i in range(n_in)), tuple(f"out{i}" for i in range(n_out))
    )


def arg_names(j: Any) -> tuple[str | None, ...] | None:
    """The names jax gave the top-level inputs of a traced jaxpr (``model.blocks.attn2.to_k.kernel.value``,
    ``a[1]``: the argument's name and its pytree path), one per invar, or None when the jaxpr carries none
    (hand-built or rewritten jaxprs name them ``arg0``, ``arg1``, ...; those count as none)."""
    inner = j.jaxpr if isinstance(j, ClosedJaxpr) else j
    info = getattr(inner, "debug_info", None)
    names = getattr(info, "arg_names", None)
    if names is None or len(names) != len(inner.invars):
        return None
    if getattr(info, "traced_for", None) == "kvhoist":
        return None
    return tuple(None if n is None else str(n) for n in names)


def join_effects(eqns: Sequence[JaxprEqn]):
    return _core.join_effects(*(e.effects for e in eqns)) if eqns else _core.no_effects


def _jaxpr_effects(invars, eqns):
    # Effects that refer to input positions (e.g. refs) are not produced by kvhoist rewrites; the
    # union of the equations' effects is what jax itself computes for plain programs.
    return join_effects(eqns)


def _is_high(atoms: Sequence[Any], eqns: Sequence[JaxprEqn]) -> bool:
    """jax's ``is_high`` flag of a jaxpr with these variables and equations: a "hijax" primitive (jax 0.12's
    ``jnp.searchsorted`` is one, so ``jnp.interp``) or aval, which jit lowers to plain primitives before MLIR only
    where a jaxpr (or a sub-jaxpr, through its equation's ``is_high``) says so. jax sets it while tracing; a jaxpr
    rebuilt here must carry it too, or lowering fails (``MLIR translation rule for primitive 'call_hi_primitive'
    not found``)."""
    return (any(a.aval.is_high for a in atoms)
            or any(e.primitive.is_high(*(v.aval for v in e.invars), **e.params) for e in eqns))


def make_open(invars: Sequence[Var], outvars: Sequence[Any], eqns: Sequence[JaxprEqn]) -> Any:
    """An open jaxpr (no constvars) — the form of ``remat2``'s ``jaxpr`` param."""
    return Jaxpr([], list(invars), list(outvars), list(eqns), _jaxpr_effects(invars, eqns),
                 _debug_info(len(invars), len(outvars)), is_high=_is_high([*invars, *outvars], eqns))


def make_closed(constvars: Sequence[Var], consts: Sequence[Any], invars: Sequence[Var],
                outvars: Sequence[Any], eqns: Sequence[JaxprEqn]) -> Any:
    """A closed jaxpr binding ``constvars`` to ``consts``."""
    assert len(constvars) == len(consts)
    eff = _jaxpr_effects(invars, eqns)
    high = _is_high([*constvars, *invars, *outvars], eqns)
    if JAX_VERSION >= (0, 11):
        return Jaxpr(list(constvars), list(invars), list(outvars), list(eqns), eff,
                     _debug_info(len(invars), len(outvars)), is_high=high, consts=list(consts))
    inner = Jaxpr(list(constvars), list(invars), list(outvars), list(eqns), eff,
                  _debug_info(len(invars), len(outvars)), is_high=high)
    return ClosedJaxpr(inner, list(consts))


def check(j: Any) -> None:
    """Type-check a (closed or open) jaxpr with JAX's own checker; raises ``JaxprTypeError``."""
    if JAX_VERSION >= (0, 11):
        jex.check_jaxpr(j)
    else:
        jex.check_jaxpr(j.jaxpr if isinstance(j, ClosedJaxpr) else j)


# --- scan params ------------------------------------------------------------------------------

def scan_arity(params: dict) -> tuple[int, int]:
    """``(num_consts, num_carry)`` of a scan equation's params, for either param layout."""
    if "num_consts" in params:
        return params["num_consts"], params["num_carry"]
    consts, carry, _xs = params["ft_in"].unpack()
    return len(consts), len(carry)


def scan_params_supported(params: dict) -> bool:
    """False for scans whose flat trees carry structure we do not rebuild (e.g. mutable refs)."""
    if "num_consts" in params:
        return True
    ft_in, ft_out = params["ft_in"], params["ft_out"]
    return all(v is None for v in ft_in.vals) and all(v is None for v in ft_out.vals)


def scan_params(old: dict, *, jaxpr: Any, num_consts: int, num_carry: int, num_xs: int,
                num_ys: int, length: int | None = None) -> dict:
    """New scan params with the given body and arities, other params copied from ``old``."""
    new = dict(old)
    new["jaxpr"] = jaxpr
    if length is not None:
        new["length"] = length
    if "num_consts" in old:
        new["num_consts"] = num_consts
        new["num_carry"] = num_carry
        if "linear" in old:
            new["linear"] = (False,) * (num_consts + num_carry + num_xs)
        return new
    new["ft_in"] = _ft.pack((_ft.nones(num_consts), _ft.nones(num_carry), _ft.nones(num_xs)))
    new["ft_out"] = _ft.pack((_ft.nones(num_carry), _ft.nones(num_ys)))
    return new


def while_params(old: dict, *, body_jaxpr: Any, body_nconsts: int) -> dict:
    new = dict(old)
    new["body_jaxpr"] = body_jaxpr
    new["body_nconsts"] = body_nconsts
    return new




# --- equations, vars, source info ------------------------------------------------------------

def new_var(aval: Any) -> Var:
    return Var(aval)


def is_literal(atom: Any) -> bool:
    return isinstance(atom, Literal)


def is_dropvar(v: Any) -> bool:
    return isinstance(v, DropVar)


def drop_var(aval: Any) -> Any:
    return DropVar(aval)


def make_eqn(invars, outvars, primitive, params, *, like: JaxprEqn | None = None, effects=None) -> JaxprEqn:
    """A new equation; source info and context are copied from ``like`` so names survive."""
    if effects is None:
        effects = _core.no_effects if like is None else like.effects
    if like is not None:
        return like.replace(invars=list(invars), outvars=list(outvars), primitive=primitive,
                            params=dict(params), effects=effects)
    return new_jaxpr_eqn(list(invars), list(outvars), primitive, dict(params), effects)




def name_stack(eqn: JaxprEqn) -> str:
    """The ``jax.named_scope`` path of an equation, e.g. ``'blocks/attn2/to_k'``."""
    try:
        return str(eqn.source_info.name_stack)
    except Exception:
        return ""


def source_line(eqn: JaxprEqn) -> str:
    """``file.py:123`` of the user frame that created the equation, or ``''``."""
    try:
        frame = _siu.user_frame(eqn.source_info.traceback)
    except Exception:
        frame = None
    if frame is None:
        return ""
    import os

    return f"{os.path.basename(frame.file_name)}:{frame.start_line}"


def source_stack(eqn: JaxprEqn, depth: int = 4) -> tuple[str, ...]:
    """Up to ``depth`` user frames behind an equation, innermost first: ``'model.py:187 (project_kv)'``."""
    import os

    try:
        frames = list(_siu.user_frames(eqn.source_info.traceback))[:depth]
    except Exception:
        return ()
    return tuple(f"{os.path.basename(f.file_name)}:{f.start_line} ({f.function_name})" for f in frames)


def subjaxprs_of(eqn: JaxprEqn) -> list[Any]:
    """Every jaxpr in an equation's params (closed or open)."""
    return list(jex.jaxprs_in_params(eqn.params))




def stacked_aval(aval: Any, length: int) -> Any:
    """The aval of ``length`` copies of ``aval`` stacked on a new leading axis (a scan's ys)."""
    return _core.unmapped_leading_aval(length, aval)


def unspecified_sharding() -> Any:
    from jax._src.sharding_impls import UNSPECIFIED  # type: ignore

    return UNSPECIFIED


def extend_call_params(name: str, params: dict, n_new: int) -> dict:
    """Params of a call-like equation (``jit``, ``closed_call``, ``remat2``) given ``n_new`` extra inputs."""
    new = dict(params)
    if name in ("jit", "pjit"):
        new["in_shardings"] = tuple(params["in_shardings"]) + (unspecified_sharding(),) * n_new
        if "in_layouts" in params:
            new["in_layouts"] = tuple(params["in_layouts"]) + (None,) * n_new
        if "donated_invars" in params:
            new["donated_invars"] = tuple(params["donated_invars"]) + (False,) * n_new
    return new


# --- shapes and values (the layout pass) ---------------------------------------------------------

def resize_aval(aval: Any, shape: Sequence[int]) -> Any:
    """``aval`` with a new shape, keeping dtype, weak type and (jax 0.12) sharding / vma."""
    return aval.update(shape=tuple(int(d) for d in shape))


def literal(value: Any, aval: Any) -> Literal:
    """A scalar literal atom (e.g. the fill value of a rebuilt ``pad``)."""
    return Literal(value, aval)


def rebuild_like(original: Any, constvars: Sequence[Var], consts: Sequence[Any], invars: Sequence[Var],
                 outvars: Sequence[Any], eqns: Sequence[JaxprEqn]) -> Any:
    """A jaxpr of the same kind (closed / open) as ``original`` with new parts."""
    if is_closed(original):
        return make_closed(constvars, consts, invars, outvars, eqns)
    if not constvars:
        return make_open(invars, outvars, eqns)
    return Jaxpr(list(constvars), list(invars), list(outvars), list(eqns), _jaxpr_effects(invars, eqns),
                 _debug_info(len(invars), len(outvars)), is_high=_is_high([*constvars, *invars, *outvars], eqns))


# --- jit integration ------------------------------------------------------------------------------

# () -> every configuration value ``jax.jit`` keys its trace cache on (x64, default device, ...); bound
# directly (no wrapper call: the host-loop hit path calls it on every call).
trace_context = _config.trace_context

_disable_jit_state = _config.disable_jit


def jit_disabled() -> bool:
    """Whether ``jax.disable_jit()`` is in effect (``jax.jit`` then calls the function eagerly)."""
    return bool(_disable_jit_state.value)


def _abstract_mesh_part(aval: Any) -> tuple[Any, Any]:
    """``(sharding, manual axis type)`` of ``aval`` that are part of its type, else None each.

    A sharding is part of the type on a non-empty mesh (Explicit axes print as ``float32[16@x,4]``; Auto
    and Manual axes carry a mesh too); the manual axis type (varying manual axes, ``float32[2,4]{V:x}``
    inside ``shard_map``) when it names any axis. jax's own ``ShapeDtypeStruct.like`` keeps the same two.
    """
    sharding = getattr(aval, "sharding", None)
    if sharding is not None and getattr(getattr(sharding, "mesh", None), "empty", True):
        sharding = None
    mat = getattr(aval, "mat", None)  # jax 0.10 and 0.12: ManualAxisType (varying / unreduced / reduced)
    if mat is not None and getattr(mat, "empty", False):
        mat = None
    return sharding, mat


def abstract_arg(aval: Any) -> jax.ShapeDtypeStruct:
    """A ``jax.ShapeDtypeStruct`` that ``jax.make_jaxpr`` re-traces to exactly ``aval``: shape, dtype, weak
    type, the sharding under Explicit / Manual mesh axes and the varying manual axes inside ``shard_map``.

    ``hoist_invariants`` re-traces the user's function on the avals of ``jax.jit``'s tracers; a spec with
    shape and dtype only would drop ``16@x`` (a ``fori_loop`` over an Explicit-sharded carry then fails
    to type-check) or ``{V:x}`` (a ``psum`` result times a varying value mismatches).
    """
    sharding, mat = _abstract_mesh_part(aval)
    kwargs: dict = {"weak_type": bool(getattr(aval, "weak_type", False))}
    if sharding is not None:
        kwargs["sharding"] = sharding
    if mat is not None:
        kwargs["manual_axis_type"] = mat
    return jax.ShapeDtypeStruct(aval.shape, aval.dtype, **kwargs)


def aval_key(aval: Any) -> tuple:
    """A hashable key of everything in ``aval`` a re-trace depends on (see :func:`abstract_arg`)."""
    sharding, mat = _abstract_mesh_part(aval)
    return (tuple(aval.shape), str(aval.dtype), bool(getattr(aval, "weak_type", False)), sharding, mat)


def register_cache_clear(obj: Any, name: str) -> None:
    """Let ``jax.clear_caches()`` call ``obj.cache_clear()`` (jax's registry of caches; it holds ``obj``
    weakly, so the caller keeps it alive). ``obj`` also needs ``cache_info()`` and ``cache_keys()``."""
    from jax._src import util as _util

    _util.register_cache(obj, name)


def is_jaxpr(j: Any) -> bool:
    """A (closed or open) jaxpr of the installed JAX."""
    return isinstance(j, (Jaxpr, ClosedJaxpr))


def require_jaxpr(j: Any, who: str) -> None:
    """TypeError naming what to pass when ``j`` is not a jaxpr."""
    if not is_jaxpr(j):
        raise TypeError(f"kvhoist.{who} expects a closed jaxpr, e.g. jax.make_jaxpr(f)(*args); got "
                        f"{type(j).__name__}" + ("" if j is None else f": {str(j)[:80]!r}")
                        + (". To optimise a function, use kvhoist.hoist_invariants(f)" if callable(j) else ""))


# --- calling a compiled step without jit's per-argument dispatch ----------------------------------

from jax._src import array as _array  # noqa: E402
from jax._src import dispatch as _dispatch  # noqa: E402
from jax._src.interpreters import pxla as _pxla  # noqa: E402

ArrayImpl = _array.ArrayImpl


special_checks_on = _dispatch.needs_check_special  # () -> bool: jax_debug_nans / jax_debug_infs is on


def arg_spec(x: Any) -> tuple | None:
    """What a compiled executable was built for, of one concrete argument: ``(aval, committed, sharding,
    PjRt layout)``; None when ``x`` is not a plain single-controller ``jax.Array`` (a numpy array, a
    scalar, a tracer, a deleted array: jit converts or rejects those, so they never take the direct path)."""
    if type(x) is not ArrayImpl or x.is_deleted():
        return None
    try:
        return (x.aval, x._committed, x.sharding, x._pjrt_layout)
    except Exception:  # pragma: no cover - e.g. a backend without layouts
        return None


def spec_matches(x: Any, spec: tuple) -> bool:
    """``arg_spec(x) == spec`` for an array ``x``, cheaply (~0.5 us): same aval (shape, dtype, weak type,
    ...), same committedness, sharding and layout — what jit's C++ path compares per argument."""
    return (type(x) is ArrayImpl and x.aval == spec[0] and x._committed == spec[1] and x.sharding == spec[2]
            and x._pjrt_layout == spec[3])


def direct_executable(jitted: Any, args: Sequence[Any]) -> tuple[Any, tuple] | None:
    """``(run, specs)``: ``run(flat)`` executes the program ``jitted`` compiled for ``args`` (a pytree
    call: ``jitted(*args)``) on ``flat`` — the leaves of ``args``, as a list — and returns the flat
    outputs; ``specs[i]`` is :func:`arg_spec` of the i-th leaf it was built for. ``run`` checks nothing:
    the caller passes only leaves matching ``specs`` (and not deleted). None when the program cannot
    be run that way: effects, host callbacks, mutable arrays, a profiler, debug_nans/infs, an argument
    that is not a plain ``jax.Array``, or a jax whose internals differ.

    Uses the executable jit already compiled for these arguments (``lower().compile()`` hits jit's
    caches), so nothing is compiled twice.
    """
    if special_checks_on():
        return None
    flat = jax.tree_util.tree_leaves(args)
    specs = tuple(arg_spec(x) for x in flat)
    if any(s is None for s in specs):
        return None
    try:
        compiled = jitted.lower(*args).compile()
        exe = compiled._executable
        unsafe = exe.unsafe_call
        if (type(unsafe) is not _pxla.ExecuteReplicated or unsafe.ordered_effects
                or unsafe.has_unordered_effects or unsafe.has_host_callbacks or unsafe.mut is not None
                or unsafe.pgle_profiler is not None or compiled._params.is_high):
            return None
        consts = list(compiled._params.const_args)
        nc = len(consts)
        kept = sorted(unsafe.kept_var_idx)
        consts = list(exe.shard_const_args(consts)) if consts else []
        consts = [c for i, c in enumerate(consts) if i in unsafe.kept_var_idx]
        keep = [i - nc for i in kept if i >= nc]
        in_shardings = exe._in_shardings
        for x, s in zip([*consts, *(flat[i] for i in keep)], in_shardings, strict=True):
            if not x.sharding.is_equivalent_to(s, x.ndim):
                return None
        execute = unsafe.xla_executable.execute_sharded
        handlers = unsafe.out_handler.handlers
    except Exception:  # pragma: no cover - another jax's internals: keep using jit
        return None
    if keep == list(range(len(flat))):
        if not consts:
            def run(flat):
                return execute(flat).consume_with_handlers(handlers)
        else:
            def run(flat):
                return execute(consts + flat).consume_with_handlers(handlers)
    else:
        import operator

        if not keep:
            def pick(flat):
                return []
        elif len(keep) == 1:
            (k,) = keep

            def pick(flat):
                return [flat[k]]
        else:
            get = operator.itemgetter(*keep)

            def pick(flat):
                return list(get(flat))

        def run(flat):
            return execute(consts + pick(flat)).consume_with_handlers(handlers)
    return run, specs


# --- primitives of kvhoist's own (kvhoist.speculation) ----------------------------------------------

Primitive = jex.Primitive


def out_avals(j: Any) -> list:
    """The output avals of a (closed or open) jaxpr."""
    return [v.aval for v in split_closed(j)[3]]


def tangent_aval(aval: Any) -> Any:
    """The aval of a tangent of a value of ``aval`` (``float0`` for integers)."""
    return aval.to_tangent_aval()


def vmap_closed(j: Any, args: Sequence[Any], dims: Sequence[int | None], size: int | None = None) -> Any:
    """A closed jaxpr computing ``jaxpr_as_fun(j)`` vmapped: inputs batched as ``args`` are (``dims[i]``,
    None = not batched, ``size`` the batch size), every output batched on axis 0."""
    if size is None:
        size = next(x.shape[d] for x, d in zip(args, dims) if d is not None)
    fun = jaxpr_as_fun(j)
    batched = jax.vmap(lambda *a: list(fun(*a)), in_axes=tuple(dims), out_axes=0, axis_size=size)
    return jax.make_jaxpr(batched)(*args)


def register_checkify_rule(primitive: Any, rule: Any) -> None:
    """Register ``rule(check_jaxpr, error, enabled_errors, *invals, **params) -> (error, outvals)`` as
    ``primitive``'s rule for ``jax.experimental.checkify``; ``check_jaxpr(closed, enabled_errors, error,
    *args) -> (error, outvals)`` runs a closed jaxpr with checks at the point of the rule (jax 0.12's
    rules also receive a checkify context, passed on here)."""
    import functools
    import inspect

    from jax._src import checkify as _ck  # type: ignore

    if next(iter(inspect.signature(_ck.checkify_jaxpr).parameters)) == "ctx":
        def wrapped(ctx, error, enabled_errors, *invals, **params):
            return rule(functools.partial(_ck.checkify_jaxpr, ctx), error, enabled_errors, *invals, **params)
    else:
        def wrapped(error, enabled_errors, *invals, **params):
            return rule(_ck.checkify_jaxpr, error, enabled_errors, *invals, **params)
    _ck.error_checks[primitive] = wrapped
