"""Trainer benchmark: SPLAD step time and peak memory, SPLAM against LCM, in one run of this command.

    python -m splam_studio.tools.trainer_bench                 # the embedded Shapes teacher on this machine
    python -m splam_studio.tools.trainer_bench --sd15 --batches 1 2 4   # an SD1.5-sized UNet, random weights (GPU)
    python -m splam_studio.tools.trainer_bench --cache [--sd15]          # a step with and without the latent cache
    python -m splam_studio.tools.trainer_bench --one-step                # SPLAM with each 1-step term of issue 25

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

# A timed configuration of SPLAD: a name -> SpladConfig fields. The 1-step terms (issue 25) at the ablations' values.
VARIANTS: dict[str, dict] = {
    "lcm": {"method": "lcm"},
    "splam": {"method": "splam"},
    "splam + regression 0.25": {"method": "splam", "regression": 0.25},
    "splam + k 100 from t >= 500": {"method": "splam", "k_high": 100, "t_high": 500},
    "splam + p(t = 999) 0.25": {"method": "splam", "t_top_prob": 0.25},
    "splam + adversarial 0.1": {"method": "splam", "adversarial": 0.1},
    "splam + dmd 1": {"method": "splam", "dmd": 1.0},
}
ONE_STEP = tuple(name for name in VARIANTS if name.startswith("splam"))  # plain SPLAM first, then each term

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8)


def make_student(teacher, lora: int, checkpointing: bool):
    """The student of a run: build_student, then LoRA of rank `lora` on train.LORA_TARGETS (0 = full fine-tune)."""
    from ..core.student import build_student

    student = build_student(teacher, "fresh", generator=torch.Generator().manual_seed(0))
    if lora:
        from peft import LoraConfig

        from ..training.loop import LORA_TARGETS

        student.requires_grad_(False)
        student.add_adapter(LoraConfig(r=lora, lora_alpha=lora, target_modules=LORA_TARGETS))
        student.time_embedding.cond_proj.requires_grad_(True)
    if checkpointing:
        student.enable_gradient_checkpointing()
    return student


def _update(loss, opt, scaler, student, target) -> None:
    """The training step after the loss: backward (scaled under fp16), optimiser step, EMA target update."""
    from ..core.student import ema_update

    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    else:
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    ema_update(target, student)


def time_steps(rt, teacher, schedule, text_shape: tuple[int, int], *, methods=("lcm", "splam"), batch: int, lora: int,
               checkpointing: bool, steps: int) -> list[dict]:
    """Median time of `steps` SPLAD steps (after one warm-up) per method (a VARIANTS name), and peak memory, on one
    student.

    The methods alternate step by step on the same student, target and teacher, so they share the machine's state.
    Mixed precision as in training: autocast in rt's dtype; fp16 adds a GradScaler.
    """
    from ..core.splad import SpladConfig, splad_loss
    from ..core.student import make_target

    dev = rt.device
    teacher = teacher.requires_grad_(False).to(dev, rt.weight_dtype)
    student = make_student(teacher, lora, checkpointing).to(dev).train()
    target = make_target(student)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-5)
    scaler = torch.amp.GradScaler(dev.type) if rt.grad_scaler else None
    from ..training.loop import TrainConfig, make_critic, make_critic_optimizer

    critics = {}  # variant -> (critic, its optimiser), as the loop makes them
    for m in methods:
        cfg = TrainConfig(**{k: VARIANTS[m][k] for k in ("adversarial", "dmd") if k in VARIANTS[m]})
        if (net := make_critic(teacher, cfg)) is not None:
            critics[m] = (net.to(dev), make_critic_optimizer(net, cfg))
    C, S = teacher.config.in_channels, teacher.config.sample_size
    (L, Dm), g = text_shape, torch.Generator().manual_seed(0)
    z_0 = torch.randn(batch, C, S, S, generator=g).to(dev)
    z_T = torch.randn(batch, C, S, S, generator=g).to(dev)  # the regression's teacher noise (teacher data stores it)
    cond, uncond = torch.randn(batch, L, Dm, generator=g).to(dev, rt.weight_dtype), torch.zeros(batch, L, Dm).to(dev, rt.weight_dtype)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (torch.mps.synchronize if dev.type == "mps" else lambda: None)
    times: dict[str, list[float]] = {m: [] for m in methods}
    peaks: dict[str, float] = {}
    for i in range(steps + 1):
        for m in methods:
            if dev.type == "cuda" and i == 1:
                torch.cuda.reset_peak_memory_stats()
            sync()
            t0 = time.perf_counter()
            with torch.autocast(dev.type, dtype=rt.weight_dtype, enabled=rt.mixed_precision != "no"):
                adv = {"critic": critics[m][0]} if m in critics else {}
                loss = splad_loss(SpladConfig(**VARIANTS[m]), schedule, student, target, teacher, z_0, cond, uncond, g,
                                  z_T=z_T, **adv)
            _update(loss, opt, scaler, student, target)
            if adv:
                critics[m][1].step()
                critics[m][1].zero_grad(set_to_none=True)
            sync()
            if i:
                times[m].append(time.perf_counter() - t0)
            if dev.type == "cuda" and i == steps:
                peaks[m] = torch.cuda.max_memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = [{"method": m, "batch": batch, "lora": lora, "checkpointing": checkpointing,
            "step_s": statistics.median(times[m]), "steps_per_s": 1 / statistics.median(times[m]),
            "peak_mib": peaks.get(m, rss), "peak_kind": "CUDA max allocated" if dev.type == "cuda" else "process max RSS",
            "device": str(dev), "precision": rt.mixed_precision} for m in methods]
    del student, target, opt
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return out


def time_cache(rt, pipe, *, batch: int, lora: int, checkpointing: bool, steps: int, resolution: int) -> dict:
    """Median time of a whole training step (z_0 and text embeddings, then the SPLAD step) from pixels and captions
    against the same step from the latent cache, alternating step by step on one student (training/latents.py)."""
    from ..core.splad import SpladConfig, splad_loss
    from ..core.student import make_target
    from ..core.schedule import NoiseSchedule
    from ..core.teacher import encode_text
    from ..training.latents import batch_latents

    dev = rt.device
    teacher = pipe.unet.requires_grad_(False).to(dev, rt.weight_dtype)
    pipe.text_encoder.requires_grad_(False).to(dev, rt.weight_dtype)
    pipe.vae.requires_grad_(False).to(dev, rt.vae_dtype)
    student = make_student(teacher, lora, checkpointing).to(dev).train()
    target = make_target(student)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-5)
    schedule = NoiseSchedule.from_scheduler(pipe.scheduler)
    g = torch.Generator().manual_seed(0)
    captions = ["one large red circle at the left on a black background"] * batch
    raw = {"pixel_values": torch.rand(batch, 3, resolution, resolution, generator=g) * 2 - 1, "caption": captions}
    with torch.no_grad():
        dist = pipe.vae.encode(raw["pixel_values"].to(dev, rt.vae_dtype)).latent_dist
        cached = {"mean": dist.mean.float().cpu(), "std": dist.std.float().cpu(),
                  "cond": encode_text(pipe, captions, dev).float().cpu(), "caption": captions}
        uncond_1 = encode_text(pipe, [""], dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (torch.mps.synchronize if dev.type == "mps" else lambda: None)
    times: dict[str, list[float]] = {"uncached": [], "cached": []}
    for i in range(steps + 1):
        for kind, b in (("uncached", raw), ("cached", cached)):
            sync()
            t0 = time.perf_counter()
            z_0, cond, uncond = batch_latents(b, pipe, dev, rt.vae_dtype, g, uncond_1)
            with torch.autocast(dev.type, dtype=rt.weight_dtype, enabled=rt.mixed_precision != "no"):
                loss = splad_loss(SpladConfig(method="splam"), schedule, student, target, teacher, z_0, cond, uncond, g)
            _update(loss, opt, None, student, target)
            sync()
            if i:
                times[kind].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"batch": batch, "lora": lora, "checkpointing": checkpointing, "resolution": resolution,
            "uncached_s": med["uncached"], "cached_s": med["cached"], "ratio": med["cached"] / med["uncached"],
            "device": str(dev), "precision": rt.mixed_precision, "steps": steps}


def _cache_one(args) -> dict:
    from ..training.device import resolve_runtime

    rt = resolve_runtime(args.device, args.precision)
    if args.sd15:
        import tempfile

        from diffusers import StableDiffusionPipeline

        from .gpu_check import build_pipeline

        folder = build_pipeline(Path(tempfile.mkdtemp(prefix="sd15-")) / "teacher", "sd15", device=str(rt.device))
        pipe = StableDiffusionPipeline.from_pretrained(str(folder), torch_dtype=torch.float32, safety_checker=None,
                                                       use_safetensors=True)
        resolution = 512
    else:
        from ..models.loading import load_teacher

        pipe = load_teacher("shapes")
        resolution = pipe.unet.config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    return time_cache(rt, pipe, batch=args.batch, lora=args.lora, checkpointing=args.checkpointing == "on",
                      steps=args.steps, resolution=resolution)


def cache_main(a) -> None:
    """--cache: a row per model (the Shapes teacher; with --sd15 also the SD1.5-sized one), each in its own process."""
    rows, raw = [], []
    for sd15 in ([False, True] if a.sd15 else [False]):
        batch = 1 if sd15 else a.batches[0]
        cmd = [sys.executable, "-m", "splam_studio.tools.trainer_bench", "--_cache_one", "--batch", str(batch),
               "--lora", str(a.lora_ranks[0] if not sd15 else max(a.lora_ranks[0], 4)), "--steps", str(a.steps),
               "--checkpointing", "on" if sd15 else "off", "--device", a.device, "--precision", a.precision] + (["--sd15"] if sd15 else [])
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(out.stderr[-2000:], file=sys.stderr)
            raise SystemExit(f"configuration failed: {' '.join(cmd)}")
        r = json.loads(line[7:])
        print(r)
        raw.append(r)
        rows.append(["SD1.5-sized UNet, VAE and CLIP (random weights)" if sd15 else "embedded Shapes teacher", r["resolution"],
                     r["batch"], r["lora"] or "full", "on" if r["checkpointing"] else "off", round(r["uncached_s"], 4),
                     round(r["cached_s"], 4), round(r["ratio"], 3)])
    doc = {"description": f"`python -m splam_studio.tools.trainer_bench --cache{' --sd15' if a.sd15 else ''}`: one whole training "
                          "step (z_0 and text embeddings, then the SPLAD step and the EMA update) from pixels and captions "
                          "against the same step from the latent cache (`--cache-latents`), alternating step by step on one "
                          f"student in one process; median of {a.steps} steps after a warm-up; device {raw[0]['device']}, "
                          f"precision {raw[0]['precision']}.",
           "tables": [{"title": "step time with and without the latent cache (s)",
                       "columns": ["model", "px", "batch", "LoRA rank", "grad. ckpt", "uncached s/step", "cached s/step",
                                   "cached / uncached"], "rows": rows}],
           "raw": raw}
    _write(a.out, doc)


def _one(args) -> dict:
    """Time `steps` SPLAD steps of one configuration in this process."""
    from diffusers import UNet2DConditionModel

    from ..training.device import resolve_runtime
    from ..core.schedule import NoiseSchedule

    rt = resolve_runtime(args.device, args.precision)
    if args.sd15:
        teacher = UNet2DConditionModel(**SD15_UNET)
        schedule, L, D = NoiseSchedule.from_config(), 77, 768
    else:
        from ..models.loading import load_teacher

        pipe = load_teacher("shapes")
        teacher, schedule = pipe.unet, NoiseSchedule.from_scheduler(pipe.scheduler)
        L, D = pipe.tokenizer.model_max_length, pipe.text_encoder.config.hidden_size
    return time_steps(rt, teacher, schedule, (L, D), methods=tuple(args.method.split(",")), batch=args.batch,
                      lora=args.lora, checkpointing=args.checkpointing, steps=args.steps)


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
    p.add_argument("--cache", action="store_true", help="time a step with and without the latent cache (-> --out, "
                   "default benchmarks/trainer_cache.json); with --sd15 adds the SD1.5-sized row at 512 px, batch 1")
    p.add_argument("--one-step", action="store_true", help="SPLAM alone and with each 1-step term of issue 25 "
                   "(-> --out, default benchmarks/trainer_one_step.json)")
    p.add_argument("--_one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_cache_one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", default="splam", help=argparse.SUPPRESS)  # VARIANTS names, comma-separated
    p.add_argument("--batch", type=int, default=16, help=argparse.SUPPRESS)
    p.add_argument("--lora", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._cache_one:
        print("RESULT " + json.dumps(_cache_one(a)))
        return
    if a.cache:
        if a.out == "benchmarks/trainer.json":
            a.out = "benchmarks/trainer_cache.json"
        cache_main(a)
        return
    if a._one:
        a.checkpointing = a.checkpointing == "on"
        if unknown := set(a.method.split(",")) - set(VARIANTS):
            raise SystemExit(f"unknown variant(s) {sorted(unknown)}: choose from {sorted(VARIANTS)}")
        print("RESULT " + json.dumps(_one(a)))
        return
    ckpt = {"off": [False], "on": [True], "both": [False, True]}[a.checkpointing]
    methods = ONE_STEP if a.one_step else ("lcm", "splam")
    if a.one_step and a.out == "benchmarks/trainer.json":
        a.out = "benchmarks/trainer_one_step.json"
    def one(method: str, batch: int, lora: int, cp: bool) -> list[dict]:
        cmd = [sys.executable, "-m", "splam_studio.tools.trainer_bench", "--_one", "--method", method, "--batch", str(batch),
               "--lora", str(lora), "--steps", str(a.steps), "--checkpointing", "on" if cp else "off",
               "--device", a.device, "--precision", a.precision] + (["--sd15"] if a.sd15 else [])
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(out.stderr[-2000:], file=sys.stderr)
            raise SystemExit(f"configuration failed: {' '.join(cmd)}")
        print(line[7:])
        return json.loads(line[7:])

    results = []
    for batch in a.batches:
        for lora in a.lora_ranks:
            for cp in ckpt:
                if a.one_step:  # times: the variants alternating step by step in one process; memory: one each
                    timed = one(",".join(methods), batch, lora, cp)
                    for t in timed:
                        t["peak_mib"] = one(t["method"], batch, lora, cp)[0]["peak_mib"]
                    results += timed
                    continue
                for method in methods:
                    results += one(method, batch, lora, cp)
    if a.one_step:
        return _write(a.out, one_step_doc(results, a))
    rows = []
    for r in results:
        if r["method"] == "splam":
            base = next(x for x in results if x["method"] == "lcm" and all(x[k] == r[k] for k in ("batch", "lora", "checkpointing")))
            rows.append([r["batch"], r["lora"] or "full", "on" if r["checkpointing"] else "off", round(base["step_s"], 4),
                         round(r["step_s"], 4), round(r["step_s"] / base["step_s"], 3), round(base["peak_mib"]), round(r["peak_mib"])])
    model = "SD1.5-sized UNet (random weights, 64x64 latents)" if a.sd15 else "embedded Shapes teacher"
    doc = {"description": f"`python -m splam_studio.tools.trainer_bench{' --sd15' if a.sd15 else ''}`: {model}, device {results[0]['device']}, "
                          f"precision {results[0]['precision']}, median of {a.steps} steps after a warm-up; each configuration in its own "
                          f"process, LCM and SPLAM alternating. Peak memory: {results[0]['peak_kind']}.",
           "tables": [{"title": "step time (s) and peak memory (MiB)",
                       "columns": ["batch", "LoRA rank", "grad. ckpt", "LCM s/step", "SPLAM s/step", "SPLAM / LCM", "LCM MiB", "SPLAM MiB"],
                       "rows": rows}],
           "notes": ["SPLAM adds one sigma_gamma and one SL-ODE interpolation per step over LCM; the UNet calls are the same "
                     "(2 teacher, 1 student, 1 target), so the ratio should be close to 1."],
           "raw": results}
    _write(a.out, doc)


def one_step_doc(results: list[dict], a) -> dict:
    """Step time and memory of SPLAM with each 1-step term, against plain SPLAM in the same configuration."""
    keys = ("batch", "lora", "checkpointing")
    rows = []
    for r in results:
        base = next(x for x in results if x["method"] == "splam" and all(x[k] == r[k] for k in keys))
        rows.append([r["method"], r["batch"], r["lora"] or "full", "on" if r["checkpointing"] else "off",
                     round(r["step_s"], 4), round(r["step_s"] / base["step_s"], 3), round(r["peak_mib"])])
    model = "SD1.5-sized UNet (random weights, 64x64 latents)" if a.sd15 else "embedded Shapes teacher"
    return {"description": f"`python -m splam_studio.tools.trainer_bench --one-step{' --sd15' if a.sd15 else ''}`: {model}, "
                           f"device {results[0]['device']}, precision {results[0]['precision']}, median of {a.steps} steps "
                           f"after a warm-up. Peak memory: {results[0]['peak_kind']}.",
            "tables": [{"title": "SPLAM with the 1-step terms of issue 25: step time (s) and peak memory (MiB)",
                        "columns": ["variant", "batch", "LoRA rank", "grad. ckpt", "s/step", "/ plain SPLAM", "MiB"],
                        "rows": rows}],
            "notes": ["Step times: the variants alternate step by step on one student in one process, so a change of "
                      "the machine's load hits all alike; peak memory: each variant in its own process.",
                      "The regression adds one student call, on z_T at t = 999, to the student's one (and its backward); "
                      "the k schedule and the t-top draw change which t is drawn, not the work per step; the "
                      "adversarial term adds two passes of the teacher's encoder half (fake with its backward, real "
                      "without) and the heads' step, on top of the 1-step student call; distribution matching adds "
                      "the teacher's guided call and two fake-score calls (one with its backward) and the fake score's "
                      "AdamW step (a teacher-sized UNet in fp32, with its moments), on top of the 1-step student call."],
            "raw": results}


def _write(out: str, doc: dict) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(doc, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
