"""The student: a copy of the teacher UNet plus the gamma projection, and its EMA target theta^-.

The authors feed gamma through diffusers' `timestep_cond` slot: `UNet2DConditionModel(time_cond_proj_dim=256)`
adds a bias-free linear `cond_proj` to the time embedding. They initialise it freshly (load with strict=False);
`cond_proj_init="zero"` makes the student start exactly as the teacher at every gamma.
"""
from __future__ import annotations

import copy
from typing import Callable, Literal

import torch
from diffusers import UNet2DConditionModel

from .consistency import ConsistencyFn, EpsModel, consistency_function
from .slode import GAMMA_EMBED_DIM, GAMMA_SCALE_PAPER, gamma_embedding
from .teacher import Condition, as_condition

CondProjInit = Literal["fresh", "zero"]


def build_student(
    teacher: UNet2DConditionModel,
    cond_proj_init: CondProjInit = "fresh",
    embed_dim: int = GAMMA_EMBED_DIM,
    generator: torch.Generator | None = None,
) -> UNet2DConditionModel:
    """Student UNet = teacher weights + `time_cond_proj_dim` projection, fp32, initialised `fresh` or `zero`."""
    if cond_proj_init not in ("fresh", "zero"):
        raise ValueError(f"cond_proj_init must be 'fresh' or 'zero', got {cond_proj_init!r}")
    if teacher.config.time_cond_proj_dim is not None:
        raise ValueError("teacher already has a time_cond_proj (is it a distilled student?); distil from the base model")
    # Drop diffusers' private keys: a UNet constructed in code lists the arguments it was not given in
    # `_use_default_values`, and from_config would reset those (time_cond_proj_dim among them) to their defaults.
    config = {k: v for k, v in teacher.config.items() if not k.startswith("_")}
    config["time_cond_proj_dim"] = embed_dim
    with torch.device(teacher.device):  # draw the (overwritten) initial weights where the teacher lives: fast on a GPU
        student = UNet2DConditionModel.from_config(config)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected or any(not k.startswith("time_embedding.cond_proj") for k in missing):
        raise ValueError(f"teacher/student mismatch: missing={missing}, unexpected={unexpected}")
    w = student.time_embedding.cond_proj.weight  # (time_embed_dim, embed_dim)
    with torch.no_grad():
        if cond_proj_init == "zero":
            w.zero_()
        else:  # nn.Linear's default (Kaiming-uniform) init, drawn from the injected generator
            bound = 1.0 / embed_dim**0.5
            w.copy_(torch.rand(w.shape, generator=generator, dtype=torch.float32) * 2 * bound - bound)
    return student.float()


def unet_eps_model(unet: UNet2DConditionModel, encoder_hidden_states: Condition,
                   gamma_scale: float = GAMMA_SCALE_PAPER, w_c: torch.Tensor | float | None = None) -> EpsModel:
    """eps_theta(z, t, gamma) of a student UNet (or its DDP wrapper); casts to the UNet dtype at the boundary and back.

    w_c: per-sample (B,) or scalar guidance offset, omega = gamma_scale (1 - gamma) + w_c (diffusers' LCM recipe
    embeds its w this way); None for gamma-conditioned students.
    """
    base = getattr(unet, "module", unet)
    dim, dtype = base.config.time_cond_proj_dim, base.dtype
    if dim is None:
        raise ValueError("UNet has no time_cond_proj_dim: build the student with build_student()")
    c = as_condition(encoder_hidden_states)  # the text condition c: embeddings, and SDXL's pooled embeds and time ids

    def eps(z: torch.Tensor, t: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        cond = gamma_embedding(gamma, dim, gamma_scale, w_c).to(dtype).to(z.device)
        t_in = t.float() if t.is_floating_point() else t  # a continuous t (gamma_time "matched"); MPS has no float64
        out = unet(z.to(dtype), t_in.to(z.device), **c.unet_kwargs(dtype), timestep_cond=cond)
        return out.sample.to(z.dtype)

    return eps


def student_F(unet: UNet2DConditionModel, encoder_hidden_states: Condition,
              gamma_scale: float = GAMMA_SCALE_PAPER, w_c: torch.Tensor | float | None = None) -> ConsistencyFn:
    """F_theta(z, t, gamma; sigma, alpha) for a student UNet and text condition c (guidance offset w_c, if any)."""
    return consistency_function(unet_eps_model(unet, encoder_hidden_states, gamma_scale, w_c))


def make_target(student: torch.nn.Module) -> torch.nn.Module:
    """theta^-: a frozen copy of the student (the EMA target)."""
    target = copy.deepcopy(student).requires_grad_(False)
    return target.eval()


@torch.no_grad()
def ema_update(target: torch.nn.Module, online: torch.nn.Module, mu: float = 0.95) -> None:
    """theta^- <- mu theta^- + (1 - mu) theta  (Algorithm 1, step 7)."""
    if not 0.0 <= mu <= 1.0:
        raise ValueError(f"EMA decay mu must be in [0, 1], got {mu}")
    for p_t, p in zip(target.parameters(), online.parameters()):
        p_t.lerp_(p.detach().to(p_t.dtype), 1.0 - mu)


def clean_fn(unet: UNet2DConditionModel, encoder_hidden_states: Condition, schedule,
             w_c: torch.Tensor | float | None = None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """F(z, t) of a student at gamma = 1 (sampling and the error bound): sigma(t), alpha(t) of the schedule.

    w_c: the guidance w a w-conditioned (diffusers-recipe LCM) student runs at; None = embedding(0).
    A UNet without time_cond_proj (an LCM-LoRA fused into its teacher) has no gamma input: it runs without
    timestep_cond, as a stock pipeline runs it at guidance 1.
    """
    if getattr(unet, "module", unet).config.time_cond_proj_dim is None:
        if w_c is not None:
            raise ValueError("w_c needs a student with time_cond_proj_dim (a w-conditioned UNet); this UNet has none")

        c = as_condition(encoder_hidden_states)

        def eps(z: torch.Tensor, t: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
            out = unet(z.to(unet.dtype), t.to(z.device), **c.unet_kwargs(unet.dtype))
            return out.sample.to(z.dtype)

        F = consistency_function(eps)
    else:
        F = student_F(unet, encoder_hidden_states, w_c=w_c)

    def F1(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ones = torch.ones(z.shape[0], dtype=torch.float64)
        return F(z, t, ones, schedule.sigma(t), schedule.alpha(t))

    return F1
