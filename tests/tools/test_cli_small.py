"""Issue 21 item 6 (and 4): no abbreviated options, bench's noise warning, the report's shared-work line,
the KVHOIST_LOG variable."""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys

import pytest

from kvhoist.tools import cli

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("argv, needle", [
    (["report", "tiny-t2v", "--step", "5"], "unrecognized arguments: --step 5"),
    (["diff", "tiny-t2v", "--side"], "unrecognized arguments: --side"),
    (["demo", "--repeat", "3"], "unrecognized arguments: --repeat 3"),
    (["compile", "tiny-t2v", "--target", "v6e", "--topo", "v6e:2x4"], "unrecognized arguments: --topo"),
    (["bench", "--repeat", "3"], "unrecognized arguments: --repeat 3"),
])
def test_no_option_is_abbreviated(capsys, argv, needle):
    assert cli.main(argv) == 2
    assert needle in capsys.readouterr().err


def test_every_parser_refuses_abbreviations():
    parser = cli.build_parser()
    assert parser.allow_abbrev is False
    subs = cli.subcommand_parsers(parser)
    assert set(subs) >= {"diff", "report", "graph", "demo", "compile", "bench"}
    assert all(p.allow_abbrev is False for p in subs.values())


def test_iqr_overlap_and_the_marked_ratio():
    from kvhoist.bench.markdown import NOISE_MARK, cpu_ratio
    from kvhoist.bench.timing import iqr_overlap

    plain, hoisted = [10.7, 11.4, 10.9, 11.0], [15.3, 11.1, 10.8, 11.0]    # runs like the loaded ones
    assert iqr_overlap(plain, hoisted)
    assert not iqr_overlap([1.0, 1.01, 1.02, 0.99], [2.0, 2.02, 2.01, 1.99])
    assert cpu_ratio({"r": 1.05}, {"r": True}, "r") == f"1.050 {NOISE_MARK}"
    assert cpu_ratio({"r": 1.05}, {"r": False}, "r") == "1.050"


def test_bench_warns_when_loaded_or_noisy(capsys, monkeypatch):
    from kvhoist.bench.command import warn_if_loaded

    cores = os.cpu_count() or 1
    noisy = {"results": [{"ratios_cpu_within_noise": {"plain_over_hoisted": True}}]}
    warn_if_loaded({"machine": {"loadavg_start": [cores + 3.0, 0, 0], "loadavg_end": [0.5, 0, 0]}, **noisy})
    err = capsys.readouterr().err
    assert f"note: load average {cores + 3.0:.1f} on {cores} cores" in err and "1 row(s)" in err
    warn_if_loaded({"machine": {"loadavg_start": [0.1, 0, 0], "loadavg_end": [0.1, 0, 0]}, **noisy})
    assert "interquartile ranges overlap" in capsys.readouterr().err
    warn_if_loaded({"machine": {"loadavg_start": [0.1, 0, 0], "loadavg_end": [0.1, 0, 0]}, "results": []})
    assert capsys.readouterr().err == ""


def test_report_says_which_row_carries_the_text_embedder(capsys):
    assert cli.main(["report", "wan2.1-t2v-14b"]) == 0
    out = capsys.readouterr().out
    line = [l for l in out.splitlines() if l.startswith("blocks/attn2/to_k: FLOPs/iteration include")]
    assert len(line) == 1 and "blocks/attn2/to_v also read(s)" in line[0] and "text embedder" in line[0]
    assert not any(l.startswith("blocks/attn2/to_v: FLOPs") for l in out.splitlines())


def _run_logged(env_value: str | None) -> subprocess.CompletedProcess:
    code = ("import functools, kvhoist\nfrom wan_ref.sample import sample\nfrom wan_ref.presets import tiny_inputs\n"
            "inp = tiny_inputs('tiny-t2v', num_inference_steps=3)\n"
            "kvhoist.hoist_invariants(functools.partial(sample, **inp.options))(*inp.args, **inp.extra)\n")
    env = {k: v for k, v in os.environ.items() if k != "KVHOIST_LOG"}
    if env_value is not None:
        env["KVHOIST_LOG"] = env_value
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)


def test_kvhoist_log_environment_variable():
    debug = _run_logged("debug")
    assert debug.returncode == 0, debug.stderr[-2000:]
    lines = debug.stderr.splitlines()
    assert lines and all(l.startswith("kvhoist ") for l in lines), lines       # kvhoist's lines only
    assert any(l.startswith("kvhoist DEBUG   moved blocks/attn2/to_k") for l in lines)
    assert any(l.startswith("kvhoist INFO compiled sample") for l in lines)
    assert _run_logged(None).stderr == ""
    bad = _run_logged("loud")
    assert "KVHOIST_LOG='loud': use one of debug, info, warning, off; ignored" in bad.stderr
