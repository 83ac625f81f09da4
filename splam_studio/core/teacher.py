"""The teacher driver: one owner each for text encoding, the guidance conventions and the VAE's spatial scale.

Guidance: the paper (and LCM) write the guided teacher as eps_u + (w + 1)(eps_c - eps_u) = eps_c + w (eps_c - eps_u);
a diffusers pipeline takes the CFG scale s = w + 1. `cfg_scale` and `lcm_w` convert between the two.
"""
from __future__ import annotations

import torch


def cfg_scale(w: float) -> float:
    """The CFG scale (a pipeline's guidance_scale) of the paper's guidance w: s = w + 1."""
    return w + 1.0


def lcm_w(cfg: float) -> float:
    """The paper's guidance w of a CFG scale (a pipeline's guidance_scale): w = s - 1."""
    return cfg - 1.0


def vae_scale_factor(vae) -> int:
    """Pixels per latent cell of a diffusers VAE: 2 ** (number of down blocks - 1) (8 for SD1.5)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids (B, model_max_length), padded and truncated exactly as StableDiffusionPipeline does."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def encode_text(pipe, captions: list[str], device: torch.device | str | None = None) -> torch.Tensor:
    """The text encoder's last hidden state for captions, (B, L, D); device defaults to the encoder's."""
    ids = tokenize(pipe.tokenizer, captions).to(device if device is not None else pipe.text_encoder.device)
    return pipe.text_encoder(ids)[0]
