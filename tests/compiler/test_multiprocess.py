"""kvhoist across processes: 2 JAX processes x 4 CPU devices on localhost (multi-controller, like hosts of a pod).

The test starts two copies of this file (``python tests/compiler/test_multiprocess.py <process_id> <port> <out.json>``)
with ``XLA_FLAGS=--xla_force_host_platform_device_count=4``; each calls ``jax.distributed.initialize`` on a
free localhost port with gloo CPU collectives, so ``jax.devices()`` lists 8 devices of which 4 are its own.
Each process then, on a ``("data", "model") = (2, 4)`` mesh (``"data"`` spans the two processes, ``"model"``
the four devices of each; Auto axes):

* builds a tiny Wan (``wan_ref.presets.tiny_inputs("tiny-t2v")``), shards its parameters Megatron-style over
  ``"model"`` and the batch of latents / prompt embeddings over ``"data"`` (global arrays built from the
  same host values in both processes with ``jax.make_array_from_callback``);
* samples with ``jax.jit`` and with ``@hoist_invariants`` (``wan_ref.sample.sample``) and compares its own
  shards of the two results (the numerical contract);
* reads the hoisted program's per-device cache from the compiled HLO (the step loop's operands that hold
  text tokens) and checks that the 4 devices of a process hold exactly half of the global cache
  (``Report.cache_bytes``): each process keeps its shard, nothing is replicated across processes;
* runs the host-loop mode (``hoist_invariants(one_step, invariant_argnames=("expert", "shared"))`` as the
  ``step_fn`` of a Python loop) on the same global arrays: equal to the plain Python loop, one prologue.

Bounded: ``jax.distributed`` times out after 60 s, each child is killed after ``TIMEOUT`` seconds.
Recipe and figures: docs/multidevice.md ("Several processes").
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time

import pytest

from kvhoist.contract import assert_close
from mesh_util import ROOT, cpu_devices_env, make_mesh

PROCESSES = 2
LOCAL_DEVICES = 4
MESH = {"data": 2, "model": 4}
TEXT_TOKENS = 7  # odd on purpose: the only loop operands with a dimension of 7 are the text K/V
STEPS = 3
TIMEOUT = 240

# ~55 s wall (22-28 s CPU for both processes) on the 2-core CI machine type: in the default suite.
pytestmark = pytest.mark.multidevice


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------------
# One process (run as __main__)
# ------------------------------------------------------------------------------------------------------


def _global(x, sharding):
    """A global jax.Array with ``sharding`` from the host value ``x`` (the same in every process)."""
    import jax
    import numpy as np

    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def _shard_model(model, mesh) -> int:
    """Every parameter as a global array: Megatron-style over "model" (test_multidevice's specs)."""
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    from test_multidevice import param_partition_spec

    def spec(path, x):  # test_multidevice's "tensor" axis is this mesh's "model"
        return P(*("model" if a == "tensor" else a for a in param_partition_spec(jax.tree_util.keystr(path), x.ndim)))

    state = nnx.state(model)
    specs = jax.tree_util.tree_map_with_path(spec, state)
    nnx.update(model, jax.tree_util.tree_map(lambda x, s: _global(x, NamedSharding(mesh, s)), state, specs))
    return sum(1 for s in jax.tree_util.tree_leaves(specs, is_leaf=lambda s: hasattr(s, "index")) if "model" in s)


def _local_max_diff(a, b) -> float:
    """Max |a - b| over this process's shards (a and b have the same sharding)."""
    import numpy as np

    diffs = [float(np.max(np.abs(np.asarray(x.data) - np.asarray(y.data))))
             for x, y in zip(a.addressable_shards, b.addressable_shards, strict=True)]
    return max(diffs)


def _local_values(a) -> list:
    import numpy as np

    return [np.asarray(s.data).tolist() for s in a.addressable_shards]


def run_process(process_id: int, port: int) -> dict:
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=PROCESSES, process_id=process_id,
                               initialization_timeout=60)
    import functools

    from jax.sharding import NamedSharding, PartitionSpec as P

    import kvhoist
    from test_multidevice import _step_loop_operand_shapes
    from wan_ref.presets import tiny_inputs
    from wan_ref.sample import one_step, sample

    t0 = time.perf_counter()
    facts: dict = {"process": jax.process_index(), "processes": jax.process_count(),
                   "devices": jax.device_count(), "local_devices": jax.local_device_count()}
    mesh = make_mesh(MESH, "Auto")
    inputs = tiny_inputs("tiny-t2v", batch=MESH["data"], text_len=TEXT_TOKENS)
    model, noise, pe, npe = inputs.args
    facts["model_sharded_params"] = _shard_model(model, mesh)
    data = NamedSharding(mesh, P("data"))
    noise, pe, npe = (_global(x, data) for x in (noise, pe, npe))
    kw = dict(inputs.kwargs, num_inference_steps=STEPS)
    fn = functools.partial(sample, **kw)

    plain = jax.jit(fn)(model, noise, pe, npe)
    hoisted_fn = kvhoist.hoist_invariants(fn)
    hoisted = hoisted_fn(model, noise, pe, npe)
    facts["out_sharding"] = [str(plain.sharding), str(hoisted.sharding)]
    facts["max_abs_diff_hoisted_vs_jit"] = _local_max_diff(hoisted, plain)
    facts["local_jit"], facts["local_hoisted"] = _local_values(plain), _local_values(hoisted)
    report = hoisted_fn.report(model, noise, pe, npe)
    facts["hoisted_kv"] = sorted({h.name for h in report.hoisted if "attn2/to_" in h.name})
    facts["cache_bytes_global"] = report.cache_bytes
    hlo = hoisted_fn.lower(model, noise, pe, npe).compile().as_text()
    text = [s for s in _step_loop_operand_shapes(hlo, STEPS) if TEXT_TOKENS in s]
    facts["loop_text_operands_per_device"] = [list(s) for s in text]
    facts["cache_bytes_per_process"] = LOCAL_DEVICES * 4 * sum(math.prod(s) for s in text)  # f32

    # Host-loop mode: a Python loop whose step caches the prompt's K/V across calls, on global arrays.
    step = kvhoist.hoist_invariants(one_step, static_argnames=("plan",), invariant_argnames=("expert", "shared"))
    ref_loop = sample(model, noise, pe, npe, loop="python", **kw)
    host = sample(model, noise, pe, npe, loop="python", step_fn=step, **kw)
    facts["max_abs_diff_host_vs_python_loop"] = _local_max_diff(host, ref_loop)
    facts["local_python_loop"], facts["local_host"] = _local_values(ref_loop), _local_values(host)
    info = step.cache_info()
    facts["host_cache"] = {"prologue_runs": info.misses, "hits": info.hits, "programs": info.programs}
    facts["seconds"] = time.perf_counter() - t0
    return facts


