"""`WanModel`: diffusers' `WanTransformer3DModel` (0.42) in Flax NNX, number for number.

Module attributes mirror diffusers' module paths (`condition_embedder.text_embedder.linear_1`,
`blocks.attn2.to_k`, ...) and every submodule runs inside a `jax.named_scope` of the same name, so the
equations of a traced forward carry e.g. `blocks/attn2/to_k` in `source_info.name_stack`. Attention is
plain jnp (einsum + float32 softmax), so the cross-attention K/V projections are plain `dot_general`s on
the context -- the loop-invariant work that `kvhoist` hoists and that `compute_kv_cache` hand-caches.
With `config.attention="splash"` each attention is instead one `kvhoist.kernels.attention` equation (Pallas
splash attention); the projections around it are the same `dot_general`s.

dtype policy (diffusers `from_pretrained(torch_dtype=bf16)`): the parameters of `time_embedder`,
`scale_shift_table` and `norm1/2/3` stay float32; LayerNorms, the timestep sinusoid, RoPE, the modulation
arithmetic, residual adds around gated branches and the softmax run in float32; everything else runs in
`config.dtype`.

Deviations from diffusers, on purpose: embedded image tokens are zero-padded to a multiple of
`config.image_token_alignment` with the padding masked out (same output); FLF2V image embeddings may also be
given as [B, 514, C] (diffusers' [2B, 257, C] is accepted too); inputs are validated with `ValueError`s.
"""

from __future__ import annotations

import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from kvhoist import kernels
from wan_ref.config import WanConfig
from wan_ref.rope import apply_rope, rope_tables

F32 = jnp.float32
TEXT_CONTEXT_LENGTH = 512  # diffusers hard-codes the T5 context length when splitting image/text tokens.
IMAGE_TOKENS_PER_FRAME = 257  # CLIP ViT-H/14 penultimate layer: 256 patches + class token.


# --------------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------------
class KeyStream:
    """Fresh PRNG keys by `fold_in` on one key drawn from the user's `nnx.Rngs`.

    Drawing every parameter's key from `nnx.Rngs` costs ~40 ms per draw under `nnx.eval_shape` (flax updates
    a traced counter variable), i.e. ~30 s to build a 14B model abstractly; one draw plus fold_in is cheap.
    """

    def __init__(self, key: jax.Array):
        self.key = key
        self.count = 0

    def __call__(self) -> jax.Array:
        self.count += 1
        return jax.random.fold_in(self.key, self.count)


def _normal(keys: KeyStream, shape: tuple[int, ...], std: float, dtype: Any) -> jax.Array:
    # Drawn at a power-of-two length and reshaped: eager init then compiles the RNG for a handful of sizes
    # instead of once per parameter shape (seconds on CPU for a tiny model).
    size = math.prod(shape)
    draw = jax.random.normal(keys(), (1 << max(size - 1, 0).bit_length(),), F32)
    return (std * draw[:size].reshape(shape)).astype(dtype)


class Linear(nnx.Module):
    """`torch.nn.Linear` with the kernel stored [in, out] (diffusers' weight transposed); computes in `dtype`."""

    def __init__(self, in_features: int, out_features: int, *, keys: KeyStream, param_dtype: Any, dtype: Any):
        self.kernel = nnx.Param(_normal(keys, (in_features, out_features), in_features ** -0.5, param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype))
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        return x @ self.kernel[...].astype(self.dtype) + self.bias[...].astype(self.dtype)


class LayerNorm(nnx.Module):
    """diffusers `FP32LayerNorm`: normalises in float32, returns the input's dtype."""

    def __init__(self, dim: int, eps: float, *, affine: bool):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), F32)) if affine else None
        self.bias = nnx.Param(jnp.zeros((dim,), F32)) if affine else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = _layer_norm(x.astype(F32), self.eps)
        if self.scale is not None:
            y = y * self.scale[...].astype(F32) + self.bias[...].astype(F32)
        return y.astype(x.dtype)


def _layer_norm(x: jax.Array, eps: float) -> jax.Array:
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


class RMSNorm(nnx.Module):
    """`torch.nn.RMSNorm`: rsqrt(mean(x^2)+eps) in float32, cast back, then times the weight."""

    def __init__(self, dim: int, eps: float, *, param_dtype: Any):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(F32)
        y = (x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)).astype(x.dtype)
        return y * self.scale[...].astype(x.dtype)


