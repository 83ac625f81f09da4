"""Training runs started from the studio: one `python -m splam_studio.training` subprocess at a time, followed
through the run's stats.jsonl (loss, speed, ETA), its validation grids and its console log.

A crash of the run cannot take the server down; a restarted studio still shows the last run (its log under
<weights>/.studio-logs/).
"""
from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ..training.quiet import NOISE
from ..store.runs import STATS, default_run_name, read_stats, valid_run_name
from .validation import StudioError, clamp_int

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding splam_studio: the run imports this copy
METHODS = ("splam", "lcm")
TRAIN_STEPS = (1, 100_000)  # the Train tab's limits (its sliders use the same numbers)
TRAIN_BATCH = (1, 256)

ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][A-Z0-9]")  # terminal colours and cursor moves


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
    state: str  # idle | running | stopping | done | failed | stopped | ended
    message: str
    run_name: str | None = None
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) from stats.jsonl
    validation: list[tuple[Path, str]] = field(default_factory=list)  # (png, caption), oldest first
    log_tail: str = ""
    total_steps: int | None = None
    it_s: float | None = None
    eta_s: float | None = None

    @property
    def running(self) -> bool:
        return self.state in ("running", "stopping")

    def loss_frame(self):
        """(step, loss) as numbers (int, float), so a plot puts them on numeric axes, even when empty."""
        import pandas as pd

        return pd.DataFrame({"step": pd.Series([s for s, _ in self.losses], dtype="int64"),
                             "loss": pd.Series([v for _, v in self.losses], dtype="float64")})


