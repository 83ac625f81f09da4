"""An adversarial term for the 1-step student (issue 25; past the paper, in the style of LADD / SD3-Turbo).

The discriminator is the frozen teacher UNet's own encoder (its down blocks and mid block, run with the batch's text
condition at a re-noised timestep t_d) plus small trainable heads on those features. It never sees the Shapes
evaluator, which scores FID: training against the metric's own features would game it.

  fake  x_0^ = F_theta(z_T, T - 1, gamma = 1): the student's 1-step image from fresh noise z_T
  real  z_0: the batch's latents (data, or the teacher's own images with --prompts)
  both re-noised with one shared noise to t_d ~ U{0 .. t_d_max}, encoded by the teacher, scored by the heads
  hinge losses:  L_D = E relu(1 - D(real)) + E relu(1 + D(fake))     L_G = -E D(fake)

`adversarial_losses` returns L_G and L_D with their gradients routed: L_G reaches the student through the teacher's
features but not the heads (they are applied with detached weights); L_D reaches only the heads (the fake's features
are detached, the real's computed without a graph). Their sum can take one backward pass.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call

from .schedule import NoiseSchedule, coef
from .teacher import Condition, as_condition


class _Encoded(Exception):
    """Raised by the mid block's hook: the teacher's decoder half is not needed for the features."""


def teacher_features(teacher: nn.Module, z: torch.Tensor, t: torch.Tensor, cond: Condition) -> list[torch.Tensor]:
    """The outputs of the teacher UNet's down blocks and mid block at (z, t) with text condition cond; the decoder
    half never runs. Differentiable in z (the teacher's weights stay frozen)."""
    feats: list[torch.Tensor] = []  # filled by the hooks, in block order
    hooks = [b.register_forward_hook(lambda _m, _i, out: feats.append(out[0])) for b in teacher.down_blocks]

    def stop(_m, _i, out):
        feats.append(out)
        raise _Encoded

    hooks.append(teacher.mid_block.register_forward_hook(stop))
    c = as_condition(cond)
    try:
        teacher(z.to(teacher.dtype), t.to(z.device), **c.unet_kwargs(teacher.dtype))
    except _Encoded:
        pass
    finally:
        for h in hooks:
            h.remove()
    return feats


def feature_channels(teacher: nn.Module) -> list[int]:
    """Channels of each feature map `teacher_features` returns (down blocks, then the mid block)."""
    out = list(teacher.config.block_out_channels)
    return out + [out[-1]]


class Heads(nn.Module):
    """One small conv head per teacher feature map: GroupNorm, SiLU, 3x3 conv to `width`, SiLU, 1x1 conv to a logit
    map; D(x) is the sum over the maps of their spatial means, one logit per sample."""

    def __init__(self, channels: list[int], width: int = 64):
        super().__init__()
        self.heads = nn.ModuleList(
            nn.Sequential(nn.GroupNorm(math.gcd(32, c), c), nn.SiLU(), nn.Conv2d(c, width, 3, padding=1), nn.SiLU(),
                          nn.Conv2d(width, 1, 1))
            for c in channels)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return sum(h(f.float()).mean(dim=(1, 2, 3)) for h, f in zip(self.heads, feats))


def hinge_losses(d_real: torch.Tensor, d_fake: torch.Tensor, d_fake_for_g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_G, L_D) of the hinge GAN: L_G = -E D(fake), L_D = E relu(1 - D(real)) + E relu(1 + D(fake))."""
    l_d = torch.relu(1 - d_real).mean() + torch.relu(1 + d_fake).mean()
    return -d_fake_for_g.mean(), l_d


def one_step(F_student, schedule: NoiseSchedule, z_T: torch.Tensor) -> torch.Tensor:
    """F_theta(z_T, T - 1, gamma = 1): the student's 1-step sample from noise z_T, as the sampler takes it."""
    B = z_T.shape[0]
    t = torch.full((B,), schedule.T - 1, dtype=torch.long)
    return F_student(z_T, t, torch.ones(B, dtype=torch.float64), schedule.sigma(t), schedule.alpha(t))


def adversarial_losses(heads: nn.Module, teacher: nn.Module, schedule: NoiseSchedule, fake: torch.Tensor,
                       z_0: torch.Tensor, cond: Condition, generator: torch.Generator | None = None,
                       t_d_max: int = 250) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_G, L_D) for the student's 1-step images `fake` (`one_step`, with their graph) against the batch's real
    latents z_0, both under its text condition. Gradients routed as the module docstring says; the heads run once on
    real and fake together (one forward, as a DDP wrapper needs)."""
    B = z_0.shape[0]
    t_d = torch.randint(0, t_d_max + 1, (B,), generator=generator)
    noise = torch.randn(z_0.shape, generator=generator, dtype=z_0.dtype).to(z_0.device)
    a, s = coef(schedule.alpha(t_d), z_0), coef(schedule.sigma(t_d), z_0)
    f_fake = teacher_features(teacher, a * fake + s * noise, t_d, cond)
    with torch.no_grad():
        f_real = teacher_features(teacher, a * z_0 + s * noise, t_d, cond)
    base = getattr(heads, "module", heads)  # a DDP wrapper's module
    d_fake_for_g = functional_call(base, {k: v.detach() for k, v in base.named_parameters()}, (f_fake,))
    d_real, d_fake = heads([torch.cat([r, f.detach()]) for r, f in zip(f_real, f_fake)]).split(B)
    return hinge_losses(d_real, d_fake, d_fake_for_g)
