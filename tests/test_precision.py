"""Mixed precision on the CPU: a whole train_cli.py run under --precision bf16 (steps, mid-run and final validation,
export, kohya LoRA, resume), sampling with models of different dtypes, build_student on a UNet constructed in code,
and the device/precision resolver with CUDA and MPS faked."""
import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

from splam_studio.training import device as D
from tests import test_train
from tests.test_train import _state, cli

world = test_train.world  # the tiny teacher and image folder (a module fixture)


# ---------------------------------------------------------------- train_cli.py under bf16

@pytest.mark.parametrize("lora", [4, 0])
def test_bf16_run_end_to_end(world, tmp_path, lora):
    """bf16 teacher/text encoder/VAE beside an fp32 student and EMA target; the crash was in validation."""
    from splam_studio.models.loading import load_student, load_teacher
    from splam_studio.models.generation import generate

    name = f"bf16-{lora}"
    common = ("--precision", "bf16", "--lora-rank", str(lora), "--run-name", name, "--validate-every", "1",
              "--validation-prompts", "one red circle", "--validation-prompts", "two small blue squares")
    r = cli(world, tmp_path, "--max-steps", "2", *common)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / name
    assert sorted(p.name for p in (run / "validation").glob("*.png")) == ["step-0000001.png", "step-0000002.png"]
    cfg = json.loads((run / "training_config.json").read_text())
    assert cfg["mixed_precision"] == "bf16"
    assert cfg["dtypes"] == {"student": "float32", "target": "float32", "teacher": "bfloat16",
                             "text_encoder": "bfloat16", "vae": "bfloat16"}
    # checkpoints and export hold fp32 trainable weights
    ckpt = load_file(sorted((run / "checkpoints").glob("step-*"))[-1] / "student.safetensors")
    assert {v.dtype for v in ckpt.values()} == {torch.float32}
    assert (run / ("lora" if lora else "unet")).is_dir()
    if lora:
        kohya = load_file(run / "lora_kohya.safetensors")
        assert kohya and all(torch.isfinite(v).all() for v in kohya.values())
    # resume under bf16 continues the step count and validates at the end again
    r = cli(world, tmp_path, "--max-steps", "3", "--resume", "latest", *common)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "continuing at step 2" in r.stdout + r.stderr
    assert _state(run) == 3 and (run / "validation" / "step-0000003.png").is_file()
    # the exported student samples on an fp32 teacher and on a bf16 one
    for dtype in (torch.float32, torch.bfloat16):
        pipe = load_teacher(str(world / "teacher"), torch_dtype=dtype)
        unet = load_student(str(run), pipe)
        assert unet.dtype == dtype
        out = generate(pipe, prompt=["one red circle"], sampler="lcm", steps=2, seed=0, unet=unet)
        assert out.latents.dtype == torch.float32 and torch.isfinite(out.latents).all()


# ---------------------------------------------------------------- sampling with mixed dtypes

@pytest.fixture(scope="module")
def tiny_pipe(tmp_path_factory):
    from tests.tiny import make_tiny_pipeline

    return make_tiny_pipeline(tmp_path_factory.mktemp("tok"))


def _student(pipe):
    from splam_studio.core.student import build_student

    return build_student(pipe.unet, "zero").eval()