# ------------------------------------------------------------------------------------------------------
# The test (parent)
# ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def facts(tmp_path_factory) -> list[dict]:
    pytest.importorskip("flax")
    port = _free_port()
    out = tmp_path_factory.mktemp("multiprocess")
    env = cpu_devices_env(LOCAL_DEVICES)
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), str(i), str(port), str(out / f"{i}.json")],
                              env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(PROCESSES)]
    deadline = time.monotonic() + TIMEOUT
    logs = []
    try:
        for p in procs:
            try:
                _, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"a process did not finish within {TIMEOUT} s")
            logs.append(err)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, (p, err) in enumerate(zip(procs, logs)):
        if p.returncode != 0:
            pytest.fail(f"process {i} failed (rc {p.returncode}):\n{err[-6000:]}")
    return [json.loads((out / f"{i}.json").read_text()) for i in range(PROCESSES)]


def test_two_processes_eight_devices(facts):
    assert [f["process"] for f in facts] == list(range(PROCESSES))
    for f in facts:
        assert (f["processes"], f["devices"], f["local_devices"]) == (PROCESSES, PROCESSES * LOCAL_DEVICES,
                                                                      LOCAL_DEVICES)
        assert f["model_sharded_params"] > 0


def test_hoisted_equals_jit_across_processes(facts):
    for f in facts:
        assert f["out_sharding"][0] == f["out_sharding"][1], f["out_sharding"]
        for got, want in zip(f["local_hoisted"], f["local_jit"], strict=True):
            assert_close(got, want)


def test_each_process_holds_its_shard_of_the_cache(facts):
    for f in facts:
        assert f["hoisted_kv"], "the cross-attention K/V were not hoisted"
        assert f["loop_text_operands_per_device"], "no step-loop operand holds the text K/V"
        # 4 devices of one process hold 1/2 of the global cache: batch split over "data" (the processes),
        # heads over "model" (the devices of a process).
        assert f["cache_bytes_per_process"] * PROCESSES == f["cache_bytes_global"], f


def test_host_loop_mode_across_processes(facts):
    for f in facts:
        for got, want in zip(f["local_host"], f["local_python_loop"], strict=True):
            assert_close(got, want)
        assert f["host_cache"]["prologue_runs"] == 1 and f["host_cache"]["programs"] == 1, f["host_cache"]
        assert f["host_cache"]["hits"] == STEPS - 1


if __name__ == "__main__":
    process_id, port, out_path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    result = run_process(process_id, port)
    with open(out_path, "w", encoding="utf-8") as fh:
        json.dump(result, fh)
