"""wan_ref: a JAX/Flax NNX reference of diffusers' Wan 2.1 / 2.2 video transformer.

Public API (one import line per module, so other modules can add theirs):
"""

from wan_ref.animate import AnimateCache, WanAnimateConfig, WanAnimateModel
from wan_ref.config import WanConfig
from wan_ref.load import load_diffusers, save_diffusers
from wan_ref.model import KVCache, WanModel
from wan_ref.presets import PRESETS, Preset, get_preset
from wan_ref.sample import sample
from wan_ref.schedulers import SCHEDULERS, FlowMatchEuler, UniPCMultistep, make_scheduler
from wan_ref.vace import VACECache, WanVACEConfig, WanVACEModel

__all__ = [
    "AnimateCache",
    "VACECache",
    "WanAnimateConfig",
    "WanAnimateModel",
    "WanVACEConfig",
    "WanVACEModel",
    "FlowMatchEuler",
    "KVCache",
    "PRESETS",
    "Preset",
    "SCHEDULERS",
    "UniPCMultistep",
    "WanConfig",
    "WanModel",
    "get_preset",
    "load_diffusers",
    "make_scheduler",
    "sample",
    "save_diffusers",
]
