"""The Compare tab's latencies, idle and on a loaded machine, side by side in one run (issue 26: honest latency).

    python -m splam_studio.tools.compare_latency                  # -> benchmarks/compare_latency.json (BENCHMARKS.md)
    python -m splam_studio.tools.compare_latency --requests 6 --load 2

`Studio.compare` on the embedded Shapes models, exactly as the page calls it: teacher, LCM and SPLAM timed in
interleaved rounds (one warm-up round not counted, then 3 timed), the same prompts and seeds in both conditions. The
loaded condition adds `--load` busy-loop processes that this command starts and ends itself. Per condition: each
panel's median latency and the spread of its rounds, the UNet calls per image, how often the two students' ranges
overlapped (they make the same UNet calls on the same architecture, so they should), and the page's own verdict.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

from .threads_bench import _burn

ROLES = ("teacher", "lcm", "splam")


def overlap(a: list[float], b: list[float]) -> bool:
    """Whether two runs' ranges [min, max] meet."""
    return min(a) <= max(b) and min(b) <= max(a)


def summarise(label: str, load: int, results: list, loads: tuple[float, float] | None = None) -> dict:
    """One condition's row per panel and the students' overlap count, from CompareResult objects; `loads` the 1-min
    load average before and after."""
    rows = []
    for role in ROLES:
        panels = [r.panel(role) for r in results]
        rows.append({"condition": label, "background_load": load, "panel": role,
                     "median_ms": statistics.median(p.latency_ms for p in panels),
                     "spread_ms": statistics.median(max(p.latency_runs) - min(p.latency_runs) for p in panels),
                     "unet_calls": sorted({p.unet_calls for p in panels})})
    pairs = [(r.panel("lcm").latency_runs, r.panel("splam").latency_runs) for r in results]
    return {"rows": rows, "requests": len(results), "students_overlap": sum(overlap(a, b) for a, b in pairs),
            "splam_over_lcm": statistics.median(statistics.median(b) / statistics.median(a) for a, b in pairs),
            "same_architecture": all(r.same_architecture for r in results), "loadavg_1min": loads}


def to_report(conditions: list[dict], threads: int, student_steps: int, teacher_steps: int) -> dict:
    cols = ["condition", "panel", "UNet calls per image", "median latency (ms)", "median spread of rounds (ms)"]
    table = [[c["rows"][0]["condition"], r["panel"], ",".join(map(str, r["unet_calls"])), round(r["median_ms"], 1),
              round(r["spread_ms"], 1)] for c in conditions for r in c["rows"]]
    verdicts = [[c["rows"][0]["condition"], f"{c['students_overlap']} of {c['requests']}", round(c["splam_over_lcm"], 3),
                 "yes" if c["same_architecture"] else "no",
                 "-" if not c["loadavg_1min"] else "{:.1f}-{:.1f}".format(*c["loadavg_1min"])] for c in conditions]
    return {"description": f"`python -m splam_studio.tools.compare_latency`: `Studio.compare` on the embedded Shapes "
                           f"models as the Compare tab calls it ({teacher_steps} teacher DDIM steps at CFG 7.5, "
                           f"{student_steps} student steps; teacher, LCM and SPLAM in interleaved rounds, one warm-up "
                           f"round not counted, then 3 timed), {threads} torch thread(s), the same prompts and seeds "
                           "in both conditions. The loaded condition adds busy-loop processes started by the command. "
                           "Both students make the same UNet calls on the same architecture, so their latencies "
                           "should overlap; the page says so when they do.",
            "tables": [{"title": "Compare-tab latency, idle and loaded", "columns": cols, "rows": table},
                       {"title": "LCM against SPLAM, per request",
                        "columns": ["condition", "students' ranges overlap", "SPLAM / LCM median (median over requests)",
                                    "same architecture", "1-min load before-after"], "rows": verdicts}],
            "conditions": conditions}


def measure(studio, prompts: list[str], student_steps: int, teacher_steps: int) -> tuple[list, tuple[float, float]]:
    before = os.getloadavg()[0]
    results = [studio.compare(p, seed=i, student_steps=student_steps, teacher_steps=teacher_steps)
               for i, p in enumerate(prompts)]
    return results, (before, os.getloadavg()[0])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=6, help="compare requests per condition (prompt i at seed i)")
    p.add_argument("--load", type=int, default=2, help="busy-loop processes in the loaded condition")
    p.add_argument("--settle", type=float, default=20.0, help="seconds the load runs before the loaded condition")
    p.add_argument("--student-steps", type=int, default=4)
    p.add_argument("--teacher-steps", type=int, default=25)
    p.add_argument("--out", default="benchmarks/compare_latency.json")
    a = p.parse_args(argv)
    import torch

    from ..shapes.grammar import sample_specs
    from ..studio.logic import Studio

    studio = Studio(device="cpu", precision="no", model_set="shapes")
    prompts = [spec.caption() for spec in sample_specs(a.requests, seed=0, split="heldout")]
    conditions = [summarise("idle", 0, *measure(studio, prompts, a.student_steps, a.teacher_steps))]
    deadline = time.time() + 1800  # bounded even if this process dies; ended below in any case
    procs = [mp.Process(target=_burn, args=(deadline,), daemon=True) for _ in range(a.load)]
    for proc in procs:
        proc.start()
    try:
        time.sleep(a.settle)
        conditions.append(summarise("loaded", a.load, *measure(studio, prompts, a.student_steps, a.teacher_steps)))
    finally:
        for proc in procs:
            proc.terminate()
            proc.join()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(to_report(conditions, torch.get_num_threads(), a.student_steps, a.teacher_steps),
                              indent=1) + "\n")
    print(f"wrote {out} (load average now {os.getloadavg()[0]:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
