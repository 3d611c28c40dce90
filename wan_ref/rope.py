"""3D rotary position embedding of Wan (diffusers `WanRotaryPosEmbed` + `apply_rotary_emb`).

Each head dimension d is split into (t, h, w) parts with h = w = 2*(d//6) and t = d - 2h. Angles are
computed in float64 with numpy (as diffusers does) and only then rounded to float32, so the tables are
small trace-time constants of shape [positions, part/2] -- never one per token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

THETA = 10000.0


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """(t_dim, h_dim, w_dim) of a head of size `head_dim`, as diffusers splits it."""
    h = w = 2 * (head_dim // 6)
    return head_dim - h - w, h, w


def _axis_angles(dim: int, length: int) -> np.ndarray:
    """float64 angles [length, dim/2] of `get_1d_rotary_pos_embed(dim, ..., freqs_dtype=float64)`."""
    freqs = 1.0 / (THETA ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    return np.outer(np.arange(length, dtype=np.float64), freqs)


def rope_tables(head_dim: int, grid: tuple[int, int, int], max_seq_len: int) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables [F*H*W, head_dim/2] (float32) for a post-patch grid (F, H, W), token order f, h, w.

    Column j holds the angle of the pair (x[2j], x[2j+1]): the first t/2 columns rotate with the frame
    index, the next h/2 with the row, the last w/2 with the column.
    """
    if max(grid) > max_seq_len:
        raise ValueError(
            f"post-patch grid {grid} exceeds rope_max_seq_len={max_seq_len}; diffusers' RoPE table is that long")
    f, h, w = grid
    parts = []
    for (dim, length), shape in zip(zip(rope_split(head_dim), grid),
                                    ((f, 1, 1, -1), (1, h, 1, -1), (1, 1, w, -1))):
        angles = _axis_angles(dim, length)
        parts.append((np.cos(angles).astype(np.float32).reshape(shape),
                      np.sin(angles).astype(np.float32).reshape(shape)))
    cos = jnp.concatenate([jnp.broadcast_to(c, (f, h, w, c.shape[-1])) for c, _ in parts], axis=-1)
    sin = jnp.concatenate([jnp.broadcast_to(s, (f, h, w, s.shape[-1])) for _, s in parts], axis=-1)
    return cos.reshape(f * h * w, head_dim // 2), sin.reshape(f * h * w, head_dim // 2)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates interleaved pairs (x[2j], x[2j+1]) of x [B, N, heads, d] by the angles of row n.

    Computed in float32 (the tables are float32, so torch promotes) and cast back to x's dtype.
    """
    b, n, heads, d = x.shape
    pairs = x.astype(jnp.float32).reshape(b, n, heads, d // 2, 2)
    x1, x2 = pairs[..., 0], pairs[..., 1]
    cos = cos[None, :, None, :]
    sin = sin[None, :, None, :]
    out = jnp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
    return out.reshape(b, n, heads, d).astype(x.dtype)
