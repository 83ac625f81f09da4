"""SPLAD distillation (Algorithm 1) on accelerate: one CUDA / MPS GPU, the CPU, or `accelerate launch` on several.

The loop orchestrates only: data -> latents and text embeddings -> `splad_loss` (steps 1-6) -> optimiser step ->
EMA update (step 7) -> logging, validation and atomic checkpoints, in numbered sections.
`python -m splam_studio.training` (cli.py) is its command line.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..store.atomic import WriteError, atomic_write, free_bytes, human_bytes, write_fault, write_json
from .checkpoints import (CheckpointError, estimate_bytes, find_checkpoint, last_checkpoint, resume_checkpoint,
                          save_checkpoint, save_snapshot)
from .device import resolve_runtime
from .latents import LatentStore, batch_latents, files_identity, latent_cache, read_prompts, teacher_data
from .memory import warn_if_short
from ..core.schedule import NoiseSchedule
from ..core.splad import SpladConfig, splad_loss
from ..core.student import build_student, ema_update, make_target
from ..core.teacher import cfg_scale, encode_text, vae_scale_factor
from ..models.export import export_run
from ..models.loading import load_student, load_teacher, sampling_guidance
from ..store.runs import (TRAINING_CONFIG, RunBusy, RunLock, StepLog, default_run_name, holds_only_the_lock,
                          read_training_config, valid_run_name)

# LoRA targets of diffusers' LCM-LoRA script: attention, feed-forward, resnet convs and time projections.
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]


LR_SCHEDULES = ("constant", "cosine")


def lr_factor(step: int, max_steps: int, schedule: str = "constant") -> float:
    """Multiplier of the base learning rate at optimiser step `step` (0-based): 1, or cosine from 1 to 0."""
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(step, max_steps) / max_steps))
    raise ValueError(f"unknown lr_schedule {schedule!r}; choose one of {LR_SCHEDULES}")


class TrainError(RuntimeError):
    """A run that cannot start or must stop; the message says why and what to change."""


@dataclass
class TrainConfig:
    # what to distil from what
    teacher: str = "shapes"  # embedded name, diffusers folder, single-file .safetensors or hub id
    teacher_config: str | None = None  # local diffusers folder with the configs of a single-file teacher (offline)
    data: str = "shapes"  # image folder, metadata.jsonl folder, datasets name/path, tar shards, or "shapes"
    prompts: str | None = None  # prompts file: the teacher makes its own z_0 (replaces --data); no images needed
    images_per_prompt: int = 1  # teacher-made images per prompt with --prompts
    cache_latents: bool = False  # encode each image and caption once (frozen VAE and text encoder), not every step
    method: str = "splam"  # splam | lcm (gamma = 1, all else identical)
    run_name: str | None = None  # weights/<run_name>; default: <method>-<timestamp>
    output_dir: str = "weights"
    # Algorithm 1
    w: float = 8.0  # teacher CFG in the LCM form (8 = CFG 9, authors' script)
    num_ddim_steps: int = 50  # N; k_phi = 1000 / N = 20
    m: int = 1  # multiple estimation, k = m k_phi
    distance: str = "huber"  # huber (c = 0.001) | l2
    huber_c: float = 1e-3
    ema_decay: float = 0.95  # mu of the target theta^-
    cond_proj_init: str = "fresh"  # fresh (authors) | zero (student starts as the teacher at every gamma)
    gamma_one_prob: float = 0.0  # SPLAM: share of samples at gamma = 1, the sampling point; 0 = the paper's U[0, 1]
    cond_proj_lr_scale: float = 1.0  # learning rate of the gamma projection relative to lr
    gamma_scale: float = 10.0  # emb(gamma) = guidance embedding of gamma_scale (1 - gamma); 10 = the authors'
    gamma_time: str = "t"  # timestep the student sees at z_gamma: t (the paper) | matched (sigma_gamma's own timestep)
    w_min: float | None = None  # LCM only: w ~ U[w_min, w_max] per sample, embedded for the student (diffusers' recipe);
    w_max: float | None = None  # None = fixed w, not embedded. A w-conditioned student samples at CFG w + 1
    init_from: str | None = None  # start the student from a finished full-UNet run (e.g. an LCM warm start)
    save_fp16: bool = False  # store the exported student in fp16 (half the size; loads in the teacher's dtype)
    export_merged: bool = False  # also write the merged stock forms (models.export.export_run): LoRA fused single file, stock pipeline
    # optimisation
    max_steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-5  # full fine-tune; LoRA runs usually want ~1e-4
    lr_schedule: str = "constant"  # constant | cosine (to 0 at max_steps): consistency training drifts at a constant lr
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lora_rank: int = 0  # 0 = full fine-tune; > 0 = LoRA of this rank through peft
    use_8bit_adam: bool = False
    gradient_checkpointing: bool = False
    # data
    resolution: int | None = None  # default: the teacher's native size
    caption_column: str | None = None
    image_column: str | None = None
    num_workers: int = 0
    shapes_size: int = 20000  # images drawn from the Shapes generator when data == "shapes"
    # runtime
    device: str = "auto"
    precision: str = "auto"
    seed: int = 0
    allow_pickle: bool = False
    # bookkeeping
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    validate_every: int = 0  # 0 = only at the end
    snapshot_every: int = 0  # > 0: keep theta^- every N steps in snapshots/ (convergence curves); 0 = off
    validation_prompts: list[str] = field(default_factory=list)
    log_every: int = 10
    max_bad_steps: int = 5  # consecutive non-finite losses before the run stops
    resume: str | None = None  # "latest" or a checkpoint folder
    overwrite: bool = False  # replace an existing run of the same name (the old one is moved to <output_dir>/.trash)

    def validate(self) -> None:
        checks = {
            "method": self.method in ("splam", "lcm"),
            "distance": self.distance in ("huber", "l2"),
            "cond_proj_init": self.cond_proj_init in ("fresh", "zero"),
            "max_steps": self.max_steps >= 1,
            "batch_size": self.batch_size >= 1,
            "grad_accum": self.grad_accum >= 1,
            "lr": 0 < self.lr < 1,
            "lr_schedule": self.lr_schedule in LR_SCHEDULES,
            "ema_decay": 0 <= self.ema_decay <= 1,
            "gamma_one_prob": 0 <= self.gamma_one_prob <= 1,
            "cond_proj_lr_scale": self.cond_proj_lr_scale > 0,
            "gamma_scale": self.gamma_scale > 0,
            "m": self.m >= 1,
            "num_ddim_steps": 1 <= self.num_ddim_steps <= 1000,
            "lora_rank": self.lora_rank >= 0,
            "images_per_prompt": self.images_per_prompt >= 1,
            "checkpoint_every": self.checkpoint_every >= 1,
            "keep_checkpoints": self.keep_checkpoints >= 1,
            "num_workers": self.num_workers >= 0,
            "snapshot_every": self.snapshot_every >= 0,
            "resolution": self.resolution is None or (self.resolution >= 8 and self.resolution % 8 == 0),
        }
        checks["overwrite"] = not (self.overwrite and self.resume)  # continue a run or replace it, not both
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise TrainError(f"invalid config values: {', '.join(f'{k}={getattr(self, k)!r}' for k in bad)}")
        try:  # the objective's own checks (the w range among them) have one owner: SpladConfig
            self.splad()
        except ValueError as e:
            raise TrainError(str(e)) from None
        if self.w_min is not None and not self.w_min <= self.w <= self.w_max:
            raise TrainError(f"need 0 <= w_min <= w <= w_max (w is the guidance the student samples at, CFG w + 1), "
                             f"got w_min={self.w_min}, w={self.w}, w_max={self.w_max}")
        if self.run_name is not None and not valid_run_name(self.run_name):
            raise TrainError(f"run_name must be a plain folder name (letters, digits, . _ -), got {self.run_name!r}")

    def splad(self) -> SpladConfig:
        return SpladConfig(method=self.method, w=self.w, num_ddim_steps=self.num_ddim_steps, m=self.m,
                           distance=self.distance, huber_c=self.huber_c, gamma_one_prob=self.gamma_one_prob,
                           gamma_scale=self.gamma_scale, gamma_time=self.gamma_time, w_min=self.w_min, w_max=self.w_max)


# ---------------------------------------------------------------- data order (exactly resumable)

class StepBatchSampler(torch.utils.data.Sampler):
    """Batches of indices for micro-steps start_step, start_step + 1, ...: epoch e is a permutation seeded by (seed, e);
    process `rank` of `world` reads its own slice. Endless (no len): the loop stops at its max_steps, and a batch
    without one readable item is replaced by the next one."""

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int, rank: int = 0, world: int = 1):
        if n < batch_size * world:
            raise TrainError(f"dataset has {n} usable items, fewer than one batch ({batch_size} x {world} processes)")
        self.n, self.bs, self.seed, self.start, self.rank, self.world = n, batch_size, seed, start_step, rank, world
        self.per_epoch = n // (batch_size * world)  # batches per epoch and rank

    def __iter__(self):
        for step in itertools.count(self.start):
            epoch, pos = divmod(step, self.per_epoch)
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
            off = (pos * self.world + self.rank) * self.bs
            yield perm[off: off + self.bs].tolist()


# ---------------------------------------------------------------- the run

FAULT_ENV = "SPLAM_FAULT_INJECTION"  # tests only: "nan@<step>,<step>..." makes those steps' loss NaN


def _fault_steps(spec: str | None) -> set[int]:
    """The steps whose loss a test forces to NaN ($SPLAM_FAULT_INJECTION); none in a user's run."""
    if not spec:
        return set()
    if not spec.startswith("nan@"):
        raise TrainError(f"{FAULT_ENV} must look like 'nan@3,4', got {spec!r}")
    return {int(x) for x in spec[4:].split(",") if x}


