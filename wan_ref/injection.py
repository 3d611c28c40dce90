"""The Wan block stack with something added after chosen blocks (VACE hints, Animate face adapters).

`WanModel._run_blocks` runs the main blocks as one `lax.scan` (stacked parameters) or unrolled. The VACE and
Animate transformers run the same blocks and, after some of them, add a term to the residual stream:

* VACE: after block `vace_layers[j]`, `x += hint_j * scale_j`;
* Animate: after every block `i` with `i % inject_face_latents_blocks == 0`, `x += face_adapter[i // k](x)`.

`run_blocks` keeps both layer forms. Unrolled, `after_block(i, x)` is called with the Python layer index. In
the scan, it is called with the traced layer index (an `iota` carried as a scanned input), so the injection
lives inside the one layer scan: weights stay stacked and are never sliced into segments (slicing the stacked
weights outside the scan would make a copy of every block's parameters).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

AfterBlock = Callable[[Any, jax.Array], jax.Array]


def cache_layer_kv(cache: Any, i: int) -> tuple[Any, Any, Any, Any]:
    """Layer `i`'s (text_k, text_v, image_k, image_v) from an unrolled `KVCache`."""
    return (cache.text_k[i], cache.text_v[i], None if cache.image_k is None else cache.image_k[i],
            None if cache.image_v is None else cache.image_v[i])


def run_blocks(model: Any, x: jax.Array, timestep_proj: jax.Array, rope: tuple[jax.Array, jax.Array],
               image_mask: jax.Array | None, *, context: tuple | None = None, cache: Any = None,
               after_block: AfterBlock) -> jax.Array:
    """`model.blocks` over `x` (as `WanModel._run_blocks`), calling `after_block(i, x)` after block i.

    Args:
      model: a `WanModel` (or subclass); `model.config.scan_layers` selects the form.
      x: tokens [B, N, D].
      timestep_proj, rope, image_mask: as for `WanTransformerBlock.__call__`.
      context: (text, image) embedded context, when `cache` is None.
      cache: a `KVCache` for the main blocks.
      after_block: `(i, x) -> x`; `i` is a Python int (unrolled) or a traced int32 scalar (scan).
    """
    with jax.named_scope("blocks"):
        if model.config.scan_layers:
            graphdef, state = nnx.split(model.blocks)
            layer_cache = None if cache is None else (cache.text_k, cache.text_v, cache.image_k, cache.image_v)
            index = jnp.arange(model.config.num_layers, dtype=jnp.int32)

            def layer(h, xs):
                with jax.named_scope("blocks"):
                    layer_state, kv, i = xs
                    block = nnx.merge(graphdef, layer_state)
                    if kv is None:
                        kv = block.cross_kv(*context)
                    h = block(h, timestep_proj, rope, kv, image_mask)
                return after_block(i, h), None

            return jax.lax.scan(layer, x, (state, layer_cache, index))[0]
        for i, block in enumerate(model.blocks):
            with jax.named_scope(str(i)):
                kv = block.cross_kv(*context) if cache is None else cache_layer_kv(cache, i)
                x = block(x, timestep_proj, rope, kv, image_mask)
            x = after_block(i, x)
        return x
