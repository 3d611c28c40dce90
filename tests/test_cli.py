"""The `kvhoist` command line: every command on a tiny preset and on a user `module:function`."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from kvhoist import cli

HERE = pathlib.Path(__file__).parent
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


# -- report -----------------------------------------------------------------------------------------

def test_report_tiny_table_and_json(capsys):
    rc, out, err = run(capsys, "report", "tiny-t2v")
    assert rc == 0, err
    assert "blocks/attn2/to_k" in out and "blocks/attn2/to_v" in out
    assert "FLOPs saved/step" in out and "K/V projections are" in out and "hoisting saves at most that" in out
    rc, out, _ = run(capsys, "report", "tiny-t2v", "--json")
    d = json.loads(out)
    names = [h["name"] for h in d["hoisted"]]
    assert any("to_k" in n for n in names) and any("to_v" in n for n in names)
    assert all("share_of_total_flops" in h and "flops_saved_per_step" in h for h in d["hoisted"])
    assert 0 < d["totals"]["kv_projection_share"] < 1


def test_report_real_size_14b_is_small(capsys):
    rc, out, err = run(capsys, "report", "wan2.1-t2v-14b", "--json")
    assert rc == 0, err
    d = json.loads(out)
    share = d["totals"]["kv_projection_share"]
    assert 0.0002 < share < 0.0013                    # FACTS.md: 0.033% at 720p
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

    from kvhoist.specs import abstract_model
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
