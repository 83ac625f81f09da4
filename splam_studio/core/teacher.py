"""The teacher driver: one owner each for text encoding, the guidance conventions and the VAE's spatial scale.

Text conditioning c of both families (SD1.5 / 2.x: a tensor; SDXL: a `TextCondition` with pooled embeddings and size
/ crop time ids), read from the teacher, is built here and only here (`encode_condition`, `empty_condition`,
`uncond_like`, `pipeline_conditions`); the core passes it to UNet calls through `as_condition(c).unet_kwargs`.

Guidance: the paper (and LCM) write the guided teacher as eps_u + (w + 1)(eps_c - eps_u) = eps_c + w (eps_c - eps_u);
a diffusers pipeline takes the CFG scale s = w + 1. `cfg_scale` and `lcm_w` convert between the two.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

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


# ---- the text condition c of both families ----------------------------------------------------------------------
# SD1.5 / 2.x: c is the one text encoder's last hidden state, a tensor (B, L, D). SDXL (UNet addition_embed_type
# "text_time", two text encoders): c is a `TextCondition`, the penultimate hidden states of both encoders
# concatenated, text_encoder_2's projected pooled output and the size / crop time ids, as StableDiffusionXLPipeline
# builds them. Everything downstream takes either through `as_condition`: the family is read from the teacher here.
TIME_IDS = ("original_h", "original_w", "crop_top", "crop_left", "target_h", "target_w")  # SDXL add_time_ids order


@dataclass(frozen=True)
class TextCondition:
    """c as one object: cross-attention embeddings and, for SDXL, the added conditioning of the UNet."""
    embeds: torch.Tensor  # (B, L, D) encoder_hidden_states
    pooled: torch.Tensor | None = None  # (B, P) SDXL text_embeds: text_encoder_2's projected pooled output
    time_ids: torch.Tensor | None = None  # (B, 6) SDXL add_time_ids, in TIME_IDS order

    def __post_init__(self):
        if (self.pooled is None) != (self.time_ids is None):
            raise ValueError("SDXL conditioning needs both pooled embeddings and time ids (or neither)")
        if self.pooled is not None and not (len(self.pooled) == len(self.time_ids) == len(self.embeds)):
            raise ValueError(f"batch sizes differ: embeds {len(self.embeds)}, pooled {len(self.pooled)}, "
                             f"time ids {len(self.time_ids)}")

    def __len__(self) -> int:
        return len(self.embeds)

    @property
    def device(self) -> torch.device:
        return self.embeds.device

    def unet_kwargs(self, dtype: torch.dtype) -> dict:
        """The UNet call's text arguments in the UNet's dtype: encoder_hidden_states, and SDXL's added_cond_kwargs."""
        kw = {"encoder_hidden_states": self.embeds.to(dtype)}
        if self.pooled is not None:
            kw["added_cond_kwargs"] = {"text_embeds": self.pooled.to(dtype), "time_ids": self.time_ids.to(dtype)}
        return kw

    def to(self, *args, **kwargs) -> "TextCondition":
        """Every tensor moved / cast as `torch.Tensor.to`, so a TextCondition goes where a tensor c goes."""
        return self.map(lambda x: x.to(*args, **kwargs))

    def map(self, fn) -> "TextCondition":
        """fn applied to every tensor (device and dtype moves, indexing)."""
        return TextCondition(fn(self.embeds), *(None if x is None else fn(x) for x in (self.pooled, self.time_ids)))

    def cat(self, other: "TextCondition") -> "TextCondition":
        """[self; other] along the batch (the cond and uncond halves of one guided teacher call)."""
        parts = [(a, b) for a, b in ((self.pooled, other.pooled), (self.time_ids, other.time_ids))]
        if any((a is None) != (b is None) for a, b in parts):
            raise ValueError("cannot batch an SDXL condition with an SD one")
        return TextCondition(torch.cat([self.embeds, other.embeds]),
                             *(None if a is None else torch.cat([a, b]) for a, b in parts))


Condition = Union[torch.Tensor, TextCondition]  # what the core takes as c: a tensor (SD1.5) or a TextCondition


def as_condition(c: Condition) -> TextCondition:
    """A tensor of text embeddings (B, L, D) as a TextCondition without added conditioning; a TextCondition as is."""
    return c if isinstance(c, TextCondition) else TextCondition(c)


def added_conditioning(pipe) -> bool:
    """True when the teacher's UNet takes SDXL's added conditioning (addition_embed_type "text_time")."""
    kind = pipe.unet.config.get("addition_embed_type")
    if kind not in (None, "text_time"):
        raise ValueError(f"UNet addition_embed_type {kind!r} is not supported; SD1.5 / 2.x (none) and SDXL (text_time) are")
    if kind == "text_time" and getattr(pipe, "text_encoder_2", None) is None:
        raise ValueError("the UNet takes SDXL's text_time conditioning but the pipeline has no text_encoder_2 "
                         "(load it as a StableDiffusionXLPipeline)")
    return kind == "text_time"


def time_ids(original_size, crop_top_left, target_size) -> torch.Tensor:
    """SDXL add_time_ids (B, 6) = (original h, w, crop top, left, target h, w), each argument (2,) or (B, 2), float32."""
    parts = [torch.as_tensor(x, dtype=torch.float32).reshape(-1, 2) for x in (original_size, crop_top_left, target_size)]
    n = max(len(p) for p in parts)
    return torch.cat([p.expand(n, 2) for p in parts], dim=1)


def native_size(pipe) -> int:
    """The teacher's native image size in pixels: UNet sample_size x the VAE's spatial scale."""
    return pipe.unet.config.sample_size * vae_scale_factor(pipe.vae)