# ---------------------------------------------------------------- the run folder and its trail

def _is_main_process() -> bool:
    """Rank 0 (or no launcher): the process that owns the run folder."""
    return os.environ.get("RANK", "0") == "0"


def _describe_run(run_dir: Path) -> str:
    try:
        method = read_training_config(run_dir).get("method", "?")
    except (OSError, ValueError, AttributeError):
        method = "unknown method"
    last = last_checkpoint(run_dir)
    return f"{method}, " + (f"last checkpoint {last[0].name}" if last else "no checkpoint")


def claim_run_dir(run_dir: Path, cfg: TrainConfig, log=print) -> Path | None:
    """Refuse an existing run unless resumed or overwritten; --overwrite moves it to .trash/ (returned), never deletes.

    Call it holding the run's lock (`run` does): a live run is refused before this, and never moved."""
    if holds_only_the_lock(run_dir) or cfg.resume:
        return None
    if not cfg.overwrite:
        raise TrainError(f"a run named {run_dir.name!r} already exists in {run_dir} ({_describe_run(run_dir)}); "
                         "pass --resume latest to continue it, --overwrite to replace it (the old run is moved to "
                         f"{run_dir.parent / '.trash'}/), or choose another --run-name")
    if not _is_main_process():
        return None
    stem = run_dir.parent / ".trash" / f"{run_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    aside, n = stem, 1
    while aside.exists():  # two overwrites within a second
        n += 1
        aside = stem.with_name(f"{stem.name}-{n}")
    aside.parent.mkdir(parents=True, exist_ok=True)
    run_dir.rename(aside)
    log(f"--overwrite: the previous run {run_dir.name!r} is kept in {aside} until you delete it")
    return aside


