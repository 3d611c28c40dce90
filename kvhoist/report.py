"""What a pass did: hoisted values, skipped candidates, structural notes, totals.

A :class:`Report` is plain data (dataclasses), printable as a table and serialisable to JSON, so
the CLI, tests and users read the same facts.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any


def human_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def human_flops(n: int | float | None) -> str:
    if n is None:
        return "?"
    for unit in ("", "K", "M", "G", "T", "P", "E"):
        if abs(n) < 1000 or unit == "E":
            return f"{n:.0f}" if unit == "" else f"{n:.2f}{unit}"
        n /= 1000
    return str(n)


@dataclasses.dataclass(frozen=True)
class HoistedValue:
    """One value the pass computes once before a loop instead of once per iteration.

    Attributes:
      name: the ``jax.named_scope`` path of the most expensive equation behind the value
        (e.g. ``'blocks/attn2/to_k'``), or its primitive when unnamed.
      source: ``file.py:line`` of the user code that produced that equation.
      shape, dtype, bytes: the cached array.
      flops_per_iteration: work removed from each iteration of the loop it left.
      trip_count: iterations of that loop (``None`` for a while loop with a traced bound).
      flops_saved: total work removed from one run of the program, counting enclosing loops
        (``None`` when a trip count is unknown).
      loop: the loop it left, e.g. ``'scan(length=30) at sample.py:88'``.
      via: how it got out: ``'licm'``, plus ``'fission'`` (from a nested scan) or ``'speculation'``
        (from a cond branch) when those were needed on the way.
      primitives: counts of the main primitives in the hoisted computation (per iteration).
    """

    name: str
    source: str
    shape: tuple
    dtype: str
    bytes: int
    flops_per_iteration: int
    trip_count: int | None
    flops_saved: int | None
    loop: str
    via: tuple = ("licm",)
    primitives: dict = dataclasses.field(default_factory=dict)
    #: True when ``flops_saved`` assumes the value was needed every iteration although it came out
    #: of a ``cond`` branch (speculation): each branch runs only on some iterations, so the real
    #: saving is ``flops_per_iteration * (runs of its branch - 1)``, which the pass cannot see.
    upper_bound: bool = False
    #: The user frames behind the value's main equation, innermost first (``source`` is the first):
    #: ``('model.py:74 (Linear.__call__)', 'model.py:187 (WanAttention.project_kv)', ...)``.
    stack: tuple = ()
    #: For a value speculated out of a ``cond`` (Wan 2.2's experts): ``'branch 1 of cond at sample.py:140'``
    #: — which branch (expert) it belongs to; ``''`` otherwise.
    branch: str = ""


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A candidate the pass left in place, and why."""

    name: str
    source: str
    reason: str
    bytes: int = 0
    flops_per_iteration: int = 0
    loop: str = ""


@dataclasses.dataclass(frozen=True)
class Note:
    """A structural rewrite or an observation: ``kind`` is e.g. 'fission', 'speculation', 'opaque', 'repad'."""

    kind: str
    message: str
    bytes: int = 0


