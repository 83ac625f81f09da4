"""Training data: every source yields {"pixel_values": float32 (3, R, R) in [-1, 1], "caption": str}.

Sources, dispatched by `build_dataset(source, resolution)`:
  shapes | shapes:N                  the procedural Shapes world (splam_studio.shapes.grammar)
  DIR with metadata.jsonl            imagefolder style: {"file_name": ..., "text" | "caption": ...} per line
  DIR saved by datasets              `datasets.Dataset.save_to_disk` output (load_from_disk)
  DIR of images (+ same-name .txt)   recursive; a missing .txt gives the empty caption (counted)
  DIR of .tar files, a .tar path, a glob, a brace pattern (shard-{000..009}.tar) or a URL: webdataset shards
  hf:NAME or owner/name              `datasets.load_dataset` (offline: only what is in the local cache)

An unreadable entry (corrupt or truncated image, too many pixels, caption that is not UTF-8) is skipped and
counted in the dataset's `SkipCounter`, never a crash; a source with nothing usable is a `DataError` at build time.
With DataLoader workers each worker counts its own skips (the log lines still show every reason).
"""
from __future__ import annotations

import glob
import io
import json
import logging
import math
import os
import tarfile
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MAX_PIXELS = 8192 * 8192  # decompression-bomb guard: larger images are skipped (PIL's own limit is ~89 Mpx)
WHITE = (255, 255, 255)  # transparent pixels are composited on white
CAPTION_COLUMNS = ("caption", "text", "prompt", "captions", "sentence", "txt", "description", "label")
IMAGE_COLUMNS = ("image", "img", "png", "jpg", "jpeg", "webp", "picture", "pixel_values")
WDS_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")
WDS_CAPTION_KEYS = ("txt", "caption", "text", "prompt")
WDS_URL_PREFIXES = ("http://", "https://", "s3://", "gs://", "pipe:", "file:")
DEFAULT_SHAPES_N = 10_000
MAX_LOGGED_PER_REASON = 5  # each reason is logged this many times, then only counted
VALID_FORMS = (
    "valid sources: 'shapes' or 'shapes:N'; a folder of images with same-name .txt captions; a folder with "
    "metadata.jsonl (file_name + text/caption); a folder written by datasets.save_to_disk; webdataset shards "
    "(a .tar, a folder of .tar, a glob, a brace pattern like data-{000..009}.tar, or an http(s):// URL); "
    "'hf:NAME' or 'owner/name' for datasets.load_dataset"
)

# skip / note reasons
CORRUPT = "corrupt or truncated image"
TOO_LARGE = "image larger than max_pixels"
NOT_UTF8 = "caption not UTF-8"
MISSING_CAPTION = "missing caption (used '')"
EMPTY_CAPTION = "empty caption (used '')"
NO_IMAGE = "sample without an image"
BAD_METADATA = "bad metadata.jsonl line"
MISSING_FILE = "metadata file_name not found or outside the folder"
NOT_A_TAR = "shard is not a tar file"


class DataError(ValueError):
    """A data source that cannot be used; the message lists the valid forms."""


@dataclass
class SkipCounter:
    """Counts skipped entries (and accepted-but-odd ones, `notes`) by reason, each entry once however often it is
    read; logs the first few of each reason and names them in `summary()`."""

    name: str = "data"
    skipped: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)
    seen: dict = field(default_factory=dict)  # (kind, reason) -> entries counted, in order

    def _count(self, kind: str, counter: Counter, reason: str, where: str) -> bool:
        entries = self.seen.setdefault((kind, reason), [])
        if where and where in entries:
            return False
        entries.append(where)
        counter[reason] += 1
        return counter[reason] <= MAX_LOGGED_PER_REASON

    def skip(self, reason: str, where: str = "") -> None:
        if self._count("skip", self.skipped, reason, where):
            log.warning("%s: skipped %s (%s)", self.name, where, reason)

    def note(self, reason: str, where: str = "") -> None:
        if self._count("note", self.notes, reason, where):
            log.info("%s: %s: %s", self.name, where, reason)

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def _part(self, kind: str, reason: str, n: int) -> str:
        names = [w for w in self.seen.get((kind, reason), []) if w]
        shown = ", ".join(names[:MAX_LOGGED_PER_REASON]) + (f" and {len(names) - MAX_LOGGED_PER_REASON} more"
                                                              if len(names) > MAX_LOGGED_PER_REASON else "")
        return f"{n} x {reason}" + (f" ({shown})" if shown else "")

    def summary(self) -> str:
        parts = ([self._part("skip", r, n) for r, n in self.skipped.most_common()]
                 + [self._part("note", r, n) for r, n in self.notes.most_common()])
        return f"{self.name}: " + ("; ".join(parts) if parts else "no skips")


