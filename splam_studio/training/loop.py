"""SPLAD distillation (Algorithm 1) on accelerate: one CUDA / MPS GPU, the CPU, or `accelerate launch` on several.

The loop orchestrates only: data -> latents and text embeddings -> `splad_loss` (steps 1-6) -> optimiser step ->
EMA update (step 7) -> logging, validation and atomic checkpoints, in numbered sections.
`python -m splam_studio.training` (cli.py) is its command line.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import shutil
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..store.atomic import WriteError, atomic_write, free_bytes, human_bytes, write_fault, write_json
from .checkpoints import (CheckpointError, estimate_bytes, find_checkpoint, last_checkpoint, resume_checkpoint,
                          save_checkpoint, save_snapshot)
from .device import resolve_runtime
from .latents import LatentStore, batch_latents, files_identity, latent_cache, read_prompts, teacher_data
from .memory import warn_if_short
from ..core.schedule import NoiseSchedule
from ..core.adversarial import Heads, feature_channels
from ..core.dmd import make_fake_score
from ..core.splad import SpladConfig, splad_loss
from ..core.student import build_student, ema_update, make_target
from ..core.teacher import added_conditioning, cfg_scale, empty_condition, native_size, text_encoders, vae_scale_factor
from ..models.export import export_run
from ..models.generation import generate
from ..models.loading import load_student, load_teacher, sampling_guidance
from ..models.sdxl import load_vae
from ..store.runs import (TRAINING_CONFIG, RunBusy, RunLock, StepLog, default_run_name, holds_only_the_lock,
                          read_training_config, valid_run_name)

# LoRA targets of diffusers' LCM-LoRA script: attention, feed-forward, resnet convs and time projections.
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]


LR_SCHEDULES = ("constant", "cosine")  # diffusers' get_scheduler names (with warmup: constant_with_warmup, cosine)


class TrainError(RuntimeError):
    """A run that cannot start or must stop; the message says why and what to change."""


# ---------------------------------------------------------------- the config: objective, inputs, optimisation, run

def arg(default, help: str):
    """A config field whose default is documented where it is declared; `help` is its CLI flag's help (cli.py)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Inputs:
    """What is distilled from what: the teacher and the data its z_0 come from."""
    teacher: str = arg("shapes", "teacher: embedded name (shapes), diffusers folder, single-file SD1.5 .safetensors, "
                                 "or hub id")
    teacher_config: str | None = arg(None, "local diffusers folder holding the model configs for a single-file teacher "
                                           "(needed offline)")
    vae: str | None = arg(None, "a diffusers VAE folder replacing the teacher's (e.g. a fixed fp16 SDXL VAE); by "
                                "default the VAE runs in fp32 under fp16")
    data: str = arg("shapes", "data: image folder with .txt captions, folder with metadata.jsonl, datasets name/path, "
                              ".tar shards (path/glob/URL), or 'shapes'")
    prompts: str | None = arg(None, "prompts file (one a line, or JSON lines {\"prompt\", \"negative_prompt\"}): the "
                                    "teacher makes its own z_0 (guided DDIM at --w, --num-ddim-steps); replaces --data. "
                                    "Stored once under <output-dir>/.cache, shared by runs")
    images_per_prompt: int = arg(1, "teacher-made images per prompt with --prompts")
    prompts_seed: int | None = arg(None, "seed of the teacher data's initial noise (default: --seed); one value lets "
                                         "runs of several seeds share one generation")
    prompts_w: float | None = arg(None, "guidance w of the teacher data (CFG w + 1). Default: 0, CFG 1, the teacher's "
                                        "own data distribution, so that z_t = alpha z_0 + sigma eps lies where it saw "
                                        "data (measured best, README 'From prompts alone'); with --regression the "
                                        "distillation's --w (its (z_T, z_0) pairs are the guided ODE). With "
                                        "--regression and another value, the pairs are a store of their own, made "
                                        "from the same prompts at --w")
    regression_prompts: str | None = arg(None, "prompts file of --regression's pairs (z_T, z_0): the teacher's guided "
                                               "DDIM at --w, --images-per-prompt each, stored under <output-dir>/.cache "
                                               "apart from the data, one pair batch per step; lets the regression run "
                                               "beside --data (default: the pairs of --prompts)")
    cache_latents: bool = arg(False, "encode each image (VAE posterior) and caption once into <output-dir>/.cache "
                                     "instead of at every step (a finite --data source; keyed by the VAE, text encoder, "
                                     "resolution and data files; SD1.5-family teachers: an SDXL recipe draws its crops afresh)")
    resolution: int | None = arg(None, "training resolution in pixels (default: the teacher's native size)")
    caption_column: str | None = arg(None, "caption column of a datasets source")
    image_column: str | None = arg(None, "image column of a datasets source")
    num_workers: int = arg(0, "DataLoader worker processes")
    shapes_size: int = arg(20000, "number of images drawn from the Shapes generator when --data shapes")


