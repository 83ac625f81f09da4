"""Model loading: teachers (embedded, diffusers folder, single file, hub id), students, and the runs under weights/.

A student run folder (weights/<run>/) holds training_config.json and unet/ (a full UNet) or lora/ (adapter and
gamma projection); `models.export` writes it and documents the layout.
Everything is safetensors; pickle formats load only with allow_pickle=True (CLI: --allow-pickle).
"""
from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file

from ..core.teacher import cfg_scale
from .export import COND_PROJ_FILE, COND_PROJ_KEY, LDM_PREFIXES, LORA_WEIGHTS, STUDENT_UNET_CONFIG
from ..store.atomic import one_line
from ..store.runs import RUN_NAME, TRAINING_CONFIG, WEIGHTS_ENV, valid_run_name, weights_dir  # noqa: F401  (re-exported)

EMBEDDED = {
    "shapes": "shapes-teacher",
    "shapes-teacher": "shapes-teacher",
    "shapes-splam": "shapes-splam",
    "shapes-lcm": "shapes-lcm",
    "shapes-evaluator": "shapes-evaluator",
    "shapes-xl": "shapes-xl-teacher",
    "shapes-xl-teacher": "shapes-xl-teacher",
    "shapes-xl-splam": "shapes-xl-splam",
    "shapes-xl-lcm": "shapes-xl-lcm",
    "shapes-xl-lora-splam": "shapes-xl-lora-splam",
    "shapes-xl-lora-lcm": "shapes-xl-lora-lcm",
    "shapes-1step-splam": "shapes-1step-splam",
    "shapes-1step-lcm": "shapes-1step-lcm",
}
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl", ".pickle")
SD_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
UNET_MATCH_KEYS = ("in_channels", "out_channels", "block_out_channels", "cross_attention_dim", "layers_per_block",
                   "down_block_types", "up_block_types", "attention_head_dim")
STUDENT_ADAPTER = "student"  # the peft adapter name of a loaded LoRA student (training names its own "default")
PICKLE_REASON = ("pickle files can run arbitrary code when loaded; convert to .safetensors, or pass "
                 "allow_pickle=True (CLI: --allow-pickle) if you trust the source")


log = logging.getLogger(__name__)


class ModelLoadError(ValueError):
    """A model that cannot be loaded; the message says why and what would work."""


def holds_student(run: Path) -> bool:
    """Whether a run folder holds a finished student: unet/ (full) or lora/ (LoRA)."""
    return (run / "unet").is_dir() or (run / "lora").is_dir()


def hub_offline() -> bool:
    """HF_HUB_OFFLINE is set (huggingface_hub's constant, or the environment after import): only the cache is read."""
    import huggingface_hub

    return bool(huggingface_hub.constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")


# ---- teachers --------------------------------------------------------------------------------------------------
def load_teacher(source: str | Path, *, torch_dtype: torch.dtype = torch.float32, allow_pickle: bool = False,
                 config: str | Path | None = None, weights: Path | None = None) -> StableDiffusionPipeline:
    """An SD1.5-shaped StableDiffusionPipeline from an embedded name, a diffusers folder, a single file or a hub id;
    an SDXL source (folder, single file, hub repo: `models.sdxl.is_sdxl_source`) gives a StableDiffusionXLPipeline.

    `config` is a local diffusers folder giving the component configs for a single-file checkpoint (offline the
    SD1.5 configs cannot be fetched from the hub).
    """
    source = str(source)
    if source in EMBEDDED:  # an embedded name is its folder under weights/
        path = (weights or weights_dir()) / EMBEDDED[source]
        if not path.is_dir():
            raise ModelLoadError(f"embedded model {source!r} not found at {path} (set {WEIGHTS_ENV} to the weights folder)")
        source = str(path)
    from .sdxl import is_sdxl_source, load_sdxl_teacher

    if is_sdxl_source(source):  # the family is read from the source: SDXL folders, single files and hub repos
        return load_sdxl_teacher(source, torch_dtype=torch_dtype, allow_pickle=allow_pickle, config=config)
    path = Path(source).expanduser()
    if _is(path.is_dir):
        return _load_diffusers_folder(path, torch_dtype, allow_pickle)
    if _is(path.is_file):
        return _load_single_file(path, torch_dtype, allow_pickle, config)
    if is_hub_id(source):
        return load_hub_teacher(source, torch_dtype=torch_dtype, allow_pickle=allow_pickle)
    raise ModelLoadError(f"teacher {source!r} does not exist; valid: an embedded name {sorted(EMBEDDED)}, a diffusers "
                         "folder (with model_index.json), an SD1.5 .safetensors file, or a hub id 'owner/name'")


def _is(test) -> bool:
    """path.is_dir / is_file, False for a name the file system cannot hold (ENAMETOOLONG raises in Python 3.11)."""
    try:
        return test()
    except OSError:
        return False


# ---- hub ids: resolved on the hub (or its local cache) only, never as a path on this machine ---------------------
def hub_id_problem(repo_id) -> str | None:
    """Why `repo_id` is not a hub model id 'owner/name' by huggingface_hub's own rules, or None when it is one.

    Checked before any cache path is built: a name the hub cannot hold (97+ characters, '--', '..', a leading dot,
    a trailing '.git') never reaches the file system.
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        return f"{repo_id!r} is not a hub id of the form 'owner/name'"
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        return str(e).rstrip(".")
    return None


def is_hub_id(repo_id) -> bool:
    """'owner/name' by huggingface_hub's rules (validate_repo_id), exactly one '/'."""
    return hub_id_problem(repo_id) is None


def check_hub_id(repo_id) -> str:
    """repo_id, or ModelLoadError (one sentence) when it is not a hub id by huggingface_hub's rules."""
    problem = hub_id_problem(repo_id)
    if problem:
        raise ModelLoadError(f"invalid hub id: {problem}")
    return repo_id


def hub_cache_text(text: str) -> str:
    """`text` with this machine's Hugging Face cache folder replaced by a name: messages never show server paths."""
    from huggingface_hub import constants

    for root in {str(constants.HF_HUB_CACHE), os.path.realpath(constants.HF_HUB_CACHE), str(constants.HF_HOME)}:
        if root and root != ".":
            text = text.replace(root, "<HF cache>")
    return text


def _hub_snapshot(repo_id: str, patterns: list[str]) -> Path:
    """The repo's snapshot folder in the Hugging Face cache with `patterns` fetched (HF_HUB_OFFLINE: cache only).

    huggingface_hub's snapshot_download treats its argument as a repo id only; a folder of the same name beside the
    working directory is never read (diffusers' from_pretrained would prefer it).
    """
    from huggingface_hub import snapshot_download

    check_hub_id(repo_id)
    return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=hub_offline()))


