"""Compilation targets: which matrix-unit tile a device wants token axes padded to.

TPU MXUs multiply in square tiles; a token axis that is a multiple of the tile fills them. maxdiffusion
pads Wan's 257 CLIP image tokens to 384 (128-aligned) on TPU v4/v5e/v5p and to 512 (256-aligned) on
v6e (Trillium) and v7x (Ironwood), choosing by ``"7x" in device_kind or "v6 lite" in device_kind``.
:func:`kvhoist.repad_tokens` uses a :class:`Target`'s ``mxu_tile`` to rewrite that padding.

``device_kind`` strings, as JAX reports them (``jax/_src/mesh_utils.py``, ``jax/_src/test_util.py``):
``"TPU v4"``, ``"TPU v5 lite"`` (v5e; ``"TPU v5e"`` also listed), ``"TPU v5"`` / ``"TPU v5p"`` (v5p),
``"TPU v6 lite"`` (v6e), ``"TPU7x"`` (v7x).

Example:
    >>> from kvhoist.targets import get_target, detect_target
    >>> get_target("trillium").mxu_tile
    256
    >>> detect_target().name          # on a CPU host
    'cpu'
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Sequence

from kvhoist.errors import KvhoistError

__all__ = ["Target", "TARGETS", "UnknownTargetError", "get_target", "detect_target", "target_for_device_kind"]


@dataclasses.dataclass(frozen=True)
class Target:
    """A device generation and the token alignment its matrix unit prefers.

    Attributes:
      name: canonical short name, e.g. ``"v6e"``.
      mxu_tile: the alignment image-token axes are padded to (``None``: no preference; the layout
        pass then leaves programs alone unless given ``alignment=``).
      device_kinds: ``jax.Device.device_kind`` strings of this generation (matched exactly, ignoring
        case and spaces).
      description: marketing name and notes.
      aliases: other accepted names (``"trillium"``, ``"tpu v6e"``, ...).
    """

    name: str
    mxu_tile: int | None
    device_kinds: tuple[str, ...] = ()
    description: str = ""
    aliases: tuple[str, ...] = ()


def _t(name, tile, kinds, desc, aliases) -> Target:
    return Target(name, tile, tuple(kinds), desc, tuple(aliases))


#: Known targets by canonical name.
TARGETS: dict[str, Target] = {t.name: t for t in (
    _t("v4", 128, ["TPU v4", "TPU v4 lite"], "TPU v4: 128x128 MXUs", ["tpu v4", "tpuv4"]),
    _t("v5e", 128, ["TPU v5 lite", "TPU v5e"], "TPU v5e (v5 lite): 128x128 MXUs",
       ["tpu v5e", "v5 lite", "v5lite", "tpu v5 lite", "v5litepod"]),
    _t("v5p", 128, ["TPU v5p", "TPU v5"], "TPU v5p: 128x128 MXUs", ["tpu v5p", "v5"]),
    _t("v6e", 256, ["TPU v6 lite", "TPU v6e"], "TPU v6e Trillium: 256x256 MXUs",
       ["trillium", "tpu v6e", "v6 lite", "tpu v6 lite", "v6"]),
    _t("v7x", 256, ["TPU7x", "TPU v7x", "TPU 7x", "TPU v7"], "TPU v7x Ironwood: 256x256 MXUs",
       ["ironwood", "7x", "tpu7x", "tpu v7x", "v7"]),
    _t("cpu", None, ["cpu"], "host CPU: no token alignment preference", ["host"]),
    _t("gpu", None, [], "NVIDIA/AMD GPU: no token alignment preference (the pass does nothing by default)",
       ["cuda", "rocm"]),
)}


def _norm(s: str) -> str:
    return "".join(str(s).lower().split())


def _by_alias() -> dict[str, Target]:
    table: dict[str, Target] = {}
    for t in TARGETS.values():
        for key in (t.name, *t.aliases):
            table[_norm(key)] = t
    return table


class UnknownTargetError(KvhoistError, KeyError):
    """An unknown target name; the message lists the known names and close matches.

    A :class:`kvhoist.KvhoistError` (so a ``ValueError``) and a ``KeyError`` (a failed registry
    lookup): either ``except`` clause catches it.
    """

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


def get_target(name_or_target: "str | Target") -> Target:
    """The :class:`Target` called ``name_or_target`` (a name, an alias, or a Target itself).

    Raises:
      UnknownTargetError: unknown name, listing the known ones and close matches.
    """
    if isinstance(name_or_target, Target):
        return name_or_target
    if not isinstance(name_or_target, str):
        raise TypeError(f"target must be a name or a kvhoist.targets.Target, got {type(name_or_target).__name__}")
    table = _by_alias()
    hit = table.get(_norm(name_or_target))
    if hit is not None:
        return hit
    close = difflib.get_close_matches(_norm(name_or_target), list(table), n=4, cutoff=0.5)
    names = dict.fromkeys(table[c].name for c in close)
    hint = f"; did you mean {', '.join(map(repr, names))}?" if names else ""
    raise UnknownTargetError(f"unknown target {name_or_target!r}{hint} (known: {', '.join(TARGETS)}; "
                             f"or pass a kvhoist.targets.Target)")


def target_for_device_kind(device_kind: str, platform: str = "") -> Target:
    """The target of a ``jax.Device.device_kind`` string (``platform`` helps for non-TPU devices).

    Exact (case/space-insensitive) matches first; then maxdiffusion's substring rule, so that a
    future "TPU v6 lite (something)" still maps to v6e. Unknown TPUs fall back to a 128 tile, the
    alignment every TPU generation so far handles well; unknown non-TPU devices to ``cpu``/``gpu``.
    """
    kind = _norm(device_kind)
    for t in TARGETS.values():
        if any(_norm(k) == kind for k in t.device_kinds):
            return t
    if "7x" in kind or "v7" in kind:
        return TARGETS["v7x"]
    if "v6lite" in kind or "v6e" in kind:
        return TARGETS["v6e"]
    if "v5lite" in kind or "v5e" in kind:
        return TARGETS["v5e"]
    if "v5p" in kind or kind.endswith("v5"):
        return TARGETS["v5p"]
    if "v4" in kind:
        return TARGETS["v4"]
    plat = _norm(platform)
    if "tpu" in kind or plat == "tpu":
        return Target(f"tpu({device_kind})", 128, (device_kind,), "unknown TPU generation: 128 tile assumed")
    if plat in ("gpu", "cuda", "rocm") or any(w in kind for w in ("nvidia", "amd", "gpu", "tesla", "h100", "a100")):
        return TARGETS["gpu"]
    return TARGETS["cpu"]


def detect_target(devices: Sequence[Any] | None = None) -> Target:
    """The target of ``devices[0]`` (default ``jax.devices()[0]``), from its ``device_kind``."""
    if devices is None:
        import jax

        devices = jax.devices()
    dev = devices[0]
    return target_for_device_kind(getattr(dev, "device_kind", ""), getattr(dev, "platform", ""))
