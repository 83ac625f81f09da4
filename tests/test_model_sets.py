"""Model sets on tiny replicas of their hub repos, read from a prepared Hugging Face cache with HF_HUB_OFFLINE=1.

Each set loads through the same code a Space runs (Studio.for_model_set -> load_teacher / load_hub_student), then
compares and plots the error bound; the app is driven through gradio_client with a Space's environment.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

from splam_studio.models import model_sets as S
from splam_studio.models.loading import ModelLoadError, load_hub_student, load_teacher
from splam_studio.studio.logic import Studio, StudioError
from tests.fake_hub import (FULL_STUDENTS, LORAS, TEACHERS, UNREADABLE, XL_LORAS, XL_TEACHER, build_fake_hub,
                            repo_folder)
from tests.test_app import IMAGE_PX, PROMPT, REPO, launch_app, make_fake_weights, stop_app

torch.set_num_threads(1)
HUB_SETS = ("dreamshaper7", "sd15")


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """The fake cache, exposed as the hub libraries read it: HF_HUB_CACHE and HF_HUB_OFFLINE=1."""
    import huggingface_hub

    cache = tmp_path_factory.mktemp("hf") / "hub"
    build_fake_hub(cache)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_CACHE", str(cache))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # read at import: patch the module too
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield cache


@pytest.fixture(scope="module")
def studios(hub_cache, tmp_path_factory):
    weights = tmp_path_factory.mktemp("empty-weights")
    return {name: Studio.for_model_set(name, weights, device="cpu") for name in HUB_SETS}


# ---- the table and the default ----------------------------------------------------------------------------------
def test_table_names_every_released_repo():
    assert set(S.MODEL_SETS) == {"shapes", "shapes-1step", "shapes-xl", "shapes-xl-lora", "dreamshaper7", "sd15",
                                 "sdxl"}  # sdxl: test_sdxl_studio.py
    ds, sd = S.MODEL_SETS["dreamshaper7"], S.MODEL_SETS["sd15"]
    assert (ds.teacher, ds.lcm, ds.splam) == ("Lykon/dreamshaper-7", S.Student("SimianLuo/LCM_Dreamshaper_v7", "unet"),
                                              S.Student("alimama-creative/slam-dreamshaper7", "unet"))
    assert sd.teacher == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert (sd.lcm.kind, sd.splam.kind) == ("lora", "unet") and sd.splam.repo == "alimama-creative/slam-sd1.5"
    assert S.student_kind("latent-consistency/lcm-lora-sdv1-5") == "lora" and S.student_kind("a/b") is None
    assert not any(S.MODEL_SETS[n].hub for n in ("shapes", "shapes-1step", "shapes-xl", "shapes-xl-lora")) and ds.hub and sd.hub
    # the fake caches replicate exactly the repos the table names
    assert {r for m in S.MODEL_SETS.values() if m.hub for r in (m.teacher, m.lcm.repo, m.splam.repo)} == \
        set(TEACHERS) | set(FULL_STUDENTS) | set(LORAS) | {XL_TEACHER, *XL_LORAS}
    with pytest.raises(ValueError, match=r"unknown model set 'sd3'; choose one of \['dreamshaper7', 'sd15', 'sdxl', "
                       r"'shapes', 'shapes-1step', 'shapes-xl', 'shapes-xl-lora'\]"):
        S.get_model_set("sd3")
    with pytest.raises(StudioError, match="unknown model set"):
        Studio.for_model_set("sd3")


@pytest.mark.parametrize("env, gpu, expected", [
    ({}, True, "shapes"),  # a GPU workstation: still the offline default
    ({"SPACE_ID": "me/splam"}, False, "shapes"),  # a CPU Space
    ({"SPACE_ID": "me/splam"}, True, "dreamshaper7"),  # a GPU Space
    ({"SPACE_ID": "me/splam", "SPACES_ZERO_GPU": "true"}, None, "dreamshaper7"),  # ZeroGPU: no GPU visible at start
    ({"SPACES_ZERO_GPU": "true"}, None, "shapes"),
])
def test_default_follows_the_environment(env, gpu, expected):
    assert S.default_model_set(env, gpu=gpu) == expected


def test_gpu_precision_decided_once(monkeypatch):
    """On CUDA an SD set runs in fp16 (no CUDA touched here: models load lazily); on the CPU in fp32."""
    import splam_studio.training.device as D

    assert Studio.for_model_set("dreamshaper7", device="cpu").runtime.weight_dtype == torch.float32
    monkeypatch.setattr(D, "pick_device", lambda name="auto": torch.device("cuda"))
    s = Studio.for_model_set("dreamshaper7")
    assert (s.runtime.device.type, s.runtime.weight_dtype) == ("cuda", torch.float16)
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    assert not Studio.for_model_set("sd15").warm_up  # no GPU outside a ZeroGPU call: no warm-up generation


def test_gpu_duration_grows_with_the_work():
    assert S.gpu_seconds(512, 100) > S.gpu_seconds(512, 10) > S.gpu_seconds(64, 10) >= 15


# ---- loading each layout from the cache -------------------------------------------------------------------------
def test_cache_layout_is_the_hubs(hub_cache):
    root = repo_folder(hub_cache, "SimianLuo/LCM_Dreamshaper_v7")
    rev = (root / "refs" / "main").read_text()
    weights = root / "snapshots" / rev / "unet" / "diffusion_pytorch_model.safetensors"
    assert weights.is_symlink() and weights.resolve().parent == (root / "blobs").resolve()
    assert (root / "snapshots" / rev / "text_encoder" / "model.safetensors").read_bytes() == UNREADABLE
    lora = repo_folder(hub_cache, "latent-consistency/lcm-lora-sdv1-5") / "snapshots" / rev
    assert sorted(p.name for p in lora.iterdir()) == ["README.md", "pytorch_lora_weights.safetensors"]


def test_each_layout_loads_in_the_teachers_dtype(hub_cache):
    teacher = load_teacher("stable-diffusion-v1-5/stable-diffusion-v1-5", torch_dtype=torch.float16)
    assert teacher.unet.dtype == teacher.vae.dtype == teacher.text_encoder.dtype == torch.float16
    before = {k: v.clone() for k, v in teacher.unet.state_dict().items()}
    full = load_hub_student("alimama-creative/slam-sd1.5", teacher, "unet")
    lora = load_hub_student("latent-consistency/lcm-lora-sdv1-5", teacher, "lora")
    assert full.dtype == lora.dtype == torch.float16 and full.device == lora.device == teacher.device
    assert full.config.time_cond_proj_dim == 256 and lora.config.time_cond_proj_dim is None
    assert not hasattr(lora, "peft_config") or not lora.peft_config  # fused, adapter gone
    changed = [k for k, v in lora.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(any(m in k for m in ("attn", "proj", "conv", "time_emb")) for k in changed)
    assert all(torch.equal(v, before[k]) for k, v in teacher.unet.state_dict().items())  # the teacher is untouched
    with pytest.raises(ModelLoadError, match=r"cannot load student 'latent-consistency/lcm-lora-sdv1-5' "
                       r"\(HF_HUB_OFFLINE is set.*lcm-lora-sdv1-5/unet") as e:
        load_hub_student("latent-consistency/lcm-lora-sdv1-5", teacher, "unet")
    assert "\n" not in str(e.value)
    with pytest.raises(ModelLoadError, match="not-cached/model"):
        load_hub_student("not-cached/model", teacher)  # unlisted: tried as a UNet, then as a LoRA


@pytest.mark.parametrize("name", HUB_SETS)
def test_set_loads_lazily_with_progress_and_stays_cached(studios, name):
    s, m = studios[name], S.MODEL_SETS[name]
    assert not s._cache  # nothing loaded at construction
    steps = []
    s.load_models(s.default("teacher"), s.default("splam"), s.default("lcm"), progress=lambda f, d: steps.append(d))
    assert steps == [f"loading teacher {m.teacher}", f"loading SPLAM student {m.splam.repo}",
                     f"loading LCM student {m.lcm.repo}"]
    pipe = s.teacher()
    splam, lcm = s.student(None, role="splam"), s.student(None, role="lcm")
    assert s.student(None, role="splam") is splam and s.teacher() is pipe  # cached
    assert splam.config.time_cond_proj_dim == 256
    assert (lcm.config.time_cond_proj_dim is None) == (m.lcm.kind == "lora")
    for unet in (splam, lcm):
        assert unet.dtype == pipe.unet.dtype == torch.float32 and unet.device == pipe.device  # CPU: fp32


@pytest.mark.parametrize("name", HUB_SETS)
def test_set_compares_and_bounds(studios, name):
    s = studios[name]
    r = s.compare(PROMPT, seed=5, student_steps=2, teacher_steps=2)
    assert [p.model for p in r.panels] == [s.default("teacher"), s.default("lcm"), s.default("splam")]
    assert all(p.image.size == (IMAGE_PX, IMAGE_PX) for p in r.panels)
    assert list(r.panel("lcm").image.getdata()) != list(r.panel("splam").image.getdata())
    eb = s.error_bound_plot(PROMPT, seed=5, stride=2, n_thumbnails=2)
    assert not eb.trajectory_reused
    for curve in eb.curves.values():  # the LoRA student (no time_cond_proj) included
        assert (curve.bound >= curve.error - 1e-5).all()
    again = s.error_bound_plot(PROMPT, seed=5, stride=5, n_thumbnails=2)
    assert again.trajectory_reused and "reused" in again.summary()
    assert list(again.thumbnails[0][0].getdata()) == list(eb.thumbnails[0][0].getdata())  # the same teacher z_0


# ---- the app as a Space runs it -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def space_url(hub_cache, tmp_path_factory):
    if importlib.util.find_spec("spaces"):
        pytest.skip("the real `spaces` package schedules a GPU when SPACES_ZERO_GPU is set; this test fakes ZeroGPU")
    weights = make_fake_weights(tmp_path_factory.mktemp("space") / "weights")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPACE_ID", "someone/splam-studio")
        mp.setenv("SPACES_ZERO_GPU", "true")  # a ZeroGPU Space: the GPU default, without a GPU here
        mp.setenv("HF_HUB_CACHE", str(hub_cache))
        proc, url = launch_app(weights, tmp_path_factory.mktemp("space-log") / "app.log", "--device", "cpu")
    yield url
    stop_app(proc)


def test_space_default_and_switch_through_gradio_client(space_url):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    c = Client(space_url, verbose=False)
    api = c.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert set(api) == {"/compare", "/error_bound", "/model_set"}
    assert api["/model_set"]["parameters"][0]["parameter_default"] == "dreamshaper7"
    defaults = {p["parameter_name"]: p.get("parameter_default") for p in api["/compare"]["parameters"]}
    ds = S.MODEL_SETS["dreamshaper7"]
    assert (defaults["teacher"], defaults["splam"], defaults["lcm"]) == (ds.teacher, ds.splam.repo, ds.lcm.repo)

    for name in ("dreamshaper7", "sd15", "shapes"):
        out = c.predict(name, api_name="/model_set")
        teacher, splam, lcm, about, prompt, _ = (x["value"] if isinstance(x, dict) else x for x in out)
        m = S.MODEL_SETS[name]
        assert (teacher, splam, lcm) == (m.teacher, m.splam.repo, m.lcm.repo) and m.teacher in about
        out = c.predict(prompt, "", 3, 1, 2, 7.5, "ddim", teacher, splam, lcm, api_name="/compare")
        assert m.lcm.repo in out[4] and m.splam.repo in out[5] and m.teacher in out[3]
    with pytest.raises(AppError, match="unknown model set|not in the list of choices"):
        c.predict("sd3", api_name="/model_set")


# ---- the entry point and the Space's files ------------------------------------------------------------------------
def test_models_flag():
    import subprocess
    import sys

    sys.path.insert(0, str(REPO))
    import app

    assert app.parse_args(["--models", "sd15"]).models == "sd15" and app.parse_args([]).models is None
    assert app.parse_args(["--models", "sdxl"]).models == "sdxl"
    r = subprocess.run([sys.executable, str(REPO / "app.py"), "--models", "sd3"], capture_output=True, text=True,
                       cwd=str(REPO), timeout=60)
    assert r.returncode == 2 and "invalid choice: 'sd3'" in r.stderr and "dreamshaper7" in r.stderr


def test_no_cuda_touched_at_import():
    """Importing the app and the package neither initialises CUDA nor asks for a device (ZeroGPU forbids the first)."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "calls = []\n"
        "def trap(*a, **k):\n    calls.append('lazy_init'); raise RuntimeError('CUDA initialised')\n"
        "torch.cuda._lazy_init = trap\n"
        "torch.cuda.is_available = lambda: calls.append('is_available') or False\n"
        "import diffusers, gradio, transformers\nfrom diffusers import StableDiffusionPipeline\n"
        "n = len(calls)\nsys.path.insert(0, '.')\n"
        "import app\napp.parse_args([])\n"
        "import splam_studio.studio.ui, splam_studio.models.model_sets, splam_studio.studio.logic, splam_studio.models.loading\n"
        "print('ours', calls[n:])\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(REPO), timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ours []" in r.stdout, r.stdout


