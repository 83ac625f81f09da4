"""SPLAD distillation from the command line: `python -m splam_studio.training --preset shapes --method splam`
(the same as `python train_cli.py ...` in a checkout, or the `splam-train` console script).

Flags map one-to-one onto the settings of `splam_studio.training.loop.TrainConfig` (flat; their help is each
field's metadata); presets fill defaults.
Multi-GPU: `accelerate launch -m splam_studio.training ...` (or `accelerate launch train_cli.py ...`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import typing
from pathlib import Path

from splam_studio.training.quiet import quiet_libraries

quiet_libraries()  # before the libraries are imported: only warnings a user can act on are printed

from splam_studio.training.loop import (SECTIONS, Interrupted, TrainConfig, TrainError, flat_fields,  # noqa: E402
                                        recorded_config, run, stop_report)
from splam_studio.store.runs import default_run_name, weights_dir  # noqa: E402
from splam_studio.training.device import configure_threads  # noqa: E402

PRESETS: dict[str, dict] = {
    # the embedded Shapes students: CPU-sized, one budget for both methods. Each value is the best of the measured
    # sweep (benchmarks/sweep.json, variants.json, seeds.json; the README's "Does it distil?" section says why):
    # 600 steps at a constant lr 1e-5, w 6.5 (the teacher's CFG 7.5), the gamma projection from zero at 30x lr,
    # p(gamma = 1) 0.8.
    "shapes": dict(teacher="shapes", data="shapes", max_steps=600, batch_size=32, lr=1e-5, w=6.5, cond_proj_init="zero",
                   gamma_one_prob=0.8, cond_proj_lr_scale=30.0, save_fp16=True,
                   checkpoint_every=200, validate_every=200, snapshot_every=200, shapes_size=20000,
                   validation_prompts=["one large red circle at the left on a black background",
                                       "two small yellow squares at the top on a gray background",
                                       "one large blue circle at the center on a white background"]),
    # an SD1.5 fine-tune on one consumer GPU: the authors' hyper-parameters, LoRA, gradient checkpointing.
    # Estimated need (training/memory.py, bf16): 12.4 GiB at batch 8 (11.4 GiB at --batch-size 2 --grad-accum 4),
    # 14.1 GiB without checkpointing; a 16 GB GPU fits it, a 12 GB one only at batch 1-2. On a CPU (fp32) ~19 GiB.
    "sd15": dict(teacher="stable-diffusion-v1-5/stable-diffusion-v1-5", max_steps=4000, batch_size=8, grad_accum=1,
                 lr=1e-4, lora_rank=64, w=8.0, gradient_checkpointing=True, resolution=512, checkpoint_every=500,
                 validate_every=500, validation_prompts=["a photo of a cat", "a watercolor painting of a lighthouse"]),
    # SDXL base (the teacher of the released SPLAM / LCM SDXL LoRAs) at its native 1024 px: LoRA rank 64 and gradient
    # checkpointing, as diffusers' LCM-LoRA SDXL script; batch 2 x 4 accumulated (8 per step). The family is read from
    # the teacher, so any SDXL folder, hub id or single file (+ --teacher-config offline) takes this preset.
    "sdxl": dict(teacher="stabilityai/stable-diffusion-xl-base-1.0", max_steps=4000, batch_size=2, grad_accum=4,
                 lr=1e-4, lora_rank=64, w=8.0, gradient_checkpointing=True, resolution=1024, checkpoint_every=500,
                 validate_every=500, validation_prompts=["a photo of a cat", "a watercolor painting of a lighthouse"]),
}


def _flag_type(tp):
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        return _flag_type(args[0])
    if origin is typing.Literal:  # the objective's choices (core.slode.Distance, GammaTime): checked by SpladConfig
        return type(args[0])
    return tp


def _show(value) -> str:
    return "unset" if value is None else repr(value) if isinstance(value, str) else str(value)


def _default_help(name: str, default) -> str:
    """'(default X; preset shapes: Y)': the dataclass default and each preset that sets another value."""
    presets = [f"{p}: {_show(v[name])}" for p, v in sorted(PRESETS.items()) if name in v and v[name] != default]
    return f" (default {_show(default)}" + (f"; preset {', '.join(presets)}" if presets else "") + ")"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="A preset fills every flag it names; flags given explicitly override it. "
                                       "--print-config shows the values a command would use. Memory (estimated by "
                                       "splam_studio/training/memory.py; the trainer warns before the first step when "
                                       "the device has less): preset shapes ~0.3 GiB (CPU); preset sd15 ~12.4 GiB "
                                       "(bf16 GPU, LoRA 64, batch 8, gradient checkpointing; 16 GB GPU), ~11.4 GiB "
                                       "at --batch-size 2 --grad-accum 4; a full SD1.5 fine-tune ~22 GiB.")
    p.add_argument("--preset", choices=sorted(PRESETS), help="named defaults; explicit flags override them")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: the cores the machine's load leaves "
                                               "idle, at least 1; or SPLAM_THREADS, which the studio sets)")
    hints = {sec: typing.get_type_hints(cls) for sec, cls in SECTIONS.items()}
    for sec, f in flat_fields():
        flag = "--" + f.name.replace("_", "-")
        tp = _flag_type(hints[sec][f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        text = f.metadata["help"]
        if f.name != "validation_prompts":
            text += _default_help(f.name, default)
        if tp is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif typing.get_origin(tp) is list:
            p.add_argument(flag, action="append", default=None, help=text)
        else:
            p.add_argument(flag, type=tp, default=None, help=text)
    return p


_NOT_RECORDED = ("resume", "overwrite", "output_dir", "run_name")


def _resume_values(values: dict) -> dict:
    """--resume: the run's own training_config.json under the preset and the flags given (run() refuses conflicts)."""
    resume = values["resume"]
    if not values.get("run_name"):
        ck = Path(resume).resolve()
        if resume == "latest" or ck.parent.name != "checkpoints":
            raise TrainError("--resume needs --run-name, the name of the run to continue (a folder in "
                             f"{values['output_dir']}), unless it names a checkpoint folder <run>/checkpoints/step-N")
        values = {**values, "run_name": ck.parent.parent.name, "output_dir": str(ck.parent.parent.parent)}
    recorded = recorded_config(Path(values["output_dir"]) / values["run_name"]) or {}
    return {**{k: v for k, v in recorded.items() if k not in _NOT_RECORDED}, **values}


