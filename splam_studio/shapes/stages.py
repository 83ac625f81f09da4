"""The Shapes teacher's training stages: the VAE, its latent scale, the evaluator CNN, the UNet (epsilon loss).

Each stage is one function with the model (or the preset) in and a record out; `build.build` runs them in order.
Every function takes the device it runs on; trainable weights are fp32 (`DTYPE`), as the models are tiny.
"""

from __future__ import annotations

import copy
import math
import time

import torch
import torch.nn.functional as F

from .grammar import ShapesDataset
from .recipe import WorldPreset
from ..core.schedule import SD15_SCHEDULER_CONFIG
from ..core.student import ema_update
from ..core.teacher import Condition, TextCondition, as_condition

DTYPE = torch.float32  # trainable weights in fp32; the models are tiny


def _lr_lambda(warmup: int, total: int):
    """Learning-rate multiplier: linear warm-up over `warmup` steps, then cosine to 0 at `total`."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return f


class Clock:
    """Wall time since the build started, against the preset's deadline."""

    def __init__(self, deadline_s: float):
        self.t0, self.deadline_s = time.time(), deadline_s

    def elapsed(self) -> float:
        return time.time() - self.t0

    def past_deadline(self, reserve_s: float = 0.0) -> bool:
        return self.elapsed() > self.deadline_s - reserve_s

    def steps(self, stage: str, n: int, reserve_s: float, log):
        """range(n), cut short (and logged) once less than reserve_s of the deadline is left."""
        for step in range(n):
            if self.past_deadline(reserve_s):
                log(f"[{stage}] deadline reached, stopping at step {step}")
                return
            yield step


def _optimizer_step(opt, sched, loss: torch.Tensor, clip_params=None) -> None:
    """Backward, gradient-norm clip to 1 (when clip_params are given), AdamW step, schedule step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip_params is not None:
        torch.nn.utils.clip_grad_norm_(clip_params, 1.0)
    opt.step()
    sched.step()


def to_pm1(u8: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 images (B, 3, H, W) -> float on `device`, in [-1, 1]."""
    return u8.to(device, DTYPE).div(127.5).sub(1.0)


# ---- stages ------------------------------------------------------------------------------------------
def _foreground_weight(x: torch.Tensor, fg_weight: float) -> torch.Tensor:
    """(B, 1, H, W): 1 on the background (the corner colour), fg_weight on and around the objects."""
    bg = x[:, :, :1, :1]
    mask = ((x - bg).abs().amax(1, keepdim=True) > 0.05).float()
    mask = F.max_pool2d(mask, 3, stride=1, padding=1)  # include the antialiased edges
    return 1.0 + (fg_weight - 1.0) * mask


def train_vae(vae, images_u8: torch.Tensor, p: WorldPreset, clock: Clock, reserve_s: float, log,
              device: torch.device) -> dict:
    """L1 + L2 reconstruction + kl_weight * KL, AdamW, cosine schedule."""
    g = torch.Generator().manual_seed(p.seed + 1)
    vae.train().to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=p.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(p.warmup, p.vae_steps))
    t0, step, ema_loss = time.time(), -1, None  # step + 1 = the steps done
    for step in clock.steps("vae", p.vae_steps, reserve_s, log):
        idx = torch.randint(0, len(images_u8), (p.vae_batch,), generator=g)
        x = to_pm1(images_u8[idx], device)
        post = vae.encode(x).latent_dist
        z = post.sample(generator=g)
        rec = vae.decode(z).sample
        w = _foreground_weight(x, p.fg_weight)  # objects are ~5% of the pixels: weight them up
        loss = (w * ((rec - x).abs() + (rec - x) ** 2)).mean() + p.kl_weight * post.kl().mean()
        _optimizer_step(opt, sched, loss, vae.parameters())
        ema_loss = loss.item() if ema_loss is None else 0.98 * ema_loss + 0.02 * loss.item()
        if step % p.log_every == 0 or step == p.vae_steps - 1:
            log(f"[vae] step {step}/{p.vae_steps} loss {loss.item():.4f} (ema {ema_loss:.4f}) "
                f"{(step + 1) / (time.time() - t0):.2f} it/s")
    vae.eval()
    return {"steps_done": step + 1, "final_loss_ema": ema_loss, "wall_s": time.time() - t0}


