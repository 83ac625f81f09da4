"""Model export: a student run folder (diffusers), and the forms stock tools load: an SD1.5 single file (LDM key
names), a stock diffusers pipeline folder, a kohya LoRA and a diffusers LoRA.

A student run folder (weights/<run>/), as `models.loading.load_student` reads it, holds `training_config.json` and
  unet/   a full diffusers UNet2DConditionModel with time_cond_proj_dim set, or
  lora/   pytorch_lora_weights.safetensors (diffusers LoRA), cond_proj.safetensors (the gamma projection, trained in
          full) and student_unet_config.json.
That folder keeps the gamma input (resuming, the studio, SPLAM-aware tools). Stock tools have no gamma input: they
run the student at gamma = 1, where it adds the constant c = cond_proj(emb(omega)) (omega = 0, or the w of a
w-conditioned student) to the time embedding before `time_embedding.linear_1` (diffusers' TimestepEmbedding:
`linear_1(sample + cond_proj(condition))`). Since linear_1(x + c) = W x + (b + W c), the fold b' = b + W c is exact:
every stock form carries it (`fold_cond_proj`), a LoRA as the bias difference `diff_b` (kohya) or `lora_B.bias`
(diffusers). `export_run` writes the forms of a finished run. Every file is safetensors or JSON, written atomically.
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

from ..core.slode import guidance_embedding
from ..store.atomic import atomic_write, fsync_tree, replace_dir
from ..store.runs import TRAINING_CONFIG
from .sdxl import KOHYA_SDXL_BASE, SDXL_LORA_ARCHITECTURE, is_sdxl_unet, kohya_sdxl_names, sdxl_single_file_state

LDM_PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model.", "text_encoder": "cond_stage_model.transformer."}
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
COND_PROJ_FILE = "cond_proj.safetensors"
COND_PROJ_KEY = "time_embedding.cond_proj.weight"
STUDENT_UNET_CONFIG = "student_unet_config.json"
KOHYA_LORA = "lora_kohya.safetensors"  # A1111 / Forge / ComfyUI: LoRA layers + the folded gamma = 1 bias (diff_b)
DIFFUSERS_LORA = "lora_diffusers.safetensors"  # diffusers' load_lora_weights: LoRA layers + the bias as lora_B.bias
STOCK_PIPELINE = "stock_diffusers"  # a stock diffusers pipeline folder (no cond_proj): kohya sd-scripts, ComfyUI
FOLD_MODULE = "time_embedding.linear_1"
KOHYA_FOLD = "lora_unet_time_embedding_linear_1"


# ---- the gamma = 1 fold ----------------------------------------------------------------------------------------
def gamma_one_shift(unet: UNet2DConditionModel, omega: float = 0.0) -> torch.Tensor:
    """c = cond_proj(emb(omega)): what a student adds to its time embedding at gamma = 1 (fp64, (in_features,))."""
    if unet.config.time_cond_proj_dim is None:
        raise ValueError("the UNet has no time_cond_proj (no gamma input): there is nothing to fold")
    w = unet.time_embedding.cond_proj.weight.detach().double().cpu()
    return w @ guidance_embedding(torch.tensor([omega]), unet.config.time_cond_proj_dim)[0].double()


def _effective_weight(lin: torch.nn.Module) -> torch.Tensor:
    """The weight a (possibly peft-wrapped) Linear applies: base + the active LoRA deltas (fp64, CPU)."""
    base = getattr(lin, "base_layer", lin)
    w = base.weight.detach().double().cpu()
    for name in (getattr(lin, "active_adapters", None) or []) if hasattr(lin, "lora_A") else []:
        if name in lin.lora_A:
            w = w + lin.get_delta_weight(name).detach().double().cpu()
    return w


def folded_bias_delta(unet: UNet2DConditionModel, omega: float = 0.0) -> torch.Tensor:
    """W c: what folds the gamma = 1 shift into `time_embedding.linear_1.bias` (fp32; W as a LoRA fuses it)."""
    return (_effective_weight(unet.time_embedding.linear_1) @ gamma_one_shift(unet, omega)).float()


def fold_cond_proj(unet: UNet2DConditionModel, omega: float = 0.0) -> UNet2DConditionModel:
    """The student at gamma = 1 as a stock UNet (time_cond_proj_dim None): linear_1.bias += W cond_proj(emb(omega)).

    A LoRA student is fused first (the student is not changed: everything happens on a copy). omega = 0 for
    gamma-conditioned students, the sampling w for a w-conditioned one (models.loading.sampling_guidance - 1).
    """
    src = copy.deepcopy(unet)
    if has_lora(src):
        src.fuse_lora()
        src.unload_lora()
    delta = folded_bias_delta(src, omega)
    config = {k: v for k, v in src.config.items() if not k.startswith("_")}
    config["time_cond_proj_dim"] = None
    with torch.device("meta"):
        out = UNet2DConditionModel.from_config(config)
    state = {k: v for k, v in src.state_dict().items() if k != COND_PROJ_KEY}
    bias = state[f"{FOLD_MODULE}.bias"]
    state[f"{FOLD_MODULE}.bias"] = (bias.double() + delta.double().to(bias.device)).to(bias.dtype)
    out.load_state_dict(state, strict=True, assign=True)
    return out.to(dtype=src.dtype).eval()


# ---- single-file export (diffusers -> original LDM key names) -----------------------------------------------------
_UNET_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
                ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}  # SDXL: text_time
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


def save_single_file(pipe: StableDiffusionPipeline, path: str | Path, unet: UNet2DConditionModel | None = None,
                     dtype: torch.dtype | None = None) -> Path:
    """The pipeline's UNet (or `unet`, stored in `dtype` if given), VAE and text encoder as one SD1.5-style (LDM key
    names) .safetensors file.

    A student UNet is refused: fold its gamma input first (`fold_cond_proj`), as `export_run` does.
    """
    unet = pipe.unet if unet is None else unet
    if unet.config.time_cond_proj_dim is not None or has_lora(unet):
        raise ValueError("a single file holds a stock UNet: fold the student's gamma input first "
                         "(models.export.fold_cond_proj), which also fuses a LoRA")
    if is_sdxl_unet(unet):  # SDXL: sgm names, both text encoders (models/sdxl.py)
        sd = {k: v.to(dtype or v.dtype) if k.startswith(LDM_PREFIXES["unet"]) else v
              for k, v in sdxl_single_file_state(pipe, unet).items()}
    else:
        sd = {**{k: v.to(dtype or v.dtype) for k, v in unet_to_ldm(unet).items()}, **vae_to_ldm(pipe.vae),
              **text_encoder_to_ldm(pipe.text_encoder)}
    sd = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
    path = Path(path)
    atomic_write(path, lambda tmp: save_file(sd, str(tmp), metadata={"format": "pt"}))
    return path


def save_stock_pipeline(pipe: StableDiffusionPipeline, unet: UNet2DConditionModel, out_dir: str | Path) -> Path:
    """A stock diffusers pipeline folder (the teacher's VAE, text encoder, tokenizer, scheduler; `unet` folded)."""
    if unet.config.time_cond_proj_dim is not None or has_lora(unet):
        raise ValueError("a stock pipeline holds a stock UNet: fold the student first (models.export.fold_cond_proj)")
    out_dir = Path(out_dir)
    if is_sdxl_unet(unet):
        from diffusers import StableDiffusionXLPipeline

        stock = StableDiffusionXLPipeline(**{**pipe.components, "unet": unet},
                                          force_zeros_for_empty_prompt=pipe.config.get("force_zeros_for_empty_prompt", True))
    else:
        stock = StableDiffusionPipeline(**{**pipe.components, "unet": unet, "safety_checker": None,
                                           "feature_extractor": None}, requires_safety_checker=False)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        stock.save_pretrained(str(tmp), safe_serialization=True)
        fsync_tree(tmp)
        replace_dir(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out_dir


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


def _lora_unet_fold(source: Any, teacher: UNet2DConditionModel | None, omega: float) -> torch.Tensor | None:
    """W c of a LoRA student (a UNet, or a run / lora folder with cond_proj.safetensors plus its teacher); None if
    the source has no gamma input."""
    if isinstance(source, torch.nn.Module):
        return folded_bias_delta(source, omega) if source.config.time_cond_proj_dim is not None else None
    if not isinstance(source, (str, Path)) or not Path(source).is_dir():
        return None
    folder = Path(source) / "lora" if (Path(source) / "lora").is_dir() else Path(source)
    if not (folder / COND_PROJ_FILE).is_file():
        return None
    if teacher is None:
        raise ValueError(f"{folder} has a gamma projection ({COND_PROJ_FILE}): pass teacher=<the teacher UNet> so that "
                         "its gamma = 1 shift can be folded into the LoRA (else the file samples another model)")
    w = load_file(str(folder / COND_PROJ_FILE))[COND_PROJ_KEY].double()
    c = w @ guidance_embedding(torch.tensor([omega]), w.shape[1])[0].double()
    return (_effective_weight(teacher.time_embedding.linear_1) @ c).float()


def kohya_metadata(alphas: dict[str, float], sd: dict[str, torch.Tensor], config: dict | None = None,
                   title: str | None = None, sdxl: bool = False) -> dict[str, str]:
    """`ss_*` (kohya sd-scripts, shown by A1111 / Forge) and `modelspec.*` (Stability's model spec) metadata."""
    import time

    cfg = config or {}
    ranks = sorted({int(sd[f"{m}.lora_A.weight"].shape[0]) for m in alphas})
    res = cfg.get("resolution")
    meta = {"format": "pt", "ss_network_module": "networks.lora", "ss_base_model_version": "sd_v1", "ss_v2": "False",
            "ss_network_dim": str(ranks[0] if len(ranks) == 1 else ranks),
            "ss_network_alpha": str(next(iter(set(alphas.values()))) if len(set(alphas.values())) == 1 else "mixed"),
            "ss_training_comment": f"SPLAM Studio {cfg.get('method', 'splam')} student; sample with an LCM sampler, "
                                   "1-4 steps, CFG 1",
            "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "stable-diffusion-v1/lora",
            "modelspec.implementation": "diffusers", "modelspec.title": title or str(cfg.get("run_name", "student")),
            "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()),
            "modelspec.prediction_type": "epsilon", "modelspec.description": "few-step student distilled with SPLAM Studio"}
    for key, name in (("teacher", "ss_sd_model_name"), ("max_steps", "ss_max_train_steps"), ("lr", "ss_learning_rate"),
                      ("seed", "ss_seed"), ("batch_size", "ss_batch_size_per_device")):
        if cfg.get(key) is not None:
            meta[name] = str(cfg[key])
    if sdxl:
        meta.update(ss_base_model_version=KOHYA_SDXL_BASE, **{"modelspec.architecture": SDXL_LORA_ARCHITECTURE})
    if res:
        meta["ss_resolution"] = f"({res}, {res})"
        meta["modelspec.resolution"] = f"{res}x{res}"
    return meta


def export_kohya_lora(lora_state_dict_or_unet: Any, out_path: str | Path, *, teacher: UNet2DConditionModel | None = None,
                      omega: float = 0.0, config: dict | None = None) -> Path:
    """A kohya-format LoRA .safetensors (lora_unet_<module>.lora_down/.lora_up/.alpha) for A1111 / Forge / ComfyUI.

    Accepts a UNet with a peft adapter, a LoRA state dict (peft or diffusers names), or a LoRA file / run folder.
    A student's gamma input (cond_proj) has no LoRA form; at gamma = 1 it is a constant shift of the time embedding,
    which travels folded into `time_embedding.linear_1` as `lora_unet_time_embedding_linear_1.diff_b` (= W c, see
    `fold_cond_proj`) plus a zero `.diff` (A1111 and Forge read diff_b only beside a diff; ComfyUI reads it alone).
    diffusers' `load_lora_weights` refuses diff keys in SD1.x kohya files: diffusers users load `export_diffusers_lora`'s
    file. From a run folder, pass `teacher` (W is the teacher's). README: "Use your student in A1111 / Forge / ComfyUI".
    """
    from diffusers.utils import convert_state_dict_to_kohya

    sd, alphas = _peft_lora_state(lora_state_dict_or_unet)
    delta = _lora_unet_fold(lora_state_dict_or_unet, teacher, omega)
    unet = lora_state_dict_or_unet if isinstance(lora_state_dict_or_unet, torch.nn.Module) else teacher
    names = kohya_sdxl_names(unet) if unet is not None and is_sdxl_unet(unet) else None  # SDXL: sgm names
    fold = names[FOLD_MODULE] if names else KOHYA_FOLD
    if names is None:
        # SD1.x: diffusers names the layers (lora_unet_<module>.lora_down / .lora_up); its .alpha is the rank, a scale
        # of 1, which is exact only for lora_alpha = r: each module's own alpha (peft's lora_alpha, alpha_pattern)
        # replaces it
        kohya = convert_state_dict_to_kohya({f"unet.{k}": v.detach().float().contiguous().cpu() for k, v in sd.items()})
        for module, alpha in alphas.items():
            kohya[f"lora_unet_{module.replace('.', '_')}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    else:  # SDXL: kohya's sgm block names (input_blocks / middle_block / output_blocks), which diffusers does not write
        kohya = {}
        for module, alpha in alphas.items():
            kohya[f"{names[module]}.lora_down.weight"] = sd[f"{module}.lora_A.weight"].detach().float().contiguous().cpu()
            kohya[f"{names[module]}.lora_up.weight"] = sd[f"{module}.lora_B.weight"].detach().float().contiguous().cpu()
            kohya[f"{names[module]}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    if delta is not None:
        if f"{fold}.lora_down.weight" in kohya:
            raise ValueError(f"{FOLD_MODULE} carries LoRA layers: kohya loaders apply one patch kind per module, so the "
                             "gamma = 1 fold cannot travel beside them; leave time_embedding.linear_1 out of the LoRA targets")
        kohya[f"{fold}.diff_b"] = delta.contiguous()
        kohya[f"{fold}.diff"] = torch.zeros(delta.shape[0], _fold_in_features(lora_state_dict_or_unet, teacher))
    out_path = Path(out_path)
    meta = kohya_metadata(alphas, sd, config, title=out_path.stem, sdxl=names is not None)
    meta["splam_gamma_fold"] = "diff_b" if delta is not None else "none"
    atomic_write(out_path, lambda tmp: save_file(kohya, str(tmp), metadata=meta))
    return out_path


def _fold_in_features(source: Any, teacher: UNet2DConditionModel | None) -> int:
    unet = source if isinstance(source, torch.nn.Module) else teacher
    return getattr(unet.time_embedding.linear_1, "in_features")


def export_diffusers_lora(unet: UNet2DConditionModel, out_path: str | Path, omega: float = 0.0) -> Path:
    """The LoRA as diffusers' `load_lora_weights` reads it, the gamma = 1 fold inside (unfused use only).

    Every lora_B gets a bias (peft's lora_bias: zero, but W c / scale on `time_embedding.linear_1`, whose LoRA
    layers are zero). peft cannot fuse a LoRA bias into a bias-free layer, so `fuse_lora()` refuses this file;
    for a fused model use the merged single file (`export_run(..., merged=True)`).
    """
    from peft.utils import get_peft_model_state_dict

    if not has_lora(unet):
        raise ValueError("the UNet has no LoRA adapter to export")
    adapter = next(iter(unet.peft_config))
    pcfg = unet.peft_config[adapter].to_dict()
    layers = {k: v.detach().float().contiguous().cpu() for k, v in get_peft_model_state_dict(unet, adapter_name=adapter).items()}
    if unet.config.time_cond_proj_dim is not None:
        if any(k.startswith(FOLD_MODULE + ".") for k in layers):
            raise ValueError(f"{FOLD_MODULE} carries LoRA layers: leave it out of the LoRA targets to export the fold")
        r, lin = int(pcfg["r"]), unet.time_embedding.linear_1
        scale = float(pcfg["lora_alpha"]) / r
        for k in [k for k in layers if k.endswith("lora_B.weight")]:
            layers[k[: -len("weight")] + "bias"] = torch.zeros(layers[k].shape[0])
        layers[f"{FOLD_MODULE}.lora_A.weight"] = torch.zeros(r, lin.in_features)
        layers[f"{FOLD_MODULE}.lora_B.weight"] = torch.zeros(lin.out_features, r)
        layers[f"{FOLD_MODULE}.lora_B.bias"] = folded_bias_delta(unet, omega) / scale
        targets = sorted(set(pcfg.get("target_modules") or []) | {FOLD_MODULE})
        pcfg = {**pcfg, "lora_bias": True, "init_lora_weights": True, "target_modules": targets}
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        StableDiffusionPipeline.save_lora_weights(str(tmp.parent), unet_lora_layers=layers, weight_name=tmp.name,
                                                  unet_lora_adapter_metadata=pcfg)
    atomic_write(out_path, write)
    return out_path


# ---- the forms of a finished run -------------------------------------------------------------------------------
def export_run(run_dir: str | Path, student: UNet2DConditionModel, teacher_pipe: StableDiffusionPipeline,
               config: dict, *, merged: bool = False) -> dict[str, Path]:
    """Every form a finished run is loaded in, by name: the studio's run folder (`run`: unet/ or lora/, with the gamma
    input) and the stock forms, each with the gamma = 1 fold:
      full student:  `single_file` <run>.safetensors (A1111, Forge, ComfyUI, diffusers' from_single_file);
      LoRA student:  `kohya_lora` lora_kohya.safetensors (A1111, Forge, ComfyUI), `diffusers_lora`
                     lora_diffusers.safetensors (diffusers' load_lora_weights); with merged=True also `single_file`
                     <run>.safetensors, the LoRA fused;
      merged=True:   `stock_diffusers` stock_diffusers/, a diffusers pipeline folder without cond_proj (kohya
                     sd-scripts, ComfyUI's diffusers loader).
    config: the run's resolved training config (lora_rank, save_fp16, w / w_min for the fold's omega, run_name).
    """
    from ..core.teacher import lcm_w
    from .loading import sampling_guidance

    run_dir = Path(run_dir)
    lora = int(config.get("lora_rank") or 0) > 0
    fp16 = bool(config.get("save_fp16"))
    omega = lcm_w(sampling_guidance(config))  # 0 for gamma-conditioned students, w for a w-conditioned one
    name = str(config.get("run_name") or run_dir.name)
    save_student(run_dir, student, lora=lora, config=config, dtype=torch.float16 if fp16 else None)
    out = {"run": run_dir}
    if fp16 and not lora:  # fold what the studio loads: the fp16-rounded student, back in fp32
        student = copy.deepcopy(student).to(torch.float16).float()
    if lora:
        out["kohya_lora"] = export_kohya_lora(student, run_dir / KOHYA_LORA, omega=omega, config=config)
        out["diffusers_lora"] = export_diffusers_lora(student, run_dir / DIFFUSERS_LORA, omega=omega)
    if merged or not lora:
        stock = fold_cond_proj(student, omega)
        out["single_file"] = save_single_file(teacher_pipe, run_dir / f"{name}.safetensors", unet=stock,
                                              dtype=torch.float16 if fp16 else None)
        if merged:
            out["stock_diffusers"] = save_stock_pipeline(teacher_pipe, stock.to(torch.float16) if fp16 else stock,
                                                         run_dir / STOCK_PIPELINE)
    return out
