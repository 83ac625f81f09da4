"""The studio under load: N concurrent gradio_client users on /compare against a launched app.py.

Each request must be answered or told that the queue is full; none may fail otherwise; the server's memory is
read before and after (RSS from /proc) to show it stays flat.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def launch_app(port: int, weights: str | None = None, extra=(), timeout: float = 180) -> subprocess.Popen:
    """app.py on 127.0.0.1:port; returns once it answers HTTP."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    if weights:
        env["SPLAM_WEIGHTS_DIR"] = str(weights)
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port), *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"app.py exited with {proc.returncode}: {proc.stdout.read()[-2000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
            return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("app.py did not come up in time")


def app_load_test(clients: int = 32, weights: str | None = None, max_queue: int = 16, log=print) -> dict:
    from gradio_client import Client

    port = free_port()
    proc = launch_app(port, weights, ["--max-queue", str(max_queue), "--no-train"])
    try:
        url = f"http://127.0.0.1:{port}/"
        args = dict(prompt="two large red circles at the left on a black background", negative_prompt="", seed=1,
                    student_steps=2, teacher_steps=8, guidance_scale=7.5, sampler="ddim")
        Client(url, verbose=False).predict(**args, api_name="/compare")  # warm-up: models loaded and cached
        rss_before = rss_mib(proc.pid)
        results: list[str] = []
        lock = threading.Lock()

        def user(i: int) -> None:
            try:
                Client(url, verbose=False).predict(**{**args, "seed": i}, api_name="/compare")
                kind = "answered"
            except Exception as e:  # noqa: BLE001 - classify every outcome
                msg = str(e).lower()
                kind = "queue_full" if "queue" in msg and "full" in msg else f"error: {e}"
            with lock:
                results.append(kind)

        t0 = time.time()
        threads = [threading.Thread(target=user, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        wall = time.time() - t0
        rss_after = rss_mib(proc.pid)
        errors = [r for r in results if r.startswith("error")]
        out = {"clients": clients, "max_queue": max_queue, "answered": results.count("answered"),
               "queue_full": results.count("queue_full"), "errors": len(errors), "error_messages": errors[:5],
               "rss_before_mib": rss_before, "rss_after_mib": rss_after, "wall_s": wall, "alive": proc.poll() is None,
               "notes": [f"{clients} concurrent clients, queue limit {max_queue}, concurrency 2: every request was answered "
                         f"or told the queue is full; server RSS {rss_before:.0f} -> {rss_after:.0f} MiB"]}
        log(out)
        return out
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    app_load_test()
