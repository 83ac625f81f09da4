"""Training runs started from the studio: `python -m splam_studio.training` subprocesses, followed through the run's
stats.jsonl (loss, speed, ETA), its validation grids and its console log.

A crash of the run cannot take the server down. Each run is its own process group (its workers included), started
with SIGINT and SIGTERM at their defaults even when the studio ignores them (`nohup`), and ended when the studio
exits (`Trainer.shutdown`, called by app.py at exit and on SIGTERM). While it lives, a record
<weights>/.studio-logs/<run>.live.json (pid, process start time, run name, owner) lets a restarted studio (after a
kill -9) show it as live, stop it and start nothing beside it; its log stays under <weights>/.studio-logs/.

On a shared server (`shared=True`) a run belongs to the browser session that started it (`owner`): only that
session sees its log and can stop it; each visitor has at most one live run, `slots` runs go at once in all, and the
runs started from the page share a disk quota (`quota_mb`).
"""
from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..training.quiet import NOISE
from ..store.atomic import atomic_write, write_json
from ..store.runs import STATS, default_run_name, read_stats, valid_run_name
from .validation import StudioError, clamp_int

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding splam_studio: the run imports this copy
METHODS = ("splam", "lcm")
TRAIN_STEPS = (1, 100_000)  # the Train tab's limits (its sliders use the same numbers)
TRAIN_BATCH = (1, 256)

LOGS = ".studio-logs"  # under the weights folder: <run>.log (console) and <run>.live.json (while it runs)
LIVE = ".live.json"
QUOTA_POLL_S = 2.0
# The child resets SIGINT / SIGTERM to their defaults, then execs the trainer: a signal the studio ignores (nohup)
# would otherwise be ignored by the trainer too (exec keeps SIG_IGN), and Stop's SIGINT would do nothing.
DEFAULT_SIGNALS = ("import os, signal, sys; [signal.signal(s, signal.SIG_DFL) for s in (signal.SIGINT, signal.SIGTERM)]; "
                   "os.execv(sys.executable, [sys.executable] + sys.argv[1:])")

ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][A-Z0-9]")  # terminal colours and cursor moves
# a data-preparation bar of the trainer (training/latents.py) at its last redraw: "teacher data:  40%|###  | 2/5 [00:03<00:04, ...]"
STAGE_BAR = re.compile(r"^(teacher data|latent cache):\s*(\d+)%\|[^|]*\|\s*(\d+)/(\d+)\s*\[([^<\]]*)<?([^,\]]*)")

# Prompts typed on the page (`--prompts`): the data choice, and the limits a visitor's text is held to
TYPED_PROMPTS = "prompts typed below"
PROMPTS_FILE = ".prompts.txt"  # <weights>/.studio-logs/<run>.prompts.txt: the typed prompts, handed to the trainer
MAX_PROMPTS_CHARS = 100_000  # the whole box
MAX_PROMPTS = 1000  # prompts in the box
IMAGES_PER_PROMPT = (1, 16)
MAX_TEACHER_IMAGES = 4096  # prompts x images per prompt: the teacher-made data a page's run may ask for
SHAPES_TEACHER = "shapes-teacher"  # the embedded teacher's folder under weights/ (models.loading.EMBEDDED)


@dataclass(frozen=True)
class Recipe:
    """The trainer settings the Train tab uses for a teacher: a preset of the trainer's CLI, the flags over it, and why."""

    preset: str
    flags: tuple[str, ...]
    why: str


# The Shapes world's measured recipe: the `shapes` preset (lr 1e-5, w 6.5, p(gamma = 1) 0.8, the gamma projection
# from zero at 30x lr; BENCHMARKS.md, "SPLAM against LCM over training seeds" and "SL-ODE variants").
SHAPES_RECIPE = Recipe("shapes", (), "the embedded Shapes teacher's own recipe, measured in BENCHMARKS.md: lr 1e-5, w 6.5 "
                       "(CFG 7.5), p(gamma = 1) 0.8 and the gamma projection from zero at 30x lr (with the paper's "
                       "U[0, 1], p = 0, SPLAM collapsed on this world; 0.8 gave the lowest 2- and 4-step FID over "
                       "3 seeds)")
