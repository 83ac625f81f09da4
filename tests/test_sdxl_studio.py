"""The studio's `sdxl` model set on tiny replicas of its three hub repos (tests/fake_hub.py build_fake_xl_hub), read from
a prepared Hugging Face cache with HF_HUB_OFFLINE=1: two LoRAs on one shared teacher UNet, Compare and the Error bound
through the same code a Space runs, and each LoRA student sampling as a stock StableDiffusionXLPipeline + LCMScheduler
at guidance 1 with the same LoRA file."""
from __future__ import annotations

import math

import pytest
import torch

from splam_studio.models import model_sets as S
from splam_studio.models.adapters import AdapterStudent
from splam_studio.studio.logic import Studio, decode_chunk, image_psnr
from tests.fake_hub import XL_LORAS, XL_TEACHER, build_fake_xl_hub

torch.set_num_threads(1)
PROMPT = "one small red circle at the left on a black background"
LCM, SPLAM = "latent-consistency/lcm-lora-sdxl", "alimama-creative/slam-lora-sdxl"


@pytest.fixture(scope="module")
def xl_hub(tmp_path_factory):
    """The SDXL trio's replicas, exposed as the hub libraries read a cache: HF_HUB_CACHE and HF_HUB_OFFLINE=1."""
    import huggingface_hub

    cache = tmp_path_factory.mktemp("hf-xl") / "hub"
    snapshots = build_fake_xl_hub(cache)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_CACHE", str(cache))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # read at import: patch the module too
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield snapshots


@pytest.fixture(scope="module")
def studio(xl_hub, tmp_path_factory):
    s = Studio.for_model_set("sdxl", tmp_path_factory.mktemp("empty-weights"), device="cpu")
    s.load_models(s.default("teacher"), s.default("splam"), s.default("lcm"))
    return s


def _stock(snapshot, lora=None, fuse=False):
    """A stock StableDiffusionXLPipeline from the cached teacher, the LoRA file loaded as diffusers users load it."""
    from diffusers import LCMScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(snapshot), local_files_only=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora))
        if fuse:  # the model cards' recipe
            pipe.fuse_lora()
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    return pipe


def _stock_image(pipe, seed, steps, guidance=1.0, **kw):
    """The stock pipeline's image from the studio's initial noise of `seed` (re-noising generator seed + 1)."""
    from splam_studio.models.generation import initial_noise

    px = pipe.unet.config.sample_size * pipe.vae_scale_factor
    z_T = initial_noise(seed, 1, pipe.unet, px, px, pipe.vae_scale_factor)
    return pipe(prompt=PROMPT, num_inference_steps=steps, guidance_scale=guidance, latents=z_T, height=px, width=px,
                generator=torch.Generator("cpu").manual_seed(seed + 1), **kw).images[0]


# ---- the table ----------------------------------------------------------------------------------------------------
def test_sdxl_set_is_the_released_trio_on_one_teacher():
    m = S.get_model_set("sdxl")
    assert (m.teacher, m.lcm, m.splam) == (XL_TEACHER, S.Student(LCM, "adapter"), S.Student(SPLAM, "adapter"))
    assert set(XL_LORAS) == {LCM, SPLAM} and m.hub and m.resolution == 1024 and m.gpu_precision == "fp16"
    assert S.student_kind(LCM) == S.student_kind(SPLAM) == "adapter"


def test_gpu_duration_counts_the_weights_moved():
    """Weights beyond what the 15 s set-up covers add 1 s per GiB (the SDXL set: two text encoders, UNet, LoRAs)."""
    assert S.gpu_seconds(512, 40, 3 * 2**30) == S.gpu_seconds(512, 40)  # an SD1.5 set: covered
    assert S.gpu_seconds(1024, 40, int(7.7 * 2**30)) == S.gpu_seconds(1024, 40) + 3
    assert S.gpu_seconds(1024, 40) > S.gpu_seconds(512, 40)
    assert decode_chunk(512) == 13 and decode_chunk(1024) == 3 and decode_chunk(16) >= 13