class FeedForward(nnx.Module):
    """diffusers `FeedForward`: `net.0.proj` -> GELU -> `net.2` (tanh GELU in blocks, exact in the image embedder)."""

    def __init__(self, dim: int, inner: int, dim_out: int, *, approximate: bool, keys: KeyStream, param_dtype: Any,
                 dtype: Any):
        self.net_0_proj = Linear(dim, inner, keys=keys, param_dtype=param_dtype, dtype=dtype)
        self.net_2 = Linear(inner, dim_out, keys=keys, param_dtype=param_dtype, dtype=dtype)
        self.approximate = approximate

    def __call__(self, x: jax.Array) -> jax.Array:
        with jax.named_scope("net.0.proj"):
            x = jax.nn.gelu(self.net_0_proj(x), approximate=self.approximate)
        with jax.named_scope("net.2"):
            return self.net_2(x)


def _scoped(name: str, fn, *args):
    with jax.named_scope(name):
        return fn(*args)


# --------------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------------
def attention(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array | None = None) -> jax.Array:
    """softmax(q k^T / sqrt(d)) v over heads: q [B, N, H, d], k/v [B, S, H, d] -> [B, N, H*d] in q's dtype.

    Logits and softmax are float32. `key_mask` [S] (bool) drops keys where False from every query.
    """
    b, n, h, d = q.shape
    logits = jnp.einsum("bnhd,bshd->bhns", q, k, preferred_element_type=F32) * (1.0 / math.sqrt(d))
    if key_mask is not None:
        logits = jnp.where(key_mask, logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhns,bshd->bnhd", probs.astype(v.dtype), v, preferred_element_type=F32)
    return out.astype(q.dtype).reshape(b, n, h * d)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array | int | None, impl: str) -> jax.Array:
    """`attention` by `WanConfig.attention`: q [B, N, H, d], k/v [B, S, H, d] -> [B, N, H*d] in q's dtype.

    Args:
      q, k, v: as for `attention`.
      key_mask: "xla": a bool [S] key mask or None (exactly `attention`'s equations); "splash": the number
        of valid (leading) keys, or None for all -- see `WanModel._image_mask`.
      impl: "xla" or "splash" (`kvhoist.kernels.attention(..., impl="splash", kv_valid=key_mask)`).

    Returns:
      [B, N, H*d] in q's dtype.

    Raises:
      TypeError: a mask array given to "splash" (it takes the count of valid keys).

    Example:
      >>> out = attend(q, k, v, None, "splash")
    """
    if impl == "xla":
        return attention(q, k, v, key_mask)
    if key_mask is not None and not isinstance(key_mask, int):
        raise TypeError(f"splash attention masks keys by count: key_mask must be an int (valid keys) or None, got "
                        f"{type(key_mask).__name__}")
    out = kernels.attention(q, k, v, kv_valid=key_mask, impl=impl)
    return out.reshape(*out.shape[:2], -1)


