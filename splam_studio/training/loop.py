"""SPLAD distillation (Algorithm 1) on accelerate: one CUDA / MPS GPU, the CPU, or `accelerate launch` on several.

The loop orchestrates only: data -> latents and text embeddings -> `splad_loss` (steps 1-6) -> optimiser step ->
EMA update (step 7) -> logging, validation and atomic checkpoints, in numbered sections.
`python -m splam_studio.training` (cli.py) is its command line.
"""
from __future__ import annotations

import dataclasses
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..store.atomic import atomic_write, write_json
from .checkpoints import find_checkpoint, load_checkpoint, save_checkpoint, save_snapshot
from .device import resolve_runtime
from .memory import warn_if_short
from ..core.schedule import NoiseSchedule
from ..core.splad import SpladConfig, splad_loss
from ..core.student import build_student, ema_update, make_target
from ..core.teacher import encode_text, vae_scale_factor
from ..models.export import export_run
from ..models.loading import load_student, load_teacher, sampling_guidance
from ..store.runs import TRAINING_CONFIG, StepLog, default_run_name, read_training_config, valid_run_name

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
    """Batches of indices for steps start..: epoch e is a permutation seeded by (seed, e); process `rank` of `world`."""

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int, max_steps: int, rank: int = 0, world: int = 1):
        if n < batch_size * world:
            raise TrainError(f"dataset has {n} usable items, fewer than one batch ({batch_size} x {world} processes)")
        self.n, self.bs, self.seed, self.start, self.max, self.rank, self.world = n, batch_size, seed, start_step, max_steps, rank, world

    def __len__(self) -> int:
        return max(0, self.max - self.start)

    def __iter__(self):
        per_epoch = self.n // (self.bs * self.world)
        for step in range(self.start, self.max):
            epoch, pos = divmod(step, per_epoch)
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
            off = (pos * self.world + self.rank) * self.bs
            yield perm[off: off + self.bs].tolist()


def _collate(items):
    items = [x for x in items if x is not None]
    if not items:
        return None
    return {"pixel_values": torch.stack([x["pixel_values"] for x in items]), "caption": [x["caption"] for x in items]}


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
    except (OSError, ValueError):
        method = "unknown method"
    done = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*") if (p / "state.json").is_file())
    return f"{method}, " + (f"last checkpoint {done[-1]}" if done else "no checkpoint")


def claim_run_dir(run_dir: Path, cfg: TrainConfig, log=print) -> Path | None:
    """Refuse an existing run unless resumed or overwritten; --overwrite moves it to .trash/ (returned), never deletes."""
    if not run_dir.is_dir() or not any(run_dir.iterdir()) or cfg.resume:
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


def run(cfg: TrainConfig, log=print) -> Path:
    """Train; returns the run folder under output_dir. Resumable with cfg.resume = 'latest'.

    An existing run is refused unless cfg.resume or cfg.overwrite; a run that fails before its first checkpoint leaves
    no folder behind (and an overwritten run is put back).
    """
    cfg.validate()
    cfg = dataclasses.replace(cfg, run_name=cfg.run_name or default_run_name(cfg.method))
    run_dir = Path(cfg.output_dir) / cfg.run_name
    aside = claim_run_dir(run_dir, cfg, log)
    fresh = not run_dir.exists()
    try:
        return _train(cfg, log)
    except Exception:
        if fresh and _is_main_process() and find_checkpoint(run_dir, "latest") is None:
            shutil.rmtree(run_dir, ignore_errors=True)  # made by this call, holding no checkpoint
            if aside is not None:
                aside.rename(run_dir)
                log(f"the previous run {run_dir.name!r} is back in {run_dir}")
        raise


