"""A training run as files: its name rule, default name, the weights root, training_config.json and stats.jsonl.

One owner for each; the trainer writes these, the model loader, the studio and the tools read them.
weights/<run>/training_config.json  the resolved TrainConfig (plus what the run derived: resolution, ...)
weights/<run>/stats.jsonl           one JSON object per line: a start line, one per optimiser step, a done line
weights/<run>/.run.lock             held (an OS-level lock) by the trainer writing the run; its JSON names that process
"""
from __future__ import annotations

import json
import math
import os
import re
import socket
import sys
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are then not locked (the lock is a no-op there)
    fcntl = None

WEIGHTS_ENV = "SPLAM_WEIGHTS_DIR"
CHECKOUT = Path(__file__).resolve().parents[2]  # the folder holding splam_studio/
TRAINING_CONFIG = "training_config.json"
STATS = "stats.jsonl"
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")  # a plain folder name: no separators, no leading dot
LOCK = ".run.lock"


def weights_dir() -> Path:
    """The default weights root, the one rule of the trainer, the studio and the tools.

    `$SPLAM_WEIGHTS_DIR` if set; else `weights/` of the checkout the package runs from (the folder holding
    pyproject.toml beside splam_studio/), from any working directory; else `./weights` (an installed package).
    """
    env = os.environ.get(WEIGHTS_ENV)
    if env:
        return Path(env).expanduser()
    if (CHECKOUT / "pyproject.toml").is_file():
        return CHECKOUT / "weights"
    return Path.cwd() / "weights"


def valid_run_name(name) -> bool:
    """Letters, digits, '.', '_' and '-', starting with a letter or digit, at most 128 characters."""
    return isinstance(name, str) and bool(RUN_NAME.fullmatch(name)) and name not in (".", "..")


def default_run_name(method: str) -> str:
    """<method>-<local timestamp>, e.g. splam-20260101-120000."""
    return f"{method}-{time.strftime('%Y%m%d-%H%M%S')}"


def read_training_config(run_dir: str | Path) -> dict:
    """The run's training_config.json (OSError if missing, ValueError if not JSON)."""
    return json.loads((Path(run_dir) / TRAINING_CONFIG).read_text())


class StepLog:
    """The run's machine-readable trail: <run>/stats.jsonl, appended (a resumed run continues the same file)."""

    def __init__(self, run_dir: Path, cfg, start: int):
        self.path, self.start, self.total, self.t0 = run_dir / STATS, start, cfg.max_steps, time.time()
        self.write({"event": "start", "step": start, "max_steps": cfg.max_steps, "method": cfg.method,
                    "batch_size": cfg.batch_size})

    def write(self, row: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({**row, "time": round(time.time(), 3)}) + "\n")

    def step(self, step: int, loss: float, **extra) -> None:
        """One step line: step, loss, speed, ETA, and `extra` (the trainer's lr)."""
        elapsed = max(time.time() - self.t0, 1e-9)
        it_s = (step - self.start) / elapsed
        eta = (self.total - step) / it_s if it_s > 0 else None
        self.write({"step": step, "loss": loss if math.isfinite(loss) else None, **extra, "it_s": round(it_s, 4),
                    "eta_s": None if eta is None else round(eta, 1)})


def read_stats(path: str | Path) -> list[dict]:
    """The JSON lines of a run's stats.jsonl (a half-written last line is ignored)."""
    rows = []
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")  # one bad byte must not hide the run
    except OSError:
        return rows
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


# ---------------------------------------------------------------- the run lock: one trainer per run folder

class RunBusy(RuntimeError):
    """The run folder is held by a live trainer; `owner` is what live_owner() returns."""

    def __init__(self, run_dir: Path, owner: dict):
        self.owner = owner
        super().__init__(f"run {Path(run_dir).name!r} in {run_dir} is being trained right now by {describe_owner(owner)}; "
                         "wait for it to end or stop that process first (a second trainer never writes a live run)")


def describe_owner(owner: dict) -> str:
    """'process 123 on host h (started 2026-01-01 12:00:00 UTC)'."""
    return (f"process {owner.get('pid', '?')} on host {owner.get('host', '?')}"
            f" (started {owner.get('started', 'at an unknown time')})")


def live_owner(run_dir: str | Path) -> dict | None:
    """Who is training this run right now: {'pid', 'host', 'started', 'argv'} of the live trainer, or None.

    Asks the OS: the trainer holds an exclusive flock on <run>/.run.lock, which the OS drops when it exits or dies
    (kill -9 included), so a stale file never counts. A lock whose owner has not yet written its name gives pid None."""
    path = Path(run_dir) / LOCK
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:  # held exclusively: live
            try:
                owner = json.loads(os.read(fd, 65536).decode("utf-8"))
            except (OSError, ValueError):
                owner = None
            return owner if isinstance(owner, dict) else {"pid": None, "host": None, "started": None}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class RunLock:
    """An exclusive OS-level lock on <run>/.run.lock for as long as a trainer writes the run (see live_owner)."""

    def __init__(self, run_dir: Path, fd: int | None):
        self.run_dir, self.fd = run_dir, fd

    @classmethod
    def acquire(cls, run_dir: str | Path, wait_s: float = 2.0) -> "RunLock":
        """Create run_dir if needed and take its lock; RunBusy (naming the live process) if another holds it.

        Retries for up to wait_s, so that a live_owner() probe (a brief shared lock) never refuses a trainer."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if fcntl is None:
            return cls(run_dir, None)
        fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() >= deadline:
                    owner = live_owner(run_dir) or {"pid": None, "host": None, "started": None}
                    os.close(fd)
                    raise RunBusy(run_dir, owner) from None
                time.sleep(0.05)
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "argv": sys.argv[:8]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode("utf-8"), 0)
        return cls(run_dir, fd)

    def release(self) -> None:
        if self.fd is not None:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            finally:
                os.close(self.fd)
                self.fd = None


def holds_only_the_lock(run_dir: str | Path) -> bool:
    """True if run_dir is missing, empty, or holds nothing but its lock file (a name no run occupies)."""
    run_dir = Path(run_dir)
    return not run_dir.is_dir() or all(p.name == LOCK for p in run_dir.iterdir())
