"""The Shapes teacher: a tiny Stable-Diffusion-shaped pipeline (diffusers format), built by one recipe.

    python -m splam_studio.tools.world build --out weights --preset full   # 48 min on 2 CPU cores
    python -m splam_studio.tools.world build --out /tmp/w --preset tiny     # seconds, for tests
    python -m splam_studio.tools.world build --out weights --preset xl      # Shapes-XL, on weights' VAE and evaluator
    python -m splam_studio.tools.world bench                                # it/s of each stage

Recipe (all seeds fixed; the presets are in `recipe`, the stages in `stages`):
  1. render a fixed training set of Shapes pairs (train split: held-out (shape, colour) pairs excluded);
  2. train the VAE (L1 + L2 + small KL, as SD's autoencoder minus the GAN and LPIPS terms);
  3. fit `scaling_factor` so that scaled latents have unit variance, and write it into the VAE config;
  4. train the evaluator (a CNN on real images, all splits) -> <out>/shapes-evaluator;
  5. encode the training set once, then train the UNet (from scratch; the text encoder stays at its seeded
     init unless the preset trains it jointly) with the epsilon loss, 10% caption dropout (for
     classifier-free guidance), AdamW and an EMA;
  6. save a StableDiffusionPipeline -> <out>/shapes-teacher, and measure prompt accuracy of 50-step
     DDIM at guidance 7.5 on train and held-out captions; write recipe.json beside the weights.

Shapes-XL (`--preset xl`, arch "xl") runs the same stages with SDXL's architecture: two frozen text encoders of
different widths (the second with a pooled projection) on the same tokenizer, a text_time UNet, and training renders
at varied original size and crop whose SDXL time ids go with each sample (step 1); stages 2-4 are reused from the SD
build in <out> (or --reuse-from) when there is one. It saves a StableDiffusionXLPipeline -> <out>/shapes-xl-teacher
and writes recipe-xl.json.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from .grammar import RESOLUTION, ShapesDataset, sample_specs
from .recipe import PRESETS, WorldPreset, build_models, build_xl_models
from .stages import (Clock, encode_latents, fit_scaling_factor, to_pm1, train_evaluator, train_unet, train_vae,
                     vae_report)
from .tokenizer import build_tokenizer
from ..core.schedule import SD15_SCHEDULER_CONFIG
from ..core.teacher import TextCondition, empty_condition, encode_condition, tokenize

TEACHER_DIRS = {"sd": "shapes-teacher", "xl": "shapes-xl-teacher"}  # <out>/<folder> of each arch's pipeline
RECIPE_FILES = {"sd": "recipe.json", "xl": "recipe-xl.json"}  # the build record beside it


def _reuse_stages(src: Path, eval_dir: Path, log, device: torch.device) -> tuple:
    """VAE and evaluator of a finished build in `src` (stages 2-4), with their recipe records."""
    from diffusers import AutoencoderKL

    rec_path = src / "recipe.json"
    if not (src / "shapes-teacher" / "vae").is_dir() or not (src / "shapes-evaluator").is_dir() or not rec_path.is_file():
        raise FileNotFoundError(f"--reuse-from {src}: need shapes-teacher/vae, shapes-evaluator and recipe.json there")
    old = json.loads(rec_path.read_text())["stages"]
    vae = AutoencoderKL.from_pretrained(src / "shapes-teacher" / "vae", use_safetensors=True).to(device).eval()
    if (src / "shapes-evaluator").resolve() != eval_dir.resolve():
        shutil.copytree(src / "shapes-evaluator", eval_dir, dirs_exist_ok=True)
    stages = {k: {**old[k], "reused_from": str(src)} for k in ("vae", "scaling", "evaluator") if k in old}
    log(f"[reuse] VAE (scaling_factor {vae.config.scaling_factor:.5f}) and evaluator from {src}")
    return vae, float(vae.config.scaling_factor), stages


def make_pipeline(vae, text_encoder, tokenizer, unet, text_encoder_2=None):
    """A StableDiffusionPipeline of the four models with SD1.5's DDIM scheduler and no safety checker; with
    text_encoder_2 a StableDiffusionXLPipeline (both tokenizers the Shapes tokenizer, an empty prompt's embeddings
    zeroed as SDXL base's `force_zeros_for_empty_prompt`, no watermark)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    if text_encoder_2 is not None:
        return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                         tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
                                         scheduler=DDIMScheduler(**SD15_SCHEDULER_CONFIG),
                                         force_zeros_for_empty_prompt=True, add_watermarker=False)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**SD15_SCHEDULER_CONFIG), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


