"""The Shapes teacher's recipe as data: the model configs and the presets (step counts, batch sizes, rates).

The models are Stable Diffusion's classes (AutoencoderKL, CLIPTextModel, UNet2DConditionModel), narrow, on 64 px
images and 8x8 latents. `build.build` runs a preset; BENCHMARKS.md ("The Shapes teacher") has what each preset
measured.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .tokenizer import MAX_LENGTH


# ---- model configs ---------------------------------------------------------------------------------
def vae_config() -> dict:
    """SD's AutoencoderKL layout (4 blocks, 8x downsampling, 4 latent channels), narrow: 64 px -> 8x8."""
    return dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=64, layers_per_block=1,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=(16, 32, 32, 64), norm_num_groups=16, scaling_factor=1.0)


def text_encoder_config(tokenizer, layers: int):
    """CLIP text encoder config, narrow: `layers` layers of width 128 over the tokenizer's vocabulary.

    layers = 0 leaves token + position embedding and the final layer norm: each token's output depends on its
    own word only, so a held-out (shape, colour) pair gets exactly the vectors its two words had in training.
    """
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256,
                          num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=MAX_LENGTH,
                          projection_dim=128, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def unet_config() -> dict:
    """SD's UNet2DConditionModel, 3 levels on 8x8 latents (8 -> 4 -> 2), cross-attention at every level; 3.6M parameters.

    The 2x2 level with cross-attention is what lets the UNet place objects where the prompt says: a 3x3-conv UNet
    learns absolute position only from zero padding, and on a 2x2 map every cell touches two borders, so the
    cross-attention there can write "left" into the left column directly.
    """
    return dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                block_out_channels=(64, 64, 96),
                down_block_types=("CrossAttnDownBlock2D",) * 3,
                up_block_types=("CrossAttnUpBlock2D",) * 3,
                cross_attention_dim=128, attention_head_dim=8, norm_num_groups=32)


def build_models(tokenizer, seed: int, text_layers: int):
    """The VAE, text encoder and UNet at their seeded init, on the CPU: (vae, text_encoder, unet)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    vae = AutoencoderKL(**vae_config())
    text_encoder = CLIPTextModel(text_encoder_config(tokenizer, text_layers))
    unet = UNet2DConditionModel(**unet_config())
    return vae, text_encoder, unet


# ---- the Shapes-XL teacher: SDXL's architecture at Shapes width ---------------------------------------
XL_TEXT_WIDTHS = (64, 128)  # text_encoder (CLIP ViT-L's role, 768 in SDXL), text_encoder_2 (OpenCLIP bigG's, 1280)
XL_POOLED = 64  # text_encoder_2's projection_dim: the pooled embedding's width (1280 in SDXL)
XL_TIME_EMBED = 16  # addition_time_embed_dim, per time id (256 in SDXL)


def xl_text_encoder_configs(tokenizer, layers: int) -> tuple:
    """(CLIPTextConfig of text_encoder, of text_encoder_2): widths XL_TEXT_WIDTHS, `layers` layers each.

    StableDiffusionXLPipeline feeds the UNet the penultimate hidden states, so with layers = 1 each token's vector is
    its own word's embedding (+ position), as the SD teacher's 0-layer encoder gives; the pooled embedding is the one
    layer's output at the end token, projected, so it sees the whole caption.
    """
    from transformers import CLIPTextConfig

    def cfg(width: int, projection_dim: int):
        return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                              num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=MAX_LENGTH,
                              projection_dim=projection_dim, bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)

    return cfg(XL_TEXT_WIDTHS[0], XL_TEXT_WIDTHS[0]), cfg(XL_TEXT_WIDTHS[1], XL_POOLED)


def xl_unet_config() -> dict:
    """SDXL's UNet2DConditionModel layout on 8x8 latents (8 -> 4 -> 2): a plain first level (DownBlock2D), then two
    cross-attention levels of transformer depth 1 and 2 (SDXL: 2 and 10), linear projections, added text_time
    conditioning (6 time ids x XL_TIME_EMBED + the pooled embedding); cross-attention over both encoders' widths."""
    return dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                block_out_channels=(64, 96, 128),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 8), use_linear_projection=True,
                cross_attention_dim=sum(XL_TEXT_WIDTHS), addition_embed_type="text_time",
                addition_time_embed_dim=XL_TIME_EMBED, projection_class_embeddings_input_dim=6 * XL_TIME_EMBED + XL_POOLED,
                norm_num_groups=32)


