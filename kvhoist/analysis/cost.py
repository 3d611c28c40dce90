"""A FLOP and byte cost model for jaxpr equations.

The numbers rank hoisting candidates and fill reports; they count multiply-adds as two FLOPs for
``dot_general`` and ``conv_general_dilated``, one FLOP per output element for elementwise work,
and recurse through higher-order primitives (a ``scan`` costs ``length`` bodies, a ``cond`` its most
expensive branch, a ``while`` one body per iteration — its trip count is unknown statically).

Per-run totals (:func:`jaxpr_flops_run`) keep the two kinds of work apart: work whose number of executions
is known statically (scan trip counts multiplied) is counted per run; work inside a loop whose trip count
is unknown (a ``while``) is counted per iteration of that loop, never mixed into the per-run figure. Both
sides of a rewrite are counted the same way, so work hoisted out of a ``while`` shows up as what it is: the
per-iteration figure drops and the per-run figure grows by one execution of the hoisted work.
"""

from __future__ import annotations

import math
from typing import Any

from kvhoist import compat
from kvhoist.ir import aval_bytes, memoized

#: Primitives that only move, view or re-type data. They are never hoisted on their own, only as
#: part of a hoisted expensive computation (hoisting a broadcast would just cache a bigger array).
SHAPE_ONLY = frozenset({
    "broadcast_in_dim", "reshape", "squeeze", "expand_dims", "transpose", "convert_element_type",
    "iota", "slice", "dynamic_slice", "concatenate", "pad", "copy", "copy_p", "rev",
    "bitcast_convert_type", "device_put", "sharding_constraint", "reduce_precision",
    "gather", "select_n", "stop_gradient", "split", "name",
    "kvhoist_attach",   # identity in the primal (kvhoist.speculation): lowered to nothing
})


def _prod(xs) -> int:
    return int(math.prod(int(x) for x in xs))


def _size(aval: Any) -> int:
    return _prod(getattr(aval, "shape", ()))


def _in(eqn, i: int = 0) -> tuple:
    return tuple(int(d) for d in eqn.invars[i].aval.shape)


def _out_size(eqn) -> int:
    return sum(_size(v.aval) for v in eqn.outvars)


def _in_size(eqn) -> int:
    return sum(_size(a.aval) for a in eqn.invars if hasattr(a, "aval"))


def _log2(n: int) -> int:
    return max(1, math.ceil(math.log2(max(int(n), 2))))


# --------------------------------------------------------------------------------------------------
# Cost rules: primitive -> FLOPs of one execution. Rules are data (COST_RULES); each is an upper bound
# of the work, never an underestimate: what speculation may run in a branch that never executes is
# bounded by these figures (kvhoist.analysis.motion.speculation_budget).
# --------------------------------------------------------------------------------------------------

def dot_general_flops(eqn) -> int:
    """``2 * out * contracted`` (one multiply and one add per term)."""
    (lc, _rc), _batch = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    return 2 * _size(eqn.outvars[0].aval) * _prod(lhs[d] for d in lc)


def conv_flops(eqn) -> int:
    """``2 * out * (in features / feature groups) * window``: the kernel's input-feature dimension is already
    the per-group count (``feature_group_count`` groups of ``I / G`` features), so depthwise convolutions
    cost ``2 * out * window``."""
    rhs = eqn.invars[1].aval.shape
    spec = getattr(eqn.params.get("dimension_numbers"), "rhs_spec", None) or tuple(range(len(rhs)))
    return 2 * _size(eqn.outvars[0].aval) * int(rhs[spec[1]]) * _prod(rhs[d] for d in spec[2:])


def _ragged_dot_flops(eqn) -> int:
    """``lhs [m, k] x rhs [groups, k, n]``: each row multiplies one group's matrix: ``2 * m * k * n``."""
    return 2 * _size(eqn.outvars[0].aval) * int(_in(eqn, 0)[-1])


def _attention_flops(eqn) -> int:
    from kvhoist.kernels import attention_flops

    return attention_flops(eqn.params, eqn.invars[0].aval.shape, eqn.invars[2].aval.shape)


def _free(eqn) -> int:
    """Data movement, re-typing, naming: no arithmetic (XLA fuses it into its consumers)."""
    return 0


