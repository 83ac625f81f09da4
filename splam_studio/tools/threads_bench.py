"""Threads benchmark: torch's CPU thread count on an idle and on a loaded machine, side by side in one run.

    python -m splam_studio.tools.threads_bench                     # -> benchmarks/threads.json (BENCHMARKS.md: Threads)
    python -m splam_studio.tools.threads_bench --load 4 --repeats 5

Two conditions, one after the other in the same run: the machine as it is ("idle"), then with `--load` busy-loop
processes that this command starts and ends itself (bounded by the condition's duration). In each condition the
settings (1 thread, one per core, and `training.device.default_threads()`, the studio's and trainer's default, which
reads the 1-minute load average) run round-robin, each in its own fresh process, so that a setting never inherits
another's thread pool. Each process times the embedded Shapes teacher's UNet on a guided batch (what one teacher
sampling step costs) and one SPLAD training step of the student, and reports the medians.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _burn(deadline: float) -> None:
    while time.time() < deadline:
        pass


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def measure(threads: int | None, steps: int) -> dict:
    """In this process: set threads (None = the library's default choice), time UNet steps and SPLAD steps."""
    import torch

    from ..core.schedule import NoiseSchedule
    from ..core.splad import SpladConfig, splad_loss
    from ..core.student import build_student, make_target
    from ..core.teacher import encode_text
    from ..models.loading import load_teacher
    from ..training.device import configure_threads

    from ..training.quiet import quiet_libraries

    quiet_libraries()
    chosen = configure_threads(threads)
    pipe = load_teacher("shapes")
    unet = pipe.unet.requires_grad_(False).eval()
    C, S = unet.config.in_channels, unet.config.sample_size
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        cond = encode_text(pipe, ["one small red circle at the left on a black background"] * 2)
    z = torch.randn(2, C, S, S, generator=g)
    t = torch.tensor([499, 499])

    def unet_step():
        with torch.no_grad():
            unet(z, t, encoder_hidden_states=cond).sample

    student = build_student(unet, "fresh", generator=torch.Generator().manual_seed(0)).train()
    target = make_target(student)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-5)
    schedule = NoiseSchedule.from_config(pipe.scheduler.config)
    with torch.no_grad():
        uncond = encode_text(pipe, [""] * 2)
    z0 = torch.randn(2, C, S, S, generator=g)

    def train_step():
        loss = splad_loss(SpladConfig(method="splam"), schedule, student, target, unet, z0, cond, uncond,
                          torch.Generator().manual_seed(1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    out = {"threads": chosen}
    for name, fn in (("unet_ms", unet_step), ("train_step_ms", train_step)):
        fn()  # warm-up
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000)
        out[name] = statistics.median(times)
    return out


def _child(threads: int | None, steps: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "SPLAM_THREADS", "MKL_NUM_THREADS")}
    cmd = [sys.executable, "-m", "splam_studio.tools.threads_bench", "--child", "default" if threads is None else str(threads),
           "--steps", str(steps)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if r.returncode:
        raise RuntimeError(f"threads_bench child failed: {r.stderr.strip().splitlines()[-1:] or r.returncode}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def condition(label: str, load: int, repeats: int, steps: int, settle: float) -> list[dict]:
    """Round-robin over the settings in one condition; `load` busy processes run through all of it."""
    procs = []
    if load:
        deadline = time.time() + 3600  # bounded even if this process dies; terminated below in any case
        procs = [mp.Process(target=_burn, args=(deadline,), daemon=True) for _ in range(load)]
        for p in procs:
            p.start()
        time.sleep(settle)  # let the 1-minute load average see the load, as a user's studio would at start-up
    try:
        settings: list[int | None] = sorted({1, _cores()}) + [None]
        runs: dict[str, list[dict]] = {}
        loads = []
        for _ in range(repeats):
            for s in settings:
                loads.append(os.getloadavg()[0])
                runs.setdefault("default" if s is None else str(s), []).append(_child(s, steps))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.join()
    rows = []
    for key, rs in runs.items():
        rows.append({"condition": label, "background_load": load, "setting": key,
                     "threads": sorted({r["threads"] for r in rs}),
                     "unet_ms": statistics.median(r["unet_ms"] for r in rs),
                     "unet_ms_range": [min(r["unet_ms"] for r in rs), max(r["unet_ms"] for r in rs)],
                     "train_step_ms": statistics.median(r["train_step_ms"] for r in rs),
                     "train_step_ms_range": [min(r["train_step_ms"] for r in rs), max(r["train_step_ms"] for r in rs)],
                     "loadavg_1min": [round(min(loads), 2), round(max(loads), 2)]})
    return rows


def to_report(rows: list[dict], cores: int, load: int) -> dict:
    cols = ["condition", "setting", "threads used", "teacher UNet step (ms)", "vs 1 thread", "SPLAD step (ms)", "vs 1 thread",
            "1-min load during"]
    table = []
    for r in rows:
        one = next(x for x in rows if x["condition"] == r["condition"] and x["setting"] == "1")
        table.append([r["condition"], r["setting"], ",".join(map(str, r["threads"])), round(r["unet_ms"], 1),
                      round(r["unet_ms"] / one["unet_ms"], 2), round(r["train_step_ms"], 1),
                      round(r["train_step_ms"] / one["train_step_ms"], 2), f"{r['loadavg_1min'][0]}-{r['loadavg_1min'][1]}"])
    return {"description": f"`python -m splam_studio.tools.threads_bench --load {load}`: {cores} cores; medians over "
                           "fresh processes per setting, the settings round-robin; 'default' is "
                           "`training.device.default_threads()`, what the studio and the trainer use when no `--threads` "
                           "is given (the cores the 1-minute load average leaves idle, at least 1). The loaded condition "
                           f"adds {load} busy-loop processes started by the command.",
            "tables": [{"title": "Threads: idle against loaded, side by side", "columns": cols, "rows": table}],
            "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", type=int, default=4, help="busy-loop processes in the loaded condition")
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per setting and condition")
    p.add_argument("--steps", type=int, default=5, help="timed steps per process (after one warm-up)")
    p.add_argument("--settle", type=float, default=45.0, help="seconds the load runs before the loaded condition is timed")
    p.add_argument("--out", default="benchmarks/threads.json")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(measure(None if a.child == "default" else int(a.child), a.steps)))
        return 0
    rows = condition("idle", 0, a.repeats, a.steps, 0) + condition("loaded", a.load, a.repeats, a.steps, a.settle)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(to_report(rows, _cores(), a.load), indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
