"""The GPU path end to end, offline: `python -m splam_studio.tools.gpu_check` (one GPU, about 6 minutes, nothing downloaded).

1. builds a pipeline of Stable Diffusion v1.5's shapes (UNet 860M, CLIP ViT-L-sized text encoder, SD VAE) with
   random weights from configs, and a folder of captioned 512 px images;
2. runs train_cli.py on it: SPLAM and LCM with LoRA rank 64 in bf16, SPLAM with LoRA in fp16 (GradScaler), SPLAM
   full fine-tune; batch 4 at 512 px; each with a mid-run and a final validation, the export, and a resume;
3. the trainer bench grid (LoRA 64 and full, gradient checkpointing off/on, batch 4 and 8), plus the fp16 LoRA and
   full fine-tune at batch 4 with checkpointing for the memory target;
4. studio latency: `models.generation.generate` against a stock StableDiffusionPipeline on the same components (teacher DDIM 50
   at CFG 7.5, student 1/2/4 LCM steps), batch 1, median of interleaved runs;
and writes benchmarks/gpu.json (`render_markdown` turns it into a BENCHMARKS.md section).

    python -m splam_studio.tools.gpu_check --tiny                   # the same code path at tiny size (CPU, CI)
    python -m splam_studio.tools.gpu_check --only latency --teacher shapes --device cpu --out benchmarks/latency_cpu.json
    python -m splam_studio.tools.gpu_check --only latency --teacher shapes-xl-teacher --device cpu --out benchmarks/latency_cpu_xl.json

Random weights make no sensible pictures, but every shape, dtype, time and memory figure is the real one.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]  # the folder holding the package (PYTHONPATH of the runs)

# model shapes: SD v1.5 and a tiny stand-in with the same block types (CPU tests)
SHAPES = {
    "sd15": dict(
        unet=dict(sample_size=64, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_head_dim=8),
        vae=dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                 up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, sample_size=512),
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768),
        max_length=77, resolution=512, images=24),
    "tiny": dict(
        unet=dict(sample_size=8, layers_per_block=1, block_out_channels=(32, 64), cross_attention_dim=32,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8),
        vae=dict(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, sample_size=16),
        text=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, projection_dim=32),
        max_length=16, resolution=16, images=8),
}
# train_cli.py runs: name -> (method, LoRA rank, precision)
TRAIN_RUNS = {"splam-lora64-bf16": ("splam", 64, "bf16"), "lcm-lora64-bf16": ("lcm", 64, "bf16"),
              "splam-lora64-fp16": ("splam", 64, "fp16"), "splam-full-bf16": ("splam", 0, "bf16")}
CAPTIONS = ["one large red circle on a black background", "two small blue squares on a white background",
            "a green star at the top on a gray background"]


# ---------------------------------------------------------------- 1. model and data, from configs

def build_pipeline(out: Path, size: str = "sd15", seed: int = 0, device: str = "cpu"):
    """A random-weight StableDiffusionPipeline of `size`'s shapes (SD1.5: fp16 on disk, as the hub's), saved to out.

    The weights are drawn on `device` (initialising 860M parameters on a GPU takes a second, on a CPU a minute)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from ..core.schedule import SD15_SCHEDULER_CONFIG
    from ..store.runs import weights_dir

    sh = SHAPES[size]
    tok_src = weights_dir() / "shapes-teacher" / "tokenizer"  # any CLIP tokenizer folder; this one ships with the repo
    if not tok_src.is_dir():
        raise FileNotFoundError(f"no CLIP tokenizer at {tok_src}: the embedded Shapes teacher is part of the repository")
    tok = CLIPTokenizer.from_pretrained(str(tok_src), model_max_length=sh["max_length"])
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(in_channels=4, out_channels=4, **sh["unet"])
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=32, **sh["vae"])
        text = CLIPTextModel(CLIPTextConfig(vocab_size=max(len(tok), 49408 if size == "sd15" else 0), max_position_embeddings=sh["max_length"],
                                        hidden_act="quick_gelu", bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                            pad_token_id=tok.pad_token_id, **sh["text"]))
    sch = DDIMScheduler(**SD15_SCHEDULER_CONFIG)
    dtype = torch.float16 if size == "sd15" else torch.float32
    pipe = StableDiffusionPipeline(vae=vae.to(dtype), text_encoder=text.to(dtype), tokenizer=tok, unet=unet.to(dtype),
                                   scheduler=sch, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(out), safe_serialization=True)
    del pipe, unet, vae, text
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def write_images(out: Path, n: int, size: int, seed: int = 7) -> Path:
    """n captioned images (coloured discs) in an image folder with .txt captions."""
    from PIL import Image, ImageDraw

    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        rgb = tuple(int(x) for x in torch.randint(30, 255, (3,), generator=g))
        r = size * (0.15 + 0.2 * torch.rand(1, generator=g).item())
        cx, cy = (r + (size - 2 * r) * torch.rand(2, generator=g)).tolist()
        im = Image.new("RGB", (size, size))
        ImageDraw.Draw(im).ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
        im.save(out / f"{i:04d}.png")
        (out / f"{i:04d}.txt").write_text(CAPTIONS[i % len(CAPTIONS)])
    return out


