"""One launcher for the tests that start the studio: app.py in a subprocess on a free port, ready once it answers HTTP.

A busy machine can take minutes to import torch and gradio and warm the models up, so the tests wait on readiness,
not on a fixed time: the app's root URL is polled while its process lives, up to SPLAM_TEST_APP_READY_S seconds
(default 600). A process that exits fails at once. Every failure names what was awaited and shows the app's log (its
stdout and stderr, unbuffered, in a file next to the test's other temporary files).

`poll_until` is the same wait for any subprocess (the trainer subprocesses in tests/test_faults.py use it).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
READY_ENV = "SPLAM_TEST_APP_READY_S"
READY_DEFAULT_S = 600.0
LOG_TAIL_CHARS = 3000


def ready_s() -> float:
    """The readiness deadline in seconds, from SPLAM_TEST_APP_READY_S (a positive number) or the default."""
    raw = os.environ.get(READY_ENV, "").strip()
    if not raw:
        return READY_DEFAULT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"{READY_ENV} must be a positive number of seconds, got {raw!r}")
    return value


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: Path | None) -> str:
    if path is None or not Path(path).is_file():
        return "(no log file)"
    text = Path(path).read_text(errors="replace")
    return text[-LOG_TAIL_CHARS:] if text.strip() else "(the log is empty)"


def poll_until(ready: Callable[[], bool], proc: subprocess.Popen, what: str, timeout_s: float,
               log: Path | None = None, step_s: float = 0.1) -> None:
    """Return once ready() holds; AssertionError (with the log's tail) if proc exits first or timeout_s passes."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        code = proc.poll()
        if code is not None:
            raise AssertionError(f"the process exited with {code} before {what}; its log:\n{log_tail(log)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}; its log:\n{log_tail(log)}")
        time.sleep(step_s)


def answers(url: str, timeout_s: float = 10.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return r.status == 200
    except OSError:  # refused, reset or slow: not ready yet
        return False


def app_env(weights: Path, **extra: str) -> dict:
    return {**os.environ, "SPLAM_WEIGHTS_DIR": str(weights), "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
            "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def launch_app(weights: Path, log_path: Path, *extra: str, env: dict | None = None,
               timeout_s: float | None = None) -> tuple[subprocess.Popen, str]:
    """app.py on a free port with `extra` flags; (process, url) once it answers. The process is killed on failure."""
    port = free_port()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, str(REPO / "app.py"), "--port", str(port), *extra], cwd=str(REPO),
                                env=env or app_env(weights), stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        poll_until(lambda: answers(url), proc, f"app.py {' '.join(extra)} to answer on {url}".replace("  ", " "),
                   ready_s() if timeout_s is None else timeout_s, log_path, step_s=0.5)
    except BaseException:
        stop_app(proc)
        raise
    return proc, url


def stop_app(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
