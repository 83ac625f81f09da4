"""Latents and text embeddings on disk, so that no pass over the data is computed twice.

Two sources of z_0 that the loop reads instead of running the VAE and the text encoder at every step:
- **teacher data** (`--prompts FILE`): the teacher makes its own z_0, a guided DDIM run at the distillation's w
  (CFG w + 1) from a list of prompts, `--images-per-prompt` images each. No images are needed at all.
- **the latent cache** (`--cache-latents`): each image of a finite data source encoded once by the frozen VAE (its
  posterior's mean and std, so that every step still draws z_0 ~ q(z_0 | x) with the step's generator, exactly as
  the uncached loop does), and each caption once by the frozen text encoder, as kohya's `cache_latents` and
  `cache_text_encoder_outputs` do. The data recipe draws no flips or random crops (a fixed resize and centre crop),
  so one variant per image is the whole recipe.

Both live under `<output_dir>/.cache/<kind>-<key>/`, shared by every run with the same key, so an LCM and a SPLAM
run on the same prompts generate once. The key hashes everything the tensors depend on (the teacher's UNet, VAE and
text encoder weights (SDXL: both text encoders), the resolution, w, the DDIM steps, the prompts and the seed, or the
data files' names, sizes and times): a changed input never reads stale latents. SDXL teacher data stores the whole
text condition (embeddings, pooled embeddings, time ids); the SDXL data recipe's per-sample crops are not cached.
Shards (`shard-NNNNN.safetensors`) are written atomically one batch group at a time; a killed generation resumes at
the first missing shard, and a shard that does not read back whole is named in the log and made again, never used.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..models.generation import generate
from ..core.teacher import (TextCondition, added_conditioning, cfg_scale, encode_condition, encode_text, native_size,
                            uncond_like, vae_scale_factor)
from .data import time_ids_of
from ..store.atomic import atomic_write, write_json

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SHARD = "shard-{:05d}.safetensors"
MAX_PROMPT_CHARS = 2000


class LatentDataError(ValueError):
    """A prompts file or a latent store that cannot be used; the message names the file and the line or shard."""


# ---- prompts --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prompt:
    prompt: str
    negative: str = ""


def read_prompts(path: str | Path) -> list[Prompt]:
    """One prompt a line, or JSON lines {"prompt": ..., "negative_prompt": ...}; blank lines and '#' comments skipped."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise LatentDataError(f"prompts file {path} not found (one prompt a line, or JSON lines with \"prompt\")")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LatentDataError(f"prompts file {path} is not UTF-8 text (byte {e.start})") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("{"):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise LatentDataError(f"{path}, line {n}: not valid JSON ({e.msg})") from None
            p, neg = row.get("prompt") if isinstance(row, dict) else None, (row.get("negative_prompt") or "") if isinstance(row, dict) else ""
            if not isinstance(p, str) or not p.strip() or not isinstance(neg, str):
                raise LatentDataError(f"{path}, line {n}: a JSON line needs a non-empty string \"prompt\" "
                                      f"(and an optional string \"negative_prompt\")")
            item = Prompt(p.strip(), neg.strip())
        else:
            item = Prompt(line)
        if len(item.prompt) > MAX_PROMPT_CHARS:
            raise LatentDataError(f"{path}, line {n}: prompt longer than {MAX_PROMPT_CHARS} characters")
        out.append(item)
    if not out:
        raise LatentDataError(f"prompts file {path} holds no prompt")
    return out


