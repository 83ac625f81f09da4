"""How much memory a training run needs, estimated before the first step, and the warning when the device has less.

What a SPLAD step holds (loop.py): the frozen teacher UNet, text encoder(s) (SDXL: both) and VAE in the runtime's weight dtype; the
student and its EMA target theta^- in fp32; gradients and AdamW's two moments for the trainable parameters (the whole
UNet, or the LoRA layers and cond_proj); the activations the student's forward keeps for backward (the teacher and
the target run without gradients). Activations are the only term that grows with batch and resolution:
    elements kept per sample and latent pixel = ACT_COEF * unet_params ** ACT_EXP  (x CKPT_FACTOR with checkpointing),
fitted on the saved-for-backward tensors of two student UNets, counted with torch.autograd.graph.saved_tensors_hooks
(parameters excluded, forward only, batch 1, fp32, CPU): the Shapes student (3.6 M parameters, 16x16 latents) and an
SD1.5-shaped one built from its config (859.5 M, 32x32 latents, i.e. 256 px). Numbers in `MEASURED`.
A coarse estimate (allocator slack, the VAE's transient encode and the teacher's forward add ~10-20 %): it is there to
warn before an out-of-memory kill, not to size a machine exactly.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from ..core.teacher import text_encoders

GIB = 2**30
# (unet parameters, latent pixels, elements kept per sample and latent pixel: no checkpointing, with checkpointing)
MEASURED = {"shapes": (3.6e6, 16 * 16, 4434, 1365), "sd15": (859.6e6, 32 * 32, 42670, 13468)}
RECOMPUTE = 0.125  # with checkpointing, backward recomputes one block at a time: about 1/8 of SD1.5's activations
MARGIN = 1.15  # allocator slack, the VAE encode and the teacher's forward


def _fit() -> tuple[float, float, float]:
    """(coefficient, exponent, checkpointing factor) of the power law through the two measured UNets."""
    (p1, _, a1, c1), (p2, _, a2, c2) = MEASURED["shapes"], MEASURED["sd15"]
    exp = math.log(a2 / a1) / math.log(p2 / p1)
    return a1 / p1**exp, exp, (c1 / a1 + c2 / a2) / 2 + RECOMPUTE


ACT_COEF, ACT_EXP, CKPT_FACTOR = _fit()


@dataclass(frozen=True)
class MemoryNeed:
    """Bytes per term and their total (with MARGIN)."""

    frozen: int  # teacher UNet, text encoder(s), VAE
    student: int  # student + theta^- in fp32
    optimiser: int  # gradients + AdamW moments of the trainable parameters
    activations: int
    critic: int = 0  # --adversarial heads or --dmd's fake score: fp32 weights, gradients and AdamW moments

    @property
    def total(self) -> int:
        return int(MARGIN * (self.frozen + self.student + self.optimiser + self.activations + self.critic))

    def describe(self) -> str:
        parts = (("frozen models", self.frozen), ("student + target", self.student), ("optimiser", self.optimiser),
                 ("activations", self.activations)) + ((("critic", self.critic),) if self.critic else ())
        return f"{self.total / GIB:.1f} GiB (" + ", ".join(f"{n} {b / GIB:.1f}" for n, b in parts) + ")"


def estimate_need(*, unet_params: int, other_params: int, trainable_params: int, resolution: int, batch: int,
                  lora_params: int = 0, vae_scale: int = 8, weight_bytes: int = 4, activation_bytes: int = 4,
                  gradient_checkpointing: bool = False, adam_state_bytes: int = 8, critic_params: int = 0) -> MemoryNeed:
    """Memory of one SPLAD training process, from parameter counts (pure).

    unet_params: the student UNet without LoRA layers (cond_proj included); lora_params: its LoRA layers (0 for a full
    fine-tune); other_params: text encoder(s) + VAE; trainable_params: the whole UNet for a full fine-tune, else the
    LoRA layers + cond_proj; weight_bytes / activation_bytes: 2 under fp16 / bf16 mixed precision, 4 in fp32;
    adam_state_bytes: 8 (two fp32 moments), 2 for 8-bit AdamW; critic_params: the critic's (its AdamW is 32-bit).
    """
    if min(unet_params, resolution, batch) <= 0 or min(trainable_params, other_params, lora_params) < 0:
        raise ValueError("estimate_need needs positive parameter counts, resolution and batch")
    latent_px = (resolution // vae_scale) ** 2
    per_px = ACT_COEF * unet_params**ACT_EXP * (CKPT_FACTOR if gradient_checkpointing else 1.0)
    return MemoryNeed(
        frozen=(unet_params + other_params) * weight_bytes,
        student=2 * (unet_params + lora_params) * 4,
        optimiser=trainable_params * (4 + adam_state_bytes),
        activations=int(batch * latent_px * per_px * activation_bytes),
        critic=critic_params * (4 + 4 + 8),
    )


def device_memory(device: torch.device) -> int | None:
    """Bytes the device can hold: a CUDA GPU's total, MPS's recommended maximum, the machine's available RAM."""
    try:
        if device.type == "cuda":
            return torch.cuda.mem_get_info(device)[1]
        if device.type == "mps":
            return int(torch.mps.recommended_max_memory())
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError, RuntimeError, AttributeError):
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None


def warn_if_short(student: torch.nn.Module, pipe, *, resolution: int, batch: int, device: torch.device,
                  mixed_precision: str, gradient_checkpointing: bool, use_8bit_adam: bool = False,
                  available: int | None = None, log=print, critic: torch.nn.Module | None = None) -> MemoryNeed:
    """Log one warning, before the first step, when the estimated need exceeds what `device` has; returns the need."""
    params = list(student.parameters())
    lora = sum(p.numel() for n, p in student.named_parameters() if "lora_" in n)
    unet = sum(p.numel() for p in params) - lora
    trainable = sum(p.numel() for p in params if p.requires_grad)
    half = 2 if mixed_precision in ("fp16", "bf16") else 4
    frozen = (*text_encoders(pipe).values(), pipe.vae)  # SDXL: both text encoders
    need = estimate_need(unet_params=unet, other_params=sum(p.numel() for m in frozen for p in m.parameters()),
                         trainable_params=trainable, resolution=resolution, batch=batch, lora_params=lora,
                         vae_scale=2 ** (len(pipe.vae.config.block_out_channels) - 1), weight_bytes=half,
                         activation_bytes=half, gradient_checkpointing=gradient_checkpointing,
                         adam_state_bytes=2 if use_8bit_adam else 8,
                         critic_params=sum(p.numel() for p in critic.parameters()) if critic is not None else 0)
    have = device_memory(device) if available is None else available
    if have is not None and need.total > have:
        hints = [h for h, off in (("--gradient-checkpointing", not gradient_checkpointing),
                                  ("a smaller --batch-size with --grad-accum", batch > 1),
                                  ("--lora-rank 64", lora == 0), ("--use-8bit-adam (CUDA)", not use_8bit_adam)) if off]
        log(f"warning: this run needs about {need.describe()}, more than the {have / GIB:.1f} GiB the {device.type} "
            f"has{'; try ' + ', '.join(hints) if hints else ''}")
    return need


def weights_bytes(*modules: torch.nn.Module) -> int:
    """Bytes of the distinct parameters and buffers of `modules`: a tensor that several of them share (a teacher UNet
    under its LoRA adapters, models/adapters.py) counts once."""
    seen, total = set(), 0
    for m in modules:
        for t in (*m.parameters(), *m.buffers()):
            key = (t.device, t.data_ptr(), t.shape, t.dtype)
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
    return total
