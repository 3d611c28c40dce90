"""Named Wan checkpoints (`PRESETS`): transformer config(s) plus the pipeline defaults a sampler needs.

Real dimensions are those of the diffusers-format checkpoints (`Wan-AI/Wan2.x-...-Diffusers`,
`transformer/config.json`). Sampler defaults (flow_shift, guidance, resolution) follow the official Wan
configs / diffusers pipeline docs. The `tiny-*` presets keep every structural feature of their real
counterpart (image branch, FLF2V pos_embed, two experts, per-token timesteps) at test size.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

from wan_ref.config import WanConfig

TaskName = str  # "t2v" | "i2v" | "flf2v" | "ti2v" | "vace" | "animate"


@dataclasses.dataclass(frozen=True)
class Preset:
    """A Wan checkpoint: transformer config(s) and pipeline defaults.

    Attributes:
      name: preset key.
      config: the (first / high-noise) transformer.
      config_2: the second (low-noise) expert of Wan 2.2 A14B, else None.
      task: "t2v", "i2v", "flf2v", "ti2v", "vace" (`wan_ref.vace`) or "animate" (`wan_ref.animate`; one
        segment of `num_frames` pixel frames, latents have one extra reference frame).
      boundary_ratio: Wan 2.2 A14B: use `config` while t >= boundary_ratio * 1000, else `config_2`.
      flow_shift: shift of the flow-matching sigma schedule.
      guidance_scale: CFG scale (for `config`); guidance_scale_2: for `config_2` (None for one expert).
      height, width, num_frames: default video size in pixels / frames.
      num_inference_steps: default number of sampling steps.
      vae_scale_factor_spatial, vae_scale_factor_temporal: pixels per latent (Wan 2.1 VAE 8 / 4;
        Wan 2.2 TI2V VAE 16 / 4).
      z_dim: latent channels of the VAE (16; 48 for TI2V-5B).
      expand_timesteps: Wan 2.2 TI2V: per-token timesteps [B, tokens] (condition-frame tokens get t=0).
    """

    name: str
    config: WanConfig
    task: TaskName
    flow_shift: float
    guidance_scale: float
    height: int
    width: int
    num_frames: int
    config_2: WanConfig | None = None
    boundary_ratio: float | None = None
    guidance_scale_2: float | None = None
    num_inference_steps: int = 50
    vae_scale_factor_spatial: int = 8
    vae_scale_factor_temporal: int = 4
    z_dim: int = 16
    expand_timesteps: bool = False

    @property
    def latent_channels(self) -> int:
        """Alias of `z_dim`."""
        return self.z_dim

    @property
    def two_experts(self) -> bool:
        """Whether this is a Wan 2.2 A14B preset (two transformers switched at `boundary_ratio`)."""
        return self.config_2 is not None

    def latent_shape(self, batch: int = 1, height: int | None = None, width: int | None = None,
                     num_frames: int | None = None) -> tuple[int, int, int, int, int]:
        """Shape [B, z_dim, F, H, W] of the noise latents for a video size (defaults: the preset's).

        Animate: F has one extra (reference) frame, as `WanAnimatePipeline.prepare_latents`."""
        h, w, f = height or self.height, width or self.width, num_frames or self.num_frames
        extra = 1 if self.task == "animate" else 0
        return (batch, self.z_dim, (f - 1) // self.vae_scale_factor_temporal + 1 + extra,
                h // self.vae_scale_factor_spatial, w // self.vae_scale_factor_spatial)


    def inputs(self, *, seed: int = 0, batch: int = 1, text_len: int = 512, abstract: bool | None = None,
               cfg: bool = True, num_inference_steps: int | None = None,
               attention: str | None = None) -> "SampleInputs":
        """A random model (both experts for A14B) and matching random inputs for `wan_ref.sample`.

        The weights are drawn by NumPy (matrices ~ N(0, 1/fan_in), norms 1, the rest small): a model to run
        and trace, not a trained one, built in well under a second for the tiny presets.

        Args:
          seed: seeds the weights and the inputs.
          batch: batch size of the latents and embeddings.
          text_len: text tokens (512, as Wan's pipelines pad to; models with an image branch need 512).
          abstract: `jax.ShapeDtypeStruct`s instead of arrays, the model built by `nnx.eval_shape` (no
            weights allocated: for tracing, `jax.make_jaxpr`, `kvhoist report`). Default: True for full-size
            presets, False for `tiny-*`.
          cfg: include `negative_prompt_embeds` (classifier-free guidance) when the preset guides.
          num_inference_steps: default: the preset's.
          attention: `WanConfig.attention` for the model(s): "xla" or "splash" (default: the preset's, "xla").
            Same random weights either way.

        Returns:
          A `SampleInputs`: `sample(*inputs.args, **inputs.kwargs)` runs the preset's sampler.

        Example:
          >>> inputs = get_preset("tiny-t2v").inputs()
          >>> latents = wan_ref.sample(*inputs.args, **inputs.kwargs)
        """
        import jax
        import jax.numpy as jnp
        import numpy as np
        from flax import nnx

        if batch < 1 or text_len < 1:
            raise ValueError(f"batch and text_len must be >= 1, got batch={batch}, text_len={text_len}")
        abstract = (not self.name.startswith("tiny")) if abstract is None else abstract
        model_cls = _model_class(self.task)
        configs = (self.config, self.config_2)
        if attention is not None:  # WanConfig validates the value
            configs = tuple(None if c is None else c.replace(attention=attention) for c in configs)

        def build(config: WanConfig, key_seed: int) -> Any:
            model = nnx.eval_shape(lambda: model_cls(config, rngs=nnx.Rngs(key_seed)))
            return model if abstract else _random_weights(model, config, key_seed)

        rng = np.random.default_rng(seed)

        def array(shape: tuple, dtype: Any = jnp.float32) -> Any:
            if abstract:
                return jax.ShapeDtypeStruct(shape, dtype)
            # NumPy, not jax.random: one jax.random.normal compiles per shape (seconds on a loaded CPU)
            return jnp.asarray(rng.standard_normal(shape, np.float32), dtype)

        c = configs[0]
        z, f = self.z_dim, self.num_frames
        shape = self.latent_shape(batch)
        _b, _z, lf, lh, lw = shape
        text_dtype = c.dtype
        extra: dict = {}
        if self.two_experts:
            extra["model_2"] = build(configs[1], seed + 1)
        if c.image_dim is not None:
            extra["image_embeds"] = array((batch, 2 * 257 if c.pos_embed_seq_len else 257, c.image_dim), text_dtype)
        if self.expand_timesteps:
            extra["condition"] = array((batch, z, 1, lh, lw))
        elif c.in_channels > z:
            extra["condition"] = array((batch, c.in_channels - z, lf, lh, lw))
        if self.task == "vace":
            extra["control_hidden_states"] = array((batch, c.vace_in_channels, lf, lh, lw), text_dtype)
        elif self.task == "animate":
            size = c.motion_encoder_size
            extra["pose_hidden_states"] = array((batch, z, lf - 1, lh, lw), text_dtype)
            extra["face_pixel_values"] = array((batch, 3, f, size, size), text_dtype)
        options: dict = dict(num_inference_steps=num_inference_steps or self.num_inference_steps,
                             guidance_scale=self.guidance_scale, flow_shift=self.flow_shift,
                             expand_timesteps=self.expand_timesteps)
        if self.two_experts:
            options.update(boundary_ratio=self.boundary_ratio, guidance_scale_2=self.guidance_scale_2)
        model = build(c, seed)
        latents = array(shape)
        prompt = array((batch, text_len, c.text_dim), text_dtype)
        negative = array((batch, text_len, c.text_dim), text_dtype) if cfg and self.guidance_scale > 1.0 else None
        return SampleInputs(self, (model, latents, prompt, negative), extra, options)


@dataclasses.dataclass
class SampleInputs:
    """A model and inputs for `wan_ref.sample`, made by `Preset.inputs` / `tiny_inputs`.

    Attributes:
      preset: the preset they were made for.
      args: `(model, latents, prompt_embeds, negative_prompt_embeds)`, the positional arguments of
        `sample` (`negative_prompt_embeds` is None without CFG).
      extra: the array keyword arguments the preset's task needs: `model_2` (A14B), `image_embeds`
        (I2V / FLF2V), `condition` (I2V, TI2V, Animate), `control_hidden_states` (VACE),
        `pose_hidden_states` and `face_pixel_values` (Animate).
      options: the static sampler settings: `num_inference_steps`, `guidance_scale`, `flow_shift`,
        `expand_timesteps` (and `boundary_ratio`, `guidance_scale_2` for A14B) — bind them with
        `functools.partial` before `jax.jit` / `kvhoist.hoist_invariants`.
    """

    preset: Preset
    args: tuple
    extra: dict
    options: dict

    @property
    def kwargs(self) -> dict:
        """`extra` and `options` together: `sample(*inputs.args, **inputs.kwargs)`."""
        return {**self.extra, **self.options}

    @property
    def model(self) -> Any:
        """The (first) model, `args[0]`."""
        return self.args[0]


def tiny_inputs(name: str = "tiny-t2v", **kw: Any) -> SampleInputs:
    """`get_preset(name).inputs(**kw)`: a random model and matching inputs in one line (see `Preset.inputs`).

    Example:
      >>> model, noise, prompt_embeds, negative_prompt_embeds = tiny_inputs("tiny-t2v").args
    """
    return get_preset(name).inputs(**kw)


def _random_weights(abstract: Any, config: WanConfig, seed: int) -> Any:
    """`abstract` (an `nnx.eval_shape` model) with random weights drawn by NumPy.

    Seconds faster than running the initialisers eagerly (op by op) on a loaded CPU: matrices and kernels
    ~ N(0, 1/fan_in), norm weights 1, modulation tables and biases ~ N(0, 0.02^2)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(seed)

    def draw(path: Any, s: Any) -> Any:
        name = jax.tree_util.keystr(path).lower()
        if not jnp.issubdtype(s.dtype, jnp.floating):
            return jnp.zeros(s.shape, s.dtype)
        layer_axis = 1 if config.scan_layers and ("blocks" in name or "face_adapter" in name) else 0
        if "scale_shift" in name or "pos_embed" in name:
            x = 0.02 * rng.standard_normal(s.shape)
        elif len(s.shape) >= 2 + layer_axis:
            x = rng.standard_normal(s.shape) / np.sqrt(s.shape[-2])
        elif "norm" in name:
            x = np.ones(s.shape)
        else:
            x = 0.02 * rng.standard_normal(s.shape)
        return jnp.asarray(x, s.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, state))


def _model_class(task: TaskName) -> type:
    if task == "vace":
        from wan_ref.vace import WanVACEModel

        return WanVACEModel
    if task == "animate":
        from wan_ref.animate import WanAnimateModel

        return WanAnimateModel
    from wan_ref.model import WanModel

    return WanModel


def _wan21(heads: int, ffn: int, layers: int, **kw) -> WanConfig:
    return WanConfig(num_attention_heads=heads, attention_head_dim=128, text_dim=4096, freq_dim=256,
                     ffn_dim=ffn, num_layers=layers, cross_attn_norm=True, eps=1e-6, rope_max_seq_len=1024, **kw)


_T2V_1_3B = _wan21(12, 8960, 30, in_channels=16, out_channels=16)
_T2V_14B = _wan21(40, 13824, 40, in_channels=16, out_channels=16)
# I2V in_channels = 16 noise + 4 mask + 16 condition latents.
_I2V_14B = _wan21(40, 13824, 40, in_channels=36, out_channels=16, image_dim=1280, added_kv_proj_dim=5120)
_FLF2V_14B = dataclasses.replace(_I2V_14B, pos_embed_seq_len=2 * 257)
_I2V_A14B = _wan21(40, 13824, 40, in_channels=36, out_channels=16)  # Wan 2.2 I2V: no CLIP branch.
_TI2V_5B = _wan21(24, 14336, 30, in_channels=48, out_channels=48)

# Tiny: z = 4 latent channels, 2 heads x 12 (RoPE split t/h/w = 4/4/4), D = 24.
_TINY = WanConfig(num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, text_dim=32,
                  freq_dim=256, ffn_dim=48, num_layers=2, cross_attn_norm=True, eps=1e-6, rope_max_seq_len=1024)
_TINY_I2V = dataclasses.replace(_TINY, in_channels=12, image_dim=24, added_kv_proj_dim=24)
_TINY_FLF2V = dataclasses.replace(_TINY_I2V, pos_embed_seq_len=2 * 257)
_TINY_I2V_A14B = dataclasses.replace(_TINY, in_channels=12)


def _variants() -> dict[str, WanConfig]:
    """VACE and Animate configs (imported here: those modules import wan_ref.model)."""
    from wan_ref.animate import WanAnimateConfig
    from wan_ref.vace import WanVACEConfig

    def vace(base: WanConfig, layers: tuple[int, ...], vace_in: int) -> WanVACEConfig:
        return WanVACEConfig(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)},
                             vace_layers=layers, vace_in_channels=vace_in)

    animate_14b = WanAnimateConfig(**{f.name: getattr(_I2V_14B, f.name) for f in dataclasses.fields(_I2V_14B)})
    tiny_animate = WanAnimateConfig(
        **{f.name: getattr(_TINY_I2V, f.name) for f in dataclasses.fields(_TINY_I2V)} | {"num_layers": 4},
        latent_channels=4, motion_encoder_channel_sizes={"4": 8, "8": 8, "16": 4}, motion_encoder_size=16,
        motion_style_dim=8, motion_dim=4, motion_encoder_dim=8, face_encoder_hidden_dim=8,
        face_encoder_num_heads=2, inject_face_latents_blocks=2, motion_encoder_batch_size=3)
    return {
        # VACE control channels: 16 inactive + 16 reactive latents + 64 (8x8-folded mask).
        "vace-1.3b": vace(_T2V_1_3B, tuple(range(0, 30, 2)), 96),
        "vace-14b": vace(_T2V_14B, tuple(range(0, 40, 5)), 96),
        "animate-14b": animate_14b,
        # Tiny: 3 layers with hints after blocks 0 and 2; control = 4 + 4 latents + 64 mask channels.
        "tiny-vace": vace(dataclasses.replace(_TINY, num_layers=3), (0, 2), 72),
        "tiny-animate": tiny_animate,
    }


