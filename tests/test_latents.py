"""Teacher data from prompts and the latent cache (training/latents.py): the stored z_0 and embeddings are what the
uncached path computes, a killed or damaged store is finished or remade (never used half), a changed input never
reads stale latents, and a distillation run on them needs no VAE."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from splam_studio.models.generation import generate
from splam_studio.core.teacher import cfg_scale, encode_text
from splam_studio.training import latents as L
from splam_studio.training.latents import LatentDataError, Prompt, batch_latents, latent_cache, read_prompts, teacher_data

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [Prompt("one red circle"), Prompt("two small blue squares", "green"), Prompt("a large green star")]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from tests.tiny import make_tiny_pipeline

    return make_tiny_pipeline(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    g = torch.Generator().manual_seed(0)
    for i in range(7):
        arr = (torch.rand(16, 16, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(["one red circle", "two small blue squares", "a large green star"][i % 3])
    (data / "7.png").write_bytes(b"not a png")  # unreadable: skipped by the dataset, left out of the cache
    return data


# ---- prompts files ------------------------------------------------------------------------------------------------------
def test_prompts_file_plain_and_json_lines(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text('one red circle\n\n# a comment\n{"prompt": " two blue squares ", "negative_prompt": "green"}\n'
                 '{"prompt": "a star"}\n')
    assert read_prompts(f) == [Prompt("one red circle"), Prompt("two blue squares", "green"), Prompt("a star")]


@pytest.mark.parametrize("text,match", [("ok\n{\"prompt\": \n", "line 2: not valid JSON"),
                                        ('{"negative_prompt": "x"}\n', "line 1: a JSON line needs"),
                                        ('{"prompt": 3}\n', "line 1"), ("\n# only a comment\n", "holds no prompt")])
def test_bad_prompts_files_name_the_line(tmp_path, text, match):
    f = tmp_path / "p.txt"
    f.write_text(text)
    with pytest.raises(LatentDataError, match=match):
        read_prompts(f)


def test_prompts_file_missing_or_not_utf8(tmp_path):
    with pytest.raises(LatentDataError, match="not found"):
        read_prompts(tmp_path / "nope.txt")
    (tmp_path / "b.txt").write_bytes(b"one red \xff circle\n")
    with pytest.raises(LatentDataError, match="not UTF-8"):
        read_prompts(tmp_path / "b.txt")


# ---- teacher data -------------------------------------------------------------------------------------------------------
def _store(pipe, root, **kw):
    args = dict(w=3.0, steps=2, images_per_prompt=2, seed=5, batch_size=4, shard_size=4)
    return teacher_data(pipe, PROMPTS, root, **{**args, **kw})


def test_teacher_data_is_the_teachers_guided_ddim_run(pipe, tmp_path):
    """Item i is prompt i // images_per_prompt, z_0 the stock pipeline's guided DDIM latents of its batch's noise,
    cond / uncond the text encoder's embeddings of the prompt and its negative prompt."""
    ds = _store(pipe, tmp_path).dataset()
    assert len(ds) == 6
    items = [p for p in PROMPTS for _ in range(2)]
    # shard 0 holds items 0-3 in one batch (batch 4), shard 1 items 4-5; seeds seed * 1_000_003 + first item
    for b0, rows in ((0, range(0, 4)), (4, range(4, 6))):
        caps = [items[i].prompt for i in rows]
        ref = generate(pipe, prompt=caps, sampler="ddim", steps=2, seed=5 * 1_000_003 + b0, guidance_scale=cfg_scale(3.0),
                       negative_prompt=[items[i].negative for i in rows], decode=False).latents
        for j, i in enumerate(rows):
            assert ds[i]["caption"] == items[i].prompt
            torch.testing.assert_close(ds[i]["z_0"], ref[j], rtol=0, atol=1e-6)
            with torch.no_grad():
                # batch-size invariance of float32 matmuls is not guaranteed: rounding-level tolerance, far below
                # the distance between two prompts' embeddings
                torch.testing.assert_close(ds[i]["cond"], encode_text(pipe, [items[i].prompt])[0], rtol=0, atol=1e-6)
                torch.testing.assert_close(ds[i]["uncond"], encode_text(pipe, [items[i].negative])[0], rtol=0, atol=1e-6)
    # guidance really reaches the data: w = 0 (CFG 1) makes other latents
    other = _store(pipe, tmp_path, w=0.0).dataset()
    assert (other[0]["z_0"] - ds[0]["z_0"]).abs().max() > 1e-3


