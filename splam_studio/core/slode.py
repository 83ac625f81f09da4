"""The Sub-Path Linear ODE (SL-ODE) and the SPLAM objective (Algorithm 1, steps 3-6).

On the sub-path from z_t to the drifted end r zhat_s, r = alpha(t) / alpha(s):
  z_gamma = gamma z_t + (1 - gamma) r zhat_s                     (Methods slide, SL-ODE)
  sigma_gamma^2 = r^2 sigma(s)^2 + gamma^2 (1 - r^2)             (authors' script)
  loss = d(F_theta(z_gamma, t, gamma), F_theta^-(zhat_s, s, 1))  (L_SL-ODE slide)
LCM is the same objective with gamma = 1 (then z_gamma = z_t and sigma_gamma = sigma(t)).
"""
from __future__ import annotations

from typing import Literal

import torch

from .consistency import ConsistencyFn
from .schedule import NoiseSchedule, coef

Distance = Literal["l2", "huber"]
GammaTime = Literal["t", "matched"]
GAMMA_TIMES: tuple[str, ...] = ("t", "matched")  # the student timestep at z_gamma: the paper's t, or matched to sigma_gamma
HUBER_C = 1e-3  # pseudo-Huber c in latent space (authors' / diffusers LCM script default)
GAMMA_EMBED_DIM = 256  # time_cond_proj_dim of the authors' student UNet
GAMMA_SCALE_PAPER = 10.0  # authors: gamma enters as the guidance value w = 10 - 10 gamma


