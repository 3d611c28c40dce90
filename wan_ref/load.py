"""diffusers checkpoints <-> `WanModel`.

Reads (and writes) exactly what `WanTransformer3DModel.save_pretrained(path)` produces: `config.json` plus
`diffusion_pytorch_model.safetensors`, or shards listed in `diffusion_pytorch_model.safetensors.index.json`.

Key mapping (wan_ref parameter path -> diffusers key) is a small rename table plus two layout rules:
Linear kernels are stored [in, out] (torch weight [out, in] transposed) and the patch-embedding kernel is
[kt, kh, kw, C_in, D] (torch Conv3d weight [D, C_in, kt, kh, kw]). With `scan_layers` the per-block
tensors `blocks.{i}.*` are stacked on a leading [num_layers] axis.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any, Iterator

import jax.numpy as jnp
import numpy as np
from flax import nnx

from wan_ref.config import ATTENTION_IMPLS, WanConfig
from wan_ref.model import WanModel

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"

# wan_ref attribute -> diffusers module/parameter name.
_RENAME = {"kernel": "weight", "scale": "weight", "to_out": "to_out.0", "net_0_proj": "net.0.proj", "net_2": "net.2"}
# Keys diffusers itself ignores when loading (`_keys_to_ignore_on_load_unexpected`).
_IGNORED_KEYS = ("norm_added_q",)
# Modules whose `to_out` is a plain Linear in diffusers (not `to_out.0` of a ModuleList).
_PLAIN_TO_OUT = ("face_adapter",)
# diffusers `_class_name` -> (wan_ref module, model class, config class); None = this module's WanModel.
_MODEL_CLASSES = {
    "WanTransformer3DModel": None,
    "WanVACETransformer3DModel": ("wan_ref.vace", "WanVACEModel", "WanVACEConfig"),
    "WanAnimateTransformer3DModel": ("wan_ref.animate", "WanAnimateModel", "WanAnimateConfig"),
}


def _flat_params(tree: dict, prefix: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flat_params(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def _set(tree: dict, path: tuple, value: Any) -> None:
    for k in path[:-1]:
        tree = tree[k]
    tree[path[-1]] = value


def _diffusers_key(path: tuple) -> str:
    plain = path[0] in _PLAIN_TO_OUT
    return ".".join(p if plain and p == "to_out" else _RENAME.get(p, p) if isinstance(p, str) else str(p)
                    for p in path)


def _to_torch_layout(path: tuple, array: np.ndarray) -> np.ndarray:
    """One parameter (no layer axis) in diffusers' layout."""
    if path[-1] == "kernel" and array.ndim == 5:
        return np.transpose(array, (4, 3, 0, 1, 2))
    if path[-1] == "kernel":
        return array.T
    return array


