"""Model export: a student run folder (diffusers), a single-file SD1.5 checkpoint (LDM key names), a kohya LoRA.

A student run folder (weights/<run>/), as `models.loading.load_student` reads it, holds `training_config.json` and
  unet/   a full diffusers UNet2DConditionModel with time_cond_proj_dim set, or
  lora/   pytorch_lora_weights.safetensors (diffusers LoRA, `pipe.load_lora_weights` loads it),
          cond_proj.safetensors (the gamma projection, trained in full) and student_unet_config.json.
Every file is safetensors or JSON, written atomically.
"""
from __future__ import annotations

import copy
import json
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..store.atomic import atomic_write, fsync_tree, replace_dir
from ..store.runs import TRAINING_CONFIG

LDM_PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model.", "text_encoder": "cond_stage_model.transformer."}
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
COND_PROJ_FILE = "cond_proj.safetensors"
COND_PROJ_KEY = "time_embedding.cond_proj.weight"
STUDENT_UNET_CONFIG = "student_unet_config.json"


# ---- single-file export (diffusers -> original LDM key names) -----------------------------------------------------
_UNET_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
                ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
_VAE_ATTN = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))


def _sub(key: str, pairs: tuple[tuple[str, str], ...]) -> str:
    for a, b in pairs:
        key = key.replace(f".{a}.", f".{b}.")
    return key


