"""Host-loop hoisting (kvhoist.host): a Python loop calling a step whose invariant work is cached.

Each wan_ref test asserts both facts: the latents equal the undecorated Python-loop sampler's, and the
step's jaxpr holds no cross-attention K/V projection (they moved to the prologue). Small hand-written
functions test the cache's identity rules. Tiny shapes: the whole file runs in well under a minute.
"""

from __future__ import annotations

import collections
import functools
import gc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kvhoist
from kvhoist import compat
import kvhoist.host_args
import kvhoist.host_fast
from kvhoist.host import HostHoistedFunction, StaleHandleError
from wan_ref import WanModel, get_preset
from wan_ref.sample import one_step, sample

TOL = 1e-5
KV_NAMES = ("to_k", "to_v", "add_k_proj", "add_v_proj")


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _dots(closed, pred) -> int:
    """dot_generals (recursively, inside scans/conds/calls) whose name stack satisfies ``pred``."""
    n = 0
    for e in compat.split_closed(closed)[4]:
        if e.primitive.name == "dot_general" and pred(compat.name_stack(e)):
            n += 1
        for sub in compat.subjaxprs_of(e):
            n += _dots(sub, pred)
    return n


def _cross_kv(name: str) -> bool:
    # Self-attention (attn1) K/V read the latents and must stay; cross-attention's read only the context.
    return any(k in name for k in KV_NAMES) and "attn1" not in name


# ------------------------------------------------------------------------------------- wan_ref


@functools.lru_cache(maxsize=None)
def _models(name: str):
    preset = get_preset(name)
    model = WanModel(preset.config, rngs=nnx.Rngs(0))
    model_2 = WanModel(preset.config_2, rngs=nnx.Rngs(1)) if preset.config_2 is not None else None
    return model, model_2


def _inputs(name: str, seed: int = 0) -> tuple[tuple, dict]:
    preset = get_preset(name)
    cfg = preset.config
    rng = np.random.default_rng(seed)

    def randn(*s):
        return jnp.asarray(rng.standard_normal(s).astype(np.float32))

    text_len = 512 if cfg.image_dim is not None else 8
    latents = randn(1, 4, 2, 4, 4)
    pe, npe = randn(1, text_len, cfg.text_dim), randn(1, text_len, cfg.text_dim)
    kw = dict(num_inference_steps=4, guidance_scale=preset.guidance_scale, flow_shift=preset.flow_shift,
              loop="python")
    model, model_2 = _models(name)
    if model_2 is not None:
        kw.update(model_2=model_2, boundary_ratio=preset.boundary_ratio, guidance_scale_2=preset.guidance_scale_2)
    if cfg.image_dim is not None:
        mask = jnp.zeros((1, 4, 2, 4, 4)).at[:, :, 0].set(1)
        kw.update(image_embeds=randn(1, 5, cfg.image_dim),
                  condition=jnp.concatenate([mask, randn(1, cfg.in_channels - 8, 2, 4, 4)], axis=1))
    return (model, latents, pe, npe), kw


def _hoisted_step() -> HostHoistedFunction:
    return kvhoist.hoist_invariants(one_step, static_argnames=("plan",), invariant_argnames=("expert", "shared"))


class _Spy:
    """Records the arguments of the first call, so the test can ask for that signature's jaxprs."""

    def __init__(self, fn):
        self.fn, self.first = fn, None

    def __call__(self, *args, **kwargs):
        if self.first is None:
            self.first = (args, kwargs)
        return self.fn(*args, **kwargs)


@pytest.mark.parametrize("name,experts", [("tiny-t2v", 1), ("tiny-i2v", 1), ("tiny-t2v-a14b", 2)])
def test_wan_python_loop_same_latents_and_no_kv_in_step(name, experts):
    args, kw = _inputs(name)
    ref = sample(*args, **kw)
    step = _hoisted_step()
    spy = _Spy(step)
    got = sample(*args, step_fn=spy, **kw)
    assert _rel(got, ref) <= TOL
    # One prologue per expert (the Wan 2.2 experts share one compiled program), the rest cache hits.
    info = step.cache_info()
    assert (info.misses, info.hits, info.programs) == (experts, 4 - experts, 1)
    before, prologue, step_jaxpr = step.jaxprs(*spy.first[0], **spy.first[1])
    assert _dots(before, _cross_kv) > 0
    assert _dots(prologue, _cross_kv) == _dots(before, _cross_kv)
    assert _dots(step_jaxpr, _cross_kv) == 0
    assert _dots(step_jaxpr, lambda n: "attn1/to_k" in n) > 0  # self-attention K stays in the step
    report = step.report(*spy.first[0], **spy.first[1])
    assert report.find("attn2/to_k") and report.cache_bytes > 0
    if name == "tiny-i2v":
        assert report.find("add_k_proj")


