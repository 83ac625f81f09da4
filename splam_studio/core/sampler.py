"""Multistep consistency sampling (as diffusers' LCMScheduler, gamma = 1, no CFG at run time): at each chosen
timestep predict F(z, t); unless last, re-noise it to the next timestep with fresh noise.

Generating in a stock pipeline (the teacher's solvers, a student's LCMScheduler, decoding) is models/generation.py's.
"""
from __future__ import annotations

from typing import Callable

import torch

from .schedule import NoiseSchedule, coef, lcm_timesteps
# F(z, t) -> estimate of the clean end, for integer timesteps t of shape (B,) (a student at gamma = 1).
CleanFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def consistency_sample(F: CleanFn, schedule: NoiseSchedule, z_T: torch.Tensor, num_steps: int,
                       generator: torch.Generator | None = None, original_steps: int = 50) -> torch.Tensor:
    """Multistep consistency sampling (LCM, Algorithm 1 of Song et al. 2023) on LCMScheduler's timesteps."""
    timesteps = lcm_timesteps(num_steps, schedule.T, original_steps)
    z = z_T
    for i, t in enumerate(timesteps):
        x0 = F(z, torch.full((z.shape[0],), t, dtype=torch.long))
        if i == len(timesteps) - 1:
            return x0
        t_next = timesteps[i + 1]
        noise = torch.randn(z.shape, generator=generator, dtype=z.dtype).to(z.device)
        z = coef(schedule.alpha(t_next), z) * x0 + coef(schedule.sigma(t_next), z) * noise
    raise AssertionError("unreachable")
