"""`sample`: the Wan denoising loop (diffusers' WanPipeline / WanImageToVideoPipeline) in JAX.

What one step does, exactly as the diffusers pipelines (0.42) do it:

1. pick the expert: `model` while `t >= boundary_ratio * 1000`, else `model_2` (Wan 2.2 A14B);
2. build the model input: latents, or `concat([latents, condition], C)` (Wan 2.1 / 2.2 I2V), or
   `(1 - mask) * condition + mask * latents` with a first-frame mask (Wan 2.2 TI2V, `expand_timesteps`);
3. one forward on the batch-concatenated `[cond; uncond]` halves (diffusers runs two forwards; the
   result is the same up to matmul blocking), then `uncond + g * (cond - uncond)`;
4. one scheduler step (`wan_ref.schedulers`).

The loop is a `lax.scan`, a `lax.fori_loop` or a Python loop around ONE jitted step. The model(s),
embeddings and caches are always arguments of the traced / jitted function - never closed-over
constants - so `jax.make_jaxpr(partial(sample, ...))(model, latents, pe, npe)` has the weights as inputs,
and a loop-invariant-hoisting pass sees the text K/V projections as invariant computations on inputs.

`kv_cache=True` is the hand-written alternative: every block's cross-attention K/V is computed once before
the loop (`model.compute_kv_cache`) on the CFG-concatenated context and passed into every forward.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from wan_ref.schedulers import SCHEDULERS, AnyScheduler, make_scheduler

__all__ = ["LOOPS", "one_step", "sample"]

LOOPS: tuple[str, ...] = ("scan", "fori", "python")
"""Loop forms accepted by `sample(loop=...)`."""

LoopName = Literal["scan", "fori", "python"]


# --------------------------------------------------------------------------------------------------
# Static plan and traced operands
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything static about a sampling run (hashable: a `static_argnames` entry of the jitted parts)."""

    scheduler: AnyScheduler
    cfg: bool
    # Per step: True -> `model` (high noise), False -> `model_2`. None for a single model.
    first_expert: tuple[bool, ...] | None
    # "none" | "concat" (I2V channels) | "mask" (TI2V first-frame latents re-imposed every step)
    conditioning: str
    expand_timesteps: bool
    patch_size: tuple[int, int, int]
    kv_cache: bool
    # Static keyword arguments of every forward (Wan Animate: motion_encode_batch_size), as sorted items.
    model_static: tuple[tuple[str, Any], ...] = ()


class _Expert(NamedTuple):
    """What one expert's forward needs (a pytree; the model is an nnx.Module pytree)."""

    model: Any
    guidance_scale: jax.Array  # float32 scalar; data, so the Python loop compiles its step once
    image_embeds: jax.Array | None  # CFG-doubled; None for models without an image branch
    cache: Any  # KVCache or None


class _Shared(NamedTuple):
    """Operands shared by both experts."""

    context: jax.Array  # [B or 2B, S, text_dim], CFG-concatenated
    condition: jax.Array | None
    mask: jax.Array | None  # TI2V first-frame mask [1, 1, F, H, W] (0 on the condition frame)
    # CFG-doubled keyword inputs of VACE / Animate forwards (control_hidden_states, pose, face, ...); {} else.
    model_inputs: dict = {}


# --------------------------------------------------------------------------------------------------
# One step
# --------------------------------------------------------------------------------------------------


def _model_timestep(plan: _Plan, t: jax.Array, latents: jax.Array, mask: jax.Array | None) -> jax.Array:
    """The `timestep` argument: [B], or per-token [B, tokens] for expand_timesteps (TI2V)."""
    b = latents.shape[0]
    if not plan.expand_timesteps:
        return jnp.broadcast_to(t, (b,))
    # diffusers: (mask[0][0][:, ::2, ::2] * t).flatten(); the stride is the patch size.
    pt, ph, pw = plan.patch_size
    if mask is None:
        mask = jnp.ones((1, 1, *latents.shape[2:]), jnp.float32)
    per_token = (mask[0, 0][::pt, ::ph, ::pw] * t).reshape(-1)
    return jnp.broadcast_to(per_token[None], (b, per_token.shape[0]))


