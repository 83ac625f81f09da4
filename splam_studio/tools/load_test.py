"""The studio under load: N concurrent gradio_client users on /compare against a launched studio (`python -m splam_studio.studio`).

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

ROOT = Path(__file__).resolve().parents[2]


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
    """The studio on 127.0.0.1:port; returns once it answers HTTP."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    if weights:
        env["SPLAM_WEIGHTS_DIR"] = str(weights)
    proc = subprocess.Popen([sys.executable, "-m", "splam_studio.studio", "--port", str(port), *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the studio exited with {proc.returncode}: {proc.stdout.read()[-2000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
            return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the studio did not come up in time")


BAD_INPUTS = {
    "empty prompt": dict(prompt=""),
    "10,000-character prompt": dict(prompt="red " * 2500),
    "steps out of range": dict(student_steps=99, teacher_steps=100000),
    "negative seed": dict(seed=-5),
    "guidance out of range": dict(guidance_scale=1e9),
    "unknown sampler": dict(sampler="../../etc/passwd"),
    "path traversal in the negative prompt": dict(negative_prompt="../../../../etc/passwd"),
    "unknown model name": dict(splam="no-such-run"),
    "path traversal as a model name": dict(teacher="../../../../etc"),
}


def bad_input_round(url: str, good: dict) -> dict:
    """Each bad input once: a gr.Error with a message is a rejection; an answer means the value was clamped."""
    from gradio_client import Client

    client, rows = Client(url, verbose=False), {}
    for name, patch in BAD_INPUTS.items():
        try:
            client.predict(**{**good, **patch}, api_name="/compare")
            rows[name] = "accepted"
        except Exception as e:  # noqa: BLE001 - classify every outcome
            msg = str(e)
            rows[name] = f"rejected: {msg[:160]}" if msg.strip() and "Traceback" not in msg else f"error: {msg[:160]}"
    return {"requests": len(rows), "rows": rows,
            "rejected_with_message": sum(v.startswith("rejected") for v in rows.values()),
            "accepted": sum(v == "accepted" for v in rows.values()),
            "other_errors": sum(v.startswith("error") for v in rows.values())}


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

        rss_trace: list[float] = []
        done = threading.Event()

        def watch_memory() -> None:
            while not done.is_set():
                rss_trace.append(rss_mib(proc.pid))
                done.wait(0.5)

        t0 = time.time()
        watcher = threading.Thread(target=watch_memory, daemon=True)
        watcher.start()
        threads = [threading.Thread(target=user, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        wall = time.time() - t0
        done.set()
        watcher.join()
        rss_after = rss_mib(proc.pid)
        bad = bad_input_round(url, args)
        errors = [r for r in results if r.startswith("error")]
        answered, queue_full = results.count("answered"), results.count("queue_full")
        alive = proc.poll() is None
        ok = not errors and answered + queue_full == clients and alive
        out = {"clients": clients, "max_queue": max_queue, "answered": answered, "queue_full": queue_full,
               "errors": len(errors), "error_messages": errors[:5], "unfinished": clients - len(results),
               "rss_before_mib": rss_before, "rss_peak_mib": max(rss_trace, default=rss_after),
               "rss_after_mib": rss_after, "wall_s": wall, "alive": alive, "bad_input": bad,
               "notes": [f"{clients} concurrent clients, queue limit {max_queue}: {answered} answered, {queue_full} told "
                         f"the queue is full, {len(errors)} errors, {clients - len(results)} unfinished "
                         f"({'as required' if ok else 'REQUIREMENT MISSED'}); server RSS {rss_before:.0f} MiB before, "
                         f"{max(rss_trace, default=rss_after):.0f} peak, {rss_after:.0f} after",
                         f"bad input: {bad['rejected_with_message']} of {bad['requests']} bad requests rejected with a "
                         f"message, {bad['accepted']} accepted (clamped), {bad['other_errors']} other errors; "
                         f"server alive afterwards: {'yes' if proc.poll() is None else 'NO'}"]}
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
