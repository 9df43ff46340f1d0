"""Flow-matching samplers of SD3 / SD3.5 and DiffusionNFT (REFERENCE §1, §2), pure JAX, NHWC latents.

Rectified flow: ``x_sigma = (1 - sigma) x0 + sigma eps``, the network predicts ``v = eps - x0``. Samplers
walk a decreasing grid ``sigmas [S + 1]`` (``sigmas[0]`` = 1 for SD3, ``sigmas[-1]`` = 0) and call a
velocity function ``velocity_fn(x [B, H, W, C], t [B]) -> v [B, H, W, C]`` with ``t = sigma`` in [0, 1]
(the caller multiplies by 1000 for the MMDiT; DiffusionNFT's public rollout code truncates ``1000 sigma`` to an
integer there, diffusers' SD3 pipeline does not).

Methods of :func:`sample` (whole loops under ``jax.lax.scan``; jit them inside the caller's jitted
function, with ``method`` and the ``return_*`` flags static):

* ``"euler"``: the ODE Euler step of diffusers' ``FlowMatchEulerDiscreteScheduler`` (evaluation, SD3 default).
* ``"sde"``: the Flow-GRPO SDE step, a Gaussian ``N(mean, std^2 I)`` per step (MSDDA fuses these);
  ``eta = 0`` degenerates to the Euler step (same formula up to float rounding order).
* ``"dpm2"``: the deterministic multistep 2nd-order DPM-Solver++ in x0 form used by DiffusionNFT rollouts;
  the first and last steps are first order (DDIM).

Classifier-free guidance wraps a conditional model into a velocity function: :func:`guided_velocity`, optionally
with SD3.5's skip-layer guidance on the steps :func:`skip_layer_guidance_steps` selects (``sample(...,
skip_layer_steps=...)``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
VelocityFn = Callable[[Array, Array], Array]
METHODS = ("euler", "sde", "dpm2")


def sigma_schedule(num_steps: int, shift: float = 3.0, num_train_timesteps: int = 1000) -> Array:
    """The SD3 sampling grid ``[num_steps + 1]`` float32, equal to diffusers'
    ``FlowMatchEulerDiscreteScheduler(shift=shift, num_train_timesteps=...).set_timesteps(num_steps)`` ``.sigmas``.

    With ``f(s) = shift s / (1 + (shift - 1) s)``: ``f(linspace(1, f(1 / T), num_steps))`` then a final 0. The
    lower end is shifted twice, as diffusers does: its ``sigma_min`` is the (float32) shifted training table's
    last entry. Computed on the host in diffusers' precisions (float32 table, float64 linspace).
    """

    def shifted(s: np.ndarray) -> np.ndarray:
        return shift * s / (1 + (shift - 1) * s)

    # diffusers' float32 training table, shifted once; its ends bound the inference grid, shifted again
    steps = num_train_timesteps
    sigma_max, sigma_min = (float(s) for s in shifted(np.array([1.0, 1.0 / steps], np.float32)))
    sigmas = shifted(np.linspace(sigma_max * steps, sigma_min * steps, num_steps) / steps)  # diffusers' float64 ops
    return jnp.asarray(np.append(sigmas.astype(np.float32), np.float32(0)))


def euler_step(x: Array, v: Array, sigma: Array, sigma_next: Array) -> Array:
    """ODE Euler step ``x + (sigma_next - sigma) v``; x, v ``[B, H, W, C]``, sigmas scalars."""
    return x + (sigma_next - sigma) * v


def sde_step_gaussian(
    x: Array, v: Array, sigma: Array, sigma_next: Array, eta: float | Array, *, sigma_cap: Array
) -> tuple[Array, Array]:
    """The Flow-GRPO SDE step's Gaussian ``x' ~ N(mean, std^2 I)``: returns ``(mean [B, H, W, C], std scalar)``.

    With ``s = sigma``, ``dt = sigma_next - s < 0``, ``std_t = eta sqrt(s / (1 - s))`` (``1 - s`` uses
    ``sigma_cap`` where ``s == 1``; Flow-GRPO passes ``sigmas[1]``):
    ``mean = x (1 + std_t^2 dt / (2 s)) + v (1 + std_t^2 (1 - s) / (2 s)) dt``, ``std = std_t sqrt(-dt)``.
    ``eta = 0`` gives ``mean = x + dt v`` (the Euler step) and ``std = 0``.
    """
    dt = sigma_next - sigma
    var_t = eta**2 * sigma / (1 - jnp.where(sigma == 1, sigma_cap, sigma))
    mean = x * (1 + var_t * dt / (2 * sigma)) + v * (1 + var_t * (1 - sigma) / (2 * sigma)) * dt
    return mean, jnp.sqrt(var_t * -dt)


def sde_step(x: Array, v: Array, sigma: Array, sigma_next: Array, eta: float | Array, key: Array, *, sigma_cap: Array) -> Array:
    """One Flow-GRPO SDE sample ``x' = mean + std z``, ``z ~ N(0, I)`` from ``key``; see :func:`sde_step_gaussian`."""
    mean, std = sde_step_gaussian(x, v, sigma, sigma_next, eta, sigma_cap=sigma_cap)
    return mean + std * jax.random.normal(key, x.shape, x.dtype)


