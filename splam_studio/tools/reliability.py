"""Reliability figures for BENCHMARKS.md: training under kill -9, bad data, bad models, NaN faults, the app under load.

    python -m splam_studio.tools.reliability            # all sections, writes benchmarks/reliability.json
    python -m splam_studio.tools.reliability --only kill

Training faults use the real trainer (`-m splam_studio.training`) in subprocesses; the app section launches the studio and drives it with
gradio_client from 32 threads.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _train_cmd(teacher: str, data: str, out: Path, run: str, steps: int, extra=()) -> list[str]:
    return [sys.executable, "-m", "splam_studio.training", "--teacher", teacher, "--data", data, "--output-dir", str(out),
            "--run-name", run, "--max-steps", str(steps), "--batch-size", "4", "--checkpoint-every", "2",
            "--keep-checkpoints", "2", "--shapes-size", "256", "--device", "cpu", "--seed", "11", "--log-every", "1", *extra]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _last_step(run: Path) -> int:
    done = sorted(p for p in (run / "checkpoints").glob("step-*") if (p / "state.json").is_file())
    return json.loads((done[-1] / "state.json").read_text())["step"] if done else 0


def _tmp_dirs(run: Path) -> set[str]:
    ckpts = run / "checkpoints"
    return {p.name for p in ckpts.glob(".tmp-*")} if ckpts.exists() else set()


def kill_test(teacher: str, data: str, workdir: Path, steps: int = 60, kills: int = 6, seed: int = 0, log=print) -> dict:
    """kill -9 a run `kills` times (every other one while a checkpoint is being written), resume each time with
    --resume latest, and compare the final student with an uninterrupted run of the same seeds.

    Each attempt is first allowed to complete a checkpoint past the previous one (so every kill interrupts real
    progress, not start-up); then it is killed either at a random moment up to 3 s later, or as soon as a checkpoint
    temp folder of this attempt appears. A kill counts as "during a write" only if such a temp folder, absent when
    the attempt started, is still there after the kill.
    """
    from safetensors.torch import load_file

    rng = random.Random(seed)
    ref = subprocess.run(_train_cmd(teacher, data, workdir, "straight", steps), env=_env(), capture_output=True, text=True)
    if ref.returncode != 0:
        raise RuntimeError(ref.stderr[-2000:])
    run, events = workdir / "killed", []
    while len(events) < kills:
        before = _last_step(run) if run.exists() else 0
        tmp_before = _tmp_dirs(run)
        attempt_log = workdir / f"attempt-{len(events) + 1}.log"
        with attempt_log.open("w") as fh:
            proc = subprocess.Popen(_train_cmd(teacher, data, workdir, "killed", steps, ["--resume", "latest"]),
                                    env=_env(), stdout=fh, stderr=subprocess.STDOUT)
        during_write = len(events) % 2 == 0
        deadline = time.time() + 300
        progressed_at = None
        while proc.poll() is None and time.time() < deadline:
            if progressed_at is None:
                if run.exists() and _last_step(run) > before:
                    progressed_at, delay = time.time(), rng.uniform(0.0, 3.0)
            elif during_write:
                if _tmp_dirs(run) - tmp_before:
                    break  # a checkpoint write of this attempt is in flight: kill now
            elif time.time() - progressed_at > delay:
                break
            time.sleep(0.001)
        if proc.poll() is not None:
            log("the run finished before the next kill")
            break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        tmp_left = sorted(_tmp_dirs(run) - tmp_before)
        after = _last_step(run)
        loadable = True
        ck = sorted(p for p in (run / "checkpoints").glob("step-*") if (p / "state.json").is_file())[-1]
        try:
            for f in ("student.safetensors", "target.safetensors", "optimizer.safetensors"):
                load_file(ck / f)
        except Exception:  # noqa: BLE001 - a checkpoint that does not load is exactly what we measure
            loadable = False
        resumed = re.findall(r"continuing at step (\d+)", attempt_log.read_text(errors="replace"))
        events.append({"kill": len(events) + 1, "aimed_at_write": during_write,
                       "resumed_at": int(resumed[0]) if resumed else 0, "during_checkpoint_write": bool(tmp_left),
                       "temp_folders_left": tmp_left, "last_step_before": before, "last_complete_step": after,
                       "loadable": loadable})
        log(f"kill {events[-1]}")
    fin = subprocess.run(_train_cmd(teacher, data, workdir, "killed", steps, ["--resume", "latest"]), env=_env(),
                         capture_output=True, text=True)
    if fin.returncode != 0:
        raise RuntimeError(fin.stderr[-2000:])
    resumed_from = [int(m) for m in re.findall(r"continuing at step (\d+)", fin.stdout + fin.stderr)]
    a = load_file(sorted((workdir / "straight" / "checkpoints").glob("step-*"))[-1] / "student.safetensors")
    b = load_file(sorted((workdir / "killed" / "checkpoints").glob("step-*"))[-1] / "student.safetensors")
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    return {"kills": events, "steps": steps, "final_step": _last_step(run), "final_attempt_resumed_at": resumed_from[0] if resumed_from else 0,
            "every_resume_at_last_checkpoint": all(e["resumed_at"] == e["last_step_before"] for e in events)
            and (resumed_from[0] if resumed_from else 0) == (events[-1]["last_complete_step"] if events else 0),
            "stale_temp_folders_after_finish": sorted(_tmp_dirs(run)),
            "max_abs_weight_diff_vs_uninterrupted": diff, "tolerance": 1e-5, "match": diff <= 1e-5,
            "all_checkpoints_loadable": all(e["loadable"] for e in events)}


def _popen_train(teacher, data, out, run, steps, extra, log_path):
    fh = open(log_path, "w")
    return subprocess.Popen(_train_cmd(teacher, data, out, run, steps, extra), env=_env(), stdout=fh,
                            stderr=subprocess.STDOUT), fh


def _wait_for(pred, proc, timeout=300) -> bool:
    deadline = time.time() + timeout
    while not pred():
        if proc.poll() is not None or time.time() > deadline:
            return False
        time.sleep(0.1)
    return True


def _error_line(text: str) -> str:
    lines = [x for x in text.replace("\r", "\n").splitlines() if x.startswith(("error:", "interrupted"))]
    return lines[-1][:240] if lines else "(none)"


def _seed_old_run(path: Path) -> None:
    path.mkdir(parents=True)
    (path / "training_config.json").write_text(json.dumps({"method": "lcm"}))
    (path / "keep.txt").write_text("the user's")


def faults_test(teacher: str, data: str, workdir: Path, log=print) -> dict:
    """The trainer's run-folder faults (issue 26, 29): a second trainer on a live run, --overwrite ended by SIGTERM,
    SIGINT or a failed first checkpoint, a full disk (a real tmpfs where `mount` works, else ENOSPC injected at the
    write), a read-only output folder, and damaged newest checkpoints. Real trainer subprocesses for the race and the
    signals; the disk and checkpoint cases call the trainer in-process to inject at the write."""
    import errno
    import shutil

    from ..store import runs
    from ..training import checkpoints as ck
    from ..training import loop

    rows = []

    def row(round_, case, outcome, ok):
        rows.append({"round": round_, "case": case, "outcome": outcome, "ok": bool(ok)})
        log(f"faults: {round_} / {case}: {outcome} ({'ok' if ok else 'FAILED'})")

    # -- lock race: A overwrites 'mine' and trains; B (--overwrite) and C (--resume latest) come while A is live
    _seed_old_run(workdir / "mine")
    a, fa = _popen_train(teacher, data, workdir, "mine", 100000, ["--overwrite", "--checkpoint-every", "100000"],
                         workdir / "a.log")
    live = _wait_for(lambda: any("loss" in r for r in runs.read_stats(workdir / "mine" / "stats.jsonl")), a)
    owner = runs.live_owner(workdir / "mine") or {}
    row("lock", "live_owner() of the live run", f"pid {owner.get('pid')} (trainer A is {a.pid})", live and owner.get("pid") == a.pid)
    for name, extra in (("B --overwrite", ["--overwrite"]), ("C --resume latest", ["--resume", "latest"])):
        r = subprocess.run(_train_cmd(teacher, data, workdir, "mine", 3, extra), env=_env(), capture_output=True, text=True)
        line = _error_line(r.stderr)
        row("lock", f"second trainer {name}", f"rc {r.returncode}: {line}",
            r.returncode == 2 and f"process {a.pid}" in line and "Traceback" not in r.stderr)
    row("lock", "trainer A after both refusals", "still training" if a.poll() is None else f"ended rc {a.returncode}",
        a.poll() is None)
    a.send_signal(signal.SIGTERM)
    rc = a.wait(300)
    fa.close()
    back = (workdir / "mine" / "keep.txt").is_file() and not any((workdir / ".trash").iterdir())
    row("overwrite restore", "SIGTERM before the first checkpoint", f"rc {rc}; old run back: {back}", rc == 143 and back)
    # -- SIGINT before the first checkpoint of an --overwrite, and of a fresh run
    _seed_old_run(workdir / "old")
    procs = {n: _popen_train(teacher, data, workdir, n, 100000, extra + ["--checkpoint-every", "100000"], workdir / f"{n}.log")
             for n, extra in (("old", ["--overwrite"]), ("new", []))}
    for n, (p, _) in procs.items():
        _wait_for(lambda: any("loss" in r for r in runs.read_stats(workdir / n / "stats.jsonl")), p)
        p.send_signal(signal.SIGINT)
    for n, (p, fh) in procs.items():
        p.wait(300)
        fh.close()
    back = (workdir / "old" / "keep.txt").is_file()
    row("overwrite restore", "SIGINT before the first checkpoint", f"rc {procs['old'][0].returncode}; old run back: {back}",
        procs["old"][0].returncode == 130 and back)
    row("unfinished run", "fresh run, SIGINT before its first checkpoint",
        f"rc {procs['new'][0].returncode}; folder left: {(workdir / 'new').exists()}; "
        f"{_error_line((workdir / 'new.log').read_text())}", not (workdir / "new").exists())

    def cfg(out, run, **kw):
        base = dict(teacher=teacher, data=data, output_dir=str(out), run_name=run, max_steps=3, batch_size=4,
                    checkpoint_every=1, keep_checkpoints=2, shapes_size=256, device="cpu", seed=11, log_every=1)
        return loop.TrainConfig(**{**base, **kw})

    def attempt(c):
        lines = []
        try:
            loop.run(c, log=lines.append)
            return "done", lines
        except loop.TrainError as e:
            return f"error: {e}", lines
        except Exception as e:  # noqa: BLE001 - a traceback is exactly what this round measures
            return f"TRACEBACK {type(e).__name__}: {e}", lines

    real_save_file, real_save = ck.save_file, loop.save_checkpoint

    def inject(code, after):
        calls = []

        def save_file(t, path, *a, **kw):
            calls.append(path)
            if len(calls) > after:
                raise RuntimeError(f"Error while serializing: I/O error: {os.strerror(code)} (os error {code})")
            return real_save_file(t, path, *a, **kw)
        ck.save_file = save_file

    # -- overwrite + a failed first checkpoint
    _seed_old_run(workdir / "ovw")
    inject(errno.ENOSPC, 0)
    try:
        out, _ = attempt(cfg(workdir, "ovw", overwrite=True))
    finally:
        ck.save_file = real_save_file
    back = (workdir / "ovw" / "keep.txt").is_file()
    row("overwrite restore", "the first checkpoint fails (ENOSPC injected)", f"{out[:160]}; old run back: {back}",
        out.startswith("error: cannot write checkpoint") and back)
    # -- disk full: a real tmpfs where mount works, else injected
    mnt = workdir / "tmpfs"
    mnt.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)],
                                                   capture_output=True).returncode == 0
    how = "real 64 MB tmpfs, filled after checkpoint 1" if mounted else "ENOSPC injected at checkpoint 2"
    filler = mnt / "filler.bin"

    def save_then_fill(run_dir, step, *a, **kw):
        res = real_save(run_dir, step, *a, **kw)
        if mounted and not filler.exists():
            with open(filler, "wb") as f:
                left = shutil.disk_usage(mnt).free - 64 * 1024
                while left > 0:
                    f.write(b"\0" * min(left, 1 << 20))
                    left -= 1 << 20
        return res

    loop.save_checkpoint = save_then_fill
    if not mounted:
        inject(errno.ENOSPC, 3)
    try:
        out, _ = attempt(cfg(mnt, "full"))
    finally:
        loop.save_checkpoint, ck.save_file = real_save, real_save_file
    run = mnt / "full"
    left = sorted(p.name for p in run.rglob("*") if ".tmp" in p.name)
    last = ck.last_checkpoint(run)
    row("disk full", how, out[:240], out.startswith("error: cannot write checkpoint step-0000002") and not left and last and last[1] == 1)
    filler.unlink(missing_ok=True)
    out, lines = attempt(cfg(mnt, "full", resume="latest"))
    row("disk full", "resume after freeing space", f"{out}; " + next((x for x in lines if "continuing" in x), "no resume line"),
        out == "done" and any("continuing at step 1" in x for x in lines))
    if mounted:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
    # -- read-only output folder: a read-only tmpfs (root), chmod 555 (not root), else EROFS injected
    ro = workdir / "ro"
    ro.mkdir()
    if os.geteuid() != 0:
        ro.chmod(0o555)
        how = "chmod 555"
    elif subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True).returncode == 0:
        how = "read-only tmpfs"
    else:
        how = None
    if how:
        out, _ = attempt(cfg(ro, "x"))
        row("read-only", f"output folder ({how})", out[:240], out.startswith(f"error: cannot write files in {ro}"))
        subprocess.run(["umount", "-l", str(ro)], check=False) if how == "read-only tmpfs" else ro.chmod(0o755)
    inject(errno.EROFS, 3)
    try:
        out, _ = attempt(cfg(workdir, "ro-mid"))
    finally:
        ck.save_file = real_save_file
    row("read-only", "at checkpoint 2 (EROFS injected)", out[:240],
        "read-only" in out and ck.last_checkpoint(workdir / "ro-mid")[1] == 1)
    # -- damaged newest checkpoint: each resume falls back to the one before it
    base = workdir / "damage"
    attempt(cfg(base, "r", keep_checkpoints=3))
    damage = {"state.json without step": lambda d: (d / "state.json").write_text('{"time": 1}'),
              "step -5": lambda d: (d / "state.json").write_text('{"step": -5}'),
              "step 1000000000": lambda d: (d / "state.json").write_text('{"step": 1000000000}'),
              "garbage optimizer.json": lambda d: (d / "optimizer.json").write_text('{"param_groups": "x"}'),
              "truncated student.safetensors": lambda d: (d / "student.safetensors").write_bytes(
                  (d / "student.safetensors").read_bytes()[:100])}
    for case, hurt in damage.items():
        copy = workdir / "damage-copy"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(base, copy)
        hurt(copy / "r" / "checkpoints" / "step-0000003")
        out, lines = attempt(cfg(copy, "r", keep_checkpoints=3, resume="latest"))
        fell = next((x for x in lines if "fell back" in x), "no fallback line")
        row("damaged checkpoint", case, f"{out}; {fell[:160]}",
            out == "done" and "fell back to step-0000002" in fell and any("continuing at step 2" in x for x in lines))
    return {"rows": rows, "disk_full_mode": "tmpfs" if mounted else "injected ENOSPC"}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["kill", "faults", "app"], default=None)
    p.add_argument("--teacher", default="shapes")
    p.add_argument("--data", default="shapes")
    p.add_argument("--workdir", default="tmp/reliability")
    p.add_argument("--out", default="benchmarks/reliability.json")
    a = p.parse_args(argv)
    out = Path(a.out)
    doc = json.loads(out.read_text()) if out.is_file() else {}
    doc.setdefault("raw", {})
    wd = Path(a.workdir)
    if a.only in (None, "kill"):
        import shutil

        shutil.rmtree(wd, ignore_errors=True)
        wd.mkdir(parents=True)
        doc["raw"]["kill"] = kill_test(a.teacher, a.data, wd)
    if a.only in (None, "faults"):
        import shutil

        shutil.rmtree(wd / "faults", ignore_errors=True)
        (wd / "faults").mkdir(parents=True)
        doc["raw"]["faults"] = faults_test(a.teacher, a.data, (wd / "faults").resolve())
    if a.only in (None, "app"):
        from .load_test import app_load_test

        doc["raw"]["app"] = app_load_test()
    doc.update(render(doc["raw"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2))
    print(json.dumps(doc["raw"], indent=2)[:4000])


def render(raw: dict) -> dict:
    tables, notes = [], []
    if "kill" in raw:
        k = raw["kill"]
        tables.append({"title": "kill -9 during training (train_cli.py, Shapes teacher, resume with --resume latest)",
                       "columns": ["kill", "aimed at", "during a checkpoint write", "resumed at step", "after the kill: last complete step",
                                   "last checkpoint loads"],
                       "rows": [[e["kill"], "a write" if e["aimed_at_write"] else "a random moment",
                                 "yes" if e["during_checkpoint_write"] else "no", e["resumed_at"],
                                 e["last_complete_step"], "yes" if e["loadable"] else "NO"] for e in k["kills"]]})
        notes.append(f"after {len(k['kills'])} kills ({sum(e['during_checkpoint_write'] for e in k['kills'])} during a "
                     f"checkpoint write) the run finished at step {k['final_step']} of {k['steps']}, with "
                     f"{len(k['stale_temp_folders_after_finish'])} temp folders left; every resume started at the last complete "
                     f"checkpoint: {'yes' if k['every_resume_at_last_checkpoint'] else 'NO'}; its student differs from an "
                     f"uninterrupted run with the same seeds by at most {k['max_abs_weight_diff_vs_uninterrupted']:.2e} "
                     f"(tolerance {k['tolerance']:.0e}: {'met' if k['match'] else 'MISSED'})")
    if "faults" in raw:
        f = raw["faults"]
        tables.append({"title": "run-folder faults (train_cli.py subprocesses for the race and the signals; "
                                f"disk full: {f['disk_full_mode']})",
                       "columns": ["round", "case", "outcome", "as required"],
                       "rows": [[r["round"], r["case"], r["outcome"], "yes" if r["ok"] else "NO"] for r in f["rows"]]})
        notes.append(f"run-folder faults: {sum(r['ok'] for r in f['rows'])} of {len(f['rows'])} cases as required")
    if "app" in raw:
        a = raw["app"]
        tables.append({"title": f"app under load: {a['clients']} concurrent clients on /compare",
                       "columns": ["answered", "queue full", "errors", "RSS before (MiB)", "RSS peak (MiB)",
                                   "RSS after (MiB)", "wall (s)"],
                       "rows": [[a["answered"], a["queue_full"], a["errors"], round(a["rss_before_mib"]),
                                 round(a["rss_peak_mib"]), round(a["rss_after_mib"]), round(a["wall_s"], 1)]]})
        if "bad_input" in a:
            tables.append({"title": "bad input to /compare (after the load round, same server)",
                           "columns": ["input", "outcome"],
                           "rows": [[k, v] for k, v in a["bad_input"]["rows"].items()]})
        notes += a.get("notes", [])
    return {"description": "`python -m splam_studio.tools.reliability`: faults injected into real runs; every figure measured.",
            "tables": tables, "notes": notes}


if __name__ == "__main__":
    main()