# Any other teacher: the `sd15` preset (the authors' SD1.5 hyper-parameters: LoRA 64, lr 1e-4, w 8, gradient
# checkpointing; memory estimated in training/memory.py) with the gamma sampling measured on the Shapes world, since
# the preset's p(gamma = 1) 0 is the U[0, 1] that collapsed there. Not measured on an SD1.5 teacher here (no GPU).
OTHER_FLAGS = ("--gamma-one-prob", "0.8", "--cond-proj-init", "zero")
OTHER_WHY = ("the `sd15` preset (the authors' SD1.5 hyper-parameters: LoRA rank 64, lr 1e-4, w 8 = CFG 9, gradient "
             "checkpointing; about 12.4 GiB at batch 8 in bf16) with p(gamma = 1) 0.8 and the gamma projection from "
             "zero, as measured on the Shapes world (BENCHMARKS.md: the preset's p = 0, the paper's U[0, 1], "
             "collapsed there); this recipe was not measured on an SD1.5 teacher here")


def native_px(source: str | Path) -> int | None:
    """The teacher's native image size from its configs (unet sample_size x the VAE's downsampling), read without
    loading weights: a diffusers folder (a Path, or an absolute one), or a hub id whose configs are in the local
    Hugging Face cache (a hub id is never read as a folder); else None."""
    local = isinstance(source, Path) or os.path.isabs(str(source))

    def config(name: str) -> dict | None:
        if local:
            path = Path(source) / name / "config.json"
        else:
            from huggingface_hub import try_to_load_from_cache

            try:
                cached = try_to_load_from_cache(str(source), f"{name}/config.json")
            except ValueError:  # not a hub id by huggingface_hub's rules (HFValidationError)
                cached = None
            if not isinstance(cached, str):
                return None
            path = Path(cached)
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    unet, vae = config("unet"), config("vae")
    try:
        return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (TypeError, KeyError, ValueError):
        return None


def recipe(source: str | Path, weights: Path) -> Recipe:
    """The recipe for a resolved teacher: `shapes` for the embedded Shapes teacher, else `sd15` with SPLAM's measured
    gamma sampling, at the teacher's native size when its configs say it (the preset's 512 px otherwise)."""
    if str(source) == "shapes" or Path(source).resolve() == (Path(weights) / SHAPES_TEACHER).resolve():
        return SHAPES_RECIPE
    px = native_px(source)
    if px is None:
        return Recipe("sd15", OTHER_FLAGS, OTHER_WHY + "; 512 px, the preset's size (the teacher's configs could not "
                      "be read here)")
    return Recipe("sd15", OTHER_FLAGS + ("--resolution", str(px)), OTHER_WHY + f"; {px} px, the teacher's native size")


def check_prompts(text, images_per_prompt, notices: list[str]) -> tuple[str, int]:
    """The typed prompts as a prompts file's text (latents.read_prompts reads it) and the images per prompt, within
    the page's limits; StudioError naming the line for text the trainer would refuse."""
    from ..training.latents import LatentDataError, read_prompts

    if not isinstance(text, str) or not text.strip():
        raise StudioError(f"data {TYPED_PROMPTS!r} needs prompts: type one a line (or JSON lines "
                          '{"prompt": ..., "negative_prompt": ...}) in the Prompts box')
    if len(text) > MAX_PROMPTS_CHARS:
        raise StudioError(f"the prompts are {len(text)} characters; at most {MAX_PROMPTS_CHARS} are taken from the page")
    n = clamp_int("images per prompt", images_per_prompt, IMAGES_PER_PROMPT, notices)
    text = "\n".join(line.rstrip() for line in text.replace("\r\n", "\n").split("\n")) + "\n"
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:  # the trainer's own parser, so the page refuses what it would refuse
        path = Path(tmp) / "prompts.txt"
        path.write_text(text, encoding="utf-8")
        try:
            prompts = read_prompts(path)
        except LatentDataError as e:
            raise StudioError(str(e).replace(str(path), "the Prompts box")) from None
    if len(prompts) > MAX_PROMPTS:
        raise StudioError(f"{len(prompts)} prompts; at most {MAX_PROMPTS} are taken from the page")
    if len(prompts) * n > MAX_TEACHER_IMAGES:
        raise StudioError(f"{len(prompts)} prompts x {n} images = {len(prompts) * n} teacher-made images; at most "
                          f"{MAX_TEACHER_IMAGES} from the page: fewer prompts or images per prompt")
    return text, n


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def clean_log(text: str) -> list[str]:
    """Log lines as a person reads them: escape codes removed, each progress bar at its last redraw, noise dropped."""
    lines = []
    for raw in ANSI.sub("", text).split("\n"):
        line = raw.split("\r")[-1] if "\r" in raw else raw  # tqdm redraws a line with \r
        line = line.rstrip()
        if line.strip() and not NOISE.search(line):
            lines.append(line)
    return lines


