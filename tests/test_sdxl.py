"""The SDXL path on tiny SDXL-shaped pipelines (tests/tiny.py): the conditioning equals StableDiffusionXLPipeline's,
the SPLAD step sees it in every branch, and the studio's student samples as a stock SDXL pipeline + LCMScheduler."""
import pytest
import torch

from splam_studio.core.teacher import (TextCondition, added_conditioning, as_condition, empty_condition, encode_condition,
                                       time_ids, uncond_like)
from splam_studio.shapes.tokenizer import MAX_LENGTH
from tests.tiny import make_tiny_pipeline, make_tiny_xl_pipeline

CAPTIONS = ["one small red circle at the left on a black background", "two big blue squares"]


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    return make_tiny_xl_pipeline(tmp_path_factory.mktemp("xl"))


@pytest.fixture(scope="module")
def xl_nozeros(tmp_path_factory):
    return make_tiny_xl_pipeline(tmp_path_factory.mktemp("xl0"), force_zeros_for_empty_prompt=False)


# ---- 1. the conditioning equals the pipeline's -------------------------------------------------------------------------
def test_family_is_read_from_the_teacher(xl, tmp_path):
    assert added_conditioning(xl)
    sd = make_tiny_pipeline(tmp_path)
    assert not added_conditioning(sd)
    assert torch.is_tensor(encode_condition(sd, CAPTIONS))  # SD1.5 keeps its plain tensor c


@torch.no_grad()
def test_prompt_embeds_and_pooled_equal_encode_prompt(xl):
    c = encode_condition(xl, CAPTIONS)
    embeds, neg, pooled, neg_pooled = xl.encode_prompt(CAPTIONS, device="cpu", do_classifier_free_guidance=True)
    assert c.embeds.shape == (2, MAX_LENGTH, 80) and c.pooled.shape == (2, 24)
    assert torch.equal(c.embeds, embeds) and torch.equal(c.pooled, pooled)
    u = uncond_like(empty_condition(xl), c)
    assert torch.equal(u.embeds, neg) and torch.equal(u.pooled, neg_pooled)
    assert not u.embeds.any() and not u.pooled.any()  # force_zeros_for_empty_prompt: zeros, as the pipeline


@torch.no_grad()
def test_unconditional_branch_without_force_zeros_encodes_the_empty_prompt(xl_nozeros):
    c = encode_condition(xl_nozeros, CAPTIONS)
    _, neg, _, neg_pooled = xl_nozeros.encode_prompt(CAPTIONS, device="cpu", do_classifier_free_guidance=True)
    u = uncond_like(empty_condition(xl_nozeros), c)  # "" encoded once at batch 1, repeated per sample
    assert neg.abs().sum() > 0 and torch.equal(u.embeds, neg)
    torch.testing.assert_close(u.pooled, neg_pooled, rtol=0, atol=1e-6)  # the pipeline's batch-2 matmul rounds apart
    _, neg_1, _, neg_pooled_1 = xl_nozeros.encode_prompt(CAPTIONS[:1], device="cpu", do_classifier_free_guidance=True)
    assert torch.equal(u.embeds[:1], neg_1) and torch.equal(u.pooled[:1], neg_pooled_1)  # same batch: bit for bit


def test_time_ids_equal_get_add_time_ids(xl):
    orig, crop, target = (24, 40), (3, 5), (16, 16)
    ref = xl._get_add_time_ids(orig, crop, target, torch.float32, text_encoder_projection_dim=24)
    assert torch.equal(time_ids(orig, crop, target), ref)
    per_sample = time_ids(torch.tensor([[24, 40], [16, 16]]), torch.tensor([[3, 5], [0, 0]]), target)
    assert torch.equal(per_sample[0], ref[0]) and per_sample.shape == (2, 6)
    c = encode_condition(xl, CAPTIONS)  # the default: native size, uncropped, as the pipeline at its default size
    assert torch.equal(c.time_ids, xl._get_add_time_ids((16, 16), (0, 0), (16, 16), torch.float32, 24).expand(2, -1))
    u = uncond_like(empty_condition(xl), encode_condition(xl, CAPTIONS, size=per_sample))
    assert torch.equal(u.time_ids, per_sample)  # each uncond sample carries its own sample's time ids