@dataclass(frozen=True)
class Optimisation:
    """The student theta, its target theta^- and how theta is optimised."""
    init_from: str | None = arg(None, "start the student from a finished full-UNet student run (folder or name), e.g. "
                                      "SPLAM after an LCM warm start")
    cond_proj_init: str = arg("fresh", "initialisation of the gamma projection: fresh (authors) or zero (student "
                                       "starts as the teacher at every gamma)")
    ema_decay: float = arg(0.95, "mu of the EMA target theta^- (authors: 0.95)")
    lora_rank: int = arg(0, "0 = full fine-tune; > 0 = LoRA of this rank (peft), exported in diffusers and kohya formats")
    max_steps: int = arg(1000, "optimiser steps")
    batch_size: int = arg(8, "images per step and process")
    grad_accum: int = arg(1, "gradient accumulation steps per optimiser step")
    lr: float = arg(1e-5, "learning rate (full fine-tune ~1e-5; LoRA ~1e-4)")
    lr_schedule: str = arg("constant", "constant, or cosine (decays to 0 at --max-steps; a constant lr drifts past the "
                                       "best point); diffusers' get_scheduler")
    lr_warmup_steps: int = arg(0, "linear warm-up of the lr from 0 over this many steps (diffusers' LCM script: 500)")
    cond_proj_lr_scale: float = arg(1.0, "learning rate of the gamma projection (cond_proj) relative to --lr")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    max_grad_norm: float = arg(1.0, "gradient clipping norm")
    adversarial_lr: float = arg(1e-3, "learning rate of the discriminator heads with --adversarial (AdamW, betas "
                                      "(0, 0.99) as in LADD; at 1e-4 they learned too slowly on Shapes)")
    dmd_lr: float = arg(1e-4, "learning rate of the fake score with --dmd (AdamW, as DMD2; it starts as the teacher "
                              "and must follow the student's images)")
    use_8bit_adam: bool = arg(False, "8-bit AdamW from bitsandbytes (CUDA)")
    gradient_checkpointing: bool = arg(False, "trade compute for memory in the student UNet (activations about 0.44x; "
                                              "the sd15 preset turns it on)")


@dataclass(frozen=True)
class RunOptions:
    """Where the run lives, on what it runs, and its trail: checkpoints, validation, logs, exports."""
    run_name: str | None = arg(None, "checkpoints go to <output-dir>/<run-name> (default: <method>-<timestamp>)")
    output_dir: str = arg("weights", "where runs are written (default: $SPLAM_WEIGHTS_DIR, else weights/ of the "
                                     "checkout, else ./weights; the studio lists the same folder)")
    device: str = arg("auto", "auto (CUDA, then MPS, then CPU), cuda, mps or cpu")
    precision: str = arg("auto", "auto (CUDA: bf16 if supported else fp16; otherwise fp32), no, fp16 or bf16")
    seed: int = arg(0, "seed of everything (data order, noise, gamma): two runs with the same seed are identical")
    allow_pickle: bool = arg(False, "allow loading pickle checkpoints (.ckpt/.bin/.pt): they can run arbitrary code; "
                                    "off by default")
    checkpoint_every: int = arg(250, "save a resumable checkpoint every N steps (atomic)")
    keep_checkpoints: int = arg(2, "how many resumable checkpoints to keep")
    validate_every: int = arg(0, "save a validation grid every N steps (0 = at the end only)")
    snapshot_every: int = arg(0, "keep the EMA student every N steps in snapshots/ for convergence curves (0 = off)")
    validation_prompts: list[str] = arg([], "prompts of the validation grid (repeat the flag; default: the "
                                                 "first 4 captions of the data, or a preset's prompts when the data is "
                                                 "the preset's own)")
    log_every: int = arg(10, "TensorBoard logging interval in steps")
    max_bad_steps: int = arg(5, "stop after this many non-finite losses in a row")
    resume: str | None = arg(None, "continue the run of --run-name: 'latest' or a checkpoint folder")
    overwrite: bool = arg(False, "replace an existing run of the same name; the old one is moved to "
                                 "<output-dir>/.trash/, not deleted")
    save_fp16: bool = arg(False, "store the exported student in fp16 (half the size; it loads in the teacher's dtype)")
    export_merged: bool = arg(False, "also write the merged stock forms: <run>.safetensors for a LoRA student (LoRA "
                                     "fused, gamma = 1 folded) and stock_diffusers/ (a diffusers pipeline without "
                                     "cond_proj, for kohya sd-scripts and ComfyUI); a full student always gets "
                                     "<run>.safetensors, a LoRA student lora_kohya.safetensors (A1111, Forge, ComfyUI) "
                                     "and lora_diffusers.safetensors (diffusers)")


SECTIONS = {"objective": SpladConfig, "inputs": Inputs, "optimisation": Optimisation, "run": RunOptions}


