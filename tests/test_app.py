"""The studio on a tiny fake weights folder: Studio unit tests, a train subprocess, and the app end to end.

The end-to-end test launches `app.py` in a subprocess on a free port (SPLAM_WEIGHTS_DIR -> the fake weights, hub
offline) and drives every named API endpoint with gradio_client, bad inputs included.
"""
from __future__ import annotations

import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch

from splam_studio.studio import logic as studio_module
from splam_studio.studio.colors import METHOD_COLORS
from splam_studio.studio.launcher import Trainer, TrainStatus, clean_log
from splam_studio.studio.logic import MAX_PROMPT_CHARS, Studio, StudioError, clamp_float, clamp_int, clean_prompt, image_psnr
from splam_studio.store.runs import read_stats
from splam_studio.core.student import build_student
from tests.live import REPO, launch_app, stop_app  # noqa: F401 - the one launcher; other test files import it from here
from tests.tiny import make_tiny_pipeline

# One thread: on a busy 2-core machine torch's OpenMP threads spin against other processes and run ~50x slower.
torch.set_num_threads(1)
PROMPT = "one large red circle at the left on a black background"
IMAGE_PX = 16  # the tiny pipeline: 8x8 latents, VAE x2


def make_fake_weights(root: Path) -> Path:
    """weights/ with shapes-teacher (tiny pipeline) and shapes-splam / shapes-lcm (fresh students, w = 6.5)."""
    root.mkdir(parents=True, exist_ok=True)
    pipe = make_tiny_pipeline(root.parent / f"{root.name}-build")
    pipe.save_pretrained(str(root / "shapes-teacher"))
    for i, method in enumerate(("splam", "lcm")):
        student = build_student(pipe.unet, "fresh", generator=torch.Generator().manual_seed(i))
        student.save_pretrained(str(root / f"shapes-{method}" / "unet"))
        (root / f"shapes-{method}" / "training_config.json").write_text(json.dumps({"method": method, "w": 6.5}))
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return make_fake_weights(tmp_path_factory.mktemp("studio") / "weights")


@pytest.fixture(scope="module")
def studio(weights) -> Studio:
    return Studio(weights)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # train subprocesses inherit it


# ---- Studio -------------------------------------------------------------------------------------------------------
def test_model_lists_and_defaults(studio):
    assert studio.teacher_choices() == ["shapes-teacher"]
    assert studio.student_choices("lcm") == ["shapes-lcm"]  # one role per menu: the LCM run is no SPLAM student
    assert studio.student_choices("splam") == ["shapes-splam"] and len(studio.student_choices()) == 2
    assert studio.menu("splam") == [("shapes-splam · SPLAM", "shapes-splam")]
    assert studio.menu("lcm") == [("shapes-lcm · LCM", "shapes-lcm")]
    assert studio.menu("teacher") == [("shapes-teacher · teacher", "shapes-teacher")]
    assert (studio.default("teacher"), studio.default("splam"), studio.default("lcm")) == \
        ("shapes-teacher", "shapes-splam", "shapes-lcm")
    assert studio.models_status() == ""
    assert studio.baked_guidance("shapes-splam") == 7.5


def test_compare_three_panels_reproducible(studio):
    r = studio.compare(PROMPT, "", seed=3, student_steps=2, teacher_steps=3, guidance_scale=7.5, sampler="ddim")
    assert [p.role for p in r.panels] == ["teacher", "lcm", "splam"]
    for p in r.panels:
        assert p.image.size == (IMAGE_PX, IMAGE_PX)
        assert p.latency_ms > 0 and f"{p.latency_ms:.0f} ms" in p.label()
        assert "seed 3" in p.caption() and p.model in p.caption()
        assert len(p.latency_runs) == 3 and p.latency_ms == statistics.median(p.latency_runs)
        assert "3 runs" in p.caption()
    t = r.panel("teacher")
    for p in r.panels[1:]:  # the distance to the teacher's image from the same noise, and its heat map
        assert p.psnr_db == pytest.approx(image_psnr(p.image, t.image)) and f"PSNR {p.psnr_db:.1f} dB" in p.caption()
        assert p.latent_mse == pytest.approx(float((p.latent - t.latent).pow(2).mean()), rel=1e-5)
        assert p.heatmap.size[0] >= 256 and p.heatmap.mode == "RGB"
    assert t.psnr_db is None and image_psnr(t.image, t.image) == math.inf
    strip, caption = r.history_item()
    assert strip.size[0] > 3 * IMAGE_PX and "seed 3" in caption
    assert r.panel("teacher").steps == 3 and r.panel("splam").steps == 2
    assert r.panel("splam").speedup == pytest.approx(r.panel("teacher").latency_ms / r.panel("splam").latency_ms)
    assert "CFG 7.5 baked in" in r.panel("lcm").caption()
    again = studio.compare(PROMPT, "", seed=3, student_steps=2, teacher_steps=3, sampler="ddim")
    for a, b in zip(r.panels, again.panels):  # every panel reproducible from what it shows
        assert list(a.image.getdata()) == list(b.image.getdata())
    other = studio.compare(PROMPT, seed=4, student_steps=1, teacher_steps=2, sampler="dpm++")
    assert list(other.panel("splam").image.getdata()) != list(r.panel("splam").image.getdata())