# ---- images and captions ---------------------------------------------------------------------------------------
def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: transparency composited on white, 16-bit / int / float scaled to 8 bits, CMYK converted."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 1.0 if img.mode == "F" and arr.max(initial=0) <= 1.0 else 255.0 if arr.max(initial=0) <= 255 else 65535.0
        img = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def resize_shorter(img: Image.Image, resolution: int) -> Image.Image:
    """Shorter side to `resolution` (bicubic, antialiased); the longer keeps the aspect ratio."""
    w, h = img.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    return img.resize((nw, nh), Image.BICUBIC) if (nw, nh) != (w, h) else img


def resize_center_crop(img: Image.Image, resolution: int) -> Image.Image:
    """Shorter side to `resolution` (bicubic, antialiased), then the centre square."""
    img = resize_shorter(img, resolution)
    nw, nh = img.size
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


@dataclass(frozen=True)
class SizeConditionedCrop:
    """SDXL's data recipe (diffusers' SDXL training scripts): shorter side to `resolution`, a random square crop, and
    the conditioning SDXL's time ids take, recorded per sample: the original size (h, w) and the crop's top-left
    corner (top, left) in the resized image. The crop is drawn from (seed, the item's name): the same item gets the
    same crop in every epoch and on resume. Pass it as a dataset's `resolution`."""
    resolution: int
    seed: int = 0

    def frame(self, img: Image.Image, key: str) -> dict:
        """{"pixel_values" (3, R, R), "original_size" (2,), "crop_top_left" (2,)} of an RGB image."""
        import random

        w, h = img.size
        img = resize_shorter(img, self.resolution)
        nw, nh = img.size
        rng = random.Random(f"{self.seed}:{key}")  # str seeds hash with sha512: stable across processes
        top, left = rng.randint(0, nh - self.resolution), rng.randint(0, nw - self.resolution)
        crop = img.crop((left, top, left + self.resolution, top + self.resolution))
        return {"pixel_values": image_to_tensor(crop), "original_size": torch.tensor([h, w]),
                "crop_top_left": torch.tensor([top, left])}


def time_ids_of(batch: dict, resolution: int) -> torch.Tensor:
    """SDXL add_time_ids (B, 6) of a batch: its recorded original sizes and crops, the target size resolution;
    a batch without them (a source that renders at the training size) is its own original, uncropped."""
    from ..core.teacher import time_ids

    R = (resolution, resolution)
    if "original_size" not in batch:
        return time_ids(R, (0, 0), R)
    return time_ids(batch["original_size"], batch["crop_top_left"], R)


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 (3, H, W) in [-1, 1]."""
    arr = np.asarray(img, dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)


def open_image(src: str | Path | bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode fully, refusing more than max_pixels before decoding; raises OSError / ValueError on bad data."""
    fp = io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = Image.open(fp)
        w, h = img.size
        if w * h > max_pixels:
            raise _TooLarge(f"{w}x{h} > {max_pixels} pixels")
        img.load()
    return ImageOps.exif_transpose(img)


class _TooLarge(ValueError):
    pass


