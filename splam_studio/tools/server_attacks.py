"""Attacks on a live studio served as a public server (issue 29), each with the answer it must get; a Markdown table.

    python -m splam_studio.tools.server_attacks [--weights-dir weights] [--port 0]
        [--json benchmarks/server_attacks.json]

Starts `python -m splam_studio.studio --host 0.0.0.0 --allow-train` on a free port (reached on 127.0.0.1, hub
offline), in a working directory that holds a folder shaped like a hub id (`private/secret-teacher`, a copy of the
teacher) with a Hugging Face cache entry of that name, so the hub check passes and only a loader that reads local
folders could produce images from it. Then: Host headers, request and upload sizes, the file route, model names, a
huge seed, two browser sessions on the Train tab (through Gradio's queue protocol, as the page sends events), a
broken byte in the live run's stats.jsonl, and SIGTERM of the studio with its trainer live.

Prints the table and writes it to --json in the shape that `splam_studio.tools.report` renders into BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODELS = ("shapes-teacher", "shapes-splam", "shapes-lcm")
PROMPT = "one large red circle at the left on a black background"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(url: str, *, method: str = "GET", body=None, headers=None) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, dict(r.headers), r.read(4096)
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read(4096)
    except (ConnectionError, urllib.error.URLError) as e:  # the server closed a refused body early
        return -1, {}, str(e).encode()


def said(code: int) -> str:
    """An HTTP status as the table shows it; -1 is a connection the server closed before the body was sent."""
    return "connection closed mid-body" if code == -1 else str(code)


def chunks(total: int, size: int = 1 << 20):
    for _ in range(total // size):
        yield b"x" * size


def queue_call(url: str, fn_index: int, data: list, session: str, *, join_s: float = 60,
               result_s: float = 300) -> list:
    """One event through Gradio's queue as the page sends it (join, then read the session's event stream);
    RuntimeError(message) when the app refuses it. join_s and result_s: the two requests' timeouts in seconds."""
    body = json.dumps({"data": data, "fn_index": fn_index, "session_hash": session, "event_data": None,
                       "trigger_id": None}).encode()
    req = urllib.request.Request(url + "gradio_api/queue/join", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=join_s) as r:
        r.read()
    with urllib.request.urlopen(url + f"gradio_api/queue/data?session_hash={session}", timeout=result_s) as r:
        for raw in r:
            line = raw.decode("utf-8", "replace").strip()
            if line.startswith("data:"):
                msg = json.loads(line[5:])
                if msg.get("msg") == "process_completed":
                    out = msg.get("output", {})
                    if not msg.get("success", True) or "error" in out:
                        raise RuntimeError(str(out.get("error")))
                    return out["data"]
    raise RuntimeError("no result")


def fn_index(url: str, name: str) -> int:
    with urllib.request.urlopen(url + "config", timeout=30) as r:
        config = json.loads(r.read())
    return next(d["id"] for d in config["dependencies"] if d.get("api_name") == name)


def rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def gone(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def prepare(weights: Path, work: Path) -> dict:
    """The server's working directory (with the hub-shaped folder) and a Hugging Face cache naming it."""
    cwd = work / "cwd"
    shutil.copytree(weights / "shapes-teacher", cwd / "private" / "secret-teacher")
    cache = work / "hf" / "hub"
    snap = cache / "models--private--secret-teacher" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (snap / "README.md").write_text("a cached repo with no model in it\n")
    (cache / "models--private--secret-teacher" / "refs").mkdir()
    (cache / "models--private--secret-teacher" / "refs" / "main").write_text("0" * 40)
    run_weights = work / "weights"
    run_weights.mkdir()
    for name in MODELS:
        os.symlink((weights / name).resolve(), run_weights / name)
    return {"cwd": cwd, "cache": cache, "weights": run_weights}


def launch(port: int, where: dict, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1",
           "HF_HUB_CACHE": str(where["cache"]), "SPLAM_WEIGHTS_DIR": str(where["weights"])}
    proc = subprocess.Popen([sys.executable, "-m", "splam_studio.studio", "--host", "0.0.0.0", "--port", str(port),
                             "--allow-train"], cwd=str(where["cwd"]), env=env, stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the studio exited with {proc.returncode}: {log.read_text()[-2000:]}")
        if request(f"http://127.0.0.1:{port}/")[0] == 200:
            return proc
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"the studio did not come up: {log.read_text()[-2000:]}")


def attacks(url: str, proc: subprocess.Popen, where: dict) -> list[tuple[str, str, str, bool]]:
    """(attack, must get, got, held) for each attack, in order; the last one ends the server."""
    from gradio_client import Client

    rows = []

    def row(attack, expect, got, held):
        rows.append((attack, expect, got, bool(held)))
        print(f"{'held' if held else 'BROKE'}: {attack}: {got}", file=sys.stderr)

    port = url.rsplit(":", 1)[1].strip("/")
    code, headers, _ = request(url, headers={"Host": "evil.example", "Origin": "http://evil.example"})
    echoed = headers.get("access-control-allow-origin") or headers.get("Access-Control-Allow-Origin")
    row("`Host: evil.example` (DNS rebinding)", "400, origin not echoed", f"{code}, echoed: {echoed or 'no'}",
        code == 400 and not echoed)
    code = request(url, headers={"Host": f"localhost:{port}"})[0]
    row("`Host: localhost` (this machine)", "200", str(code), code == 200)

    before = rss_mb(proc.pid)
    code = request(url + "gradio_api/queue/join", method="POST", body=chunks(150 << 20),
                   headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"})[0]
    grew = rss_mb(proc.pid) - before
    row("150 MB request body (chunked)", "413, memory flat", f"{said(code)}, RSS {grew:+.0f} MB",
        code in (413, -1) and grew < 50)
    code = request(url + "gradio_api/queue/join", method="POST", body=b"{}", headers={
        "Content-Type": "application/json", "Content-Length": str(150 << 20)})[0]
    row("declared 150 MB Content-Length", "413", said(code), code in (413, -1))
    boundary = "b" + uuid.uuid4().hex
    head = f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"x.bin\"\r\n\r\n".encode()
    body = head + b"y" * (100 << 20) + f"\r\n--{boundary}--\r\n".encode()
    code = request(url + "gradio_api/upload", method="POST", body=body,
                   headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})[0]
    row("100 MB upload to /gradio_api/upload (no file input)", "refused (404/413)", said(code), code in (404, 413, -1))
    small = head + b"y" * 1000 + f"\r\n--{boundary}--\r\n".encode()
    code = request(url + "gradio_api/upload", method="POST", body=small,
                   headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})[0]
    row("1 kB upload to /gradio_api/upload", "404 (route closed)", str(code), code == 404)
    code, _, text = request(url + "gradio_api/file=/etc/passwd")
    row("`/gradio_api/file=/etc/passwd`", "refused", str(code), code in (400, 403, 404) and b"root:" not in text)

    c = Client(url, verbose=False)

    def compare(*models, seed=0):
        try:
            c.predict(PROMPT, "", seed, 1, 1, 7.5, "ddim", *models, api_name="/compare")
            return "images"
        except Exception as e:  # noqa: BLE001 - the refusal is the result
            return str(e).splitlines()[0] if str(e) else type(e).__name__

    got = compare("private/secret-teacher", *MODELS[1:])
    row("teacher `private/secret-teacher` (a folder beside the server, and cached)", "refused as a hub model",
        got[:110], got != "images" and "hub model" in got)
    got = compare("owner/" + "n" * 300, *MODELS[1:])
    row("300-character hub id", "one sentence: unknown teacher", got[:90],
        got.startswith("unknown teacher") and "Errno" not in got)
    got = compare("../../etc/passwd", *MODELS[1:])
    row("teacher `../../etc/passwd`", "unknown teacher", got[:90], got.startswith("unknown teacher"))
    got = compare(*MODELS, seed=10**400)
    row("seed 10**400", "one clear sentence", got[:90], "seed must be a finite number" in got)
    got = compare(MODELS[0], "shapes-splam/../shapes-teacher", MODELS[2])
    paths = [str(where["weights"]), str(where["cwd"]), str(ROOT), str(where["cache"])]
    row("student `shapes-splam/../shapes-teacher`", "refused, no server path", got[:90],
        got != "images" and not any(p in got for p in paths))

    start, stop, load = fn_index(url, "on_start"), fn_index(url, "on_stop"), fn_index(url, "on_load")
    a, b = uuid.uuid4().hex[:11], uuid.uuid4().hex[:11]
    got = queue_call(url, start, [MODELS[0], "shapes", "splam", 100_000, 8, "attack-run"], a)[0]
    row("visitor A starts a run", "started", got[:60], "Started" in got or "attack-run" in got)
    seen = json.dumps(queue_call(url, load, [], b))
    row("visitor B reads the Train tab", "nothing of A's run", "run name shown" if "attack-run" in seen else
        "busy, no name or log", "attack-run" not in seen)
    got = queue_call(url, stop, [], b)[0]
    record = where["weights"] / ".studio-logs" / "attack-run.live.json"
    pid = json.loads(record.read_text())["pid"] if record.is_file() else None
    time.sleep(1)
    row("visitor B presses Stop", "A's run goes on", f"{got[:50]}; run alive: {pid is not None and not gone(pid)}",
        pid is not None and not gone(pid))
    try:
        got = queue_call(url, start, [MODELS[0], "shapes", "splam", 5, 8, "attack-b"], b)[0]
    except RuntimeError as e:
        got = str(e)
    row("visitor B starts a second run", "refused", got[:70], "another visitor" in got)
    try:
        got = queue_call(url, start, [MODELS[0], "shapes", "splam", 5, 8, "attack-a2"], a)[0]
    except RuntimeError as e:
        got = str(e)
    row("visitor A starts a second run", "refused (one per visitor)", got[:70], "still going" in got)
    run = where["weights"] / "attack-run"
    deadline = time.time() + 120
    while not (run / "stats.jsonl").is_file() and time.time() < deadline:
        time.sleep(1)
    with open(run / "stats.jsonl", "ab") as f:
        f.write(b'{"step": 1, "loss": "\xff"}\n\xfe\xff\n')
    try:
        got = queue_call(url, load, [], a)[0]
        ok = "attack-run" in got
    except RuntimeError as e:
        got, ok = str(e), False
    row("a non-UTF-8 byte in the live run's stats.jsonl", "the Train tab still shows the run", got[:60], ok)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
    deadline = time.time() + 30
    while pid is not None and not gone(pid) and time.time() < deadline:
        time.sleep(0.5)
    row("SIGTERM to the studio with A's run live", "the trainer ends with it, record removed",
        f"trainer ended: {pid is not None and gone(pid)}, record left: {record.exists()}",
        pid is not None and gone(pid) and not record.exists())
    return rows


