"""The Shapes world's command line: build the teacher, time its stages, evaluate it, diagnose, draw a grid.

    python -m splam_studio.tools.world build --out weights --preset full
    python -m splam_studio.tools.world evaluate --weights weights
    python -m splam_studio.tools.world build --out weights --preset xl        # Shapes-XL, on weights' VAE
    python -m splam_studio.tools.world evaluate --weights weights --teacher shapes-xl-teacher --out /tmp/xl.json
    python -m splam_studio.tools.world prompts --n 2048 --out runs/shapes_prompts.txt   # for train_cli.py --prompts

The recipe is `splam_studio.shapes.build` (presets in `shapes.recipe`); the measurements are `shapes.probes`.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch

from ..models.loading import load_teacher
from ..shapes import build as recipe_build
from ..shapes.build import bench, build
from ..shapes.probes import evaluate, sample_grid, text_separation
from ..shapes.recipe import PRESETS
from ..training.device import pick_device


_XL = recipe_build.TEACHER_DIRS["xl"]
DEFAULT_OUT = {cmd: {recipe_build.TEACHER_DIRS["sd"]: sd, _XL: xl} for cmd, sd, xl in (
    ("evaluate", "benchmarks/teacher.json", "benchmarks/teacher-xl.json"),
    ("diagnose", "benchmarks/teacher.json", "benchmarks/teacher-xl.json"),
    ("grid", "docs/teacher_grid.png", "docs/teacher_xl_grid.png"))}


def main(argv: list[str] | None = None) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--threads", type=int, default=2, help="torch CPU threads (the build machine has 2 cores)")
    common.add_argument("--device", default="auto", choices=("auto", "cuda", "mps", "cpu"),
                        help="where to run: auto is CUDA, then MPS, then the CPU")
    teacher = argparse.ArgumentParser(add_help=False)
    teacher.add_argument("--teacher", default="shapes-teacher", choices=tuple(recipe_build.TEACHER_DIRS.values()),
                         help="the teacher folder under --weights: shapes-teacher (SD) or shapes-xl-teacher (Shapes-XL)")
    ap = argparse.ArgumentParser(prog="python -m splam_studio.tools.world", description=recipe_build.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", parents=[common], help="run the whole recipe")
    b.add_argument("--out", default="weights", help="folder for shapes-teacher/, shapes-evaluator/, recipe.json")
    b.add_argument("--preset", default="full", choices=sorted(PRESETS),
                   help="full: the shipped weights; tiny: a smoke run; xl: the Shapes-XL (SDXL) teacher; xl-tiny: its smoke run")
    b.add_argument("--print-config", action="store_true", help="print the resolved preset and exit")
    b.add_argument("--reuse-from", default=None,
                   help="a finished build folder: reuse its VAE and evaluator, train only text encoder + UNet")
    be = sub.add_parser("bench", parents=[common], help="time a few training steps of each stage")
    be.add_argument("--steps", type=int, default=6, help="timed steps per stage")
    be.add_argument("--preset", default="full", choices=sorted(PRESETS), help="whose models and batch sizes to time")
    ev = sub.add_parser("evaluate", parents=[common, teacher], help="teacher quality per split -> benchmarks/teacher.json")
    ev.add_argument("--weights", default="weights", help="folder holding shapes-teacher/ and shapes-evaluator/")
    ev.add_argument("--n", type=int, default=1000, help="captions per split")
    ev.add_argument("--steps", type=int, default=50, help="DDIM steps per image")
    ev.add_argument("--guidance", type=float, default=None, help="default: the recipe's guidance scale")
    ev.add_argument("--out", default=None,
                    help="where the JSON report goes (default benchmarks/teacher.json; Shapes-XL: teacher-xl.json there)")
    dg = sub.add_parser("diagnose", parents=[common, teacher],
                        help="text-encoder separation per attribute -> printed, and into teacher.json")
    dg.add_argument("--weights", default="weights", help="folder holding shapes-teacher/")
    dg.add_argument("--out", default=None, help="updated in place if it exists (default: as evaluate's)")
    gr = sub.add_parser("grid", parents=[common, teacher], help="a captioned grid of teacher samples (train and held-out captions)")
    gr.add_argument("--weights", default="weights", help="folder holding shapes-teacher/")
    gr.add_argument("--out", default=None, help="where the PNG goes (default docs/teacher_grid.png; Shapes-XL: "
                                               "docs/teacher_xl_grid.png)")
    pr = sub.add_parser("prompts", help="a prompts file of training-split captions, for train_cli.py --prompts")
    pr.add_argument("--n", type=int, default=2048, help="captions (scenes drawn from the training split)")
    pr.add_argument("--seed", type=int, default=12345, help="scene seed (the bench's captions are held-out ones)")
    pr.add_argument("--out", required=True, help="the text file to write, one caption a line")
    args = ap.parse_args(argv)
    if args.cmd == "prompts":
        from ..shapes.grammar import sample_specs
        from ..store.atomic import atomic_write

        lines = "".join(spec.caption() + "\n" for spec in sample_specs(args.n, args.seed, "train"))
        atomic_write(Path(args.out), lambda tmp: tmp.write_text(lines))
        print(f"{args.n} training-split captions -> {args.out}")
        return
    if args.cmd == "build" and args.print_config:
        print(json.dumps(asdict(PRESETS[args.preset]), indent=2))
        return
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    if args.cmd in DEFAULT_OUT and args.out is None:  # each teacher its own report, so one never overwrites the other
        args.out = DEFAULT_OUT[args.cmd][args.teacher]
    if args.cmd == "diagnose":
        sep = text_separation(load_teacher(str(Path(args.weights) / args.teacher)).to(device))
        print(json.dumps(sep, indent=2))
        out = Path(args.out)
        if out.is_file():
            doc = json.loads(out.read_text())
            doc.setdefault("position_probe", {})["text_separation"] = sep
            out.write_text(json.dumps(doc, indent=2))
    elif args.cmd == "grid":
        print(sample_grid(args.weights, args.out, device=device, teacher=args.teacher))
    elif args.cmd == "evaluate":
        evaluate(args.weights, args.n, args.steps, args.guidance, args.out, device=device, teacher=args.teacher)
    elif args.cmd == "bench":
        bench(args.steps, device=device, preset=args.preset)
    else:
        build(args.out, args.preset, log=lambda s: print(s, flush=True), reuse_from=args.reuse_from, device=device)


if __name__ == "__main__":
    main()
