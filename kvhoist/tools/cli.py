"""The ``kvhoist`` command line: ``diff``, ``report``, ``graph``, ``demo``, ``compile`` and ``bench``.

``python -m kvhoist`` and the ``kvhoist`` script both call :func:`main`. Every command that takes a
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
import contextlib
import os
import re
import statistics
import sys
import time
from typing import Any, Callable, Iterator, Sequence

PROG = "kvhoist"
EXIT_USAGE = 2
#: The narrowest ``--side-by-side`` page: two 20-character columns and the five-character gutter
#: (``" M|H "``: change and moved/hoisted markers, see :meth:`kvhoist.tools.diff.JaxprDiff.side_by_side`).
MIN_COLUMNS = 45

_SPEC_HELP = ("a wan_ref preset (wan2.1-t2v-14b, wan2.1-t2v-1.3b, wan2.1-i2v-14b, wan2.1-flf2v-14b, "
              "wan2.2-t2v-a14b, wan2.2-i2v-a14b, wan2.2-ti2v-5b, tiny-t2v, tiny-i2v, ...; full-size presets are "
              "traced with abstract shapes, no weights) or package.module:function returning (fun, args, kwargs)")

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

def int_at_least(minimum: int, what: str) -> Callable[[str], int]:
    """An argparse ``type=``: an integer >= ``minimum``; ``what`` names the allowed range in the error
    (e.g. ``int_at_least(1, "a positive integer")`` turns ``--steps 0`` into ``argument --steps: must be
    a positive integer, got 0``)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
        return value

    parse.__name__ = f"int>={minimum}"
    return parse


_POSITIVE = int_at_least(1, "a positive integer")
_NON_NEGATIVE = int_at_least(0, "an integer >= 0")


def check_output_path(option: str, path: str) -> str | None:
    """Why ``path`` (the value of ``option``) cannot be written, in one line, or None if it can.

    Checked before any work starts, so that a typo in ``--out`` does not cost a trace of a 14B sampler.
    """
    if not path:
        return f"{option}: empty file name"
    if os.path.isdir(path):
        return f"{option} {path}: is a directory; give a file name"
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        what = "is not a directory" if os.path.exists(folder) else "does not exist"
        return f"{option} {path}: folder {folder} {what}"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"{option} {path}: folder {folder} is not writable"
    if os.path.exists(path) and not os.access(path, os.W_OK):
        return f"{option} {path}: file exists and is not writable"
    return None


def output_file(option: str) -> Callable[[str], str]:
    """An argparse ``type=`` for an output file: :func:`check_output_path` at parse time, so a bad path
    is a usage error (the subcommand's usage, exit 2) before any work starts."""

    def parse(path: str) -> str:
        why = check_output_path(option, path)
        if why:
            raise argparse.ArgumentTypeError(why.removeprefix(f"{option} "))
        return path

    parse.__name__ = "output file"
    return parse


def input_file(path: str) -> str:
    """An argparse ``type=`` for a file that must exist and be readable."""
    if not os.path.exists(path):
        raise argparse.ArgumentTypeError(f"{path}: no such file")
    if os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{path}: is a directory; give a file name")
    if not os.access(path, os.R_OK):
        raise argparse.ArgumentTypeError(f"{path}: not readable")
    return path


def _mesh_shape(text: str) -> tuple[int, int]:
    """An argparse ``type=`` for ``--mesh``: ``DATAxTENSOR`` with two positive integers, e.g. ``1x8``."""
    m = re.fullmatch(r"(\d+)x(\d+)", text.strip())
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise argparse.ArgumentTypeError(f"must be DATAxTENSOR with positive integers (e.g. 1x8), got {text!r}")
    return int(m.group(1)), int(m.group(2))


# -- parser -------------------------------------------------------------------------------------------