def _guided_velocity(plan: _Plan, expert: _Expert, shared: _Shared, model_input: jax.Array,
                     timestep: jax.Array) -> jax.Array:
    """One (CFG-batched) forward of `expert` and the guidance combination."""
    model = expert.model
    if plan.cfg:
        model_input = jnp.concatenate([model_input, model_input], axis=0)
        timestep = jnp.concatenate([timestep, timestep], axis=0)
    model_input = model_input.astype(model.config.dtype)  # diffusers: latents.to(transformer_dtype)
    if expert.cache is not None:
        out = model(model_input, timestep, None, None, kv_cache=expert.cache)
    else:
        out = model(model_input, timestep, shared.context, expert.image_embeds, **shared.model_inputs,
                    **dict(plan.model_static))
    if not plan.cfg:
        return out
    cond, uncond = jnp.split(out, 2, axis=0)
    g = expert.guidance_scale.astype(out.dtype)
    return uncond + g * (cond - uncond)


def _denoise_step(plan: _Plan, experts: tuple[_Expert, ...], shared: _Shared, latents: jax.Array,
                  state: Any, expert_index: jax.Array | int | None = None) -> tuple[jax.Array, Any]:
    """One denoising step with the step index in `state` (traced or not).

    `experts` holds one or two experts. With two and `expert_index=None`, the expert is chosen per step by
    a `lax.cond` on the static schedule (both branches are full forwards); the Python loop instead passes
    the one expert it picked.
    """
    sched = plan.scheduler
    t = sched.timestep(state)
    if plan.conditioning == "concat":
        model_input = jnp.concatenate([latents, shared.condition.astype(latents.dtype)], axis=1)
    elif plan.conditioning == "mask":
        model_input = (1 - shared.mask) * shared.condition + shared.mask * latents
    else:
        model_input = latents
    timestep = _model_timestep(plan, t, latents, shared.mask)

    def velocity(expert: _Expert) -> jax.Array:
        return _guided_velocity(plan, expert, shared, model_input, timestep)

    if len(experts) == 1:
        noise_pred = velocity(experts[0])
    else:
        first = jnp.asarray(np.asarray(plan.first_expert))[state.step]
        noise_pred = jax.lax.cond(first, lambda e: velocity(e[0]), lambda e: velocity(e[1]), experts)
    return sched.step(state, noise_pred, latents)


# --------------------------------------------------------------------------------------------------
# Loop forms
# --------------------------------------------------------------------------------------------------


def _cfg_model_inputs(plan: _Plan, variant_inputs: dict | None) -> dict:
    """VACE / Animate keyword inputs for the CFG batch, as the pipelines give them to the two forwards.

    VACE: the same control latents for both halves (the per-hint scale is not batched). Animate: the same
    pose latents; the unconditional half gets the face video blanked to -1 (`face * 0 - 1`).
    """
    inputs = dict(variant_inputs or {})
    if not plan.cfg:
        return inputs
    for name in ("control_hidden_states", "pose_hidden_states"):
        if name in inputs:
            inputs[name] = jnp.concatenate([inputs[name], inputs[name]], axis=0)
    if "face_pixel_values" in inputs:
        face = inputs["face_pixel_values"]
        inputs["face_pixel_values"] = jnp.concatenate([face, face * 0 - 1], axis=0)
    return inputs


def _prepare(plan: _Plan, models: tuple[Any, ...], prompt_embeds: jax.Array,
             negative_prompt_embeds: jax.Array | None, image_embeds: jax.Array | None,
             condition: jax.Array | None, latents: jax.Array,
             variant_inputs: dict | None = None) -> tuple[tuple[tuple[Any, Any], ...], _Shared]:
    """CFG-concatenates the context, builds the TI2V mask and (kv_cache=True) the per-expert caches.

    Returns `((image_embeds, cache) per expert, shared)`; the models themselves are not returned, so the
    jitted form never copies weights out.
    """
    context, images = prompt_embeds, image_embeds
    if plan.cfg:
        context = jnp.concatenate([prompt_embeds, negative_prompt_embeds], axis=0)
        if image_embeds is not None:  # diffusers gives the same image embeddings to both halves
            images = jnp.concatenate([image_embeds, image_embeds], axis=0)
    model_inputs = _cfg_model_inputs(plan, variant_inputs)
    per_expert = []
    for model in models:
        model_images = images if model.config.image_dim is not None else None
        cache = None
        if plan.kv_cache:
            extra = dict(model_inputs, **dict(plan.model_static))
            if "control_hidden_states" in extra:  # VACE pads the control tokens to the latent frames
                extra["num_latent_frames"] = latents.shape[2]
            cache = model.compute_kv_cache(context, model_images, **extra)
        per_expert.append((model_images, cache))
    mask = None
    if plan.conditioning == "mask":
        mask = jnp.ones((1, 1, *latents.shape[2:]), jnp.float32).at[:, :, 0].set(0)
    return tuple(per_expert), _Shared(context, condition, mask, model_inputs)


