"""`kvhoist compile` and `kvhoist.tools.tpu`: compile-only TPU targets on a CPU host.

Unmarked tests (always run, no libtpu needed, seconds): the CLI's argument validation, the missing-libtpu
error, the one-line out-of-memory message, the trip-count-weighted HLO counter on CPU HLO.

Tests marked `tpu` need libtpu (`pip install -e '.[tpu]'`) and skip with the reason without it. Run them as
CI does: `JAX_PLATFORMS=cpu TPU_SKIP_MDS_QUERY=1 python -m pytest -q -m tpu tests/tools/test_tpu.py`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib

import pytest

from kvhoist import tpu_compile
from kvhoist.tools import cli, tpu

HERE = pathlib.Path(__file__).resolve().parents[1]  # tests/: the shared helper modules
LIBTPU = tpu_compile.libtpu_version()
needs_libtpu = pytest.mark.skipif(LIBTPU is None, reason=f"libtpu is not installed: pip install -e '.[tpu]' "
                                                          f"(jax[tpu]=={tpu_compile.JAX_TPU_PIN})")


def run(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


# -- a user `module:function` whose step loop needs more memory than any TPU chip has ----------------------

def huge_temporaries():
    """(fun, args, kwargs) for `kvhoist compile test_tpu:huge_temporaries`: a 2-step scan whose body holds a
    [65536, 131072] f32 product (32 GiB) live next to another: more than one chip's HBM."""
    import jax
    import jax.numpy as jnp

    def fun(a, b):
        def step(c, _):
            big = jnp.outer(a + c, b)              # [65536, 131072] f32 = 32 GiB
            return c + jnp.sum(jnp.sin(big) * big[::-1]), None
        c, _ = jax.lax.scan(step, jnp.float32(0), None, length=2)
        return c

    return fun, (jax.ShapeDtypeStruct((65536,), jnp.float32), jax.ShapeDtypeStruct((131072,), jnp.float32)), {}


@pytest.fixture
def user_module(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))


@pytest.fixture
def fake_libtpu(monkeypatch):
    """Pretend libtpu is installed (for validation that happens before any compile)."""
    monkeypatch.setattr(tpu_compile, "libtpu_version", lambda: "0.0.0-test")


# -- CPU side: always run ----------------------------------------------------------------------------------

def test_missing_libtpu_is_one_clear_error(monkeypatch, capsys):
    monkeypatch.setattr(tpu_compile, "libtpu_version", lambda: None)
    with pytest.raises(tpu_compile.LibtpuMissingError, match=r"libtpu is not installed: pip install -e '\.\[tpu\]'"):
        tpu_compile.require_libtpu()
    with pytest.raises(tpu_compile.LibtpuMissingError):
        tpu_compile.get_topology("v6e")
    rc, out, err = run(capsys, "compile", "tiny-t2v", "--target", "v6e")
    assert rc == 2 and out == ""
    assert err.strip() == (f"kvhoist compile: error: libtpu is not installed: pip install -e '.[tpu]' "
                           f"(compile-only TPU targets need jax[tpu]=={tpu_compile.JAX_TPU_PIN})")


def test_tpu_pin_matches_pyproject():
    text = (HERE.parent / "pyproject.toml").read_text()
    assert f'tpu = ["jax[tpu]=={tpu_compile.JAX_TPU_PIN}"]' in text
    assert '"tpu: needs libtpu' in text


