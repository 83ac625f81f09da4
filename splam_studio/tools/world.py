"""The Shapes world's command line: build the teacher, time its stages, evaluate it, diagnose, draw a grid.

    python -m splam_studio.tools.world build --out weights --preset full
    python -m splam_studio.tools.world evaluate --weights weights

The recipe itself is `splam_studio.shapes.world`.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch

from ..models.loading import load_teacher
from ..shapes import world as W
from ..shapes.world import PRESETS, bench, build, evaluate, sample_grid, text_separation


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m splam_studio.tools.world", description=W.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="run the whole recipe")
    b.add_argument("--out", default="weights", help="folder for shapes-teacher/, shapes-evaluator/, recipe.json")
    b.add_argument("--preset", default="full", choices=sorted(PRESETS), help="full: the shipped weights; tiny: a smoke run")
    b.add_argument("--threads", type=int, default=2, help="torch CPU threads (the build machine has 2 cores)")
    b.add_argument("--print-config", action="store_true", help="print the resolved preset and exit")
    b.add_argument("--reuse-from", default=None,
                   help="a finished build folder: reuse its VAE and evaluator, train only text encoder + UNet")
    be = sub.add_parser("bench", help="time a few training steps of each stage")
    be.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    be.add_argument("--steps", type=int, default=6, help="timed steps per stage")
    ev = sub.add_parser("evaluate", help="teacher quality per split -> benchmarks/teacher.json")
    ev.add_argument("--weights", default="weights")
    ev.add_argument("--n", type=int, default=1000, help="captions per split")
    ev.add_argument("--steps", type=int, default=50)
    ev.add_argument("--guidance", type=float, default=None, help="default: the recipe's guidance scale")
    ev.add_argument("--threads", type=int, default=2)
    ev.add_argument("--out", default="benchmarks/teacher.json")
    dg = sub.add_parser("diagnose", help="text-encoder separation per attribute -> printed, and into teacher.json")
    dg.add_argument("--weights", default="weights")
    dg.add_argument("--out", default="benchmarks/teacher.json", help="updated in place if it exists")
    dg.add_argument("--threads", type=int, default=2)
    gr = sub.add_parser("grid", help="a captioned grid of teacher samples (train and held-out captions)")
    gr.add_argument("--weights", default="weights")
    gr.add_argument("--out", default="docs/teacher_grid.png")
    gr.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.cmd == "diagnose":
        sep = text_separation(load_teacher(str(Path(args.weights) / "shapes-teacher")))
        print(json.dumps(sep, indent=2))
        out = Path(args.out)
        if out.is_file():
            doc = json.loads(out.read_text())
            doc.setdefault("position_probe", {})["text_separation"] = sep
            out.write_text(json.dumps(doc, indent=2))
        return
    if args.cmd == "grid":
        print(sample_grid(args.weights, args.out))
        return
    if args.cmd == "evaluate":
        evaluate(args.weights, args.n, args.steps, args.guidance, args.out)
        return
    if args.cmd == "bench":
        bench(args.steps)
        return
    if args.print_config:
        print(json.dumps(asdict(PRESETS[args.preset]), indent=2))
        return
    build(args.out, args.preset, log=lambda s: print(s, flush=True), reuse_from=args.reuse_from)


if __name__ == "__main__":
    main()