@dataclass
class TrainStatus:
    state: str  # idle | busy (another visitor's run) | running | stopping | done | failed | stopped | ended
    message: str
    run_name: str | None = None
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) from stats.jsonl
    validation: list[tuple[Path, str]] = field(default_factory=list)  # (png, caption), oldest first
    log_tail: str = ""
    total_steps: int | None = None
    it_s: float | None = None
    eta_s: float | None = None
    validation_prompts: list[str] | None = None  # as the run recorded them (None: no training_config.json yet)
    validate_every: int | None = None  # the run's validation cadence in steps (0: at the end only), as recorded

    @property
    def running(self) -> bool:
        return self.state in ("running", "stopping")

    def loss_frame(self):
        """(step, loss) as numbers (int, float), so a plot puts them on numeric axes, even when empty."""
        import pandas as pd

        return pd.DataFrame({"step": pd.Series([s for s, _ in self.losses], dtype="int64"),
                             "loss": pd.Series([v for _, v in self.losses], dtype="float64")})


@dataclass
class Run:
    """One run started from a studio: our child (`proc`), or one adopted from a live-run record (`proc` None)."""

    name: str
    owner: str | None
    pid: int
    created: float  # the process's start time: with the pid, it identifies the process (pids are reused)
    log_path: Path
    total_steps: int | None
    proc: subprocess.Popen | None = None
    stopped: bool = False
    quota_hit: bool = False

    def poll(self):
        """None while it runs; its exit code (our child) or "gone" (an adopted run) once it has ended."""
        if self.proc is not None:
            return self.proc.poll()
        return None if process_alive(self.pid, self.created) else "gone"


def process_created(pid: int) -> float | None:
    """Start time of process `pid` (seconds since the epoch), None if there is none."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def process_alive(pid: int, created: float) -> bool:
    """Whether `pid` is still the process that started at `created` (not a zombie, not a reused pid)."""
    import psutil

    try:
        p = psutil.Process(pid)
        return abs(p.create_time() - created) < 0.05 and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def folder_bytes(path: Path) -> int:
    """Bytes of the files under `path` (symlinks not followed); 0 when it does not exist."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