@pytest.mark.parametrize("stride", [1, 3])
def test_error_bound_bounds_error(studio, stride):
    r = studio.error_bound_plot(PROMPT, seed=1, stride=stride, guidance_scale=7.5, n_thumbnails=3)
    assert set(r.curves) == {"LCM", "SPLAM"} and r.k == 20 * stride
    for eb in r.curves.values():
        assert eb.times == sorted(eb.times, reverse=True) and eb.times[-1] == 20 * stride - 1
        assert (eb.terms >= 0).all()
        assert (eb.bound >= eb.error - 1e-5).all()  # the triangle inequality the slides plot
        assert torch.allclose(eb.bound[-1], eb.terms[-1])
    frame = r.frame()
    assert list(frame.columns) == ["t", "rms", "series"]
    assert set(frame.series) == {"LCM bound", "LCM error", "SPLAM bound", "SPLAM error"}
    assert len(r.terms_frame()) == 2 * len(r.curves["LCM"].times)
    assert len(r.thumbnails) == 1 + 2 * 3 and r.thumbnails[0][0].size == (IMAGE_PX, IMAGE_PX)
    assert "| SPLAM |" in r.summary()
    grid = r.grid_image(cell=32)  # 2 rows of 3 thumbnails plus the teacher column, under a header of t values
    assert grid.size[0] > 4 * 32 and 2 * 32 < grid.size[1] < 3 * 32 + 32
    below = float(r.curves["SPLAM"].bound[0, 0]) < float(r.curves["LCM"].bound[0, 0])
    verdict = r.verdict()
    assert ("below LCM's" in verdict) == below and ("here that does not hold" in verdict) == (not below)
    assert r.color_map()["SPLAM bound"] == r.color_map()["SPLAM term"] == METHOD_COLORS["splam"]
    assert r.color_map()["LCM error"] != METHOD_COLORS["lcm"]


def test_validation_helpers():
    notes: list[str] = []
    assert clamp_int("student steps", 12, (1, 8), notes) == 8 and "outside 1-8" in notes[-1]
    assert clamp_int("seed", -5, (0, 10), notes) == 0
    assert clamp_int("steps", 2.6, (1, 8), notes) == 3 and "rounded" in notes[-1]
    assert clamp_float("guidance scale", 0.2, (1.0, 20.0), notes) == 1.0
    for bad in (float("nan"), "abc", None, True, math.inf):
        with pytest.raises(StudioError):
            clamp_int("seed", bad, (0, 10), [])
    notes = []
    assert clean_prompt("  a\x00b  ", notes) == "a b" and not notes
    assert len(clean_prompt("x" * 900, notes)) == MAX_PROMPT_CHARS and "truncated" in notes[0]
    with pytest.raises(StudioError, match="enter a prompt"):
        clean_prompt("   ", [])
    assert clean_prompt(None, [], required=False) == ""


def test_compare_rejects_and_clamps(studio):
    with pytest.raises(StudioError, match="enter a prompt"):
        studio.compare("")
    with pytest.raises(StudioError, match="unknown teacher sampler 'euler'"):
        studio.compare(PROMPT, sampler="euler")
    r = studio.compare("one " * 200, seed=-1, student_steps=99, teacher_steps=0, guidance_scale=100)
    assert r.panel("splam").steps == 8 and r.panel("teacher").steps == 1 and r.panel("teacher").seed == 0
    assert r.panel("teacher").guidance == 20.0
    assert any("truncated" in n for n in r.notices) and any("outside 1-8" in n for n in r.notices)


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "shapes-teacher/../..", "..", "nope", "a b",
                                  "~/weights", "C:\\x"])