# ---------------------------------------------------------------- 2. train_cli.py end to end

def train_run(name: str, method: str, lora: int, precision: str, teacher: Path, data: Path, out: Path, *,
              device: str, batch: int, resolution: int, steps: int) -> dict:
    """train_cli.py for `steps` steps (validation mid-run and at the end, export), then resumed for one more step."""
    common = ["--teacher", str(teacher), "--data", str(data), "--output-dir", str(out), "--run-name", name,
              "--method", method, "--lora-rank", str(lora), "--precision", precision, "--device", device,
              "--batch-size", str(batch), "--resolution", str(resolution), "--lr", "1e-4" if lora else "1e-5",
              "--gradient-checkpointing", "--checkpoint-every", str(steps), "--validate-every", str(max(1, steps - 1)),
              "--log-every", "1", "--seed", "0", "--validation-prompts", CAPTIONS[0], "--validation-prompts", CAPTIONS[1]]
    row: dict = {"run": name, "method": method, "lora": lora, "precision": precision, "batch": batch, "resolution": resolution}
    for phase, extra in (("train", ["--max-steps", str(steps)]), ("resume", ["--max-steps", str(steps + 1), "--resume", "latest"])):
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "splam_studio.training", *common, *extra], capture_output=True, text=True,
                           cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        row[f"{phase}_s"] = round(time.perf_counter() - t0, 1)
        if r.returncode != 0:
            row.update(ok=False, failed=phase, error=(r.stderr or r.stdout)[-1500:])
            return row
        if phase == "resume" and f"continuing at step {steps}" not in r.stdout + r.stderr:
            row.update(ok=False, failed=phase, error="the resumed run did not continue from the checkpoint")
            return row
    run = out / name
    vals = sorted(p.name for p in (run / "validation").glob("step-*.png"))
    exported = (run / ("lora" if lora else "unet")).is_dir() and (not lora or (run / "lora_kohya.safetensors").is_file())
    state = json.loads(max((run / "checkpoints").glob("step-*")).joinpath("state.json").read_text())
    cfg = json.loads((run / "training_config.json").read_text())
    row.update(validations=vals, exported=exported, final_step=state["step"], dtypes=cfg.get("dtypes"),
               ok=exported and state["step"] == steps + 1 and len(vals) >= 2)
    if cfg.get("mixed_precision") == "fp16":
        row["loss_scale"] = (state.get("grad_scaler") or {}).get("scale")
    shutil.rmtree(run / "checkpoints", ignore_errors=True)  # a full fine-tune's checkpoint is ~14 GB
    return row


# ---------------------------------------------------------------- 3. trainer bench grid

def bench_grid(teacher_dir: Path, device: str, precision: str, batches, loras, checkpointing=(False, True), steps: int = 5,
               extra_fp16: bool = True) -> list[dict]:
    """trainer_bench.time_steps over the grid in this process (peak memory reset per configuration)."""
    from diffusers import UNet2DConditionModel

    from ..training.device import resolve_runtime
    from ..core.schedule import NoiseSchedule
    from .trainer_bench import time_steps

    teacher = UNet2DConditionModel.from_pretrained(str(teacher_dir), subfolder="unet", torch_dtype=torch.float32,
                                                   use_safetensors=True)
    text = json.loads((teacher_dir / "text_encoder" / "config.json").read_text())
    shape = (text["max_position_embeddings"], text["hidden_size"])
    schedule = NoiseSchedule.from_config()
    grid = [(resolve_runtime(device, precision), b, lo, cp) for b in batches for lo in loras for cp in checkpointing]
    if extra_fp16 and resolve_runtime(device, precision).device.type != "cpu":  # the memory targets are stated in fp16
        grid += [(resolve_runtime(device, "fp16"), batches[0], lo, True) for lo in loras]
    rows = []
    for rt, b, lo, cp in grid:
        rows += time_steps(rt, teacher, schedule, shape, batch=b, lora=lo, checkpointing=cp, steps=steps)
    return rows


