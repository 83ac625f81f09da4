"""The Shapes teacher: a tiny Stable-Diffusion-shaped pipeline (diffusers format) and its recipe.

    python -m splam_studio.tools.world build --out weights --preset full   # 48 min on 2 CPU cores
    python -m splam_studio.tools.world build --out /tmp/w --preset tiny     # seconds, for tests
    python -m splam_studio.tools.world bench                                # it/s of each stage

Recipe (all seeds fixed):
  1. render a fixed training set of Shapes pairs (train split: held-out (shape, colour) pairs excluded);
  2. train the VAE (L1 + L2 + small KL, as SD's autoencoder minus the GAN and LPIPS terms);
  3. fit `scaling_factor` so that scaled latents have unit variance, and write it into the VAE config;
  4. train the evaluator (a CNN on real images, all splits) -> <out>/shapes-evaluator;
  5. encode the training set once, then train the UNet (from scratch; the text encoder stays at its seeded
     init unless the preset trains it jointly) with the epsilon loss, 10% caption dropout (for
     classifier-free guidance), AdamW and an EMA;
  6. save a StableDiffusionPipeline -> <out>/shapes-teacher, and measure prompt accuracy of 50-step
     DDIM at guidance 7.5 on train and held-out captions; write recipe.json beside the weights.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import textwrap
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from .grammar import VOCAB, ShapesDataset, render, sample_specs
from ..core.schedule import SD15_SCHEDULER_CONFIG
from ..core.student import ema_update
from ..core.teacher import tokenize

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 16  # bos + 11 caption words + eos fits; StableDiffusionPipeline pads to this length


# ---- device and precision: decided once ------------------------------------------------------------
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.float32  # trainable weights in fp32; the models are tiny


# ---- tokenizer -------------------------------------------------------------------------------------
def _learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """BPE merges learned on the grammar until every word is one symbol (CLIP's `</w>` word ending)."""
    seqs = {w: list(w[:-1]) + [w[-1] + "</w>"] for w in words}
    merges: list[tuple[str, str]] = []
    while any(len(s) > 1 for s in seqs.values()):
        counts: dict[tuple[str, str], int] = {}
        for s in seqs.values():
            for pair in zip(s, s[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        best = max(counts, key=lambda p: (counts[p], p))  # ties broken deterministically
        merges.append(best)
        for w, s in seqs.items():
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[w] = out
    return merges


def build_tokenizer(out_dir: str | Path, words: list[str] = VOCAB, model_max_length: int = MAX_LENGTH):
    """A CLIPTokenizer in which every grammar word is one token; saved to (and loaded from) out_dir."""
    from transformers import CLIPTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    merges = _learn_merges(list(words))
    letters = sorted({c for w in words for c in w} | set("abcdefghijklmnopqrstuvwxyz"))
    symbols = letters + [c + "</w>" for c in letters]
    for a, b in merges:  # every merge result must be in the vocabulary
        if a + b not in symbols:
            symbols.append(a + b)
    vocab = {s: i for i, s in enumerate(symbols + [BOS, EOS])}
    (out / "vocab.json").write_text(json.dumps(vocab, indent=0))
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tok = CLIPTokenizer(vocab=vocab, merges=[tuple(m) for m in merges], model_max_length=model_max_length, bos_token=BOS, eos_token=EOS, pad_token=EOS,
                        unk_token=EOS)
    tok.save_pretrained(str(out))
    return CLIPTokenizer.from_pretrained(str(out))


# ---- model configs ---------------------------------------------------------------------------------
def vae_config() -> dict:
    """SD's AutoencoderKL layout (4 blocks, 8x downsampling, 4 latent channels), narrow: 64 px -> 8x8."""
    return dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=64, layers_per_block=1,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=(16, 32, 32, 64), norm_num_groups=16, scaling_factor=1.0)


def text_encoder_config(tokenizer, layers: int):
    """CLIP text encoder config, narrow: `layers` layers of width 128 over the grammar's vocabulary.

    layers = 0 leaves token + position embedding and the final layer norm: each token's output depends on its
    own word only, so a held-out (shape, colour) pair gets exactly the vectors its two words had in training.
    """
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256,
                          num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=MAX_LENGTH,
                          projection_dim=128, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def unet_config() -> dict:
    """SD's UNet2DConditionModel, 3 levels on 8x8 latents (8 -> 4 -> 2), cross-attention at every level.

    3.6M parameters. The first teacher (2 levels, 8 -> 4, no attention at 2x2, 2000 steps) learned shape,
    colour, size and count but placed objects at chance (20% position accuracy): a 3x3-conv UNet learns
    absolute position only from zero padding, and on a 2x2 map every cell touches two borders, so the
    2x2 cross-attention can write "left" into the left column directly.
    """
    return dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                block_out_channels=(64, 64, 96),
                down_block_types=("CrossAttnDownBlock2D",) * 3,
                up_block_types=("CrossAttnUpBlock2D",) * 3,
                cross_attention_dim=128, attention_head_dim=8, norm_num_groups=32)


def build_models(tokenizer, seed: int, text_layers: int):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    vae = AutoencoderKL(**vae_config())
    text_encoder = CLIPTextModel(text_encoder_config(tokenizer, text_layers))
    unet = UNet2DConditionModel(**unet_config())
    return vae, text_encoder, unet


# ---- recipe presets --------------------------------------------------------------------------------
@dataclass
class WorldPreset:
    name: str
    seed: int = 0
    # Step counts sized from measured CPU speed (2 cores): VAE 0.28 s/step, evaluator 0.15 s/step; the 3-level
    # UNet ran 0.47 s/step with the 0-layer text encoder frozen (0.51 with 3 layers, 0.74 jointly) -> 48 min
    # in all on 2 cores (measured from scratch).
    # 1000 VAE steps left reconstructions the evaluator could not read (2.5% prompt accuracy): the VAE gets more.
    # The 2-level UNet at 2000 steps and this one at 3500 with a jointly trained text encoder both placed
    # objects at chance; with the text encoder frozen position follows the prompt (see BENCHMARKS.md).
    n_train: int = 20000  # fixed (image, caption) training pairs, rendered and encoded once
    vae_steps: int = 1800
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
    # collapsed the five position words (`world diagnose`: 0.009 apart against 0.28-0.70 for other attributes).
    train_text_encoder: bool = False
    # Transformer layers of the text encoder. With 3 frozen random layers a held-out (shape, colour) pair
    # reached the UNet as vectors it never saw (held-out prompt accuracy 0.846 at n = 1000); with 0 each word
    # keeps its own vector and only the pairing is new: 0.917 (see README, "The Shapes world").
    text_layers: int = 0
    check_n: int = 96  # captions per split in the final prompt-accuracy check
    check_steps: int = 50
    guidance_scale: float = 7.5
    probe_every: int = 1000  # log a quick prompt-accuracy probe (32 captions, 20 steps) during UNet training
    deadline_s: float = 58 * 60  # safety: training stages stop early (and say so) past this wall time
    log_every: int = 100


PRESETS = {
    "full": WorldPreset("full"),
    # the second teacher's recipe, kept for the record: text encoder trained jointly; position at chance
    "full-joint-text": WorldPreset("full-joint-text", unet_steps=3500, train_text_encoder=True, text_layers=3),
    # the third teacher's recipe, kept for the record: 3 frozen text-encoder layers; held-out pairs at 0.846
    "full-text3": WorldPreset("full-text3", text_layers=3),
    "tiny": WorldPreset("tiny", n_train=64, vae_steps=2, vae_batch=8, eval_n=64, eval_steps=2, eval_batch=8,
                        unet_steps=3, unet_batch=8, warmup=1, check_n=4, check_steps=2, log_every=1,
                        probe_every=2),
}


def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return f


class _Clock:
    def __init__(self, deadline_s: float):
        self.t0, self.deadline_s = time.time(), deadline_s

    def elapsed(self) -> float:
        return time.time() - self.t0

    def past_deadline(self, reserve_s: float = 0.0) -> bool:
        return self.elapsed() > self.deadline_s - reserve_s


def _to_pm1(u8: torch.Tensor) -> torch.Tensor:
    return u8.to(DEVICE, DTYPE).div(127.5).sub(1.0)  # (B, 3, H, W) in [-1, 1]


# ---- stages ------------------------------------------------------------------------------------------
def _foreground_weight(x: torch.Tensor, fg_weight: float) -> torch.Tensor:
    """(B, 1, H, W): 1 on the background (the corner colour), fg_weight on and around the objects."""
    bg = x[:, :, :1, :1]
    mask = ((x - bg).abs().amax(1, keepdim=True) > 0.05).float()
    mask = F.max_pool2d(mask, 3, stride=1, padding=1)  # include the antialiased edges
    return 1.0 + (fg_weight - 1.0) * mask


def train_vae(vae, images_u8: torch.Tensor, p: WorldPreset, clock: _Clock, reserve_s: float, log) -> dict:
    """L1 + L2 reconstruction + kl_weight * KL, AdamW, cosine schedule."""
    g = torch.Generator().manual_seed(p.seed + 1)
    vae.train().to(DEVICE)
    opt = torch.optim.AdamW(vae.parameters(), lr=p.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(p.warmup, p.vae_steps))
    t0, step, ema_loss = time.time(), 0, None
    for step in range(p.vae_steps):
        if clock.past_deadline(reserve_s):
            log(f"[vae] deadline reached, stopping at step {step}")
            break
        idx = torch.randint(0, len(images_u8), (p.vae_batch,), generator=g)
        x = _to_pm1(images_u8[idx])
        post = vae.encode(x).latent_dist
        z = post.sample(generator=g)
        rec = vae.decode(z).sample
        w = _foreground_weight(x, p.fg_weight)  # objects are ~5% of the pixels: weight them up
        loss = (w * ((rec - x).abs() + (rec - x) ** 2)).mean() + p.kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        ema_loss = loss.item() if ema_loss is None else 0.98 * ema_loss + 0.02 * loss.item()
        if step % p.log_every == 0 or step == p.vae_steps - 1:
            log(f"[vae] step {step}/{p.vae_steps} loss {loss.item():.4f} (ema {ema_loss:.4f}) "
                f"{(step + 1) / (time.time() - t0):.2f} it/s")
    vae.eval()
    return {"steps_done": step + 1, "final_loss_ema": ema_loss, "wall_s": time.time() - t0}


@torch.no_grad()
def encode_latents(vae, images_u8: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image, unscaled: (N, 4, 8, 8) each."""
    means, stds = [], []
    for i in range(0, len(images_u8), batch):
        post = vae.encode(_to_pm1(images_u8[i:i + batch])).latent_dist
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
    from ..core.metrics import psnr

    x = _to_pm1(images_u8)
    rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    return {"psnr_db": float(psnr(rec, x).mean()), "n": len(x)}


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Depthwise 5x5 Gaussian blur of (B, C, H, W)."""
    r = torch.arange(-2, 3, dtype=x.dtype)
    k1 = torch.exp(-(r**2) / (2 * sigma**2))
    k = (k1[:, None] * k1[None, :]) / k1.sum() ** 2
    C = x.shape[1]
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), k.expand(C, 1, 5, 5).contiguous(), groups=C)


