"""The teacher's samplers on the embedded Shapes teacher: ours are the stock diffusers pipeline's, and at 10 steps
DPM-Solver++ and UniPC land near DDIM at 25 steps (issue 28 item 6: no 'confetti')."""
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline, UniPCMultistepScheduler

from splam_studio.core.metrics import psnr
from splam_studio.models.generation import decode_latents, generate, initial_noise, make_scheduler
from splam_studio.core.student import build_student

TEACHER = Path(__file__).resolve().parents[1] / "weights" / "shapes-teacher"
PROMPTS = ["one large red circle at the left on a black background", "two small blue squares at the top on a white background"]
STOCK = {"ddim": DDIMScheduler, "dpm++": DPMSolverMultistepScheduler, "unipc": UniPCMultistepScheduler}


@pytest.fixture(scope="module")
def pipe():
    if not (TEACHER / "model_index.json").is_file():
        pytest.skip("the embedded Shapes teacher is not in weights/")
    p = StableDiffusionPipeline.from_pretrained(str(TEACHER), safety_checker=None, requires_safety_checker=False)
    p.set_progress_bar_config(disable=True)
    return p


def _stock(pipe, name, steps, guidance, seed):
    """A stock StableDiffusionPipeline with the scheduler class built from the teacher's own config, as a user would."""
    p = StableDiffusionPipeline(**{**pipe.components, "scheduler": STOCK[name].from_config(pipe.scheduler.config)})
    p.set_progress_bar_config(disable=True)
    scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    size = pipe.unet.config.sample_size * scale
    z_T = initial_noise(seed, len(PROMPTS), pipe.unet, size, size, scale)
    with torch.no_grad():
        return p(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, latents=z_T, output_type="latent").images


def _ours(pipe, name, steps, guidance, seed):
    return generate(pipe, prompt=PROMPTS, sampler=name, steps=steps, seed=seed, guidance_scale=guidance, decode=False).latents


def _px(pipe, latents):
    with torch.no_grad():
        return pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample.clamp(-1, 1)


@pytest.mark.parametrize("name", ["ddim", "dpm++", "unipc"])
def test_our_teacher_solvers_are_the_stock_pipelines(pipe, name):
    assert type(make_scheduler(name, pipe.scheduler.config)) is STOCK[name]
    assert torch.equal(_ours(pipe, name, 10, 7.5, 5), _stock(pipe, name, 10, 7.5, 5))


@pytest.mark.parametrize("guidance,floor", [(1.0, 35.0), (3.0, 25.0)])
def test_ten_solver_steps_are_close_to_ddim_25(pipe, guidance, floor):
    """Per-image PSNR to DDIM-25 at 10 steps. Measured on 16 held-out captions (mean / min, dB): CFG 1: DDIM 47.7 / 39.6,
    DPM++ 46.5 / 38.8, UniPC 46.2 / 38.5; CFG 3: DDIM 45.1 / 39.3, DPM++ 42.0 / 36.4, UniPC 37.8 / 27.3. At CFG 7.5 the
    second-order steps lose to DDIM on this teacher, in the stock pipeline too (test above), down to 16 dB on some
    captions: a property of the solvers at high guidance here, not of our configuration."""
    ref = _px(pipe, _ours(pipe, "ddim", 25, guidance, 5))
    for name in ("ddim", "dpm++", "unipc"):
        got = psnr(_px(pipe, _ours(pipe, name, 10, guidance, 5)), ref)
        assert (got > floor).all(), (name, guidance, got.tolist())


def test_initial_noise_and_decode(pipe):
    z = initial_noise(11, 2, pipe.unet, 64, 64, 8)
    assert torch.equal(z, torch.randn(2, pipe.unet.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(11)))
    lat = _ours(pipe, "ddim", 4, 7.5, 5)
    images = decode_latents(pipe, lat)
    ref = pipe.image_processor.postprocess(_px(pipe, lat), output_type="pil")
    assert [np.asarray(a).tolist() for a in images] == [np.asarray(b).tolist() for b in ref]


def test_a_student_samples_only_with_lcm(pipe):
    student = build_student(pipe.unet, "zero")
    with pytest.raises(ValueError, match="students sample with 'lcm'"):
        generate(pipe, prompt=PROMPTS[:1], sampler="dpm++", steps=4, seed=0, unet=student)
