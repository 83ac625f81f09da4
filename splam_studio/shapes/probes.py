"""Measuring the Shapes teacher: prompt accuracy and Shapes-FID per split, the text-encoder and position probes,
and a captioned grid of samples.

    python -m splam_studio.tools.world evaluate   # -> benchmarks/teacher.json
    python -m splam_studio.tools.world diagnose   # text_separation
    python -m splam_studio.tools.world grid       # -> docs/teacher_grid.png
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import replace
from pathlib import Path

import torch

from .evaluator import Evaluator
from .grammar import ATTRIBUTE_VALUES, ATTRIBUTES, POSITIONS, render, sample_specs
from .recipe import PRESETS
from ..core.metrics import feature_statistics, frechet_distance
from ..models.generation import generate
from ..core.teacher import as_condition, encode_condition
from ..models.loading import load_teacher


def evaluate(weights: str | Path = "weights", n: int = 1000, steps: int = 50, guidance: float | None = None,
             out: str | Path = "benchmarks/teacher.json", seed: int = 4321, log=print,
             device: torch.device | str = "cpu", teacher: str = "shapes-teacher") -> dict:
    """Teacher quality per split: prompt accuracy and Shapes-FID of `steps`-step DDIM, next to the real-vs-real floor.

    teacher: the pipeline folder under `weights` (shapes-xl-teacher for Shapes-XL, at its default size conditioning).
    """
    weights = Path(weights)
    pipe = load_teacher(str(weights / teacher)).to(device)
    ev = Evaluator.from_pretrained(weights / "shapes-evaluator", device=device)
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
    doc = {"description": f"`python -m splam_studio.tools.world evaluate`: the embedded teacher ({teacher}), {steps}-step DDIM at guidance {guidance}, "
                          f"{n} captions per split (held-out = (shape, colour) pairs never seen in training), fixed seeds. "
                          "FID on the evaluator's features against real renders of the same captions; the floor is "
                          "real against an independent real draw. Real images score "
                          + ", ".join(f"{k} {v['real_prompt_acc']:.3f}" for k, v in res.items()) + " prompt accuracy.",
           "teacher": teacher, "steps": steps, "guidance": guidance, "splits": res, "position_probe": probe}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(doc, indent=2))
    return doc


@torch.no_grad()
def text_separation(pipe, n: int = 64, seed: int = 0) -> dict:
    """How far the text encoder's output moves when one attribute's word changes (all else equal).

    Per attribute: mean over n captions and over the other values of |e' - e| / |e|, e the encoder output the UNet
    reads (SD: the last hidden state; SDXL: both encoders' penultimate states), summed over the tokens from the
    changed word on. Near 0: the encoder hands the UNet (almost) the same conditioning whatever the word, so the
    teacher cannot follow that attribute.
    """
    def enc(captions: list[str]) -> torch.Tensor:  # what the UNet cross-attends to (SDXL: both encoders' embeds)
        return as_condition(encode_condition(pipe, captions)).embeds.float().cpu()  # (B, L, D)

    specs = sample_specs(n, seed, "train")
    base = enc([s.caption() for s in specs])
    out = {}
    for a in ATTRIBUTES:
        rel = []
        for v in range(len(ATTRIBUTE_VALUES[a])):
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
                guidance: float | None = None, seed: int = 7, device: torch.device | str = "cpu",
                teacher: str = "shapes-teacher") -> Path:
    """A captioned grid of teacher samples: train captions on the top row, held-out captions below."""
    from PIL import Image, ImageDraw

    pipe = load_teacher(str(Path(weights) / teacher)).to(device)
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
