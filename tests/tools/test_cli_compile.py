"""`kvhoist compile`'s messages (issue 21 item 5): an unknown target is named before anything about libtpu;
libtpu's own stderr noise is hidden unless --verbose; each variant's compile start, end and elapsed time.

The compile runs use the TPU venv's python (`.venvtpu`, or KVHOIST_TPU_VENV; .ci/run creates it) as a
subprocess — the real command, on a CPU host — and skip where it does not exist; under `-m tpu` in that venv
they run in it directly."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from kvhoist.tools import cli

ROOT = pathlib.Path(__file__).resolve().parents[2]
NOISE = ("unexpected worker hostname", "E0000", "Source Location Trace")


def _python_with_libtpu() -> str | None:
    try:
        import libtpu  # noqa: F401
    except ImportError:
        venv = os.environ.get("KVHOIST_TPU_VENV", str(ROOT / ".venvtpu"))
        python = os.path.join(venv, "bin", "python")
        return python if os.path.isfile(python) else None
    return sys.executable


def compile_cli(*argv: str) -> subprocess.CompletedProcess:
    python = _python_with_libtpu()
    if python is None:
        pytest.skip("no libtpu here and no TPU venv (.venvtpu / KVHOIST_TPU_VENV)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_")}
    env.update(JAX_PLATFORMS="cpu")
    return subprocess.run([python, "-m", "kvhoist", "compile", *argv], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=900)


def test_unknown_target_before_libtpu(capsys, monkeypatch):
    from kvhoist import tpu_compile

    monkeypatch.setattr(tpu_compile, "libtpu_version", lambda: None)     # as without libtpu
    assert cli.main(["compile", "tiny-t2v", "--target", "v99"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvhoist compile: error: unknown target 'v99'") and "libtpu" not in err, err
    assert cli.main(["compile", "tiny-t2v", "--target", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "is not a TPU" in err and "libtpu" not in err, err
    assert cli.main(["compile", "tiny-t2v", "--target", "v6e"]) == 2       # a real target: now libtpu is missing
    assert "libtpu" in capsys.readouterr().err


@pytest.mark.tpu
def test_libtpu_noise_hidden_progress_lines_shown():
    proc = compile_cli("tiny-t2v", "--target", "v6e", "--steps", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not any(n in proc.stderr for n in NOISE), proc.stderr
    lines = proc.stderr.splitlines()
    for i, name in enumerate(("plain", "hand", "hoisted"), 1):
        assert f"[{i}/3] compiling {name} for v6e:2x2 (1 chip(s)) ..." in lines, lines
        done = [l for l in lines if l.startswith(f"[{i}/3] compiled {name} in ")]
        assert len(done) == 1 and "matmul executions in the step loop" in done[0] and "s elapsed)" in done[0]
    assert "hoisted == hand < plain" in proc.stdout


@pytest.mark.tpu
def test_verbose_shows_libtpus_messages():
    proc = compile_cli("tiny-t2v", "--target", "v6e", "--steps", "3", "--verbose")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "unexpected worker hostname" in proc.stderr
