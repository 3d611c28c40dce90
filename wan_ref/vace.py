"""`WanVACEModel`: diffusers' `WanVACETransformer3DModel` (0.42) in Flax NNX, number for number.

VACE adds a control branch to a Wan 2.1 T2V transformer. The control latents (`control_hidden_states`,
[B, vace_in_channels, F_c, H, W]: inactive + reactive VAE latents and the 8x8-folded mask; reference-image
frames first) go through `vace_patch_embedding` and are zero-padded to the latent token count. VACE block 0
adds `proj_in(control)` to the patch-embedded latents; every VACE block is a full Wan block (self-attention,
text cross-attention, FFN) on the control stream and emits a hint `proj_out(control)`. After main block
`vace_layers[j]` the model adds `hint_j * control_hidden_states_scale[j]`.

What does not change across denoising steps (and is hoisted by kvhoist or cached by `compute_kv_cache`):
`vace_patch_embedding(control)`, `vace_blocks[0].proj_in(...)` of it, and every block's (main and VACE)
cross-attention K/V. The VACE blocks themselves read the latents, so they run every step.

VACE blocks are always kept as a list (block 0 alone has `proj_in`); the main blocks follow
`config.scan_layers` as in `WanModel`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from wan_ref.config import WanConfig
from wan_ref.injection import run_blocks
from wan_ref.model import (F32, KVCache, KeyStream, Linear, PatchEmbedding, WanModel, WanTransformerBlock,
                           _layer_norm, _scoped)
from wan_ref.rope import rope_tables

DIFFUSERS_CLASS = "WanVACETransformer3DModel"


@dataclasses.dataclass(frozen=True)
class WanVACEConfig(WanConfig):
    """`WanConfig` plus diffusers' VACE fields.

    Attributes:
      vace_layers: main blocks after which the VACE hints are added (must contain 0, all < num_layers);
        one VACE block per entry.
      vace_in_channels: channels of `control_hidden_states` (96 = 16 inactive + 16 reactive + 64 mask).
    """

    vace_layers: tuple[int, ...] = (0, 5, 10, 15, 20, 25, 30, 35)
    vace_in_channels: int = 96

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "vace_layers", tuple(int(i) for i in self.vace_layers))
        layers = self.vace_layers
        if not layers or max(layers) >= self.num_layers or min(layers) < 0:
            raise ValueError(f"vace_layers {list(layers)} must be block indices in [0, num_layers={self.num_layers})")
        if 0 not in layers:
            raise ValueError(f"vace_layers {list(layers)} must include layer 0 (diffusers: VACE block 0 has proj_in)")
        if len(set(layers)) != len(layers):
            raise ValueError(f"vace_layers {list(layers)} has repeated layers")
        if self.vace_in_channels < 1:
            raise ValueError(f"vace_in_channels must be >= 1, got {self.vace_in_channels}")

    def to_diffusers(self) -> dict[str, Any]:
        out = super().to_diffusers()
        out["vace_layers"] = list(self.vace_layers)
        return out


class WanVACEBlock(WanTransformerBlock):
    """diffusers `WanVACETransformerBlock`: a Wan block on the control stream, + proj_in (block 0) and proj_out."""

    def __init__(self, cfg: WanConfig, *, keys: KeyStream, input_projection: bool):
        super().__init__(cfg, keys=keys)
        d, pd, dt = cfg.inner_dim, cfg.param_dtype, cfg.dtype
        self.proj_in = Linear(d, d, keys=keys, param_dtype=pd, dtype=dt) if input_projection else None
        self.proj_out = Linear(d, d, keys=keys, param_dtype=pd, dtype=dt)


@flax.struct.dataclass
class VACECache:
    """Everything a VACE forward computes from inputs that do not change across denoising steps.

    Attributes:
      kv: the main blocks' `KVCache`.
      vace_kv: per VACE block, (text_k, text_v, image_k, image_v) of its cross-attention.
      control_in: `vace_blocks[0].proj_in(vace_patch_embedding(control))`, zero-padded to the latent tokens
        [B, N, D] (the latent tokens are added to it in every forward).
      scale: `control_hidden_states_scale` [len(vace_layers)] float32.
    """

    kv: KVCache
    vace_kv: tuple
    control_in: jax.Array
    scale: jax.Array


class WanVACEModel(WanModel):
    """diffusers `WanVACETransformer3DModel` in Flax NNX (a `WanModel` plus the VACE control branch).

    Example:
      >>> model = WanVACEModel(get_preset("tiny-vace").config, rngs=nnx.Rngs(0))
      >>> out = model(latents, t, text, control_hidden_states=control)      # [B, out_channels, F, H, W]
    """

    diffusers_class_name = DIFFUSERS_CLASS

    def __init__(self, config: WanVACEConfig, *, rngs: nnx.Rngs):
        if not isinstance(config, WanVACEConfig):
            raise ValueError(f"WanVACEModel needs a WanVACEConfig (vace_layers, vace_in_channels), got "
                             f"{type(config).__name__}")
        super().__init__(config, rngs=rngs)
        keys = KeyStream(jax.random.fold_in(rngs.params(), 1))
        self.vace_patch_embedding = PatchEmbedding(config.replace(in_channels=config.vace_in_channels), keys=keys)
        self.vace_blocks = nnx.List([WanVACEBlock(config, keys=keys, input_projection=i == 0)
                                     for i in range(len(config.vace_layers))])

    # ---- public API ----------------------------------------------------------------------------------
    def __call__(self, hidden_states: jax.Array, timestep: jax.Array, encoder_hidden_states: jax.Array | None,
                 encoder_hidden_states_image: jax.Array | None = None, *,
                 control_hidden_states: jax.Array | None = None,
                 control_hidden_states_scale: jax.Array | None = None,
                 kv_cache: VACECache | None = None) -> jax.Array:
        """`WanVACETransformer3DModel.forward(...).sample`.

        Args:
          hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image: as `WanModel`.
          control_hidden_states: control latents [B, vace_in_channels, F_c, H, W] with F_c <= F (the latent
            H, W); their tokens are zero-padded to the latent token count. Required without `kv_cache`.
          control_hidden_states_scale: [len(vace_layers)] per-hint scale (default ones).
          kv_cache: from `compute_kv_cache`; then only `hidden_states` and `timestep` are read.

        Returns:
          [B, out_channels, F, H, W] in `config.dtype`.
        """
        cfg = self.config
        grid = self._check_latents(hidden_states)
        b = hidden_states.shape[0]
        tokens = math.prod(grid)
        timestep = self._check_timestep(timestep, b, tokens)
        rope = rope_tables(cfg.attention_head_dim, grid, cfg.rope_max_seq_len)
        if kv_cache is None:  # validate before any math
            self._check_control(control_hidden_states, b, grid)
            scale = self._check_scale(control_hidden_states_scale)

        x = _scoped("patch_embedding", self.patch_embedding, hidden_states.astype(cfg.dtype))
        with jax.named_scope("condition_embedder"):
            temb, timestep_proj = self.condition_embedder.time(timestep)

        if kv_cache is None:
            control_in = self.embed_control(control_hidden_states, b, grid)
            text, image = self._embed_context(encoder_hidden_states, encoder_hidden_states_image, b)
            image, image_mask = self._pad_image_tokens(image)
            context = (text, image)
            vace_kv = [None] * len(self.vace_blocks)
            main_kv = None
        else:
            if not isinstance(kv_cache, VACECache):
                raise ValueError(f"kv_cache must be this model's compute_kv_cache(...) result (a VACECache), got "
                                 f"{type(kv_cache).__name__}")
            self._check_cache(kv_cache.kv, b)
            if kv_cache.control_in.shape[:2] != (b, tokens):
                raise ValueError(f"kv_cache was built for control tokens {tuple(kv_cache.control_in.shape[:2])}, "
                                 f"latents give [B, tokens] = {(b, tokens)}; rebuild it for these latents")
            control_in, scale, context, vace_kv, main_kv = (kv_cache.control_in, kv_cache.scale, None,
                                                            list(kv_cache.vace_kv), kv_cache.kv)
            image_mask = None
            if main_kv.image_k is not None:
                padded = (main_kv.image_k if cfg.scan_layers else main_kv.image_k[0]).shape[-2]
                image_mask = self._image_mask(padded, main_kv.image_len)

        hints = self._hints(x, control_in, timestep_proj, rope, image_mask, context, vace_kv)
        with jax.named_scope("vace_hints"):
            scaled = [h * scale[j].astype(h.dtype) for j, h in enumerate(hints)]
        x = run_blocks(self, x, timestep_proj, rope, image_mask, context=context, cache=main_kv,
                       after_block=self._hint_adder(scaled, x))

        with jax.named_scope("norm_out"):
            mod = self.scale_shift_table[...].astype(F32)[None] + temb[:, :, None].astype(F32)
            shift, scale_out = mod[:, :, 0], mod[:, :, 1]
            x = (_layer_norm(x.astype(F32), cfg.eps) * (1 + scale_out) + shift).astype(x.dtype)
        x = _scoped("proj_out", self.proj_out, x)
        return self._unpatchify(x, hidden_states.shape, grid)

    def embed_control(self, control: jax.Array | None, batch: int, grid: tuple[int, int, int]) -> jax.Array:
        """`vace_blocks[0].proj_in(vace_patch_embedding(control))` with the control tokens zero-padded to
        the latent token count (diffusers pads after the patch embedding, before proj_in) -> [B, N, D]."""
        cfg = self.config
        self._check_control(control, batch, grid)
        pt = cfg.patch_size[0]
        tokens = control.shape[2] // pt * grid[1] * grid[2]
        n = math.prod(grid)
        with jax.named_scope("vace"):
            emb = _scoped("vace_patch_embedding", self.vace_patch_embedding, control.astype(cfg.dtype))
            if tokens < n:
                emb = jnp.concatenate([emb, jnp.zeros((batch, n - tokens, emb.shape[-1]), emb.dtype)], axis=1)
        with jax.named_scope("vace_blocks/0"):
            return _scoped("proj_in", self.vace_blocks[0].proj_in, emb)

    def _check_control(self, control: jax.Array | None, batch: int, grid: tuple[int, int, int]) -> None:
        cfg = self.config
        if control is None:
            raise ValueError(f"a VACE model needs control_hidden_states [B, {cfg.vace_in_channels}, F, H, W] "
                             "(WanVACEPipeline's conditioning latents: video latents + mask) unless kv_cache is given")
        c = tuple(control.shape)
        pt, ph, pw = cfg.patch_size
        latent_hw = (grid[1] * ph, grid[2] * pw)
        if len(c) != 5 or c[0] != batch or c[1] != cfg.vace_in_channels or c[3:] != latent_hw \
                or c[2] % pt or c[2] // pt > grid[0]:
            raise ValueError(f"control_hidden_states must be [B={batch}, vace_in_channels={cfg.vace_in_channels}, "
                             f"F_c <= {grid[0] * pt}, {latent_hw[0]}, {latent_hw[1]}] (the latents' H, W), got {c}")

    def compute_kv_cache(self, encoder_hidden_states: jax.Array,
                         encoder_hidden_states_image: jax.Array | None = None, *,
                         control_hidden_states: jax.Array | None = None,
                         control_hidden_states_scale: jax.Array | None = None,
                         num_latent_frames: int | None = None) -> VACECache:
        """The hand-written cache: context K/V of every main and VACE block, and the embedded control.

        Args:
          encoder_hidden_states, encoder_hidden_states_image: as `WanModel.compute_kv_cache`.
          control_hidden_states, control_hidden_states_scale: as `__call__`.
          num_latent_frames: F of the latents (default: the control's F_c); the control tokens are padded to it.
        """
        cfg = self.config
        b = encoder_hidden_states.shape[0]
        if control_hidden_states is None:
            raise ValueError("compute_kv_cache of a VACE model needs control_hidden_states")
        _, _, fc, h, w = control_hidden_states.shape
        pt, ph, pw = cfg.patch_size
        grid = ((num_latent_frames or fc) // pt, h // ph, w // pw)
        control_in = self.embed_control(control_hidden_states, b, grid)
        scale = self._check_scale(control_hidden_states_scale)
        kv = super().compute_kv_cache(encoder_hidden_states, encoder_hidden_states_image)
        text, image = self._embed_context(encoder_hidden_states, encoder_hidden_states_image, b)
        image, _ = self._pad_image_tokens(image)
        vace_kv = tuple(_scoped(f"vace_blocks/{j}", blk.cross_kv, text, image)
                        for j, blk in enumerate(self.vace_blocks))
        return VACECache(kv=kv, vace_kv=vace_kv, control_in=control_in, scale=scale)

    # ---- pieces ----------------------------------------------------------------------------------------
    def _check_scale(self, scale: jax.Array | None) -> jax.Array:
        n = len(self.config.vace_layers)
        if scale is None:
            return jnp.ones((n,), F32)
        scale = jnp.asarray(scale, F32)
        if scale.ndim == 0:
            return jnp.broadcast_to(scale, (n,))
        if scale.shape != (n,):
            raise ValueError(f"control_hidden_states_scale must be a scalar or [len(vace_layers)={n}], got shape "
                             f"{tuple(scale.shape)}")
        return scale

    def _hints(self, x, control_in, timestep_proj, rope, image_mask, context, vace_kv) -> list[jax.Array]:
        """Runs the VACE blocks on the control stream; returns the hints proj_out(control) per block."""
        hints = []
        c = control_in + x  # diffusers: proj_in(control) + hidden_states (the patch-embedded latents)
        for j, blk in enumerate(self.vace_blocks):
            with jax.named_scope(f"vace_blocks/{j}"):
                kv = blk.cross_kv(*context) if vace_kv[j] is None else vace_kv[j]
                c = blk(c, timestep_proj, rope, kv, image_mask)
                hints.append(_scoped("proj_out", blk.proj_out, c))
        return hints

    def _hint_adder(self, scaled: list[jax.Array], x: jax.Array):
        layers = self.config.vace_layers
        position = {layer: j for j, layer in enumerate(layers)}

        def add_static(i: int, h: jax.Array) -> jax.Array:
            return h + scaled[position[i]] if i in position else h

        if not self.config.scan_layers:
            return add_static
        # Scanned layers: hint table with a zero row for layers without a hint (x + 0 is exact).
        table = jnp.stack(scaled + [jnp.zeros_like(scaled[0])])
        row = [position.get(i, len(layers)) for i in range(self.config.num_layers)]
        rows = jnp.asarray(row, jnp.int32)

        def add_traced(i: jax.Array, h: jax.Array) -> jax.Array:
            with jax.named_scope("vace_hint"):
                return h + table[rows[i]]

        return add_traced
