"""Resumable checkpoints of a training run: safetensors + JSON (no pickle), each written atomically, validated on use.

<run>/checkpoints/step-N/  student.safetensors, target.safetensors (theta^-), optimizer.safetensors + optimizer.json,
                           state.json (step, time, fp16's loss scale), the last file written: its presence marks
                           a complete checkpoint; the newest `keep` are kept; with --adversarial also
                           critic.safetensors + critic_optimizer.{safetensors,json} (with --adversarial the
                           discriminator heads, with --dmd the fake score; and its optimiser)
<run>/snapshots/step-N.safetensors  theta^-'s trainable tensors in fp16, for convergence curves

Before a checkpoint is used, everything in it is checked against the run (`read_checkpoint` + `check_checkpoint`):
the step against its folder name and max_steps, every tensor's name, shape and dtype against the student, theta^- and
the optimiser's layout. `resume_checkpoint` falls back from a damaged newest checkpoint to the newest one that validates.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..store.atomic import atomic_write, check_free, fsync_path, fsync_tree, one_line, write_fault

FILES = ("student.safetensors", "target.safetensors", "optimizer.safetensors", "optimizer.json", "state.json")
CRITIC_FILES = ("critic.safetensors", "critic_optimizer.safetensors", "critic_optimizer.json")
STEP_DIR = re.compile(r"step-(\d+)\Z")
_HEADROOM = 1.05  # free space asked for beyond a checkpoint's tensor bytes (headers, JSON, the file system's blocks)


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message says what is wrong and what to use instead."""


class CheckpointBeyond(CheckpointError):
    """A sound checkpoint past the run's max_steps (not damage: no fallback to an older one)."""


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


def _trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters a checkpoint holds: those that train."""
    return {k: p for k, p in model.named_parameters() if p.requires_grad}


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.detach().cpu().contiguous() for k, p in _trainable(model).items()}


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def estimate_bytes(student: torch.nn.Module, opt: torch.optim.Optimizer | None = None, *, lora: bool = False,
                   fp16_export: bool = False) -> tuple[int, int]:
    """(one checkpoint, the export) in bytes, before any optimiser state exists: student + theta^- trainables and
    AdamW's two moments for a checkpoint; the whole UNet (or the LoRA folder plus its kohya copy) for the export."""
    trainable = sum(p.numel() * p.element_size() for p in student.parameters() if p.requires_grad)
    moments = 2 if opt is None or "8bit" not in type(opt).__name__.lower() else 0.5
    whole = sum(p.numel() * (2 if fp16_export else p.element_size()) for p in student.parameters())
    return int(trainable * (2 + moments)), int(2 * trainable if lora else whole)


