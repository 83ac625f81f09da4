"""Faults that must never destroy or trust bad state: a second trainer on a live run, a full or read-only disk,
damaged checkpoints, an interrupted --overwrite, and --resume flags that would change the run.

Fast parts run the trainer in-process (`loop.run`) on the tiny teacher. The race and the signals use a real
train_cli.py subprocess for the trainer that is raced or signalled from outside; the trainers that must be refused,
the resume that a message prints and the runs stopped at a known step run train_cli's main() in the test's own process
(another process than the live trainer's, as the lock needs, without a second interpreter's start-up). The disk-full
case runs on a real small tmpfs where `mount` works (root), and also with ENOSPC injected at the write everywhere."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from splam_studio.store import runs
from splam_studio.store.atomic import WriteError
from splam_studio.training import checkpoints as ck
from splam_studio.training import loop
from splam_studio.training.loop import TrainConfig, TrainError
from tests import test_train
from tests.live import poll_until

world = test_train.world  # the tiny teacher and 12-image folder (module fixture)
ROOT = test_train.ROOT


def _cfg(world, out, **kw) -> TrainConfig:
    base = dict(teacher=str(world / "teacher"), data=str(world / "data"), output_dir=str(out), batch_size=2,
                checkpoint_every=1, log_every=1, device="cpu", seed=3, max_steps=2, run_name="r")
    return TrainConfig(**{**base, **kw})


def _run(cfg):
    lines = []
    loop.run(cfg, log=lines.append)
    return "\n".join(lines)


def _fake_run(path, method="lcm"):
    path.mkdir(parents=True)
    (path / "training_config.json").write_text(json.dumps({"method": method}))
    (path / "keep.txt").write_text("the user's")


def _tmp_left(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if ".tmp" in p.name)


# ---------------------------------------------------------------- the run lock

def test_run_name_rule_refuses_a_trailing_newline():
    assert runs.valid_run_name("a-run_1.x") and not runs.valid_run_name("run\n") and not runs.valid_run_name("run\n\n")
    assert runs.RUN_NAME.match("run\n") is None  # callers that use .match() get the same rule


def test_lock_names_its_owner_and_dies_with_it(tmp_path):
    run_dir = tmp_path / "x"
    assert runs.live_owner(run_dir) is None
    lock = runs.RunLock.acquire(run_dir)
    owner = runs.live_owner(run_dir)
    assert owner["pid"] == os.getpid() and owner["host"] and "UTC" in owner["started"]
    with pytest.raises(runs.RunBusy, match=f"process {os.getpid()} on host"):
        runs.RunLock.acquire(run_dir, wait_s=0.1)
    lock.release()
    assert runs.live_owner(run_dir) is None
    # a holder killed with SIGKILL releases it (the OS drops flocks of a dead process)
    code = ("import sys, time; from splam_studio.store.runs import RunLock; RunLock.acquire(sys.argv[1]); "
            "print('locked', flush=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.stdout.readline().strip() == "locked"
    assert runs.live_owner(run_dir)["pid"] == p.pid
    p.kill()
    p.wait()
    assert runs.live_owner(run_dir) is None
    runs.RunLock.acquire(run_dir, wait_s=0.1).release()


TRAINER_WAIT_S = 240  # for a step or a checkpoint of the tiny teacher on a busy machine


def _args(world, out, *extra) -> list[str]:
    return ["--teacher", str(world / "teacher"), "--data", str(world / "data"), "--output-dir", str(out),
            "--batch-size", "2", "--log-every", "1", "--device", "cpu", "--seed", "3", *extra]


def _terminal_signals() -> None:
    """SIGINT and SIGTERM at their defaults, as in a terminal, also when the suite itself runs with them ignored (a
    background job or nohup, whose SIG_IGN a child would inherit)."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_DFL)


def _popen(world, out, *extra, log):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    fh = open(log, "w")
    return subprocess.Popen([sys.executable, str(ROOT / "train_cli.py"), *_args(world, out, *extra)], stdout=fh,
                            stderr=subprocess.STDOUT, cwd=ROOT, env=env, preexec_fn=_terminal_signals), fh


