"""The teacher recipe (tiny preset) end to end, the latent scale, and the Frechet distance math."""

from pathlib import Path

import numpy as np
import pytest
import torch

from splam_studio.core.metrics import feature_statistics, frechet_distance, latent_mse, psnr


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    from splam_studio.shapes.build import build

    out = tmp_path_factory.mktemp("world")
    record = build(out, "tiny", log=lambda s: None)
    return out, record


def test_tiny_build_loads_offline_and_generates(tiny_world):
    from diffusers import StableDiffusionPipeline

    out, record = tiny_world
    assert (out / "recipe.json").exists() and (out / "shapes-evaluator" / "model.safetensors").exists()
    pipe = StableDiffusionPipeline.from_pretrained(str(out / "shapes-teacher"), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.tokenizer.model_max_length == 16 and pipe.unet.config.sample_size == 8
    image = pipe("one small red circle at the left on a black background", num_inference_steps=2,
                 guidance_scale=7.5, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64) and image.mode == "RGB"
    assert record["stages"]["unet"]["steps_done"] == 3 and record["device"] == "cpu"


def test_scaling_factor_gives_unit_variance(tiny_world):
    from diffusers import AutoencoderKL

    from splam_studio.shapes.grammar import ShapesDataset
    from splam_studio.shapes.recipe import PRESETS
    from splam_studio.shapes.stages import encode_latents

    out, record = tiny_world
    vae = AutoencoderKL.from_pretrained(str(out / "shapes-teacher" / "vae"))
    ds = ShapesDataset(PRESETS["tiny"].n_train, seed=PRESETS["tiny"].seed, split="train")
    mean, std = encode_latents(vae, ds.render_all())
    z = (mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(1))) * vae.config.scaling_factor
    assert abs(float(z.std()) - 1.0) < 0.1
    assert vae.config.scaling_factor == pytest.approx(record["stages"]["scaling"]["scaling_factor"])


def test_evaluator_round_trip(tiny_world):
    from splam_studio.shapes.evaluator import Evaluator
    from splam_studio.shapes.grammar import ShapesDataset

    out, _ = tiny_world
    ev = Evaluator.from_pretrained(out / "shapes-evaluator")
    ds = ShapesDataset(3, seed=0, split="all")
    images = [ds[i]["pixel_values"] for i in range(3)]
    captions = [s.caption() for s in ds.specs]
    res = ev.prompt_accuracy(torch.stack(images), captions)
    assert set(res["per_attribute"]) == set(ev.heads) and res["n"] == 3
    # the same numbers recomputed from the raw predictions (every caption names every attribute)
    from splam_studio.shapes.grammar import ATTRIBUTES, parse_caption

    pred = ev.predict(torch.stack(images))
    target = torch.tensor([[parse_caption(c)[a] for a in ATTRIBUTES] for c in captions])
    assert res["accuracy"] == pytest.approx(float((pred == target).all(1).float().mean()))
    for j, a in enumerate(ATTRIBUTES):
        assert res["per_attribute"][a] == pytest.approx(float((pred[:, j] == target[:, j]).float().mean()))
    assert ev.features(torch.stack(images)).shape == (3, ev.config.feature_dim)


def test_embedded_evaluator_reads_real_renders():
    """The shipped evaluator on real held-out renders: BENCHMARKS.md measures 1.000; a broken one scores ~0."""
    from splam_studio.shapes.evaluator import Evaluator
    from splam_studio.shapes.grammar import ShapesDataset

    folder = Path(__file__).resolve().parents[1] / "weights" / "shapes-evaluator"
    if not (folder / "model.safetensors").is_file():
        pytest.skip("embedded evaluator not present")
    ev = Evaluator.from_pretrained(folder)
    ds = ShapesDataset(64, seed=123, split="heldout")
    res = ev.prompt_accuracy(torch.stack([ds[i]["pixel_values"] for i in range(64)]), [s.caption() for s in ds.specs])
    assert res["accuracy"] >= 0.95, res


def test_frechet_distance_identical_statistics_is_zero():
    feats = np.random.default_rng(0).normal(size=(500, 8))
    mu, sigma = feature_statistics(feats)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_frechet_distance_1d_gaussians_closed_form():
    # W2^2 between N(m1, s1^2) and N(m2, s2^2) is (m1 - m2)^2 + (s1 - s2)^2.
    d = frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([-2.0]), np.array([[9.0]]))
    assert d == pytest.approx(9.0 + 1.0)


def test_psnr_and_latent_mse():
    a = torch.zeros(2, 3, 4, 4)
    b = a + 0.1
    assert torch.allclose(psnr(a, b), torch.full((2,), 10 * np.log10(4 / 0.01)))
    assert torch.allclose(latent_mse(a, b), torch.full((2,), 0.01))


