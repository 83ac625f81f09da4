"""A training run as files: its name rule, default name, the weights root, training_config.json and stats.jsonl.

One owner for each; the trainer writes these, the model loader, the studio and the tools read them.
weights/<run>/training_config.json  the resolved TrainConfig (plus what the run derived: resolution, ...)
weights/<run>/stats.jsonl           one JSON object per line: a start line, one per optimiser step, a done line
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path

WEIGHTS_ENV = "SPLAM_WEIGHTS_DIR"
CHECKOUT = Path(__file__).resolve().parents[2]  # the folder holding splam_studio/
TRAINING_CONFIG = "training_config.json"
STATS = "stats.jsonl"
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # a plain folder name: no separators, no leading dot


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
    return isinstance(name, str) and bool(RUN_NAME.match(name)) and name not in (".", "..")


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

    def step(self, step: int, loss: float) -> None:
        elapsed = max(time.time() - self.t0, 1e-9)
        it_s = (step - self.start) / elapsed
        eta = (self.total - step) / it_s if it_s > 0 else None
        self.write({"step": step, "loss": loss if math.isfinite(loss) else None, "it_s": round(it_s, 4),
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
