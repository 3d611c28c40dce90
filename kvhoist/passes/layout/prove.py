"""Proof that padded positions cannot change an output: an abstract interpretation of what padded
positions hold (:class:`ValueAnalysis`) and the structural checks every resized slot must pass
(:func:`check_class`). Either raises :class:`~kvhoist.passes.layout.candidates.Refused` with the reason."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from kvhoist import compat
from kvhoist.analysis.branches import NUMPY_RULES
from kvhoist.analysis.dims import (ATTENTION, CALLS, ELEMENTWISE, REDUCTIONS, SAME_SHAPE_AXIS_OPS, DimAnalysis,
                                   first_order_edges, is_var, sub_jaxprs, sub_key)

from kvhoist.passes.layout.candidates import Refused

__all__ = ["ValueAnalysis", "check_class", "LARGE_NEGATIVE_BIAS"]

#: An additive bias at most this is accepted as a mask (``exp`` of it underflows to 0 in float32).
LARGE_NEGATIVE_BIAS = -1e4


# --- abstract values of padded positions --------------------------------------------------------------

# A padded value's PV describes what *every* padded position holds (the same for all of them, per
# index of the other axes):
#   ("const", c)     exactly the scalar c
#   ("set", S)       one value from S, a subset of {"0", "-inf", "inf", "nan"}
#   ("uniform",)     some value, the same at every padded position
#   ("masked", b)    some value plus an additive bias b <= LARGE_NEGATIVE_BIAS
#   ("iota",)        the position index itself (not uniform)
#   ("unknown", why) nothing provable
# Values without the padded axis have no PV, except scalars known to be constant: ("const", c).

UNIFORMISH = ("const", "set", "uniform", "masked")
_SPECIAL = {"0": 0.0, "-inf": -math.inf, "inf": math.inf, "nan": math.nan}
_SAMPLES = (-math.inf, -1e30, -1.5, -0.0, 0.0, 1.5, 1e30, math.inf, math.nan)
_SAMPLED = frozenset({"add", "sub", "mul", "div", "neg", "exp", "exp2", "max", "min", "convert_element_type",
                      "stop_gradient", "copy", "copy_p", "abs"})
_MIXING = REDUCTIONS | {"dot_general", "slice", ATTENTION}  # rules that check how padding drops out
_COMPARE = frozenset({"lt", "le", "gt", "ge", "eq", "ne"})
FREE = ("free",)  # a value without the padded axis: uniform along it, value unknown


def _category(x) -> str | None:
    x = float(x)
    if math.isnan(x):
        return "nan"
    if x == 0:
        return "0"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return None


def _as_set(pv) -> frozenset | None:
    if pv[0] == "set":
        return pv[1]
    if pv[0] == "const":
        try:
            c = _category(pv[1])
        except (TypeError, ValueError):
            return None
        return frozenset({c}) if c else None
    return None


def join(a, b):
    """Least upper bound of two PVs (loop-carried values)."""
    if a == b:
        return a
    if a is None or b is None:
        return ("unknown", "a loop carries a padded value in some iterations only")
    if a[0] == "unknown":
        return a
    if b[0] == "unknown":
        return b
    sa, sb = _as_set(a), _as_set(b)
    if sa is not None and sb is not None:
        return ("set", sa | sb)
    if a[0] in UNIFORMISH + FREE and b[0] in UNIFORMISH + FREE:
        if a[0] == b[0] == "masked":
            return ("masked", max(a[1], b[1]))
        return ("uniform",)
    return ("unknown", "a loop carries the padding index")


#: Folding is numpy, never XLA (eager jax would compile one program per primitive and shape): the rules are
#: :data:`kvhoist.analysis.branches.NUMPY_RULES` (XLA's semantics, exact operations only) plus the ones
#: below, which the analysis needs for *categories* of values (0, +-inf, nan, finite): ``exp`` may differ
#: from XLA's in the last bit of a finite result, never in its category. A primitive with no rule is not
#: folded: its result is some value the same at every padded position, nothing more is claimed.
_CATEGORY_RULES = {
    "exp": lambda x, **_: np.exp(x), "exp2": lambda x, **_: np.exp2(x),
    "stop_gradient": lambda x, **_: x,
}


def _numpy_rule(name: str):
    return NUMPY_RULES.get(name) or _CATEGORY_RULES.get(name)


def _np_dtype(aval):
    return np.dtype(aval.dtype)


def _is_float(dtype) -> bool:
    """Floating point, bfloat16 included (numpy sees ml_dtypes' bfloat16 as kind 'V', not 'f')."""
    return bool(jnp.issubdtype(dtype, jnp.floating))


# --- the value analysis ----------------------------------------------------------------------------------

class ValueAnalysis:
    """Interprets the whole program on PVs for one class of padded slots; collects refusals."""

    def __init__(self, dims: DimAnalysis, klass: set, n: int, old_len: int, new_len: int, candidates: list):
        self.dims = dims
        self.n, self.old_len, self.new_len = n, old_len, new_len
        self.taxis: dict = {}
        for key, var, ax in klass:
            if (key, var) in self.taxis and self.taxis[(key, var)] != ax:
                raise Refused(f"a value has the padded length on two axes ({var.aval.str_short()})")
            self.taxis[(key, var)] = ax
        self.cands = {(c.key, c.index): c for c in candidates}
        self.assumptions: list[str] = []
        self.uses: list[str] = []  # how padded positions were excluded, for the report

    # -- helpers --------------------------------------------------------------------------------------
    def tax(self, key, a):
        return self.taxis.get((key, a)) if is_var(a) else None

    def pv_of(self, key, env, a):
        if compat.is_literal(a):
            return ("const", a.val)
        pv = env.get(a)
        if pv is not None:
            return pv
        if self.tax(key, a) is not None:
            return ("unknown", "padded value of unknown origin")
        return FREE

    def _refuse(self, e, why):
        raise Refused(f"{why} (at `{e.primitive.name}`{self._where(e)})")

    @staticmethod
    def _where(e) -> str:
        ns, src = compat.name_stack(e), compat.source_line(e)
        parts = [p for p in (ns, src) if p]
        return " in " + " ".join(parts) if parts else ""

    # -- scopes ---------------------------------------------------------------------------------------
    def run(self) -> None:
        top = self.dims.scopes[()]
        for v in top.invars:
            if self.tax((), v) is not None:
                raise Refused("the padded axis is an input of the program (its shape is fixed by the caller)")
        outs = self.scope((), [None] * len(top.invars))
        for v, pv in zip(top.outvars, outs):
            if self.tax((), v) is not None:
                raise Refused("padded positions reach an output of the program")

    def scope(self, key, in_pvs: list) -> list:
        sc = self.dims.scopes[key]
        env: dict = {}
        for v, c in zip(sc.constvars, sc.consts):
            env[v] = self.const_pv(key, v, c)
        for v, pv in zip(sc.invars, in_pvs):
            if pv is not None and pv != FREE:
                env[v] = pv
        for i, e in enumerate(sc.eqns):
            outs = self.eqn(key, i, e, env)
            for o, pv in zip(e.outvars, outs):
                if is_var(o) and pv is not None and pv != FREE:
                    env[o] = pv
        return [self.pv_of(key, env, a) if (compat.is_literal(a) or a in env or self.tax(key, a) is not None)
                else FREE for a in sc.outvars]

    def const_pv(self, key, v, c):
        ax = self.tax(key, v)
        arr = np.asarray(c)
        if ax is None:
            return ("const", arr.item()) if arr.ndim == 0 else None
        tail = np.take(arr, np.arange(self.n, arr.shape[ax]), axis=ax)
        first = np.take(arr, [self.n], axis=ax)
        same = (tail == first) | (np.isnan(tail) & np.isnan(first)) if _is_float(arr.dtype) else tail == first
        if not np.all(same):
            return ("unknown", "a constant differs across padded positions")
        flat = first.reshape(-1)
        if flat.size and np.all(flat == flat[0]):
            return ("const", flat[0].item())
        return ("uniform",)

    # -- equations ----------------------------------------------------------------------------------
    def eqn(self, key, i, e, env) -> list:
        name = e.primitive.name
        ins = [self.pv_of(key, env, a) for a in e.invars]
        in_t = [self.tax(key, a) for a in e.invars]
        out_t = [self.tax(key, o) for o in e.outvars]
        touches = any(t is not None for t in in_t + out_t)
        subs = sub_jaxprs(e)
        if subs:
            return self.higher(key, i, e, ins, touches)
        if not touches:
            return [self.fold_scalars(e, ins)]
        outs = self.first_order(key, i, e, ins, in_t, out_t)
        # Safety net: padded positions may leave the padded axis only through the mixing rules
        # above, which prove they drop out (reductions, contractions, slices of real positions).
        if any(t is not None for t in in_t) and name not in _MIXING and \
                any(is_var(o) and t is None for o, t in zip(e.outvars, out_t)):
            self._refuse(e, "padded values leave the padded axis")
        return outs

    def first_order(self, key, i, e, ins, in_t, out_t) -> list:
        name = e.primitive.name
        if (key, i) in self.cands:
            return [("uniform",)]  # the fill: deliberately not a known value (a zero pad is no mask)
        if name in ELEMENTWISE:
            return [self.elementwise(e, ins, in_t, out_t)]
        if name == "iota":
            return [("iota",) if e.params["dimension"] == out_t[0] else ("uniform",)]
        if name == "broadcast_in_dim":
            if in_t[0] is not None:
                return [ins[0]]
            return [ins[0] if ins[0][0] == "const" else ("uniform",)]
        if name in ("reshape", "transpose", "squeeze", "device_put", "split"):
            if any(t is not None for t in in_t) and any(t is None for o, t in zip(e.outvars, out_t) if is_var(o)):
                self._refuse(e, "a reshape merges the padded axis with another axis")
            return [ins[0]] * len(e.outvars) if name != "device_put" else ins
        if name in REDUCTIONS:
            return [self.reduction(e, ins[0], in_t[0], out_t[0])]
        if name == "dot_general":
            return [self.dot(e, ins, in_t, out_t[0])]
        if name == "slice":
            return [self.slice_(e, ins[0], in_t[0], out_t[0])]
        if name == ATTENTION:
            return [self.attention(e, ins, in_t, out_t[0])]
        if name == "pad":
            if in_t[0] is None or out_t[0] != in_t[0]:
                self._refuse(e, "a second pad on the padded axis")
            # A pad on another axis: the new entries hold the fill, still the same at every padded position.
            return [ins[0] if ins[0] == ins[1] else self.uniformish(e, ins[:1])]
        if name == "concatenate":
            if any(t is None for t in in_t) or out_t[0] is None:
                self._refuse(e, "a concatenate builds the padded axis")
            same = all(p == ins[0] for p in ins)
            return [ins[0] if same else self.uniformish(e, ins)]
        if name in ("dynamic_slice", "dynamic_update_slice"):
            if in_t[0] is None or out_t[0] is None or (name == "dynamic_update_slice" and in_t[1] is None):
                self._refuse(e, "a dynamic slice reads or writes part of the padded axis")
            return [self.uniformish(e, [p for p, t in zip(ins, in_t) if t is not None])]
        if name in SAME_SHAPE_AXIS_OPS:
            axis = e.params.get("axis", e.params.get("dimension"))
            dims = e.params.get("dimensions")
            mixed = [axis] if axis is not None else list(dims or ())
            if in_t[0] in mixed:
                self._refuse(e, f"`{name}` mixes positions along the padded axis")
            return [self.uniformish(e, ins)] * len(e.outvars)
        self._refuse(e, f"padded values reach `{name}`, which the layout pass does not reason about")

    def uniformish(self, e, ins):
        for p in ins:
            if p[0] in ("unknown", "iota"):
                self._refuse(e, "padded positions hold values the pass cannot track here"
                             + (f" ({p[1]})" if p[0] == "unknown" else " (the position index)"))
        return ("uniform",)

    def fold_scalars(self, e, ins):
        """Constant-fold scalar arithmetic (e.g. the -inf fill passed into a jitted `where`)."""
        if (e.primitive.name in ELEMENTWISE and len(e.outvars) == 1 and not e.outvars[0].aval.shape
                and ins and all(p[0] == "const" for p in ins)):
            try:
                return ("const", self.eval_on(e, [p[1] for p in ins]).item())
            except Exception:
                return None
        return None

    def eval_on(self, e, values):
        """``e`` on numpy ``values`` (any common shape: the analysis evaluates sampled operands as vectors),
        as its output dtype. Raises when ``e`` is not folded (no rule, or a case its rule does not model)."""
        rule = _numpy_rule(e.primitive.name)
        if rule is None or len(e.outvars) != 1:
            raise ValueError(f"`{e.primitive.name}` is not folded")
        args = [np.asarray(v, _np_dtype(a.aval)) for v, a in zip(values, e.invars)]
        with np.errstate(all="ignore"):
            return np.asarray(rule(*args, **e.params)).astype(_np_dtype(e.outvars[0].aval))

    def elementwise(self, e, ins, in_t, out_t):
        name = e.primitive.name
        for p in ins:
            if p[0] == "unknown":
                return p
        if name == "select_n":
            pred, cases = ins[0], ins[1:]
            if pred[0] == "const":
                chosen = cases[int(pred[1])]
                return ("uniform",) if chosen == FREE else chosen
            if pred[0] in UNIFORMISH + FREE and all(c[0] in UNIFORMISH + FREE for c in cases):
                return cases[0] if all(c == cases[0] and c != FREE for c in cases) else ("uniform",)
            return ("unknown", "a select whose condition depends on the padding position")
        if any(p[0] == "iota" for p in ins):
            return self.iota_compare(e, ins)
        if any(p[0] == "masked" for p in ins):
            # (masked - masked cancels the bias: not masked any more)
            if name in ("add", "sub") and ins[0][0] == "masked" and ins[1][0] in ("uniform", "free"):
                return ins[0]
            if name == "add" and ins[1][0] == "masked" and ins[0][0] in ("uniform", "free"):
                return ins[1]
            if name in ("convert_element_type", "stop_gradient", "copy", "copy_p", "reduce_precision"):
                return ins[0]
            if name in ("exp", "exp2"):
                bias = next(p[1] for p in ins if p[0] == "masked")
                self.assumptions.append(
                    f"padded logits carry an additive bias of {bias:g}: exp() of them is taken as 0, exact "
                    f"while the logits of one row span less than {-bias - 104:g}")
                return ("const", 0.0)
            return ("uniform",)
        if all(p[0] == "const" for p in ins):
            try:
                return ("const", self.eval_on(e, [p[1] for p in ins]).reshape(-1)[0].item())
            except Exception:
                return ("uniform",)
        if name in ("add", "sub") and _is_float(e.outvars[0].aval.dtype):
            # logits + bias, with the bias very negative at padded positions: an additive mask.
            a, b = ins
            if name == "add" and a[0] == "const" and b[0] in ("uniform", "free"):
                a, b = b, a
            if b[0] == "const" and a[0] in ("uniform", "free") and np.isfinite(b[1]) and \
                    (b[1] <= LARGE_NEGATIVE_BIAS if name == "add" else -b[1] <= LARGE_NEGATIVE_BIAS):
                return ("masked", b[1] if name == "add" else -b[1])
        if name in _SAMPLED and _is_float(e.outvars[0].aval.dtype):
            got = self.sampled(e, ins)
            if got is not None:
                return got
        return ("uniform",)

    def sampled(self, e, ins):
        """Categories of the result over representative operand values (IEEE special-value algebra)."""
        pools = []
        for p, a in zip(ins, e.invars):
            if not _is_float(a.aval.dtype):
                return None
            s = _as_set(p)
            if p[0] == "const":
                pools.append([p[1]])
            elif s is not None:
                pools.append([_SPECIAL[c] for c in s])
            elif p[0] in ("uniform", "free"):
                pools.append(list(_SAMPLES))
            else:
                return None
        # One vectorised evaluation over the cross product of the pools (eager dispatch is slow).
        grids = np.meshgrid(*[np.asarray(pl, np.float64) for pl in pools], indexing="ij")
        try:
            got = self.eval_on(e, [g.reshape(-1) for g in grids]).reshape(-1)
        except Exception:  # not folded: no categories known
            return None
        cats = set()
        for x in got:
            c = _category(x)
            if c is None:
                return None
            cats.add(c)
        return ("set", frozenset(cats))

    def iota_compare(self, e, ins):
        name = e.primitive.name
        if name not in _COMPARE or len(ins) != 2 or not all(p[0] in ("iota", "const") for p in ins):
            return ("unknown", "the position index is used arithmetically")
        positions = np.arange(self.n, max(self.old_len, self.new_len))
        vals = [positions if p[0] == "iota" else np.full_like(positions, p[1]) for p in ins]
        try:
            got = self.eval_on(e, vals)
        except Exception:
            return ("unknown", f"`{name}` of the position index is not folded")
        if got.size and np.all(got == got[0]):
            return ("const", bool(got[0]))
        return ("unknown", "a mask that is not constant over the padded positions (it is not `iota < n`)")

    def _needs_padding(self, e, what):
        if self.new_len == self.n:
            self._refuse(e, f"{what} is exact only while some padding remains, and the target removes it")

    def reduction(self, e, pv, t, out_t):
        name = e.primitive.name
        axes = tuple(e.params["axes"])
        if t is None or t not in axes:
            if pv[0] == "const" and name in ("reduce_max", "reduce_min", "reduce_and", "reduce_or"):
                return pv
            s = _as_set(pv)
            if s is not None and name in ("reduce_sum", "reduce_max", "reduce_min"):
                return ("set", s | {"nan"})
            return self.uniformish(e, [pv])
        # Positions mix along the padded axis: the padding must drop out.
        if pv[0] in ("unknown", "iota", "uniform", "free"):
            self._refuse(e, f"padded positions reach `{name}` over the padded axis without a mask")
        s = _as_set(pv)
        identity = {"reduce_max": "-inf", "reduce_min": "inf", "reduce_sum": "0"}.get(name)
        if name in ("reduce_and", "reduce_or", "reduce_prod"):
            ident = {"reduce_and": True, "reduce_or": False, "reduce_prod": 1}[name]
            if pv[0] == "const" and pv[1] == ident:
                self.uses.append(f"{name} over identity {ident}")
                return None
            self._refuse(e, f"padded positions reach `{name}` holding a non-identity value")
        if identity is None:
            self._refuse(e, f"`{name}` over the padded axis")
        if pv[0] == "masked" and name == "reduce_max":
            self.uses.append("reduce_max over an additive mask")
            return None
        if s is not None and s <= {identity}:
            self.uses.append(f"{name} over {identity}")
            return None
        absorbing = {"reduce_sum": {"0", "nan", "inf", "-inf"}, "reduce_max": {"-inf", "nan", "inf"},
                     "reduce_min": {"inf", "nan", "-inf"}}[name]
        if s is not None and s <= absorbing:
            self._needs_padding(e, f"`{name}` over padding in {sorted(s)}")
            self.uses.append(f"{name} over {sorted(s)}")
            return None
        self._refuse(e, f"padded positions reach `{name}` over the padded axis with values that do not drop out")

    def dot(self, e, ins, in_t, out_t):
        (lc, rc), (lb, rb) = e.params["dimension_numbers"]
        lt, rt = in_t
        lp, rp = ins
        if lt is not None and lt in lc:
            for zero, other in ((lp, rp), (rp, lp)):
                s = _as_set(zero)
                if s is not None and s <= {"0", "nan"} and other[0] in UNIFORMISH:
                    if not (zero[0] == "const" and other[0] == "const" and np.isfinite(other[1])):
                        self._needs_padding(e, "a contraction over zeros times unknown padded values")
                    self.uses.append("dot_general over zero probabilities")
                    return None
            self._refuse(e, "a contraction over the padded axis where neither side is zero at padded positions")
        sides = [p for p, t in ((lp, lt), (rp, rt)) if t is not None]
        for p in sides:
            if p[0] in ("unknown", "iota"):
                self.uniformish(e, [p])
        if any((_as_set(p) or {"x"}) <= {"0", "nan"} for p in sides):
            return ("set", frozenset({"0", "nan"}))
        return ("uniform",)

    def attention(self, e, ins, in_t, out_t):
        """kvhoist's attention primitive masks every key at position ``>= kv_valid`` for every query."""
        qt, kt, vt = in_t
        if kt is not None or vt is not None:
            if (kt, vt) != (1, 1):
                self._refuse(e, "the padded axis is a head or feature axis of the keys")
            kv_valid = e.params.get("kv_valid")
            if kv_valid is None or kv_valid > self.n:
                self._refuse(e, f"padded keys reach attention unmasked (kv_valid={kv_valid}, {self.n} real keys)")
            vp = ins[2]
            if vp[0] in ("unknown", "iota"):
                self.uniformish(e, [vp])
            if not (vp[0] == "const" and np.isfinite(vp[1])):
                # 0-weight x inf/nan value is nan for any padding length > 0, so only lengths > 0 are safe.
                self._needs_padding(e, "masked keys with values not known to be finite")
            self.uses.append(f"{ATTENTION} masks keys >= kv_valid={kv_valid}")
        if qt is not None:
            if qt != 1:
                self._refuse(e, "the padded axis is a head or feature axis of the queries")
            return self.uniformish(e, [ins[0]])  # every padded query row attends to the same keys
        return None

    def slice_(self, e, pv, t, out_t):
        if t is None:
            self._refuse(e, "a slice produces the padded length")
        if out_t == t:
            return pv
        start, limit = e.params["start_indices"][t], e.params["limit_indices"][t]
        stride = (e.params.get("strides") or (1,) * len(e.params["start_indices"]))[t]
        count = max(0, -(-(limit - start) // stride))
        if count == 0 or start + stride * (count - 1) < self.n:
            self.uses.append("slice of real positions")
            return None
        self._refuse(e, "a slice reads padded positions")

    # -- higher-order ---------------------------------------------------------------------------------
    def higher(self, key, i, e, ins, touches):
        name = e.primitive.name
        subs = sub_jaxprs(e)
        if name in CALLS:
            (param, bi, sub), = subs
            return self.scope(sub_key(key, i, param, bi), ins)
        if name == "cond":
            outs = None
            for param, bi, sub in subs:
                got = self.scope(sub_key(key, i, param, bi), ins[1:])
                outs = got if outs is None else [join(a, b) if (a, b) != (FREE, FREE) else FREE
                                                 for a, b in zip(outs, got)]
            return outs
        if name == "scan":
            nc, nk = compat.scan_arity(e.params)
            (param, bi, sub), = subs
            skey = sub_key(key, i, param, bi)
            carry = list(ins[nc:nc + nk])
            for _ in range(6):
                outs = self.scope(skey, ins[:nc] + carry + ins[nc + nk:])
                new = [a if a == b else (FREE if a == FREE == b else join(a, b)) for a, b in zip(carry, outs[:nk])]
                if new == carry:
                    return outs
                carry = new
            self._refuse(e, "no fixpoint for padded loop-carried values")
        if name == "while":
            cn, bn = e.params["cond_nconsts"], e.params["body_nconsts"]
            carry = list(ins[cn + bn:])
            for _ in range(6):
                self.scope(sub_key(key, i, "cond_jaxpr", None), ins[:cn] + carry)
                outs = self.scope(sub_key(key, i, "body_jaxpr", None), ins[cn:cn + bn] + carry)
                new = [a if a == b else join(a, b) for a, b in zip(carry, outs)]
                if new == carry:
                    return outs
                carry = new
            self._refuse(e, "no fixpoint for padded loop-carried values")
        if touches:
            self._refuse(e, f"padded values reach `{name}`, whose body the layout pass does not see through")
        return [None] * len(e.outvars)


# --- structural checks ----------------------------------------------------------------------------------

def check_class(dims: DimAnalysis, klass: set, cands: dict) -> None:
    """Raise :class:`Refused` unless every slot of ``klass`` can be resized."""
    top = dims.scopes[()]
    top_in, top_out = set(top.invars), {v for v in top.outvars if is_var(v)}
    for key, i, why in dims.opaque:
        e = dims.scopes[key].eqns[i]
        atoms = [a for a in list(e.invars) + list(e.outvars) if is_var(a)]
        if any((key, a, k) in klass for a in atoms for k in range(len(a.aval.shape))):
            raise Refused(f"the padded axis reaches an equation the pass cannot see through: {why}")
    for slot in klass:
        if slot in dims.scanned:
            raise Refused("a loop iterates over the padded axis")
    for key, var, ax in klass:
        sc = dims.scopes[key]
        if key == () and var in top_in:
            raise Refused("the padded axis is an input of the program (its shape is fixed by the caller)")
        if key == () and var in top_out:
            raise Refused("padded positions reach an output of the program")
        i = dims.producer.get((key, var))
        if i is None:
            continue  # a constvar (extended) or a bound sub-jaxpr input
        e = sc.eqns[i]
        if sub_jaxprs(e) or (key, i) in cands:
            continue
        name = e.primitive.name
        if name in ("iota", "broadcast_in_dim"):
            continue  # shapes come from params, which are rewritten
        edges = first_order_edges(e) or []
        if any(b is var and bx == ax and is_var(a) and (key, a, ax_a) in klass for a, ax_a, b, bx in edges) or \
                any(a is var and ax_a == ax and is_var(b) and (key, b, bx) in klass for a, ax_a, b, bx in edges):
            continue
        raise Refused(f"`{name}` creates an axis that must match the padded one, and cannot be resized")