COLUMNS = ["attack", "must get", "got", "held"]


def results(rows, seconds: float) -> dict:
    """The attacks as a BENCHMARKS.md section (report.generic_section's shape): one table and a count."""
    held = sum(r[3] for r in rows)
    return {"description": "`python -m splam_studio.tools.server_attacks`: the studio served as a public server "
                           "(`--host 0.0.0.0 --allow-train`, hub offline, reached on 127.0.0.1), attacked with real "
                           "requests; each row is one attack, the answer it must get and the one it got.",
            "tables": [{"title": "attacks on a live public studio", "columns": COLUMNS,
                        "rows": [[attack, expect, got, "yes" if ok else "NO"] for attack, expect, got, ok in rows]}],
            "notes": [f"{held} of {len(rows)} attacks held; the run took {seconds:.0f} s"]}


def table(rows) -> str:
    lines = ["| attack | must get | got | held |", "|---|---|---|---|"]
    for attack, expect, got, held in rows:
        got = got.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {attack} | {expect} | {got} | {'yes' if held else '**no**'} |")
    held = sum(r[3] for r in rows)
    lines.append(f"\n{held} of {len(rows)} held.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights-dir", default=str(ROOT / "weights"), help="holds shapes-teacher / -splam / -lcm")
    p.add_argument("--port", type=int, default=0, help="0: a free port")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "server_attacks.json"),
                   help="where the results go, for `python -m splam_studio.tools.report`")
    args = p.parse_args(argv)
    weights = Path(args.weights_dir)
    missing = [name for name in MODELS if not (weights / name).is_dir()]
    if missing:
        print(f"error: {weights} has no {', '.join(missing)}", file=sys.stderr)
        return 2
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="server-attacks-") as tmp:
        where = prepare(weights, Path(tmp))
        port = args.port or free_port()
        log = Path(tmp) / "studio.log"
        proc = launch(port, where, log)
        try:
            rows = attacks(f"http://127.0.0.1:{port}/", proc, where)
        finally:
            if proc.poll() is None:
                proc.kill()
    print(table(rows))
    from splam_studio.store.atomic import write_json

    print(f"wrote {write_json(args.json, results(rows, time.time() - t0))}", file=sys.stderr)
    return 0 if all(r[3] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