@torch.no_grad()
def check_prompt_accuracy(pipe, evaluator, p: WorldPreset, split: str, seed: int) -> dict:
    """Prompt accuracy of `check_steps`-step DDIM at `guidance_scale` on `check_n` captions of a split."""
    captions = [s.caption() for s in sample_specs(p.check_n, seed, split)]
    images = []
    for i in range(0, len(captions), 32):
        g = torch.Generator().manual_seed(seed + i)
        out = pipe(captions[i:i + 32], num_inference_steps=p.check_steps, guidance_scale=p.guidance_scale,
                   generator=g, output_type="pil")
        images.extend(out.images)
    return evaluator.prompt_accuracy(images, captions)


def _xl_conditions(pipe, captions: list[str], size_ids: torch.Tensor, batch: int = 1024) -> tuple:
    """(every caption's SDXL condition with its own time ids, the empty prompt's) by the teacher driver, as the
    studio and a stock StableDiffusionXLPipeline build them; on the encoders' device."""
    parts = []
    with torch.no_grad():
        for i in range(0, len(captions), batch):
            parts.append(encode_condition(pipe, captions[i:i + batch], size=size_ids[i:i + batch]))
        empty = empty_condition(pipe)  # zeros under force_zeros_for_empty_prompt; time ids replaced per sample
    cat = TextCondition(*(torch.cat([getattr(c, k) for c in parts]) for k in ("embeds", "pooled", "time_ids")))
    return cat, empty


