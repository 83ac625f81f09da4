"""A Hugging Face cache holding tiny replicas of every repo the model sets name, laid out as the hub serves them.

HF_HUB_CACHE/models--owner--name/{refs/main, blobs/<sha256>, snapshots/<rev>/<file> -> ../../blobs/<sha256>}, the
same layout `hf download` leaves; with HF_HUB_OFFLINE=1 the hub libraries read only this.

Each replica has its real repo's file layout (which folders and weight files exist), with tiny SD-shaped models:
  teachers (Lykon/dreamshaper-7, stable-diffusion-v1-5/stable-diffusion-v1-5): a full StableDiffusionPipeline,
    safety_checker/ and feature_extractor/ included as the real repos have them;
  full-pipeline students (SimianLuo/LCM_Dreamshaper_v7, alimama-creative/slam-*): a full pipeline whose UNet has
    time_cond_proj_dim 256. Their vae/, text_encoder/ and safety_checker/ weight files are unreadable bytes: a loader
    that reads more than unet/ fails (the studio must share the teacher's);
  latent-consistency/lcm-lora-sdv1-5: pytorch_lora_weights.safetensors at the root, in the kohya-style key names
    (lora_unet_*.lora_down / lora_up / alpha) of the released file.
`build_fake_xl_hub` adds the SDXL set's trio on the tiny SDXL pipeline (tests/tiny.py):
  stabilityai/stable-diffusion-xl-base-1.0: a full StableDiffusionXLPipeline (two text encoders, text_time UNet) and,
    as the real repo, single files at the root (sd_xl_base_1.0.safetensors, the offset LoRA) that are unreadable bytes:
    the loader reads the diffusers folders only;
  latent-consistency/lcm-lora-sdxl, alimama-creative/slam-lora-sdxl: pytorch_lora_weights.safetensors at the root,
    one in kohya's SDXL names (lora_unet_input_blocks_*), one in diffusers' (unet.down_blocks.*.lora_A): the two
    forms diffusers' StableDiffusionXLPipeline.lora_state_dict reads.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from splam_studio.models.export import export_kohya_lora
from splam_studio.core.student import build_student
from tests.tiny import make_tiny_pipeline, make_tiny_xl_pipeline

REVISION = "0123456789abcdef0123456789abcdef01234567"  # a commit hash, as refs/main holds
TEACHERS = ("Lykon/dreamshaper-7", "stable-diffusion-v1-5/stable-diffusion-v1-5")
FULL_STUDENTS = {"SimianLuo/LCM_Dreamshaper_v7": ("Lykon/dreamshaper-7", 1),
                 "alimama-creative/slam-dreamshaper7": ("Lykon/dreamshaper-7", 2),
                 "alimama-creative/slam-sd1.5": ("stable-diffusion-v1-5/stable-diffusion-v1-5", 3)}
LORAS = {"latent-consistency/lcm-lora-sdv1-5": "stable-diffusion-v1-5/stable-diffusion-v1-5"}
XL_TEACHER = "stabilityai/stable-diffusion-xl-base-1.0"
XL_LORAS = {"latent-consistency/lcm-lora-sdxl": ("kohya", 5), "alimama-creative/slam-lora-sdxl": ("diffusers", 6)}
XL_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.2", "proj_in", "conv1", "time_emb_proj"]
UNREADABLE = b"not weights: a loader that reads this file has read more than the student's UNet\n"
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2", "time_emb_proj"]


def repo_folder(cache: Path, repo_id: str) -> Path:
    return Path(cache) / ("models--" + repo_id.replace("/", "--"))


def _publish(staging: Path, cache: Path, repo_id: str) -> Path:
    """Move a folder's files into the cache as blobs, symlinked from snapshots/<REVISION>; refs/main -> REVISION."""
    root = repo_folder(cache, repo_id)
    snap = root / "snapshots" / REVISION
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(REVISION)
    for f in sorted(p for p in staging.rglob("*") if p.is_file()):
        data = f.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snap / f.relative_to(staging)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    shutil.rmtree(staging)
    return snap