@torch.no_grad()
def encode_latents(vae, images_u8: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image, unscaled: (N, 4, 8, 8) each, on the CPU (the VAE runs where it is)."""
    means, stds = [], []
    for i in range(0, len(images_u8), batch):
        post = vae.encode(to_pm1(images_u8[i:i + batch], vae.device)).latent_dist
        means.append(post.mean.cpu())
        stds.append(post.std.cpu())
    return torch.cat(means), torch.cat(stds)


def fit_scaling_factor(mean: torch.Tensor, std: torch.Tensor, seed: int) -> float:
    """1 / std of sampled latents, as SD's 0.18215 was fitted: scaled latents get unit variance."""
    g = torch.Generator().manual_seed(seed)
    z = mean + std * torch.randn(mean.shape, generator=g)
    return float(1.0 / z.flatten().std())


@torch.no_grad()
def vae_report(vae, images_u8: torch.Tensor) -> dict:
    """PSNR (dB) of the VAE's reconstructions from the posterior mean."""
    from ..core.metrics import psnr

    x = to_pm1(images_u8, vae.device)
    rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    return {"psnr_db": float(psnr(rec, x).mean()), "n": len(x)}


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Depthwise 5x5 Gaussian blur of (B, C, H, W)."""
    r = torch.arange(-2, 3, dtype=x.dtype)
    k1 = torch.exp(-(r**2) / (2 * sigma**2))
    k = (k1[:, None] * k1[None, :]) / k1.sum() ** 2
    C = x.shape[1]
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), k.expand(C, 1, 5, 5).contiguous(), groups=C)


def train_evaluator(p: WorldPreset, clock: Clock, reserve_s: float, log, device: torch.device):
    """The evaluator CNN on real images of all splits, with light noise augmentation."""
    from .evaluator import Evaluator, evaluator_loss

    ds = ShapesDataset(p.eval_n, seed=p.seed + 100, split="all")
    t0 = time.time()
    images, labels = ds.render_all(), ds.label_tensor()
    log(f"[evaluator] rendered {len(ds)} images in {time.time() - t0:.1f}s")
    torch.manual_seed(p.seed + 2)
    g = torch.Generator().manual_seed(p.seed + 2)
    model = Evaluator().to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=p.eval_lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(min(p.warmup, p.eval_steps // 10 + 1), p.eval_steps))
    t0, step = time.time(), -1  # step + 1 = the steps done
    for step in clock.steps("evaluator", p.eval_steps, reserve_s, log):
        idx = torch.randint(0, len(images), (p.eval_batch,), generator=g)
        x = to_pm1(images[idx], device)
        x = x + 0.05 * torch.rand(len(x), 1, 1, 1, generator=g) * torch.randn(x.shape, generator=g)
        half = len(x) // 2  # blur half the batch: generated images are softer than renders (VAE decoder)
        x[:half] = _gaussian_blur(x[:half], 0.3 + 1.2 * torch.rand(1, generator=g).item())
        loss = evaluator_loss(model, x, labels[idx].to(device))
        _optimizer_step(opt, sched, loss)
        if step % p.log_every == 0 or step == p.eval_steps - 1:
            log(f"[evaluator] step {step}/{p.eval_steps} loss {loss.item():.4f} "
                f"{(step + 1) / (time.time() - t0):.2f} it/s")
    model.eval()
    return model, {"steps_done": step + 1, "final_loss": loss.item() if step >= 0 else None, "wall_s": time.time() - t0}


def pick_condition(cache: Condition, empty: Condition, idx: torch.Tensor, drop: torch.Tensor) -> Condition:
    """The batch's conditions from a per-sample cache: rows idx, with the empty prompt's where drop (caption dropout).

    SD: tensors (N, L, D) and (1, L, D). SDXL: TextConditions; a dropped sample takes the empty prompt's embeddings and
    pooled embedding but keeps its own time ids, as StableDiffusionXLPipeline's unconditional branch does.
    """
    idx, drop = idx.to(cache.device), drop.to(cache.device)
    if not isinstance(cache, TextCondition):
        return torch.where(drop[:, None, None], empty, cache[idx])
    return TextCondition(torch.where(drop[:, None, None], empty.embeds, cache.embeds[idx]),
                         torch.where(drop[:, None], empty.pooled, cache.pooled[idx]), cache.time_ids[idx])


def train_unet(unet, text_encoder, latents: torch.Tensor, ids: torch.Tensor, empty_ids: torch.Tensor,
               p: WorldPreset, clock: Clock, reserve_s: float, log, device: torch.device, probe=None,
               conditions: tuple[TextCondition, TextCondition] | None = None) -> tuple:
    """Epsilon loss on cached latents; the text encoder trained jointly or kept frozen; EMA of both returned.

    With a frozen text encoder its outputs are computed once for every caption (and for "") and looked up,
    which gives the same batches as encoding each one and spares the encoder's forward pass at every step.
    conditions: (every sample's condition, the empty prompt's), precomputed by the caller (the SDXL teacher's two
    frozen encoders, pooled embeddings and per-sample size / crop time ids); then text_encoder is None.
    probe(ema_unet, ema_text) -> dict, if given, runs every `probe_every` steps; its results are logged and kept.
    """
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler(**{k: v for k, v in SD15_SCHEDULER_CONFIG.items() if k != "set_alpha_to_one"})
    g = torch.Generator().manual_seed(p.seed + 3)
    unet.train().to(device)
    if (conditions is None) == (text_encoder is None):
        raise ValueError("train_unet takes a text encoder or precomputed conditions, not both")
    if text_encoder is not None:
        text_encoder.train(p.train_text_encoder).to(device).requires_grad_(p.train_text_encoder)
    ema_unet = copy.deepcopy(unet).eval()
    ema_text = copy.deepcopy(text_encoder).eval() if text_encoder is not None else None
    params = list(unet.parameters()) + (list(text_encoder.parameters()) if p.train_text_encoder else [])
    opt = torch.optim.AdamW(params, lr=p.unet_lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(p.warmup, p.unet_steps))
    enc_cache = None
    if conditions is not None:
        enc_cache, enc_empty = (c.to(device) for c in conditions)
    elif not p.train_text_encoder:
        with torch.no_grad():
            enc_cache = torch.cat([text_encoder(ids[i:i + 1024].to(device))[0] for i in range(0, len(ids), 1024)])
            enc_empty = text_encoder(empty_ids[None].to(device))[0]  # (1, L, 128)
    t0, step, ema_loss, probes = time.time(), -1, None, []  # step + 1 = the steps done
    for step in clock.steps("unet", p.unet_steps, reserve_s, log):
        # 1. a batch of cached latents and captions, 10% of captions dropped to ""
        idx = torch.randint(0, len(latents), (p.unet_batch,), generator=g)
        z0 = latents[idx].to(device, DTYPE)  # (B, 4, 8, 8), already scaled
        drop = torch.rand(p.unet_batch, generator=g) < p.caption_dropout
        # 2. forward diffusion at a uniform timestep
        eps = torch.randn(z0.shape, generator=g).to(device, DTYPE)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (p.unet_batch,), generator=g).to(device)
        z_t = noise_scheduler.add_noise(z0, eps, t)
        # 3. epsilon prediction and loss
        if enc_cache is None:
            enc = text_encoder(torch.where(drop[:, None], empty_ids[None], ids[idx]).to(device))[0]  # (B, L, 128)
        else:
            enc = pick_condition(enc_cache, enc_empty, idx, drop)  # SD (B, L, 128); SDXL + pooled and time ids
        loss = F.mse_loss(unet(z_t, t, **as_condition(enc).unet_kwargs(DTYPE)).sample, eps)
        _optimizer_step(opt, sched, loss, params)
        # 4. EMA, with the usual warm-up of the decay
        decay = min(p.ema_decay, (1 + step) / (10 + step))
        ema_update(ema_unet, unet, decay)
        if p.train_text_encoder:
            ema_update(ema_text, text_encoder, decay)
        ema_loss = loss.item() if ema_loss is None else 0.99 * ema_loss + 0.01 * loss.item()
        if step % p.log_every == 0 or step == p.unet_steps - 1:
            log(f"[unet] step {step}/{p.unet_steps} loss {loss.item():.4f} (ema {ema_loss:.4f}) "
                f"{(step + 1) / (time.time() - t0):.2f} it/s  elapsed {clock.elapsed() / 60:.1f} min")
        if probe is not None and p.probe_every and (step + 1) % p.probe_every == 0 and step + 1 < p.unet_steps:
            res = {"step": step + 1, **probe(ema_unet.eval(), ema_text)}
            probes.append(res)
            log(f"[unet] probe {res}")
    return ema_unet.eval(), ema_text, {"steps_done": step + 1, "final_loss_ema": ema_loss,
                                              "wall_s": time.time() - t0, "probes": probes}