# ---------------------------------------------------------------- --resume continues the run as it was

# What a resumed run may change (the new values are recorded in training_config.json); every other field of
# TrainConfig is the run's own objective, data or optimisation, and a --resume that asks for another value is refused.
RESUME_MAY_CHANGE = frozenset({
    "max_steps", "validate_every", "validation_prompts", "log_every", "checkpoint_every", "keep_checkpoints",
    "snapshot_every", "max_bad_steps", "num_workers", "device", "precision", "allow_pickle", "save_fp16",
    "resume", "overwrite", "output_dir", "run_name"})
_PATH_FIELDS = ("teacher", "teacher_config", "data", "init_from")


def recorded_config(run_dir: Path) -> dict | None:
    """The TrainConfig fields of the run's own training_config.json (None if it has none or it is unreadable).

    batch_size is the one asked for (a small data set clamps the one used; both are recorded)."""
    try:
        rec = read_training_config(run_dir)
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict):
        return None
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    out = {k: v for k, v in rec.items() if k in names}
    if "batch_size_requested" in rec:
        out["batch_size"] = rec["batch_size_requested"]
    return out


def _same(name: str, old, new) -> bool:
    if old == new:
        return True
    if name in _PATH_FIELDS and isinstance(old, str) and isinstance(new, str):
        try:
            return os.path.samefile(old, new)
        except OSError:
            return False
    return False


def resume_conflicts(cfg: TrainConfig, recorded: dict, used: dict | None = None) -> list[str]:
    """'--flag new (the run has old)' for each field where cfg asks for another value than the run's own."""
    out = []
    for f in dataclasses.fields(TrainConfig):
        k = f.name
        if k in RESUME_MAY_CHANGE or k not in recorded:
            continue
        new = getattr(cfg, k)
        if k == "resolution" and new is None:
            continue  # the teacher's native size, as recorded
        if _same(k, recorded[k], new) or (used is not None and k in used and _same(k, used[k], new)):
            continue
        out.append(f"--{k.replace('_', '-')} {new!r} (the run has {recorded[k]!r})")
    return out


def _check_resume(cfg: TrainConfig, run_dir: Path, log) -> TrainConfig:
    """Refuse a --resume that changes the run's objective, data or optimisation; log what it may change."""
    recorded = recorded_config(run_dir)
    if recorded is None:
        if run_dir.is_dir() and not holds_only_the_lock(run_dir):
            log(f"resume: {run_dir / TRAINING_CONFIG} is missing or unreadable; the flags given are used unchecked")
        return cfg
    try:
        used = read_training_config(run_dir)
    except (OSError, ValueError):
        used = None
    bad = resume_conflicts(cfg, recorded, used if isinstance(used, dict) else None)
    if bad:
        raise TrainError(f"--resume continues run {run_dir.name!r} as it was, but this command asks for "
                         f"{'; '.join(bad)}; drop those flags (the run's {TRAINING_CONFIG} has its settings), or "
                         "start a new run under another --run-name")
    changed = [f"{k} {recorded[k]!r} -> {getattr(cfg, k)!r}" for k in sorted(RESUME_MAY_CHANGE - {"resume", "overwrite",
               "output_dir", "run_name"}) if k in recorded and recorded[k] != getattr(cfg, k)]
    if changed:
        log(f"resume: changed {', '.join(changed)} (recorded in {TRAINING_CONFIG})")
    if cfg.resolution is None and recorded.get("resolution"):
        cfg = dataclasses.replace(cfg, resolution=recorded["resolution"])
    return cfg


