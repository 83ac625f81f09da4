"""Every export samples as the studio's student does, loaded back through diffusers' own loaders.

The student at gamma = 1 adds cond_proj(emb(omega)) to its time embedding; the stock forms carry it folded into
time_embedding.linear_1.bias (models.export.fold_cond_proj). Each form is loaded with diffusers' own loader
(StableDiffusionPipeline.from_single_file with the teacher's configs offline, from_pretrained, load_lora_weights on
the teacher) and sampled from the same noise as the studio's student (models.generation.generate, LCM, 4 steps).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import load_file

from splam_studio.core.metrics import psnr
from splam_studio.models.generation import decode_latents, generate
from splam_studio.core.slode import guidance_embedding
from splam_studio.models import export as X
from splam_studio.models.loading import load_student, load_teacher, weights_dir
from tests.tiny import make_tiny_pipeline, tiny_unet

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["one large red circle at the left on a black background", "two small yellow squares at the top on a gray background"]
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.2", "conv1", "time_emb_proj"]


def sample(pipe, unet=None, steps: int = 4, seed: int = 11, prompts=PROMPTS):
    """(latents, images in [-1, 1]) of a 4-step LCM sampling, as the studio samples a student."""
    out = generate(pipe, prompt=prompts, sampler="lcm", steps=steps, seed=seed, unet=unet, decode=False)
    images = decode_latents(pipe, out.latents)
    return out.latents, torch.stack([torch.tensor(list(im.getdata()), dtype=torch.float32) for im in images]) / 127.5 - 1


def assert_same_sample(got, ref, what: str) -> None:
    lat_diff = (got[0] - ref[0]).abs().max().item()
    db = psnr(got[1], ref[1]).min().item() if not torch.equal(got[1], ref[1]) else float("inf")
    assert lat_diff < 1e-3 or db >= 40, f"{what}: latent max diff {lat_diff:.3g}, PSNR {db:.1f} dB"


def assert_other_sample(got, ref, what: str) -> None:
    """The control: the same form without the fold must sample another image (else the test could not fail)."""
    lat_diff = (got[0] - ref[0]).abs().max().item()
    assert lat_diff > 1e-2 and psnr(got[1], ref[1]).max().item() < 40, f"{what}: the fold made no difference ({lat_diff:.3g})"


def from_single_file(path: Path, config: Path) -> StableDiffusionPipeline:
    """diffusers' own single-file loader; offline, the component configs come from the teacher's folder."""
    pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(config), local_files_only=True,
                                                    safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def from_folder(path: Path) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(str(path), local_files_only=True, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---- the fold itself -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("omega", [0.0, 6.5])
def test_fold_is_exact_and_needed(omega):
    student = tiny_unet(time_cond_proj_dim=16, seed=3)
    with torch.no_grad():
        student.time_embedding.cond_proj.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    folded = X.fold_cond_proj(student, omega)
    assert folded.config.time_cond_proj_dim is None and X.COND_PROJ_KEY not in folded.state_dict()
    g = torch.Generator().manual_seed(0)
    z, ehs, t = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 5, 32, generator=g), torch.tensor([999, 499, 19])
    cond = guidance_embedding(torch.full((3,), omega), 16)
    with torch.no_grad():
        want = student(z, t, encoder_hidden_states=ehs, timestep_cond=cond).sample
        got = folded(z, t, encoder_hidden_states=ehs).sample
        dropped = student(z, t, encoder_hidden_states=ehs).sample
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (dropped - want).abs().max() > 1e-2  # the term matters
    assert student.config.time_cond_proj_dim == 16  # the student itself is untouched
    with pytest.raises(ValueError, match="nothing to fold"):
        X.fold_cond_proj(folded)


def test_stock_writers_refuse_an_unfolded_student(tmp_path):
    pipe = make_tiny_pipeline(tmp_path / "tok")
    student = tiny_unet(time_cond_proj_dim=16)
    with pytest.raises(ValueError, match="fold_cond_proj"):
        X.save_single_file(pipe, tmp_path / "s.safetensors", unet=student)
    with pytest.raises(ValueError, match="fold_cond_proj"):
        X.save_stock_pipeline(pipe, student, tmp_path / "stock")
    assert not (tmp_path / "s.safetensors").exists() and not (tmp_path / "stock").exists()


# ---- a trained Shapes student, full and LoRA -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shapes():
    root = weights_dir()
    if not (root / "shapes-splam" / "unet").is_dir():
        pytest.skip(f"embedded Shapes weights not found under {root}")
    return load_teacher("shapes"), root / "shapes-teacher"


def test_full_shapes_student_single_file_and_stock_folder(shapes, tmp_path):
    pipe, teacher_dir = shapes
    student = load_student("shapes-splam", pipe)
    cfg = {**json.loads((weights_dir() / "shapes-splam" / "training_config.json").read_text()), "run_name": "splam-x"}
    out = X.export_run(tmp_path / "splam-x", student, pipe, cfg, merged=True)
    assert set(out) == {"run", "single_file", "stock_diffusers"} and out["single_file"].name == "splam-x.safetensors"
    studio = sample(pipe, load_student(out["run"], pipe))  # what the studio samples from the run folder
    assert_same_sample(studio, sample(pipe, student), "run folder")
    single = from_single_file(out["single_file"], teacher_dir)
    assert single.unet.config.time_cond_proj_dim is None
    assert_same_sample(sample(single), studio, "single file (from_single_file)")
    stock = from_folder(out["stock_diffusers"])
    assert stock.unet.config.time_cond_proj_dim is None and "time_cond_proj_dim" in json.loads(
        (out["stock_diffusers"] / "unet" / "config.json").read_text())
    assert_same_sample(sample(stock), studio, "stock diffusers folder")
    # control: the same single file with the fold broken (linear_1 bias back to the student's own) samples another image
    with torch.no_grad():
        single.unet.time_embedding.linear_1.bias.copy_(student.time_embedding.linear_1.bias)
    assert_other_sample(sample(single), studio, "single file without the fold")


def shapes_lora_student(pipe, seed: int = 4):
    """The Shapes teacher + shapes-splam's trained gamma projection + a random LoRA (what a LoRA run exports)."""
    trained = load_student("shapes-splam", pipe)
    config = {k: v for k, v in trained.config.items() if not k.startswith("_")}
    student = type(trained).from_config(config)
    state = {**pipe.unet.state_dict(), X.COND_PROJ_KEY: trained.time_embedding.cond_proj.weight.detach().clone()}
    student.load_state_dict(state, strict=True)
    student.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights="gaussian"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return student.eval()


