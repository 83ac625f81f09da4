"""Trainer benchmark: SPLAD step time and peak memory, SPLAM against LCM, in one run of this command.

    python -m splam_studio.trainer_bench                 # the embedded Shapes teacher on this machine
    python -m splam_studio.trainer_bench --sd15 --batches 1 2 4   # an SD1.5-sized UNet, random weights (GPU)

Each configuration runs in its own subprocess (so peak memory is its own); SPLAM and LCM alternate.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8)


def _one(args) -> dict:
    """Time `steps` SPLAD steps of one configuration in this process."""
    from diffusers import UNet2DConditionModel

    from .device import resolve_runtime
    from .schedule import NoiseSchedule
    from .splad import SpladConfig, splad_loss
    from .student import build_student, ema_update, make_target

    rt = resolve_runtime(args.device, args.precision)
    dev = rt.device
    if args.sd15:
        teacher = UNet2DConditionModel(**SD15_UNET)
        schedule, L, D = NoiseSchedule.from_config(), 77, 768
    else:
        from .models import load_teacher

        pipe = load_teacher("shapes")
        teacher, schedule = pipe.unet, NoiseSchedule.from_scheduler(pipe.scheduler)
        L, D = pipe.tokenizer.model_max_length, pipe.text_encoder.config.hidden_size
    student = build_student(teacher, "fresh", generator=torch.Generator().manual_seed(0))
    if args.lora:
        from peft import LoraConfig

        from .train import LORA_TARGETS

        student.requires_grad_(False)
        student.add_adapter(LoraConfig(r=args.lora, lora_alpha=args.lora, target_modules=LORA_TARGETS))
        student.time_embedding.cond_proj.requires_grad_(True)
    if args.checkpointing:
        student.enable_gradient_checkpointing()
    target = make_target(student).to(dev)
    teacher = teacher.requires_grad_(False).to(dev, rt.weight_dtype)
    student.to(dev).train()
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-5)
    cfg = SpladConfig(method=args.method)
    C, S = teacher.config.in_channels, teacher.config.sample_size
    g = torch.Generator().manual_seed(0)
    z_0 = torch.randn(args.batch, C, S, S, generator=g).to(dev)
    cond, uncond = torch.randn(args.batch, L, D, generator=g).to(dev), torch.zeros(args.batch, L, D).to(dev)
    times = []
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(args.steps + 1):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=rt.weight_dtype, enabled=rt.mixed_precision != "no"):
            loss = splad_loss(cfg, schedule, student, target, teacher, z_0, cond, uncond, g)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema_update(target, student)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() / 2**20) if dev.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"method": args.method, "batch": args.batch, "lora": args.lora, "checkpointing": args.checkpointing,
            "step_s": statistics.median(times[1:]), "steps_per_s": 1 / statistics.median(times[1:]), "peak_mib": peak,
            "peak_kind": "CUDA max allocated" if dev.type == "cuda" else "process max RSS", "device": str(dev),
            "precision": rt.mixed_precision}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sd15", action="store_true", help="an SD1.5-sized UNet with random weights instead of the Shapes teacher")
    p.add_argument("--batches", type=int, nargs="+", default=[16], help="batch sizes")
    p.add_argument("--steps", type=int, default=10, help="timed steps per configuration (after one warm-up)")
    p.add_argument("--lora-ranks", type=int, nargs="+", default=[0], help="0 = full fine-tune")
    p.add_argument("--checkpointing", choices=["off", "on", "both"], default="off")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto")
    p.add_argument("--out", default="benchmarks/trainer.json")
    p.add_argument("--_one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", default="splam", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=16, help=argparse.SUPPRESS)
    p.add_argument("--lora", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._one:
        a.checkpointing = a.checkpointing == "on"
        print("RESULT " + json.dumps(_one(a)))
        return
    ckpt = {"off": [False], "on": [True], "both": [False, True]}[a.checkpointing]
    results = []
    for batch in a.batches:
        for lora in a.lora_ranks:
            for cp in ckpt:
                for method in ("lcm", "splam"):
                    cmd = [sys.executable, "-m", "splam_studio.trainer_bench", "--_one", "--method", method, "--batch", str(batch),
                           "--lora", str(lora), "--steps", str(a.steps), "--checkpointing", "on" if cp else "off",
                           "--device", a.device, "--precision", a.precision] + (["--sd15"] if a.sd15 else [])
                    out = subprocess.run(cmd, capture_output=True, text=True)
                    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
                    if line is None:
                        print(out.stderr[-2000:], file=sys.stderr)
                        raise SystemExit(f"configuration failed: {' '.join(cmd)}")
                    results.append(json.loads(line[7:]))
                    print(results[-1])
    rows = []
    for r in results:
        if r["method"] == "splam":
            base = next(x for x in results if x["method"] == "lcm" and all(x[k] == r[k] for k in ("batch", "lora", "checkpointing")))
            rows.append([r["batch"], r["lora"] or "full", "on" if r["checkpointing"] else "off", round(base["step_s"], 4),
                         round(r["step_s"], 4), round(r["step_s"] / base["step_s"], 3), round(base["peak_mib"]), round(r["peak_mib"])])
    model = "SD1.5-sized UNet (random weights, 64x64 latents)" if a.sd15 else "embedded Shapes teacher"
    doc = {"description": f"`python -m splam_studio.trainer_bench{' --sd15' if a.sd15 else ''}`: {model}, device {results[0]['device']}, "
                          f"precision {results[0]['precision']}, median of {a.steps} steps after a warm-up; each configuration in its own "
                          f"process, LCM and SPLAM alternating. Peak memory: {results[0]['peak_kind']}.",
           "tables": [{"title": "step time (s) and peak memory (MiB)",
                       "columns": ["batch", "LoRA rank", "grad. ckpt", "LCM s/step", "SPLAM s/step", "SPLAM / LCM", "LCM MiB", "SPLAM MiB"],
                       "rows": rows}],
           "notes": ["SPLAM adds one sigma_gamma and one SL-ODE interpolation per step over LCM; the UNet calls are the same "
                     "(2 teacher, 1 student, 1 target), so the ratio should be close to 1."],
           "raw": results}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(doc, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