def test_fp32_student_beside_low_precision_teacher(tiny_pipe):
    """An fp32 student (or EMA target) runs beside a bf16 text encoder and VAE, and matches the all-fp32 result
    to bf16 rounding of the text embeddings."""
    import copy

    from splam_studio.models.generation import generate

    student = _student(tiny_pipe)
    ref = generate(tiny_pipe, prompt=["one red circle"], sampler="lcm", steps=2, seed=1, unet=student)
    low = copy.deepcopy(tiny_pipe)
    low.text_encoder.to(torch.bfloat16)
    low.vae.to(torch.bfloat16)
    low.unet.to(torch.bfloat16)
    out = generate(low, prompt=["one red circle"], sampler="lcm", steps=2, seed=1, unet=student)
    assert len(out.images) == 1 and out.latents.dtype == torch.float32
    err = (out.latents - ref.latents).abs().max().item()
    assert err < 0.05 * ref.latents.abs().max().item(), err
    # and the teacher itself (bf16) with CFG beside the fp32 text encoder of the reference pipeline
    mixed = copy.deepcopy(tiny_pipe)
    mixed.unet.to(torch.bfloat16)
    t = generate(mixed, prompt=["one red circle"], sampler="ddim", steps=2, seed=1, guidance_scale=3.0)
    assert torch.isfinite(t.latents).all()


def test_generate_matches_a_stock_pipeline(tiny_pipe):
    """Same numbers as StableDiffusionPipeline + the sampler's scheduler on the same components and noise."""
    from diffusers import StableDiffusionPipeline

    from splam_studio.models.generation import generate, initial_noise, make_scheduler

    ours = generate(tiny_pipe, prompt=["one red circle"], sampler="ddim", steps=3, seed=4, guidance_scale=3.0)
    stock = StableDiffusionPipeline(**{**tiny_pipe.components, "scheduler": make_scheduler("ddim", tiny_pipe.scheduler.config)})
    stock.set_progress_bar_config(disable=True)
    z_T = initial_noise(4, 1, tiny_pipe.unet, 16, 16, 2)
    ref = stock(prompt=["one red circle"], num_inference_steps=3, guidance_scale=3.0, latents=z_T, output_type="latent").images
    assert torch.allclose(ours.latents, ref, atol=1e-5)


def test_fp16_decode_that_overflows_is_redone_in_fp32(tiny_pipe, monkeypatch):
    import copy

    from splam_studio.models.generation import decode_latents

    pipe = copy.deepcopy(tiny_pipe)
    pipe.vae.to(torch.float16)
    real = type(pipe.vae).decode
    seen = []

    def decode(self, z, *a, **k):  # fp16 overflows as the SD1.5 VAE can at 512 px
        seen.append(z.dtype)
        out = real(self, z, *a, **k)
        if z.dtype == torch.float16:
            out.sample[:] = float("inf")
        return out

    monkeypatch.setattr(type(pipe.vae), "decode", decode)
    images = decode_latents(pipe, torch.randn(1, 4, 8, 8))
    assert seen == [torch.float16, torch.float32] and len(images) == 1
    assert pipe.vae.dtype == torch.float16  # back in its own dtype afterwards


# ---------------------------------------------------------------- build_student

def test_build_student_on_a_unet_constructed_in_code():
    """A UNet built in code keeps `_use_default_values` in its config (a loaded one does not); from_config honours
    it, so without care time_cond_proj_dim fell back to None and cond_proj was missing."""
    from splam_studio.core.student import build_student

    torch.manual_seed(0)
    teacher = UNet2DConditionModel(  # time_cond_proj_dim not given: it is one of the default values
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
    assert "time_cond_proj_dim" in teacher.config["_use_default_values"]  # the case that used to crash
    student = build_student(teacher, "zero")
    assert student.config.time_cond_proj_dim == 256 and student.time_embedding.cond_proj is not None
    assert student.dtype == torch.float32
    z, t, c = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 4, 32)
    a = teacher(z, t, encoder_hidden_states=c).sample
    b = student(z, t, encoder_hidden_states=c, timestep_cond=torch.randn(1, 256)).sample
    assert torch.allclose(a, b, atol=1e-5)  # zero projection: the student starts as the teacher


# ---------------------------------------------------------------- the device/precision resolver, hardware faked

def _fake(monkeypatch, cuda=False, cuda_bf16=False, mps=False, mps_bf16=False):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: cuda_bf16)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: mps_bf16)


