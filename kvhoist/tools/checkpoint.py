"""A diffusers checkpoint folder as a SPEC: the sampler a Wan pipeline runs, from its JSON files only.

``kvhoist report ./Wan2.1-T2V-1.3B-Diffusers`` (or its ``transformer/`` folder) traces ``wan_ref.sample``
over an *abstract* model whose shapes come from ``transformer/config.json`` (and ``transformer_2/`` for
Wan 2.2 A14B): no weight file is opened, so a 14B checkpoint resolves in seconds. The sampler settings come
from the pipeline's files where present:

* ``model_index.json``: which transformers there are (``transformer_2`` null or absent: one expert),
  ``boundary_ratio`` (the A14B expert switch), ``expand_timesteps`` (TI2V's per-token timesteps);
* ``scheduler/scheduler_config.json``: ``UniPCMultistepScheduler`` -> ``unipc`` with its ``flow_shift``,
  ``FlowMatchEulerDiscreteScheduler`` -> ``euler`` with its ``shift``;
* ``vae/config.json``: the VAE's spatial / temporal factors (latent channels: the transformer's ``out_channels``);

and otherwise diffusers' ``WanPipeline.__call__`` defaults (480x832 px, 81 frames, 50 steps, guidance 5.0,
flow shift 3.0). A transformer folder inside a pipeline reads its parent's files. Any other component
(``vae/``, ``text_encoder/``, ``image_encoder/``, a tokenizer or scheduler folder) is refused in one line
naming the folder to pass instead.

Example:
    >>> preset, scheduler = checkpoint_preset("./Wan2.2-T2V-A14B-Diffusers")
    >>> preset.two_experts, preset.boundary_ratio, preset.flow_shift
    (True, 0.875, 12.0)
"""

from __future__ import annotations

import json
import os
from typing import Any

__all__ = ["CheckpointFolderError", "checkpoint_preset", "PIPELINE_DEFAULTS"]

#: ``WanPipeline.__call__``'s defaults (diffusers 0.3x-0.4x), used where the checkpoint says nothing.
PIPELINE_DEFAULTS = dict(height=480, width=832, num_frames=81, num_inference_steps=50, guidance_scale=5.0,
                         flow_shift=3.0)

#: scheduler class in ``scheduler_config.json`` -> (``wan_ref.sample``'s scheduler name, its shift key).
_SCHEDULERS = {"UniPCMultistepScheduler": ("unipc", "flow_shift"),
               "FlowMatchEulerDiscreteScheduler": ("euler", "shift")}


class CheckpointFolderError(ValueError):
    """A folder that is no Wan checkpoint, or a file in it that cannot be read; the message is one line
    (the CLI prints it as a usage error: ``kvhoist.tools.specs.SpecError``)."""


def _error(message: str) -> Exception:
    return CheckpointFolderError(message)


def _read(path: str) -> dict:
    """The JSON object in ``path``; one-line ``SpecError`` when it cannot be read."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise _error(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise _error(f"{path}: cannot read: {getattr(err, 'strerror', None) or err}") from None
    if not isinstance(data, dict):
        raise _error(f"{path}: expected a JSON object, got a {type(data).__name__}")
    return data


def _class_name(config: dict) -> str:
    """diffusers' ``_class_name``, else transformers' ``architectures[0]`` (text / image encoders)."""
    name = config.get("_class_name")
    if not name and isinstance(config.get("architectures"), list) and config["architectures"]:
        name = config["architectures"][0]
    return str(name or "an unnamed model")


def _transformer_config(folder: str) -> Any:
    """The ``wan_ref`` config of a transformer folder's ``config.json`` (refuses other components)."""
    from wan_ref.load import model_classes

    raw = _read(os.path.join(folder, "config.json"))
    name = _class_name(raw)
    try:
        _model_cls, config_cls = model_classes({**raw, "_class_name": name}, folder)
    except ValueError:
        parent = os.path.dirname(os.path.abspath(folder))
        hint = (f"pass the pipeline folder {parent} or its transformer/ subfolder"
                if os.path.isfile(os.path.join(parent, "model_index.json")) else
                "pass a Wan pipeline folder or its transformer/ subfolder")
        raise _error(f"{folder} holds a {name}, not a Wan transformer: {hint}") from None
    try:
        return config_cls.from_diffusers(raw)
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise _error(f"{os.path.join(folder, 'config.json')}: not a usable {name} config: {first}") from None


