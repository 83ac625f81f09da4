"""A tiny, seeded, SD1.5-shaped pipeline for CPU tests (no downloads).

UNet block_out_channels (32, 64), cross_attention_dim 32, 8x8 latents; VAE (32, 32), 4 latent channels, 16x16
images; CLIP text encoder of width 32 with a word-level tokenizer: every word of WORDS is one token.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from splam_studio.shapes.grammar import VOCAB
from splam_studio.core.schedule import SD15_SCHEDULER_CONFIG

EXTRA_WORDS = ("photo", "of", "cat", "dog", "grey", "colour", "and")
WORDS = tuple(sorted(set(VOCAB) | set(EXTRA_WORDS)))
MAX_LENGTH = 16  # a Shapes caption is 11 words + 2 specials
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,'!?-"


def _bpe(parts: list[str], merges: list[tuple[str, str]]) -> list[str]:
    """Byte-pair encoding of one word: repeatedly merge the adjacent pair of lowest rank."""
    rank = {m: i for i, m in enumerate(merges)}
    while len(parts) > 1:
        pairs = [(rank.get(p, len(rank)), i) for i, p in enumerate(zip(parts, parts[1:]))]
        r, i = min(pairs)
        if r == len(rank):
            break
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]
    return parts


def write_word_tokenizer(directory: Path, words: tuple[str, ...] = WORDS) -> CLIPTokenizer:
    """A CLIPTokenizer whose BPE merges build each word of `words` into one token; other words fall back to chars."""
    directory.mkdir(parents=True, exist_ok=True)
    tokens = [BOS, EOS] + list(CHARS) + [c + "</w>" for c in CHARS]
    merges: list[tuple[str, str]] = []
    for w in words:  # BPE-train style: append the merge the word still needs, lowest priority, until one token
        while len(parts := _bpe([*w[:-1], w[-1] + "</w>"], merges)) > 1:
            merges.append((parts[0], parts[1]))
            tokens.append(parts[0] + parts[1])
        tokens.append(parts[0])
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    tok = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=MAX_LENGTH,
                        pad_token=EOS)
    tok.save_pretrained(str(directory))
    return tok


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


def tiny_text_encoder(vocab_size: int, seed: int = 2) -> CLIPTextModel:
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                         num_hidden_layers=2, max_position_embeddings=MAX_LENGTH, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1, projection_dim=32)
    return CLIPTextModel(cfg).eval()


def sd15_scheduler() -> DDIMScheduler:
    return DDIMScheduler(**SD15_SCHEDULER_CONFIG)


def make_tiny_pipeline(tmp_path: Path | str | None = None, time_cond_proj_dim: int | None = None) -> StableDiffusionPipeline:
    """The tiny pipeline; the tokenizer files go to tmp_path/tokenizer (a fresh temp dir when None)."""
    root = Path(tmp_path) if tmp_path is not None else Path(tempfile.mkdtemp(prefix="tiny-sd-"))
    tokenizer = write_word_tokenizer(root / "tokenizer")
    pipe = StableDiffusionPipeline(
        unet=tiny_unet(time_cond_proj_dim), vae=tiny_vae(), text_encoder=tiny_text_encoder(len(tokenizer)),
        tokenizer=tokenizer, scheduler=sd15_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
