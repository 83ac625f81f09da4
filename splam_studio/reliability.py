"""Reliability figures for BENCHMARKS.md: training under kill -9, bad data, bad models, NaN faults, the app under load.

    python -m splam_studio.reliability            # all sections, writes benchmarks/reliability.json
    python -m splam_studio.reliability --only kill

Training faults use the real train_cli.py in subprocesses; the app section launches app.py and drives it with
gradio_client from 32 threads.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _train_cmd(teacher: str, data: str, out: Path, run: str, steps: int, extra=()) -> list[str]:
    return [sys.executable, str(ROOT / "train_cli.py"), "--teacher", teacher, "--data", data, "--output-dir", str(out),
            "--run-name", run, "--max-steps", str(steps), "--batch-size", "4", "--checkpoint-every", "2",
            "--keep-checkpoints", "2", "--shapes-size", "256", "--device", "cpu", "--seed", "11", "--log-every", "1", *extra]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _last_step(run: Path) -> int:
    done = sorted(p for p in (run / "checkpoints").glob("step-*") if (p / "state.json").is_file())
    return json.loads((done[-1] / "state.json").read_text())["step"] if done else 0


def kill_test(teacher: str, data: str, workdir: Path, steps: int = 24, kills: int = 6, seed: int = 0, log=print) -> dict:
    """kill -9 a run `kills` times (half of them while a checkpoint is being written), resume each time with
    --resume latest, and compare the final student with an uninterrupted run of the same seeds."""
    from safetensors.torch import load_file

    rng = random.Random(seed)
    ref = subprocess.run(_train_cmd(teacher, data, workdir, "straight", steps), env=_env(), capture_output=True, text=True)
    if ref.returncode != 0:
        raise RuntimeError(ref.stderr[-2000:])
    run, events = workdir / "killed", []
    while len(events) < kills:
        before = _last_step(run) if run.exists() else 0
        proc = subprocess.Popen(_train_cmd(teacher, data, workdir, "killed", steps, ["--resume", "latest"]), env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        during_write = len(events) % 2 == 0
        t0, deadline = time.time(), time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            ckpts = run / "checkpoints"
            if during_write and ckpts.exists() and any(p.name.startswith(".tmp-step-") for p in ckpts.iterdir()):
                break  # a checkpoint write is in flight: kill now
            if not during_write and time.time() - t0 > rng.uniform(4.0, 12.0):
                break
            time.sleep(0.002)
        if proc.poll() is not None:
            break  # the run finished before we could kill it
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        tmp_left = [p.name for p in (run / "checkpoints").glob(".tmp-*")] if (run / "checkpoints").exists() else []
        after = _last_step(run) if run.exists() else 0
        loadable = True
        if after:
            ck = sorted(p for p in (run / "checkpoints").glob("step-*") if (p / "state.json").is_file())[-1]
            try:
                for f in ("student.safetensors", "target.safetensors", "optimizer.safetensors"):
                    load_file(ck / f)
            except Exception:  # noqa: BLE001 - a checkpoint that does not load is exactly what we measure
                loadable = False
        events.append({"kill": len(events) + 1, "during_checkpoint_write": bool(tmp_left), "last_step_before": before,
                       "last_complete_step": after, "loadable": loadable})
        log(f"kill {events[-1]}")
    fin = subprocess.run(_train_cmd(teacher, data, workdir, "killed", steps, ["--resume", "latest"]), env=_env(),
                         capture_output=True, text=True)
    if fin.returncode != 0:
        raise RuntimeError(fin.stderr[-2000:])
    a = load_file(sorted((workdir / "straight" / "checkpoints").glob("step-*"))[-1] / "student.safetensors")
    b = load_file(sorted((workdir / "killed" / "checkpoints").glob("step-*"))[-1] / "student.safetensors")
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    return {"kills": events, "final_step": _last_step(run), "max_abs_weight_diff_vs_uninterrupted": diff,
            "tolerance": 1e-5, "match": diff <= 1e-5, "all_checkpoints_loadable": all(e["loadable"] for e in events)}


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
                       "columns": ["kill", "during a checkpoint write", "last complete step", "loads"],
                       "rows": [[e["kill"], "yes" if e["during_checkpoint_write"] else "no", e["last_complete_step"],
                                 "yes" if e["loadable"] else "NO"] for e in k["kills"]]})
        notes.append(f"after {len(k['kills'])} kills the run finished at step {k['final_step']}; its student differs from an "
                     f"uninterrupted run with the same seeds by at most {k['max_abs_weight_diff_vs_uninterrupted']:.2e} "
                     f"(tolerance {k['tolerance']:.0e}: {'met' if k['match'] else 'MISSED'})")
    if "app" in raw:
        a = raw["app"]
        tables.append({"title": f"app under load: {a['clients']} concurrent clients on /compare",
                       "columns": ["answered", "queue full", "errors", "RSS before (MiB)", "RSS after (MiB)", "wall (s)"],
                       "rows": [[a["answered"], a["queue_full"], a["errors"], round(a["rss_before_mib"]), round(a["rss_after_mib"]),
                                 round(a["wall_s"], 1)]]})
        notes += a.get("notes", [])
    return {"description": "`python -m splam_studio.reliability`: faults injected into real runs; every figure measured.",
            "tables": tables, "notes": notes}


if __name__ == "__main__":
    main()