def _experts(models, guidance, per_expert) -> tuple[_Expert, ...]:
    return tuple(_Expert(m, g, img, cache) for m, g, (img, cache) in zip(models, guidance, per_expert))


def _finish(plan: _Plan, shared: _Shared, latents: jax.Array) -> jax.Array:
    if plan.conditioning == "mask":  # diffusers re-imposes the condition frame after the loop
        latents = (1 - shared.mask) * shared.condition + shared.mask * latents
    return latents


def _traced_loop(plan: _Plan, loop: str, models, guidance, latents, prompt_embeds, negative_prompt_embeds,
                 image_embeds, condition, variant_inputs=None):
    per_expert, shared = _prepare(plan, models, prompt_embeds, negative_prompt_embeds, image_embeds, condition,
                                  latents, variant_inputs)
    experts = _experts(models, guidance, per_expert)
    n = plan.scheduler.num_inference_steps
    carry = (latents, plan.scheduler.init(latents))

    def step(carry):
        return _denoise_step(plan, experts, shared, *carry)

    if loop == "scan":
        carry, _ = jax.lax.scan(lambda c, _: (step(c), None), carry, length=n)
    else:  # static bounds: lowered to a scan with the index in the carry; the state keeps its own index
        carry = jax.lax.fori_loop(0, n, lambda i, c: step(c), carry)
    return _finish(plan, shared, carry[0])


_traced_loop_jit = jax.jit(_traced_loop, static_argnames=("plan", "loop"))
_prepare_jit = jax.jit(_prepare, static_argnames=("plan",))
_finish_jit = jax.jit(_finish, static_argnames=("plan",))


def _one_step(plan: _Plan, expert: _Expert, shared: _Shared, latents: jax.Array, state: Any):
    return _denoise_step(plan, (expert,), shared, latents, state)


_one_step_jit = jax.jit(_one_step, static_argnames=("plan",))


# --- hook for host-loop hoisting (kvhoist issue 6): `sample(..., loop="python", step_fn=...)` -------------
def one_step(plan: Any, expert: Any, shared: Any, latents: jax.Array, state: Any) -> tuple[jax.Array, Any]:
    """The Python loop's step, undecorated: `(latents, state) -> (latents, state)` for one expert.

    `plan` is static (hashable); `expert` (model, guidance scale, image embeddings, cache) and `shared`
    (CFG context, condition, mask) are the same in every call of one `sample` run; `latents` and `state`
    change. Wrap it and pass it as `sample(..., loop="python", step_fn=...)`, e.g.
    `kvhoist.hoist_invariants(one_step, static_argnames=("plan",), invariant_argnames=("expert", "shared"))`.
    The default step is `jax.jit(one_step, static_argnames=("plan",))`.
    """
    return _one_step(plan, expert, shared, latents, state)
# ---------------------------------------------------------------------------------------------------------