def test_a_killed_generation_resumes_where_it_stopped(pipe, tmp_path, monkeypatch):
    whole = _store(pipe, tmp_path / "a").dataset()
    calls = []
    real = L.generate

    def dies_after_first_shard(*a, **k):
        calls.append(k["seed"])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(L, "generate", dies_after_first_shard)
    with pytest.raises(KeyboardInterrupt):
        _store(pipe, tmp_path / "b")
    folder = next((tmp_path / "b").iterdir())
    assert sorted(p.name for p in folder.glob("shard-*")) == ["shard-00000.safetensors"]
    assert not list(folder.glob(".*tmp*"))  # no half-written shard left under any name
    calls.clear()
    monkeypatch.setattr(L, "generate", lambda *a, **k: (calls.append(k["seed"]), real(*a, **k))[1])
    resumed = _store(pipe, tmp_path / "b")
    assert calls == [5 * 1_000_003 + 4]  # only the missing shard's batch
    ds = resumed.dataset()
    for i in range(len(whole)):
        torch.testing.assert_close(ds[i]["z_0"], whole[i]["z_0"], rtol=0, atol=0)


def test_a_damaged_shard_is_named_and_made_again(pipe, tmp_path, caplog):
    store = _store(pipe, tmp_path)
    good = store.dataset()[5]["z_0"].clone()
    shard = store.shard_path(1)
    shard.write_bytes(shard.read_bytes()[:-40])  # truncated
    with pytest.raises(LatentDataError, match="shard-00001"):
        store.dataset()
    with caplog.at_level(logging.WARNING):
        again = _store(pipe, tmp_path)
    assert "shard-00001.safetensors does not read" in caplog.text
    torch.testing.assert_close(again.dataset()[5]["z_0"], good, rtol=0, atol=0)


def test_changed_inputs_never_read_stale_latents(pipe, tmp_path):
    a = _store(pipe, tmp_path)
    assert _store(pipe, tmp_path).root == a.root  # same inputs: the same store, reused
    roots = {a.root, _store(pipe, tmp_path, w=4.0).root, _store(pipe, tmp_path, seed=6).root,
             _store(pipe, tmp_path, images_per_prompt=1).root, _store(pipe, tmp_path, steps=3).root}
    assert len(roots) == 5
    before = L.fingerprint(pipe.unet)
    with torch.no_grad():
        pipe.unet.conv_out.bias.add_(1e-3)  # another teacher (a fine-tune): another key
    try:
        assert L.fingerprint(pipe.unet) != before and _store(pipe, tmp_path).root != a.root
    finally:
        with torch.no_grad():
            pipe.unet.conv_out.bias.sub_(1e-3)
    # a manifest that does not match its folder (edited, or another version) is not trusted
    (a.root / "manifest.json").write_text(json.dumps({"items": 1}))
    assert len(_store(pipe, tmp_path).missing_shards()) == 0 and _store(pipe, tmp_path).dataset()[0]["z_0"].shape[0] == 4


# ---- the latent cache ---------------------------------------------------------------------------------------------------
def test_cached_draws_equal_the_uncached_vae_draws(pipe, folder, tmp_path):
    from splam_studio.training.data import build_dataset

    ds = build_dataset(str(folder), 16)
    store = latent_cache(pipe, ds, tmp_path, identity={"data": str(folder)}, batch_size=3, shard_size=4)
    cached = store.dataset()
    readable = [i for i in range(len(ds)) if ds[i] is not None]
    assert len(cached) == len(readable) == 7
    uncond_1 = torch.zeros(1, 77, 32)
    for i, j in ((0, readable[0]), (6, readable[6])):
        raw = {"pixel_values": ds[j]["pixel_values"][None], "caption": [ds[j]["caption"]]}
        hit = {k: (v[None] if torch.is_tensor(v) else [v]) for k, v in cached[i].items()}
        a = batch_latents(raw, pipe, torch.device("cpu"), torch.float32, torch.Generator().manual_seed(9), uncond_1)
        b = batch_latents(hit, pipe, torch.device("cpu"), torch.float32, torch.Generator().manual_seed(9), uncond_1)
        for x, y in zip(a, b):
            torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5)
        assert hit["caption"] == raw["caption"]


def test_cache_refuses_streamed_sources(pipe, tmp_path):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter([])

    stream = Stream()
    with pytest.raises(LatentDataError, match="finite data source"):
        latent_cache(pipe, stream, tmp_path, identity={}, batch_size=2)


def test_a_changed_data_file_changes_the_key(folder, tmp_path):
    before = L.files_identity(str(folder))
    f = folder / "0.txt"
    text = f.read_text()
    f.write_text(text + " again")
    try:
        assert L.files_identity(str(folder)) != before
    finally:
        f.write_text(text)


# ---- whole runs ---------------------------------------------------------------------------------------------------------
def _cli(teacher: Path, out: Path, *extra) -> subprocess.CompletedProcess:
    args = ["--teacher", str(teacher), "--output-dir", str(out), "--batch-size", "2", "--log-every", "1",
            "--checkpoint-every", "10", "--device", "cpu", "--seed", "3", "--max-steps", "3", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "splam_studio.training", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)


