"""What the command line traces: a built-in Wan sampler preset, or a user's ``module:function``.

A SPEC is either

* a ``wan_ref`` preset name (``wan2.1-t2v-14b``, ``wan2.2-t2v-a14b``, ``tiny-t2v``, ...) plus sampler
  options (:class:`SamplerOptions`): the sampler ``wan_ref.sample`` over an *abstract* model — built
  with ``nnx.eval_shape``, so no weight is ever allocated and a 14B model traces in seconds; or
* ``package.module:function``: a function taking no arguments and returning ``(fun, args, kwargs)``;
  ``fun(*args, **kwargs)`` is traced. Array-like leaves (``jax.Array``, ``numpy.ndarray``,
  ``jax.ShapeDtypeStruct``, NNX modules) are traced inputs; any other keyword argument (ints, floats,
  strings, ``None``) is bound as a static Python value, like ``static_argnames`` in ``jax.jit``.

Both give a :class:`Program`, which traces to a closed jaxpr and runs the kvhoist pipeline on it.

Example:
    >>> prog = resolve("wan2.1-t2v-14b", SamplerOptions(loop="fori"))
    >>> before, after, report = prog.optimize()
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import sys
from typing import Any, Callable

import jax
import numpy as np


class SpecError(ValueError):
    """A SPEC or option the command line cannot use; the message is one line and names the fix."""


@dataclasses.dataclass(frozen=True)
class SamplerOptions:
    """How a preset's sampler is built. ``None`` means "the preset's default".

    Attributes:
      loop: ``"scan"`` or ``"fori"`` (the step loop of ``wan_ref.sample``).
      scan_layers: run the transformer blocks as one ``lax.scan`` (True) or unrolled (False).
      cfg: classifier-free guidance (two CFG halves in one batch); default on.
      steps: number of denoising steps.
      height, width, frames: video size in pixels / frames (latents follow the preset's VAE factors).
      scheduler: ``"unipc"`` or ``"euler"``; None: a checkpoint's own scheduler, ``"unipc"`` for presets.
      target: a TPU generation for the layout pass (``kvhoist.targets``), or None.
      dtype: ``"bfloat16"`` or ``"float32"`` for parameters and activations; default bf16 for real
        presets, f32 for ``tiny-*``.
      text_len: text tokens (512 as in Wan's pipelines).
      attention: ``WanConfig.attention`` for the preset's model(s) (``"xla"`` / ``"splash"``); None keeps
        the config's default. A value other than None/"xla" needs a wan_ref whose config has that field.
    """

    loop: str = "scan"
    scan_layers: bool = True
    cfg: bool = True
    steps: int | None = None
    height: int | None = None
    width: int | None = None
    frames: int | None = None
    scheduler: str | None = None
    target: str | None = None
    dtype: str | None = None
    text_len: int = 512
    attention: str | None = None

    def __post_init__(self) -> None:
        """Reject nonsensical values at construction, one clear ``SpecError`` (a ``ValueError``) each."""
        from wan_ref.schedulers import SCHEDULERS

        def bad(name: str, why: str) -> SpecError:
            return SpecError(f"SamplerOptions({name}={getattr(self, name)!r}): {why}")

        if self.loop not in ("scan", "fori"):
            raise bad("loop", "use 'scan' or 'fori' (a Python loop has no loop in its jaxpr to hoist from)")
        for name in ("scan_layers", "cfg"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "must be True or False")
        for name in ("steps", "height", "width", "frames"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise bad(name, "must be a positive integer, or None for the preset's default")
        if isinstance(self.text_len, bool) or not isinstance(self.text_len, int) or self.text_len < 1:
            raise bad("text_len", "must be a positive integer (Wan's pipelines use 512)")
        if self.scheduler is not None and self.scheduler not in SCHEDULERS:
            raise bad("scheduler", f"unknown scheduler; use one of {', '.join(map(repr, SCHEDULERS))}")
        if self.dtype is not None and self.dtype not in ("bfloat16", "bf16", "float32", "f32"):
            raise bad("dtype", "use 'bfloat16' or 'float32', or None for the preset's default")
        if self.target is not None and (not isinstance(self.target, str) or not self.target.strip()):
            raise bad("target", "must be a TPU generation name such as 'v5e' or 'v6e', or None")


@dataclasses.dataclass
class Program:
    """A function and (possibly abstract) arguments to trace, plus what the CLI prints about it.

    Attributes:
      name: the SPEC as given.
      description: one line: what is traced and at which size.
      fun: called as ``fun(*args, **kwargs)`` under ``jax.make_jaxpr``.
      args, kwargs: pytrees of arrays or ``jax.ShapeDtypeStruct``.
      target: a resolved ``kvhoist.targets`` target, or None.
      real_size: True for the full-size presets (numbers in the report are the real ones).
      steps: the sampler's step count (presets), else None.
      preset: the preset's name for a preset program (its ``fun`` accepts ``kv_cache=True``), else None.
    """

    name: str
    description: str
    fun: Callable
    args: tuple
    kwargs: dict
    target: Any = None
    real_size: bool = False
    steps: int | None = None
    preset: str | None = None
    _traced: Any = dataclasses.field(default=None, repr=False)

    def trace(self) -> Any:
        """The closed jaxpr of ``fun(*args, **kwargs)`` (traced once, then cached)."""
        if self._traced is None:
            fun, args, kwargs = self.fun, self.args, self.kwargs

            def call(a, k):
                return fun(*a, **k)

            try:
                self._traced = jax.make_jaxpr(call)(args, kwargs)
            except SpecError:
                raise
            except (TypeError, ValueError) as err:
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise SpecError(f"{self.name}: tracing failed: {type(err).__name__}: {first}") from err
        return self._traced

    def input_names(self) -> list[str | None]:
        """One readable name per input of :meth:`trace`'s jaxpr: the parameter of ``fun`` it was passed as,
        then its pytree path, NNX's ``.value`` dropped (``model.blocks.attn2.to_k.kernel``,
        ``model_2.blocks.attn2.to_v.bias``, ``prompt_embeds``); None where jax recorded no name."""
        import inspect
        import re

        from kvhoist import compat

        closed = self.trace()
        names = compat.arg_names(closed)
        if names is None:
            return [None] * len(compat.split_closed(closed)[2])
        try:
            params = [p.name for p in inspect.signature(self.fun).parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        except (TypeError, ValueError):  # a callable without an inspectable signature
            params = []
        out: list[str | None] = []
        for name in names:
            if name is None:
                out.append(None)
                continue
            # `trace` calls fun(*a, **k): jax names inputs a[i]... and k['name']...
            m = re.match(r"a\[(\d+)\](.*)$", name)
            if m:
                i = int(m.group(1))
                name = (params[i] if i < len(params) else f"args[{i}]") + m.group(2)
            else:
                m = re.match(r"k\['([^']*)'\](.*)$", name)
                if m:
                    name = m.group(1) + m.group(2)
            out.append(re.sub(r"\.value$", "", name))
        return out

    def optimize(self) -> tuple[Any, Any, Any]:
        """``(before, after, report)``: the traced jaxpr, the pipeline's output and its report."""
        from kvhoist.passes.pipeline import optimize

        before = self.trace()
        after, report = optimize(before, target=self.target)
        return before, after, report


# -- presets ----------------------------------------------------------------------------------------

def abstract_model(config: Any) -> Any:
    """A ``wan_ref.WanModel`` whose parameters are ``jax.ShapeDtypeStruct`` (no memory allocated).

    ``nnx.eval_shape`` traces the initialisers of every layer, which costs ~0.25 s per 14B block in
    Python; the layers are identical, so one is built and replicated (stacked for ``scan_layers``).
    """
    from flax import nnx

    from wan_ref.config import WanConfig
    from wan_ref.model import WanModel

    if type(config) is not WanConfig:
        # VACE / Animate: their extra module lists are not replicas of one block; build the whole model
        # abstractly (wan_ref's initialisers are cheap under eval_shape: ~2 s for 14B).
        from wan_ref.animate import WanAnimateConfig, WanAnimateModel
        from wan_ref.vace import WanVACEConfig, WanVACEModel

        classes = {WanVACEConfig: WanVACEModel, WanAnimateConfig: WanAnimateModel}
        if type(config) not in classes:
            raise SpecError(f"no abstract model for {type(config).__name__}")
        return nnx.eval_shape(lambda: classes[type(config)](config, rngs=nnx.Rngs(0)))
    n = config.num_layers
    if n <= 1:
        return nnx.eval_shape(lambda: WanModel(config, rngs=nnx.Rngs(0)))
    model = nnx.eval_shape(lambda: WanModel(config.replace(num_layers=1), rngs=nnx.Rngs(0)))
    if config.scan_layers:
        graphdef, state = nnx.split(model.blocks)
        state = jax.tree.map(lambda s: jax.ShapeDtypeStruct((n, *s.shape[1:]), s.dtype), state)
        model.blocks = nnx.merge(graphdef, state)
    else:
        graphdef, state = nnx.split(model.blocks[0])
        model.blocks = nnx.List([
            nnx.merge(graphdef, jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), state))
            for _ in range(n)])
    model.config = config
    return model