# ---- keys -------------------------------------------------------------------------------------------------------------
def fingerprint(module: torch.nn.Module) -> str:
    """sha256 of a module's state dict (names, shapes, dtypes and bytes): the identity of frozen weights."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def files_identity(source: str) -> list:
    """Names, sizes and modification times of every file under a local data source (empty for generated sources)."""
    p = Path(source).expanduser()
    if p.is_file():
        st = p.stat()
        return [[p.name, st.st_size, st.st_mtime_ns]]
    if p.is_dir():
        rows = []
        for f in sorted(p.rglob("*")):
            if f.is_file():
                st = f.stat()
                rows.append([str(f.relative_to(p)), st.st_size, st.st_mtime_ns])
        return rows
    return []


def store_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---- the store ----------------------------------------------------------------------------------------------------------
class LatentStore:
    """A folder of shards; shard s covers source items s * shard_size ... (s + 1) * shard_size - 1.

    Tensors per shard: `index` (n,) the source items it holds (an unreadable image is left out); `z_0` (n, C, h, w)
    teacher latents, or `mean` / `std` (n, C, h, w) of the VAE posterior; `cond` (n, L, D) and, when negative prompts
    were given, `uncond` (n, L, D). SDXL teacher data adds the rest of its `TextCondition` beside each: `cond_pooled`
    (n, P) and `cond_time_ids` (n, 6) (and `uncond_pooled`, `uncond_time_ids`). The captions travel in the shard's
    metadata.
    """

    def __init__(self, root: Path, manifest: dict):
        self.root, self.manifest = Path(root), manifest
        self.n, self.shard_size = int(manifest["items"]), int(manifest["shard_size"])
        self.seconds = 0.0  # spent making shards in this process

    @property
    def num_shards(self) -> int:
        return math.ceil(self.n / self.shard_size)

    def shard_path(self, s: int) -> Path:
        return self.root / SHARD.format(s)

    def shard_items(self, s: int) -> range:
        return range(s * self.shard_size, min(self.n, (s + 1) * self.shard_size))

    @classmethod
    def open(cls, root: Path, manifest: dict) -> "LatentStore":
        """The store at root for this manifest; shards written for other inputs are removed, never reused."""
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".*.tmp-*"):  # a shard write cut short by a kill
            stale.unlink(missing_ok=True)
        mf = root / MANIFEST
        try:
            old = json.loads(mf.read_text()) if mf.is_file() else None
        except (OSError, json.JSONDecodeError):
            old = "unreadable"
        if old != manifest:
            if old is not None:
                log.warning("latent store %s: its manifest does not match these inputs; making it again", root.name)
            for p in root.glob("shard-*.safetensors"):
                p.unlink()
            write_json(mf, manifest)
        return cls(root, manifest)

    def check_shard(self, s: int) -> str | None:
        """None when shard s reads back whole: every tensor, one row per kept item, finite, captions to match."""
        p = self.shard_path(s)
        if not p.is_file():
            return "missing"
        rows = self.shard_items(s)
        try:
            with safe_open(str(p), "pt") as f:
                keys, meta = set(f.keys()), f.metadata() or {}
                need = set(self.manifest["tensors"]) | {"index"}
                if not need <= keys:
                    return f"has no tensor {sorted(need - keys)[0]!r}"
                index = f.get_tensor("index")
                if index.ndim != 1 or not all(rows.start <= int(i) < rows.stop for i in index):
                    return "holds items of another shard"
                for k in need - {"index"}:
                    t = f.get_tensor(k)
                    if t.shape[0] != len(index) or not torch.isfinite(t.float()).all():
                        return f"tensor {k!r} has {t.shape[0]} rows for {len(index)} items, or non-finite values"
                if len(json.loads(meta.get("captions", "[]"))) != len(index):
                    return "has captions missing"
        except Exception as e:  # a truncated or garbled file: any safetensors error means "make it again"
            return f"does not read ({type(e).__name__}: {str(e)[:80]})"
        return None

    def missing_shards(self) -> list[int]:
        todo = []
        for s in range(self.num_shards):
            why = self.check_shard(s)
            if why is not None:
                if why != "missing":
                    log.warning("latent store %s: %s %s; making it again", self.root.name, self.shard_path(s).name, why)
                todo.append(s)
        return todo

    def write_shard(self, s: int, tensors: dict[str, torch.Tensor], captions: list[str]) -> None:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        atomic_write(self.shard_path(s), lambda p: save_file(tensors, str(p), metadata={"captions": json.dumps(captions)}))

    def fill(self, make: Callable[[range], tuple[dict[str, torch.Tensor], list[str]]], desc: str) -> int:
        """Make every missing shard with make(items) -> (tensors with `index`, captions), with a progress bar and ETA.
        Returns the number of source items made in this call (0 when the store was complete)."""
        from tqdm.auto import tqdm

        todo = self.missing_shards()
        if not todo:
            return 0
        made = sum(len(self.shard_items(s)) for s in todo)
        bar = tqdm(total=self.n, initial=self.n - made, desc=desc, unit="img", dynamic_ncols=True)
        t0 = time.time()
        for s in todo:
            tensors, captions = make(self.shard_items(s))
            self.write_shard(s, tensors, captions)
            bar.update(len(self.shard_items(s)))
        bar.close()
        self.seconds += time.time() - t0
        return made

    def dataset(self) -> "LatentDataset":
        for s in range(self.num_shards):
            if (why := self.check_shard(s)) is not None:
                raise LatentDataError(f"latent store {self.root}: {self.shard_path(s).name} {why}")
        return LatentDataset(self)


class LatentDataset(torch.utils.data.Dataset):
    """Items of a complete store: {"z_0" | "mean", "std"; "cond"; ["uncond"]; "caption"}, read one shard at a time."""

    def __init__(self, store: LatentStore):
        self.store = store
        self.counts = []
        for s in range(store.num_shards):
            with safe_open(str(store.shard_path(s)), "pt") as f:
                self.counts.append(f.get_slice("index").get_shape()[0])
        self.starts = [sum(self.counts[:s]) for s in range(len(self.counts))]
        if not sum(self.counts):
            raise LatentDataError(f"latent store {store.root} holds no item")
        self._loaded: dict[int, tuple[dict, list[str]]] = {}  # shards stay in memory once read (random order)

    def __len__(self) -> int:
        return sum(self.counts)

    def _shard(self, s: int) -> tuple[dict, list[str]]:
        if s not in self._loaded:
            with safe_open(str(self.store.shard_path(s)), "pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys() if k != "index"}
                captions = json.loads((f.metadata() or {})["captions"])
            self._loaded[s] = (tensors, captions)
        return self._loaded[s]

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(i)
        s = max(k for k, start in enumerate(self.starts) if start <= i and self.counts[k])
        tensors, captions = self._shard(s)
        j = i - self.starts[s]
        return {**{k: v[j] for k, v in tensors.items()}, "caption": captions[j]}

    def captions(self, n: int) -> list[str]:
        """The first n distinct captions (validation prompts when none are given)."""
        out: list[str] = []
        for s in range(len(self.counts)):
            for c in self._shard(s)[1]:
                if c not in out:
                    out.append(c)
                if len(out) == n:
                    return out
        return out


# ---- teacher data: z_0 made by the teacher from prompts ------------------------------------------------------------------
ADDED = ("pooled", "time_ids")  # SDXL's added conditioning, stored as <branch>_pooled, <branch>_time_ids


def condition_tensors(branch: str, c) -> dict[str, torch.Tensor]:
    """A condition as store tensors: {branch: embeds}, and for SDXL {branch_pooled, branch_time_ids}; float32 CPU."""
    if not isinstance(c, TextCondition):
        return {branch: c.float().cpu()}
    return {branch: c.embeds.float().cpu(), **{f"{branch}_{k}": getattr(c, k).float().cpu() for k in ADDED}}


def stored_condition(batch: dict, branch: str, device: torch.device, dtype: torch.dtype):
    """The condition stored under branch ("cond" / "uncond") of a batch: a tensor (SD1.5) or a TextCondition (SDXL),
    embeddings in the text encoder's dtype, time ids float32 as `encode_condition` makes them."""
    embeds = batch[branch].to(device, dtype)
    if f"{branch}_pooled" not in batch:
        return embeds
    return TextCondition(embeds, batch[f"{branch}_pooled"].to(device, dtype),
                         batch[f"{branch}_time_ids"].to(device, torch.float32))


