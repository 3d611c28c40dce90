"""``kvhoist bench``: plain ``jax.jit`` vs a hand-written K/V cache vs ``hoist_invariants``, measured.

For each sampler form (step ``scan`` x layer ``scan``; step ``scan`` x unrolled layers; ``fori_loop``;
Wan 2.2 expert ``cond``; I2V with CFG; a Python loop around a jitted step) and each config, three
variants of :func:`wan_ref.sample.sample` run in ONE process, interleaved (the order rotates every
repeat), and the medians are reported:

* ``plain``: ``jax.jit(sample)`` - whatever XLA hoists on its own;
* ``hand``: wan_ref's hand-written cache, ``sample(..., kv_cache=True)``;
* ``hoisted``: ``kvhoist.hoist_invariants(sample)``.

Beside each measured speed-up sits the FLOP model's prediction
(:func:`kvhoist.analysis.cost.jaxpr_flops` of the traced programs: ``flops_before / flops_after``).
The run also measures the pass's own overhead on the full-size Wan 2.1 14B sampler traced with abstract
shapes (trace + rewrite vs XLA's lower + compile), and the bytes each variant caches.

``--quick`` is a separate, short script for an accelerator machine (< 5 minutes): it asks whether XLA
hoists the invariant K/V projections out of the step loop on its own (structurally: matmuls left in the
while body, plain vs hand-cached; and by timing), on a pure-JAX toy sampler and, when flax is installed,
on wan_ref's unrolled-layer form. That path imports neither torch nor diffusers, and works without
networkx/flax (the variants that need them are then reported as unavailable).

Benchmarks are measurements, not tests: nothing here asserts a speed. The targets are evaluated and
reported (``targets`` in the JSON) so a reader sees which held.

The measurement is :mod:`kvhoist.bench.samplers` (forms and configs: :mod:`kvhoist.bench.forms`; timing:
:mod:`kvhoist.bench.timing`; the page: :mod:`kvhoist.bench.markdown`; ``--quick``: :mod:`kvhoist.bench.quick`);
this module is the command line.

Example:
    $ python -m kvhoist.bench --out docs/benchmarks.json --markdown docs/benchmarks.md
    $ python -m kvhoist.bench --quick            # on a GPU/TPU machine; needs only jax + numpy (run from the
                                                 # repository root when kvhoist is not installed)
"""


from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from kvhoist.bench.forms import CONFIGS, FORMS

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``kvhoist bench``'s options to ``parser``.

    Every value is checked by the parser before anything runs: counts must be positive (``--warmup``
    >= 0), ``--config`` / ``--form`` must name known ones, ``--out`` / ``--markdown`` must be writable
    files in existing folders and ``--from-json`` an existing file; a bad one is a usage error (exit 2).
    """
    from kvhoist.tools.options import input_file, int_at_least, output_file

    positive = int_at_least(1, "a positive integer")
    parser.add_argument("--config", action="append", choices=sorted(CONFIGS), default=None,
                        help="benchmark config(s) (repeatable; default: all)")
    parser.add_argument("--form", action="append", choices=list(FORMS), default=None, metavar="FORM",
                        help="sampler form(s) (repeatable; default: all): " + ", ".join(map(repr, FORMS)))
    parser.add_argument("--repeats", type=positive, default=7, help="timed repeats per variant (default 7)")
    parser.add_argument("--warmup", type=int_at_least(0, "an integer >= 0"), default=1,
                        help="untimed rounds after compiling (default 1)")
    parser.add_argument("--no-overhead", dest="overhead", action="store_false",
                        help="skip the pass-overhead measurement on the abstract 14B sampler")
    parser.add_argument("--overhead-layers", type=positive, default=None,
                        help="layers of the abstract 14B model for the overhead measurement (default: all 40)")
    parser.add_argument("--out", type=output_file("--out"), default=None, help="write the results as JSON here")
    parser.add_argument("--markdown", type=output_file("--markdown"), default=None,
                        help="write the results as a markdown page here")
    parser.add_argument("--from-json", type=input_file, default=None, metavar="JSON",
                        help="re-render --markdown from a previous run's JSON instead of running")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="a progress line on stderr: cases done, the one running, elapsed time (default: when "
                             "stderr is a terminal, unless KVHOIST_PROGRESS=0)")
    parser.add_argument("--quick", action="store_true",
                        help="the short accelerator check (does XLA hoist on its own?); prints a JSON summary")


def warn_if_loaded(data: dict) -> None:
    """One stderr line, as ``kvhoist demo`` prints, when other work ran (load average above the core count at
    the start or end) or some CPU ratio is within the noise (its samples' interquartile ranges overlap)."""
    cores = os.cpu_count() or 1
    loads = [x[0] for x in (data.get("machine", {}).get("loadavg_start"), data.get("machine", {}).get("loadavg_end"))
             if x]
    noisy = sum(any(r.get("ratios_cpu_within_noise", {}).values()) for r in data.get("results", []))
    if loads and max(loads) > cores:
        print(f"note: load average {max(loads):.1f} on {cores} cores: other work is running, timings are noisy"
              + (f"; {noisy} row(s) have ratios within the noise (marked)" if noisy else ""), file=sys.stderr)
    elif noisy:
        print(f"note: {noisy} row(s) have CPU ratios within the noise (interquartile ranges overlap; marked)",
              file=sys.stderr)


def main(args: argparse.Namespace) -> int:
    """Runs ``kvhoist bench`` with parsed ``args``; returns the exit status."""
    if args.quick:
        from kvhoist.bench.quick import quick

        summary = quick(repeats=max(args.repeats, 3))
        text = json.dumps(summary, indent=1, default=str)
        print(text)
        if args.out:
            with open(args.out, "w") as fh:
                fh.write(text + "\n")
        return 0
    if getattr(args, "from_json", None):
        from kvhoist.bench.markdown import render_markdown

        with open(args.from_json) as fh:
            md = render_markdown(json.load(fh))
        if args.markdown:
            with open(args.markdown, "w") as fh:
                fh.write(md)
        else:
            print(md)
        return 0
    from kvhoist.bench.markdown import render_markdown
    from kvhoist.bench.samplers import run_benchmarks
    from kvhoist.tools.progress import Progress

    configs = args.config or list(CONFIGS)
    forms = args.form or list(FORMS)
    with Progress("bench", enabled=getattr(args, "progress", None)) as bar:
        data = run_benchmarks(configs, forms, repeats=args.repeats, warmup=args.warmup, overhead=args.overhead,
                              overhead_layers=args.overhead_layers, log=bar.write, progress=bar)
    warn_if_loaded(data)
    argv = sys.argv[1:]
    as_module = os.path.basename(os.path.dirname(os.path.abspath(sys.argv[0]))) == "bench"  # python -m kvhoist.bench
    data["command"] = ("python -m kvhoist.bench " if as_module else "kvhoist ") + " ".join(argv)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(data, fh, indent=1, default=str)
            fh.write("\n")
    md = render_markdown(data)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(md)
    if not args.out and not args.markdown:
        print(md)
    return 0


def run_as_module(argv: Sequence[str] | None = None) -> int:
    """``python -m kvhoist.bench [options]``: the same options as ``kvhoist bench``."""
    parser = argparse.ArgumentParser(prog="python -m kvhoist.bench", allow_abbrev=False, description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return main(parser.parse_args(argv))

