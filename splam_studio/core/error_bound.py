"""The per-sub-path error bound (Motivation slides):

|F(z_t, t) - z_0| <= sum over t' in {k, 2k, ..., t} of |F(z_t', t') - F(z_{t'-k}, t'-k)|,
for a teacher ODE trajectory z_T, ..., z_0 on the DDIM grid and a student F at gamma = 1.
Each summand is one sub-path's term; norms are per-sample RMS (a scaled L2 norm, so the bound holds).
`guided_trajectory` and `student_error_bounds` are the runner the studio and the benchmark share.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from .sampler import CleanFn
from .schedule import NoiseSchedule, ddim_grid
from .solver import TeacherEps, guided_eps, solve
from .student import clean_fn


def rms(x: torch.Tensor) -> torch.Tensor:
    """Per-sample root-mean-square over all but the batch dim: (B, ...) -> (B,)."""
    return x.float().pow(2).flatten(1).mean(1).sqrt()


@torch.no_grad()
def teacher_trajectory(eps_fn: TeacherEps, schedule: NoiseSchedule, z_T: torch.Tensor, N: int = 50) -> tuple[torch.Tensor, list[int]]:
    """DDIM trajectory of the (guided) teacher on the N-point grid, ending at t = 0: ((N+1, B, C, h, w), times)."""
    grid = ddim_grid(schedule.T, N).flip(0).tolist()  # 999, 979, ..., 19
    times = grid + [0]
    zs, z = [z_T], z_T
    for t, s in zip(times[:-1], times[1:]):
        tt = torch.full((z.shape[0],), t, dtype=torch.long)
        z, _ = solve(eps_fn, schedule, z, tt, m=1, k_phi=t - s)
        zs.append(z)
    return torch.stack(zs), times


@dataclass
class ErrorBound:
    times: list[int]  # t' of each sub-path start, descending, length n
    terms: torch.Tensor  # (n, B): |F(z_t') - F(z_{t'-k})|
    bound: torch.Tensor  # (n, B): sum of the terms from t' down to the end (the bound on the error at t')
    error: torch.Tensor  # (n, B): |F(z_t') - z_0|, the real error
    F: dict[int, torch.Tensor]  # trajectory index -> F(z_t') (B, ...) at every evaluated point, z_0's included


@torch.no_grad()
def error_bound(F: CleanFn, trajectory: torch.Tensor, times: list[int], stride: int = 1) -> ErrorBound:
    """Per-sub-path terms of a student F along a teacher trajectory, sub-paths of `stride` grid steps (k = stride k_phi)."""
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    idx = list(range(len(times) - 1, -1, -stride))[::-1]  # indices ending exactly at the trajectory's end z_0
    B = trajectory.shape[1]
    Fs = torch.stack([F(trajectory[i], torch.full((B,), times[i], dtype=torch.long)) for i in idx])  # (n+1, B, ...)
    z_0 = trajectory[-1]
    terms = torch.stack([rms(Fs[j] - Fs[j + 1]) for j in range(len(idx) - 1)])  # (n, B)
    bound = terms.flip(0).cumsum(0).flip(0)
    error = torch.stack([rms(Fs[j] - z_0) for j in range(len(idx) - 1)])
    return ErrorBound(times=[times[i] for i in idx[:-1]], terms=terms, bound=bound, error=error,
                      F=dict(zip(idx, Fs.unbind(0))))


@torch.no_grad()
def guided_trajectory(unet: torch.nn.Module, cond: torch.Tensor, uncond: torch.Tensor, w: float,
                      schedule: NoiseSchedule, z_T: torch.Tensor, N: int = 50) -> tuple[torch.Tensor, list[int]]:
    """teacher_trajectory of the teacher UNet guided at the paper's w (CFG scale w + 1); cond, uncond (B, L, D)."""
    return teacher_trajectory(guided_eps(unet, cond, uncond, w), schedule, z_T, N=N)


@torch.no_grad()
def student_error_bounds(students: Mapping[str, torch.nn.Module], cond: torch.Tensor, schedule: NoiseSchedule,
                         trajectory: torch.Tensor, times: list[int], strides=(1,)) -> dict[str, dict[int, ErrorBound]]:
    """{name: {stride: ErrorBound}} of each student UNet (F at gamma = 1) along one teacher trajectory."""
    out = {}
    for name, unet in students.items():
        F = clean_fn(unet, cond, schedule)
        out[name] = {stride: error_bound(F, trajectory, times, stride) for stride in strides}
    return out
