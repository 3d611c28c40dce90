"""A user's sampler for the CLI tests: `kvhoist diff cli_user_module:make_sampler`.

`make_sampler()` returns `(fun, args, kwargs)`: a step loop whose body projects a fixed context to
keys and values (named `attn2/to_k` / `attn2/to_v`) every step - the work kvhoist hoists.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sampler(wq, wk, wv, context, x, *, steps):
    def step(h, _):
        q = h @ wq
        with jax.named_scope("attn2/to_k"):
            k = context @ wk
        with jax.named_scope("attn2/to_v"):
            v = context @ wv
        attn = jax.nn.softmax(q @ k.T / jnp.sqrt(q.shape[-1]), axis=-1)
        return h + 0.1 * (attn @ v), None

    h, _ = jax.lax.scan(step, x, length=steps)
    return h


def make_sampler():
    d, s, n = 16, 64, 8
    f32 = jnp.float32
    args = (jax.ShapeDtypeStruct((d, d), f32), jax.ShapeDtypeStruct((d, d), f32), jax.ShapeDtypeStruct((d, d), f32),
            jax.ShapeDtypeStruct((s, d), f32), jax.ShapeDtypeStruct((n, d), f32))
    return sampler, args, {"steps": 6}


def make_concrete():
    """Concrete arrays work too."""
    key = jax.random.split(jax.random.key(0), 5)
    args = tuple(jax.random.normal(k, shp) for k, shp in zip(key, [(16, 16)] * 3 + [(64, 16), (8, 16)]))
    return sampler, args, {"steps": 3}


def not_a_triple():
    return sampler


def raises():
    raise RuntimeError("no weights here")