def teacher_data(pipe, prompts: list[Prompt], root: Path, *, w: float, steps: int, images_per_prompt: int, seed: int,
                 batch_size: int, shard_size: int = 64) -> LatentStore:
    """z_0 for every (prompt, image) pair from a guided DDIM run at CFG w + 1 (the distillation's w), in batches.

    Item i is prompt i // images_per_prompt; its initial noise comes from the seed of its batch within its shard, so a
    resumed generation makes the same latents as an uninterrupted one. The stored c (and c_uncond with negative
    prompts) is `encode_condition`'s: for SDXL with the time ids of the generation, native size uncropped as the
    stock pipeline's default; without negative prompts the loop builds c_uncond as the pipeline did (`uncond_like`).
    """
    if images_per_prompt < 1:
        raise LatentDataError(f"images per prompt must be at least 1, got {images_per_prompt}")
    items = [p for p in prompts for _ in range(images_per_prompt)]
    negatives = any(p.negative for p in prompts)
    xl = added_conditioning(pipe)
    branches = ["cond"] + (["uncond"] if negatives else [])
    suffixes = ("", *(f"_{k}" for k in ADDED)) if xl else ("",)
    tensors = ["z_0", "z_T"] + [b + x for b in branches for x in suffixes]  # SD1.5: z_0, z_T, cond[, uncond]
    key = {"unet": fingerprint(pipe.unet), "vae": fingerprint(pipe.vae), "text_encoder": fingerprint(pipe.text_encoder),
           "scheduler": dict(pipe.scheduler.config), "w": w, "steps": steps, "seed": seed,
           "images_per_prompt": images_per_prompt, "prompts": [[p.prompt, p.negative] for p in prompts]}
    if xl:  # SD1.5 keys stay as they were: their stores keep being reused
        key.update(text_encoder_2=fingerprint(pipe.text_encoder_2), size=native_size(pipe),
                   force_zeros_for_empty_prompt=bool(pipe.config.get("force_zeros_for_empty_prompt", True)))
    manifest = {"kind": "teacher", "items": len(items), "shard_size": shard_size, "batch_size": batch_size,
                "tensors": tensors, "key": key}
    store = LatentStore.open(Path(root) / f"teacher-{store_key(manifest)}", manifest)

    def make(rows: range) -> tuple[dict[str, torch.Tensor], list[str]]:
        out: dict[str, list[torch.Tensor]] = {k: [] for k in manifest["tensors"]}
        for b0 in range(rows.start, rows.stop, batch_size):
            batch = [items[i] for i in range(b0, min(rows.stop, b0 + batch_size))]
            caps, negs = [p.prompt for p in batch], [p.negative for p in batch]
            gen = generate(pipe, prompt=caps, sampler="ddim", steps=steps, seed=seed * 1_000_003 + b0,
                           guidance_scale=cfg_scale(w), negative_prompt=negs if negatives else None, decode=False)
            out["z_0"].append(gen.latents)
            out["z_T"].append(gen.noise)  # the teacher's ODE pair (z_T, z_0): the regression term's data
            with torch.no_grad():  # SDXL: time ids of the native size, uncropped, as the generation's pipeline call
                for branch, texts in zip(branches, (caps, negs)):
                    for k, v in condition_tensors(branch, encode_condition(pipe, texts)).items():
                        out[k].append(v)
        tensors = {k: torch.cat(v) for k, v in out.items()}
        return {**tensors, "index": torch.tensor(list(rows), dtype=torch.long)}, [items[i].prompt for i in rows]

    store.fill(make, "teacher data")
    return store