def _train(cfg: TrainConfig, log=print) -> Path:
    """The loop of `run` (which owns the run folder's life)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from .data import build_dataset, fit_batch_size

    cfg.validate()
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
    student = build_student(teacher, cfg.cond_proj_init, generator=torch.Generator().manual_seed(cfg.seed))
    if cfg.init_from:  # warm start, e.g. SPLAM continued from an LCM student
        init = load_student(cfg.init_from, pipe)
        if any("lora" in k for k in init.state_dict()):
            raise TrainError(f"--init-from {cfg.init_from!r} is a LoRA run; it takes a full-UNet student run")
        student.load_state_dict({k: v.float() for k, v in init.state_dict().items()})
    if cfg.lora_rank > 0:
        from peft import LoraConfig

        student.requires_grad_(False)
        student.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank, init_lora_weights="gaussian",
                                       target_modules=LORA_TARGETS))
        student.time_embedding.cond_proj.requires_grad_(True)
    if cfg.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    target = make_target(student)
    teacher.to(device, rt.weight_dtype)
    pipe.text_encoder.requires_grad_(False).to(device, rt.weight_dtype)
    pipe.vae.requires_grad_(False).to(device, rt.vae_dtype)
    target.to(device)

    params = [p for p in student.parameters() if p.requires_grad]
    if cfg.cond_proj_lr_scale != 1.0:  # the gamma projection in its own group, at cond_proj_lr_scale x lr
        gp = [p for n, p in student.named_parameters() if p.requires_grad and "cond_proj" in n]
        rest = [p for n, p in student.named_parameters() if p.requires_grad and "cond_proj" not in n]
        groups = [{"params": rest}, {"params": gp, "lr": cfg.lr * cfg.cond_proj_lr_scale}]
    else:
        groups = params
    if cfg.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise TrainError("--use-8bit-adam needs bitsandbytes (pip install bitsandbytes) and a CUDA GPU") from e
        opt = bnb.optim.AdamW8bit(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    for g in opt.param_groups:  # the base lr of each group, scaled by lr_factor at every step
        g.setdefault("initial_lr", g["lr"])

    # ---- 2. resume (before data, so the sampler starts at the right step)
    start = 0
    if cfg.resume:
        ckpt = find_checkpoint(run_dir, cfg.resume)
        if ckpt is None:
            log(f"resume: no complete checkpoint in {run_dir / 'checkpoints'}; starting from step 0")
        else:
            start = load_checkpoint(ckpt, student, target, opt, acc.scaler)
            log(f"resume: {ckpt.name}, continuing at step {start}")
    if start >= cfg.max_steps:
        log(f"already at step {start} >= max_steps {cfg.max_steps}; nothing to do")

    # ---- 3. data
    vae_scale = vae_scale_factor(pipe.vae)
    resolution = cfg.resolution or teacher.config.sample_size * vae_scale
    dataset = build_dataset(cfg.data, resolution, caption_column=cfg.caption_column, image_column=cfg.image_column,
                            seed=cfg.seed, num_examples=cfg.shapes_size)
    counter = getattr(dataset, "counter", None)
    loader_kw = dict(collate_fn=_collate, num_workers=cfg.num_workers)
    if isinstance(dataset, torch.utils.data.IterableDataset):
        loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, **loader_kw)
        skip = start * cfg.grad_accum  # batches to fast-forward
    else:
        batch_size, note = fit_batch_size(len(dataset), cfg.batch_size, acc.num_processes)
        if note:
            log(note)
            cfg = dataclasses.replace(cfg, batch_size=batch_size)
        sampler = StepBatchSampler(len(dataset), cfg.batch_size, cfg.seed, start * cfg.grad_accum,
                                   cfg.max_steps * cfg.grad_accum, acc.process_index, acc.num_processes)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, **loader_kw)
        skip = 0

    student, opt = acc.prepare(student, opt)
    # ---- 4. bookkeeping: the resolved config, trackers, stats.jsonl, fault hook (tests only)
    resolved = {**dataclasses.asdict(cfg), "run_name": run_name, "resolution": resolution, "gamma_sampling":
                ("constant 1" if cfg.method != "splam" else "uniform[0,1]" if not cfg.gamma_one_prob
                 else f"1 with p={cfg.gamma_one_prob:g}, else uniform[0,1]"), "k": cfg.m * (schedule.T // cfg.num_ddim_steps),
                "mixed_precision": rt.mixed_precision, "device": str(device), "processes": acc.num_processes,
                "dtypes": {k: str(v).removeprefix("torch.") for k, v in (("student", acc.unwrap_model(student).dtype), ("target", target.dtype),
                           ("teacher", teacher.dtype), ("text_encoder", pipe.text_encoder.dtype), ("vae", pipe.vae.dtype))},
                "teacher_scheduler": dict(pipe.scheduler.config)}
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
    while step < cfg.max_steps:
        batch = next(data_iter, end)
        if batch is end:
            if not isinstance(dataset, torch.utils.data.IterableDataset):
                from .data import DataError

                raise DataError(f"the data ran out at step {step}: no readable item in the batches left "
                                f"({counter.summary() if counter is not None else 'no skip counts'})")
            data_iter = iter(loader)  # next pass over a finite iterable source
            batch = next(data_iter, end)
            if batch is end:
                raise TrainError(f"data source {cfg.data!r} yielded no usable batch (see the skip counts above)")
        if batch is None:  # every item of this batch was unreadable (counted by the dataset); move on
            micro += 1
            continue
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + step * 104729 + micro * 31 + acc.process_index)
        with acc.accumulate(student):
            with torch.no_grad():
                px = batch["pixel_values"].to(device, rt.vae_dtype)
                z_0 = pipe.vae.encode(px).latent_dist.sample(generator=gen) * pipe.vae.config.scaling_factor
                z_0 = z_0.float()
                cond = encode_text(pipe, batch["caption"], device)
                uncond = uncond_1.expand(len(batch["caption"]), -1, -1)
            with acc.autocast():
                loss = splad_loss(splad, schedule, student, target, teacher, z_0, cond, uncond, gen)
            if step in faults:
                loss = loss * float("nan")
            finite = torch.isfinite(loss.detach()).float()
            if acc.num_processes > 1:
                finite = acc.reduce(finite, "min")
            if finite.item() < 1:
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
            if acc.sync_gradients:
                acc.clip_grad_norm_(params, cfg.max_grad_norm)
            for g in opt.param_groups:
                g["lr"] = g["initial_lr"] * lr_factor(step, cfg.max_steps, cfg.lr_schedule)
            opt.step()
            opt.zero_grad(set_to_none=True)
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
            stats.step(step, loss.item())
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