def _add_spec_arguments(p: argparse.ArgumentParser, *, target_required: bool = False,
                        target_help: str = "TPU generation for the token re-padding pass (e.g. v5e, v6e)") -> None:
    p.add_argument("spec", metavar="SPEC", help=_SPEC_HELP)
    g = p.add_argument_group("sampler options (presets only)")
    g.add_argument("--loop", choices=("scan", "fori"), default="scan", help="step loop form (default: scan)")
    g.add_argument("--scan-layers", action=argparse.BooleanOptionalAction, default=True,
                   help="blocks as one lax.scan (default) or unrolled")
    g.add_argument("--cfg", action=argparse.BooleanOptionalAction, default=True,
                   help="classifier-free guidance, both halves in one batch (default: on)")
    g.add_argument("--steps", type=_POSITIVE, help="denoising steps (default: the preset's)")
    g.add_argument("--height", type=_POSITIVE, help="video height in pixels (default: the preset's)")
    g.add_argument("--width", type=_POSITIVE, help="video width in pixels")
    g.add_argument("--frames", type=_POSITIVE, help="video frames, 4k+1 (latent frames = (f-1)//4+1)")
    g.add_argument("--scheduler", choices=("unipc", "euler"), default="unipc")
    g.add_argument("--dtype", choices=("bfloat16", "float32"),
                   help="parameter/activation dtype (default: bfloat16, float32 for tiny-*)")
    p.add_argument("--target", required=target_required, help=target_help)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``kvhoist`` (every subcommand)."""
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Loop-invariant hoisting for JAX diffusion samplers: see what moves out of the step "
                    "loop (diff), what it saves (report), how it depends (graph), run it (demo), and "
                    "compile it for a TPU on this host (compile).",
        epilog="examples:\n  kvhoist demo\n  kvhoist diff wan2.1-t2v-14b\n  kvhoist report wan2.2-t2v-a14b\n"
               "  kvhoist graph tiny-t2v --out kv.svg\n  kvhoist <command> --help")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
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
    p.add_argument("--mesh", metavar="DATAxTENSOR", type=_mesh_shape,
                   help="with --topology: the (data, tensor) mesh, e.g. 1x8 (all chips on tensor parallelism); "
                        "default 2x(chips/2)")
    p.add_argument("--attention", choices=("xla", "splash"), default="xla",
                   help="attention implementation of the preset's model (WanConfig.attention; default xla)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    sub.add_parser("bench", help="benchmarks (kvhoist.bench); `kvhoist bench --help` for its options",
                   add_help=False)
    return parser


# -- helpers ----------------------------------------------------------------------------------------------

def _options(args: argparse.Namespace) -> Any:
    from kvhoist.tools.specs import SamplerOptions

    return SamplerOptions(loop=args.loop, scan_layers=args.scan_layers, cfg=args.cfg, steps=args.steps,
                          height=args.height, width=args.width, frames=args.frames, scheduler=args.scheduler,
                          target=args.target, dtype=args.dtype, attention=getattr(args, "attention", None))


def _program(args: argparse.Namespace):
    from kvhoist.tools.specs import resolve

    return resolve(args.spec, _options(args))


def _use_color(flag: bool | None, stream: Any) -> bool:
    if flag is not None:
        return flag
    return stream.isatty() and not os.environ.get("NO_COLOR")


@contextlib.contextmanager
def _writing(option: str, path: str) -> Iterator[None]:
    """Turn an ``OSError`` while writing ``path`` (a disk that filled up, a folder removed since the
    early check) into the one-line usage error of the CLI."""
    from kvhoist.tools.specs import SpecError

    try:
        yield
    except OSError as err:
        raise SpecError(f"{option} {path}: cannot write: {err.strerror or err}") from None


_KV_SCOPE = re.compile(r"(attn2/(to_k|to_v|add_k_proj|add_v_proj))(/|$)")


def kv_projection_flops(closed: Any) -> Any:
    """FLOPs of the cross-attention K/V projections (``attn2/to_k|to_v|add_k_proj|add_v_proj`` matmuls)
    in one run of a program, counted as the program's totals are (:func:`kvhoist.analysis.cost.jaxpr_flops_run`:
    scan trip counts multiplied, a ``cond`` its costliest branch, a ``while`` body per iteration in
    ``.per_iteration``)."""
    from kvhoist import compat
    from kvhoist.analysis import cost

    def kv(e: Any) -> int:
        return cost.eqn_flops(e) if e.primitive.name == "dot_general" and _KV_SCOPE.search(compat.name_stack(e)) else 0

    return cost.jaxpr_flops_run(closed, kv)


def _ratio(part: int | None, whole: int | None) -> float | None:
    return part / whole if (part is not None and whole) else None


# -- commands ---------------------------------------------------------------------------------------------

def cmd_diff(args: argparse.Namespace) -> int:
    """``kvhoist diff``: summary table, then the unified / side-by-side diff; ``--html`` page."""
    from kvhoist.tools.diff import JaxprDiff

    prog = _program(args)
    t0 = time.perf_counter()
    before, after, report = prog.optimize()
    d = JaxprDiff(before, after, report, full=args.full, context=args.context)
    color = _use_color(args.color, sys.stdout)
    out = []
    if not args.no_summary:
        out += [prog.description, f"(traced and rewritten in {time.perf_counter() - t0:.1f} s)", "",
                d.summary_table(), ""]
    if args.side_by_side:
        import shutil

        out.append(d.side_by_side(width=args.columns or shutil.get_terminal_size((200, 40)).columns, color=color))
    else:
        out.append(d.unified(color=color, names=(f"{args.spec} (traced)", f"{args.spec} (kvhoist)")))
    print("\n".join(out))
    if args.html:
        page = d.html(title=f"kvhoist diff {args.spec}", description=prog.description)
        with _writing("--html", args.html):
            with open(args.html, "w", encoding="utf-8") as f:
                f.write(page)
        print(f"wrote {args.html}", file=sys.stderr)
    return 0


def report_dict(prog: Any, before: Any, after: Any, report: Any) -> dict:
    """The ``report`` command's data: :meth:`~kvhoist.Report.to_dict` plus each value's ``share_of_run``
    (the 'share of run' column), the program's step count and the K/V projections' share of its FLOPs."""
    from kvhoist.tools.diff import step_loop

    loop = step_loop(before)
    steps = int(loop.params["length"]) if loop is not None and loop.primitive.name == "scan" else None
    total = report.total_flops_before
    kv = kv_projection_flops(before)
    d = report.to_dict()
    for row in d["hoisted"]:
        row["share_of_run"] = _ratio(row["flops_saved"], total)
    d["program"] = {"spec": prog.name, "description": prog.description, "real_size": prog.real_size,
                    "steps": steps}
    d["totals"]["kv_projection_flops"] = int(kv)
    d["totals"]["kv_projection_share"] = _ratio(int(kv), total)
    d["totals"]["kv_projection_flops_per_unknown_iteration"] = kv.per_iteration
    d["totals"]["kv_projection_share_of_unknown_iteration"] = _ratio(kv.per_iteration,
                                                                     report.unknown_trip_flops_before)
    return d


def totals_lines(d: dict) -> list[str]:
    """The totals under ``kvhoist report``'s table: FLOPs per run before/after (and per iteration of loops
    with an unknown trip count, counted apart), then the one-line summary."""
    from kvhoist.report import human_flops

    t, steps = d["totals"], d["program"]["steps"]
    before, after = t["total_flops_before"], t["total_flops_after"]
    line = f"program: {human_flops(before)} FLOPs per run before, {human_flops(after)} after"
    if steps:
        line += f" ({steps} steps, {human_flops((before or 0) / steps)} per step before)"
    out = [line]
    ib, ia = t["unknown_trip_flops_before"], t["unknown_trip_flops_after"]
    if ib or ia:
        out[0] += " outside while loops (work hoisted out of one runs once per run, in front of it)"
        out.append(f"         + {human_flops(ib)} FLOPs per iteration of loops with an unknown trip count (while) "
                   f"before, {human_flops(ia)} after")
    return out


def cmd_report(args: argparse.Namespace) -> int:
    """``kvhoist report``: the hoisting report as tables (``--json``: :func:`report_dict`)."""
    import json

    from kvhoist.report import percent

    prog = _program(args)
    before, after, report = prog.optimize()
    d = report_dict(prog, before, after, report)
    if args.json:
        print(json.dumps(d, indent=2, default=str))
        return 0
    t = d["totals"]
    out = [prog.description, "", report.hoisted_table()]
    details = report.detail_lines()
    if details:
        out += [""] + details
    out += [""] + totals_lines(d) + ["hoisted: " + report.summary().removeprefix("hoisted ")]
    if t["kv_projection_flops"] or t["kv_projection_flops_per_unknown_iteration"]:
        shares = []
        if t["kv_projection_flops"]:
            shares.append(f"{percent(t['kv_projection_share'])} of this sampler's FLOPs per run")
        if t["kv_projection_flops_per_unknown_iteration"]:
            shares.append(f"{percent(t['kv_projection_share_of_unknown_iteration'])} of each iteration of its while "
                          "loop(s)")
        out.append(f"K/V projections are {' and '.join(shares)}; hoisting saves at most that (plus the context "
                   f"embedders it also moved).")
    if any(h.get("upper_bound") for h in d["hoisted"]):
        out.append("Values speculated out of a cond (two experts) are counted as if their branch ran every step: "
                   "their 'saved' figures are upper bounds; each step runs one branch.")
    elif any("speculation" in h["via"] for h in d["hoisted"]):
        out.append("Values speculated out of a cond (two experts, see 'branch'): 'FLOPs saved/run' counts each "
                   "branch's own runs, replayed from the static schedule (see the [speculation] note); a branch "
                   "that runs once saves nothing per run, though its FLOPs/iteration left the loop.")
    if prog.real_size:
        out.append("These are real-size numbers: at full resolution self-attention and the FFN dominate, so the "
                   "gain from hoisting is small; the cache costs memory.")
    else:
        out.append("(A tiny/user program: its shares do not represent a real checkpoint; use a full-size preset "
                   "for those.)")
    print("\n".join(out))
    return 0


def cmd_graph(args: argparse.Namespace) -> int:
    """``kvhoist graph``: the dependence graph of the hoisted values to ``--out``."""
    from kvhoist.tools.graph import hoisted_graph, write_graph

    prog = _program(args)
    before, after, _report = prog.optimize()
    g = hoisted_graph(before, after, input_names=prog.input_names())
    with _writing("--out", args.out):
        path, message = write_graph(g, args.out, title=args.spec)
    print(message, file=sys.stderr if path != args.out else sys.stdout)
    return 0


def demo_config(layers: int = 4) -> Any:
    """The demo model: Wan T2V layout at D=256 (4 heads x 64), 1024-wide text embeddings, FFN 1024."""
    from wan_ref.config import WanConfig

    return WanConfig(num_attention_heads=4, attention_head_dim=64, in_channels=16, out_channels=16, text_dim=1024,
                     freq_dim=256, ffn_dim=1024, num_layers=layers, scan_layers=True)


def random_model(config: Any, seed: int = 0) -> Any:
    """A ``WanModel`` with random weights drawn by NumPy over the abstract model's shapes.

    Much faster than running the initialisers eagerly (seconds on a loaded 2-core machine):
    matrices ~ N(0, 1/fan_in), norm weights 1, biases 0, modulation tables ~ N(0, 0.02).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from kvhoist.tools.specs import abstract_model

    graphdef, state = nnx.split(abstract_model(config))
    rng = np.random.default_rng(seed)

    def draw(path: Any, s: Any) -> Any:
        name = jax.tree_util.keystr(path).lower()
        if "scale_shift" in name or "pos_embed" in name:
            x = 0.02 * rng.standard_normal(s.shape)
        elif len(s.shape) >= 2 + (1 if "blocks" in name and config.scan_layers else 0):
            x = rng.standard_normal(s.shape) / np.sqrt(s.shape[-2])
        elif "norm" in name:
            x = np.ones(s.shape)
        else:
            x = np.zeros(s.shape)
        return jnp.asarray(x, s.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, state))


