"""wan_ref's sampler sharded on an 8-device CPU mesh ("data" x "tensor"), with and without kvhoist.

XLA must see 8 devices before jax initialises, so the checks run in a child process started with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (this file is its own ``__main__``); when pytest
itself already runs with 8+ devices the checks run in-process. Either way one run is shared by the tests.

What is checked, for the layer-scan and the unrolled model:

* ``@hoist_invariants`` on the sharded sampler gives the same latents as ``jax.jit`` (and as the
  unsharded single-device run);
* the hoisted cross-attention K/V keep the heads sharding: in the compiled (SPMD-partitioned) HLO, the
  step loop carries the text K/V as per-device blocks of 1/8 of the global array (batch / "data" x
  heads / "tensor"), never as a replicated-over-heads array;
* the step loop gains no collectives: all-reduce / all-gather / collective-permute / all-to-all /
  reduce-scatter counted inside the step-loop while body, hoisted <= plain for every kind.

Run alone:  python -m pytest tests/compiler/test_multidevice.py -q
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from mesh_util import run_json_child

pytestmark = pytest.mark.multidevice

DEVICES = 8
MESH_SHAPE = {"data": 2, "tensor": 4}
TEXT_TOKENS = 7  # odd on purpose: the text K/V are the only loop operands with a dimension of 7
STEPS = 3


# ------------------------------------------------------------------------------------------------------
# The checks (run in a process with 8 CPU devices)
# ------------------------------------------------------------------------------------------------------


def param_partition_spec(path: str, ndim: int):
    """Megatron-style tensor parallelism for a WanModel parameter, from its ``jax.tree_util.keystr`` path.

    Heads: the output dim of q/k/v (self- and cross-attention, and the I2V add_k/add_v projections), the
    input dim of to_out; the q/k RMSNorm weights along the heads dim. FFN: net_0_proj's output dim,
    net_2's input dim. Everything else is replicated. Stacked (scan_layers) parameters get a leading None.
    """
    from jax.sharding import PartitionSpec as P

    base: tuple = ()
    if re.search(r"\['(to_q|to_k|to_v|add_k_proj|add_v_proj)'\]\['kernel'\]", path):
        base = (None, "tensor")
    elif re.search(r"\['(to_q|to_k|to_v|add_k_proj|add_v_proj)'\]\['bias'\]", path):
        base = ("tensor",)
    elif re.search(r"\['attn[12]'\]\['to_out'\]\['kernel'\]", path):
        base = ("tensor", None)
    elif re.search(r"\['(norm_q|norm_k|norm_added_k)'\]\['scale'\]", path):
        base = ("tensor",)
    elif re.search(r"\['net_0_proj'\]\['kernel'\]", path):
        base = (None, "tensor")
    elif re.search(r"\['net_0_proj'\]\['bias'\]", path):
        base = ("tensor",)
    elif re.search(r"\['net_2'\]\['kernel'\]", path):
        base = ("tensor", None)
    if not base:
        return P()
    return P(*((None,) * (ndim - len(base)) + base))


def shard_model(model: Any, mesh: Any) -> int:
    """Places every parameter of ``model`` on ``mesh`` (in place); returns how many are tensor-sharded."""
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding

    state = nnx.state(model)
    specs = jax.tree_util.tree_map_with_path(lambda p, x: param_partition_spec(jax.tree_util.keystr(p), x.ndim),
                                             state)
    shardings = jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs)
    nnx.update(model, jax.device_put(state, shardings))
    return sum(1 for s in jax.tree_util.tree_leaves(specs, is_leaf=lambda s: hasattr(s, "index")) if "tensor" in s)


def _step_loop_operand_shapes(hlo: str, steps: int) -> list[tuple[int, ...]]:
    """Array shapes (per device) in the tuple type of the ``while`` loops that run ``steps`` times."""
    shapes = []
    for line in hlo.splitlines():
        if re.search(r"\swhile\(", line) and re.search(rf'known_trip_count"?:\{{"n":"{steps}"', line):
            head = line.split(" while(", 1)[0]
            for dims in re.findall(r"[a-z]+\d*\[([\d,]*)\]", head):
                shapes.append(tuple(int(d) for d in dims.split(",") if d))
    return shapes


def run_checks() -> dict:
    """Builds, shards, runs and compiles; returns plain JSON-able facts for the tests to assert on."""
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    import kvhoist
    from kvhoist.hlo import COLLECTIVE_PATTERNS, hlo_loop_op_counts
    from wan_ref.config import WanConfig
    from wan_ref.model import WanModel
    from wan_ref.sample import sample

    assert jax.device_count() >= DEVICES, jax.devices()
    # Auto axes: GSPMD propagates shardings from the parameters and inputs (jax >= 0.7 defaults
    # make_mesh to Explicit axes, where every reshape of a sharded array must name its out_sharding).
    mesh = jax.make_mesh(tuple(MESH_SHAPE.values()), tuple(MESH_SHAPE),
                         axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_SHAPE))
    facts: dict = {"devices": jax.device_count(), "mesh": MESH_SHAPE, "cases": {}}
    batch = MESH_SHAPE["data"]
    for scan_layers in (True, False):
        cfg = WanConfig(num_attention_heads=4, attention_head_dim=12, in_channels=4, out_channels=4, text_dim=32,
                        ffn_dim=96, num_layers=2, scan_layers=scan_layers)
        keys = jax.random.split(jax.random.key(0), 3)
        latents = jax.random.normal(keys[0], (batch, 4, 2, 4, 4), jnp.float32)
        pe = jax.random.normal(keys[1], (batch, TEXT_TOKENS, cfg.text_dim), jnp.float32)
        npe = jax.random.normal(keys[2], (batch, TEXT_TOKENS, cfg.text_dim), jnp.float32)
        fn = functools.partial(sample, num_inference_steps=STEPS, guidance_scale=5.0)

        model = WanModel(cfg, rngs=nnx.Rngs(0))
        reference = np.asarray(jax.jit(fn)(model, latents, pe, npe))  # unsharded, one device

        n_tensor = shard_model(model, mesh)
        data = NamedSharding(mesh, P("data"))
        latents, pe, npe = (jax.device_put(x, data) for x in (latents, pe, npe))

        plain = jax.jit(fn)
        hoisted = kvhoist.hoist_invariants(fn)
        out_plain = plain(model, latents, pe, npe)
        out_hoisted = hoisted(model, latents, pe, npe)
        report = hoisted.report(model, latents, pe, npe)

        hlo_plain = plain.lower(model, latents, pe, npe).compile().as_text()
        hlo_hoisted = hoisted.lower(model, latents, pe, npe).compile().as_text()
        kv = [h for h in report.hoisted if re.search(r"attn2/(to_k|to_v|norm_k)", h.name)]
        kv_global = sorted({tuple(h.shape) for h in kv})
        text_shapes = [s for s in _step_loop_operand_shapes(hlo_hoisted, STEPS) if TEXT_TOKENS in s]

        facts["cases"]["scan_layers" if scan_layers else "unrolled"] = {
            "tensor_sharded_params": n_tensor,
            "max_abs_diff_hoisted_vs_plain": float(np.max(np.abs(np.asarray(out_hoisted) - np.asarray(out_plain)))),
            "max_abs_diff_sharded_vs_reference": float(np.max(np.abs(np.asarray(out_plain) - reference))),
            "out_sharding_plain": str(out_plain.sharding),
            "out_sharding_hoisted": str(out_hoisted.sharding),
            "hoisted_kv_names": sorted({h.name for h in kv}),
            "hoisted_kv_global_shapes": [list(s) for s in kv_global],
            "loop_text_operand_shapes": [list(s) for s in text_shapes],
            "collectives_plain": hlo_loop_op_counts(hlo_plain, COLLECTIVE_PATTERNS, trip_count=STEPS),
            "collectives_hoisted": hlo_loop_op_counts(hlo_hoisted, COLLECTIVE_PATTERNS, trip_count=STEPS),
        }
    return facts


# ------------------------------------------------------------------------------------------------------
# The tests
# ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def facts() -> dict:
    import jax

    if jax.device_count() >= DEVICES:
        return run_checks()
    return run_json_child(__file__, devices=DEVICES, timeout=900)


CASES = ("scan_layers", "unrolled")


def test_eight_devices_and_sharded_params(facts):
    assert facts["devices"] >= DEVICES
    for case in CASES:
        assert facts["cases"][case]["tensor_sharded_params"] > 0


@pytest.mark.parametrize("case", CASES)
def test_hoisted_matches_plain_and_unsharded(facts, case):
    c = facts["cases"][case]
    assert c["max_abs_diff_hoisted_vs_plain"] <= 1e-5, c
    assert c["max_abs_diff_sharded_vs_reference"] <= 1e-4, c
    assert "data" in c["out_sharding_hoisted"] or c["out_sharding_hoisted"] == c["out_sharding_plain"]


@pytest.mark.parametrize("case", CASES)
def test_hoisted_kv_keep_heads_sharding(facts, case):
    c = facts["cases"][case]
    assert c["hoisted_kv_names"], "the cross-attention K/V were not hoisted"
    # Every loop operand holding text tokens is 1/8 of a hoisted K/V array: batch split over "data" and
    # heads over "tensor". A K/V gathered over heads would be 1/2 (batch only) and fail this.
    global_sizes = {int(__import__("math").prod(s)) for s in c["hoisted_kv_global_shapes"]}
    local = c["loop_text_operand_shapes"]
    assert local, "no loop operand with the text length: the K/V cache is not carried by the step loop"
    shards = MESH_SHAPE["data"] * MESH_SHAPE["tensor"]
    for shape in local:
        size = int(__import__("math").prod(shape))
        assert any(size * shards == g for g in global_sizes), (shape, c["hoisted_kv_global_shapes"])


@pytest.mark.parametrize("case", CASES)
def test_no_new_collectives_in_step_loop(facts, case):
    c = facts["cases"][case]
    plain, hoisted = c["collectives_plain"], c["collectives_hoisted"]
    assert plain["loops"] == 1 and hoisted["loops"] == 1  # exactly the step loop
    for kind in plain["bytes"]:  # instruction counts and bytes moved per iteration, per kind
        assert hoisted[kind] <= plain[kind], (kind, plain, hoisted)
        assert hoisted["bytes"][kind] <= plain["bytes"][kind], (kind, plain, hoisted)


if __name__ == "__main__":
    print(json.dumps(run_checks()))