def resolve(args: argparse.Namespace) -> TrainConfig:
    """Preset, then the flags given; with --resume the run's own settings under both. The run name is fixed here."""
    preset = PRESETS.get(args.preset or "", {})
    values = dict(preset)
    values.update({k: v for k, v in vars(args).items() if k not in ("preset", "print_config", "threads") and v is not None})
    if args.validation_prompts is None and (values.get("prompts") or values.get("data") != preset.get("data")):
        values.pop("validation_prompts", None)  # a preset's prompts describe its data: the run's own captions are used
    values.setdefault("output_dir", str(weights_dir()))  # the studio's folder: one rule (store.runs)
    if values.get("resume"):
        values = _resume_values(values)
    cfg = TrainConfig(**values)
    cfg.validate()
    return dataclasses.replace(cfg, run_name=cfg.run_name or default_run_name(cfg.method))


def interrupted_message(cfg: TrainConfig, e: BaseException) -> str:
    """The CLI's last words after Ctrl-C or SIGTERM: what is on disk and the command that resumes this very run."""
    name = signal.Signals(e.signum).name if isinstance(e, Interrupted) else "SIGINT"
    default = Path(cfg.output_dir).resolve() == weights_dir().resolve()
    return f"interrupted ({name}): " + stop_report(Path(cfg.output_dir) / cfg.run_name,
                                                    restored=getattr(e, "restored", False),
                                                    output_dir_flag=None if default else cfg.output_dir)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = None
    try:
        cfg = resolve(args)
        if args.print_config:
            print(json.dumps(cfg.flat(), indent=2))
            return 0
        configure_threads(args.threads)
        run(cfg)
    except (TrainError, ValueError, FileNotFoundError) as e:  # ModelLoadError and DataError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Interrupted (SIGINT or SIGTERM) from run(), or a Ctrl-C before it started
        msg = interrupted_message(cfg, e) if cfg is not None else "interrupted before the run started"
        print("\n" + msg, file=sys.stderr)  # on a line of its own, after a progress bar's carriage returns
        return 128 + getattr(e, "signum", signal.SIGINT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