def build_xl_models(tokenizer, seed: int, text_layers: int):
    """The VAE, both text encoders and the SDXL-layout UNet at their seeded init, on the CPU.

    The encoders' word embeddings are drawn at unit variance (CLIP's init is 0.02): the UNet's cross-attention reads
    them raw (no final layer norm on the penultimate layer), and vectors of norm 0.3 would leave its attention flat.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    vae = AutoencoderKL(**vae_config())
    c1, c2 = xl_text_encoder_configs(tokenizer, text_layers)
    text_encoder, text_encoder_2 = CLIPTextModel(c1), CLIPTextModelWithProjection(c2)
    with torch.no_grad():
        for enc in (text_encoder, text_encoder_2):
            enc.get_input_embeddings().weight.normal_(0.0, 1.0)
    unet = UNet2DConditionModel(**xl_unet_config())
    return vae, text_encoder, text_encoder_2, unet


# ---- presets ---------------------------------------------------------------------------------------
# Shapes-XL UNet steps: its training step costs 0.68-0.70x the SD UNet's in CPU time (both at batch 64 on one
# thread, alternating, 3 runs; no attention on the 8x8 level), so ~0.33 s/step against SD's measured 0.47: 6000 steps
# ~33 min, plus ~3 min of rendering, encoding, probes and the final check.
XL_UNET_STEPS = 6000


@dataclass
class WorldPreset:
    name: str
    seed: int = 0
    # Step counts are sized from measured CPU speed (2 cores): VAE 0.28 s/step, evaluator 0.15 s/step, UNet
    # 0.47 s/step with the 0-layer text encoder frozen (0.51 with 3 layers, 0.74 trained jointly): 48 min in all.
    n_train: int = 20000  # fixed (image, caption) training pairs, rendered and encoded once
    vae_steps: int = 1800  # at 1000 the evaluator could not read the reconstructions (2.5% prompt accuracy)
    vae_batch: int = 16
    vae_lr: float = 2e-3
    fg_weight: float = 10.0  # reconstruction weight of object pixels against background pixels
    kl_weight: float = 1e-6  # SD's autoencoder KL weight; scaling_factor fixes the latent scale after
    eval_n: int = 10000  # evaluator training images, drawn from all splits (it must know every pair)
    eval_steps: int = 600
    eval_batch: int = 64
    eval_lr: float = 2e-3
    unet_steps: int = 4500  # 0.47 s/step at batch 64 on 2 cores, text encoder frozen: 35 min with the probes
    unet_batch: int = 64
    unet_lr: float = 1e-3
    warmup: int = 200
    ema_decay: float = 0.999
    caption_dropout: float = 0.1  # to "" so classifier-free guidance works
    # The text encoder stays at its (random) init, as SD keeps CLIP frozen. Trained jointly with the UNet it
    # collapses the five position words (`world diagnose`: 0.009 apart against 0.28-0.70 for other attributes)
    # and objects land at chance positions.
    train_text_encoder: bool = False
    # Transformer layers of the text encoder. With 0 each word keeps its own vector and a held-out (shape, colour)
    # pair is only a new pairing of known vectors (held-out prompt accuracy 0.917); with 3 frozen random layers
    # the pair reaches the UNet as vectors it never saw (0.846). See README, "The Shapes world".
    text_layers: int = 0
    check_n: int = 96  # captions per split in the final prompt-accuracy check
    check_steps: int = 50
    guidance_scale: float = 7.5
    probe_every: int = 1000  # log a quick prompt-accuracy probe (32 captions, 20 steps) during UNet training
    deadline_s: float = 58 * 60  # safety: training stages stop early (and say so) past this wall time
    log_every: int = 100
    # The pipeline family (a class constant, so the fields and a build's recorded preset stay as they were):
    # "sd" a StableDiffusionPipeline -> <out>/shapes-teacher; XLPreset's "xl" a StableDiffusionXLPipeline.
    arch: ClassVar[str] = "sd"


@dataclass
class XLPreset(WorldPreset):
    """Shapes-XL: SDXL's architecture -> <out>/shapes-xl-teacher and recipe-xl.json, on the SD build's VAE and
    evaluator when <out> (or --reuse-from) holds them, and training renders that vary SDXL's size conditioning."""

    arch: ClassVar[str] = "xl"
    text_layers: int = 1  # layers of each encoder: the UNet reads the penultimate, here the word embeddings
    # SDXL size / crop conditioning of the training renders (grammar.draw_size): a share drawn at the native 64 px
    # uncropped (what the default time ids ask for at sampling), a share rendered at a lower resolution and upscaled
    # (original_size < 64), the rest rendered larger (up to xl_scale_max x) and randomly cropped to 64.
    xl_plain: float = 0.4
    xl_lowres: float = 0.2
    xl_lowres_min: int = 32
    xl_scale_max: float = 1.5

    def __post_init__(self):
        if self.text_layers < 1 or self.train_text_encoder:
            raise ValueError("the xl teacher needs text_layers >= 1 (it reads the penultimate layer) and frozen encoders")
        if not (0 <= self.xl_plain and 0 <= self.xl_lowres and self.xl_plain + self.xl_lowres <= 1):
            raise ValueError(f"xl_plain + xl_lowres must lie in [0, 1], got {self.xl_plain} + {self.xl_lowres}")
        if not (8 <= self.xl_lowres_min <= 64 and self.xl_scale_max >= 1):
            raise ValueError(f"need 8 <= xl_lowres_min <= 64 and xl_scale_max >= 1, got {self.xl_lowres_min}, "
                             f"{self.xl_scale_max}")


PRESETS = {
    "full": WorldPreset("full"),
    # text encoder (3 layers) trained jointly with the UNet: position at chance (BENCHMARKS.md)
    "full-joint-text": WorldPreset("full-joint-text", unet_steps=3500, train_text_encoder=True, text_layers=3),
    # 3 frozen text-encoder layers: held-out pairs at 0.846 (BENCHMARKS.md)
    "full-text3": WorldPreset("full-text3", text_layers=3),
    "tiny": WorldPreset("tiny", n_train=64, vae_steps=2, vae_batch=8, eval_n=64, eval_steps=2, eval_batch=8,
                        unet_steps=3, unet_batch=8, warmup=1, check_n=4, check_steps=2, log_every=1,
                        probe_every=2),
    # Shapes-XL: the SDXL architecture (two frozen text encoders, text_time conditioning) on the full build's VAE
    # and evaluator (`--reuse-from weights`, or <out> itself when it holds them); UNet steps sized by `world bench
    # --preset xl` (XL_UNET_STEPS) to ~35 min on 2 cores, under the 42-min deadline.
    "xl": XLPreset("xl", unet_steps=XL_UNET_STEPS, deadline_s=42 * 60),
    "xl-tiny": XLPreset("xl-tiny", n_train=64, vae_steps=2, vae_batch=8, eval_n=64,
                         eval_steps=2, eval_batch=8, unet_steps=3, unet_batch=8, warmup=1, check_n=4, check_steps=2,
                         log_every=1, probe_every=2),
}