def test_lora_shapes_student_diffusers_lora_and_merged_file(shapes, tmp_path):
    pipe, teacher_dir = shapes
    student = shapes_lora_student(pipe)
    out = X.export_run(tmp_path / "lora-x", student, pipe, {"lora_rank": 4, "run_name": "lora-x", "w": 6.5},
                       merged=True)
    assert set(out) == {"run", "kohya_lora", "diffusers_lora", "single_file", "stock_diffusers"}
    studio = sample(pipe, load_student(out["run"], pipe))
    # diffusers: load_lora_weights on the teacher, unfused
    stock = load_teacher(str(teacher_dir))
    stock.load_lora_weights(str(out["diffusers_lora"]))
    assert_same_sample(sample(stock), studio, "diffusers LoRA (load_lora_weights)")
    # merged single file
    assert_same_sample(sample(from_single_file(out["single_file"], teacher_dir)), studio, "merged single file")
    # control: the run's own diffusers-format LoRA has no gamma term: another image
    bare = load_teacher(str(teacher_dir))
    bare.load_lora_weights(str(out["run"] / "lora"), weight_name=X.LORA_WEIGHTS)
    assert_other_sample(sample(bare), studio, "LoRA without the fold")


def kohya_apply(unet, path: Path, strength: float = 1.0):
    """A1111 / ComfyUI's arithmetic on a copy of a stock UNet: W += s (alpha / r) up @ down, W += s diff, b += s diff_b."""
    import copy

    unet = copy.deepcopy(unet)
    sd = load_file(str(path))
    modules = {name.replace(".", "_"): m for name, m in unet.named_modules() if name}
    with torch.no_grad():
        for key in sd:
            stem, _, kind = key.partition(".")
            mod = modules[stem.removeprefix("lora_unet_")]
            if kind == "lora_down.weight":
                down, up = sd[key], sd[f"{stem}.lora_up.weight"]
                scale = float(sd[f"{stem}.alpha"]) / down.shape[0]
                mod.weight += strength * scale * (up.flatten(1) @ down.flatten(1)).reshape(mod.weight.shape)
            elif kind == "diff":
                mod.weight += strength * sd[key]
            elif kind == "diff_b":
                mod.bias += strength * sd[key]
    return unet


