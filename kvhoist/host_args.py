"""The host-loop wrapper's arguments (internal to :mod:`kvhoist.host`): which are static, invariant, varying.

:class:`ArgBinder` owns the wrapped function's signature and the ``*_argnums`` / ``*_argnames`` options
(resolved both ways through the signature, as ``jax.jit`` does). Per call *shape* (number of positional
arguments, keyword names) it binds the signature once (``inspect.Signature.bind``) into an
:class:`ArgPlan`, which then picks a call's static / invariant / varying values with
``operator.itemgetter``. :meth:`ArgBinder.bind` flattens a call into a :class:`Call` (the slow path's
view: layout, leaves, avals) and :meth:`ArgBinder.rebuild` inverts it when the step is traced.
"""

from __future__ import annotations

import dataclasses
import inspect
import operator
import threading
from typing import Any, Callable, Sequence

import jax

from kvhoist import compat
from kvhoist.errors import KvhoistError

STATIC, INVARIANT, VARYING = "static", "invariant", "varying"
# Bound once: the hit path calls these directly (jax.tree_util.tree_flatten is a Python wrapper of this).
tree_flatten = jax.tree_util.default_registry.flatten
trace_context = compat.trace_context  # what jax.jit keys its traces on (x64, default device, ...)


def _picker(sources: Sequence) -> Callable[[tuple, dict], tuple]:
    """``(args, kwargs) -> values`` at ``sources`` (an int: a position; a str: a keyword)."""
    sources = tuple(sources)
    if all(isinstance(s, int) for s in sources):
        if not sources:
            return lambda args, kwargs: ()
        if len(sources) == 1:
            (i,) = sources
            return lambda args, kwargs: (args[i],)
        get = operator.itemgetter(*sources)
        return lambda args, kwargs: get(args)
    return lambda args, kwargs: tuple(args[s] if isinstance(s, int) else kwargs[s] for s in sources)


class ArgPlan:
    """Where the static, invariant and varying values of one call shape (number of positional
    arguments, keyword names) come from. Built once per call shape with ``inspect.Signature.bind``;
    calls of that shape then pick their values with ``operator.itemgetter``.

    ``canon`` is shared by the plans of every call shape that binds the same slots (``f(a, b=1)`` and
    ``f(b=1, a=a)`` are the same program), so it can stand for the slots in a dictionary key.
    """

    __slots__ = ("slots", "canon", "static_slots", "static", "inv", "var")

    def __init__(self, slots: tuple, sources: Sequence, canon: object):
        self.slots = slots          # ((slot id, class), ...) in canonical (signature) order
        self.canon = canon
        self.static_slots = tuple(s for s, c in slots if c == STATIC)
        self.static = _picker([src for (_s, c), src in zip(slots, sources) if c == STATIC])
        self.inv = _picker([src for (_s, c), src in zip(slots, sources) if c == INVARIANT])
        self.var = _picker([src for (_s, c), src in zip(slots, sources) if c == VARYING])


@dataclasses.dataclass(frozen=True)
class Layout:
    """The structure of one call: its slots, static values, and the pytree structures of the rest."""

    slots: tuple            # ((slot id, class), ...) in call order; a slot id is a name or ("*", k) / ("**", key)
    static: tuple           # ((slot id, value), ...): hashable
    static_types: tuple     # type of each static value: like jax.jit, f(x, 2) and f(x, 2.0) differ
    inv_tree: Any
    var_tree: Any


def static_key(values: tuple) -> tuple:
    """Static values keyed by value AND type (``2 == 2.0 == True`` but they trace differently)."""
    return tuple([(v.__class__, v) for v in values]) if values else ()