def spread(xs: Sequence[float]) -> tuple[float, float, float]:
    """``(median, lower quartile, upper quartile)`` of ``xs`` (inclusive quartiles; one value: all three)."""
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q1, med, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return med, q1, q3


DEMO_VARIANTS = ("plain jax.jit(sample)", "hand-written cache (kv_cache=True)", "@hoist_invariants")


def cmd_demo(args: argparse.Namespace) -> int:
    """``kvhoist demo``: plain vs hand-written cache vs ``@hoist_invariants`` on a small random Wan.

    Measured as ``kvhoist bench`` measures (:func:`kvhoist.bench.time_interleaved`): the three variants
    run interleaved, the order rotating every repeat, after one compiling call and one warm-up round each;
    per variant the median and interquartile range of the process CPU time (all threads: steady on a shared
    machine) and the median wall time; speed-ups are ratios of CPU medians."""
    import functools

    import jax
    import jax.numpy as jnp
    import kvhoist
    from kvhoist.bench import time_interleaved
    from kvhoist.tools.progress import Progress
    from wan_ref.sample import sample

    with Progress("demo", enabled=args.progress) as bar:
        bar.phase("building a random model")
        cfg = demo_config(args.layers)
        model = random_model(cfg, args.seed)
        keys = jax.random.split(jax.random.key(args.seed), 3)
        latents = jax.random.normal(keys[0], (1, 16, 2, 8, 8), jnp.float32)   # 2x4x4 = 32 latent tokens
        pe = jax.random.normal(keys[1], (1, 512, cfg.text_dim), jnp.float32)
        npe = jax.random.normal(keys[2], (1, 512, cfg.text_dim), jnp.float32)
        common = dict(num_inference_steps=args.steps, guidance_scale=5.0, flow_shift=3.0)
        hoisted = kvhoist.hoist_invariants(functools.partial(sample, **common))
        jitted = dict(zip(DEMO_VARIANTS, (jax.jit(functools.partial(sample, **common)),
                                          jax.jit(functools.partial(sample, **common, kv_cache=True)), hoisted)))
        fns = {label: functools.partial(fn, model, latents, pe, npe) for label, fn in jitted.items()}
        outs = {}
        for label, fn in fns.items():  # the first call traces (and rewrites) and compiles
            bar.phase(f"tracing and compiling {label}")
            outs[label] = jax.block_until_ready(fn())
        bar(0, (1 + args.repeats) * len(fns))
        bar.phase(f"running {args.repeats} repetitions x {len(fns)} variants, interleaved")
        cpu: dict[str, list[float]] = {}
        wall = time_interleaved(fns, repeats=args.repeats, warmup=1, cpu_times=cpu, on_call=lambda _n: bar.update())
    print(f"demo: random Wan T2V, {cfg.num_layers} scanned layers, D={cfg.inner_dim}, 512 text tokens, "
          f"32 latent tokens, CFG, {args.steps} UniPC steps")
    print(f"timing: as kvhoist bench - the 3 variants interleaved, {args.repeats} timed runs each after a warm-up; "
          "process CPU time (all threads), median [interquartile range]; wall-clock median; speed-up = CPU ratio")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > (os.cpu_count() or 1):
        print(f"note: load average {load:.1f} on {os.cpu_count()} cores: other work is running, timings are noisy")
    ref = outs[DEMO_VARIANTS[0]]
    base = statistics.median(cpu[DEMO_VARIANTS[0]])
    worst = 0.0
    for label in DEMO_VARIANTS:
        med, q1, q3 = spread(cpu[label])
        diff = float(jnp.max(jnp.abs(outs[label] - ref)))
        worst = max(worst, diff)
        print(f"  {label:<36} CPU {med * 1e3:8.1f} ms [{q1 * 1e3:.1f}-{q3 * 1e3:.1f}]  wall "
              f"{statistics.median(wall[label]) * 1e3:8.1f} ms  ({base / med:4.2f}x)   max |latents - plain| = "
              f"{diff:.2e}")
    tol = 1e-3 * max(1.0, float(jnp.max(jnp.abs(ref))))
    print(f"latents agree: {'yes' if worst <= tol else 'NO'} (max diff {worst:.2e}, tolerance {tol:.1e})")
    print(hoisted.report(model, latents, pe, npe).summary())
    return 0 if worst <= tol else 1


