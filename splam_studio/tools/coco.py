"""The MSCOCO protocol of the paper for real SD1.5 runs: FID on 5k (2017 val) or 30k (2014 val) captions, CLIP score.

    python -m splam_studio.tools.coco --teacher PATH_OR_ID --student weights/my-run --annotations captions_val2014.json \
        --images val2014/ --n 30000 --steps 2 4 --inception-weights pt_inception-2015-12-05.pth --clip PATH

Standard practice (as the paper): one random caption per image, images resized to 512 and centre-cropped, FID on
Inception-v3 pool features (torchmetrics / torch-fidelity), CLIP score 100 * max(cos, 0) with CLIP ViT. Everything
loads from local files: none of these weights can be downloaded here. The plumbing is tested with the Shapes
evaluator standing in for Inception (`features=` accepts any extractor).
"""
from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image

from ..core.metrics import feature_statistics, frechet_distance
from ..models.generation import generate

# images (N, 3, H, W) in [-1, 1] -> features (N, D)
FeatureFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class CocoPrompt:
    image_id: int
    file_name: str
    caption: str


def load_captions(annotations: str | Path, n: int, seed: int = 2024) -> list[CocoPrompt]:
    """n images drawn at random (seeded) from a COCO captions JSON, one random caption each."""
    data = json.loads(Path(annotations).read_text())
    if not {"images", "annotations"} <= data.keys():
        raise ValueError(f"{annotations} is not a COCO captions file (needs 'images' and 'annotations')")
    files = {im["id"]: im["file_name"] for im in data["images"]}
    by_image: dict[int, list[str]] = {}
    for a in data["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a["caption"].strip())
    ids = sorted(by_image)
    if n > len(ids):
        raise ValueError(f"asked for {n} captions but {annotations} has {len(ids)} captioned images")
    rng = random.Random(seed)
    return [CocoPrompt(i, files[i], rng.choice(by_image[i])) for i in rng.sample(ids, n)]


def load_real(folder: str | Path, prompts: Sequence[CocoPrompt], resolution: int) -> torch.Tensor:
    """The reference images, resized (shorter side) and centre-cropped, in [-1, 1]: (N, 3, R, R)."""
    from ..training.data import image_to_tensor, resize_center_crop, to_rgb

    return torch.stack([image_to_tensor(resize_center_crop(to_rgb(Image.open(Path(folder) / p.file_name)), resolution))
                        for p in prompts])


def inception_features(weights_path: str | Path, allow_pickle: bool = False) -> FeatureFn:
    """Inception-v3 pool3 features (the FID standard) through torchmetrics / torch-fidelity, from local weights."""
    if not allow_pickle:
        raise ValueError("the FID Inception weights (pt_inception-2015-12-05.pth) are a pickle file; pass --allow-pickle to load them")
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3
    except ImportError as e:
        raise ValueError("FID needs torchmetrics and torch-fidelity (pip install torchmetrics torch-fidelity); torch-fidelity pulls "
                         "torchvision, which must match your torch build") from e
    net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(weights_path))

    @torch.no_grad()
    def features(x: torch.Tensor) -> torch.Tensor:
        u8 = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return net(u8).reshape(len(x), -1).double()

    return features


def clip_score_fn(clip_path: str | Path) -> Callable[[torch.Tensor, list[str]], float]:
    """CLIP score 100 * mean(max(cos(image, text), 0)) with a local transformers CLIP model folder."""
    from transformers import CLIPModel, CLIPProcessor

    model, proc = CLIPModel.from_pretrained(clip_path, use_safetensors=True).eval(), CLIPProcessor.from_pretrained(clip_path)

    @torch.no_grad()
    def score(x: torch.Tensor, captions: list[str]) -> float:
        imgs = [Image.fromarray(((im.permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().numpy()) for im in x]
        inp = proc(text=captions, images=imgs, return_tensors="pt", padding=True, truncation=True)
        out = model(**inp)
        cos = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds)
        return float(100 * cos.clamp(min=0).mean())

    return score


def evaluate(pipe, prompts: Sequence[CocoPrompt], real: torch.Tensor, features: FeatureFn, *, sampler: str, steps: int,
             unet=None, guidance_scale: float = 1.0, batch: int = 16, seed: int = 0, clip_score=None) -> dict:
    """FID (and CLIP score) of one model/sampler/steps on the prompts, against the real images' features."""
    from ..shapes.grammar import to_tensor

    fake, scores = [], []
    caps = [p.caption for p in prompts]
    for b, i in enumerate(range(0, len(caps), batch)):
        out = generate(pipe, prompt=caps[i: i + batch], sampler=sampler, steps=steps, seed=seed + b, unet=unet,
                       guidance_scale=guidance_scale)
        x = to_tensor(out.images)
        fake.append(features(x))
        if clip_score is not None:
            scores.append(clip_score(x, caps[i: i + batch]) * len(x))
    f_real = torch.cat([features(real[i: i + 256]) for i in range(0, len(real), 256)])
    fid = frechet_distance(*feature_statistics(torch.cat(fake)), *feature_statistics(f_real))
    res = {"sampler": sampler, "steps": steps, "n": len(caps), "fid": fid}
    if clip_score is not None:
        res["clip_score"] = sum(scores) / len(caps)
    return res


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="diffusers folder, single-file .safetensors or hub id (local cache)")
    p.add_argument("--student", action="append", default=[], help="student run folder(s); repeat")
    p.add_argument("--annotations", required=True, help="captions_val2014.json or captions_val2017.json")
    p.add_argument("--images", required=True, help="the matching val image folder")
    p.add_argument("--n", type=int, default=5000, help="5000 (COCO2017-5k) or 30000 (COCO2014-30k)")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--teacher-steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=4.0, help="teacher CFG scale (paper: w = 3 and 8 in LCM form = 4 and 9)")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--inception-weights", required=True, help="local pt_inception-2015-12-05.pth (pickle; needs --allow-pickle)")
    p.add_argument("--allow-pickle", action="store_true")
    p.add_argument("--clip", default=None, help="local CLIP model folder for CLIP score")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--out", default="benchmarks/coco.json")
    p.add_argument("--device", default="auto", help="auto, cuda, mps or cpu (sampling in fp16 on a GPU, fp32 on the CPU)")
    a = p.parse_args(argv)
    from ..models.loading import load_student, load_teacher
    from ..training.device import resolve_runtime

    rt = resolve_runtime(a.device)
    pipe = load_teacher(a.teacher, torch_dtype=rt.sample_dtype).to(rt.device)
    prompts = load_captions(a.annotations, a.n)
    real = load_real(a.images, prompts, a.resolution)
    feats = inception_features(a.inception_weights, a.allow_pickle)
    clip = clip_score_fn(a.clip) if a.clip else None
    rows = [evaluate(pipe, prompts, real, feats, sampler="ddim", steps=a.teacher_steps, guidance_scale=a.guidance,
                     batch=a.batch, clip_score=clip) | {"model": "teacher"}]
    for s in a.student:
        unet = load_student(s, pipe)
        rows += [evaluate(pipe, prompts, real, feats, sampler="lcm", steps=k, unet=unet, batch=a.batch, clip_score=clip)
                 | {"model": s} for k in a.steps]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"n": a.n, "annotations": str(a.annotations), "rows": rows}, indent=2))
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