def _hub_failure(e: BaseException) -> str:
    return hub_cache_text(one_line(e))


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


def _check_loaded(info: dict, where: Path) -> None:
    """Refuse a component whose loader re-initialised weights (missing / mismatched keys) instead of reading them."""
    bad = {k: sorted(info.get(k) or []) for k in ("missing_keys", "mismatched_keys", "unexpected_keys")}
    bad = {k: v for k, v in bad.items() if v}
    if bad:
        detail = "; ".join(f"{len(v)} {k.replace('_', ' ')} (e.g. {v[0]})" for k, v in bad.items())
        raise ModelLoadError(f"{where} does not match the model its installed library builds ({detail}): its weights "
                             f"would be freshly initialised; use the versions pyproject.toml names (transformers, diffusers)")


def _load_components(path: Path, dtype: torch.dtype, allow_pickle: bool,
                     names: tuple[str, ...] = ("unet", "vae", "text_encoder")) -> dict[str, Any]:
    """The weighted components `names` (SD1.5: unet, vae, text_encoder), each loaded with its loader's own report of
    missing / unexpected keys, checked."""
    import diffusers
    import transformers

    index = json.loads((path / "model_index.json").read_text())
    out: dict[str, Any] = {}
    for name in names:
        library, cls_name = index[name]
        cls = getattr(transformers if library == "transformers" else diffusers, cls_name)
        model, info = cls.from_pretrained(str(path / name), torch_dtype=dtype, use_safetensors=not allow_pickle,
                                          local_files_only=True, output_loading_info=True)
        _check_loaded(info, path / name)
        out[name] = model
    return out


def _load_diffusers_folder(path: Path, dtype: torch.dtype, allow_pickle: bool) -> StableDiffusionPipeline:
    _check_sd_folder(path, allow_pickle)
    try:
        components = _load_components(path, dtype, allow_pickle)
        pipe = StableDiffusionPipeline.from_pretrained(
            str(path), torch_dtype=dtype, use_safetensors=not allow_pickle, safety_checker=None,
            feature_extractor=None, requires_safety_checker=False, local_files_only=True, **components)
    except ModelLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - one readable line instead of a traceback
        raise ModelLoadError(f"cannot load the diffusers folder {path}: {one_line(e)}") from None
    return _finish(pipe)


