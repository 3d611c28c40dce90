"""Reading compiled HLO: what XLA made of a program, counted per loop and per run.

The compiler reads XLA's output in two places: the layout pass with ``measure="tpu"`` compares the
figures of compiled candidates (:mod:`kvhoist.tpu_compile`), and the tools count matmuls and
collectives left inside a sampler's step loop (``kvhoist compile``, the benchmarks, the multi-device
tests). Both read the optimized HLO text (``jax.jit(f).lower(...).compile().as_text()``) with the
functions here; nothing in this module imports jax.

* :func:`hlo_computations`: ``{computation: instruction lines}`` (metadata stripped) and the ENTRY name;
* :func:`hlo_loop_op_counts`: static counts of matching instructions per iteration of the outermost
  ``while`` loops (optionally those with a given trip count);
* :func:`hlo_op_executions`: how many times matching instructions *execute* in one run, weighted by the
  trip counts of the loops around them, inside / outside the step loop;
* :data:`MATMUL_PATTERNS`, :data:`TPU_MATMUL_PATTERNS`, :data:`COLLECTIVE_PATTERNS`: what to match;
* :func:`memory_figures`, :func:`cost_flops`: a compiled executable's ``memory_analysis()`` and
  ``cost_analysis()`` as plain numbers.

Example:
    >>> compiled = jax.jit(sampler).lower(*args).compile()
    >>> hlo_op_executions(compiled.as_text(), MATMUL_PATTERNS, step_trip_count=10)["inside"]
    {'dot': 40, 'gemm-custom-call': 0}
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any

__all__ = ["hlo_computations", "callees", "result_bytes", "while_trip_count", "hlo_loop_op_counts",
           "hlo_op_executions", "memory_figures", "cost_flops", "WHILE_BODY", "KNOWN_TRIP_COUNT",
           "COLLECTIVE_PATTERNS", "MATMUL_PATTERNS", "TPU_MATMUL_PATTERNS"]

_CALL_ATTR = re.compile(r"\b(?:calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_METADATA = re.compile(r",?\s*metadata=\{[^{}]*\}")
WHILE_BODY = re.compile(r"\swhile\(.*\bbody=%?([\w.\-]+)")
KNOWN_TRIP_COUNT = re.compile(r'known_trip_count"?\s*:\s*\{\s*"n"\s*:\s*"?(\d+)')


def hlo_computations(hlo: str) -> tuple[dict[str, list[str]], str | None]:
    """``{computation name: instruction lines}`` and the ENTRY computation's name."""
    comps: dict[str, list[str]] = {}
    entry = None
    current = None
    for line in hlo.splitlines():
        if not line.strip() or line.lstrip().startswith("//") or line.startswith("HloModule"):
            continue
        if not line[0].isspace() and line.rstrip().endswith("{"):
            head = line.split("(", 1)[0].split()
            is_entry = head and head[0] == "ENTRY"
            name = (head[1] if is_entry else head[0]).lstrip("%")
            comps[name] = []
            current = name
            if is_entry:
                entry = name
        elif line.strip() == "}":
            current = None
        elif current is not None:
            comps[current].append(_METADATA.sub("", line))
    return comps, entry


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "f16": 2,
                "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}


def result_bytes(text: str) -> int:
    """Bytes of the array shapes in an instruction's result type (``%x = (f32[2,8], bf16[4]) op(...``)."""
    head = text.split("=", 1)[1] if "=" in text else text
    total = 0
    for dtype, dims in re.findall(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]", head):
        total += _DTYPE_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
    return total


def callees(line: str) -> list[str]:
    out = _CALL_ATTR.findall(line)
    for group in _BRANCHES.findall(line):
        out += [c.strip().lstrip("%") for c in group.split(",") if c.strip()]
    return out


