"""Generation in a stock diffusers pipeline, behind one `generate()`: the teacher with its solvers (DDIM,
DPM-Solver++, UniPC) and CFG, a student with LCMScheduler (multistep consistency sampling, the same as
core.sampler.consistency_sample) at its baked guidance; the initial noise of a seed; VAE decoding.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    LCMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)

from ..core.teacher import pipeline_class, pipeline_conditions, pipeline_kwargs, text_encoders, vae_scale_factor


# Every sampler the studio offers: name -> (scheduler class, whether it is a student's consistency sampler).
SAMPLERS: dict[str, type] = {
    "ddim": DDIMScheduler,
    "dpm++": DPMSolverMultistepScheduler,
    "unipc": UniPCMultistepScheduler,
    "lcm": LCMScheduler,
}


def make_scheduler(name: str, config) -> object:
    """A diffusers scheduler of the given sampler name built from a teacher's scheduler config."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    extra = {"algorithm_type": "dpmsolver++", "solver_order": 2} if name == "dpm++" else {}
    return SAMPLERS[name].from_config(config, **extra)


def initial_noise(seed: int, batch: int, unet: UNet2DConditionModel, height: int, width: int, vae_scale: int) -> torch.Tensor:
    """z_T ~ N(0, I) from a CPU generator seeded by `seed`, so every device draws the same noise. (B, C, h, w)."""
    g = torch.Generator("cpu").manual_seed(int(seed))
    shape = (batch, unet.config.in_channels, height // vae_scale, width // vae_scale)
    return torch.randn(shape, generator=g, dtype=torch.float32)


@dataclass
class Generation:
    images: list  # PIL images
    latents: torch.Tensor  # (B, C, h, w) final clean latents, float32 on the CPU
    noise: torch.Tensor | None = None  # (B, C, h, w) the initial noise z_T they were made from, float32 on the CPU


def placement(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) of a model's first parameter: diffusers' `.device` / `.dtype` walk every submodule on each call."""
    p = next(model.parameters())
    return p.device, p.dtype


@torch.no_grad()
def generate(pipe: StableDiffusionPipeline, *, prompt: list[str], sampler: str, steps: int, seed: int,
             unet: UNet2DConditionModel | None = None, guidance_scale: float = 1.0,
             negative_prompt: list[str] | None = None, decode: bool = True,
             student_guidance_scale: float = 1.0) -> Generation:
    """Generate with the teacher (unet=None) or a student UNet, from the initial noise of `seed`, in a stock pipeline.

    Students run with LCMScheduler at student_guidance_scale (diffusers embeds it minus 1 and skips CFG): 1 for
    gamma-conditioned students (gamma = 1), w + 1 for a w-conditioned one (models.sampling_guidance).
    The UNet may have another dtype than the text encoder and VAE (an fp32 EMA target beside a bf16 text encoder in
    training, an fp32 student beside an fp16 teacher in the studio): text embeddings and latents are cast at the
    UNet's boundary, the VAE's input at its own.
    """
    unet = unet if unet is not None else pipe.unet
    is_student = unet.config.time_cond_proj_dim is not None
    if is_student and sampler != "lcm":
        raise ValueError(f"students sample with 'lcm' (multistep consistency), not {sampler!r}")
    if is_student:
        guidance_scale, negative_prompt = student_guidance_scale, None  # guidance is baked into the student
    device, dtype = placement(unet)
    # 1. text embeddings from the pipeline's own encoder, then in the UNet's dtype
    cfg = guidance_scale > 1 and not is_student
    cond, uncond = pipeline_conditions(pipe, prompt, device, cfg, negative_prompt)
    cond, uncond = cond.to(dtype), (uncond.to(dtype) if uncond is not None else None)
    # 2. the stock pipeline's loop on those embeddings; it casts them to its text encoder's dtype, so a text encoder
    #    of another dtype stays out of it (the pipeline then takes the UNet's dtype)
    tes = {k: te if placement(te)[1] == dtype else None for k, te in text_encoders(pipe).items()}
    p = pipeline_class(pipe)(**{**pipe.components, "unet": unet, **tes,
                                "scheduler": make_scheduler(sampler, pipe.scheduler.config)})
    p.set_progress_bar_config(disable=True)
    vae_scale = vae_scale_factor(pipe.vae)
    size = unet.config.sample_size * vae_scale
    z_T = initial_noise(seed, len(prompt), unet, size, size, vae_scale).to(device, dtype)
    g = torch.Generator("cpu").manual_seed(int(seed) + 1)  # re-noising of multistep sampling
    out = p(**pipeline_kwargs(cond, uncond), num_inference_steps=steps, guidance_scale=guidance_scale,
            latents=z_T, generator=g, output_type="latent", height=size, width=size)
    # 3. decode on the device; the returned latents are a float32 CPU copy
    images = decode_latents(pipe, out.images) if decode else []
    return Generation(images=images, latents=out.images.float().cpu(), noise=z_T.float().cpu())


FP32_DECODE = "_splam_fp32_decode"  # set on a VAE once an fp16 decode of it overflowed


@torch.no_grad()
def decode_latents(pipe: StableDiffusionPipeline, latents: torch.Tensor) -> list:
    """VAE-decode clean latents (B, C, h, w) to PIL images; an fp16 decode that overflows is redone in fp32, and that
    VAE then decodes in fp32 straight away (the SDXL VAE overflows in fp16 at every image; stock SDXL upcasts it)."""
    vae = pipe.vae
    device, dtype = placement(vae)
    z = latents.to(device) / vae.config.scaling_factor
    fp16 = dtype == torch.float16
    x = None if fp16 and vae.__dict__.get(FP32_DECODE) else vae.decode(z.to(dtype)).sample
    if fp16 and (x is None or not torch.isfinite(x).all()):  # the SD1.5 VAE can exceed fp16 at 512 px
        x = vae.float().decode(z.float()).sample
        vae.to(dtype)
        vae.__dict__[FP32_DECODE] = True
    return pipe.image_processor.postprocess(x.float(), output_type="pil")
