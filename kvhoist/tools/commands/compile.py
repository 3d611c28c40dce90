"""``kvhoist compile``: a sampler compiled for a TPU on this host three ways (plain / hand cache / hoisted):
matmul executions inside and outside the step loop, memory per chip, compile time."""

from __future__ import annotations

import argparse
import sys

from kvhoist.tools.commands import common

__all__ = ["run", "compile_table", "compile_verdict"]


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f}"


def compile_table(d: dict) -> str:
    """``kvhoist compile``'s table (one row per variant) from :func:`run`'s data."""
    cols = ("variant", "matmuls in loop", "outside", "args MiB", "temp MiB", "output MiB", "code MiB",
            "cache MiB", "compile s")
    rows = [cols]
    for name, v in d["variants"].items():
        rows.append((name, f"{v['matmuls_inside']:,}", f"{v['matmuls_outside']:,}", _mib(v["argument_bytes"]),
                     _mib(v["temp_bytes"]), _mib(v["output_bytes"]), _mib(v["generated_code_bytes"]),
                     _mib(v["cache_bytes"]), f"{v['compile_seconds']:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def compile_verdict(variants: dict) -> str:
    """One line comparing matmul executions inside the step loop: ``hoisted == hand < plain`` when kvhoist
    matched the hand-written cache and both beat plain jit."""
    inside = {k: v["matmuls_inside"] for k, v in variants.items()}
    p, h = inside.get("plain"), inside.get("hoisted")
    if "hand" in inside:
        a = inside["hand"]
        rel = lambda x, y: "==" if x == y else ("<" if x < y else ">")  # noqa: E731
        ok = h == a < p
        return (f"matmul executions in the step loop: hoisted {h} {rel(h, a)} hand {a} {rel(a, p)} plain {p}: "
                + ("hoisted == hand < plain" if ok else "NOT hoisted == hand < plain"))
    return f"matmul executions in the step loop: hoisted {h} vs plain {p} (no hand-written cache for this SPEC)"


def run(args: argparse.Namespace) -> int:
    """``kvhoist compile``: the sampler compiled for a TPU three ways (:func:`kvhoist.tools.tpu.compile_three_ways`).

    Exit 1 (one line) when a variant does not fit the chip's memory or fails to compile; 2 for usage errors (no libtpu, a
    non-TPU target, a topology of another generation)."""
    import functools
    import json

    from kvhoist import tpu_compile
    from kvhoist.tools import tpu
    from kvhoist.errors import KvhoistError
    from kvhoist.tools.specs import SpecError
    from kvhoist.targets import get_target

    try:
        target = get_target(args.target).name   # first: `--target v99` is unknown with or without libtpu
        tpu_compile.default_topology(target)
        tpu_compile.require_libtpu()
        if args.topology:
            tpu_compile.check_topology_name(target, args.topology)
        elif args.mesh:
            raise KvhoistError("--mesh needs --topology (one chip has no mesh to shape)")
    except KvhoistError as err:
        raise SpecError(str(err).splitlines()[0]) from None
    if ":" in args.spec and args.attention != "xla":
        raise SpecError(f"--attention {args.attention}: applies to wan_ref presets only")
    prog = common.program(args)
    steps = prog.steps
    if steps is None:
        from kvhoist.tools.diff import step_loop

        loop = step_loop(prog.trace())
        steps = int(loop.params["length"]) if loop is not None and loop.primitive.name == "scan" else None
    if steps is None:
        raise SpecError(f"{args.spec}: cannot tell its step count (compile needs a preset, or a function whose "
                        f"program has one scan step loop)")
    hand = functools.partial(prog.fun, kv_cache=True) if prog.preset else None
    try:
        with tpu.native_stderr(getattr(args, "verbose", False)) as stderr:
            log = (lambda s: print(s, file=stderr, flush=True)) if not args.json else None
            d = tpu.compile_three_ways(prog.fun, prog.args, prog.kwargs, steps=steps, target=target,
                                       topology=args.topology, mesh_shape=args.mesh, hand=hand, log=log)
    except tpu_compile.DoesNotFit as err:
        where = args.topology or f"one {target} chip"
        print(f"kvhoist compile: {args.spec} does not fit on {where} ({err.variant}): {err.line}", file=sys.stderr)
        return 1
    except tpu_compile.CompileFailed as err:
        where = args.topology or f"one {target} chip"
        print(f"kvhoist compile: {args.spec} failed to compile for {where} ({err.variant}): {err.line}",
              file=sys.stderr)
        return 1
    except KvhoistError as err:
        raise SpecError(str(err).splitlines()[0]) from None
    d.update(spec=args.spec, description=prog.description, steps=steps, attention=args.attention,
             jax=__import__("jax").__version__, libtpu=tpu_compile.libtpu_version(),
             verdict=compile_verdict(d["variants"]))
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    print("\n".join([prog.description,
                     f"compiled for {d['topology']} ({d['chips']} chip(s), {d['device_kind']}, mesh {d['mesh']}), "
                     f"jax {d['jax']}, libtpu {d['libtpu']}; memory per chip, cache = hoisted values (global)", "",
                     compile_table(d), "", d["verdict"],
                     "(compile-only: run times cannot be known without TPU hardware)"]))
    return 0
