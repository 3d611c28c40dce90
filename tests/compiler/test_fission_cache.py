"""The smallest cache under fission (issue 20 items 5 and 7): a layer scan inside a step loop.

* K and K.T of one projection are stacked once: the fissioned scan returns K, the remaining layer scan transposes
  its slice (the flat-loop ``views`` rewrite of kvhoist.passes.shrink, under fission); the report charges the
  projection once, so its share never exceeds 100%.
* ``fission="vmap"`` falls back to the scan form, with a note, when vectorising over all layers would create an
  intermediate larger than the cache it computes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax import lax

import kvhoist
from kvhoist import compat, contract
from kvhoist.ir import aval_bytes

L, S, D, H, T = 4, 32, 16, 128, 5


def _layers(layer):
    def f(ctx, w, x):
        def step(h, _):
            return lax.scan(lambda h, wl: layer(ctx, h, wl), h, w)[0], None
        return lax.scan(step, x, None, length=T)[0]
    return f


def _args(*w_shapes):
    ks = jax.random.split(jax.random.key(11), 2 + len(w_shapes))
    ws = tuple(jax.random.normal(k, s) / s[-2] ** 0.5 for k, s in zip(ks[2:], w_shapes))
    return jax.random.normal(ks[0], (S, D)), ws if len(ws) > 1 else ws[0], jax.random.normal(ks[1], (3, D))


@pytest.mark.parametrize("fission", ["scan", "vmap"])
def test_k_and_its_transpose_are_stacked_once(fission):
    def layer(ctx, h, wl):
        k = ctx @ wl
        return h + jnp.tanh(h @ k.T) @ k * 0.01, None

    f = _layers(layer)
    args = _args((L, D, D))
    hf = kvhoist.hoist_invariants(f, fission=fission)
    report = hf.report(*args)
    assert report.cache_bytes == L * S * D * 4, report.table()      # K once, not K and K.T
    assert [h.shape for h in report.hoisted] == [(L, S, D)]
    assert 0 < report.flops_saved_fraction <= 1, report.summary()
    contract.assert_close(hf(*args), jax.jit(f)(*args))


def test_values_sharing_a_projection_charge_it_once():
    """tanh(k) and exp(k) are two cached values of one per-layer matmul: the report counts the matmul once."""
    def layer(ctx, h, wl):
        k = ctx @ wl
        return h + jnp.tanh(h @ jnp.tanh(k).T) @ jnp.exp(k * 0.1) * 0.01, None

    f = _layers(layer)
    args = _args((L, D, D))
    report = kvhoist.hoist_invariants(f).report(*args)
    assert len(report.hoisted) == 2
    matmul = 2 * S * D * D * L * (T - 1)          # every layer's projection, saved in T - 1 of T steps
    assert report.flops_saved < 2 * matmul, report.table()
    assert 0 < report.flops_saved_fraction <= 1, report.summary()


def test_vmap_fission_falls_back_to_a_scan_when_an_intermediate_outgrows_the_cache():
    def layer(ctx, h, w):
        wi, wo = w
        k = jax.nn.gelu(ctx @ wi) @ wo                # a wide [S, H] intermediate per layer; K is [S, D]
        return h + jnp.tanh(h @ k.T) @ k * 0.01, None

    f = _layers(layer)
    args = _args((L, D, H), (L, H, D))
    hf = kvhoist.hoist_invariants(f, fission="vmap")
    report = hf.report(*args)
    assert report.cache_bytes == L * S * D * 4, report.table()
    _before, after = hf.jaxprs(*args)
    top = compat.split_closed(after)[4]
    widest = max(aval_bytes(v.aval) for e in top for v in e.outvars)
    assert widest <= L * S * D * 4, [(e.primitive.name, [v.aval for v in e.outvars]) for e in top]
    assert [e.primitive.name for e in top] == ["scan", "scan"]    # the fissioned scan, then the step loop
    assert any("fell back to a scan" in n.message for n in report.notes), report.notes
    contract.assert_close(hf(*args), jax.jit(f)(*args))


def test_vmap_fission_is_kept_when_it_fits():
    """The plain K projection vectorises: one matmul over all layers, no note."""
    def layer(ctx, h, wl):
        k = ctx @ wl
        return h + jnp.tanh(h @ k.T) @ k * 0.01, None

    f = _layers(layer)
    args = _args((L, D, D))
    hf = kvhoist.hoist_invariants(f, fission="vmap")
    report = hf.report(*args)
    _before, after = hf.jaxprs(*args)
    assert "dot_general" in [e.primitive.name for e in compat.split_closed(after)[4]]
    assert not any("fell back" in n.message for n in report.notes)