@pytest.mark.parametrize("argv, message", [
    (["compile", "tiny-t2v"], "the following arguments are required: --target"),
    (["compile", "tiny-t2v", "--target", "v6e", "--steps", "0"], "argument --steps: must be a positive integer"),
    (["compile", "tiny-t2v", "--target", "v6e", "--attention", "flash"], "argument --attention: invalid choice"),
    (["compile", "tiny-t2v", "--target", "v6e", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["compile", "tiny-t2v", "--target", "v6e", "--mesh", "2by4"], "argument --mesh: must be DATAxTENSOR"),
    (["compile", "tiny-t2v", "--target", "v6e", "--mesh", "0x8"], "argument --mesh: must be DATAxTENSOR"),
])
def test_parser_errors_print_usage(capsys, argv, message):
    rc, out, err = run(capsys, *argv)
    assert rc == 2 and out == ""
    assert err.startswith("usage: kvhoist compile")
    assert message in err


@pytest.mark.parametrize("argv, message", [
    (["--target", "cpu"], "target 'cpu' is not a TPU; use one of v4, v5e, v5p, v6e, v7x"),
    (["--target", "v9z"], "unknown target 'v9z'"),
    (["--target", "v6e", "--topology", "v5e:2x4"], "topology 'v5e:2x4' is not a v6e topology"),
    (["--target", "v6e", "--topology", "v6e-8"], "topology 'v6e-8': expected NAME:AxB or NAME:AxBxC"),
    (["--target", "v6e", "--height", "100"], "--height 100: must be a positive multiple of 16"),
    (["--target", "v6e", "--frames", "6"], "--frames 6: must be 4k+1"),
    (["--target", "v6e", "--mesh", "1x8"], "--mesh needs --topology"),
])
def test_validation_errors_are_one_line(capsys, fake_libtpu, argv, message):
    rc, out, err = run(capsys, "compile", "tiny-t2v", *argv)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("kvhoist compile: error: ")
    assert message in err


def test_unknown_spec_and_attention_errors(capsys, fake_libtpu, user_module):
    rc, _, err = run(capsys, "compile", "tiny-t2vv", "--target", "v6e")
    assert rc == 2 and "unknown preset 'tiny-t2vv'" in err
    rc, _, err = run(capsys, "compile", "test_tpu:huge_temporaries", "--target", "v6e", "--attention", "splash")
    assert rc == 2 and "--attention splash: applies to wan_ref presets only" in err


def test_attention_option_reaches_the_preset_config(capsys, fake_libtpu):
    """--attention sets WanConfig.attention on every expert; without that field, splash is refused."""
    from kvhoist.tools.specs import SamplerOptions, resolve
    from wan_ref.config import WanConfig

    if "attention" not in {f.name for f in dataclasses.fields(WanConfig)}:
        rc, out, err = run(capsys, "compile", "tiny-t2v", "--target", "v6e", "--attention", "splash")
        assert rc == 2 and out == ""
        assert "--attention splash: this wan_ref has no WanConfig.attention field yet" in err
        return
    prog = resolve("tiny-t2v-a14b", SamplerOptions(attention="splash"))
    assert prog.args[0].config.attention == "splash" and prog.kwargs["model_2"].config.attention == "splash"
    assert "splash attention" in prog.description
    assert resolve("tiny-t2v", SamplerOptions(attention="xla")).args[0].config.attention == "xla"


@pytest.mark.parametrize("error, expected", [
    (tpu_compile.DoesNotFit("HLO temporaries (1.70T) exceeds available HBM (31.25G)", "plain"),
     "kvhoist compile: tiny-t2v does not fit on v6e:2x4 (plain): HLO temporaries (1.70T) exceeds available HBM "
     "(31.25G)"),
    (tpu_compile.CompileFailed("NotImplementedError: Mosaic kernels cannot be automatically partitioned.", "hand"),
     "kvhoist compile: tiny-t2v failed to compile for v6e:2x4 (hand): NotImplementedError: Mosaic kernels cannot "
     "be automatically partitioned."),
])
def test_compile_failures_are_one_line_and_exit_1(capsys, fake_libtpu, monkeypatch, error, expected):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(tpu, "compile_three_ways", fail)
    rc, out, err = run(capsys, "compile", "tiny-t2v", "--target", "v6e", "--topology", "v6e:2x4", "--steps", "2")
    assert rc == 1 and out == ""
    assert err == expected + "\n"


def test_default_topologies_cover_the_tpu_targets():
    from kvhoist.targets import TARGETS

    tpus = [name for name, t in TARGETS.items() if t.mxu_tile is not None]
    assert sorted(tpus) == sorted(tpu_compile.DEFAULT_TOPOLOGIES)
    assert tpu_compile.default_topology("ironwood") == "tpu7x:2x2x1"
    assert tpu_compile.default_topology("trillium") == "v6e:2x2"


def test_does_not_fit_line():
    msg = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. Used "
           "1.72T of 31.25G hbm. Exceeded hbm capacity by 1.69T.\n\nTotal hbm usage >= 1.72T:\n    reserved  "
           "  263.00M\n    program      1.70T\n    arguments   26.70G\n\nOutput size 0B; shares 0B with "
           "arguments.\n\nProgram hbm requirement 1.70T:\n    HLO temporaries (1.70T) exceeds available HBM "
           "(31.25G)")
    assert tpu_compile.does_not_fit_line(RuntimeError(msg)) == "HLO temporaries (1.70T) exceeds available HBM (31.25G)"
    assert tpu_compile.does_not_fit_line(RuntimeError("RESOURCE_EXHAUSTED: Used 40G of 16G hbm. x")) == "Used 40G of 16G hbm"
    assert tpu_compile.does_not_fit_line(RuntimeError("INVALID_ARGUMENT: bad shapes")) is None


def test_wan_partition_spec():
    from jax.sharding import PartitionSpec as P

    assert tpu.wan_partition_spec("['blocks']['attn2']['to_k']['kernel']", 3) == P(None, None, "tensor")
    assert tpu.wan_partition_spec("['blocks']['attn1']['to_out']['kernel']", 2) == P("tensor", None)
    assert tpu.wan_partition_spec("['blocks']['ffn']['net_0_proj']['bias']", 2, "model") == P(None, "model")
    assert tpu.wan_partition_spec("['patch_embedding']['kernel']", 5) == P()


