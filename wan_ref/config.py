"""`WanConfig`: the hyper-parameters of diffusers' `WanTransformer3DModel`, plus wan_ref's own knobs.

Field names match the keys of the `config.json` that `WanTransformer3DModel.save_pretrained` writes, so a
config round-trips through `from_diffusers` / `to_diffusers` without a renaming table.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Mapping

import jax.numpy as jnp

# diffusers' config.json carries bookkeeping keys (and two legacy knobs that WanTransformer3DModel accepts but
# whose only supported value is the default); these are not model hyper-parameters.
_IGNORED_DIFFUSERS_KEYS = frozenset({"_class_name", "_diffusers_version", "_name_or_path", "qk_norm"})

#: `WanConfig.attention` values: plain-jnp attention, or kvhoist's splash-attention primitive.
ATTENTION_IMPLS = ("xla", "splash")
#: wan_ref's own fields (not in diffusers' config.json).
WAN_REF_OPTIONS = ("scan_layers", "image_token_alignment", "param_dtype", "dtype", "attention")


@dataclasses.dataclass(frozen=True)
class WanConfig:
    """Hyper-parameters of a Wan 2.1 / 2.2 video transformer.

    The first block of fields mirrors diffusers' `WanTransformer3DModel.__init__` arguments (same names,
    same meaning). The rest are wan_ref options:

    Attributes:
      scan_layers: True stores the blocks' parameters stacked on a leading [num_layers] axis and runs them
        as ONE `jax.lax.scan`; False keeps a Python list of blocks and unrolls the loop. Same numbers.
      image_token_alignment: the embedded image tokens (257 per image, 514 for FLF2V) are zero-padded to a
        multiple of this and the padding is masked out of the image-branch attention (1 = no padding).
      param_dtype: storage dtype of the parameters, except diffusers' fp32 islands (`time_embedder`,
        `scale_shift_table`, `norm1/2/3`), which stay float32 as in `from_pretrained(torch_dtype=...)`.
      dtype: activation dtype of the residual stream and matmuls.
      attention: "xla" (einsum + float32 softmax in plain jnp, the default) or "splash": every attention
        (self, text and image cross-attention, Animate's face adapters) is one `kvhoist.kernels.attention`
        equation lowered to Pallas splash attention (Mosaic on TPU, interpret mode elsewhere); the padded
        image tokens are masked by its `kv_valid`. Same numbers up to float rounding.
    """

    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    eps: float = 1e-6
    image_dim: int | None = None
    added_kv_proj_dim: int | None = None
    rope_max_seq_len: int = 1024
    pos_embed_seq_len: int | None = None
    # wan_ref options (not in diffusers' config.json).
    scan_layers: bool = True
    image_token_alignment: int = 128
    param_dtype: Any = jnp.float32
    dtype: Any = jnp.float32
    attention: str = "xla"

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"attention must be one of {', '.join(map(repr, ATTENTION_IMPLS))}, got "
                             f"{self.attention!r}")
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        if len(self.patch_size) != 3:
            raise ValueError(f"patch_size must have 3 entries (t, h, w), got {self.patch_size}")
        d = self.attention_head_dim
        if d % 2 or (d - 4 * (d // 6)) % 2 or d // 6 == 0:
            raise ValueError(
                f"attention_head_dim={d} cannot be split for 3D RoPE (t = d - 2h, h = w = 2*(d//6), all even "
                "and positive); use a multiple of 6 such as 12 or 128")
        if self.image_token_alignment < 1:
            raise ValueError(f"image_token_alignment must be >= 1, got {self.image_token_alignment}")
        if (self.image_dim is None) != (self.added_kv_proj_dim is None):
            raise ValueError(
                "image_dim and added_kv_proj_dim go together (both set for Wan 2.1 I2V/FLF2V, both None "
                f"otherwise); got image_dim={self.image_dim}, added_kv_proj_dim={self.added_kv_proj_dim}")
        if self.pos_embed_seq_len is not None and self.image_dim is None:
            raise ValueError("pos_embed_seq_len (FLF2V) needs image_dim to be set")

    @property
    def inner_dim(self) -> int:
        """Model width D = num_attention_heads * attention_head_dim."""
        return self.num_attention_heads * self.attention_head_dim

    @property
    def has_image_branch(self) -> bool:
        """Whether cross-attention has the CLIP-image branch (Wan 2.1 I2V / FLF2V)."""
        return self.added_kv_proj_dim is not None

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any], **overrides: Any) -> "WanConfig":
        """Builds a config from diffusers' `config.json` contents (a dict); `overrides` set wan_ref options.

        Unknown keys are ignored with a warning, as diffusers does. Called on `WanConfig` with a VACE or
        Animate config (by `_class_name`, or by their own keys such as `vace_layers`), it returns
        `wan_ref.vace.WanVACEConfig` / `wan_ref.animate.WanAnimateConfig`.

        Raises:
          ValueError: for an unsupported `qk_norm` or inconsistent values.
        """
        if cls is WanConfig:
            variant = _variant_config_class(config)
            if variant is not None:  # VACE / Animate fields would otherwise be dropped
                return variant.from_diffusers(config, **overrides)
        names = {f.name for f in dataclasses.fields(cls)}
        qk_norm = config.get("qk_norm", "rms_norm_across_heads")
        if qk_norm != "rms_norm_across_heads":
            raise ValueError(f"only qk_norm='rms_norm_across_heads' is supported (diffusers' default), got {qk_norm!r}")
        unknown = sorted(k for k in config if k not in names and k not in _IGNORED_DIFFUSERS_KEYS)
        if unknown:
            # diffusers itself only warns about unexpected config keys; hub configs carry legacy ones.
            warnings.warn(f"ignoring unknown WanTransformer3DModel config keys {unknown}", stacklevel=2)
        kwargs = {k: v for k, v in config.items() if k in names}
        if kwargs.get("out_channels") is None:
            # diffusers: `out_channels = out_channels or in_channels`.
            kwargs["out_channels"] = kwargs.get("in_channels", cls.in_channels)
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_diffusers(self) -> dict[str, Any]:
        """The `WanTransformer3DModel(**config)` keyword arguments (no wan_ref options)."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name in WAN_REF_OPTIONS:
                continue
            value = getattr(self, f.name)
            out[f.name] = list(value) if f.name == "patch_size" else value
        out["qk_norm"] = "rms_norm_across_heads"
        return out

    def replace(self, **changes: Any) -> "WanConfig":
        """A copy with `changes` applied (dataclasses.replace)."""
        return dataclasses.replace(self, **changes)


# VACE / Animate: (module, config class, a config key only that variant has).
_VARIANTS = {
    "WanVACETransformer3DModel": ("wan_ref.vace", "WanVACEConfig", "vace_layers"),
    "WanAnimateTransformer3DModel": ("wan_ref.animate", "WanAnimateConfig", "inject_face_latents_blocks"),
}


def _variant_config_class(config: Mapping[str, Any]) -> type | None:
    """The VACE / Animate config class a diffusers config dict describes, or None for a plain Wan."""
    import importlib

    for class_name, (module, name, key) in _VARIANTS.items():
        if config.get("_class_name") == class_name or key in config:
            return getattr(importlib.import_module(module), name)
    return None
