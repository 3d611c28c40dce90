"""The benchmark's configs (model sizes), sampler forms (loop shapes) and the random case each runs.

Shared by :mod:`kvhoist.bench.samplers`, :mod:`kvhoist.bench.quick` and :mod:`kvhoist.bench.trust`.
"""

from __future__ import annotations

import dataclasses


__all__ = ["BenchConfig", "CONFIGS", "Form", "FORMS", "VARIANTS", "Case", "build_case", "split_kwargs",
           "variant_cache_kwargs", "hand_cache_bytes"]


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """Model and sampling sizes of one benchmark config.

    Attributes:
      name: key in :data:`CONFIGS`.
      description: one line for the report.
      heads, head_dim: attention heads and head width (D = heads * head_dim).
      ffn_dim, num_layers, text_dim: as in ``wan_ref.WanConfig``.
      text_tokens: text context length (the I2V form always uses 512, as diffusers requires).
      latent_fhw: latent (frames, height, width); tokens = F * H/2 * W/2 with patch (1, 2, 2).
      z_dim: latent channels.
      batch: prompts per run (CFG doubles the model batch).
      steps: denoising steps.
      image_dim: CLIP embedding width for the I2V form (257 image tokens).
      i2v: whether the I2V form runs for this config.
    """

    name: str
    description: str
    heads: int
    head_dim: int
    ffn_dim: int
    num_layers: int
    text_dim: int
    text_tokens: int
    latent_fhw: tuple[int, int, int]
    z_dim: int = 16
    batch: int = 1
    steps: int = 10
    image_dim: int = 128
    i2v: bool = True

    @property
    def dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def latent_tokens(self) -> int:
        f, h, w = self.latent_fhw
        return f * (h // 2) * (w // 2)


CONFIGS: dict[str, BenchConfig] = {
    "small": BenchConfig(
        "small", "cross-attention dominates: 16 latent tokens vs 512 text tokens, D=256, 4 layers",
        heads=4, head_dim=64, ffn_dim=1024, num_layers=4, text_dim=256, text_tokens=512,
        latent_fhw=(1, 8, 8), steps=10),
    "realistic-ratio": BenchConfig(
        "realistic-ratio",
        "Wan 2.1 14B 480p proportions (32760 latent : 512 text tokens = 64:1) scaled down 64x: "
        "512 latent tokens vs 8 text tokens, D=128, 4 layers",
        heads=2, head_dim=64, ffn_dim=352, num_layers=4, text_dim=104, text_tokens=8,
        latent_fhw=(2, 32, 32), steps=4,
        # diffusers' I2V needs exactly 512 text tokens; at 64:1 that is ~32k latent tokens.
        i2v=False),
}
"""The benchmark configs (``--config``)."""


@dataclasses.dataclass(frozen=True)
class Form:
    """A sampler form: how the steps and layers loop, and what XLA is expected to do with it."""

    name: str
    loop: str            # wan_ref.sample loop=
    scan_layers: bool
    experts: int = 1
    i2v: bool = False
    xla_hoists: bool = False   # does plain jax.jit (XLA-CPU's while-loop LICM) hoist the K/V dots itself?
    note: str = ""
    variant: str = "wan"       # "vace" (wan_ref.vace) or "animate" (wan_ref.animate; implies the I2V inputs)


FORMS: dict[str, Form] = {f.name: f for f in [
    Form("scan x layer-scan", "scan", True, note="nested layer scan: XLA's LICM does not enter it"),
    Form("scan x unrolled", "scan", False, xla_hoists=True,
         note="top-level ops of the while body: XLA-CPU's WhileLoopInvariantCodeMotion hoists them"),
    Form("fori x layer-scan", "fori", True, note="fori_loop with static bounds is a scan"),
    Form("expert cond (A14B)", "scan", False, experts=2,
         note="two experts behind lax.cond (unrolled layers, so the cond is the only obstacle)"),
    Form("I2V + CFG", "scan", True, i2v=True, note="text + image K/V (257 image tokens padded to 384)"),
    Form("python loop", "python", True, note="a Python loop calling one jitted step"),
    Form("VACE + CFG", "scan", True, variant="vace",
         note="VACE: control video (96 ch) embedded + proj_in, hints after blocks 0 and 2; text K/V of 4 + 2 blocks"),
    Form("Animate + CFG", "scan", True, i2v=True, variant="animate",
         note="Wan Animate: pose latents, 4 face frames through a 32 px motion encoder, face adapters after "
              "blocks 0 and 2 (lax.cond in the layer scan), text + CLIP K/V; 2 latent frames"),
]}
"""The sampler forms (``--forms``)."""

VARIANTS = ("plain", "hand", "hoisted")


@dataclasses.dataclass
class Case:
    """Everything a form needs to run: models, inputs and ``sample`` keyword arguments."""

    args: tuple
    kwargs: dict
    models: tuple
    context_batch: int


# The small Animate face path of the "Animate + CFG" form: 32 px faces, 4 frames (-> 2 motion frames).
_ANIMATE_FACE = dict(motion_encoder_size=32, motion_encoder_channel_sizes={"4": 128, "8": 128, "16": 64, "32": 32},
                     motion_style_dim=128, motion_dim=20, motion_encoder_dim=128, face_encoder_hidden_dim=128,
                     face_encoder_num_heads=4, inject_face_latents_blocks=2, motion_encoder_batch_size=8)
_ANIMATE_FACE_FRAMES = 4


def _wan_config(cfg: BenchConfig, form: Form):
    from wan_ref.config import WanConfig

    extra = {}
    in_channels = cfg.z_dim
    if form.i2v:
        in_channels = 2 * cfg.z_dim + 4
        extra = dict(image_dim=cfg.image_dim, added_kv_proj_dim=cfg.dim)
    base = dict(num_attention_heads=cfg.heads, attention_head_dim=cfg.head_dim, in_channels=in_channels,
                out_channels=cfg.z_dim, text_dim=cfg.text_dim, ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers,
                scan_layers=form.scan_layers, **extra)
    if form.variant == "vace":
        from wan_ref.vace import WanVACEConfig

        return WanVACEConfig(**base, vace_layers=(0, 2), vace_in_channels=2 * cfg.z_dim + 64)
    if form.variant == "animate":
        from wan_ref.animate import WanAnimateConfig

        return WanAnimateConfig(**base, latent_channels=cfg.z_dim, **_ANIMATE_FACE)
    return WanConfig(**base)


def _model_class(form: Form):
    if form.variant == "vace":
        from wan_ref.vace import WanVACEModel
        return WanVACEModel
    if form.variant == "animate":
        from wan_ref.animate import WanAnimateModel
        return WanAnimateModel
    from wan_ref.model import WanModel
    return WanModel


def build_case(cfg: BenchConfig, form: Form, seed: int = 0) -> Case:
    """Random models and inputs for ``form`` at ``cfg`` (CFG on, UniPC, float32)."""
    import jax
    import jax.numpy as jnp

    from flax import nnx

    wcfg = _wan_config(cfg, form)
    models = tuple(_model_class(form)(wcfg, rngs=nnx.Rngs(seed + i)) for i in range(form.experts))
    keys = jax.random.split(jax.random.key(seed + 100), 7)
    f, h, w = cfg.latent_fhw
    if form.variant == "animate":
        f = max(f, 2)  # frame 0 is the reference; the pose latents cover frames 1..F-1
    b = cfg.batch
    text_tokens = 512 if form.i2v else cfg.text_tokens
    latents = jax.random.normal(keys[0], (b, cfg.z_dim, f, h, w), jnp.float32)
    pe = jax.random.normal(keys[1], (b, text_tokens, cfg.text_dim), jnp.float32)
    npe = jax.random.normal(keys[2], (b, text_tokens, cfg.text_dim), jnp.float32)
    kwargs: dict = dict(num_inference_steps=cfg.steps, guidance_scale=5.0, flow_shift=3.0, loop=form.loop)
    if form.experts == 2:
        kwargs.update(model_2=models[1], boundary_ratio=0.875, guidance_scale_2=3.0, flow_shift=12.0)
    if form.i2v:
        kwargs["image_embeds"] = jax.random.normal(keys[3], (b, 257, cfg.image_dim), jnp.float32)
        kwargs["condition"] = jax.random.normal(keys[4], (b, cfg.z_dim + 4, f, h, w), jnp.float32)
    if form.variant == "vace":
        kwargs["control_hidden_states"] = jax.random.normal(keys[5], (b, wcfg.vace_in_channels, f, h, w),
                                                            jnp.float32)
    elif form.variant == "animate":
        size = wcfg.motion_encoder_size
        kwargs["pose_hidden_states"] = jax.random.normal(keys[5], (b, cfg.z_dim, f - 1, h, w), jnp.float32)
        kwargs["face_pixel_values"] = jax.random.uniform(keys[6], (b, 3, _ANIMATE_FACE_FRAMES, size, size),
                                                         jnp.float32, -1.0, 1.0)
    return Case((models[0], latents, pe, npe), kwargs, models, 2 * b)


def variant_cache_kwargs(case: Case, abstract: bool = False) -> dict:
    """The VACE / Animate keyword inputs of ``compute_kv_cache`` at the CFG batch (abstract: shapes only)."""
    import jax
    import jax.numpy as jnp

    out = {}
    for name in ("control_hidden_states", "pose_hidden_states", "face_pixel_values"):
        if name in case.kwargs:
            x = case.kwargs[name]
            shape = (case.context_batch, *x.shape[1:])
            out[name] = jax.ShapeDtypeStruct(shape, x.dtype) if abstract else jnp.concatenate([x, x])
    if "control_hidden_states" in out:
        out["num_latent_frames"] = case.args[1].shape[2]
    return out


def split_kwargs(kwargs: dict) -> tuple[dict, dict]:
    """(static, traced) keyword arguments of ``sample``: arrays and models are traced."""
    traced_names = ("model_2", "image_embeds", "condition", "control_hidden_states", "pose_hidden_states",
                    "face_pixel_values")
    return ({k: v for k, v in kwargs.items() if k not in traced_names},
            {k: v for k, v in kwargs.items() if k in traced_names})


def hand_cache_bytes(case: Case, form: Form, cfg: BenchConfig) -> int:
    """Bytes of the KVCache pytrees ``sample(kv_cache=True)`` builds (one per expert, CFG batch)."""
    import jax
    import jax.numpy as jnp

    from kvhoist.bench.timing import tree_bytes

    text_tokens = case.args[2].shape[1]
    ctx = jax.ShapeDtypeStruct((case.context_batch, text_tokens, cfg.text_dim), jnp.float32)
    img = None
    if form.i2v:
        img = jax.ShapeDtypeStruct((case.context_batch, 257, cfg.image_dim), jnp.float32)
    extra = variant_cache_kwargs(case, abstract=True)
    static = {k: extra.pop(k) for k in [k for k in extra if k == "num_latent_frames"]}
    return sum(tree_bytes(jax.eval_shape(lambda c, i, e: m.compute_kv_cache(c, i, **e, **static), ctx, img, extra))
               for m in case.models)


