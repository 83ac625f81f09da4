"""SDXL teacher data from prompts (training/latents.py `teacher_data` on a tiny SDXL pipeline, tests/tiny.py): the store
holds the stock StableDiffusionXLPipeline's guided run and its whole TextCondition (embeds, pooled, time ids), a resumed
generation remakes it exactly, train_cli.py trains on it and reuses it, and SD1.5 stores keep their layout and key."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from splam_studio.core.teacher import TextCondition, cfg_scale, empty_condition, uncond_like
from splam_studio.training import latents as L
from splam_studio.training.data import collate_drop_none
from splam_studio.training.latents import Prompt, batch_latents, store_key, teacher_data
from tests.tiny import make_tiny_pipeline, make_tiny_xl_pipeline

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [Prompt("one red circle", "two small blue squares"), Prompt("a large green star"),
           Prompt("two big blue squares", "one red circle")]
W, STEPS, SEED = 3.0, 2, 5
XL_TENSORS = ["z_0", "z_T", "cond", "cond_pooled", "cond_time_ids", "uncond", "uncond_pooled", "uncond_time_ids"]


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    return make_tiny_xl_pipeline(tmp_path_factory.mktemp("xl"))


def _store(pipe, root, prompts=PROMPTS, **kw):
    args = dict(w=W, steps=STEPS, images_per_prompt=1, seed=SEED, batch_size=2, shard_size=2)
    return teacher_data(pipe, prompts, root, **{**args, **kw})


def _stock(xl):
    """A stock StableDiffusionXLPipeline on the teacher's components with a DDIM scheduler of its config."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    p = StableDiffusionXLPipeline(**{**xl.components, "scheduler": DDIMScheduler.from_config(xl.scheduler.config)})
    p.set_progress_bar_config(disable=True)
    return p


def _batches(n, batch_size=2):
    """(first item, items) of each generation batch: shards of 2 items, one batch each."""
    return [(b0, range(b0, min(n, b0 + batch_size))) for b0 in range(0, n, batch_size)]


