"""The Shapes world: procedural (image, caption) pairs, deterministic by seed.

A caption names six attributes, each recoverable as an integer label:

    "two large red circles at the left on a black background"
     count size colour shape    position         background

Images are 64x64 RGB, drawn at 4x and downsampled with LANCZOS (antialiased). A fixed set of
(shape, colour) pairs, HELDOUT_PAIRS, never appears in the "train" split: it measures whether a model
composes attributes it only saw apart.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

# ---- the grammar ----------------------------------------------------------------------------------
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
SHAPE_PLURALS = ("circles", "squares", "triangles", "stars", "crosses", "diamonds")
COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan")
COLOUR_RGB = {
    "red": (230, 30, 30), "green": (30, 200, 40), "blue": (40, 80, 255),
    "yellow": (240, 220, 20), "magenta": (220, 40, 220), "cyan": (20, 215, 230),
}
SIZES = ("small", "large")
SIZE_PX = {"small": 16.0, "large": 26.0}  # across, at 64 px; small >= 14 px so an 8x8 latent holds it
POSITIONS = ("left", "right", "top", "bottom", "center")
POSITION_XY = {"left": (16, 32), "right": (48, 32), "top": (32, 16), "bottom": (32, 48), "center": (32, 32)}
COUNTS = ("one", "two")
BACKGROUNDS = ("black", "gray", "white")
BACKGROUND_RGB = {"black": (0, 0, 0), "gray": (128, 128, 128), "white": (255, 255, 255)}
FILLERS = ("at", "the", "on", "a", "background")

ATTRIBUTES = ("shape", "colour", "size", "position", "count", "background")
ATTRIBUTE_VALUES = {
    "shape": SHAPES, "colour": COLOURS, "size": SIZES,
    "position": POSITIONS, "count": COUNTS, "background": BACKGROUNDS,
}
NUM_CLASSES = {a: len(v) for a, v in ATTRIBUTE_VALUES.items()}

VOCAB = sorted(set(SHAPES + SHAPE_PLURALS + COLOURS + SIZES + POSITIONS + COUNTS + BACKGROUNDS + FILLERS))

# One held-out pair per shape and per colour (a Latin diagonal), so every word is still trained.
HELDOUT_PAIRS = (("circle", "blue"), ("square", "yellow"), ("triangle", "magenta"),
                 ("star", "green"), ("cross", "cyan"), ("diamond", "red"))
_HELDOUT_IDX = {(SHAPES.index(s), COLOURS.index(c)) for s, c in HELDOUT_PAIRS}
SPLITS = ("train", "heldout", "all")

RESOLUTION = 64
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class ShapeSpec:
    """One scene: integer index into each attribute's value list."""

    shape: int
    colour: int
    size: int
    position: int
    count: int
    background: int

    def caption(self) -> str:
        noun = (SHAPE_PLURALS if self.count == 1 else SHAPES)[self.shape]
        return (f"{COUNTS[self.count]} {SIZES[self.size]} {COLOURS[self.colour]} {noun} "
                f"at the {POSITIONS[self.position]} on a {BACKGROUNDS[self.background]} background")

    def labels(self) -> dict[str, int]:
        return {a: getattr(self, a) for a in ATTRIBUTES}

    @property
    def is_heldout(self) -> bool:
        return (self.shape, self.colour) in _HELDOUT_IDX


def parse_caption(text: str) -> dict[str, int]:
    """Labels of the attributes a (user-typed) caption names; -1 where an attribute is not named."""
    words = re.findall(r"[a-z]+", text.lower())
    words = ["gray" if w == "grey" else "center" if w in ("centre", "middle") else
             "colour" if w == "color" else w for w in words]
    labels = {a: -1 for a in ATTRIBUTES}
    for w in words:
        if w in SHAPE_PLURALS:
            labels["shape"] = SHAPE_PLURALS.index(w)
            if labels["count"] == -1:
                labels["count"] = 1
            continue
        for a in ATTRIBUTES:
            if a == "background":
                continue
            values = ATTRIBUTE_VALUES[a]
            if w in values:
                labels[a] = values.index(w)
    # the background is the colour word right before "background"
    for i, w in enumerate(words[1:], 1):
        if w == "background" and words[i - 1] in BACKGROUNDS:
            labels["background"] = BACKGROUNDS.index(words[i - 1])
    # a colour word that names the background is not the shape's colour
    named = [w for w in words if w in COLOURS]
    if named:
        labels["colour"] = COLOURS.index(named[0])
    if labels["count"] == -1 and labels["shape"] != -1:
        labels["count"] = 0
    return labels