def _dtype(name: str) -> Any:
    import jax.numpy as jnp

    table = {"bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16, "float32": jnp.float32, "f32": jnp.float32}
    if name not in table:
        raise SpecError(f"unknown dtype {name!r}; use bfloat16 or float32")
    return table[name]


def _resolve_target(name: str | None) -> Any:
    if name is None:
        return None
    try:
        from kvhoist.targets import get_target
    except ImportError as err:
        raise SpecError(f"--target {name}: target support (kvhoist.targets) is not available in this "
                        f"install ({err})") from None
    try:
        return get_target(name)
    except (KeyError, ValueError) as err:
        msg = str(err.args[0]) if err.args else str(err)
        raise SpecError(msg.splitlines()[0] if msg else f"unknown target {name!r}") from None


def preset_program(name: str, opts: SamplerOptions) -> Program:
    """The sampler of preset ``name`` with abstract arguments (see the module docstring)."""
    from wan_ref.presets import get_preset

    try:
        p = get_preset(name)
    except ValueError as err:
        raise SpecError(str(err)) from None
    return sampler_program(p, opts)


def checkpoint_program(folder: str, opts: SamplerOptions) -> Program:
    """The sampler of a diffusers Wan checkpoint folder, from its JSON files only (:mod:`kvhoist.tools.checkpoint`).

    ``--scheduler`` unset takes the pipeline's scheduler; the other options as for presets."""
    from kvhoist.tools.checkpoint import CheckpointFolderError, checkpoint_preset

    try:
        p, scheduler = checkpoint_preset(folder)
    except CheckpointFolderError as err:
        raise SpecError(str(err)) from None
    if opts.scheduler is None:
        opts = dataclasses.replace(opts, scheduler=scheduler)
    return sampler_program(p, opts, checkpoint=True)


def sampler_program(p: Any, opts: SamplerOptions, *, checkpoint: bool = False) -> Program:
    """``wan_ref.sample`` over an abstract model of :class:`wan_ref.presets.Preset` ``p`` (a named preset, or one
    read from a checkpoint folder: ``checkpoint=True``, always real-size and in bf16 unless ``--dtype``)."""
    import jax.numpy as jnp

    from wan_ref.sample import LOOPS, sample
    from wan_ref.schedulers import SCHEDULERS

    name = p.name
    opts = opts if opts.scheduler is not None else dataclasses.replace(opts, scheduler="unipc")
    if opts.loop not in LOOPS or opts.loop == "python":
        raise SpecError(f"--loop {opts.loop!r}: use scan or fori (a Python loop has no loop in its jaxpr)")
    if opts.scheduler not in SCHEDULERS:
        raise SpecError(f"unknown scheduler {opts.scheduler!r}; known: {', '.join(SCHEDULERS)}")
    tiny = p.name.startswith("tiny") and not checkpoint
    dtype = _dtype(opts.dtype or ("float32" if tiny else "bfloat16"))
    steps = opts.steps or p.num_inference_steps
    h, w, f = opts.height or p.height, opts.width or p.width, opts.frames or p.num_frames
    for label, v, m in (("height", h, p.vae_scale_factor_spatial * 2), ("width", w, p.vae_scale_factor_spatial * 2)):
        if v <= 0 or v % m:
            raise SpecError(f"--{label} {v}: must be a positive multiple of {m} for {p.name} "
                            f"(VAE factor {p.vae_scale_factor_spatial} x patch 2)")
    if f < 1 or (f - 1) % p.vae_scale_factor_temporal:
        raise SpecError(f"--frames {f}: must be 4k+1 (e.g. 81)")
    target = _resolve_target(opts.target)

    extra: dict = {}
    if opts.attention is not None:
        if "attention" in {f.name for f in dataclasses.fields(p.config)}:
            extra["attention"] = opts.attention
        elif opts.attention != "xla":
            raise SpecError(f"--attention {opts.attention}: this wan_ref has no WanConfig.attention field yet "
                            f"(only XLA attention is available)")

    def build(config):
        return abstract_model(config.replace(scan_layers=opts.scan_layers, param_dtype=dtype, dtype=dtype, **extra))

    model = build(p.config)
    latents = jax.ShapeDtypeStruct(p.latent_shape(1, h, w, f), jnp.float32)
    text = jax.ShapeDtypeStruct((1, opts.text_len, p.config.text_dim), dtype)
    cfg = opts.cfg and p.guidance_scale > 1.0
    kwargs: dict = {}
    if p.two_experts:
        kwargs["model_2"] = build(p.config_2)
    if p.config.image_dim is not None:
        n_img = 2 * 257 if p.config.pos_embed_seq_len else 257
        kwargs["image_embeds"] = jax.ShapeDtypeStruct((1, n_img, p.config.image_dim), dtype)
    _b, z, lf, lh, lw = p.latent_shape(1, h, w, f)
    if p.expand_timesteps:
        kwargs["condition"] = jax.ShapeDtypeStruct((1, z, 1, lh, lw), jnp.float32)
    elif p.config.in_channels > z:
        kwargs["condition"] = jax.ShapeDtypeStruct((1, p.config.in_channels - z, lf, lh, lw), jnp.float32)
    if p.task == "vace":  # WanVACEPipeline's control latents: video latents + 8x8-folded mask, one per frame
        kwargs["control_hidden_states"] = jax.ShapeDtypeStruct(
            (1, p.config.vace_in_channels, lf, lh, lw), dtype)
    elif p.task == "animate":  # one segment: pose latents for frames 1.., the face video in pixels
        size = p.config.motion_encoder_size
        kwargs["pose_hidden_states"] = jax.ShapeDtypeStruct((1, z, lf - 1, lh, lw), dtype)
        kwargs["face_pixel_values"] = jax.ShapeDtypeStruct((1, 3, f, size, size), dtype)
    static = dict(num_inference_steps=steps, guidance_scale=p.guidance_scale, flow_shift=p.flow_shift,
                  scheduler=opts.scheduler, loop=opts.loop, expand_timesteps=p.expand_timesteps)
    if p.two_experts:
        static.update(boundary_ratio=p.boundary_ratio, guidance_scale_2=p.guidance_scale_2)
    fun = functools.partial(sample, **static)
    args = (model, latents, text, text if cfg else None)
    tokens = lf * (lh // 2) * (lw // 2)
    source = (f"diffusers {type(p.config).__name__.replace('Config', '')} checkpoint "
              f"({p.config.num_layers} layers, dim {p.config.inner_dim}, flow shift {p.flow_shift:g}, {opts.scheduler}"
              + (f", boundary {p.boundary_ratio:g}" if p.two_experts else "") + "), " if checkpoint else "")
    desc = (f"{p.name}: {source}wan_ref.sample, {steps} steps, loop={opts.loop}, "
            f"{'scanned' if opts.scan_layers else 'unrolled'} layers, CFG {'on' if cfg else 'off'}, "
            f"{f}x{h}x{w} px -> latents {lf}x{lh}x{lw} ({tokens} tokens), {opts.text_len} text tokens, "
            f"{jnp.dtype(dtype).name}" + (f", target {opts.target}" if opts.target else "")
            + (f", {extra['attention']} attention" if extra else "")
            + (", two experts" if p.two_experts else "")
            + (f", VACE control {p.config.vace_in_channels} ch, hints after {len(p.config.vace_layers)} blocks"
               if p.task == "vace" else "")
            + (f", Animate: pose latents, {f} face frames of {p.config.motion_encoder_size}^2 px (motion encoder "
               f"batch {p.config.motion_encoder_batch_size}), {p.config.num_face_adapters} face adapters"
               if p.task == "animate" else ""))
    return Program(name, desc, fun, args, kwargs, target=target, real_size=not tiny, steps=steps, preset=p.name)


# -- user functions -----------------------------------------------------------------------------------

def _is_arraylike(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct))


def _is_traced_value(v: Any) -> bool:
    """Whether a keyword argument is traced (arrays / modules) rather than bound statically."""
    if v is None or isinstance(v, (str, bytes, bool, int, float, complex)):
        return False
    leaves = jax.tree_util.tree_leaves(v)
    return bool(leaves) and all(_is_arraylike(x) for x in leaves)


def user_program(spec: str, target_name: str | None = None) -> Program:
    """``package.module:function`` -> :class:`Program` (see the module docstring)."""
    mod_name, _, fn_name = spec.partition(":")
    if not mod_name or not fn_name:
        raise SpecError(f"{spec!r} is neither a preset nor package.module:function")
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # like `python -m`: the current directory is importable
    try:
        module = importlib.import_module(mod_name)
    except Exception as err:
        raise SpecError(f"cannot import {mod_name!r} (from {spec!r}): {type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}".rstrip(": ")) from None
    factory = getattr(module, fn_name, None)
    if factory is None or not callable(factory):
        raise SpecError(f"{mod_name} has no function {fn_name!r} (from {spec!r})")
    try:
        result = factory()
    except Exception as err:
        raise SpecError(f"{spec}() raised {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                        ) from None
    if not (isinstance(result, tuple) and len(result) == 3 and callable(result[0])
            and isinstance(result[1], (tuple, list)) and isinstance(result[2], dict)):
        got = type(result).__name__ + (f" of length {len(result)}" if isinstance(result, tuple) else "")
        raise SpecError(f"{spec}() must return (fun, args, kwargs) — a callable, a tuple of arguments and a dict "
                        f"of keyword arguments; got {got}")
    fun, args, kwargs = result
    static = {k: v for k, v in kwargs.items() if not _is_traced_value(v)}
    dynamic = {k: v for k, v in kwargs.items() if k not in static}
    if static:
        fun = functools.partial(fun, **static)
    fname = getattr(result[0], "__name__", type(result[0]).__name__)
    desc = f"{spec}: {fname}(" + ", ".join(
        [f"<{len(args)} positional>"] + [f"{k}={v!r}" for k, v in static.items()] + list(dynamic)) + ")"
    return Program(spec, desc, fun, tuple(args), dynamic, target=_resolve_target(target_name))


def _dotted(spec: str) -> str:
    """``pkg/samplers.py:make`` -> ``pkg.samplers:make`` when the file is under the current directory (what the
    dotted form imports); a file elsewhere is one ``SpecError`` naming the dotted form and where to run it."""
    import os

    module, _, fn = spec.partition(":")
    if not (module.endswith(".py") or "/" in module or os.sep in module):
        return spec
    path = os.path.normpath(module[:-3] if module.endswith(".py") else module)
    if not os.path.isfile(path + ".py"):
        raise SpecError(f"{spec}: no file {path}.py (give package.module:function, importable from the current "
                        f"directory)")
    rel = os.path.relpath(os.path.abspath(path), os.getcwd())
    if rel.startswith(".."):
        raise SpecError(f"{spec}: {path}.py is outside the current directory; run from its package's folder and "
                        f"give the dotted form, e.g. cd {os.path.dirname(os.path.abspath(path))} && kvhoist ... "
                        f"{os.path.basename(path)}:{fn}")
    dotted = rel.replace(os.sep, ".").replace("/", ".")
    return f"{dotted}:{fn}"


def resolve(spec: str, opts: SamplerOptions | None = None) -> Program:
    """A :class:`Program` for a SPEC string: a preset name, a diffusers checkpoint folder, else
    ``package.module:function`` (also written as a path under the current directory, ``pkg/samplers.py:make``).

    Raises:
      SpecError: unknown preset (with close matches), a folder that is not a Wan checkpoint, unimportable
        module, bad factory result, unknown target or invalid sampler options.
    """
    from wan_ref.presets import PRESETS

    import os

    opts = opts or SamplerOptions()
    if spec in PRESETS:
        return preset_program(spec, opts)
    if os.path.isdir(spec):
        return checkpoint_program(spec, opts)
    if ":" in spec and not os.path.exists(spec):
        return user_program(_dotted(spec), opts.target)
    if os.path.exists(spec) or os.sep in spec or "/" in spec:
        raise SpecError(f"{spec}: " + ("not a folder" if os.path.exists(spec) else "no such folder")
                        + ": a checkpoint SPEC is a diffusers Wan pipeline folder or its transformer/ subfolder")
    import difflib

    close = difflib.get_close_matches(spec, PRESETS, n=4, cutoff=0.4)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(sorted(PRESETS))}"
    raise SpecError(f"unknown preset {spec!r}{hint} (or give a checkpoint folder, or package.module:function)")
