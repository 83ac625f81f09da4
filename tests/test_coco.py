"""The MSCOCO protocol's plumbing, with the Shapes evaluator standing in for Inception (no weights here)."""
import json

import pytest
import torch
from PIL import Image

from splam_studio.tools.coco import evaluate, load_captions, load_real
from splam_studio.shapes.evaluator import Evaluator
from splam_studio.core.student import build_student
from tests.tiny import make_tiny_pipeline


@pytest.fixture()
def coco(tmp_path):
    imgs = tmp_path / "val"
    imgs.mkdir()
    images, anns = [], []
    for i in range(6):
        Image.new("RGB", (40, 30), (40 * i, 200 - 30 * i, 90)).save(imgs / f"{i:012d}.jpg")
        images.append({"id": i, "file_name": f"{i:012d}.jpg"})
        anns += [{"image_id": i, "caption": f"one red circle {j}"} for j in range(2)]
    (tmp_path / "captions.json").write_text(json.dumps({"images": images, "annotations": anns}))
    return tmp_path


def test_captions_are_one_per_image_and_seeded(coco):
    a, b = load_captions(coco / "captions.json", 4, seed=1), load_captions(coco / "captions.json", 4, seed=1)
    assert a == b and len({p.image_id for p in a}) == 4
    with pytest.raises(ValueError, match="has 6"):
        load_captions(coco / "captions.json", 7)
    (coco / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a COCO captions file"):
        load_captions(coco / "bad.json", 1)


def test_fid_plumbing_with_the_shapes_evaluator(coco):
    prompts = load_captions(coco / "captions.json", 6)
    real = load_real(coco / "val", prompts, 16)
    assert real.shape == (6, 3, 16, 16) and real.min() >= -1 and real.max() <= 1
    torch.manual_seed(0)
    ev = Evaluator().eval()
    pipe = make_tiny_pipeline(coco / "tok")
    student = build_student(pipe.unet, "fresh", generator=torch.Generator().manual_seed(0))
    t = evaluate(pipe, prompts, real, ev.features, sampler="ddim", steps=2, guidance_scale=2.0, batch=3)
    s = evaluate(pipe, prompts, real, ev.features, sampler="lcm", steps=1, unet=student, batch=3)
    assert t["n"] == s["n"] == 6 and t["fid"] > 0 and s["fid"] > 0
    assert evaluate(pipe, prompts, real, ev.features, sampler="ddim", steps=2, guidance_scale=2.0, batch=3)["fid"] == pytest.approx(t["fid"])
