"""What kvhoist tells the user: `logging.getLogger("kvhoist")` lines (trace / rewrite / compile, what moved)
and `KVHOIST_DUMP_TO` files (before/after jaxprs and the report, one set per traced signature)."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvhoist
from kvhoist import tracing
from kvhoist.api import DUMP_ENV


def sampler(w, x, context):
    def body(x, _):
        with jax.named_scope("to_k"):
            k = jnp.tanh(context @ w)          # invariant: leaves the loop
        return x * 0.5 + k.sum(), None

    return jax.lax.scan(body, x, None, length=6)[0]


W = jnp.ones((8, 8)) / 8
X = jnp.ones(())
C4, C2 = jnp.ones((4, 8)), jnp.ones((2, 8))


@pytest.fixture(autouse=True)
def _fresh_traces():
    """Every test sees its own first trace: `hoist_invariants(sampler)` shares jit's trace cache across
    decorations of the same function (as `jax.jit(sampler)` does), so earlier tests would otherwise hit it."""
    jax.clear_caches()


def kv_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "kvhoist"]


def test_trace_rewrite_compile_and_what_moved_are_logged(caplog):
    caplog.set_level(logging.DEBUG, logger="kvhoist")
    fast = kvhoist.hoist_invariants(sampler)
    np.testing.assert_allclose(fast(W, X, C4), sampler(W, X, C4), rtol=1e-6)
    lines = kv_lines(caplog)
    traced = [l for l in lines if l.startswith("traced sampler")]
    rewrote = [l for l in lines if l.startswith("rewrote sampler")]
    compiled = [l for l in lines if l.startswith("compiled sampler")]
    moved = [l for l in lines if l.strip().startswith("moved ")]
    assert len(traced) == len(rewrote) == len(compiled) == 1, lines
    assert re.fullmatch(r"traced sampler \(f32\[8,8\], f32\[\], f32\[4,8\]\) in \d+\.\d{3} s: \d+ equations",
                        traced[0])
    assert re.fullmatch(r"rewrote sampler in \d+\.\d{3} s: hoisted 1 value\(s\), .*", rewrote[0])
    assert re.fullmatch(r"compiled sampler \(f32\[8,8\], f32\[\], f32\[4,8\]\) in \d+\.\d{3} s "
                        r"\(lowering \d+\.\d{3} s, XLA \d+\.\d{3} s\)", compiled[0])
    assert len(moved) == 1 and "moved to_k float32[] (4 bytes) out of scan(length=6)" in moved[0]
    assert "via licm" in moved[0]
    assert lines.index(traced[0]) < lines.index(rewrote[0]) < lines.index(compiled[0])
    # the same signature again: jit's cache, nothing traced or logged
    caplog.clear()
    fast(W, X, C4)
    assert kv_lines(caplog) == []
    # a new signature: a new set of lines
    fast(W, X, C2)
    assert any(l.startswith("traced sampler (f32[8,8], f32[], f32[2,8])") for l in kv_lines(caplog))


def test_info_level_has_no_per_value_lines(caplog):
    caplog.set_level(logging.INFO, logger="kvhoist")
    kvhoist.hoist_invariants(sampler)(W, X, C4)
    lines = kv_lines(caplog)
    assert any(l.startswith("rewrote sampler") for l in lines)
    assert not any(l.strip().startswith("moved ") for l in lines)


def test_lower_does_not_leave_a_compile_line_waiting(caplog):
    caplog.set_level(logging.INFO, logger="kvhoist")
    kvhoist.hoist_invariants(sampler).lower(W, X, C4)
    jax.jit(sampler)(W, X, C4)               # another jit of a function of the same name compiles
    assert not any(l.startswith("compiled") for l in kv_lines(caplog)), kv_lines(caplog)


def test_silent_by_default():
    code = ("import jax.numpy as jnp, kvhoist, tests.compiler.test_logging as t; "
            "kvhoist.hoist_invariants(t.sampler)(t.W, t.X, t.C4); print('done')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=pathlib.Path(__file__).resolve().parents[2],
                          env={**os.environ, "JAX_PLATFORMS": "cpu", DUMP_ENV: ""})
    assert proc.returncode == 0 and proc.stdout.strip() == "done", proc.stderr[-2000:]
    assert "kvhoist" not in proc.stderr and "traced" not in proc.stderr


def test_dump_one_file_set_per_signature(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="kvhoist")
    monkeypatch.setenv(DUMP_ENV, str(tmp_path / "dump"))
    fast = kvhoist.hoist_invariants(sampler)
    fast(W, X, C4)
    fast(W, X, C4)                               # cached: no new files
    fast(W, X, C2)
    files = sorted(p.name for p in (tmp_path / "dump").iterdir())
    assert len(files) == 6, files
    prefixes = sorted({f.rsplit(".", 2)[0] for f in files})
    assert len(prefixes) == 2 and all(re.fullmatch(r"kvhoist-\d+-\d{4}-sampler", p) for p in prefixes)
    for prefix, context in zip(prefixes, ("f32[4,8]", "f32[2,8]")):
        base = tmp_path / "dump" / prefix
        before = (base.parent / (prefix + ".before.txt")).read_text()
        after = (base.parent / (prefix + ".after.txt")).read_text()
        report = json.loads((base.parent / (prefix + ".report.json")).read_text())
        assert before.lstrip().startswith("{ lambda") and "scan[" in before and "dot_general" in before
        assert after != before and "dot_general" in after
        assert report["function"] == "sampler" and report["kind"] == "jit"
        assert report["signature"] == f"f32[8,8], f32[], {context}"
        assert [h["name"] for h in report["hoisted"]] == ["to_k"] and report["totals"]["cache_bytes"] == 4
        # the dump's jaxprs are the ones the function reports
        b, a = fast.jaxprs(W, X, jnp.ones(tuple(int(n) for n in context[4:-1].split(","))))
        assert before == str(b) + "\n" and after == str(a) + "\n"
    assert sum("dumped sampler" in l for l in kv_lines(caplog)) == 2


def test_dump_names_stay_unique_across_functions_of_one_name(tmp_path, monkeypatch):
    monkeypatch.setenv(DUMP_ENV, str(tmp_path))
    def twin():
        def sampler(w, x, context):
            return jax.lax.scan(lambda x, _: (x * 0.5 + jnp.tanh(context @ w).sum(), None), x, None, length=6)[0]
        return sampler

    kvhoist.hoist_invariants(twin())(W, X, C4)
    kvhoist.hoist_invariants(twin())(W, X, C4)   # another function of the same name, same signature
    assert len(list(tmp_path.glob("*.report.json"))) == 2


def test_dump_host_loop_step(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG, logger="kvhoist")
    monkeypatch.setenv(DUMP_ENV, str(tmp_path))

    def step(w, context, x):
        with jax.named_scope("to_k"):
            k = jnp.tanh(context @ w)
        return x * 0.5 + k.sum()

    fast = kvhoist.hoist_invariants(step, invariant_argnames=("w", "context"))
    np.testing.assert_allclose(fast(W, C4, X), step(W, C4, X), rtol=1e-6)
    (report_file,) = tmp_path.glob("*.report.json")
    report = json.loads(report_file.read_text())
    assert report["kind"] == "host" and report["function"] == "step"
    assert [h["name"] for h in report["hoisted"]] == ["to_k"]
    after = report_file.with_name(report_file.name.replace(".report.json", ".after.txt")).read_text()
    assert after.startswith("# prologue") and "# step: every call" in after
    lines = kv_lines(caplog)
    assert any(l.startswith("traced host-loop step step (f32[8,8], f32[4,8], f32[])") for l in lines)
    assert any(l.startswith("rewrote host-loop step step in ") for l in lines)
    assert any("moved to_k" in l and "out of calls of step" in l for l in lines)


def test_unwritable_dump_folder_warns_once_and_runs(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(DUMP_ENV, str(blocker / "dump"))
    fast = kvhoist.hoist_invariants(sampler)
    with pytest.warns(kvhoist.KvhoistWarning, match=rf"{DUMP_ENV}=.*cannot write the dump"):
        out = fast(W, X, C4)
    np.testing.assert_allclose(out, sampler(W, X, C4), rtol=1e-6)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", kvhoist.KvhoistWarning)
        fast(W, X, C2)                            # the same folder: not warned again


def test_log_lines_list_the_largest_inputs_only():
    from kvhoist.api import signature_text

    specs = [jax.ShapeDtypeStruct((n,), jnp.float32) for n in range(1, 11)] + [jax.ShapeDtypeStruct((2, 3),
                                                                                                     jnp.bfloat16)]
    assert signature_text(specs[:2]) == "f32[1], f32[2]"
    short = signature_text(specs, 3)
    assert short == "f32[8], f32[9], f32[10], ... (+8 more; 11 inputs, 232 B)", short
    assert signature_text([]) == "(no traced inputs)"
    assert signature_text(specs).endswith("f32[10], bf16[2,3]")


def test_equation_count_includes_loop_bodies(caplog):
    caplog.set_level(logging.INFO, logger="kvhoist")
    kvhoist.hoist_invariants(sampler)(W, X, C4)
    (line,) = [l for l in kv_lines(caplog) if l.startswith("traced sampler")]
    assert int(re.search(r": (\d+) equations", line).group(1)) > 3      # the scan and its body


def test_dump_skips_names_left_by_an_earlier_process(tmp_path, monkeypatch):
    import itertools

    monkeypatch.setenv(DUMP_ENV, str(tmp_path))
    monkeypatch.setattr(tracing, "_dump_counter", itertools.count(1))
    stale = tmp_path / f"kvhoist-{os.getpid()}-0001-sampler.report.json"
    stale.write_text("{}")                           # same pid, same counter: a previous run's file
    kvhoist.hoist_invariants(sampler)(W, X, C4)
    assert stale.read_text() == "{}"
    assert (tmp_path / f"kvhoist-{os.getpid()}-0002-sampler.report.json").exists()


def test_kept_candidates_are_logged_with_their_reason(caplog):
    caplog.set_level(logging.DEBUG, logger="kvhoist")
    fast = kvhoist.hoist_invariants(sampler, max_cache_bytes=0)     # no budget: the K/V stays in the loop
    fast(W, X, C4)
    report = fast.report(W, X, C4)
    assert report.skipped and not report.hoisted
    kept = [l for l in kv_lines(caplog) if l.strip().startswith("kept ")]
    assert len(kept) == len(report.skipped)
    for line, sk in zip(kept, report.skipped):
        assert line.strip().startswith(f"kept {sk.name} in ") and sk.reason in line