def _from_torch_layout(path: tuple, array: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel" and array.ndim == 5:
        return np.transpose(array, (2, 3, 4, 1, 0))
    if path[-1] == "kernel":
        return array.T
    return array


def _entries(path: tuple, stacked: dict[str, int]) -> list[tuple[str, tuple]]:
    """(diffusers key, per-layer path) for one wan_ref parameter; several when its module list is stacked.

    `stacked` maps a top-level module list stored stacked (`blocks`, Animate's `face_adapter`) to its length.
    """
    if path[0] in stacked:
        return [(_diffusers_key((path[0], i) + path[1:]), path) for i in range(stacked[path[0]])]
    return [(_diffusers_key(path), path)]


def _stacked_lists(model_or_config: Any) -> dict[str, int]:
    """Top-level module lists that `model_or_config` stores stacked on a leading axis, with their lengths."""
    config = getattr(model_or_config, "config", model_or_config)
    if not config.scan_layers:
        return {}
    out = {"blocks": config.num_layers}
    if hasattr(config, "num_face_adapters"):
        out["face_adapter"] = config.num_face_adapters
    return out


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: unreadable, truncated or corrupt safetensors, malformed
    JSON, or a `config.json` whose values do not make a model. The message names the file."""


def model_classes(config: dict, path: str = "") -> tuple[type, type]:
    """(model class, config class) for a diffusers `config.json` dict, by its `_class_name`.

    Raises:
      ValueError: a class wan_ref does not implement (named, with the supported ones; for another
        component of a pipeline, such as the VAE or a UNet, the message says to pass the transformer).
    """
    import importlib

    name = config.get("_class_name", "WanTransformer3DModel")
    if not isinstance(name, str) or name not in _MODEL_CLASSES:
        hint = ""
        if not (isinstance(name, str) and "Transformer" in name):
            hint = (f" ({name} is not a Wan transformer: for a Wan pipeline repository pass its 'transformer' or "
                    "'transformer_2' subfolder)")
        raise ValueError(f"{path!r} holds a {name}; wan_ref loads {', '.join(_MODEL_CLASSES)} only{hint}")
    entry = _MODEL_CLASSES[name]
    if entry is None:
        return WanModel, WanConfig
    module = importlib.import_module(entry[0])
    return getattr(module, entry[1]), getattr(module, entry[2])


def _read_json(file: str, what: str) -> dict:
    """The JSON object in `file`; a `CheckpointError` naming the file if it cannot be read or parsed."""
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{file}: malformed {what} (not valid JSON: {err.msg} at line {err.lineno} column "
                              f"{err.colno}); restore it or save the model again") from None
    except (OSError, UnicodeDecodeError) as err:
        why = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise CheckpointError(f"{file}: cannot read {what}: {why}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: malformed {what}: expected a JSON object {{...}}, got a "
                              f"{type(data).__name__}")
    return data


def _read_config(path: str) -> dict:
    config_file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(config_file):
        pipeline = os.path.isfile(os.path.join(path, "model_index.json"))
        raise ValueError(
            f"no {CONFIG_NAME} in {path!r}: " + ("this is a diffusers pipeline folder; pass its 'transformer' "
                                                 "(or 'transformer_2') subfolder" if pipeline else
                                                 "pass the directory written by WanTransformer3DModel.save_pretrained "
                                                 "(for a pipeline repository, its 'transformer' or 'transformer_2' "
                                                 "subfolder)"))
    return _read_json(config_file, CONFIG_NAME)


def _config_from(raw: dict, config_cls: type, path: str, **options: Any) -> Any:
    """`config_cls.from_diffusers(raw, **options)`; a value it cannot use is a `CheckpointError` naming the file."""
    try:
        return config_cls.from_diffusers(raw, **options)
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointError(f"{os.path.join(path, CONFIG_NAME)}: malformed {CONFIG_NAME} for "
                              f"{raw.get('_class_name', 'WanTransformer3DModel')}: {type(err).__name__}: "
                              f"{first}") from None


def _safetensors_error(file_path: str, err: Exception) -> CheckpointError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return CheckpointError(f"{file_path}: not a readable safetensors file ({first}); it is truncated or corrupt: "
                           "download or save it again")


def _open_tensors(path: str) -> dict[str, tuple[str, Any]]:
    """key -> (file, safetensors handle) to read it from lazily, over one file or all shards."""
    from safetensors import safe_open

    index_file = os.path.join(path, INDEX_NAME)
    if os.path.isfile(index_file):
        weight_map = _read_json(index_file, INDEX_NAME).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index_file}: malformed {INDEX_NAME}: no 'weight_map' of tensor name -> "
                                  "shard file name")
        files = sorted(set(weight_map.values()))
    elif os.path.isfile(os.path.join(path, WEIGHTS_NAME)):
        files = [WEIGHTS_NAME]
    else:
        raise ValueError(
            f"no {WEIGHTS_NAME} or {INDEX_NAME} in {path!r}; re-save the transformer with "
            "save_pretrained(..., safe_serialization=True)")
    handles = {}
    for name in files:
        file_path = os.path.join(path, name)
        if not os.path.isfile(file_path):
            raise ValueError(f"checkpoint shard {name!r} listed in {INDEX_NAME} is missing from {path!r}")
        try:
            handle = safe_open(file_path, framework="flax")
            keys = list(handle.keys())
        except Exception as err:  # safetensors' SafetensorError derives from Exception only
            raise _safetensors_error(file_path, err) from None
        for key in keys:
            handles[key] = (file_path, handle)
    return handles


def _get_tensor(source: tuple[str, Any], key: str) -> np.ndarray:
    file_path, handle = source
    try:
        return handle.get_tensor(key)
    except Exception as err:
        raise _safetensors_error(file_path, err) from None


def load_diffusers(path: str | os.PathLike, *, dtype: Any = None, scan_layers: bool = True,
                   image_token_alignment: int = 128, attention: str = "xla") -> WanModel:
    """Loads a diffusers Wan transformer directory (`save_pretrained`) as a `WanModel` or subclass.

    `config.json`'s `_class_name` picks the model: `WanTransformer3DModel` -> `WanModel`,
    `WanVACETransformer3DModel` -> `wan_ref.vace.WanVACEModel`, `WanAnimateTransformer3DModel` ->
    `wan_ref.animate.WanAnimateModel`; any other class is refused (its tensors would be ignored otherwise).

    Args:
      path: directory holding config.json and the safetensors weights (single file or sharded).
      dtype: parameter and activation dtype (None: float32). fp32 islands stay float32 (see WanConfig).
      scan_layers, image_token_alignment: wan_ref options (see WanConfig).
      attention: "xla" or "splash" (`WanConfig.attention`: Pallas splash attention via `kvhoist.kernels`).

    Raises:
      CheckpointError: (a ValueError) a truncated or corrupt safetensors file, a malformed config.json or
        index (not JSON, not an object, values that make no model), each naming the file.
      ValueError: missing config.json or weights, an unsupported `_class_name` (named: a VAE, a UNet, ...),
        a missing tensor, or a tensor of the wrong shape (naming the diffusers key and the expected shape).

    Example:
      >>> model = load_diffusers("Wan2.1-T2V-1.3B-Diffusers/transformer", dtype=jnp.bfloat16)
    """
    path = os.fspath(path)
    if attention not in ATTENTION_IMPLS:  # the caller's argument, not the checkpoint's config.json
        raise ValueError(f"attention must be one of {', '.join(map(repr, ATTENTION_IMPLS))}, got {attention!r}")
    dtype = jnp.float32 if dtype is None else dtype
    raw = _read_config(path)
    model_cls, config_cls = model_classes(raw, path)
    config = _config_from(raw, config_cls, path, scan_layers=scan_layers, image_token_alignment=image_token_alignment,
                          param_dtype=dtype, dtype=dtype, attention=attention)
    tensors = _open_tensors(path)
    # Build the module without computing random weights; every leaf is replaced below.
    try:
        abstract = nnx.eval_shape(lambda: model_cls(config, rngs=nnx.Rngs(0)))
    except (TypeError, ValueError) as err:  # e.g. "num_layers": "two"
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointError(f"{os.path.join(path, CONFIG_NAME)}: malformed {CONFIG_NAME}: its values do not make a "
                              f"{model_cls.__name__}: {type(err).__name__}: {first}") from None
    graphdef, state = nnx.split(abstract)
    values = nnx.to_pure_dict(state)
    stacked = _stacked_lists(config)
    used = set()
    for p, spec in list(_flat_params(values)):
        per_layer_shape = tuple(spec.shape[1:]) if p[0] in stacked else tuple(spec.shape)
        expected = _to_torch_layout(p, np.empty(per_layer_shape, np.int8)).shape
        layers = []
        for key, _ in _entries(p, stacked):
            if key not in tensors:
                raise ValueError(f"checkpoint {path!r} has no tensor {key!r} (expected shape {list(expected)}); "
                                 "is config.json the one saved with these weights?")
            array = _get_tensor(tensors[key], key)
            if tuple(array.shape) != tuple(expected):
                raise ValueError(f"checkpoint tensor {key!r} has shape {list(array.shape)}, expected "
                                 f"{list(expected)} for this config.json")
            layers.append(_from_torch_layout(p, array).astype(spec.dtype))
            used.add(key)
        _set(values, p, jnp.stack(layers) if p[0] in stacked else layers[0])
    unused = sorted(k for k in tensors if k not in used and not any(s in k for s in _IGNORED_KEYS))
    if unused:
        warnings.warn(f"ignoring {len(unused)} checkpoint tensors wan_ref does not use, e.g. {unused[:3]}",
                      stacklevel=2)
    nnx.replace_by_pure_dict(state, values)
    return nnx.merge(graphdef, state)


def save_diffusers(model: WanModel, path: str | os.PathLike) -> None:
    """Writes `model` as diffusers' `save_pretrained` would (config.json + one safetensors file).

    `_class_name` is the model's diffusers class (`WanTransformer3DModel`, `WanVACETransformer3DModel` or
    `WanAnimateTransformer3DModel`).

    Parameters are saved in their stored dtype (bfloat16 stays bfloat16, fp32 islands stay float32).
    """
    from safetensors.flax import save_file

    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    config = model.config
    stacked = _stacked_lists(model)
    tensors = {}
    for p, value in _flat_params(nnx.to_pure_dict(nnx.state(model))):
        for i, (key, _) in enumerate(_entries(p, stacked)):
            layer = value[i] if p[0] in stacked else value
            # Through numpy for the transpose; jnp keeps bfloat16 intact via ml_dtypes.
            tensors[key] = jnp.asarray(np.ascontiguousarray(_to_torch_layout(p, np.asarray(layer))))
    save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
    class_name = getattr(model, "diffusers_class_name", "WanTransformer3DModel")
    diffusers_config = {"_class_name": class_name, "_diffusers_version": "0.42.1",
                        **config.to_diffusers()}
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(diffusers_config, f, indent=2)