@dataclasses.dataclass
class Report:
    """Everything a pipeline run did to a program.

    ``total_flops_before`` / ``total_flops_after`` estimate one run of the program (loops counted
    with their static trip counts), so ``flops_saved_fraction`` is the honest share of work removed.
    """

    hoisted: list = dataclasses.field(default_factory=list)
    skipped: list = dataclasses.field(default_factory=list)
    notes: list = dataclasses.field(default_factory=list)
    total_flops_before: int | None = None
    total_flops_after: int | None = None

    # -- totals ----------------------------------------------------------------------------
    @property
    def cache_bytes(self) -> int:
        """Bytes of all hoisted values (held live across the loops they left)."""
        return sum(h.bytes for h in self.hoisted)

    @property
    def flops_saved(self) -> int:
        return sum(h.flops_saved or 0 for h in self.hoisted)

    @property
    def flops_saved_per_iteration_unknown_trips(self) -> int:
        """FLOPs removed from each iteration of loops whose trip count is unknown (``while`` loops):
        work that moved but cannot be totalled per run."""
        return sum(h.flops_per_iteration for h in self.hoisted if h.flops_saved is None)

    @property
    def flops_saved_is_upper_bound(self) -> bool:
        return any(h.upper_bound for h in self.hoisted)

    @property
    def flops_saved_fraction(self) -> float | None:
        if not self.total_flops_before:
            return None
        return self.flops_saved / self.total_flops_before

    def merge(self, other: "Report") -> "Report":
        return Report(self.hoisted + other.hoisted, self.skipped + other.skipped,
                      self.notes + other.notes,
                      self.total_flops_before if self.total_flops_before is not None else other.total_flops_before,
                      other.total_flops_after if other.total_flops_after is not None else self.total_flops_after)

    def find(self, substring: str) -> list:
        """Hoisted values whose name contains ``substring`` (e.g. ``'to_k'``)."""
        return [h for h in self.hoisted if substring in h.name]

    # -- rendering -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "hoisted": [dataclasses.asdict(h) for h in self.hoisted],
            "skipped": [dataclasses.asdict(s) for s in self.skipped],
            "notes": [dataclasses.asdict(n) for n in self.notes],
            "totals": {
                "cache_bytes": self.cache_bytes,
                "flops_saved": self.flops_saved,
                "total_flops_before": self.total_flops_before,
                "total_flops_after": self.total_flops_after,
                "flops_saved_fraction": self.flops_saved_fraction,
                "flops_saved_is_upper_bound": self.flops_saved_is_upper_bound,
                "flops_saved_per_iteration_unknown_trips": self.flops_saved_per_iteration_unknown_trips,
            },
        }

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(), default=str, **kw)

    def summary(self) -> str:
        """One line: values, cache bytes, FLOPs saved per run (and per iteration where a loop's trip count
        is unknown), skipped candidates and the rewrites used."""
        frac = self.flops_saved_fraction
        share = f" ({100 * frac:.3f}% of the program's FLOPs)" if frac is not None else ""
        bound = "up to " if self.flops_saved_is_upper_bound else ""
        unknown = self.flops_saved_per_iteration_unknown_trips
        per_iter = (f" + {human_flops(unknown)} FLOPs per iteration of loops with an unknown trip count"
                    if unknown else "")
        line = (f"hoisted {len(self.hoisted)} value(s), cache {human_bytes(self.cache_bytes)}, "
                f"saves {bound}{human_flops(self.flops_saved)} FLOPs per run{share}{per_iter}; "
                f"skipped {len(self.skipped)}")
        kinds: dict = {}
        for n in self.notes:
            kinds[n.kind] = kinds.get(n.kind, 0) + 1
        if kinds:
            line += "; rewrites: " + ", ".join(f"{k} ×{v}" for k, v in sorted(kinds.items()))
        return line

    def table(self, max_rows: int | None = None) -> str:
        rows = [("value", "shape", "dtype", "bytes", "FLOPs/iter", "FLOPs saved", "loop", "via", "source")]
        hs = self.hoisted if max_rows is None else self.hoisted[:max_rows]
        for h in hs:
            rows.append((h.name, "x".join(map(str, h.shape)) or "()", h.dtype, human_bytes(h.bytes),
                         human_flops(h.flops_per_iteration),
                         ("≤" if h.upper_bound else "") + human_flops(h.flops_saved), h.loop,
                         "+".join(h.via), h.source))
        out = [_fmt_rows(rows)]
        if max_rows is not None and len(self.hoisted) > max_rows:
            out.append(f"... {len(self.hoisted) - max_rows} more")
        if self.skipped:
            out.append("skipped:")
            for s in self.skipped:
                out.append(f"  {s.name} ({s.source}): {s.reason}")
        for n in self.notes:
            out.append(f"[{n.kind}] {n.message}")
        if self.flops_saved_is_upper_bound:
            out.append("≤: speculated out of a cond branch; counted as if the branch ran every iteration "
                       "(an upper bound: each branch runs only on its own iterations)")
        out.append(self.summary())
        return "\n".join(out)

    def __str__(self) -> str:
        return self.table()


def _fmt_rows(rows: list) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for k, r in enumerate(rows):
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