def _per_output(weight: int):
    def rule(eqn) -> int:
        return weight * _out_size(eqn)
    rule.weight = weight
    return rule


def _per_input(weight: int = 1):
    def rule(eqn) -> int:
        return weight * _in_size(eqn)
    return rule


def _integer_pow(eqn) -> int:
    """Square-and-multiply: ``ceil(log2 |y|) + 1`` multiplications per element (plus a division if y < 0)."""
    y = abs(int(eqn.params["y"]))
    return (_log2(y) + 1 + (eqn.params["y"] < 0)) * _out_size(eqn)


def _windowed(eqn) -> int:
    """Every output element combines one window."""
    return _prod(eqn.params.get("window_dimensions", ()) or (1,)) * _out_size(eqn)


def _windowed_scatter(eqn) -> int:
    """``select_and_scatter``/``select_and_gather``: every operand element takes part in one window."""
    return _prod(eqn.params.get("window_dimensions", ()) or (1,)) * _size(eqn.invars[0].aval)


def _cumulative(weight: int):
    def rule(eqn) -> int:
        n = _in(eqn)[int(eqn.params.get("axis", 0))] if _in(eqn) else 1
        return weight * _size(eqn.invars[0].aval) * _log2(n)  # XLA: a log-depth associative scan
    return rule


def _sort(eqn) -> int:
    """A comparison sort: ``n log2 n`` comparisons along the sorted dimension, per operand moved."""
    shape = _in(eqn)
    n = shape[int(eqn.params.get("dimension", -1))] if shape else 1
    return _in_size(eqn) * _log2(n)


def _top_k(eqn) -> int:
    shape = _in(eqn)
    return _size(eqn.invars[0].aval) * _log2(shape[-1] if shape else 1)


def _scatter(eqn) -> int:
    """One combination (and one index computation) per update element."""
    return 2 * _size(eqn.invars[-1].aval)


def _matrices(eqn, i: int = 0) -> tuple[int, int, int]:
    """``(batch, m, n)`` of a batch of matrices ``[..., m, n]``."""
    shape = _in(eqn, i)
    m, n = (shape[-2], shape[-1]) if len(shape) >= 2 else (1, shape[-1] if shape else 1)
    return _prod(shape[:-2]), m, n


# Dense linear algebra runs as LAPACK calls on CPU (cuSOLVER on GPU): XLA's cost analysis sees an opaque
# custom call. The counts are the standard ones (Golub & Van Loan, "Matrix Computations", 4th ed.; LAPACK
# Working Note 41), rounded up, for the most expensive variant the primitive's params allow.

