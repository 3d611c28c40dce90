"""The host-loop wrapper's cache of prologue results (internal to :mod:`kvhoist.host`).

An entry holds the prologue's results for one set of invariant leaves, identified as the module
docstring of :mod:`kvhoist.host` says: ``jax.Array``s by the very object (weak references; a dead one
drops its entries at once, so a recycled ``id`` is never matched), numpy arrays by a private snapshot of
their contents, scalars by exact value. :class:`PrologueCache` is the LRU over the entries with its two
indexes: the slow path's (program key, identity key) and the fast path's (call shape, statics,
invariant treedef, trace context) -> candidates compared by the leaves' ``id``s.
"""

from __future__ import annotations

import collections
import itertools
import threading
import weakref
from typing import Any, Callable, Sequence

import numpy as np

from kvhoist.host_args import Call, is_tracer
from kvhoist.host_program import Program

UNCHECKED = object()  # Cached.direct not decided yet

_PY_SCALARS = (bool, int, float, complex)
SCALARS = (*_PY_SCALARS, np.generic)


def _leaf_key(x: Any) -> Any:
    """The value of an immutable scalar (a tuple), else the object's id (an int; verified on a hit)."""
    if isinstance(x, SCALARS):
        return ("v", type(x), repr(x) if isinstance(x, _PY_SCALARS) else (str(x.dtype), x.tobytes()))
    return id(x)


def entry_key(call: Call) -> tuple:
    """The cache key of a prologue result (verified by :meth:`Identity.matches` on a hit)."""
    return (call.layout, call.context, call.var_avals, tuple(_leaf_key(x) for x in call.inv_leaves))


def same_numpy(y: Any, snap: np.ndarray) -> bool:
    return (y.shape == snap.shape and y.dtype == snap.dtype
            and np.ascontiguousarray(y).tobytes() == snap.tobytes())


def _leaf_identity(x: Any, on_death: Callable | None) -> tuple[Any, Callable, np.ndarray | None]:
    key = _leaf_key(x)
    if isinstance(key, tuple):  # immutable scalars: the key is the value
        return key, lambda y, key=key: _leaf_key(y) == key, None
    if isinstance(x, np.ndarray):  # mutable: keep a snapshot, compare contents on every call
        snap = np.array(x, copy=True)
        ref = weakref.ref(x, on_death) if on_death is not None else weakref.ref(x)
        return key, lambda y, snap=snap, ref=ref: ref() is y and same_numpy(y, snap), snap
    try:  # jax.Array and other immutable objects: the very same object, alive and not deleted
        ref = weakref.ref(x, on_death) if on_death is not None else weakref.ref(x)
    except TypeError:  # not weak-referenceable: hold it (the entry keeps it alive; LRU-bounded)
        return key, lambda y, x=x: y is x, None

    def check_obj(y, ref=ref):
        if ref() is not y:
            return False
        deleted = getattr(y, "is_deleted", None)
        return not (deleted is not None and deleted())
    return key, check_obj, None


class Identity:
    """What must hold for a cached prologue result to be valid for new invariant leaves."""

    __slots__ = ("key", "_checks", "snapshots", "__weakref__")

    def __init__(self, leaves: Sequence, on_death: Callable | None = None):
        keys, checks, snapshots = [], [], []
        for i, x in enumerate(leaves):
            k, check, snap = _leaf_identity(x, on_death)
            keys.append(k)
            checks.append(check)
            if snap is not None:
                snapshots.append((i, snap))
        self.key = tuple(keys)
        self._checks = checks
        self.snapshots = tuple(snapshots)  # ((index, private copy), ...) of the numpy leaves

    def matches(self, leaves: Sequence) -> bool:
        return len(leaves) == len(self._checks) and all(c(x) for c, x in zip(self._checks, leaves))


class Cached:
    """Prologue results for one set of invariant leaves, and what a fast-path hit must still check.

    The fast path finds this object by ``fast_key`` (call shape, static values, invariant treedef,
    trace context) and then the ``id``s of the invariant leaves (``ids``, a list compared with the
    call's). An id is only trusted while the object is known alive: jax/numpy arrays are watched by
    weak references whose callbacks set ``ids`` to None (first, atomically) and drop this object from
    every index when one dies (so a recycled id is never matched), and scalar leaves, compared by value
    in the slow path, are pinned here (``pins``) for as long as ``ids`` refers to their ids. Same
    objects then leave only two things to check per call: numpy leaves were not mutated (their
    snapshots) and arrays the step does not receive (jit would reject a deleted one it receives) were
    not deleted.
    """

    __slots__ = ("program", "values", "identity", "snapshots", "deletable", "checks", "fast_key", "ids",
                 "pins", "direct", "__weakref__")

    def __init__(self, program: Program, values: tuple, leaves: Sequence, on_death: Callable | None):
        self.program = program
        self.values = values
        self.identity = Identity(leaves, on_death)
        self.snapshots = self.identity.snapshots
        passed = set(program.step_inv)
        self.deletable = tuple(i for i, x in enumerate(leaves)
                               if i not in passed and hasattr(x, "is_deleted") and not isinstance(x, np.ndarray))
        self.checks = bool(self.snapshots or self.deletable)
        self.fast_key: tuple | None = None
        self.ids: list | None = None  # ids of the leaves, while trusted; None never equals a list
        self.pins: tuple = ()
        self.direct: Any = UNCHECKED  # the program's direct run when these leaves fit it, else None

    def still_valid(self, leaves: Sequence) -> bool:
        """For leaves whose ids equal ``ids``: not mutated, not deleted."""
        for i, snap in self.snapshots:
            if not same_numpy(leaves[i], snap):
                return False
        for i in self.deletable:
            if leaves[i].is_deleted():
                return False
        return True


