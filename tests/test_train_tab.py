"""The Train tab (studio/train_tab.py over launcher.Trainer): a recipe per teacher, stated before Start; typed prompts
trained with --prompts; validation on the run's own captions, and a word when the Validation panel is empty; a Stop
message that tells what is on disk and how to resume this very run; a bad input as one notice, no Error badges.

Real runs are tiny `python -m splam_studio.training` subprocesses on the tiny pipeline of tests/tiny.py.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import gradio as gr
import pytest
import torch
from PIL import Image

from splam_studio.store.runs import read_training_config
from splam_studio.studio.launcher import (LOGS, MAX_PROMPTS_CHARS, MAX_TEACHER_IMAGES, PROMPTS_FILE, TYPED_PROMPTS,
                                          Trainer, TrainStatus, check_prompts, native_px, recipe, stage_progress)
from splam_studio.studio.logic import Studio, StudioError
from splam_studio.studio.train_tab import N_VIEW, recipe_note, validation_note
from splam_studio.training.checkpoints import last_checkpoint
from splam_studio.training.cli import build_parser, resolve
from splam_studio.training.data import (CaptionFolderDataset, HFImageTextDataset, MetadataFolderDataset, build_dataset,
                                        first_captions)
from tests.test_app import REPO, make_fake_weights

torch.set_num_threads(1)
CAPTIONS = ["one large red circle at the left on a black background",
            "two small yellow squares at the top on a gray background",
            "one large blue circle at the center on a white background"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return make_fake_weights(tmp_path_factory.mktemp("train-tab") / "weights")


@pytest.fixture(scope="module")
def other_teacher(weights) -> Path:
    """A teacher that is not the embedded Shapes one (the tiny pipeline under another name, outside weights/)."""
    path = weights.parent / "my-finetune"
    if not path.exists():
        shutil.copytree(weights / "shapes-teacher", path)
    return path


@pytest.fixture(scope="module")
def folder(weights) -> Path:
    """An own captioned image folder: four 16 px images, three distinct captions, one image without a caption."""
    root = weights.parent / "my-images"
    root.mkdir(exist_ok=True)
    for i, caption in enumerate([*CAPTIONS, CAPTIONS[0], None]):
        Image.new("RGB", (16, 16), (60 * i, 0, 255 - 60 * i)).save(root / f"img{i}.png")
        if caption is not None:
            (root / f"img{i}.txt").write_text(caption + "\n")
    return root


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # train subprocesses inherit it


def _config(cmd: list[str]):
    """The TrainConfig the trainer resolves from the command the tab would run."""
    assert cmd[1:4] == ["-u", "-m", "splam_studio.training"]
    return resolve(build_parser().parse_args(cmd[4:]))


def _wait(cond, timeout: float = 240.0, step: float = 0.3) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(step)
    return cond()


# ---- what the tab refuses ---------------------------------------------------------------------------------------
def test_trainer_rejects_bad_runs(weights):
    studio = Studio(weights, warm_up=False)
    t = studio.trainer
    for name, match in [("../evil", "invalid run name"), ("a/b", "invalid run name"), ("shapes-x", "reserved"),
                        ("shapes-teacher", "reserved")]:
        with pytest.raises(StudioError, match=match):
            t.start("shapes", "shapes", "splam", 1, name)
    (weights / "taken").mkdir()
    with pytest.raises(StudioError, match="already exists"):
        t.start("shapes", "shapes", "splam", 1, "taken")
    with pytest.raises(StudioError, match="unknown data '/etc'"):
        t.start("shapes", "/etc", "splam", 1, "x1")
    with pytest.raises(StudioError, match="unknown method"):
        t.start("shapes", "shapes", "ddpm", 1, "x1")
    with pytest.raises(StudioError, match="unknown teacher"):
        studio.start_training("../../etc", "shapes", "splam", 1, "x1")
    allowed = Trainer(weights, {"mine": weights})
    assert allowed.data_choices() == ["shapes", "mine"]
    cmd = allowed.command("T", str(weights), "lcm", 8, "r", 4)
    assert cmd[1:4] == ["-u", "-m", "splam_studio.training"] and cmd[cmd.index("--preset") + 1] == "sd15"
    assert cmd[cmd.index("--output-dir") + 1] == str(weights) and cmd[cmd.index("--validate-every") + 1] == "2"
    with pytest.raises(StudioError, match="unknown data 'prompts'"):
        t.start("shapes", "prompts", "splam", 1, "x1")


# ---- the recipe per teacher (issue 28.2) ----------------------------------------------------------------------------
def test_embedded_teacher_trains_with_the_shapes_preset_whatever_the_data(weights, folder):
    t = Trainer(weights, {"mine": folder})
    assert recipe(weights / "shapes-teacher", weights).preset == "shapes" and recipe("shapes", weights).preset == "shapes"
    shapes_run = _config(t.command(weights / "shapes-teacher", "shapes", "splam", 8, "r", 4))
    folder_run = _config(t.command(weights / "shapes-teacher", str(folder), "splam", 8, "r", 4))
    for cfg in (shapes_run, folder_run):  # the shapes preset's measured recipe, the page's steps and batch
        assert (cfg.lr, cfg.w, cfg.gamma_one_prob, cfg.cond_proj_init, cfg.cond_proj_lr_scale) == (1e-5, 6.5, 0.8, "zero", 30.0)
        assert (cfg.max_steps, cfg.batch_size, cfg.checkpoint_every, cfg.validate_every) == (8, 4, 4, 2)
    assert folder_run.data == str(folder)
    assert len(shapes_run.validation_prompts) == 3  # the preset's Shapes prompts, for the preset's own data
    assert folder_run.validation_prompts == []  # not the preset's Shapes prompts: the trainer takes the folder's captions


def test_other_teachers_get_sd15_with_measured_gamma_sampling(weights, other_teacher, folder, monkeypatch):
    r = recipe(other_teacher, weights)
    assert r.preset == "sd15" and native_px(other_teacher) == 16
    monkeypatch.chdir(weights.parent)  # a hub id is never read as a folder, even where one of that name exists
    assert native_px("weights/shapes-teacher") is None and native_px(Path("weights/shapes-teacher")) == 16
    cfg = _config(Trainer(weights, {}).command(other_teacher, "shapes", "splam", 8, "r", 4))
    assert cfg.gamma_one_prob == 0.8 and cfg.cond_proj_init == "zero"  # not the U[0, 1] that collapsed (BENCHMARKS.md)
    assert (cfg.lora_rank, cfg.lr, cfg.w, cfg.gradient_checkpointing) == (64, 1e-4, 8.0, True)  # the sd15 preset
    assert cfg.teacher == str(other_teacher) and cfg.resolution == 16  # the teacher's own size, not the preset's 512
    assert cfg.validation_prompts == []  # not the preset's "a photo of a cat": the data's own captions
    hub = recipe("someone/not-cached", weights)  # configs unreadable: the preset's size, and the page says so
    assert "--resolution" not in hub.flags and "512 px" in hub.why


def test_the_page_states_the_recipe_before_start(weights, other_teacher, folder):
    s = Studio(weights, local={"mine": other_teacher}, data_dirs={"photos": folder}, warm_up=False)
    note = recipe_note(s, "shapes-teacher", "shapes", "splam")
    assert "preset `shapes`" in note and "collapsed" in note and "the preset's Shapes prompts" in note
    note = recipe_note(s, "local:mine", "photos", "lcm")
    assert "preset `sd15`" in note and "--gamma-one-prob 0.8" in note and "16 px" in note
    assert "captions of the folder" in note and "SPLAM only" in note and str(folder) not in note
    assert "first 4 prompts" in recipe_note(s, "shapes-teacher", TYPED_PROMPTS, "splam")
    assert recipe_note(s, "../etc", "shapes", "splam").startswith("⚠️ unknown teacher")


# ---- validation on the run's own captions -----------------------------------------------------------------------------
def test_first_captions_read_the_folder_without_its_images(folder, tmp_path):
    ds = build_dataset(str(folder), 16)
    assert isinstance(ds, CaptionFolderDataset) and first_captions(ds, 4) == CAPTIONS  # distinct, uncaptioned skipped
    assert first_captions(ds, 2) == CAPTIONS[:2]
    meta = tmp_path / "meta"
    meta.mkdir()
    for i, c in enumerate(CAPTIONS):
        Image.new("RGB", (16, 16)).save(meta / f"{i}.png")
    (meta / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "text": c}) + "\n"
                                                 for i, c in enumerate(reversed(CAPTIONS))))
    ds = build_dataset(str(meta), 16)
    assert isinstance(ds, MetadataFolderDataset) and first_captions(ds, 4) == CAPTIONS[::-1]
    assert len(first_captions(build_dataset("shapes:10", 16), 4)) == 4
    import datasets

    png = (folder / "img0.png").read_bytes()
    hf = datasets.Dataset.from_dict({"image": [{"bytes": png, "path": None}] * 4, "text": ["", *CAPTIONS]},
                                    features=datasets.Features(image=datasets.Image(), text=datasets.Value("string")))
    assert first_captions(HFImageTextDataset(hf, 16), 4) == CAPTIONS  # the empty caption is no prompt


def test_validation_panel_says_why_it_is_empty():
    assert "appear here" in validation_note(TrainStatus("idle", ""))
    assert "loading" in validation_note(TrainStatus("running", ""))
    assert "no validation prompts" in validation_note(TrainStatus("running", "", validation_prompts=[]))
    assert "step 50" in validation_note(TrainStatus("running", "", validation_prompts=["a"], validate_every=50))
    assert "ended before its first validation" in validation_note(
        TrainStatus("stopped", "", validation_prompts=["a"], validate_every=50))
    assert validation_note(TrainStatus("done", "", validation=[(Path("v.png"), "step 1")])) == ""


# ---- typed prompts (issue 23.1, the tab's side) -------------------------------------------------------------------
def test_typed_prompts_are_checked_against_the_page_limits():
    notices: list[str] = []
    text, n = check_prompts("a red circle\n\n# a comment\n" + json.dumps({"prompt": "a blue square"}), 40, notices)
    assert n == 16 and "images per prompt 40 is outside 1-16" in notices[0] and text.endswith("\n")
    for bad, match in [("", "needs prompts"), ("x" * (MAX_PROMPTS_CHARS + 1), "at most"),
                       ('ok\n{"prompt": 3}', r"the Prompts box, line 2"), ("\n".join(["p"] * 1001), "at most 1000"),
                       ("\n".join(["p"] * 300), f"at most {MAX_TEACHER_IMAGES}")]:
        with pytest.raises(StudioError, match=match):
            check_prompts(bad, 16, [])


def test_generation_progress_is_read_from_the_trainer_bar():
    lines = ["loading", "teacher data:  40%|####      | 2/5 [00:03<00:04,  1.20img/s]"]
    assert stage_progress(lines) == "making teacher data: 2/5 images (40%), 00:03 so far, 00:04 left"
    assert stage_progress(lines + ["teacher data: 5 prompts x 1 = 5 images, DDIM 50 at CFG 7.5"]) is None
    assert stage_progress(["step 1"]) is None


def test_a_prompts_file_from_the_command_line_is_a_data_choice(weights, tmp_path):
    listed = tmp_path / "my-prompts.txt"
    listed.write_text("\n".join(CAPTIONS) + "\n")
    s = Studio(weights, data_dirs={"list": listed}, warm_up=False)
    assert s.trainer.data_choices() == ["shapes", "list"] and s.trainer.prompts_file("list") == listed.resolve()
    assert s.trainer.prompts_file("shapes") is None
    cfg = _config(s.trainer.command(weights / "shapes-teacher", "shapes", "splam", 8, "r", 4,
                                    prompts=s.trainer.prompts_file("list"), images_per_prompt=3))
    assert (cfg.prompts, cfg.images_per_prompt, cfg.validation_prompts) == (str(listed.resolve()), 3, [])
    note = recipe_note(s, "shapes-teacher", "list", "splam")
    assert "prompts file `list`" in note and str(tmp_path) not in note


@pytest.mark.slow
def test_typed_prompts_run_from_the_tab(weights):
    t = Trainer(weights, {})
    msg = t.start(weights / "shapes-teacher", TYPED_PROMPTS, "lcm", 2, "typed-run", 2,
                  prompts="\n".join(CAPTIONS[:2]), images_per_prompt=2)
    assert "x 2 images each" in msg and "preset shapes" in msg
    assert _wait(lambda: not t.running()), t.status().log_tail
    st = t.status()
    assert st.state == "done", st.log_tail
    prompts_file = weights / LOGS / f"typed-run{PROMPTS_FILE}"
    assert prompts_file.read_text().splitlines() == CAPTIONS[:2]  # under the logs folder, counted by the quota
    cfg = read_training_config(weights / "typed-run")
    assert cfg["prompts"] == str(prompts_file) and cfg["images_per_prompt"] == 2
    assert cfg["latent_store"]["kind"] == "teacher" and cfg["latent_store"]["items"] == 4
    assert cfg["validation_prompts"] == CAPTIONS[:2] and st.validation  # the prompts, not the preset's
    assert "teacher data: 2 prompts x 2 = 4 images" in (weights / LOGS / "typed-run.log").read_text()


@pytest.mark.slow
def test_folder_run_with_another_teacher_validates_on_its_captions(weights, other_teacher, folder):
    s = Studio(weights, local={"mine": other_teacher}, data_dirs={"photos": folder}, warm_up=False)
    s.start_training("local:mine", "photos", "splam", 2, "folder-run", 2)
    assert _wait(lambda: not s.trainer.running()), s.trainer.status().log_tail
    st = s.trainer.status()
    assert st.state == "done", st.log_tail
    cfg = read_training_config(weights / "folder-run")
    assert cfg["gamma_one_prob"] == 0.8 and cfg["lora_rank"] == 64 and cfg["resolution"] == 16
    assert cfg["validation_prompts"] == CAPTIONS and st.validation and validation_note(st) == ""


# ---- Stop tells the truth (issue 28.4) ----------------------------------------------------------------------------
class EarlyCheckpoints(Trainer):
    """The tab's command with a checkpoint every 2 steps, so that a long run has one to stop after."""

    def command(self, *args, **kwargs):
        return super().command(*args, **kwargs) + ["--checkpoint-every", "2"]