def test_unet_kwargs_and_batching():
    c = TextCondition(torch.ones(2, 3, 4), torch.ones(2, 5), torch.ones(2, 6))
    kw = c.cat(c).unet_kwargs(torch.float16)
    assert kw["encoder_hidden_states"].shape == (4, 3, 4) and kw["added_cond_kwargs"]["time_ids"].dtype == torch.float16
    assert set(as_condition(torch.ones(2, 3, 4)).unet_kwargs(torch.float32)) == {"encoder_hidden_states"}
    with pytest.raises(ValueError, match="both pooled"):
        TextCondition(torch.ones(2, 3, 4), torch.ones(2, 5))
    with pytest.raises(ValueError, match="SDXL condition with an SD one"):
        c.cat(as_condition(torch.ones(2, 3, 4)))


# ---- 2. the SPLAD step sees the conditioning in every branch ------------------------------------------------------------
class _Added(torch.nn.Module):
    """A UNet called as SD1.5 is (encoder_hidden_states only) that adds the SDXL conditioning of the TextCondition whose
    embeds it is given: so tests/test_core_mutants.py's plain-ops reference step runs on an SDXL UNet unchanged."""

    def __init__(self, unet, *conds: TextCondition):
        super().__init__()
        self.unet, self.conds = unet, conds

    def forward(self, z, t, encoder_hidden_states, **kw):
        c = next(c for c in self.conds if c.embeds is encoder_hidden_states)
        return self.unet(z, t, **c.unet_kwargs(self.unet.dtype), **kw)


@pytest.fixture(scope="module")
def xl_models(xl):
    from splam_studio.core.student import build_student, make_target

    teacher = xl.unet.requires_grad_(False)
    student = build_student(teacher, "fresh", generator=torch.Generator().manual_seed(0))
    target = make_target(student)
    with torch.no_grad():  # a target apart from the student, as after some EMA steps
        g = torch.Generator().manual_seed(9)
        for p in target.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
        sizes = time_ids(torch.tensor([[24, 40], [16, 16]]), torch.tensor([[3, 5], [0, 0]]), (16, 16))
        cond = encode_condition(xl, CAPTIONS, size=sizes)
        uncond = uncond_like(empty_condition(xl), cond)
    z_0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    return teacher, student, target, cond, uncond, z_0


def _loss(xl_models, cond=None, uncond=None, method="splam", seed=2, **splad):
    from splam_studio.core.schedule import NoiseSchedule
    from splam_studio.core.splad import SpladConfig, splad_loss

    teacher, student, target, c, u, z_0 = xl_models
    with torch.no_grad():
        return splad_loss(SpladConfig(method=method, **splad), NoiseSchedule.from_scheduler(sdxl_sched()), student, target,
                          teacher, z_0, cond or c, uncond or u, torch.Generator().manual_seed(seed))


def sdxl_sched():
    from tests.tiny import sdxl_scheduler

    return sdxl_scheduler()


@pytest.mark.parametrize("method,seed", [("splam", 2), ("lcm", 3)])
def test_sdxl_splad_loss_equals_the_reference_step_with_each_branch_conditioned(xl_models, method, seed):
    from tests.test_core_mutants import reference_splad_loss

    teacher, student, target, cond, uncond, z_0 = xl_models
    ours = _loss(xl_models, method=method, seed=seed)
    ref = reference_splad_loss(_Added(teacher, cond, uncond), _Added(student, cond), _Added(target, cond), z_0,
                               cond.embeds, uncond.embeds, seed, method)
    assert ref.item() > 0 and torch.allclose(ours, ref, rtol=2e-5, atol=0), (ours.item(), ref.item())


def test_diffusers_w_range_recipe_runs_on_sdxl(xl_models):
    """LCM with w ~ U[w_min, w_max], embedded for student and target (diffusers' SDXL LCM recipe), on the SDXL step."""
    ranged, fixed = _loss(xl_models, method="lcm", w_min=3.0, w_max=15.0), _loss(xl_models, method="lcm")
    assert torch.isfinite(ranged) and abs(ranged.item() - fixed.item()) > 1e-4 * fixed.item()