class Trainer:
    """Distillation runs as `python -m splam_studio.training` subprocesses (a crash cannot take the server down)."""

    def __init__(self, weights: Path, data_dirs: dict[str, str | Path], package_root: Path = PACKAGE_ROOT, *,
                 shared: bool = False, quota_mb: float | None = None, slots: int = 1,
                 public: Callable[[str], str] | None = None):
        self.weights = Path(weights)
        self.data_dirs = {str(k): Path(v).expanduser().resolve() for k, v in data_dirs.items()}
        self.package_root = package_root
        self.shared, self.quota_mb, self.slots = shared, quota_mb, max(1, int(slots))
        self.public = public or (lambda text: text.replace(str(self.weights), "weights"))
        self.runs: dict[str, Run] = {}  # every run this studio started or adopted, oldest first
        self._lock = threading.Lock()
        self._closed = False
        self._adopt_live_records()

    # -- who may see and stop what --------------------------------------------------------------------------------
    def _owns(self, owner: str | None, run: Run) -> bool:
        return not self.shared or run.owner == owner

    def _live(self) -> list[Run]:
        return [r for r in self.runs.values() if r.poll() is None]

    def _mine(self, owner: str | None) -> Run | None:
        """The owner's live run, else the owner's newest run of this studio (any run, off a shared server)."""
        mine = [r for r in self.runs.values() if self._owns(owner, r)]
        live = [r for r in mine if r.poll() is None]
        return (live or mine or [None])[-1]

    @property
    def proc(self) -> subprocess.Popen | None:
        """The newest run's subprocess (None before the first start, or for an adopted run)."""
        return next(reversed(self.runs.values())).proc if self.runs else None

    def data_choices(self) -> list[str]:
        return ["shapes"] + sorted(self.data_dirs)

    def running(self, owner: str | None = None) -> bool:
        """Whether a run is live: any run (owner None), or the owner's (on a shared server)."""
        with self._lock:
            return any(owner is None or self._owns(owner, r) for r in self._live())

    # -- the live-run record: a restarted studio finds the runs that outlived it ------------------------------------
    @property
    def logs(self) -> Path:
        return self.weights / LOGS

    def _record(self, name: str) -> Path:
        return self.logs / f"{name}{LIVE}"

    def _adopt_live_records(self) -> None:
        for path in sorted(self.logs.glob(f"*{LIVE}")):
            try:
                rec = json.loads(path.read_text(encoding="utf-8", errors="replace"))
                run = Run(str(rec["run_name"]), rec.get("owner"), int(rec["pid"]), float(rec["created"]),
                          self.logs / f"{rec['run_name']}.log", rec.get("total_steps"))
            except (OSError, ValueError, KeyError, TypeError):
                run = None
            if run is not None and valid_run_name(run.name) and run.poll() is None:
                self.runs[run.name] = run
                threading.Thread(target=self._watch, args=(run,), daemon=True).start()
            else:
                path.unlink(missing_ok=True)  # the run ended while no studio was watching (or the record is junk)

    # -- the disk quota of the runs started from the page -----------------------------------------------------------
    def page_bytes(self) -> int:
        """Disk used by the runs started from a studio (each has a console log in .studio-logs/), logs included."""
        names = {p.name[: -len(".log")] for p in self.logs.glob("*.log")}
        return folder_bytes(self.logs) + sum(folder_bytes(self.weights / n) for n in names if valid_run_name(n))

    def _over_quota(self) -> bool:
        return self.quota_mb is not None and self.page_bytes() > self.quota_mb * 2**20

    def _watch(self, run: Run) -> None:
        """Reap the run as soon as it exits, stop it when the page's runs outgrow the quota, drop its record."""
        while run.poll() is None:
            if self.quota_mb is not None and not run.stopped and self._over_quota():
                run.quota_hit = True
                self._stop(run, grace_s=20.0)
            if run.proc is not None:
                try:
                    run.proc.wait(QUOTA_POLL_S)
                except subprocess.TimeoutExpired:
                    pass
            else:
                time.sleep(QUOTA_POLL_S)
        self._record(run.name).unlink(missing_ok=True)

    # -- start, stop, shutdown ------------------------------------------------------------------------------------
    def command(self, teacher: str | Path, data: str, method: str, steps: int, run_name: str, batch_size: int, *,
                prompts: Path | None = None, images_per_prompt: int = 1) -> list[str]:
        """The trainer's command line (`python -m splam_studio.training`) for a run: the teacher's recipe (`recipe`),
        then the page's choices. Teacher and data come resolved by the caller: 'shapes' or a folder, or a prompts
        file (`prompts`, which replaces the data)."""
        r = recipe(teacher, self.weights)
        cmd = [sys.executable, "-u", "-m", "splam_studio.training", "--preset", r.preset, *r.flags]
        if prompts is not None:
            cmd += ["--prompts", str(prompts), "--images-per-prompt", str(images_per_prompt)]
        else:
            cmd += ["--data", data]
            if data == "shapes":
                cmd += ["--shapes-size", str(min(20000, max(256, steps * batch_size)))]
        cmd += ["--teacher", str(teacher), "--method", method, "--max-steps", str(steps),
                "--batch-size", str(batch_size), "--run-name", run_name, "--output-dir", str(self.weights),
                "--checkpoint-every", str(max(1, steps // 2)), "--validate-every", str(max(1, steps // 4)),
                "--snapshot-every", "0"]
        return cmd

    def prompts_file(self, data: str) -> Path | None:
        """The prompts file a data choice names (a --data-dir entry that is a file), else None."""
        path = self.data_dirs.get(data)
        return path if path is not None and path.is_file() else None

    def start(self, teacher: str | Path, data: str, method: str, steps, run_name: str, batch_size=32,
              owner: str | None = None, *, prompts: str = "", images_per_prompt=1) -> str:
        """Start a run for `owner`; StudioError if the owner (or the server) has a live run, the page's runs used
        their disk quota, or an input is invalid. With data TYPED_PROMPTS, `prompts` is the Prompts box's text: it is
        checked (check_prompts), written to <weights>/.studio-logs/<run>.prompts.txt and trained on with --prompts."""
        notices: list[str] = []
        if method not in METHODS:
            raise StudioError(f"unknown method {method!r}; choose one of {list(METHODS)}")
        if data not in self.data_choices() and data != TYPED_PROMPTS:
            raise StudioError(f"unknown data {data!r}; choose one of {self.data_choices() + [TYPED_PROMPTS]} (folders "
                              "and prompts files are allowed only from the command line: --data-dir NAME=PATH)")
        typed = None
        if data == TYPED_PROMPTS:
            typed, images_per_prompt = check_prompts(prompts, images_per_prompt, notices)
        elif self.prompts_file(data) is not None:
            images_per_prompt = clamp_int("images per prompt", images_per_prompt, IMAGES_PER_PROMPT, notices)
        steps = clamp_int("training steps", steps, TRAIN_STEPS, notices)
        batch_size = clamp_int("batch size", batch_size, TRAIN_BATCH, notices)
        run_name = (run_name or "").strip() or default_run_name(method)
        if not valid_run_name(run_name):
            raise StudioError(f"invalid run name {run_name!r}: letters, digits, '.', '_' and '-' only, no paths")
        if run_name.startswith("shapes-"):
            raise StudioError("run names starting with 'shapes-' are reserved for the embedded models; pick another")
        if (self.weights / run_name).exists():
            raise StudioError(f"a run named {run_name!r} already exists under weights/; pick another name")
        data_arg = data if data in ("shapes", TYPED_PROMPTS) else str(self.data_dirs[data])
        with self._lock:
            if self._closed:
                raise StudioError("the studio is shutting down; no new run starts")
            live = self._live()
            mine = [r for r in live if self._owns(owner, r)]
            if mine:
                raise StudioError(f"run {mine[0].name!r} is still going: stop it first (one run at a time)")
            if len(live) >= self.slots:
                raise StudioError("another visitor's run is going and this server trains one run at a time: "
                                  "try again when it ends")
            if self._over_quota():
                raise StudioError(f"the runs started from this page already use {self.page_bytes() / 2**20:.0f} MB "
                                  f"of their {self.quota_mb:g} MB disk quota: the server's owner can delete old runs "
                                  "under weights/ or raise --train-quota-mb")
            self.logs.mkdir(parents=True, exist_ok=True)
            log_path = self.logs / f"{run_name}.log"
            env = {**os.environ, "PYTHONUNBUFFERED": "1",
                   "PYTHONPATH": os.pathsep.join(filter(None, [str(self.package_root), os.environ.get("PYTHONPATH")]))}
            prompts_path = self.prompts_file(data)
            if typed is not None:
                prompts_path = atomic_write(self.logs / f"{run_name}{PROMPTS_FILE}",
                                            lambda tmp: tmp.write_text(typed, encoding="utf-8"))
            cmd = self.command(teacher, data_arg, method, steps, run_name, batch_size, prompts=prompts_path,
                               images_per_prompt=images_per_prompt)
            with open(log_path, "wb") as log:
                # own session = own process group (Stop and shutdown signal the group); cwd is the logs folder,
                # which holds no folders, so no relative name (a hub id) can reach a folder on this machine
                proc = subprocess.Popen([sys.executable, "-c", DEFAULT_SIGNALS, *cmd[1:]], cwd=str(self.logs),
                                        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                        start_new_session=True)
            run = Run(run_name, owner, proc.pid, process_created(proc.pid) or time.time(), log_path, steps, proc)
            self.runs[run_name] = run
            write_json(self._record(run_name), {"pid": run.pid, "created": run.created, "run_name": run_name,
                                                "owner": owner, "total_steps": steps, "started": time.time()})
            threading.Thread(target=self._watch, args=(run,), daemon=True).start()
        note = f" ({'; '.join(notices)})" if notices else ""
        per = f" x {images_per_prompt} images each" if prompts_path is not None else ""
        return (f"Started {method} run `{run_name}`: {steps} steps, batch {batch_size}, data {data}{per}, preset "
                f"{recipe(teacher, self.weights).preset}{note}.")

    def _signal(self, run: Run, sig: int) -> None:
        """`sig` to the run's process group (the trainer and its workers), if it is still that run."""
        if run.poll() is not None:
            return
        try:
            os.killpg(run.pid, sig)  # start_new_session: the group id is the trainer's pid
        except (ProcessLookupError, PermissionError):
            pass

    def _stop(self, run: Run, grace_s: float) -> None:
        """SIGINT (the trainer exits cleanly, the last checkpoint intact), SIGKILL to the group after grace_s."""
        run.stopped = True
        self._signal(run, signal.SIGINT)

        def reap():
            deadline = time.time() + grace_s
            while run.poll() is None and time.time() < deadline:
                time.sleep(0.1)
            if run.poll() is None:
                self._signal(run, signal.SIGKILL)

        threading.Thread(target=reap, daemon=True).start()

    def stop(self, grace_s: float = 20.0, owner: str | None = None) -> str:
        """Interrupt the owner's live run (SIGINT: the trainer exits cleanly, the last checkpoint intact), kill after
        grace_s. Another visitor's run cannot be stopped."""
        with self._lock:
            run = next((r for r in self._live() if self._owns(owner, r)), None)
            if run is None:
                return "No run of yours is going." if self.shared and self._live() else "No run is going."
            self._stop(run, grace_s)
        return f"Stopping `{run.name}`…"

    def shutdown(self, grace_s: float = 10.0) -> None:
        """End every live run (the studio is exiting): SIGINT to each group, SIGKILL to those left after grace_s."""
        with self._lock:
            self._closed = True
            live = self._live()
        for run in live:
            run.stopped = True
            self._signal(run, signal.SIGINT)
        deadline = time.time() + grace_s
        while any(r.poll() is None for r in live) and time.time() < deadline:
            time.sleep(0.1)
        for run in live:
            self._signal(run, signal.SIGKILL)
            if run.proc is not None:
                try:
                    run.proc.wait(5)
                except subprocess.TimeoutExpired:
                    pass
            if run.poll() is not None:
                self._record(run.name).unlink(missing_ok=True)

    # -- status -------------------------------------------------------------------------------------------------
    def _last_logged_run(self) -> tuple[str, Path] | None:
        """(run name, log) of the newest run started from a studio on this weights folder (survives a restart)."""
        logs = sorted(self.logs.glob("*.log"), key=lambda p: p.stat().st_mtime)
        return (logs[-1].stem, logs[-1]) if logs else None

    def status(self, owner: str | None = None) -> TrainStatus:
        """The owner's current (or last) run: state, loss curve, speed and ETA from its stats.jsonl, validation grids,
        log. On a shared server nothing of another visitor's run is shown but that one is going."""
        with self._lock:
            run = self._mine(owner)
            others = [r for r in self._live() if not self._owns(owner, r)]
        busy = ("Another visitor's run is going; this server trains one run at a time: start yours when it ends."
                if others and len(others) >= self.slots else "")
        if run is None:
            if busy:
                return TrainStatus("busy", busy)
            last = None if self.shared else self._last_logged_run()
            if last is None:
                return TrainStatus("idle", "No run started from the studio yet.")
            run_name, log_path, rc, total, stopped, quota_hit = last[0], last[1], "gone", None, False, False
        else:
            run_name, log_path, rc, total = run.name, run.log_path, run.poll(), run.total_steps
            stopped, quota_hit = run.stopped, run.quota_hit
        rows = [r for r in read_stats(self.weights / run_name / STATS) if isinstance(r, dict)]
        steps = [r for r in rows if "event" not in r and isinstance(r.get("step"), int)]
        losses = [(int(r["step"]), float(r["loss"])) for r in steps
                  if isinstance(r.get("loss"), (int, float)) and not isinstance(r.get("loss"), bool)]
        start = next((r for r in reversed(rows) if r.get("event") == "start"), {})
        done = any(r.get("event") == "done" for r in rows)
        if total is None and isinstance(start.get("max_steps"), int):
            total = start["max_steps"]
        last = steps[-1] if steps else None
        it_s, eta = (_num(last.get("it_s")), _num(last.get("eta_s"))) if last else (None, None)
        val_dir = self.weights / run_name / "validation"
        validation = [(p, f"step {int(p.stem.split('-')[-1])}") for p in sorted(val_dir.glob("step-*.png"))
                      if p.stem.split("-")[-1].isdigit()]
        lines = [self.public(ln) for ln in clean_log(_tail(log_path, 200_000) if log_path else "")]
        if last:
            loss = _num(last.get("loss"))
            progress = f"step {last['step']}/{total}" + (f", loss {loss:.4g}" if loss is not None else "")
        else:
            progress = stage_progress(lines) or "loading the teacher and the data…"
        if rc is None:
            speed = f" · {it_s:.2f} it/s · ETA {format_duration(eta)}" if it_s else ""
            state, msg = ("stopping" if stopped else "running"), f"`{run_name}` {progress}{speed}"
            if run is not None and run.proc is None:
                msg += " (started by an earlier studio on this weights folder)"
        elif rc == "gone" and not stopped:
            state = "done" if done else "ended"
            msg = (f"Last run `{run_name}` finished ({progress}); it is in the model lists." if done else
                   f"Last run `{run_name}` ended at {progress} (the studio was restarted or the run stopped): "
                   f"{self.left_behind(run_name)}.")
        elif stopped:
            why = " when the runs started from this page reached their disk quota" if quota_hit else ""
            state, msg = "stopped", f"`{run_name}` stopped{why} ({progress}): {self.left_behind(run_name)}."
        elif rc == 0:
            state, msg = "done", f"`{run_name}` finished ({progress}); it is now in the model lists."
        else:
            err = ([ln for ln in lines if ln.startswith("error:")] or lines or ["(no output)"])[-1]
            state, msg = "failed", f"`{run_name}` failed (exit {rc}): {err[:300]}"
        if busy and rc is not None:
            msg += f" {busy}"
        return TrainStatus(state, msg, run_name, losses, validation, "\n".join(lines[-15:]), total, it_s, eta,
                           *_validation_settings(self.weights / run_name))

    def left_behind(self, run_name: str) -> str:
        """What an ended run left, in the trainer's words (training.loop.stop_report): its last checkpoint (path under
        weights/) and step with the command that resumes this very run from its own training_config.json, or that
        there is none and whether its folder is gone."""
        from ..training.loop import stop_report

        run_dir = self.weights / run_name
        if run_dir.is_dir() and live_owner_of(run_dir):
            return f"its trainer still holds weights/{run_name} (it is finishing); reload in a moment"
        return self.public(stop_report(run_dir, output_dir_flag=str(self.weights)))


def stage_progress(lines: list[str]) -> str | None:
    """The trainer's data preparation before its first step (teacher data from --prompts, the latent cache) from its
    progress bar in the log: 'making teacher data: 2/5 images (40%), 0:03 so far, 0:04 left'; None when there is none."""
    for line in reversed(lines):
        m = STAGE_BAR.match(line.strip())
        if m:
            stage, pct, done, total, spent, left = m.groups()
            times = f", {spent.strip()} so far" + (f", {left.strip()} left" if left.strip() not in ("", "?") else "")
            return f"making {stage}: {done}/{total} images ({pct}%){times}"
        if line.startswith(("teacher data:", "latent cache:")):  # the stage's closing line: it is done
            return None
    return None


def live_owner_of(run_dir: Path) -> bool:
    """Whether a live trainer holds the run's folder (store.runs.live_owner asks the OS)."""
    from ..store.runs import live_owner

    return live_owner(run_dir) is not None


def _validation_settings(run_dir: Path) -> tuple[list[str] | None, int | None]:
    """(validation prompts, validate_every) as the run recorded them in its training_config.json; None for each that
    is not there (before the trainer wrote the file, or a damaged one)."""
    from ..store.runs import read_training_config

    try:
        rec = read_training_config(run_dir)
    except (OSError, ValueError):
        rec = None
    rec = rec if isinstance(rec, dict) else {}
    prompts, every = rec.get("validation_prompts"), rec.get("validate_every")
    return ([p for p in prompts if isinstance(p, str)] if isinstance(prompts, list) else None,
            every if isinstance(every, int) and not isinstance(every, bool) else None)


def _num(value) -> float | None:
    """A finite number from a stats row, else None (a damaged row never breaks the Train tab)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _tail(path: Path, n: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - n))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""
