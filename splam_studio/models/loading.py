"""Model loading and export: teachers (embedded, diffusers folder, single file, hub id), students, kohya LoRA.

A student run folder (weights/<run>/) holds `training_config.json` and either
  unet/   a full diffusers UNet2DConditionModel with time_cond_proj_dim set, or
  lora/   pytorch_lora_weights.safetensors (diffusers LoRA, `pipe.load_lora_weights` loads it),
          cond_proj.safetensors (the gamma projection, trained in full) and student_unet_config.json.
Everything is safetensors; pickle formats load only with allow_pickle=True (CLI: --allow-pickle).
"""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..training.atomic import atomic_write, fsync_tree, replace_dir
from ..core.teacher import cfg_scale
from ..training.runs import RUN_NAME, TRAINING_CONFIG, WEIGHTS_ENV, valid_run_name, weights_dir  # noqa: F401  (re-exported)

EMBEDDED = {
    "shapes": "shapes-teacher",
    "shapes-teacher": "shapes-teacher",
    "shapes-splam": "shapes-splam",
    "shapes-lcm": "shapes-lcm",
    "shapes-evaluator": "shapes-evaluator",
}
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl", ".pickle")
SD_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
LDM_PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model.", "text_encoder": "cond_stage_model.transformer."}
UNET_MATCH_KEYS = ("in_channels", "out_channels", "block_out_channels", "cross_attention_dim", "layers_per_block",
                   "down_block_types", "up_block_types", "attention_head_dim")
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
COND_PROJ_FILE = "cond_proj.safetensors"
COND_PROJ_KEY = "time_embedding.cond_proj.weight"
STUDENT_UNET_CONFIG = "student_unet_config.json"
PICKLE_REASON = ("pickle files can run arbitrary code when loaded; convert to .safetensors, or pass "
                 "allow_pickle=True (CLI: --allow-pickle) if you trust the source")


class ModelLoadError(ValueError):
    """A model that cannot be loaded; the message says why and what would work."""



def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:400]


