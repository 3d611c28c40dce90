"""Progress reporting: kvhoist.tools.progress, `kvhoist demo` / `kvhoist bench` progress, sample(progress=...)."""

from __future__ import annotations

import io
import re

import pytest

from kvhoist.tools import cli
from kvhoist.tools.commands import demo
from kvhoist.tools.progress import ENV, Progress, progress_enabled


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)


# -- the reporter ---------------------------------------------------------------------------------------

def test_off_when_not_a_terminal_on_when_a_terminal():
    pipe = io.StringIO()
    with Progress("work", total=3, stream=pipe) as bar:
        for _ in range(3):
            bar.update()
    assert pipe.getvalue() == ""
    tty = FakeTTY()
    with Progress("work", total=3, stream=tty, min_interval=0) as bar:
        for _ in range(3):
            bar.update()
    text = tty.getvalue()
    assert "\r" in text and text.endswith("\n")
    assert "work [####################] 3/3" in text and "1/3" in text


@pytest.mark.parametrize("env, flag, tty, expected", [
    ("0", None, True, False), ("off", None, True, False), ("1", None, False, True), ("", None, True, True),
    ("", None, False, False), ("1", False, True, False), ("0", True, False, True),
])
def test_flag_then_environment_then_terminal(monkeypatch, env, flag, tty, expected):
    monkeypatch.setenv(ENV, env)
    assert progress_enabled(flag, FakeTTY() if tty else io.StringIO()) is expected


def test_bad_environment_value_is_one_error(monkeypatch):
    monkeypatch.setenv(ENV, "maybe")
    with pytest.raises(ValueError, match=r"KVHOIST_PROGRESS='maybe': use 1 \(show progress\) or 0 \(never\)"):
        progress_enabled()


def test_forced_onto_a_pipe_prints_lines_and_phases():
    pipe = io.StringIO()
    with Progress("bench", stream=pipe, enabled=True) as bar:
        bar.phase("tracing")
        bar.write("[bench] a log line")
        bar(1, 2)
        bar(2, 2)
    lines = pipe.getvalue().splitlines()
    assert "\r" not in pipe.getvalue()
    assert lines[0].startswith("bench  tracing") and "[bench] a log line" in lines
    assert re.match(r"bench \[#+\] 2/2  tracing  \d+\.\d s$", lines[-1]), lines
    assert sum("2/2" in l for l in lines) == 1                  # close() does not repeat the last state


@pytest.mark.parametrize("kwargs, needle", [
    (dict(total=-1), "total must be an integer >= 0"), (dict(min_interval=-1), "min_interval must be >= 0"),
    (dict(width=0), "width must be >= 1"),
])
def test_bad_arguments(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        Progress("x", **kwargs)


# -- sample(progress=...) ------------------------------------------------------------------------------------

def test_sample_python_loop_reports_every_step():
    from wan_ref.presets import tiny_inputs
    from wan_ref.sample import sample

    model, noise, pe, npe = tiny_inputs("tiny-t2v").args
    seen = []
    out = sample(model, noise, pe, npe, num_inference_steps=3, loop="python", progress=lambda d, t: seen.append((d, t)))
    assert seen == [(1, 3), (2, 3), (3, 3)] and out.shape == noise.shape
    tty = FakeTTY()
    with Progress("sample", stream=tty, min_interval=0) as bar:
        sample(model, noise, pe, npe, num_inference_steps=2, loop="python", progress=bar)
    assert "sample [####################] 2/2" in tty.getvalue()
    with pytest.raises(ValueError, match="progress is only called by loop='python'"):
        sample(model, noise, pe, npe, num_inference_steps=2, loop="scan", progress=bar)
    with pytest.raises(TypeError, match="progress must be a callable"):
        sample(model, noise, pe, npe, num_inference_steps=2, loop="python", progress=True)


# -- the command line -----------------------------------------------------------------------------------

def test_time_interleaved_reports_every_call():
    from kvhoist.bench.timing import time_interleaved

    calls = []
    times = time_interleaved({"a": lambda: 1, "b": lambda: 2}, repeats=3, warmup=2, on_call=calls.append)
    assert len(calls) == (2 + 3) * 2 and sorted(set(calls)) == ["a", "b"]
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}


def test_demo_progress_forced_and_off(capsys, monkeypatch):
    rc = cli.main(["demo", "--layers", "1", "--steps", "2", "--repeats", "2", "--progress"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "tracing and compiling @hoist_invariants" in err
    assert "running 2 repetitions x 3 variants, interleaved" in err
    assert re.search(r"demo \[#+\] 6/6", err), err                # 2 timed runs x 3 variants (warm-ups not counted)
    assert not re.search(r"\d+/9\b", err), err
    assert "demo [" not in out
    monkeypatch.setenv(ENV, "1")
    rc = cli.main(["demo", "--layers", "1", "--steps", "1", "--repeats", "1", "--no-progress"])
    out, err = capsys.readouterr()
    assert rc == 0 and "demo [" not in err and "tracing" not in err


def test_bad_progress_environment_is_a_usage_error(capsys, monkeypatch):
    monkeypatch.setenv(ENV, "sometimes")

    def boom(*_a, **_k):
        raise AssertionError("started working")

    monkeypatch.setattr(demo, "random_model", boom)
    rc = cli.main(["demo"])
    _out, err = capsys.readouterr()
    assert rc == 2 and err.strip() == "kvhoist demo: error: KVHOIST_PROGRESS='sometimes': use 1 (show progress) or 0 " \
                                       "(never)"


def test_bench_progress_counts_cases(monkeypatch, capsys):
    from kvhoist.bench import samplers as bench

    ran = []

    def fake_form(cfg, form, *, repeats, warmup=1):
        ran.append((cfg.name, form.name))
        ratios = {"hoisted_over_hand": 1.0, "plain_over_hoisted": 1.0}
        return {"loop": form.loop, "variants": {"hoisted": {"median_s": 1.0}}, "ratios": ratios,
                "ratios_cpu": ratios, "predicted": {"plain_over_hoisted": 1.0}}

    monkeypatch.setattr(bench, "bench_form", fake_form)
    monkeypatch.setattr(bench, "pass_overhead", lambda **_k: [])
    monkeypatch.setattr(bench, "check_targets", lambda results: [])
    pipe = io.StringIO()
    bar = Progress("bench", stream=pipe, enabled=True)
    bench.run_benchmarks(["small"], ["scan x layer-scan", "python loop"], repeats=1, log=bar.write, progress=bar)
    bar.close()
    text = pipe.getvalue()
    assert len(ran) == 2
    assert "small / python loop: trace, compile, 1 interleaved repeats" in text
    assert "pass overhead on wan2.1-t2v-14b" in text and re.search(r"bench \[#+\] 3/3", text), text
    assert "[bench] small / scan x layer-scan ..." in text       # log lines go through the bar
    import argparse

    from kvhoist.bench.command import add_arguments

    p = argparse.ArgumentParser()             # `kvhoist bench --progress / --no-progress`
    add_arguments(p)
    assert p.parse_args(["--no-progress"]).progress is False and p.parse_args([]).progress is None
