"""Device and precision, decided once: CUDA (fp16/bf16), Apple MPS (fp16/fp32, no CUDA-only autocast), CPU (fp32).

Trainable weights stay in fp32; the frozen teacher, VAE and text encoder run in `weight_dtype` (the VAE in fp32
under fp16, whose range it overflows).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Precision = Literal["auto", "no", "fp16", "bf16"]
DeviceName = Literal["auto", "cuda", "mps", "cpu"]


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    mixed_precision: str  # "no" | "fp16" | "bf16", as accelerate spells it
    weight_dtype: torch.dtype  # frozen teacher UNet and text encoder
    vae_dtype: torch.dtype


def pick_device(name: DeviceName = "auto") -> torch.device:
    """CUDA, then MPS, then CPU; or the named one, with a clear error when it is not available."""
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    available = {"cuda": torch.cuda.is_available(), "mps": mps, "cpu": True}
    if name not in available:
        raise ValueError(f"unknown device {name!r}; choose auto, cuda, mps or cpu")
    if not available[name]:
        raise ValueError(f"device {name!r} is not available here; available: {[k for k, v in available.items() if v]}")
    return torch.device(name)


def resolve_runtime(device: DeviceName = "auto", precision: Precision = "auto") -> Runtime:
    """The one place where device and dtypes are chosen."""
    dev = pick_device(device)
    if precision == "auto":
        if dev.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "no"
    if precision not in ("no", "fp16", "bf16"):
        raise ValueError(f"unknown precision {precision!r}; choose auto, no, fp16 or bf16")
    if dev.type == "cpu" and precision == "fp16":
        raise ValueError("fp16 is not supported on the CPU; use --precision no (fp32) or bf16")
    if dev.type == "mps" and precision == "bf16":
        raise ValueError("bf16 mixed precision is not supported on MPS; use fp16 or no")
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    vae_dtype = torch.float32 if precision == "fp16" else dtype
    return Runtime(device=dev, mixed_precision=precision, weight_dtype=dtype, vae_dtype=vae_dtype)
