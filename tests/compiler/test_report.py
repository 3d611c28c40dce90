"""What the report says: one column set everywhere, branches told apart, while loops counted per iteration,
honest totals, the step loop found when it is a ``while``, human units. Small hand-written programs only."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvhoist import Note, Report, licm
from kvhoist.analysis import cost
from kvhoist.tools.diff import JaxprDiff, dots_per_step, step_loop
from kvhoist.tools.graph import hoisted_graph, to_dot
from kvhoist.report import HoistedValue

#: The column vocabulary, written out here (not imported) so that a renamed column fails a test.
COLUMNS = ["value", "shape", "dtype", "bytes", "FLOPs/iteration", "FLOPs saved/run", "share of run", "loop", "via",
           "branch", "source"]

L, T, D = 3, 64, 8   # layers, context tokens, width: one layer's K/V (64 tokens) costs more than a step (2 rows)


def while_sampler(x, ctx, wk, wv, n):
    """A step loop that is a ``while`` (trip count ``n`` traced) around a layer scan reading the context."""
    def layer(h, w):
        wk_l, wv_l = w
        with jax.named_scope("blocks/attn2/to_k"):
            k = ctx @ wk_l
        with jax.named_scope("blocks/attn2/to_v"):
            v = ctx @ wv_l
        return h + jax.nn.softmax(h @ k.T, axis=-1) @ v, None

    def body(c):
        i, h = c
        h, _ = jax.lax.scan(layer, h, (wk, wv))
        return i + 1, h

    return jax.lax.while_loop(lambda c: c[0] < n, body, (0, x))[1]


def _args(seed: int = 0):
    r = np.random.default_rng(seed)
    return (jnp.asarray(r.standard_normal((2, D)), jnp.float32), jnp.asarray(r.standard_normal((T, D)), jnp.float32),
            jnp.asarray(r.standard_normal((L, D, D)) / 3, jnp.float32),
            jnp.asarray(r.standard_normal((L, D, D)) / 3, jnp.float32), 3)


@pytest.fixture(scope="module")
def while_program():
    closed = jax.make_jaxpr(while_sampler)(*_args())
    new, report = licm(closed)
    return closed, new, report


def expert_sampler(w1, w2, ctx, x):
    """Two experts behind a cond in a scan step loop (Wan 2.2 A14B's shape, tiny)."""
    def expert(w, h):
        with jax.named_scope("blocks/attn2/to_k"):
            k = ctx @ w
        return jnp.tanh(h + (h @ k.T).sum(-1, keepdims=True))

    def step(h, t):
        return jax.lax.cond(t > 1.5, lambda h: expert(w1, h), lambda h: expert(w2, h), h), None

    return jax.lax.scan(step, x, jnp.arange(4.0))[0]


@pytest.fixture(scope="module")
def expert_program():
    r = np.random.default_rng(1)
    args = [jnp.asarray(r.standard_normal(s), jnp.float32) for s in ((8, 8), (8, 8), (6, 8), (2, 8))]
    closed = jax.make_jaxpr(expert_sampler)(*args)
    new, report = licm(closed)
    return closed, new, report


def _header(text: str) -> list[str]:
    return [c for c in text.splitlines()[0].split("  ") if c.strip()]


# -- one vocabulary --------------------------------------------------------------------------------------

def test_table_html_and_diff_summary_share_one_column_set(while_program):
    closed, new, report = while_program
    assert [c.strip() for c in _header(report.table())] == COLUMNS
    page = JaxprDiff(closed, new, report).html()
    for c in COLUMNS:
        assert f">{c}</th>" in page.replace("&#x27;", "'"), c
    assert "FLOPs/iter<" not in page and "FLOPs saved/step" not in page
    assert "docs/user_guide.md#report-columns" in page
    summary = JaxprDiff(closed, new, report).summary_table()
    hoisted_header = summary.split("hoisted:\n")[1].splitlines()[0]
    assert [c.strip() for c in _header(hoisted_header.strip())] == COLUMNS


def test_columns_documented_once_in_user_guide():
    import pathlib

    guide = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "user_guide.md").read_text()
    section = guide.split("### Report columns")[1].split("\n#")[0]
    documented = [line.split("|")[1].strip().strip("`") for line in section.splitlines()
                  if line.startswith("| `")]
    assert documented == COLUMNS
    assert guide.count("### Report columns") == 1


# -- branches ----------------------------------------------------------------------------------------------

def test_two_experts_rows_distinguished_by_branch(expert_program):
    closed, new, report = expert_program
    branches = sorted(h.branch for h in report.hoisted if "to_k" in h.name)
    assert len(branches) == 2 and branches[0].startswith("branch 0 of cond at test_report.py:") \
        and branches[1].startswith("branch 1 of cond at test_report.py:")
    rows = [line for line in report.table().splitlines() if line.startswith("blocks/attn2/to_k")]
    assert len(rows) == 2 and len(set(rows)) == 2
    assert any(b in rows[0] for b in branches) and any(b in rows[1] for b in branches)
    html = JaxprDiff(closed, new, report).html()
    assert all(f"<td>{b}</td>" in html for b in branches)


def test_graph_labels_name_the_branch(expert_program):
    closed, new, report = expert_program
    g = hoisted_graph(closed, new)
    labelled = sorted(a["branch"] for _n, a in g.nodes(data=True) if a.get("branch"))
    assert labelled == sorted(h.branch for h in report.hoisted)
    dot = to_dot(g)
    assert all(h.branch in dot for h in report.hoisted)