def _checkpoint_keys(path: Path) -> list[str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"{path} is not a readable .safetensors file: {one_line(e)}") from None


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
            requires_safety_checker=False, local_files_only=config is not None or hub_offline())
    except Exception as e:  # noqa: BLE001
        hint = ("" if config else " Offline, the SD1.5 component configs cannot be fetched: pass config=<a local "
                "diffusers SD1.5 folder> (CLI: --teacher-config) holding model_index.json and the component configs.")
        raise ModelLoadError(f"cannot load single-file checkpoint {path.name}: {one_line(e)}.{hint}") from None
    return _finish(pipe)


def load_hub_teacher(repo_id: str, *, torch_dtype: torch.dtype = torch.float32,
                     allow_pickle: bool = False) -> StableDiffusionPipeline:
    """A teacher from a hub repo (or the local Hugging Face cache), never from a local folder of that name: SD1.5 /
    2.x, or SDXL when the repo's model_index.json names an SDXL pipeline (`sdxl.hub_is_sdxl`).

    The repo is fetched into the cache by diffusers' download (the files from_pretrained would pick: safetensors,
    no safety checker), then loaded from that snapshot folder like any diffusers folder.
    """
    from .sdxl import hub_is_sdxl, load_sdxl_teacher

    check_hub_id(repo_id)
    offline = hub_offline()
    if hub_is_sdxl(repo_id):
        from diffusers import StableDiffusionXLPipeline

        try:
            folder = StableDiffusionXLPipeline.download(repo_id, use_safetensors=not allow_pickle, local_files_only=offline)
        except Exception as e:  # noqa: BLE001
            where = "not in the local cache and HF_HUB_OFFLINE is set" if offline else "download failed"
            raise ModelLoadError(f"cannot load hub model {repo_id!r} ({where}): {_hub_failure(e)}") from None
        return load_sdxl_teacher(folder, torch_dtype=torch_dtype, allow_pickle=allow_pickle)
    try:
        folder = StableDiffusionPipeline.download(
            repo_id, use_safetensors=not allow_pickle, local_files_only=offline, safety_checker=None,
            feature_extractor=None)
        pipe = StableDiffusionPipeline.from_pretrained(
            str(folder), torch_dtype=torch_dtype, use_safetensors=not allow_pickle, safety_checker=None,
            feature_extractor=None, requires_safety_checker=False, local_files_only=True)
    except Exception as e:  # noqa: BLE001
        where = "not in the local cache and HF_HUB_OFFLINE is set" if offline else "download failed"
        raise ModelLoadError(f"cannot load hub model {repo_id!r} ({where}): {_hub_failure(e)}") from None
    return _finish(pipe)


def _finish(pipe: StableDiffusionPipeline) -> StableDiffusionPipeline:
    for c in ("unet", "vae", "text_encoder", "tokenizer"):
        if getattr(pipe, c, None) is None:
            raise ModelLoadError(f"loaded pipeline has no {c}; a teacher needs {list(SD_COMPONENTS)}")
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---- students from the hub (or a Hugging Face cache; HF_HUB_OFFLINE=1 reads only the cache) ------------------------
HubStudentKind = Literal["unet", "lora", "adapter"]


def load_hub_student(repo_id: str, teacher_pipe: StableDiffusionPipeline, kind: HubStudentKind | None = None, *,
                     allow_pickle: bool = False) -> UNet2DConditionModel:
    """A student UNet from a hub repo, in the teacher's dtype and on its device; nothing else of the repo is read.

    kind "unet": the repo's unet/ only (a full pipeline repo such as SimianLuo/LCM_Dreamshaper_v7 or
    alimama-creative/slam-sd1.5; its text encoder and VAE stay unread, the teacher's are shared).
    kind "lora": pytorch_lora_weights.safetensors at the repo root (e.g. latent-consistency/lcm-lora-sdv1-5), fused
    into a copy of the teacher UNet. kind "adapter": the same file as a peft adapter on the teacher's own UNet, an
    `adapters.AdapterStudent` (no UNet copy: the SDXL set's two LoRAs share one UNet). None: try "unet", then "lora"
    (a hub id typed into the page).
    """
    kinds = (kind,) if kind is not None else ("unet", "lora")
    loaders = {"unet": _hub_unet, "lora": _hub_lora, "adapter": _hub_adapter}
    errors = []
    for k in kinds:
        try:
            return loaders[k](repo_id, teacher_pipe, allow_pickle).eval()
        except ModelLoadError as e:
            errors.append(str(e))
    offline = " (HF_HUB_OFFLINE is set: only the local Hugging Face cache is read)" if hub_offline() else ""
    raise ModelLoadError(f"cannot load student {repo_id!r}{offline}: " + "; ".join(errors))


