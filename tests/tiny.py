"""A tiny, seeded, SD1.5-shaped pipeline for CPU tests (no downloads).

UNet block_out_channels (32, 64), cross_attention_dim 32, 8x8 latents; VAE (32, 32), 4 latent channels, 16x16
images; CLIP text encoder of width 32 over the Shapes tokenizer (`shapes.tokenizer.build_tokenizer`).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from splam_studio.core.schedule import SD15_SCHEDULER_CONFIG
from splam_studio.shapes.grammar import VOCAB
from splam_studio.shapes.tokenizer import MAX_LENGTH, build_tokenizer

WORDS = tuple(VOCAB)  # the Shapes grammar's words: each is one token of the tiny tokenizer


def tiny_unet(time_cond_proj_dim: int | None = None, seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32, time_cond_proj_dim=time_cond_proj_dim,
    )


def tiny_vae(seed: int = 1) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=32, sample_size=16,
    )


def tiny_text_encoder(tokenizer, seed: int = 2) -> CLIPTextModel:
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_attention_heads=4,
                         num_hidden_layers=2, max_position_embeddings=MAX_LENGTH, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, projection_dim=32)
    return CLIPTextModel(cfg).eval()


def sd15_scheduler() -> DDIMScheduler:
    return DDIMScheduler(**SD15_SCHEDULER_CONFIG)


def make_tiny_pipeline(tmp_path: Path | str | None = None, time_cond_proj_dim: int | None = None) -> StableDiffusionPipeline:
    """The tiny pipeline; the tokenizer files go to tmp_path/tokenizer (a fresh temp dir when None)."""
    root = Path(tmp_path) if tmp_path is not None else Path(tempfile.mkdtemp(prefix="tiny-sd-"))
    tokenizer = build_tokenizer(root / "tokenizer", WORDS)
    pipe = StableDiffusionPipeline(
        unet=tiny_unet(time_cond_proj_dim), vae=tiny_vae(), text_encoder=tiny_text_encoder(tokenizer),
        tokenizer=tokenizer, scheduler=sd15_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
