"""Ctrl-C: every command exits 130 with one line on stderr, never a traceback or a crash (issue 21 item 2).

Each test starts the real command (`python -m kvhoist ...`) and sends SIGINT at a point it reaches: while
Python imports jax, while the sampler is traced, while XLA compiles (a C++ call that holds no Python frame
for seconds: the interrupt must act there too, not when the compile returns)."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


def interrupt(argv: list[str], *, after_line: str | None = None, after_s: float = 0.0,
              limit_s: float = 240.0) -> tuple[int, str, float]:
    """Run ``python -m kvhoist *argv``; SIGINT once stderr shows ``after_line`` (then ``after_s`` later).

    Returns (exit status, stderr, seconds from SIGINT to exit)."""
    env = dict(os.environ, KVHOIST_PROGRESS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "kvhoist", *argv], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    seen = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            if after_line is not None and after_line in line:
                seen.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    if after_line is not None:
        assert seen.wait(limit_s), f"never printed {after_line!r}: {''.join(lines)[-2000:]}"
    time.sleep(after_s)
    assert proc.poll() is None, f"finished before the interrupt: {''.join(lines)[-2000:]}"
    proc.send_signal(signal.SIGINT)
    sent = time.perf_counter()
    try:
        rc = proc.wait(timeout=60)
    finally:
        proc.kill()
    reader.join(10)
    return rc, "".join(lines), time.perf_counter() - sent


def check(rc: int, err: str, command: str) -> None:
    assert rc == 130, (rc, err[-3000:])
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert err.splitlines()[-1] == f"kvhoist {command}: interrupted", err[-3000:]


def test_interrupt_while_importing():
    rc, err, _ = interrupt(["report", "tiny-t2v"], after_s=0.3)
    check(rc, err, "report")


def test_interrupt_while_tracing_a_large_sampler():
    # two unrolled 14B experts take seconds to trace (jax 0.12 is faster: 2.5 s in, it still traces)
    rc, err, _ = interrupt(["diff", "wan2.2-t2v-a14b", "--no-scan-layers"], after_s=2.5)
    check(rc, err, "diff")


def test_interrupt_while_xla_compiles_acts_at_once():
    rc, err, took = interrupt(["demo", "--layers", "8", "--steps", "20"],
                              after_line="tracing and compiling", after_s=0.5)
    check(rc, err, "demo")
    assert took < 5.0, f"the interrupt waited {took:.1f} s for the compile"


def test_interrupt_while_timing():
    rc, err, _ = interrupt(["demo", "--repeats", "50"], after_line="repetitions x", after_s=0.5)
    check(rc, err, "demo")


def test_in_process_main_leaves_the_callers_sigint_alone():
    from kvhoist.tools import cli

    before = signal.getsignal(signal.SIGINT)
    assert cli.main(["--help"]) == 0
    assert signal.getsignal(signal.SIGINT) is before
