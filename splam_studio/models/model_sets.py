"""Named model sets: a teacher and its LCM and SPLAM students, ready to compare (`python app.py --models NAME`).

One table, `MODEL_SETS`, owns which released checkpoints belong together and how each student is stored:
  run    a run folder under weights/ (unet/ or lora/, see models.py): the embedded Shapes students;
  unet   a full StableDiffusionPipeline repo of which only unet/ is read (the UNet carries time_cond_proj);
  lora   a LoRA (pytorch_lora_weights.safetensors) fused into a copy of the teacher UNet; no time_cond_proj, so it
         samples as LCM-LoRA is meant to: LCMScheduler at guidance 1, no embedding;
  adapter  the same LoRA file kept as a peft adapter on the teacher's own UNet (models/adapters.py): no UNet copy, the
         LoRA layers run unfused. The SDXL set's two LoRAs share its one 2.6 B UNet this way.
The teacher's text encoders and VAE serve all three models. Which set a server shows first is decided by
`default_model_set()`: `dreamshaper7` on a Hugging Face Space with a GPU, `shapes` everywhere else.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal, Mapping

StudentKind = Literal["run", "unet", "lora", "adapter"]
SD_PROMPTS = (
    "a photo of a red fox in a snowy forest, golden hour",
    "a cozy cabin by a lake at dawn, mist over the water, highly detailed",
    "portrait of an old fisherman, dramatic lighting, 85mm photo",
    "a bowl of ramen on a wooden table, steam rising, studio photo",
)


@dataclass(frozen=True)
class Student:
    """Where a student's weights live and how they are stored."""

    repo: str  # run name under weights/ (kind "run") or hub id
    kind: StudentKind
    baked_guidance: float | None = None  # a hub student: the CFG (usual form) it was distilled at, when published
    # (an embedded run's own training_config.json owns its w; the studio reads it there)


@dataclass(frozen=True)
class ModelSet:
    name: str
    title: str
    teacher: str  # embedded run name or hub id of a StableDiffusionPipeline
    lcm: Student
    splam: Student
    resolution: int  # px the UNets generate (sample_size x 8)
    teacher_guidance: float  # CFG the page starts the teacher at
    gpu_precision: str  # on CUDA; the CPU always runs fp32
    prompts: tuple[str, ...] = ()
    about: str = ""

    @property
    def hub(self) -> bool:
        """Whether any model comes from the hub (or a Hugging Face cache)."""
        from .loading import is_hub_id  # the one hub-id rule (huggingface_hub's)

        return any(s.kind != "run" for s in (self.lcm, self.splam)) or is_hub_id(self.teacher)


MODEL_SETS: dict[str, ModelSet] = {
    "shapes": ModelSet(
        name="shapes", title="Shapes (embedded, 64 px)", teacher="shapes-teacher",
        lcm=Student("shapes-lcm", "run"), splam=Student("shapes-splam", "run"),
        resolution=64, teacher_guidance=7.5, gpu_precision="auto",
        about="The project's own small world: trained here on a CPU, runs anywhere, offline."),
    "shapes-1step": ModelSet(
        name="shapes-1step", title="Shapes 1-step (embedded, 64 px)", teacher="shapes-teacher",
        lcm=Student("shapes-1step-lcm", "run"), splam=Student("shapes-1step-splam", "run"),
        resolution=64, teacher_guidance=7.5, gpu_precision="auto",
        about="The Shapes teacher with students of the 1-step recipe (README 'The 1-step student'): the regression "
              "onto the teacher's own ODE pairs and the k schedule on top of the paper's loss. At 1 step closer to "
              "the teacher than no distillation on average (latent MSE 0.27 against 0.35 over 500 held-out "
              "captions), though not on every prompt; sharper at 2 and 4 steps and a little further from the "
              "teacher than the `shapes` pair; offline."),
    "shapes-xl": ModelSet(
        name="shapes-xl", title="Shapes-XL (embedded, SDXL architecture, 64 px)", teacher="shapes-xl-teacher",
        lcm=Student("shapes-xl-lcm", "run"), splam=Student("shapes-xl-splam", "run"),
        resolution=64, teacher_guidance=7.5, gpu_precision="auto",
        about="The same world on an SDXL-architecture teacher (two text encoders, pooled embeds, size and crop time "
              "ids), its students distilled here by the SDXL path of the trainer; offline."),
    "shapes-xl-lora": ModelSet(
        name="shapes-xl-lora", title="Shapes-XL LoRA (embedded, 64 px)", teacher="shapes-xl-teacher",
        lcm=Student("shapes-xl-lora-lcm", "run"), splam=Student("shapes-xl-lora-splam", "run"),
        resolution=64, teacher_guidance=7.5, gpu_precision="auto",
        about="The Shapes-XL teacher with LoRA students (rank 16, as SDXL users train them): the LoRA layers and the "
              "gamma projection on the teacher's own weights; offline."),
    "dreamshaper7": ModelSet(
        name="dreamshaper7", title="Dreamshaper 7 (512 px): the released matched trio",
        teacher="Lykon/dreamshaper-7",
        lcm=Student("SimianLuo/LCM_Dreamshaper_v7", "unet"),
        splam=Student("alimama-creative/slam-dreamshaper7", "unet"),
        resolution=512, teacher_guidance=7.5, gpu_precision="fp16", prompts=SD_PROMPTS,
        about="LCM and SPLAM distilled from the same base model by their authors; full UNets with time_cond_proj."),
    "sd15": ModelSet(
        name="sd15", title="Stable Diffusion 1.5 (512 px): SPLAM vs LCM-LoRA",
        teacher="stable-diffusion-v1-5/stable-diffusion-v1-5",
        lcm=Student("latent-consistency/lcm-lora-sdv1-5", "lora"),
        splam=Student("alimama-creative/slam-sd1.5", "unet"),
        resolution=512, teacher_guidance=7.5, gpu_precision="fp16", prompts=SD_PROMPTS,
        about="LCM here is LCM-LoRA (a LoRA on the teacher, no gamma/guidance input), not a full distilled UNet."),
    "sdxl": ModelSet(
        name="sdxl", title="Stable Diffusion XL (1024 px): SPLAM-LoRA vs LCM-LoRA",
        teacher="stabilityai/stable-diffusion-xl-base-1.0",
        lcm=Student("latent-consistency/lcm-lora-sdxl", "adapter"),
        splam=Student("alimama-creative/slam-lora-sdxl", "adapter"),
        resolution=1024, teacher_guidance=5.0, gpu_precision="fp16", prompts=SD_PROMPTS,
        about="The released SDXL trio: two LoRAs on one shared SDXL base (one UNet in memory), both sampled with "
              "LCMScheduler at guidance 1 (the SPLAM card uses 4 steps)."),
}
SPACE_GPU_DEFAULT = "dreamshaper7"  # what a Space visitor comes to see
LOCAL_DEFAULT = "shapes"  # off Spaces (offline, nothing to download) and on the CPU, where 512 px SD takes minutes


