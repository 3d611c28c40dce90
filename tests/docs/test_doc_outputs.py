"""Every output the documentation quotes is the tool's own, checked here (issue 21 item 3).

Three kinds of fenced block carry output:

* ```` ```console ````: ``$ kvhoist ...`` lines, each followed by what it prints (stdout, then stderr). Each
  command runs here as ``python -m kvhoist ...`` (NO_COLOR, no progress line) and its output must match.
* ```` ```output ```` right after a ```` ```python ```` block: what that block prints (stdout and stderr,
  log lines included). The block runs here (in a fresh namespace, from an empty folder) and must match.
* ```` ```console-recorded <reason> ````: a recorded run that cannot be repeated in CI (a TPU compile of
  minutes); its ``$ kvhoist`` lines must still parse with today's options.

In expected output a line ``...`` stands for any number of lines and ``...`` inside a line for any text
(timings, paths). Any other block holding a ``$ kvhoist`` line fails the check: quoted output is checked, or it
is not quoted. On a mismatch the message shows the actual output to paste.
"""

from __future__ import annotations

import contextlib
import io
import os
import pathlib
import re
import shlex
import subprocess
import sys
import textwrap

import pytest

from test_docs import DOCS, FENCE, ROOT

PROMPT = "$ "


def _blocks() -> list[tuple[str, str, str, int, str]]:
    """(file:line, info, body, end offset, text of the file) of every fenced block, in order."""
    out = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for m in FENCE.finditer(text):
            line = text[:m.start()].count("\n") + 1
            out.append((f"{path.relative_to(ROOT)}:{line}", m.group("info").strip(), textwrap.dedent(m.group("body")),
                        m.start(), m.end(), text))
    return out


BLOCKS = _blocks()


def _console_runs(body: str) -> list[tuple[str, str]]:
    """(command, expected output) pairs of a console block."""
    runs: list[tuple[str, list[str]]] = []
    for line in body.splitlines():
        if line.startswith(PROMPT):
            runs.append((line[len(PROMPT):], []))
        elif runs:
            runs[-1][1].append(line)
        elif line.strip():
            raise AssertionError(f"a console block starts with '{PROMPT}command', got {line!r}")
    return [(c, "\n".join(lines)) for c, lines in runs]


CONSOLE = [(f"{name} $ {cmd}", cmd, want) for name, info, body, *_ in BLOCKS if info == "console"
           for cmd, want in _console_runs(body)]


def _python_outputs() -> list[tuple[str, str, str]]:
    """(name, code, expected) for each ```output block that directly follows a ```python block."""
    out = []
    for (name, info, body, _s, end, text), nxt in zip(BLOCKS, BLOCKS[1:]):
        if info == "python" and nxt[1] == "output" and nxt[5] is text and not text[end:nxt[3]].strip():
            out.append((name, body, nxt[2]))
    return out


PYTHON = _python_outputs()


def matches(want: str, got: str) -> bool:
    """``got`` matches ``want`` where ``...`` lines are any lines and ``...`` in a line is any text."""
    parts = []
    for line in want.rstrip("\n").splitlines():
        if line.strip() == "...":
            parts.append(r"(?:[^\n]*\n)*?")
        else:
            parts.append(".*?".join(re.escape(p) for p in line.rstrip().split("...")) + r"[ \t]*\n")
    lines = "\n".join(l.rstrip() for l in got.rstrip("\n").splitlines()) + "\n"
    return re.fullmatch("".join(parts), lines, flags=re.S) is not None


def test_ellipsis_matching():
    assert matches("a\n...\nd", "a\nb\nc\nd\n") and matches("a\n...\nd", "a\nd")
    assert matches("took ... s: 3 values", "took 0.18 s: 3 values")
    assert not matches("3 values", "2 values") and not matches("a\nb", "a\nb\nc")


def test_quoted_commands_are_checked_blocks():
    assert CONSOLE and PYTHON
    for name, info, body, *_ in BLOCKS:
        kind = info.split(" ")[0]
        if any(l.startswith(PROMPT + "kvhoist") or l.startswith(PROMPT + "python -m kvhoist")
               for l in body.splitlines()):
            assert kind in ("console", "console-recorded"), \
                f"{name}: quotes a kvhoist command's output in a ```{info} block: make it ```console (checked)"
        if kind == "console-recorded":
            assert len(info) > len("console-recorded ") + 5, f"{name}: ```console-recorded needs a reason"


def test_output_blocks_follow_a_python_block():
    names = [name for name, info, *_ in BLOCKS if info == "output"]
    assert len(names) == len(PYTHON), f"an ```output block must directly follow a ```python block: {names}"


def test_recorded_commands_still_parse():
    from kvhoist.tools import cli

    for name, info, body, *_ in BLOCKS:
        if info.startswith("console-recorded"):
            for cmd, _ in _console_runs(body):
                argv = shlex.split(cmd)
                assert argv[0] == "kvhoist", f"{name}: {cmd}"
                args, extra = cli.build_parser().parse_known_args(argv[1:])
                assert not extra and args.command, f"{name}: {cmd} no longer parses ({extra})"


@pytest.mark.parametrize("name, cmd, want", CONSOLE, ids=[c[0] for c in CONSOLE])
def test_console_block(name, cmd, want, tmp_path):
    argv = shlex.split(cmd)
    assert argv[0] == "kvhoist", f"{name}: only kvhoist commands run here"
    env = dict(os.environ, NO_COLOR="1", KVHOIST_PROGRESS="0", COLUMNS="200", PYTHONPATH=str(ROOT))
    env.pop("KVHOIST_LOG", None)
    proc = subprocess.run([sys.executable, "-m", "kvhoist", *argv[1:]], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=600)
    got = proc.stdout + proc.stderr
    assert matches(want, got), f"{name}: the tool now prints (exit {proc.returncode}):\n{got}"


@pytest.mark.parametrize("name, code, want", PYTHON, ids=[p[0] for p in PYTHON])
def test_python_output_block(name, code, want, tmp_path, monkeypatch):
    import jax

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KVHOIST_LOG", raising=False)
    jax.clear_caches()                       # the block's first call traces, as in a fresh process
    buf = io.StringIO()
    namespace = {"__name__": "__doc_block__", "__file__": str(tmp_path / "block.py")}
    import logging

    kv = logging.getLogger("kvhoist")
    saved = (list(kv.handlers), kv.level, kv.propagate)
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            exec(compile(code, name, "exec"), namespace)      # noqa: S102 - the documentation's own code
    finally:
        kv.handlers[:], kv.level, kv.propagate = saved
    assert matches(want, buf.getvalue()), f"{name}: the block now prints:\n{buf.getvalue()}"