def _hub_offline() -> bool:
    import huggingface_hub

    return bool(huggingface_hub.constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")


# ---- teachers --------------------------------------------------------------------------------------------------
def load_teacher(source: str | Path, *, torch_dtype: torch.dtype = torch.float32, allow_pickle: bool = False,
                 config: str | Path | None = None, weights: Path | None = None) -> StableDiffusionPipeline:
    """An SD1.5-shaped StableDiffusionPipeline from an embedded name, a diffusers folder, a single file or a hub id.

    `config` is a local diffusers folder giving the component configs for a single-file checkpoint (offline the
    SD1.5 configs cannot be fetched from the hub).
    """
    source = str(source)
    if source in EMBEDDED:
        path = (weights or weights_dir()) / EMBEDDED[source]
        if not path.is_dir():
            raise ModelLoadError(f"embedded model {source!r} not found at {path} (set {WEIGHTS_ENV} to the weights folder)")
        return _load_diffusers_folder(path, torch_dtype, allow_pickle)
    path = Path(source).expanduser()
    if path.is_dir():
        return _load_diffusers_folder(path, torch_dtype, allow_pickle)
    if path.is_file():
        return _load_single_file(path, torch_dtype, allow_pickle, config)
    if _looks_like_hub_id(source):
        return _load_hub(source, torch_dtype, allow_pickle)
    raise ModelLoadError(f"teacher {source!r} does not exist; valid: an embedded name {sorted(EMBEDDED)}, a diffusers "
                         "folder (with model_index.json), an SD1.5 .safetensors file, or a hub id 'owner/name'")


def _looks_like_hub_id(source: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", source) is not None and ".." not in source


def _check_sd_folder(path: Path, allow_pickle: bool) -> None:
    """model_index.json plus unet / vae / text_encoder / tokenizer / scheduler, weights in safetensors."""
    if not (path / "model_index.json").is_file():
        raise ModelLoadError(f"{path} is not a diffusers pipeline folder (no model_index.json); expected "
                             f"model_index.json and subfolders {list(SD_COMPONENTS)}")
    missing = [c for c in SD_COMPONENTS if not (path / c).is_dir()]
    if missing:
        raise ModelLoadError(f"{path} is not a Stable Diffusion pipeline: missing {missing} "
                             f"(expected subfolders {list(SD_COMPONENTS)})")
    for c in ("unet", "vae", "text_encoder"):
        files = [p for p in (path / c).iterdir() if p.is_file()]
        if any(p.suffix == ".safetensors" for p in files):
            continue
        pickles = [p.name for p in files if p.suffix in PICKLE_SUFFIXES]
        if not pickles:
            raise ModelLoadError(f"{path / c} has no weights (.safetensors)")
        if not allow_pickle:
            raise ModelLoadError(f"{path / c} holds only pickle weights {pickles}: {PICKLE_REASON}")


def _load_diffusers_folder(path: Path, dtype: torch.dtype, allow_pickle: bool) -> StableDiffusionPipeline:
    _check_sd_folder(path, allow_pickle)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            str(path), torch_dtype=dtype, use_safetensors=not allow_pickle, safety_checker=None,
            feature_extractor=None, requires_safety_checker=False, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - one readable line instead of a traceback
        raise ModelLoadError(f"cannot load the diffusers folder {path}: {_one_line(e)}") from None
    return _finish(pipe)


def _checkpoint_keys(path: Path) -> list[str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"{path} is not a readable .safetensors file: {_one_line(e)}") from None


def _load_single_file(path: Path, dtype: torch.dtype, allow_pickle: bool,
                      config: str | Path | None) -> StableDiffusionPipeline:
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise ModelLoadError(f"refusing to load {path.name}: {PICKLE_REASON}")
    elif suffix != ".safetensors":
        raise ModelLoadError(f"{path} is not a model file; valid: a .safetensors SD1.5 checkpoint, a diffusers folder, "
                             f"or a pickle checkpoint {PICKLE_SUFFIXES} with --allow-pickle")
    else:
        keys = _checkpoint_keys(path)
        missing = [name for name, prefix in LDM_PREFIXES.items() if not any(k.startswith(prefix) for k in keys)]
        if missing:
            raise ModelLoadError(f"{path.name} is not a Stable Diffusion 1.x checkpoint: no {missing} weights (keys "
                                 f"starting {[LDM_PREFIXES[m] for m in missing]}); a LoRA or a single model is not a teacher")
    if config is not None and not (Path(config) / "model_index.json").is_file():
        raise ModelLoadError(f"config={config} must be a local diffusers folder with model_index.json")
    try:
        pipe = StableDiffusionPipeline.from_single_file(
            str(path), config=str(config) if config else None, torch_dtype=dtype, safety_checker=None,
            requires_safety_checker=False, local_files_only=config is not None or _hub_offline())
    except Exception as e:  # noqa: BLE001
        hint = ("" if config else " Offline, the SD1.5 component configs cannot be fetched: pass config=<a local "
                "diffusers SD1.5 folder> (CLI: --teacher-config) holding model_index.json and the component configs.")
        raise ModelLoadError(f"cannot load single-file checkpoint {path.name}: {_one_line(e)}.{hint}") from None
    return _finish(pipe)


def _load_hub(repo_id: str, dtype: torch.dtype, allow_pickle: bool) -> StableDiffusionPipeline:
    offline = _hub_offline()
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            repo_id, torch_dtype=dtype, use_safetensors=not allow_pickle, safety_checker=None,
            feature_extractor=None, requires_safety_checker=False, local_files_only=offline)
    except Exception as e:  # noqa: BLE001
        where = "not in the local cache and HF_HUB_OFFLINE is set" if offline else "download failed"
        raise ModelLoadError(f"cannot load hub model {repo_id!r} ({where}): {_one_line(e)}") from None
    return _finish(pipe)


def _finish(pipe: StableDiffusionPipeline) -> StableDiffusionPipeline:
    for c in ("unet", "vae", "text_encoder", "tokenizer"):
        if getattr(pipe, c, None) is None:
            raise ModelLoadError(f"loaded pipeline has no {c}; a teacher needs {list(SD_COMPONENTS)}")
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---- students from the hub (or a Hugging Face cache; HF_HUB_OFFLINE=1 reads only the cache) ------------------------
HubStudentKind = Literal["unet", "lora"]


def load_hub_student(repo_id: str, teacher_pipe: StableDiffusionPipeline, kind: HubStudentKind | None = None, *,
                     allow_pickle: bool = False) -> UNet2DConditionModel:
    """A student UNet from a hub repo, in the teacher's dtype and on its device; nothing else of the repo is read.

    kind "unet": the repo's unet/ only (a full pipeline repo such as SimianLuo/LCM_Dreamshaper_v7 or
    alimama-creative/slam-sd1.5; its text encoder and VAE stay unread, the teacher's are shared).
    kind "lora": pytorch_lora_weights.safetensors at the repo root (e.g. latent-consistency/lcm-lora-sdv1-5), fused
    into a copy of the teacher UNet. None: try "unet", then "lora" (a hub id typed into the page).
    """
    kinds = (kind,) if kind is not None else ("unet", "lora")
    errors = []
    for k in kinds:
        try:
            loader = _hub_unet if k == "unet" else _hub_lora
            return loader(repo_id, teacher_pipe.unet, allow_pickle).eval()
        except ModelLoadError as e:
            errors.append(str(e))
    offline = " (HF_HUB_OFFLINE is set: only the local Hugging Face cache is read)" if _hub_offline() else ""
    raise ModelLoadError(f"cannot load student {repo_id!r}{offline}: " + "; ".join(errors))


def _hub_unet(repo_id: str, teacher: UNet2DConditionModel, allow_pickle: bool) -> UNet2DConditionModel:
    """`<repo>/unet` of a full pipeline repo, checked against the teacher's architecture."""
    try:
        unet = UNet2DConditionModel.from_pretrained(repo_id, subfolder="unet", torch_dtype=teacher.dtype,
                                                    use_safetensors=not allow_pickle, local_files_only=_hub_offline())
    except Exception as e:  # noqa: BLE001 - one readable line instead of a traceback
        raise ModelLoadError(f"{repo_id}/unet: {_one_line(e)}") from None
    diff = {k: (unet.config.get(k), teacher.config.get(k)) for k in UNET_MATCH_KEYS
            if _norm(unet.config.get(k)) != _norm(teacher.config.get(k))}
    if diff:
        raise ModelLoadError(f"{repo_id}/unet does not match the teacher: "
                             + ", ".join(f"{k} student={s} teacher={t}" for k, (s, t) in diff.items()))
    return unet.to(teacher.device)


def _hub_lora(repo_id: str, teacher: UNet2DConditionModel, allow_pickle: bool) -> UNet2DConditionModel:
    """The teacher UNet with the repo's LoRA fused in (a copy: the teacher itself stays as it was)."""
    try:
        state, alphas = StableDiffusionPipeline.lora_state_dict(
            repo_id, weight_name=None if allow_pickle else LORA_WEIGHTS, use_safetensors=not allow_pickle,
            local_files_only=_hub_offline())
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"{repo_id} as a LoRA ({LORA_WEIGHTS}): {_one_line(e)}") from None
    unet = copy.deepcopy(teacher)
    try:
        StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet=unet, adapter_name="student")
        unet.fuse_lora()
        unet.unload_lora()
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"{repo_id} as a LoRA does not fit the teacher: {_one_line(e)}") from None
    return unet


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