def test_wan_new_prompt_reruns_prologue_and_is_correct():
    args, kw = _inputs("tiny-t2v")
    step = _hoisted_step()
    first = sample(*args, step_fn=step, **kw)
    assert step.prologue_runs == 1
    (model, latents, _pe, _npe), _ = _inputs("tiny-t2v", seed=1)
    new_args = (args[0], args[1], _pe, _npe)
    got = sample(*new_args, step_fn=step, **kw)
    assert step.prologue_runs == 2
    ref = sample(*new_args, **kw)
    assert _rel(got, ref) <= TOL
    assert _rel(got, first) > 1e-3  # a stale cache would have returned (close to) the first result
    assert step.cache_info().programs == 1


def test_sample_rejects_step_fn_outside_python_loop():
    args, kw = _inputs("tiny-t2v")
    kw["loop"] = "scan"
    with pytest.raises(ValueError, match="step_fn is only used by loop='python'"):
        sample(*args, step_fn=_hoisted_step(), **kw)


# ------------------------------------------------------------------- small functions: identity


def _f(w, ctx, x):
    kv = jnp.tanh(ctx @ w)          # invariant: depends on w and ctx only
    return x @ kv.T + x.sum()


def _fresh(seed=0):
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.standard_normal((16, 16)), jnp.float32)
    ctx = jnp.asarray(rng.standard_normal((32, 16)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((4, 16)), jnp.float32)
    return w, ctx, x


def test_small_function_prologue_and_step():
    f = kvhoist.hoist_invariants(_f, invariant_argnums=(0, 1))
    w, ctx, x = _fresh()
    np.testing.assert_allclose(f(w, ctx, x), _f(w, ctx, x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(f(w, ctx, x + 1), _f(w, ctx, x + 1), rtol=1e-5, atol=1e-6)
    assert f.prologue_runs == 1 and f.cache_info().hits == 1
    _before, prologue, step = f.jaxprs(w, ctx, x)
    assert _dots(prologue, lambda n: True) == 1 and _dots(step, lambda n: True) == 1
    prims = {e.primitive.name for e in compat.split_closed(step)[4]}
    assert "tanh" not in prims
    assert f.cache_bytes == 32 * 16 * 4


def test_new_invariant_array_recomputes_and_equal_values_are_not_trusted():
    f = kvhoist.hoist_invariants(_f, invariant_argnames=("w", "ctx"))
    w, ctx, x = _fresh()
    f(w, ctx, x)
    ctx2 = ctx * 2
    np.testing.assert_allclose(f(w, ctx2, x), _f(w, ctx2, x), rtol=1e-5, atol=1e-6)
    f(w, ctx + 0, x)  # equal values, different object: recomputed (identity, not value, is the key)
    assert f.prologue_runs == 3


def test_dead_arrays_are_evicted_and_lru_is_bounded():
    f = HostHoistedFunction(_f, invariant_argnums=(0, 1), max_cache_entries=2)
    w, ctx, x = _fresh()
    tmp = ctx * 3
    f(w, tmp, x)
    assert f.cache_info().entries == 1
    del tmp
    gc.collect()
    assert f.cache_info().entries == 0  # the weakref callback dropped the entry with its argument
    ctxs = [ctx + i for i in range(4)]
    for c in ctxs:
        f(w, c, x)
    assert f.cache_info().entries == 2
    f(w, ctxs[-1], x)
    assert f.cache_info().hits == 1
    f.clear_cache()
    assert f.cache_info().entries == 0 and f.cache_bytes == 0 and f.cache_info().programs == 0


def test_mutated_numpy_invariant_is_detected():
    f = kvhoist.hoist_invariants(_f, invariant_argnums=(0, 1))
    w, ctx, x = _fresh()
    ctx_np = np.array(ctx)
    f(w, ctx_np, x)
    ctx_np[0, 0] += 10.0
    np.testing.assert_allclose(f(w, ctx_np, x), _f(w, jnp.asarray(ctx_np), x), rtol=1e-5, atol=1e-6)
    assert f.prologue_runs == 2
    f(w, ctx_np, x)
    assert f.prologue_runs == 2


def test_deleted_invariant_array_is_never_served():
    f = kvhoist.hoist_invariants(_f, invariant_argnums=(0, 1))
    w, ctx, x = _fresh()
    ctx = ctx + 0
    f(w, ctx, x)
    ctx.delete()
    with pytest.raises(Exception, match="delete"):
        f(w, ctx, x)


def test_under_jit_no_caching_same_values():
    f = kvhoist.hoist_invariants(_f, invariant_argnums=(0, 1))
    w, ctx, x = _fresh()
    got = jax.jit(f)(w, ctx, x)
    np.testing.assert_allclose(got, _f(w, ctx, x), rtol=1e-5, atol=1e-6)
    assert f.cache_info().entries == 0


def test_inside_a_trace_with_concrete_invariants_caches_nothing():
    f = kvhoist.hoist_invariants(_f, invariant_argnums=(0, 1))
    w, ctx, x = _fresh()
    got = jax.jit(lambda x: f(w, ctx, x))(x)  # w, ctx concrete (closed over), x a tracer
    np.testing.assert_allclose(got, _f(w, ctx, x), rtol=1e-5)
    assert f.cache_info().entries == 0
    np.testing.assert_allclose(f(w, ctx, x), _f(w, ctx, x), rtol=1e-5, atol=1e-6)  # no leaked tracer
    assert f.cache_info().entries == 1


def test_prepare_handle():
    f = kvhoist.hoist_invariants(_f, invariant_argnums=(0, 1))
    w, ctx, x = _fresh()
    handle = f.prepare(w, ctx, x)
    np.testing.assert_allclose(handle(w, ctx, x + 1), _f(w, ctx, x + 1), rtol=1e-5, atol=1e-6)
    assert handle.cache_bytes == 32 * 16 * 4 and f.cache_info().entries == 0
    with pytest.raises(StaleHandleError, match="prepare"):
        handle(w, ctx * 2, x)


def test_nothing_to_hoist_and_hoisted_value_returned():
    f = kvhoist.hoist_invariants(lambda w, x: x * 2 + w, invariant_argnums=0)
    w, _ctx, x = _fresh()
    np.testing.assert_allclose(f(w[:4], x), x * 2 + w[:4])
    assert f.prologue_runs == 0 and f.report(w[:4], x).notes[-1].kind == "host"

    def g(w, ctx, x):
        kv = jnp.tanh(ctx @ w)
        return kv, x @ kv.T

    h = kvhoist.hoist_invariants(g, invariant_argnums=(0, 1))
    kv, y = h(w, ctx := _fresh()[1], x)
    kv_ref, y_ref = g(w, ctx, x)
    np.testing.assert_allclose(kv, kv_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)


def test_kwargs_static_and_pytrees():
    def g(params, x, *, scale):
        return x @ (params["a"] @ params["b"]) * scale

    f = kvhoist.hoist_invariants(g, invariant_argnames="params", static_argnames="scale")
    p = {"a": jnp.ones((8, 8)), "b": jnp.eye(8)}
    x = jnp.arange(16.0).reshape(2, 8)
    np.testing.assert_allclose(f(p, x, scale=2.0), g(p, x, scale=2.0))
    np.testing.assert_allclose(f(params=p, x=x, scale=3.0), g(p, x, scale=3.0))
    assert f.cache_info().programs == 2 and f.prologue_runs == 2


# ---------------------------------------------------------------------------------- errors


def test_invariant_argnums_out_of_range_names_the_argument():
    with pytest.raises(ValueError, match=r"invariant_argnums=3 is out of range.*w, ctx, x"):
        kvhoist.hoist_invariants(_f, invariant_argnums=(3,))


def test_invariant_argname_unknown():
    with pytest.raises(ValueError, match=r"invariant_argnames='params' is not a parameter of _f"):
        kvhoist.hoist_invariants(_f, invariant_argnames=("params",))


def test_invariant_and_static_conflict_names_the_argument():
    with pytest.raises(ValueError, match=r"argument 0 \('w'\) of _f.* is static"):
        kvhoist.hoist_invariants(_f, invariant_argnums=(0,), static_argnums=(0,))
    with pytest.raises(ValueError, match=r"'plan'.* is static"):
        kvhoist.hoist_invariants(one_step, invariant_argnames=("plan",), static_argnames=("plan",))


def test_no_invariant_argument_is_an_error():
    with pytest.raises(ValueError, match="at least one invariant argument"):
        kvhoist.hoist_invariants(_f, invariant_argnums=())


def test_loops_inside_the_step_are_also_optimised():
    """Work invariant to a loop *inside* the step (but depending on the varying argument) leaves that
    loop, on top of the prologue split."""
    import kvhoist

    w = jnp.asarray(np.random.default_rng(0).standard_normal((8, 8)), jnp.float32)

    def step(w, x):
        y = jnp.tanh(x @ w)                      # varies per call, invariant to the inner loop
        def body(h, t):
            return jnp.tanh(h + t * (y @ w).sum()), None
        return jax.lax.scan(body, x, jnp.arange(3.0))[0]

    hs = kvhoist.hoist_invariants(step, invariant_argnums=0)
    x = jnp.ones((2, 8), jnp.float32)
    np.testing.assert_allclose(hs(w, x), step(w, x), rtol=1e-5, atol=1e-6)
    _before, _prologue, step_jaxpr = hs.jaxprs(w, x)
    (loop,) = [e for e in step_jaxpr.eqns if e.primitive.name == "scan"]
    inner = [e.primitive.name for e in compat.split_closed(loop.params["jaxpr"])[4]]
    assert "dot_general" not in inner
    assert any(h.loop.startswith("scan") for h in hs.report(w, x).hoisted)


# ------------------------------------------------------------------- jit's keys: static types, config


def test_static_arguments_key_on_value_and_type():
    """``2 == 2.0 == True`` but jax.jit traces each separately; so must the host-loop cache."""
    def g(w, x, n):
        return jnp.asarray(n) * x, jnp.tanh(w).sum()

    f = kvhoist.hoist_invariants(g, invariant_argnums=0, static_argnums=2)
    ref = jax.jit(g, static_argnums=2)
    w, x = jnp.ones((4,), jnp.float32), jnp.arange(3)
    for n in (2.0, 2, True, 1):
        got, want = f(w, x, n)[0], ref(w, x, n)[0]
        assert got.dtype == want.dtype, (n, got.dtype, want.dtype)
        np.testing.assert_array_equal(got, want)
    assert f.cache_info().programs == 4


def test_x64_switch_does_not_reuse_a_32_bit_program():
    def g(w, x):
        return x.sum() + jnp.zeros(3) + jnp.tanh(w).sum()   # zeros(3) is float64 under x64

    f = kvhoist.hoist_invariants(g, invariant_argnums=0)
    w, x = jnp.ones((4,), jnp.float32), jnp.ones((2,), jnp.float32)
    assert f(w, x).dtype == jnp.float32
    try:
        jax.config.update("jax_enable_x64", True)
        got, want = f(w, x), jax.jit(g)(w, x)
    finally:
        jax.config.update("jax_enable_x64", False)
    assert got.dtype == want.dtype == jnp.float64
    assert f(w, x).dtype == jnp.float32


# ------------------------------------------------------------------- the fast path's identity rules


def test_fast_path_hits_and_its_identity_rules():
    """Repeated calls take the id-keyed fast path; each identity rule still holds there."""
    f = kvhoist.hoist_invariants(_f, invariant_argnums=(0, 1))
    w, ctx, x = _fresh()
    for i in range(3):
        np.testing.assert_allclose(f(w, ctx, x + i), _f(w, ctx, x + i), rtol=1e-5, atol=1e-6)
    assert (f.prologue_runs, f.cache_info().hits) == (1, 2)
    # Keyword and positional calls of the same slots share the program and the cached values.
    np.testing.assert_allclose(f(w, ctx=ctx, x=x), _f(w, ctx, x), rtol=1e-5, atol=1e-6)
    assert (f.prologue_runs, f.cache_info().programs) == (1, 1)
    # A new shape of the varying argument: another program, a new prologue, right numbers; then back.
    x8 = jnp.ones((8, 16), jnp.float32)
    np.testing.assert_allclose(f(w, ctx, x8), _f(w, ctx, x8), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(f(w, ctx, x), _f(w, ctx, x), rtol=1e-5, atol=1e-6)
    assert f.cache_info().programs == 2
    # A numpy invariant mutated in place between fast hits, and a deleted array the step never reads.
    ctx_np = np.array(ctx)
    f(w, ctx_np, x)
    f(w, ctx_np, x)
    runs = f.prologue_runs
    ctx_np[0, 0] += 10.0
    np.testing.assert_allclose(f(w, ctx_np, x), _f(w, jnp.asarray(ctx_np), x), rtol=1e-5, atol=1e-6)
    assert f.prologue_runs == runs + 1
    ctx2 = ctx + 0
    f(w, ctx2, x)
    f(w, ctx2, x)
    ctx2.delete()  # ctx is read only by the prologue: jit never sees it
    with pytest.raises(Exception, match="delete"):
        f(w, ctx2, x)


def test_scalar_invariants_by_value_on_the_fast_path():
    def g(w, scale, x):
        return x * jnp.tanh(w * scale).sum()

    f = kvhoist.hoist_invariants(g, invariant_argnums=(0, 1))
    w, x = jnp.ones((4,), jnp.float32), jnp.ones((2,), jnp.float32)
    for scale in (2.0, float("2.0"), 2.0, 3.0, np.float32(3.0)):
        np.testing.assert_allclose(f(w, scale, x), g(w, scale, x), rtol=1e-6)
    # 2.0 (any object) and 3.0 are two prologues; np.float32(3.0) is a third (its type differs).
    assert f.prologue_runs == 3


def test_prepared_handle_fast_path_and_dead_arrays():
    f = kvhoist.hoist_invariants(_f, invariant_argnums=(0, 1))
    w, ctx, x = _fresh()
    ctx = ctx + 0
    handle = f.prepare(w, ctx, x)
    for i in range(3):
        np.testing.assert_allclose(handle(w, ctx, x + i), _f(w, ctx, x + i), rtol=1e-5, atol=1e-6)
    with pytest.raises(StaleHandleError, match="shapes"):  # prepared for one varying signature
        handle(w, ctx, jnp.ones((8, 16), jnp.float32))
    del ctx
    gc.collect()
    with pytest.raises(StaleHandleError):
        handle(w, _fresh()[1] + 0, x)


def test_threads_share_one_function():
    import concurrent.futures

    f = kvhoist.hoist_invariants(_f, invariant_argnums=(0, 1))
    w, ctx, x = _fresh()
    ctxs = [ctx * (i + 1) for i in range(3)]

    def work(i):
        c = ctxs[i % 3]
        return [np.asarray(f(w, c, x + k)) for k in range(5)], c

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for outs, c in pool.map(work, range(8)):
            for k, out in enumerate(outs):
                np.testing.assert_allclose(out, _f(w, c, x + k), rtol=1e-5, atol=1e-5)
    assert f.cache_info().entries <= f.max_cache_entries


# -- a setting passed as a traced argument: one error naming the fix -------------------------------------

def test_plan_not_static_names_static_argnames():
    """The README's host-loop form without static_argnames=("plan",): the error says exactly that."""
    from wan_ref.presets import tiny_inputs

    model, noise, pe, npe = tiny_inputs("tiny-t2v").args
    step = kvhoist.hoist_invariants(one_step, invariant_argnames=("expert", "shared"))
    with pytest.raises(TypeError) as info:
        sample(model, noise, pe, npe, num_inference_steps=2, loop="python", step_fn=step)
    msg = str(info.value)
    assert "argument 'plan' of one_step is a _Plan" in msg
    assert 'static_argnames=("plan",)' in msg and len(msg.splitlines()) == 1


@pytest.mark.parametrize("invariant, call, needle", [
    ((1,), lambda f, w, x: f({"scale": "x"}, w, x), "argument 'plan' of step is a dict holding a str"),
    ((0, 1), lambda f, w, x: f({"scale": "x"}, w, x), "cannot be an invariant input"),
    ((1,), lambda f, w, x: f(plan="fast", w=w, x=x), "argument 'plan' of step is a str"),
])
def test_non_array_argument_names_the_static_fix(invariant, call, needle):
    def step(plan, w, x):
        return x @ w

    f = kvhoist.hoist_invariants(step, invariant_argnums=invariant)
    w = x = jnp.ones((2, 2))
    with pytest.raises(TypeError) as info:
        call(f, w, x)
    assert needle in str(info.value) and 'static_argnames=("plan",)' in str(info.value)


def test_non_array_star_argument_names_static_argnums():
    def step(w, x, *rest):
        return x @ w

    f = kvhoist.hoist_invariants(step, invariant_argnums=(0,))
    with pytest.raises(TypeError, match=r"argument at position 2 of step is a str.*static_argnums=\(2,\)"):
        f(jnp.ones((2, 2)), jnp.ones((2, 2)), "mode")


# ------------------------------------------------------ the hit path's cost does not grow with leaves


def _wide_step(params, ctx, x):
    acc = x + jnp.tanh(ctx).sum()   # tanh(ctx) is hoisted; every params leaf is read x-dependently
    for leaf in jax.tree_util.tree_leaves(params):
        acc = acc + x * leaf[0]
    return acc


def _wide_args(n: int):
    params = {f"w{i:03d}": jnp.full((3,), float(i), jnp.float32) for i in range(n)}
    return params, jnp.ones((5,), jnp.float32), jnp.arange(3.0, dtype=jnp.float32)


def _hit_profile(f, args) -> collections.Counter:
    """Python-level function calls ('call') and builtin calls ('c_call') of one cache hit, by name."""
    import sys

    names: collections.Counter = collections.Counter()

    def prof(frame, event, arg):
        if event == "call":
            names[frame.f_code.co_name] += 1
            names["<python calls>"] += 1
        elif event == "c_call":
            names["C:" + getattr(arg, "__name__", "?")] += 1
            names["<builtin calls>"] += 1

    sys.setprofile(prof)
    try:
        f(*args)
    finally:
        sys.setprofile(None)
    return names


def test_cache_hit_work_does_not_grow_with_the_number_of_leaves(monkeypatch):
    """Counted, not timed: a hit flattens the invariant and the varying arguments once each, runs the
    compiled step directly (not jit's dispatch, which checks every leaf again) with exactly the step's
    inputs, and makes the same few Python calls at 8 leaves and at 300."""
    profiles = {}
    for n in (8, 300):
        f = kvhoist.hoist_invariants(_wide_step, invariant_argnums=(0, 1))
        args = _wide_args(n)
        want = _wide_step(*args)
        f(*args)
        f(*args)  # the first hit decides the direct path (jit has compiled the step by then)
        (entry,) = [e for cands in f._fast.values() for e in cands]
        prog = entry.program
        seen = []
        run = entry.direct
        assert run is not None, "the step should run its executable directly"
        entry.direct = lambda flat: seen.append(len(flat)) or run(flat)
        jit_calls = []
        step_call = prog.step_call
        prog.step_call = lambda *a: jit_calls.append(1) or step_call(*a)
        np.testing.assert_allclose(f(*args), want, rtol=1e-6)
        # cached tanh(ctx) sum + every params leaf (ctx is read by the prologue only) + x
        assert seen == [len(entry.values) + n + 1] and len(entry.values) == 1 and not jit_calls
        entry.direct = run
        profiles[n] = _hit_profile(f, args)
        flattens = []
        flatten = kvhoist.host_args.tree_flatten
        for module in (kvhoist.host, kvhoist.host_fast):
            monkeypatch.setattr(module, "tree_flatten", lambda t: flattens.append(1) or flatten(t))
        f(*args)
        monkeypatch.undo()
        assert len(flattens) == 2  # the invariant arguments, then the varying ones
        assert f.prologue_runs == 1 and f.cache_info().hits == 4
    small, large = profiles[8], profiles[300]
    assert small == large, (small, large)
    assert large["<python calls>"] <= 15 and large["<builtin calls>"] <= 12, large


def test_direct_path_falls_back_to_jit_semantics(monkeypatch):
    """Whatever the direct call would not check itself goes through jax.jit: numpy or committed
    varying leaves, debug_nans, a deleted invariant array the step reads."""
    f = kvhoist.hoist_invariants(_wide_step, invariant_argnums=(0, 1))
    params, ctx, x = _wide_args(4)
    ref = jax.jit(_wide_step)
    for _ in range(3):
        f(params, ctx, x)
    x_np = np.asarray(x) + 1
    np.testing.assert_allclose(f(params, ctx, x_np), _wide_step(params, ctx, x_np), rtol=1e-6)
    x_dev = jax.device_put(x, jax.devices()[0])  # committed: jit keeps outputs committed
    got = f(params, ctx, x_dev)
    np.testing.assert_allclose(got, _wide_step(params, ctx, x_dev), rtol=1e-6)
    assert got.committed == ref(params, ctx, x_dev).committed
    assert f(params, ctx, x).committed == ref(params, ctx, x).committed
    # jax_debug_nans / jax_debug_infs: jit checks the outputs, so the step goes through jit.
    (entry,) = [e for cands in f._fast.values() for e in cands]
    jit_calls = []
    step_call = entry.program.step_call
    entry.program.step_call = lambda *a: jit_calls.append(1) or step_call(*a)
    f(params, ctx, x)
    assert not jit_calls
    monkeypatch.setattr(kvhoist.host_fast, "special_checks_on", lambda: True)
    f(params, ctx, x)
    assert jit_calls == [1]
    monkeypatch.undo()
    params["w001"] = w = params["w001"] + 0
    f(params, ctx, x)
    f(params, ctx, x)
    w.delete()
    with pytest.raises(Exception, match="delete"):
        f(params, ctx, x)
    assert f.prologue_runs == 2  # params, then params with a new w001


def _g(w, ctx, x):  # the output has x's shape and dtype: its buffer can be donated
    return x * 0.5 + jnp.tanh(ctx @ w).sum(0)


def test_donated_varying_arguments_are_donated_like_jit():
    """donate_argnums / donate_argnames of varying arguments: the buffer is consumed as under jax.jit(step,
    donate_argnums=...), on the first (slow) call and on every cache hit; values and the cache unchanged."""
    for kw in ({"donate_argnums": 2}, {"donate_argnames": "x"}, {"donate_argnums": (2,), "donate_argnames": "x"}):
        W, CTX, X = _fresh()
        hf = kvhoist.hoist_invariants(_g, invariant_argnums=(0, 1), **kw)
        ref = jax.jit(_g, **kw)
        x = X
        for i in range(3):
            mine, theirs = x + 0.0, x + 0.0
            out = hf(W, CTX, mine)
            want = ref(W, CTX, theirs)
            assert theirs.is_deleted() and mine.is_deleted(), (kw, i)
            np.testing.assert_allclose(out, want, rtol=TOL, atol=TOL)
            x = out
        assert hf.prologue_runs == 1 and hf.cache_info().hits == 2
        assert not W.is_deleted() and not CTX.is_deleted()


def test_donating_an_invariant_argument_is_one_clear_error():
    for kw in ({"donate_argnums": 0}, {"donate_argnames": "ctx"}, {"donate_argnums": -3}):
        with pytest.raises(kvhoist.KvhoistError, match="invariant and cannot be donated: its arrays stay cached"):
            kvhoist.hoist_invariants(_f, invariant_argnums=(0, 1), **kw)
    with pytest.raises(kvhoist.KvhoistError, match="in_shardings is not supported with host-loop hoisting"):
        kvhoist.hoist_invariants(_f, invariant_argnums=0, in_shardings=None)
    with pytest.raises(TypeError, match="unexpected keyword argument 'donate'"):
        kvhoist.hoist_invariants(_f, invariant_argnums=0, donate=1)


def test_program_wide_jit_options_reach_the_host_programs():
    """keep_unused / backend / inline / compiler_options apply to the prologue and the step: an XLA option
    that does not exist fails as under jax.jit."""
    W, CTX, X = _fresh()
    want = jax.jit(_f)(W, CTX, X)
    for kw in ({"keep_unused": True}, {"backend": "cpu"}, {"compiler_options": {"xla_cpu_enable_fast_math": False}}):
        np.testing.assert_allclose(kvhoist.hoist_invariants(_f, invariant_argnums=(0, 1), **kw)(W, CTX, X), want,
                                   rtol=TOL, atol=TOL)
    with pytest.raises(Exception) as jit_err:
        jax.jit(_f, compiler_options={"no_such_xla_option": True})(W, CTX, X)
    with pytest.raises(type(jit_err.value)):
        kvhoist.hoist_invariants(_f, invariant_argnums=(0, 1), compiler_options={"no_such_xla_option": True})(W, CTX, X)


class _TinyDiT(nnx.Module):
    """A maxdiffusion-style denoiser in miniature: the context's K/V projections are the invariant work."""

    def __init__(self, rngs: nnx.Rngs):
        self.proj_in = nnx.Linear(4, 16, rngs=rngs)
        self.time = nnx.Linear(1, 16, rngs=rngs)
        self.to_k = nnx.Linear(8, 16, rngs=rngs)
        self.to_v = nnx.Linear(8, 16, rngs=rngs)
        self.proj_out = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x, t, context):
        h = self.proj_in(x) + self.time(t[:, None, None])
        k, v = self.to_k(context), self.to_v(context)
        att = jax.nn.softmax(h @ k.transpose(0, 2, 1) / 4.0, axis=-1)
        return self.proj_out(h + att @ v)


def _cfg_step(model, latents, t, *, context, negative_context, guidance_scale, sched_state):
    """An NNX model, CFG by keyword and a scheduler state: the shape of maxdiffusion's Wan step."""
    noise = model(jnp.concatenate([latents, latents]), jnp.broadcast_to(t, (2,)),
                  jnp.concatenate([context, negative_context]))
    cond, uncond = jnp.split(noise, 2)
    i, sigmas = sched_state["step"], sched_state["sigmas"]
    latents = latents + (sigmas[i + 1] - sigmas[i]) * (uncond + guidance_scale * (cond - uncond))
    return latents, {"sigmas": sigmas, "step": i + 1}


def _cfg_args(seed: int = 0):
    model = _TinyDiT(nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    latents = jnp.asarray(rng.standard_normal((1, 6, 4)).astype(np.float32))
    ctx, neg = (jnp.asarray(rng.standard_normal((1, 5, 8)).astype(np.float32)) for _ in range(2))
    state = {"sigmas": jnp.linspace(1.0, 0.0, 6), "step": jnp.asarray(0, jnp.int32)}
    return model, latents, {"context": ctx, "negative_context": neg, "sched_state": state}


def test_nnx_step_with_keyword_arguments_equals_jit_and_sees_mutations():
    """Issue 20 item 13's step (NNX model, CFG and scheduler state by keyword): hoisted equals jit over a
    sampling loop, its hits run the compiled step directly (the Python float ``guidance_scale`` included),
    and a mutated NNX parameter, a replaced one and a new guidance scale are all seen on the next call."""
    from kvhoist.contract import assert_close

    model, latents, kw = _cfg_args()
    f = kvhoist.hoist_invariants(_cfg_step, invariant_argnames=("model", "context", "negative_context"))
    ref = jax.jit(_cfg_step)

    def loop(fn, model, latents, state, g, n=4):
        for t in (0.9, 0.7, 0.5, 0.3)[:n]:
            latents, state = fn(model, latents, jnp.float32(t), context=kw["context"],
                                negative_context=kw["negative_context"], guidance_scale=g, sched_state=state)
        return latents, state

    state = kw["sched_state"]
    assert_close(loop(f, model, latents, state, 5.0), loop(ref, model, latents, state, 5.0))
    assert f.prologue_runs == 1 and f.cache_info().hits == 3
    assert len(f.report(model, latents, jnp.float32(0.9), guidance_scale=5.0, **kw).hoisted) >= 2  # K and V
    (entry,) = [e for cands in f._fast.values() for e in cands]
    assert entry.direct is not None and entry.program.var_scalars  # the float went the direct way
    # A new guidance scale (another float object): never the converted 5.0.
    assert_close(loop(f, model, latents, state, 3.0, 1), loop(ref, model, latents, state, 3.0, 1))
    assert_close(loop(f, model, latents, state, 3.0, 2), loop(ref, model, latents, state, 3.0, 2))
    # A parameter the prologue reads, mutated in place (NNX Variables are mutable): the K/V are recomputed.
    # The old array stays alive (``old_k``), so only the identity compare of a hit can tell.
    old_k = model.to_k.kernel[...]
    model.to_k.kernel[...] = old_k * 2.0
    assert_close(loop(f, model, latents, state, 5.0), loop(ref, model, latents, state, 5.0))
    assert f.prologue_runs == 2
    # A parameter the step reads itself, replaced by another array.
    old_b = model.proj_out.bias[...]
    model.proj_out.bias[...] = old_b + 1.0
    got, want = loop(f, model, latents, state, 5.0, 1), loop(ref, model, latents, state, 5.0, 1)
    assert_close(got, want)
    assert float(jnp.abs(got[0] - loop(f, _cfg_args()[0], latents, state, 5.0, 1)[0]).max()) > 0.1
    assert old_k is not None and old_b is not None


def test_python_scalar_varying_leaves_run_directly_as_jit_converts_them():
    """A Python scalar varying argument reaches the compiled step as the array jit makes of it (bitwise
    the jit path's result), converted once per scalar object; one that changes every call runs through
    jit (never a stale conversion); an int too large for int32 gets jit's own error."""
    def step(w, ctx, x, scale, n):
        return x * scale + n + jnp.tanh(ctx @ w).sum()

    w, ctx, x = jnp.ones((3, 3)), jnp.ones((2, 3)), jnp.arange(3.0)
    f = kvhoist.hoist_invariants(step, invariant_argnums=(0, 1))
    scale, n = 0.1, 7
    f(w, ctx, x, scale, n)
    f(w, ctx, x, scale, n)  # the first hit builds the direct run
    (entry,) = [e for cands in f._fast.values() for e in cands]
    prog = entry.program
    assert entry.direct is not None and prog.var_scalars == (1, 2)
    jit_calls = []
    step_call = prog.step_call
    prog.step_call = lambda *a: jit_calls.append(1) or step_call(*a)
    direct = f(w, ctx, x, scale, n)
    assert not jit_calls
    via_jit = step_call(entry.values, prog.take_step_inv([w, ctx]), x, scale, n)
    np.testing.assert_array_equal(np.asarray(direct), np.asarray(via_jit))
    np.testing.assert_array_equal(np.asarray(direct), np.asarray(jax.jit(step)(w, ctx, x, scale, n)))
    for k in range(4):  # a new float object each call: jit runs it, with its value
        s = 0.25 * (k + 2)
        np.testing.assert_allclose(f(w, ctx, x, s, n), step(w, ctx, x, s, n), rtol=1e-6)
    assert len(jit_calls) == 4
    np.testing.assert_allclose(f(w, ctx, x, -0.0, 3), step(w, ctx, x, -0.0, 3), rtol=1e-6)
    with pytest.raises(OverflowError):
        f(w, ctx, x, scale, 2**40)