def z_gamma(z_t: torch.Tensor, zhat_s: torch.Tensor, gamma: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Point on the SL-ODE: gamma z_t + (1 - gamma) r zhat_s; gamma, r of shape (B,)."""
    g = coef(gamma, z_t)
    return g * z_t + (1 - g) * coef(r, z_t) * zhat_s


def sigma_gamma(gamma: torch.Tensor, r: torch.Tensor, sigma_s: torch.Tensor) -> torch.Tensor:
    """Noise level of z_gamma: sqrt(r^2 sigma(s)^2 + gamma^2 (1 - r^2)); sigma(t) at gamma = 1, r sigma(s) at 0."""
    g = torch.as_tensor(gamma, dtype=torch.float64).cpu()
    r, sigma_s = torch.as_tensor(r, dtype=torch.float64), torch.as_tensor(sigma_s, dtype=torch.float64)
    return (r**2 * sigma_s**2 + g**2 * (1 - r**2)).sqrt()


def gamma_to_omega(gamma: torch.Tensor, scale: float = GAMMA_SCALE_PAPER, w_c: torch.Tensor | float | None = None) -> torch.Tensor:
    """omega = scale (1 - gamma) + w_c: the value a stock pipeline embeds as `guidance_scale - 1`.

    gamma = 1 and no w_c -> omega = 0. w_c (B,) or scalar is the guidance w of diffusers' LCM recipe, which the
    student sees at gamma = 1 as omega = w (a stock pipeline at guidance_scale = w + 1).
    """
    omega = scale * (1.0 - torch.as_tensor(gamma, dtype=torch.float32).reshape(-1))  # (B,)
    return omega if w_c is None else omega + torch.as_tensor(w_c, dtype=torch.float32).reshape(-1)


def guidance_embedding(omega: torch.Tensor, dim: int = GAMMA_EMBED_DIM) -> torch.Tensor:
    """diffusers' `get_guidance_scale_embedding`: sin / cos of 1000 omega at 10000^(-j / (dim/2 - 1)). (B, dim)."""
    w = torch.as_tensor(omega, dtype=torch.float32).reshape(-1) * 1000.0  # (B,)
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    args = w[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 == 1 else emb  # (B, dim)


def gamma_embedding(gamma: torch.Tensor, dim: int = GAMMA_EMBED_DIM, scale: float = GAMMA_SCALE_PAPER,
                    w_c: torch.Tensor | float | None = None) -> torch.Tensor:
    """emb(gamma) = guidance_embedding(scale (1 - gamma) + w_c); gamma = 1 -> embedding(w_c), embedding(0) without.

    scale = 10 is the authors' choice: 1000 * 10 (1 - gamma) turns most of the 128 frequencies many times over
    gamma in [0, 1], so nearby gammas get unrelated codes. A small scale (e.g. 0.005, arguments <= 5 rad) is smooth
    in every frequency. Since emb(1) is embedding(0) either way, a stock pipeline at guidance_scale = 1 and the
    released SPLAM checkpoints keep sampling at gamma = 1.
    """
    return guidance_embedding(gamma_to_omega(gamma, scale, w_c), dim)


def matched_input(z: torch.Tensor, alpha_t: torch.Tensor, sigma: torch.Tensor, schedule: NoiseSchedule):
    """The SL-ODE point z = alpha(t) x0 + sigma noise moved onto the model's marginal: (a z, t', alpha(t'), sigma(t')).

    t' is the continuous timestep of the same signal-to-noise ratio, alpha_bar(t') = alpha_t^2 / (alpha_t^2 + sigma^2),
    and a = alpha(t') / alpha(t), so a z = alpha(t') x0 + sigma(t') noise. The x0 estimate is unchanged:
    (a z - sigma(t') eps) / alpha(t') = (z - sigma eps) / alpha(t). gamma = 1 gives back (z_t, t).
    """
    alpha_t, sigma = torch.as_tensor(alpha_t, dtype=torch.float64), torch.as_tensor(sigma, dtype=torch.float64)
    alpha_bar = alpha_t**2 / (alpha_t**2 + sigma**2)
    alpha_m, sigma_m = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    return coef(alpha_m / alpha_t, z) * z, schedule.timestep_of(alpha_bar), alpha_m, sigma_m


def distance(pred: torch.Tensor, target: torch.Tensor, kind: Distance = "l2", c: float = HUBER_C) -> torch.Tensor:
    """d(pred, target): mean squared error, or pseudo-Huber mean(sqrt(d^2 + c^2) - c), computed in float32."""
    d = pred.float() - target.float()
    if kind == "l2":
        return (d**2).mean()
    if kind == "huber":
        return (torch.sqrt(d**2 + c**2) - c).mean()
    raise ValueError(f"unknown distance {kind!r}; use 'l2' or 'huber'")


def sample_gamma(batch: int, generator: torch.Generator | None = None, method: str = "splam",
                 p_one: float = 0.0) -> torch.Tensor:
    """gamma ~ U[0, 1] per sample for SPLAM; gamma = 1 for LCM. Shape (B,), float64, on the CPU.

    p_one > 0 (SPLAM only) sets gamma = 1 with that probability: the sampler always runs at gamma = 1, a point
    that U[0, 1] never draws exactly, and the sinusoidal embedding of 10000 (1 - gamma) does not interpolate to it.
    """
    if not 0.0 <= p_one <= 1.0:
        raise ValueError(f"p_one must be in [0, 1], got {p_one}")
    if method == "lcm":
        return torch.ones(batch, dtype=torch.float64)
    if method == "splam":
        gamma = torch.rand(batch, generator=generator, dtype=torch.float64)
        if p_one > 0:
            gamma = torch.where(torch.rand(batch, generator=generator, dtype=torch.float64) < p_one, 1.0, gamma)
        return gamma
    raise ValueError(f"unknown method {method!r}; use 'splam' or 'lcm'")


def sample_w(batch: int, w_min: float, w_max: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """w ~ U[w_min, w_max] per sample, as diffusers' LCM script: (w_max - w_min) rand + w_min. (B,), float64, CPU."""
    return (w_max - w_min) * torch.rand(batch, generator=generator, dtype=torch.float64) + w_min


def splam_loss(
    F_student: ConsistencyFn,
    F_target: ConsistencyFn,
    schedule: NoiseSchedule,
    z_t: torch.Tensor,
    zhat_s: torch.Tensor,
    t: torch.Tensor,
    s: torch.Tensor,
    gamma: torch.Tensor,
    kind: Distance = "l2",
    huber_c: float = HUBER_C,
    gamma_time: GammaTime = "t",
) -> torch.Tensor:
    """SPLAM loss d(F_theta(z_gamma, t, gamma), F_theta^-(zhat_s, s, 1)); with gamma = 1 it is the LCM loss.

    gamma_time "t": the student sees z_gamma at timestep t for every gamma (the paper). "matched": it sees z_gamma
    moved onto the marginal at the timestep of sigma_gamma's signal-to-noise ratio (`matched_input`); same x0 estimate.
    """
    alpha_t, alpha_s, sigma_s = schedule.alpha(t), schedule.alpha(s), schedule.sigma(s)
    r = alpha_t / alpha_s  # (B,) float64
    z_g, sigma_g = z_gamma(z_t, zhat_s, gamma, r), sigma_gamma(gamma, r, sigma_s)
    if gamma_time not in GAMMA_TIMES:
        raise ValueError(f"gamma_time must be one of {GAMMA_TIMES}, got {gamma_time!r}")
    if gamma_time == "t":
        pred = F_student(z_g, t, gamma, sigma_g, alpha_t)
    else:
        z_m, t_m, alpha_m, sigma_m = matched_input(z_g, alpha_t, sigma_g, schedule)
        pred = F_student(z_m, t_m, gamma, sigma_m, alpha_m)
    with torch.no_grad():
        target = F_target(zhat_s, s, torch.ones_like(gamma), sigma_s, alpha_s)
    return distance(pred, target, kind, huber_c)
