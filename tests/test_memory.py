"""The memory estimate (training/memory.py): pure arithmetic checked against a measurement, and the warning."""
from __future__ import annotations

import pytest
import torch

from splam_studio.training import memory as Mem
from tests.tiny import make_tiny_pipeline, tiny_unet

SD15 = dict(unet_params=859_602_884, other_params=206_800_000, resolution=512, weight_bytes=2, activation_bytes=2)


def saved_activation_elements(unet, latent: int) -> int:
    """Elements the forward keeps for backward (parameters excluded), batch 1: what the estimate's activations model."""
    params = {p.untyped_storage().data_ptr() for p in unet.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    cfg = unet.config
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda _: None):
        unet.train()(torch.randn(1, 4, latent, latent), torch.tensor([500]),
                     encoder_hidden_states=torch.randn(1, 77, cfg.cross_attention_dim),
                     timestep_cond=torch.randn(1, cfg.time_cond_proj_dim))
    return sum(seen.values()) // 4


def test_estimate_matches_a_measured_unet_it_was_not_fitted_on():
    unet = tiny_unet(time_cond_proj_dim=256)  # 8x8 latents, ~1 M parameters: neither of the fitted UNets
    n = sum(p.numel() for p in unet.parameters())
    est = Mem.estimate_need(unet_params=n, other_params=0, trainable_params=n, resolution=64, batch=1)
    measured = saved_activation_elements(unet, 8) * 4
    assert 0.5 < est.activations / measured < 2.0, (est.activations, measured)


def test_terms_scale_as_a_step_holds_them():
    lora = dict(trainable_params=67_600_000, lora_params=67_252_224)
    base = Mem.estimate_need(**SD15, **lora, batch=8)
    assert Mem.estimate_need(**SD15, **lora, batch=16).activations == pytest.approx(2 * base.activations, rel=1e-6)
    assert Mem.estimate_need(**{**SD15, "resolution": 256}, **lora, batch=8).activations == pytest.approx(
        base.activations / 4, rel=1e-6)
    ckpt = Mem.estimate_need(**SD15, **lora, batch=8, gradient_checkpointing=True)
    assert ckpt.activations < 0.5 * base.activations and ckpt.student == base.student
    full = Mem.estimate_need(**SD15, trainable_params=SD15["unet_params"], batch=8)
    assert full.optimiser == SD15["unet_params"] * 12 and full.optimiser > 10 * base.optimiser
    assert Mem.estimate_need(**SD15, trainable_params=SD15["unet_params"], batch=8, adam_state_bytes=2).optimiser \
        == SD15["unet_params"] * 6
    assert base.student == 2 * (SD15["unet_params"] + lora["lora_params"]) * 4  # student and theta^-, fp32
    assert base.total == int(Mem.MARGIN * (base.frozen + base.student + base.optimiser + base.activations))
    dmd = Mem.estimate_need(**SD15, **lora, batch=8, critic_params=SD15["unet_params"])  # --dmd: a fake-score UNet
    assert dmd.critic == SD15["unet_params"] * 16 and "critic" in dmd.describe()
    assert dmd.total > base.total + SD15["unet_params"] * 16 and "critic" not in base.describe()
    with pytest.raises(ValueError, match="positive"):
        Mem.estimate_need(**SD15, trainable_params=1, batch=0)


def test_sd15_preset_fits_a_16_gb_gpu_and_not_without_checkpointing_on_12():
    """The numbers --help and the README quote for the sd15 preset (LoRA 64, batch 8, 512 px, bf16)."""
    lora = dict(trainable_params=67_600_000, lora_params=67_252_224)
    preset = Mem.estimate_need(**SD15, **lora, batch=8, gradient_checkpointing=True)
    assert 12 * Mem.GIB < preset.total < 14 * Mem.GIB
    assert Mem.estimate_need(**SD15, **lora, batch=8).total > preset.total + Mem.GIB


def test_warning_before_the_first_step_names_the_remedies(tmp_path):
    pipe = make_tiny_pipeline(tmp_path)
    student = tiny_unet(time_cond_proj_dim=32)
    lines: list[str] = []
    kw = dict(resolution=16, batch=2, device=torch.device("cpu"), mixed_precision="no", gradient_checkpointing=False,
              log=lines.append)
    need = Mem.warn_if_short(student, pipe, available=1 << 50, **kw)
    assert lines == [] and need.total > 0
    Mem.warn_if_short(student, pipe, available=need.total - 1, **kw)
    assert len(lines) == 1 and "more than the" in lines[0] and "--gradient-checkpointing" in lines[0]
    assert "--lora-rank" in lines[0]
    assert Mem.device_memory(torch.device("cpu")) > 0