def _losses(run: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "stats.jsonl").read_text().splitlines() if '"loss"' in x]


@pytest.fixture(scope="module")
def teacher_dir(pipe, tmp_path_factory):
    d = tmp_path_factory.mktemp("teacher") / "teacher"
    pipe.save_pretrained(d, safe_serialization=True)
    return d


def test_a_cached_run_trains_as_the_uncached_one(teacher_dir, folder, tmp_path):
    plain = _cli(teacher_dir, tmp_path, "--data", str(folder), "--run-name", "plain")
    cached = _cli(teacher_dir, tmp_path, "--data", str(folder), "--run-name", "cached", "--cache-latents")
    assert plain.returncode == 0 and cached.returncode == 0, (plain.stderr[-2000:], cached.stderr[-2000:])
    assert "latent cache: 7 images encoded once" in cached.stdout + cached.stderr
    a, b = _losses(tmp_path / "plain"), _losses(tmp_path / "cached")
    assert len(a) == len(b) == 3
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-4, atol=1e-6)
    again = _cli(teacher_dir, tmp_path, "--data", str(folder), "--run-name", "cached2", "--cache-latents")
    assert again.returncode == 0 and "(reused)" in again.stdout + again.stderr
    assert _losses(tmp_path / "cached2") == b


def test_a_prompts_run_needs_no_vae_and_no_images(pipe, teacher_dir, tmp_path, monkeypatch):
    """In process, with the VAE's encoder made to fail: teacher data and the whole run never call it."""
    from diffusers import AutoencoderKL

    from splam_studio.training.loop import TrainConfig, run

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one red circle\ntwo small blue squares\n")

    def no_encode(*a, **k):
        raise AssertionError("the VAE encoder ran")

    monkeypatch.setattr(AutoencoderKL, "encode", no_encode)
    cfg = TrainConfig(teacher=str(teacher_dir), data="/nonexistent", prompts=str(prompts), images_per_prompt=2,
                      num_ddim_steps=4, output_dir=str(tmp_path), run_name="p", max_steps=2, batch_size=2,
                      checkpoint_every=10, device="cpu", seed=1)
    run_dir = run(cfg, log=lambda *a: None)
    stats = (run_dir / "training_config.json").read_text()
    assert json.loads(stats)["latent_store"]["kind"] == "teacher" and json.loads(stats)["latent_store"]["items"] == 4
    assert json.loads(stats)["validation_prompts"] == ["one red circle", "two small blue squares"]
    assert len(_losses(run_dir)) == 2


def test_prompts_w_makes_the_teacher_data_at_its_own_guidance(pipe, teacher_dir, tmp_path):
    """--prompts-w: the store is the teacher's DDIM run at CFG prompts_w + 1 (its own key), the distillation's w apart;
    it needs --prompts."""
    from splam_studio.training.loop import TrainConfig, TrainError, run

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one red circle\ntwo small blue squares\n")
    base = dict(teacher=str(teacher_dir), prompts=str(prompts), num_ddim_steps=4, output_dir=str(tmp_path), max_steps=1,
                batch_size=2, checkpoint_every=10, device="cpu", seed=1, w=6.5)
    run_dir = run(TrainConfig(**base, run_name="w0", prompts_w=0.0), log=lambda *a: None)
    folder = tmp_path / json.loads((run_dir / "training_config.json").read_text())["latent_store"]["folder"]
    manifest = json.loads((folder / L.MANIFEST).read_text())
    assert manifest["key"]["w"] == 0.0
    ref = teacher_data(pipe, read_prompts(prompts), tmp_path / "ref", w=0.0, steps=4, images_per_prompt=1, seed=1,
                       batch_size=2).dataset()
    got = L.LatentStore(folder, manifest).dataset()
    torch.testing.assert_close(got[0]["z_0"], ref[0]["z_0"], rtol=0, atol=0)
    guided = teacher_data(pipe, read_prompts(prompts), tmp_path / "ref", w=6.5, steps=4, images_per_prompt=1, seed=1,
                          batch_size=2).dataset()
    assert (ref[0]["z_0"] - guided[0]["z_0"]).abs().max() > 1e-3  # another guidance, other latents
    with pytest.raises(TrainError, match="needs --prompts"):
        TrainConfig(teacher=str(teacher_dir), prompts_w=0.0).validate()
    with pytest.raises(TrainError, match=">= 0"):
        TrainConfig(**base, prompts_w=-1.0).validate()
    # the default: CFG 1 data; with --regression on the batch's own pairs the distillation's w; with a pairs store of
    # their own (--regression-prompts, or --prompts-w apart from w) the data keep their guidance
    from splam_studio.training.loop import regression_pairs_prompts, teacher_data_w

    assert teacher_data_w(TrainConfig(**base)) == 0.0 and teacher_data_w(TrainConfig(**base, regression=0.25)) == 6.5
    assert teacher_data_w(TrainConfig(**base, prompts_w=2.0)) == 2.0
    assert teacher_data_w(TrainConfig(**base, regression=0.25, regression_prompts="p.txt")) == 0.0
    assert regression_pairs_prompts(TrainConfig(**base, regression=0.25)) is None  # the batch holds its pairs
    assert regression_pairs_prompts(TrainConfig(**base, regression=0.25, prompts_w=0.0)) == str(prompts)
    assert regression_pairs_prompts(TrainConfig(**base, regression=0.25, regression_prompts="p.txt")) == "p.txt"
    assert regression_pairs_prompts(TrainConfig(**base, prompts_w=0.0)) is None
    plain = run(TrainConfig(**base, run_name="default"), log=lambda *a: None)
    folder = tmp_path / json.loads((plain / "training_config.json").read_text())["latent_store"]["folder"]
    assert json.loads((folder / L.MANIFEST).read_text())["key"]["w"] == 0.0