def hlo_loop_op_counts(hlo: str, patterns: dict[str, str], *, trip_count: int | None = None,
                       data_dependent_only: bool = False) -> dict[str, int]:
    """Counts of instructions matching ``patterns`` inside the outermost while loops of an HLO module.

    The outermost loops are the ``while`` instructions reachable from ENTRY without passing through
    another while body (for a sampler: the step loop, and any loop kvhoist's fission put in front of
    it). With ``trip_count``, only those whose ``known_trip_count`` is ``trip_count`` count (the step
    loop: pass the number of steps); if XLA recorded no trip counts, all outermost loops count.
    Everything reachable from a counted body counts (nested loops, fusions, branches), once per call site.

    Args:
      hlo: HLO text, e.g. ``jax.jit(f).lower(...).compile().as_text()``.
      patterns: ``{label: regex}`` matched against each instruction line (metadata stripped), e.g.
        ``{"all-reduce": r"\\sall-reduce(-start)?\\("}``.
      trip_count: select the outermost loops with this known trip count.
      data_dependent_only: count only the outermost loops XLA gave no trip count (a decoding loop that stops on
        a data-dependent condition; layer scans and fission scans in front of it are not counted).

    Returns:
      ``{label: count}``, plus ``"loops"``: how many loops were counted, and ``"bytes"``:
      ``{label: bytes of the matched instructions' results}`` (per device, per loop iteration).
    """
    comps, entry = hlo_computations(hlo)
    regs = {k: re.compile(v) for k, v in patterns.items()}

    @functools.lru_cache(maxsize=None)
    def count(comp: str) -> tuple[int, ...]:
        # Per pattern: (instructions, bytes of their results), flattened.
        totals = [0] * (2 * len(regs))
        for line in comps.get(comp, ()):
            for i, r in enumerate(regs.values()):
                m = r.search(line)
                if m:
                    totals[2 * i] += 1
                    totals[2 * i + 1] += result_bytes(line[:m.start()])
            for callee in callees(line):
                if callee in comps and callee != comp:
                    totals = [a + b for a, b in zip(totals, count(callee))]
        return tuple(totals)

    bodies: list[tuple[str, int | None]] = []
    seen: set[str] = set()

    def outer_loops(comp: str) -> None:
        if comp in seen:
            return
        seen.add(comp)
        for line in comps.get(comp, ()):
            m = WHILE_BODY.search(line)
            if m:
                n = KNOWN_TRIP_COUNT.search(line)
                bodies.append((m.group(1), int(n.group(1)) if n else None))
                continue  # do not descend into the loop: nested whiles are counted as its contents
            for callee in callees(line):
                outer_loops(callee)

    if entry is not None:
        outer_loops(entry)
    if data_dependent_only:
        bodies = [(b, n) for b, n in bodies if n is None]
    if trip_count is not None and any(n is not None for _, n in bodies):
        bodies = [(b, n) for b, n in bodies if n == trip_count]
    result = dict.fromkeys(regs, 0)
    nbytes = dict.fromkeys(regs, 0)
    for b, _ in bodies:
        c = count(b)
        for i, k in enumerate(regs):
            result[k] += c[2 * i]
            nbytes[k] += c[2 * i + 1]
    result["loops"] = len(bodies)
    result["bytes"] = nbytes
    return result


_CONSTANT = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*[su]\d+\[\](?:\{[^}]*\})?\s+constant\((-?\d+)\)")
_COMPARE = re.compile(r"\scompare\(([^)]*)\)")
_WHILE_PARTS = re.compile(r"\swhile\(.*\bcondition=%?([\w.\-]+).*\bbody=%?([\w.\-]+)")


def while_trip_count(line: str, comps: dict[str, list[str]], condition: str) -> int | None:
    """Trip count of one ``while`` instruction: its ``known_trip_count`` backend config, else the integer
    constant its condition computation compares the counter with (``i < N`` from 0, as ``lax.scan`` and
    static ``fori_loop`` lower); None when neither says."""
    m = KNOWN_TRIP_COUNT.search(line)
    if m:
        return int(m.group(1))
    consts: dict[str, int] = {}
    compares: list[str] = []
    todo, seen = [condition], set()
    while todo:  # the comparison may sit in a fusion the condition calls
        comp = todo.pop()
        if comp in seen or comp not in comps:
            continue
        seen.add(comp)
        for ln in comps[comp]:
            c = _CONSTANT.match(ln)
            if c:
                consts[c.group(1)] = int(c.group(2))
            cm = _COMPARE.search(ln)
            if cm:
                compares.append(cm.group(1))
            todo += callees(ln)
    for operands in compares:
        for name in re.findall(r"%?([\w.\-]+)", operands):
            if name in consts:
                return consts[name]
    values = set(consts.values())
    return values.pop() if len(values) == 1 else None


