"""The teacher data of a prompts file as an image folder (issue 23's diagnostic): PNG + same-name .txt captions.

It makes (or reuses) exactly the store that `train_cli.py --preset shapes --prompts FILE --prompts-seed S --prompts-w W`
makes, then VAE-decodes its z_0. A student trained on this folder through the plain image path (`--data DIR`) sees the teacher's
own images, re-encoded by the VAE at every step as rendered data is, so its gap to a `--prompts` student isolates the
pipeline (stored deterministic latents vs VAE posterior draws) from the content (the teacher's images vs renders).

    python scripts/teacher_images.py --prompts runs/shapes_prompts.txt --cache runs/prompt_gap/.cache --w 6.5 \
        --out runs/teacher_images
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from splam_studio.models.generation import decode_latents  # noqa: E402
from splam_studio.models.loading import load_teacher  # noqa: E402
from splam_studio.training.cli import PRESETS  # noqa: E402
from splam_studio.training.latents import read_prompts, teacher_data  # noqa: E402
from splam_studio.training.loop import TrainConfig, teacher_data_w  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--cache", required=True, help="the runs' <output_dir>/.cache, so the training runs reuse the store")
    ap.add_argument("--out", help="the image folder (none: only make the store, for --prompts runs to reuse)")
    ap.add_argument("--w", type=float, help="the data's guidance w (train_cli --prompts-w; default: train_cli's, CFG 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--images-per-prompt", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg = TrainConfig(**PRESETS["shapes"], prompts=a.prompts, prompts_seed=a.seed, prompts_w=a.w,
                      images_per_prompt=a.images_per_prompt)
    pipe = load_teacher(cfg.teacher)
    store = teacher_data(pipe, read_prompts(a.prompts), Path(a.cache), w=teacher_data_w(cfg), steps=cfg.num_ddim_steps,
                         seed=a.seed, images_per_prompt=cfg.images_per_prompt, batch_size=cfg.batch_size)
    data = store.dataset()
    if not a.out:
        print(f"{len(data)} teacher latents in {store.root}")
        return
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for b0 in range(0, len(data), 64):
        items = [data[i] for i in range(b0, min(len(data), b0 + 64))]
        images = decode_latents(pipe, torch.stack([it["z_0"] for it in items]))
        for i, (im, it) in enumerate(zip(images, items)):
            im.save(out / f"{b0 + i:05d}.png")
            (out / f"{b0 + i:05d}.txt").write_text(it["caption"] + "\n")
    print(f"{len(data)} teacher images in {out}")


if __name__ == "__main__":
    main()