def test_hlo_op_executions_weights_trip_counts_on_cpu_hlo():
    """Static counts x trip counts of nested loops; both cond branches; the step loop told apart by its trip
    count. CPU HLO (no libtpu): dots stay `dot` there."""
    import jax
    import jax.numpy as jnp

    from kvhoist.hlo import hlo_op_executions

    def f(w, x, flag):
        def step(h, _):
            def layer(h, wi):
                return jnp.tanh(h @ wi), None
            h, _ = jax.lax.scan(layer, h, w)                                  # 3 layers
            h = jax.lax.cond(flag, lambda h: h @ w[0], lambda h: (h @ w[1]) @ w[2], h)
            return h, None
        h, _ = jax.lax.scan(step, x, None, length=7)
        return h @ w[0]

    hlo = jax.jit(f).lower(jnp.ones((3, 8, 8)), jnp.ones((4, 8)), True).compile().as_text()
    got = hlo_op_executions(hlo, {"dot": r"\sdot\("}, step_trip_count=7)
    assert got["step_loops"] == 1 and got["unknown_trip_counts"] == 0
    assert got["inside"]["dot"] == 7 * (3 + 1 + 2)
    assert got["outside"]["dot"] == 1
    with pytest.raises(ValueError, match="step_trip_count"):
        hlo_op_executions(hlo, {"dot": r"\sdot\("}, step_trip_count=0)


# -- TPU compiles (libtpu) -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compiled_tiny():
    """Compile each tiny sampler three ways for a target once per module (cached by (preset, target))."""
    from kvhoist.tools.specs import SamplerOptions, resolve

    cache: dict = {}

    def get(preset: str, target: str, topology: str | None = None) -> dict:
        key = (preset, target, topology)
        if key not in cache:
            prog = resolve(preset, SamplerOptions(steps=6))
            cache[key] = tpu.compile_three_ways(prog.fun, prog.args, prog.kwargs, steps=6, target=target,
                                                topology=topology, hand=functools.partial(prog.fun, kv_cache=True))
        return cache[key]

    return get


@pytest.mark.tpu
@needs_libtpu
@pytest.mark.parametrize("target", ["v5e", "v6e"])
@pytest.mark.parametrize("preset", ["tiny-t2v", "tiny-t2v-a14b", "tiny-i2v"])
def test_hoisted_matches_hand_cache_in_the_step_loop(compiled_tiny, preset, target):
    d = compiled_tiny(preset, target)
    v = d["variants"]
    assert d["chips"] == 1 and d["device_kind"].startswith("TPU")
    assert all(x["step_loops"] == 1 for x in v.values())
    inside = {k: x["matmuls_inside"] for k, x in v.items()}
    assert inside["hoisted"] == inside["hand"] < inside["plain"], inside
    # The K/V matmuls left the loop: they run once, outside it, instead of once per step.
    assert v["hoisted"]["matmuls_outside"] > v["plain"]["matmuls_outside"]
    assert v["hoisted"]["cache_bytes"] > 0 and v["hoisted"]["hoisted_values"] > 0
    assert v["plain"]["cache_bytes"] is None
    assert all(x["temp_bytes"] > 0 and x["argument_bytes"] > 0 and x["compile_seconds"] > 0 for x in v.values())


@pytest.mark.tpu
@needs_libtpu
def test_sharded_topology_and_cli_json(capsys, compiled_tiny):
    """`--topology v6e:2x4`: eight chips, parameters tensor-sharded (per-chip arguments shrink), same verdict."""
    rc, out, _ = run(capsys, "compile", "tiny-t2v-a14b", "--target", "v6e", "--topology", "v6e:2x4",
                     "--steps", "6", "--json")
    assert rc == 0
    d = json.loads(out)
    assert d["chips"] == 8 and d["mesh"] == {"data": 2, "tensor": 4} and d["libtpu"] == LIBTPU
    assert d["verdict"].endswith(": hoisted == hand < plain")
    rc, out, err = run(capsys, "compile", "tiny-t2v", "--target", "v6e", "--topology", "v6e:2x4", "--mesh", "3x3")
    assert rc == 2 and out == "" and "mesh shape (3, 3): need two positive ints (data, tensor) whose product" in err
    single = compiled_tiny("tiny-t2v-a14b", "v6e")  # the same sampler on one chip holds every parameter
    assert single["chips"] == 1
    assert d["variants"]["plain"]["argument_bytes"] < single["variants"]["plain"]["argument_bytes"]


