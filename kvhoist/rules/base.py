"""The interface between the LICM engine and its rules: what a rule receives and what it returns.

The engine (:class:`kvhoist.passes.licm.Licm`) walks a program and hands each higher-order equation to the rule
registered for its primitive (:mod:`kvhoist.rules`). A rule never imports the engine: it receives it as the
``engine`` argument, an object with the services below (:class:`Engine`), and answers with the dataclasses below.
So the rules depend on this module only, and the engine depends on the registry — no import circle.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ContextManager, Protocol, Sequence


@dataclasses.dataclass
class LoopInfo:
    """A loop being optimised: for reports and trip-count arithmetic."""

    kind: str
    trip_count: int | None
    where: str
    #: FLOPs one iteration surely runs (conds at their cheapest branch): bounds speculation.
    surely_flops: int | None = None

    def describe(self) -> str:
        n = "?" if self.trip_count is None else str(self.trip_count)
        return f"{self.kind}(length={n})" + (f" at {self.where}" if self.where else "")


@dataclasses.dataclass
class Split:
    """A rule's answer to "take the invariant part out of this equation".

    ``pre`` are invariant equations (all inputs invariant in the enclosing scope) computed in front of
    ``post``, which replaces the original equation and reads their results. ``kind`` names the
    rewrite ('fission', 'speculation', 'call') and ``note`` says what was done.
    """

    pre: list
    post: list
    kind: str
    note: str = ""
    extra_bytes: int = 0
    nested: frozenset = frozenset()   # rewrite kinds that happened inside (fission inside a branch, ...)
    branch_of: dict = dataclasses.field(default_factory=dict)  # speculation: id(pre eqn) -> branch info


@dataclasses.dataclass
class Extraction:
    """The invariant part of a block, ready to be moved one scope out."""

    hoisted: list                 # equations to move, in order; read only `used_invars`, literals, each other
    residual: list                # equations that stay
    crossing: list                # variables defined by `hoisted` that the residual block still needs
    used_invars: list             # the block's (invariant) inputs that `hoisted` reads
    via: dict                     # crossing var -> tuple of rewrite kinds that produced it
    kinds: frozenset = frozenset()  # every rewrite kind used, nested ones included

    @property
    def empty(self) -> bool:
        return not self.hoisted


class Engine(Protocol):
    """The services LICM offers a rule (implemented by :class:`kvhoist.passes.licm.Licm`)."""

    loops: list           # LoopInfo of the loops being optimised, outermost first
    fission: str          # "scan" or "vmap": how a split scan computes its invariant part
    speculating: bool     # True while extracting from a region that might not run
    branch_runs: dict     # id(cond eqn) -> (eqn, {branch: runs}): for the report's speculation figures

    def extract(self, block: Any, invariant_invars: Any, *, carry_pairs: Sequence = (), charge: bool = False,
                speculative: bool = False) -> Extraction:
        """Find, split out and select the invariant part of ``block``."""

    def optimize_block(self, block: Any) -> Any:
        """``block`` with every higher-order equation in it optimised by its rule."""

    def optimize_sub(self, jaxpr: Any) -> Any:
        """A sub-jaxpr (open or closed) with its loops optimised, of the same kind."""

    def value_of(self, atom: Any) -> Any:
        """The trace-time value of ``atom`` if known, else ``None``."""

    def bind_known(self, inner_invars: Sequence, outer_atoms: Sequence) -> None:
        """A call's body inputs take the known values of the call's operands."""

    def in_loop(self, info: LoopInfo) -> ContextManager[LoopInfo]:
        """Enter a loop: extractions inside are charged to it and reported under it."""

    def note(self, kind: str, message: str, nbytes: int = 0) -> None:
        """Add a note to the report."""

    def refuse_speculation(self, cond_eqn: Any, flops: int, budget: int) -> None:
        """Report a speculation refused by the budget."""

    def shrink(self, pre: list, loop: Any, first: int, count: int) -> tuple[list, Any]:
        """The smallest cache for the values just hoisted in front of ``loop`` (:mod:`kvhoist.passes.shrink`)."""


class Rule(Protocol):
    """One higher-order primitive's rule (registered in :mod:`kvhoist.rules` by primitive name)."""

    def optimize(self, eqn: Any, engine: Engine) -> list:
        """The equations replacing ``eqn`` where it stands (loops: hoist out of the body)."""

    def split(self, eqn: Any, mask: list, engine: Engine) -> Split | None:
        """Invariant work to compute in front of ``eqn`` (``mask``: which inputs are invariant), or ``None``."""