def _component(index: dict, name: str) -> bool:
    """Whether ``model_index.json`` lists component ``name`` (``[null, null]`` means absent)."""
    entry = index.get(name)
    return isinstance(entry, list) and len(entry) == 2 and entry[1] is not None


def checkpoint_preset(folder: str) -> Any:
    """A :class:`wan_ref.presets.Preset` for a diffusers Wan checkpoint folder, from its JSON files only.

    Args:
      folder: a pipeline root (``model_index.json``, ``transformer/``, optionally ``transformer_2/``,
        ``scheduler/``, ``vae/``) or a transformer folder (``config.json`` of a Wan transformer class).

    Returns:
      ``(preset, scheduler)``: a ``Preset`` named ``folder`` and ``wan_ref.sample``'s scheduler name
      (``"unipc"`` / ``"euler"``) of the pipeline's scheduler.

    Raises:
      CheckpointFolderError: one line: not a Wan pipeline or transformer folder (a VAE, a text encoder, ...), or a
        file that cannot be read.
    """
    from wan_ref.presets import Preset

    folder = folder.rstrip("/\\") or folder
    index_file = os.path.join(folder, "model_index.json")
    if os.path.isfile(index_file):
        root, index = folder, _read(index_file)
        if not _component(index, "transformer"):
            raise _error(f"{folder}: model_index.json lists no transformer (a {index.get('_class_name', '?')} "
                         f"pipeline): kvhoist traces Wan transformer pipelines")
        config = _transformer_config(os.path.join(folder, "transformer"))
        second = (_transformer_config(os.path.join(folder, "transformer_2"))
                  if _component(index, "transformer_2") else None)
    elif os.path.isfile(os.path.join(folder, "config.json")):
        config, second = _transformer_config(folder), None
        parent = os.path.dirname(os.path.abspath(folder))
        root = parent if os.path.isfile(os.path.join(parent, "model_index.json")) else None
        index = _read(os.path.join(parent, "model_index.json")) if root else {}
    else:
        what = next((f for f in ("scheduler_config.json", "tokenizer_config.json", "preprocessor_config.json")
                     if os.path.isfile(os.path.join(folder, f))), None)
        raise _error(f"{folder}: " + (f"a {what.split('_')[0]} folder ({what}), not a Wan transformer: " if what
                                      else "no model_index.json or config.json: not a diffusers checkpoint; ")
                     + "pass a Wan pipeline folder or its transformer/ subfolder")

    scheduler, flow_shift = "unipc", PIPELINE_DEFAULTS["flow_shift"]
    sched_file = os.path.join(root, "scheduler", "scheduler_config.json") if root else ""
    if root and os.path.isfile(sched_file):
        sched = _read(sched_file)
        scheduler, key = _SCHEDULERS.get(sched.get("_class_name"), ("unipc", "flow_shift"))
        if isinstance(sched.get(key), (int, float)):
            flow_shift = float(sched[key])
    vae = {}
    if root and os.path.isfile(os.path.join(root, "vae", "config.json")):
        vae = _read(os.path.join(root, "vae", "config.json"))
    z_dim = int(config.out_channels)          # the latents the transformer denoises (== the VAE's z_dim)
    spatial = int(vae.get("scale_factor_spatial") or (16 if z_dim == 48 else 8))
    temporal = int(vae.get("scale_factor_temporal") or 4)
    expand = bool(index.get("expand_timesteps", False))
    task = {"WanVACEConfig": "vace", "WanAnimateConfig": "animate"}.get(type(config).__name__)
    if task is None:
        task = "ti2v" if expand else ("i2v" if config.image_dim is not None else "t2v")
    boundary = index.get("boundary_ratio") if second is not None else None
    if second is not None and not isinstance(boundary, (int, float)):
        raise _error(f"{index_file}: two transformers but no boundary_ratio (the step at which the second "
                     f"expert takes over)")
    d = PIPELINE_DEFAULTS
    preset = Preset(name=folder, config=config, task=task, flow_shift=flow_shift, guidance_scale=d["guidance_scale"],
                    height=d["height"], width=d["width"], num_frames=d["num_frames"], config_2=second,
                    boundary_ratio=float(boundary) if second is not None else None,
                    guidance_scale_2=d["guidance_scale"] if second is not None else None,
                    num_inference_steps=d["num_inference_steps"], vae_scale_factor_spatial=spatial,
                    vae_scale_factor_temporal=temporal, z_dim=z_dim, expand_timesteps=expand)
    return preset, scheduler