def _cholesky(eqn) -> int:
    b, _m, n = _matrices(eqn)
    return b * (n ** 3 // 3 + 2 * n * n)


def _lu(eqn) -> int:
    b, m, n = _matrices(eqn)
    k = min(m, n)
    return b * (2 * m * n * k - (m + n) * k * k + 2 * k ** 3 // 3 + m * n)


def _qr(eqn) -> int:
    """Householder QR (``geqrf``, ``2mn^2 - 2n^3/3``) plus forming Q (``orgqr``, ``<= 4m^2 n``)."""
    b, m, n = _matrices(eqn)
    return b * (2 * m * n * n + 4 * m * m * min(m, n) + m * n)


def _geqrf(eqn) -> int:
    b, m, n = _matrices(eqn)
    return b * (2 * m * n * min(m, n) + m * n)


def _householder_product(eqn) -> int:
    b, m, n = _matrices(eqn)
    return b * (4 * m * n * min(m, n) + m * n)


def _svd(eqn) -> int:
    """R-SVD with both singular vector sets, ``m >= n``: ``4m^2 n + 8mn^2 + 9n^3``."""
    b, m, n = _matrices(eqn)
    m, n = max(m, n), min(m, n)
    return b * (4 * m * m * n + 8 * m * n * n + 9 * n ** 3)


def _eigh(eqn) -> int:
    """Symmetric eigensolver with vectors (tridiagonalisation ``4n^3/3``, QR/divide and conquer, back
    transformation): ``9n^3``; the Jacobi variant XLA uses on GPU/TPU sweeps ``~ log n`` times ``4n^3``."""
    b, _m, n = _matrices(eqn)
    return b * (9 + _log2(n)) * n ** 3


def _eig(eqn) -> int:
    """Nonsymmetric eigensolver with vectors (Hessenberg + Francis QR + back substitution): ``25n^3``."""
    b, _m, n = _matrices(eqn)
    return b * 25 * n ** 3


def _hessenberg(eqn) -> int:
    b, _m, n = _matrices(eqn)
    return b * (10 * n ** 3 // 3 + n * n)


def _tridiagonal(eqn) -> int:
    b, _m, n = _matrices(eqn)
    return b * (4 * n ** 3 // 3 + n * n)


def _triangular_solve(eqn) -> int:
    """``A [.., k, k]`` against ``B [.., m, n]``: ``k^2`` multiply-adds per right-hand side."""
    _b, _m, k = _matrices(eqn, 0)
    return 2 * k * _size(eqn.invars[1].aval)


def _tridiagonal_solve(eqn) -> int:
    """The Thomas algorithm: 8 FLOPs per right-hand-side element."""
    return 8 * _size(eqn.invars[-1].aval)


def _fft(eqn) -> int:
    """``8 N log2 N`` per transform of ``N`` points (XLA's own count for complex FFTs)."""
    n = _prod(eqn.params.get("fft_lengths", ()) or (1,))
    batch = max(1, max(_size(eqn.invars[0].aval), _out_size(eqn)) // max(n, 1))
    return 8 * batch * n * _log2(n)


#: Per-element weights of elementwise primitives, where one element costs more than one FLOP: at least
#: XLA-CPU's own count (``cost_analysis()``: flops + transcendentals per element, the larger of jax 0.10.2 and
#: 0.12 within a factor 4 of both: lgamma is 56 on one and 353 on the other).
#: Functions XLA expands with a convergence loop (its cost analysis counts a while body once) are charged
#: :data:`SERIES_ITERATIONS` iterations of it.
SERIES_ITERATIONS = 32
#: Elementwise primitives XLA expands with a convergence loop.
SERIES_PRIMITIVES = frozenset({"igamma", "igammac", "regularized_incomplete_beta", "igamma_grad_a",
                               "random_gamma_grad"})
ELEMENT_WEIGHTS = {
    "exp2": 2, "logistic": 4, "acos": 5, "cosh": 5, "asin": 7, "atanh": 8, "acosh": 11, "sinh": 13,
    "asinh": 14, "nextafter": 23, "erf_inv": 39, "lgamma": 200, "erfc": 61, "digamma": 76, "bessel_i0e": 84,
    "bessel_i1e": 84, "zeta": 133, "polygamma": 273,
    "igamma": 274 * SERIES_ITERATIONS, "igammac": 274 * SERIES_ITERATIONS,
    "regularized_incomplete_beta": 274 * SERIES_ITERATIONS, "igamma_grad_a": 550 * SERIES_ITERATIONS,
    "random_gamma_grad": 550 * SERIES_ITERATIONS,
}


def _build_rules() -> dict:
    from kvhoist.analysis import primitives

    rules: dict = {}
    for name in primitives.ELEMENTWISE:
        rules[name] = _per_output(ELEMENT_WEIGHTS.get(name, 1))
    for name in primitives.SHAPE | SHAPE_ONLY:
        rules[name] = _free
    rules.update({
        "integer_pow": _integer_pow,
        "dot_general": dot_general_flops, "conv_general_dilated": conv_flops,
        "ragged_dot_general": _ragged_dot_flops, "kvhoist_attention": _attention_flops,
        # reductions: one combination per input element
        **{n: _per_input() for n in ("reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and",
                                      "reduce_or", "reduce_xor", "reduce")},
        # a variadic (value, index) reduction: XLA counts ~9 operations per element
        "argmax": _per_input(4), "argmin": _per_input(4),
        **{n: _windowed for n in ("reduce_window", "reduce_window_sum", "reduce_window_max", "reduce_window_min")},
        **{n: _windowed_scatter for n in ("select_and_scatter_add", "select_and_gather_add", "select_and_scatter")},
        "cumsum": _cumulative(2), "cumprod": _cumulative(2), "cummax": _cumulative(2),
        "cummin": _cumulative(2), "cumlogsumexp": _cumulative(16),
        "sort": _sort, "top_k": _top_k, "approx_top_k": _top_k,
        **{n: _scatter for n in ("scatter", "scatter-add", "scatter_add", "scatter-mul", "scatter_mul",
                                 "scatter-min", "scatter_min", "scatter-max", "scatter_max", "scatter-sub",
                                 "scatter_sub")},
        "cholesky": _cholesky, "lu": _lu, "qr": _qr, "geqrf": _geqrf, "householder_product": _householder_product,
        "svd": _svd, "eigh": _eigh, "eig": _eig, "schur": _eig, "hessenberg": _hessenberg,
        "tridiagonal": _tridiagonal, "triangular_solve": _triangular_solve,
        "tridiagonal_solve": _tridiagonal_solve, "lu_pivots_to_permutation": _per_output(1), "fft": _fft,
        # functional PRNG: threefry is ~47 XLA FLOPs per 32-bit word, rng_bit_generator ~37
        "threefry2x32": _per_output(50), "random_bits": _per_output(50), "random_split": _per_output(50),
        "random_fold_in": _per_output(50), "random_seed": _per_output(50), "rng_bit_generator": _per_output(40),
        "random_wrap": _free, "random_unwrap": _free, "random_clone": _free, "iota_2x32_shape": _per_output(1),
        "random_gamma": _per_output(550 * SERIES_ITERATIONS),  # a rejection loop per element
        # collectives inside shard_map: one combination per element communicated
        **{n: _per_input() for n in ("psum", "pmax", "pmin", "all_gather", "all_to_all", "ppermute",
                                     "reduce_scatter", "pbroadcast", "psum_invariant", "pvary",
                                     "all_gather_invariant", "psum_scatter")},
        "axis_index": _per_output(1),
    })
    return rules


def eqn_flops(eqn) -> int:
    """Estimated FLOPs of one execution of ``eqn`` (sub-jaxprs included): :data:`COST_RULES`, or for
    higher-order primitives their bodies (a ``scan`` ``length`` times, a ``cond`` its costliest branch, a
    ``while`` one iteration, a call once). A primitive without a rule costs one FLOP per output element."""
    name = eqn.primitive.name
    if name in _HIGHER_ORDER_FLOPS:
        return memoized("eqn_flops", eqn, lambda: _HIGHER_ORDER_FLOPS[name](eqn))
    rule = COST_RULES.get(name)
    if rule is not None:
        return int(rule(eqn))
    subs = compat.subjaxprs_of(eqn)
    if subs:
        return memoized("eqn_flops", eqn, lambda: sum(jaxpr_flops(j) for j in subs[:1]))
    return _out_size(eqn)


_HIGHER_ORDER_FLOPS = {
    "scan": lambda e: int(e.params["length"]) * jaxpr_flops(e.params["jaxpr"]),
    "while": lambda e: jaxpr_flops(e.params["body_jaxpr"]) + jaxpr_flops(e.params["cond_jaxpr"]),
    "cond": lambda e: max((jaxpr_flops(b) for b in e.params["branches"]), default=0),
}


def jaxpr_flops(j: Any) -> int:
    """FLOPs of one evaluation of a (closed or open) jaxpr."""
    return memoized("jaxpr_flops", j, lambda: sum(eqn_flops(e) for e in compat.split_closed(j)[4]))


def count_primitives(j: Any, name: str, *, multiply_trips: bool = False) -> int:
    """How many ``name`` equations a jaxpr holds (recursively); with ``multiply_trips`` how many run."""
    _cv, _c, _iv, _ov, eqns = compat.split_closed(j)
    n = 0
    for e in eqns:
        if e.primitive.name == name:
            n += 1
        subs = compat.subjaxprs_of(e)
        if not subs:
            continue
        mult = int(e.params["length"]) if (multiply_trips and e.primitive.name == "scan") else 1
        if e.primitive.name == "cond":
            n += max(count_primitives(b, name, multiply_trips=multiply_trips) for b in subs)
        else:
            n += mult * sum(count_primitives(s, name, multiply_trips=multiply_trips) for s in subs)
    return n


def out_bytes(eqn) -> int:
    return sum(aval_bytes(v.aval) for v in eqn.outvars)


def is_shape_only(eqn) -> bool:
    """Shape-only ops, and calls (``jit`` of ``jnp.pad``, say) whose bodies are all shape-only."""
    name = eqn.primitive.name
    if name in SHAPE_ONLY:
        return True
    if name in ("jit", "pjit", "closed_call", "remat2", "custom_jvp_call"):
        subs = compat.subjaxprs_of(eqn)
        return bool(subs) and all(is_shape_only(e) for e in compat.split_closed(subs[0])[4])
    return False


#: Primitives worth counting in reports (kvhoist_attention: kvhoist.kernels' attention, two matmuls).
COUNTED = ("dot_general", "conv_general_dilated", "kvhoist_attention")


def primitive_counts(eqn) -> dict:
    """How many dot_general / conv / attention equations one execution of ``eqn`` runs (loops multiplied)."""
    name = eqn.primitive.name
    if name in COUNTED:
        return {name: 1}
    subs = compat.subjaxprs_of(eqn)
    if not subs:
        return {}
    mult = int(eqn.params["length"]) if name == "scan" else 1
    out: dict = {}
    chosen = subs
    if name == "cond":
        chosen = [max(subs, key=jaxpr_flops)]
    elif name not in ("scan", "while"):
        chosen = subs[:1]
    for s in chosen:
        for e in compat.split_closed(s)[4]:
            for k, v in primitive_counts(e).items():
                out[k] = out.get(k, 0) + mult * v
    return out


class RunFlops(int):
    """FLOPs of one run of a program: an ``int`` (the work whose number of executions is known statically)
    that also carries :attr:`per_iteration`, the FLOPs of one iteration of every loop with an unknown trip
    count (``while`` bodies and conditions, multiplied by the known trip counts of loops around them; a
    ``while`` nested in another counts one iteration of each).

    It is an ``int`` so that code reading a total as a number keeps working; arithmetic on it returns plain
    ``int`` s of the per-run part.
    """

    per_iteration: int

    def __new__(cls, per_run: int = 0, per_iteration: int = 0) -> "RunFlops":
        obj = super().__new__(cls, per_run)
        obj.per_iteration = int(per_iteration)
        return obj

    def __reduce__(self):
        return (RunFlops, (int(self), self.per_iteration))

    def __repr__(self) -> str:
        return f"RunFlops(per_run={int(self)}, per_iteration={self.per_iteration})"

    @property
    def per_run(self) -> int:
        return int(self)


def jaxpr_flops_run(j: Any, leaf_flops=None) -> RunFlops:
    """FLOPs of one run of a program, split into per-run and per-unknown-iteration work (:class:`RunFlops`).

    Static trip counts are multiplied; a ``cond`` counts its most expensive branch (each part separately);
    a ``while`` body (and its condition) goes to ``per_iteration``, its trip count being unknown.

    Args:
      j: a closed or open jaxpr.
      leaf_flops: ``eqn -> FLOPs`` for equations without sub-jaxprs (default :func:`eqn_flops`); e.g. a
        filter counting only some matmuls.
    """
    leaf = leaf_flops or eqn_flops
    run = it = 0
    for e in compat.split_closed(j)[4]:
        name = e.primitive.name
        subs = compat.subjaxprs_of(e)
        if not subs:
            run += leaf(e)
            continue
        if name == "scan":
            inner = jaxpr_flops_run(e.params["jaxpr"], leaf)
            n = int(e.params["length"])
            run, it = run + n * inner.per_run, it + n * inner.per_iteration
        elif name == "while":
            for s in (e.params["body_jaxpr"], e.params["cond_jaxpr"]):
                inner = jaxpr_flops_run(s, leaf)
                it += inner.per_run + inner.per_iteration
        elif name == "cond":
            parts = [jaxpr_flops_run(b, leaf) for b in subs]
            run += max(p.per_run for p in parts)
            it += max(p.per_iteration for p in parts)
        else:  # a call (jit, remat, custom_jvp, ...): its body once, as eqn_flops does
            inner = jaxpr_flops_run(subs[0], leaf)
            run, it = run + inner.per_run, it + inner.per_iteration
    return RunFlops(run, it)


#: Primitive name -> ``eqn -> FLOPs`` for every first-order primitive the motion model allowlists
#: (:data:`kvhoist.analysis.motion.PURE_PRIMITIVES`); a test fails on an allowlisted primitive without one.
COST_RULES: dict = _build_rules()