# ---------------------------------------------------------------- the run's life: lock, signals, clean ends

class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM ended the run; `restored` says whether an overwritten run was put back."""

    def __init__(self, signum: int, run_dir: Path | None = None, restored: bool = False):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.run_dir, self.restored = signum, run_dir, restored


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


@contextlib.contextmanager
def _signals(handler):
    """SIGTERM (and SIGINT when handler is SIG_IGN) handled by `handler` inside the block, in the main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    sigs = [signal.SIGTERM] + ([signal.SIGINT] if handler is signal.SIG_IGN else [])
    old = {s: signal.signal(s, handler) for s in sigs}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _fault_folder(e: BaseException, run_dir: Path) -> Path:
    name = getattr(e, "filename", None)
    return Path(name).parent if isinstance(name, str) and name else run_dir


def stop_report(run_dir: Path, *, restored: bool = False, output_dir_flag: str | None = None,
                prog: str = "python -m splam_studio.training") -> str:
    """What a stopped run left, in words: its real last checkpoint and step and a command resuming this very run, or
    that none exists (and whether the folder, or an overwritten run put back, is there)."""
    run_dir = Path(run_dir)
    if restored:
        return (f"no checkpoint of the new run was written; nothing of it was kept, and the previous run "
                f"{run_dir.name!r} is back in {run_dir}")
    last = last_checkpoint(run_dir) if run_dir.is_dir() else None
    if last is None:
        left = (f"the name {run_dir.name!r} is free" if not run_dir.exists() else
                f"{run_dir} holds no checkpoint to resume from")
        return f"no checkpoint was written before the stop; {left}, so start the run again with the same command"
    cmd = f"{prog} --run-name {run_dir.name} --resume latest" + (f" --output-dir {output_dir_flag}" if output_dir_flag else "")
    return f"the last complete checkpoint is {last[0]} (step {last[1]}); continue this run with: {cmd}"


def run(cfg: TrainConfig, log=print) -> Path:
    """Train; returns the run folder under output_dir. Resumable with cfg.resume = 'latest'.

    The run's folder is locked while it trains (a second trainer is refused, naming the live one: store.runs.live_owner).
    An existing run is refused unless cfg.resume or cfg.overwrite; a resume keeps the run's own settings
    (resume_conflicts). A run that fails or is stopped (Ctrl-C, SIGTERM) before its first checkpoint leaves no folder
    behind, and an overwritten run is put back. Disk and permission faults end in one TrainError sentence.
    """
    cfg.validate()
    cfg = dataclasses.replace(cfg, run_name=cfg.run_name or default_run_name(cfg.method))
    run_dir = Path(cfg.output_dir) / cfg.run_name
    if not _is_main_process():  # rank 0 owns the folder: its lock, its claim and its clean-up
        return _train(cfg, log)
    if run_dir.exists() and not run_dir.is_dir():
        raise TrainError(f"{run_dir} is a file, not a run folder; choose another --run-name or --output-dir")
    fresh = holds_only_the_lock(run_dir)  # no run of this name yet: a failure before a checkpoint removes the folder
    locks: list[RunLock] = []
    aside = None
    try:
        try:
            locks.append(RunLock.acquire(run_dir))
        except RunBusy as e:
            raise TrainError(str(e)) from None
        if cfg.resume:
            cfg = _check_resume(cfg, run_dir, log)
        aside = claim_run_dir(run_dir, cfg, log)
        if aside is not None:
            fresh = True
            try:
                locks.append(RunLock.acquire(run_dir))
            except RunBusy as e:
                raise TrainError(f"{e}; the previous run stays in {aside}") from None
        with _signals(_raise_interrupted):
            return _train(cfg, log)
    except BaseException as e:
        restored = False
        owned = bool(locks) and (aside is None or len(locks) == 2)
        if owned and fresh and find_checkpoint(run_dir, "latest") is None:
            with _signals(signal.SIG_IGN):  # a second Ctrl-C must not cut the clean-up short
                shutil.rmtree(run_dir, ignore_errors=True)  # made by this call, holding no checkpoint
                if aside is not None and not run_dir.exists():
                    aside.rename(run_dir)
                    restored = True
                    log(f"the previous run {run_dir.name!r} is back in {run_dir}")
        if isinstance(e, KeyboardInterrupt):
            raise Interrupted(getattr(e, "signum", signal.SIGINT), run_dir, restored) from None
        if isinstance(e, WriteError):
            raise TrainError(str(e)) from None
        fault = write_fault(e, _fault_folder(e, run_dir)) if isinstance(e, Exception) else None
        if fault is not None:
            raise TrainError(str(fault)) from None
        raise
    finally:
        for lock in reversed(locks):
            lock.release()