class WanAttention(nnx.Module):
    """diffusers `WanAttention` + `WanAttnProcessor` (q/k RMSNorm across heads, optional image K/V branch)."""

    def __init__(self, cfg: WanConfig, *, added_kv_proj_dim: int | None, keys: KeyStream):
        d, pd, dt = cfg.inner_dim, cfg.param_dtype, cfg.dtype
        self.heads = cfg.num_attention_heads
        self.attention_impl = cfg.attention
        self.to_q = Linear(d, d, keys=keys, param_dtype=pd, dtype=dt)
        self.to_k = Linear(d, d, keys=keys, param_dtype=pd, dtype=dt)
        self.to_v = Linear(d, d, keys=keys, param_dtype=pd, dtype=dt)
        self.to_out = Linear(d, d, keys=keys, param_dtype=pd, dtype=dt)
        self.norm_q = RMSNorm(d, cfg.eps, param_dtype=pd)
        self.norm_k = RMSNorm(d, cfg.eps, param_dtype=pd)
        if added_kv_proj_dim is not None:
            self.add_k_proj = Linear(added_kv_proj_dim, d, keys=keys, param_dtype=pd, dtype=dt)
            self.add_v_proj = Linear(added_kv_proj_dim, d, keys=keys, param_dtype=pd, dtype=dt)
            self.norm_added_k = RMSNorm(d, cfg.eps, param_dtype=pd)
        else:
            self.add_k_proj = self.add_v_proj = self.norm_added_k = None

    def _heads(self, x: jax.Array) -> jax.Array:
        return x.reshape(*x.shape[:-1], self.heads, -1)

    def self_attention(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        q = _scoped("norm_q", self.norm_q, _scoped("to_q", self.to_q, x))
        k = _scoped("norm_k", self.norm_k, _scoped("to_k", self.to_k, x))
        v = _scoped("to_v", self.to_v, x)
        with jax.named_scope("rope"):
            q = apply_rope(self._heads(q), cos, sin)
            k = apply_rope(self._heads(k), cos, sin)
        out = attend(q, k, self._heads(v), None, self.attention_impl)
        return _scoped("to_out.0", self.to_out, out)

    def project_kv(self, text: jax.Array, image: jax.Array | None) -> tuple[jax.Array, ...]:
        """Cross-attention keys/values of the (embedded) context: (text_k, text_v, image_k, image_v).

        K is RMS-normalised (norm_k / norm_added_k) as diffusers does before splitting heads; these four
        arrays, per layer, are exactly what `KVCache` stores. image_k/v are None without an image branch.
        """
        text_k = _scoped("norm_k", self.norm_k, _scoped("to_k", self.to_k, text))
        text_v = _scoped("to_v", self.to_v, text)
        if image is None:
            return text_k, text_v, None, None
        image_k = _scoped("norm_added_k", self.norm_added_k, _scoped("add_k_proj", self.add_k_proj, image))
        image_v = _scoped("add_v_proj", self.add_v_proj, image)
        return text_k, text_v, image_k, image_v

    def cross_attention(self, x: jax.Array, kv: tuple[jax.Array, ...],
                        image_mask: jax.Array | int | None) -> jax.Array:
        text_k, text_v, image_k, image_v = kv
        q = self._heads(_scoped("norm_q", self.norm_q, _scoped("to_q", self.to_q, x)))
        out = attend(q, self._heads(text_k), self._heads(text_v), None, self.attention_impl)
        if image_k is not None:
            # diffusers attends the image tokens with the *normed* query and sums before to_out.
            with jax.named_scope("image_attention"):
                out = out + attend(q, self._heads(image_k), self._heads(image_v), image_mask, self.attention_impl)
        return _scoped("to_out.0", self.to_out, out)


# --------------------------------------------------------------------------------------------------------
# Block
# --------------------------------------------------------------------------------------------------------
class WanTransformerBlock(nnx.Module):
    """diffusers `WanTransformerBlock`: modulated self-attention, cross-attention, modulated FFN."""

    def __init__(self, cfg: WanConfig, *, keys: KeyStream):
        d = cfg.inner_dim
        self.eps = cfg.eps
        self.attn1 = WanAttention(cfg, added_kv_proj_dim=None, keys=keys)
        self.attn2 = WanAttention(cfg, added_kv_proj_dim=cfg.added_kv_proj_dim, keys=keys)
        self.norm2 = LayerNorm(d, cfg.eps, affine=True) if cfg.cross_attn_norm else None
        self.ffn = FeedForward(d, cfg.ffn_dim, d, approximate=True, keys=keys, param_dtype=cfg.param_dtype,
                               dtype=cfg.dtype)
        self.scale_shift_table = nnx.Param(_normal(keys, (1, 6, d), d ** -0.5, F32))

    def cross_kv(self, text: jax.Array, image: jax.Array | None) -> tuple[jax.Array, ...]:
        with jax.named_scope("attn2"):
            return self.attn2.project_kv(text, image)

    def __call__(self, x: jax.Array, timestep_proj: jax.Array, rope: tuple[jax.Array, jax.Array],
                 kv: tuple[jax.Array, ...], image_mask: jax.Array | int | None) -> jax.Array:
        """x [B, N, D]; timestep_proj [B, 1 or N, 6, D]; kv from `cross_kv` (computed or cached); image_mask
        from `WanModel._image_mask`."""
        mod = self.scale_shift_table[...].astype(F32)[None] + timestep_proj.astype(F32)
        shift, scale, gate, c_shift, c_scale, c_gate = (mod[:, :, i] for i in range(6))
        dtype = x.dtype

        with jax.named_scope("norm1"):
            h = (_layer_norm(x.astype(F32), self.eps) * (1 + scale) + shift).astype(dtype)
        with jax.named_scope("attn1"):
            h = self.attn1.self_attention(h, *rope)
        x = (x.astype(F32) + h * gate).astype(dtype)

        h = _scoped("norm2", self.norm2, x.astype(F32)).astype(dtype) if self.norm2 is not None else x
        with jax.named_scope("attn2"):
            h = self.attn2.cross_attention(h, kv, image_mask)
        x = x + h

        with jax.named_scope("norm3"):
            h = (_layer_norm(x.astype(F32), self.eps) * (1 + c_scale) + c_shift).astype(dtype)
        h = _scoped("ffn", self.ffn, h)
        return (x.astype(F32) + h.astype(F32) * c_gate).astype(dtype)


# --------------------------------------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------------------------------------
def timestep_sinusoid(t: jax.Array, dim: int) -> jax.Array:
    """diffusers `Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)`: [cos, sin], float32. t: [N]."""
    half = dim // 2
    exponent = (-math.log(10000.0) * jnp.arange(half, dtype=F32)) / half
    emb = t.astype(F32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.cos(emb), jnp.sin(emb)], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, 1))) if dim % 2 else emb