# ---- 1. the stored data is the stock pipeline's guided run and conditioning -----------------------------------------------
@torch.no_grad()
def test_sdxl_teacher_data_is_the_stock_pipelines_guided_run(xl, tmp_path):
    store = _store(xl, tmp_path)
    assert store.manifest["tensors"] == XL_TENSORS
    ds = store.dataset()
    assert len(ds) == len(PROMPTS)
    stock = _stock(xl)
    hw = xl.unet.config.sample_size * 2 ** (len(xl.vae.config.block_out_channels) - 1)
    ref_ids = stock._get_add_time_ids((hw, hw), (0, 0), (hw, hw), torch.float32,
                                      text_encoder_projection_dim=xl.text_encoder_2.config.projection_dim)[0]
    for b0, rows in _batches(len(PROMPTS)):
        caps, negs = [PROMPTS[i].prompt for i in rows], [PROMPTS[i].negative for i in rows]
        g = torch.Generator("cpu").manual_seed(SEED * 1_000_003 + b0)
        z_T = torch.randn((len(caps), 4, hw // 2, hw // 2), generator=g)
        z_0 = stock(prompt=caps, negative_prompt=negs, guidance_scale=cfg_scale(W), num_inference_steps=STEPS,
                    latents=z_T.clone(), output_type="latent").images
        embeds, neg, pooled, neg_pooled = stock.encode_prompt(caps, device="cpu", do_classifier_free_guidance=True,
                                                              negative_prompt=negs)
        for j, i in enumerate(rows):
            item = ds[i]
            assert item["caption"] == caps[j]
            assert torch.equal(item["z_T"], z_T[j])
            torch.testing.assert_close(item["z_0"], z_0[j], rtol=0, atol=1e-6)
            # one batch of the same prompts as the pipeline's encode: rounding-level tolerance at most
            for key, ref in (("cond", embeds), ("cond_pooled", pooled), ("uncond", neg), ("uncond_pooled", neg_pooled)):
                torch.testing.assert_close(item[key], ref[j], rtol=0, atol=1e-6, msg=key)
            assert torch.equal(item["cond_time_ids"], ref_ids) and torch.equal(item["uncond_time_ids"], ref_ids)
    # two prompts' stored conditions are far apart (the comparisons above could tell a swap)
    assert (ds[0]["cond_pooled"] - ds[0]["uncond_pooled"]).abs().max() > 1e-2
    # batch_latents rebuilds the TextConditions of a batch as stored
    batch = collate_drop_none([ds[i] for i in range(2)])
    z_0, cond, uncond = batch_latents(batch, xl, torch.device("cpu"), torch.float32, torch.Generator().manual_seed(0),
                                      empty_condition(xl))
    assert isinstance(cond, TextCondition) and isinstance(uncond, TextCondition)
    assert torch.equal(z_0, batch["z_0"])
    for c, branch in ((cond, "cond"), (uncond, "uncond")):
        assert torch.equal(c.embeds, batch[branch]) and torch.equal(c.pooled, batch[f"{branch}_pooled"])
        assert torch.equal(c.time_ids, batch[f"{branch}_time_ids"])


@torch.no_grad()
def test_without_negative_prompts_the_loop_builds_the_pipelines_unconditional_branch(xl, tmp_path):
    prompts = [Prompt(p.prompt) for p in PROMPTS[:2]]
    store = _store(xl, tmp_path, prompts)
    assert store.manifest["tensors"] == XL_TENSORS[:5]  # no uncond tensors: the loop's empty condition
    ds = store.dataset()
    stock = _stock(xl)
    caps = [p.prompt for p in prompts]
    z_T = torch.randn((2, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(SEED * 1_000_003))
    z_0 = stock(prompt=caps, guidance_scale=cfg_scale(W), num_inference_steps=STEPS, latents=z_T.clone(),
                output_type="latent").images
    _, neg, _, neg_pooled = stock.encode_prompt(caps, device="cpu", do_classifier_free_guidance=True)
    batch = collate_drop_none([ds[0], ds[1]])
    torch.testing.assert_close(batch["z_0"], z_0, rtol=0, atol=1e-6)
    _, cond, uncond = batch_latents(batch, xl, torch.device("cpu"), torch.float32, torch.Generator().manual_seed(0),
                                    empty_condition(xl))
    assert torch.equal(uncond.embeds, neg) and torch.equal(uncond.pooled, neg_pooled)  # zeros: force_zeros_for_empty_prompt
    assert torch.equal(uncond.time_ids, cond.time_ids)
    want = uncond_like(empty_condition(xl), cond)
    assert torch.equal(uncond.embeds, want.embeds) and torch.equal(uncond.pooled, want.pooled)


# ---- 2. a resumed or repaired generation makes the same tensors; the key sees text_encoder_2 ------------------------------
def test_a_deleted_or_corrupted_shard_is_made_again_the_same(xl, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    store = _store(xl, tmp_path)
    whole = [{k: v.clone() for k, v in load_file(str(store.shard_path(s))).items()} for s in range(store.num_shards)]
    assert store.num_shards == 2
    store.shard_path(1).unlink()  # a killed generation
    first = store.shard_path(0)
    first.write_bytes(first.read_bytes()[:-64])  # a shard cut short
    calls = []
    real = L.generate
    monkeypatch.setattr(L, "generate", lambda *a, **k: (calls.append(k["seed"]), real(*a, **k))[1])
    again = _store(xl, tmp_path)
    assert again.root == store.root and sorted(calls) == [SEED * 1_000_003, SEED * 1_000_003 + 2]
    for s in range(store.num_shards):
        remade = load_file(str(again.shard_path(s)))
        assert remade.keys() == whole[s].keys() and set(XL_TENSORS) < set(remade)
        for k, v in whole[s].items():
            assert torch.equal(remade[k], v), (s, k)
    calls.clear()
    assert _store(xl, tmp_path).root == store.root and calls == []  # complete: reused, nothing made
    # another text_encoder_2 (the SDXL fine-tune's second encoder) is another store
    p = next(xl.text_encoder_2.parameters())
    with torch.no_grad():
        p.add_(1e-3)
    try:
        other = _store(xl, tmp_path)
        assert other.root != store.root and other.manifest["key"]["text_encoder_2"] != store.manifest["key"]["text_encoder_2"]
    finally:
        with torch.no_grad():
            p.sub_(1e-3)


# ---- 3. whole runs: an SDXL --prompts run trains, exports and reuses its store; SD1.5 stores as before ----------------------
@pytest.fixture(scope="module")
def xl_teacher(xl, tmp_path_factory):
    d = tmp_path_factory.mktemp("xl-teacher") / "teacher"
    xl.save_pretrained(d, safe_serialization=True)
    return d


def _train_cli(teacher, out, prompts, name, *extra):
    args = ["--preset", "sdxl", "--teacher", str(teacher), "--prompts", str(prompts), "--output-dir", str(out),
            "--resolution", "16", "--lora-rank", "4", "--batch-size", "2", "--grad-accum", "1", "--max-steps", "2",
            "--num-ddim-steps", "2", "--checkpoint-every", "10", "--validate-every", "0", "--device", "cpu",
            "--precision", "bf16", "--run-name", name, "--log-every", "1", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "train_cli.py"), *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=300)


def test_train_cli_sdxl_prompts_run_exports_and_reuses_its_store(xl_teacher, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one red circle\n" + json.dumps({"prompt": "two big blue squares", "negative_prompt": "green"}) + "\n")
    r = _train_cli(xl_teacher, tmp_path, prompts, "a", "--prompts-w", "8")  # the preset's w: --regression's pairs
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-3000:]
    assert "teacher data: 2 prompts x 1 = 2 images, DDIM 2 at CFG 9" in log and "(reused)" not in log
    run = tmp_path / "a"
    cfg = json.loads((run / "training_config.json").read_text())
    assert cfg["latent_store"]["kind"] == "teacher" and cfg["latent_store"]["items"] == 2
    done = [json.loads(x) for x in (run / "stats.jsonl").read_text().splitlines() if '"done"' in x][-1]
    assert done["step"] == 2 and {"run", "kohya_lora", "diffusers_lora"} <= set(done["exports"])
    assert all((run / p).exists() for p in done["exports"].values())
    stores = list((tmp_path / ".cache").iterdir())
    assert len(stores) == 1 and json.loads((stores[0] / "manifest.json").read_text())["tensors"] == XL_TENSORS
    # a second run (another objective term that reads z_T, so its data default to the distillation's w) reuses the
    # store: nothing is generated again
    mtimes = {p.name: p.stat().st_mtime_ns for p in stores[0].glob("shard-*")}
    r = _train_cli(xl_teacher, tmp_path, prompts, "b", "--regression", "0.5", "--max-steps", "1")
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-3000:]
    assert "teacher data: 2 prompts x 1 = 2 images" in log and "(reused)" in log
    assert {p.name: p.stat().st_mtime_ns for p in stores[0].glob("shard-*")} == mtimes
    assert list((tmp_path / ".cache").iterdir()) == stores


def test_sdxl_cache_latents_is_refused_with_the_reason_and_a_native_size_is_required(xl_teacher, tmp_path):
    from splam_studio.models.loading import load_teacher
    from splam_studio.training.loop import TrainConfig, TrainError, _latent_source

    class Acc:
        def main_process_first(self):
            import contextlib
            return contextlib.nullcontext()

    pipe = load_teacher(str(xl_teacher))
    cfg = TrainConfig(teacher=str(xl_teacher), data=str(tmp_path), cache_latents=True, output_dir=str(tmp_path))
    with pytest.raises(TrainError, match=r"crop.*--prompts FILE|--prompts.*crop") as e:
        _latent_source(cfg, pipe, Acc(), 16, print)
    assert "--data" in str(e.value)
    prompts = tmp_path / "p.txt"
    prompts.write_text("one red circle\n")
    cfg = TrainConfig(teacher=str(xl_teacher), prompts=str(prompts), output_dir=str(tmp_path))
    with pytest.raises(TrainError, match=r"native size \(16 px\); drop --resolution 32"):
        _latent_source(cfg, pipe, Acc(), 32, print)


def test_sd15_teacher_data_keeps_its_manifest_and_key(tmp_path):
    """An SD1.5 store's manifest, tensor names and folder key are exactly those of the stores made before SDXL teacher
    data existed, so they keep being reused."""
    from safetensors import safe_open

    from splam_studio.training.latents import fingerprint

    sd = make_tiny_pipeline(tmp_path / "tok")
    for prompts, tensors in ((PROMPTS, ["z_0", "z_T", "cond", "uncond"]), ([Prompt("one red circle")], ["z_0", "z_T", "cond"])):
        store = _store(sd, tmp_path, prompts, steps=1)
        old = {"kind": "teacher", "items": len(prompts), "shard_size": 2, "batch_size": 2, "tensors": tensors,
               "key": {"unet": fingerprint(sd.unet), "vae": fingerprint(sd.vae), "text_encoder": fingerprint(sd.text_encoder),
                       "scheduler": dict(sd.scheduler.config), "w": W, "steps": 1, "seed": SEED, "images_per_prompt": 1,
                       "prompts": [[p.prompt, p.negative] for p in prompts]}}
        assert store.manifest == old and store.root.name == f"teacher-{store_key(old)}"
        assert json.loads((store.root / "manifest.json").read_text()) == json.loads(json.dumps(old, default=str))
        with safe_open(str(store.shard_path(0)), "pt") as f:
            assert set(f.keys()) == {"index", *tensors}
            assert len(f.get_slice("cond").get_shape()) == 3  # (n, L, D): a plain tensor c, no pooled or time ids