def _python_loop(plan: _Plan, models, guidance, latents, prompt_embeds, negative_prompt_embeds, image_embeds,
                 condition, variant_inputs=None, step_fn=None, progress=None):
    per_expert, shared = _prepare_jit(plan, models, prompt_embeds, negative_prompt_embeds, image_embeds,
                                      condition, latents, variant_inputs)
    experts = _experts(models, guidance, per_expert)
    # The step plan carries no expert table: the expert is picked here, by a Python `if`.
    step_plan = dataclasses.replace(plan, first_expert=None)
    state = plan.scheduler.init(latents)
    n = plan.scheduler.num_inference_steps
    for i in range(n):
        expert = experts[0] if plan.first_expert is None or plan.first_expert[i] else experts[1]
        latents, state = (_one_step_jit if step_fn is None else step_fn)(step_plan, expert, shared, latents, state)
        if progress is not None:  # report a finished step, not a dispatched one
            if not isinstance(latents, jax.core.Tracer):
                jax.block_until_ready(latents)
            progress(i + 1, n)
    return _finish_jit(plan, shared, latents)


# --------------------------------------------------------------------------------------------------
# VACE / Animate inputs
# --------------------------------------------------------------------------------------------------


def _model_kind(model: Any) -> str:
    """"vace", "animate" or "wan" from the model's config class (no import of the variant modules)."""
    cfg = model.config
    if hasattr(cfg, "vace_layers"):
        return "vace"
    if hasattr(cfg, "inject_face_latents_blocks"):
        return "animate"
    return "wan"


def _check_variant_inputs(models: tuple[Any, ...], latents: jax.Array, *, control_hidden_states,
                          control_hidden_states_scale, pose_hidden_states, face_pixel_values,
                          motion_encode_batch_size) -> tuple[dict | None, tuple]:
    """Validates the VACE / Animate inputs against the model kind -> (traced inputs or None, static items)."""
    kinds = {_model_kind(m) for m in models}
    if len(kinds) > 1:
        raise ValueError(f"model and model_2 must be the same kind of Wan transformer, got {sorted(kinds)}")
    kind = kinds.pop()
    batch = latents.shape[0]
    given = {"control_hidden_states": control_hidden_states, "control_hidden_states_scale": control_hidden_states_scale,
             "pose_hidden_states": pose_hidden_states, "face_pixel_values": face_pixel_values,
             "motion_encode_batch_size": motion_encode_batch_size}
    own = {"vace": ("control_hidden_states", "control_hidden_states_scale"),
           "animate": ("pose_hidden_states", "face_pixel_values", "motion_encode_batch_size")}.get(kind, ())
    stray = [k for k, v in given.items() if v is not None and k not in own]
    if stray:
        raise ValueError(f"{', '.join(stray)} given to a {kind!r} model, which does not take them (VACE takes "
                         "control_hidden_states[_scale]; Animate takes pose_hidden_states, face_pixel_values, "
                         "motion_encode_batch_size)")

    def per_batch(name, x):
        x = jnp.asarray(x)
        if x.ndim != 5 or x.shape[0] not in (1, batch):
            raise ValueError(f"{name} must be [1 or B={batch}, C, frames, H, W], got {tuple(x.shape)}")
        return jnp.broadcast_to(x, (batch, *x.shape[1:]))

    if kind == "vace":
        if control_hidden_states is None:
            raise ValueError("a VACE model needs control_hidden_states (WanVACEPipeline's conditioning latents "
                             "[1, vace_in_channels, F, H, W])")
        inputs = {"control_hidden_states": per_batch("control_hidden_states", control_hidden_states)}
        if control_hidden_states_scale is not None:
            inputs["control_hidden_states_scale"] = jnp.asarray(control_hidden_states_scale, jnp.float32)
        return inputs, ()
    if kind == "animate":
        if pose_hidden_states is None or face_pixel_values is None:
            raise ValueError("an Animate model needs pose_hidden_states ([B, z, F - 1, H, W] pose latents) and "
                             "face_pixel_values ([B, 3, S, size, size] face video)")
        if motion_encode_batch_size is not None and (not isinstance(motion_encode_batch_size, int)
                                                     or motion_encode_batch_size < 1):
            raise ValueError(f"motion_encode_batch_size must be a positive int, got {motion_encode_batch_size!r}")
        inputs = {"pose_hidden_states": per_batch("pose_hidden_states", pose_hidden_states),
                  "face_pixel_values": per_batch("face_pixel_values", face_pixel_values)}
        static = (("motion_encode_batch_size", motion_encode_batch_size),) if motion_encode_batch_size else ()
        return inputs, static
    return None, ()


# --------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------