def dpm_solver2_coefficients(sigmas: Array) -> tuple[Array, Array, Array]:
    """Per-step coefficients ``(a, b, c)``, each ``[S]``, of the multistep DPM-Solver++(2M) for flow matching.

    Step i maps ``x`` at ``s = sigmas[i]`` to ``x' = a x + b D + c (D - D_prev)`` at ``s' = sigmas[i + 1]``,
    where ``D = x - s v`` is the x0 prediction and ``D_prev`` the previous step's. With ``alpha = 1 - sigma``,
    ``lambda = log(alpha / sigma)``, ``h_i = lambda(s') - lambda(s)``:
    ``a = s' / s``, ``b = alpha' (1 - exp(-h_i)) = alpha' - s' alpha / s`` (the DDIM step), and
    ``c = b h_i / (2 h_{i-1})`` (midpoint 2nd-order correction). ``c = 0`` on the first and the last step
    (first order there, as diffusers' ``lower_order_final`` with a final sigma of 0 and DiffusionNFT's solver).
    When ``sigmas[0] = 1``, ``h_0`` is infinite and step 1's correction vanishes too, exactly as in diffusers.
    """
    s, s_next = sigmas[:-1], sigmas[1:]
    a = s_next / s
    b = (1 - s_next) - s_next * (1 - s) / s
    lam = jnp.log1p(-sigmas) - jnp.log(sigmas)  # -inf at sigma = 1, +inf at sigma = 0
    h = lam[1:] - lam[:-1]
    h_prev = jnp.concatenate([jnp.full((1,), jnp.inf, h.dtype), h[:-1]])
    step = jnp.arange(s.shape[0])
    second_order = (step > 0) & (step < s.shape[0] - 1) & jnp.isfinite(h_prev)
    c = jnp.where(second_order, 0.5 * b * h / jnp.where(second_order, h_prev, 1), 0)
    return a, b, c


def skip_layer_guidance_steps(num_steps: int, start: float, stop: float) -> np.ndarray:
    """bool ``[num_steps]``: the steps that get skip-layer guidance, diffusers' rule (``StableDiffusion3Pipeline``)
    ``i > num_steps * start and i < num_steps * stop`` for step index ``i`` (strict at both ends, Python floats).
    E.g. 10 steps, ``start = 0.1``, ``stop = 0.4``: steps 2 and 3.

    Raises:
      ValueError: ``num_steps < 1``.
    """
    if num_steps < 1:
        raise ValueError(f"skip-layer guidance: num_steps must be >= 1, got {num_steps}")
    return np.array([num_steps * start < i < num_steps * stop for i in range(num_steps)], bool)


