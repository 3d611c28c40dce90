"""What a pass did: hoisted values, skipped candidates, structural notes, totals.

A :class:`Report` is plain data (dataclasses), printable as a table and serialisable to JSON, so
the CLI, tests and users read the same facts.
"""

from __future__ import annotations

import dataclasses
import json
import re
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


def signed(n: int | float | None, unit: str = "FLOPs") -> str:
    """``+1.20M FLOPs`` / ``-3.0 KiB``: a change in human units (``unit`` is ``'FLOPs'`` or ``'bytes'``)."""
    if unit not in ("FLOPs", "bytes"):
        raise ValueError(f"signed: unit must be 'FLOPs' or 'bytes', got {unit!r}")
    if n is None:
        return "?"
    text = human_bytes(abs(n)) if unit == "bytes" else f"{human_flops(abs(n))} FLOPs"
    return ("-" if n < 0 else "+") + text


_RAW_UNITS = re.compile(r"([+-]?)\b(\d{4,})( bytes\b| B\b| FLOPs\b)")


def humanize_units(text: str) -> str:
    """Raw integers followed by ``bytes`` / ``FLOPs`` in a message, in human units (``401241867782400 FLOPs``
    -> ``401.24T FLOPs``). Every renderer passes note and skip messages through it, whoever wrote them."""
    def one(m: re.Match) -> str:
        n = int(m.group(2))
        return m.group(1) + (human_bytes(n) if "FLOPs" not in m.group(3) else f"{human_flops(n)} FLOPs")
    return _RAW_UNITS.sub(one, text)


#: The columns of every table of hoisted values — ``Report.table()``, ``kvhoist report``, the HTML page of
#: ``kvhoist diff --html`` and its text summary — in order, with what each means. The user guide documents
#: them once (docs/user_guide.md, "Report columns"); :func:`hoisted_rows` renders them.
COLUMNS = (
    ("value", "the jax.named_scope path of the main equation behind the value (its primitive when unnamed)"),
    ("shape", "shape of the cached array"),
    ("dtype", "dtype of the cached array"),
    ("bytes", "size of the cached array, held live across the loop it left"),
    ("FLOPs/iteration", "work removed from each iteration of the loop it left"),
    ("FLOPs saved/run", "work removed from one run of the program, enclosing loops counted; "
                        "'unknown trips' for a while loop (see FLOPs/iteration); '≤' marks an upper bound"),
    ("share of run", "FLOPs saved/run as a share of the program's FLOPs per run before the rewrite"),
    ("loop", "the loop it left, e.g. scan(length=30) at sample.py:88"),
    ("via", "how it got out: licm, plus fission (a nested scan), speculation (a cond branch), shared (stored "
            "once with an identical value)"),
    ("branch", "for a value speculated out of a cond (Wan 2.2's two experts): which branch, e.g. "
               "'branch 1 of cond at sample.py:144'; empty otherwise"),
    ("source", "file.py:line of the user code behind the value"),
)
COLUMN_NAMES = tuple(name for name, _meaning in COLUMNS)
#: Where the columns are explained (printed under the tables).
COLUMNS_DOC = "docs/user_guide.md#report-columns"
UNKNOWN_TRIPS = "unknown trips"


def percent(x: float | None) -> str:
    """A share as ``'0.033%'``; ``'n/a'`` when there is none (no per-run total, or a while loop)."""
    return "n/a" if x is None else f"{100 * x:.3f}%"