# ---- the latent cache: each image encoded once ----------------------------------------------------------------------------
def latent_cache(pipe, dataset, root: Path, *, identity: dict, batch_size: int, shard_size: int = 256) -> LatentStore:
    """The VAE posterior (mean, std) and the caption embedding of every readable item of a finite dataset."""
    if isinstance(dataset, torch.utils.data.IterableDataset):
        raise LatentDataError("--cache-latents needs a finite data source (a folder, a saved or hub data set, or "
                              "shapes); streamed webdataset shards are read once per pass and cannot be indexed")
    vae = pipe.vae
    manifest = {"kind": "images", "items": len(dataset), "shard_size": shard_size, "tensors": ["mean", "std", "cond"],
                "key": {**identity, "vae": fingerprint(vae), "text_encoder": fingerprint(pipe.text_encoder)}}
    store = LatentStore.open(Path(root) / f"latents-{store_key(manifest)}", manifest)
    vdev, vdtype = next(vae.parameters()).device, next(vae.parameters()).dtype

    def make(rows: range) -> tuple[dict[str, torch.Tensor], list[str]]:
        out: dict[str, list[torch.Tensor]] = {"mean": [], "std": [], "cond": []}
        kept: list[int] = []
        captions: list[str] = []
        for b0 in range(rows.start, rows.stop, batch_size):
            ex = [(i, e) for i in range(b0, min(rows.stop, b0 + batch_size)) if (e := dataset[i]) is not None]
            if not ex:
                continue  # every image of this batch unreadable (counted by the dataset)
            px = torch.stack([e["pixel_values"] for _, e in ex]).to(vdev, vdtype)
            caps = [e["caption"] for _, e in ex]
            with torch.no_grad():
                dist = vae.encode(px).latent_dist
                out["mean"].append(dist.mean.float().cpu())
                out["std"].append(dist.std.float().cpu())
                out["cond"].append(encode_text(pipe, caps).float().cpu())
            kept += [i for i, _ in ex]
            captions += caps
        if not kept:
            C = vae.config.latent_channels
            empty = torch.zeros(0, C, 1, 1)
            return {"mean": empty, "std": empty, "cond": torch.zeros(0, 1, 1), "index": torch.zeros(0, dtype=torch.long)}, []
        return {**{k: torch.cat(v) for k, v in out.items()}, "index": torch.tensor(kept, dtype=torch.long)}, captions

    store.fill(make, "latent cache")
    return store


