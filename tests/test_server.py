"""The studio as a public server (issue 29): hub ids only as hub ids, runs owned by the browser session that started
them, quotas and limits, per-model loading locks, trainer children that outlive no studio, the Host check, and
messages without server paths.

Trainer tests run a fake `splam_studio.training` (a package folder first on the child's PYTHONPATH) that writes a
run folder, a stats line per 0.1 s step and a worker process in its group, so they take seconds. The live-server tests
start app.py once on 0.0.0.0 (reached on 127.0.0.1) and send real requests, the Train tab's through Gradio's queue
protocol with two session ids, as two browsers would.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from splam_studio.models import loading as L
from splam_studio.studio import logic as studio_module
from splam_studio.studio.app import ServeLimits, allowed_hosts, shared_server
from splam_studio.studio.launcher import LIVE, LOGS, Trainer, process_alive
from splam_studio.studio.logic import Studio, StudioError
from splam_studio.tools.server_attacks import fn_index, queue_call
from tests.live import REPO, launch_app, stop_app
from tests.test_app import PROMPT, make_fake_weights

FAKE_TRAINER = r'''
import json, os, signal, subprocess, sys, time
args = sys.argv[1:]
opt = lambda name: args[args.index(name) + 1]
run = os.path.join(opt("--output-dir"), opt("--run-name"))
os.makedirs(run, exist_ok=True)
with open(os.path.join(run, "child.json"), "w") as f:
    json.dump({"cwd": os.getcwd(), "sigint": signal.getsignal(signal.SIGINT) is signal.default_int_handler,
               "teacher": opt("--teacher")}, f)
worker = subprocess.Popen(["sleep", "600"])  # a data-loader worker: in the trainer's process group
with open(os.path.join(run, "worker.pid"), "w") as f:
    f.write(str(worker.pid))
chunk = int(os.environ.get("FAKE_TRAIN_BYTES", "0"))
with open(os.path.join(run, "stats.jsonl"), "a") as f:
    f.write(json.dumps({"event": "start", "step": 0, "max_steps": int(opt("--max-steps"))}) + "\n")
try:
    for step in range(1, int(opt("--max-steps")) + 1):
        with open(os.path.join(run, "blob"), "ab") as b:
            b.write(b"x" * chunk)
        with open(os.path.join(run, "stats.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, "loss": 1.0 / step, "it_s": 10.0, "eta_s": 1.0}) + "\n")
        print(f"step {step}: student in {run}", flush=True)
        time.sleep(0.1)
except KeyboardInterrupt:
    print("interrupted", flush=True)
    sys.exit(130)
'''


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return make_fake_weights(tmp_path_factory.mktemp("server") / "weights")


@pytest.fixture
def fake_root(tmp_path) -> Path:
    root = tmp_path / "fake-package"
    (root / "splam_studio" / "training").mkdir(parents=True)
    (root / "splam_studio" / "__init__.py").write_text("")
    (root / "splam_studio" / "training" / "__init__.py").write_text("")
    (root / "splam_studio" / "training" / "__main__.py").write_text(FAKE_TRAINER)
    return root


def _wait(cond, timeout: float = 20.0, step: float = 0.1) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(step)
    return cond()


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").is_file() and Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"


def _child(weights: Path, name: str) -> dict:
    path = weights / name / "child.json"
    assert _wait(path.is_file), f"the fake trainer never started: {(weights / LOGS / (name + '.log')).read_text()}"
    return json.loads(path.read_text())


def _worker(weights: Path, name: str) -> int:
    path = weights / name / "worker.pid"
    assert _wait(lambda: path.is_file() and path.read_text().strip())
    return int(path.read_text())


# ---- item 1 and issue 26.4: a hub id is a hub id -----------------------------------------------------------------
def test_hub_id_never_loads_a_folder_of_that_name(weights, tmp_path, monkeypatch):
    """`private/secret-teacher` exists beside the working directory; with the hub 'reachable' it must not be read."""
    shutil.copytree(weights / "shapes-teacher", tmp_path / "private" / "secret-teacher")
    shutil.copytree(weights / "shapes-splam", tmp_path / "private" / "secret-student")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(studio_module, "hub_reachable", lambda timeout=1.0: True)
    s = Studio(weights, warm_up=False)
    assert s.resolve("private/secret-teacher", "teacher") == ("hub", "private/secret-teacher")
    with pytest.raises(StudioError, match="cannot load hub model 'private/secret-teacher'") as e:
        s.compare(PROMPT, teacher="private/secret-teacher", repeats=1)
    assert str(tmp_path) not in str(e.value)
    with pytest.raises(StudioError, match="private/secret-student"):
        s.compare(PROMPT, splam="private/secret-student", teacher_steps=1, student_steps=1, repeats=1)
    pipe = s.teacher("shapes-teacher")
    with pytest.raises(L.ModelLoadError):
        L.load_hub_student("private/secret-student", pipe, "unet")
    with pytest.raises(L.ModelLoadError, match="not in the local cache"):
        L.load_hub_teacher("private/secret-teacher")


@pytest.mark.parametrize("name", ["owner/" + "n" * 300, "owner/" + "n" * 97, "a--b/c", "owner/name.git", "-x/y"])
def test_hub_ids_checked_by_huggingface_hub_rules(studio_no_warmup, name):
    with pytest.raises(StudioError, match=r"^unknown teacher") as e:
        studio_no_warmup.compare(PROMPT, teacher=name)
    assert "Errno" not in str(e.value) and "OSError" not in str(e.value) and str(e.value).count("\n") == 0
    assert not L.is_hub_id(name)
    with pytest.raises(L.ModelLoadError, match="invalid hub id|does not exist"):
        L.load_teacher(name)
    assert L.is_hub_id("alimama-creative/slam-sd1.5") and L.is_hub_id("owner/" + "n" * 96)


@pytest.fixture(scope="module")
def studio_no_warmup(weights) -> Studio:
    return Studio(weights, warm_up=False)


# ---- item 5: a model load blocks only the requests that need that model ------------------------------------------
def test_a_slow_load_blocks_only_its_own_model(weights, monkeypatch):
    shutil.copytree(weights / "shapes-splam", weights / "slow-splam", dirs_exist_ok=True)
    try:
        s = Studio(weights, warm_up=False)
        s.student("shapes-lcm", role="lcm")  # cached before the slow load starts
        real, calls = studio_module.load_student, []

        def slow_load(source, pipe, **kw):
            calls.append(Path(source).name)
            if Path(source).name == "slow-splam":
                time.sleep(3.0)
            return real(source, pipe, **kw)

        monkeypatch.setattr(studio_module, "load_student", slow_load)
        threads = [threading.Thread(target=s.student, args=("slow-splam",)) for _ in range(2)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        t0 = time.perf_counter()
        s.student("shapes-lcm", role="lcm")  # cached: no wait
        cached_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        s.student("shapes-splam")  # another model, not yet loaded: loads beside the slow one
        other_s = time.perf_counter() - t0
        slow_running = any(t.is_alive() for t in threads)
        for t in threads:
            t.join()
        assert slow_running, "the slow load ended before the other requests were measured"
        assert cached_s < 0.5 and other_s < 2.5, (cached_s, other_s)
        assert calls.count("slow-splam") == 1  # two requests for the same model: one load
    finally:
        shutil.rmtree(weights / "slow-splam")


# ---- item 8: small breaks ---------------------------------------------------------------------------------------
def test_huge_seed_is_one_clear_error(studio_no_warmup):
    with pytest.raises(StudioError, match="seed must be a finite number, got a number of 401 digits"):
        studio_no_warmup.compare(PROMPT, seed=10**400)


def test_damaged_training_configs_do_not_stop_the_studio(weights, caplog):
    for name, text in (("null-run", "null"), ("list-run", "[1, 2]"), ("bytes-run", '{"method": "lcm\xff"}')):
        shutil.copytree(weights / "shapes-lcm", weights / name)
        (weights / name / "training_config.json").write_bytes(text.encode("latin-1"))
    try:
        with caplog.at_level(logging.WARNING):
            s = Studio(weights, warm_up=False)
            menus = [s.menu(r) for r in ("teacher", "splam", "lcm")]
        assert "skipping run 'null-run'" in caplog.text and "skipping run 'list-run'" in caplog.text
        names = {n for menu in menus for _, n in menu}
        assert "null-run" not in names and "list-run" not in names and "shapes-lcm" in names
        assert s.baked_guidance("null-run") is None and s.sampling_guidance("list-run", "lcm") == 1.0
    finally:
        for name in ("null-run", "list-run", "bytes-run"):
            shutil.rmtree(weights / name)


def test_messages_name_no_server_path(weights, tmp_path):
    (weights / "broken" / "unet").mkdir(parents=True)
    try:
        s = Studio(weights, warm_up=False)
        with pytest.raises(StudioError) as e:
            s.compare(PROMPT, splam="broken", repeats=1)
        assert "weights/broken" in str(e.value) and str(weights) not in str(e.value), str(e.value)
    finally:
        shutil.rmtree(weights / "broken")
    empty = Studio(tmp_path / "empty", warm_up=False)
    assert "under `weights/`" in empty.models_status() and str(tmp_path) not in empty.models_status()
    from huggingface_hub import constants

    assert str(constants.HF_HUB_CACHE) not in s.public(f"no file in {constants.HF_HUB_CACHE}/models--a--b")
    assert s.public(f"done: student in {weights}/my-run") == "done: student in weights/my-run"


def test_damaged_stats_line_keeps_the_train_tab(tmp_path, fake_root):
    t = Trainer(tmp_path / "weights", {}, package_root=fake_root)
    t.start("T", "shapes", "splam", 3, "bad-bytes", 2)
    assert _wait(lambda: not t.running())
    stats = tmp_path / "weights" / "bad-bytes" / "stats.jsonl"
    with open(stats, "ab") as f:
        f.write(b'{"step": 4, "loss": "\xff\xfe"}\n[1, 2]\n"text"\n{"step": "5", "loss": 0.1}\n\xff\n')
    st = t.status()
    assert st.state == "done" and st.losses == [(1, 1.0), (2, 0.5), (3, 1 / 3)], st


# ---- items 3 and 6: runs owned by a session, in their own process group, recorded while live ----------------------
def test_child_has_default_sigint_own_group_and_an_empty_cwd(tmp_path, fake_root):
    weights = tmp_path / "weights"
    t = Trainer(weights, {}, package_root=fake_root)
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as `nohup studio &` leaves it; the child must not inherit it
    try:
        t.start("private/secret-teacher", "shapes", "splam", 10_000, "sig-run", 2)
    finally:
        signal.signal(signal.SIGINT, old)
    child, pid = _child(weights, "sig-run"), t.proc.pid
    worker = _worker(weights, "sig-run")
    assert child["sigint"], "the trainer inherited an ignored SIGINT"
    assert os.getpgid(pid) == pid and os.getpgid(worker) == pid  # its own group, the worker in it
    assert Path(child["cwd"]) == (weights / LOGS).resolve() and not [p for p in (weights / LOGS).iterdir() if p.is_dir()]
    record = json.loads((weights / LOGS / f"sig-run{LIVE}").read_text())
    assert record["pid"] == pid and record["run_name"] == "sig-run"
    t0 = time.time()
    assert t.stop(grace_s=60).startswith("Stopping")
    assert _wait(lambda: not t.running(), 15) and time.time() - t0 < 15  # SIGINT worked: no SIGKILL after 60 s
    assert t.proc.returncode == 130 and "interrupted" in t.status().log_tail
    assert _wait(lambda: _pid_gone(worker), 5), "the worker outlived its trainer"
    assert _wait(lambda: not (weights / LOGS / f"sig-run{LIVE}").exists(), 5)


def test_runs_belong_to_the_session_that_started_them(tmp_path, fake_root):
    weights = tmp_path / "weights"
    t = Trainer(weights, {}, package_root=fake_root, shared=True)
    assert t.status("A").state == "idle"
    t.start("T", "shapes", "splam", 10_000, "a-run", 2, owner="A")
    _child(weights, "a-run")
    assert _wait(lambda: "student in" in t.status("A").log_tail)
    a = t.status("A")
    assert a.state == "running" and a.run_name == "a-run"
    assert "student in weights/a-run" in a.log_tail and str(weights) not in a.log_tail  # run names, no server path
    b = t.status("B")
    assert b.state == "busy" and b.run_name is None and b.log_tail == "" and not b.losses and not b.validation
    assert t.stop(owner="B") == "No run of yours is going." and t.running("A")
    with pytest.raises(StudioError, match="another visitor's run is going"):
        t.start("T", "shapes", "splam", 5, "b-run", 2, owner="B")
    with pytest.raises(StudioError, match="'a-run' is still going"):
        t.start("T", "shapes", "splam", 5, "a-second", 2, owner="A")
    assert t.stop(owner="A").startswith("Stopping `a-run`")
    assert _wait(lambda: not t.running(), 15)
    assert t.status("A").state == "stopped" and t.status("B").state == "idle"  # B never sees A's run


def test_page_runs_share_a_disk_quota(tmp_path, fake_root, monkeypatch):
    monkeypatch.setenv("FAKE_TRAIN_BYTES", str(200_000))  # 2 MB a second
    weights = tmp_path / "weights"
    t = Trainer(weights, {}, package_root=fake_root, quota_mb=1.0)
    t.start("T", "shapes", "splam", 10_000, "big-run", 2)
    assert _wait(lambda: not t.running(), 30), "the quota did not stop the run"
    st = t.status()
    assert st.state == "stopped" and "disk quota" in st.message
    assert (weights / "big-run" / "blob").stat().st_size < 8 * 2**20  # stopped within seconds of the limit
    with pytest.raises(StudioError, match=r"already use \d+ MB of their 1 MB disk quota"):
        t.start("T", "shapes", "splam", 5, "next-run", 2)


_STUDIO_SCRIPT = r'''
import signal, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from splam_studio.studio.app import end_children_on_exit
from splam_studio.studio.launcher import Trainer
signal.signal(signal.SIGINT, signal.SIG_IGN)  # started as `nohup ... &` from a script
t = Trainer(Path(sys.argv[2]), {}, package_root=Path(sys.argv[3]))
t.start("T", "shapes", "splam", 100000, "orphan", 2)
end_children_on_exit(t)
print(t.proc.pid, flush=True)
time.sleep(600)
'''


def _studio_process(weights: Path, fake_root: Path) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-c", _STUDIO_SCRIPT, str(REPO), str(weights), str(fake_root)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.strip().isdigit(), proc.stderr.read()
    return proc, int(line)


def test_sigterm_of_the_studio_ends_its_trainer(tmp_path, fake_root):
    weights = tmp_path / "weights"
    studio, pid = _studio_process(weights, fake_root)
    worker = _worker(weights, "orphan")
    studio.send_signal(signal.SIGTERM)
    studio.wait(30)
    assert _wait(lambda: _pid_gone(pid) and _pid_gone(worker), 15), "the trainer outlived the studio"
    assert not (weights / LOGS / f"orphan{LIVE}").exists()


def test_restarted_studio_shows_and_stops_a_live_orphan(tmp_path, fake_root):
    weights = tmp_path / "weights"
    studio, pid = _studio_process(weights, fake_root)
    worker = _worker(weights, "orphan")
    studio.kill()  # kill -9: no handler runs, the trainer lives on
    studio.wait(10)
    time.sleep(0.5)
    assert not _pid_gone(pid)
    try:
        again = Trainer(weights, {}, package_root=fake_root)  # the restarted studio reads the live-run record
        assert again.running()
        st = again.status()
        assert st.state == "running" and st.run_name == "orphan" and "earlier studio" in st.message
        with pytest.raises(StudioError, match="'orphan' is still going"):
            again.start("T", "shapes", "splam", 5, "beside", 2)
        assert again.stop(grace_s=30).startswith("Stopping `orphan`")
        assert _wait(lambda: _pid_gone(pid) and _pid_gone(worker), 15), "Stop did not reach the orphan"
        assert not again.running() and again.status().state == "stopped"
        assert _wait(lambda: not (weights / LOGS / f"orphan{LIVE}").exists(), 5)
    finally:
        for p in (pid, worker):
            if not _pid_gone(p):
                os.kill(p, signal.SIGKILL)


def test_a_stale_record_is_dropped(tmp_path):
    logs = tmp_path / "weights" / LOGS
    logs.mkdir(parents=True)
    (logs / "gone.log").write_text("step 1\n")
    (logs / f"gone{LIVE}").write_text(json.dumps({"pid": os.getpid(), "created": 1.0, "run_name": "gone"}))
    (logs / f"junk{LIVE}").write_text("null")
    assert not process_alive(os.getpid(), 1.0)  # our pid, another start time: a reused pid is not the run
    t = Trainer(tmp_path / "weights", {})
    assert not t.running() and t.status().state == "ended" and not list(logs.glob(f"*{LIVE}"))


# ---- items 4 and 7: limits and the Host check, in one place --------------------------------------------------------
def test_serving_policy(monkeypatch):
    from splam_studio.studio.app import SHARED_QUOTA_MB, page_training, parse_args

    monkeypatch.delenv("SPACE_ID", raising=False)
    assert shared_server("0.0.0.0", False) and shared_server("127.0.0.1", True) and not shared_server("127.0.0.1", False)
    assert page_training(parse_args([])) == (True, None)  # this machine only: train, no quota
    assert page_training(parse_args(["--host", "0.0.0.0"])) == (False, SHARED_QUOTA_MB)
    assert page_training(parse_args(["--host", "0.0.0.0", "--allow-train", "--train-quota-mb", "300"])) == (True, 300)
    assert page_training(parse_args(["--share", "--allow-train", "--train-quota-mb", "0"])) == (True, None)
    assert page_training(parse_args(["--no-train"]))[0] is False
    monkeypatch.setenv("SPACE_ID", "owner/space")
    assert page_training(parse_args([]))[0] is False and page_training(parse_args(["--allow-train"]))[0] is True
    hosts = allowed_hosts("0.0.0.0", ["studio.example.org", "*.lan"], False)
    limits = ServeLimits(None, hosts=hosts, max_body=10, uploads=False)
    for ok in ("127.0.0.1:7860", "localhost", "[::1]:7860", "studio.example.org", "box.lan:80"):
        assert limits.host_ok(ok), ok
    for bad in ("evil.example", "evil.example:7860", "127.0.0.1.evil.example", "", "lan"):
        assert not limits.host_ok(bad), bad


# ---- the tests' one launcher (tests/live.py): readiness, not a fixed wait; the log shown on failure ---------------
def test_launcher_fails_at_once_with_the_apps_log(tmp_path, monkeypatch):
    monkeypatch.setenv("SPLAM_TEST_APP_READY_S", "120")
    t0 = time.monotonic()
    with pytest.raises(AssertionError, match=r"exited with 2 before app.py --no-such-flag to answer") as e:
        launch_app(tmp_path, tmp_path / "app.log", "--no-such-flag")
    assert "unrecognized arguments: --no-such-flag" in str(e.value)  # the app's own stderr, from its log
    assert time.monotonic() - t0 < 60  # not the 600 s deadline


def test_launcher_waits_on_readiness_up_to_its_deadline(tmp_path, monkeypatch):
    log = tmp_path / "slow.log"
    code = "import sys, time; print('still importing', flush=True); time.sleep(60)"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=fh, stderr=subprocess.STDOUT)
    try:
        from tests.live import poll_until, ready_s

        calls = []
        poll_until(lambda: calls.append(1) or len(calls) > 3, proc, "three polls", 30, log, step_s=0.01)
        monkeypatch.setenv("SPLAM_TEST_APP_READY_S", "0.5")
        assert ready_s() == 0.5
        with pytest.raises(AssertionError, match=r"timed out after 0.5 s waiting for the answer") as e:
            poll_until(lambda: False, proc, "the answer", ready_s(), log)
        assert "still importing" in str(e.value) and proc.poll() is None
        for bad in ("0", "-3", "soon"):
            monkeypatch.setenv("SPLAM_TEST_APP_READY_S", bad)
            with pytest.raises(ValueError, match=f"READY_S must be a positive number of seconds, got '{bad}'"):
                ready_s()
        monkeypatch.delenv("SPLAM_TEST_APP_READY_S")
        assert ready_s() == 600
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def public_app(tmp_path_factory):
    weights = make_fake_weights(tmp_path_factory.mktemp("public") / "weights")
    log = tmp_path_factory.mktemp("public-log") / "app.log"
    proc, url = launch_app(weights, log, "--host", "0.0.0.0", "--allow-train")
    yield proc, url, weights, log
    if proc.poll() is None:
        stop_app(proc)


def _request(url: str, *, method: str = "GET", body=None, headers=None) -> int:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, ConnectionError):  # refused while the body was still being sent
        return -1


def _request_headers(url: str, headers: dict) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60) as r:
            return r.status, dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers)


def _chunks(n: int, size: int = 65536):
    for _ in range(n // size):
        yield b"x" * size


def test_host_header_is_checked(public_app):
    _, url, _, log = public_app
    assert _request(url) == 200, log.read_text()[-2000:]
    assert _request(url, headers={"Host": "evil.example"}) == 400
    code, headers = _request_headers(url + "gradio_api/info", {"Host": "evil.example", "Origin": "http://evil.example"})
    assert code == 400 and "access-control-allow-origin" not in {k.lower() for k in headers}, headers  # not echoed
    assert _request(url, headers={"Host": f"localhost:{url.rsplit(':', 1)[1].strip('/')}"}) == 200


def test_request_and_upload_limits(public_app):
    _, url, _, _ = public_app
    join = url + "gradio_api/queue/join"
    import http.client

    conn = http.client.HTTPConnection(url.split("//")[1].strip("/"), timeout=60)
    conn.putrequest("POST", "/gradio_api/queue/join")  # a declared 3 MB body: refused before a byte of it is read
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(3 * 2**20))
    conn.endheaders()
    assert conn.getresponse().status == 413
    conn.close()
    assert _request(join, method="POST", body=_chunks(3 * 2**20), headers={"Content-Type": "application/json",
                                                                            "Transfer-Encoding": "chunked"}) in (413, -1)
    boundary = "b" + uuid.uuid4().hex
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.bin\"\r\n\r\n").encode() \
        + b"y" * 1000 + f"\r\n--{boundary}--\r\n".encode()
    assert _request(url + "gradio_api/upload", method="POST", body=form,
                    headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}) == 404
    assert _request(url) == 200  # still serving


def _queue_call(url: str, fn_index: int, data: list, session: str) -> list:
    return queue_call(url, fn_index, data, session, join_s=30, result_s=120)


def test_seed_overflow_through_the_api(public_app):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    _, url, _, _ = public_app
    c = Client(url, verbose=False)
    with pytest.raises(AppError, match="seed must be a finite number") as e:
        c.predict(PROMPT, "", 10**400, 1, 1, 7.5, "ddim", "shapes-teacher", "shapes-splam", "shapes-lcm",
                  api_name="/compare")
    assert "OverflowError" not in str(e.value)


def test_train_tab_ownership_then_sigterm_ends_the_run(public_app):
    """Last in the file: it ends the app. Two sessions: B can neither read, stop nor start beside A's run."""
    proc, url, weights, log = public_app
    start, stop, load = fn_index(url, "on_start"), fn_index(url, "on_stop"), fn_index(url, "on_load")
    a, b = uuid.uuid4().hex[:11], uuid.uuid4().hex[:11]
    out = _queue_call(url, start, ["shapes-teacher", "shapes", "splam", 100_000, 2, "owned-run", "", 1], a)
    assert "owned-run" in out[0], out
    record = weights / LOGS / f"owned-run{LIVE}"
    assert _wait(record.is_file)
    pid = json.loads(record.read_text())["pid"]
    seen_by_b = _queue_call(url, load, [], b)
    assert "another visitor" in seen_by_b[0].lower() and "owned-run" not in json.dumps(seen_by_b)
    assert "another visitor" in _queue_call(url, stop, [], b)[0].lower() and not _pid_gone(pid)
    refused = _queue_call(url, start, ["shapes-teacher", "shapes", "splam", 5, 2, "b-run", "", 1], b)
    assert "another visitor's run is going" in refused[-1]  # one notice (train_tab), no error on every output
    assert "owned-run" in _queue_call(url, load, [], a)[0]
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    assert _wait(lambda: _pid_gone(pid), 20), f"the trainer outlived the studio: {log.read_text()[-1500:]}"
    assert not record.exists()
