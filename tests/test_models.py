"""Model loading and export on the tiny pipeline: teachers, pickle refusal, students (full / LoRA), kohya, runs."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from splam_studio.models import export as X
from splam_studio.models import loading as M
from splam_studio.models.export import export_kohya_lora, save_student
from splam_studio.models.loading import ModelLoadError, load_student, load_teacher
from tests.tiny import make_tiny_pipeline, tiny_unet

COND_DIM = 32
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2", "conv1", "time_emb_proj"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple:
    """(pipe, its diffusers folder): built and saved once per module."""
    root = tmp_path_factory.mktemp("tiny")
    pipe = make_tiny_pipeline(root / "build")
    pipe.save_pretrained(str(root / "teacher"))
    return pipe, root / "teacher"


def make_student(teacher_unet, seed: int = 5) -> torch.nn.Module:
    """Teacher weights + a random cond_proj (what the trainer builds)."""
    student = tiny_unet(time_cond_proj_dim=COND_DIM)
    missing, unexpected = student.load_state_dict(teacher_unet.state_dict(), strict=False)
    assert missing == [X.COND_PROJ_KEY] and not unexpected
    with torch.no_grad():
        student.time_embedding.cond_proj.weight.copy_(torch.randn(student.time_embedding.cond_proj.weight.shape,
                                                                  generator=torch.Generator().manual_seed(seed)))
    return student


def add_random_lora(unet, r: int = 4, alpha: float = 8.0, seed: int = 6) -> None:
    unet.add_adapter(LoraConfig(r=r, lora_alpha=alpha, target_modules=LORA_TARGETS, init_lora_weights="gaussian"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:  # zero at init: make the adapter do something
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def unet_out(unet, cond: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    z, ehs = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 32, generator=g)
    kwargs = {"timestep_cond": torch.randn(2, COND_DIM, generator=g)} if cond else {}
    with torch.no_grad():
        return unet(z, torch.tensor([999, 259]), encoder_hidden_states=ehs, **kwargs).sample


def same_state(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


# ---- teachers ------------------------------------------------------------------------------------------------------
def test_tokenizer_words_are_single_tokens(tiny):
    from tests.tiny import WORDS

    pipe, _ = tiny
    for w in WORDS:
        assert len(pipe.tokenizer(w, add_special_tokens=False).input_ids) == 1, w
    caption = "two large red circles at the left on a black background"
    vocab = pipe.tokenizer.get_vocab()
    tok = pipe.tokenizer
    assert tok(caption).input_ids == [tok.bos_token_id] + [vocab[w + "</w>"] for w in caption.split()] + [tok.eos_token_id]
    assert len({tok.bos_token_id, tok.eos_token_id, *(vocab[w + "</w>"] for w in caption.split())}) == 2 + len(set(caption.split()))


def test_load_teacher_from_diffusers_folder(tiny):
    pipe, folder = tiny
    loaded = load_teacher(str(folder))
    assert same_state(loaded.unet.state_dict(), pipe.unet.state_dict())
    assert same_state(loaded.vae.state_dict(), pipe.vae.state_dict())
    assert loaded.tokenizer("red circle").input_ids == pipe.tokenizer("red circle").input_ids


def test_embedded_name_uses_weights_dir(tiny, tmp_path, monkeypatch):
    _, folder = tiny
    (tmp_path / "shapes-teacher").symlink_to(folder, target_is_directory=True)
    monkeypatch.setenv(M.WEIGHTS_ENV, str(tmp_path))
    assert M.weights_dir() == tmp_path
    assert load_teacher("shapes").unet.config.cross_attention_dim == 32
    monkeypatch.setenv(M.WEIGHTS_ENV, str(tmp_path / "empty"))
    with pytest.raises(ModelLoadError, match="embedded model 'shapes' not found.*SPLAM_WEIGHTS_DIR"):
        load_teacher("shapes")


def test_single_file_round_trip(tiny, tmp_path):
    pipe, folder = tiny
    path = X.save_single_file(pipe, tmp_path / "tiny-sd15.safetensors")
    keys = load_file(str(path)).keys()
    assert "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight" in keys
    assert "first_stage_model.encoder.mid.attn_1.q.weight" in keys
    assert "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in keys
    loaded = load_teacher(str(path), config=folder)
    for c in ("unet", "vae", "text_encoder"):
        assert same_state(getattr(loaded, c).state_dict(), getattr(pipe, c).state_dict()), c


def test_single_file_without_config_offline_names_the_option(tiny, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    path = X.save_single_file(tiny[0], tmp_path / "m.safetensors")
    with pytest.raises(ModelLoadError, match=r"config=.*--teacher-config"):
        load_teacher(str(path))


def test_single_file_that_is_not_sd(tmp_path):
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(ModelLoadError, match="not a Stable Diffusion 1.x checkpoint"):
        load_teacher(str(tmp_path / "lora.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="not a readable .safetensors"):
        load_teacher(str(tmp_path / "junk.safetensors"))


@pytest.mark.parametrize("name", ["model.ckpt", "model.bin", "model.pt", "model.pth"])
def test_pickle_refused_without_allow_pickle(tmp_path, name):
    (tmp_path / name).write_bytes(b"not even read")
    with pytest.raises(ModelLoadError, match="arbitrary code.*--allow-pickle"):
        load_teacher(str(tmp_path / name))


def test_pickle_inside_folder_refused(tiny, tmp_path):
    import shutil

    _, folder = tiny
    copy = tmp_path / "pickled"
    shutil.copytree(folder, copy)
    for f in (copy / "unet").glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    with pytest.raises(ModelLoadError, match=r"only pickle weights.*--allow-pickle"):
        load_teacher(str(copy))


def test_missing_and_non_sd_paths(tmp_path, monkeypatch):
    import huggingface_hub

    with pytest.raises(ModelLoadError, match="does not exist.*embedded name"):
        load_teacher(str(tmp_path / "nope"))
    (tmp_path / "notsd").mkdir()
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        load_teacher(str(tmp_path / "notsd"))
    (tmp_path / "notsd" / "model_index.json").write_text("{}")
    (tmp_path / "notsd" / "unet").mkdir()
    with pytest.raises(ModelLoadError, match=r"missing \['vae', 'text_encoder'"):
        load_teacher(str(tmp_path / "notsd"))
    (tmp_path / "weird.txt").write_text("x")
    with pytest.raises(ModelLoadError, match="not a model file"):
        load_teacher(str(tmp_path / "weird.txt"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="cannot load hub model 'nobody/no-such-model'.*HF_HUB_OFFLINE") as e:
        load_teacher("nobody/no-such-model")
    assert "\n" not in str(e.value)


# ---- students ------------------------------------------------------------------------------------------------------
def test_full_student_round_trip(tiny, tmp_path):
    pipe, _ = tiny
    student = make_student(pipe.unet)
    run = save_student(tmp_path / "run-full", student, lora=False, config={"method": "splam", "steps": 2})
    assert (run / "unet" / "config.json").is_file()
    assert json.loads((run / M.TRAINING_CONFIG).read_text())["method"] == "splam"
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no temp leftovers
    loaded = load_student(run, pipe)
    assert loaded.config.time_cond_proj_dim == COND_DIM
    assert same_state(loaded.state_dict(), student.state_dict())
    torch.testing.assert_close(unet_out(loaded), unet_out(student), rtol=0, atol=0)


def test_lora_student_round_trip(tiny, tmp_path):
    pipe, _ = tiny
    student = make_student(pipe.unet)
    add_random_lora(student, r=4, alpha=8.0)  # alpha != r: the scale must travel too
    run = save_student(tmp_path / "run-lora", student, lora=True, config={"method": "lcm"})
    assert {p.name for p in (run / "lora").iterdir()} == {X.LORA_WEIGHTS, X.COND_PROJ_FILE, X.STUDENT_UNET_CONFIG}
    loaded = load_student(run, pipe)
    assert same_state(get_peft_model_state_dict(loaded, adapter_name="student"), get_peft_model_state_dict(student))
    assert torch.equal(loaded.time_embedding.cond_proj.weight, student.time_embedding.cond_proj.weight)
    assert not any(p.is_meta for p in loaded.parameters())
    torch.testing.assert_close(unet_out(loaded), unet_out(student), rtol=0, atol=1e-6)
    assert not torch.allclose(unet_out(loaded), unet_out(make_student(pipe.unet)), atol=1e-3)  # the LoRA matters
    fused = load_student(run, pipe, fuse=True)
    assert not X.has_lora(fused)
    torch.testing.assert_close(unet_out(fused), unet_out(student), rtol=1e-4, atol=1e-5)
    assert same_state(pipe.unet.state_dict(), load_teacher(str(tiny[1])).unet.state_dict())  # teacher untouched


def test_lora_file_loads_in_a_stock_pipeline(tiny, tmp_path):
    pipe, folder = tiny
    student = make_student(pipe.unet)
    add_random_lora(student)
    run = save_student(tmp_path / "run", student, lora=True, config={})
    stock = load_teacher(str(folder))
    stock.load_lora_weights(str(run / "lora"), weight_name=X.LORA_WEIGHTS)
    names = {k.split(".lora_")[0] for k in get_peft_model_state_dict(stock.unet, adapter_name="default_0")}
    assert names == {k.split(".lora_")[0] for k in get_peft_model_state_dict(student)}


def test_save_student_replaces_atomically_and_switches_format(tiny, tmp_path):
    pipe, _ = tiny
    run = tmp_path / "run"
    (run / "samples").mkdir(parents=True)
    (run / "samples" / "keep.txt").write_text("mine")
    student = make_student(pipe.unet)
    save_student(run, student, lora=False, config={"v": 1})
    student2 = make_student(pipe.unet, seed=9)
    save_student(run, student2, lora=False, config={"v": 2})
    assert torch.equal(load_student(run, pipe).time_embedding.cond_proj.weight, student2.time_embedding.cond_proj.weight)
    add_random_lora(student2)
    save_student(run, student2, lora=True, config={"v": 3})
    assert not (run / "unet").exists() and (run / "lora").is_dir()
    assert (run / "samples" / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in run.iterdir()) == ["lora", "samples", M.TRAINING_CONFIG]
    with pytest.raises(ValueError, match="lora=True"):
        save_student(run, student2, lora=False, config={})
    with pytest.raises(ValueError, match="peft LoRA adapter"):
        save_student(run, make_student(pipe.unet), lora=True, config={})


def test_mismatched_student_is_refused(tiny, tmp_path):
    pipe, _ = tiny
    other = make_tiny_pipeline(tmp_path / "tok")
    wide = type(pipe.unet)(**{**dict(pipe.unet.config), "block_out_channels": (32, 32),
                              "time_cond_proj_dim": COND_DIM})
    save_student(tmp_path / "wide", wide, lora=False, config={})
    with pytest.raises(ModelLoadError, match=r"does not match its teacher: block_out_channels"):
        load_student(tmp_path / "wide", pipe)
    plain = save_student(tmp_path / "plain", other.unet, lora=False, config={})
    with pytest.raises(ModelLoadError, match="no time_cond_proj_dim"):
        load_student(plain, pipe)
    lora_student = make_student(pipe.unet)
    add_random_lora(lora_student)
    run = save_student(tmp_path / "lora", lora_student, lora=True, config={})
    cfg = json.loads((run / "lora" / X.STUDENT_UNET_CONFIG).read_text())
    (run / "lora" / X.STUDENT_UNET_CONFIG).write_text(json.dumps({**cfg, "cross_attention_dim": 768}))
    with pytest.raises(ModelLoadError, match="cross_attention_dim student=768 teacher=32"):
        load_student(run, pipe)
    with pytest.raises(ModelLoadError, match="holds no student"):
        load_student(tmp_path / "tok", pipe)
    with pytest.raises(ModelLoadError, match="not found"):
        load_student("no-such-run", pipe, weights=tmp_path)


# ---- kohya export --------------------------------------------------------------------------------------------------
def test_kohya_export_keys_map_to_modules(tiny, tmp_path):
    pipe, _ = tiny
    student = make_student(pipe.unet)
    add_random_lora(student, r=4, alpha=2.0)
    out = export_kohya_lora(student, tmp_path / "student_kohya.safetensors")
    sd = load_file(str(out))
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in sd
    fold = {k: sd.pop(k) for k in [f"{X.KOHYA_FOLD}.diff_b", f"{X.KOHYA_FOLD}.diff"]}  # the gamma = 1 fold (test_export)
    assert fold[f"{X.KOHYA_FOLD}.diff_b"].abs().max() > 0
    modules = {name.replace(".", "_"): m for name, m in pipe.unet.named_modules() if name}
    stems = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in sd}
    peft_modules = {k.split(".lora_A.")[0] for k in get_peft_model_state_dict(student) if ".lora_A." in k}
    assert len(stems) == len(peft_modules) and len(sd) == 3 * len(stems)
    for stem in stems:
        mod = modules[stem.removeprefix("lora_unet_")]  # one-to-one with a teacher module
        down, up, alpha = sd[f"{stem}.lora_down.weight"], sd[f"{stem}.lora_up.weight"], sd[f"{stem}.alpha"]
        assert down.shape[0] == 4 and up.shape[1] == 4 and float(alpha) == 2.0
        if isinstance(mod, torch.nn.Linear):
            assert down.shape == (4, mod.in_features) and up.shape == (mod.out_features, 4)
        else:
            assert down.shape[:2] == (4, mod.in_channels) and up.shape[:2] == (mod.out_channels, 4)
    # same delta as peft: W + (alpha / r) up @ down
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    lin = student.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k
    x = torch.randn(3, lin.in_features)
    expected = lin.base_layer(x) + (2.0 / 4) * x @ sd[f"{stem}.lora_down.weight"].T @ sd[f"{stem}.lora_up.weight"].T
    torch.testing.assert_close(lin(x), expected)
    # from a saved run folder: same tensors, alpha from the file's metadata
    run = save_student(tmp_path / "run", student, lora=True, config={})
    sd2 = load_file(str(export_kohya_lora(run, tmp_path / "from_run.safetensors", teacher=pipe.unet)))
    assert same_state({**sd, **fold}, sd2)
    # from a bare state dict in diffusers' older names: alpha unknown -> rank (scale 1)
    legacy = {"unet." + k.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up."): v
              for k, v in get_peft_model_state_dict(student).items()}
    sd3 = load_file(str(export_kohya_lora(legacy, tmp_path / "from_dict.safetensors")))
    assert set(sd3) == set(sd) and float(sd3[f"{stem}.alpha"]) == 4.0
    assert torch.equal(sd3[f"{stem}.lora_up.weight"], sd[f"{stem}.lora_up.weight"])


# ---- runs ----------------------------------------------------------------------------------------------------------
def test_list_and_resolve_runs(tiny, tmp_path):
    pipe, folder = tiny
    (tmp_path / "shapes-teacher").symlink_to(folder, target_is_directory=True)
    student = make_student(pipe.unet)
    save_student(tmp_path / "shapes-splam", student, lora=False, config={"method": "splam"})
    add_random_lora(student)
    save_student(tmp_path / "my-lcm-lora", student, lora=True, config={"method": "lcm"})
    (tmp_path / "shapes-evaluator").mkdir()
    (tmp_path / ".hidden-tmp").mkdir()
    runs = {r.name: r for r in M.list_runs(tmp_path)}
    assert set(runs) == {"shapes-teacher", "shapes-splam", "my-lcm-lora", "shapes-evaluator"}
    assert (runs["shapes-teacher"].kind, runs["shapes-teacher"].format) == ("teacher", "diffusers")
    assert (runs["shapes-splam"].kind, runs["shapes-splam"].format, runs["shapes-splam"].method) == ("student", "full", "splam")
    assert (runs["my-lcm-lora"].format, runs["my-lcm-lora"].method) == ("lora", "lcm")
    assert runs["shapes-evaluator"].kind == "evaluator"
    assert M.resolve_run("shapes-splam", tmp_path) == tmp_path.resolve() / "shapes-splam"
    assert M.resolve_run("shapes", tmp_path).name == "shapes-teacher"  # embedded alias
    assert load_student("my-lcm-lora", pipe, weights=tmp_path).config.time_cond_proj_dim == COND_DIM


@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "a/b", "..", ".", "", "a\\b", ".hidden-tmp", "x\0y",
                                 "shapes-splam/../..", "~"])
def test_resolve_run_rejects_paths(tmp_path, bad):
    (tmp_path / ".hidden-tmp").mkdir()
    (tmp_path / "shapes-splam").mkdir()
    with pytest.raises(ModelLoadError):
        M.resolve_run(bad, tmp_path)


def test_resolve_run_only_direct_children(tmp_path):
    (tmp_path / "w").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "w" / "f.txt").write_text("a file, not a run")
    os.symlink(tmp_path / "outside", tmp_path / "w" / "linked")  # placed by the owner: allowed
    assert M.resolve_run("linked", tmp_path / "w") == tmp_path.resolve() / "w" / "linked"
    for name in ("missing", "f.txt", "outside"):
        with pytest.raises(ModelLoadError, match=f"no run '{name}'"):
            M.resolve_run(name, tmp_path / "w")


def test_only_safetensors_by_default_anywhere():
    """Every from_pretrained of a weight class in the project asks for safetensors (use_safetensors, pickle only
    with allow_pickle), and nothing calls torch.load or pickle.load. (from_single_file is gated by the file
    suffix: test_pickle_refused_without_allow_pickle.)"""
    import ast

    root = Path(__file__).resolve().parents[1]
    files = sorted((root / "splam_studio").rglob("*.py")) + [root / "app.py", root / "train_cli.py"]
    weight_classes = {"StableDiffusionPipeline", "UNet2DConditionModel", "AutoencoderKL", "CLIPTextModel", "CLIPModel"}
    checked, bad = 0, []
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            fn, owner = node.func, node.func.value
            name = owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", "")
            if fn.attr == "load" and name in ("torch", "pickle"):
                bad.append(f"{f.name}:{node.lineno} {name}.load")
            if fn.attr == "from_pretrained" and name in weight_classes:
                checked += 1
                if not any(k.arg == "use_safetensors" for k in node.keywords):
                    bad.append(f"{f.name}:{node.lineno} {name}.{fn.attr} without use_safetensors")
    assert checked >= 5 and not bad, bad


def test_teacher_with_weights_its_library_would_reinitialise_is_refused(tiny, tmp_path):
    """transformers 4.x re-initialised the embedded (flat-named) text encoder with only a warning: refuse instead."""
    import shutil

    _, folder = tiny
    copy = tmp_path / "teacher"
    shutil.copytree(folder, copy)
    f = next((copy / "text_encoder").glob("*.safetensors"))
    sd = load_file(str(f))
    renamed = {k.replace("layers.0.", "layer_zero."): v for k, v in sd.items()}  # names this transformers does not read
    assert renamed.keys() != sd.keys()
    save_file(renamed, str(f), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"text_encoder does not match .*missing keys.*freshly initialised"):
        load_teacher(str(copy))
    shutil.copytree(folder / "text_encoder", copy / "text_encoder", dirs_exist_ok=True)
    assert same_state(load_teacher(str(copy)).text_encoder.state_dict(), tiny[0].text_encoder.state_dict())