@pytest.fixture
def ctrl_c():
    """In this process SIGINT is a terminal's Ctrl-C (KeyboardInterrupt) for the test, also when the suite runs with
    SIGINT ignored (a background job, nohup); put back after."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _in_process(monkeypatch, capsys, *args) -> tuple[int, str]:
    """train_cli.py's main() in this process (what `python train_cli.py ARGS` runs, without a second interpreter's
    start-up): (exit code, stdout + stderr). One torch thread, and the thread variables it sets are put back after."""
    from splam_studio.training import cli

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("SPLAM_THREADS", "1")
    capsys.readouterr()
    threads = torch.get_num_threads()
    try:
        code = cli.main([*args, "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr()
    return code, out.out + out.err


def _steps(run: Path) -> int:
    return sum(1 for r in runs.read_stats(run / "stats.jsonl") if "loss" in r)


def test_two_trainers_race_and_sigterm_restores_the_overwritten_run(world, tmp_path, monkeypatch, capsys):
    """Trainer A (a subprocess) overwrites run 'mine' and trains; B (--overwrite) and C (--resume latest), from this
    process, on the live run are refused with one sentence naming A's pid, and change nothing; SIGTERM to A before
    its first checkpoint puts the old run back."""
    _fake_run(tmp_path / "mine")
    a, fa = _popen(world, tmp_path, "--run-name", "mine", "--overwrite", "--max-steps", "100000",
                   "--checkpoint-every", "100000", log=tmp_path / "a.log")
    try:
        run = tmp_path / "mine"
        poll_until(lambda: _steps(run) >= 1, a, "A's first step", TRAINER_WAIT_S, tmp_path / "a.log")
        assert runs.live_owner(run)["pid"] == a.pid
        for flags in (("--overwrite", "--max-steps", "3"), ("--resume", "latest")):  # B, then C, from this process
            code, text = _in_process(monkeypatch, capsys, *_args(world, tmp_path, "--run-name", "mine", *flags))
            assert code == 2, text[-2000:]
            assert f"is being trained right now by process {a.pid} on host" in text, text[-2000:]
            assert "Traceback" not in text and len([x for x in text.splitlines() if x.startswith("error:")]) == 1
        assert a.poll() is None and runs.live_owner(run)["pid"] == a.pid  # A is untouched and still training
        n = _steps(run)
        poll_until(lambda: _steps(run) > n, a, "A's next step", TRAINER_WAIT_S, tmp_path / "a.log")
        assert not (run / "keep.txt").exists() and len(list((tmp_path / ".trash").iterdir())) == 1
        a.send_signal(signal.SIGTERM)
        assert a.wait(120) == 128 + signal.SIGTERM
    finally:
        if a.poll() is None:
            a.kill()
        fa.close()
    text = (tmp_path / "a.log").read_text()
    assert "interrupted (SIGTERM)" in text and "previous run 'mine' is back" in text and "Traceback" not in text
    assert (run / "keep.txt").read_text() == "the user's" and not any((tmp_path / ".trash").iterdir())
    assert runs.live_owner(run) is None


def _sigint_once(monkeypatch, when) -> None:
    """A real SIGINT to this process, once per run, right after a step line for which when(run_dir) holds: the
    in-process trainer meets it at a known point, through the same handling as a Ctrl-C in a terminal."""
    real, fired = runs.StepLog.step, set()

    def step(self, *a, **kw):
        real(self, *a, **kw)
        run_dir = self.path.parent
        if run_dir.name not in fired and when(run_dir):
            fired.add(run_dir.name)
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(runs.StepLog, "step", step)


def test_sigint_leaves_nothing_before_a_checkpoint_and_names_the_real_one_after(world, tmp_path, monkeypatch, capsys,
                                                                               ctrl_c):
    """SIGINT before the first checkpoint: no folder blocks the name, an overwritten run is back; SIGINT later: the
    message names the last checkpoint and its step, and the command it prints (no --teacher, --data or preset)
    resumes that very run from it. 'old' is a train_cli.py subprocess that gets SIGINT from outside at whatever it is
    doing; 'new' and 'ck' run main() in this process (while 'old' starts up) and get it after a step line."""
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # a Ctrl-C here is a KeyboardInterrupt
    _fake_run(tmp_path / "old")
    old, fh = _popen(world, tmp_path, "--run-name", "old", "--max-steps", "100000", "--checkpoint-every", "100000",
                     "--overwrite", log=tmp_path / "old.log")
    try:
        _sigint_once(monkeypatch, lambda run: run.name == "new" or ck.last_checkpoint(run) is not None)
        logs, codes = {}, {}
        for name, extra in [("new", ("--checkpoint-every", "100000")),
                            ("ck", ("--checkpoint-every", "2", "--lora-rank", "2", "--cond-proj-lr-scale", "10"))]:
            codes[name], logs[name] = _in_process(monkeypatch, capsys, *_args(world, tmp_path, "--run-name", name,
                                                                              "--max-steps", "100000", *extra))
        poll_until(lambda: _steps(tmp_path / "old") >= 1, old, "old's first step", TRAINER_WAIT_S, tmp_path / "old.log")
        old.send_signal(signal.SIGINT)
        codes["old"] = old.wait(120)
    finally:
        if old.poll() is None:
            old.kill()
        fh.close()
    logs["old"] = (tmp_path / "old.log").read_text()
    assert codes == {"new": 130, "ck": 130, "old": 130}, logs
    assert all("Traceback" not in t for t in logs.values()), logs
    assert not (tmp_path / "new").exists() and "the name 'new' is free" in logs["new"]
    assert (tmp_path / "old" / "keep.txt").read_text() == "the user's" and "previous run 'old' is back" in logs["old"]
    path, step = ck.last_checkpoint(tmp_path / "ck")
    line = [x for x in logs["ck"].splitlines() if x.startswith("interrupted (SIGINT)")][0]  # on a line of its own
    assert f"the last complete checkpoint is {path} (step {step})" in line
    cmd = line.split("continue this run with: ")[1].split()
    assert cmd[:3] == ["python", "-m", "splam_studio.training"] and cmd[3:] == [
        "--run-name", "ck", "--resume", "latest", "--output-dir", str(tmp_path)]
    code, text = _in_process(monkeypatch, capsys, *cmd[3:], "--max-steps", str(step + 1))  # what `-m` runs: main()
    assert code == 0, text[-3000:]
    assert f"continuing at step {step}" in text and "max_steps 100000 -> " in text
    rec = json.loads((tmp_path / "ck" / "training_config.json").read_text())
    assert rec["max_steps"] == step + 1 and rec["lora_rank"] == 2 and rec["cond_proj_lr_scale"] == 10
    assert ck.last_checkpoint(tmp_path / "ck")[1] == step + 1


# ---------------------------------------------------------------- --resume keeps the run's own settings

def test_resume_refuses_conflicting_flags_and_takes_the_runs_own_settings(world, tmp_path):
    from splam_studio.training import cli

    _run(_cfg(world, tmp_path, method="lcm", cond_proj_lr_scale=10.0, batch_size=16))  # 12 images: batch clamped to 12
    cfg_file = tmp_path / "r" / "training_config.json"
    before = cfg_file.read_text()

    def resolve(*flags):
        return cli.resolve(cli.build_parser().parse_args(["--output-dir", str(tmp_path), "--run-name", "r", *flags]))

    with pytest.raises(TrainError) as e:
        loop.run(resolve("--resume", "latest", "--method", "splam", "--lora-rank", "4", "--data", "shapes"), log=print)
    msg = str(e.value)
    assert "--method 'splam' (the run has 'lcm')" in msg and "--lora-rank 4 (the run has 0)" in msg
    assert "--data 'shapes'" in msg and "\n" not in msg
    with pytest.raises(TrainError, match=r"--cond-proj-lr-scale 30.0 \(the run has 10.0\)"):
        loop.run(resolve("--resume", "latest", "--preset", "shapes"), log=print)
    assert cfg_file.read_text() == before  # a refused resume rewrites nothing
    # no preset, no teacher, no data: the run's own settings; the same --batch-size as asked first is no conflict
    cfg = resolve("--resume", "latest", "--max-steps", "3", "--batch-size", "16")
    assert (cfg.method, cfg.teacher, cfg.cond_proj_lr_scale) == ("lcm", str(world / "teacher"), 10.0)
    text = _run(cfg)
    assert "continuing at step 2" in text and "max_steps 2 -> 3" in text
    rec = json.loads(cfg_file.read_text())
    assert rec["max_steps"] == 3 and rec["method"] == "lcm" and rec["batch_size"] == 12
    with pytest.raises(TrainError, match="--resume needs --run-name"):
        cli.resolve(cli.build_parser().parse_args(["--resume", "latest"]))


# ---------------------------------------------------------------- damaged checkpoints

def _model(seed):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    m[0].requires_grad_(False)
    return m


def _three_checkpoints(root):
    student, target = _model(0), _model(1)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-2)
    for step in (1, 2, 3):
        student(torch.ones(5, 3)).square().sum().backward()
        opt.step()
        ck.save_checkpoint(root, step, student, target, opt, keep=3)
    return root / "checkpoints" / "step-0000003"


def _write_state(d, obj):
    (d / "state.json").write_text(json.dumps(obj))


DAMAGE = {
    "no step": lambda d: _write_state(d, {"time": 1}),
    "step -5": lambda d: _write_state(d, {"step": -5}),
    "step 1e9": lambda d: _write_state(d, {"step": 1000000000}),
    "step float": lambda d: _write_state(d, {"step": 3.0}),
    "state null": lambda d: (d / "state.json").write_text("null"),
    "state not utf-8": lambda d: (d / "state.json").write_bytes(b"\xff\xfe{"),
    "grad_scaler garbage": lambda d: _write_state(d, {"step": 3, "grad_scaler": [1]}),
    "optimizer.json garbage": lambda d: (d / "optimizer.json").write_text('{"param_groups": "x"}'),
    "optimizer.json list": lambda d: (d / "optimizer.json").write_text("[1, 2]"),
    "optimizer groups": lambda d: (d / "optimizer.json").write_text(json.dumps(
        {"param_groups": [{"params": [0], "lr": 1e-2}, {"params": [1], "lr": 1e-2}], "scalars": {}})),
    "optimizer tensor shape": lambda d: ck.save_file({"0.exp_avg": torch.zeros(7), "0.exp_avg_sq": torch.zeros(2, 4),
                                                      "0.step": torch.tensor(3.0)}, d / "optimizer.safetensors"),
    "truncated student": lambda d: (d / "student.safetensors").write_bytes((d / "student.safetensors").read_bytes()[:40]),
    "student shape": lambda d: ck.save_file({"1.weight": torch.zeros(2, 5), "1.bias": torch.zeros(2)}, d / "student.safetensors"),
    "student dtype": lambda d: ck.save_file({"1.weight": torch.zeros(2, 4, dtype=torch.float16), "1.bias": torch.zeros(2)},
                                            d / "student.safetensors"),
    "student NaN": lambda d: ck.save_file({"1.weight": torch.full((2, 4), float("nan")), "1.bias": torch.zeros(2)},
                                          d / "student.safetensors"),
    "target missing tensor": lambda d: ck.save_file({"1.weight": torch.zeros(2, 4)}, d / "target.safetensors"),
    "target.safetensors gone": lambda d: (d / "target.safetensors").unlink(),
    "empty file": lambda d: (d / "optimizer.safetensors").write_bytes(b""),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_valid_one(tmp_path, case):
    newest = _three_checkpoints(tmp_path)
    DAMAGE[case](newest)
    student, target = _model(5), _model(6)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-2)
    lines = []
    found, step = ck.resume_checkpoint(tmp_path, "latest", student, target, opt, None, 10, lines.append)
    assert (found.name, step) == ("step-0000002", 2)
    assert "checkpoint step-0000003 is damaged (" in lines[0] and "fell back to step-0000002 (step 2)" in lines[-1]
    assert all("\n" not in x for x in lines)
    ref = ck.read_checkpoint(tmp_path / "checkpoints" / "step-0000002")
    assert torch.equal(student[1].weight, ref["student"]["1.weight"])
    # the same folder named explicitly is one CheckpointError sentence, never a traceback
    student, target = _model(5), _model(6)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-2)
    with pytest.raises(ck.CheckpointError, match=r"step-0000003 cannot be resumed from: ") as e:
        ck.load_checkpoint(newest, student, target, opt, None, 10)
    assert "\n" not in str(e.value)


def test_checkpoints_beyond_max_steps_or_all_damaged_are_clear_errors(tmp_path):
    newest = _three_checkpoints(tmp_path)
    student, target = _model(5), _model(6)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-2)
    with pytest.raises(ck.CheckpointBeyond, match="at step 3, past --max-steps 2; pass --max-steps 3 or more"):
        ck.resume_checkpoint(tmp_path, "latest", student, target, opt, None, 2, print)
    for d in (tmp_path / "checkpoints").iterdir():
        (d / "state.json").write_text("{")
    (tmp_path / "checkpoints" / "step-0000004").write_text("a file, not a folder")
    with pytest.raises(ck.CheckpointError, match="none of the 3 checkpoints") as e:
        ck.resume_checkpoint(tmp_path, "latest", student, target, opt, None, 10, lambda s: None)
    assert "step-0000003: state.json is unreadable" in str(e.value) and newest.is_dir()  # left as they were


def test_run_resumes_from_the_newest_valid_checkpoint_and_says_so(world, tmp_path):
    _run(_cfg(world, tmp_path, max_steps=3, keep_checkpoints=3))
    _write_state(tmp_path / "r" / "checkpoints" / "step-0000003", {"step": -5})
    text = _run(_cfg(world, tmp_path, max_steps=3, keep_checkpoints=3, resume="latest"))
    assert "checkpoint step-0000003 is damaged (state.json's step -5" in text
    assert "fell back to step-0000002" in text and "continuing at step 2" in text
    assert ck.last_checkpoint(tmp_path / "r")[1] == 3  # step 3 trained again and written over the damaged one
    cfg = _cfg(world, tmp_path, max_steps=3, resume="latest", lora_rank=2)  # a library call that changes the run
    with pytest.raises(TrainError, match=r"--lora-rank 2 \(the run has 0\)"):
        loop.run(cfg, log=print)


# ---------------------------------------------------------------- disk full and read-only

def _can_mount() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None


@pytest.fixture
def tmpfs(tmp_path):
    """A real 48 MB tmpfs (needs root and mount); skipped with the reason where the machine does not allow it."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if not _can_mount():
        pytest.skip("mounting a tmpfs needs root; the disk-full case runs with ENOSPC injected instead "
                    "(test_disk_full_injected_at_the_write)")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"mount -t tmpfs is not allowed here ({r.stderr.strip()}); ENOSPC is injected instead "
                    "(test_disk_full_injected_at_the_write)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(folder: Path, leave: int) -> Path:
    """A filler file that leaves about `leave` bytes free."""
    filler = folder / "filler.bin"
    free = shutil.disk_usage(folder).free
    with open(filler, "wb") as f:
        f.truncate(0)
        chunk = b"\0" * (1 << 20)
        left = free - leave
        while left > 0:
            f.write(chunk[:min(left, len(chunk))])
            left -= len(chunk)
    return filler


