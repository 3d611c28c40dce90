"""The `kvhoist` command line: every command on a tiny preset and on a user `module:function`."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from kvhoist.tools import cli, options
from kvhoist.tools.commands import common, demo

HERE = pathlib.Path(__file__).resolve().parents[1]  # tests/: the shared helper modules
USER = "cli_user_module:make_sampler"


@pytest.fixture(autouse=True)
def _user_module_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))


def run(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


# -- diff ------------------------------------------------------------------------------------------

def test_diff_tiny_preset_names_hoisted_kv(capsys):
    rc, out, err = run(capsys, "diff", "tiny-t2v", "--no-color")
    assert rc == 0, err
    assert "\x1b[" not in out                      # plain when not a terminal
    assert "dots per step" in out and "hoisted:" in out
    assert "blocks/attn2/to_k" in out and "blocks/attn2/to_v" in out
    # the K/V projection is shown leaving the step loop and arriving in front of it
    moved = [l for l in out.splitlines() if l.startswith("-") and "attn2/to_k" in l and "<< moved" in l]
    hoisted = [l for l in out.splitlines() if l.startswith("+") and "attn2/to_k" in l and ">> hoisted" in l]
    assert moved and hoisted


def test_diff_color_and_side_by_side(capsys):
    rc, out, _ = run(capsys, "diff", "tiny-t2v", "--color", "--no-summary")
    assert rc == 0 and "\x1b[1;33m" in out        # hoisted lines highlighted
    rc, out, _ = run(capsys, "diff", "tiny-t2v", "--side-by-side", "--columns", "160", "--no-color")
    assert rc == 0 and "before" in out and " | " in out and "attn2/to_k" in out


def test_diff_folds_unrolled_blocks(capsys):
    rc, out, _ = run(capsys, "diff", "tiny-t2v", "--no-scan-layers", "--no-color", "--context", "1000")
    assert rc == 0
    assert "… 1 more block like blocks/0" in out and "--full to expand" in out
    rc, full, _ = run(capsys, "diff", "tiny-t2v", "--no-scan-layers", "--no-color", "--full")
    assert rc == 0 and "more block" not in full and "blocks/1/attn2/to_k" in full


def test_diff_fori_and_two_experts(capsys):
    rc, out, _ = run(capsys, "diff", "tiny-t2v-a14b", "--loop", "fori", "--no-color")
    assert rc == 0 and "to_k" in out and "speculation" in out and "fission" in out


def test_diff_user_function(capsys):
    rc, out, err = run(capsys, "diff", USER, "--no-color")
    assert rc == 0, err
    assert "attn2/to_k" in out and ">> hoisted" in out
    rc, out, err = run(capsys, "diff", "cli_user_module:make_concrete", "--no-color")
    assert rc == 0, err


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def test_diff_html_renders_with_moved_highlighted(capsys, tmp_path):
    page = tmp_path / "diff.html"
    rc, _out, err = run(capsys, "diff", "tiny-t2v", "--html", str(page))
    assert rc == 0 and page.exists(), err
    text = page.read_text()
    assert "<link" not in text and "src=\"http" not in text    # self-contained
    assert 'class="before del moved"' in text and 'class="after add moved hoisted"' in text
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium) - the page was checked as text only")
    proc = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    # the inline script ran in the browser and read the computed style of a moved line
    assert 'data-moved-background="rgb(255, 2' in dom     # #fff3b0 / #ffe07a, not white
    count = int(dom.split('data-moved-count="')[1].split('"')[0])
    assert count > 10
    # long lines wrap inside their column instead of being cut off (the page's script counts clipped ones)
    assert 'data-clipped-lines="0"' in dom, dom.split("data-clipped-lines=")[1][:10]


def test_diff_html_wraps_long_lines(capsys, tmp_path):
    page = tmp_path / "diff.html"
    rc, _out, err = run(capsys, "diff", "tiny-t2v", "--html", str(page))
    assert rc == 0, err
    css = page.read_text().split("<style>")[1].split("</style>")[0]
    pre = next(rule for rule in css.split("}") if rule.strip().startswith("pre "))
    assert "white-space: pre-wrap" in pre and "overflow-wrap: anywhere" in pre
    assert max(len(line) for line in page.read_text().splitlines() if "<pre>" in line) > 200  # there are long ones


def test_diff_side_by_side_markers_without_color(capsys):
    rc, out, err = run(capsys, "diff", "tiny-t2v", "--side-by-side", "--columns", "200", "--no-color", "--no-summary")
    assert rc == 0, err
    assert "\x1b[" not in out
    lines = out.splitlines()
    col = (200 - 5) // 2
    gutters = [(l.ljust(col + 5)[col:col + 5], l) for l in lines[3:] if not l.startswith("---")]  # rstripped
    marks = {g for g, _l in gutters}
    assert marks <= {"     ", "  |  ", "  <  ", "  >  ", " M|  ", " M<  ", "  |H ", "  >H ", " M|H "}, marks
    # the K/V projections: moved out of the loop on the left (M), hoisted in front of it on the right (H)
    assert any(g[1] == "M" and "attn2/to_k" in l[:col] for g, l in gutters)
    assert any(g[3] == "H" and "attn2/to_k" in l[col + 5:] for g, l in gutters)
    assert any(g == "     " for g, _l in gutters) and any(g[2] in "|<>" for g, _l in gutters)
    assert "M = moved out of its loop" in out                # the legend


# -- report -----------------------------------------------------------------------------------------

#: The report's columns, in order, as docs/user_guide.md ("Report columns") defines them.
COLUMNS = ["value", "shape", "dtype", "bytes", "FLOPs/iteration", "FLOPs saved/run", "share of run", "loop", "via",
           "branch", "source"]


def _table_header(out: str) -> list[str]:
    line = next(l for l in out.splitlines() if l.startswith("value "))
    return [c.strip() for c in line.split("  ") if c.strip()]


def test_report_tiny_table_and_json(capsys):
    rc, out, err = run(capsys, "report", "tiny-t2v")
    assert rc == 0, err
    assert "blocks/attn2/to_k" in out and "blocks/attn2/to_v" in out
    assert _table_header(out) == COLUMNS                  # the same columns as Report.table() and the HTML page
    assert "FLOPs saved/step" not in out and "docs/user_guide.md#report-columns" in out
    assert "K/V projections are" in out and "hoisting saves at most that" in out
    rc, out, _ = run(capsys, "report", "tiny-t2v", "--json")
    d = json.loads(out)
    names = [h["name"] for h in d["hoisted"]]
    assert any("to_k" in n for n in names) and any("to_v" in n for n in names)
    assert all("share_of_run" in h and "branch" in h and "flops_per_iteration" in h for h in d["hoisted"])
    assert 0 < d["totals"]["kv_projection_share"] < 1


def test_report_two_experts_rows_carry_their_branch(capsys):
    rc, out, err = run(capsys, "report", "tiny-t2v-a14b")
    assert rc == 0, err
    header = _table_header(out)
    assert header == COLUMNS
    rows = [[c.strip() for c in l.split("  ") if c.strip()] for l in out.splitlines()
            if l.startswith("blocks/attn2/to_k ")]
    branches = sorted(r[header.index("branch")] for r in rows)
    assert len(rows) == 2 and branches[0].startswith("branch 0 of cond at sample.py:") \
        and branches[1].startswith("branch 1 of cond at sample.py:"), out
    rc, out, _ = run(capsys, "report", "tiny-t2v-a14b", "--json")
    kv = [h for h in json.loads(out)["hoisted"] if h["name"] == "blocks/attn2/to_k"]
    assert sorted(h["branch"] for h in kv) == branches


def make_while_sampler():
    """A user SPEC whose step loop is a ``while`` (traced trip count) around a layer scan."""
    import jax
    import jax.numpy as jnp

    from test_report import L, T, D, while_sampler

    sd = jax.ShapeDtypeStruct
    return while_sampler, (sd((2, D), jnp.float32), sd((T, D), jnp.float32), sd((L, D, D), jnp.float32),
                           sd((L, D, D), jnp.float32), sd((), jnp.int32)), {}


def test_report_while_step_loop_per_iteration(capsys):
    rc, out, err = run(capsys, "report", "test_cli:make_while_sampler")
    assert rc == 0, err
    header = _table_header(out)
    rows = [[c.strip() for c in l.split("  ") if c.strip()] for l in out.splitlines() if l.startswith("blocks/")]
    assert rows and all(r[header.index("FLOPs saved/run")] == "unknown trips" for r in rows)
    assert all(r[header.index("FLOPs/iteration")] not in ("0", "?") for r in rows)
    assert "saves 0" not in out and "FLOPs per iteration of loops with an unknown trip count" in out
    program = next(l for l in out.splitlines() if l.startswith("program:"))
    before, after = re.search(r"program: (\S+) FLOPs per run before, (\S+) after", program).groups()
    assert before != after                               # the hoisted work now runs once per run
    per_iteration = re.search(r"(\S+) FLOPs per iteration of loops with an unknown trip count \(while\) before, "
                              r"(\S+) after", out)
    assert per_iteration and per_iteration.group(1) != per_iteration.group(2)
    assert "of each iteration of its while loop(s)" in out
    rc, out, _ = run(capsys, "report", "test_cli:make_while_sampler", "--json")
    t = json.loads(out)["totals"]
    assert t["unknown_trip_flops_before"] > t["unknown_trip_flops_after"] > 0
    assert t["total_flops_after"] > t["total_flops_before"]


def test_diff_while_step_loop_dots_per_step(capsys, tmp_path):
    page = tmp_path / "w.html"
    rc, out, err = run(capsys, "diff", "test_cli:make_while_sampler", "--no-color", "--html", str(page))
    assert rc == 0, err
    from test_report import L

    dots = next(l for l in out.splitlines() if l.startswith("dots per step")).split()[-2:]
    assert dots == [str(4 * L), str(2 * L)]              # not the fissioned K/V scan in front of the while
    assert "FLOPs per iteration of while loops" in out
    text = page.read_text()
    assert all(f">{c}</th>" in text for c in COLUMNS) and "unknown trips" in text


def test_report_real_size_14b_is_small(capsys):
    rc, out, err = run(capsys, "report", "wan2.1-t2v-14b", "--json")
    assert rc == 0, err
    d = json.loads(out)
    share = d["totals"]["kv_projection_share"]
    assert 0.0002 < share < 0.0013                    # docs/comparison.md: 0.033% at 720p
    kv = 2 * 40 * 2 * 512 * 5120 * 2                   # K and V, 40 layers, CFG halves, 512 tokens, bf16
    assert kv <= d["totals"]["cache_bytes"] < kv + 4096  # + the 512-byte timestep frequencies
    rc, out, _ = run(capsys, "report", "wan2.1-t2v-14b")
    assert "K/V projections are 0.03" in out and "real-size" in out


def test_report_user_function(capsys):
    rc, out, err = run(capsys, "report", USER)
    assert rc == 0, err
    assert "attn2/to_k" in out and "attn2/to_v" in out


# -- graph --------------------------------------------------------------------------------------------

def test_graph_dot_and_svg(capsys, tmp_path):
    dot = tmp_path / "g.dot"
    rc, out, err = run(capsys, "graph", "tiny-t2v", "--out", str(dot))
    assert rc == 0, err
    text = dot.read_text()
    assert text.startswith("digraph") and "attn2/to_k" in text and "->" in text
    svg = tmp_path / "g.svg"
    rc, out, err = run(capsys, "graph", USER, "--out", str(svg))
    assert rc == 0
    if shutil.which("dot"):
        assert svg.read_text().lstrip().startswith("<?xml") and "to_k" in svg.read_text()
    else:
        assert "not installed" in err and (tmp_path / "g.dot").exists()


def test_graph_labels_the_two_experts(capsys, tmp_path):
    dot = tmp_path / "a14b.dot"
    rc, _out, err = run(capsys, "graph", "tiny-t2v-a14b", "--out", str(dot))
    assert rc == 0, err
    text = dot.read_text()
    kv_nodes = [l for l in text.splitlines() if "attn2/to_k" in l and "[label=" in l]
    assert any("branch 0 of cond at sample.py:" in l for l in kv_nodes)
    assert any("branch 1 of cond at sample.py:" in l for l in kv_nodes)


# -- errors -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, needle", [
    (["diff", "wan2.1-t2v-14x"], "did you mean wan2.1-t2v-14b"),
    (["report", "no_such_pkg.mod:fn"], "cannot import 'no_such_pkg.mod'"),
    (["report", "cli_user_module:not_a_triple"], "must return (fun, args, kwargs)"),
    (["report", "cli_user_module:raises"], "RuntimeError: no weights here"),
    (["report", "cli_user_module:missing"], "has no function 'missing'"),
    (["graph", "tiny-t2v", "--out", "g.png"], "use a .dot or .svg"),
    (["diff", "tiny-t2v", "--frames", "6"], "4k+1"),
])
def test_errors_one_line_exit_2(capsys, argv, needle):
    rc, out, err = run(capsys, *argv)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("kvhoist ")


def test_unknown_target(capsys):
    pytest.importorskip("kvhoist.targets", reason="kvhoist.targets is not in this tree yet")
    rc, _out, err = run(capsys, "diff", "tiny-i2v", "--target", "v99")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "v99" in err


def test_bench_missing_module_is_a_clear_error(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "kvhoist.bench", None)   # import now raises ImportError
    rc, _out, err = run(capsys, "bench")
    assert rc == 2 and "kvhoist.bench" in err


# -- help, python -m, demo ------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["diff", "report", "graph", "demo"])
def test_every_command_has_help_with_examples(capsys, command):
    rc, out, _ = run(capsys, command, "--help")
    assert rc == 0 and "examples:" in out and f"kvhoist {command}" in out


def test_python_dash_m_help():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "kvhoist", "--help"], capture_output=True, text=True, timeout=120,
                          cwd=HERE.parent, env=env)
    assert proc.returncode == 0, proc.stderr
    for c in ("diff", "report", "graph", "demo", "bench"):
        assert c in proc.stdout


def test_demo_small(capsys):
    rc, out, err = run(capsys, "demo", "--layers", "1", "--steps", "2", "--repeats", "1")
    assert rc == 0, err
    assert "latents agree: yes" in out and "@hoist_invariants" in out and "kv_cache=True" in out
    assert "hoisted" in out


def test_abstract_model_matches_eval_shape():
    import functools

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from kvhoist.tools.specs import abstract_model
    from wan_ref.model import WanModel
    from wan_ref.presets import get_preset
    from wan_ref.sample import sample

    lat = jax.ShapeDtypeStruct((1, 4, 2, 4, 4), jnp.float32)
    pe = jax.ShapeDtypeStruct((1, 16, 32), jnp.float32)
    f = functools.partial(sample, num_inference_steps=2)
    for scan in (True, False):
        cfg = get_preset("tiny-t2v").config.replace(num_layers=3, scan_layers=scan)
        full = nnx.eval_shape(lambda: WanModel(cfg, rngs=nnx.Rngs(0)))
        assert str(jax.make_jaxpr(f)(full, lat, pe, pe)) == str(jax.make_jaxpr(f)(abstract_model(cfg), lat, pe, pe))


# -- option values and output paths: rejected before any work starts ---------------------------------------

def _no_work(monkeypatch):
    """Make any trace or demo run fail the test: these errors must come before the work."""
    def boom(*_a, **_k):
        raise AssertionError("the command started working before rejecting its arguments")

    monkeypatch.setattr(common, "program", boom)
    monkeypatch.setattr(demo, "random_model", boom)


@pytest.mark.parametrize("argv, needle", [
    (["diff", "tiny-t2v", "--steps", "0"], "argument --steps: must be a positive integer, got 0"),
    (["report", "tiny-t2v", "--steps", "-3"], "argument --steps: must be a positive integer, got -3"),
    (["report", "tiny-t2v", "--frames", "0"], "argument --frames: must be a positive integer, got 0"),
    (["graph", "tiny-t2v", "--out", "g.dot", "--height", "0"], "argument --height: must be a positive integer"),
    (["diff", "tiny-t2v", "--width", "-16"], "argument --width: must be a positive integer, got -16"),
    (["diff", "tiny-t2v", "--steps", "ten"], "argument --steps: must be a positive integer, got 'ten'"),
    (["diff", "tiny-t2v", "--context", "-1"], "argument --context: must be an integer >= 0, got -1"),
    (["diff", "tiny-t2v", "--side-by-side", "--columns", "10"], "argument --columns: must be an integer >= 45"),
    (["demo", "--layers", "0"], "argument --layers: must be a positive integer, got 0"),
    (["demo", "--repeats", "0"], "argument --repeats: must be a positive integer, got 0"),
    (["demo", "--steps", "0"], "argument --steps: must be a positive integer, got 0"),
    (["demo", "--seed", "-1"], "argument --seed: must be an integer >= 0, got -1"),
    (["report", "tiny-t2v", "--bogus"], "unrecognized arguments: --bogus"),
    (["demo", "--bogus", "1"], "unrecognized arguments: --bogus 1"),
    (["report"], "the following arguments are required: SPEC"),
])
def test_bad_values_print_the_subcommands_usage(capsys, monkeypatch, argv, needle):
    _no_work(monkeypatch)
    rc, out, err = run(capsys, *argv)
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    command = argv[0]
    assert lines[0].startswith(f"usage: kvhoist {command} ")       # the subcommand's usage, not the top level's
    assert lines[-1] == f"kvhoist {command}: error: {needle}" or (
        lines[-1].startswith(f"kvhoist {command}: error: ") and needle in lines[-1]), lines[-1]
    assert sum(l.startswith("kvhoist") for l in lines) == 1        # one error line


def test_top_level_unknown_option_prints_top_level_usage(capsys):
    rc, _out, err = run(capsys, "--bogus")
    assert rc == 2 and err.startswith("usage: kvhoist [-h] COMMAND") and "unrecognized arguments: --bogus" in err


@pytest.mark.parametrize("argv_of, needle", [
    (lambda d: ["graph", "tiny-t2v", "--out", str(d / "missing" / "x.svg")], "folder {d}/missing does not exist"),
    (lambda d: ["diff", "tiny-t2v", "--html", str(d / "missing" / "x.html")], "folder {d}/missing does not exist"),
    (lambda d: ["diff", "tiny-t2v", "--html", str(d)], "is a directory"),
    (lambda d: ["graph", "tiny-t2v", "--out", str(d / "file.txt" / "g.dot")], "file.txt is not a directory"),
    (lambda d: ["graph", "tiny-t2v", "--out", str(d / "g.png")], "use a .dot or .svg"),
])
def test_output_paths_checked_before_work(capsys, monkeypatch, tmp_path, argv_of, needle):
    _no_work(monkeypatch)
    (tmp_path / "file.txt").write_text("x")
    rc, out, err = run(capsys, *argv_of(tmp_path))
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"kvhoist {argv_of(tmp_path)[0]}: error: --")
    assert needle.format(d=tmp_path) in lines[0]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write anywhere")
def test_output_path_not_writable(capsys, monkeypatch, tmp_path):
    _no_work(monkeypatch)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        rc, _out, err = run(capsys, "graph", "tiny-t2v", "--out", str(ro / "g.dot"))
    finally:
        ro.chmod(0o700)
    assert rc == 2 and "is not writable" in err


def test_check_output_path_accepts_a_new_file_and_rejects_an_unwritable_one(tmp_path, monkeypatch):
    assert options.check_output_path("--out", str(tmp_path / "new.svg")) is None
    assert "empty file name" in options.check_output_path("--out", "")
    monkeypatch.setattr(os, "access", lambda *_a, **_k: False)   # as for a read-only folder, even as root
    assert "is not writable" in options.check_output_path("--out", str(tmp_path / "new.svg"))


def test_write_failure_is_one_line(tmp_path):
    from kvhoist.tools.specs import SpecError

    with pytest.raises(SpecError) as info:
        with common.writing("--html", str(tmp_path / "x.html")):
            raise OSError(28, "No space left on device")
    assert str(info.value) == f"--html {tmp_path / 'x.html'}: cannot write: No space left on device"


def test_bench_usage_error_returns_2(capsys, monkeypatch):
    import types

    import kvhoist.bench

    fake = types.ModuleType("kvhoist.bench.command")
    fake.__doc__ = "fake bench"
    fake.add_arguments = lambda p: p.add_argument("--repeats", type=options.int_at_least(1, "a positive integer"))
    fake.main = lambda args: 0
    monkeypatch.setitem(sys.modules, "kvhoist.bench.command", fake)
    monkeypatch.setattr(kvhoist.bench, "command", fake, raising=False)
    rc, _out, err = run(capsys, "bench", "--repeats", "0")
    assert rc == 2 and "usage: kvhoist bench" in err and "must be a positive integer, got 0" in err


# -- `kvhoist --help` is fast: nothing imports jax until a command runs ----------------------------------------

_IMPORTS_OF = """
import sys
from kvhoist.tools.cli import main
rc = main(sys.argv[1:])
heavy = sorted(m for m in ("jax", "jaxlib", "flax", "numpy", "networkx", "kvhoist.api", "wan_ref") if m in sys.modules)
print("HEAVY=" + ",".join(heavy), file=sys.stderr)
sys.exit(rc)
"""


@pytest.mark.parametrize("argv, rc", [
    (["--help"], 0), (["diff", "--help"], 0), (["demo", "--help"], 0), ([], 2),
    (["report", "tiny-t2v", "--bogus"], 2), (["demo", "--layers", "0"], 2),
    (["graph", "tiny-t2v", "--out", "/no/such/folder/g.svg"], 2),
    (["bench", "--help"], 0), (["bench", "--repeats", "0"], 2), (["compile", "--help"], 0),
    (["graph", "--help"], 0), (["report", "--help"], 0),
])
def test_help_and_usage_errors_do_not_import_jax(argv, rc):
    proc = subprocess.run([sys.executable, "-c", _IMPORTS_OF, *argv], capture_output=True, text=True, timeout=120,
                          cwd=HERE.parent, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == rc, proc.stderr
    assert "HEAVY=\n" in proc.stderr or proc.stderr.rstrip().endswith("HEAVY="), proc.stderr[-500:]


def test_import_kvhoist_is_lazy_but_complete():
    code = ("import sys, kvhoist; assert 'jax' not in sys.modules, 'import kvhoist imported jax'; "
            "names = [getattr(kvhoist, n) for n in kvhoist.__all__]; assert 'jax' in sys.modules; "
            "assert kvhoist.targets.__name__ == 'kvhoist.targets'; from kvhoist import licm, Report; "
            "assert callable(licm) and Report.__name__ == 'Report'; "
            "assert set(kvhoist.__all__) <= set(dir(kvhoist)); assert kvhoist.compat.__name__ == 'kvhoist.compat'; "
            "sys.modules['kvhoist.bench'] = None; assert not hasattr(kvhoist, 'bench'); print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=HERE.parent,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
    proc = subprocess.run([sys.executable, "-c", "import kvhoist; kvhoist.no_such_name"], capture_output=True,
                          text=True, timeout=120, cwd=HERE.parent)
    assert proc.returncode == 1 and "module 'kvhoist' has no attribute 'no_such_name'" in proc.stderr


# -- SamplerOptions and `kvhoist bench` values: one clear error each ---------------------------------------

@pytest.mark.parametrize("kwargs, needle", [
    (dict(steps=0), "SamplerOptions(steps=0): must be a positive integer"),
    (dict(steps=-2), "SamplerOptions(steps=-2): must be a positive integer"),
    (dict(steps=2.5), "SamplerOptions(steps=2.5): must be a positive integer"),
    (dict(frames=0), "SamplerOptions(frames=0)"),
    (dict(height=-8), "SamplerOptions(height=-8)"),
    (dict(width=True), "SamplerOptions(width=True)"),
    (dict(text_len=0), "SamplerOptions(text_len=0)"),
    (dict(loop="python"), "use 'scan' or 'fori'"),
    (dict(loop="while"), "SamplerOptions(loop='while')"),
    (dict(scheduler="ddim"), "unknown scheduler; use one of 'unipc', 'euler'"),
    (dict(dtype="float16"), "use 'bfloat16' or 'float32'"),
    (dict(cfg="yes"), "SamplerOptions(cfg='yes'): must be True or False"),
    (dict(target=""), "SamplerOptions(target='')"),
])
def test_sampler_options_reject_nonsense_at_construction(kwargs, needle):
    from kvhoist.tools.specs import SamplerOptions

    with pytest.raises(ValueError) as info:
        SamplerOptions(**kwargs)
    assert needle in str(info.value) and len(str(info.value).splitlines()) == 1


def test_sampler_options_accept_defaults_and_real_values():
    from kvhoist.tools.specs import SamplerOptions

    SamplerOptions()
    SamplerOptions(loop="fori", steps=1, height=480, width=832, frames=81, scheduler="euler", dtype="float32",
                   target="v6e", text_len=1)


@pytest.mark.parametrize("argv_of, needle", [
    (lambda d: ["--repeats", "0"], "argument --repeats: must be a positive integer, got 0"),
    (lambda d: ["--repeats", "-3"], "argument --repeats: must be a positive integer, got -3"),
    (lambda d: ["--warmup", "-1"], "argument --warmup: must be an integer >= 0, got -1"),
    (lambda d: ["--overhead-layers", "0"], "argument --overhead-layers: must be a positive integer"),
    (lambda d: ["--form", "bogus"], "argument --form: invalid choice: 'bogus'"),
    (lambda d: ["--config", "huge"], "argument --config: invalid choice: 'huge'"),
    (lambda d: ["--out", str(d / "missing" / "b.json")], "folder {d}/missing does not exist"),
    (lambda d: ["--markdown", str(d)], "is a directory"),
    (lambda d: ["--from-json", str(d / "nope.json")], "nope.json: no such file"),
])
def test_bench_bad_values_exit_2_with_usage(capsys, monkeypatch, tmp_path, argv_of, needle):
    from kvhoist.bench import command as bench

    def boom(*_a, **_k):
        raise AssertionError("kvhoist bench started working before rejecting its arguments")

    monkeypatch.setattr(bench, "main", boom)
    rc, out, err = run(capsys, "bench", *argv_of(tmp_path))
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert lines[0].startswith("usage: kvhoist bench ")
    assert lines[-1].startswith("kvhoist bench: error: ") and needle.format(d=tmp_path) in lines[-1], lines[-1]


# -- graph: input nodes carry the argument names -------------------------------------------------------------

def test_graph_input_nodes_are_named(capsys, tmp_path):
    dot = tmp_path / "a14b.dot"
    rc, _out, err = run(capsys, "graph", "tiny-t2v-a14b", "--out", str(dot))
    assert rc == 0, err
    inputs = [l for l in dot.read_text().splitlines() if "shape=ellipse" in l]    # the input nodes
    assert inputs
    assert any('label="model.blocks.attn2.to_k.kernel\\nf32[2,24,24]"' in l for l in inputs), inputs[:3]
    assert any('label="model_2.blocks.attn2.to_v.kernel\\n' in l for l in inputs)   # the second expert
    assert not any('label="input\\n' in l or 'label="a[0]' in l for l in inputs)


def test_graph_input_names_from_the_trace_or_positions():
    import jax
    import jax.numpy as jnp

    from kvhoist import compat
    from kvhoist.tools.graph import hoisted_graph
    from kvhoist.passes.pipeline import optimize

    def sampler(params, x):
        def body(h, _):
            return h + jnp.tanh(params["ctx"] @ params["w_k"]).sum(), None
        return jax.lax.scan(body, x, None, length=3)[0]

    args = ({"ctx": jnp.ones((4, 4)), "w_k": jnp.ones((4, 4))}, jnp.ones(()))
    before = jax.make_jaxpr(sampler)(*args)
    after, _report = optimize(before)

    def input_labels(g):
        return {d["name"] for _n, d in g.nodes(data=True) if d["kind"] == "input"}

    assert input_labels(hoisted_graph(before, after)) == {"params['ctx']", "params['w_k']"}
    assert input_labels(hoisted_graph(before, after, input_names=["ctx", "w_k", "x"])) == {"ctx", "w_k"}
    # a rebuilt jaxpr has no recorded names: inputs are named by position
    _cv, consts, invars, outvars, eqns = compat.split_closed(before)
    anonymous = compat.make_closed(_cv, consts, invars, outvars, eqns)
    assert input_labels(hoisted_graph(anonymous, after)) == {"in[0]", "in[1]"}
    with pytest.raises(ValueError, match="input_names has 1 names for a program of 3 inputs"):
        hoisted_graph(before, after, input_names=["x"])


# -- demo: measured as `kvhoist bench` measures --------------------------------------------------------------

def test_demo_measures_like_bench(capsys, monkeypatch):
    from kvhoist.bench import timing

    calls = []
    real = timing.time_interleaved

    def spy(fns, **kw):
        calls.append((sorted(fns), kw))
        return real(fns, **kw)

    monkeypatch.setattr(timing, "time_interleaved", spy)
    rc, out, err = run(capsys, "demo", "--layers", "1", "--steps", "2", "--repeats", "3", "--no-progress")
    assert rc == 0, err
    assert len(calls) == 1                          # one interleaved measurement of the three variants
    names, kw = calls[0]
    assert names == sorted(demo.DEMO_VARIANTS) and kw["repeats"] == 3 and isinstance(kw["cpu_times"], dict)
    rows = [l for l in out.splitlines() if re.match(r"  (plain|hand|@hoist)", l)]
    assert len(rows) == 3
    for row in rows:   # CPU median [lower quartile-upper quartile], wall median, speed-up
        m = re.search(r"CPU +([\d.]+) ms \[([\d.]+)-([\d.]+)\]  wall +([\d.]+) ms  \(([\d.]+)x\)", row)
        assert m, row
        med, q1, q3 = map(float, m.groups()[:3])
        assert q1 <= med <= q3
    assert "interleaved" in out and "interquartile range" in out


def test_spread_is_median_and_quartiles():
    assert demo.spread([3.0]) == (3.0, 3.0, 3.0)
    assert demo.spread([1.0, 2.0, 3.0, 4.0, 100.0]) == (3.0, 2.0, 4.0)
