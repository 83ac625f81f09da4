"""Distribution matching for the 1-step student (issue 25; past the paper, DMD / DMD2, Yin et al. 2024).

Two score estimates on the student's re-noised 1-step images x_t = alpha(t) x^ + sigma(t) n, t ~ U{t_min .. t_max}:
- the real score: the frozen teacher with CFG at the distillation's w (the distribution to match);
- the fake score mu_fake: a trainable copy of the teacher UNet, fitted online to the student's own images by the
  plain denoising loss L_fake = || eps_fake(x_t', t') - n' ||^2 on detached x^ (so it tracks what the student makes).
The student follows the KL gradient between the two, in x_0 space, normalised per sample (DMD eq. 8):

  g = (x0_fake - x0_real) / mean |x^ - x0_real|          (no graph)
  L_DM = 0.5 mean (x^ - sg(x^ - g))^2                    (its gradient in x^ is g / numel)

`dmd_losses` returns L_DM and L_fake with their gradients routed: L_DM reaches only the student (both scores run
without a graph), L_fake only the fake score (x^ is detached). Their sum can take one backward pass. Like the
adversarial critic it never sees the Shapes evaluator.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .consistency import x0_from_eps
from .schedule import NoiseSchedule, coef
from .solver import guided_eps
from .teacher import Condition, as_condition

T_MIN, T_MAX = 20, 980  # DMD's 0.02 T .. 0.98 T


def make_fake_score(teacher: nn.Module) -> nn.Module:
    """mu_fake: a trainable fp32 copy of the teacher UNet (DMD initialises it from the real score)."""
    fake = copy.deepcopy(teacher).float().requires_grad_(True)
    return fake.train()


def conditional_eps(unet: nn.Module, z: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
    """eps(z, t | c) of a plain (teacher-architecture) UNet or its DDP wrapper, cast at the boundary and back."""
    base = getattr(unet, "module", unet)
    out = unet(z.to(base.dtype), t.to(z.device), **as_condition(cond).unet_kwargs(base.dtype))
    return out.sample.to(z.dtype)


def dm_gradient(x_hat: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """DMD's normalised gradient (x0_fake - x0_real) / mean |x^ - x0_real| per sample (no graph)."""
    dims = tuple(range(1, x_hat.ndim))
    weight = (x_hat - x0_real).abs().mean(dim=dims, keepdim=True).clamp_min(1e-5)
    return torch.nan_to_num((x0_fake - x0_real) / weight)


def dmd_losses(fake_score: nn.Module, teacher: nn.Module, schedule: NoiseSchedule, x_hat: torch.Tensor,
               cond: Condition, uncond: Condition, w: float | torch.Tensor, generator: torch.Generator | None = None,
               t_min: int = T_MIN, t_max: int = T_MAX) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_DM, L_fake) for the student's 1-step images x_hat (`adversarial.one_step`, with their graph), under text
    condition cond (the real score also takes uncond for its CFG at w, a float or per sample (B,)). Gradients routed as
    the module docstring says."""
    B = x_hat.shape[0]
    x = x_hat.detach()
    # the distribution-matching gradient at one draw of t and n
    t = torch.randint(t_min, t_max + 1, (B,), generator=generator)
    n = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    a, s = schedule.alpha(t), schedule.sigma(t)
    x_t = coef(a, x) * x + coef(s, x) * n
    t_dev = t.to(x.device)
    with torch.no_grad():
        x0_real = x0_from_eps(x_t, guided_eps(teacher, cond, uncond, w)(x_t, t_dev), a, s)
        x0_fake = x0_from_eps(x_t, conditional_eps(fake_score, x_t, t_dev, cond), a, s)
        g = dm_gradient(x, x0_real, x0_fake)
    l_dm = 0.5 * torch.nn.functional.mse_loss(x_hat, (x - g).detach())
    # the fake score's own denoising loss on the student's images, at a fresh t' ~ U{0 .. T - 1} and noise n'
    t_f = torch.randint(0, schedule.T, (B,), generator=generator)
    n_f = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    x_f = coef(schedule.alpha(t_f), x) * x + coef(schedule.sigma(t_f), x) * n_f
    l_fake = torch.nn.functional.mse_loss(conditional_eps(fake_score, x_f, t_f.to(x.device), cond), n_f)
    return l_dm, l_fake