# ---------------------------------------------------------------- the loop's pieces (tests/test_loop.py tests each)

def add_lora(student, rank: int):
    """LoRA adapters of `rank` on LORA_TARGETS (peft); the base frozen, the gamma projection trained in full (it is new)."""
    from peft import LoraConfig

    student.requires_grad_(False)
    student.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
    student.time_embedding.cond_proj.requires_grad_(True)
    return student


def make_student(pipe, teacher, cfg: TrainConfig):
    """The online student theta: the teacher plus the gamma projection (drawn from cfg.seed), fp32; warm-started from
    --init-from, as LoRA adapters when lora_rank > 0, with gradient checkpointing when asked."""
    student = build_student(teacher, cfg.cond_proj_init, generator=torch.Generator().manual_seed(cfg.seed))
    if cfg.init_from:  # warm start, e.g. SPLAM continued from an LCM student
        init = load_student(cfg.init_from, pipe)
        if any("lora" in k for k in init.state_dict()):
            raise TrainError(f"--init-from {cfg.init_from!r} is a LoRA run; it takes a full-UNet student run")
        student.load_state_dict({k: v.float() for k, v in init.state_dict().items()})
    if cfg.lora_rank > 0:
        add_lora(student, cfg.lora_rank)
    if cfg.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    return student


def trainable_parameters(student) -> list[torch.nn.Parameter]:
    return [p for p in student.parameters() if p.requires_grad]


def param_groups(student, cfg: TrainConfig) -> list:
    """The trainable tensors for the optimiser: one group at lr, or, when cond_proj_lr_scale != 1, the rest at lr and
    the gamma projection (cond_proj) in its own group at cond_proj_lr_scale x lr."""
    if cfg.cond_proj_lr_scale == 1.0:
        return trainable_parameters(student)
    named = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if "cond_proj" not in n]},
            {"params": [p for n, p in named if "cond_proj" in n], "lr": cfg.lr * cfg.cond_proj_lr_scale}]