def spec_from_caption(text: str) -> ShapeSpec:
    """The ShapeSpec a full caption describes; raises ValueError naming any attribute missing."""
    labels = parse_caption(text)
    missing = [a for a, v in labels.items() if v < 0]
    if missing:
        raise ValueError(f"caption {text!r} does not name: {missing}; valid values: "
                         + "; ".join(f"{a}={list(ATTRIBUTE_VALUES[a])}" for a in missing))
    return ShapeSpec(**labels)


def _as_rng(seed: int | np.random.Generator | torch.Generator) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, torch.Generator):
        return np.random.default_rng(int(torch.randint(0, 2**63 - 1, (1,), generator=seed)))
    return np.random.default_rng(int(seed))


def sample_specs(n: int, seed: int | np.random.Generator | torch.Generator = 0,
                 split: str = "train") -> list[ShapeSpec]:
    """n scenes drawn uniformly; the (shape, colour) pair from the split's allowed pairs."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = _as_rng(seed)
    all_pairs = [(s, c) for s in range(len(SHAPES)) for c in range(len(COLOURS))]
    pairs = {"all": all_pairs,
             "train": [p for p in all_pairs if p not in _HELDOUT_IDX],
             "heldout": sorted(_HELDOUT_IDX)}[split]
    pair_idx = rng.integers(0, len(pairs), n)
    rest = np.stack([rng.integers(0, NUM_CLASSES[a], n) for a in ATTRIBUTES[2:]], axis=1)
    return [ShapeSpec(pairs[p][0], pairs[p][1], *map(int, r)) for p, r in zip(pair_idx, rest)]


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a shape of circumradius r around (cx, cy), rotated by angle (radians)."""
    if shape == "square":
        pts = [(math.pi / 4 + k * math.pi / 2, r) for k in range(4)]
    elif shape == "diamond":
        pts = [(k * math.pi / 2, r) for k in range(4)]
    elif shape == "triangle":
        pts = [(-math.pi / 2 + k * 2 * math.pi / 3, r) for k in range(3)]
    elif shape == "star":
        pts = [(-math.pi / 2 + k * math.pi / 5, r if k % 2 == 0 else 0.45 * r) for k in range(10)]
    elif shape == "cross":
        w = 0.36  # arm half-width relative to r
        xy = [(w, 1), (w, w), (1, w), (1, -w), (w, -w), (w, -1),
              (-w, -1), (-w, -w), (-1, -w), (-1, w), (-w, w), (-w, 1)]
        return [(cx + r * (x * math.cos(angle) - y * math.sin(angle)),
                 cy + r * (x * math.sin(angle) + y * math.cos(angle))) for x, y in xy]
    else:
        raise ValueError(f"no polygon for shape {shape!r}; valid: {SHAPES}")
    return [(cx + rr * math.cos(a + angle), cy + rr * math.sin(a + angle)) for a, rr in pts]


def centers(spec: ShapeSpec) -> list[tuple[float, float]]:
    """Nominal centre(s), in 64-px coordinates, of the spec's shape(s)."""
    x, y = POSITION_XY[POSITIONS[spec.position]]
    if spec.count == 0:
        return [(x, y)]
    if POSITIONS[spec.position] in ("left", "right"):
        return [(x, 16), (x, 48)]  # a vertical pair in that half
    return [(16, y), (48, y)]  # a horizontal pair