def guided_velocity(
    model_fn: Callable[[Array, Array, Any], Array],
    cond: Any,
    uncond: Any,
    guidance: float,
    *,
    skip_layer_fn: Callable[[Array, Array, Any], Array] | None = None,
    skip_layer_scale: float | Array = 2.8,
) -> Callable[..., Array]:
    """Classifier-free guidance ``v = v_uncond + w (v_cond - v_uncond)`` as a velocity function.

    ``model_fn(x [N, H, W, C], t [N], conditioning) -> v``; ``cond`` and ``uncond`` are pytrees with a leading
    batch axis B (e.g. text embeddings ``[B, L, D]`` and pooled ``[B, Dp]``). For ``guidance != 1`` both branches
    run in one call on the batch ``[uncond; cond]`` of size 2B; ``guidance == 1`` (a Python float) is CFG-free:
    one call on ``cond`` only.

    Skip-layer guidance (SD3.5, needs ``guidance != 1``): ``skip_layer_fn`` is ``model_fn`` with some blocks
    skipped. The velocity function then takes a third argument, ``velocity_fn(x, t, skip_layer_guidance)``, a bool
    (Python or a traced scalar: ``jax.lax.cond``, the extra call only runs where it is true; :func:`sample` passes
    ``skip_layer_steps[i]``); where true, as diffusers,
    ``v + (v_cond - skip_layer_fn(x, t, cond)) * skip_layer_scale``.

    Raises:
      ValueError: ``skip_layer_fn`` with ``guidance == 1``; at a call, a missing or extra skip-layer flag.
    """
    if guidance == 1.0:
        if skip_layer_fn is not None:
            raise ValueError("skip-layer guidance needs classifier-free guidance (as in diffusers), but guidance is 1")
        return lambda x, t: model_fn(x, t, cond)
    both = jax.tree.map(lambda u, c: jnp.concatenate([u, c]), uncond, cond)

    def velocity_fn(x: Array, t: Array, skip_layer_guidance: bool | Array | None = None) -> Array:
        if (skip_layer_guidance is None) != (skip_layer_fn is None):
            raise ValueError(
                "guided velocity: pass a skip-layer flag exactly when skip_layer_fn is set "
                f"(skip_layer_fn {'set' if skip_layer_fn is not None else 'None'}, flag {skip_layer_guidance!r}); "
                "sampling.sample passes it with skip_layer_steps"
            )
        v_uncond, v_cond = jnp.split(model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), both), 2)
        v = v_uncond + guidance * (v_cond - v_uncond)
        if skip_layer_fn is None:
            return v

        def with_skip_layers() -> Array:
            return (v + (v_cond - skip_layer_fn(x, t, cond)) * skip_layer_scale).astype(v.dtype)

        if isinstance(skip_layer_guidance, bool | np.bool_):
            return with_skip_layers() if skip_layer_guidance else v
        return jax.lax.cond(skip_layer_guidance, with_skip_layers, lambda: v)

    return velocity_fn


class Rollout(NamedTuple):
    """Output of :func:`sample`; optional fields are None unless requested.

    Attributes:
      latents: ``[B, H, W, C]`` final latents (at ``sigmas[-1]``).
      trajectory: ``[S + 1, B, H, W, C]`` latents at every grid point, ``trajectory[0] = x_T``.
      means: ``[S, B, H, W, C]`` SDE Gaussian means, ``trajectory[i + 1] ~ N(means[i], stds[i]^2 I)``.
      stds: ``[S]`` SDE Gaussian standard deviations.
    """

    latents: Array
    trajectory: Array | None = None
    means: Array | None = None
    stds: Array | None = None