def hlo_op_executions(hlo: str, patterns: dict[str, str], *, step_trip_count: int) -> dict:
    """How many times instructions matching ``patterns`` *execute* in one run of an HLO module, split
    into inside and outside the step loop.

    Unlike :func:`hlo_loop_op_counts` (static counts per loop iteration) every instruction is weighted
    by the product of the trip counts of the ``while`` loops around it (:func:`while_trip_count`), and
    every branch of a ``conditional`` counts (an upper bound for a two-expert sampler, where each step
    runs one branch: the same bound for every variant, so comparisons between variants hold). Fusions,
    calls and async wrappers count once per call site. "Inside" is everything under the outermost
    ``while`` loops whose trip count is ``step_trip_count`` (the step loop); the rest is "outside".
    On TPU a matmul prints as ``convolution`` (see :data:`TPU_MATMUL_PATTERNS`).

    Args:
      hlo: optimized HLO text (``compiled.as_text()``).
      patterns: ``{label: regex}`` matched against instruction lines (metadata stripped).
      step_trip_count: the number of sampling steps.

    Returns:
      ``{"inside": {label: n}, "outside": {label: n}, "step_loops": how many step loops were found,
      "unknown_trip_counts": whiles whose trip count could not be read (weighted 1)}``.

    Example:
      >>> hlo_op_executions(compiled.as_text(), TPU_MATMUL_PATTERNS, step_trip_count=6)["inside"]
      {'convolution': 180, 'dot': 0}
    """
    if not isinstance(step_trip_count, int) or step_trip_count < 1:
        raise ValueError(f"step_trip_count must be a positive int, got {step_trip_count!r}")
    comps, entry = hlo_computations(hlo)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text (pass compiled.as_text())")
    regs = {k: re.compile(v) for k, v in patterns.items()}
    inside = dict.fromkeys(regs, 0)
    outside = dict.fromkeys(regs, 0)
    state = {"step_loops": 0, "unknown": 0}

    def walk(comp: str, weight: int, in_step: bool, stack: tuple[str, ...]) -> None:
        if comp in stack:  # recursion cannot occur in HLO; guard anyway
            return
        stack = stack + (comp,)
        for line in comps.get(comp, ()):
            for k, r in regs.items():
                if r.search(line):
                    (inside if in_step else outside)[k] += weight
            w = _WHILE_PARTS.search(line)
            if w:
                n = while_trip_count(line, comps, w.group(1))
                if n is None:
                    state["unknown"] += 1
                step = not in_step and n == step_trip_count
                state["step_loops"] += step
                walk(w.group(2), weight * (n if n is not None else 1), in_step or step, stack)
                continue
            for callee in callees(line):
                if callee in comps:
                    walk(callee, weight, in_step, stack)

    walk(entry, 1, False, ())
    return {"inside": inside, "outside": outside, "step_loops": state["step_loops"],
            "unknown_trip_counts": state["unknown"]}


#: Collectives, for ``hlo_loop_op_counts`` (async ``-start`` forms included; ``-done`` not double counted).
COLLECTIVE_PATTERNS = {
    "all-reduce": r"\sall-reduce(?:-start)?\(",
    "all-gather": r"\sall-gather(?:-start)?\(",
    "collective-permute": r"\scollective-permute(?:-start)?\(",
    "all-to-all": r"\sall-to-all(?:-start)?\(",
    "reduce-scatter": r"\sreduce-scatter\(",
}

#: Matrix multiplies as XLA CPU/GPU/TPU print them: ``dot``, cuBLAS / cuBLASLt custom calls.
MATMUL_PATTERNS = {
    "dot": r"\sdot\(",
    "gemm-custom-call": r'custom_call_target="__cublas',
}


#: Matrix multiplies in TPU HLO: XLA-TPU rewrites ``dot`` into ``convolution``; a few stay ``dot``.
TPU_MATMUL_PATTERNS = {
    "convolution": r"\sconvolution\(",
    "dot": r"\sdot\(",
}


def memory_figures(compiled: Any) -> dict[str, int | None]:
    """A compiled executable's ``memory_analysis()`` in bytes per device: ``argument_bytes``,
    ``output_bytes``, ``temp_bytes``, ``generated_code_bytes``, ``alias_bytes`` (None where the backend
    does not say)."""
    stats = compiled.memory_analysis()
    names = {"argument_bytes": "argument_size_in_bytes", "output_bytes": "output_size_in_bytes",
             "temp_bytes": "temp_size_in_bytes", "generated_code_bytes": "generated_code_size_in_bytes",
             "alias_bytes": "alias_size_in_bytes"}
    return {k: (int(getattr(stats, v)) if stats is not None and hasattr(stats, v) else None) for k, v in names.items()}


def cost_flops(compiled: Any) -> float | None:
    """``cost_analysis()["flops"]`` of a compiled executable (a ``while`` body counted once: not a per-run
    figure), or None where the backend does not say."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # optional per backend
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None