def test_wrong_pooled_or_uncond_time_ids_change_the_loss(xl_models):
    """The plumbing is not dead: each piece of the added conditioning moves the loss."""
    _, _, _, cond, uncond, _ = xl_models
    base = _loss(xl_models)
    swapped_pooled = TextCondition(cond.embeds, cond.pooled.flip(0), cond.time_ids)
    wrong_uncond_ids = TextCondition(uncond.embeds, uncond.pooled, time_ids((16, 16), (0, 0), (16, 16)).expand(2, -1))
    wrong_cond_ids = TextCondition(cond.embeds, cond.pooled, uncond.time_ids.flip(0))
    for c, u in ((swapped_pooled, None), (None, wrong_uncond_ids), (wrong_cond_ids, None)):
        changed = _loss(xl_models, cond=c, uncond=u)
        assert abs(changed.item() - base.item()) > 1e-4 * base.item(), (changed.item(), base.item())



def test_sdxl_dmd_scores_see_the_added_conditioning(xl_models):
    """--dmd on an SDXL teacher: the fake score is an SDXL UNet like the teacher, both scores take the condition's
    pooled embeds and time ids (a wrong pooled embedding moves both losses), and the 1-step terms run in splad_loss."""
    from splam_studio.core.dmd import dmd_losses, make_fake_score
    from splam_studio.core.schedule import NoiseSchedule

    teacher, _, _, cond, uncond, z_0 = xl_models
    fake = make_fake_score(teacher)
    assert fake.config.addition_embed_type == "text_time"
    schedule = NoiseSchedule.from_scheduler(sdxl_sched())
    with torch.no_grad():
        for p in fake.parameters():  # apart from the teacher, as after some steps
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel() % 97)))

    def losses(c):
        return dmd_losses(fake, teacher, schedule, z_0.clone().requires_grad_(True), c, uncond, 6.5,
                          torch.Generator().manual_seed(4))

    base = losses(cond)
    swapped = losses(TextCondition(cond.embeds, cond.pooled.flip(0), cond.time_ids))
    for a, b in zip(base, swapped):
        assert torch.isfinite(a) and abs(a.item() - b.item()) > 1e-5 * abs(a.item()), (a.item(), b.item())
    from splam_studio.core.splad import SpladConfig, splad_loss

    _, student, target, *_ = xl_models
    loss = splad_loss(SpladConfig(dmd=0.5, regression=0.25), schedule, student, target, teacher, z_0, cond, uncond,
                      torch.Generator().manual_seed(5), z_T=torch.randn_like(z_0), critic=fake)
    assert torch.isfinite(loss)


# ---- 3. the studio's SDXL student samples as a stock StableDiffusionXLPipeline + LCMScheduler -----------------------------
XL_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.2", "conv1", "time_emb_proj"]


def xl_lora_student(pipe, seed: int = 4):
    """The tiny SDXL teacher + a fresh gamma projection + a random LoRA (what an SDXL LoRA run exports)."""
    from peft import LoraConfig

    from splam_studio.core.student import build_student

    student = build_student(pipe.unet, "fresh", generator=torch.Generator().manual_seed(seed))
    student.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=XL_LORA_TARGETS, init_lora_weights="gaussian"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return student.eval()


def _images(pipe, latents):
    from splam_studio.models.generation import decode_latents

    ims = decode_latents(pipe, latents)
    return torch.stack([torch.tensor(list(im.getdata()), dtype=torch.float32) for im in ims]) / 127.5 - 1


def _stock_lcm(pipe, z_T, seed, steps=4, prompts=CAPTIONS, **sizes):
    """A stock StableDiffusionXLPipeline + LCMScheduler at guidance 1 from the noise z_T (re-noising from seed + 1)."""
    from diffusers import LCMScheduler

    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    return pipe(prompt=prompts, num_inference_steps=steps, guidance_scale=1.0, latents=z_T.clone(),
                generator=torch.Generator("cpu").manual_seed(seed + 1), output_type="latent", **sizes).images


