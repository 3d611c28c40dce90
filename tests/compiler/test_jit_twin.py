"""`hoist_invariants` behaves exactly like `jax.jit` of the undecorated function around the rewrite.

Issue 18 items 4-9 and issue 20 item 8: shardings and varying manual axes in the re-trace (Explicit, Auto and
Manual mesh axes on 8 CPU devices, in a child process like tests/compiler/test_multidevice.py), `jax.disable_jit()`,
jit's own exception types and messages, one trace per function (not per decoration) without keeping the
function alive, every `jax.jit` keyword, `copy` / `deepcopy`, donation in host-loop mode, and recorded jaxprs
bounded and freed by `clear_cache()` / `jax.clear_caches()`.
"""

from __future__ import annotations

import copy
import gc
import inspect
import json
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvhoist
import kvhoist.api as api
from kvhoist.contract import assert_close
from mesh_util import make_mesh, run_json_child

DEVICES = 8


def loop(w, x):
    """A fori_loop whose (w @ w.T).sum() is invariant: hoisted."""
    return jax.lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h + 0.01 * (w @ w.T).sum()), x)


def loop_psum(w, x):
    """Inside shard_map: the psum of invariant work times a varying carry ({V:x} types)."""
    return jax.lax.fori_loop(0, 3, lambda i, h: h * jax.lax.psum((w * w).sum(), "x") * 1e-3 + h, x)


# ------------------------------------------------------------------------------------------------------
# Shardings and varying manual axes (8 CPU devices, child process)
# ------------------------------------------------------------------------------------------------------


def _compare(name: str, make, args) -> dict:
    """Run ``make(jax.jit)`` and ``make(hoist_invariants)`` on ``args``: values, output sharding, errors."""
    out: dict = {"case": name}
    try:
        want = make(jax.jit)(*args)
        out["sharding_jit"] = str(want.sharding)
    except Exception as err:  # noqa: BLE001 - the case must run under jit; report it
        out["jit_error"] = f"{type(err).__name__}: {str(err)[:300]}"
        return out
    try:
        got = make(kvhoist.hoist_invariants)(*args)
    except Exception as err:  # noqa: BLE001
        out["error"] = f"{type(err).__name__}: {str(err)[:500]}"
        return out
    out["sharding_hoisted"] = str(got.sharding)
    out["got"], out["want"] = np.asarray(got).tolist(), np.asarray(want).tolist()
    return out


def run_sharding_checks() -> dict:
    from jax.sharding import NamedSharding, PartitionSpec as P

    assert jax.device_count() >= DEVICES, jax.devices()
    w = jnp.arange(16.0).reshape(4, 4) / 16
    x0 = jnp.arange(64.0).reshape(16, 4) / 64
    cases = []
    for axis in ("Explicit", "Auto"):
        mesh = make_mesh({"x": DEVICES}, axis)
        with jax.set_mesh(mesh):
            x = jax.device_put(x0, NamedSharding(mesh, P("x")))
            case = _compare(f"{axis}: fori_loop over a sharded carry", lambda wrap: wrap(loop), (w, x))
            hf = kvhoist.hoist_invariants(loop)
            if "error" not in case and "jit_error" not in case:
                before, _ = hf.jaxprs(w, x)
                case["traced_types"] = [str(v.aval.str_short()) for v in before.jaxpr.invars]
                case["hoisted"] = len(hf.report(w, x).hoisted)
            cases.append(case)
            # 2-D Explicit mesh: a layer scan whose stacked weights are sharded on "x" of a (2, 4) mesh.
        mesh2 = make_mesh({"data": 2, "model": 4}, axis)
        with jax.set_mesh(mesh2):
            ws = jax.device_put(jnp.stack([w, w * 0.5]), NamedSharding(mesh2, P()))
            xs = jax.device_put(x0[:8], NamedSharding(mesh2, P("data")))

            def layers(ws, x):  # fission: every layer's wl @ wl.T is computed before the step scan
                def step(h, _):
                    return jax.lax.scan(lambda h, wl: (jnp.tanh(h @ (wl @ wl.T)), None), h, ws)[0], None
                return jax.lax.scan(step, x, None, length=3)[0]

            cases.append(_compare(f"{axis} 2x4: layer scan in a step scan", lambda wrap: wrap(layers), (ws, xs)))
    # Manual axes: a hoisted function inside shard_map, with a psum in its loop (issue 18 item 5).
    for axis in ("Explicit", "Auto"):
        mesh = make_mesh({"x": DEVICES}, axis)
        with jax.set_mesh(mesh):
            x = jax.device_put(x0, NamedSharding(mesh, P("x"))) if axis == "Explicit" else x0

            def in_shard_map(wrap, mesh=mesh):
                return jax.shard_map(wrap(loop_psum), mesh=mesh, in_specs=(P(), P("x")), out_specs=P("x"))

            cases.append(_compare(f"{axis}: shard_map(hoisted) with a psum", in_shard_map, (w[0], x)))
            cases.append(_compare(f"{axis}: jit(shard_map(hoisted))", lambda wrap: jax.jit(in_shard_map(wrap)),
                                  (w[0], x)))
    return {"devices": jax.device_count(), "cases": cases}