class Call:
    """One call's arguments, flattened (the slow path). Avals are computed lazily: on a cache hit the
    invariant leaves' avals are those recorded with the entry (same objects)."""

    __slots__ = ("layout", "inv_leaves", "var_leaves", "var_args", "context", "var_avals", "_inv_avals")

    def __init__(self, layout: Layout, inv_leaves: list, var_leaves: list, var_args: tuple, context: tuple):
        self.layout, self.inv_leaves, self.var_leaves = layout, inv_leaves, var_leaves
        self.var_args, self.context = var_args, context
        self.var_avals = avals(var_leaves)
        self._inv_avals = None

    @property
    def inv_avals(self) -> tuple:
        if self._inv_avals is None:
            self._inv_avals = avals(self.inv_leaves)
        return self._inv_avals

    @property
    def key(self) -> tuple:
        """The program key: layout (structure, static values and types), jax's trace context (x64,
        ...) and every leaf's aval."""
        return (self.layout, self.context, self.inv_avals, self.var_avals)


def avals(leaves: Sequence) -> tuple:
    try:
        return tuple(jax.typeof(x) for x in leaves)
    except TypeError as err:
        raise TypeError(f"hoist_invariants: an argument has a leaf that is not an array or scalar: {err}") from err


def is_jax_type(x: Any) -> bool:
    """Whether jax can trace ``x`` (an array, a scalar, a tracer)."""
    try:
        jax.typeof(x)
    except TypeError:
        return False
    return True


