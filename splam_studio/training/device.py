"""Device and precision, decided once: CUDA and Apple MPS (bf16, or fp16 where bf16 is missing), CPU (fp32, or bf16).

| model                          | training, bf16 | training, fp16 (GradScaler) | training, no | sampling (studio)        |
|--------------------------------|----------------|-----------------------------|--------------|--------------------------|
| student (trainable), EMA target | fp32           | fp32                        | fp32         | as loaded (`sample_dtype`) |
| teacher UNet, text encoder     | bf16           | fp16                        | fp32         | `sample_dtype`            |
| VAE                            | bf16           | fp32 (fp16 overflows)       | fp32         | `sample_dtype`, fp32 retry |

`sample_dtype` is fp16 on CUDA and MPS (what a stock pipeline runs in) and fp32 on the CPU. The SD1.5 VAE can
overflow fp16 at 512 px: training encodes in fp32 under fp16 (bf16 has fp32's range), and sampling decodes in fp16
and decodes again in fp32 only when an image comes out non-finite (`models.generation.decode_latents`). Models of different
dtypes meet only at their boundaries, where the caller casts (`student.unet_eps_model`, `solver.guided_eps`,
`models.generation.generate`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch

Precision = Literal["auto", "no", "fp16", "bf16"]
DeviceName = Literal["auto", "cuda", "mps", "cpu"]
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    mixed_precision: str  # "no" | "fp16" | "bf16", as accelerate spells it
    weight_dtype: torch.dtype  # frozen teacher UNet and text encoder during training
    vae_dtype: torch.dtype  # VAE during training (fp32 under fp16)
    sample_dtype: torch.dtype  # every model the studio loads for sampling only

    @property
    def grad_scaler(self) -> bool:
        """fp16 training needs loss scaling (accelerate's GradScaler); bf16 and fp32 do not."""
        return self.mixed_precision == "fp16"


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def _mps_bf16() -> bool:
    """bf16 on MPS needs macOS 14 (Sonoma) or newer."""
    newer = getattr(torch.backends.mps, "is_macos_or_newer", None)
    return bool(newer is not None and newer(14, 0))


def bf16_supported(dev: torch.device) -> bool:
    if dev.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if dev.type == "mps":
        return _mps_bf16()
    return True  # CPU: bf16 autocast works everywhere (slowly without AVX512-BF16/AMX)


def pick_device(name: DeviceName = "auto") -> torch.device:
    """CUDA, then MPS, then CPU; or the named one, with a clear error when it is not available."""
    mps = _mps_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    available = {"cuda": torch.cuda.is_available(), "mps": mps, "cpu": True}
    if name not in available:
        raise ValueError(f"unknown device {name!r}; choose auto, cuda, mps or cpu")
    if not available[name]:
        raise ValueError(f"device {name!r} is not available here; available: {[k for k, v in available.items() if v]}")
    return torch.device(name)


def resolve_runtime(device: DeviceName = "auto", precision: Precision = "auto") -> Runtime:
    """The one place where device and dtypes are chosen (see the table above)."""
    dev = pick_device(device)
    if precision == "auto":  # GPUs: bf16 (no loss scaling, fp32's range), fp16 only where bf16 is missing
        precision = "no" if dev.type == "cpu" else "bf16" if bf16_supported(dev) else "fp16"
    if precision not in DTYPES:
        raise ValueError(f"unknown precision {precision!r}; choose auto, no, fp16 or bf16")
    if dev.type == "cpu" and precision == "fp16":
        raise ValueError("fp16 is not supported on the CPU; use --precision no (fp32) or bf16")
    if precision == "bf16" and not bf16_supported(dev):
        raise ValueError(f"bf16 is not supported on this {dev.type} device; use --precision fp16 or no")
    dtype = DTYPES[precision]
    return Runtime(device=dev, mixed_precision=precision, weight_dtype=dtype,
                   vae_dtype=torch.float32 if precision == "fp16" else dtype,
                   sample_dtype=torch.float32 if dev.type == "cpu" else torch.float16)


THREADS_ENV = "SPLAM_THREADS"  # how the studio hands its thread count to the trainer it starts


def default_threads(cores: int | None = None, load: float | None = None) -> int:
    """CPU threads for torch when the user names none: the cores that other work leaves idle, at least one.

    Torch's default (one OpenMP thread per core) spins against every other busy process: on a 2-core machine at
    load 5 a teacher step ran 10-50 times slower than with one thread (BENCHMARKS.md, threads). The load is the
    1-minute load average, read once at start-up."""
    cores = cores if cores is not None else (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    if load is None:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(cores, int(cores - load + 0.5)))


def configure_threads(threads: int | None = None) -> int:
    """The one place that sets torch's CPU threads, for the studio, the trainer and the studio's trainer child alike.

    `threads` (a user's `--threads`) wins; then the `SPLAM_THREADS` environment variable; then `default_threads()`.
    The choice is written back to `SPLAM_THREADS` and `OMP_NUM_THREADS`, so that a child process inherits it."""
    if threads is None and os.environ.get(THREADS_ENV, "").strip():
        try:
            threads = int(os.environ[THREADS_ENV])
        except ValueError:
            raise ValueError(f"{THREADS_ENV}={os.environ[THREADS_ENV]!r} is not a whole number of threads") from None
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    n = threads if threads is not None else default_threads()
    torch.set_num_threads(n)
    os.environ[THREADS_ENV] = os.environ["OMP_NUM_THREADS"] = str(n)
    return n
