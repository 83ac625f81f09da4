"""Teacher ODE solver Phi: DDIM steps with classifier-free guidance in the LCM form.

eps = eps_c + w (eps_c - eps_u)  (w = 8 in the authors' script, i.e. CFG 9 in `uncond + s (cond - uncond)` form);
one DDIM step t -> s: z_s = alpha(s) x0_hat + sigma(s) eps;  multiple estimation: m chained steps of size
k_phi, so k = m * k_phi (METHOD.md, step 2 of Algorithm 1).
"""
from __future__ import annotations

from typing import Callable

import torch

from .consistency import x0_from_eps
from .schedule import NoiseSchedule, coef
from .teacher import Condition, as_condition

# eps_phi(z, t) -> eps: the teacher's (guided) noise prediction at integer timesteps t of shape (B,).
TeacherEps = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def guided_eps(unet: torch.nn.Module, cond: Condition, uncond: Condition, w: float | torch.Tensor) -> TeacherEps:
    """eps_c + w (eps_c - eps_u) from ONE batched UNet call over [cond; uncond]; w a float or per sample (B,).

    cond, uncond: text embeddings (B, L, D), or SDXL TextConditions (each branch with its own pooled embeds and time ids).
    """
    dtype = unet.dtype
    both = as_condition(cond).cat(as_condition(uncond))  # (2B, L, D), SDXL: pooled (2B, P), time ids (2B, 6)

    def eps_fn(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        zz = torch.cat([z, z]).to(dtype)  # (2B, C, H, W)
        tt = torch.cat([t, t])
        eps_c, eps_u = unet(zz, tt, **both.unet_kwargs(dtype)).sample.to(z.dtype).chunk(2)
        w_ = coef(w, eps_c) if torch.is_tensor(w) else w  # (B, 1, 1, 1) in eps's dtype: no float64 in the model
        return eps_c + w_ * (eps_c - eps_u)

    return eps_fn


def ddim_step(z_t: torch.Tensor, eps: torch.Tensor, alpha_t, sigma_t, alpha_s, sigma_s) -> torch.Tensor:
    """One deterministic DDIM step: z_s = alpha(s) (z_t - sigma(t) eps) / alpha(t) + sigma(s) eps."""
    x0 = x0_from_eps(z_t, eps, alpha_t, sigma_t)
    return coef(alpha_s, z_t) * x0 + coef(sigma_s, z_t) * eps


def solve(eps_fn: TeacherEps, schedule: NoiseSchedule, z_t: torch.Tensor, t: torch.Tensor, m: int,
          k_phi: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Phi applied m times with step k_phi from t (clamped at 0): returns (zhat_s, s), s = max(t - m k_phi, 0).

    k_phi: one step size, or one per sample (B,) (a k schedule: longer sub-paths at high t, same m teacher calls)."""
    if m < 1 or (torch.as_tensor(k_phi) < 1).any():
        raise ValueError(f"need m >= 1 and k_phi >= 1, got m={m}, k_phi={k_phi}")
    k_phi = k_phi.to(t.device) if torch.is_tensor(k_phi) else k_phi
    z, t_j = z_t, t.long()
    for _ in range(m):
        s_j = (t_j - k_phi).clamp(min=0)
        eps = eps_fn(z, t_j)
        z = ddim_step(z, eps, schedule.alpha(t_j), schedule.sigma(t_j), schedule.alpha(s_j), schedule.sigma(s_j))
        t_j = s_j
    return z, t_j