def is_tracer(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def signature_of(leaves: Sequence) -> tuple:
    """Shape, dtype and weak type of each leaf (concrete or traced): what the step was traced for."""
    return tuple((a.shape, a.dtype, getattr(a, "weak_type", False)) for a in map(jax.typeof, leaves))


def taker(indices: Sequence[int], n: int) -> Callable[[Sequence], Sequence]:
    """``leaves -> [leaves[i] for i in indices]`` of ``n`` leaves, with ``operator.itemgetter`` (C speed);
    the leaves themselves when that is all of them, in order (the step reads every weight)."""
    indices = tuple(indices)
    if indices == tuple(range(n)):
        return lambda leaves: leaves
    if not indices:
        return lambda leaves: ()
    if len(indices) == 1:
        (i,) = indices
        return lambda leaves: (leaves[i],)
    return operator.itemgetter(*indices)


_NONE = object()


class ArgBinder:
    """The wrapped function's signature and argument classes, and the call-shape plans.

    Args:
      fun: the wrapped function (its ``inspect.signature``, when it has one).
      name: its name, for messages.
      invariant_argnums, invariant_argnames, static_argnums, static_argnames, donate_argnums,
        donate_argnames: normalized tuples, as given to ``hoist_invariants``.

    Raises ``ValueError`` / ``TypeError`` / :class:`KvhoistError` for options that do not fit the
    signature (one message naming the argument and the fix).
    """

    def __init__(self, fun: Callable, name: str, invariant_argnums: tuple, invariant_argnames: tuple,
                 static_argnums: tuple, static_argnames: tuple, donate_argnums: tuple, donate_argnames: tuple):
        self.name = name
        try:
            self.signature: inspect.Signature | None = inspect.signature(fun)
        except (TypeError, ValueError):
            self.signature = None
        (self.invariant_argnums, self.invariant_argnames, self.static_argnums,
         self.static_argnames) = self._resolve(invariant_argnums, invariant_argnames, static_argnums, static_argnames)
        self.donate_argnums, self.donate_argnames = self._resolve_donated(donate_argnums, donate_argnames)
        self.plans: dict = {}             # call shape (len(args), *kwargs names) -> ArgPlan
        self._canon: dict = {}            # slots -> token shared by the plans binding the same slots
        self._lock = threading.Lock()

    # -- validation ------------------------------------------------------------------------------
    def positional_params(self) -> list:
        if self.signature is None:
            return []
        return [p for p in self.signature.parameters.values()
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]

    def _what(self) -> str:
        return f"{self.name}{self.signature if self.signature is not None else '(...)'}"

    def _resolve(self, inv_nums, inv_names, st_nums, st_names):
        sig = self.signature
        pos = self.positional_params()
        params = {} if sig is None else dict(sig.parameters)
        has_varargs = any(p.kind == p.VAR_POSITIONAL for p in params.values())
        has_varkw = any(p.kind == p.VAR_KEYWORD for p in params.values())
        what = self._what()

        def norm_num(i: int, kind: str) -> int:
            if not isinstance(i, int) or isinstance(i, bool):
                raise TypeError(f"hoist_invariants: {kind}_argnums entries must be ints, got {i!r}")
            if sig is None or has_varargs:
                if i < 0:
                    raise ValueError(f"hoist_invariants: {kind}_argnums={i} is negative, but {what} takes "
                                     "*args (or has no signature); use a non-negative position")
                return i
            if not -len(pos) <= i < len(pos):
                raise ValueError(f"hoist_invariants: {kind}_argnums={i} is out of range: {what} has "
                                 f"{len(pos)} positional parameter(s) "
                                 f"({', '.join(p.name for p in pos) or 'none'})")
            return i % len(pos)

        def check_name(n: str, kind: str) -> str:
            if not isinstance(n, str):
                raise TypeError(f"hoist_invariants: {kind}_argnames entries must be str, got {n!r}")
            if sig is not None and not has_varkw and n not in params:
                raise ValueError(f"hoist_invariants: {kind}_argnames={n!r} is not a parameter of {what}")
            if n in params and params[n].kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
                raise ValueError(f"hoist_invariants: {kind}_argnames={n!r} names the variadic parameter of "
                                 f"{what}; name individual arguments instead")
            return n

        inv_nums = tuple(norm_num(i, "invariant") for i in inv_nums)
        st_nums = tuple(norm_num(i, "static") for i in st_nums)
        inv_names = tuple(check_name(n, "invariant") for n in inv_names)
        st_names = tuple(check_name(n, "static") for n in st_names)
        # Resolve argnums <-> argnames through the signature, as jax.jit does.
        idx = {p.name: i for i, p in enumerate(pos)}
        inv_nums = tuple(sorted(set(inv_nums) | {idx[n] for n in inv_names if n in idx}))
        st_nums = tuple(sorted(set(st_nums) | {idx[n] for n in st_names if n in idx}))
        inv_names = tuple(sorted(set(inv_names) | {pos[i].name for i in inv_nums if i < len(pos)}))
        st_names = tuple(sorted(set(st_names) | {pos[i].name for i in st_nums if i < len(pos)}))
        if not inv_nums and not inv_names:
            raise ValueError(f"hoist_invariants: host-loop hoisting of {what} needs at least one invariant "
                             "argument (invariant_argnums= or invariant_argnames=)")
        for i in sorted(set(inv_nums) & set(st_nums)):
            label = f"argument {i}" + (f" ({pos[i].name!r})" if i < len(pos) else "")
            raise ValueError(f"hoist_invariants: {label} of {what} is static (static_argnums/"
                             "static_argnames) and cannot also be invariant: static arguments are already "
                             "compile-time constants; drop it from invariant_argnums/invariant_argnames")
        for n in sorted(set(inv_names) & set(st_names)):
            raise ValueError(f"hoist_invariants: argument {n!r} of {what} is static and cannot also be "
                             "invariant; drop it from invariant_argnums/invariant_argnames")
        return inv_nums, inv_names, st_nums, st_names

    def _resolve_donated(self, nums: tuple, names: tuple) -> tuple[tuple, tuple]:
        """``donate_argnums`` / ``donate_argnames`` completed through the signature; only varying arguments
        may be donated (one error naming why for an invariant or static one)."""
        pos = self.positional_params()
        what = self._what()
        params = {} if self.signature is None else dict(self.signature.parameters)
        has_varkw = any(p.kind == p.VAR_KEYWORD for p in params.values())
        for n in names:
            if self.signature is not None and not has_varkw and n not in params:
                raise ValueError(f"hoist_invariants: donate_argnames={n!r} is not a parameter of {what}")
        idx = {p.name: i for i, p in enumerate(pos)}
        if self.signature is not None and not any(p.kind == p.VAR_POSITIONAL for p in params.values()):
            for i in nums:
                if not -len(pos) <= i < len(pos):
                    raise ValueError(f"hoist_invariants: donate_argnums={i} is out of range: {what} has "
                                     f"{len(pos)} positional parameter(s)")
            nums = tuple(i % len(pos) for i in nums)
        nums = tuple(sorted(set(nums) | {idx[n] for n in names if n in idx}))
        names = tuple(sorted(set(names) | {pos[i].name for i in nums if 0 <= i < len(pos)}))
        for i, n in [(i, None) for i in nums] + [(None, n) for n in names]:
            label = repr(n) if n is not None else f"{i}" + (f" ({pos[i].name!r})" if 0 <= i < len(pos) else "")
            if (i is not None and i in self.invariant_argnums) or n in self.invariant_argnames:
                raise KvhoistError(
                    f"hoist_invariants: argument {label} of {what} is invariant and cannot be donated: its "
                    "arrays stay cached across calls (the prologue's results are keyed on them and the step "
                    "may read them again), so they must stay alive; donate only varying arguments")
            if (i is not None and i in self.static_argnums) or n in self.static_argnames:
                raise ValueError(f"hoist_invariants: argument {label} of {what} is static and cannot be donated")
        return nums, names

    def donated(self, slot: Any) -> bool:
        """Whether the argument in ``slot`` (a name, ``("*", k)`` or ``("**", key)``) is donated."""
        if isinstance(slot, str):
            name, position = slot, {p.name: i for i, p in enumerate(self.positional_params())}.get(slot)
        elif slot[0] == "*":
            name = None
            position = len(self.positional_params()) + slot[1] if self.signature is not None else slot[1]
        else:
            name, position = slot[1], None
        return (position is not None and position in self.donate_argnums) or name in self.donate_argnames

    # -- binding a call ---------------------------------------------------------------------------
    def _classify(self, slot: Any, position: int | None) -> str:
        name = slot if isinstance(slot, str) else (slot[1] if slot[0] == "**" else None)
        if (position is not None and position in self.static_argnums) or name in self.static_argnames:
            return STATIC
        if (position is not None and position in self.invariant_argnums) or name in self.invariant_argnames:
            return INVARIANT
        return VARYING

    def plan(self, args: tuple, kwargs: dict) -> ArgPlan:
        """The :class:`ArgPlan` of this call's shape: cached, or bound now (raising the signature's
        ``TypeError`` for a call that does not fit)."""
        shape = (len(args), *kwargs) if kwargs else len(args)
        plan = self.plans.get(shape)
        if plan is not None:
            return plan
        sig = self.signature
        slots, sources = [], []
        if sig is None:
            if kwargs:
                raise TypeError(f"{self.name} has no inspectable signature; pass arguments positionally")
            for i in range(len(args)):
                slots.append((("*", i), self._classify(("*", i), i)))
                sources.append(i)
        else:
            try:
                bound = sig.bind(*args, **kwargs)
            except TypeError as err:
                raise TypeError(f"{self.name}{sig}: {err}") from None
            pos_index = {p.name: i for i, p in enumerate(self.positional_params())}
            npos = len(pos_index)
            for name, value in bound.arguments.items():
                kind = sig.parameters[name].kind
                if kind == inspect.Parameter.VAR_POSITIONAL:
                    for k in range(len(value)):
                        slots.append((("*", k), self._classify(("*", k), npos + k)))
                        sources.append(npos + k)
                elif kind == inspect.Parameter.VAR_KEYWORD:
                    for key in value:
                        slots.append((("**", key), self._classify(("**", key), None)))
                        sources.append(key)
                else:
                    i = pos_index.get(name)
                    slots.append((name, self._classify(name, i)))
                    sources.append(i if i is not None and i < len(args) else name)
        slots = tuple(slots)
        with self._lock:
            canon = self._canon.setdefault(slots, object())
            plan = ArgPlan(slots, sources, canon)
            if len(self.plans) >= 256:  # call shapes are few; bound the table anyway
                self.plans.clear()
            self.plans[shape] = plan
        return plan

    def bind(self, args: tuple, kwargs: dict, plan: ArgPlan | None = None, inv_flat: tuple | None = None) -> Call:
        """This call flattened (``inv_flat``: the invariant leaves and treedef when already flattened)."""
        plan = self.plan(args, kwargs) if plan is None else plan
        statics = plan.static(args, kwargs)
        for slot, v in zip(plan.static_slots, statics):
            try:
                hash(v)
            except TypeError as err:
                raise TypeError(f"hoist_invariants: static argument {slot!r} of {self.name} is not "
                                f"hashable ({type(v).__name__}); pass a hashable value") from err
        inv_leaves, inv_tree = tree_flatten(plan.inv(args, kwargs)) if inv_flat is None else inv_flat
        var_args = plan.var(args, kwargs)
        var_leaves, var_tree = tree_flatten(var_args)
        layout = Layout(plan.slots, tuple(zip(plan.static_slots, statics)), tuple(type(v) for v in statics),
                        inv_tree, var_tree)
        try:
            return Call(layout, inv_leaves, var_leaves, var_args, trace_context())
        except TypeError as err:
            hint = self.not_an_array_error(layout, VARYING, var_args)
            if hint is None:
                raise
            raise hint from err

    def not_an_array_error(self, layout: Layout, cls: str, values: Sequence) -> TypeError | None:
        """The error for an argument of class ``cls`` (varying or invariant; ``values`` in slot order) that
        holds something jax cannot trace (a settings object, a string): it names the argument and the
        ``static_argnames`` / ``static_argnums`` that would fix it. None if every leaf is an array or scalar."""
        slots = [slot for slot, c in layout.slots if c == cls]
        for slot, value in zip(slots, values):
            bad = next((leaf for leaf in jax.tree_util.tree_leaves(value) if not is_jax_type(leaf)), _NONE)
            if bad is _NONE:
                continue
            if isinstance(slot, str) or slot[0] == "**":
                name = slot if isinstance(slot, str) else slot[1]
                label, fix = repr(name), f'static_argnames=("{name}",)'
            else:
                pos = len(self.positional_params()) + slot[1] if self.signature is not None else slot[1]
                label, fix = f"at position {pos}", f"static_argnums=({pos},)"
            what = type(value).__name__ + ("" if bad is value else f" holding a {type(bad).__name__}")
            role = ("a traced (varying) input" if cls == VARYING
                    else "an invariant input (invariant arguments are arrays whose results are cached)")
            return TypeError(
                f"hoist_invariants: argument {label} of {self.name} is a {what}, not an array or scalar, so it "
                f"cannot be {role}; if it is a setting that is the same for a compiled program (like wan_ref's "
                f"`plan`), declare it static: hoist_invariants({self.name}, {fix}, ...)")
        return None

    def rebuild(self, layout: Layout, inv_leaves: Sequence, var_leaves: Sequence) -> tuple[tuple, dict]:
        """``(args, kwargs)`` for the function from the flat leaves (the inverse of :meth:`bind`)."""
        inv = iter(jax.tree_util.tree_unflatten(layout.inv_tree, list(inv_leaves)))
        var = iter(jax.tree_util.tree_unflatten(layout.var_tree, list(var_leaves)))
        static = dict(layout.static)
        star, starstar, values = [], {}, {}
        for slot, cls in layout.slots:
            v = static[slot] if cls == STATIC else next(inv) if cls == INVARIANT else next(var)
            if isinstance(slot, tuple) and slot[0] == "*":
                star.append(v)
            elif isinstance(slot, tuple):
                starstar[slot[1]] = v
            else:
                values[slot] = v
        if self.signature is None:
            return tuple(star), {}
        for p in self.signature.parameters.values():
            if p.kind == p.VAR_POSITIONAL:
                values[p.name] = tuple(star)
            elif p.kind == p.VAR_KEYWORD:
                values[p.name] = starstar
        bound = inspect.BoundArguments(self.signature, {k: values[k] for k in self.signature.parameters
                                                        if k in values})
        return bound.args, bound.kwargs