@pytest.mark.parametrize("precheck", [True, False])
def test_disk_full_on_a_real_tmpfs(world, tmpfs, monkeypatch, precheck):
    """The disk fills after the first checkpoint: one sentence (folder, free space, need), checkpoint 1 stays
    loadable, no temp file, and after space is freed --resume latest continues from it. precheck=False turns off the
    free-space check, so the write itself meets ENOSPC (safetensors' own error) mid-file."""
    real_save = loop.save_checkpoint
    filler = []

    def save_then_fill(run_dir, step, *a, **kw):
        out = real_save(run_dir, step, *a, **kw)
        if not filler:
            filler.append(_fill(tmpfs, 48 * 1024))
        return out

    monkeypatch.setattr(loop, "save_checkpoint", save_then_fill)
    if not precheck:
        monkeypatch.setattr(ck, "check_free", lambda *a: None)
    with pytest.raises(TrainError) as e:
        _run(_cfg(world, tmpfs, max_steps=3))
    msg = str(e.value)
    assert f"cannot write checkpoint step-0000002 in {tmpfs / 'r' / 'checkpoints'}" in msg and "\n" not in msg
    assert ("only" if precheck else "no space left on the device") in msg and "--resume latest" in msg
    assert " MB" in msg and "KB" in msg  # the need and the free space, in units
    run = tmpfs / "r"
    assert _tmp_left(run) == [] and ck.last_checkpoint(run)[1] == 1
    ck.read_checkpoint(run / "checkpoints" / "step-0000001")
    filler[0].unlink()
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    text = _run(_cfg(world, tmpfs, max_steps=3, resume="latest"))
    assert "continuing at step 1" in text and ck.last_checkpoint(run)[1] == 3 and _tmp_left(run) == []