class PatchEmbedding(nnx.Module):
    """`nn.Conv3d(kernel=stride=patch)` as patchify + one matmul; kernel stored [kt, kh, kw, C_in, D]."""

    def __init__(self, cfg: WanConfig, *, keys: KeyStream):
        pt, ph, pw = cfg.patch_size
        fan_in = cfg.in_channels * pt * ph * pw
        self.kernel = nnx.Param(_normal(keys, (pt, ph, pw, cfg.in_channels, cfg.inner_dim), fan_in ** -0.5,
                                        cfg.param_dtype))
        self.bias = nnx.Param(jnp.zeros((cfg.inner_dim,), cfg.param_dtype))
        self.patch_size = cfg.patch_size
        self.dtype = cfg.dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, C, F, H, W] -> tokens [B, F'*H'*W', D] in (f, h, w) order, as conv + flatten(2).transpose(1, 2)."""
        b, c, f, h, w = x.shape
        pt, ph, pw = self.patch_size
        x = x.reshape(b, c, f // pt, pt, h // ph, ph, w // pw, pw)
        x = x.transpose(0, 2, 4, 6, 3, 5, 7, 1).reshape(b, (f // pt) * (h // ph) * (w // pw), pt * ph * pw * c)
        kernel = self.kernel[...].reshape(-1, self.kernel.shape[-1])
        return x.astype(self.dtype) @ kernel.astype(self.dtype) + self.bias[...].astype(self.dtype)


class TimestepEmbedding(nnx.Module):
    """diffusers `TimestepEmbedding`: linear_1 -> SiLU -> linear_2 (a float32 island)."""

    def __init__(self, freq_dim: int, dim: int, *, keys: KeyStream):
        self.linear_1 = Linear(freq_dim, dim, keys=keys, param_dtype=F32, dtype=F32)
        self.linear_2 = Linear(dim, dim, keys=keys, param_dtype=F32, dtype=F32)

    def __call__(self, x: jax.Array) -> jax.Array:
        return _scoped("linear_2", self.linear_2, jax.nn.silu(_scoped("linear_1", self.linear_1, x)))


class TextProjection(nnx.Module):
    """diffusers `PixArtAlphaTextProjection(act_fn="gelu_tanh")`."""

    def __init__(self, text_dim: int, dim: int, *, keys: KeyStream, param_dtype: Any, dtype: Any):
        self.linear_1 = Linear(text_dim, dim, keys=keys, param_dtype=param_dtype, dtype=dtype)
        self.linear_2 = Linear(dim, dim, keys=keys, param_dtype=param_dtype, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jax.nn.gelu(_scoped("linear_1", self.linear_1, x), approximate=True)
        return _scoped("linear_2", self.linear_2, x)


class WanImageEmbedding(nnx.Module):
    """diffusers `WanImageEmbedding`: [+pos_embed (FLF2V)] -> LayerNorm -> linear, exact GELU, linear -> LayerNorm."""

    def __init__(self, cfg: WanConfig, *, keys: KeyStream):
        c, d, pd, dt = cfg.image_dim, cfg.inner_dim, cfg.param_dtype, cfg.dtype
        self.norm1 = LayerNorm(c, 1e-5, affine=True)
        self.ff = FeedForward(c, c, d, approximate=False, keys=keys, param_dtype=pd, dtype=dt)
        self.norm2 = LayerNorm(d, 1e-5, affine=True)
        self.pos_embed = (nnx.Param(_normal(keys, (1, cfg.pos_embed_seq_len, c), 0.02, pd))
                          if cfg.pos_embed_seq_len is not None else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.pos_embed is not None:
            x = x + self.pos_embed[...].astype(x.dtype)
        x = _scoped("norm1", self.norm1, x)
        x = _scoped("ff", self.ff, x)
        return _scoped("norm2", self.norm2, x)


class WanTimeTextImageEmbedding(nnx.Module):
    """diffusers `WanTimeTextImageEmbedding` (`condition_embedder`)."""

    def __init__(self, cfg: WanConfig, *, keys: KeyStream):
        d, pd, dt = cfg.inner_dim, cfg.param_dtype, cfg.dtype
        self.freq_dim = cfg.freq_dim
        self.dtype = dt
        self.time_embedder = TimestepEmbedding(cfg.freq_dim, d, keys=keys)
        self.time_proj = Linear(d, 6 * d, keys=keys, param_dtype=pd, dtype=dt)
        self.text_embedder = TextProjection(cfg.text_dim, d, keys=keys, param_dtype=pd, dtype=dt)
        self.image_embedder = WanImageEmbedding(cfg, keys=keys) if cfg.image_dim is not None else None

    def time(self, timestep: jax.Array) -> tuple[jax.Array, jax.Array]:
        """timestep [B, T] (T = 1, or tokens for TI2V) -> temb [B, T, D] and timestep_proj [B, T, 6, D]."""
        b, t = timestep.shape
        with jax.named_scope("timesteps_proj"):
            sinusoid = timestep_sinusoid(timestep.reshape(-1), self.freq_dim).reshape(b, t, -1)
        # diffusers casts temb to the text-embedding dtype before time_proj.
        temb = _scoped("time_embedder", self.time_embedder, sinusoid).astype(self.dtype)
        timestep_proj = _scoped("time_proj", self.time_proj, jax.nn.silu(temb))
        return temb, timestep_proj.reshape(b, t, 6, -1)


# --------------------------------------------------------------------------------------------------------
# KV cache
# --------------------------------------------------------------------------------------------------------
@flax.struct.dataclass
class KVCache:
    """Hand-written cross-attention cache: every block's K/V of the embedded context, computed once.

    Each field is [num_layers, B, S, D] when the model scans its layers, else a tuple of per-layer [B, S, D].
    text_k / image_k are already RMS-normalised (norm_k / norm_added_k). image_k / image_v hold the image
    tokens zero-padded to `image_token_alignment` (S = padded length) and are None without an image branch;
    `image_len` (static) is the true number of image tokens, used to mask the padding.
    """

    text_k: Any
    text_v: Any
    image_k: Any = None
    image_v: Any = None
    image_len: int = flax.struct.field(pytree_node=False, default=0)


# --------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------
def _stack_modules(modules: list[nnx.Module]) -> nnx.Module:
    """One module whose parameters are the inputs' parameters stacked on a leading axis."""
    graphdef, _ = nnx.split(modules[0])
    states = [nnx.split(m)[1] for m in modules]
    return nnx.merge(graphdef, jax.tree.map(lambda *xs: jnp.stack(xs), *states))


class WanModel(nnx.Module):
    """diffusers `WanTransformer3DModel` (Wan 2.1 / 2.2 T2V, I2V, FLF2V, TI2V) in Flax NNX.

    Example:
      >>> model = WanModel(get_preset("tiny-t2v").config, rngs=nnx.Rngs(0))
      >>> out = model(latents, jnp.array([999.0]), text)   # [B, C, F, H, W] -> [B, out_channels, F, H, W]

    The module is a pytree: pass it as an argument to `jax.jit` / `jax.make_jaxpr` / a `lax.scan` body and
    its weights are traced inputs, not constants.
    """

    def __init__(self, config: WanConfig, *, rngs: nnx.Rngs):
        cfg = config
        d = cfg.inner_dim
        keys = KeyStream(rngs.params())
        self.config = cfg
        self.patch_embedding = PatchEmbedding(cfg, keys=keys)
        self.condition_embedder = WanTimeTextImageEmbedding(cfg, keys=keys)
        blocks = [WanTransformerBlock(cfg, keys=keys) for _ in range(cfg.num_layers)]
        self.blocks = _stack_modules(blocks) if cfg.scan_layers else nnx.List(blocks)
        self.proj_out = Linear(d, cfg.out_channels * math.prod(cfg.patch_size), keys=keys,
                               param_dtype=cfg.param_dtype, dtype=cfg.dtype)
        self.scale_shift_table = nnx.Param(_normal(keys, (1, 2, d), d ** -0.5, F32))

    # ---- public API ----------------------------------------------------------------------------------
    def __call__(self, hidden_states: jax.Array, timestep: jax.Array, encoder_hidden_states: jax.Array | None,
                 encoder_hidden_states_image: jax.Array | None = None, *,
                 kv_cache: KVCache | None = None) -> jax.Array:
        """Predicts the flow (velocity) for latents, as `WanTransformer3DModel.forward(...).sample`.

        Args:
          hidden_states: latents [B, in_channels, F, H, W] (I2V: noise, 4 mask channels and condition
            latents concatenated on C, as diffusers' pipelines do).
          timestep: [B] (or a scalar), or [B, F'*H'*W'] per-token timesteps (Wan 2.2 TI2V).
          encoder_hidden_states: text embeddings [B, S, text_dim]; exactly 512 tokens for models with an
            image branch. May be None when `kv_cache` is given (it is ignored then).
          encoder_hidden_states_image: CLIP image embeddings [B, 257, image_dim] (I2V), [B, 514, image_dim]
            or diffusers' [2B, 257, image_dim] (FLF2V); only for models with an image branch.
          kv_cache: from `compute_kv_cache`; skips the text/image embedders and the cross-attention K/V.

        Returns:
          [B, out_channels, F, H, W] in `config.dtype`.
        """
        cfg = self.config
        grid = self._check_latents(hidden_states)
        b = hidden_states.shape[0]
        timestep = self._check_timestep(timestep, b, math.prod(grid))
        rope = rope_tables(cfg.attention_head_dim, grid, cfg.rope_max_seq_len)

        x = _scoped("patch_embedding", self.patch_embedding, hidden_states.astype(cfg.dtype))
        with jax.named_scope("condition_embedder"):
            temb, timestep_proj = self.condition_embedder.time(timestep)

        if kv_cache is None:
            text, image = self._embed_context(encoder_hidden_states, encoder_hidden_states_image, b)
            image, image_mask = self._pad_image_tokens(image)
            x = self._run_blocks(x, timestep_proj, rope, image_mask, context=(text, image))
        else:
            self._check_cache(kv_cache, b)
            image_mask = None
            if kv_cache.image_k is not None:
                padded = (kv_cache.image_k if cfg.scan_layers else kv_cache.image_k[0]).shape[-2]
                image_mask = self._image_mask(padded, kv_cache.image_len)
            x = self._run_blocks(x, timestep_proj, rope, image_mask, cache=kv_cache)

        with jax.named_scope("norm_out"):
            mod = self.scale_shift_table[...].astype(F32)[None] + temb[:, :, None].astype(F32)
            shift, scale = mod[:, :, 0], mod[:, :, 1]
            x = (_layer_norm(x.astype(F32), cfg.eps) * (1 + scale) + shift).astype(x.dtype)
        x = _scoped("proj_out", self.proj_out, x)
        return self._unpatchify(x, hidden_states.shape, grid)

    def compute_kv_cache(self, encoder_hidden_states: jax.Array,
                         encoder_hidden_states_image: jax.Array | None = None) -> KVCache:
        """Runs the context embedders and every block's cross-attention K/V projections once.

        The result, passed as `kv_cache=` to `__call__`, gives the same output as passing the context.
        """
        b = encoder_hidden_states.shape[0]
        text, image = self._embed_context(encoder_hidden_states, encoder_hidden_states_image, b)
        image_len = 0 if image is None else image.shape[1]
        image, _ = self._pad_image_tokens(image)
        with jax.named_scope("blocks"):
            if self.config.scan_layers:
                graphdef, state = nnx.split(self.blocks)

                def layer_kv(carry, layer_state):
                    with jax.named_scope("blocks"):
                        return carry, nnx.merge(graphdef, layer_state).cross_kv(text, image)

                _, (tk, tv, ik, iv) = jax.lax.scan(layer_kv, None, state)
            else:
                per_layer = [_scoped(str(i), blk.cross_kv, text, image) for i, blk in enumerate(self.blocks)]
                tk, tv, ik, iv = (tuple(kv[j] for kv in per_layer) for j in range(4))
                if image is None:
                    ik = iv = None
        return KVCache(text_k=tk, text_v=tv, image_k=ik, image_v=iv, image_len=image_len)

    # ---- pieces ----------------------------------------------------------------------------------------
    def _run_blocks(self, x, timestep_proj, rope, image_mask, *, context=None, cache=None):
        """The block stack: one lax.scan over stacked parameters, or an unrolled loop."""
        with jax.named_scope("blocks"):
            if self.config.scan_layers:
                graphdef, state = nnx.split(self.blocks)
                layer_cache = None if cache is None else (cache.text_k, cache.text_v, cache.image_k, cache.image_v)

                def layer(h, xs):
                    # A scan body starts a fresh name stack; re-enter "blocks" so its equations read
                    # blocks/attn2/to_k like the unrolled ones (blocks/<i>/attn2/to_k).
                    with jax.named_scope("blocks"):
                        layer_state, kv = xs
                        block = nnx.merge(graphdef, layer_state)
                        if kv is None:
                            kv = block.cross_kv(*context)
                        return block(h, timestep_proj, rope, kv, image_mask), None

                return jax.lax.scan(layer, x, (state, layer_cache))[0]
            for i, block in enumerate(self.blocks):
                with jax.named_scope(str(i)):
                    if cache is None:
                        kv = block.cross_kv(*context)
                    else:
                        kv = (cache.text_k[i], cache.text_v[i],
                              None if cache.image_k is None else cache.image_k[i],
                              None if cache.image_v is None else cache.image_v[i])
                    x = block(x, timestep_proj, rope, kv, image_mask)
            return x

    def _embed_context(self, text, image, batch):
        """Validates and embeds the text (and image) context -> ([B, S, D], [B, S_img, D] or None)."""
        cfg = self.config
        if text is None:
            raise ValueError("encoder_hidden_states (text embeddings [B, S, text_dim]) is required without kv_cache")
        if text.ndim != 3 or text.shape[-1] != cfg.text_dim or text.shape[0] != batch:
            raise ValueError(f"encoder_hidden_states must be [B={batch}, S, text_dim={cfg.text_dim}], got "
                             f"{tuple(text.shape)}")
        if image is not None and not cfg.has_image_branch:
            raise ValueError(
                "encoder_hidden_states_image was given to a model without an image branch (image_dim=None: "
                "T2V, Wan 2.2 I2V/TI2V); drop it, or load an I2V/FLF2V checkpoint")
        if cfg.has_image_branch:
            if image is None:
                raise ValueError(
                    "this model has an image branch (Wan 2.1 I2V/FLF2V) and needs encoder_hidden_states_image "
                    f"(CLIP embeddings [B, 257, {cfg.image_dim}], or [B, 514, {cfg.image_dim}] for FLF2V)")
            if text.shape[1] != TEXT_CONTEXT_LENGTH:
                raise ValueError(
                    f"I2V/FLF2V text context must be exactly {TEXT_CONTEXT_LENGTH} tokens, got {text.shape[1]}: "
                    f"diffusers splits image/text at seq-{TEXT_CONTEXT_LENGTH}; pass the text embeddings zero-"
                    f"padded to {TEXT_CONTEXT_LENGTH} tokens, as the Wan pipelines do")
            image = self._check_image(image, batch)
        dt = cfg.dtype
        with jax.named_scope("condition_embedder"):
            text = _scoped("text_embedder", self.condition_embedder.text_embedder, text.astype(dt))
            if image is not None:
                image = _scoped("image_embedder", self.condition_embedder.image_embedder, image.astype(dt))
        return text, image

    def _check_image(self, image, batch):
        cfg = self.config
        if image.ndim != 3 or image.shape[-1] != cfg.image_dim:
            raise ValueError(f"encoder_hidden_states_image must be [B, tokens, image_dim={cfg.image_dim}], got "
                             f"{tuple(image.shape)}")
        want = cfg.pos_embed_seq_len
        if want is not None and image.shape[0] == 2 * batch and 2 * image.shape[1] == want:
            # diffusers' FLF2V layout: first/last frame embeddings as separate batch rows.
            image = image.reshape(batch, want, cfg.image_dim)
        if image.shape[0] != batch or (want is not None and image.shape[1] != want):
            expected = f"[{batch}, {want}, {cfg.image_dim}] (or [{2 * batch}, {want // 2}, {cfg.image_dim}])" \
                if want is not None else f"[{batch}, tokens, {cfg.image_dim}]"
            raise ValueError(f"encoder_hidden_states_image must be {expected}, got {tuple(image.shape)}")
        return image

    def _image_mask(self, padded: int, true_len: int) -> jax.Array | int | None:
        """The image-branch key mask: None without padding; else, for "xla" attention, iota < true length
        ([padded] bool), for "splash" the true length itself (the kernel's `kv_valid`)."""
        if padded == true_len:
            return None
        if self.config.attention == "splash":
            return true_len
        with jax.named_scope("image_token_mask"):
            return jnp.arange(padded) < true_len

    def _pad_image_tokens(self, image):
        """Zero-pads embedded image tokens to a multiple of `image_token_alignment`; returns (tokens, key mask).

        The mask (iota < true length) removes the padding from the image-branch softmax, so the output does
        not depend on the alignment; kvhoist's layout pass looks for this pad + mask pattern.
        """
        if image is None:
            return None, None
        true_len = image.shape[1]
        align = self.config.image_token_alignment
        padded = -(-true_len // align) * align
        if padded != true_len:
            with jax.named_scope("image_token_pad"):
                # lax.pad (what jnp.pad lowers to) so the jaxpr shows one top-level `pad` equation, not a
                # pad nested in jnp.pad's jit wrapper.
                widths = ((0, 0, 0), (0, padded - true_len, 0), (0, 0, 0))
                image = jax.lax.pad(image, jnp.zeros((), image.dtype), widths)
        return image, self._image_mask(padded, true_len)

    def _check_latents(self, x) -> tuple[int, int, int]:
        cfg = self.config
        if x.ndim != 5:
            raise ValueError(f"hidden_states must be latents [B, C, F, H, W], got shape {tuple(x.shape)}")
        if x.shape[1] != cfg.in_channels:
            hint = ""
            if cfg.in_channels > cfg.out_channels:
                hint = (f"; this is an image-conditioned model: concatenate noise latents ({cfg.out_channels}), "
                        f"the 4 mask channels and the condition latents on the channel axis")
            raise ValueError(f"hidden_states has {x.shape[1]} channels, the model expects in_channels="
                             f"{cfg.in_channels}{hint}")
        spatial = tuple(x.shape[2:])
        if any(s % p for s, p in zip(spatial, cfg.patch_size)):
            raise ValueError(f"latent (F, H, W)={spatial} must be divisible by patch_size={cfg.patch_size}; "
                             "crop or pad the latents (or pick a video size that maps to such latents)")
        return tuple(s // p for s, p in zip(spatial, cfg.patch_size))

    def _check_timestep(self, timestep, batch, tokens) -> jax.Array:
        """-> [B, 1] or [B, tokens] (TI2V per-token)."""
        timestep = jnp.asarray(timestep)
        if timestep.ndim == 0:
            return jnp.broadcast_to(timestep, (batch, 1))
        if timestep.ndim == 1 and timestep.shape[0] == batch:
            return timestep[:, None]
        if timestep.ndim == 2 and timestep.shape == (batch, tokens):
            return timestep
        raise ValueError(f"timestep must be a scalar, [B={batch}] or per-token [B, tokens={tokens}], got shape "
                         f"{tuple(timestep.shape)}")

    def _check_cache(self, cache: KVCache, batch: int) -> None:
        cfg = self.config
        stacked = not isinstance(cache.text_k, (tuple, list))
        if stacked != cfg.scan_layers:
            raise ValueError("kv_cache was built by a model with a different scan_layers setting; rebuild it "
                             "with this model's compute_kv_cache")
        if (cache.image_k is not None) != cfg.has_image_branch:
            raise ValueError("kv_cache image K/V do not match this model's image branch; rebuild it with this "
                             "model's compute_kv_cache")
        first = cache.text_k if stacked else cache.text_k[0]
        if first.shape[-3] != batch:
            raise ValueError(f"kv_cache was built for batch {first.shape[-3]}, latents have batch {batch}")

    def _unpatchify(self, x, shape, grid):
        b, _, f, h, w = shape
        pt, ph, pw = self.config.patch_size
        x = x.reshape(b, *grid, pt, ph, pw, -1)
        x = x.transpose(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(b, -1, f, h, w)