def _presets() -> dict[str, Preset]:
    v = _variants()
    p = [
        Preset("wan2.1-t2v-1.3b", _T2V_1_3B, "t2v", flow_shift=3.0, guidance_scale=5.0, height=480, width=832,
               num_frames=81),
        Preset("wan2.1-t2v-14b", _T2V_14B, "t2v", flow_shift=5.0, guidance_scale=5.0, height=720, width=1280,
               num_frames=81),
        Preset("wan2.1-i2v-14b-480p", _I2V_14B, "i2v", flow_shift=3.0, guidance_scale=5.0, height=480, width=832,
               num_frames=81),
        Preset("wan2.1-i2v-14b-720p", _I2V_14B, "i2v", flow_shift=5.0, guidance_scale=5.0, height=720,
               width=1280, num_frames=81),
        Preset("wan2.1-flf2v-14b", _FLF2V_14B, "flf2v", flow_shift=16.0, guidance_scale=5.5, height=720,
               width=1280, num_frames=81),
        Preset("wan2.2-t2v-a14b", _T2V_14B, "t2v", config_2=_T2V_14B, boundary_ratio=0.875, flow_shift=12.0,
               guidance_scale=4.0, guidance_scale_2=3.0, height=720, width=1280, num_frames=81,
               num_inference_steps=40),
        Preset("wan2.2-i2v-a14b", _I2V_A14B, "i2v", config_2=_I2V_A14B, boundary_ratio=0.9, flow_shift=5.0,
               guidance_scale=3.5, guidance_scale_2=3.5, height=720, width=1280, num_frames=81,
               num_inference_steps=40),
        Preset("wan2.2-ti2v-5b", _TI2V_5B, "ti2v", flow_shift=5.0, guidance_scale=5.0, height=704, width=1280,
               num_frames=121, vae_scale_factor_spatial=16, z_dim=48, expand_timesteps=True),
        Preset("wan2.1-vace-1.3b", v["vace-1.3b"], "vace", flow_shift=3.0, guidance_scale=5.0, height=480,
               width=832, num_frames=81),
        Preset("wan2.1-vace-14b", v["vace-14b"], "vace", flow_shift=5.0, guidance_scale=5.0, height=720,
               width=1280, num_frames=81),
        # Wan Animate: one 77-frame segment (20 latent frames + the reference frame), CFG off by default.
        Preset("wan2.2-animate-14b", v["animate-14b"], "animate", flow_shift=5.0, guidance_scale=1.0, height=720,
               width=1280, num_frames=77, num_inference_steps=20),
        # Tiny test presets: 32x32 pixels x 5 frames -> latents 2 x 4 x 4 (8 tokens with patch (1, 2, 2)).
        Preset("tiny-t2v", _TINY, "t2v", flow_shift=3.0, guidance_scale=5.0, height=32, width=32, num_frames=5,
               num_inference_steps=4, z_dim=4),
        Preset("tiny-i2v", _TINY_I2V, "i2v", flow_shift=3.0, guidance_scale=5.0, height=32, width=32,
               num_frames=5, num_inference_steps=4, z_dim=4),
        Preset("tiny-flf2v", _TINY_FLF2V, "flf2v", flow_shift=16.0, guidance_scale=5.5, height=32, width=32,
               num_frames=5, num_inference_steps=4, z_dim=4),
        Preset("tiny-ti2v", _TINY, "ti2v", flow_shift=5.0, guidance_scale=5.0, height=64, width=64, num_frames=5,
               num_inference_steps=4, vae_scale_factor_spatial=16, z_dim=4, expand_timesteps=True),
        Preset("tiny-t2v-a14b", _TINY, "t2v", config_2=_TINY, boundary_ratio=0.875, flow_shift=12.0,
               guidance_scale=4.0, guidance_scale_2=3.0, height=32, width=32, num_frames=5, num_inference_steps=4,
               z_dim=4),
        Preset("tiny-vace", v["tiny-vace"], "vace", flow_shift=3.0, guidance_scale=5.0, height=32, width=32,
               num_frames=5, num_inference_steps=4, z_dim=4),
        # 5 frames -> 2 latent frames + the reference frame; face video 16x16 pixels.
        Preset("tiny-animate", v["tiny-animate"], "animate", flow_shift=5.0, guidance_scale=5.0, height=32,
               width=32, num_frames=5, num_inference_steps=4, z_dim=4),
        Preset("tiny-i2v-a14b", _TINY_I2V_A14B, "i2v", config_2=_TINY_I2V_A14B, boundary_ratio=0.9,
               flow_shift=5.0, guidance_scale=3.5, guidance_scale_2=3.5, height=32, width=32, num_frames=5,
               num_inference_steps=4, z_dim=4),
    ]
    presets = {x.name: x for x in p}
    # 480p and 720p I2V checkpoints share dimensions; the bare name means the 480p defaults.
    presets["wan2.1-i2v-14b"] = dataclasses.replace(presets["wan2.1-i2v-14b-480p"], name="wan2.1-i2v-14b")
    return presets


PRESETS: dict[str, Preset] = _presets()


def get_preset(name: str) -> Preset:
    """The preset called `name`.

    Raises:
      ValueError: unknown name, listing close matches.
    """
    try:
        return PRESETS[name]
    except KeyError:
        close = difflib.get_close_matches(name, PRESETS, n=4, cutoff=0.4)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown Wan preset {name!r}{hint} (known: {', '.join(sorted(PRESETS))})") from None
