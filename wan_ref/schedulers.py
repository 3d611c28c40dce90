"""Flow-matching schedulers for Wan, written to run inside `lax.scan` / `lax.fori_loop`.

Two schedulers, each a numerical mirror of its diffusers 0.42 counterpart:

* `UniPCMultistep` - `UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
  flow_shift=s)` with every other option at its default (solver_order=2, solver_type="bh2",
  predict_x0=True, lower_order_final=True, final_sigmas_type="zero", disable_corrector=[]).
  This is the scheduler shipped with the Wan checkpoints.
* `FlowMatchEuler` - `FlowMatchEulerDiscreteScheduler(shift=s)` with its defaults
  (use_dynamic_shifting=False, no karras/exponential/beta sigmas, invert_sigmas=False, deterministic).

Design: the number of steps is static, so the whole schedule (timesteps, sigmas) and every scalar
coefficient the solver needs at step `i` are computed once in numpy, in float32 with the same operation
order as diffusers' torch code (its coefficients are float32 0-d tensors; matching their rounding is what
makes the trajectories agree to ~1e-6). `step` then only indexes those tables with the *traced* step index
kept in the state, and selects the solver order with `jnp.where` - so one traced `step` serves every step
of a `lax.scan`. The multistep history (previous x0 predictions, the sample before the last predictor)
lives in the state, i.e. in the loop carry.

Example:
    >>> sched = make_scheduler("unipc", num_inference_steps=10, flow_shift=3.0)
    >>> state = sched.init(latents)
    >>> def body(carry, _):
    ...     x, state = carry
    ...     t = sched.timestep(state)               # traced, float32
    ...     x, state = sched.step(state, velocity(x, t), x)
    ...     return (x, state), None
    >>> (x, _), _ = jax.lax.scan(body, (latents, state), length=sched.num_inference_steps)
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Protocol, Union

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "SCHEDULERS",
    "FlowMatchEuler",
    "EulerState",
    "Scheduler",
    "UniPCMultistep",
    "UniPCState",
    "make_scheduler",
]

SCHEDULERS: tuple[str, ...] = ("unipc", "euler")
"""Names accepted by `make_scheduler` (and by `wan_ref.sample(scheduler=...)`)."""

_F32 = np.float32


# --------------------------------------------------------------------------------------------------
# UniPC multistep (bh2, predict_x0, order 2) for flow prediction
# --------------------------------------------------------------------------------------------------


class UniPCState(NamedTuple):
    """Loop-carried state of `UniPCMultistep`.

    Attributes:
        step: int32 scalar, index of the step about to be taken (0 .. N-1).
        x0_prev: x0 prediction made at step `step-1` (zeros before the first step).
        x0_prev2: x0 prediction made at step `step-2` (zeros before the second step).
        last_sample: the (corrected) sample the predictor started from at step `step-1`; the corrector
            at step `step` restarts from it.
    """

    step: jax.Array
    x0_prev: jax.Array
    x0_prev2: jax.Array
    last_sample: jax.Array


class _BhCoefficients(NamedTuple):
    """Scalar coefficients of one UniP / UniC (B(h) version) update, float32 like diffusers."""

    ratio: np.float32  # sigma_t / sigma_s0
    c_m0: np.float32  # alpha_t * h_phi_1
    c_res: np.float32  # alpha_t * B_h
    rk: np.float32  # (lambda_{s1} - lambda_{s0}) / h; 1.0 (unused) when order == 1
    rhos: tuple[np.float32, np.float32]  # predictor: (rho_0, -) ; corrector: (rho_0, rho_last)


def _alpha_sigma(sigma: np.float32) -> tuple[np.float32, np.float32]:
    # use_flow_sigmas: alpha_t = 1 - sigma, sigma_t = sigma.
    return _F32(1) - sigma, sigma


def _lambda(sigma: np.float32) -> np.float32:
    alpha, sig = _alpha_sigma(sigma)
    with np.errstate(divide="ignore"):  # sigma == 0 at the end: lambda = +inf, as in torch
        return np.log(alpha) - np.log(sig)


def _bh_coefficients(
    sigma_t: np.float32, sigma_s0: np.float32, sigma_s1: np.float32 | None, order: int, corrector: bool
) -> _BhCoefficients:
    """Coefficients of diffusers' `multistep_uni_{p,c}_bh_update` for one step (bh2, predict_x0).

    `sigma_s1` is the sigma of the older history point (only used when `order == 2`). Operations follow
    diffusers line by line, in float32, so that the rounding matches.
    """
    alpha_t, sig_t = _alpha_sigma(sigma_t)
    _, sig_s0 = _alpha_sigma(sigma_s0)
    lambda_t, lambda_s0 = _lambda(sigma_t), _lambda(sigma_s0)
    h = lambda_t - lambda_s0
    rk = _F32(1)
    rks = [_F32(1)]
    if order == 2:
        rk = (_lambda(sigma_s1) - lambda_s0) / h
        rks = [rk, _F32(1)]
    hh = -h  # predict_x0
    with np.errstate(invalid="ignore", divide="ignore"):  # hh = -inf at the final (order-1) step
        h_phi_1 = np.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        b_h = np.expm1(hh)  # bh2
        b = []
        factorial_i = 1
        for i in range(1, order + 1):
            b.append(h_phi_k * factorial_i / b_h)
            factorial_i *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial_i
    if corrector:
        if order == 1:
            rhos = (_F32(0.5), _F32(0.5))  # rhos_c = [0.5]: rho_last is the only entry
        else:
            r = np.stack([np.power(np.array(rks, _F32), k) for k in range(order)]).astype(_F32)
            sol = np.linalg.solve(r, np.array(b, _F32)).astype(_F32)
            rhos = (sol[0], sol[-1])
    else:
        rhos = (_F32(0.5), _F32(0))  # order-2 predictor: rhos_p = [0.5]
    with np.errstate(invalid="ignore"):
        ratio = sig_t / sig_s0
    return _BhCoefficients(ratio, alpha_t * h_phi_1, alpha_t * b_h, rk, rhos)


class _ByConfig:
    """Equal and hashable by (type, steps, shift, train timesteps), so a scheduler can ride along as a
    static jit argument (its numpy tables are derived from those)."""

    def _config(self) -> tuple:
        return (type(self), self.num_inference_steps, self.flow_shift, self.num_train_timesteps)

    def __hash__(self) -> int:
        return hash(self._config())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _ByConfig) and self._config() == other._config()


@dataclasses.dataclass(frozen=True, eq=False)
class UniPCMultistep(_ByConfig):
    """diffusers' `UniPCMultistepScheduler` for Wan (flow prediction, flow sigmas, order 2, bh2).

    Args:
        num_inference_steps: number of denoising steps (static).
        flow_shift: the `flow_shift` of the scheduler config (3.0 for Wan 2.1 480p, 5.0 for 720p/TI2V ...).
        num_train_timesteps: 1000 for every Wan checkpoint.

    Attributes:
        timesteps: int64 `[N]`, the values diffusers passes to the transformer (999, 993, ...).
        sigmas: float32 `[N + 1]`, ending with 0 (final_sigmas_type="zero").
    """

    num_inference_steps: int
    flow_shift: float = 3.0
    num_train_timesteps: int = 1000
    timesteps: np.ndarray = dataclasses.field(init=False, repr=False)
    sigmas: np.ndarray = dataclasses.field(init=False, repr=False)
    _tables: dict[str, np.ndarray] = dataclasses.field(init=False, repr=False)

    solver_order = 2  # the only order implemented (Wan's default); `step` hard-codes two history points

    def __post_init__(self) -> None:
        n = int(self.num_inference_steps)
        if n < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}")
        # set_timesteps, use_flow_sigmas branch (float64 until the final cast, as in diffusers).
        sigmas = np.linspace(1, 1 / self.num_train_timesteps, n + 1)[:-1]
        shift = self.flow_shift
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
        if np.fabs(sigmas[0] - 1) < 1e-6:
            sigmas[0] -= 1e-6
        timesteps = (sigmas * self.num_train_timesteps).copy().astype(np.int64)
        sigmas = np.concatenate([sigmas, [0]]).astype(_F32)
        object.__setattr__(self, "timesteps", timesteps)
        object.__setattr__(self, "sigmas", sigmas)

        # Order of the predictor at step i: warm-up (i + 1) and lower_order_final (n - i), capped at 2.
        order_p = np.array([min(self.solver_order, n - i, i + 1) for i in range(n)], np.int32)
        # The corrector at step i (> 0) has the order the predictor had at step i - 1.
        order_c = np.concatenate([[1], order_p[:-1]]).astype(np.int32)
        pred = [
            _bh_coefficients(sigmas[i + 1], sigmas[i], sigmas[i - 1] if order_p[i] == 2 else None, int(order_p[i]), False)
            for i in range(n)
        ]
        # Step 0 has no corrector; its row is a finite dummy (masked by `use_corrector`).
        corr = [_BhCoefficients(_F32(1), _F32(0), _F32(0), _F32(1), (_F32(0), _F32(0)))] + [
            _bh_coefficients(sigmas[i], sigmas[i - 1], sigmas[i - 2] if order_c[i] == 2 else None, int(order_c[i]), True)
            for i in range(1, n)
        ]

        def col(rows, f):
            return np.array([f(r) for r in rows], _F32)

        tables = {
            "timesteps": timesteps.astype(_F32),
            "sigma": sigmas[:n],
            "order_p": order_p,
            "order_c": order_c,
            "p_ratio": col(pred, lambda r: r.ratio),
            "p_c_m0": col(pred, lambda r: r.c_m0),
            "p_c_res": col(pred, lambda r: r.c_res),
            "p_rk": col(pred, lambda r: r.rk),
            "p_rho": col(pred, lambda r: r.rhos[0]),
            "c_ratio": col(corr, lambda r: r.ratio),
            "c_c_m0": col(corr, lambda r: r.c_m0),
            "c_c_res": col(corr, lambda r: r.c_res),
            "c_rk": col(corr, lambda r: r.rk),
            "c_rho0": col(corr, lambda r: r.rhos[0]),
            "c_rho_last": col(corr, lambda r: r.rhos[1]),
        }
        for name, table in tables.items():
            if not np.all(np.isfinite(table)):
                raise FloatingPointError(f"non-finite UniPC coefficient table {name}: {table}")
        object.__setattr__(self, "_tables", tables)

    def init(self, sample: jax.Array) -> UniPCState:
        """Initial state for a loop that starts from `sample` (only its shape and dtype are used)."""
        zeros = jnp.zeros(sample.shape, sample.dtype)
        return UniPCState(jnp.zeros((), jnp.int32), zeros, zeros, zeros)

    def timestep(self, state: UniPCState) -> jax.Array:
        """The model timestep of the step about to be taken (float32 scalar; an integer value)."""
        return jnp.asarray(self._tables["timesteps"])[state.step]

    def step(self, state: UniPCState, model_output: jax.Array, sample: jax.Array) -> tuple[jax.Array, UniPCState]:
        """One `UniPCMultistepScheduler.step`: corrector (UniC, skipped at step 0), then predictor (UniP).

        Args:
            state: the carried state; `state.step` may be traced.
            model_output: the (guided) velocity prediction at `sample`.
            sample: the current latents.

        Returns:
            `(prev_sample, new_state)`, `prev_sample` in `sample.dtype`.
        """
        i = state.step
        tab = {k: jnp.asarray(v)[i] for k, v in self._tables.items()}
        dtype = sample.dtype

        # convert_model_output, flow_prediction + predict_x0
        x0 = sample - tab["sigma"] * model_output

        # UniC corrector with the order the predictor used at the previous step.
        # Differences are guarded by `where` (not multiplied by 0) so an unused history slot can never
        # turn into NaN; `0 + y` and `x - c * 0` are exact, so the order-1 branches round like diffusers.
        d1_c = (state.x0_prev2 - state.x0_prev) / tab["c_rk"]
        corr_res = jnp.where(tab["order_c"] == 2, tab["c_rho0"] * d1_c, 0)
        x_t_ = tab["c_ratio"] * state.last_sample - tab["c_c_m0"] * state.x0_prev
        corrected = x_t_ - tab["c_c_res"] * (corr_res + tab["c_rho_last"] * (x0 - state.x0_prev))
        sample = jnp.where(i > 0, corrected.astype(dtype), sample)

        # UniP predictor.
        d1_p = (state.x0_prev - x0) / tab["p_rk"]
        pred_res = jnp.where(tab["order_p"] == 2, tab["p_rho"] * d1_p, 0)
        x_t_ = tab["p_ratio"] * sample - tab["p_c_m0"] * x0
        prev_sample = (x_t_ - tab["p_c_res"] * pred_res).astype(dtype)

        new_state = UniPCState(i + 1, x0.astype(state.x0_prev.dtype), state.x0_prev, sample)
        return prev_sample, new_state



# --------------------------------------------------------------------------------------------------
# Flow-matching Euler
# --------------------------------------------------------------------------------------------------


class EulerState(NamedTuple):
    """Loop-carried state of `FlowMatchEuler`: just the step index (int32 scalar)."""

    step: jax.Array


@dataclasses.dataclass(frozen=True, eq=False)
class FlowMatchEuler(_ByConfig):
    """diffusers' `FlowMatchEulerDiscreteScheduler(shift=flow_shift)` with its defaults.

    Note diffusers applies the shift twice to the smallest sigma: once in `__init__` (to find
    `sigma_min`) and again in `set_timesteps`. Reproduced here on purpose.

    Attributes:
        timesteps: float32 `[N]` (not integers, unlike UniPC).
        sigmas: float32 `[N + 1]`, ending with 0.
    """

    num_inference_steps: int
    flow_shift: float = 3.0
    num_train_timesteps: int = 1000
    timesteps: np.ndarray = dataclasses.field(init=False, repr=False)
    sigmas: np.ndarray = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        n = int(self.num_inference_steps)
        if n < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}")
        shift, ntt = self.flow_shift, self.num_train_timesteps
        # __init__: float32 train schedule, shifted (float32 arithmetic like the torch tensors).
        train_t = np.linspace(1, ntt, ntt, dtype=_F32)[::-1].copy()
        train_sigmas = train_t / _F32(ntt)
        train_sigmas = _F32(shift) * train_sigmas / (_F32(1) + _F32(shift - 1) * train_sigmas)
        sigma_max, sigma_min = float(train_sigmas[0]), float(train_sigmas[-1])
        # set_timesteps: float64 linspace over [sigma_max, sigma_min] * ntt, shifted again, then float32.
        ts = np.linspace(sigma_max * ntt, sigma_min * ntt, n)
        sigmas = ts / ntt
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
        sigmas = sigmas.astype(_F32)
        object.__setattr__(self, "timesteps", (sigmas * _F32(ntt)).astype(_F32))
        object.__setattr__(self, "sigmas", np.concatenate([sigmas, np.zeros(1, _F32)]))

    def init(self, sample: jax.Array) -> EulerState:
        """Initial state (the sample is not needed; the argument keeps the interface uniform)."""
        del sample
        return EulerState(jnp.zeros((), jnp.int32))

    def timestep(self, state: EulerState) -> jax.Array:
        """The model timestep of the step about to be taken (float32 scalar)."""
        return jnp.asarray(self.timesteps)[state.step]

    def step(self, state: EulerState, model_output: jax.Array, sample: jax.Array) -> tuple[jax.Array, EulerState]:
        """`x_next = x + (sigma_next - sigma) * v`, computed in float32.

        diffusers casts the result to `model_output.dtype` (e.g. bf16); we round through that dtype and
        come back to `sample.dtype`, which gives the same values while keeping the loop carry's dtype fixed.
        """
        i = state.step
        sigmas = jnp.asarray(self.sigmas)
        dt = sigmas[i + 1] - sigmas[i]
        prev = sample.astype(jnp.float32) + dt * model_output
        prev = prev.astype(model_output.dtype).astype(sample.dtype)
        return prev, EulerState(i + 1)



# --------------------------------------------------------------------------------------------------


class Scheduler(Protocol):
    """What `wan_ref.sample` needs from a scheduler."""

    num_inference_steps: int
    timesteps: np.ndarray
    sigmas: np.ndarray

    def init(self, sample: jax.Array) -> NamedTuple: ...

    def timestep(self, state: NamedTuple) -> jax.Array: ...

    def step(self, state: NamedTuple, model_output: jax.Array, sample: jax.Array) -> tuple[jax.Array, NamedTuple]: ...


AnyScheduler = Union[UniPCMultistep, FlowMatchEuler]


def make_scheduler(name: str, *, num_inference_steps: int, flow_shift: float = 3.0) -> AnyScheduler:
    """Build a scheduler by name.

    Args:
        name: "unipc" (Wan's default, diffusers `UniPCMultistepScheduler`) or "euler"
            (`FlowMatchEulerDiscreteScheduler`).
        num_inference_steps: number of denoising steps.
        flow_shift: timestep shift (`flow_shift` / `shift` in the diffusers configs).

    Raises:
        ValueError: unknown name.
    """
    if name == "unipc":
        return UniPCMultistep(num_inference_steps, float(flow_shift))
    if name == "euler":
        return FlowMatchEuler(num_inference_steps, float(flow_shift))
    raise ValueError(f"unknown scheduler {name!r}; valid names: {', '.join(map(repr, SCHEDULERS))}")