class Entry(Cached):
    """A :class:`Cached` held by the LRU: its serial (LRU order) and slow-path key."""

    __slots__ = ("serial", "key", "nbytes", "inv_avals")

    def __init__(self, serial: int, key: tuple, program: Program, values: tuple, leaves: Sequence,
                 inv_avals: tuple, on_death: Callable | None):
        super().__init__(program, values, leaves, on_death)
        self.serial, self.key, self.inv_avals = serial, key, inv_avals
        self.nbytes = sum(int(getattr(v, "nbytes", 0)) for v in values)


def set_fast_key(cached: Cached, fast_key: tuple, leaves: Sequence, index: dict | None,
                 alive: Callable[[Cached], bool] = lambda c: True) -> None:
    """Let later calls with these very leaves find ``cached`` by ``fast_key`` and their ids (one
    candidate per key and ids). ``index``: the fast index (under the cache's lock; ``alive(c)`` says
    whether a candidate is still held) or None (a prepared handle, which compares its own key)."""
    if any(is_tracer(x) for x in leaves):
        return
    try:
        hash(fast_key)
    except TypeError:
        return
    ids = list(map(id, leaves))
    if index is not None and cached.fast_key is not None and cached.fast_key != fast_key:
        old = index.get(cached.fast_key, ())
        rest = tuple(c for c in old if c is not cached)
        if len(rest) != len(old):
            if rest:
                index[cached.fast_key] = rest
            else:
                index.pop(cached.fast_key, None)
    cached.pins = tuple(x for x in leaves if isinstance(x, SCALARS))  # keeps their ids unique
    cached.fast_key = fast_key
    cached.ids = ids
    if index is not None:
        # Newest first; drop candidates with the same ids (replaced) and any no longer trusted or
        # no longer held (a removal in a weakref callback that lost a race).
        index[fast_key] = (cached, *(c for c in index.get(fast_key, ())
                                     if c is not cached and c.ids is not None and c.ids != ids and alive(c)))


class PrologueCache:
    """The LRU of prologue results (:class:`Entry`), bounded by ``max_entries``, with its indexes.

    Attributes:
      entries: serial -> Entry, in LRU order (oldest first).
      index: entry key (:func:`entry_key`) -> Entry (the slow path).
      fast: fast key -> (Entry, ...) candidates, newest first (the fast path compares their ``ids``).
      hits, peak_bytes: counters for ``cache_info``.
    """

    def __init__(self, max_entries: int, lock: threading.RLock):
        self.max_entries = max_entries
        self.lock = lock
        self.entries: collections.OrderedDict = collections.OrderedDict()
        self.index: dict = {}
        self.fast: dict = {}
        self._serials = itertools.count()
        self.hits = 0
        self.peak_bytes = 0

    def _alive(self, c: Cached) -> bool:
        return self.entries.get(c.serial) is c

    def hit(self, entry: Entry) -> None:
        """Count a hit on ``entry`` and mark it most recently used (caller holds the lock)."""
        self.hits += 1
        if entry.serial in self.entries:
            self.entries.move_to_end(entry.serial)

    def lookup(self, key: tuple, leaves: Sequence, fast_key: tuple) -> Entry | None:
        """The slow path: the entry for ``key`` if its identity matches ``leaves`` (then counted as a hit
        and findable by ``fast_key`` from now on), else None."""
        with self.lock:
            entry = self.index.get(key)
            if entry is None or not entry.identity.matches(leaves):
                return None
            self.hit(entry)
            set_fast_key(entry, fast_key, leaves, self.fast, self._alive)
            return entry

    def insert(self, key: tuple, program: Program, values: tuple, leaves: Sequence, inv_avals: tuple,
               fast_key: tuple) -> Entry:
        """Hold ``values`` for ``leaves`` (replacing the entry of ``key``), evicting the least recently used."""
        with self.lock:
            serial = next(self._serials)
            entry = Entry(serial, key, program, values, leaves, inv_avals, self._on_death(serial))
            old = self.index.get(key)
            if old is not None:
                self.forget(old)
            self.entries[serial] = entry
            self.index[key] = entry
            set_fast_key(entry, fast_key, leaves, self.fast, self._alive)
            while len(self.entries) > self.max_entries:
                self.forget(next(iter(self.entries.values())))
            held = sum(e.nbytes for e in list(self.entries.values()))
            self.peak_bytes = max(self.peak_bytes, held)
            return entry

    def forget(self, entry: Entry) -> None:
        """Drop ``entry`` from every index. Runs in weakref callbacks too: no lock; ``ids = None`` first
        (one attribute store: from then on no call matches it), then best-effort removals (a candidate
        tuple that loses a race keeps an unmatchable entry until its next rewrite, which drops it)."""
        entry.ids = None
        self.entries.pop(entry.serial, None)
        try:
            if self.index.get(entry.key) is entry:
                self.index.pop(entry.key, None)
            head = entry.fast_key
            cands = self.fast.get(head) if head is not None else None
            if cands is not None and any(c is entry for c in cands):
                rest = tuple(c for c in cands if c is not entry)
                if rest:
                    self.fast[head] = rest
                else:
                    self.fast.pop(head, None)
        except TypeError:  # pragma: no cover - keys are hashable when stored
            pass

    def _on_death(self, serial: int) -> Callable:
        self_ref = weakref.ref(self)

        def drop(_ref):
            me = self_ref()
            if me is not None:
                entry = me.entries.get(serial)
                if entry is not None:
                    me.forget(entry)
        return drop

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()
            self.index.clear()
            self.fast.clear()
            self.peak_bytes = 0