def test_disk_full_warning_before_the_run(world, tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "free_bytes", lambda folder: 10_000)
    monkeypatch.setattr(ck, "check_free", lambda *a: None)
    text = _run(_cfg(world, tmp_path, max_steps=1))
    assert "has 9.8 KB free, less than two checkpoints and the export need" in text


def _inject(monkeypatch, code: int, after: int = 0):
    """save_file in checkpoints raises the OS error `code` (as safetensors reports it) from its (after+1)-th call on."""
    real, calls = ck.save_file, []

    def save_file(tensors, path, *a, **kw):
        calls.append(path)
        if len(calls) > after:
            Path(path).write_bytes(b"partial")
            raise RuntimeError(f"Error while serializing: I/O error: {os.strerror(code)} (os error {code})")
        return real(tensors, path, *a, **kw)

    monkeypatch.setattr(ck, "save_file", save_file)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_disk_full_injected_at_the_write(world, tmp_path, monkeypatch, code):
    _inject(monkeypatch, code, after=3 + 1)  # checkpoint 1 (3 files) and the first file of checkpoint 2 succeed
    with pytest.raises(TrainError) as e:
        _run(_cfg(world, tmp_path, max_steps=3))
    msg = str(e.value)
    assert f"cannot write checkpoint step-0000002 in {tmp_path / 'r' / 'checkpoints'}: " in msg
    assert ("no space left" if code == errno.ENOSPC else "read-only") in msg and "free" in msg and "\n" not in msg
    run = tmp_path / "r"
    assert _tmp_left(run) == [] and ck.last_checkpoint(run)[1] == 1
    monkeypatch.undo()
    assert "continuing at step 1" in _run(_cfg(world, tmp_path, max_steps=3, resume="latest"))