def flat_fields() -> list[tuple[str, dataclasses.Field]]:
    """(section, field) of every setting, in the order of the CLI's flags and training_config.json's keys."""
    return [(sec, f) for sec, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


_SECTION_OF = {f.name: sec for sec, f in flat_fields()}  # flat name -> its section


@dataclass(frozen=True, init=False)
class TrainConfig:
    """A run's settings in four parts: the objective (core.splad.SpladConfig itself), its inputs, the optimisation and
    the run. Built and read flat as well: TrainConfig(lr=1e-4, method="lcm"), cfg.lr, cfg.flat(); the CLI's flags and
    training_config.json are the flat names."""
    objective: SpladConfig
    inputs: Inputs
    optimisation: Optimisation
    run: RunOptions

    def __init__(self, objective: SpladConfig | None = None, inputs: Inputs | None = None,
                 optimisation: Optimisation | None = None, run: RunOptions | None = None, **flat):
        unknown = sorted(set(flat) - set(_SECTION_OF))
        if unknown:
            raise TypeError(f"TrainConfig got unknown settings {unknown}")
        given = {"objective": objective, "inputs": inputs, "optimisation": optimisation, "run": run}
        for sec, cls in SECTIONS.items():
            mine = {k: v for k, v in flat.items() if _SECTION_OF[k] == sec}
            try:  # SpladConfig checks the objective as it is built: one owner of those checks
                part = dataclasses.replace(given[sec], **mine) if given[sec] is not None else cls(**mine)
            except ValueError as e:
                raise TrainError(str(e)) from None
            object.__setattr__(self, sec, part)

    def __getattr__(self, name: str):
        """The flat view: cfg.lr is cfg.optimisation.lr."""
        sec = _SECTION_OF.get(name)
        if sec is None:
            raise AttributeError(f"TrainConfig has no setting {name!r}")
        return getattr(object.__getattribute__(self, sec), name)

    def flat(self) -> dict:
        """{name: value} of every setting: what --print-config shows and training_config.json records."""
        return {k: v for sec in SECTIONS for k, v in dataclasses.asdict(getattr(self, sec)).items()}

    def validate(self) -> None:
        """The ranges of inputs, optimisation and run (the objective checked itself when built); one TrainError."""
        checks = {
            "cond_proj_init": self.cond_proj_init in ("fresh", "zero"),
            "max_steps": self.max_steps >= 1,
            "batch_size": self.batch_size >= 1,
            "grad_accum": self.grad_accum >= 1,
            "lr": 0 < self.lr < 1,
            "lr_schedule": self.lr_schedule in LR_SCHEDULES,
            "lr_warmup_steps": self.lr_warmup_steps >= 0,
            "ema_decay": 0 <= self.ema_decay <= 1,
            "gamma_one_prob": 0 <= self.gamma_one_prob <= 1,
            "cond_proj_lr_scale": self.cond_proj_lr_scale > 0,
            "adversarial_lr": 0 < self.adversarial_lr < 1,
            "dmd_lr": 0 < self.dmd_lr < 1,
            "num_ddim_steps": self.num_ddim_steps <= 1000,
            "lora_rank": self.lora_rank >= 0,
            "images_per_prompt": self.images_per_prompt >= 1,
            "checkpoint_every": self.checkpoint_every >= 1,
            "keep_checkpoints": self.keep_checkpoints >= 1,
            "num_workers": self.num_workers >= 0,
            "snapshot_every": self.snapshot_every >= 0,
            "resolution": self.resolution is None or (self.resolution >= 8 and self.resolution % 8 == 0),
            "overwrite": not (self.overwrite and self.resume),  # continue a run or replace it, not both
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise TrainError(f"invalid config values: {', '.join(f'{k}={getattr(self, k)!r}' for k in bad)}")
        if self.w_min is not None and not self.w_min <= self.w <= self.w_max:
            raise TrainError(f"need 0 <= w_min <= w <= w_max (w is the guidance the student samples at, CFG w + 1), "
                             f"got w_min={self.w_min}, w={self.w}, w_max={self.w_max}")
        if self.regression > 0 and not self.prompts and not self.regression_prompts:
            raise TrainError(f"--regression {self.regression:g} regresses onto the teacher's own (z_T, z_0) pairs: it "
                             "needs teacher data (--prompts FILE) or a pairs store beside --data (--regression-prompts FILE)")
        if self.regression_prompts and not self.regression > 0:
            raise TrainError("--regression-prompts makes the pairs of the regression term: it needs --regression W")
        if self.prompts_w is not None and not self.prompts:
            raise TrainError("--prompts-w is the guidance of teacher data: it needs --prompts FILE")
        if self.prompts_w is not None and self.prompts_w < 0:
            raise TrainError(f"--prompts-w must be >= 0 (CFG w + 1), got {self.prompts_w:g}")
        if self.run_name is not None and not valid_run_name(self.run_name):
            raise TrainError(f"run_name must be a plain folder name (letters, digits, . _ -), got {self.run_name!r}")

    def splad(self) -> SpladConfig:
        return self.objective


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

    def indices(self, step: int) -> list[int]:
        """This rank's batch of micro-step `step`."""
        epoch, pos = divmod(step, self.per_epoch)
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        off = (pos * self.world + self.rank) * self.bs
        return perm[off: off + self.bs].tolist()

    def __iter__(self):
        for step in itertools.count(self.start):
            yield self.indices(step)


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
    names = {f.name for _, f in flat_fields()}
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
    for _, f in flat_fields():
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


def run(cfg: TrainConfig, log=print, loss_fn=None) -> Path:
    """Train; returns the run folder under output_dir. Resumable with cfg.resume = 'latest'.

    The run's folder is locked while it trains (a second trainer is refused, naming the live one: store.runs.live_owner).
    An existing run is refused unless cfg.resume or cfg.overwrite; a resume keeps the run's own settings
    (resume_conflicts). A run that fails or is stopped (Ctrl-C, SIGTERM) before its first checkpoint leaves no folder
    behind, and an overwritten run is put back. Disk and permission faults end in one TrainError sentence.
    loss_fn: the objective, splad_loss's signature (default splad_loss); tests inject faults through it, as EDM's
    training_loop takes its loss_fn.
    """
    cfg.validate()
    cfg = dataclasses.replace(cfg, run_name=cfg.run_name or default_run_name(cfg.method))
    run_dir = Path(cfg.output_dir) / cfg.run_name
    if not _is_main_process():  # rank 0 owns the folder: its lock, its claim and its clean-up
        return _train(cfg, run_dir, log, loss_fn)
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
            return _train(cfg, run_dir, log, loss_fn)
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


def make_lr_scheduler(opt, cfg: TrainConfig, start: int = 0):
    """diffusers' get_scheduler over the groups' initial_lr: constant or cosine to 0 at max_steps, after a linear
    warm-up of lr_warmup_steps; positioned at step `start` (a resumed run continues its schedule)."""
    from diffusers.optimization import get_scheduler

    name = "constant_with_warmup" if cfg.lr_schedule == "constant" and cfg.lr_warmup_steps else cfg.lr_schedule
    return get_scheduler(name, opt, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=cfg.max_steps,
                         last_epoch=start - 1)


def advance_schedule(lr_scheduler) -> None:
    """The schedule moves on one step; also for a skipped step, where torch would warn that the optimiser did not step."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
        lr_scheduler.step()


def optimizer_step(acc, opt, params, step: int, cfg: TrainConfig, lr_scheduler=None) -> float:
    """Clip the gradient norm to max_grad_norm (on the micro-step that syncs), step at the lr the schedule set for
    `step`, zero the gradients and advance the schedule; returns the lr this step used (the first group's)."""
    if lr_scheduler is not None and lr_scheduler.last_epoch != step:
        raise RuntimeError(f"the lr schedule is at step {lr_scheduler.last_epoch}, the loop at {step}")
    if acc.sync_gradients:
        acc.clip_grad_norm_(params, cfg.max_grad_norm)
    lr = opt.param_groups[0]["lr"]
    opt.step()
    opt.zero_grad(set_to_none=True)
    if acc.sync_gradients and lr_scheduler is not None:
        advance_schedule(lr_scheduler)
    return lr


# ---------------------------------------------------------------- the run in parts: set-up, loader, step, bookkeeping

@dataclass
class Models:
    """What set-up builds: the frozen teacher pipeline in the runtime's dtypes, its schedule, theta and theta^- (fp32)."""
    pipe: Any
    schedule: NoiseSchedule
    teacher: torch.nn.Module
    student: torch.nn.Module
    target: torch.nn.Module
    uncond_1: Any  # the empty prompt's condition: (1, L, D) embeddings, SDXL a TextCondition
    critic: torch.nn.Module | None = None  # --adversarial: heads on the teacher's features (core/adversarial.py);
    #                                          --dmd: the fake score, a trainable copy of the teacher (core/dmd.py)


def setup_models(cfg: TrainConfig, rt, device: torch.device) -> Models:
    """Teacher, text encoder and VAE frozen (dtypes: device.py); the student from the teacher, theta^- its copy."""
    pipe = load_teacher(cfg.teacher, torch_dtype=torch.float32, allow_pickle=cfg.allow_pickle, config=cfg.teacher_config)
    if cfg.vae:
        pipe.vae = load_vae(cfg.vae)
    teacher = pipe.unet.requires_grad_(False).eval()
    student = make_student(pipe, teacher, cfg)
    target = make_target(student)
    critic = make_critic(teacher, cfg)  # before the cast: the fake score starts from the fp32 teacher, not its bf16 copy
    teacher.to(device, rt.weight_dtype)
    for te in text_encoders(pipe).values():  # SDXL: both
        te.requires_grad_(False).to(device, rt.weight_dtype)
    pipe.vae.requires_grad_(False).to(device, rt.vae_dtype)
    target.to(device)
    with torch.no_grad():  # (1, L, D); SDXL a TextCondition (zeros with force_zeros_for_empty_prompt)
        uncond_1 = empty_condition(pipe, device)
    return Models(pipe, NoiseSchedule.from_scheduler(pipe.scheduler), teacher, student, target, uncond_1,
                  critic.to(device) if critic is not None else None)


def make_critic(teacher, cfg: TrainConfig) -> torch.nn.Module | None:
    """The network trained against the student: the discriminator heads (--adversarial), the fake score (--dmd), or
    None."""
    if cfg.adversarial > 0:
        return Heads(feature_channels(teacher))
    return make_fake_score(teacher) if cfg.dmd > 0 else None


def make_critic_optimizer(critic, cfg: TrainConfig) -> torch.optim.Optimizer | None:
    """The critic's AdamW: the discriminator heads at adversarial_lr, betas (0, 0.99) (LADD); the fake score at dmd_lr
    with AdamW's defaults (DMD2); None without a critic."""
    if critic is None:
        return None
    if cfg.dmd > 0:
        return torch.optim.AdamW(critic.parameters(), lr=cfg.dmd_lr)
    return torch.optim.AdamW(critic.parameters(), lr=cfg.adversarial_lr, betas=(0.0, 0.99))


def _warn_if_disk_short(run_dir: Path, m: Models, opt, cfg: TrainConfig, log) -> None:
    ckpt_bytes, export_bytes = estimate_bytes(m.student, opt, lora=cfg.lora_rank > 0, fp16_export=cfg.save_fp16)
    free, need = free_bytes(run_dir), 2 * ckpt_bytes + export_bytes
    if free is not None and free < need:
        log(f"warning: {run_dir} has {human_bytes(free)} free, less than two checkpoints and the export need "
            f"(about {human_bytes(need)}); the run will stop at the checkpoint that does not fit")


def _resume(cfg: TrainConfig, run_dir: Path, m: Models, opt, acc, log, d_opt=None) -> int:
    """The step the run continues at: 0, or that of the checkpoint --resume names (student, theta^-, optimiser and the
    critic of an --adversarial or --dmd run loaded)."""
    if not cfg.resume:
        return 0
    disc = (m.critic, d_opt) if m.critic is not None else None
    try:
        ckpt, start = resume_checkpoint(run_dir, cfg.resume, m.student, m.target, opt, acc.scaler, cfg.max_steps, log,
                                        disc)
    except CheckpointError as e:
        raise TrainError(str(e)) from None
    if ckpt is None:
        log(f"resume: no complete checkpoint in {run_dir / 'checkpoints'}; starting from step 0")
    else:
        log(f"resume: {ckpt.name}, continuing at step {start}")
    if start >= cfg.max_steps:
        log(f"already at step {start} >= max_steps {cfg.max_steps}; nothing to do")
    return start


def make_loader(cfg: TrainConfig, dataset, start: int, acc, log) -> tuple[torch.utils.data.DataLoader, int, int]:
    """(loader, batches to fast-forward, batch size) at micro-step start x grad_accum; collate_drop_none drops unreadable
    items. Map-style data: StepBatchSampler (each rank its slice, each epoch its permutation; a small data set clamps
    the batch). A streamed source: read in order, fast-forwarded on resume."""
    from .data import collate_drop_none, fit_batch_size

    kw = dict(collate_fn=collate_drop_none, num_workers=cfg.num_workers)
    if isinstance(dataset, torch.utils.data.IterableDataset):
        return torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, **kw), start * cfg.grad_accum, cfg.batch_size
    batch_size, note = fit_batch_size(len(dataset), cfg.batch_size, acc.num_processes)
    if note:
        log(note)
    sampler = StepBatchSampler(len(dataset), batch_size, cfg.seed, start * cfg.grad_accum, acc.process_index,
                               acc.num_processes)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, **kw), 0, batch_size


def batches(loader, skip: int, acc, source: str, counter=None):
    """The loader's batches, endlessly: a finite streamed source starts a new pass when it ends (StepBatchSampler never
    does); None for a batch without one readable item on any rank (all ranks move on together). Stops with one
    sentence after two epochs' worth of such batches in a row."""
    from .data import DataError

    it, end = iter(loader), object()
    for _ in range(skip):  # a streamed source: fast-forward to the resumed position
        next(it, None)
    unreadable, most = 0, 2 * getattr(loader.batch_sampler, "per_epoch", 50)
    while True:
        batch = next(it, end)
        if batch is end:
            it = iter(loader)
            batch = next(it, end)
            if batch is end:
                raise TrainError(f"data source {source!r} yielded no usable batch (see the skip counts above)")
        if on_all_ranks(batch is not None, acc):
            unreadable = 0
            yield batch
            continue
        unreadable += 1
        if unreadable >= most:
            raise DataError(f"{unreadable} batches in a row had no readable item "
                            f"({counter.summary() if counter is not None else 'no skip counts'}); "
                            "replace or remove those files")
        yield None


def train_step(m: Models, batch: dict, gen: torch.Generator, splad: SpladConfig, acc, opt, params, step: int,
               cfg: TrainConfig, rt, lr_scheduler, loss_fn, d_opt=None,
               pair_batch: dict | None = None) -> tuple[torch.Tensor, float] | None:
    """Algorithm 1 on one micro-batch: z_0 and text (step 1), loss_fn (steps 2-6, core/splad.py), backward, and on the
    syncing micro-step the optimiser step (and the critic's, d_opt, with --adversarial or --dmd). pair_batch: the
    regression's (z_T, z_0, c) from a pairs store apart from the data (PairBatches). (loss, lr used), or None when the
    loss is non-finite on some rank: the gradients are dropped and every rank skips the step."""
    with acc.accumulate(m.student):
        z_0, cond, uncond = encode_batch(m.pipe, batch, m.uncond_1, gen, rt.vae_dtype)
        extra = {}
        if pair_batch is not None:  # stored latents and conditions: no VAE, no text encoder, no draw from gen
            p_0, p_cond, _ = encode_batch(m.pipe, pair_batch, m.uncond_1, gen, rt.vae_dtype)
            extra["pairs"] = (pair_batch["z_T"].to(p_0.device), p_0, p_cond)
        elif splad.regression > 0:
            extra["z_T"] = batch["z_T"]  # teacher data's initial noise: the batch holds its own pairs
        with acc.autocast():
            if m.critic is not None:
                extra["critic"] = m.critic
            loss = loss_fn(splad, m.schedule, m.student, m.target, m.teacher, z_0, cond, uncond, gen, **extra)
        if not finite_on_all_ranks(loss, acc):
            opt.zero_grad(set_to_none=True)
            if d_opt is not None:
                d_opt.zero_grad(set_to_none=True)
            return None
        acc.backward(loss)
        if d_opt is not None:  # an AcceleratedOptimizer: steps and zeroes only on the syncing micro-step
            d_opt.step()
            d_opt.zero_grad(set_to_none=True)
        return loss, optimizer_step(acc, opt, params, step, cfg, lr_scheduler)


def resolved_config(cfg: TrainConfig, run_name: str, resolution: int, requested_batch: int, m: Models, rt, acc,
                    dataset, store, pair_store=None) -> dict:
    """training_config.json: the flat settings (batch_size as used, batch_size_requested as asked: a resume compares
    that one) and what the run derived: resolution, k, gamma sampling, devices, dtypes, the teacher's scheduler, the
    latent store and the regression's pairs store."""
    dtypes = (("student", acc.unwrap_model(m.student).dtype), ("target", m.target.dtype), ("teacher", m.teacher.dtype),
              ("text_encoder", m.pipe.text_encoder.dtype), ("vae", m.pipe.vae.dtype))
    return {**cfg.flat(), "run_name": run_name, "resolution": resolution, "batch_size_requested": requested_batch,
            "gamma_sampling": ("constant 1" if cfg.method != "splam" else "uniform[0,1]" if not cfg.gamma_one_prob
                               else f"1 with p={cfg.gamma_one_prob:g}, else uniform[0,1]"),
            "k": cfg.m * (m.schedule.T // cfg.num_ddim_steps), "mixed_precision": rt.mixed_precision,
            "device": str(acc.device), "processes": acc.num_processes,
            "dtypes": {k: str(v).removeprefix("torch.") for k, v in dtypes},
            "teacher_scheduler": dict(m.pipe.scheduler.config),
            "latent_store": None if store is None else {"folder": f".cache/{store.root.name}", "kind": store.manifest["kind"],
                                                        "items": len(dataset), "seconds_here": round(store.seconds, 1)},
            "regression_pairs": None if pair_store is None else {"folder": f".cache/{pair_store.root.name}",
                                                                 "items": pair_store.n, "w": cfg.w,
                                                                 "seconds_here": round(pair_store.seconds, 1)}}


class Trail:
    """The run's bookkeeping on the main process: the run folder, progress bar, stats.jsonl, TensorBoard, checkpoints,
    snapshots and validation grids (other ranks keep only the counts)."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, resolved: dict, start: int, acc, log):
        from tqdm.auto import tqdm

        self.cfg, self.run_dir, self.acc, self.log, self.main = cfg, run_dir, acc, log, acc.is_main_process
        self.bad_in_row = self.bad_total = 0
        self.losses: list[float] = []
        self.t0 = time.time()
        if self.main:
            run_dir.mkdir(parents=True, exist_ok=True)
            for stale in (run_dir / "checkpoints").glob(".tmp-*"):  # a write interrupted by a crash or kill -9
                shutil.rmtree(stale, ignore_errors=True)
            write_json(run_dir / TRAINING_CONFIG, resolved)
            acc.init_trackers("splad", config={k: v for k, v in resolved.items() if isinstance(v, (int, float, str, bool))})
        self.stats = StepLog(run_dir, cfg, start) if self.main else None
        self.bar = tqdm(total=cfg.max_steps, initial=start, disable=not self.main, desc=f"{cfg.method} {run_dir.name}",
                        dynamic_ncols=True, file=sys.stderr)

    def skipped(self, step: int) -> None:
        """A non-finite loss at `step`: counted and logged; too many in a row stop the run."""
        self.bad_in_row += 1
        self.bad_total += 1
        self.log(f"step {step}: non-finite loss, step skipped ({self.bad_in_row} in a row, {self.bad_total} total)")
        if self.bad_in_row >= self.cfg.max_bad_steps:
            raise TrainError(f"{self.bad_in_row} non-finite losses in a row at step {step}; stopped. The last good "
                             f"checkpoint in {self.run_dir / 'checkpoints'} is intact; lower --lr or check the data")
        self.bar.update(1)

    def stepped(self, step: int, loss: float, lr: float, m: Models, opt, d_opt=None) -> None:
        """Optimiser step `step` done (1-based): stats.jsonl (the lr it used, as diffusers' LCM script logs it),
        TensorBoard every log_every, checkpoint, snapshot and validation at their intervals."""
        cfg, acc = self.cfg, self.acc
        self.bad_in_row = 0
        self.losses.append(loss)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4g}")
        if self.stats is not None:
            self.stats.step(step, loss, lr=lr)
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            acc.log({"loss": sum(self.losses) / len(self.losses), "bad_steps": self.bad_total}, step=step)
            self.losses.clear()
        if not self.main:
            return
        student = acc.unwrap_model(m.student)
        if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
            disc = (acc.unwrap_model(m.critic), d_opt) if m.critic is not None else None
            save_checkpoint(self.run_dir, step, student, m.target, opt, cfg.keep_checkpoints,
                            acc.scaler.state_dict() if acc.scaler is not None else None, disc)
        if cfg.snapshot_every and step % cfg.snapshot_every == 0:
            save_snapshot(self.run_dir, step, student, m.target)
        if cfg.validate_every and step % cfg.validate_every == 0 and step < cfg.max_steps:
            _validate(m.pipe, m.target, cfg, self.run_dir, step)

    def finish(self, step: int, start: int, m: Models, resolved: dict, counter) -> None:
        """The end: theta^- exported (as in the LCM script; models/export.py decides the forms), the last validation
        grid, the done line."""
        self.bar.close()
        self.acc.wait_for_everyone()
        if not self.main:
            return
        exports = export_run(self.run_dir, m.target, _export_teacher(self.cfg, m.pipe), resolved,
                             merged=self.cfg.export_merged)
        if start < self.cfg.max_steps:
            _validate(m.pipe, m.target, self.cfg, self.run_dir, step)
        names = {k: str(v.relative_to(self.run_dir)) for k, v in exports.items()}  # paths inside the run folder
        seconds = time.time() - self.t0
        self.stats.write({"event": "done", "step": step, "seconds": round(seconds, 1), "exports": names})
        skipped = f"; data: {counter.summary()}" if counter is not None else ""
        forms = ", ".join(f"{k}: {v}" for k, v in names.items())
        self.log(f"done: {step} steps in {seconds:.1f}s, {self.bad_total} skipped non-finite steps{skipped}; student in "
                 f"{self.run_dir} ({forms})")


def _train(cfg: TrainConfig, run_dir: Path, log=print, loss_fn=None) -> Path:
    """The loop of `run` (which checked cfg, named the run and owns its folder's life): set-up, loader, steps."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from .data import first_captions

    loss_fn = loss_fn or splad_loss  # looked up now: a test may wrap the module's splad_loss
    # ---- 1. set-up: runtime, models, optimiser, resume (before the data: the sampler starts at its step), schedule
    rt = resolve_runtime(cfg.device, cfg.precision)
    acc = Accelerator(mixed_precision=rt.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
                      cpu=rt.device.type == "cpu", log_with="tensorboard", project_dir=str(run_dir / "logs"))
    set_seed(cfg.seed)
    m = setup_models(cfg, rt, acc.device)
    params = trainable_parameters(m.student)  # what the gradient norm is clipped over
    opt = make_optimizer(m.student, cfg)
    d_opt = make_critic_optimizer(m.critic, cfg)
    if acc.is_main_process:
        _warn_if_disk_short(run_dir, m, opt, cfg, log)
    start = _resume(cfg, run_dir, m, opt, acc, log, d_opt)
    lr_scheduler = make_lr_scheduler(opt, cfg, start)
    # ---- 2. data and loader
    resolution = cfg.resolution or m.teacher.config.sample_size * vae_scale_factor(m.pipe.vae)
    dataset, store = _latent_source(cfg, m.pipe, acc, resolution, log)
    if not cfg.validation_prompts:  # validate on the run's own captions (data.first_captions), not a preset's
        cfg = dataclasses.replace(cfg, validation_prompts=dataset.captions(4) if store is not None
                                  else first_captions(dataset, 4))
    loader, skip, batch_size = make_loader(cfg, dataset, start, acc, log)
    requested, cfg = cfg.batch_size, dataclasses.replace(cfg, batch_size=batch_size)  # a small data set clamps it
    pairs, pair_store = _regression_pairs(cfg, m.pipe, acc, log)
    m.student, opt = acc.prepare(m.student, opt)
    if m.critic is not None:
        m.critic, d_opt = acc.prepare(m.critic, d_opt)
    # ---- 3. bookkeeping: the resolved config, trackers, stats.jsonl, progress
    resolved = resolved_config(cfg, run_dir.name, resolution, requested, m, rt, acc, dataset, store, pair_store)
    trail = Trail(cfg, run_dir, resolved, start, acc, log)
    if acc.is_main_process:  # one warning before the first step when the estimated need exceeds the device (memory.py)
        warn_if_short(acc.unwrap_model(m.student), m.pipe, resolution=resolution, batch=cfg.batch_size, device=acc.device,
                      mixed_precision=rt.mixed_precision, gradient_checkpointing=cfg.gradient_checkpointing,
                      use_8bit_adam=cfg.use_8bit_adam, log=log,
                      critic=acc.unwrap_model(m.critic) if m.critic is not None else None)
    # ---- 4. the steps: Algorithm 1 per micro-batch, step 7 (EMA) per optimiser step
    splad, counter = cfg.splad(), getattr(dataset, "counter", None)
    step, micro = start, 0
    source = batches(loader, skip, acc, cfg.data, counter)
    while step < cfg.max_steps:
        batch = next(source)
        if batch is None:  # no readable item on some rank: the next batch, with fresh randomness
            micro += 1
            continue
        out = train_step(m, batch, step_generator(cfg.seed, step, micro, acc.process_index), splad, acc, opt, params,
                         step, cfg, rt, lr_scheduler, loss_fn, d_opt,
                         pairs(step * cfg.grad_accum + micro) if pairs is not None else None)
        if out is None:  # a non-finite loss: the whole step is skipped on every rank, its schedule step too
            trail.skipped(step)
            advance_schedule(lr_scheduler)
            step, micro = step + 1, 0
            continue
        micro += 1
        if not acc.sync_gradients:
            continue
        ema_update(m.target, acc.unwrap_model(m.student), cfg.ema_decay)  # 7. theta^- <- mu theta^- + (1 - mu) theta
        step, micro = step + 1, 0
        trail.stepped(step, out[0].item(), out[1], m, opt, d_opt)
    # ---- 5. the end: export theta^-, the last validation, the done line
    trail.finish(step, start, m, resolved, counter)
    acc.end_training()
    return run_dir


def _export_teacher(cfg: TrainConfig, pipe):
    """The teacher whose frozen parts (VAE, text encoders) go into the stock exports: `pipe` when training kept them in
    fp32, else a fresh fp32 load on the CPU (the in-place cast to the runtime's dtype rounded them)."""
    frozen = [pipe.vae, *text_encoders(pipe).values()]
    if all(next(m.parameters()).dtype == torch.float32 for m in frozen):
        return pipe
    fresh = load_teacher(cfg.teacher, torch_dtype=torch.float32, allow_pickle=cfg.allow_pickle, config=cfg.teacher_config)
    if cfg.vae:
        fresh.vae = load_vae(cfg.vae)
    return fresh


def teacher_data_w(cfg: TrainConfig) -> float:
    """The guidance w of --prompts teacher data: --prompts-w; else 0 (CFG 1, the teacher's own data distribution), or
    the distillation's w with --regression on the batch's own pairs, which must be the guided ODE the student matches
    (with --regression-prompts the pairs are a store of their own, and the data keep CFG 1)."""
    if cfg.prompts_w is not None:
        return cfg.prompts_w
    return cfg.w if cfg.regression > 0 and not cfg.regression_prompts else 0.0


def regression_pairs_prompts(cfg: TrainConfig) -> str | None:
    """The prompts file of the regression's own pairs store: --regression-prompts, or --prompts when its data are made
    at another guidance than the distillation's w; None when the batch holds its pairs (or there is no regression)."""
    if not cfg.regression > 0:
        return None
    if cfg.regression_prompts:
        return cfg.regression_prompts
    return cfg.prompts if teacher_data_w(cfg) != cfg.w else None


class PairBatches:
    """The regression's pair batch of each micro-step, read from its store in an order of its own (StepBatchSampler
    at seed + 1): a function of the micro-step alone, so a resumed run reads the pairs an uninterrupted one did."""

    def __init__(self, dataset, batch_size: int, seed: int, rank: int, world: int):
        self.dataset, self.sampler = dataset, StepBatchSampler(len(dataset), batch_size, seed, 0, rank, world)

    def __call__(self, micro_step: int) -> dict:
        from .data import collate_drop_none

        return collate_drop_none([self.dataset[i] for i in self.sampler.indices(micro_step)])


def _teacher_store(cfg: TrainConfig, pipe, acc, path: str, w: float) -> tuple[list, LatentStore]:
    """(prompts, store): teacher data of a prompts file at guidance w (CFG w + 1), --num-ddim-steps and
    --images-per-prompt, its noise from --prompts-seed (default --seed); made by the main process first under
    <output_dir>/.cache (the others then find it complete). The data of --prompts and the regression's pairs store."""
    prompts = read_prompts(path)
    with acc.main_process_first():
        store = teacher_data(pipe, prompts, Path(cfg.output_dir) / ".cache", w=w, steps=cfg.num_ddim_steps,
                             seed=cfg.seed if cfg.prompts_seed is None else cfg.prompts_seed,
                             images_per_prompt=cfg.images_per_prompt, batch_size=cfg.batch_size)
    return prompts, store


def _regression_pairs(cfg: TrainConfig, pipe, acc, log) -> tuple[PairBatches | None, LatentStore | None]:
    """The regression's pairs store apart from the data (regression_pairs_prompts), made by the main process first
    under <output_dir>/.cache as teacher data at the distillation's w, and its batches; (None, None) without one."""
    from .data import fit_batch_size

    path = regression_pairs_prompts(cfg)
    if path is None:
        return None, None
    prompts, store = _teacher_store(cfg, pipe, acc, path, cfg.w)
    dataset = store.dataset()
    batch_size, _ = fit_batch_size(len(dataset), cfg.batch_size, acc.num_processes)
    per = f", {store.seconds / store.n:.2f} s per pair" if store.seconds else " (reused)"
    log(f"regression pairs: {len(prompts)} prompts x {cfg.images_per_prompt} = {store.n} teacher ODE pairs (z_T, z_0), "
        f"DDIM {cfg.num_ddim_steps} at CFG {cfg_scale(cfg.w):g}{per}; in .cache/{store.root.name}")
    return PairBatches(dataset, batch_size, cfg.seed + 1, acc.process_index, acc.num_processes), store


def _latent_source(cfg: TrainConfig, pipe, acc, resolution: int, log) -> tuple[torch.utils.data.Dataset, LatentStore | None]:
    """The run's data: teacher data from --prompts, the latent cache of --data with --cache-latents, or --data as is.
    Stores are made by the main process first (the others then find them complete) under <output_dir>/.cache."""
    from .data import build_dataset

    root = Path(cfg.output_dir) / ".cache"
    if added_conditioning(pipe) and cfg.cache_latents and not cfg.prompts:
        raise TrainError("--cache-latents is not available for an SDXL teacher: its data recipe draws each sample's "
                         "original-size / random-crop conditioning afresh, so one cached variant per image is not the "
                         "recipe; train on plain --data, or make teacher data from a prompts file with --prompts FILE")
    if cfg.prompts:
        native = native_size(pipe)
        if resolution != native:
            raise TrainError(f"--prompts makes z_0 at the teacher's native size ({native} px); drop --resolution {resolution}")
        w_data = teacher_data_w(cfg)
        prompts, store = _teacher_store(cfg, pipe, acc, cfg.prompts, w_data)
        dataset = store.dataset()
        per = f", {store.seconds / store.n:.2f} s per image" if store.seconds else " (reused)"
        log(f"teacher data: {len(prompts)} prompts x {cfg.images_per_prompt} = {store.n} images, DDIM {cfg.num_ddim_steps} at "
            f"CFG {cfg_scale(w_data):g}{per}; in {root.name}/{store.root.name}")
        return dataset, store
    dataset = build_dataset(cfg.data, resolution, caption_column=cfg.caption_column, image_column=cfg.image_column,
                            seed=cfg.seed, num_examples=cfg.shapes_size, size_conditioning=added_conditioning(pipe))
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
    prompts = cfg.validation_prompts
    if not prompts:
        return None
    from PIL import Image

    rows = []
    for steps in (1, 2, 4):
        rows.append(generate(pipe, prompt=prompts, sampler="lcm", steps=steps, seed=cfg.seed, unet=student,
                             student_guidance_scale=sampling_guidance(cfg.flat())).images)
    w, h = rows[0][0].size
    grid = Image.new("RGB", (w * len(prompts), h * len(rows)))
    for r, imgs in enumerate(rows):
        for c, im in enumerate(imgs):
            grid.paste(im, (c * w, r * h))
    return atomic_write(run_dir / "validation" / f"step-{step:07d}.png", lambda tmp: grid.save(tmp, format="PNG"))