class Trainer:
    """One distillation run at a time, as a `python -m splam_studio.training` subprocess (a crash cannot take the server down)."""

    def __init__(self, weights: Path, data_dirs: dict[str, str | Path], package_root: Path = PACKAGE_ROOT):
        self.weights = Path(weights)
        self.data_dirs = {str(k): Path(v).expanduser().resolve() for k, v in data_dirs.items()}
        self.package_root = package_root
        self.proc: subprocess.Popen | None = None
        self.run_name: str | None = None
        self.log_path: Path | None = None
        self.total_steps: int | None = None
        self.stopped = False
        self._lock = threading.Lock()

    def data_choices(self) -> list[str]:
        return ["shapes"] + sorted(self.data_dirs)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def command(self, teacher: str | Path, data: str, method: str, steps: int, run_name: str, batch_size: int) -> list[str]:
        """The trainer's command line (`python -m splam_studio.training`) for a run (teacher and data already resolved by the caller)."""
        cmd = [sys.executable, "-u", "-m", "splam_studio.training"]
        if data == "shapes":
            cmd += ["--preset", "shapes", "--shapes-size", str(min(20000, max(256, steps * batch_size)))]
        cmd += ["--teacher", str(teacher), "--data", data, "--method", method, "--max-steps", str(steps),
                "--batch-size", str(batch_size), "--run-name", run_name, "--output-dir", str(self.weights),
                "--checkpoint-every", str(max(1, steps // 2)), "--validate-every", str(max(1, steps // 4)),
                "--snapshot-every", "0"]
        return cmd

    def start(self, teacher: str | Path, data: str, method: str, steps, run_name: str, batch_size=32) -> str:
        """Start a run; StudioError if one is running or an input is invalid."""
        notices: list[str] = []
        if method not in METHODS:
            raise StudioError(f"unknown method {method!r}; choose one of {list(METHODS)}")
        if data not in self.data_choices():
            raise StudioError(f"unknown data {data!r}; choose one of {self.data_choices()} (folders are allowed "
                              "only from the command line: --data-dir NAME=PATH)")
        steps = clamp_int("training steps", steps, TRAIN_STEPS, notices)
        batch_size = clamp_int("batch size", batch_size, TRAIN_BATCH, notices)
        run_name = (run_name or "").strip() or default_run_name(method)
        if not valid_run_name(run_name):
            raise StudioError(f"invalid run name {run_name!r}: letters, digits, '.', '_' and '-' only, no paths")
        if run_name.startswith("shapes-"):
            raise StudioError("run names starting with 'shapes-' are reserved for the embedded models; pick another")
        if (self.weights / run_name).exists():
            raise StudioError(f"a run named {run_name!r} already exists under weights/; pick another name")
        data_arg = data if data == "shapes" else str(self.data_dirs[data])
        with self._lock:
            if self.running():
                raise StudioError(f"run {self.run_name!r} is still going: stop it first (one run at a time)")
            logs = self.weights / ".studio-logs"
            logs.mkdir(parents=True, exist_ok=True)
            self.log_path = logs / f"{run_name}.log"
            env = {**os.environ, "PYTHONUNBUFFERED": "1",
                   "PYTHONPATH": os.pathsep.join(filter(None, [str(self.package_root), os.environ.get("PYTHONPATH")]))}
            with open(self.log_path, "wb") as log:
                self.proc = subprocess.Popen(self.command(teacher, data_arg, method, steps, run_name, batch_size),
                                             cwd=str(self.package_root), stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, env=env, start_new_session=True)
            self.run_name, self.total_steps, self.stopped = run_name, steps, False
            threading.Thread(target=self.proc.wait, daemon=True).start()  # reap the child as soon as it exits
        note = f" ({'; '.join(notices)})" if notices else ""
        return f"Started {method} run `{run_name}`: {steps} steps, batch {batch_size}, data {data}{note}."

    def stop(self, grace_s: float = 20.0) -> str:
        """Interrupt the run (SIGINT: the trainer exits cleanly, the last checkpoint intact), kill after grace_s."""
        with self._lock:
            if not self.running():
                return "No run is going."
            proc, self.stopped = self.proc, True
            proc.send_signal(signal.SIGINT)

        def reap():
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

        threading.Thread(target=reap, daemon=True).start()
        return f"Stopping `{self.run_name}`…"

    def _last_logged_run(self) -> tuple[str, Path] | None:
        """(run name, log) of the newest run started from a studio on this weights folder (survives a restart)."""
        logs = sorted((self.weights / ".studio-logs").glob("*.log"), key=lambda p: p.stat().st_mtime)
        return (logs[-1].stem, logs[-1]) if logs else None

    def status(self) -> TrainStatus:
        """The current (or last) run: state, loss curve, speed and ETA from its stats.jsonl, validation grids, log."""
        if self.proc is None:
            last = self._last_logged_run()
            if last is None:
                return TrainStatus("idle", "No run started from the studio yet.")
            run_name, log_path, rc = last[0], last[1], "gone"
        else:
            run_name, log_path, rc = self.run_name, self.log_path, self.proc.poll()
        rows = read_stats(self.weights / run_name / STATS)
        steps = [r for r in rows if "event" not in r and "step" in r]
        losses = [(int(r["step"]), float(r["loss"])) for r in steps if isinstance(r.get("loss"), (int, float))]
        start = next((r for r in reversed(rows) if r.get("event") == "start"), {})
        done = any(r.get("event") == "done" for r in rows)
        total = self.total_steps if self.proc is not None else start.get("max_steps")
        last = steps[-1] if steps else None
        it_s, eta = (last.get("it_s"), last.get("eta_s")) if last else (None, None)
        val_dir = self.weights / run_name / "validation"
        validation = [(p, f"step {int(p.stem.split('-')[-1])}") for p in sorted(val_dir.glob("step-*.png"))]
        lines = clean_log(_tail(log_path, 200_000) if log_path else "")
        if last:
            progress = f"step {last['step']}/{total}" + (f", loss {last['loss']:.4g}" if last.get("loss") is not None
                                                         else "")
        else:
            progress = "loading the teacher and the data…"
        if rc is None:
            speed = f" · {it_s:.2f} it/s · ETA {format_duration(eta)}" if it_s else ""
            state, msg = ("stopping" if self.stopped else "running"), f"`{run_name}` {progress}{speed}"
        elif rc == "gone":
            state = "done" if done else "ended"
            msg = (f"Last run `{run_name}` finished ({progress}); it is in the model lists." if done else
                   f"Last run `{run_name}` ended at {progress} (the studio was restarted or the run stopped); "
                   f"continue it with `python -m splam_studio.training --run-name {run_name} --resume latest`.")
        elif self.stopped:
            state, msg = "stopped", (f"`{run_name}` stopped ({progress}). Its last checkpoint is in "
                                     f"weights/{run_name}/checkpoints; continue with `python -m splam_studio.training --resume latest`.")
        elif rc == 0:
            state, msg = "done", f"`{run_name}` finished ({progress}); it is now in the model lists."
        else:
            err = ([ln for ln in lines if ln.startswith("error:")] or lines or ["(no output)"])[-1]
            state, msg = "failed", f"`{run_name}` failed (exit {rc}): {err[:300]}"
        return TrainStatus(state, msg, run_name, losses, validation, "\n".join(lines[-15:]), total, it_s, eta)


def _tail(path: Path, n: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - n))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""