def save_checkpoint(run_dir: Path, step: int, student, target, opt, keep: int, grad_scaler: dict | None = None,
                    critic: tuple | None = None) -> Path:
    """checkpoints/step-N/{student,target,optimizer}.safetensors + state.json (with fp16's loss scale), atomic;
    critic: (the critic, its optimiser) of an --adversarial run (the heads) or a --dmd run (the fake score), saved beside them.

    Free space is checked first; a disk or permission fault is one WriteError sentence, the temp folder is removed
    and the previous checkpoint stays as it was."""
    ckpt_root = run_dir / "checkpoints"
    final = ckpt_root / f"step-{step:07d}"
    tmp = ckpt_root / f".tmp-step-{step:07d}-{os.getpid()}"
    student_sd = _trainable_state(student)
    target_sd = {k: v.detach().cpu().contiguous() for k, v in target.state_dict().items() if k in student_sd}
    opt_t, opt_meta = _optimizer_tensors(opt)
    if critic is not None:
        critic_sd = _trainable_state(critic[0])
        critic_t, critic_meta = _optimizer_tensors(critic[1])
    else:
        critic_sd, critic_t = {}, {}
    need = int(sum(map(_nbytes, (student_sd, target_sd, opt_t, critic_sd, critic_t))) * _HEADROOM) + 64 * 1024
    what = f"checkpoint {final.name}"
    try:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        check_free(ckpt_root, need, what)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file(student_sd, tmp / "student.safetensors")
        save_file(target_sd, tmp / "target.safetensors")
        save_file(opt_t, tmp / "optimizer.safetensors")
        (tmp / "optimizer.json").write_text(json.dumps(opt_meta, indent=2, default=str))
        if critic is not None:
            save_file(critic_sd, tmp / "critic.safetensors")
            save_file(critic_t, tmp / "critic_optimizer.safetensors")
            (tmp / "critic_optimizer.json").write_text(json.dumps(critic_meta, indent=2, default=str))
        (tmp / "state.json").write_text(json.dumps({"step": step, "time": time.time(), "grad_scaler": grad_scaler}))
        fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_path(ckpt_root)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        fault = write_fault(e, ckpt_root, need, what) if isinstance(e, Exception) else None
        if fault is not None:
            raise fault from None
        raise
    for old in sorted(p for p in ckpt_root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_snapshot(run_dir: Path, step: int, student, target) -> Path:
    """snapshots/step-N.safetensors: theta^-'s trainable tensors in fp16, for convergence curves."""
    out = run_dir / "snapshots" / f"step-{step:07d}.safetensors"
    trainable = set(_trainable_state(student))
    sd = {k: v.detach().cpu().half().contiguous() for k, v in target.state_dict().items() if k in trainable}
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write(out, lambda tmp: save_file(sd, str(tmp)))
    except Exception as e:
        fault = write_fault(e, out.parent, _nbytes(sd), f"snapshot {out.name}")
        if fault is not None:
            raise fault from None
        raise


# ---------------------------------------------------------------- reading and validating

def _json(path: Path):
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path.name} is unreadable ({one_line(e, 240)})") from None


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for truncated or garbage files
        raise CheckpointError(f"{path.name} is unreadable ({one_line(e, 240)})") from None