# ---- two LoRAs on one teacher UNet --------------------------------------------------------------------------------
def test_two_loras_share_the_teachers_unet_which_runs_without_them(studio, xl_hub):
    from splam_studio.models.loading import load_teacher
    from splam_studio.training.memory import weights_bytes

    pipe = studio.teacher()
    lcm, splam = studio.student(None, role="lcm"), studio.student(None, role="splam")
    assert isinstance(lcm, AdapterStudent) and isinstance(splam, AdapterStudent)
    assert lcm.unet is splam.unet is pipe.unet and lcm.config.time_cond_proj_dim is None
    assert sorted(pipe.unet.peft_config) == sorted([lcm.adapter, splam.adapter])
    # memory: the teacher's components (both text encoders) and the two LoRAs, no second UNet
    pristine = load_teacher(XL_TEACHER)
    teacher_bytes = weights_bytes(*(m for m in pristine.components.values() if isinstance(m, torch.nn.Module)))
    lora_bytes = sum(p.numel() * p.element_size() for n, p in pipe.unet.named_parameters() if "lora_" in n)
    assert weights_bytes(pristine.text_encoder_2) > 0
    assert studio.weights_bytes() == teacher_bytes + lora_bytes
    # the UNet called directly is the teacher, before and after a student's call; each student is its own model
    g = torch.Generator().manual_seed(0)
    z, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500])
    kw = dict(encoder_hidden_states=torch.randn(1, 77, 80, generator=g),
              added_cond_kwargs={"text_embeds": torch.randn(1, 24, generator=g),
                                 "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]])})
    with torch.no_grad():
        ref = pristine.unet(z, t, **kw).sample
        outs = [m(z, t, **kw).sample for m in (pipe.unet, lcm, pipe.unet, splam, lcm, pipe.unet)]
    assert torch.equal(outs[0], ref) and torch.equal(outs[2], ref) and torch.equal(outs[5], ref)
    assert torch.equal(outs[1], outs[4])  # switching back gives the same LCM
    assert (outs[1] - ref).abs().max() > 1e-3 and (outs[3] - ref).abs().max() > 1e-3
    assert (outs[1] - outs[3]).abs().max() > 1e-3


# ---- Compare and the Error bound through the studio ----------------------------------------------------------------
def test_compare_gives_three_images_students_equal_stock_sdxl_lcm(studio, xl_hub):
    """Teacher, LCM and SPLAM of the sdxl set from the cache; each LoRA student's image equals a stock
    StableDiffusionXLPipeline + LCMScheduler at guidance 1 with the same LoRA file (unfused; SPLAM fused too, as its card does), the teacher's
    a stock pipeline without LoRA (so the adapters are off for it)."""
    seed, steps = 3, 4
    r = studio.compare(PROMPT, seed=seed, student_steps=steps, teacher_steps=2, guidance_scale=5.0, repeats=1, warmup=0)
    assert [p.model for p in r.panels] == [XL_TEACHER, LCM, SPLAM] and r.same_architecture
    assert all(p.image.size == (16, 16) for p in r.panels)
    assert list(r.panel("lcm").image.getdata()) != list(r.panel("splam").image.getdata())
    from diffusers import DDIMScheduler

    teacher = _stock(xl_hub[XL_TEACHER])
    teacher.scheduler = DDIMScheduler.from_config(teacher.scheduler.config)
    db = {"teacher": image_psnr(r.panel("teacher").image, _stock_image(teacher, seed, 2, guidance=5.0))}
    for role, repo, fuse in (("lcm", LCM, False), ("splam", SPLAM, False), ("splam", SPLAM, True)):  # kohya, diffusers
        stock = _stock(xl_hub[XL_TEACHER], xl_hub[repo] / "pytorch_lora_weights.safetensors", fuse)
        db[role, fuse] = image_psnr(r.panel(role).image, _stock_image(stock, seed, steps))
    print("PSNR studio vs stock SDXL (dB):", {k: round(v, 1) for k, v in db.items()})
    assert all(v >= 40 for v in db.values()), db
    assert math.isinf(db["teacher"]) and math.isinf(db["lcm", False]) and math.isinf(db["splam", False])


def test_error_bound_on_the_sdxl_set_states_its_cost(studio):
    eb = studio.error_bound_plot(PROMPT, seed=5, stride=5, n_thumbnails=2)
    assert set(eb.curves) == {"LCM", "SPLAM"}
    for curve in eb.curves.values():
        assert (curve.bound >= curve.error - 1e-5).all()
    assert not torch.equal(eb.curves["LCM"].terms, eb.curves["SPLAM"].terms)
    c = eb.cost
    assert (c.teacher_calls, c.student_calls, c.extra_calls, c.decodes, c.px) == (50, 2 * 11, 2, 5, 16)
    assert "Cost at 16 px: 50 guided teacher steps, 24 student UNet calls, 5 VAE decodes in 1 call" in eb.summary()
    again = studio.error_bound_plot(PROMPT, seed=5, stride=5, n_thumbnails=1)
    assert again.trajectory_reused and again.cost.teacher_calls == 0 and "no teacher steps" in again.summary()


@torch.no_grad()
def test_error_bound_conditions_are_the_stock_pipelines(studio):
    """The error bound's c and c_uncond come from the teacher driver: SDXL's zeroed uncond, pooled embeds, time ids."""
    from splam_studio.core.teacher import pipeline_conditions

    pipe = studio.teacher()
    c, u = pipeline_conditions(pipe, [PROMPT], "cpu", True, None)
    embeds, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=True)
    assert torch.equal(c.embeds, embeds) and torch.equal(c.pooled, pooled)
    assert not u.embeds.any() and not u.pooled.any() and torch.equal(u.pooled, neg_pooled)


def test_training_memory_counts_the_second_text_encoder(studio):
    from splam_studio.training.memory import warn_if_short

    pipe = studio.teacher()
    unet = sum(p.numel() for n, p in pipe.unet.named_parameters() if "lora_" not in n)
    others = sum(p.numel() for m in (pipe.text_encoder, pipe.text_encoder_2, pipe.vae) for p in m.parameters())
    need = warn_if_short(pipe.unet, pipe, resolution=16, batch=1, device=torch.device("cpu"), mixed_precision="no",
                         gradient_checkpointing=False, available=2**60, log=lambda *_: None)
    assert need.frozen == (unet + others) * 4


def test_a_vae_that_overflowed_in_fp16_decodes_in_fp32_from_then_on(tmp_path):
    """The SDXL VAE overflows in fp16 at every image: after the first fallback it is not decoded in fp16 again."""
    from splam_studio.models.generation import decode_latents
    from tests.tiny import make_tiny_xl_pipeline

    pipe = make_tiny_xl_pipeline(tmp_path)
    pipe.vae.half()
    decode, dtypes = pipe.vae.decode, []

    def overflowing(z, *a, **k):  # an fp16 decode that overflows, as the SDXL VAE's does
        dtypes.append(z.dtype)
        out = decode(z, *a, **k)
        if z.dtype == torch.float16:
            out.sample.fill_(float("inf"))
        return out

    pipe.vae.decode = overflowing
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    first, second = decode_latents(pipe, z), decode_latents(pipe, z)
    assert dtypes == [torch.float16, torch.float32, torch.float32] and pipe.vae.dtype == torch.float16
    assert list(first[0].getdata()) == list(second[0].getdata())


def test_compare_switches_adapters_outside_the_timed_calls(studio, monkeypatch):
    """Each switch between teacher, LCM and SPLAM happens before a panel's clock starts (adapters.activate)."""
    import time

    from splam_studio.models.adapters import SharedAdapters

    events, switch = [], SharedAdapters.switch

    def clock():
        events.append("clock")
        return time.perf_counter()

    def recording(self, adapter):
        if adapter != self.active:
            events.append("switch")
        switch(self, adapter)

    monkeypatch.setattr(SharedAdapters, "switch", recording)
    studio.compare(PROMPT, seed=1, student_steps=1, teacher_steps=1, repeats=2, warmup=0, clock=clock)
    clocks, inside = 0, []
    for e in events:
        clocks += e == "clock"
        if e == "switch":
            inside.append(clocks % 2 == 0)  # after `started` and a panel's start, before its end
    assert len(inside) >= 6 and not any(inside), events