# ---------------------------------------------------------------- 4. studio latency against a stock pipeline

def latency(pipe, student, repeats: int, teacher_steps: int = 50, student_steps=(1, 2, 4)) -> list[dict]:
    """Median ms of `models.generation.generate` and of the stock pipeline of the teacher's family (a
    StableDiffusionPipeline, or a StableDiffusionXLPipeline for an SDXL teacher) on the same components, interleaved."""
    from ..core.teacher import pipeline_class
    from ..models.generation import generate, make_scheduler

    dev = next(pipe.unet.parameters()).device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (torch.mps.synchronize if dev.type == "mps" else lambda: None)
    prompt = [CAPTIONS[0]]
    cases = [("teacher", "ddim", teacher_steps, 7.5, None)] + [("student", "lcm", n, 1.0, student) for n in student_steps]
    rows = []
    for who, sampler, steps, cfg, unet in cases:
        stock = pipeline_class(pipe)(**{**pipe.components, "unet": unet if unet is not None else pipe.unet,
                                           "scheduler": make_scheduler(sampler, pipe.scheduler.config)})
        stock.set_progress_bar_config(disable=True)
        fns = {"studio": lambda: generate(pipe, prompt=prompt, sampler=sampler, steps=steps, seed=0, unet=unet, guidance_scale=cfg),
               "stock": lambda: stock(prompt=prompt, num_inference_steps=steps, guidance_scale=cfg,
                                      generator=torch.Generator("cpu").manual_seed(0))}
        ms: dict[str, list[float]] = {k: [] for k in fns}
        for i in range(repeats + 1):
            for k, f in (fns.items() if i % 2 else reversed(list(fns.items()))):  # alternate who goes first
                sync()
                t0 = time.perf_counter()
                f()
                sync()
                if i:  # the first round warms up
                    ms[k].append((time.perf_counter() - t0) * 1000)
        studio, stock_ms = statistics.median(ms["studio"]), statistics.median(ms["stock"])
        rows.append({"model": who, "sampler": sampler, "steps": steps, "cfg": cfg, "studio_ms": round(studio, 2),
                     "stock_ms": round(stock_ms, 2), "ratio": round(studio / stock_ms, 3), "repeats": repeats})
    return rows


def latency_for(teacher: str, device: str, repeats: int, teacher_steps: int = 50) -> dict:
    """Latency of a teacher (folder or embedded name) loaded as the studio loads it, with a zero-init student."""
    from ..training.device import resolve_runtime
    from ..models.loading import load_teacher
    from ..core.student import build_student
    from ..core.teacher import vae_scale_factor

    rt = resolve_runtime(device, "auto")
    pipe = load_teacher(teacher, torch_dtype=rt.sample_dtype).to(rt.device)
    pipe.set_progress_bar_config(disable=True)
    student = build_student(pipe.unet, "zero").to(rt.device, rt.sample_dtype).eval()
    rows = latency(pipe, student, repeats, teacher_steps)
    t50 = next(r for r in rows if r["model"] == "teacher")["studio_ms"]
    s4 = next((r for r in rows if r["model"] == "student" and r["steps"] == 4), None)
    return {"device": str(rt.device), "dtype": str(rt.sample_dtype).removeprefix("torch."), "teacher": teacher,
            "resolution": pipe.unet.config.sample_size * vae_scale_factor(pipe.vae), "rows": rows,
            "speedup_4_steps": round(t50 / s4["studio_ms"], 2) if s4 else None}


# ---------------------------------------------------------------- the check