# -- while loops: per iteration, honest totals, the step loop ---------------------------------------------

def test_while_rows_show_per_iteration_never_zero(while_program):
    _closed, _new, report = while_program
    assert report.hoisted and all(h.flops_saved is None for h in report.hoisted)
    rows = report.table().splitlines()[2:2 + len(report.hoisted)]
    for h, row in zip(report.hoisted, rows):
        cells = [c.strip() for c in row.split("  ") if c.strip()]
        assert "unknown trips" in cells and cells[4] != "0" and cells[4] == cost_str(h.flops_per_iteration)
    line = report.summary()
    assert "\n" not in line and "saves 0" not in line and "per iteration of loops with an unknown trip count" in line


def cost_str(n: int) -> str:
    from kvhoist.report import human_flops

    return human_flops(n)


def test_totals_count_a_while_loop_the_same_way_before_and_after(while_program):
    closed, new, report = while_program
    moved = report.flops_saved_per_iteration_unknown_trips
    assert moved > 0
    # the per-iteration work of the while loop drops by exactly what moved ...
    assert report.unknown_trip_flops_before - report.unknown_trip_flops_after == moved
    # ... and the hoisted work runs once per run, in front of the loop
    assert report.total_flops_after - report.total_flops_before == moved
    assert report.total_flops_before != report.total_flops_after
    totals = report.to_dict()["totals"]
    assert totals["unknown_trip_flops_before"] > totals["unknown_trip_flops_after"]
    rows = dict((r[0], r[1:]) for r in JaxprDiff(closed, new, report).summary_rows())
    assert rows["FLOPs per run"][0] != rows["FLOPs per run"][1]
    assert "FLOPs per iteration of while loops" in rows


def test_run_flops_scan_multiplies_while_is_per_iteration():
    def f(x, n):
        y = jax.lax.scan(lambda h, _: (h @ h, None), x, None, length=5)[0]                  # 5 x 2*4*4*4
        return jax.lax.while_loop(lambda c: c[0] < n, lambda c: (c[0] + 1, c[1] @ c[1]), (0, y))[1]

    r = cost.jaxpr_flops_run(jax.make_jaxpr(f)(jnp.ones((4, 4)), 3))
    assert int(r) == 5 * 128
    assert r.per_iteration == 128 + 1 + 1      # the body's matmul, its add, the condition's lt


def test_dots_per_step_finds_a_while_step_loop(while_program):
    closed, new, report = while_program
    assert report.hoisted and any("fission" in h.via for h in report.hoisted)
    assert step_loop(closed).primitive.name == "while"
    assert step_loop(new).primitive.name == "while"          # not the fissioned K/V scan in front of it
    assert dots_per_step(closed) == 4 * L                    # K, V, scores, mix per layer
    assert dots_per_step(new) == 2 * L                       # K and V left
    rows = dict((r[0], r[1:]) for r in JaxprDiff(closed, new, report).summary_rows())
    assert rows["dots per step"] == (f"{4 * L}", f"{2 * L}")


# -- human units -------------------------------------------------------------------------------------------

def test_notes_and_reasons_render_in_human_units():
    from kvhoist.report import Skipped

    r = Report(notes=[Note("repad", "x: 257 -> 512; +401241867782400 FLOPs per run, "
                                    "+13075742720 bytes of padded values"),
                      Note("fission", "producing 2 stacked value(s), 393216 bytes")],
               skipped=[Skipped("v", "a.py:1", "over the max_cache_bytes budget: needs 1048576 bytes")])
    text = r.table()
    assert "+401.24T FLOPs per run" in text and "+12.2 GiB of padded values" in text and "384.0 KiB" in text
    assert "needs 1.0 MiB" in text
    assert not re.search(r"\d{4,} (FLOPs|bytes)", text), text


def test_repad_note_in_human_units():
    from kvhoist.passes.layout import repad_tokens

    def f(q, img, w):
        img = jnp.pad(img, ((0, 384 - 257), (0, 0)))
        mask = jnp.arange(384) < 257
        k = img @ w
        s = jnp.where(mask[None, :], q @ k.T, -jnp.inf)
        return jax.nn.softmax(s, axis=-1) @ k

    closed = jax.make_jaxpr(f)(jnp.ones((4, 8)), jnp.ones((257, 8)), jnp.ones((8, 8)))
    _new, report = repad_tokens(closed, "v6e")
    notes = [n.message for n in report.notes if n.kind == "repad"]
    assert notes, report.table()
    msg = notes[0]
    assert not re.search(r"\d{4,} (FLOPs|bytes)", msg), msg
    assert re.search(r"[+-][\d.]+[KMGTP]? FLOPs per run", msg) and re.search(r"[+-][\d.]+ (B|KiB|MiB)", msg), msg


def test_summary_is_one_line_with_per_run_and_per_iteration():
    hv = dict(name="n", source="a.py:1", shape=(2,), dtype="float32", bytes=8, loop="l")
    r = Report(hoisted=[HoistedValue(flops_per_iteration=10, trip_count=5, flops_saved=40, **hv),
                        HoistedValue(flops_per_iteration=2000, trip_count=None, flops_saved=None, **hv)],
               total_flops_before=cost.RunFlops(400, 4000), total_flops_after=cost.RunFlops(370, 2000))
    line = r.summary()
    assert "\n" not in line
    assert "saves 40 FLOPs per run (10.000% of the program's FLOPs)" in line
    assert "2.00K FLOPs per iteration of loops with an unknown trip count (50.0% of their FLOPs per iteration)" in line