def make_optimizer(student, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (bitsandbytes' 8-bit one with use_8bit_adam) over `param_groups`; each group keeps its base lr in
    "initial_lr", which `optimizer_step` scales by lr_factor."""
    groups = param_groups(student, cfg)
    if cfg.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise TrainError("--use-8bit-adam needs bitsandbytes (pip install bitsandbytes) and a CUDA GPU") from e
        opt = bnb.optim.AdamW8bit(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    for g in opt.param_groups:
        g.setdefault("initial_lr", g["lr"])
    return opt


def step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """The one source of a micro-batch's randomness (the VAE's posterior sample, then t, eps and gamma in splad_loss):
    distinct per step, micro-batch and process rank, and the same again when the run is resumed."""
    return torch.Generator().manual_seed(seed * 7919 + step * 104729 + micro * 31 + rank)


@torch.no_grad()
def encode_batch(pipe, batch: dict, uncond_1: torch.Tensor, gen: torch.Generator, vae_dtype: torch.dtype):
    """(z_0, c, c_uncond) of a batch: z_0 a posterior sample of the VAE x its scaling_factor (fp32), c the captions'
    text embeddings, c_uncond the empty prompt's (1, L, D) embedding repeated per sample; from pixels, or from the
    latent cache / teacher data (`latents.batch_latents`, one owner for all three)."""
    return batch_latents(batch, pipe, uncond_1.device, vae_dtype, gen, uncond_1)


def finite_on_all_ranks(loss: torch.Tensor, acc) -> bool:
    """True when the loss is finite on every process: a NaN step is skipped by all ranks together (a rank skipping
    alone would leave the others waiting in the gradient all-reduce, or the replicas apart)."""
    finite = torch.isfinite(loss.detach()).float()
    if acc.num_processes > 1:
        finite = acc.reduce(finite, "min")
    return finite.item() >= 1


def on_all_ranks(flag: bool, acc) -> bool:
    """`flag` and-ed over the processes (a batch readable on every rank), for a decision all ranks take together."""
    if acc.num_processes == 1:
        return flag
    return acc.reduce(torch.tensor(float(flag), device=acc.device), "min").item() >= 1


def optimizer_step(acc, opt, params, step: int, cfg: TrainConfig) -> float:
    """Clip the gradient norm to max_grad_norm (on the micro-step that syncs), set each group's lr to its initial_lr x
    lr_factor(step), step and zero the gradients; returns the first group's lr."""
    if acc.sync_gradients:
        acc.clip_grad_norm_(params, cfg.max_grad_norm)
    for g in opt.param_groups:
        g["lr"] = g["initial_lr"] * lr_factor(step, cfg.max_steps, cfg.lr_schedule)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return opt.param_groups[0]["lr"]


def _train(cfg: TrainConfig, log=print) -> Path:
    """The loop of `run` (which owns the run folder's life)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from .data import build_dataset, collate_drop_none, first_captions, fit_batch_size

    cfg.validate()
    requested_batch = cfg.batch_size  # recorded: a small data set clamps the batch, a resume compares the asked one
    rt = resolve_runtime(cfg.device, cfg.precision)
    run_name = cfg.run_name or default_run_name(cfg.method)
    run_dir = Path(cfg.output_dir) / run_name
    acc = Accelerator(mixed_precision=rt.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
                      cpu=rt.device.type == "cpu", log_with="tensorboard", project_dir=str(run_dir / "logs"))
    set_seed(cfg.seed)
    device = acc.device

    # ---- 1. models and optimiser (dtypes: device.py): frozen teacher, text encoder and VAE in the runtime's dtypes; student and theta^- fp32
    pipe = load_teacher(cfg.teacher, torch_dtype=torch.float32, allow_pickle=cfg.allow_pickle, config=cfg.teacher_config)
    schedule = NoiseSchedule.from_scheduler(pipe.scheduler)
    teacher = pipe.unet.requires_grad_(False).eval()
    student = make_student(pipe, teacher, cfg)
    target = make_target(student)
    teacher.to(device, rt.weight_dtype)
    pipe.text_encoder.requires_grad_(False).to(device, rt.weight_dtype)
    pipe.vae.requires_grad_(False).to(device, rt.vae_dtype)
    target.to(device)

    params = trainable_parameters(student)  # what the gradient norm is clipped over
    opt = make_optimizer(student, cfg)

    # ---- 2. resume (before data, so the sampler starts at the right step), validated; free space for the run
    ckpt_bytes, export_bytes = estimate_bytes(student, opt, lora=cfg.lora_rank > 0, fp16_export=cfg.save_fp16)
    free = free_bytes(run_dir)
    if acc.is_main_process and free is not None and free < 2 * ckpt_bytes + export_bytes:
        log(f"warning: {run_dir} has {human_bytes(free)} free, less than two checkpoints and the export need "
            f"(about {human_bytes(2 * ckpt_bytes + export_bytes)}); the run will stop at the checkpoint that does not fit")
    start = 0
    if cfg.resume:
        try:
            ckpt, start = resume_checkpoint(run_dir, cfg.resume, student, target, opt, acc.scaler, cfg.max_steps, log)
        except CheckpointError as e:
            raise TrainError(str(e)) from None
        if ckpt is None:
            log(f"resume: no complete checkpoint in {run_dir / 'checkpoints'}; starting from step 0")
        else:
            log(f"resume: {ckpt.name}, continuing at step {start}")
    if start >= cfg.max_steps:
        log(f"already at step {start} >= max_steps {cfg.max_steps}; nothing to do")

    # ---- 3. data
    vae_scale = vae_scale_factor(pipe.vae)
    resolution = cfg.resolution or teacher.config.sample_size * vae_scale
    dataset, store = _latent_source(cfg, pipe, acc, resolution, log)
    if not cfg.validation_prompts:  # validate on the run's own captions (data.first_captions), not a preset's
        cfg = dataclasses.replace(cfg, validation_prompts=dataset.captions(4) if store is not None else first_captions(dataset, 4))
    counter = getattr(dataset, "counter", None)
    loader_kw = dict(collate_fn=collate_drop_none, num_workers=cfg.num_workers)  # drops unreadable items (None)
    if isinstance(dataset, torch.utils.data.IterableDataset):
        loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, **loader_kw)
        skip = start * cfg.grad_accum  # batches to fast-forward
    else:
        batch_size, note = fit_batch_size(len(dataset), cfg.batch_size, acc.num_processes)
        if note:
            log(note)
            cfg = dataclasses.replace(cfg, batch_size=batch_size)
        sampler = StepBatchSampler(len(dataset), cfg.batch_size, cfg.seed, start * cfg.grad_accum,
                                   acc.process_index, acc.num_processes)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, **loader_kw)
        skip = 0

    student, opt = acc.prepare(student, opt)
    # ---- 4. bookkeeping: the resolved config, trackers, stats.jsonl, fault hook (tests only)
    resolved = {**dataclasses.asdict(cfg), "run_name": run_name, "resolution": resolution,
                "batch_size_requested": requested_batch, "gamma_sampling":
                ("constant 1" if cfg.method != "splam" else "uniform[0,1]" if not cfg.gamma_one_prob
                 else f"1 with p={cfg.gamma_one_prob:g}, else uniform[0,1]"), "k": cfg.m * (schedule.T // cfg.num_ddim_steps),
                "mixed_precision": rt.mixed_precision, "device": str(device), "processes": acc.num_processes,
                "dtypes": {k: str(v).removeprefix("torch.") for k, v in (("student", acc.unwrap_model(student).dtype), ("target", target.dtype),
                           ("teacher", teacher.dtype), ("text_encoder", pipe.text_encoder.dtype), ("vae", pipe.vae.dtype))},
                "teacher_scheduler": dict(pipe.scheduler.config),
                "latent_store": None if store is None else {"folder": f".cache/{store.root.name}", "kind": store.manifest["kind"],
                                                            "items": len(dataset), "seconds_here": round(store.seconds, 1)}}
    if acc.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in (run_dir / "checkpoints").glob(".tmp-*"):  # a write interrupted by a crash or kill -9
            shutil.rmtree(stale, ignore_errors=True)
        write_json(run_dir / TRAINING_CONFIG, resolved)
        acc.init_trackers("splad", config={k: v for k, v in resolved.items() if isinstance(v, (int, float, str, bool))})

    stats = StepLog(run_dir, cfg, start) if acc.is_main_process else None
    with torch.no_grad():
        uncond_1 = encode_text(pipe, [""], device)  # (1, L, D)
    splad = cfg.splad()
    faults = _fault_steps(os.environ.get(FAULT_ENV))
    bad_in_row = bad_total = 0
    step = start
    t0, losses = time.time(), []
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.max_steps, initial=start, disable=not acc.is_main_process, desc=f"{cfg.method} {run_name}",
               dynamic_ncols=True, file=sys.stderr)
    data_iter = iter(loader)
    for _ in range(skip):  # iterable data: fast-forward to the resumed position
        next(data_iter, None)
    micro, end = 0, object()
    if acc.is_main_process:  # one warning before the first step when the estimated need exceeds the device (memory.py)
        warn_if_short(acc.unwrap_model(student), pipe, resolution=resolution, batch=cfg.batch_size, device=device,
                      mixed_precision=rt.mixed_precision, gradient_checkpointing=cfg.gradient_checkpointing,
                      use_8bit_adam=cfg.use_8bit_adam, log=log)
    # ---- 5. the step (Algorithm 1 in core/splad.py), logging, validation and checkpoints
    # batches in a row without one readable item before the run stops: two epochs' worth hold a whole epoch
    unreadable, max_unreadable = 0, 2 * getattr(loader.batch_sampler, "per_epoch", 50)
    while step < cfg.max_steps:
        batch = next(data_iter, end)
        if batch is end:  # a finite streamed source ended (map-style data's StepBatchSampler never does): next pass
            data_iter = iter(loader)
            batch = next(data_iter, end)
            if batch is end:
                raise TrainError(f"data source {cfg.data!r} yielded no usable batch (see the skip counts above)")
        if not on_all_ranks(batch is not None, acc):  # a batch of only unreadable items (counted), on any rank: all move on
            unreadable += 1
            if unreadable >= max_unreadable:
                from .data import DataError

                raise DataError(f"{unreadable} batches in a row had no readable item (at step {step}; "
                                f"{counter.summary() if counter is not None else 'no skip counts'}); "
                                "replace or remove those files")
            micro += 1
            continue
        unreadable = 0
        gen = step_generator(cfg.seed, step, micro, acc.process_index)
        with acc.accumulate(student):
            z_0, cond, uncond = encode_batch(pipe, batch, uncond_1, gen, rt.vae_dtype)  # 1. z_0; text
            with acc.autocast():
                loss = splad_loss(splad, schedule, student, target, teacher, z_0, cond, uncond, gen)
            if step in faults:
                loss = loss * float("nan")
            if not finite_on_all_ranks(loss, acc):
                bad_in_row += 1
                bad_total += 1
                opt.zero_grad(set_to_none=True)
                log(f"step {step}: non-finite loss, step skipped ({bad_in_row} in a row, {bad_total} total)")
                if bad_in_row >= cfg.max_bad_steps:
                    raise TrainError(f"{bad_in_row} non-finite losses in a row at step {step}; stopped. "
                                     f"The last good checkpoint in {run_dir / 'checkpoints'} is intact; lower --lr or check the data")
                micro = 0
                step += 1
                bar.update(1)
                continue
            bad_in_row = 0
            acc.backward(loss)
            lr = optimizer_step(acc, opt, params, step, cfg)
        micro += 1
        if not acc.sync_gradients:
            continue
        micro = 0
        ema_update(target, acc.unwrap_model(student), cfg.ema_decay)  # 7. theta^- <- mu theta^- + (1 - mu) theta
        step += 1
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4g}")
        if stats is not None:
            stats.step(step, loss.item(), lr=lr)  # the lr this step used (its first group's), as diffusers' LCM script logs it
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            acc.log({"loss": sum(losses) / len(losses), "bad_steps": bad_total}, step=step)
            losses.clear()
        if acc.is_main_process and (step % cfg.checkpoint_every == 0 or step == cfg.max_steps):
            save_checkpoint(run_dir, step, acc.unwrap_model(student), target, opt, cfg.keep_checkpoints,
                            acc.scaler.state_dict() if acc.scaler is not None else None)
        if acc.is_main_process and cfg.snapshot_every and step % cfg.snapshot_every == 0:
            save_snapshot(run_dir, step, acc.unwrap_model(student), target)
        if acc.is_main_process and cfg.validate_every and step % cfg.validate_every == 0 and step < cfg.max_steps:
            _validate(pipe, target, cfg, run_dir, step)
    # ---- 6. the end: final checkpoint and export
    bar.close()
    acc.wait_for_everyone()
    if acc.is_main_process:
        # theta^- is the exported student, as in the LCM script; models/export.py decides which forms it takes
        exports = export_run(run_dir, target, pipe, resolved, merged=cfg.export_merged)
        if start < cfg.max_steps:
            _validate(pipe, target, cfg, run_dir, step)
        skipped = f"; data: {counter.summary()}" if counter is not None else ""
        names = {k: str(v.relative_to(run_dir)) for k, v in exports.items()}  # paths inside the run folder ("." = it)
        stats.write({"event": "done", "step": step, "seconds": round(time.time() - t0, 1), "exports": names})
        forms = ", ".join(f"{k}: {v}" for k, v in names.items())
        log(f"done: {step} steps in {time.time() - t0:.1f}s, {bad_total} skipped non-finite steps{skipped}; student in "
            f"{run_dir} ({forms})")
    acc.end_training()
    return run_dir


def _latent_source(cfg: TrainConfig, pipe, acc, resolution: int, log) -> tuple[torch.utils.data.Dataset, LatentStore | None]:
    """The run's data: teacher data from --prompts, the latent cache of --data with --cache-latents, or --data as is.
    Stores are made by the main process first (the others then find them complete) under <output_dir>/.cache."""
    from .data import build_dataset

    root = Path(cfg.output_dir) / ".cache"
    if cfg.prompts:
        native = pipe.unet.config.sample_size * vae_scale_factor(pipe.vae)
        if resolution != native:
            raise TrainError(f"--prompts makes z_0 at the teacher's native size ({native} px); drop --resolution {resolution}")
        prompts = read_prompts(cfg.prompts)
        with acc.main_process_first():
            store = teacher_data(pipe, prompts, root, w=cfg.w, steps=cfg.num_ddim_steps, seed=cfg.seed,
                                 images_per_prompt=cfg.images_per_prompt, batch_size=cfg.batch_size)
        dataset = store.dataset()
        per = f", {store.seconds / store.n:.2f} s per image" if store.seconds else " (reused)"
        log(f"teacher data: {len(prompts)} prompts x {cfg.images_per_prompt} = {store.n} images, DDIM {cfg.num_ddim_steps} at "
            f"CFG {cfg_scale(cfg.w):g}{per}; in {root.name}/{store.root.name}")
        return dataset, store
    dataset = build_dataset(cfg.data, resolution, caption_column=cfg.caption_column, image_column=cfg.image_column,
                            seed=cfg.seed, num_examples=cfg.shapes_size)
    if not cfg.cache_latents:
        return dataset, None
    identity = {"data": cfg.data, "files": files_identity(cfg.data), "resolution": resolution, "seed": cfg.seed,
                "shapes_size": cfg.shapes_size, "caption_column": cfg.caption_column, "image_column": cfg.image_column}
    with acc.main_process_first():
        store = latent_cache(pipe, dataset, root, identity=identity, batch_size=cfg.batch_size)
    cached = store.dataset()
    per = f" in {store.seconds:.1f} s" if store.seconds else " (reused)"
    log(f"latent cache: {len(cached)} images encoded once{per}; in {root.name}/{store.root.name}")
    return cached, store


@torch.no_grad()
def _validate(pipe, student, cfg: TrainConfig, run_dir: Path, step: int) -> Path | None:
    """A grid of 1/2/4-step samples of the validation prompts, saved as validation/step-N.png."""
    from ..core.sampler import generate

    prompts = cfg.validation_prompts
    if not prompts:
        return None
    from PIL import Image

    rows = []
    for steps in (1, 2, 4):
        rows.append(generate(pipe, prompt=prompts, sampler="lcm", steps=steps, seed=cfg.seed, unet=student,
                             student_guidance_scale=sampling_guidance(dataclasses.asdict(cfg))).images)
    w, h = rows[0][0].size
    grid = Image.new("RGB", (w * len(prompts), h * len(rows)))
    for r, imgs in enumerate(rows):
        for c, im in enumerate(imgs):
            grid.paste(im, (c * w, r * h))
    return atomic_write(run_dir / "validation" / f"step-{step:07d}.png", lambda tmp: grid.save(tmp, format="PNG"))