def test_regression_pairs_store_beside_image_data(pipe, teacher_dir, folder, tmp_path):
    """--data with --regression-prompts: the pairs are teacher data at the distillation's w in a store of their own,
    and each step's loss receives a pair batch read from it (z_T, z_0 and the pairs' text, not the batch's), in an
    order that is a function of the micro-step alone (so a resume reads the same pairs)."""
    import splam_studio.training.loop as loop
    from splam_studio.core.splad import splad_loss
    from splam_studio.training.loop import PairBatches, TrainConfig, run

    prompts = tmp_path / "pairs.txt"
    prompts.write_text("one red circle\ntwo small blue squares\nthree green triangles\n")
    seen = []

    def spy(*a, **k):
        seen.append(k["pairs"])
        assert "z_T" not in k  # image data: no pairs of its own
        return splad_loss(*a, **k)

    cfg = TrainConfig(teacher=str(teacher_dir), data=str(folder), regression=0.5, regression_prompts=str(prompts),
                      num_ddim_steps=4, output_dir=str(tmp_path), run_name="img-reg", max_steps=2, batch_size=2,
                      checkpoint_every=10, device="cpu", seed=1, w=6.5)
    run_dir = run(cfg, log=lambda *a: None, loss_fn=spy)
    resolved = json.loads((run_dir / "training_config.json").read_text())
    assert resolved["latent_store"] is None and resolved["regression_pairs"]["w"] == 6.5
    folder_p = tmp_path / resolved["regression_pairs"]["folder"]
    manifest = json.loads((folder_p / L.MANIFEST).read_text())
    assert manifest["key"]["w"] == 6.5 and manifest["items"] == 3
    ds = L.LatentStore(folder_p, manifest).dataset()
    order = PairBatches(ds, 2, cfg.seed + 1, 0, 1)
    assert len(seen) == 2
    for step, (z_T, z_0, c) in enumerate(seen):
        want = order(step)
        torch.testing.assert_close(z_T, want["z_T"], rtol=0, atol=0)
        torch.testing.assert_close(z_0, want["z_0"].float(), rtol=0, atol=0)
        torch.testing.assert_close(c.float(), want["cond"].float(), rtol=0, atol=0)
    assert not torch.equal(order(0)["z_T"], order(1)["z_T"]) or not torch.equal(order(0)["z_T"], order(2)["z_T"])


def test_prompts_at_cfg_1_with_regression_make_a_pairs_store_at_w(pipe, teacher_dir, tmp_path):
    """--prompts --prompts-w 0 --regression: the data at CFG 1 and the pairs from the same prompts at the
    distillation's w, two stores with their own keys."""
    from splam_studio.training.loop import TrainConfig, run

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one red circle\ntwo small blue squares\n")
    cfg = TrainConfig(teacher=str(teacher_dir), prompts=str(prompts), prompts_w=0.0, regression=0.25, num_ddim_steps=4,
                      output_dir=str(tmp_path), run_name="split", max_steps=1, batch_size=2, checkpoint_every=10,
                      device="cpu", seed=1, w=6.5)
    resolved = json.loads((run(cfg, log=lambda *a: None) / "training_config.json").read_text())
    data, pairs = (json.loads((tmp_path / resolved[k]["folder"] / L.MANIFEST).read_text())
                   for k in ("latent_store", "regression_pairs"))
    assert data["key"]["w"] == 0.0 and pairs["key"]["w"] == 6.5 and data["key"]["prompts"] == pairs["key"]["prompts"]