@torch.no_grad()
def test_lora_student_with_folded_gamma_samples_as_a_stock_sdxl_pipeline(xl, tmp_path):
    from splam_studio.core.metrics import psnr
    from splam_studio.core.sampler import consistency_sample
    from splam_studio.models.generation import generate, initial_noise
    from splam_studio.core.schedule import NoiseSchedule
    from splam_studio.core.student import clean_fn
    from splam_studio.models import export as X

    seed, student = 11, xl_lora_student(xl)
    studio = generate(xl, prompt=CAPTIONS, sampler="lcm", steps=4, seed=seed, unet=student, decode=False).latents
    z_T = initial_noise(seed, len(CAPTIONS), xl.unet, 16, 16, 2)
    schedule = NoiseSchedule.from_scheduler(xl.scheduler)
    sizes = dict(original_size=(24, 40), crops_coords_top_left=(3, 5), target_size=(16, 16))  # not palindromic
    c = encode_condition(xl, CAPTIONS, size=time_ids(*sizes.values()))
    own = consistency_sample(clean_fn(student, c, schedule), schedule, z_T, 4,
                             torch.Generator("cpu").manual_seed(seed + 1))  # the studio's own sampler and UNet call
    lora = X.export_diffusers_lora(student, tmp_path / "lora.safetensors")
    stock = make_tiny_xl_pipeline(tmp_path / "stock")
    stock.load_lora_weights(str(lora))
    ref = _stock_lcm(stock, z_T, seed)
    for got, want, what in ((studio, ref, "studio generate"), (own, _stock_lcm(stock, z_T, seed, **sizes), "consistency_sample")):
        diff, db = (got - want).abs().max().item(), psnr(_images(xl, got), _images(xl, want)).min().item()
        print(f"{what} vs stock SDXL + LCMScheduler: latent max diff {diff:.2e}, PSNR {db:.1f} dB")
        assert diff < 1e-3 and db >= 40, (what, diff, db)
    bare = make_tiny_xl_pipeline(tmp_path / "bare")  # control: the LoRA without the gamma fold samples another image
    X.save_student(tmp_path / "run", student, lora=True, config={"lora_rank": 4})
    bare.load_lora_weights(str(tmp_path / "run" / "lora"), weight_name=X.LORA_WEIGHTS)
    assert (_stock_lcm(bare, z_T, seed) - ref).abs().max() > 1e-2


