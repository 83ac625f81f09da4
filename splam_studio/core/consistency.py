"""Consistency function and its boundary condition (as LCM).

F(z, t) = c_skip(t) z + c_out(t) x0_hat(z, t), with
c_skip = sigma_data^2 / ((s t)^2 + sigma_data^2), c_out = s t / sqrt((s t)^2 + sigma_data^2),
sigma_data = 0.5 and timestep scaling s = 10 (METHOD.md; diffusers LCMScheduler). c_skip(0) = 1, c_out(0) = 0.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch

from .schedule import coef

SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0


def c_skip(t: torch.Tensor, sigma_data: float = SIGMA_DATA, timestep_scaling: float = TIMESTEP_SCALING) -> torch.Tensor:
    """Boundary scaling of the input; 1 at t = 0."""
    st = torch.as_tensor(t, dtype=torch.float64) * timestep_scaling
    return sigma_data**2 / (st**2 + sigma_data**2)


def c_out(t: torch.Tensor, sigma_data: float = SIGMA_DATA, timestep_scaling: float = TIMESTEP_SCALING) -> torch.Tensor:
    """Boundary scaling of the x0 estimate; 0 at t = 0."""
    st = torch.as_tensor(t, dtype=torch.float64) * timestep_scaling
    return st / (st**2 + sigma_data**2).sqrt()


def x0_from_eps(z: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x0_hat = (z - sigma eps) / alpha, per-sample alpha, sigma of shape (B,)."""
    return (z - coef(sigma, z) * eps) / coef(alpha, z)


def boundary(z: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """F = c_skip(t) z + c_out(t) x0."""
    t = torch.as_tensor(t).cpu()
    return coef(c_skip(t), z) * z + coef(c_out(t), z) * x0


class EpsModel(Protocol):
    """eps_theta(z, t, gamma): the student's epsilon prediction at integer timestep t, conditioned on gamma."""

    def __call__(self, z: torch.Tensor, t: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor: ...


# F(z, t, gamma, sigma, alpha) -> consistency estimate of the trajectory's clean end.
ConsistencyFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def consistency_function(eps_model: EpsModel) -> ConsistencyFn:
    """F_theta(z, t, gamma; sigma, alpha) = c_skip(t) z + c_out(t) (z - sigma eps_theta(z, t, gamma)) / alpha."""

    def F(z, t, gamma, sigma, alpha):
        eps = eps_model(z, t, gamma)
        return boundary(z, x0_from_eps(z, eps, alpha, sigma), t)

    return F