def test_unknown_and_path_like_models_rejected(studio, name):
    with pytest.raises(StudioError, match="unknown"):
        studio.compare(PROMPT, teacher=name)
    with pytest.raises(StudioError, match="unknown"):
        studio.compare(PROMPT, splam=name)


def test_wrong_kind_and_offline_hub(studio):
    with pytest.raises(StudioError, match="is a student, not a teacher"):
        studio.compare(PROMPT, teacher="shapes-splam")
    with pytest.raises(StudioError, match="is a teacher, not a SPLAM student"):
        studio.compare(PROMPT, splam="shapes-teacher")
    with pytest.raises(StudioError, match="hf download alimama-creative/slam-sd1.5") as e:
        studio.compare(PROMPT, splam="alimama-creative/slam-sd1.5")
    assert "OSError" not in str(e.value) and str(e.value).count(". ") == 0  # one sentence, no stack of errors
    with pytest.raises(StudioError, match="offline"):
        studio.load_models("stable-diffusion-v1-5/stable-diffusion-v1-5", "shapes-splam", "shapes-lcm")
    assert Studio(studio.weights, allow_hub=False).resolve("shapes-splam", "splam")[0] == "path"
    with pytest.raises(StudioError, match="disabled"):
        Studio(studio.weights, allow_hub=False).resolve("owner/name", "splam")