def _check_added_dims(pipe, pooled_dim: int) -> None:
    """As StableDiffusionXLPipeline._get_add_time_ids: 6 time embeddings + the pooled width must fill add_embedding."""
    unet = pipe.unet
    passed = unet.config.addition_time_embed_dim * len(TIME_IDS) + pooled_dim
    expected = unet.add_embedding.linear_1.in_features
    if passed != expected:
        raise ValueError(f"the UNet's add_embedding takes {expected} features, but 6 time ids x "
                         f"{unet.config.addition_time_embed_dim} + pooled width {pooled_dim} = {passed}")


def encode_condition(pipe, captions: list[str], device: torch.device | str | None = None,
                     size: torch.Tensor | None = None) -> Condition:
    """c for captions: SD1.5 `encode_text`'s tensor (B, L, D); SDXL a TextCondition with its time ids.

    size: SDXL time ids (B, 6) or (1, 6) (`time_ids`); default the native size uncropped, as the pipeline's default.
    """
    if not added_conditioning(pipe):
        return encode_text(pipe, captions, device)
    hidden = []
    for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        ids = tokenize(tokenizer, captions).to(device if device is not None else encoder.device)
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])  # (B, L, D_i): the penultimate layer, as StableDiffusionXLPipeline
    pooled = out.text_embeds  # (B, P): text_encoder_2's projection of its pooled output
    _check_added_dims(pipe, pooled.shape[-1])
    hw = native_size(pipe)
    size = time_ids((hw, hw), (0, 0), (hw, hw)) if size is None else torch.as_tensor(size, dtype=torch.float32)
    ids = size.reshape(-1, len(TIME_IDS)).to(pooled.device).expand(len(captions), -1)
    return TextCondition(torch.cat(hidden, dim=-1), pooled, ids)


def empty_condition(pipe, device: torch.device | str | None = None) -> Condition:
    """c_uncond of one sample, the empty prompt, as the pipeline's unconditional branch: SD1.5 the encoded ""
    (1, L, D); SDXL zeros (embeds and pooled) when `force_zeros_for_empty_prompt`, else the encoded "" (its time ids
    are each sample's own: `uncond_like`)."""
    c = encode_condition(pipe, [""], device)
    if isinstance(c, TextCondition) and pipe.config.get("force_zeros_for_empty_prompt", True):
        c = TextCondition(torch.zeros_like(c.embeds), torch.zeros_like(c.pooled), c.time_ids)
    return c


def uncond_like(uncond_1: Condition, cond: Condition) -> Condition:
    """The unconditional branch per sample of cond: uncond_1 (batch 1) repeated; SDXL with cond's own time ids."""
    n = len(cond)
    if not isinstance(uncond_1, TextCondition):
        return uncond_1.expand(n, -1, -1)
    return TextCondition(uncond_1.embeds.expand(n, -1, -1), uncond_1.pooled.expand(n, -1), as_condition(cond).time_ids)


# ---- the same conditioning, through a stock pipeline ------------------------------------------------------------
def pipeline_class(pipe):
    """The stock diffusers pipeline of the teacher's family: StableDiffusionXLPipeline or StableDiffusionPipeline."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if added_conditioning(pipe) else StableDiffusionPipeline


def text_encoders(pipe) -> dict:
    """The pipeline's text encoders by component name (text_encoder, and SDXL's text_encoder_2)."""
    names = ("text_encoder", "text_encoder_2") if added_conditioning(pipe) else ("text_encoder",)
    return {k: getattr(pipe, k) for k in names}


def pipeline_conditions(pipe, prompt: list[str], device, guided: bool,
                        negative_prompt: list[str] | None = None) -> tuple[Condition, Condition | None]:
    """(c, c_uncond) from the pipeline's own `encode_prompt` (c_uncond None unless guided); SDXL's with the
    pipeline's default time ids (native size, uncropped)."""
    out = pipe.encode_prompt(prompt=prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=guided,
                             negative_prompt=negative_prompt)
    if not added_conditioning(pipe):
        return out[0], out[1]
    embeds, neg, pooled, neg_pooled = out
    hw = native_size(pipe)
    ids = time_ids((hw, hw), (0, 0), (hw, hw)).to(pooled.device).expand(len(prompt), -1)
    return TextCondition(embeds, pooled, ids), (TextCondition(neg, neg_pooled, ids) if guided else None)


def pipeline_kwargs(cond: Condition, uncond: Condition | None) -> dict:
    """The stock pipeline call's text arguments for (c, c_uncond): prompt embeds, and SDXL's pooled embeds and sizes.

    A stock SDXL pipeline takes one original size, crop and target size for the whole batch: cond's first sample's.
    """
    c = as_condition(cond)
    kw = {"prompt_embeds": c.embeds}
    if uncond is not None:
        kw["negative_prompt_embeds"] = as_condition(uncond).embeds
    if c.pooled is None:
        return kw
    ids = [int(v) for v in c.time_ids[0].tolist()]
    if not (c.time_ids == c.time_ids[:1]).all():
        raise ValueError("a stock SDXL pipeline call takes one size / crop conditioning for the whole batch")
    kw.update(pooled_prompt_embeds=c.pooled, original_size=tuple(ids[0:2]), crops_coords_top_left=tuple(ids[2:4]),
              target_size=tuple(ids[4:6]))
    if uncond is not None:
        u = as_condition(uncond)
        kw["negative_pooled_prompt_embeds"] = u.pooled
        u_ids = [int(v) for v in u.time_ids[0].tolist()]
        if u_ids != ids:
            kw.update(negative_original_size=tuple(u_ids[0:2]), negative_crops_coords_top_left=tuple(u_ids[2:4]),
                      negative_target_size=tuple(u_ids[4:6]))
    return kw