# ---- one batch, whatever its source ------------------------------------------------------------------------------------------
def batch_latents(batch: dict, pipe, device: torch.device, vae_dtype: torch.dtype, generator: torch.Generator,
                  uncond_1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z_0, cond, uncond) of one batch: from pixels (VAE and text encoder), from the latent cache (a posterior draw
    with the step's generator, as `latent_dist.sample` draws it), or from teacher data (as stored)."""
    te_dtype = next(pipe.text_encoder.parameters()).dtype
    sf = pipe.vae.config.scaling_factor
    with torch.no_grad():
        if "z_0" in batch:  # teacher data: already scaled latents, as the pipeline returns them
            z_0 = batch["z_0"].to(device).float()
        elif "mean" in batch:  # the latent cache: z_0 ~ q(z_0 | x) = mean + std * eps
            mean, std = batch["mean"].to(device), batch["std"].to(device)
            eps = torch.randn(mean.shape, generator=generator, dtype=vae_dtype).to(device)
            z_0 = ((mean.to(vae_dtype) + std.to(vae_dtype) * eps) * sf).float()
        else:
            px = batch["pixel_values"].to(device, vae_dtype)
            z_0 = (pipe.vae.encode(px).latent_dist.sample(generator=generator) * sf).float()
        if "cond" in batch:  # stored: a tensor, or SDXL teacher data's TextCondition
            cond = stored_condition(batch, "cond", device, te_dtype)
        else:  # SDXL: with the batch's size / crop time ids at the target size of z_0
            size = time_ids_of(batch, z_0.shape[-1] * vae_scale_factor(pipe.vae))
            cond = encode_condition(pipe, batch["caption"], device, size)
        uncond = stored_condition(batch, "uncond", device, te_dtype) if "uncond" in batch else uncond_like(uncond_1, cond)
    return z_0, cond, uncond
