"""SDXL teachers: a diffusers SDXL folder, a hub id, or a single-file SDXL .safetensors (offline with a config folder).

The family is read from the source itself: a folder's or hub repo's model_index.json names StableDiffusionXLPipeline
(or lists text_encoder_2), a single file holds SDXL's second text encoder (`conditioner.embedders.1.`). Everything
after loading (text conditioning, the UNet's added conditioning) is the teacher driver's (core/teacher.py).
`--vae` swaps in another VAE folder (for example a fixed fp16 SDXL VAE); otherwise the trainer keeps an SDXL VAE in
fp32 under fp16 (training/device.py), since the original overflows there.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

SDXL_PIPELINE = "StableDiffusionXLPipeline"
SDXL_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
SDXL_SINGLE_FILE_KEY = "conditioner.embedders.1."  # OpenCLIP bigG in an SDXL checkpoint (SD1.5: cond_stage_model.)


def _index_is_sdxl(index: dict) -> bool:
    return index.get("_class_name") == SDXL_PIPELINE or "text_encoder_2" in index


def folder_is_sdxl(path: Path) -> bool:
    """A diffusers folder whose model_index.json is an SDXL pipeline's."""
    try:
        return _index_is_sdxl(json.loads((Path(path) / "model_index.json").read_text()))
    except (OSError, ValueError):
        return False


def single_file_is_sdxl(path: Path) -> bool:
    """A .safetensors checkpoint holding SDXL's second text encoder."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return any(k.startswith(SDXL_SINGLE_FILE_KEY) for k in f.keys())
    except Exception:  # noqa: BLE001 - not a readable safetensors file: the SD loader says why
        return False


def hub_is_sdxl(repo_id: str) -> bool:
    """The hub repo's (or the local cache's) model_index.json names an SDXL pipeline; False when it cannot be read."""
    from huggingface_hub import hf_hub_download

    from .loading import hub_offline, is_hub_id

    if not is_hub_id(repo_id):
        return False
    try:
        return _index_is_sdxl(json.loads(Path(hf_hub_download(repo_id, "model_index.json",
                                                             local_files_only=hub_offline())).read_text()))
    except Exception:  # noqa: BLE001 - unreachable or no index: the SD loader reports it
        return False


def is_sdxl_source(source: str | Path) -> bool:
    """True when `source` (a folder, a .safetensors file or a hub id) is an SDXL teacher."""
    from .loading import _is

    path = Path(str(source)).expanduser()
    if _is(path.is_dir):
        return folder_is_sdxl(path)
    if _is(path.is_file):
        return path.suffix.lower() == ".safetensors" and single_file_is_sdxl(path)
    return hub_is_sdxl(str(source))


def _check_folder(path: Path, allow_pickle: bool) -> None:
    from .loading import PICKLE_REASON, ModelLoadError

    missing = [c for c in SDXL_COMPONENTS if not (path / c).is_dir()]
    if missing:
        raise ModelLoadError(f"{path} is not an SDXL pipeline: missing {missing} (expected subfolders {list(SDXL_COMPONENTS)})")
    for c in ("unet", "vae", "text_encoder", "text_encoder_2"):
        files = [p.name for p in (path / c).iterdir() if p.is_file()]
        if not any(f.endswith(".safetensors") for f in files) and not allow_pickle:
            raise ModelLoadError(f"{path / c} has no .safetensors weights ({files}): {PICKLE_REASON}")


def _components(path: Path, dtype: torch.dtype, allow_pickle: bool) -> dict[str, Any]:
    """The four weighted components, each loaded with its loader's report of missing / unexpected keys, checked."""
    from .loading import _load_components

    return _load_components(path, dtype, allow_pickle, ("unet", "vae", "text_encoder", "text_encoder_2"))


def load_sdxl_teacher(source: str | Path, *, torch_dtype: torch.dtype = torch.float32, allow_pickle: bool = False,
                      config: str | Path | None = None, vae: str | Path | None = None):
    """A StableDiffusionXLPipeline from a diffusers SDXL folder, a hub id, or a single file (+ `config`, a local
    diffusers SDXL folder with the component configs, offline); `vae` a diffusers VAE folder replacing the teacher's."""
    from diffusers import StableDiffusionXLPipeline

    from ..store.atomic import one_line
    from .loading import ModelLoadError, _hub_failure, _is, check_hub_id, hub_offline

    source = str(source)
    path = Path(source).expanduser()
    kw = dict(torch_dtype=torch_dtype, add_watermarker=False)
    try:
        if _is(path.is_dir):
            _check_folder(path, allow_pickle)
            pipe = StableDiffusionXLPipeline.from_pretrained(str(path), local_files_only=True, use_safetensors=not allow_pickle,
                                                             **_components(path, torch_dtype, allow_pickle), **kw)
        elif _is(path.is_file):
            if config is not None and not folder_is_sdxl(Path(config)):
                raise ModelLoadError(f"config={config} must be a local diffusers SDXL folder (model_index.json of a "
                                     f"{SDXL_PIPELINE})")
            pipe = StableDiffusionXLPipeline.from_single_file(str(path), config=str(config) if config else None,
                                                              local_files_only=config is not None or hub_offline(), **kw)
        else:
            check_hub_id(source)
            folder = StableDiffusionXLPipeline.download(source, use_safetensors=not allow_pickle,
                                                        local_files_only=hub_offline())
            pipe = StableDiffusionXLPipeline.from_pretrained(str(folder), local_files_only=True,
                                                             use_safetensors=not allow_pickle, **kw)
    except ModelLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - one readable line instead of a traceback
        hint = (" Offline, the SDXL component configs cannot be fetched: pass --teacher-config <a local diffusers SDXL "
                "folder>." if _is(path.is_file) and config is None else "")
        raise ModelLoadError(f"cannot load SDXL teacher {source}: {_hub_failure(e) if not _is(path.exists) else one_line(e)}."
                             f"{hint}") from None
    if vae is not None:
        pipe.vae = load_vae(vae, torch_dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_vae(folder: str | Path, dtype: torch.dtype = torch.float32):
    """A diffusers AutoencoderKL folder (e.g. a fixed fp16 SDXL VAE), checked for re-initialised weights."""
    from diffusers import AutoencoderKL

    from ..store.atomic import one_line
    from .loading import ModelLoadError, _check_loaded

    try:
        vae, info = AutoencoderKL.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True, use_safetensors=True,
                                                  output_loading_info=True)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"--vae {folder}: not a diffusers AutoencoderKL folder ({one_line(e)})") from None
    _check_loaded(info, Path(folder))
    return vae