@pytest.fixture(scope="module")
def sharding_facts() -> dict:
    if jax.device_count() >= DEVICES:
        return run_sharding_checks()
    return run_json_child(__file__, devices=DEVICES, timeout=600)


def test_shardings_and_manual_axes_as_under_jit(sharding_facts):
    """Explicit, Auto and Manual mesh axes: every program that runs under jit runs hoisted, with the same
    values and output sharding (issue 18 items 4 and 5)."""
    assert sharding_facts["devices"] >= DEVICES
    names = [c["case"] for c in sharding_facts["cases"]]
    assert len(names) == 8, names
    for case in sharding_facts["cases"]:
        assert "jit_error" not in case, case  # the program itself must be valid JAX
        assert "error" not in case, case
        assert case["sharding_hoisted"] == case["sharding_jit"], case
        assert_close(np.array(case["got"]), np.array(case["want"]))


def test_explicit_sharding_is_in_the_traced_types(sharding_facts):
    """The re-trace sees jit's types: the carry is float32[16@x,4] under Explicit axes, and the loop's
    invariant matmul still leaves the loop."""
    explicit, auto = sharding_facts["cases"][0], sharding_facts["cases"][2]
    assert explicit["case"].startswith("Explicit") and auto["case"].startswith("Auto")
    assert "float32[16@x,4]" in explicit["traced_types"], explicit
    assert "float32[16,4]" in auto["traced_types"], auto
    assert explicit["hoisted"] >= 1 and auto["hoisted"] >= 1


def test_abstract_arg_keeps_sharding_and_varying_axes():
    """compat.abstract_arg (what the re-trace is given) round-trips the avals of jit's tracers."""
    seen = []

    def probe(x):
        spec = kvhoist.compat.abstract_arg(x.aval)
        seen.append((spec, x.aval))
        return x

    jax.jit(probe)(jnp.ones((3,), jnp.bfloat16))
    jax.jit(probe)(2.0)
    for spec, aval in seen:
        traced = jax.make_jaxpr(lambda v: v)(spec).jaxpr.invars[0].aval
        assert traced == aval, (traced, aval)
        assert kvhoist.compat.aval_key(traced) == kvhoist.compat.aval_key(aval)


# ------------------------------------------------------------------------------------------------------
# disable_jit, exceptions
# ------------------------------------------------------------------------------------------------------

W = jnp.arange(16.0).reshape(4, 4) / 16
X = jnp.arange(8.0).reshape(2, 4) / 8


def test_disable_jit_runs_the_function_eagerly():
    """Under jax.disable_jit() jit calls the function itself on concrete arrays; so does hoist_invariants
    (Python control flow on values works there, as under jit)."""
    seen = []

    def f(w, x):
        seen.append(type(x).__name__)
        if float(x.sum()) > 0:  # concrete only without jit
            return loop(w, x)
        return -x

    with jax.disable_jit():
        want = jax.jit(f)(W, X)
        got = kvhoist.hoist_invariants(f)(W, X)
        got_static = kvhoist.hoist_invariants(f, static_argnums=())(W, X)
    assert seen == ["ArrayImpl"] * 3
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_static, want)


def _bool_of_traced(x):
    return x if x.sum() > 0 else -x


def _int_of_traced(x):
    return jnp.zeros(int(x[0]))


def _numpy_of_traced(x):
    return np.asarray(x) + 1


def _shape_mismatch(x):
    return jax.lax.fori_loop(0, 2, lambda i, h: h @ jnp.ones((3, 5)), x)