def test_unreachable_hub_fails_before_any_download(studio, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(studio_module, "hub_reachable", lambda timeout=1.0: False)
    monkeypatch.setattr(studio_module, "_load_hub_student", lambda *a: pytest.fail("tried to download"))
    monkeypatch.setattr(studio_module, "load_teacher", lambda *a, **k: pytest.fail("tried to download"))
    with pytest.raises(StudioError, match="not in this machine's Hugging Face cache"):
        studio.compare(PROMPT, splam="owner/not-cached")
    with pytest.raises(StudioError, match="The teacher 'owner/other'"):
        studio.compare(PROMPT, teacher="owner/other")


def test_local_models_from_the_cli(weights):
    s = Studio(weights, local={"my-teacher": weights / "shapes-teacher"}, teacher="my-teacher")
    assert s.teacher_choices()[0] == "local:my-teacher" and s.default("teacher") == "local:my-teacher"
    assert s.resolve("local:my-teacher", "teacher") == ("path", (weights / "shapes-teacher").resolve())


# ---- training runs ----------------------------------------------------------------------------------------------
def test_stats_and_log_as_a_person_reads_them(tmp_path):
    stats = tmp_path / "stats.jsonl"
    stats.write_text('{"event": "start", "step": 0, "max_steps": 2}\n{"step": 1, "loss": 0.5, "it_s": 2.0, '
                     '"eta_s": 0.5}\n{"step": 2, "lo')  # the last line is still being written
    assert read_stats(stats) == [{"event": "start", "step": 0, "max_steps": 2},
                                 {"step": 1, "loss": 0.5, "it_s": 2.0, "eta_s": 0.5}]
    log = ("\x1b[32mINFO\x1b[0m ready\nsplam r:  50%|#####     | 1/2\rsplam r: 100%|##########| 2/2\n"
           "You have disabled the safety checker for <class X>\nerror: bad\n")
    assert clean_log(log) == ["INFO ready", "splam r: 100%|##########| 2/2", "error: bad"]


def test_loss_frame_is_numeric_even_when_empty():
    import pandas as pd

    for losses in ([], [(1, 0.2415), (2, 0.1803), (3, 0.09623)]):
        frame = TrainStatus("running", "", losses=losses).loss_frame()
        assert pd.api.types.is_integer_dtype(frame["step"]) and pd.api.types.is_float_dtype(frame["loss"])


@pytest.mark.slow
def test_train_subprocess_run_appears_in_lists(weights):
    s = Studio(weights)
    s.start_training("shapes-teacher", "shapes", "lcm", 1, "my-lcm", 2)
    with pytest.raises(StudioError, match="one run at a time"):
        s.start_training("shapes-teacher", "shapes", "splam", 1, "other", 2)
    deadline = time.time() + 240
    while s.trainer.running() and time.time() < deadline:
        time.sleep(0.5)
    st = s.trainer.status()
    assert st.state == "done", st.log_tail
    assert st.losses and st.losses[-1][0] == 1 and st.validation and st.it_s > 0
    reloaded = Trainer(weights, {}).status()  # a restarted studio still shows the last run
    assert reloaded.state == "done" and "my-lcm" in reloaded.message and reloaded.losses == st.losses
    assert "my-lcm" in s.student_choices("lcm")
    r = s.compare(PROMPT, student_steps=1, teacher_steps=1, lcm="my-lcm")
    assert r.panel("lcm").model == "my-lcm"


def test_finished_run_is_reaped_without_polling(weights):
    s = Studio(weights)
    s.start_training("shapes-teacher", "shapes", "splam", 1, "reaped", 2)
    pid = s.trainer.proc.pid
    deadline = time.time() + 240
    while Path(f"/proc/{pid}").exists() and time.time() < deadline:  # a zombie keeps /proc/<pid> until reaped
        time.sleep(0.5)
    assert not Path(f"/proc/{pid}").exists(), "the finished trainer was left a zombie"
    assert s.trainer.proc.returncode == 0


# ---- the app, end to end ------------------------------------------------------------------------------------------
def test_cli_defaults():
    sys.path.insert(0, str(REPO))
    import app

    args = app.parse_args([])
    assert (args.host, args.port, args.share) == ("127.0.0.1", 7860, False)


@pytest.fixture(scope="module")
def app_url(plain_app):
    return plain_app  # tests/conftest.py: one plain app for the session


def test_app_end_to_end(app_url):
    from gradio_client import Client
    from gradio_client.exceptions import AppError
    from PIL import Image

    c = Client(app_url, verbose=False)
    api = c.view_api(print_info=False, return_format="dict")
    assert set(api["named_endpoints"]) == {"/compare", "/error_bound", "/model_set"}
    assert api["named_endpoints"]["/model_set"]["parameters"][0]["parameter_default"] == "shapes"  # off Spaces

    models = ("shapes-teacher", "shapes-splam", "shapes-lcm")
    out = c.predict(PROMPT, "", 7, 2, 3, 7.5, "unipc", *models, api_name="/compare")
    images, captions, summary = out[:3], out[3:6], out[6]
    for img, title in zip(images, ("Teacher", "LCM", "SPLAM")):
        assert img["label"].startswith(title) and " ms" in img["label"]
        assert Image.open(img["value"]).size == (IMAGE_PX, IMAGE_PX)
    assert "unipc" in captions[0] and "seed 7" in captions[2] and "faster" in summary

    plot, terms, grid, eb_summary = c.predict(PROMPT, 7, 2, 7.5, *models, api_name="/error_bound")
    rows = plot["data"]
    for name in ("LCM", "SPLAM"):
        bound = {t: v for t, v, s in rows if s == f"{name} bound"}
        error = {t: v for t, v, s in rows if s == f"{name} error"}
        assert bound and all(bound[t] >= error[t] - 1e-5 for t in bound)
    assert {s for _, _, s in terms["data"]} == {"LCM term", "SPLAM term"}
    assert Image.open(grid).size[0] > 7 * 64 and "k = 40" in eb_summary and "For this prompt and seed" in eb_summary

    # out-of-range slider values are refused by gradio with a message (Studio clamps what gets past it)
    with pytest.raises(AppError, match="greater than maximum value 8"):
        c.predict(PROMPT, "", 7, 50, 3, 7.5, "ddim", *models, api_name="/compare")
    out = c.predict(PROMPT, "", -3, 2, 3, 7.5, "ddim", *models, api_name="/compare")
    assert "seed -3 is outside 0-2147483647; using 0" in out[6]  # the field is named
    out = c.predict("red " * 300, "", 7, 1, 1, 7.5, "ddim", *models, api_name="/compare")
    assert "truncated to 500" in out[6]

    bad = [
        (("", "", 7, 2, 3, 7.5, "ddim", *models), "/compare", "enter a prompt"),
        ((PROMPT, "", 7, 2, 3, 7.5, "ddim", "../../etc/passwd", *models[1:]), "/compare", "unknown teacher"),
        ((PROMPT, "", 7, 2, 3, 7.5, "ddim", models[0], "/etc/passwd", models[2]), "/compare", "unknown SPLAM"),
        ((PROMPT, "", 7, 2, 3, 7.5, "ddim", models[0], "alimama-creative/slam-sd1.5", models[2]), "/compare",
         "hf download"),
        ((PROMPT, "", 7, 2, 3, 7.5, "ddim", "shapes-splam", *models[1:]), "/compare", "not a teacher"),
        ((" ", 7, 1, 7.5, *models), "/error_bound", "enter a prompt"),
        ((PROMPT, 7, 1, 7.5, "..", *models[1:]), "/error_bound", "unknown teacher"),
    ]
    for args, endpoint, message in bad:
        with pytest.raises(AppError, match=message) as e:
            c.predict(*args, api_name=endpoint)
        assert "Traceback" not in str(e.value)
    with pytest.raises(Exception):  # not one of the Radio's choices: gradio itself refuses it
        c.predict(PROMPT, "", 7, 2, 3, 7.5, "euler", *models, api_name="/compare")


@pytest.mark.parametrize("route", ["/gradio_api/file=", "/file=", "/gradio_api/file=../../", "/gradio_api/upload/"])
@pytest.mark.parametrize("target", ["/etc/passwd", str(REPO / "splam_studio" / "models" / "loading.py"), str(REPO / "app.py")])
def test_no_file_outside_weights_is_served(app_url, route, target):
    """Gradio's file routes must not hand out server files: system files nor the app's own source."""
    import urllib.error
    import urllib.request

    url = app_url.rstrip("/") + route + target.lstrip("/" if route.endswith("../../") else "")
    try:
        with urllib.request.urlopen(url, timeout=20) as r:
            body = r.read(4096).decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        assert e.code in (400, 403, 404, 405, 422), (url, e.code)
        return
    assert "root:" not in body and "def load_teacher" not in body and "argparse" not in body, url


def test_w_conditioned_student_is_sampled_at_its_guidance(weights):
    """A run trained as diffusers' LCM (w ~ U[w_min, w_max], embedded) samples at CFG w + 1; gamma students at 1."""
    run = weights / "lcm-wrange"
    shutil.copytree(weights / "shapes-lcm", run)
    (run / "training_config.json").write_text(json.dumps({"method": "lcm", "w": 6.5, "w_min": 3.0, "w_max": 10.0}))
    try:
        s = Studio(weights)
        assert s.sampling_guidance("lcm-wrange", "lcm") == 7.5
        assert s.sampling_guidance("shapes-lcm", "lcm") == 1.0
        r = s.compare("one red circle", seed=3, student_steps=1, teacher_steps=2, lcm="lcm-wrange", repeats=1)
        gamma = s.compare("one red circle", seed=3, student_steps=1, teacher_steps=2, repeats=1)
        assert r.panel("lcm").guidance == 7.5 and gamma.panel("lcm").guidance == 1.0
        assert float(r.panel("lcm").latent_mse) != float(gamma.panel("lcm").latent_mse)  # the embedded w is used
    finally:
        shutil.rmtree(run)


def test_measured_note_reads_the_committed_benchmarks(tmp_path):
    import json

    from splam_studio.studio.logic import measured_note

    assert measured_note(tmp_path) == ""  # nothing measured, nothing claimed
    curve = lambda b, e: {"t": [999, 979], "term": [0.1, 0.1], "bound": [b, 1.0], "error": [e, 0.5]}  # noqa: E731
    (tmp_path / "results.json").write_text(json.dumps({"error_bound": {
        "lcm": {"k=40": curve(9.0, 9.0), "k=20": curve(1.25, 0.7)}, "splam": {"k=40": curve(9.0, 9.0), "k=20": curve(1.5, 0.8)}}}))
    point = lambda f, m: {"points": [{"2": {"fid": 99.0, "teacher_mse": 9.0}}, {"2": {"fid": f, "teacher_mse": m}}]}  # noqa: E731
    (tmp_path / "seeds.json").write_text(json.dumps({"runs": {"shapes-lcm": point(45.04, 0.1148), "shapes-splam": point(44.0, 0.1171)}}))
    note = measured_note(tmp_path)
    assert "at k=20, t = 999: bound LCM 1.250 / SPLAM 1.500, real error LCM 0.700 / SPLAM 0.800" in note
    assert "2-step Shapes-FID LCM 45.0 / SPLAM 44.0, latent MSE to the teacher LCM 0.1148 / SPLAM 0.1171" in note