def _hub_unet(repo_id: str, pipe, allow_pickle: bool) -> UNet2DConditionModel:
    """`<repo>/unet` of a full pipeline repo, checked against the teacher's architecture."""
    teacher = pipe.unet
    weights = ["unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.safetensors.index.json",
               "unet/diffusion_pytorch_model-*-of-*.safetensors"]
    if allow_pickle:
        weights += ["unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.bin.index.json",
                    "unet/diffusion_pytorch_model-*-of-*.bin"]
    try:
        folder = _hub_snapshot(repo_id, ["unet/config.json", *weights])
        unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet", torch_dtype=teacher.dtype,
                                                    use_safetensors=not allow_pickle, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - one readable line instead of a traceback
        raise ModelLoadError(f"{repo_id}/unet: {_hub_failure(e)}") from None
    diff = {k: (unet.config.get(k), teacher.config.get(k)) for k in UNET_MATCH_KEYS
            if _norm(unet.config.get(k)) != _norm(teacher.config.get(k))}
    if diff:
        raise ModelLoadError(f"{repo_id}/unet does not match the teacher: "
                             + ", ".join(f"{k} student={s} teacher={t}" for k, (s, t) in diff.items()))
    return unet.to(teacher.device)


def _hub_lora_state(repo_id: str, pipe, allow_pickle: bool) -> tuple[dict, dict | None]:
    """(state, alphas) of the repo's LoRA file, read as the teacher family's stock pipeline reads it (kohya keys, sgm
    or diffusers block names, or diffusers' own)."""
    from ..core.teacher import pipeline_class

    names = [LORA_WEIGHTS] + (["pytorch_lora_weights.bin"] if allow_pickle else [])
    try:
        folder = _hub_snapshot(repo_id, names)
        name = next((n for n in names if (folder / n).is_file()), LORA_WEIGHTS)
        return pipeline_class(pipe).lora_state_dict(  # unet_config: kohya's sgm block names mapped to this UNet's, as
            str(folder), weight_name=name, use_safetensors=name.endswith(".safetensors"),  # load_lora_weights does
            local_files_only=True, unet_config=pipe.unet.config)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"{repo_id} as a LoRA ({LORA_WEIGHTS}): {_hub_failure(e)}") from None


def _hub_lora(repo_id: str, pipe, allow_pickle: bool) -> UNet2DConditionModel:
    """The teacher UNet with the repo's LoRA fused in (a copy: the teacher itself stays as it was)."""
    from ..core.teacher import pipeline_class

    state, alphas = _hub_lora_state(repo_id, pipe, allow_pickle)
    unet = copy.deepcopy(pipe.unet)
    try:
        pipeline_class(pipe).load_lora_into_unet(state, alphas, unet=unet, adapter_name=STUDENT_ADAPTER)
        unet.fuse_lora()
        unet.unload_lora()
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"{repo_id} as a LoRA does not fit the teacher: {one_line(e)}") from None
    return unet


def _hub_adapter(repo_id: str, pipe, allow_pickle: bool):
    """The repo's LoRA as a peft adapter on the teacher's own UNet (`adapters.share_lora`); the teacher runs with it off."""
    from ..core.teacher import pipeline_class
    from .adapters import adapter_name, share_lora

    state, alphas = _hub_lora_state(repo_id, pipe, allow_pickle)
    try:
        return share_lora(pipe.unet, adapter_name(repo_id), state, alphas, pipeline_class(pipe))
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"{repo_id} as a LoRA adapter does not fit the teacher: {one_line(e)}") from None


# ---- students --------------------------------------------------------------------------------------------------
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

    A LoRA student is the teacher UNet + cond_proj + the adapter (active, named STUDENT_ADAPTER); fuse=True merges it.
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
        raise ModelLoadError(f"cannot load the student UNet {folder}: {one_line(e)}") from None


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
        unet.load_lora_adapter(str(folder), weight_name=LORA_WEIGHTS, prefix="unet", adapter_name=STUDENT_ADAPTER)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"LoRA student {folder} does not fit its teacher: {one_line(e)}") from None
    if fuse:
        unet.fuse_lora()
        unet.unload_lora()
    return unet


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
    """What the folder holds; a training_config.json that is not a JSON object makes it an unusable ("unknown") run,
    with a warning, so one damaged run cannot stop a listing (the studio's start)."""
    cfg: dict = {}
    if (path / TRAINING_CONFIG).is_file():
        try:
            cfg = json.loads((path / TRAINING_CONFIG).read_text(encoding="utf-8", errors="replace"))
        except (OSError, ValueError):
            cfg = {}
        if not isinstance(cfg, dict):
            log.warning("skipping run %r: its %s holds %s, not a JSON object", path.name, TRAINING_CONFIG,
                        type(cfg).__name__)
            return RunInfo(path.name, path, "unknown")
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