# ---- exports in the forms SDXL tools load ------------------------------------------------------------------------
SDXL_LDM_PREFIXES = {"text_encoder": "conditioner.embedders.0.transformer.", "text_encoder_2": "conditioner.embedders.1.model."}
KOHYA_SDXL_BASE = "sdxl_base_v1-0"  # ss_base_model_version of kohya sd-scripts' SDXL networks
SDXL_LORA_ARCHITECTURE = "stable-diffusion-xl-v1-base/lora"  # modelspec.architecture (Stability's model spec)
_OPENCLIP_LAYER = (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"),
                   ("self_attn.out_proj", "attn.out_proj"))


def ldm_module_names(unet) -> dict[str, str]:
    """diffusers UNet module name -> its LDM (sgm) name (`input_blocks.4.1.proj_in`), for every module with a weight
    of a UNet of this config, by `models.export.unet_to_ldm` (the one owner of the key mapping)."""
    from diffusers import UNet2DConditionModel

    from .export import LDM_PREFIXES, unet_to_ldm

    config = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    config["time_cond_proj_dim"] = None  # the gamma projection has no LDM name: it travels folded
    with torch.device("meta"):
        bare = UNet2DConditionModel.from_config(config)
    keys, ldm = list(bare.state_dict()), list(unet_to_ldm(bare))
    return {k.removesuffix(".weight"): v.removeprefix(LDM_PREFIXES["unet"]).removesuffix(".weight")
            for k, v in zip(keys, ldm) if k.endswith(".weight")}


def kohya_sdxl_names(unet) -> dict[str, str]:
    """diffusers module name -> kohya SDXL LoRA name: `lora_unet_` + the LDM name with `_` for `.`, as kohya
    sd-scripts' SDXL networks, A1111 / Forge and ComfyUI name the UNet's modules."""
    return {k: "lora_unet_" + v.replace(".", "_") for k, v in ldm_module_names(unet).items()}


def openclip_to_ldm(text_encoder_2) -> dict[str, torch.Tensor]:
    """CLIPTextModelWithProjection -> OpenCLIP names under `conditioner.embedders.1.model.` (q, k, v fused into
    in_proj, text_projection transposed), the inverse of diffusers' convert_open_clip_checkpoint."""
    sd = {k.removeprefix("text_model."): v for k, v in text_encoder_2.state_dict().items() if not k.endswith("position_ids")}
    out = {"token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
           "positional_embedding": sd.pop("embeddings.position_embedding.weight"),
           "ln_final.weight": sd.pop("final_layer_norm.weight"), "ln_final.bias": sd.pop("final_layer_norm.bias"),
           "text_projection": sd.pop("text_projection.weight").T.contiguous()}
    for i in range(text_encoder_2.config.num_hidden_layers):
        p = f"encoder.layers.{i}."
        for kind in ("weight", "bias"):
            out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(
                [sd.pop(f"{p}self_attn.{x}_proj.{kind}") for x in "qkv"])
            for a, b in _OPENCLIP_LAYER:
                out[f"transformer.resblocks.{i}.{b}.{kind}"] = sd.pop(f"{p}{a}.{kind}")
    if sd:
        raise ValueError(f"no OpenCLIP name for text_encoder_2 weights {sorted(sd)[:3]}")
    return {SDXL_LDM_PREFIXES["text_encoder_2"] + k: v for k, v in out.items()}


def sdxl_single_file_state(pipe, unet) -> dict[str, torch.Tensor]:
    """An SDXL checkpoint's tensors (the sgm names A1111, Forge, ComfyUI and diffusers' from_single_file read)."""
    from .export import unet_to_ldm, vae_to_ldm

    clip_l = {SDXL_LDM_PREFIXES["text_encoder"] + (k if k.startswith("text_model.") else "text_model." + k): v
              for k, v in pipe.text_encoder.state_dict().items() if not k.endswith("position_ids")}
    return {**unet_to_ldm(unet), **vae_to_ldm(pipe.vae), **clip_l, **openclip_to_ldm(pipe.text_encoder_2)}


def is_sdxl_unet(unet) -> bool:
    """A UNet that takes SDXL's added text_time conditioning."""
    return getattr(unet, "module", unet).config.get("addition_embed_type") == "text_time"
