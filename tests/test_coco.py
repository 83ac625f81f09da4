"""The MSCOCO protocol's plumbing, with the Shapes evaluator standing in for Inception (no weights here)."""
import json

import pytest
import torch
from PIL import Image

from splam_studio.core.metrics import feature_statistics, frechet_distance
from splam_studio.models.generation import generate
from splam_studio.core.student import build_student
from splam_studio.shapes.evaluator import Evaluator
from splam_studio.shapes.grammar import to_tensor
from splam_studio.tools.coco import evaluate, load_captions, load_real
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


def test_real_images_are_the_prompts_files_in_order(coco):
    """Image k of load_real is the file of prompt k: here a solid colour, resized and cropped to 16 x 16."""
    prompts = load_captions(coco / "captions.json", 6)
    real = load_real(coco / "val", prompts, 16)
    assert real.shape == (6, 3, 16, 16)
    for k, p in enumerate(prompts):
        colour = torch.tensor([40.0 * p.image_id, 200 - 30 * p.image_id, 90]) / 127.5 - 1
        assert torch.allclose(real[k], colour[:, None, None].expand(3, 16, 16), atol=4 / 127.5), (k, p)


def test_fid_is_the_frechet_distance_of_generated_against_real_features(coco):
    """evaluate() generates batch b from seed + b, and compares those images' features with the real ones'."""
    prompts = load_captions(coco / "captions.json", 6)
    real = load_real(coco / "val", prompts, 16)
    torch.manual_seed(0)
    ev = Evaluator().eval()
    pipe = make_tiny_pipeline(coco / "tok")
    t = evaluate(pipe, prompts, real, ev.features, sampler="ddim", steps=2, guidance_scale=2.0, batch=3)
    caps = [p.caption for p in prompts]
    fake = [generate(pipe, prompt=caps[i:i + 3], sampler="ddim", steps=2, seed=b, guidance_scale=2.0).images
            for b, i in enumerate(range(0, 6, 3))]
    f_fake, f_real = ev.features(to_tensor(fake[0] + fake[1])), ev.features(real)
    expected = frechet_distance(*feature_statistics(f_fake), *feature_statistics(f_real))
    assert t["n"] == 6 and t["fid"] == pytest.approx(expected, rel=1e-6)
    floor = frechet_distance(*feature_statistics(f_real), *feature_statistics(f_real))  # the real set against itself
    assert abs(floor) < 1e-4 and t["fid"] > 1.0, (floor, t["fid"])
    student = build_student(pipe.unet, "fresh", generator=torch.Generator().manual_seed(0))
    s = evaluate(pipe, prompts, real, ev.features, sampler="lcm", steps=1, unet=student, batch=3)
    assert s["n"] == 6 and s["fid"] > 1.0 and s["fid"] != pytest.approx(t["fid"], rel=1e-3), (s["fid"], t["fid"])
    again = evaluate(pipe, prompts, real, ev.features, sampler="ddim", steps=2, guidance_scale=2.0, batch=3)
    assert again["fid"] == pytest.approx(t["fid"])
