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


# ---- a tiny SDXL-shaped pipeline: two text encoders of different widths, text_time added conditioning ----------
XL_WIDTHS = (32, 48)  # hidden sizes of text_encoder (CLIP ViT-L's role) and text_encoder_2 (OpenCLIP bigG's role)
XL_POOLED = 24  # text_encoder_2's projection_dim (1280 in SDXL)
XL_TIME_EMBED = 8  # addition_time_embed_dim (256 in SDXL)


def tiny_xl_unet(time_cond_proj_dim: int | None = None, seed: int = 3) -> UNet2DConditionModel:
    """SDXL's layout at tiny width: a plain first down block, transformer depth (1, 2), linear projections,
    cross-attention over both encoders' widths, added text_time conditioning of 6 time ids and the pooled embedding."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), use_linear_projection=True,
        cross_attention_dim=sum(XL_WIDTHS), addition_embed_type="text_time", addition_time_embed_dim=XL_TIME_EMBED,
        projection_class_embeddings_input_dim=6 * XL_TIME_EMBED + XL_POOLED, norm_num_groups=32,
        time_cond_proj_dim=time_cond_proj_dim,
    )


def tiny_xl_text_encoders(tokenizer, seed: int = 4):
    """(CLIPTextModel of width 32, CLIPTextModelWithProjection of width 48 projecting to 24), 3 layers each."""
    from transformers import CLIPTextModelWithProjection

    def cfg(width: int, **kw) -> CLIPTextConfig:
        return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_attention_heads=4,
                              num_hidden_layers=3, max_position_embeddings=MAX_LENGTH, bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **kw)

    torch.manual_seed(seed)
    one = CLIPTextModel(cfg(XL_WIDTHS[0], projection_dim=XL_WIDTHS[0])).eval()
    two = CLIPTextModelWithProjection(cfg(XL_WIDTHS[1], projection_dim=XL_POOLED)).eval()
    return one, two


def sdxl_scheduler():
    """SDXL base's scheduler (Euler, same scaled_linear betas as SD1.5, leading spacing, steps_offset 1)."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                                  prediction_type="epsilon", timestep_spacing="leading", steps_offset=1)


def make_tiny_xl_pipeline(tmp_path: Path | str | None = None, time_cond_proj_dim: int | None = None,
                          force_zeros_for_empty_prompt: bool = True):
    """The tiny SDXL pipeline; the tiny VAE with SDXL's scaling factor; both tokenizers are the Shapes tokenizer."""
    from diffusers import StableDiffusionXLPipeline

    root = Path(tmp_path) if tmp_path is not None else Path(tempfile.mkdtemp(prefix="tiny-sdxl-"))
    tokenizer = build_tokenizer(root / "tokenizer", WORDS)
    one, two = tiny_xl_text_encoders(tokenizer)
    vae = tiny_vae()
    vae.register_to_config(scaling_factor=0.13025, force_upcast=True)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=one, text_encoder_2=two, tokenizer=tokenizer, tokenizer_2=tokenizer,
                                     unet=tiny_xl_unet(time_cond_proj_dim), scheduler=sdxl_scheduler(),
                                     force_zeros_for_empty_prompt=force_zeros_for_empty_prompt, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_text(pipe, captions: list[str]) -> torch.Tensor:
    """The pipeline's text embeddings (B, L, D) for captions, padded to the tokenizer's length, without grad."""
    ids = pipe.tokenizer(captions, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]
