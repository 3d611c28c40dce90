"""Shared fixtures: tiny random diffusers Wan transformers saved with save_pretrained.

`make_diffusers_wan(config, ...)` is a plain helper (importable as `from conftest import ...` is not needed:
use the `diffusers_wan` fixture, which returns it). torch/diffusers are imported lazily, and a test that
uses the fixture is skipped where they are missing.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import pytest

# Internal kvhoist failures raise in tests instead of falling back to the unoptimised program (tests
# of the fallback itself set KVHOIST_STRICT=0 with monkeypatch).
os.environ.setdefault("KVHOIST_STRICT", "1")

# The property tests draw the same examples on every run (CI must not pass or fail by chance); set
# KVHOIST_FUZZ_RANDOM=1 to explore new ones (with `-m slow` for the long runs).
try:
    from hypothesis import settings as _hyp_settings
except ImportError:  # hypothesis is a test extra
    pass
else:
    _hyp_settings.register_profile("kvhoist", derandomize=os.environ.get("KVHOIST_FUZZ_RANDOM") != "1")
    _hyp_settings.load_profile("kvhoist")


def _as_diffusers_dict(config: Any) -> dict:
    if isinstance(config, dict):
        return dict(config)
    if dataclasses.is_dataclass(config):  # a wan_ref.WanConfig
        return config.to_diffusers()
    raise TypeError(f"config must be a dict or WanConfig, got {type(config)}")


def make_diffusers_wan(config: Any, path: str | os.PathLike | None = None, *, seed: int = 0, std: float = 0.1,
                       max_shard_size: str | int | None = None):
    """A random `WanTransformer3DModel` (fp32, eval mode), optionally saved with `save_pretrained(path)`.

    Every weight is redrawn so that nothing is trivially zero or one: matrices/biases ~ N(0, std),
    norm weights ~ 1 + N(0, 0.1), scale_shift_tables and the FLF2V pos_embed ~ N(0, 0.5).

    Args:
      config: diffusers config dict (`WanTransformer3DModel(**config)`) or a `wan_ref.WanConfig`.
      path: if given, `save_pretrained(path, max_shard_size=...)` is called.
      seed: torch seed for the weights.
      std: standard deviation of the weight matrices and biases.
      max_shard_size: e.g. "20KB" to force a sharded checkpoint with an index file.

    Returns:
      The torch module.
    """
    return make_diffusers_transformer("WanTransformer3DModel", config, path, seed=seed, std=std,
                                      max_shard_size=max_shard_size)


@pytest.fixture
def diffusers_wan():
    """Returns `make_diffusers_wan` (skips the test without torch + diffusers)."""
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    return make_diffusers_wan


def make_diffusers_transformer(class_name: str, config: Any, path: str | os.PathLike | None = None, *, seed: int = 0,
                               std: float = 0.1, unit_std_prefixes: tuple[str, ...] = (),
                               max_shard_size: str | int | None = None):
    """A random diffusers transformer of class `class_name` (e.g. "WanVACETransformer3DModel"), fp32, eval mode.

    Weights as `make_diffusers_wan`, except parameters whose name starts with one of `unit_std_prefixes`
    (e.g. "motion_encoder.", whose layers rescale their own weights) are drawn ~ N(0, 1).
    Optionally saved with `save_pretrained(path, max_shard_size=...)`.
    """
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    model = getattr(diffusers, class_name)(**_as_diffusers_dict(config)).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            leaf = name.split(".")[-2] if "." in name else name
            if name.startswith(unit_std_prefixes):
                param.copy_(noise)
            elif "norm" in leaf and name.endswith("weight"):
                param.copy_(1.0 + 0.1 * noise)
            elif name.endswith("scale_shift_table") or name.endswith("pos_embed"):
                param.copy_(0.5 * noise)
            else:
                param.copy_(std * noise)
    if path is not None:
        kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
        model.save_pretrained(os.fspath(path), **kwargs)
    return model