def _whole(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_checkpoint(ckpt: Path) -> dict:
    """Every file of a checkpoint, read and checked for form (no model needed); CheckpointError says what is wrong."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt} is not a folder")
    missing = [f for f in FILES if not (ckpt / f).is_file()]
    if missing:
        raise CheckpointError(f"it lacks {', '.join(missing)}")
    state = _json(ckpt / "state.json")
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError("state.json has no 'step'")
    step = state["step"]
    if not _whole(step) or step < 0:
        raise CheckpointError(f"state.json's step {step!r} is not a whole number >= 0")
    named = STEP_DIR.match(ckpt.name)
    if named and int(named.group(1)) != step:
        raise CheckpointError(f"state.json's step {step} disagrees with the folder name {ckpt.name}")
    if state.get("grad_scaler") is not None and not isinstance(state["grad_scaler"], dict):
        raise CheckpointError("state.json's grad_scaler is not an object")
    ck = {"path": ckpt, "step": step, "state": state, "opt_meta": _optimizer_meta(ckpt / "optimizer.json"),
          "student": _tensors(ckpt / "student.safetensors"), "target": _tensors(ckpt / "target.safetensors"),
          "opt_tensors": _tensors(ckpt / "optimizer.safetensors")}
    present = [f for f in CRITIC_FILES if (ckpt / f).is_file()]
    if present and len(present) < len(CRITIC_FILES):
        raise CheckpointError(f"it lacks {', '.join(f for f in CRITIC_FILES if f not in present)}")
    if present:
        ck["critic"] = {"params": _tensors(ckpt / CRITIC_FILES[0]), "opt_tensors": _tensors(ckpt / CRITIC_FILES[1]),
                               "opt_meta": _optimizer_meta(ckpt / CRITIC_FILES[2])}
    return ck


def _optimizer_meta(path: Path) -> dict:
    """An optimizer.json, checked for form: param_groups of integer indices, scalars that are numbers."""
    meta = _json(path)
    groups = meta.get("param_groups") if isinstance(meta, dict) else None
    if not isinstance(groups, list) or not all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                               and all(_whole(i) for i in g["params"]) for g in groups):
        raise CheckpointError(f"{path.name} has no valid param_groups (a list of groups with integer params)")
    scalars = meta.get("scalars", {})
    if not isinstance(scalars, dict) or not all(isinstance(v, (int, float, bool, type(None))) for v in scalars.values()):
        raise CheckpointError(f"{path.name}'s scalars are not a mapping of numbers")
    return {"param_groups": groups, "scalars": scalars}


def _match(kind: str, found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    missing = [k for k in expected if k not in found]
    extra = [k for k in found if k not in expected]
    if missing or extra:
        raise CheckpointError(f"{kind} does not match this run's model ({len(missing)} missing tensors"
                              + (f", e.g. {missing[0]}" if missing else "") + f", {len(extra)} unexpected"
                              + (f", e.g. {extra[0]}" if extra else "") + ")")
    for k, t in found.items():
        e = expected[k]
        if tuple(t.shape) != tuple(e.shape) or t.dtype != e.dtype:
            raise CheckpointError(f"{kind} tensor {k} is {tuple(t.shape)} {t.dtype}, this run's model has "
                                  f"{tuple(e.shape)} {e.dtype}")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"{kind} tensor {k} holds non-finite values")


def check_checkpoint(ck: dict, student, target, opt, max_steps: int | None = None, critic: tuple | None = None) -> None:
    """ck (read_checkpoint) against the run: tensors of student and theta^-, the optimiser's groups and moments, the
    step; with critic (the critic, its optimiser) those too."""
    trainable = _trainable(student)
    _match("student.safetensors", ck["student"], trainable)
    target_sd = target.state_dict()
    _match("target.safetensors", ck["target"], {k: target_sd[k] for k in trainable if k in target_sd})
    _check_optimizer("optimizer.json", ck["opt_meta"], ck["opt_tensors"], opt,
                     "another --cond-proj-lr-scale or --lora-rank?")
    disc = ck.get("critic")
    if (disc is None) != (critic is None):
        raise CheckpointError("it has a critic and this run has none (resume with its --adversarial or --dmd)"
                              if critic is None else
                              f"it lacks {CRITIC_FILES[0]}: it is not from an --adversarial or --dmd run")
    if disc is not None:
        net, d_opt = critic
        _match(CRITIC_FILES[0], disc["params"], _trainable(net))
        _check_optimizer(CRITIC_FILES[2], disc["opt_meta"], disc["opt_tensors"], d_opt, "another teacher?")
    if max_steps is not None and ck["step"] > max_steps:
        raise CheckpointBeyond(f"checkpoint {ck['path'].name} is at step {ck['step']}, past --max-steps {max_steps}; "
                               f"pass --max-steps {ck['step']} or more to continue this run")


def _check_optimizer(kind: str, meta: dict, tensors: dict[str, torch.Tensor], opt, hint: str) -> None:
    """An optimiser's saved groups and moments against the run's optimiser `opt`."""
    groups, now = meta["param_groups"], opt.param_groups
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in now]:
        raise CheckpointError(f"{kind} has {len(groups)} parameter groups of sizes "
                              f"{[len(g['params']) for g in groups]}, this run's optimiser {len(now)} of sizes "
                              f"{[len(g['params']) for g in now]} ({hint})")
    params = [p for g in now for p in g["params"]]
    index = [i for g in groups for i in g["params"]]
    if sorted(index) != list(range(len(params))):
        raise CheckpointError(f"{kind}'s parameter indices are not 0..n-1, each once")
    shape_of = dict(zip(index, (p.shape for p in params)))
    for key in list(tensors) + list(meta["scalars"]):
        idx, _, name = key.partition(".")
        if not idx.isdigit() or int(idx) not in shape_of or not name:
            raise CheckpointError(f"optimizer state entry {key!r} names no parameter of this run's optimiser")
    for key, t in tensors.items():
        idx, name = key.split(".", 1)
        if name in ("exp_avg", "exp_avg_sq") and (tuple(t.shape) != tuple(shape_of[int(idx)]) or not t.is_floating_point()):
            raise CheckpointError(f"optimizer tensor {key} is {tuple(t.shape)} {t.dtype}, its parameter is "
                                  f"{tuple(shape_of[int(idx)])}")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"optimizer tensor {key} holds non-finite values")


def _apply(ck: dict, student, target, opt, grad_scaler=None, critic: tuple | None = None) -> int:
    try:
        student.load_state_dict(ck["student"], strict=False)
        target.load_state_dict(ck["target"], strict=False)
        _load_optimizer(opt, ck["opt_tensors"], ck["opt_meta"])
        if critic is not None:
            critic[0].load_state_dict(ck["critic"]["params"], strict=False)
            _load_optimizer(critic[1], ck["critic"]["opt_tensors"], ck["critic"]["opt_meta"])
        if grad_scaler is not None and ck["state"].get("grad_scaler"):
            grad_scaler.load_state_dict(ck["state"]["grad_scaler"])
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        raise CheckpointError(f"it does not load ({one_line(e, 240)})") from None
    return ck["step"]


def find_checkpoint(run_dir: Path, resume: str) -> Path | None:
    """`latest` -> the newest complete checkpoint of the run (one with state.json), or an explicit folder."""
    if resume != "latest":
        p = Path(resume)
        if not (p / "state.json").is_file():
            raise CheckpointError(f"--resume {resume!r}: not a complete checkpoint folder (no state.json); use 'latest'")
        return p
    done = sorted(p for p in (run_dir / "checkpoints").glob("step-*") if (p / "state.json").is_file())
    return done[-1] if done else None


def last_checkpoint(run_dir: Path) -> tuple[Path, int] | None:
    """(folder, step) of the newest complete checkpoint whose state.json names its step (no tensors read), or None."""
    for p in sorted((Path(run_dir) / "checkpoints").glob("step-*"), reverse=True):
        try:
            step = json.loads((p / "state.json").read_text()).get("step")
        except (OSError, ValueError, AttributeError):
            continue
        m = STEP_DIR.match(p.name)
        if _whole(step) and m and int(m.group(1)) == step:
            return p, step
    return None


def load_checkpoint(ckpt: Path, student, target, opt, grad_scaler=None, max_steps: int | None = None,
                    critic: tuple | None = None) -> int:
    """Validate, then restore student, target, optimiser, fp16's loss scale and the critic of an --adversarial or --dmd run
    (net, optimiser); returns the step to continue from."""
    try:
        ck = read_checkpoint(ckpt)
        check_checkpoint(ck, student, target, opt, max_steps, critic)
    except CheckpointBeyond:
        raise
    except CheckpointError as e:
        raise CheckpointError(f"checkpoint {ckpt} cannot be resumed from: {e}") from None
    try:
        return _apply(ck, student, target, opt, grad_scaler, critic)
    except CheckpointError as e:
        raise CheckpointError(f"checkpoint {ckpt} cannot be resumed from: {e}") from None


def resume_checkpoint(run_dir: Path, resume: str, student, target, opt, grad_scaler=None,
                      max_steps: int | None = None, log=print, critic: tuple | None = None) -> tuple[Path | None, int]:
    """(checkpoint, step) restored for --resume: an explicit folder, or for 'latest' the newest one that validates.

    A damaged newer checkpoint is named in the log and skipped; (None, 0) when the run has no checkpoint at all;
    CheckpointError when it has some and none validates (they are left as they are)."""
    if resume != "latest":
        return Path(resume), load_checkpoint(Path(resume), student, target, opt, grad_scaler, max_steps, critic)
    candidates = sorted((p for p in (Path(run_dir) / "checkpoints").glob("step-*") if p.is_dir()), reverse=True)
    damaged = []
    for ckpt in candidates:
        try:
            ck = read_checkpoint(ckpt)
            check_checkpoint(ck, student, target, opt, max_steps, critic)
            step = _apply(ck, student, target, opt, grad_scaler, critic)
        except CheckpointBeyond:
            raise
        except CheckpointError as e:
            damaged.append(f"{ckpt.name}: {e}")
            log(f"resume: checkpoint {ckpt.name} is damaged ({e}); falling back to the one before it")
            continue
        if damaged:
            log(f"resume: fell back to {ckpt.name} (step {step}), the newest checkpoint that validates; "
                f"skipped {len(damaged)} damaged")
        return ckpt, step
    if damaged:
        raise CheckpointError(f"none of the {len(damaged)} checkpoints in {Path(run_dir) / 'checkpoints'} can be resumed "
                              f"from (newest {damaged[0]}); move them aside to start this run again from step 0, "
                              "or start it anew with --overwrite")
    return None, 0
