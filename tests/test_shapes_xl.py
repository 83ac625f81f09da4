"""Shapes-XL, the SDXL-architecture teacher of the Shapes world (`world build --preset xl-tiny` on a tiny SD build):
a stock StableDiffusionXLPipeline folder on the SD build's VAE, training data whose size / crop time ids vary, the
unconditional branch as the pipeline builds it, and teacher images equal to a stock pipeline's on the same noise."""
from __future__ import annotations

import copy
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from splam_studio.shapes.grammar import RESOLUTION, ShapesDataset, render

torch.set_num_threads(1)
CAPTIONS = ["one small red circle at the left on a black background",
            "two large blue squares at the top on a white background"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny SD build, then xl-tiny into the same folder (which reuses its VAE and evaluator by default)."""
    from splam_studio.shapes.build import build

    out = tmp_path_factory.mktemp("xl-world")
    build(out, "tiny", log=lambda s: None)
    sd_recipe = (out / "recipe.json").read_text()
    record = build(out, "xl-tiny", log=lambda s: None)
    return out, record, sd_recipe


@pytest.fixture(scope="module")
def xl(world):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(world[0] / "shapes-xl-teacher"), local_files_only=True,
                                                     use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---- 1. the folder ------------------------------------------------------------------------------------------------
def test_xl_tiny_build_is_a_stock_sdxl_folder_on_the_sd_builds_vae(world, xl):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    out, record, sd_recipe = world
    assert xl.unet.config.addition_embed_type == "text_time" and xl.config.force_zeros_for_empty_prompt
    assert type(xl.text_encoder) is CLIPTextModel and type(xl.text_encoder_2) is CLIPTextModelWithProjection
    w1, w2 = xl.text_encoder.config.hidden_size, xl.text_encoder_2.config.hidden_size
    assert w1 < w2 and xl.unet.config.cross_attention_dim == w1 + w2
    pooled = xl.text_encoder_2.config.projection_dim  # the added embedding takes 6 time ids and the pooled width
    assert xl.unet.add_embedding.linear_1.in_features == 6 * xl.unet.config.addition_time_embed_dim + pooled
    assert xl.unet.config.down_block_types[0] == "DownBlock2D" and "CrossAttnDownBlock2D" in xl.unet.config.down_block_types
    size_mb = sum(f.stat().st_size for f in (out / "shapes-xl-teacher").rglob("*.safetensors")) / 2**20
    print(f"shapes-xl-teacher weights {size_mb:.1f} MiB")
    assert size_mb < 40
    # stages 2-4 reused from the SD build beside it: the same VAE, its recipe.json left as it was
    sd_vae = AutoencoderKL.from_pretrained(str(out / "shapes-teacher" / "vae"), use_safetensors=True)
    assert all(torch.equal(a, b) for a, b in zip(sd_vae.state_dict().values(), xl.vae.state_dict().values()))
    assert (out / "recipe.json").read_text() == sd_recipe
    saved = json.loads((out / "recipe-xl.json").read_text())
    assert saved["stages"]["vae"]["reused_from"] == str(out) and saved["arch"] == "xl"
    sc = record["stages"]["data"]["size_conditioning"]  # the UNet trained on the data's own varied time ids
    assert 0 < sc["plain_share"] < 1 and sc["cropped_share"] > 0 and sc["distinct_time_ids_trained"] > 3
    assert record["stages"]["unet"]["steps_done"] == 3 and set(record["stages"]["check"]) >= {"train", "heldout"}


# ---- 2. the data: size and crop really vary, each recorded as SDXL's time ids --------------------------------------
def test_training_renders_vary_size_and_crop_and_record_them():
    from splam_studio.shapes.recipe import PRESETS

    p = PRESETS["xl"]
    ds = ShapesDataset(64, seed=3)
    images, ids = ds.render_all_sized(p.xl_plain, p.xl_lowres, p.xl_lowres_min, p.xl_scale_max)
    assert images.shape == (64, 3, RESOLUTION, RESOLUTION) and ids.shape == (64, 6)
    assert (ids[:, 0] == ids[:, 1]).all() and (ids[:, 4:] == RESOLUTION).all()
    plain = (ids[:, 0] == RESOLUTION) & (ids[:, 2:4] == 0).all(1)
    low, big = ids[:, 0] < RESOLUTION, ids[:, 0] > RESOLUTION
    assert plain.any() and low.any() and big.any() and (ids[low, 2:4] == 0).all()
    assert (ids[big, 2] != ids[big, 3]).any() and len(set(ids[:, 0].tolist())) > 5
    assert torch.equal(images[plain], ds.render_all()[plain])  # a plain draw is the SD build's own render
    i = int(torch.nonzero(big & (ids[:, 2] != ids[:, 3]))[0])  # a crop with top != left: rows are `top`
    size, top, left = (int(v) for v in ids[i, [0, 2, 3]])
    full = np.array(render(ds.specs[i], np.random.default_rng([ds.seed, i]), size))  # (H, W, 3)
    want = torch.from_numpy(full[top:top + RESOLUTION, left:left + RESOLUTION]).permute(2, 0, 1)
    assert torch.equal(images[i], want)


# ---- 3. the conditioning the UNet trains on is the pipeline's --------------------------------------------------------
@torch.no_grad()
def test_cached_conditions_and_dropout_are_the_pipelines_branches(xl):
    from splam_studio.core.teacher import empty_condition, time_ids
    from splam_studio.shapes.build import _xl_conditions
    from splam_studio.shapes.stages import pick_condition

    sizes = time_ids([[96, 96], [40, 40]], [[16, 4], [0, 0]], (RESOLUTION, RESOLUTION))
    cache, empty = _xl_conditions(xl, CAPTIONS, sizes)
    embeds, neg, pooled, neg_pooled = xl.encode_prompt(CAPTIONS, device="cpu", do_classifier_free_guidance=True)
    assert torch.equal(cache.embeds, embeds) and torch.equal(cache.pooled, pooled) and torch.equal(cache.time_ids, sizes)
    assert torch.equal(empty.embeds, neg[:1]) and torch.equal(empty.pooled, neg_pooled[:1])
    assert not neg.any() and not neg_pooled.any()  # force_zeros_for_empty_prompt
    c = pick_condition(cache, empty, torch.tensor([1, 0, 1]), torch.tensor([True, False, False]))
    assert not c.embeds[0].any() and not c.pooled[0].any()  # dropped: the unconditional branch
    assert torch.equal(c.time_ids, sizes[[1, 0, 1]])  # ... with its own size conditioning
    assert torch.equal(c.embeds[1:], embeds[[0, 1]]) and torch.equal(c.pooled[1:], pooled[[0, 1]])
    assert torch.equal(empty_condition(xl).embeds, empty.embeds)


def test_training_loop_feeds_each_samples_time_ids_and_dropout(xl):
    """One train_unet step through a recording UNet: per-sample time ids reach the UNet, dropped samples get zeros."""
    from splam_studio.shapes.build import _xl_conditions
    from splam_studio.shapes.recipe import PRESETS
    from splam_studio.shapes.stages import Clock, train_unet

    class Recorder(torch.nn.Module):
        def __init__(self, unet):
            super().__init__()
            self.unet, self.calls = unet, []

        def forward(self, z, t, **kw):
            self.calls.append(kw)
            return self.unet(z, t, **kw)

    p = replace(PRESETS["xl-tiny"], unet_steps=1, unet_batch=16, caption_dropout=0.5, probe_every=0)
    ds = ShapesDataset(16, seed=5)
    _, sizes = ds.render_all_sized(p.xl_plain, p.xl_lowres, p.xl_lowres_min, p.xl_scale_max)
    with torch.no_grad():
        conds = _xl_conditions(xl, [s.caption() for s in ds.specs], sizes)
    rec = Recorder(copy.deepcopy(xl.unet))  # a copy: train_unet takes an AdamW step on it
    latents = torch.randn(16, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    train_unet(rec, None, latents, None, None, p, Clock(60), 0, lambda s: None, torch.device("cpu"), conditions=conds)
    (kw,) = rec.calls
    got_ids, emb = kw["added_cond_kwargs"]["time_ids"], kw["encoder_hidden_states"]
    rows = [(got_ids[i] == sizes).all(1).nonzero() for i in range(16)]
    assert all(len(r) for r in rows) and len(set(got_ids[:, 0].tolist())) > 1  # each a sample's own, and they vary
    dropped = ~emb.flatten(1).any(1)
    assert dropped.any() and (~dropped).any()
    assert not kw["added_cond_kwargs"]["text_embeds"][dropped].any()
    assert kw["added_cond_kwargs"]["text_embeds"][~dropped].abs().sum(1).gt(0).all()


@torch.no_grad()
def test_size_and_crop_conditioning_change_the_unet_output(xl):
    from splam_studio.core.teacher import encode_condition, time_ids

    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500])
    outs = {}
    for name, ids in {"native": time_ids((64, 64), (0, 0), (64, 64)), "cropped": time_ids((96, 96), (16, 8), (64, 64)),
                      "low-res": time_ids((40, 40), (0, 0), (64, 64))}.items():
        c = encode_condition(xl, CAPTIONS[:1], size=ids)
        outs[name] = xl.unet(z, t, **c.unet_kwargs(torch.float32)).sample
    for a, b in (("native", "cropped"), ("native", "low-res"), ("cropped", "low-res")):
        diff = (outs[a] - outs[b]).abs().max().item()
        print(f"{a} vs {b}: eps max diff {diff:.2e}")
        assert diff > 1e-4, (a, b, diff)


# ---- 4. the studio's teacher images equal a stock StableDiffusionXLPipeline's on the same noise ---------------------------
@torch.no_grad()
def test_teacher_images_equal_a_stock_sdxl_pipeline(world, xl):
    """generate() (the studio's teacher path) and the distillation's own solver (encode_condition / empty_condition /
    guided_eps / DDIM solve) against StableDiffusionXLPipeline.from_pretrained of the folder, at guidance 7.5."""
    from diffusers import StableDiffusionXLPipeline

    from splam_studio.models.generation import generate, initial_noise
    from splam_studio.core.schedule import NoiseSchedule
    from splam_studio.core.solver import guided_eps, solve
    from splam_studio.core.teacher import empty_condition, encode_condition, lcm_w, time_ids, uncond_like
    from splam_studio.models.loading import load_teacher

    seed, steps, cfg = 7, 4, 7.5
    teacher = load_teacher(str(world[0] / "shapes-xl-teacher"))
    studio = generate(teacher, prompt=CAPTIONS, sampler="ddim", steps=steps, seed=seed, guidance_scale=cfg)
    z_T = initial_noise(seed, len(CAPTIONS), xl.unet, 64, 64, 8)
    stock = xl(CAPTIONS, num_inference_steps=steps, guidance_scale=cfg, latents=z_T.clone(), output_type="latent").images
    diff = (studio.latents - stock).abs().max().item()
    print(f"studio generate vs stock SDXL: latent max diff {diff:.2e}")
    assert diff <= 1e-5
    ref = StableDiffusionXLPipeline.from_pretrained(str(world[0] / "shapes-xl-teacher"), local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    images = ref(CAPTIONS, num_inference_steps=steps, guidance_scale=cfg, latents=z_T.clone(), output_type="np").images
    assert np.array_equal((images * 255).round().astype(np.uint8), np.stack([np.array(im) for im in studio.images]))

    # the distillation's teacher solver, at a non-default size / crop conditioning
    sizes = dict(original_size=(96, 96), crops_coords_top_left=(16, 8), target_size=(64, 64))
    cond = encode_condition(xl, CAPTIONS, size=time_ids(*sizes.values()))
    eps_fn = guided_eps(xl.unet, cond, uncond_like(empty_condition(xl), cond), lcm_w(cfg))
    xl.scheduler.set_timesteps(steps)
    t0, k = xl.scheduler.timesteps[0], 1000 // steps
    own, _ = solve(eps_fn, NoiseSchedule.from_scheduler(xl.scheduler), z_T, t0.repeat(len(CAPTIONS)), steps, k)
    want = xl(CAPTIONS, num_inference_steps=steps, guidance_scale=cfg, latents=z_T.clone(), output_type="latent",
              **sizes).images
    diff = (own - want).abs().max().item()
    print(f"core guided DDIM solve vs stock SDXL at original_size 96, crop (16, 8): latent max diff {diff:.2e}")
    assert diff < 1e-4
    assert (want - stock).abs().max() > 1e-3  # the size conditioning reaches the images


# ---- 4. the SDXL path distils: a short run on the embedded Shapes-XL teacher beats no distillation ----------------
def test_a_short_distillation_on_the_xl_teacher_beats_the_untrained_student(tmp_path):
    """40 SPLAM steps (batch 8) on weights/shapes-xl-teacher through the SDXL path of the trainer: at 2 and 4 steps the
    student is closer to the teacher (latent MSE, 16 held-out captions) than the teacher UNet used untrained as a
    few-step sampler. A wrong pooled embedding, time id or unconditional branch trains a student that is not."""
    from pathlib import Path

    from splam_studio.models.generation import generate
    from splam_studio.models.loading import load_student, load_teacher
    from splam_studio.shapes.grammar import sample_specs
    from splam_studio.tools.bench import untrained_student
    from splam_studio.training import loop

    teacher = Path(__file__).resolve().parents[1] / "weights" / "shapes-xl-teacher"
    cfg = loop.TrainConfig(teacher=str(teacher), data="shapes", shapes_size=2000, output_dir=str(tmp_path),
                           run_name="xl-short", max_steps=40, batch_size=8, lr=3e-5, cond_proj_lr_scale=10.0, w=6.5,
                           gamma_one_prob=0.8, cond_proj_init="zero", device="cpu", checkpoint_every=100000)
    from accelerate.state import AcceleratorState, GradientState

    try:
        run = loop.run(cfg, log=lambda s: None)
    finally:  # the next in-process run builds its own Accelerator
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    pipe = load_teacher(str(teacher))
    assert pipe.unet.config.addition_embed_type == "text_time"
    caps = [s.caption() for s in sample_specs(16, 77, "heldout")]
    ref = generate(pipe, prompt=caps, sampler="ddim", steps=25, seed=9, guidance_scale=7.5, decode=False).latents
    mse = {}
    for name, unet in (("untrained", untrained_student(pipe)), ("trained", load_student(str(run), pipe))):
        for k in (2, 4):
            lat = generate(pipe, prompt=caps, sampler="lcm", steps=k, seed=9, unet=unet, decode=False).latents
            mse[name, k] = float(((lat - ref) ** 2).mean())
    for k in (2, 4):
        assert mse["trained", k] < 0.98 * mse["untrained", k], mse


@pytest.mark.parametrize("set_name", ["shapes-xl", "shapes-xl-lora"])
def test_the_embedded_shapes_xl_sets_compare_offline(set_name):
    """`--models shapes-xl` / `shapes-xl-lora`: the embedded XL teacher and its two students (full UNets, or LoRA
    runs), loaded from weights/ with no hub, compared on one prompt and seed; both students are SDXL-architecture
    UNets with the gamma projection."""
    from pathlib import Path

    from splam_studio.models.model_sets import get_model_set
    from splam_studio.studio.logic import Studio

    weights = Path(__file__).resolve().parents[1] / "weights"
    ms = get_model_set(set_name)
    lora = set_name.endswith("lora")
    for role in ("splam", "lcm"):  # the set's kind of student, as embedded
        assert (weights / getattr(ms, role).repo / ("lora" if lora else "unet")).is_dir()
    studio = Studio.for_model_set(set_name, weights, device="cpu", allow_hub=False, warm_up=False)
    assert (studio.defaults["teacher"], studio.defaults["splam"], studio.defaults["lcm"]) == \
        (ms.teacher, ms.splam.repo, ms.lcm.repo)
    r = studio.compare(CAPTIONS[0], seed=3, student_steps=2, teacher_steps=4, guidance_scale=7.5, repeats=1, warmup=0)
    assert [p.role for p in r.panels] == ["teacher", "lcm", "splam"]
    assert all(np.asarray(p.image).std() > 1 for p in r.panels)  # real images, not a flat fill
    for role in ("splam", "lcm"):
        unet = studio.student(getattr(ms, role).repo, ms.teacher, role)
        assert unet.config.addition_embed_type == "text_time" and unet.config.time_cond_proj_dim is not None
        assert any("lora" in k for k in unet.state_dict()) == lora
    from diffusers import StableDiffusionXLPipeline

    from splam_studio.models.loading import load_teacher

    for name in ("shapes-xl", "shapes-xl-teacher"):  # embedded names, as --teacher takes them
        assert isinstance(load_teacher(name, weights=weights), StableDiffusionXLPipeline)