def test_text_separation_sees_a_collapsed_word(tiny_world):
    """Distinct word embeddings separate every attribute; tying the position words' embeddings drops that one to 0."""
    from diffusers import StableDiffusionPipeline

    from splam_studio.shapes.grammar import POSITIONS
    from splam_studio.shapes.probes import text_separation

    out, _ = tiny_world
    pipe = StableDiffusionPipeline.from_pretrained(str(out / "shapes-teacher"), local_files_only=True)
    sep = text_separation(pipe, n=8)
    assert set(sep) == {"shape", "colour", "size", "position", "count", "background"}
    assert min(sep.values()) > 0.01
    emb = pipe.text_encoder.get_input_embeddings().weight
    ids = [pipe.tokenizer.convert_tokens_to_ids(w + "</w>") for w in POSITIONS]
    with torch.no_grad():
        emb[ids] = emb[ids[0]].clone()
    tied = text_separation(pipe, n=8)
    assert tied["position"] < 1e-5 and tied["colour"] == pytest.approx(sep["colour"], rel=0.1)


@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_text_encoder_is_trained_only_when_the_preset_says(tmp_path, train_text_encoder):
    """Frozen (`full`): the built text encoder equals its seeded init. Joint (`full-joint-text`): it moved."""
    from dataclasses import replace

    from transformers import CLIPTextModel

    from splam_studio.shapes.build import build
    from splam_studio.shapes.recipe import PRESETS, build_models
    from splam_studio.shapes.tokenizer import build_tokenizer

    assert PRESETS["full"].train_text_encoder is False and PRESETS["full-joint-text"].train_text_encoder is True
    tiny = PRESETS["tiny"]
    build(tmp_path / "w", replace(tiny, train_text_encoder=train_text_encoder), log=lambda s: None)
    trained = CLIPTextModel.from_pretrained(tmp_path / "w" / "shapes-teacher" / "text_encoder").state_dict()
    _, init, _ = build_models(build_tokenizer(tmp_path / "tok"), tiny.seed, tiny.text_layers)
    unchanged = all(torch.equal(trained[k], v) for k, v in init.state_dict().items())
    assert unchanged is not train_text_encoder


def test_text_encoder_without_layers_conditions_per_token(tmp_path):
    """text_layers = 0: changing one word changes that token's conditioning and no other token's."""
    from transformers import CLIPTextModel

    from splam_studio.core.teacher import tokenize
    from splam_studio.shapes.recipe import text_encoder_config
    from splam_studio.shapes.tokenizer import build_tokenizer

    tok = build_tokenizer(tmp_path / "tok")
    te = CLIPTextModel(text_encoder_config(tok, layers=0)).eval()
    ids = tokenize(tok, ["one small red circle at the left on a black background",
                         "one small blue circle at the left on a black background"])
    with torch.no_grad():
        out = te(ids)[0]
    moved = (out[0] - out[1]).norm(dim=-1)
    changed = (ids[0] != ids[1]).nonzero().flatten().tolist()
    assert len(changed) == 1 and moved[changed[0]] > 1e-3
    assert torch.all(moved[[i for i in range(len(moved)) if i != changed[0]]] < 1e-6)
    deep = CLIPTextModel(text_encoder_config(tok, layers=3)).eval()
    with torch.no_grad():
        out = deep(ids)[0]
    mixed = (out[0] - out[1]).norm(dim=-1)
    assert mixed[changed[0] + 1] > 1e-3  # with layers, later tokens (causal attention) see the changed word


def test_embedded_teacher_was_built_by_the_full_preset():
    """weights/recipe.json records exactly the `full` preset's fields, and the shipped models have its shapes."""
    import json
    from dataclasses import asdict
    from pathlib import Path

    from splam_studio.shapes.recipe import PRESETS, unet_config

    weights = Path(__file__).resolve().parents[1] / "weights"
    recorded = json.loads((weights / "recipe.json").read_text())["preset"]
    assert recorded == asdict(PRESETS["full"])
    te = json.loads((weights / "shapes-teacher" / "text_encoder" / "config.json").read_text())
    assert te["num_hidden_layers"] == PRESETS["full"].text_layers
    unet = json.loads((weights / "shapes-teacher" / "unet" / "config.json").read_text())
    assert all(list(unet[k]) == list(v) if isinstance(v, tuple) else unet[k] == v for k, v in unet_config().items())


def test_world_cli_prints_the_resolved_preset(capsys):
    """`tools.world build --print-config` prints the preset's fields as JSON and trains nothing."""
    import json
    from dataclasses import asdict

    from splam_studio.shapes.recipe import PRESETS
    from splam_studio.tools.world import main

    main(["build", "--preset", "tiny", "--print-config"])
    assert json.loads(capsys.readouterr().out) == asdict(PRESETS["tiny"])
    with pytest.raises(SystemExit):
        main(["build", "--device", "tpu"])


def test_a_stage_past_its_deadline_stops_and_counts_the_steps_it_did():
    """Clock.steps cuts a stage short once the deadline (less the stage's reserve) has passed, and says so."""
    from splam_studio.shapes.recipe import PRESETS
    from splam_studio.shapes.stages import Clock, train_evaluator

    logged: list[str] = []
    _, rec = train_evaluator(PRESETS["tiny"], Clock(deadline_s=-1.0), 0.0, logged.append, torch.device("cpu"))
    assert rec["steps_done"] == 0 and rec["final_loss"] is None
    assert "[evaluator] deadline reached, stopping at step 0" in logged
    clock = Clock(deadline_s=3600.0)
    assert list(clock.steps("vae", 4, reserve_s=0.0, log=logged.append)) == [0, 1, 2, 3]
    assert list(clock.steps("vae", 4, reserve_s=3600.0, log=logged.append)) == []