def probe_image(path: Path, counter: SkipCounter, where: str, max_pixels: int = MAX_PIXELS) -> bool:
    """True when the file's header reads as an image of at most max_pixels (no decoding); else counted, False."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        counter.skip(TOO_LARGE, where)
        return False
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, EOFError):
        counter.skip(CORRUPT, where)
        return False
    if w * h > max_pixels:
        counter.skip(TOO_LARGE, where)
        return False
    return True


def load_pixels(src: str | Path | bytes, resolution: "int | SizeConditionedCrop", counter: SkipCounter, where: str,
                max_pixels: int = MAX_PIXELS) -> torch.Tensor | dict | None:
    """(3, R, R) in [-1, 1] (a SizeConditionedCrop: its dict with the size conditioning), or None (counted) when
    the image cannot be used."""
    try:
        img = open_image(src, max_pixels)
    except (_TooLarge, Image.DecompressionBombError, Image.DecompressionBombWarning):
        counter.skip(TOO_LARGE, where)
        return None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, EOFError):
        counter.skip(CORRUPT, where)
        return None
    if isinstance(resolution, SizeConditionedCrop):
        return resolution.frame(to_rgb(img), where)
    return image_to_tensor(resize_center_crop(to_rgb(img), resolution))


def decode_caption(raw: bytes | str | None, counter: SkipCounter, where: str) -> str | None:
    """Stripped caption; '' for missing / empty (noted), None for undecodable bytes (skipped)."""
    if raw is None:
        counter.note(MISSING_CAPTION, where)
        return ""
    if not isinstance(raw, (str, bytes, bytearray)):
        raw = str(raw)
    if isinstance(raw, (bytes, bytearray)):
        try:
            raw = bytes(raw).decode("utf-8-sig")
        except UnicodeDecodeError:
            counter.skip(NOT_UTF8, where)
            return None
    text = " ".join(str(raw).split())
    if not text:
        counter.note(EMPTY_CAPTION, where)
    return text


def make_example(pixels: torch.Tensor | dict | None, caption: str | None) -> dict | None:
    """{"pixel_values", "caption"}, plus the size conditioning when `pixels` is a SizeConditionedCrop's dict."""
    if pixels is None or caption is None:
        return None
    if isinstance(pixels, dict):
        return {**pixels, "caption": caption}
    return {"pixel_values": pixels, "caption": caption}


def example_from(img, raw_caption, resolution: int, counter: SkipCounter, where: str, max_pixels: int) -> dict | None:
    """An image source (bytes or path; None = missing) and a raw caption -> example dict, or None with the reason counted."""
    if img is None:
        counter.skip(NO_IMAGE, where)
        return None
    pixels = load_pixels(img, resolution, counter, where, max_pixels)
    if pixels is None:
        return None
    return make_example(pixels, decode_caption(raw_caption, counter, where))


# ---- local folders ---------------------------------------------------------------------------------------------
def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


class CaptionFolderDataset(Dataset):
    """Images under `root` (recursive), each captioned by the same-name .txt beside it.

    Every file's header is read once here: files that are not images, or too large, are skipped (counted) before
    training, so `len()` is the number of usable items; an image truncated after its header is skipped when read.
    """

    def __init__(self, root: str | Path, resolution: int, max_pixels: int = MAX_PIXELS):
        self.root, self.resolution, self.max_pixels = Path(root), resolution, max_pixels
        found = sorted(p for p in self.root.rglob("*") if _is_image(p))
        self.counter = SkipCounter(str(self.root))
        if not found:
            raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {self.root}; {VALID_FORMS}")
        self.files = [p for p in found if probe_image(p, self.counter, self._where(p), max_pixels)]
        if not self.files:
            raise DataError(f"none of the {len(found)} images under {self.root} can be read "
                            f"({self.counter.summary()}); replace or remove those files")

    def _where(self, path: Path) -> str:
        return str(path.relative_to(self.root))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict | None:
        path = self.files[i]
        pixels = load_pixels(path, self.resolution, self.counter, self._where(path), self.max_pixels)
        if pixels is None:
            return None
        txt = path.with_suffix(".txt")
        return make_example(pixels, decode_caption(txt.read_bytes() if txt.is_file() else None, self.counter,
                                                   self._where(path)))


