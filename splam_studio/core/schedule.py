"""Noise schedule of a discrete DDPM-type model: alpha(t), sigma(t), the DDIM grid.

z_t = alpha(t) z_0 + sigma(t) eps, alpha(t) = sqrt(alpha_bar_t), sigma(t) = sqrt(1 - alpha_bar_t)
(METHOD.md, notation). The betas are diffusers' DDPMScheduler's (the one rule for every beta_schedule); alpha_bar is
their cumulative product in float64; callers cast at the model boundary.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from diffusers import DDPMScheduler

# Stable Diffusion v1.5's noise schedule (scheduler_config.json of runwayml/stable-diffusion-v1-5); the one copy.
SD15_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
    "trained_betas": None,
}


def append_dims(x: torch.Tensor, target_ndim: int) -> torch.Tensor:
    """Append singleton dims so a (B,) tensor broadcasts against a (B, C, H, W) one."""
    if x.ndim > target_ndim:
        raise ValueError(f"input has {x.ndim} dims, more than target_ndim={target_ndim}")
    return x.reshape(*x.shape, *([1] * (target_ndim - x.ndim)))


def coef(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-sample float64 coefficient (B,) cast to like's dtype, then device (MPS has no float64), broadcastable."""
    return append_dims(torch.as_tensor(v), like.ndim).to(like.dtype).to(like.device)


def betas_from_config(config: Mapping[str, Any]) -> torch.Tensor:
    """Betas of a diffusers DDPM/DDIM/LCM/PNDM scheduler config, as diffusers' DDPMScheduler makes them, (T,) float64.

    diffusers computes them in float32 (the table the teacher was trained and every stock pipeline samples with);
    alpha_bar is then their cumulative product in float64.
    """
    try:
        scheduler = DDPMScheduler.from_config(dict(config))
    except NotImplementedError as e:
        raise ValueError(f"beta_schedule {config.get('beta_schedule')!r} not supported by diffusers' DDPMScheduler ({e})") from None
    return scheduler.betas.to(torch.float64)


@dataclass(frozen=True)
class NoiseSchedule:
    """alpha(t), sigma(t) on the integer grid 0..T-1 of a variance-preserving DDPM."""

    alphas_cumprod: torch.Tensor  # (T,) float64

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None = None) -> "NoiseSchedule":
        """From any diffusers DDPM-type scheduler config (defaults to SD1.5's)."""
        config = dict(SD15_SCHEDULER_CONFIG if config is None else config)
        pred = config.get("prediction_type", "epsilon")
        if pred != "epsilon":
            raise ValueError(f"prediction_type {pred!r} not supported; SPLAM distils epsilon-prediction teachers")
        return cls(torch.cumprod(1.0 - betas_from_config(config), dim=0))

    @classmethod
    def from_scheduler(cls, scheduler: Any) -> "NoiseSchedule":
        return cls.from_config(scheduler.config)

    @property
    def T(self) -> int:
        return self.alphas_cumprod.shape[0]

    def _table(self, t: torch.Tensor | int) -> torch.Tensor:
        t = torch.as_tensor(t).long().cpu()  # tables stay on the CPU in float64
        if (t < 0).any() or (t >= self.T).any():
            raise ValueError(f"timestep out of range [0, {self.T - 1}]: {t.tolist()}")
        return self.alphas_cumprod[t]

    def alpha(self, t: torch.Tensor | int) -> torch.Tensor:
        """alpha(t) = sqrt(alpha_bar_t), float64."""
        return self._table(t).sqrt()

    def sigma(self, t: torch.Tensor | int) -> torch.Tensor:
        """sigma(t) = sqrt(1 - alpha_bar_t), float64."""
        return (1.0 - self._table(t)).sqrt()

    def timestep_of(self, alpha_bar: torch.Tensor) -> torch.Tensor:
        """The continuous timestep whose alpha_bar is the given one (linear between grid points), float64 (B,).

        alpha_bar_t decreases in t; values above alpha_bar_0 clamp to 0, below alpha_bar_{T-1} to T - 1.
        """
        a = torch.as_tensor(alpha_bar, dtype=torch.float64).cpu().reshape(-1)
        table = self.alphas_cumprod.flip(0)  # increasing: alpha_bar_{T-1}, ..., alpha_bar_0
        a = a.clamp(table[0], table[-1])
        j = torch.searchsorted(table, a).clamp(1, self.T - 1)  # table[j-1] < a <= table[j]
        lo, hi = table[j - 1], table[j]
        frac = (a - lo) / (hi - lo)  # 0 at table[j-1] (timestep T - j), 1 at table[j] (timestep T - 1 - j)
        return (self.T - j).to(torch.float64) - frac


def ddim_grid(T: int = 1000, N: int = 50) -> torch.Tensor:
    """DDIM grid t_i = (T // N)(i + 1) - 1, i = 0..N-1 (19, 39, ..., 999 for SD1.5); skip k_phi = T // N."""
    if not 1 <= N <= T:
        raise ValueError(f"N must be in [1, {T}], got {N}")
    k_phi = T // N
    return torch.arange(1, N + 1, dtype=torch.long) * k_phi - 1


def sample_grid_t(grid: torch.Tensor, batch: int, generator: torch.Generator | None = None,
                  top_prob: float = 0.0) -> torch.Tensor:
    """t uniform on the DDIM grid (B,), long; with top_prob > 0 the top grid point (t = 999, where 1-step sampling
    starts) is drawn with that probability, otherwise uniform. top_prob = 0 draws exactly as a plain uniform draw."""
    if not 0.0 <= top_prob <= 1.0:
        raise ValueError(f"top_prob must be in [0, 1], got {top_prob}")
    t = grid[torch.randint(len(grid), (batch,), generator=generator)]
    if top_prob > 0:
        top = torch.rand(batch, generator=generator, dtype=torch.float64) < top_prob
        t = torch.where(top, grid[-1], t)
    return t


def sub_path_k(t: torch.Tensor, k: int, k_high: int | None = None, t_high: int = 500) -> torch.Tensor:
    """The k schedule: sub-path length k(t) per sample (B,), long. k everywhere (the paper), or k_high for t >= t_high:
    fewer, longer sub-paths where 1-step sampling jumps far. k_high must be a multiple of k, so that s = t - k(t)
    stays on the DDIM grid and the target's timestep is one the student trains at."""
    t = torch.as_tensor(t).long()
    if k_high is None:
        return torch.full_like(t, k)
    if k_high < k or k_high % k:
        raise ValueError(f"k_high must be a multiple of k = {k} and at least k, got {k_high}")
    return torch.where(t >= t_high, torch.full_like(t, k_high), torch.full_like(t, k))


def lcm_timesteps(num_steps: int, T: int = 1000, original_steps: int = 50) -> list[int]:
    """Inference timesteps of diffusers' LCMScheduler: [999] / [999, 499] / [999, 759, 499, 259] for 1/2/4 steps."""
    if not 1 <= num_steps <= original_steps:
        raise ValueError(f"num_steps must be in [1, {original_steps}], got {num_steps}")
    origin = ddim_grid(T, original_steps).flip(0)  # (N,) descending: 999, 979, ..., 19
    idx = torch.floor(torch.linspace(0, original_steps, num_steps + 1, dtype=torch.float64)[:-1]).long()
    return origin[idx].tolist()