def cmd_bench(argv: Sequence[str]) -> int:
    """``kvhoist bench``: delegate to :mod:`kvhoist.bench` (imported lazily; exit 2 if missing)."""
    try:
        from kvhoist import bench
    except ImportError as err:
        print(f"{PROG} bench: the benchmark module (kvhoist.bench) is not available in this install ({err})",
              file=sys.stderr)
        return EXIT_USAGE
    parser = argparse.ArgumentParser(prog=f"{PROG} bench", description=(bench.__doc__ or "").strip().split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_arguments(parser)
    try:
        args = parser.parse_args(list(argv))
    except SystemExit as exc:  # --help (0) or a usage error (2), printed with `kvhoist bench`'s usage
        return int(exc.code or 0)
    return int(bench.main(args) or 0)


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f}"


def compile_table(d: dict) -> str:
    """``kvhoist compile``'s table (one row per variant) from :func:`cmd_compile`'s data."""
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


def cmd_compile(args: argparse.Namespace) -> int:
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
        tpu_compile.require_libtpu()
        target = get_target(args.target).name
        tpu_compile.default_topology(target)
        if args.topology:
            tpu_compile.check_topology_name(target, args.topology)
        elif args.mesh:
            raise KvhoistError("--mesh needs --topology (one chip has no mesh to shape)")
    except KvhoistError as err:
        raise SpecError(str(err).splitlines()[0]) from None
    if ":" in args.spec and args.attention != "xla":
        raise SpecError(f"--attention {args.attention}: applies to wan_ref presets only")
    prog = _program(args)
    steps = prog.steps
    if steps is None:
        from kvhoist.tools.diff import step_loop

        loop = step_loop(prog.trace())
        steps = int(loop.params["length"]) if loop is not None and loop.primitive.name == "scan" else None
    if steps is None:
        raise SpecError(f"{args.spec}: cannot tell its step count (compile needs a preset, or a function whose "
                        f"program has one scan step loop)")
    hand = functools.partial(prog.fun, kv_cache=True) if prog.preset else None
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if not args.json else None
    try:
        d = tpu.compile_three_ways(prog.fun, prog.args, prog.kwargs, steps=steps, target=target,
                                   topology=args.topology, mesh_shape=args.mesh, hand=hand, log=log)
    except tpu_compile.DoesNotFit as err:
        where = args.topology or f"one {target} chip"
        print(f"{PROG} compile: {args.spec} does not fit on {where} ({err.variant}): {err.line}", file=sys.stderr)
        return 1
    except tpu_compile.CompileFailed as err:
        where = args.topology or f"one {target} chip"
        print(f"{PROG} compile: {args.spec} failed to compile for {where} ({err.variant}): {err.line}",
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


_COMMANDS = {"diff": cmd_diff, "report": cmd_report, "graph": cmd_graph, "demo": cmd_demo, "compile": cmd_compile}


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
    stderr; parser errors print the subcommand's usage first)."""
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
        return _COMMANDS[args.command](args)
    except SpecError as err:
        print(f"{PROG} {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `kvhoist diff ... | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
