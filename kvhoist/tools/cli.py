"""The ``kvhoist`` command line: ``diff``, ``report``, ``graph``, ``demo``, ``compile`` and ``bench``.

``python -m kvhoist`` and the ``kvhoist`` script both call :func:`main`, which parses the arguments and
runs the command's module (:mod:`kvhoist.tools.commands`: ``diff``, ``report``, ...; ``bench`` is
:mod:`kvhoist.bench`'s own parser). Every command that takes a
SPEC accepts a ``wan_ref`` preset (traced over an abstract model: no weights are allocated) or
``package.module:function`` returning ``(fun, args, kwargs)`` (see :mod:`kvhoist.tools.specs`).

``compile`` compiles a sampler for a TPU topology on this (CPU) host (needs ``pip install -e '.[tpu]'``);
a configuration the TPU compiler cannot fit prints one line with the compiler's figures and exits 1.

Errors a user can fix print one line on stderr and exit with status 2, before any tracing starts:

* a bad option value (``--steps 0``, ``--frames -3``, an unknown option) is rejected by the parser,
  which prints the *subcommand's* usage and one ``kvhoist <command>: error: ...`` line;
* an output path (``--out``, ``--html``) whose folder does not exist or is not writable, and a SPEC
  that cannot be used (unknown preset, a module that does not import, a bad factory, an unknown
  target), print the error line only.

The module imports nothing heavy (no jax) until a command runs, so ``kvhoist --help`` is fast.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import sys
from typing import Sequence

from kvhoist.tools.options import check_output_path, int_at_least, mesh_shape

PROG = "kvhoist"
EXIT_USAGE = 2
#: The narrowest ``--side-by-side`` page: two 20-character columns and the five-character gutter
#: (``" M|H "``: change and moved/hoisted markers, see :meth:`kvhoist.tools.diff.JaxprDiff.side_by_side`).
MIN_COLUMNS = 45

_SPEC_HELP = ("a wan_ref preset (wan2.1-t2v-14b, wan2.1-t2v-1.3b, wan2.1-i2v-14b, wan2.1-flf2v-14b, "
              "wan2.2-t2v-a14b, wan2.2-i2v-a14b, wan2.2-ti2v-5b, tiny-t2v, tiny-i2v, ...; full-size presets are "
              "traced with abstract shapes, no weights), a diffusers Wan checkpoint folder (pipeline root or its "
              "transformer/: config.json only, nothing loaded) or package.module:function returning (fun, args, kwargs)")

_EXAMPLES = {
    "diff": """examples:
  kvhoist diff wan2.1-t2v-14b                      # summary + unified diff, 14B at 720p, bf16
  kvhoist diff wan2.2-t2v-a14b --loop fori         # two experts behind a lax.cond
  kvhoist diff tiny-t2v --no-scan-layers --full    # unrolled layers, nothing folded
  kvhoist diff wan2.1-i2v-14b --target v6e         # with the image-token re-padding pass
  kvhoist diff tiny-t2v --side-by-side --columns 220
  kvhoist diff wan2.1-t2v-14b --html diff.html     # self-contained page, moved equations highlighted
  kvhoist diff mypkg.samplers:make_sampler         # your own function""",
    "report": """examples:
  kvhoist report wan2.1-t2v-14b                    # real-size FLOPs and cache bytes
  kvhoist report wan2.2-t2v-a14b --json            # machine-readable
  kvhoist report tiny-i2v --no-cfg --steps 8""",
    "graph": """examples:
  kvhoist graph tiny-t2v --out kv.svg              # SVG via Graphviz `dot` (DOT when it is missing)
  kvhoist graph wan2.2-t2v-a14b --out a14b.dot""",
    "demo": """examples:
  kvhoist demo                                     # ~40 s on 2 busy CPU cores (half of it compiling)
  kvhoist demo --repeats 9 --no-progress           # more timed runs; no progress line
  kvhoist demo --steps 20 --layers 8""",
    "compile": """examples:
  kvhoist compile tiny-t2v --target v6e --steps 6                      # one chip, seconds
  kvhoist compile wan2.1-t2v-14b --target v6e --height 240 --width 416 --frames 5 --steps 10
  kvhoist compile wan2.2-t2v-a14b --target v6e --topology v6e:2x4 --height 480 --width 832
  kvhoist compile tiny-i2v --target v5e --json
needs libtpu: pip install -e '.[tpu]' (compile-only: nothing runs, no TPU needed)""",
}


# -- option values ----------------------------------------------------------------------------------

_POSITIVE = int_at_least(1, "a positive integer")
_NON_NEGATIVE = int_at_least(0, "an integer >= 0")


# -- parser -------------------------------------------------------------------------------------------