def test_kohya_lora_carries_the_fold(shapes, tmp_path):
    pipe, teacher_dir = shapes
    student = shapes_lora_student(pipe)
    path = X.export_kohya_lora(student, tmp_path / "k.safetensors", config={"run_name": "k", "resolution": 64,
                                                                            "method": "splam", "lr": 1e-4})
    sd = load_file(str(path))
    torch.testing.assert_close(sd[f"{X.KOHYA_FOLD}.diff_b"], X.folded_bias_delta(student), rtol=0, atol=0)
    assert not sd[f"{X.KOHYA_FOLD}.diff"].any()  # a zero weight difference: A1111 and Forge read diff_b only beside it
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora" and meta["modelspec.resolution"] == "64x64"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8.0" and meta["splam_gamma_fold"] == "diff_b"
    studio = sample(pipe, load_student(X.save_student(tmp_path / "run", student, lora=True, config={}), pipe))
    applied = kohya_apply(pipe.unet, path)
    assert_same_sample(sample(pipe, applied), studio, "kohya LoRA applied as A1111 / ComfyUI apply it")
    # from the run folder: the same file, W from the teacher (which it then needs)
    with pytest.raises(ValueError, match="pass teacher="):
        X.export_kohya_lora(tmp_path / "run", tmp_path / "k2.safetensors")
    sd2 = load_file(str(X.export_kohya_lora(tmp_path / "run", tmp_path / "k2.safetensors", teacher=pipe.unet)))
    assert set(sd2) == set(sd) and all(torch.equal(sd[k], sd2[k]) for k in sd)
    # diffusers' own kohya converter refuses the diff keys of an SD1.x LoRA: diffusers users take lora_diffusers
    with pytest.raises(ValueError, match="not been correctly renamed"):
        load_teacher(str(teacher_dir)).load_lora_weights(str(path))


# ---- train_cli writes the forms and names them -------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("world")
    pipe = make_tiny_pipeline(root / "tok")
    pipe.save_pretrained(root / "teacher", safe_serialization=True)
    (root / "data").mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(4):
        Image.fromarray((torch.rand(16, 16, 3, generator=g) * 255).to(torch.uint8).numpy()).save(root / "data" / f"{i}.png")
        (root / "data" / f"{i}.txt").write_text(["one red circle", "two small blue squares"][i % 2])
    return root


def train(world, out, *extra):
    args = ["--teacher", str(world / "teacher"), "--data", str(world / "data"), "--output-dir", str(out), "--batch-size",
            "2", "--max-steps", "2", "--checkpoint-every", "2", "--device", "cpu", "--seed", "3", "--lr", "1e-3",
            "--cond-proj-lr-scale", "30", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(ROOT / "train_cli.py"), *args], capture_output=True, text=True, cwd=ROOT,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.parametrize("lora", [0, 4])
def test_train_cli_writes_and_names_the_forms(world, tmp_path, lora):
    name = f"run-{lora}"
    r = train(world, tmp_path, "--lora-rank", str(lora), "--run-name", name, *(["--export-merged"] if lora else []))
    run = tmp_path / name
    done = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines() if '"done"' in line][-1]
    want = {"run", "single_file", "kohya_lora", "diffusers_lora", "stock_diffusers"} if lora else {"run", "single_file"}
    assert set(done["exports"]) == want and done["exports"]["single_file"] == f"{name}.safetensors"
    last = [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("done:")][-1]
    assert all(f"{k}: {v}" in last for k, v in done["exports"].items()), last
    for rel in done["exports"].values():
        assert (run / rel).exists(), rel
    teacher = load_teacher(str(world / "teacher"))
    studio = sample(teacher, load_student(run, teacher), prompts=["one red circle"])
    assert load_student(run, teacher).time_embedding.cond_proj.weight.abs().max() > 0  # a gamma term to fold
    single = from_single_file(run / done["exports"]["single_file"], world / "teacher")
    assert_same_sample(sample(single, prompts=["one red circle"]), studio, "train_cli single file")
    if lora:
        stock = load_teacher(str(world / "teacher"))
        stock.load_lora_weights(str(run / done["exports"]["diffusers_lora"]))
        assert_same_sample(sample(stock, prompts=["one red circle"]), studio, "train_cli diffusers LoRA")
        applied = kohya_apply(teacher.unet, run / done["exports"]["kohya_lora"])
        assert_same_sample(sample(teacher, applied, prompts=["one red circle"]), studio, "train_cli kohya LoRA")
