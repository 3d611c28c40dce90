"""The layout pass: re-pad masked token axes to a target's MXU tile.

maxdiffusion pads Wan's 257 CLIP image tokens to 384 (128-aligned) for TPU v4/v5 and to 512
(256-aligned) for v6e/v7x by editing model code per device. This pass does it on the traced program:
it finds a token axis padded up to an alignment, proves that the padded positions cannot change any
output, and rewrites the padding — and every shape downstream of it — for the target.

What it looks for (a *candidate*):
  * ``pad`` on one axis with ``(low=0, high=h, interior=0)`` from ``n`` to ``L = n + h`` where ``L`` is
    ``ceil(n/a)·a`` for a power-of-two alignment ``a >= 8``; or
  * ``concatenate([x, fill], axis)`` with a uniform constant ``fill`` (zeros) of the same kind.

What it proves before rewriting (otherwise the program is returned unchanged, reason in the report):
  1. Dimensions (:mod:`kvhoist.analysis.dims`): every slot that must change size with the padded axis
     — through elementwise ops, reshapes, ``dot_general``, the layer ``scan``, expert ``cond``
     branches, ``jit`` calls — is one the pass can resize: no program input or output, no axis that
     a loop iterates over, no opaque primitive, no second ``pad`` / ``concatenate`` creating it.
  2. Values: an abstract interpretation tracks, for each padded value, what its padded positions hold
     (one value repeated at every padded position, sometimes a known constant or one of
     ``{0, ±inf, nan}``; or the position index itself for an ``iota``). Positions ``< n`` only ever
     depend on positions ``< n``. Where positions *mix* — a reduction, a contraction over the axis, a
     slice — the padded positions must provably drop out: ``reduce_max`` sees ``-inf``, ``reduce_sum``
     and ``dot_general`` see ``0`` (or ``nan`` / ``±inf``, which give the same ``nan`` / ``inf`` for
     any padding length > 0), a slice reads only positions ``< n``. The pad's own fill value does
     *not* count as a mask: padded positions must be excluded by a ``select_n`` / ``where`` on a mask
     built from ``iota < n`` or a constant keep-mask, or by an additive bias ``<= -1e4`` (then
     ``exp`` underflowing to 0 is an assumption, stated in the report).
  3. No padded value reaches a program output.

Then the new program has the same real positions, more (or fewer) copies of the same padded
positions, and — by 2 — the same outputs (up to floating-point summation order).

Example:
    >>> closed = jax.make_jaxpr(lambda m, *a: m(*a))(model, x, t, text, image)
    >>> new, report = repad_tokens(closed, "v6e")        # 257 -> 384 becomes 257 -> 512
    >>> print(report.table())
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp
import numpy as np

from kvhoist import compat
from kvhoist.analysis import cost
from kvhoist.analysis.dims import (ATTENTION, CALLS, ELEMENTWISE, REDUCTIONS, SAME_SHAPE_AXIS_OPS, DimAnalysis,
                                   first_order_edges, is_var, sub_jaxprs, sub_key)
from kvhoist.ir import aval_bytes
from kvhoist.report import Note, Report, Skipped, human_bytes, human_flops, signed

__all__ = ["repad_tokens", "Refused", "MIN_ALIGNMENT", "LARGE_NEGATIVE_BIAS"]

#: Smallest alignment a pad must reach to count as token padding (smaller pads are not layout).
MIN_ALIGNMENT = 8
#: An additive bias at most this is accepted as a mask (``exp`` of it underflows to 0 in float32).
LARGE_NEGATIVE_BIAS = -1e4


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


#: numpy versions of the elementwise primitives the analysis evaluates most (IEEE semantics as XLA's,
#: except max/min, which propagate nan in both).
_NUMPY = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide, "neg": np.negative,
    "exp": np.exp, "exp2": np.exp2, "max": np.maximum, "min": np.minimum, "abs": np.abs,
    "stop_gradient": lambda x: x, "copy": lambda x: x, "copy_p": lambda x: x,
    "convert_element_type": lambda x: x,  # the result is cast to the output dtype
    "lt": np.less, "le": np.less_equal, "gt": np.greater, "ge": np.greater_equal, "eq": np.equal,
    "ne": np.not_equal, "and": np.bitwise_and, "or": np.bitwise_or, "not": np.invert,
}


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
        args = [np.asarray(v, _np_dtype(a.aval)) for v, a in zip(values, e.invars)]
        out_dtype = _np_dtype(e.outvars[0].aval)
        fn = _NUMPY.get(e.primitive.name)
        if e.primitive.name == "div" and not _is_float(out_dtype):
            fn = None  # integer division rounds toward zero in lax
        with np.errstate(all="ignore"):
            if fn is not None:  # numpy for the common cases: no XLA compile per equation
                return np.asarray(fn(*args)).astype(out_dtype)
            return np.asarray(compat.eval_primitive(e.primitive, args, e.params))

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
        got = self.eval_on(e, [g.reshape(-1) for g in grids]).reshape(-1)
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
        got = self.eval_on(e, vals)
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


# --- the rewrite ----------------------------------------------------------------------------------------

class Rewriter:
    def __init__(self, dims: DimAnalysis, klass: set, n: int, new_len: int, cands: dict,
                 kernel_block: int | None = None):
        self.dims, self.n, self.new_len, self.cands = dims, n, new_len, cands
        self.kernel_block = kernel_block  # the attention kernel's KV block for resized keys
        self.axes: dict = {}
        for key, var, ax in klass:
            self.axes.setdefault((key, var), set()).add(ax)
        self.old_bytes = 0
        self.new_bytes = 0

    def new_shape(self, key, v):
        axes = self.axes.get((key, v))
        if not axes:
            return None
        return tuple(self.new_len if k in axes else d for k, d in enumerate(v.aval.shape))

    def var(self, key, v, vmap):
        shape = self.new_shape(key, v)
        if shape is None:
            return v
        nv = compat.new_var(compat.resize_aval(v.aval, shape))
        self.old_bytes += aval_bytes(v.aval)
        self.new_bytes += aval_bytes(nv.aval)
        vmap[v] = nv
        return nv

    def extend_const(self, key, v, c):
        (ax,) = self.axes[(key, v)]
        arr = np.asarray(c)
        m = self.new_len - self.n
        pad = np.repeat(np.take(arr, [self.n], axis=ax), m, axis=ax) if m else np.take(arr, [], axis=ax)
        return np.concatenate([np.take(arr, np.arange(self.n), axis=ax), pad], axis=ax).astype(arr.dtype)

    def scope(self, key) -> tuple[Any, bool]:
        sc = self.dims.scopes[key]
        vmap: dict = {}
        changed = False
        constvars, consts = [], []
        for v, c in zip(sc.constvars, sc.consts):
            nv = self.var(key, v, vmap)
            constvars.append(nv)
            consts.append(self.extend_const(key, v, c) if nv is not v else c)
            changed |= nv is not v
        invars = [self.var(key, v, vmap) for v in sc.invars]
        changed |= any(a is not b for a, b in zip(invars, sc.invars))
        eqns = []
        for i, e in enumerate(sc.eqns):
            ne = self.eqn(key, i, e, vmap)
            changed |= ne is not e
            eqns.append(ne)
        outvars = [vmap.get(a, a) if is_var(a) else a for a in sc.outvars]
        if not changed:
            return sc.jaxpr, False
        return compat.rebuild_like(sc.jaxpr, constvars, consts, invars, outvars, eqns), True

    def eqn(self, key, i, e, vmap):
        invars = [vmap.get(a, a) if is_var(a) else a for a in e.invars]
        params = dict(e.params)
        sub_changed = False
        for param, bi, sub in sub_jaxprs(e):
            new, ch = self.scope(sub_key(key, i, param, bi))
            if ch:
                sub_changed = True
                if bi is None:
                    params[param] = new
                else:
                    lst = list(params[param])
                    lst[bi] = new
                    params[param] = tuple(lst)
        outvars = [self.var(key, o, vmap) if is_var(o) else o for o in e.outvars]
        out_changed = any(a is not b for a, b in zip(outvars, e.outvars))
        in_changed = any(a is not b for a, b in zip(invars, e.invars))
        if not (out_changed or in_changed or sub_changed):
            return e
        prim = e.primitive
        name = prim.name
        cand = self.cands.get((key, i))
        if cand is not None:
            cfg = [(0, 0, 0)] * len(outvars[0].aval.shape)
            cfg[cand.axis] = (0, self.new_len - cand.n, 0)
            fill = cand.fill
            fill = vmap.get(fill, fill) if is_var(fill) else fill
            pad_p = prim if name == "pad" else _pad_primitive()
            return compat.make_eqn([invars[0], fill], outvars, pad_p, {"padding_config": tuple(cfg)}, like=e)
        new_shape = tuple(outvars[0].aval.shape) if outvars and is_var(outvars[0]) else None
        if name in ("iota", "broadcast_in_dim"):
            params["shape"] = new_shape
        elif name == "reshape":
            params["new_sizes"] = new_shape
        elif name == "slice":
            axes = self.axes.get((key, e.outvars[0]), set())
            params["limit_indices"] = tuple(self.new_len if k in axes else d
                                            for k, d in enumerate(params["limit_indices"]))
        elif name == "dynamic_slice":
            params["slice_sizes"] = new_shape
        elif name == ATTENTION and invars[1] is not e.invars[1] and self.kernel_block \
                and self.new_len % self.kernel_block == 0:
            params["block_kv"] = self.kernel_block
        # Other primitives (elementwise, dot_general, reductions, calls, loops) take their shapes from
        # their operands; effects do not change (resizing adds none).
        return compat.make_eqn(invars, outvars, prim, params, like=e)


def _pad_primitive():
    import jax

    return jax.lax.pad_p


# --- the pass -------------------------------------------------------------------------------------------

def _new_length(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


@dataclasses.dataclass
class _Repadded:
    """One class of padded slots rewritten to ``new_len``."""

    jaxpr: Any
    new_len: int
    resized: int
    extra_bytes: int
    bytes_after: int
    flops_before: Any
    flops_after: Any
    uses: list
    assumptions: list


def _classes(current: Any, done: set):
    """The next class of token-padding candidates not yet handled: ``(dims, first, group, klass)`` or None."""
    dims = DimAnalysis(current)
    every = find_candidates(dims)
    cands = [c for c in every if (c.key, c.index) not in done]
    if not cands:
        return None
    c = cands[0]
    klass = set(dims.class_of((c.key, c.out, c.axis)))
    group = [d for d in every if (d.key, d.out, d.axis) in klass]
    done.update((d.key, d.index) for d in group)
    return dims, c, group, klass


def _feeds_kernel(dims: DimAnalysis, klass: set) -> bool:
    """Whether the padded axis is the key axis of a splash-attention call (the kernel needs its block)."""
    for key, _i, e in dims.iter_eqns():
        if e.primitive.name == ATTENTION and e.params.get("impl") == "splash" and \
                any((key, a, 1) in klass for a in e.invars[1:3] if is_var(a)):
            return True
    return False


def _repad(current: Any, dims: DimAnalysis, c: Candidate, group: list, klass: set, new_len: int,
           kernel_block: int | None) -> _Repadded:
    """Rewrite ``klass`` to ``new_len`` positions, or raise :class:`Refused` with the reason."""
    gmap = {(d.key, d.index): d for d in group}
    check_class(dims, klass, gmap)
    va = ValueAnalysis(dims, klass, c.n, c.length, new_len, group)
    va.run()
    rw = Rewriter(dims, klass, c.n, new_len, gmap, kernel_block)
    new, _changed = rw.scope(())
    compat.check(new)
    return _Repadded(new, new_len, len(rw.axes), rw.new_bytes - rw.old_bytes, rw.new_bytes,
                     cost.jaxpr_flops_run(current), cost.jaxpr_flops_run(new), list(va.uses), list(va.assumptions))


def _extra_flops(r: _Repadded):
    if r.flops_before is None or r.flops_after is None:
        return None
    return r.flops_after - r.flops_before


def _repad_message(c: Candidate, r: _Repadded, align: int, target_name: str) -> str:
    extra = _extra_flops(r)
    per_it = ""
    if r.flops_after is not None and r.flops_before is not None and \
            r.flops_after.per_iteration != r.flops_before.per_iteration:
        per_it = (f" ({signed(r.flops_after.per_iteration - r.flops_before.per_iteration)} per iteration of loops "
                  f"with an unknown trip count)")
    how = "; ".join(dict.fromkeys(r.uses)) or "no position-mixing use"
    msg = (f"{c.describe()}: {c.n} tokens padded to {c.length} ({c.alignment}-aligned) -> {r.new_len} "
           f"({align}-aligned for {target_name}); {r.resized} values resized, {signed(extra)} per run{per_it}, "
           f"{signed(r.extra_bytes, 'bytes')} of padded values; padding provably masked by: {how}")
    if r.assumptions:
        msg += "; assuming " + "; ".join(dict.fromkeys(r.assumptions))
    return msg


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
    while (found := _classes(current, done)) is not None:
        dims, c, group, klass = found
        new_len = _new_length(c.n, align)
        name, src = c.describe(), compat.source_line(c.eqn)
        if any(d.n != c.n or d.length != c.length for d in group):
            report.skipped.append(Skipped(name, src, "pads of different lengths share one axis"))
            continue
        if new_len == c.length:
            report.notes.append(Note("repad", f"{name}: {c.n} -> {c.length} tokens is already "
                                              f"{align}-aligned for {tgt.name}; unchanged"))
            continue
        try:
            r = _repad(current, dims, c, group, klass, new_len, align if _feeds_kernel(dims, klass) else None)
        except Refused as why:
            report.skipped.append(Skipped(name, src, f"token padding {c.n} -> {c.length} left unchanged: {why}"))
            report.notes.append(Note("repad", f"{name}: left unchanged ({why})"))
            continue
        report.notes.append(Note("repad", _repad_message(c, r, align, tgt.name), r.extra_bytes))
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
    while (found := _classes(current, done)) is not None:
        dims, c, group, klass = found
        name, src = c.describe(), compat.source_line(c.eqn)
        if any(d.n != c.n or d.length != c.length for d in group):
            report.skipped.append(Skipped(name, src, "pads of different lengths share one axis"))
            continue
        if _feeds_kernel(dims, klass):
            new_len = _new_length(c.n, tile)
            if new_len == c.length:
                report.notes.append(Note("layout", f"{name}: {c.n} -> {c.length} splash-attention keys are "
                                                   f"already {tile}-aligned for {tgt.name}"))
                continue
            try:
                r = _repad(current, dims, c, group, klass, new_len, tile)
            except Refused as why:
                report.skipped.append(Skipped(name, src, f"splash keys {c.n} -> {c.length} not re-padded: {why}"))
                continue
            report.notes.append(Note("layout", "splash-attention keys: " + _repad_message(c, r, tile, tgt.name),
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
            align_of.setdefault(_new_length(c.n, a), a)   # the smallest alignment giving that length
    lengths = sorted(set(align_of) | {c.length})
    options: dict = {}
    refusals: dict = {}
    for new_len in lengths:
        if new_len == c.length:
            continue
        try:
            options[new_len] = _repad(current, dims, c, group, klass, new_len, None)
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
    report.notes.append(Note("layout", msg + "; " + _repad_message(c, r, align_of[best], target_name),
                             r.extra_bytes))
    return r.jaxpr


def _compiled_choice(current, candidate: _Repadded, traced_len: int, cand_len: int, tgt) -> tuple[int, str]:
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
    padded = _new_length(s, tile)
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
        pre.append(compat.make_eqn([x, zero], [out], _pad_primitive(), {"padding_config": tuple(cfg)}, like=e))
        new_ops.append(out)
    params["kv_valid"] = s if kv_valid is None else min(kv_valid, s)
    params["block_kv"] = tile
    notes.append(Note("layout", f"splash attention at {where}: keys padded {s} -> {padded} for the kernel's "
                                f"{tile}-block (masked: kv_valid={params['kv_valid']})",
                      sum(aval_bytes(o.aval) - aval_bytes(x.aval) for o, x in zip(new_ops, (k, v)))))
    return pre, e.replace(invars=[q] + new_ops, params=params)