@pytest.mark.tpu
@needs_libtpu
def test_does_not_fit_is_one_line_and_exit_1(capsys, user_module):
    rc, out, err = run(capsys, "compile", "test_tpu:huge_temporaries", "--target", "v6e")
    assert rc == 1 and out == ""
    lines = [ln for ln in err.splitlines() if ln.startswith("kvhoist compile:")]
    assert len(lines) == 1 and "does not fit on one v6e chip (plain)" in lines[0]
    assert "exceeds available HBM" in lines[0] or "hbm" in lines[0].lower()
    assert "Traceback" not in err


@pytest.mark.tpu
@needs_libtpu
def test_splash_compiles_on_a_mesh(capsys):
    """The Mosaic splash kernel cannot be partitioned by XLA: under a mesh it runs in a shard_map over the
    heads (kvhoist.kernels.head_axes). Eight chips, same verdict; the kernel's custom call is in the HLO."""
    rc, out, err = run(capsys, "compile", "tiny-t2v", "--target", "v6e", "--topology", "v6e:2x4",
                       "--attention", "splash", "--steps", "4", "--json")
    assert rc == 0, err
    d = json.loads(out)
    assert d["chips"] == 8 and d["verdict"].endswith(": hoisted == hand < plain")


def test_head_axes():
    from jax.sharding import AbstractMesh

    from kvhoist.kernels import head_axes

    assert head_axes(AbstractMesh((2, 4), ("data", "tensor")), 40) == ("data", "tensor")
    assert head_axes(AbstractMesh((2, 4), ("data", "tensor")), 12) == ("data",)   # 2 divides, then 2x4 does not
    assert head_axes(AbstractMesh((1, 8), ("data", "tensor")), 12) == ()
    assert head_axes(AbstractMesh((), ()), 40) == ()
    assert head_axes(None, 40) == ()


@pytest.mark.tpu
@needs_libtpu
def test_layout_decided_by_the_tpu_compiler():
    """XLA-attention tokens: with measure="tpu" the traced layout and the cost model's pick are compiled for
    one v6e chip and the compiler's temporaries decide; the note quotes its figures."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    from kvhoist.passes.layout import plan_layout

    def f(q, img, wk, wv):
        img = jnp.pad(img, ((0, 0), (0, 384 - 257), (0, 0)))

        def step(x, _):
            k = (img @ wk).reshape(1, 384, 2, 128)
            v = (img @ wv).reshape(1, 384, 2, 128)
            logits = jnp.einsum("bnhd,bshd->bhns", x, k)
            logits = jnp.where(jnp.arange(384) < 257, logits, -jnp.inf)
            return x + 0.1 * jnp.einsum("bhns,bshd->bnhd", jax.nn.softmax(logits, -1), v), None
        return lax.scan(step, q, None, length=2)[0]

    args = (jax.ShapeDtypeStruct((1, 256, 2, 128), jnp.float32), jax.ShapeDtypeStruct((1, 257, 32), jnp.float32),
            jax.ShapeDtypeStruct((32, 256), jnp.float32), jax.ShapeDtypeStruct((32, 256), jnp.float32))
    closed = jax.make_jaxpr(f)(*args)
    new, report = plan_layout(closed, "v6e", measure="tpu")
    (note,) = [n for n in report.notes if n.kind == "layout"]
    assert "TPU compiler (v6e, one chip): [264: " in note.message and "384: " in note.message, note.message


@pytest.mark.tpu
@needs_libtpu
@pytest.mark.parametrize("target", ["v4", "v5e", "v5p", "v6e", "v7x"])
def test_splash_sampler_compiles_with_tile_aligned_image_tokens(target):
    """tiny-i2v with splash attention, hoisted with target=: every kernel call's keys are a multiple of the
    target's MXU tile with the kernel's KV block equal to it, and the program compiles for that TPU."""
    import jax

    import kvhoist
    from kvhoist.ir import all_eqns
    from kvhoist.tools.specs import SamplerOptions, resolve
    from kvhoist.targets import get_target

    tile = get_target(target).mxu_tile
    prog = resolve("tiny-i2v", SamplerOptions(steps=2, attention="splash"))
    mesh = tpu_compile.make_mesh(tpu_compile.get_topology(target), chips=1)
    args = tpu.shard_abstract(tuple(prog.args), mesh, params=True)
    kwargs = tpu.shard_abstract(dict(prog.kwargs), mesh, params=True)
    hf = kvhoist.hoist_invariants(prog.fun, target=target)
    hf.lower(*args, **kwargs).compile()
    _before, after = hf.jaxprs(*args, **kwargs)
    calls = [e for e in all_eqns(after) if e.primitive.name == "kvhoist_attention"]
    keys = {int(e.invars[1].aval.shape[1]) for e in calls}
    assert calls and all(k % tile == 0 for k in keys), keys
    assert {e.params["block_kv"] for e in calls} == {tile}