class MetadataFolderDataset(Dataset):
    """Imagefolder style: `root/metadata.jsonl`, one {"file_name": ..., "text" | "caption": ...} per line."""

    def __init__(self, root: str | Path, resolution: int, caption_column: str | None = None,
                 image_column: str | None = None, max_pixels: int = MAX_PIXELS):
        self.root, self.resolution, self.max_pixels = Path(root).resolve(), resolution, max_pixels
        self.counter = SkipCounter(str(self.root / "metadata.jsonl"))
        self.image_column = image_column or "file_name"
        self.entries: list[tuple[Path, Any]] = []
        self.columns: set[str] = set()
        lines = (self.root / "metadata.jsonl").read_bytes().splitlines()
        for n, line in enumerate(lines, 1):
            if line.strip():
                self._add(line, caption_column, f"metadata.jsonl:{n}")
        if not self.entries:
            raise DataError(f"{self.root / 'metadata.jsonl'} lists no usable image ({self.counter.summary()}); "
                            f"each line needs '{self.image_column}' and one of {CAPTION_COLUMNS}")
        if caption_column and caption_column not in self.columns:
            raise DataError(f"caption_column {caption_column!r} is in no line of metadata.jsonl; columns: "
                            f"{sorted(self.columns)}")

    def _add(self, line: bytes, caption_column: str | None, where: str) -> None:
        try:
            row = json.loads(line)
            name = row[self.image_column]
        except (ValueError, KeyError, TypeError):
            self.counter.skip(BAD_METADATA, where)
            return
        path = (self.root / str(name)).resolve()
        if not path.is_relative_to(self.root) or not path.is_file():
            self.counter.skip(MISSING_FILE, f"{where} {name}")
            return
        self.columns.update(row)
        column = caption_column or next((c for c in CAPTION_COLUMNS if c in row), None)
        self.entries.append((path, row.get(column) if column else None))

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict | None:
        path, raw = self.entries[i]
        pixels = load_pixels(path, self.resolution, self.counter, str(path), self.max_pixels)
        if pixels is None:
            return None
        return make_example(pixels, decode_caption(raw, self.counter, str(path)))


# ---- Hugging Face datasets -------------------------------------------------------------------------------------
def _pick_column(features: dict, given: str | None, candidates: tuple[str, ...], want_image: bool) -> str:
    import datasets

    if given is not None:
        if given not in features:
            raise DataError(f"column {given!r} not in the dataset; columns: {sorted(features)}")
        return given
    typed = [k for k, f in features.items() if isinstance(f, datasets.Image) == want_image
             and (want_image or getattr(f, "dtype", None) in ("string", "large_string"))]
    for c in candidates:
        if c in typed:
            return c
    if typed:
        return typed[0]
    kind = "image" if want_image else "caption (string)"
    flag = "image_column" if want_image else "caption_column"
    raise DataError(f"no {kind} column found among {sorted(features)}; pass {flag}=...")


class HFImageTextDataset(Dataset):
    """A `datasets.Dataset` with an image column and a caption column, decoded with the same guards."""

    def __init__(self, ds: Any, resolution: int, caption_column: str | None = None,
                 image_column: str | None = None, max_pixels: int = MAX_PIXELS, name: str = "datasets"):
        import datasets

        self.image_column = _pick_column(ds.features, image_column, IMAGE_COLUMNS, want_image=True)
        self.caption_column = _pick_column(ds.features, caption_column, CAPTION_COLUMNS, want_image=False)
        if isinstance(ds.features[self.image_column], datasets.Image):  # decode ourselves, with the guards
            ds = ds.cast_column(self.image_column, datasets.Image(decode=False))
        if len(ds) == 0:
            raise DataError(f"dataset {name} is empty")
        self.ds, self.resolution, self.max_pixels = ds, resolution, max_pixels
        self.counter = SkipCounter(name)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict | None:
        row = self.ds[i]
        where = f"row {i}"
        img = row[self.image_column]
        if isinstance(img, dict):  # datasets.Image(decode=False): {"bytes": ..., "path": ...}
            img = img.get("bytes") or img.get("path")
        if isinstance(img, Image.Image):
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            img = buf.getvalue()
        return example_from(img, row[self.caption_column], self.resolution, self.counter, where, self.max_pixels)


