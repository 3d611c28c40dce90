"""kvhoist.targets: device_kind strings -> TPU generation -> MXU tile; names and errors."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import kvhoist
from kvhoist.targets import TARGETS, Target, UnknownTargetError, detect_target, get_target, target_for_device_kind

# device_kind strings as JAX reports them (jax/_src/mesh_utils.py, jax/_src/test_util.py).
DEVICE_KINDS = [
    ("TPU v4", "v4", 128),
    ("TPU v4 lite", "v4", 128),
    ("TPU v5 lite", "v5e", 128),
    ("TPU v5e", "v5e", 128),
    ("TPU v5", "v5p", 128),
    ("TPU v5p", "v5p", 128),
    ("TPU v6 lite", "v6e", 256),
    ("TPU v6e", "v6e", 256),
    ("TPU7x", "v7x", 256),
    ("TPU v7x", "v7x", 256),
    ("TPU 7x", "v7x", 256),
    ("cpu", "cpu", None),
]


@pytest.mark.parametrize("kind,name,tile", DEVICE_KINDS)
def test_device_kind_maps_to_generation(kind, name, tile):
    t = target_for_device_kind(kind, "tpu" if "TPU" in kind else "cpu")
    assert (t.name, t.mxu_tile) == (name, tile)
    # maxdiffusion's own rule agrees on the tile: 256 iff "7x" or "v6 lite" in device_kind.
    if "TPU" in kind and kind not in ("TPU v6e", "TPU v7x"):
        assert (t.mxu_tile == 256) == ("7x" in kind or "v6 lite" in kind)


def test_detect_target_reads_first_device():
    dev = SimpleNamespace(device_kind="TPU v6 lite", platform="tpu")
    assert detect_target([dev]).name == "v6e"
    assert detect_target([SimpleNamespace(device_kind="NVIDIA H100 80GB HBM3", platform="gpu")]).name == "gpu"
    import jax

    here = jax.devices()[0].platform           # this host: cpu in CI, gpu on a GPU machine
    if here in ("cpu", "gpu"):
        assert detect_target().name == here


def test_unknown_tpu_generation_falls_back_to_128():
    t = target_for_device_kind("TPU v9 experimental", "tpu")
    assert t.mxu_tile == 128 and "TPU v9" in t.name


@pytest.mark.parametrize("alias,name", [("trillium", "v6e"), ("Ironwood", "v7x"), ("TPU v5 lite", "v5e"),
                                        ("v6e", "v6e"), ("tpu v5p", "v5p"), ("cuda", "gpu")])
def test_names_and_aliases(alias, name):
    assert get_target(alias).name == name


def test_target_objects_pass_through_and_are_frozen():
    custom = Target("my-asic", 64, ("My ASIC",), "a test chip")
    assert get_target(custom) is custom
    with pytest.raises(Exception):
        custom.mxu_tile = 32  # type: ignore[misc]


def test_unknown_name_lists_known_ones_and_close_matches():
    with pytest.raises(UnknownTargetError) as err:
        get_target("v6f")
    msg = str(err.value)
    assert "did you mean 'v6e'" in msg and all(n in msg for n in TARGETS)
    assert isinstance(err.value, kvhoist.KvhoistError) and isinstance(err.value, KeyError)
    with pytest.raises(ValueError, match="known: v4, v5e, v5p, v6e, v7x, cpu, gpu"):
        kvhoist.hoist_invariants(lambda x: x, target="tpu-v99")


def test_tiles():
    assert {n: t.mxu_tile for n, t in TARGETS.items()} == {
        "v4": 128, "v5e": 128, "v5p": 128, "v6e": 256, "v7x": 256, "cpu": None, "gpu": None}