@pytest.mark.parametrize("hw,device,precision,expect", [
    # (hardware), requested device and precision -> (device, mixed precision, teacher/text dtype, VAE dtype, sampling)
    (dict(cuda=True, cuda_bf16=True), "auto", "auto", ("cuda", "bf16", torch.bfloat16, torch.bfloat16, torch.float16)),
    (dict(cuda=True, cuda_bf16=False), "auto", "auto", ("cuda", "fp16", torch.float16, torch.float32, torch.float16)),
    (dict(cuda=True, cuda_bf16=True), "cuda", "fp16", ("cuda", "fp16", torch.float16, torch.float32, torch.float16)),
    (dict(cuda=True, cuda_bf16=True), "cuda", "no", ("cuda", "no", torch.float32, torch.float32, torch.float16)),
    (dict(mps=True, mps_bf16=True), "auto", "auto", ("mps", "bf16", torch.bfloat16, torch.bfloat16, torch.float16)),
    (dict(mps=True, mps_bf16=False), "auto", "auto", ("mps", "fp16", torch.float16, torch.float32, torch.float16)),
    (dict(cuda=True, cuda_bf16=True, mps=True), "mps", "fp16", ("mps", "fp16", torch.float16, torch.float32, torch.float16)),
    (dict(), "auto", "auto", ("cpu", "no", torch.float32, torch.float32, torch.float32)),
    (dict(cuda=True, cuda_bf16=True), "cpu", "bf16", ("cpu", "bf16", torch.bfloat16, torch.bfloat16, torch.float32)),
])
def test_resolver(monkeypatch, hw, device, precision, expect):
    _fake(monkeypatch, **hw)
    rt = D.resolve_runtime(device, precision)
    assert (rt.device.type, rt.mixed_precision, rt.weight_dtype, rt.vae_dtype, rt.sample_dtype) == expect
    assert rt.grad_scaler == (rt.mixed_precision == "fp16")


@pytest.mark.parametrize("hw,device,precision,words", [
    (dict(), "cpu", "fp16", "fp16 is not supported on the CPU"),
    (dict(mps=True, mps_bf16=False), "mps", "bf16", "bf16 is not supported on this mps device"),
    (dict(cuda=True, cuda_bf16=False), "cuda", "bf16", "bf16 is not supported on this cuda device"),
    (dict(), "cuda", "auto", "device 'cuda' is not available here"),
    (dict(cuda=True), "tpu", "auto", "unknown device 'tpu'"),
    (dict(), "cpu", "fp8", "unknown precision 'fp8'"),
])
def test_resolver_refuses_with_the_options(monkeypatch, hw, device, precision, words):
    _fake(monkeypatch, **hw)
    with pytest.raises(ValueError, match=words):
        D.resolve_runtime(device, precision)


def test_fp16_loss_scale_survives_a_resume(tmp_path):
    """fp16 training keeps accelerate's GradScaler state in state.json, so a resume does not restart at 65536."""
    from splam_studio.training.checkpoints import load_checkpoint, save_checkpoint

    net = torch.nn.Linear(3, 2)
    target = torch.nn.Linear(3, 2).requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=7)
    scaler.scale(torch.ones(()))
    scaler.update(512.0)  # as after an overflowing step
    ckpt = save_checkpoint(tmp_path, 5, net, target, opt, keep=1, grad_scaler=scaler.state_dict())
    fresh = torch.amp.GradScaler("cpu")
    assert fresh.get_scale() == 65536.0
    assert load_checkpoint(ckpt, net, target, torch.optim.AdamW(net.parameters()), fresh) == 5
    assert fresh.get_scale() == 512.0 and fresh.state_dict()["growth_interval"] == 7
    # a bf16 or fp32 run has no scaler: nothing stored, nothing restored
    ckpt = save_checkpoint(tmp_path, 6, net, target, opt, keep=1)
    assert json.loads((ckpt / "state.json").read_text())["grad_scaler"] is None
    assert load_checkpoint(ckpt, net, target, torch.optim.AdamW(net.parameters()), None) == 6