@pytest.fixture
def readonly_dir(tmp_path):
    """A read-only output folder: a read-only tmpfs (root with mount), chmod 555 (not root), else skipped."""
    d = tmp_path / "ro"
    d.mkdir()
    if os.geteuid() != 0:
        d.chmod(0o555)
        yield d
        d.chmod(0o755)
        return
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(d)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"running as root, chmod cannot make a folder read-only and mount failed ({r.stderr.strip()}); "
                    "the read-only write is injected instead (test_disk_full_injected_at_the_write[30])")
    yield d
    subprocess.run(["umount", "-l", str(d)], check=False)


def test_read_only_output_folder_is_one_sentence(world, readonly_dir):
    with pytest.raises(TrainError) as e:
        _run(_cfg(world, readonly_dir))
    msg = str(e.value)
    assert f"cannot write files in {readonly_dir}" in msg and ("read-only" in msg or "permission denied" in msg)
    assert "free" in msg and "\n" not in msg and list(readonly_dir.iterdir()) == []


def test_overwrite_restores_the_old_run_when_the_first_checkpoint_fails(world, tmp_path, monkeypatch):
    _fake_run(tmp_path / "r")
    _inject(monkeypatch, errno.ENOSPC)
    with pytest.raises(TrainError, match="no space left"):
        _run(_cfg(world, tmp_path, overwrite=True))
    assert (tmp_path / "r" / "keep.txt").read_text() == "the user's" and not any((tmp_path / ".trash").iterdir())
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == [".run.lock", "keep.txt", "training_config.json"]