@pytest.mark.slow
def test_stop_names_the_real_checkpoint_and_a_resume_of_this_run(weights):
    t = EarlyCheckpoints(weights, {})
    t.start(weights / "shapes-teacher", "shapes", "lcm", 10_000, "stop-after", 2)
    run = weights / "stop-after"
    assert _wait(lambda: last_checkpoint(run) is not None or not t.running()), t.status().log_tail
    assert t.stop(grace_s=30).startswith("Stopping")
    assert _wait(lambda: not t.running(), 60)
    st = t.status()
    ck, step = last_checkpoint(run)
    assert st.state == "stopped", st.log_tail
    assert f"weights/stop-after/checkpoints/{ck.name} (step {step})" in st.message, st.message
    cmd = "python -m splam_studio.training --run-name stop-after --resume latest --output-dir weights"
    assert cmd in st.message and str(weights) not in st.message
    # the command resumes this run with its own config (LCM, batch 2, the Shapes data), one step further
    argv = cmd.split()[3:] + ["--max-steps", str(step + 1)]
    out = subprocess.run([sys.executable, "-m", "splam_studio.training", *argv], cwd=weights.parent,
                         capture_output=True, text=True, timeout=240,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"continuing at step {step}" in out.stdout + out.stderr
    cfg = read_training_config(run)
    assert (cfg["method"], cfg["batch_size_requested"], cfg["data"], cfg["max_steps"]) == ("lcm", 2, "shapes", step + 1)


def test_stop_before_the_first_checkpoint_leaves_nothing(weights):  # was test_app.py's test_train_stop
    t = Trainer(weights, {})
    t.start(weights / "shapes-teacher", "shapes", "splam", 10_000, "stop-early", 2)
    run = weights / "stop-early"
    assert _wait(lambda: run.is_dir() or not t.running()), t.status().log_tail  # the trainer holds its folder
    assert t.stop(grace_s=30).startswith("Stopping")
    assert _wait(lambda: not t.running(), 60)
    st = t.status()
    assert st.state == "stopped" and "no checkpoint was written before the stop" in st.message, st.message
    assert "the name 'stop-early' is free" in st.message and not run.exists()  # as the README says
    assert "No validation grid" in validation_note(st)
    assert t.stop() == "No run is going."
    t.start(weights / "shapes-teacher", "shapes", "splam", 10_000, "stop-early", 2)  # the name is free again
    t.stop(grace_s=30)
    assert _wait(lambda: not t.running(), 60)


# ---- the page: input errors are one notice (issue 28.7) --------------------------------------------------------------
def _handler(demo: gr.Blocks, name: str):
    return next(f.fn for f in demo.fns.values() if getattr(f.fn, "__name__", "") == name)


def test_bad_input_is_one_notice_and_no_error_badges(weights):
    from splam_studio.studio.ui import build_ui

    demo = build_ui(Studio(weights, warm_up=False))
    on_start = _handler(demo, "on_start")
    request = type("Request", (), {"session_hash": "s1"})()
    for args, match in [(("shapes-teacher", "shapes", "splam", 5, 2, "../evil", "", 1), "invalid run name"),
                        (("shapes-teacher", TYPED_PROMPTS, "splam", 5, 2, "p-run", "", 1), "needs prompts"),
                        (("nope", "shapes", "splam", 5, 2, "x-run", "", 1), "unknown teacher"),
                        (("shapes-teacher", "shapes", "splam", "many", 2, "y-run", "", 1), "must be a number")]:
        out = on_start(*args, request)  # returns, never raises gr.Error (which badges every output red)
        assert len(out) == N_VIEW + 1
        assert all(o == gr.skip() for o in out[:N_VIEW])  # every other output keeps what it shows
        assert out[-1].startswith("⚠️") and match in out[-1] and str(weights) not in out[-1]