def build(out: str | Path, preset: WorldPreset | str = "full", log=print, reuse_from: str | Path | None = None,
          device: torch.device | str = "cpu") -> dict:
    """Run the whole recipe; writes <out>/shapes-teacher, <out>/shapes-evaluator and recipe.json (arch "xl":
    <out>/shapes-xl-teacher and recipe-xl.json).

    reuse_from: a finished build's folder; its VAE (with scaling factor) and evaluator are loaded instead of
    retrained (stages 2-4), and their records are copied into the record marked `reused_from`. An xl build reuses
    <out>'s own SD build by default when it has one.
    device: where every stage trains (the CLI picks it with `training.device.pick_device`).
    """
    from .evaluator import Evaluator

    p = PRESETS[preset] if isinstance(preset, str) else preset
    out = Path(out)
    device = torch.device(device)
    xl, smoke = p.arch == "xl", p.name.endswith("tiny")
    clock = Clock(p.deadline_s)
    record: dict = {"preset": asdict(p), "arch": p.arch, "torch_threads": torch.get_num_threads(), "device": str(device),
                    "stages": {}}
    teacher_dir, eval_dir = out / TEACHER_DIRS[p.arch], out / "shapes-evaluator"
    if xl and reuse_from is None and (out / RECIPE_FILES["sd"]).is_file() and (out / TEACHER_DIRS["sd"] / "vae").is_dir():
        reuse_from = out

    # 1. data and tokenizer (xl: each image at a drawn original size and crop, with its SDXL time ids)
    t = time.time()
    tokenizer = build_tokenizer(out / "_tokenizer_build")
    train_ds = ShapesDataset(p.n_train, seed=p.seed, split="train")
    if xl:
        images_u8, size_ids = train_ds.render_all_sized(p.xl_plain, p.xl_lowres, p.xl_lowres_min, p.xl_scale_max)
    else:
        images_u8, size_ids = train_ds.render_all(), None  # (N, 3, 64, 64) uint8
    captions = [s.caption() for s in train_ds.specs]
    ids = tokenize(tokenizer, captions)
    empty_ids = tokenize(tokenizer, [""])[0]
    record["stages"]["data"] = {"n_train": len(train_ds), "wall_s": time.time() - t}
    if xl:
        plain = ((size_ids[:, :2] == RESOLUTION).all(1) & (size_ids[:, 2:4] == 0).all(1)).float().mean().item()
        record["stages"]["data"]["size_conditioning"] = {
            "plain_share": plain, "original_size_range": [size_ids[:, 0].min().item(), size_ids[:, 0].max().item()],
            "cropped_share": (size_ids[:, 2:4] > 0).any(1).float().mean().item()}
    log(f"[data] {len(train_ds)} pairs rendered and tokenized in {time.time() - t:.1f}s {record['stages']['data']}")
    if xl:
        vae, text_encoder, text_encoder_2, unet = build_xl_models(tokenizer, p.seed, p.text_layers)
        models = (("vae", vae), ("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2), ("unet", unet))
    else:
        vae, text_encoder, unet = build_models(tokenizer, p.seed, p.text_layers)
        text_encoder_2 = None
        models = (("vae", vae), ("text_encoder", text_encoder), ("unet", unet))
    record["params"] = {n: sum(q.numel() for q in m.parameters()) for n, m in models}
    log(f"[models] params {record['params']}")

    if reuse_from is not None:
        vae, sf, stages = _reuse_stages(Path(reuse_from), eval_dir, log, device)
        record["stages"].update(stages)
        evaluator = Evaluator.from_pretrained(eval_dir, device=device)
        mean, std = encode_latents(vae, images_u8)
    else:
        # Stage budgets (fractions of the deadline) keep the UNet its share if an early stage runs slow.
        # 2. VAE
        record["stages"]["vae"] = train_vae(vae, images_u8, p, clock, reserve_s=0.75 * p.deadline_s, log=log,
                                            device=device)
        heldout_u8 = ShapesDataset(256 if not smoke else 8, seed=p.seed + 7, split="heldout").render_all()
        record["stages"]["vae"]["heldout_recon"] = vae_report(vae, heldout_u8)
        log(f"[vae] done: {record['stages']['vae']}")

        # 3. scaling factor
        t = time.time()
        mean, std = encode_latents(vae, images_u8)
        sf = fit_scaling_factor(mean, std, p.seed + 4)
        vae.register_to_config(scaling_factor=sf)
        record["stages"]["scaling"] = {"scaling_factor": sf, "latent_std_unscaled": 1.0 / sf, "wall_s": time.time() - t}
        log(f"[scaling] scaling_factor {sf:.5f} ({time.time() - t:.1f}s)")

        # 4. evaluator
        evaluator, rec = train_evaluator(p, clock, reserve_s=0.62 * p.deadline_s, log=log, device=device)
        evaluator.save_pretrained(eval_dir)
        evaluator = Evaluator.from_pretrained(eval_dir, device=device)
        test_ds = ShapesDataset(512 if not smoke else 8, seed=p.seed + 8, split="all")
        test_u8 = test_ds.render_all()
        caps = [s.caption() for s in test_ds.specs]
        rec["real_accuracy"] = evaluator.prompt_accuracy(to_pm1(test_u8, device), caps)
        with torch.no_grad():
            recon = vae.decode(vae.encode(to_pm1(test_u8, device)).latent_dist.mean).sample.clamp(-1, 1)
        rec["vae_recon_accuracy"] = evaluator.prompt_accuracy(recon, caps)
        record["stages"]["evaluator"] = rec
        log(f"[evaluator] done: {rec}")

    # 5. UNet (+ text encoder) on cached latents; xl: on the conditions of both frozen encoders and the time ids
    g = torch.Generator().manual_seed(p.seed + 5)
    latents = (mean + std * torch.randn(mean.shape, generator=g)) * sf  # one posterior sample per image
    del images_u8
    probe_p = replace(p, check_n=min(p.check_n, 32), check_steps=min(p.check_steps, 20))
    conditions = None
    if xl:
        t = time.time()
        text_encoder.to(device).eval().requires_grad_(False)
        text_encoder_2.to(device).eval().requires_grad_(False)
        conditions = _xl_conditions(make_pipeline(vae, text_encoder, tokenizer, unet, text_encoder_2), captions, size_ids)
        record["stages"]["data"]["size_conditioning"]["distinct_time_ids_trained"] = len(
            torch.unique(conditions[0].time_ids, dim=0))
        log(f"[unet] SDXL conditions of {len(captions)} captions (embeds {tuple(conditions[0].embeds.shape[1:])}, "
            f"pooled {conditions[0].pooled.shape[1]}) in {time.time() - t:.1f}s")

    def probe(ema_unet, ema_text) -> dict:
        pipe = make_pipeline(vae, ema_text if ema_text is not None else text_encoder, tokenizer, ema_unet, text_encoder_2)
        pipe.set_progress_bar_config(disable=True)
        res = check_prompt_accuracy(pipe, evaluator, probe_p, "heldout", seed=p.seed + 11)
        ema_unet.eval()
        return {"heldout_accuracy": res["accuracy"], "position": res["per_attribute"]["position"], "n": res["n"]}

    ema_unet, ema_text, rec = train_unet(unet, None if xl else text_encoder, latents, ids, empty_ids, p, clock,
                                         reserve_s=90 if not smoke else 0, log=log, device=device,
                                         probe=probe, conditions=conditions)
    ema_text = ema_text if ema_text is not None else text_encoder
    record["stages"]["unet"] = rec
    log(f"[unet] done: {rec}")

    # 6. save, reload offline, check
    t = time.time()
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    make_pipeline(vae, ema_text, tokenizer, ema_unet, text_encoder_2).save_pretrained(str(teacher_dir),
                                                                                       safe_serialization=True)
    for sub in ("tokenizer", "tokenizer_2") if xl else ("tokenizer",):
        for name in ("vocab.json", "merges.txt"):  # the plain BPE files too, beside tokenizer.json
            shutil.copy(out / "_tokenizer_build" / name, teacher_dir / sub / name)
    cls = StableDiffusionXLPipeline if xl else StableDiffusionPipeline
    pipe = cls.from_pretrained(str(teacher_dir), use_safetensors=True, local_files_only=True).to(device)
    pipe.set_progress_bar_config(disable=True)
    record["stages"]["check"] = {
        split: check_prompt_accuracy(pipe, evaluator, p, split, seed=p.seed + 9) for split in ("train", "heldout")}
    record["stages"]["check"]["wall_s"] = time.time() - t
    log(f"[check] {record['stages']['check']}")
    record["total_wall_s"] = clock.elapsed()
    (out / RECIPE_FILES[p.arch]).write_text(json.dumps(record, indent=2))
    log(f"[done] total {clock.elapsed() / 60:.1f} min -> {teacher_dir}, {eval_dir}, {out / RECIPE_FILES[p.arch]}")
    shutil.rmtree(out / "_tokenizer_build", ignore_errors=True)
    return record


def bench(steps: int = 6, log=print, device: torch.device | str = "cpu", preset: str = "full") -> dict:
    """Seconds per training step of each stage at a preset's batch sizes (for sizing the build); an xl preset's
    UNet step on its SDXL conditions (both frozen encoders precomputed, as the build trains)."""
    import tempfile

    from .evaluator import Evaluator, evaluator_loss

    device = torch.device(device)
    p = PRESETS[preset]
    with tempfile.TemporaryDirectory() as d:
        tok = build_tokenizer(d)
    ds = ShapesDataset(max(p.vae_batch, p.unet_batch, p.eval_batch), seed=0)
    x_u8, labels = ds.render_all(), ds.label_tensor()
    ids = tokenize(tok, [s.caption() for s in ds.specs])
    if p.arch == "xl":
        vae, text_encoder, text_encoder_2, unet = (m.to(device) for m in build_xl_models(tok, p.seed, p.text_layers))
        _, size_ids = ds.render_all_sized(p.xl_plain, p.xl_lowres, p.xl_lowres_min, p.xl_scale_max)
        cond, _ = _xl_conditions(make_pipeline(vae, text_encoder, tok, unet, text_encoder_2),
                                 [s.caption() for s in ds.specs], size_ids)
        unet_kwargs = cond.map(lambda x: x[: p.unet_batch]).unet_kwargs(torch.float32)
        unet_params = list(unet.parameters())
    else:
        vae, text_encoder, unet = (m.to(device) for m in build_models(tok, p.seed, p.text_layers))
        unet_kwargs = None
        unet_params = list(unet.parameters()) + list(text_encoder.parameters())
    res = {}

    def timeit(name, fn):
        fn()
        t = time.time()
        for _ in range(steps):
            fn()
        res[name] = (time.time() - t) / steps
        log(f"[bench] {name}: {res[name]:.3f} s/step ({1 / res[name]:.2f} it/s)")

    opt = torch.optim.AdamW(vae.parameters())

    def vae_step():
        x = to_pm1(x_u8[: p.vae_batch], device)
        post = vae.encode(x).latent_dist
        loss = F.l1_loss(vae.decode(post.sample()).sample, x) + 1e-6 * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    ev = Evaluator().to(device)
    opt_e = torch.optim.AdamW(ev.parameters())

    def eval_step():
        loss = evaluator_loss(ev, to_pm1(x_u8[: p.eval_batch], device), labels[: p.eval_batch].to(device))
        opt_e.zero_grad()
        loss.backward()
        opt_e.step()

    opt_u = torch.optim.AdamW(unet_params)

    def unet_step():
        z = torch.randn(p.unet_batch, 4, 8, 8, device=device)
        t = torch.randint(0, 1000, (p.unet_batch,), device=device)
        kw = unet_kwargs or {"encoder_hidden_states": text_encoder(ids[: p.unet_batch].to(device))[0]}
        loss = F.mse_loss(unet(z, t, **kw).sample, z)
        opt_u.zero_grad()
        loss.backward()
        opt_u.step()

    timeit("vae", vae_step)
    timeit("evaluator", eval_step)
    timeit("unet", unet_step)
    return res

