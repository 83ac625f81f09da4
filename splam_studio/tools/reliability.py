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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["kill", "app"], default=None)
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
