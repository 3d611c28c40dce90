"""wan_ref.schedulers: parity with diffusers (step by step) and traceability inside loops."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wan_ref.schedulers import SCHEDULERS, FlowMatchEuler, UniPCMultistep, make_scheduler

SHAPE = (2, 4, 3, 5, 5)  # [B, C, F, H, W]


def _scan_trajectory(sched, x, velocities):
    """Run `sched` inside ONE lax.scan (step index traced), returning every intermediate sample."""

    def body(carry, v):
        sample, state = carry
        sample, state = sched.step(state, v, sample)
        return (sample, state), sample

    _, traj = jax.jit(lambda x, vs: jax.lax.scan(body, (x, sched.init(x)), vs))(x, velocities)
    return np.asarray(traj)


def _random_problem(n, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    vs = rng.standard_normal((n, *SHAPE)).astype(np.float32)
    return x, vs


# ----------------------------------------------------------------------------------------- parity


def _diffusers_scheduler(name, shift):
    diffusers = pytest.importorskip("diffusers")
    if name == "unipc":
        return diffusers.UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=shift
        )
    return diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)


@pytest.mark.torch
@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("n", [1, 2, 4, 10, 50])
@pytest.mark.parametrize("shift", [3.0, 5.0, 12.0])
def test_matches_diffusers_step_by_step(name, n, shift):
    torch = pytest.importorskip("torch")
    ref = _diffusers_scheduler(name, shift)
    ref.set_timesteps(n)
    ours = make_scheduler(name, num_inference_steps=n, flow_shift=shift)

    # The schedule itself is bit-identical (integers for UniPC, float32 for Euler).
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
    np.testing.assert_array_equal(ours.sigmas, ref.sigmas.numpy())

    x, vs = _random_problem(n)
    expected = []
    xt = torch.from_numpy(x)
    for i, t in enumerate(ref.timesteps):
        xt = ref.step(torch.from_numpy(vs[i]), t, xt, return_dict=False)[0]
        expected.append(xt.numpy())
    got = _scan_trajectory(ours, jnp.asarray(x), jnp.asarray(vs))
    for i in range(n):
        scale = np.abs(expected[i]).max()
        err = np.abs(got[i] - expected[i]).max() / scale
        assert err <= 1e-5, f"step {i}: relative error {err:.3g}"


# ----------------------------------------------------------------------------------- torch-free


def test_known_schedules():
    # Values printed by diffusers 0.42.1 (set_timesteps(6), flow_shift / shift = 5.0).
    unipc = UniPCMultistep(6, 5.0)
    assert unipc.timesteps.tolist() == [999, 961, 909, 833, 714, 501]
    np.testing.assert_allclose(unipc.sigmas[[0, 5, 6]], [0.9999989867210388, 0.5014970302581787, 0.0], rtol=0)
    euler = FlowMatchEuler(6, 5.0)
    np.testing.assert_allclose(
        euler.timesteps, [1000.0, 952.6630249023438, 883.2125244140625, 771.4307250976562, 561.6498413085938,
                          24.414066314697266], rtol=0)
    assert euler.sigmas[-1] == 0.0


@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("n", [1, 3, 8])
def test_exact_on_straight_flow(name, n):
    """With the exact velocity of a straight path x_s = (1-s) x0 + s eps, both solvers stay on the path."""
    rng = np.random.default_rng(1)
    x0 = rng.standard_normal(SHAPE).astype(np.float32)
    eps = rng.standard_normal(SHAPE).astype(np.float32)
    sched = make_scheduler(name, num_inference_steps=n, flow_shift=5.0)
    vs = jnp.broadcast_to(jnp.asarray(eps - x0), (n, *SHAPE))
    s0 = sched.sigmas[0]
    traj = _scan_trajectory(sched, jnp.asarray((1 - s0) * x0 + s0 * eps), vs)
    for i in range(n):
        s = sched.sigmas[i + 1]
        np.testing.assert_allclose(traj[i], (1 - s) * x0 + s * eps, atol=2e-5)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_scan_fori_and_python_loop_agree(name):
    n = 6
    sched = make_scheduler(name, num_inference_steps=n, flow_shift=3.0)
    x, vs = _random_problem(n, seed=2)
    x, vs = jnp.asarray(x), jnp.asarray(vs)
    scan_last = _scan_trajectory(sched, x, vs)[-1]

    def fori_body(i, carry):
        sample, state = carry
        return sched.step(state, vs[i], sample)

    fori_last, _ = jax.jit(lambda x: jax.lax.fori_loop(0, n, fori_body, (x, sched.init(x))))(x)

    step = jax.jit(sched.step)  # one compilation serves every step: the index is data
    sample, state = x, sched.init(x)
    for i in range(n):
        sample, state = step(state, vs[i], sample)
    assert step._cache_size() == 1
    np.testing.assert_allclose(np.asarray(fori_last), scan_last, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(sample), scan_last, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_timestep_is_traced_and_matches_table(name):
    sched = make_scheduler(name, num_inference_steps=5, flow_shift=3.0)

    def body(state, _):
        t = sched.timestep(state)
        _, state = sched.step(state, jnp.zeros(SHAPE), jnp.zeros(SHAPE))
        return state, t

    _, ts = jax.lax.scan(body, sched.init(jnp.zeros(SHAPE)), length=5)
    np.testing.assert_array_equal(np.asarray(ts), sched.timesteps.astype(np.float32))


def test_euler_rounds_through_model_output_dtype():
    """diffusers casts Euler's result to the model output dtype; the carry keeps the sample dtype."""
    sched = FlowMatchEuler(4, 3.0)
    x = jnp.linspace(-1, 1, 64, dtype=jnp.float32)
    v = jnp.linspace(1, 2, 64, dtype=jnp.bfloat16)
    out, _ = sched.step(sched.init(x), v, x)
    assert out.dtype == jnp.float32
    dt = sched.sigmas[1] - sched.sigmas[0]
    np.testing.assert_array_equal(np.asarray(out), np.asarray((x + dt * v.astype(jnp.float32)).astype(jnp.bfloat16), np.float32))


def test_schedulers_are_hashable_by_value():
    assert make_scheduler("unipc", num_inference_steps=4, flow_shift=3.0) == UniPCMultistep(4, 3.0)
    assert hash(FlowMatchEuler(4, 3.0)) == hash(FlowMatchEuler(4, 3.0))
    assert UniPCMultistep(4, 3.0) != FlowMatchEuler(4, 3.0)


def test_errors():
    with pytest.raises(ValueError, match="unknown scheduler 'ddim'; valid names: 'unipc', 'euler'"):
        make_scheduler("ddim", num_inference_steps=4)
    with pytest.raises(ValueError, match="num_inference_steps must be >= 1"):
        UniPCMultistep(0)