def _is_saved_dataset(path: Path) -> bool:
    return any((path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json"))


def load_hf_dataset(source: str, split: str = "train") -> Any:
    """`load_from_disk` for a saved folder, else `load_dataset` (offline: the local cache only)."""
    import datasets

    path = Path(source)
    try:
        ds = datasets.load_from_disk(str(path)) if path.is_dir() else datasets.load_dataset(source.removeprefix("hf:"), split=split)
    except Exception as e:  # noqa: BLE001 - any loader failure becomes one readable line
        raise DataError(f"cannot load dataset {source!r}: {type(e).__name__}: {e}. {VALID_FORMS}") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"dataset {source!r} has no split {split!r}; splits: {list(ds)}")
        ds = ds[split]
    return ds


# ---- webdataset shards -----------------------------------------------------------------------------------------
def expand_shards(source: str) -> list[str]:
    """Brace patterns, globs, a folder of .tar, or URLs -> the list of shard paths / URLs."""
    from braceexpand import braceexpand

    out: list[str] = []
    for part in source.split("::"):
        for pattern in braceexpand(part):
            if pattern.startswith(WDS_URL_PREFIXES):
                out.append(pattern)
            elif os.path.isdir(pattern):
                out += sorted(glob.glob(os.path.join(pattern, "*.tar")))
            elif glob.has_magic(pattern):
                out += sorted(glob.glob(pattern))
            else:
                out.append(pattern)
    return out


def check_local_shards(shards: list[str], counter: SkipCounter) -> list[str]:
    """Drop (and count) local shards that are missing or not tar files; URLs are checked while streaming."""
    good = []
    for s in shards:
        if s.startswith(WDS_URL_PREFIXES) and not s.startswith("file:"):
            good.append(s)
            continue
        path = s.removeprefix("file:")
        if os.path.isfile(path) and tarfile.is_tarfile(path):
            good.append(s)
        else:
            counter.skip(NOT_A_TAR if os.path.isfile(path) else "shard not found", s)
    return good


class WebDatasetSource(IterableDataset):
    """Streams (image, caption) samples from webdataset tar shards; bad samples and bad shards are counted."""

    def __init__(self, source: str, resolution: int, caption_column: str | None = None,
                 image_column: str | None = None, max_pixels: int = MAX_PIXELS, shuffle_buffer: int = 0,
                 seed: int = 0):
        self.counter = SkipCounter(f"webdataset {source}")
        shards = expand_shards(source)
        if not shards:
            raise DataError(f"no shards match {source!r}; {VALID_FORMS}")
        self.shards = check_local_shards(shards, self.counter)
        if not self.shards:
            raise DataError(f"none of the {len(shards)} shard(s) of {source!r} is a readable tar file "
                            f"({self.counter.summary()})")
        self.image_keys = (image_column,) if image_column else WDS_IMAGE_KEYS
        self.caption_keys = (caption_column,) if caption_column else WDS_CAPTION_KEYS
        self.resolution, self.max_pixels = resolution, max_pixels
        self.shuffle_buffer, self.seed = shuffle_buffer, seed

    def _samples(self) -> Iterator[dict]:
        import webdataset as wds

        stages: list[Any] = [wds.SimpleShardList(self.shards), wds.split_by_worker,
                             wds.tarfile_to_samples(handler=self._handler)]
        if self.shuffle_buffer > 0:
            stages.append(wds.shuffle(self.shuffle_buffer, rng=_worker_rng(self.seed)))
        return iter(wds.DataPipeline(*stages))

    def _handler(self, exn: Exception) -> bool:
        self.counter.skip(f"tar read error ({type(exn).__name__})", str(exn)[:200])
        return True  # keep going with the next sample / shard

    def decode(self, sample: dict) -> dict | None:
        """One raw webdataset sample -> example dict, or None (counted)."""
        key = sample.get("__key__")
        if not key:  # webdataset >= 0.2.96 end-of-shard marker: not data, not counted
            return None
        where = f"{sample.get('__url__', '?')}:{key}"
        img = next((sample[k] for k in self.image_keys if k in sample), None)
        raw = next((sample[k] for k in self.caption_keys if k in sample), None)
        if raw is None and "json" in sample:
            raw = _caption_from_json(sample["json"])
        return example_from(img, raw, self.resolution, self.counter, where, self.max_pixels)

    def __iter__(self) -> Iterator[dict]:
        for sample in self._samples():
            example = self.decode(sample)
            if example is not None:
                yield example


def _caption_from_json(raw: bytes) -> str | bytes | None:
    try:
        meta = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(meta, dict):
        return None
    return next((meta[c] for c in CAPTION_COLUMNS if isinstance(meta.get(c), str)), None)


def _worker_rng(seed: int):
    import random

    info = torch.utils.data.get_worker_info()
    return random.Random(seed * 1000 + (info.id if info else 0))


def _looks_like_shards(source: str) -> bool:
    s = source.lower()
    return s.startswith(WDS_URL_PREFIXES) or ".tar" in s or "{" in source or glob.has_magic(source)


# ---- the entry point ---------------------------------------------------------------------------------------------
def build_dataset(source: str, resolution: int, *, caption_column: str | None = None,
                  image_column: str | None = None, seed: int = 0, split: str = "train",
                  num_examples: int | None = None, max_pixels: int = MAX_PIXELS,
                  shuffle_buffer: int = 0, size_conditioning: bool = False) -> Dataset | IterableDataset:
    """The dataset for `source` (see the module docstring); raises DataError listing the valid forms.

    size_conditioning (SDXL teachers): image files are randomly cropped and each sample records its original size
    and crop corner (`SizeConditionedCrop`); the Shapes world renders at the training size (no keys: `time_ids_of`).
    """
    if not isinstance(resolution, int) or resolution < 8:
        raise DataError(f"resolution must be an integer >= 8, got {resolution!r}")
    source = str(source).strip()
    if source == "shapes" or source.startswith("shapes:"):
        return _shapes(source, resolution, seed, split, num_examples)
    if size_conditioning:
        resolution = SizeConditionedCrop(resolution, seed)
    path = Path(source).expanduser()
    if path.is_dir():
        return _local_folder(path, resolution, caption_column, image_column, split, max_pixels, shuffle_buffer, seed)
    if _looks_like_shards(source):
        return WebDatasetSource(source, resolution, caption_column, image_column, max_pixels, shuffle_buffer, seed)
    if path.is_file():
        raise DataError(f"{source} is a file that is not a .tar shard; {VALID_FORMS}")
    if source.startswith("hf:") or (source.count("/") == 1 and not source.startswith((".", "/", "~"))):
        ds = load_hf_dataset(source, split)
        return HFImageTextDataset(ds, resolution, caption_column, image_column, max_pixels, name=source)
    raise DataError(f"data source {source!r} not found; {VALID_FORMS}")


def _shapes(source: str, resolution: int, seed: int, split: str, num_examples: int | None) -> Dataset:
    from ..shapes.grammar import ShapesDataset  # written alongside; imported lazily

    n = num_examples or DEFAULT_SHAPES_N
    if ":" in source:
        try:
            n = int(source.split(":", 1)[1])
        except ValueError:
            raise DataError(f"'shapes:N' needs an integer N, got {source!r}") from None
    if n <= 0:
        raise DataError(f"the Shapes dataset needs N > 0 examples, got {n}")
    return ShapesDataset(n, seed, split, resolution)


def _local_folder(path: Path, resolution: int, caption_column: str | None, image_column: str | None,
                  split: str, max_pixels: int, shuffle_buffer: int, seed: int) -> Dataset | IterableDataset:
    if (path / "metadata.jsonl").is_file():
        return MetadataFolderDataset(path, resolution, caption_column, image_column, max_pixels)
    if _is_saved_dataset(path):
        ds = load_hf_dataset(str(path), split)
        return HFImageTextDataset(ds, resolution, caption_column, image_column, max_pixels, name=str(path))
    if not any(_is_image(p) for p in path.rglob("*")) and any(path.glob("*.tar")):
        return WebDatasetSource(str(path), resolution, caption_column, image_column, max_pixels, shuffle_buffer, seed)
    return CaptionFolderDataset(path, resolution, max_pixels)


def first_captions(dataset, n: int) -> list[str]:
    """The first n distinct non-empty captions of a local folder, a `datasets` source or the Shapes data, read
    without decoding an image (the validation prompts of a run that names none); [] for streamed shards, which
    cannot be read ahead."""
    from ..shapes.grammar import ShapesDataset

    counter = SkipCounter("captions")  # a caption that cannot be read is not a validation prompt; nothing is counted
    if isinstance(dataset, CaptionFolderDataset):
        raw = (p.with_suffix(".txt") for p in dataset.files)
        texts = (decode_caption(t.read_bytes() if t.is_file() else None, counter, "") for t in raw)
    elif isinstance(dataset, MetadataFolderDataset):
        texts = (decode_caption(c, counter, "") for _path, c in dataset.entries)
    elif isinstance(dataset, HFImageTextDataset):  # the caption column alone, of the first rows
        rows = dataset.ds.select(range(min(len(dataset.ds), 64 * n))).select_columns([dataset.caption_column])
        texts = (decode_caption(row[dataset.caption_column], counter, "") for row in rows)
    elif isinstance(dataset, ShapesDataset):
        texts = (spec.caption() for spec in dataset.specs)
    else:
        return []
    out: list[str] = []
    for text in texts:
        if text and text not in out:
            out.append(text)
            if len(out) == n:
                break
    return out


# ---- batching ----------------------------------------------------------------------------------------------------
def fit_batch_size(n: int, batch_size: int, world: int = 1) -> tuple[int, str | None]:
    """(batch size, note): a batch larger than a small data set shrinks to what one step can draw, with a note."""
    if n < world:
        raise DataError(f"the data set has {n} usable item(s), fewer than the {world} processes; add images")
    if n >= batch_size * world:
        return batch_size, None
    fitted = n // world
    return fitted, (f"batch size {batch_size} x {world} process(es) is more than the {n} usable items; using batch "
                    f"size {fitted} (set --batch-size to choose)")


def collate_drop_none(batch: list[dict | None]) -> dict | None:
    """default_collate over the examples that decoded; None when none did (skip that step)."""
    kept = [b for b in batch if b is not None]
    return default_collate(kept) if kept else None


def steps_per_epoch(num_examples: int, batch_size: int, num_workers: int = 0, drop_last: bool = True) -> int:
    """Batches per epoch; streamed shards are split across max(1, num_workers) workers (no division by zero)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    workers = max(1, num_workers)
    per_worker = num_examples / workers
    rounding = math.floor if drop_last else math.ceil
    return int(rounding(per_worker / batch_size)) * workers


def make_dataloader(dataset: Dataset | IterableDataset, batch_size: int, *, num_workers: int = 0,
                    shuffle: bool = True, seed: int = 0, drop_last: bool = True,
                    collate_fn: Callable = collate_drop_none) -> DataLoader:
    """A DataLoader that works at num_workers = 0; map-style data shuffled by a seeded generator."""
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    iterable = isinstance(dataset, IterableDataset)
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs.update(persistent_workers=True, prefetch_factor=2)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and not iterable, num_workers=num_workers,
                      drop_last=drop_last, collate_fn=collate_fn,
                      generator=torch.Generator().manual_seed(seed), **kwargs)


def non_empty(loader: DataLoader) -> Iterator[dict]:
    """The loader's batches, without the None a batch of only bad examples collates to."""
    for batch in loader:
        if batch is not None:
            yield batch