def _summary(doc: dict) -> dict:
    """The targets the check reports (SPLAM vs LCM step time, peak memory, studio vs stock latency, runs ok), each with
    its figure and whether it is met."""
    out = {}
    bench = doc.get("bench") or []
    ratios = [r["step_s"] / b["step_s"] for r in bench if r["method"] == "splam" for b in bench
              if b["method"] == "lcm" and all(b[k] == r[k] for k in ("batch", "lora", "checkpointing", "precision"))]
    if ratios:
        out["splam_over_lcm_step_time_max"] = {"value": round(max(ratios), 3), "target": "<= 1.05", "met": max(ratios) <= 1.05}
    for r in bench:
        if r["precision"] == "fp16" and r["batch"] == 4 and r["checkpointing"] and r["method"] == "splam" and "CUDA" in r["peak_kind"]:
            key = f"peak_gib_{'lora' + str(r['lora']) if r['lora'] else 'full'}_b4_ckpt_fp16"
            gib = r["peak_mib"] / 1024
            out[key] = {"value": round(gib, 2), "target": "< 12" if r["lora"] else "reported", "met": gib < 12 if r["lora"] else None}
    lat = doc.get("latency")
    if lat:
        worst = max(r["ratio"] for r in lat["rows"])
        out["studio_over_stock_latency_max"] = {"value": worst, "target": "<= 1.05", "met": worst <= 1.05}
        out["speedup_4_steps_vs_teacher_50"] = {"value": lat["speedup_4_steps"], "target": "reported", "met": None}
    runs = doc.get("train") or []
    if runs:
        ok = [r for r in runs if r.get("ok")]
        out["train_runs_ok"] = {"value": f"{len(ok)}/{len([r for r in runs if not r.get('skipped')])}",
                                "target": "all", "met": all(r.get("ok") or r.get("skipped") for r in runs)}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny shapes, 1 bench step, 2 latency repeats: the CPU/CI code path")
    p.add_argument("--device", default="auto", help="auto, cuda, mps or cpu")
    p.add_argument("--only", default="train,bench,latency", help="comma-separated parts: train, bench, latency")
    p.add_argument("--runs", default=",".join(TRAIN_RUNS), help=f"train_cli runs to do, of {', '.join(TRAIN_RUNS)}")
    p.add_argument("--teacher", default=None, help="latency: a teacher folder or embedded name instead of the built pipeline")
    p.add_argument("--repeats", type=int, default=None, help="latency: timed rounds per case (default 6; tiny 2)")
    p.add_argument("--teacher-steps", type=int, default=50, help="latency: the teacher's DDIM steps")
    p.add_argument("--workdir", default=None, help="where the pipeline, images and runs go (default: a temp dir, removed)")
    p.add_argument("--out", default="benchmarks/gpu.json", help="the JSON written")
    a = p.parse_args(argv)
    parts = set(a.only.split(","))
    if parts - {"train", "bench", "latency"}:
        p.error(f"--only takes train, bench, latency; got {a.only!r}")
    size = "tiny" if a.tiny else "sd15"
    sh = SHAPES[size]
    from ..training.device import resolve_runtime

    rt = resolve_runtime(a.device, "auto")
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="gpu-check-"))
    t_start = time.perf_counter()
    model = (f"teacher {a.teacher} (its own weights)" if parts == {"latency"} and a.teacher
             else f"{'tiny SD' if a.tiny else 'SD1.5'} shapes, random weights")
    doc: dict = {"command": " ".join(["python -m splam_studio.tools.gpu_check", *(sys.argv[1:] if argv is None else argv)]),
                 "size": size, "model": model,
                 "device": str(rt.device), "device_name": torch.cuda.get_device_name() if rt.device.type == "cuda" else platform.processor(),
                 "torch": torch.__version__, "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    log = lambda msg: print(f"[gpu_check {time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)  # noqa: E731
    try:
        teacher_dir = work / "teacher"
        if parts & {"train", "bench"} or (parts & {"latency"} and not a.teacher):
            build_pipeline(teacher_dir, size, device=str(rt.device))
            log(f"pipeline of {size} shapes in {teacher_dir}")
        if "train" in parts:
            data = write_images(work / "data", sh["images"], sh["resolution"])
            doc["train"] = []
            for name in a.runs.split(","):
                method, lora, precision = TRAIN_RUNS[name]
                lora = 4 if a.tiny and lora else lora
                if precision == "fp16" and rt.device.type == "cpu":
                    doc["train"].append({"run": name, "skipped": "fp16 needs CUDA or MPS"})
                    continue
                if precision == "bf16" and not _bf16(rt.device):
                    precision = "fp16"
                row = train_run(name, method, lora, precision, teacher_dir, data, work / "runs", device=a.device,
                                batch=2 if a.tiny else 4, resolution=sh["resolution"], steps=2)
                doc["train"].append(row)
                log(f"train {name}: {'ok' if row['ok'] else 'FAILED in ' + row['failed']}")
        if "bench" in parts:
            doc["bench"] = bench_grid(teacher_dir, a.device, "auto", batches=(2,) if a.tiny else (4, 8),
                                      loras=(4, 0) if a.tiny else (64, 0), checkpointing=(False, True), steps=1 if a.tiny else 3)
            log(f"trainer bench: {len(doc['bench'])} rows")
        if "latency" in parts:
            doc["latency"] = latency_for(a.teacher or str(teacher_dir), a.device, a.repeats or (2 if a.tiny else 6),
                                         2 if a.tiny else a.teacher_steps)
            log(f"latency: {[(r['model'], r['steps'], r['ratio']) for r in doc['latency']['rows']]}")
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
    doc["summary"] = _summary(doc)
    doc["wall_s"] = round(time.perf_counter() - t_start, 1)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(doc, indent=2))
    log(f"wrote {a.out}")
    print(render_markdown(doc))
    failed = [r["run"] for r in doc.get("train", []) if not r.get("ok") and not r.get("skipped")]
    if failed:
        print(f"train runs failed: {failed}", file=sys.stderr)
        return 1
    return 0


def _bf16(dev: torch.device) -> bool:
    from ..training.device import bf16_supported

    return bf16_supported(dev)


# ---------------------------------------------------------------- BENCHMARKS.md section

def markdown_section(path: str | Path = "benchmarks/gpu.json") -> str | None:
    """The BENCHMARKS.md section for a gpu.json file, or None when there is none (no GPU check was run)."""
    path = Path(path)
    return render_markdown(json.loads(path.read_text())) if path.is_file() else None


def render_markdown(doc: dict, title: str = "GPU check") -> str:
    """benchmarks/gpu.json (or a latency-only run of this check) as a BENCHMARKS.md section (markdown string)."""
    lines = [f"## {title} (`{doc['command']}`)", "",
             f"{doc.get('model', doc['size'])}, on {doc['device']} ({doc.get('device_name') or 'unknown'}), torch {doc['torch']}, "
             f"{doc['time']}, {doc.get('wall_s', '?')} s in all.", ""]
    if doc.get("summary"):
        lines += ["| target | value | goal | met |", "|---|---|---|---|"]
        for k, v in doc["summary"].items():
            lines.append(f"| {k} | {v['value']} | {v['target']} | {'-' if v['met'] is None else 'yes' if v['met'] else 'NO'} |")
        lines.append("")
    if doc.get("train"):
        lines += ["train_cli.py runs (2 steps with validation at 1 and 2, export, then resumed to 3):", "",
                  "| run | precision | batch | px | train s | resume s | validations | exported | result |", "|---|---|---|---|---|---|---|---|---|"]
        for r in doc["train"]:
            if r.get("skipped"):
                lines.append(f"| {r['run']} | | | | | | | | skipped: {r['skipped']} |")
            else:
                res = "ok" if r.get("ok") else f"FAILED in {r.get('failed', '?')}"
                lines.append(f"| {r['run']} | {r['precision']} | {r['batch']} | {r['resolution']} | {r.get('train_s', '')} | "
                             f"{r.get('resume_s', '')} | {len(r.get('validations', []))} | {r.get('exported', '')} | {res} |")
        lines.append("")
    if doc.get("bench"):
        b = doc["bench"]
        lines += [f"Trainer bench (median step, {b[0]['peak_kind']}):", "",
                  "| precision | batch | LoRA | grad. ckpt | LCM s/step | SPLAM s/step | SPLAM / LCM | peak GiB |", "|---|---|---|---|---|---|---|---|"]
        for r in b:
            if r["method"] != "splam":
                continue
            base = next(x for x in b if x["method"] == "lcm" and all(x[k] == r[k] for k in ("batch", "lora", "checkpointing", "precision")))
            lines.append(f"| {r['precision']} | {r['batch']} | {r['lora'] or 'full'} | {'on' if r['checkpointing'] else 'off'} | "
                         f"{base['step_s']:.3f} | {r['step_s']:.3f} | {r['step_s'] / base['step_s']:.3f} | {r['peak_mib'] / 1024:.2f} |")
        lines.append("")
    if doc.get("latency"):
        lat = doc["latency"]
        lines += [f"Latency, batch 1 at {lat['resolution']} px, {lat['dtype']} on {lat['device']} (teacher {lat['teacher']}), "
                  f"median of {lat['rows'][0]['repeats']} interleaved runs, images decoded:", "",
                  "| model | sampler | steps | CFG | studio ms | stock ms | studio / stock |", "|---|---|---|---|---|---|---|"]
        for r in lat["rows"]:
            lines.append(f"| {r['model']} | {r['sampler']} | {r['steps']} | {r['cfg']} | {r['studio_ms']} | {r['stock_ms']} | {r['ratio']} |")
        lines += ["", f"4-step student over the teacher's {lat['rows'][0]['steps']} guided steps: {lat['speedup_4_steps']}x faster.", ""]
    lines += [f"- {n}" for n in doc.get("notes", [])] + ([""] if doc.get("notes") else [])
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