def hoisted_rows(hoisted, total_flops_before: int | None = None) -> list[tuple[str, ...]]:
    """One row of strings per hoisted value, in the order of :data:`COLUMNS` (header not included).

    Args:
      hoisted: :class:`HoistedValue` s.
      total_flops_before: the program's FLOPs per run before the rewrite, for the 'share of run' column.
    """
    rows = []
    for h in hoisted:
        if h.flops_saved is None:
            saved, share = UNKNOWN_TRIPS, "n/a"
        else:
            saved = ("≤" if h.upper_bound else "") + human_flops(h.flops_saved)
            share = percent(h.flops_saved / total_flops_before if total_flops_before else None)
        rows.append((h.name, "x".join(map(str, h.shape)) or "()", h.dtype, human_bytes(h.bytes),
                     human_flops(h.flops_per_iteration), saved, share, h.loop, "+".join(h.via), h.branch,
                     h.source))
    return rows


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

    ``total_flops_before`` / ``total_flops_after`` estimate one run of the program, counting loops the
    same way on both sides (:func:`kvhoist.analysis.cost.jaxpr_flops_run`): work whose number of
    executions is known (scan trip counts multiplied) per run; work inside loops with an unknown trip
    count (``while``) per iteration, in :attr:`unknown_trip_flops_before` / :attr:`unknown_trip_flops_after`,
    never mixed into the per-run figures. So ``flops_saved_fraction`` is the honest share of the per-run
    work removed, and work hoisted out of a ``while`` lowers the per-iteration figure (and adds one
    execution of the hoisted work to the per-run figure).
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
        """FLOPs removed from one run (values that left a loop with a known trip count)."""
        return sum(h.flops_saved or 0 for h in self.hoisted)

    @property
    def flops_saved_per_iteration_unknown_trips(self) -> int:
        """FLOPs removed from each iteration of loops whose trip count is unknown (``while`` loops):
        work that moved but cannot be totalled per run."""
        return sum(h.flops_per_iteration for h in self.hoisted if h.flops_saved is None)

    @property
    def unknown_trip_flops_before(self) -> int | None:
        """FLOPs of one iteration of the loops with an unknown trip count, before the rewrite (0 without
        such loops; None when the totals were not counted)."""
        return _per_iteration(self.total_flops_before)

    @property
    def unknown_trip_flops_after(self) -> int | None:
        """As :attr:`unknown_trip_flops_before`, after the rewrite."""
        return _per_iteration(self.total_flops_after)

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
                "total_flops_before": _plain(self.total_flops_before),
                "total_flops_after": _plain(self.total_flops_after),
                "unknown_trip_flops_before": self.unknown_trip_flops_before,
                "unknown_trip_flops_after": self.unknown_trip_flops_after,
                "flops_saved_fraction": self.flops_saved_fraction,
                "flops_saved_is_upper_bound": self.flops_saved_is_upper_bound,
                "flops_saved_per_iteration_unknown_trips": self.flops_saved_per_iteration_unknown_trips,
            },
        }

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(), default=str, **kw)

    def summary(self) -> str:
        """One line: values, cache bytes, FLOPs saved per run (and per iteration where a loop's trip count
        is unknown — never '0' when work moved), skipped candidates and the rewrites used."""
        frac = self.flops_saved_fraction
        bound = "up to " if self.flops_saved_is_upper_bound else ""
        unknown = self.flops_saved_per_iteration_unknown_trips
        per_iter = ""
        if unknown:
            base = self.unknown_trip_flops_before
            of_iter = f" ({100 * unknown / base:.1f}% of their FLOPs per iteration)" if base else ""
            per_iter = f"{human_flops(unknown)} FLOPs per iteration of loops with an unknown trip count{of_iter}"
        saves = ""
        if self.flops_saved or not unknown:
            share = f" ({100 * frac:.3f}% of the program's FLOPs)" if frac is not None else ""
            saves = f"{bound}{human_flops(self.flops_saved)} FLOPs per run{share}"
        saves = " + ".join(x for x in (saves, per_iter) if x)
        line = (f"hoisted {len(self.hoisted)} value(s), cache {human_bytes(self.cache_bytes)}, saves {saves}; "
                f"skipped {len(self.skipped)}")
        kinds: dict = {}
        for n in self.notes:
            kinds[n.kind] = kinds.get(n.kind, 0) + 1
        if kinds:
            line += "; rewrites: " + ", ".join(f"{k} ×{v}" for k, v in sorted(kinds.items()))
        return line

    def rows(self, max_rows: int | None = None) -> list[tuple[str, ...]]:
        """The hoisted values as rows of :data:`COLUMNS` (header first), as every renderer shows them."""
        hs = self.hoisted if max_rows is None else self.hoisted[:max_rows]
        return [COLUMN_NAMES] + hoisted_rows(hs, self.total_flops_before)

    def hoisted_table(self, max_rows: int | None = None) -> str:
        """The hoisted values as a text table (columns: :data:`COLUMNS`), then where the columns are explained."""
        if not self.hoisted:
            return "nothing was hoisted"
        out = [format_rows(self.rows(max_rows))]
        if max_rows is not None and len(self.hoisted) > max_rows:
            out.append(f"... {len(self.hoisted) - max_rows} more")
        out.append(f"(columns: {COLUMNS_DOC})")
        return "\n".join(out)

    def detail_lines(self) -> list[str]:
        """Skipped candidates, notes and footnotes, one per line, in human units."""
        out = []
        if self.skipped:
            out.append("skipped:")
            out += [f"  {s.name} ({s.source}): {humanize_units(s.reason)}" for s in self.skipped]
        out += [f"[{n.kind}] {humanize_units(n.message)}" for n in self.notes]
        if self.flops_saved_is_upper_bound:
            out.append("≤: speculated out of a cond branch; counted as if the branch ran every iteration "
                       "(an upper bound: each branch runs only on its own iterations)")
        if any(h.flops_saved is None for h in self.hoisted):
            out.append(f"{UNKNOWN_TRIPS}: left a while loop, whose trip count is unknown; its saving is "
                       "FLOPs/iteration for every iteration but one")
        out += shared_work_lines(self.hoisted)
        return out

    def table(self, max_rows: int | None = None) -> str:
        """The hoisted values (columns: :data:`COLUMNS`, explained in docs/user_guide.md, "Report columns"),
        skipped candidates, notes, and :meth:`summary`."""
        return "\n".join([self.hoisted_table(max_rows)] + self.detail_lines() + [self.summary()])

    def __str__(self) -> str:
        return self.table()


def _per_iteration(total: int | None) -> int | None:
    return None if total is None else int(getattr(total, "per_iteration", 0))


def _plain(total: int | None) -> int | None:
    return None if total is None else int(total)


def shared_work_lines(hoisted) -> list[str]:
    """One line per row that carries upstream work its siblings also read (each equation is counted once, in the
    first row that reads it): siblings are rows of the same loop, shape, dtype, source and branch (Wan's
    ``to_k`` and ``to_v``, whose shared upstream work is the text embedder)."""
    groups: dict = {}
    for h in hoisted:
        groups.setdefault((h.loop, tuple(h.shape), h.dtype, h.source, h.branch), []).append(h)
    out = []
    for rows in groups.values():
        low = min(h.flops_per_iteration for h in rows)
        for h in rows:
            extra = h.flops_per_iteration - low
            if len(rows) > 1 and extra > 0.01 * max(low, 1):
                others = ", ".join(sorted({o.name for o in rows if o is not h}))
                out.append(f"{h.name}: FLOPs/iteration include {human_flops(extra)} of upstream work that {others} "
                           f"also read(s) (for Wan: the text embedder), counted once, in this row")
    return out


def format_rows(rows: list) -> str:
    """A plain-text table: ``rows[0]`` is the header, underlined; columns left-aligned to their widest cell.

    Args:
      rows: equal-length rows of cells (anything ``str()`` accepts).

    Returns:
      The table's lines joined with newlines, trailing spaces stripped.
    """
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for k, r in enumerate(rows):
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