@pytest.mark.parametrize("fun", [_bool_of_traced, _int_of_traced, _numpy_of_traced, _shape_mismatch],
                         ids=lambda f: f.__name__)
def test_exceptions_are_jits_own(fun):
    """Same exception type (jax.errors.ConcretizationTypeError, TracerBoolConversionError, ..., TypeError)
    and the same message as jax.jit, naming the user's function and argument (issue 18 item 7)."""
    with pytest.raises(Exception) as want:
        jax.jit(fun)(X)
    with pytest.raises(Exception) as got:
        kvhoist.hoist_invariants(fun)(X)
    assert type(got.value) is type(want.value)
    assert str(got.value) == str(want.value)


# ------------------------------------------------------------------------------------------------------
# One trace per function, not per decoration; nothing kept alive
# ------------------------------------------------------------------------------------------------------


def test_decorating_again_reuses_the_trace_like_jit():
    """hoist_invariants(f)(x) five times traces once, as jax.jit(f)(x) does (issue 18 item 8); other
    options are another program."""
    traces = []

    def f(w, x):
        traces.append(1)
        return loop(w, x)

    for _ in range(5):
        out = kvhoist.hoist_invariants(f)(W, X)
    assert len(traces) == 1
    assert_close(out, jax.jit(loop)(W, X))
    kvhoist.hoist_invariants(f, max_cache_bytes=0)(W, X)
    kvhoist.hoist_invariants(f, keep_unused=True)(W, X)
    assert len(traces) == 3
    kvhoist.hoist_invariants(f, compiler_options={"xla_cpu_enable_fast_math": False})(W, X)
    kvhoist.hoist_invariants(f, compiler_options={"xla_cpu_enable_fast_math": False})(W, X)
    assert len(traces) == 4  # equal (unhashable) dict options: compared by content


def test_the_shared_trace_does_not_keep_the_function_alive():
    def make():
        big = np.ones((64, 64), np.float32)

        def f(w, x):
            return loop(w, x) + big[:2, :4]
        return f

    f = make()
    hf = kvhoist.hoist_invariants(f)
    hf(W, X)
    ref = weakref.ref(f)
    del f, hf
    gc.collect()
    assert ref() is None
    assert all(entry[0]() is not None for entry in list(api._TWINS.values()))


def test_bound_methods_and_partials_trace_per_object_like_jit():
    import functools

    traces = []

    class Model:
        def run(self, w, x):
            traces.append(1)
            return loop(w, x)

    m = Model()
    for _ in range(2):
        kvhoist.hoist_invariants(m.run)(W, X)
        kvhoist.hoist_invariants(functools.partial(Model.run, m))(W, X)
    n_hoisted = len(traces)
    traces.clear()
    for _ in range(2):
        jax.jit(m.run)(W, X)
        jax.jit(functools.partial(Model.run, m))(W, X)
    assert n_hoisted == len(traces) == 4


# ------------------------------------------------------------------------------------------------------
# jax.jit keywords, copy / deepcopy
# ------------------------------------------------------------------------------------------------------

JIT_KEYWORDS = [n for n, p in inspect.signature(jax.jit).parameters.items() if p.kind == p.KEYWORD_ONLY]


def _jit_option_values() -> dict:
    cpu = jax.devices("cpu")[0]
    return {"in_shardings": None, "out_shardings": None, "static_argnums": (), "static_argnames": (),
            "donate_argnums": (), "donate_argnames": (), "keep_unused": True, "device": cpu, "backend": "cpu",
            "inline": True, "compiler_options": {"xla_cpu_enable_fast_math": False}}


def test_every_jit_keyword_reaches_jax_jit(monkeypatch):
    """Each keyword of inspect.signature(jax.jit) on the installed JAX is accepted and passed to jax.jit
    unchanged (one generic path); an unknown one is a TypeError naming both sets of options."""
    values = _jit_option_values()
    assert set(JIT_KEYWORDS) <= set(values), f"a new jax.jit keyword needs a test value: {set(JIT_KEYWORDS) - set(values)}"
    assert tuple(JIT_KEYWORDS) == api.JIT_OPTIONS
    received = []
    real_jit = jax.jit

    def recording_jit(fun, **kwargs):
        received.append(kwargs)
        return real_jit(fun, **kwargs)

    monkeypatch.setattr(jax, "jit", recording_jit)
    for name in JIT_KEYWORDS:
        if name in ("device", "backend"):
            continue  # deprecated together in jax; checked running below
        received.clear()

        def f(w, x):
            return loop(w, x)
        kvhoist.hoist_invariants(f, **{name: values[name]})
        assert received, name
        got = received[-1][name]
        assert got == values[name] or (got is None and values[name] == ()), (name, received[-1])
    monkeypatch.setattr(jax, "jit", real_jit)
    with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'.*compiler_options"):
        kvhoist.hoist_invariants(loop, bogus=1)


