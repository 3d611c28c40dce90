"""What may move: the one place that decides whether an equation can run elsewhere or less often.

kvhoist moves work in two ways, and they need different guarantees (MLIR's model):

* **Hoisting** out of a loop whose body certainly runs (a ``scan`` of length >= 1, the top level of a
  host-loop step): the equation runs once instead of once per iteration. It must be *memory-effect
  free* and *deterministic*: same inputs, same outputs, no state read or written. :func:`may_move`.
* **Speculation**: the equation runs where it might not have run at all: out of a ``cond`` branch, out
  of a ``while`` body (which may run zero times). (Nothing leaves a zero-length ``scan``: its body never
  runs, so moving work out of it could only add work.) Besides may_move it
  must *always terminate*, *never fail* and have a cost known at trace time: no ``while`` loop (its trip
  count depends on data), no callback (it may raise, block or count its calls), nothing opaque.
  :func:`speculatable`.

Both are decided from an **allowlist** of primitives known to be pure, deterministic and non-trapping
on XLA (:data:`PURE_PRIMITIVES`; integer division by zero, out-of-range gathers and NaNs produce
values, never traps), plus the higher-order primitives whose semantics kvhoist knows
(:data:`HIGHER_ORDER`), recursively: a ``scan`` may move when every equation of its body may. Anything
else stays where it is — stateful primitives that carry no jaxpr effect (``rng_uniform``), callbacks
(``pure_callback`` is effect-free in JAX's eyes but may fail or be counted by the user), custom calls,
Pallas kernels, barriers and every primitive this list does not name. :func:`why_not_movable` says why,
for the report.

**Memory** (:func:`inflation_ok`): a value moved out of a loop becomes a buffer that lives across the
loop. XLA materialises the results of matmuls, convolutions, reductions and loops anyway, but fuses
elementwise and shape chains into their consumers without a buffer (``sum(sin(broadcast(a)) * x)``
never allocates the broadcast). So a value may be cached only if it is not much larger than what it is
computed from: at most :data:`MAX_INFLATION` times the bytes of its *sources* — the nearest values jit
would materialise (a matmul's result, a loop input) — or at most :data:`SMALL_BYTES` in all. When the
move is speculative the sources are the loop's inputs themselves: work that may never have run may not
allocate more than a small multiple of what the loop already holds.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from kvhoist import compat
from kvhoist.ir import memoized

# The allowlist (the classification tables) lives in analysis/primitives.py, shared with the cost model.
from kvhoist.analysis.primitives import (ELEMENTWISE, HIGHER_ORDER, KVHOIST_PRIMITIVES, MATERIALISED,  # noqa: E402,F401
                                        NOT_SPECULATABLE, PURE_PRIMITIVES, SHAPE, STAYS)

# --------------------------------------------------------------------------------------------------
# The two predicates
# --------------------------------------------------------------------------------------------------


def why_not_movable(eqn) -> str | None:
    """``None`` if ``eqn`` may run at another place or another number of times, else the reason."""
    if eqn.effects:
        return "has effects"
    name = eqn.primitive.name
    if name in HIGHER_ORDER:  # once per equation and pass run: LICM asks again at every enclosing loop
        return memoized("why_not_movable", eqn, lambda: _body_not_movable(eqn))
    if name in PURE_PRIMITIVES:
        return None
    return STAYS.get(name, f"unknown primitive {name!r} (not on kvhoist's allowlist of pure primitives)")


def _body_not_movable(eqn) -> str | None:
    for sub in compat.subjaxprs_of(eqn):
        for e in compat.split_closed(sub)[4]:
            reason = why_not_movable(e)
            if reason is not None:
                return f"its body holds {e.primitive.name}: {reason}"
    return None


def may_move(eqn) -> bool:
    """Pure, deterministic and understood: may run once instead of once per loop iteration."""
    return why_not_movable(eqn) is None


def why_not_speculatable(eqn) -> str | None:
    """``None`` if ``eqn`` may also run where it would not have run at all, else the reason."""
    reason = why_not_movable(eqn)
    if reason is not None:
        return reason
    return _unbounded(eqn)


def _unbounded(eqn) -> str | None:
    reason = NOT_SPECULATABLE.get(eqn.primitive.name)
    if reason is not None:
        return reason
    if eqn.primitive.name not in HIGHER_ORDER:
        return None
    return memoized("unbounded", eqn, lambda: _body_unbounded(eqn))


def _body_unbounded(eqn) -> str | None:
    for sub in compat.subjaxprs_of(eqn):
        for e in compat.split_closed(sub)[4]:
            reason = _unbounded(e)
            if reason is not None:
                return reason
    return None


def speculatable(eqn) -> bool:
    """May move, always terminates, cannot fail, bounded cost: safe to run where it did not run."""
    return why_not_speculatable(eqn) is None


def can_move(eqn, speculative: bool) -> bool:
    """The one predicate LICM applies: :func:`may_move`, and :func:`speculatable` when speculating."""
    return speculatable(eqn) if speculative else may_move(eqn)


#: Speculated work may cost at most this many times what the enclosing loop surely runs (per iteration,
#: times its trip count when known): a branch that never runs may not add more than that.
MAX_SPECULATED_FLOPS_RATIO = 1.0


def surely_run_flops(eqns: Iterable) -> int:
    """FLOPs that certainly run when ``eqns`` run: a ``cond`` counts its cheapest branch, a ``while`` body
    nothing (it may run zero times), a ``scan`` ``length`` times what its body surely runs."""
    from kvhoist.analysis import cost

    total = 0
    for e in eqns:
        name = e.primitive.name
        if name in HIGHER_ORDER:  # once per equation and pass run (each enclosing loop asks again)
            total += memoized("surely_run_flops", e, lambda e=e: _surely_run_flops_of(e))
        else:
            total += cost.eqn_flops(e)
    return total


def _surely_run_flops_of(e) -> int:
    from kvhoist.analysis import cost

    name = e.primitive.name
    if name == "cond":
        return min((surely_run_flops(compat.split_closed(b)[4]) for b in e.params["branches"]), default=0)
    if name == "while":
        return surely_run_flops(compat.split_closed(e.params["cond_jaxpr"])[4])
    if name == "scan":
        return int(e.params["length"]) * surely_run_flops(compat.split_closed(e.params["jaxpr"])[4])
    if compat.subjaxprs_of(e):
        return sum(surely_run_flops(compat.split_closed(s)[4]) for s in compat.subjaxprs_of(e)[:1])
    return cost.eqn_flops(e)


def why_not_pays(trip_count: int | None, flops_per_iteration: int, *, peak_bytes: int = 0,
                 cache_bytes: int | None = None, loop_free: bool = False) -> str | None:
    """``None`` if caching work of ``flops_per_iteration`` out of a loop of ``trip_count`` iterations pays, else why.

    The one notion of "pays", for flat loops, fission and vmap-fission alike:

    * the saving ``(trips - 1) * flops`` must be positive: a loop that runs once (``scan`` of length 1) saves
      nothing and would only add the cache. An unknown trip count (``while``) is given the benefit of the doubt:
      its body runs once per iteration;
    * computing the cache may not take more memory than the cache itself: ``peak_bytes``, the widest value alive
      while it is computed besides the cache (vmap-fission computes every iteration's intermediates at once: an
      MLP's hidden layer for all L layers), must be at most ``cache_bytes``. Flat loops and scan-form fission
      compute one iteration's work at a time, which the loop held anyway (``peak_bytes`` 0). ``loop_free``:
      the vectorised form is the one that adds no loop (work reading only invariants and the loop's counters,
      whose scan form is a whole extra loop XLA compiles for one small table): like a cached value
      (:func:`inflation_ok`), it may then also hold up to :data:`SMALL_BYTES`.

    The cached values' own bytes are the memory model's business (:func:`inflation_ok`).
    """
    if flops_per_iteration <= 0:
        return "saves no FLOPs"
    if trip_count is not None and trip_count <= 1:
        return f"the loop runs {trip_count} time(s): caching saves nothing"
    if cache_bytes is not None and peak_bytes > (max(cache_bytes, SMALL_BYTES) if loop_free else cache_bytes):
        return f"computing it would hold {peak_bytes} bytes at once, more than the {cache_bytes} bytes cached"
    return None


def pays(trip_count: int | None, flops_per_iteration: int, *, peak_bytes: int = 0,
         cache_bytes: int | None = None, loop_free: bool = False) -> bool:
    """Does caching pay? (:func:`why_not_pays` is ``None``.)"""
    return why_not_pays(trip_count, flops_per_iteration, peak_bytes=peak_bytes, cache_bytes=cache_bytes,
                        loop_free=loop_free) is None


def speculation_budget(surely_per_iteration: int | None, trip_count: int | None) -> int:
    """FLOPs speculated work may cost in a loop that surely runs ``surely_per_iteration`` per iteration."""
    if surely_per_iteration is None:
        return 0
    return int(MAX_SPECULATED_FLOPS_RATIO * surely_per_iteration * max(trip_count or 1, 1))


# --------------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------------

#: A cached value may be at most this many times the bytes of its sources ...
MAX_INFLATION = 2.0
#: ... or at most this many bytes in all (tables such as RoPE frequencies for a small model).
SMALL_BYTES = 1 << 20

#: Primitives whose results XLA fuses into their consumers instead of materialising them.
FUSIBLE = ELEMENTWISE | SHAPE


def source_bytes(var, eqns: Sequence, prod: dict, *, speculative: bool, aval_bytes) -> int:
    """Bytes of the values ``var`` is computed from, walking back through work XLA would fuse.

    Sources, each counted once: block inputs (not produced in ``eqns``); results of higher-order
    equations (a fissioned scan's stacked values, a speculated cond's operands: their bodies were checked
    when they were split); and, unless ``speculative``, results of first-order primitives jit
    materialises anyway (a matmul's K: caching it costs what jit holds). A value produced by such a
    primitive is its own source.
    """
    def is_source(e) -> bool:
        return e.primitive.name in HIGHER_ORDER or (not speculative and e.primitive.name not in FUSIBLE)

    return sum(aval_bytes(v.aval) for v in _sources(var, eqns, prod, is_source))


def reads_inputs(var, eqns: Sequence, prod: dict, constants: frozenset = frozenset()) -> bool:
    """Does ``var`` depend on any block input? A value computed from literals alone (an ``iota``-derived
    table, a mask ``iota < n``) is a constant: XLA folds it at compile time, so caching it only costs bytes.
    ``constants``: block inputs that are constants themselves (a nested loop's counter: a carry that starts
    at a literal and is updated from literals and such carries alone)."""
    return any(v not in prod and v not in constants for v in _sources(var, eqns, prod, lambda e: False))


def _sources(var, eqns: Sequence, prod: dict, is_source) -> list:
    """The values ``var`` is computed from, each once: walking back through producers, stopping at block
    inputs (not in ``prod``) and at values whose producing equation ``is_source``. ``var`` itself counts
    when its own producer is a source."""
    seen, out, stack = set(), [], [var]
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        k = prod.get(v)
        if k is None or is_source(eqns[k]):
            out.append(v)
            continue
        stack.extend(a for a in eqns[k].invars if not compat.is_literal(a))
    return out


def inflation_ok(nbytes: int, sources: int) -> bool:
    """May a value of ``nbytes`` computed from ``sources`` bytes be held across a loop?"""
    return nbytes <= SMALL_BYTES or nbytes <= MAX_INFLATION * sources


def names(eqns: Iterable) -> set:
    return {e.primitive.name for e in eqns}