def test_requirements_install_the_right_torch_without_edits():
    """No index line forcing the CPU build (PyPI's Linux torch is the CUDA build a GPU Space needs; setup.sh puts the
    CPU build in first elsewhere and the range keeps it); every runtime pin agrees with pyproject; spaces is listed."""
    import re

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    lines = [ln.strip() for ln in (REPO / "requirements.txt").read_text().splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")]
    assert not [ln for ln in lines if ln.startswith("-")], lines
    reqs = {re.split(r"[<>=!~\[ ]", ln, maxsplit=1)[0].lower(): ln for ln in lines}
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in project:
        name = re.split(r"[<>=!~\[ ]", dep, maxsplit=1)[0].lower()
        assert reqs.get(name) == dep, (name, reqs.get(name), dep)
    assert "spaces" in reqs
    setup = (REPO / "setup.sh").read_text()
    assert "download.pytorch.org/whl/cpu" in setup and 'torch==2.13.0' in setup


def test_front_matter_is_a_spaces_config():
    text = (REPO / "README.md").read_text()
    assert text.startswith("---\n")
    meta = dict(ln.split(": ", 1) for ln in text.split("---\n")[1].splitlines() if ": " in ln and not ln.startswith(" "))
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py" and meta["suggested_hardware"] == "zero-a10g"
    import gradio

    assert meta["sdk_version"].strip('"') == gradio.__version__  # the Space runs the gradio the tests ran
    models = [ln.strip()[2:] for ln in text.split("---\n")[1].splitlines() if ln.startswith("  - ")]
    assert set(models) == {r for m in S.MODEL_SETS.values() if m.hub for r in (m.teacher, m.lcm.repo, m.splam.repo)}
    assert "## Run it as a Space" in text


def test_gpu_calls_are_sized_and_wrapped(monkeypatch, tmp_path):
    """With spaces present, both endpoints borrow the GPU through spaces.GPU with a duration from the call's work."""
    import sys
    import types

    seen = []

    def GPU(fn=None, *, duration=None, **_):
        def wrap(f):
            def call(*args):
                seen.append((f.__name__, duration(*args)))
                return f(*args)
            return call
        return wrap(fn) if fn is not None else wrap

    monkeypatch.setitem(sys.modules, "spaces", types.SimpleNamespace(GPU=GPU))
    import importlib

    import splam_studio.studio.ui as ui

    ui = importlib.reload(ui)
    try:
        weights = make_fake_weights(tmp_path / "weights")
        demo = ui.build_ui(Studio.for_model_set("shapes", weights, device="cpu"), train=False)
        fns = {d.api_name: d.fn for d in demo.fns.values() if d.api_name}
        fns["compare"](PROMPT, "", 0, 2, 3, 7.5, "ddim", "shapes-teacher", "shapes-splam", "shapes-lcm")
        fns["error_bound"](PROMPT, 0, 5, 7.5, "shapes-teacher", "shapes-splam", "shapes-lcm")
    finally:
        monkeypatch.delitem(sys.modules, "spaces")
        importlib.reload(ui)
    assert seen == [("compare_on_gpu", S.gpu_seconds(IMAGE_PX, 4 * (3 + 2 * 2 + 3))),  # 1 warm-up + 3 timed rounds
                    ("error_bound_on_gpu", S.gpu_seconds(IMAGE_PX, 50 + 2 * 11 + 13))]


def test_the_baked_cfg_has_one_owner_per_kind(tmp_path, monkeypatch):
    """An embedded run's CFG comes from its training_config.json (the table records none for runs); a hub student's
    from the table, which the studio consults."""
    assert all(s.baked_guidance is None for m in S.MODEL_SETS.values() for s in (m.lcm, m.splam) if s.kind == "run")
    studio = Studio(tmp_path, device="cpu", warm_up=False)
    assert studio.baked_guidance("SimianLuo/LCM_Dreamshaper_v7") is None  # not recorded
    ds = S.MODEL_SETS["dreamshaper7"]
    monkeypatch.setitem(S.MODEL_SETS, "dreamshaper7",
                        S.ModelSet(**{**ds.__dict__, "lcm": S.Student(ds.lcm.repo, "unet", 9.0)}))
    assert studio.baked_guidance("SimianLuo/LCM_Dreamshaper_v7") == 9.0