def _add_spec_arguments(p: argparse.ArgumentParser, *, target_required: bool = False,
                        target_help: str = "TPU generation for the token re-padding pass (e.g. v5e, v6e)") -> None:
    p.add_argument("spec", metavar="SPEC", help=_SPEC_HELP)
    g = p.add_argument_group("sampler options (presets and checkpoint folders)")
    g.add_argument("--loop", choices=("scan", "fori"), default="scan", help="step loop form (default: scan)")
    g.add_argument("--scan-layers", action=argparse.BooleanOptionalAction, default=True,
                   help="blocks as one lax.scan (default) or unrolled")
    g.add_argument("--cfg", action=argparse.BooleanOptionalAction, default=True,
                   help="classifier-free guidance, both halves in one batch (default: on)")
    g.add_argument("--steps", type=_POSITIVE, help="denoising steps (default: the preset's)")
    g.add_argument("--height", type=_POSITIVE, help="video height in pixels (default: the preset's)")
    g.add_argument("--width", type=_POSITIVE, help="video width in pixels")
    g.add_argument("--frames", type=_POSITIVE, help="video frames, 4k+1 (latent frames = (f-1)//4+1)")
    g.add_argument("--scheduler", choices=("unipc", "euler"),
                   help="default: a checkpoint's own scheduler (scheduler/scheduler_config.json), else unipc")
    g.add_argument("--dtype", choices=("bfloat16", "float32"),
                   help="parameter/activation dtype (default: bfloat16, float32 for tiny-*)")
    p.add_argument("--target", required=target_required, help=target_help)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``kvhoist`` (every subcommand)."""
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
        description="Loop-invariant hoisting for JAX diffusion samplers: see what moves out of the step "
                    "loop (diff), what it saves (report), how it depends (graph), run it (demo), and "
                    "compile it for a TPU on this host (compile).",
        epilog="examples:\n  kvhoist demo\n  kvhoist diff wan2.1-t2v-14b\n  kvhoist report wan2.2-t2v-a14b\n"
               "  kvhoist graph tiny-t2v --out kv.svg\n  kvhoist <command> --help")
    # `--step 5` is not `--steps 5`: no option is abbreviated (every parser, also bench's and python -m's)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND",
                                parser_class=functools.partial(argparse.ArgumentParser, allow_abbrev=False))
    fmt = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser("diff", help="before/after jaxprs of a sampler as a diff", formatter_class=fmt,
                       description="Trace SPEC, run the kvhoist pipeline, print a summary table and the diff of the "
                                   "two jaxprs. Moved equations end in '<< moved out of loop' (before) and "
                                   "'>> hoisted' (after).", epilog=_EXAMPLES["diff"])
    _add_spec_arguments(p)
    p.add_argument("--side-by-side", action="store_true", help="two columns instead of a unified diff")
    p.add_argument("--html", metavar="FILE", help="also write a self-contained HTML page")
    p.add_argument("--full", action="store_true", help="expand folded layer blocks and call bodies")
    p.add_argument("--context", type=_NON_NEGATIVE, default=3, help="context lines around changes (default 3)")
    p.add_argument("--columns", type=int_at_least(MIN_COLUMNS, f"an integer >= {MIN_COLUMNS}"),
                   help="line width for --side-by-side (default: the terminal's)")
    p.add_argument("--color", action=argparse.BooleanOptionalAction, default=None,
                   help="colour (default: on a terminal, unless NO_COLOR is set)")
    p.add_argument("--no-summary", action="store_true", help="print only the diff")

    p = sub.add_parser("report", help="what was hoisted, what it costs and saves", formatter_class=fmt,
                       description="The hoisting report: one row per hoisted value with the columns value, shape, "
                                   "dtype, bytes, FLOPs/iteration, FLOPs saved/run, share of run, loop, via, branch, "
                                   "source (explained in docs/user_guide.md, 'Report columns'); skipped candidates "
                                   "with reasons; totals.", epilog=_EXAMPLES["report"])
    _add_spec_arguments(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")

    p = sub.add_parser("graph", help="dependence graph of the hoisted values (DOT / SVG)", formatter_class=fmt,
                       description="Write the dependence graph of what was hoisted: the hoisted equations, the inputs "
                                   "they read and the loop that consumes them.", epilog=_EXAMPLES["graph"])
    _add_spec_arguments(p)
    p.add_argument("--out", required=True, metavar="FILE", help="FILE.dot or FILE.svg")

    p = sub.add_parser("demo", help="run a small random Wan three ways and compare", formatter_class=fmt,
                       description="Build a small random Wan T2V (CFG, scanned layers, 512 text tokens, few latent "
                                   "tokens), sample it with plain jax.jit, with the hand-written K/V cache and with "
                                   "@hoist_invariants; check the latents agree and time the three as kvhoist "
                                   "bench does (interleaved, process CPU time, median and interquartile range).",
                       epilog=_EXAMPLES["demo"])
    p.add_argument("--layers", type=_POSITIVE, default=4, help="transformer blocks (default 4)")
    p.add_argument("--steps", type=_POSITIVE, default=10, help="denoising steps (default 10)")
    p.add_argument("--repeats", type=_POSITIVE, default=5,
                   help="timed runs of each variant, interleaved, after a warm-up (default 5; median and IQR)")
    p.add_argument("--seed", type=_NON_NEGATIVE, default=0, help="random seed of weights and inputs (default 0)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="a progress line on stderr (default: when stderr is a terminal, unless KVHOIST_PROGRESS=0)")

    p = sub.add_parser("compile", help="compile a sampler for a TPU on this host: plain / hand cache / hoisted",
                       formatter_class=fmt,
                       description="Compile SPEC's sampler for a TPU topology from abstract shapes (no TPU, no "
                                   "weights: libtpu's compiler runs on this host) three ways - plain jax.jit, the "
                                   "hand-written K/V cache (presets: sample(kv_cache=True)) and @hoist_invariants - "
                                   "and print per variant the matmul executions inside / outside the step loop "
                                   "(weighted by loop trip counts, every cond branch counted), memory per chip "
                                   "(arguments, temporaries, output, generated code; cache = kvhoist's hoisted "
                                   "values, global) and compile time. Run times cannot be known without hardware.",
                       epilog=_EXAMPLES["compile"])
    _add_spec_arguments(p, target_required=True,
                        target_help="TPU generation: v4, v5e, v5p, v6e or v7x (default topology: one chip of "
                                    "v4:2x2x1, v5e:2x2, v5p:2x2x1, v6e:2x2, tpu7x:2x2x1)")
    p.add_argument("--topology", metavar="NAME:AxB",
                   help="compile for all chips of this topology (e.g. v6e:2x4, v5e:2x4), parameters tensor-sharded "
                        "over a (data=2, tensor=n/2) mesh; default: one chip")
    p.add_argument("--mesh", metavar="DATAxTENSOR", type=mesh_shape,
                   help="with --topology: the (data, tensor) mesh, e.g. 1x8 (all chips on tensor parallelism); "
                        "default 2x(chips/2)")
    p.add_argument("--attention", choices=("xla", "splash"), default="xla",
                   help="attention implementation of the preset's model (WanConfig.attention; default xla)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--verbose", action="store_true",
                   help="show libtpu's own stderr messages (hidden by default: worker-hostname errors on a host "
                        "that is no TPU VM)")

    sub.add_parser("bench", help="benchmarks (kvhoist.bench); `kvhoist bench --help` for its options",
                   add_help=False)
    return parser


def cmd_bench(argv: Sequence[str]) -> int:
    """``kvhoist bench``: delegate to :mod:`kvhoist.bench.command` (imported lazily; exit 2 if missing)."""
    try:
        from kvhoist.bench import command as bench
    except ImportError as err:
        print(f"{PROG} bench: the benchmark module (kvhoist.bench) is not available in this install ({err})",
              file=sys.stderr)
        return EXIT_USAGE
    parser = argparse.ArgumentParser(prog=f"{PROG} bench", allow_abbrev=False, description=(bench.__doc__ or "").strip().split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_arguments(parser)
    try:
        args = parser.parse_args(list(argv))
    except SystemExit as exc:  # --help (0) or a usage error (2), printed with `kvhoist bench`'s usage
        return int(exc.code or 0)
    return int(bench.main(args) or 0)


#: command -> the module whose ``run(args)`` carries it out (imported when the command runs).
_COMMANDS = {name: f"kvhoist.tools.commands.{name}" for name in ("diff", "report", "graph", "demo", "compile")}


def subcommand_parsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The subcommand parsers of :func:`build_parser`'s parser, by command name."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def output_path_errors(args: argparse.Namespace) -> list[str]:
    """One line per output path of ``args`` (``--html``, ``--out``) that cannot be written."""
    errors = []
    if args.command == "graph" and not args.out.endswith((".dot", ".svg")):
        errors.append(f"--out {args.out}: use a .dot or .svg file name")
    for option in ("html", "out"):
        path = getattr(args, option, None)
        if path is not None:
            why = check_output_path(f"--{option}", path)
            if why:
                errors.append(why)
    return errors


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``kvhoist`` command line with ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    Exit status: 0 on success, 1 when ``demo``'s latents disagree, 2 for a usage error (one line on
    stderr; parser errors print the subcommand's usage first), 130 on Ctrl-C (one line: as the program,
    ``argv=None``, see :mod:`kvhoist.tools.interrupt`)."""
    if argv is None:
        from kvhoist.tools.interrupt import exit_on_interrupt

        exit_on_interrupt(sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith("-") else "")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        return cmd_bench(argv[1:])
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # report them with the subcommand's usage, not the top-level one
            sub = subcommand_parsers(parser).get(args.command, parser)
            sub.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    errors = output_path_errors(args)
    try:
        from kvhoist.tools.progress import progress_enabled

        progress_enabled()          # a KVHOIST_PROGRESS that is neither on nor off
    except ValueError as err:
        errors.append(str(err))
    if errors:
        print(f"{PROG} {args.command}: error: {errors[0]}", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "compile":  # the host compiles for TPU; it must not try to start a TPU backend
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    from kvhoist.tools.specs import SpecError

    try:
        return importlib.import_module(_COMMANDS[args.command]).run(args)
    except SpecError as err:
        print(f"{PROG} {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `kvhoist diff ... | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