def get_model_set(name: str) -> ModelSet:
    """The set of that name; ValueError naming the valid ones."""
    if name not in MODEL_SETS:
        raise ValueError(f"unknown model set {name!r}; choose one of {sorted(MODEL_SETS)}")
    return MODEL_SETS[name]


def on_space(environ: Mapping[str, str] | None = None) -> bool:
    """Hugging Face Spaces set SPACE_ID (owner/name) in every Space's environment."""
    return bool((os.environ if environ is None else environ).get("SPACE_ID"))


def zero_gpu(environ: Mapping[str, str] | None = None) -> bool:
    """A ZeroGPU Space (SPACES_ZERO_GPU=true): the GPU is lent per call, none is visible at start-up."""
    return (os.environ if environ is None else environ).get("SPACES_ZERO_GPU", "").lower() in ("1", "t", "true")


def has_gpu(environ: Mapping[str, str] | None = None) -> bool:
    """A ZeroGPU Space or a visible CUDA device (asks the driver for a device count; creates no CUDA context)."""
    if zero_gpu(environ):
        return True
    import torch

    return torch.cuda.is_available()


def default_model_set(environ: Mapping[str, str] | None = None, gpu: bool | None = None) -> str:
    """`dreamshaper7` on a Space with a GPU (ZeroGPU included); `shapes` on a CPU Space and off Spaces (offline)."""
    env = os.environ if environ is None else environ
    if on_space(env) and (has_gpu(env) if gpu is None else gpu):
        return SPACE_GPU_DEFAULT
    return LOCAL_DEFAULT


def student_kind(repo: str) -> StudentKind | None:
    """How the table stores the student `repo`, or None when no set lists it (then the loader tries each kind)."""
    kinds = {s.kind for ms in MODEL_SETS.values() for s in (ms.lcm, ms.splam) if s.repo == repo}
    return next(iter(kinds)) if len(kinds) == 1 else None


def baked_guidance(repo: str) -> float | None:
    """The CFG a listed student was distilled at, when the table records it."""
    values = {s.baked_guidance for ms in MODEL_SETS.values() for s in (ms.lcm, ms.splam) if s.repo == repo}
    return next(iter(values)) if len(values) == 1 else None


SETUP_COVERS_GIB = 4.0  # the 15 s set-up covers moving this much weight to the GPU (an SD1.5 set in fp16: ~3.8 GiB)


def gpu_seconds(resolution: int, unet_evals: int, weight_bytes: int = 0) -> int:
    """A spaces.GPU duration for `unet_evals` UNet calls (a CFG pair counts as one) at `resolution` px, with margin.

    Budget: 0.15 s per SD1.5 UNet call at 512 px (an A100 takes well under that in fp16), scaled by pixel count for
    other sizes (an SDXL call at 1024 px: 0.6 s; not yet measured on a GPU here), plus 15 s for the first
    call's CUDA set-up and weight transfer, and 1 s per GiB of `weight_bytes` (every loaded model: for SDXL both
    text encoders, the UNet and the LoRAs; `training.memory.weights_bytes`) beyond SETUP_COVERS_GIB.
    """
    extra = max(0.0, weight_bytes / 2**30 - SETUP_COVERS_GIB)
    return int(15 + extra + 0.15 * (resolution / 512) ** 2 * unet_evals) + 1


__all__ = ["MODEL_SETS", "ModelSet", "Student", "baked_guidance", "default_model_set",
           "get_model_set", "has_gpu", "on_space", "student_kind", "zero_gpu", "gpu_seconds"]