def unet_to_ldm(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """Diffusers UNet state dict -> LDM `model.diffusion_model.*` names (inverse of diffusers' converter)."""
    lpb = unet.config.layers_per_block
    out: dict[str, torch.Tensor] = {}
    for key, value in unet.state_dict().items():
        mod, _, leaf = key.rpartition(".")
        parts = key.split(".")
        if mod in _UNET_TOP:
            new = f"{_UNET_TOP[mod]}.{leaf}"
        elif parts[0] == "down_blocks":
            i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            if kind == "downsamplers":
                new = f"input_blocks.{1 + i * (lpb + 1) + lpb}.0.op.{rest.removeprefix('conv.')}"
            else:
                new = f"input_blocks.{1 + i * (lpb + 1) + j}.{0 if kind == 'resnets' else 1}.{rest}"
        elif parts[0] == "mid_block":
            kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            new = f"middle_block.{2 * j if kind == 'resnets' else 1}.{rest}"
        elif parts[0] == "up_blocks":
            i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            if kind == "upsamplers":
                has_attn = hasattr(unet.up_blocks[i], "attentions")
                new = f"output_blocks.{i * (lpb + 1) + lpb}.{2 if has_attn else 1}.{rest}"
            else:
                new = f"output_blocks.{i * (lpb + 1) + j}.{0 if kind == 'resnets' else 1}.{rest}"
        else:
            raise ValueError(f"no LDM name for UNet weight {key!r} (time_cond_proj / class embeddings are not SD1.5)")
        if ".resnets." in key or (parts[0] == "mid_block" and parts[1] == "resnets"):
            new = _sub("." + new, _UNET_RESNET)[1:]
        out[LDM_PREFIXES["unet"] + new] = value
    return out


def vae_to_ldm(vae: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Diffusers AutoencoderKL state dict -> LDM `first_stage_model.*` names."""
    n_up = len(vae.config.up_block_types)
    out: dict[str, torch.Tensor] = {}
    for key, value in vae.state_dict().items():
        new = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        new = re.sub(r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", new)
        new = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", new)
        new = re.sub(r"up_blocks\.(\d+)\.resnets\.", lambda m: f"up.{n_up - 1 - int(m[1])}.block.", new)
        new = re.sub(r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{n_up - 1 - int(m[1])}.upsample.", new)
        new = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", new)
        if "mid_block.attentions.0." in new:
            new = _sub(new.replace("mid_block.attentions.0.", "mid.attn_1."), _VAE_ATTN)
            if value.ndim == 2:  # linear -> 1x1 conv, as in the original checkpoints
                value = value[:, :, None, None]
        out[LDM_PREFIXES["vae"] + new] = value
    return out


def text_encoder_to_ldm(text_encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CLIPTextModel state dict -> `cond_stage_model.transformer.text_model.*` (transformers >= 5.6 is flat)."""
    return {LDM_PREFIXES["text_encoder"] + (k if k.startswith("text_model.") else "text_model." + k): v
            for k, v in text_encoder.state_dict().items() if not k.endswith("position_ids")}


def save_single_file(pipe: StableDiffusionPipeline, path: str | Path) -> Path:
    """The pipeline's UNet, VAE and text encoder as one SD1.5-style (LDM key names) .safetensors file."""
    sd = {**unet_to_ldm(pipe.unet), **vae_to_ldm(pipe.vae), **text_encoder_to_ldm(pipe.text_encoder)}
    sd = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
    path = Path(path)
    atomic_write(path, lambda tmp: save_file(sd, str(tmp), metadata={"format": "pt"}))
    return path


# ---- students ------------------------------------------------------------------------------------------------
def has_lora(unet: torch.nn.Module) -> bool:
    return bool(getattr(unet, "peft_config", None))


def save_student(run_dir: str | Path, unet: UNet2DConditionModel, *, lora: bool, config: dict,
                 dtype: torch.dtype | None = None) -> Path:
    """Write unet/ (full) or lora/ (adapter + cond_proj) and training_config.json, each atomically; returns run_dir.

    dtype: store a full UNet in this dtype (e.g. fp16 for the embedded students); loading casts to the teacher's.

    Other files in run_dir (samples, checkpoints) are left alone; the other format's folder is removed.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if lora and not has_lora(unet):
        raise ValueError("save_student(lora=True) needs a UNet with a peft LoRA adapter (unet.add_adapter)")
    if not lora and has_lora(unet):
        raise ValueError("the UNet carries a LoRA adapter: save it with lora=True, or fuse_lora() + unload_lora() first")
    name = "lora" if lora else "unet"
    tmp = run_dir / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        if lora:
            _write_lora(unet, tmp)
        else:
            _write_full(unet if dtype is None else copy.deepcopy(unet).to(dtype), tmp)
        fsync_tree(tmp)
        replace_dir(tmp, run_dir / name)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    other = run_dir / ("unet" if lora else "lora")
    if other.exists():
        shutil.rmtree(other)
    payload = json.dumps(config, indent=2, sort_keys=True, default=str)
    atomic_write(run_dir / TRAINING_CONFIG, lambda p: p.write_text(payload))
    return run_dir


def _write_full(unet: UNet2DConditionModel, out: Path) -> None:
    unet.save_pretrained(str(out), safe_serialization=True)


def _write_lora(unet: UNet2DConditionModel, out: Path) -> None:
    from peft.utils import get_peft_model_state_dict

    out.mkdir(parents=True)
    adapter = next(iter(unet.peft_config))
    layers = get_peft_model_state_dict(unet, adapter_name=adapter)  # peft names; diffusers loads them
    layers = {k: v.detach().contiguous().cpu() for k, v in layers.items()}
    StableDiffusionPipeline.save_lora_weights(str(out), unet_lora_layers=layers, weight_name=LORA_WEIGHTS,
                                              unet_lora_adapter_metadata=unet.peft_config[adapter].to_dict())
    if unet.config.time_cond_proj_dim is not None:
        w = unet.time_embedding.cond_proj.weight.detach().contiguous().cpu()
        save_file({COND_PROJ_KEY: w}, str(out / COND_PROJ_FILE))
    config = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    (out / STUDENT_UNET_CONFIG).write_text(json.dumps(config, indent=2, default=list))


# ---- kohya export ----------------------------------------------------------------------------------------------
def _peft_lora_state(source: Any) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """(module -> {"A", "B"} flattened as "<module>.lora_A/B.weight", alphas per module) from a UNet, dict or file."""
    if isinstance(source, torch.nn.Module):
        from peft.utils import get_peft_model_state_dict

        if not has_lora(source):
            raise ValueError("the UNet has no LoRA adapter to export")
        adapter = next(iter(source.peft_config))
        pcfg = source.peft_config[adapter]
        sd = get_peft_model_state_dict(source, adapter_name=adapter)
        return _normalise_lora_keys(sd), _alphas(sd, pcfg.r, pcfg.lora_alpha, pcfg.rank_pattern, pcfg.alpha_pattern)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            path = next((p for p in (path / "lora" / LORA_WEIGHTS, path / LORA_WEIGHTS) if p.is_file()), path)
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        sd = load_file(str(path))
        pcfg = _adapter_metadata(meta)
        norm = _normalise_lora_keys(sd)
        return norm, _alphas(norm, pcfg.get("r"), pcfg.get("lora_alpha"), pcfg.get("rank_pattern") or {},
                             pcfg.get("alpha_pattern") or {})
    norm = _normalise_lora_keys(dict(source))
    return norm, _alphas(norm, None, None, {}, {})


def _adapter_metadata(meta: dict) -> dict:
    """The UNet's LoraConfig as diffusers stores it ("lora_adapter_metadata": {"unet.r": .., "unet.lora_alpha": ..})."""
    try:
        packed = json.loads(meta.get("lora_adapter_metadata", "{}"))
    except ValueError:
        return {}
    if isinstance(packed.get("unet"), dict):
        return packed["unet"]
    return {k.removeprefix("unet."): v for k, v in packed.items() if k.startswith("unet.")}


def _normalise_lora_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any diffusers / peft LoRA naming -> '<unet module>.lora_A.weight' / '.lora_B.weight' (unet keys only)."""
    out = {}
    for k, v in sd.items():
        if k.startswith(("text_encoder", "te_")):
            continue
        k = k.removeprefix("unet.").removeprefix("base_model.model.")
        k = k.replace(".lora.down.", ".lora_A.").replace(".lora.up.", ".lora_B.")
        k = re.sub(r"\.lora_([AB])\.[^.]+\.weight$", r".lora_\1.weight", k)  # adapter name inside the key
        if ".lora_A." in k or ".lora_B." in k:
            out[k] = v
    if not out:
        raise ValueError("no UNet LoRA weights (lora_A/lora_B or lora.down/lora.up keys) found")
    return out


def _alphas(sd: dict, r: int | None, alpha: float | None, rank_pattern: dict, alpha_pattern: dict) -> dict[str, float]:
    """Per-module alpha (peft scale = alpha / r); default alpha = r (scale 1) when unknown."""
    out = {}
    for k, v in sd.items():
        if ".lora_A." not in k:
            continue
        module = k.split(".lora_A.")[0]
        rank = v.shape[0]
        a = next((float(x) for pat, x in alpha_pattern.items() if re.search(pat, module)), None)
        if a is None and alpha is not None:
            base_r = next((x for pat, x in rank_pattern.items() if re.search(pat, module)), r)
            a = float(alpha) * rank / base_r if base_r and rank_pattern else float(alpha)
        out[module] = float(rank) if a is None else a
    return out


def export_kohya_lora(lora_state_dict_or_unet: Any, out_path: str | Path) -> Path:
    """A kohya-format LoRA .safetensors (lora_unet_<module>.lora_down/.lora_up/.alpha) for A1111 / ComfyUI.

    Accepts a UNet with a peft adapter, a LoRA state dict (peft or diffusers names), or a LoRA file / run folder.
    Only LoRA layers travel: a student's cond_proj (gamma input) has no kohya form (see README notes).
    """
    sd, alphas = _peft_lora_state(lora_state_dict_or_unet)
    kohya: dict[str, torch.Tensor] = {}
    for module, alpha in alphas.items():
        name = "lora_unet_" + module.replace(".", "_")
        kohya[f"{name}.lora_down.weight"] = sd[f"{module}.lora_A.weight"].detach().float().contiguous().cpu()
        kohya[f"{name}.lora_up.weight"] = sd[f"{module}.lora_B.weight"].detach().float().contiguous().cpu()
        kohya[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    out_path = Path(out_path)
    meta = {"ss_network_module": "networks.lora", "ss_base_model_version": "sd_v1", "format": "pt"}
    atomic_write(out_path, lambda tmp: save_file(kohya, str(tmp), metadata=meta))
    return out_path