def test_jit_keywords_behave_as_under_jit():
    want = jax.jit(loop)(W, X)
    for kw in ({"inline": True}, {"keep_unused": True}, {"backend": "cpu"},
               {"compiler_options": {"xla_cpu_enable_fast_math": False}}):
        assert_close(kvhoist.hoist_invariants(loop, **kw)(W, X), want)
    # inline: an enclosing trace holds what it holds under jit (jax 0.10: the equations themselves, no
    # call; jax 0.12 keeps the call)
    for inline in (True, False):
        def top(wrap):
            return [e.primitive.name for e in jax.make_jaxpr(lambda w, x: wrap(loop, inline=inline)(w, x))(W, X).eqns]
        assert top(kvhoist.hoist_invariants)[-1:] == top(jax.jit)[-1:]
        assert ("scan" in top(kvhoist.hoist_invariants)) == ("scan" in top(jax.jit)), inline
    # compiler_options reach XLA: an unknown option fails as under jit
    with pytest.raises(Exception) as want_err:
        jax.jit(loop, compiler_options={"no_such_xla_option": True})(W, X)
    with pytest.raises(type(want_err.value)):
        kvhoist.hoist_invariants(loop, compiler_options={"no_such_xla_option": True})(W, X)


def test_copy_and_deepcopy_like_jit():
    traces = []

    def f(w, x):
        traces.append(1)
        return loop(w, x)

    hf = kvhoist.hoist_invariants(f, static_argnames=())
    want = hf(W, X)
    for c in (copy.copy(hf), copy.deepcopy(hf)):
        np.testing.assert_array_equal(c(W, X), want)
    assert len(traces) == 1  # copies share the trace
    assert copy.deepcopy(hf).report(W, X).hoisted
    jitted = jax.jit(f)
    jitted(W, X)
    copy.deepcopy(jitted)(W, X)
    assert len(traces) == 2  # as deepcopy(jax.jit(f)) shares jit's


# ------------------------------------------------------------------------------------------------------
# Recorded jaxprs: bounded, freed by clear_cache() and jax.clear_caches() (issue 20 item 8)
# ------------------------------------------------------------------------------------------------------


def _refs_to_record(hf, *args):
    before, after = hf.jaxprs(*args)
    return [weakref.ref(before), weakref.ref(after), weakref.ref(hf.report(*args))]


@pytest.mark.parametrize("clear", ["clear_cache", "jax.clear_caches"])
def test_clearing_frees_the_recorded_jaxprs(clear):
    def f(w, x):
        return loop(w, x)

    hf = kvhoist.hoist_invariants(f)
    refs = []
    for n in (1, 2, 3):
        x = jnp.ones((n, 4))
        hf(W, x)
        refs += _refs_to_record(hf, W, x)
    gc.collect()
    assert all(r() is not None for r in refs)
    hf.clear_cache() if clear == "clear_cache" else jax.clear_caches()
    gc.collect()
    assert [r() for r in refs] == [None] * len(refs)
    assert_close(hf(W, X), jax.jit(loop)(W, X))  # and it still works: traced again
    assert hf.report(W, X).hoisted


def test_records_are_bounded_like_a_cache(monkeypatch):
    monkeypatch.setattr(api, "MAX_RECORDS", 3)

    def f(w, x):
        return loop(w, x)

    hf = kvhoist.hoist_invariants(f)
    for n in range(1, 7):
        hf(W, jnp.ones((n, 4)))
    assert len(hf._twin.records) == 3
    # an evicted signature's report is traced again, correctly
    report = hf.report(W, jnp.ones((1, 4)))
    assert report.hoisted and report.hoisted[0].trip_count == 3


if __name__ == "__main__":
    print(json.dumps(run_sharding_checks()))
