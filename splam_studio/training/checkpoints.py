"""Resumable checkpoints of a training run: safetensors + JSON (no pickle), each written atomically.

<run>/checkpoints/step-N/  student.safetensors, target.safetensors (theta^-), optimizer.safetensors + optimizer.json,
                           state.json (step, time, fp16's loss scale), the last file written: its presence marks
                           a complete checkpoint; the newest `keep` are kept
<run>/snapshots/step-N.safetensors  theta^-'s trainable tensors in fp16, for convergence curves
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..store.atomic import atomic_write, fsync_path, fsync_tree


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message says what to use instead."""


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimiser state as flat tensors (safetensors) and JSON metadata: no pickle anywhere."""
    sd = opt.state_dict()
    tensors, meta = {}, {"param_groups": sd["param_groups"], "scalars": {}}
    for idx, st in sd["state"].items():
        for name, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{name}"] = v.detach().cpu().contiguous()
            else:
                meta["scalars"][f"{idx}.{name}"] = v
    return tensors, meta


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.detach().cpu().contiguous() for k, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(run_dir: Path, step: int, student, target, opt, keep: int, grad_scaler: dict | None = None) -> Path:
    """checkpoints/step-N/{student,target,optimizer}.safetensors + state.json (with fp16's loss scale), atomic."""
    ckpt_root = run_dir / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step:07d}"
    tmp = ckpt_root / f".tmp-step-{step:07d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(_trainable_state(student), tmp / "student.safetensors")
    trainable = set(_trainable_state(student))
    save_file({k: v.detach().cpu().contiguous() for k, v in target.state_dict().items() if k in trainable},
              tmp / "target.safetensors")
    opt_t, opt_meta = _optimizer_tensors(opt)
    save_file(opt_t, tmp / "optimizer.safetensors")
    (tmp / "optimizer.json").write_text(json.dumps(opt_meta, indent=2, default=str))
    (tmp / "state.json").write_text(json.dumps({"step": step, "time": time.time(), "grad_scaler": grad_scaler}))
    fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_path(ckpt_root)
    for old in sorted(p for p in ckpt_root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_snapshot(run_dir: Path, step: int, student, target) -> Path:
    """snapshots/step-N.safetensors: theta^-'s trainable tensors in fp16, for convergence curves."""
    out = run_dir / "snapshots" / f"step-{step:07d}.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    trainable = set(_trainable_state(student))
    sd = {k: v.detach().cpu().half().contiguous() for k, v in target.state_dict().items() if k in trainable}
    return atomic_write(out, lambda tmp: save_file(sd, str(tmp)))


def find_checkpoint(run_dir: Path, resume: str) -> Path | None:
    """`latest` -> the newest complete checkpoint of the run (one with state.json), or an explicit folder."""
    if resume != "latest":
        p = Path(resume)
        if not (p / "state.json").is_file():
            raise CheckpointError(f"--resume {resume!r}: not a complete checkpoint folder (no state.json); use 'latest'")
        return p
    done = sorted(p for p in (run_dir / "checkpoints").glob("step-*") if (p / "state.json").is_file())
    return done[-1] if done else None


def load_checkpoint(ckpt: Path, student, target, opt, grad_scaler=None) -> int:
    """Restore student, target, optimiser and fp16's loss scale; returns the step to continue from."""
    s = load_file(ckpt / "student.safetensors")
    missing = [k for k, p in student.named_parameters() if p.requires_grad and k not in s]
    if missing:
        raise CheckpointError(f"checkpoint {ckpt} does not match this run's student ({len(missing)} missing tensors, e.g. {missing[0]})")
    student.load_state_dict(s, strict=False)
    target.load_state_dict(load_file(ckpt / "target.safetensors"), strict=False)
    _load_optimizer(opt, load_file(ckpt / "optimizer.safetensors"), json.loads((ckpt / "optimizer.json").read_text()))
    state = json.loads((ckpt / "state.json").read_text())
    if grad_scaler is not None and state.get("grad_scaler"):
        grad_scaler.load_state_dict(state["grad_scaler"])
    return int(state["step"])