def render(spec: ShapeSpec, rng: int | np.random.Generator = 0, resolution: int = RESOLUTION) -> Image.Image:
    """The spec drawn as an antialiased RGB image; rng draws small jitters of place, size and angle."""
    rng = _as_rng(rng)
    s = _SUPERSAMPLE * resolution / RESOLUTION
    size = SIZE_PX[SIZES[spec.size]] * rng.uniform(0.92, 1.08)
    img = Image.new("RGB", (round(RESOLUTION * s),) * 2, BACKGROUND_RGB[BACKGROUNDS[spec.background]])
    draw = ImageDraw.Draw(img)
    colour = COLOUR_RGB[COLOURS[spec.colour]]
    shape = SHAPES[spec.shape]
    for cx, cy in centers(spec):
        cx, cy = cx + rng.uniform(-2, 2), cy + rng.uniform(-2, 2)
        angle = rng.uniform(-0.15, 0.15)
        r = size / 2
        if shape == "circle":
            draw.ellipse([(cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s], fill=colour)
        else:
            # polygons with the same visual extent as a circle of diameter `size`
            scale = {"square": math.sqrt(2) * 0.9, "diamond": 1.1, "triangle": 1.2,
                     "star": 1.25, "cross": 1.05}[shape]
            draw.polygon([(px * s, py * s) for px, py in _polygon(shape, cx, cy, r * scale, angle)], fill=colour)
    return img.resize((resolution, resolution), Image.LANCZOS)


# ---- SDXL's size / crop conditioning: renders at another resolution, recorded as time ids ----------------------
def draw_size(rng: np.random.Generator, plain: float, lowres: float, lowres_min: int,
              scale_max: float) -> tuple[int, int, int]:
    """(original size, crop top, crop left) of one training image at the native RESOLUTION.

    With probability `plain` the native size uncropped; with `lowres` a size in [lowres_min, RESOLUTION) (rendered
    there, then upscaled: original_size records the low resolution, as SDXL keeps it for small photos); otherwise a
    size in (RESOLUTION, scale_max x RESOLUTION] and a uniform RESOLUTION-px crop of it (crops_coords_top_left).
    """
    u = rng.random()
    if u < plain or (u >= plain + lowres and scale_max * RESOLUTION < RESOLUTION + 1):
        return RESOLUTION, 0, 0
    if u < plain + lowres:
        return int(rng.integers(lowres_min, RESOLUTION)), 0, 0
    size = int(rng.integers(RESOLUTION + 1, int(scale_max * RESOLUTION) + 1))
    top, left = (int(v) for v in rng.integers(0, size - RESOLUTION + 1, 2))
    return size, top, left


def render_sized(spec: ShapeSpec, rng: int | np.random.Generator, size: int, top: int, left: int) -> Image.Image:
    """The scene rendered at size x size, then cropped at (top, left) to RESOLUTION px, or upscaled when smaller."""
    img = render(spec, rng, size)
    if size < RESOLUTION:
        if top or left:
            raise ValueError(f"an image of {size} px < {RESOLUTION} has no crop, got ({top}, {left})")
        return img.resize((RESOLUTION, RESOLUTION), Image.LANCZOS)
    return img.crop((left, top, left + RESOLUTION, top + RESOLUTION))


def to_tensor(images: list[Image.Image] | Image.Image) -> torch.Tensor:
    """PIL image(s) -> float32 tensor in [-1, 1], (B, 3, H, W) (or (3, H, W) for one image)."""
    if isinstance(images, Image.Image):
        return to_tensor([images])[0]
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images])  # (B, H, W, 3)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


class ShapesDataset(torch.utils.data.Dataset):
    """n fixed (image, caption) pairs; item i is rendered with rng seeded by (seed, i)."""

    def __init__(self, n: int, seed: int = 0, split: str = "train", resolution: int = RESOLUTION):
        self.specs = sample_specs(n, seed, split)
        self.seed, self.split, self.resolution = seed, split, resolution

    def __len__(self) -> int:
        return len(self.specs)

    def __getitem__(self, i: int) -> dict:
        spec = self.specs[i]
        img = render(spec, np.random.default_rng([self.seed, i]), self.resolution)
        return {"pixel_values": to_tensor(img), "caption": spec.caption(), "labels": spec.labels()}

    def render_all(self) -> torch.Tensor:
        """Every image as uint8, (n, 3, H, W): the compact form the trainers cache."""
        out = torch.empty(len(self), 3, self.resolution, self.resolution, dtype=torch.uint8)
        for i, spec in enumerate(self.specs):
            img = render(spec, np.random.default_rng([self.seed, i]), self.resolution)
            out[i] = torch.from_numpy(np.array(img)).permute(2, 0, 1)
        return out

    def render_all_sized(self, plain: float, lowres: float, lowres_min: int,
                         scale_max: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Every image at the native resolution after `draw_size`'s rescale and crop, uint8 (n, 3, 64, 64), and its
        SDXL time ids (n, 6) float32 (original h, w, crop top, left, target h, w). The scene jitters come from the
        same rng as `render_all`, the size from its own, so a plain draw is `render_all`'s image."""
        from ..core.teacher import time_ids

        if self.resolution != RESOLUTION:
            raise ValueError(f"sized renders are at the native {RESOLUTION} px, the dataset is at {self.resolution}")
        out = torch.empty(len(self), 3, RESOLUTION, RESOLUTION, dtype=torch.uint8)
        sizes = []
        for i, spec in enumerate(self.specs):
            size, top, left = draw_size(np.random.default_rng([self.seed, i, 1]), plain, lowres, lowres_min, scale_max)
            img = render_sized(spec, np.random.default_rng([self.seed, i]), size, top, left)
            out[i] = torch.from_numpy(np.array(img)).permute(2, 0, 1)
            sizes.append((size, top, left))
        sz = torch.tensor(sizes, dtype=torch.float32)  # (n, 3)
        ids = time_ids(sz[:, [0, 0]], sz[:, 1:3], (RESOLUTION, RESOLUTION))
        return out, ids

    def label_tensor(self) -> torch.Tensor:
        """(n, len(ATTRIBUTES)) int64 labels in ATTRIBUTES order."""
        return torch.tensor([[getattr(s, a) for a in ATTRIBUTES] for s in self.specs], dtype=torch.long)