# ---- students --------------------------------------------------------------------------------------------------
def _has_lora(unet: torch.nn.Module) -> bool:
    return bool(getattr(unet, "peft_config", None))


def save_student(run_dir: str | Path, unet: UNet2DConditionModel, *, lora: bool, config: dict,
                 dtype: torch.dtype | None = None) -> Path:
    """Write unet/ (full) or lora/ (adapter + cond_proj) and training_config.json, each atomically; returns run_dir.

    dtype: store a full UNet in this dtype (e.g. fp16 for the embedded students); loading casts to the teacher's.

    Other files in run_dir (samples, checkpoints) are left alone; the other format's folder is removed.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if lora and not _has_lora(unet):
        raise ValueError("save_student(lora=True) needs a UNet with a peft LoRA adapter (unet.add_adapter)")
    if not lora and _has_lora(unet):
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


def _student_dir(path_or_name: str | Path, weights: Path | None) -> Path:
    path = Path(path_or_name).expanduser()
    if path.is_dir():
        return path
    try:
        return resolve_run(str(path_or_name), weights)
    except ModelLoadError:
        raise ModelLoadError(f"student {str(path_or_name)!r} not found: give a run folder (with unet/ or lora/) or a run "
                             f"name under {weights or weights_dir()}") from None


def _check_match(student_cfg: dict, teacher_cfg: Any, where: Path) -> None:
    diff = {k: (student_cfg.get(k), teacher_cfg.get(k)) for k in UNET_MATCH_KEYS
            if _norm(student_cfg.get(k)) != _norm(teacher_cfg.get(k))}
    if diff:
        raise ModelLoadError(f"student {where} does not match its teacher: "
                             + ", ".join(f"{k} student={s} teacher={t}" for k, (s, t) in diff.items()))
    if student_cfg.get("time_cond_proj_dim") is None:
        raise ModelLoadError(f"{where} has no time_cond_proj_dim: not a SPLAM/LCM student (is it a teacher UNet?)")


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, (list, tuple)) else v


def load_student(path_or_name: str | Path, teacher_pipe: StableDiffusionPipeline, *, fuse: bool = False,
                 weights: Path | None = None) -> UNet2DConditionModel:
    """The student UNet of a run folder (unet/ or lora/), in the teacher's dtype and device.

    A LoRA student is the teacher UNet + cond_proj + the adapter (active, named "student"); fuse=True merges it.
    """
    run = _student_dir(path_or_name, weights)
    teacher = teacher_pipe.unet
    if (run / "unet").is_dir():
        unet = _load_full_student(run / "unet", teacher)
    elif (run / "lora").is_dir():
        unet = _load_lora_student(run / "lora", teacher, fuse)
    else:
        raise ModelLoadError(f"{run} holds no student: expected a unet/ (full) or lora/ (LoRA) folder")
    return unet.to(device=teacher.device, dtype=teacher.dtype).eval()


def _load_full_student(folder: Path, teacher: UNet2DConditionModel) -> UNet2DConditionModel:
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder} has no config.json")
    _check_match(json.loads((folder / "config.json").read_text()), teacher.config, folder)
    if not any(folder.glob("*.safetensors")):
        raise ModelLoadError(f"{folder} has no .safetensors weights ({PICKLE_REASON})")
    try:
        return UNet2DConditionModel.from_pretrained(str(folder), torch_dtype=teacher.dtype, use_safetensors=True)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"cannot load the student UNet {folder}: {_one_line(e)}") from None


def _load_lora_student(folder: Path, teacher: UNet2DConditionModel, fuse: bool) -> UNet2DConditionModel:
    if not (folder / LORA_WEIGHTS).is_file():
        raise ModelLoadError(f"{folder} has no {LORA_WEIGHTS}")
    cfg = dict(teacher.config)
    if (folder / STUDENT_UNET_CONFIG).is_file():
        saved = json.loads((folder / STUDENT_UNET_CONFIG).read_text())
        _check_match(saved, teacher.config, folder)
        cfg["time_cond_proj_dim"] = saved["time_cond_proj_dim"]
    state = {k: v.detach().clone() for k, v in teacher.state_dict().items()}
    if (folder / COND_PROJ_FILE).is_file():
        state[COND_PROJ_KEY] = load_file(str(folder / COND_PROJ_FILE))[COND_PROJ_KEY].to(teacher.dtype)
        cfg["time_cond_proj_dim"] = state[COND_PROJ_KEY].shape[1]
    elif cfg.get("time_cond_proj_dim") is not None:
        raise ModelLoadError(f"{folder} lacks {COND_PROJ_FILE} for its time_cond_proj_dim")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg)
    try:
        unet.load_state_dict(state, strict=True, assign=True)
        unet.load_lora_adapter(str(folder), weight_name=LORA_WEIGHTS, prefix="unet", adapter_name="student")
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"LoRA student {folder} does not fit its teacher: {_one_line(e)}") from None
    if fuse:
        unet.fuse_lora()
        unet.unload_lora()
    return unet


# ---- kohya export ----------------------------------------------------------------------------------------------
def _peft_lora_state(source: Any) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """(module -> {"A", "B"} flattened as "<module>.lora_A/B.weight", alphas per module) from a UNet, dict or file."""
    if isinstance(source, torch.nn.Module):
        from peft.utils import get_peft_model_state_dict

        if not _has_lora(source):
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


# ---- runs under weights/ -----------------------------------------------------------------------------------------
Kind = Literal["teacher", "student", "evaluator", "unknown"]


@dataclass(frozen=True)
class RunInfo:
    """One folder under weights/: what it is and how it was trained."""

    name: str
    path: Path
    kind: Kind
    format: str | None = None  # teacher: "diffusers"; student: "full" | "lora"
    method: str | None = None  # from training_config.json, e.g. "splam" / "lcm"
    config: dict = field(default_factory=dict, compare=False, repr=False)


def run_info(path: Path) -> RunInfo:
    cfg: dict = {}
    if (path / TRAINING_CONFIG).is_file():
        try:
            cfg = json.loads((path / TRAINING_CONFIG).read_text())
        except ValueError:
            cfg = {}
    method = cfg.get("method")
    if (path / "model_index.json").is_file():
        return RunInfo(path.name, path, "teacher", "diffusers", method, cfg)
    if (path / "unet").is_dir():
        return RunInfo(path.name, path, "student", "full", method, cfg)
    if (path / "lora").is_dir():
        return RunInfo(path.name, path, "student", "lora", method, cfg)
    if cfg.get("kind") == "evaluator" or "evaluator" in path.name:
        return RunInfo(path.name, path, "evaluator", None, method, cfg)
    return RunInfo(path.name, path, "unknown", None, method, cfg)


def sampling_guidance(run: str | Path | dict) -> float:
    """guidance_scale a student must be sampled at, from its run folder or training_config.json dict.

    gamma-conditioned students (SPLAM, LCM at fixed w): 1.0, i.e. embedding(0). A w-conditioned student (diffusers'
    LCM recipe, w_min/w_max set) samples at CFG w + 1, w = the run's `w` (a stock pipeline embeds guidance_scale - 1).
    """
    cfg = run if isinstance(run, dict) else json.loads((Path(run) / TRAINING_CONFIG).read_text())
    return cfg_scale(float(cfg["w"])) if cfg.get("w_min") is not None else 1.0


def list_runs(weights: str | Path | None = None) -> list[RunInfo]:
    """Every run folder under weights/ (hidden and temp folders skipped), sorted by name."""
    root = Path(weights) if weights is not None else weights_dir()
    if not root.is_dir():
        return []
    return [run_info(p) for p in sorted(root.iterdir()) if p.is_dir() and RUN_NAME.match(p.name)]


def resolve_run(name: str, weights: str | Path | None = None) -> Path:
    """weights/<name> for a plain run name that exists; anything path-like is refused (the web UI relies on this).

    Symlinks that the server's owner placed inside weights/ are followed; a request can only name direct children.
    """
    root = (Path(weights) if weights is not None else weights_dir()).resolve()
    name = EMBEDDED.get(name, name) if isinstance(name, str) else name
    if not valid_run_name(name):
        raise ModelLoadError(f"invalid run name {name!r}: use a plain name (letters, digits, . _ -), no paths")
    path = root / name  # the name has no separator, so this is a direct child; a symlink placed there is allowed
    if not path.is_dir():
        raise ModelLoadError(f"no run {name!r} under {root}; runs: {[r.name for r in list_runs(root)]}")
    return path