def train_evaluator(p: WorldPreset, clock: _Clock, reserve_s: float, log):
    """The evaluator CNN on real images of all splits, with light noise augmentation."""
    from .evaluator import Evaluator, evaluator_loss

    ds = ShapesDataset(p.eval_n, seed=p.seed + 100, split="all")
    t0 = time.time()
    images, labels = ds.render_all(), ds.label_tensor()
    log(f"[evaluator] rendered {len(ds)} images in {time.time() - t0:.1f}s")
    torch.manual_seed(p.seed + 2)
    g = torch.Generator().manual_seed(p.seed + 2)
    model = Evaluator().to(DEVICE).train()
    opt = torch.optim.AdamW(model.parameters(), lr=p.eval_lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(min(p.warmup, p.eval_steps // 10 + 1), p.eval_steps))
    t0, step = time.time(), 0
    for step in range(p.eval_steps):
        if clock.past_deadline(reserve_s):
            log(f"[evaluator] deadline reached, stopping at step {step}")
            break
        idx = torch.randint(0, len(images), (p.eval_batch,), generator=g)
        x = _to_pm1(images[idx])
        x = x + 0.05 * torch.rand(len(x), 1, 1, 1, generator=g) * torch.randn(x.shape, generator=g)
        half = len(x) // 2  # blur half the batch: generated images are softer than renders (VAE decoder)
        x[:half] = _gaussian_blur(x[:half], 0.3 + 1.2 * torch.rand(1, generator=g).item())
        loss = evaluator_loss(model, x, labels[idx].to(DEVICE))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % p.log_every == 0 or step == p.eval_steps - 1:
            log(f"[evaluator] step {step}/{p.eval_steps} loss {loss.item():.4f} "
                f"{(step + 1) / (time.time() - t0):.2f} it/s")
    model.eval()
    return model, {"steps_done": step + 1, "final_loss": loss.item(), "wall_s": time.time() - t0}


def train_unet(unet, text_encoder, latents: torch.Tensor, ids: torch.Tensor, empty_ids: torch.Tensor,
               p: WorldPreset, clock: _Clock, reserve_s: float, log, probe=None) -> tuple:
    """Epsilon loss on cached latents; the text encoder trained jointly or kept frozen; EMA of both returned.

    With a frozen text encoder its outputs are computed once for every caption (and for "") and looked up,
    which gives the same batches as encoding each one and spares the encoder's forward pass at every step.
    probe(ema_unet, ema_text) -> dict, if given, runs every `probe_every` steps; its results are logged and kept.
    """
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler(**{k: v for k, v in SD15_SCHEDULER_CONFIG.items() if k != "set_alpha_to_one"})
    g = torch.Generator().manual_seed(p.seed + 3)
    unet.train().to(DEVICE)
    text_encoder.train(p.train_text_encoder).to(DEVICE).requires_grad_(p.train_text_encoder)
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    params = list(unet.parameters()) + (list(text_encoder.parameters()) if p.train_text_encoder else [])
    opt = torch.optim.AdamW(params, lr=p.unet_lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(p.warmup, p.unet_steps))
    enc_cache = None
    if not p.train_text_encoder:
        with torch.no_grad():
            enc_cache = torch.cat([text_encoder(ids[i:i + 1024].to(DEVICE))[0] for i in range(0, len(ids), 1024)])
            enc_empty = text_encoder(empty_ids[None].to(DEVICE))[0]  # (1, L, 128)
    t0, step, ema_loss, probes = time.time(), 0, None, []
    for step in range(p.unet_steps):
        if clock.past_deadline(reserve_s):
            log(f"[unet] deadline reached, stopping at step {step}")
            break
        # 1. a batch of cached latents and captions, 10% of captions dropped to ""
        idx = torch.randint(0, len(latents), (p.unet_batch,), generator=g)
        z0 = latents[idx].to(DEVICE, DTYPE)  # (B, 4, 8, 8), already scaled
        drop = torch.rand(p.unet_batch, generator=g) < p.caption_dropout
        # 2. forward diffusion at a uniform timestep
        eps = torch.randn(z0.shape, generator=g).to(DEVICE, DTYPE)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (p.unet_batch,), generator=g).to(DEVICE)
        z_t = noise_scheduler.add_noise(z0, eps, t)
        # 3. epsilon prediction and loss
        if enc_cache is None:
            enc = text_encoder(torch.where(drop[:, None], empty_ids[None], ids[idx]).to(DEVICE))[0]  # (B, L, 128)
        else:
            enc = torch.where(drop.to(DEVICE)[:, None, None], enc_empty, enc_cache[idx.to(DEVICE)])
        loss = F.mse_loss(unet(z_t, t, enc).sample, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
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
            res = {"step": step + 1, **probe(ema_unet.eval(), ema_text.eval())}
            probes.append(res)
            log(f"[unet] probe {res}")
    return ema_unet.eval(), ema_text.eval(), {"steps_done": step + 1, "final_loss_ema": ema_loss,
                                              "wall_s": time.time() - t0, "probes": probes}


def _reuse_stages(src: Path, eval_dir: Path, log) -> tuple:
    """VAE and evaluator of a finished build in `src` (stages 2-4), with their recipe records."""
    from diffusers import AutoencoderKL

    rec_path = src / "recipe.json"
    if not (src / "shapes-teacher" / "vae").is_dir() or not (src / "shapes-evaluator").is_dir() or not rec_path.is_file():
        raise FileNotFoundError(f"--reuse-from {src}: need shapes-teacher/vae, shapes-evaluator and recipe.json there")
    old = json.loads(rec_path.read_text())["stages"]
    vae = AutoencoderKL.from_pretrained(src / "shapes-teacher" / "vae", use_safetensors=True).to(DEVICE, DTYPE).eval()
    if (src / "shapes-evaluator").resolve() != eval_dir.resolve():
        shutil.copytree(src / "shapes-evaluator", eval_dir, dirs_exist_ok=True)
    stages = {k: {**old[k], "reused_from": str(src)} for k in ("vae", "scaling", "evaluator") if k in old}
    log(f"[reuse] VAE (scaling_factor {vae.config.scaling_factor:.5f}) and evaluator from {src}")
    return vae, float(vae.config.scaling_factor), stages


def make_pipeline(vae, text_encoder, tokenizer, unet):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**SD15_SCHEDULER_CONFIG), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


@torch.no_grad()
def check_prompt_accuracy(pipe, evaluator, p: WorldPreset, split: str, seed: int) -> dict:
    """Prompt accuracy of `check_steps`-step DDIM at `guidance_scale` on `check_n` captions of a split."""
    captions = [s.caption() for s in sample_specs(p.check_n, seed, split)]
    images = []
    for i in range(0, len(captions), 32):
        g = torch.Generator().manual_seed(seed + i)
        out = pipe(captions[i:i + 32], num_inference_steps=p.check_steps, guidance_scale=p.guidance_scale,
                   generator=g, output_type="pil")
        images.extend(out.images)
    return evaluator.prompt_accuracy(images, captions)


# ---- the build ---------------------------------------------------------------------------------------
def build(out: str | Path, preset: WorldPreset | str = "full", log=print, reuse_from: str | Path | None = None) -> dict:
    """Run the whole recipe; writes <out>/shapes-teacher, <out>/shapes-evaluator and recipe.json.

    reuse_from: a finished build's folder; its VAE (with scaling factor) and evaluator are loaded instead of
    retrained (stages 2-4), and their records are copied into recipe.json marked `reused_from`.
    """
    from .evaluator import Evaluator

    p = PRESETS[preset] if isinstance(preset, str) else preset
    out = Path(out)
    clock = _Clock(p.deadline_s)
    record: dict = {"preset": asdict(p), "torch_threads": torch.get_num_threads(), "device": str(DEVICE),
                    "stages": {}}
    teacher_dir, eval_dir = out / "shapes-teacher", out / "shapes-evaluator"

    # 1. data and tokenizer
    t = time.time()
    tokenizer = build_tokenizer(out / "_tokenizer_build")
    train_ds = ShapesDataset(p.n_train, seed=p.seed, split="train")
    images_u8 = train_ds.render_all()  # (N, 3, 64, 64) uint8
    ids = tokenize(tokenizer, [s.caption() for s in train_ds.specs])
    empty_ids = tokenize(tokenizer, [""])[0]
    record["stages"]["data"] = {"n_train": len(train_ds), "wall_s": time.time() - t}
    log(f"[data] {len(train_ds)} pairs rendered and tokenized in {time.time() - t:.1f}s")
    vae, text_encoder, unet = build_models(tokenizer, p.seed, p.text_layers)
    record["params"] = {n: sum(q.numel() for q in m.parameters())
                        for n, m in (("vae", vae), ("text_encoder", text_encoder), ("unet", unet))}
    log(f"[models] params {record['params']}")

    if reuse_from is not None:
        vae, sf, stages = _reuse_stages(Path(reuse_from), eval_dir, log)
        record["stages"].update(stages)
        evaluator = Evaluator.from_pretrained(eval_dir)
        mean, std = encode_latents(vae, images_u8)
    else:
        # Stage budgets (fractions of the deadline) keep the UNet its share if an early stage runs slow.
        # 2. VAE
        record["stages"]["vae"] = train_vae(vae, images_u8, p, clock, reserve_s=0.75 * p.deadline_s, log=log)
        heldout_u8 = ShapesDataset(256 if p.name != "tiny" else 8, seed=p.seed + 7, split="heldout").render_all()
        record["stages"]["vae"]["heldout_recon"] = vae_report(vae, heldout_u8)
        log(f"[vae] done: {record['stages']['vae']}")

        # 3. scaling factor
        t = time.time()
        mean, std = encode_latents(vae, images_u8)
        sf = fit_scaling_factor(mean, std, p.seed + 4)
        vae.register_to_config(scaling_factor=sf)
        record["stages"]["scaling"] = {"scaling_factor": sf, "latent_std_unscaled": 1.0 / sf, "wall_s": time.time() - t}
        log(f"[scaling] scaling_factor {sf:.5f} ({time.time() - t:.1f}s)")

        # 4. evaluator
        evaluator, rec = train_evaluator(p, clock, reserve_s=0.62 * p.deadline_s, log=log)
        evaluator.save_pretrained(eval_dir)
        evaluator = Evaluator.from_pretrained(eval_dir)
        test_ds = ShapesDataset(512 if p.name != "tiny" else 8, seed=p.seed + 8, split="all")
        test_u8 = test_ds.render_all()
        caps = [s.caption() for s in test_ds.specs]
        rec["real_accuracy"] = evaluator.prompt_accuracy(_to_pm1(test_u8), caps)
        with torch.no_grad():
            recon = vae.decode(vae.encode(_to_pm1(test_u8)).latent_dist.mean).sample.clamp(-1, 1)
        rec["vae_recon_accuracy"] = evaluator.prompt_accuracy(recon, caps)
        record["stages"]["evaluator"] = rec
        log(f"[evaluator] done: {rec}")

    # 5. UNet + text encoder on cached latents
    g = torch.Generator().manual_seed(p.seed + 5)
    latents = (mean + std * torch.randn(mean.shape, generator=g)) * sf  # one posterior sample per image
    del images_u8
    probe_p = replace(p, check_n=min(p.check_n, 32), check_steps=min(p.check_steps, 20))

    def probe(ema_unet, ema_text) -> dict:
        pipe = make_pipeline(vae, ema_text, tokenizer, ema_unet)
        pipe.set_progress_bar_config(disable=True)
        res = check_prompt_accuracy(pipe, evaluator, probe_p, "heldout", seed=p.seed + 11)
        ema_unet.eval(), ema_text.eval()
        return {"heldout_accuracy": res["accuracy"], "position": res["per_attribute"]["position"], "n": res["n"]}

    ema_unet, ema_text, rec = train_unet(unet, text_encoder, latents, ids, empty_ids, p, clock,
                                         reserve_s=90 if p.name != "tiny" else 0, log=log, probe=probe)
    record["stages"]["unet"] = rec
    log(f"[unet] done: {rec}")

    # 6. save, reload offline, check
    t = time.time()
    from diffusers import StableDiffusionPipeline

    make_pipeline(vae, ema_text, tokenizer, ema_unet).save_pretrained(str(teacher_dir), safe_serialization=True)
    for name in ("vocab.json", "merges.txt"):  # the plain BPE files too, beside tokenizer.json
        shutil.copy(out / "_tokenizer_build" / name, teacher_dir / "tokenizer" / name)
    pipe = StableDiffusionPipeline.from_pretrained(str(teacher_dir), use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    record["stages"]["check"] = {
        split: check_prompt_accuracy(pipe, evaluator, p, split, seed=p.seed + 9) for split in ("train", "heldout")}
    record["stages"]["check"]["wall_s"] = time.time() - t
    log(f"[check] {record['stages']['check']}")
    record["total_wall_s"] = clock.elapsed()
    (out / "recipe.json").write_text(json.dumps(record, indent=2))
    log(f"[done] total {clock.elapsed() / 60:.1f} min -> {teacher_dir}, {eval_dir}, {out / 'recipe.json'}")
    shutil.rmtree(out / "_tokenizer_build", ignore_errors=True)
    return record


def bench(steps: int = 6, log=print) -> dict:
    """Seconds per training step of each stage at the full preset's batch sizes (for sizing the build)."""
    import tempfile

    from .evaluator import Evaluator, evaluator_loss

    p = PRESETS["full"]
    with tempfile.TemporaryDirectory() as d:
        tok = build_tokenizer(d)
    vae, text_encoder, unet = build_models(tok, p.seed, p.text_layers)
    ds = ShapesDataset(max(p.vae_batch, p.unet_batch, p.eval_batch), seed=0)
    x_u8, labels = ds.render_all(), ds.label_tensor()
    ids = tokenize(tok, [s.caption() for s in ds.specs])
    res = {}

    def timeit(name, fn):
        fn()
        t = time.time()
        for _ in range(steps):
            fn()
        res[name] = (time.time() - t) / steps
        log(f"[bench] {name}: {res[name]:.3f} s/step ({1 / res[name]:.2f} it/s)")

    opt = torch.optim.AdamW(vae.parameters())

    def vae_step():
        x = _to_pm1(x_u8[: p.vae_batch])
        post = vae.encode(x).latent_dist
        loss = F.l1_loss(vae.decode(post.sample()).sample, x) + 1e-6 * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    ev = Evaluator()
    opt_e = torch.optim.AdamW(ev.parameters())

    def eval_step():
        loss = evaluator_loss(ev, _to_pm1(x_u8[: p.eval_batch]), labels[: p.eval_batch])
        opt_e.zero_grad()
        loss.backward()
        opt_e.step()

    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt_u = torch.optim.AdamW(params)

    def unet_step():
        z = torch.randn(p.unet_batch, 4, 8, 8)
        t = torch.randint(0, 1000, (p.unet_batch,))
        loss = F.mse_loss(unet(z, t, text_encoder(ids[: p.unet_batch])[0]).sample, z)
        opt_u.zero_grad()
        loss.backward()
        opt_u.step()

    timeit("vae", vae_step)
    timeit("evaluator", eval_step)
    timeit("unet", unet_step)
    return res


def evaluate(weights: str | Path = "weights", n: int = 1000, steps: int = 50, guidance: float | None = None,
             out: str | Path = "benchmarks/teacher.json", seed: int = 4321, log=print) -> dict:
    """Teacher quality per split: prompt accuracy and Shapes-FID of `steps`-step DDIM, next to the real-vs-real floor."""
    from .evaluator import Evaluator
    from ..core.metrics import feature_statistics, frechet_distance
    from ..models.loading import load_teacher
    from ..core.sampler import generate

    weights = Path(weights)
    pipe = load_teacher(str(weights / "shapes-teacher"))
    ev = Evaluator.from_pretrained(weights / "shapes-evaluator")
    guidance = PRESETS["full"].guidance_scale if guidance is None else guidance
    res = {}
    for split in ("train", "heldout"):
        specs = sample_specs(n, seed, split)
        caps = [s.caption() for s in specs]
        real_a = [render(s, seed + 10_000 + i) for i, s in enumerate(specs)]
        real_b = [render(s, seed + 20_000 + i) for i, s in enumerate(specs)]
        fake = []
        for b, i in enumerate(range(0, n, 250)):
            fake += generate(pipe, prompt=caps[i:i + 250], sampler="ddim", steps=steps, seed=seed + b,
                             guidance_scale=guidance).images
        stats = {k: feature_statistics(ev.features(v)) for k, v in (("a", real_a), ("b", real_b), ("fake", fake))}
        acc = ev.prompt_accuracy(fake, caps)
        res[split] = {"n": n, "prompt_acc": acc["accuracy"], "per_attribute": acc["per_attribute"],
                      "fid": frechet_distance(*stats["fake"], *stats["a"]), "fid_floor": frechet_distance(*stats["b"], *stats["a"]),
                      "real_prompt_acc": ev.prompt_accuracy(real_a, caps)["accuracy"]}
        log(f"{split}: {res[split]}")
    probe = position_probe(pipe, ev, min(n, 64), steps, guidance, seed)
    log(f"position probe: {probe}")
    probe["text_separation"] = text_separation(pipe)
    log(f"text separation: {probe['text_separation']}")
    doc = {"description": f"`python -m splam_studio.tools.world evaluate`: the embedded teacher, {steps}-step DDIM at guidance {guidance}, "
                          f"{n} captions per split (held-out = (shape, colour) pairs never seen in training), fixed seeds. "
                          "FID on the evaluator's features against real renders of the same captions; the floor is "
                          "real against an independent real draw. Real images score "
                          + ", ".join(f"{k} {v['real_prompt_acc']:.3f}" for k, v in res.items()) + " prompt accuracy.",
           "steps": steps, "guidance": guidance, "splits": res, "position_probe": probe}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(doc, indent=2))
    return doc


@torch.no_grad()
def text_separation(pipe, n: int = 64, seed: int = 0) -> dict:
    """How far the text encoder's output moves when one attribute's word changes (all else equal).

    Per attribute: mean over n captions and over the other values of |e' - e| / |e|, e the encoder output
    (last hidden state) summed over the tokens from the changed word on. Near 0: the encoder hands the UNet
    (almost) the same conditioning whatever the word, so the teacher cannot follow that attribute.
    """
    from .grammar import ATTRIBUTE_VALUES as VALUES
    from .grammar import ATTRIBUTES

    tok, te = pipe.tokenizer, pipe.text_encoder

    def enc(captions: list[str]) -> torch.Tensor:
        ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(te.device)
        return te(ids)[0].float().cpu()  # (B, L, D)

    specs = sample_specs(n, seed, "train")
    base = enc([s.caption() for s in specs])
    out = {}
    for a in ATTRIBUTES:
        rel = []
        for v in range(len(VALUES[a])):
            other = [replace(s, **{a: v}) for s in specs]
            keep = [i for i, (s, o) in enumerate(zip(specs, other)) if getattr(s, a) != v]
            if not keep:
                continue
            e = enc([other[i].caption() for i in keep])
            d = (e - base[keep]).norm(dim=-1).sum(1) / base[keep].norm(dim=-1).sum(1)
            rel.append(d)
        out[a] = float(torch.cat(rel).mean())
    return out


@torch.no_grad()
def position_probe(pipe, ev, n: int, steps: int, guidance: float, seed: int) -> dict:
    """Does the prompt or the initial noise decide where objects go? For n noise draws, the same caption is
    generated once per position word (all else equal, same noise): `follows_prompt` is the position accuracy over
    all n x 5 images; `same_place_for_all_words` the share of draws whose predicted position is the same under all
    five words (1/125 if position were uniformly random per image, 1.0 if the noise alone decided it)."""
    from ..core.sampler import generate
    from .grammar import ATTRIBUTES, POSITIONS

    specs = sample_specs(n, seed + 5, "train")
    j = ATTRIBUTES.index("position")
    pred = torch.empty(n, len(POSITIONS), dtype=torch.long)
    for p in range(len(POSITIONS)):
        caps = [replace(s, position=p).caption() for s in specs]
        images = generate(pipe, prompt=caps, sampler="ddim", steps=steps, seed=seed + 99, guidance_scale=guidance).images
        pred[:, p] = ev.predict(images)[:, j]
    follows = (pred == torch.arange(len(POSITIONS))[None]).float().mean().item()
    same = (pred == pred[:, :1]).all(1).float().mean().item()
    return {"n_noise_draws": n, "follows_prompt": follows, "same_place_for_all_words": same,
            "chance_follows": 1 / len(POSITIONS), "chance_same": 1 / len(POSITIONS) ** (len(POSITIONS) - 1)}


def sample_grid(weights: str | Path = "weights", out: str | Path = "docs/teacher_grid.png", n: int = 8, steps: int = 50,
                guidance: float | None = None, seed: int = 7) -> Path:
    """A captioned grid of teacher samples: train captions on the top row, held-out captions below."""
    from PIL import Image, ImageDraw

    from ..models.loading import load_teacher
    from ..core.sampler import generate

    pipe = load_teacher(str(Path(weights) / "shapes-teacher"))
    guidance = PRESETS["full"].guidance_scale if guidance is None else guidance
    rows = [[s.caption() for s in sample_specs(n, seed + i, split)] for i, split in enumerate(("train", "heldout"))]
    cell, pad, text_h = 128, 6, 44
    grid = Image.new("RGB", (n * (cell + pad) + pad, len(rows) * (cell + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for r, caps in enumerate(rows):
        images = generate(pipe, prompt=caps, sampler="ddim", steps=steps, seed=seed + r, guidance_scale=guidance).images
        for c, (im, cap) in enumerate(zip(images, caps)):
            x, y = pad + c * (cell + pad), pad + r * (cell + text_h + pad)
            grid.paste(im.resize((cell, cell), Image.NEAREST), (x, y))
            lines = textwrap.wrap(cap, 21)
            draw.multiline_text((x, y + cell + 2), "\n".join(lines[:3]), fill=(0, 0, 0), spacing=1)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    return out