def sample(
    velocity_fn: VelocityFn,
    x_T: Array,
    sigmas: Array,
    *,
    method: str = "euler",
    key: Array | None = None,
    eta: float | Array = 0.7,
    return_trajectory: bool = False,
    return_gaussians: bool = False,
    skip_layer_steps: Array | np.ndarray | None = None,
) -> Rollout:
    """Integrates from ``x_T [B, H, W, C]`` (at ``sigmas[0]``) along ``sigmas [S + 1]`` with ``method`` in
    ``("euler", "sde", "dpm2")``, one ``velocity_fn`` call per step, under ``jax.lax.scan``; step i (0-based) is
    evaluated at ``sigmas[i]``, diffusers' ``scheduler.timesteps[i] / 1000``.

    ``"sde"`` needs ``key``; step i draws its noise from ``jax.random.fold_in(key, i)``, so a run is
    reproducible. ``eta`` is its noise level, and ``return_gaussians`` (``"sde"`` only) returns the per-step
    Gaussians. ``return_trajectory`` returns all intermediate latents. For CFG pass a :func:`guided_velocity`.
    ``skip_layer_steps``: bool ``[S]`` (:func:`skip_layer_guidance_steps`); given, step i calls
    ``velocity_fn(x, t, skip_layer_steps[i])`` (a :func:`guided_velocity` with ``skip_layer_fn``).
    """
    if method not in METHODS:
        raise ValueError(f"sampling method {method!r} is not one of {METHODS}")
    if method == "sde" and key is None:
        raise ValueError("method 'sde' needs a PRNG key")
    if return_gaussians and method != "sde":
        raise ValueError(f"return_gaussians is only defined for method 'sde', not {method!r}")
    batch, steps = x_T.shape[0], sigmas.shape[0] - 1
    if skip_layer_steps is not None and jnp.shape(skip_layer_steps) != (steps,):
        raise ValueError(f"skip_layer_steps must have shape [{steps}] (one flag per step), got {jnp.shape(skip_layer_steps)}")
    flags = None if skip_layer_steps is None else jnp.asarray(skip_layer_steps, bool)  # None: no per-step input

    def velocity(x: Array, sigma: Array, flag: Array | None) -> Array:
        t = jnp.full((batch,), sigma, sigmas.dtype)
        return velocity_fn(x, t) if flag is None else velocity_fn(x, t, flag)

    # Each step: (carry (x, aux), (flag, per-step inputs)) -> (x', aux', Gaussian (mean, std) or None).
    if method == "euler":

        def step(x, aux, flag, inputs):
            sigma, sigma_next = inputs
            return euler_step(x, velocity(x, sigma, flag), sigma, sigma_next), aux, None

        inputs, aux = (sigmas[:-1], sigmas[1:]), ()
    elif method == "sde":

        def step(x, aux, flag, inputs):
            i, sigma, sigma_next = inputs
            mean, std = sde_step_gaussian(x, velocity(x, sigma, flag), sigma, sigma_next, eta, sigma_cap=sigmas[1])
            return mean + std * jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype), aux, (mean, std)

        inputs, aux = (jnp.arange(steps), sigmas[:-1], sigmas[1:]), ()
    else:

        def step(x, x0_prev, flag, inputs):
            sigma, a, b, c = inputs
            x0 = x - sigma * velocity(x, sigma, flag)
            return a * x + b * x0 + c * (x0 - x0_prev), x0, None

        inputs, aux = (sigmas[:-1], *dpm_solver2_coefficients(sigmas)), jnp.zeros_like(x_T)

    def body(carry, step_inputs):
        x, aux = carry
        flag, inputs = step_inputs
        x_next, aux, gaussian = step(x, aux, flag, inputs)
        x_next = x_next.astype(x.dtype)
        return (x_next, aux), (x_next if return_trajectory else None, gaussian if return_gaussians else None)

    (latents, _), (trajectory, gaussians) = jax.lax.scan(body, (x_T, aux), (flags, inputs))
    if return_trajectory:
        trajectory = jnp.concatenate([x_T[None], trajectory])
    means, stds = gaussians if return_gaussians else (None, None)
    return Rollout(latents, trajectory, means, stds)
