"""The vocabulary of the motion model: every JAX primitive kvhoist classifies, as data.

:mod:`kvhoist.analysis.motion` decides what may move from these tables and :mod:`kvhoist.analysis.cost` gives each
allowlisted primitive a cost rule from them; both import this module, neither imports the other's tables. A test
walks JAX's primitive set and fails on a primitive these tables do not classify.
"""

from __future__ import annotations

# --------------------------------------------------------------------------------------------------
# The allowlist
# --------------------------------------------------------------------------------------------------

#: Elementwise primitives (one output element per input element position, broadcasting only scalars):
#: a broadcast can be sunk below them (:func:`kvhoist.passes.licm` rewrites ``f(broadcast(x))`` to
#: ``broadcast(f(x))`` for invariant ``x``), and XLA fuses them into their consumers.
ELEMENTWISE = frozenset({
    "abs", "acos", "acosh", "add", "and", "asin", "asinh", "atan", "atan2", "atanh", "bessel_i0e",
    "bessel_i1e", "cbrt", "ceil", "clamp", "clz", "complex", "conj", "convert_element_type", "cos", "cosh",
    "digamma", "div", "eq", "erf", "erf_inv", "erfc", "exp", "exp2", "expm1", "floor", "ge", "gt", "igamma",
    "igamma_grad_a", "igammac", "imag", "integer_pow", "is_finite", "le", "lgamma", "log", "log1p",
    "logistic", "lt", "max", "min", "mul", "ne", "neg", "nextafter", "not", "or", "polygamma",
    "population_count", "pow", "real", "reciprocal", "reduce_precision", "regularized_incomplete_beta",
    "rem", "round", "rsqrt", "select_n", "shift_left", "shift_right_arithmetic", "shift_right_logical",
    "sign", "sin", "sinh", "sqrt", "square", "sub", "tan", "tanh", "xor", "zeta", "_copysign", "copy",
    "copy_p", "stop_gradient", "mulhi", "add_any", "log2", "one_minus_square", "polynomial",
})

#: Shape and data-movement primitives: pure, and fused by XLA like elementwise ones. ``name``
#: (``jax.ad_checkpoint.checkpoint_name``) is an identity that labels a value for remat policies: free,
#: pure and speculatable; a hoisted value keeps its label (the equation moves with it).
SHAPE = frozenset({
    "broadcast_in_dim", "reshape", "squeeze", "expand_dims", "transpose", "iota", "slice", "dynamic_slice",
    "dynamic_update_slice", "concatenate", "pad", "rev", "bitcast_convert_type", "gather", "split",
    "device_put", "sharding_constraint", "reshard", "tile", "name",
})

#: Other pure, deterministic first-order primitives whose results XLA materialises (matmuls,
#: reductions, sorts, linear algebra, functional PRNG, collectives inside ``shard_map``).
MATERIALISED = frozenset({
    "dot_general", "conv_general_dilated", "ragged_dot_general",
    "reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or", "reduce_xor",
    "reduce", "argmax", "argmin", "reduce_window", "reduce_window_sum", "reduce_window_max",
    "reduce_window_min", "select_and_scatter_add", "select_and_gather_add", "select_and_scatter",
    "cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp",
    "sort", "top_k", "approx_top_k",
    "scatter", "scatter-add", "scatter_add", "scatter-mul", "scatter_mul", "scatter-min", "scatter_min",
    "scatter-max", "scatter_max", "scatter-sub", "scatter_sub",
    "cholesky", "eigh", "lu", "lu_pivots_to_permutation", "qr", "householder_product", "geqrf", "svd",
    "triangular_solve", "fft", "schur", "hessenberg", "tridiagonal", "tridiagonal_solve", "eig",
    "random_bits", "random_seed", "random_wrap", "random_unwrap", "random_split", "random_fold_in",
    "random_clone", "random_gamma", "threefry2x32", "rng_bit_generator", "iota_2x32_shape",
    "psum", "pmax", "pmin", "all_gather", "all_to_all", "ppermute", "reduce_scatter", "axis_index",
    "pbroadcast", "psum_invariant", "pvary", "all_gather_invariant", "psum_scatter",
})

#: kvhoist's own primitives. ``kvhoist_attention`` (:mod:`kvhoist.kernels`) is pure, deterministic and always
#: terminates with a cost fixed by its shapes, whichever implementation it lowers to (einsum + softmax, or
#: the splash-attention kernel, whose grid is static): it may be hoisted and speculated like a matmul.
KVHOIST_PRIMITIVES = frozenset({"kvhoist_attention", "kvhoist_attach"})

#: First-order primitives known to be pure, deterministic and non-trapping on XLA.
PURE_PRIMITIVES = ELEMENTWISE | SHAPE | MATERIALISED | KVHOIST_PRIMITIVES

#: Higher-order primitives whose semantics kvhoist knows: they may move when their bodies may.
HIGHER_ORDER = frozenset({
    "scan", "while", "cond", "jit", "pjit", "remat2", "checkpoint", "closed_call", "core_call",
    "custom_jvp_call", "shard_map", "kvhoist_speculate",
})

#: Primitives that may move out of a loop that surely runs but never leave a region that might not run
#: (:func:`speculatable` is False for anything holding them), with the reason. ``kvhoist_attach``
#: (:mod:`kvhoist.speculation`) is where transformations see speculated work: in its branch or ``while`` body.
NOT_SPECULATABLE = {
    "while": "a while loop may not terminate (its trip count depends on data)",
    "kvhoist_attach": "the derivative and checks of speculated work stay in the region it came from",
}

#: Known to stay, with the reason the report gives (anything else unlisted stays as "unknown").
STAYS = {
    "rng_uniform": "stateful random number generator (a new value every execution, no jaxpr effect)",
    "pure_callback": "host callback (may fail, block or count its calls)",
    "io_callback": "host callback",
    "debug_callback": "host callback",
    "debug_print": "host callback",
    "ffi_call": "foreign function call (unknown semantics)",
    "custom_call": "custom call (unknown semantics)",
    "pallas_call": "kernel call (unknown semantics)",
    "tpu_custom_call": "kernel call (unknown semantics)",
    "optimization_barrier": "optimization barrier (the user asked XLA not to move across it)",
    "create_token": "token", "after_all": "token",
    "shape_assertion": "run-time check", "check": "run-time check", "unreachable": "run-time check",
    "get": "mutable reference", "swap": "mutable reference", "addupdate": "mutable reference",
    "custom_lin": "autodiff-internal primitive",
    "custom_vjp_call": "custom_vjp (its backward is user code, not necessarily linear in the cotangent: moved out "
                       "of a loop it would run once on the summed cotangents instead of once per iteration)",
    "custom_vjp_call_jaxpr": "custom_vjp (its backward is user code, not necessarily linear in the cotangent: "
                             "moved out of a loop it would run once on the summed cotangents)",
    "custom_linear_solve": "higher-order primitive kvhoist does not model",
    "call": "higher-order primitive kvhoist does not model",
    "eval_jaxpr": "higher-order primitive kvhoist does not model",
    "ragged_all_to_all": "collective kvhoist does not model",
    "empty2": "uninitialised memory",
    "eq_to": "not modelled", "le_to": "not modelled", "lt_to": "not modelled",
}