# ---- 4. the trainer on a tiny SDXL teacher; 5. the exports SDXL tools load ------------------------------------------------
@pytest.fixture(scope="module")
def xl_world(tmp_path_factory, xl):
    """The tiny SDXL teacher as a diffusers folder, and captioned images of several sizes (random crops vary)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("xl-world")
    xl.save_pretrained(root / "teacher", safe_serialization=True)
    data = root / "data"
    data.mkdir()
    g = torch.Generator().manual_seed(0)
    for i, (w, h) in enumerate([(16, 16), (24, 16), (16, 28), (32, 20)] * 2):
        arr = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(CAPTIONS[i % 2])
    return root


def test_data_records_original_size_and_random_crop(xl_world):
    from splam_studio.training.data import build_dataset, time_ids_of

    ds = build_dataset(str(xl_world / "data"), 16, size_conditioning=True, seed=1)
    items = [ds[i] for i in range(len(ds))]
    sizes = {tuple(e["original_size"].tolist()) for e in items}
    assert sizes == {(16, 16), (16, 24), (28, 16), (20, 32)}  # (h, w) before the resize
    for e in items:
        h, w = e["original_size"].tolist()
        top, left = e["crop_top_left"].tolist()
        nh, nw = (16, round(w * 16 / h)) if h <= w else (round(h * 16 / w), 16)
        assert e["pixel_values"].shape == (3, 16, 16) and 0 <= top <= nh - 16 and 0 <= left <= nw - 16
    assert any(e["crop_top_left"].sum() > 0 for e in items)  # crops are drawn, not centred
    again = build_dataset(str(xl_world / "data"), 16, size_conditioning=True, seed=1)
    assert all(torch.equal(again[i]["crop_top_left"], items[i]["crop_top_left"]) for i in range(len(ds)))
    batch = {"original_size": torch.stack([e["original_size"] for e in items[:2]]),
             "crop_top_left": torch.stack([e["crop_top_left"] for e in items[:2]])}
    ids = time_ids_of(batch, 16)
    assert ids.shape == (2, 6) and torch.equal(ids[:, :2], batch["original_size"].float())
    assert torch.equal(ids[:, 2:4], batch["crop_top_left"].float()) and (ids[:, 4:] == 16).all()
    assert "original_size" not in build_dataset(str(xl_world / "data"), 16)[0]  # SD1.5 data as before


def test_sdxl_folder_teacher_loads_as_an_sdxl_pipeline(xl_world, xl):
    from diffusers import StableDiffusionXLPipeline

    from splam_studio.models.loading import load_teacher

    pipe = load_teacher(str(xl_world / "teacher"))
    assert isinstance(pipe, StableDiffusionXLPipeline) and added_conditioning(pipe)
    with torch.no_grad():
        a, b = encode_condition(pipe, CAPTIONS), encode_condition(xl, CAPTIONS)
    assert torch.equal(a.embeds, b.embeds) and torch.equal(a.pooled, b.pooled)


def _train_cli(world, out, *extra):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    args = ["--preset", "sdxl", "--teacher", str(world / "teacher"), "--data", str(world / "data"), "--output-dir", str(out),
            "--resolution", "16", "--lora-rank", "4", "--batch-size", "2", "--grad-accum", "1", "--checkpoint-every", "1",
            "--validate-every", "0", "--device", "cpu", "--precision", "bf16", "--run-name", "xl", "--export-merged",
            "--validation-prompts", CAPTIONS[0], *extra]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(root / "train_cli.py"), *args], capture_output=True, text=True, cwd=root,
                          env=env, timeout=300)


def _sample(pipe, unet=None, seed=5):
    from splam_studio.models.generation import generate

    return generate(pipe, prompt=CAPTIONS, sampler="lcm", steps=4, seed=seed, unet=unet, decode=False).latents


def test_train_cli_sdxl_lora_bf16_steps_export_resume(xl_world, tmp_path):
    """--preset sdxl (resolution and rank overridden for the CPU) on the tiny SDXL folder teacher: 2 steps, exports,
    resume to 3; each export loads back through diffusers' own SDXL loaders and samples as the studio's student."""
    import json

    from diffusers import StableDiffusionXLPipeline
    from safetensors import safe_open

    from splam_studio.models.loading import load_student, load_teacher

    r = _train_cli(xl_world, tmp_path, "--max-steps", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    r = _train_cli(xl_world, tmp_path, "--max-steps", "3", "--resume", "latest")
    assert r.returncode == 0 and "continuing at step 2" in r.stdout + r.stderr, r.stderr[-3000:]
    run = tmp_path / "xl"
    cfg = json.loads((run / "training_config.json").read_text())
    assert cfg["lora_rank"] == 4 and cfg["gradient_checkpointing"] and cfg["mixed_precision"] == "bf16"
    assert cfg["dtypes"]["teacher"] == "bfloat16" and cfg["dtypes"]["student"] == "float32"
    assert sorted(p.name for p in (run / "validation").glob("*.png")) == ["step-0000002.png", "step-0000003.png"]
    done = [json.loads(x) for x in (run / "stats.jsonl").read_text().splitlines() if '"done"' in x][-1]
    assert done["step"] == 3 and set(done["exports"]) == {"run", "kohya_lora", "diffusers_lora", "single_file", "stock_diffusers"}
    with safe_open(str(run / "lora_kohya.safetensors"), framework="pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["modelspec.architecture"].startswith("stable-diffusion-xl")
    assert "lora_unet_time_embed_0.diff_b" in keys and any(k.startswith("lora_unet_output_blocks_") for k in keys)
    assert not any("down_blocks" in k or "up_blocks" in k for k in keys)  # sgm names, as kohya's SDXL networks
    pipe = load_teacher(str(xl_world / "teacher"))
    studio = _sample(pipe, load_student(str(run), pipe))
    stock = load_teacher(str(xl_world / "teacher"))
    stock.load_lora_weights(str(run / done["exports"]["diffusers_lora"]))
    merged = StableDiffusionXLPipeline.from_single_file(str(run / done["exports"]["single_file"]),
                                                        config=str(xl_world / "teacher"), local_files_only=True)
    folder = StableDiffusionXLPipeline.from_pretrained(str(run / "stock_diffusers"), local_files_only=True)
    for p, what in ((stock, "diffusers LoRA"), (merged, "merged SDXL single file"), (folder, "stock SDXL folder")):
        diff = (_sample(p) - studio).abs().max().item()
        print(f"{what}: latent max diff {diff:.2e}")
        assert diff < 1e-3, (what, diff)
    assert (_sample(pipe) - studio).abs().max() > 1e-2  # the teacher itself samples another image


def test_sgm_key_names_invert_diffusers_own_sdxl_converters(xl):
    """unet_to_ldm (with SDXL's label_emb) and openclip_to_ldm are exactly undone by diffusers' single-file converters."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_open_clip_checkpoint

    from splam_studio.models.export import unet_to_ldm
    from splam_studio.models.sdxl import SDXL_LDM_PREFIXES, openclip_to_ldm

    want = xl.unet.state_dict()
    back = convert_ldm_unet_checkpoint(unet_to_ldm(xl.unet), dict(xl.unet.config))
    assert back.keys() == want.keys() and all(torch.equal(back[k], want[k]) for k in want)
    want = {k: v for k, v in xl.text_encoder_2.state_dict().items() if not k.endswith("position_ids")}
    back = convert_open_clip_checkpoint(xl.text_encoder_2, openclip_to_ldm(xl.text_encoder_2), SDXL_LDM_PREFIXES["text_encoder_2"])
    assert back.keys() == want.keys() and all(torch.equal(back[k], want[k]) for k in want)


def _kohya_apply_sgm(unet, path, names):
    """A1111 / ComfyUI's arithmetic through the sgm names: W += (alpha / r) up @ down, W += diff, b += diff_b."""
    import copy

    from safetensors.torch import load_file

    unet, sd = copy.deepcopy(unet), load_file(str(path))
    modules = dict(unet.named_modules())
    by_kohya = {v: modules[k] for k, v in names.items()}
    with torch.no_grad():
        for key in sd:
            stem, _, kind = key.partition(".")
            mod = by_kohya[stem]
            if kind == "lora_down.weight":
                down, up = sd[key], sd[f"{stem}.lora_up.weight"]
                mod.weight += float(sd[f"{stem}.alpha"]) / down.shape[0] * (up.flatten(1) @ down.flatten(1)).reshape(mod.weight.shape)
            elif kind == "diff":
                mod.weight += sd[key]
            elif kind == "diff_b":
                mod.bias += sd[key]
    return unet


def _unet_out(unet, cond, seed=0):
    g = torch.Generator().manual_seed(seed)
    z, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([999, 259])
    with torch.no_grad():
        return unet(z, t, **cond.unet_kwargs(torch.float32)).sample


def test_kohya_sdxl_lora_round_trip(xl, tmp_path):
    """The kohya SDXL LoRA: sgm key names, SDXL metadata, the gamma = 1 fold as diff_b; applied as A1111 / ComfyUI apply
    it, it is the folded student; without a gamma input, diffusers' own kohya SDXL converter loads it as our LoRA."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from splam_studio.models import export as X
    from splam_studio.models.sdxl import kohya_sdxl_names

    student, names = xl_lora_student(xl), kohya_sdxl_names(xl.unet)
    path = X.export_kohya_lora(student, tmp_path / "k.safetensors", config={"run_name": "k", "resolution": 1024})
    sd = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["modelspec.resolution"] == "1024x1024"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora" and meta["splam_gamma_fold"] == "diff_b"
    assert {k.partition(".")[0] for k in sd} <= set(names.values())
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in sd  # kohya's own spelling
    assert "lora_unet_output_blocks_0_0_emb_layers_1.lora_up.weight" in sd and "lora_unet_time_embed_0.diff_b" in sd
    cond = encode_condition(xl, CAPTIONS, size=time_ids((24, 40), (3, 5), (16, 16)))
    folded = X.fold_cond_proj(student)
    applied = _kohya_apply_sgm(xl.unet, path, names)
    torch.testing.assert_close(_unet_out(applied, cond), _unet_out(folded, cond), rtol=0, atol=1e-5)
    assert (_unet_out(xl.unet, cond) - _unet_out(folded, cond)).abs().max() > 1e-2  # the LoRA and the fold matter
    # diffusers' load_lora_weights reads kohya SDXL files through its sgm-name converter: the same LoRA on a UNet
    # without gamma input (a plain SDXL LoRA, alpha 8 at rank 4) loads as ours
    plain_unet = lora_without_gamma(xl.unet, student)
    plain = X.export_kohya_lora(plain_unet, tmp_path / "plain.safetensors")
    assert not any(".diff" in k for k in load_file(str(plain)))
    stock = make_tiny_xl_pipeline(tmp_path / "stock")
    stock.load_lora_weights(str(plain))
    torch.testing.assert_close(_unet_out(stock.unet, cond), _unet_out(plain_unet, cond), rtol=0, atol=1e-5)
    assert (_unet_out(plain_unet, cond) - _unet_out(xl.unet, cond)).abs().max() > 1e-2


def lora_without_gamma(teacher, student):
    """The student's LoRA adapter on a copy of the teacher UNet (no gamma projection)."""
    import copy

    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    out = copy.deepcopy(teacher)
    out.add_adapter(student.peft_config["default"])
    set_peft_model_state_dict(out, get_peft_model_state_dict(student))
    return out.eval()


def test_single_file_sdxl_teacher_loads_offline_with_a_config_folder(xl_world, xl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from splam_studio.models.export import save_single_file
    from splam_studio.models.loading import ModelLoadError, load_teacher

    path = save_single_file(xl, tmp_path / "teacher.safetensors")
    pipe = load_teacher(str(path), config=str(xl_world / "teacher"))
    assert isinstance(pipe, StableDiffusionXLPipeline)
    for c in ("unet", "vae", "text_encoder", "text_encoder_2"):
        want, got = getattr(xl, c).state_dict(), getattr(pipe, c).state_dict()
        assert all(torch.equal(got[k], v) for k, v in want.items() if not k.endswith("position_ids")), c
    with pytest.raises(ModelLoadError, match="SDXL folder"):
        load_teacher(str(path), config=str(tmp_path))


def test_full_sdxl_student_exports_a_single_file_that_samples_as_the_studio(xl_world, xl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from splam_studio.core.student import build_student
    from splam_studio.models import export as X
    from splam_studio.models.loading import load_student

    student = build_student(xl.unet, "fresh", generator=torch.Generator().manual_seed(2)).eval()
    with torch.no_grad():  # as after training: the whole UNet moved, the gamma projection large
        g = torch.Generator().manual_seed(3)
        for p in student.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    out = X.export_run(tmp_path / "full", student, xl, {"lora_rank": 0, "run_name": "full"})
    assert set(out) == {"run", "single_file"}
    studio = _sample(xl, load_student(out["run"], xl))
    stock = StableDiffusionXLPipeline.from_single_file(str(out["single_file"]), config=str(xl_world / "teacher"),
                                                       local_files_only=True)
    diff = (_sample(stock) - studio).abs().max().item()
    assert diff < 1e-3, diff


def test_a_training_batch_carries_its_size_conditioning_into_both_branches(xl_world, xl):
    """latents.batch_latents (the loop's encode_batch): c with each sample's time ids, c_uncond the zeroed empty prompt
    with the same ids."""
    from splam_studio.training.data import build_dataset, collate_drop_none, time_ids_of
    from splam_studio.training.latents import batch_latents

    ds = build_dataset(str(xl_world / "data"), 16, size_conditioning=True, seed=1)
    batch = collate_drop_none([ds[i] for i in range(3)])
    z_0, cond, uncond = batch_latents(batch, xl, torch.device("cpu"), torch.float32, torch.Generator().manual_seed(0),
                                      empty_condition(xl))
    assert z_0.shape == (3, 4, 8, 8) and torch.equal(cond.time_ids, time_ids_of(batch, 16))
    assert torch.equal(uncond.time_ids, cond.time_ids) and not uncond.pooled.any()
    assert len({tuple(r.tolist()) for r in cond.time_ids}) > 1  # the samples differ


def test_a_broken_sdxl_folder_is_refused_in_one_sentence(xl_world, tmp_path):
    import shutil

    from splam_studio.models.loading import ModelLoadError, load_teacher

    broken = tmp_path / "broken"
    shutil.copytree(xl_world / "teacher", broken)
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(ModelLoadError, match=r"not an SDXL pipeline: missing \['text_encoder_2'\]"):
        load_teacher(str(broken))