def _sd_repo(pipe, out: Path) -> None:
    """save_pretrained, plus the safety_checker / feature_extractor entries that the released SD repos carry."""
    pipe.save_pretrained(str(out))
    index = json.loads((out / "model_index.json").read_text())
    index["safety_checker"] = ["stable_diffusion", "StableDiffusionSafetyChecker"]
    index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    (out / "safety_checker").mkdir()
    (out / "safety_checker" / "config.json").write_text(json.dumps({"model_type": "clip"}))
    (out / "safety_checker" / "model.safetensors").write_bytes(UNREADABLE)
    (out / "feature_extractor").mkdir()
    (out / "feature_extractor" / "preprocessor_config.json").write_text(json.dumps(
        {"crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
         "image_processor_type": "CLIPImageProcessor", "size": 224}))


def build_fake_hub(cache: Path) -> dict[str, Path]:
    """Every repo of the model sets in `cache`; returns repo id -> snapshot folder. Seeded: same bytes each run."""
    cache = Path(cache)
    staging = cache.parent / f"{cache.name}-staging"
    snapshots, teachers = {}, {}
    for i, repo in enumerate(TEACHERS):
        pipe = make_tiny_pipeline(staging / "tok")
        if i:  # a second base model: the same architecture, other weights
            with torch.no_grad():
                for p in pipe.unet.parameters():
                    p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
        teachers[repo] = pipe
        _sd_repo(pipe, staging / repo)
        snapshots[repo] = _publish(staging / repo, cache, repo)
    for repo, (base, seed) in FULL_STUDENTS.items():
        pipe = teachers[base]
        unet = build_student(pipe.unet, "fresh", embed_dim=256, generator=torch.Generator().manual_seed(seed))
        student = type(pipe)(**{**pipe.components, "unet": unet})
        out = staging / repo
        _sd_repo(student, out)
        for sub in ("vae", "text_encoder"):
            for f in (out / sub).glob("*.safetensors"):
                f.write_bytes(UNREADABLE)
        snapshots[repo] = _publish(out, cache, repo)
    for repo, base in LORAS.items():
        from peft import LoraConfig

        unet = teachers[base].unet
        unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS))
        g = torch.Generator().manual_seed(4)
        with torch.no_grad():  # a LoRA that changes the UNet (peft starts lora_B at zero)
            for name, p in unet.named_parameters():
                if "lora_" in name:
                    p.copy_(0.05 * torch.randn(p.shape, generator=g))
        out = staging / repo
        export_kohya_lora(unet, out / "pytorch_lora_weights.safetensors")
        (out / "README.md").write_text("tiny replica of " + repo + "\n")
        snapshots[repo] = _publish(out, cache, repo)
    shutil.rmtree(staging, ignore_errors=True)
    return snapshots


def build_fake_xl_hub(cache: Path) -> dict[str, Path]:
    """The SDXL set's three repos in `cache` (beside build_fake_hub's); repo id -> snapshot folder. Seeded."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from diffusers import StableDiffusionXLPipeline

    cache = Path(cache)
    staging = cache.parent / f"{cache.name}-xl-staging"
    teacher = make_tiny_xl_pipeline(staging / "tok")
    out = staging / XL_TEACHER
    teacher.save_pretrained(str(out), safe_serialization=True)
    for name in ("sd_xl_base_1.0.safetensors", "sd_xl_offset_example-lora_1.0.safetensors"):
        (out / name).write_bytes(UNREADABLE)
    snapshots = {XL_TEACHER: _publish(out, cache, XL_TEACHER)}
    for repo, (form, seed) in XL_LORAS.items():
        unet = make_tiny_xl_pipeline(staging / "tok2").unet  # the teacher's weights (seeded), a fresh module
        rank = 4
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=2 * rank if form == "kohya" else rank,
                                    target_modules=XL_LORA_TARGETS))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # a LoRA that changes the UNet (peft starts lora_B at zero)
            for name, p in unet.named_parameters():
                if "lora_" in name:
                    p.copy_(0.05 * torch.randn(p.shape, generator=g))
        out = staging / repo
        if form == "kohya":
            export_kohya_lora(unet, out / "pytorch_lora_weights.safetensors")
        else:
            StableDiffusionXLPipeline.save_lora_weights(str(out), unet_lora_layers=get_peft_model_state_dict(unet))
        (out / "README.md").write_text("tiny replica of " + repo + "\n")
        snapshots[repo] = _publish(out, cache, repo)
    shutil.rmtree(staging, ignore_errors=True)
    return snapshots
