"""`WanAnimateModel`: diffusers' `WanAnimateTransformer3DModel` (Wan 2.2 Animate, 0.42) in Flax NNX.

A Wan 2.1 I2V transformer (CLIP image branch, in_channels = 2z + 4) plus three conditioning paths:

* pose: `pose_patch_embedding(pose_hidden_states)` ([B, z, F - 1, H, W] pose-video latents) is added to the
  patch-embedded latents of frames 1..F-1 (frame 0 is the reference image);
* face: the face video in pixels (`face_pixel_values` [B, 3, S, 512, 512], S = 77 per segment) goes through
  the motion encoder (a StyleGAN-like conv net per frame, `motion_encode_batch_size` frames at a time, then
  a linear motion decomposition with a QR of `motion_synthesis_weight`) and the face encoder (causal
  Conv1d over time, stride 2 twice) -> motion tokens [B, T, heads + 1, D] with T = latent frames;
* face adapters: after every block i with `i % inject_face_latents_blocks == 0`, the tokens of latent
  frame t cross-attend to the motion tokens of frame t (`face_adapter[i // k]`) and the result is added.

Everything on pose / face / image / text inputs is invariant across denoising steps: the pose embedding, the
whole motion + face encoder, every face adapter's K/V, the CLIP image and text K/V. `compute_kv_cache`
hand-caches all of it (`AnimateCache`); kvhoist hoists it from the plain forward.

Layout: motion-encoder convolutions keep torch's `weight` layout ([out, in, kh, kw], Conv1d [out, in, k]) and
the name `weight`, so checkpoints load without transposes; `nn.Linear`s are wan_ref `Linear`s (kernel
[in, out]). With `scan_layers` the face adapters are stacked like the blocks (`face_adapter.<param>` [n, ...]).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from wan_ref.config import WanConfig
from wan_ref.injection import run_blocks
from wan_ref.model import (F32, KVCache, KeyStream, Linear, PatchEmbedding, RMSNorm, WanModel, _layer_norm,
                           _normal, _scoped, _stack_modules, attend)
from wan_ref.rope import rope_tables

DIFFUSERS_CLASS = "WanAnimateTransformer3DModel"
# diffusers WAN_ANIMATE_MOTION_ENCODER_CHANNEL_SIZES (feature-map size -> channels).
DEFAULT_MOTION_CHANNELS = {"4": 512, "8": 512, "16": 512, "32": 512, "64": 256, "128": 128, "256": 64, "512": 32,
                           "1024": 16}
BLUR_KERNEL = (1, 3, 3, 1)


@dataclasses.dataclass(frozen=True)
class WanAnimateConfig(WanConfig):
    """`WanConfig` plus diffusers' Wan Animate fields (same names as `WanAnimateTransformer3DModel.__init__`).

    Attributes:
      latent_channels: z (16); in_channels must be 2z + 4.
      motion_encoder_channel_sizes: feature-map size (str) -> channels; None = diffusers' table.
      motion_encoder_size: face image size (512); a power of two >= 8.
      motion_style_dim, motion_dim, motion_encoder_dim: motion encoder widths (512, 20, 512).
      face_encoder_hidden_dim, face_encoder_num_heads: face encoder (1024, 4).
      inject_face_latents_blocks: a face adapter after every block i with i % this == 0 (5).
      motion_encoder_batch_size: face frames per motion-encoder call (8).
    """

    in_channels: int = 36
    image_dim: int | None = 1280
    added_kv_proj_dim: int | None = 5120
    latent_channels: int = 16
    motion_encoder_channel_sizes: Any = None
    motion_encoder_size: int = 512
    motion_style_dim: int = 512
    motion_dim: int = 20
    motion_encoder_dim: int = 512
    face_encoder_hidden_dim: int = 1024
    face_encoder_num_heads: int = 4
    inject_face_latents_blocks: int = 5
    motion_encoder_batch_size: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.motion_encoder_channel_sizes is not None:
            object.__setattr__(self, "motion_encoder_channel_sizes", tuple(sorted(
                (str(k), int(v)) for k, v in dict(self.motion_encoder_channel_sizes).items())))
        if self.in_channels != 2 * self.latent_channels + 4:
            raise ValueError(f"in_channels={self.in_channels} must be 2 * latent_channels + 4 = "
                             f"{2 * self.latent_channels + 4} (noise, 4 mask channels, reference latents)")
        if not self.has_image_branch:
            raise ValueError("wan_ref's Wan Animate needs the CLIP image branch (image_dim and added_kv_proj_dim "
                             "set, 1280 / 5120 in the released checkpoint)")
        size = self.motion_encoder_size
        if size < 8 or size & (size - 1):
            raise ValueError(f"motion_encoder_size must be a power of two >= 8, got {size}")
        missing = [str(2 ** i) for i in range(2, int(math.log2(size)) + 1) if str(2 ** i) not in self.motion_channels]
        if missing:
            raise ValueError(f"motion_encoder_channel_sizes lacks feature-map sizes {missing}")
        k = self.inject_face_latents_blocks
        if k < 1 or self.num_layers % k:
            raise ValueError(f"num_layers={self.num_layers} must be a multiple of inject_face_latents_blocks={k} "
                             "(diffusers indexes face_adapter[i // k] for every i % k == 0)")
        if self.motion_encoder_batch_size < 1:
            raise ValueError(f"motion_encoder_batch_size must be >= 1, got {self.motion_encoder_batch_size}")

    @classmethod
    def from_diffusers(cls, config: Any, **overrides: Any) -> "WanAnimateConfig":
        """As `WanConfig.from_diffusers`, with diffusers' Animate defaults: in_channels = 2 * latent_channels
        + 4 when missing, out_channels = latent_channels when missing."""
        config = dict(config)
        latent = config.get("latent_channels", cls.latent_channels)
        if config.get("in_channels") is None:
            config["in_channels"] = 2 * latent + 4
        if config.get("out_channels") is None:
            config["out_channels"] = latent
        return super().from_diffusers(config, **overrides)

    @property
    def motion_channels(self) -> dict[str, int]:
        """The channel table as a dict (diffusers' default when `motion_encoder_channel_sizes` is None)."""
        if self.motion_encoder_channel_sizes is None:
            return dict(DEFAULT_MOTION_CHANNELS)
        return dict(self.motion_encoder_channel_sizes)

    @property
    def num_face_adapters(self) -> int:
        return self.num_layers // self.inject_face_latents_blocks

    def to_diffusers(self) -> dict[str, Any]:
        out = super().to_diffusers()
        if self.motion_encoder_channel_sizes is not None:
            out["motion_encoder_channel_sizes"] = dict(self.motion_encoder_channel_sizes)
        return out


# --------------------------------------------------------------------------------------------------------
# Motion encoder (torch layouts, name `weight`)
# --------------------------------------------------------------------------------------------------------
def _conv(x: jax.Array, w: jax.Array, stride: int, padding: tuple[tuple[int, int], ...], groups: int = 1):
    spec = ("NCHW", "OIHW", "NCHW") if x.ndim == 4 else ("NCH", "OIH", "NCH")
    return jax.lax.conv_general_dilated(x, w, (stride,) * (x.ndim - 2), padding, dimension_numbers=spec,
                                        feature_group_count=groups)


class FusedLeakyReLU(nnx.Module):
    """`leaky_relu(x + bias, 0.2) * sqrt(2)` with a per-channel bias (`act_fn.bias`)."""

    def __init__(self, channels: int, *, param_dtype: Any):
        self.bias = nnx.Param(jnp.zeros((channels,), param_dtype))

    def __call__(self, x: jax.Array, channel_axis: int = 1) -> jax.Array:
        shape = [1] * x.ndim
        shape[channel_axis] = -1
        x = x + self.bias[...].astype(x.dtype).reshape(shape)
        return jax.nn.leaky_relu(x, 0.2) * math.sqrt(2.0)


class MotionConv2d(nnx.Module):
    """diffusers `MotionConv2d`: optional FIR blur (depthwise), scaled conv, bias or fused leaky ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int, *, stride: int = 1, padding: int = 0, bias: bool = True,
                 blur: bool = False, activation: bool = True, keys: KeyStream, param_dtype: Any, dtype: Any):
        self.weight = nnx.Param(_normal(keys, (cout, cin, kernel, kernel), 1.0, param_dtype))
        self.scale = 1.0 / math.sqrt(cin * kernel ** 2)
        self.stride, self.padding, self.cin, self.dtype = stride, padding, cin, dtype
        self.blur_padding = None
        if blur:
            p = (len(BLUR_KERNEL) - stride) + (kernel - 1)
            # torch's conv2d `padding=(a, b)` pads H by a and W by b on both sides.
            self.blur_padding = ((p + 1) // 2, p // 2)
        self.bias = nnx.Param(jnp.zeros((cout,), param_dtype)) if bias and not activation else None
        self.act_fn = FusedLeakyReLU(cout, param_dtype=param_dtype) if activation else None

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.blur_padding is not None:
            k = np.asarray(BLUR_KERNEL, np.float32)
            k = np.outer(k, k)
            k = k / k.sum()
            kernel = jnp.asarray(np.broadcast_to(k, (self.cin, 1, *k.shape)), x.dtype)
            ph, pw = self.blur_padding
            x = _conv(x, kernel, 1, ((ph, ph), (pw, pw)), groups=self.cin)
        x = x.astype(self.dtype)
        w = self.weight[...].astype(self.dtype) * self.scale
        x = _conv(x, w, self.stride, ((self.padding, self.padding),) * 2)
        if self.bias is not None:
            x = x + self.bias[...].astype(x.dtype)[:, None, None]
        return self.act_fn(x) if self.act_fn is not None else x


class MotionLinear(nnx.Module):
    """diffusers `MotionLinear` (no activation in Wan Animate): `x @ (weight * scale).T + bias`."""

    def __init__(self, din: int, dout: int, *, keys: KeyStream, param_dtype: Any, dtype: Any):
        self.weight = nnx.Param(_normal(keys, (dout, din), 1.0, param_dtype))
        self.bias = nnx.Param(jnp.zeros((dout,), param_dtype))
        self.scale = 1.0 / math.sqrt(din)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.weight[...].astype(self.dtype) * self.scale
        return x.astype(self.dtype) @ w.T + self.bias[...].astype(self.dtype)


class MotionEncoderResBlock(nnx.Module):
    """conv1 (3x3) -> conv2 (blur + 3x3 stride 2), skip: blur + 1x1 stride 2; `(out + skip) / sqrt(2)`."""

    def __init__(self, cin: int, cout: int, **kw):
        self.conv1 = MotionConv2d(cin, cin, 3, padding=1, **kw)
        self.conv2 = MotionConv2d(cin, cout, 3, stride=2, blur=True, **kw)
        self.conv_skip = MotionConv2d(cin, cout, 1, stride=2, bias=False, blur=True, activation=False, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        out = _scoped("conv2", self.conv2, _scoped("conv1", self.conv1, x))
        return (out + _scoped("conv_skip", self.conv_skip, x)) / math.sqrt(2.0)


class WanAnimateMotionEncoder(nnx.Module):
    """diffusers `WanAnimateMotionEncoder`: face frames [N, 3, size, size] -> motion vectors [N, out_dim]."""

    def __init__(self, cfg: WanAnimateConfig, *, keys: KeyStream):
        ch, size = cfg.motion_channels, cfg.motion_encoder_size
        kw = dict(keys=keys, param_dtype=cfg.param_dtype, dtype=cfg.dtype)
        self.size = size
        self.conv_in = MotionConv2d(3, ch[str(size)], 1, **kw)
        blocks, cin = [], ch[str(size)]
        for i in range(int(math.log2(size)), 2, -1):
            blocks.append(MotionEncoderResBlock(cin, ch[str(2 ** (i - 1))], **kw))
            cin = ch[str(2 ** (i - 1))]
        self.res_blocks = nnx.List(blocks)
        self.conv_out = MotionConv2d(cin, cfg.motion_style_dim, 4, bias=False, activation=False, **kw)
        dims = [cfg.motion_style_dim] * 5 + [cfg.motion_dim]  # motion_blocks = 5 linears
        self.motion_network = nnx.List([MotionLinear(a, b, **kw) for a, b in zip(dims[:-1], dims[1:])])
        self.motion_synthesis_weight = nnx.Param(_normal(keys, (cfg.motion_encoder_dim, cfg.motion_dim), 1.0, F32))

    def __call__(self, face: jax.Array) -> jax.Array:
        x = _scoped("conv_in", self.conv_in, face)
        for i, block in enumerate(self.res_blocks):
            x = _scoped(f"res_blocks/{i}", block, x)
        feat = _scoped("conv_out", self.conv_out, x)[:, :, 0, 0]
        for i, linear in enumerate(self.motion_network):
            feat = _scoped(f"motion_network/{i}", linear, feat)
        with jax.named_scope("motion_synthesis"):
            # Linear motion decomposition: sum_m feat[:, m] * Q[:, m], Q from a float32 QR of the weight.
            q = jnp.linalg.qr(self.motion_synthesis_weight[...].astype(F32) + 1e-8)[0]
            vec = jnp.einsum("nm,om->no", feat.astype(F32), q)
        return vec.astype(feat.dtype)


class Conv1d(nnx.Module):
    """`torch.nn.Conv1d(k=3)` with torch's `weight` layout [out, in, k] and `bias`."""

    def __init__(self, cin: int, cout: int, *, keys: KeyStream, param_dtype: Any):
        self.weight = nnx.Param(_normal(keys, (cout, cin, 3), (3 * cin) ** -0.5, param_dtype))
        self.bias = nnx.Param(jnp.zeros((cout,), param_dtype))

    def __call__(self, x: jax.Array, stride: int, dtype: Any) -> jax.Array:
        return _conv(x, self.weight[...].astype(dtype), stride, ((0, 0),)) + self.bias[...].astype(dtype)[:, None]


def _scoped_conv(encoder: "WanAnimateFaceEncoder", x: jax.Array, name: str, stride: int) -> jax.Array:
    with jax.named_scope(name):
        return encoder._causal_conv(x, getattr(encoder, name), stride)


class WanAnimateFaceEncoder(nnx.Module):
    """diffusers `WanAnimateFaceEncoder`: motion vectors [B, S, C] -> motion tokens [B, T, heads + 1, D]."""

    def __init__(self, cfg: WanAnimateConfig, *, keys: KeyStream):
        hid, heads, pd = cfg.face_encoder_hidden_dim, cfg.face_encoder_num_heads, cfg.param_dtype
        self.heads, self.dtype, self.eps = heads, cfg.dtype, 1e-6

        self.conv1_local = Conv1d(cfg.motion_encoder_dim, hid * heads, keys=keys, param_dtype=pd)
        self.conv2 = Conv1d(hid, hid, keys=keys, param_dtype=pd)
        self.conv3 = Conv1d(hid, hid, keys=keys, param_dtype=pd)
        self.out_proj = Linear(hid, cfg.inner_dim, keys=keys, param_dtype=pd, dtype=cfg.dtype)
        self.padding_tokens = nnx.Param(jnp.zeros((1, 1, 1, cfg.inner_dim), pd))

    def _causal_conv(self, x: jax.Array, conv: "Conv1d", stride: int) -> jax.Array:
        """x [N, C, T]: replicate-pad 2 frames on the left, Conv1d(k=3, stride)."""
        x = jnp.pad(x, ((0, 0), (0, 0), (2, 0)), mode="edge")
        return conv(x, stride, self.dtype)

    def _norm_act(self, x: jax.Array) -> jax.Array:
        """[N, C, T] -> LayerNorm over C (no affine) + SiLU, returned as [N, T, C]."""
        x = jnp.swapaxes(x, 1, 2)
        return jax.nn.silu(_layer_norm(x.astype(F32), self.eps).astype(x.dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        b = x.shape[0]
        x = jnp.swapaxes(x.astype(self.dtype), 1, 2)  # [B, C, S]
        x = _scoped_conv(self, x, 'conv1_local', 1)  # [B, heads*hid, S]
        x = x.reshape(b * self.heads, -1, x.shape[-1])  # unflatten(1, (heads, -1)).flatten(0, 1)
        x = self._norm_act(x)
        x = self._norm_act(_scoped_conv(self, jnp.swapaxes(x, 1, 2), 'conv2', 2))
        x = self._norm_act(_scoped_conv(self, jnp.swapaxes(x, 1, 2), 'conv3', 2))
        x = _scoped("out_proj", self.out_proj, x)  # [B*heads, T, D]
        x = x.reshape(b, self.heads, *x.shape[1:]).transpose(0, 2, 1, 3)  # [B, T, heads, D]
        pad = jnp.broadcast_to(self.padding_tokens[...].astype(x.dtype), (b, x.shape[1], 1, x.shape[-1]))
        return jnp.concatenate([x, pad], axis=2)


# --------------------------------------------------------------------------------------------------------
# Face adapter
# --------------------------------------------------------------------------------------------------------
class FaceAdapter(nnx.Module):
    """diffusers `WanAnimateFaceBlockCrossAttention`: frame-aligned cross-attention to the motion tokens."""

    def __init__(self, cfg: WanConfig, *, keys: KeyStream):
        d, pd, dt, hd = cfg.inner_dim, cfg.param_dtype, cfg.dtype, cfg.attention_head_dim
        self.heads, self.eps = cfg.num_attention_heads, cfg.eps
        self.attention_impl = cfg.attention
        self.to_q = Linear(d, d, keys=keys, param_dtype=pd, dtype=dt)
        self.to_k = Linear(d, d, keys=keys, param_dtype=pd, dtype=dt)
        self.to_v = Linear(d, d, keys=keys, param_dtype=pd, dtype=dt)
        self.to_out = Linear(d, d, keys=keys, param_dtype=pd, dtype=dt)
        self.norm_q = RMSNorm(hd, cfg.eps, param_dtype=pd)
        self.norm_k = RMSNorm(hd, cfg.eps, param_dtype=pd)

    def project_kv(self, motion: jax.Array) -> tuple[jax.Array, jax.Array]:
        """motion tokens [B, T, N, D] -> K (pre-norm, to_k, per-head RMSNorm), V: [B*T, N, heads, d] each."""
        b, t, n, d = motion.shape
        kv = _layer_norm(motion.astype(F32), self.eps).astype(motion.dtype).reshape(b, t * n, d)  # pre_norm_kv
        k = _scoped("to_k", self.to_k, kv).reshape(b * t, n, self.heads, -1)
        v = _scoped("to_v", self.to_v, kv).reshape(b * t, n, self.heads, -1)
        return _scoped("norm_k", self.norm_k, k), v

    def __call__(self, x: jax.Array, kv: tuple[jax.Array, jax.Array]) -> jax.Array:
        """x [B, S, D]; kv from `project_kv` (T frames): each frame's S/T tokens attend to its N tokens."""
        k, v = kv
        b, s, d = x.shape
        t = k.shape[0] // b
        q = _layer_norm(x.astype(F32), self.eps).astype(x.dtype)  # pre_norm_q
        q = _scoped("to_q", self.to_q, q).reshape(b, s, self.heads, -1)
        q = _scoped("norm_q", self.norm_q, q).reshape(b * t, s // t, self.heads, -1)
        out = attend(q, k, v, None, self.attention_impl).reshape(b, s, d)
        return _scoped("to_out", self.to_out, out)


@flax.struct.dataclass
class AnimateCache:
    """Everything an Animate forward computes from step-invariant inputs.

    Attributes:
      kv: the blocks' `KVCache` (text and CLIP-image K/V).
      pose: `pose_patch_embedding(pose_hidden_states)` tokens [B, (F-1)*H'*W', D].
      face_k, face_v: every face adapter's K/V of the motion tokens, [n, B*T, N, heads, d] (`scan_layers`) or
        tuples of [B*T, N, heads, d].
    """

    kv: KVCache
    pose: jax.Array
    face_k: Any
    face_v: Any


class WanAnimateModel(WanModel):
    """diffusers `WanAnimateTransformer3DModel` (Wan 2.2 Animate 14B) in Flax NNX.

    Example:
      >>> model = WanAnimateModel(get_preset("tiny-animate").config, rngs=nnx.Rngs(0))
      >>> out = model(latents, t, text, clip, pose_hidden_states=pose, face_pixel_values=face)
    """

    diffusers_class_name = DIFFUSERS_CLASS

    def __init__(self, config: WanAnimateConfig, *, rngs: nnx.Rngs):
        if not isinstance(config, WanAnimateConfig):
            raise ValueError(f"WanAnimateModel needs a WanAnimateConfig, got {type(config).__name__}")
        super().__init__(config, rngs=rngs)
        keys = KeyStream(jax.random.fold_in(rngs.params(), 2))
        base = WanConfig(**{f.name: getattr(config, f.name) for f in dataclasses.fields(WanConfig)})
        self.pose_patch_embedding = PatchEmbedding(base.replace(in_channels=config.latent_channels), keys=keys)
        self.motion_encoder = WanAnimateMotionEncoder(config, keys=keys)
        self.face_encoder = WanAnimateFaceEncoder(config, keys=keys)
        adapters = [FaceAdapter(config, keys=keys) for _ in range(config.num_face_adapters)]
        self.face_adapter = _stack_modules(adapters) if config.scan_layers else nnx.List(adapters)

    # ---- public API ----------------------------------------------------------------------------------
    def __call__(self, hidden_states: jax.Array, timestep: jax.Array, encoder_hidden_states: jax.Array | None,
                 encoder_hidden_states_image: jax.Array | None = None, *,
                 pose_hidden_states: jax.Array | None = None, face_pixel_values: jax.Array | None = None,
                 motion_encode_batch_size: int | None = None,
                 kv_cache: AnimateCache | None = None) -> jax.Array:
        """`WanAnimateTransformer3DModel.forward(...).sample`.

        Args:
          hidden_states: [B, 2z + 4, F, H, W] (noise latents, then the 4 mask channels and reference latents).
          timestep: [B] or a scalar.
          encoder_hidden_states: text [B, 512, text_dim]; encoder_hidden_states_image: CLIP [B, 257, image_dim].
          pose_hidden_states: pose latents [B, z, F - 1, H, W].
          face_pixel_values: face video [B, 3, S, size, size] in [-1, 1]; S face frames give
            T = ceil-halved twice + 1 motion frames, which must divide the latent tokens (T = F in the pipeline).
          motion_encode_batch_size: face frames per motion-encoder call (static; default from the config).
          kv_cache: from `compute_kv_cache`; then only `hidden_states` and `timestep` are read.

        Returns:
          [B, out_channels, F, H, W] in `config.dtype`.
        """
        cfg = self.config
        grid = self._check_latents(hidden_states)
        b = hidden_states.shape[0]
        tokens = math.prod(grid)
        timestep = self._check_timestep(timestep, b, tokens)
        if timestep.shape[1] != 1:
            raise ValueError("Wan Animate takes one timestep per sample ([B] or a scalar), not per-token timesteps")
        rope = rope_tables(cfg.attention_head_dim, grid, cfg.rope_max_seq_len)
        if kv_cache is None:  # validate before any math
            self._check_pose(pose_hidden_states, hidden_states.shape)
            self._check_face(face_pixel_values, b, grid, motion_encode_batch_size)

        x = _scoped("patch_embedding", self.patch_embedding, hidden_states.astype(cfg.dtype))
        if kv_cache is None:
            pose = self.embed_pose(pose_hidden_states, hidden_states.shape)
            face_kv = self.face_kv(self.encode_face(face_pixel_values, b, grid, motion_encode_batch_size))
            text, image = self._embed_context(encoder_hidden_states, encoder_hidden_states_image, b)
            image, image_mask = self._pad_image_tokens(image)
            context, main_kv = (text, image), None
        else:
            if not isinstance(kv_cache, AnimateCache):
                raise ValueError(f"kv_cache must be this model's compute_kv_cache(...) result (an AnimateCache), "
                                 f"got {type(kv_cache).__name__}")
            self._check_cache(kv_cache.kv, b)
            first = grid[1] * grid[2]
            if kv_cache.pose.shape[:2] != (b, tokens - first):
                raise ValueError(f"kv_cache holds pose tokens {tuple(kv_cache.pose.shape[:2])}, these latents need "
                                 f"{(b, tokens - first)}; rebuild it for these latents")
            pose, face_kv, context, main_kv = kv_cache.pose, (kv_cache.face_k, kv_cache.face_v), None, kv_cache.kv
            padded = (main_kv.image_k if cfg.scan_layers else main_kv.image_k[0]).shape[-2]
            image_mask = self._image_mask(padded, main_kv.image_len)
        with jax.named_scope("pose_add"):
            first = grid[1] * grid[2]  # diffusers: hidden_states[:, :, 1:] += pose (frame 0 is the reference)
            x = jnp.concatenate([x[:, :first], x[:, first:] + pose], axis=1)
        with jax.named_scope("condition_embedder"):
            temb, timestep_proj = self.condition_embedder.time(timestep)

        x = run_blocks(self, x, timestep_proj, rope, image_mask, context=context, cache=main_kv,
                       after_block=self._face_injector(face_kv))

        with jax.named_scope("norm_out"):
            mod = self.scale_shift_table[...].astype(F32)[None] + temb[:, :, None].astype(F32)
            shift, scale = mod[:, :, 0], mod[:, :, 1]
            x = (_layer_norm(x.astype(F32), cfg.eps) * (1 + scale) + shift).astype(x.dtype)
        x = _scoped("proj_out", self.proj_out, x)
        return self._unpatchify(x, hidden_states.shape, grid)

    def embed_pose(self, pose: jax.Array | None, latent_shape: tuple[int, ...]) -> jax.Array:
        """`pose_patch_embedding(pose)` tokens [B, (F-1)*H'*W', D]; checks pose is [B, z, F - 1, H, W]."""
        self._check_pose(pose, latent_shape)
        return _scoped("pose_patch_embedding", self.pose_patch_embedding, pose.astype(self.config.dtype))

    def _check_pose(self, pose: jax.Array | None, latent_shape: tuple[int, ...]) -> None:
        cfg = self.config
        b, _, f, h, w = latent_shape
        want = (b, cfg.latent_channels, f - 1, h, w)
        if pose is None or tuple(pose.shape) != want:
            got = None if pose is None else tuple(pose.shape)
            raise ValueError(f"pose_hidden_states must be the pose latents {list(want)} ([B, z, F - 1, H, W]: one "
                             f"frame fewer than the latents, frame 0 is the reference image), got {got}")
        if cfg.patch_size[0] != 1:
            raise ValueError(f"Wan Animate needs a temporal patch size of 1 (pose frames 1..F-1), got {cfg.patch_size}")

    def encode_face(self, face: jax.Array | None, batch: int, grid: tuple[int, int, int],
                    motion_encode_batch_size: int | None = None) -> jax.Array:
        """Face video [B, 3, S, size, size] -> motion tokens [B, T, heads + 1, D] (zero frame 0 prepended).

        The motion encoder runs `motion_encode_batch_size` frames at a time (`lax.map` with that batch size,
        as diffusers' `torch.split` loop; same numbers, smaller peak memory).
        """
        cfg = self.config
        size = cfg.motion_encoder_size
        mebs = self._check_face(face, batch, grid, motion_encode_batch_size)
        frames = face.shape[2]
        pixels = jnp.swapaxes(face, 1, 2).reshape(batch * frames, 3, size, size).astype(cfg.dtype)
        with jax.named_scope("motion_encoder"):
            if mebs >= pixels.shape[0]:
                vec = self.motion_encoder(pixels)
            else:
                def one_frame(pixel):
                    with jax.named_scope("motion_encoder"):  # a map body starts a fresh name stack
                        return self.motion_encoder(pixel[None])[0]

                vec = jax.lax.map(one_frame, pixels, batch_size=mebs)
        vec = vec.reshape(batch, frames, -1)
        motion = _scoped("face_encoder", self.face_encoder, vec)
        return jnp.concatenate([jnp.zeros_like(motion[:, :1]), motion], axis=1)

    def _check_face(self, face: jax.Array | None, batch: int, grid: tuple[int, int, int],
                    motion_encode_batch_size: int | None) -> int:
        """Validates the face video; returns the motion-encoder batch size."""
        cfg = self.config
        size = cfg.motion_encoder_size
        if face is None or face.ndim != 5 or face.shape[0] != batch or face.shape[1] != 3 \
                or face.shape[3:] != (size, size):
            got = None if face is None else tuple(face.shape)
            raise ValueError(f"face_pixel_values must be the face video [B={batch}, 3, frames, {size}, {size}], "
                             f"got {got}")
        frames = face.shape[2]
        t = (((frames - 1) // 2) // 2) + 2  # two stride-2 causal convs, then the zero frame
        if math.prod(grid) % t:
            raise ValueError(f"{frames} face frames give {t} motion frames, which must divide the {math.prod(grid)} "
                             f"latent tokens (the pipeline uses {4 * (grid[0] - 2) + 1} face frames for "
                             f"{grid[0]} latent frames)")
        mebs = motion_encode_batch_size or cfg.motion_encoder_batch_size
        if not isinstance(mebs, int) or mebs < 1:
            raise ValueError(f"motion_encode_batch_size must be a positive int, got {mebs!r}")
        return mebs

    def face_kv(self, motion: jax.Array) -> tuple[Any, Any]:
        """Every face adapter's (K, V) of the motion tokens: stacked [n, ...] (`scan_layers`) or tuples."""
        with jax.named_scope("face_adapter"):
            if self.config.scan_layers:
                graphdef, state = nnx.split(self.face_adapter)

                def one(carry, st):
                    with jax.named_scope("face_adapter"):
                        return carry, nnx.merge(graphdef, st).project_kv(motion)

                return jax.lax.scan(one, None, state)[1]
            kvs = [_scoped(str(j), a.project_kv, motion) for j, a in enumerate(self.face_adapter)]
            return tuple(k for k, _ in kvs), tuple(v for _, v in kvs)

    def compute_kv_cache(self, encoder_hidden_states: jax.Array,
                         encoder_hidden_states_image: jax.Array | None = None, *,
                         pose_hidden_states: jax.Array | None = None, face_pixel_values: jax.Array | None = None,
                         motion_encode_batch_size: int | None = None) -> AnimateCache:
        """The hand-written cache: text / image K/V, pose tokens, motion + face encoders and face-adapter K/V.

        `pose_hidden_states` fixes the latent grid (F = pose frames + 1).
        """
        cfg = self.config
        b = encoder_hidden_states.shape[0]
        if pose_hidden_states is None:
            raise ValueError("compute_kv_cache of an Animate model needs pose_hidden_states and face_pixel_values")
        _, _, fp, h, w = pose_hidden_states.shape
        pt, ph, pw = cfg.patch_size
        grid = ((fp + 1) // pt, h // ph, w // pw)
        pose = self.embed_pose(pose_hidden_states, (b, cfg.in_channels, fp + 1, h, w))
        face_k, face_v = self.face_kv(self.encode_face(face_pixel_values, b, grid, motion_encode_batch_size))
        kv = super().compute_kv_cache(encoder_hidden_states, encoder_hidden_states_image)
        return AnimateCache(kv=kv, pose=pose, face_k=face_k, face_v=face_v)

    # ---- pieces ----------------------------------------------------------------------------------------
    def _face_injector(self, face_kv: tuple[Any, Any]):
        k_every = self.config.inject_face_latents_blocks
        face_k, face_v = face_kv
        if not self.config.scan_layers:
            def inject_static(i: int, h: jax.Array) -> jax.Array:
                if i % k_every:
                    return h
                j = i // k_every
                with jax.named_scope(f"face_adapter/{j}"):
                    return self.face_adapter[j](h, (face_k[j], face_v[j])) + h
            return inject_static

        graphdef, state = nnx.split(self.face_adapter)

        def adapter(h: jax.Array, i: jax.Array) -> jax.Array:
            j = i // k_every
            with jax.named_scope("face_adapter"):
                module = nnx.merge(graphdef, jax.tree.map(lambda a: a[j], state))
                return module(h, (face_k[j], face_v[j])) + h

        def inject_traced(i: jax.Array, h: jax.Array) -> jax.Array:
            return jax.lax.cond(i % k_every == 0, adapter, lambda h, i: h, h, i)

        return inject_traced