def sample(
    model: Any,
    latents: jax.Array,
    prompt_embeds: jax.Array,
    negative_prompt_embeds: jax.Array | None = None,
    *,
    num_inference_steps: int,
    guidance_scale: float = 5.0,
    flow_shift: float = 3.0,
    scheduler: str = "unipc",
    model_2: Any | None = None,
    boundary_ratio: float | None = None,
    guidance_scale_2: float | None = None,
    image_embeds: jax.Array | None = None,
    condition: jax.Array | None = None,
    expand_timesteps: bool = False,
    loop: LoopName = "scan",
    kv_cache: bool = False,
    step_fn: Any | None = None,
    progress: Callable[[int, int], Any] | None = None,
    control_hidden_states: jax.Array | None = None,
    control_hidden_states_scale: jax.Array | float | None = None,
    pose_hidden_states: jax.Array | None = None,
    face_pixel_values: jax.Array | None = None,
    motion_encode_batch_size: int | None = None,
) -> jax.Array:
    """Denoises `latents` with a Wan transformer, as diffusers' Wan pipelines with `output_type="latent"`.

    Args:
      model: a `wan_ref.WanModel` (the high-noise expert for Wan 2.2 A14B).
      latents: initial noise [B, z, F, H, W]; carried in float32 like diffusers' pipelines.
      prompt_embeds: text embeddings [B, S, text_dim] (S = 512 for models with an image branch).
      negative_prompt_embeds: same shape; `None` disables classifier-free guidance.
      num_inference_steps: number of steps (static).
      guidance_scale: CFG scale; `<= 1` disables CFG (diffusers' `do_classifier_free_guidance`).
      flow_shift: scheduler shift (3.0 Wan 2.1 480p, 5.0 720p / TI2V, 12.0 Wan 2.2 T2V A14B).
      scheduler: "unipc" (diffusers `UniPCMultistepScheduler`, the checkpoints' default) or "euler".
      model_2: the low-noise expert (Wan 2.2 A14B), used while `t < boundary_ratio * 1000`.
      boundary_ratio: switch point for `model_2`; required with it.
      guidance_scale_2: CFG scale of `model_2`; defaults to `guidance_scale` as in diffusers.
      image_embeds: CLIP image embeddings for models with an image branch (Wan 2.1 I2V / FLF2V):
        [B or 1, 257, image_dim] ([B, 514, image_dim] for FLF2V); given to both CFG halves.
      condition: image conditioning.
        * I2V (model `in_channels` > latent channels): diffusers' `condition` tensor, [B or 1,
          in_channels - z, F, H, W] = 4 first-frame mask channels then the normalised VAE latents of
          the conditioning video; concatenated to the latents on channels every step.
        * TI2V (`expand_timesteps=True`): the normalised VAE latents of the first frame, [B or 1, z, 1, H, W]
          (diffusers' `latent_condition`). Frame 0 of the model input is replaced by it every step, its
          tokens get timestep 0, and it is re-imposed on the result.
      expand_timesteps: Wan 2.2 TI2V-5B (`Preset.expand_timesteps`): per-token timesteps [B, tokens].
      loop: "scan" (`lax.scan`), "fori" (`lax.fori_loop`, static bounds) or "python" (a Python loop calling
        one jitted step; for eager use). All three give the same numbers.
      kv_cache: compute each expert's cross-attention K/V once before the loop (`model.compute_kv_cache`)
        instead of in every forward. Same numbers.
      step_fn: `loop="python"` only: the compiled step to call, with the signature of `one_step`
        (`step_fn(plan, expert, shared, latents, state)`, `plan` passed positionally and static); default
        `jax.jit(one_step, static_argnames=("plan",))`. Pass a `kvhoist.hoist_invariants(one_step, ...)` with
        `invariant_argnames=("expert", "shared")` to compute the text/image K/V once per expert (host-loop
        hoisting, docs/host_loop.md). Reuse one wrapped step across calls: it caches its compiled programs.
      progress: `loop="python"` only: called as `progress(done, total)` after each step has finished (the
        step's result is waited for, so the count is real; that costs the overlap of dispatch and compute),
        e.g. a `kvhoist.tools.progress.Progress` bar. Jitted loops run as one program and report nothing per
        step (a host callback would pin the work to the loop); a `progress` with them is an error.
      control_hidden_states: VACE (`wan_ref.vace.WanVACEModel`) only: the conditioning latents
        `WanVACEPipeline` builds ([1 or B, vace_in_channels, F, H, W]: inactive + reactive latents and the
        folded mask; with reference images their latent frames come first, and `latents` has as many extra
        frames). Given to both CFG halves.
      control_hidden_states_scale: VACE: the pipeline's `conditioning_scale`, a float or [len(vace_layers)].
      pose_hidden_states: Animate (`wan_ref.animate.WanAnimateModel`) only: pose latents [1 or B, z, F - 1, H, W].
      face_pixel_values: Animate only: the face video [1 or B, 3, S, size, size] in [-1, 1]; the
        unconditional CFG half gets `face * 0 - 1`, as `WanAnimatePipeline`. Animate's reference latents
        (4 mask channels + z; `reference_latents` in the pipeline, built for mode "animate" or "replace")
        are the `condition`, concatenated on channels like I2V.
      motion_encode_batch_size: Animate only (static): face frames per motion-encoder call.

    Returns:
      The denoised latents, [B, z, F, H, W] float32.

    Raises:
      ValueError: an unknown scheduler or loop name, `model_2` without `boundary_ratio` (or the reverse),
        a model with an image branch but no `image_embeds`, or a `condition` / embedding of the wrong shape.

    Example:
      >>> out = sample(model, noise, pe, npe, num_inference_steps=50, guidance_scale=5.0, flow_shift=3.0)
      >>> out = jax.jit(sample, static_argnames=("num_inference_steps",))(model, noise, pe, npe,
      ...                                                                  num_inference_steps=4)
    """
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; valid names: {', '.join(map(repr, SCHEDULERS))}")
    if loop not in LOOPS:
        raise ValueError(f"unknown loop {loop!r}; valid loops: {', '.join(map(repr, LOOPS))}")
    if model_2 is not None and boundary_ratio is None:
        raise ValueError("model_2 (the Wan 2.2 low-noise expert) needs boundary_ratio (e.g. 0.875 for T2V-A14B, "
                         "0.9 for I2V-A14B: Preset.boundary_ratio); pass boundary_ratio=...")
    if boundary_ratio is not None and model_2 is None:
        raise ValueError("boundary_ratio was given without model_2; pass the low-noise expert as model_2=..., "
                         "or drop boundary_ratio for a single model")
    latents = jnp.asarray(latents)
    if latents.ndim != 5:
        raise ValueError(f"latents must be [B, C, F, H, W], got shape {tuple(latents.shape)}")
    batch, z = latents.shape[:2]
    models = (model,) if model_2 is None else (model, model_2)

    cfg = guidance_scale > 1.0 and negative_prompt_embeds is not None
    if cfg and tuple(negative_prompt_embeds.shape) != tuple(prompt_embeds.shape):
        raise ValueError(f"negative_prompt_embeds {tuple(negative_prompt_embeds.shape)} must have the shape of "
                         f"prompt_embeds {tuple(prompt_embeds.shape)} (pad both to the same length, e.g. 512)")

    for name, m in (("model", model), ("model_2", model_2)):
        if m is not None and m.config.image_dim is not None and image_embeds is None:
            raise ValueError(f"{name} has an image branch (config.image_dim={m.config.image_dim}: Wan 2.1 I2V/FLF2V);"
                             f" pass image_embeds=[B, 257, {m.config.image_dim}] (CLIP image embeddings)")
    if image_embeds is not None:
        if all(m.config.image_dim is None for m in models):
            raise ValueError("image_embeds were given but no model has an image branch (config.image_dim is "
                             "None); drop image_embeds")
        image_embeds = jnp.asarray(image_embeds)
        if image_embeds.shape[0] == 1 and batch > 1:  # diffusers: image_embeds.repeat(batch_size, 1, 1)
            image_embeds = jnp.broadcast_to(image_embeds, (batch, *image_embeds.shape[1:]))

    in_channels = model.config.in_channels
    if expand_timesteps:
        conditioning = "none" if condition is None else "mask"
        if condition is not None:
            c = tuple(condition.shape)
            if len(c) != 5 or c[1] != z or c[2] not in (1, latents.shape[2]) or c[3:] != latents.shape[3:] \
                    or c[0] not in (1, batch):
                raise ValueError(
                    f"TI2V condition must be the first-frame latents [B or 1, {z}, 1, {latents.shape[3]}, "
                    f"{latents.shape[4]}] (channels = latent channels z={z}), got {c}")
    else:
        expected = in_channels - z
        if expected < 0:
            raise ValueError(f"latents have {z} channels, more than the model's in_channels={in_channels}: pass noise "
                             f"latents [B, {model.config.out_channels}, F, H, W] (out_channels="
                             f"{model.config.out_channels}, the VAE's latent channels)")
        if expected == 0 and condition is not None:
            raise ValueError(f"condition was given but the model is not image-conditioned (in_channels={in_channels} "
                             f"= latent channels): drop condition (for Wan 2.2 TI2V pass expand_timesteps=True)")
        if condition is None:
            if expected != 0:
                raise ValueError(f"the model takes in_channels={in_channels} but latents have {z} channels: this "
                                 f"is an image-conditioned model, pass condition=[B, {expected}, F, H, W] "
                                 "(4 mask channels + condition latents)")
            conditioning = "none"
        else:
            c = tuple(condition.shape)
            if len(c) != 5 or c[1] != expected:
                raise ValueError(f"condition has {c[1] if len(c) > 1 else '?'} channels, expected in_channels "
                                 f"- latent channels = {in_channels} - {z} = {expected} (I2V: 4 mask channels + "
                                 "condition latents); for Wan 2.2 TI2V pass expand_timesteps=True")
            if c[2:] != tuple(latents.shape[2:]) or c[0] not in (1, batch):
                raise ValueError(f"condition must be [B or 1, {expected}, {', '.join(map(str, latents.shape[2:]))}]"
                                 f" like the latents, got {c}")
            conditioning = "concat"
    if condition is not None:
        condition = jnp.broadcast_to(jnp.asarray(condition, jnp.float32), (batch, *condition.shape[1:]))

    sched = make_scheduler(scheduler, num_inference_steps=num_inference_steps, flow_shift=flow_shift)
    first_expert = None
    guidance = (guidance_scale,)
    if model_2 is not None:
        # diffusers: `t >= boundary_ratio * num_train_timesteps`, a float32 tensor comparison.
        boundary = np.float32(boundary_ratio * sched.num_train_timesteps)
        first_expert = tuple(bool(np.float32(t) >= boundary) for t in sched.timesteps)
        guidance = (guidance_scale, guidance_scale if guidance_scale_2 is None else guidance_scale_2)
    guidance = tuple(jnp.asarray(g, jnp.float32) for g in guidance)
    variant_inputs, model_static = _check_variant_inputs(
        models, latents, control_hidden_states=control_hidden_states,
        control_hidden_states_scale=control_hidden_states_scale, pose_hidden_states=pose_hidden_states,
        face_pixel_values=face_pixel_values, motion_encode_batch_size=motion_encode_batch_size)
    plan = _Plan(sched, cfg, first_expert, conditioning, expand_timesteps, tuple(model.config.patch_size), kv_cache,
                 model_static)

    latents = latents.astype(jnp.float32)  # diffusers prepares latents in float32 whatever the model dtype
    negative = negative_prompt_embeds if cfg else None
    args = (models, guidance, latents, prompt_embeds, negative, image_embeds, condition, variant_inputs)
    if step_fn is not None and loop != "python":
        raise ValueError(f"step_fn is only used by loop='python' (got loop={loop!r}); pass loop='python'")
    if progress is not None and loop != "python":
        raise ValueError(f"progress is only called by loop='python' (got loop={loop!r}): a jitted loop runs as one "
                         "program and cannot report its steps; pass loop='python', or report phases around the call")
    if progress is not None and not callable(progress):
        raise TypeError(f"progress must be a callable progress(done, total), got {type(progress).__name__}")
    if loop == "python":
        return _python_loop(plan, *args, step_fn=step_fn, progress=progress)
    return _traced_loop_jit(plan, loop, *args)
