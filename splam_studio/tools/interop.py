"""The exports through kohya sd-scripts' and ComfyUI's own loading code (a check outside CI: it needs their trees).

    python -m splam_studio.tools.interop --kohya PATH/sd-scripts --comfyui PATH/ComfyUI [--work DIR] [--json OUT]

Builds an SD1.5-shaped random-weight teacher (tools.gpu_check.build_pipeline; kohya's single-file loader knows only
the SD1.5 / SD2 shapes), a full student and a LoRA student with a random gamma projection, writes every form with
models.export.export_run, and loads each through the other projects' own functions:
  kohya:   library.train_util._load_target_model (single file and diffusers folder), networks.lora
           create_network_from_weights + merge_to (the kohya LoRA);
  ComfyUI: comfy.sd.load_checkpoint_guess_config (single file), comfy.diffusers_load.load_diffusers (folder),
           comfy.sd.load_lora_for_models + patch_model (the kohya LoRA).
Each loaded UNet's eps at a few (z, t, text) points is compared with the studio's student at gamma = 1; the
unfolded forms (the run's unet/ folder, the LoRA without its fold) are the controls. Their code is imported from the
given paths only (nothing of it is copied here). kohya pins transformers 4.54, which cannot share a process with this
project's diffusers; under transformers 5 three shims let its imports and its text-encoder load run (SHIMS, named in
the output's notes); none is on the UNet's path. The trees import more than this project needs: opencv-python-headless
(kohya's cv2), einops, torchsde, toml, imagesize, voluptuous, ftfy, aiohttp, yarl, alembic, sqlalchemy, av, spandrel,
sentencepiece (not kornia: diffusers imports it when present, and it needs kornia_rs); install them in a separate
venv (pip --no-deps) that also sees this project's site-packages (a .pth file), never torchvision. The run takes
about 10 minutes and 10 GB on a CPU.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.machinery
import json
import sys
import types
from pathlib import Path

import torch

from ..core.slode import guidance_embedding


class _Absent:
    """What a stubbed torchvision name gives: building one (kohya's module-level transforms.Compose) works, using it
    raises, so a code path that really needs torchvision fails loudly instead of computing with a stub."""

    def __init__(self, name: str):
        self._name = name

    def __call__(self, *args, **kwargs):
        return _Absent(self._name + "()")

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Absent(f"{self._name}.{attr}")

    def __iter__(self):
        raise RuntimeError(f"torchvision is stubbed by splam_studio.tools.interop: {self._name} is not available")


class _StubModule(types.ModuleType):
    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Absent(f"{self.__name__}.{attr}")


def _stub_torchvision() -> None:
    """A torchvision placeholder for the two projects' imports (their SD1.5 loading never calls it). transformers and
    diffusers are imported first, so their own availability checks still see no torchvision."""
    import diffusers  # noqa: F401
    import transformers  # noqa: F401

    if "torchvision" in sys.modules:
        return
    tv = _StubModule("torchvision")
    tv.__spec__ = importlib.machinery.ModuleSpec("torchvision", None)
    tv.__path__ = []
    sys.modules["torchvision"] = tv
    for sub in ("transforms", "transforms.functional", "transforms.v2", "models", "ops", "io", "utils"):
        mod = _StubModule(f"torchvision.{sub}")
        mod.__spec__ = importlib.machinery.ModuleSpec(f"torchvision.{sub}", None)
        mod.__path__ = []
        sys.modules[f"torchvision.{sub}"] = mod
        parent, _, leaf = f"torchvision.{sub}".rpartition(".")
        setattr(sys.modules[parent], leaf, mod)


SHIMS = ("kohya sd-scripts pins transformers 4.54, which cannot sit beside this project's diffusers 0.42 (huggingface_hub "
         "< 1 against >= 1.32); under transformers 5 its imports and its text-encoder load need three shims, none on "
         "the UNet's path: torchvision stubbed (a stub name that is used raises), transformers.CLIPFeatureExtractor "
         "aliased to CLIPImageProcessor, and the \"text_model.\" prefix of kohya's converted CLIP keys stripped "
         "(the text encoder is not compared). ComfyUI needs none (its own CLIP code)")


SETUP = ("On the CPU, in fp32 (the files are fp16, as save_fp16 writes them; the reference is the student rounded to "
         "fp16). Random weights: the teacher from tools.gpu_check.build_pipeline('sd15'); the gamma projection's "
         "init scaled by 10 (a trained one is larger than the fresh init); the LoRA r4, lora_B ~ 1e-3 N(0, 1). Probe: "
         "batch 2 at 32 x 32 latents, t = 999 and 259, random text states. The controls' differences measure that "
         "projection, not a trained student's (README: 8.5 % and 4.4 % rms for the embedded ones)")


def _alias_transformers_4() -> list[str]:
    """kohya pins transformers 4.54; under 5.x its lpw pipeline imports CLIPFeatureExtractor, removed in 5 (it was
    the old name of CLIPImageProcessor, and SD1.5 loading never builds one). Returns what was aliased."""
    import transformers

    if hasattr(transformers, "CLIPFeatureExtractor"):
        return []
    processor = transformers.CLIPImageProcessor
    sys.modules["transformers"].CLIPFeatureExtractor = processor  # the lazy module replaces itself on first use
    return ["transformers.CLIPFeatureExtractor = CLIPImageProcessor"]


@contextlib.contextmanager
def _clip_keys_for_transformers_5():
    """kohya's single-file converter names the CLIP text encoder's weights as transformers 4 did ("text_model.*");
    transformers 5's CLIPTextModel has no such prefix, so kohya's strict load_state_dict fails before it returns
    the UNet. While kohya loads, the prefix is stripped where the model lacks it (the text encoder is not compared)."""
    from transformers import CLIPTextModel

    original = CLIPTextModel.load_state_dict

    def load_state_dict(self, state_dict, *args, **kwargs):
        if not any(k.startswith("text_model.") for k in self.state_dict()):
            state_dict = {k.removeprefix("text_model."): v for k, v in state_dict.items()}
        return original(self, state_dict, *args, **kwargs)

    CLIPTextModel.load_state_dict = load_state_dict
    try:
        yield
    finally:
        CLIPTextModel.load_state_dict = original


@contextlib.contextmanager
def _on_path(root: Path):
    sys.path.insert(0, str(root))
    try:
        yield
    finally:
        sys.path.remove(str(root))


def probe_inputs(unet_config, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    side = 32  # 256 px: every layer runs, at a CPU-sized cost
    return {"z": torch.randn(2, 4, side, side, generator=g), "t": torch.tensor([999, 259]),
            "ehs": torch.randn(2, 77, unet_config.cross_attention_dim, generator=g)}


@torch.no_grad()
def student_eps(unet, x: dict, omega: float = 0.0) -> torch.Tensor:
    cond = guidance_embedding(torch.full((2,), omega), unet.config.time_cond_proj_dim)
    return unet(x["z"], x["t"], encoder_hidden_states=x["ehs"], timestep_cond=cond).sample.float()


# forms, as the rows name them
SINGLE, STOCK, RUN_UNET = "single file <run>.safetensors", "stock_diffusers/ folder", "run unet/ folder (cond_proj, unfolded)"
LORA, LORA_BARE = "kohya LoRA lora_kohya.safetensors", "kohya LoRA without the fold"
SAME, DIFFERENT, ERROR = "same", "different", "error"
KOHYA_NO_DIFF_B = ("different: kohya's networks.lora reads lora_down / lora_up / alpha only, so the folded "
                   "gamma = 1 bias (diff_b) is dropped; merge with A1111, Forge or ComfyUI, or use the single file")


def expectation(loader: str, form: str) -> str:
    """What a row should show against the student at gamma = 1: same, different (a control, or a known loss) or error."""
    if form == LORA_BARE:
        return DIFFERENT
    if form == RUN_UNET:
        return ERROR if loader == "kohya" else DIFFERENT  # kohya refuses the unexpected cond_proj; ComfyUI drops it
    if form == LORA and loader == "kohya":
        return KOHYA_NO_DIFF_B
    return SAME


def as_expected(r: dict, tol: float = 1e-2) -> bool:
    """A row matches its expectation: an error where one is expected, else rel. rms below tol iff 'same'."""
    if r["expected"] == ERROR or "error" in r:
        return r["expected"] == ERROR and "error" in r
    return (r["rel_rms"] < tol) == (r["expected"] == SAME)


def error_summary(e: BaseException, width: int = 160) -> str:
    """One line for a refusal: its first line, and torch's "Unexpected key(s)" line where it has one."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [""]
    keys = next((ln for ln in lines[1:] if ln.startswith(("Unexpected key", "Missing key"))), "")
    return f"{type(e).__name__}: {lines[0]} {keys}".strip()[:width]


def compare(got: torch.Tensor, ref: torch.Tensor) -> dict:
    d = (got.float() - ref).abs()
    return {"max_abs": float(d.max()), "rel_rms": float(d.pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())}


# ---- the two projects' loaders ---------------------------------------------------------------------------------
def kohya_unet(kohya: Path, source: Path):
    """kohya's train_util._load_target_model on a single file or a diffusers folder -> its (original) UNet."""
    _stub_torchvision()
    _alias_transformers_4()
    with _on_path(kohya), _clip_keys_for_transformers_5():
        from library import train_util

        args = argparse.Namespace(pretrained_model_name_or_path=str(source), v2=False, vae=None)
        _, _, unet, _ = train_util._load_target_model(args, torch.float32, "cpu")
    return unet.float().eval()


@torch.no_grad()
def kohya_eps(unet, x: dict) -> torch.Tensor:
    return unet(x["z"], x["t"], x["ehs"]).sample.float()


def kohya_lora_unet(kohya: Path, teacher_file: Path, lora_file: Path):
    """The teacher single file through kohya, the LoRA merged by kohya's networks.lora."""
    unet = kohya_unet(kohya, teacher_file)
    with _on_path(kohya), _clip_keys_for_transformers_5():
        from library import model_util
        from networks import lora as kohya_lora
        from safetensors.torch import load_file

        te, vae, _ = model_util.load_models_from_stable_diffusion_checkpoint(False, str(teacher_file))
        sd = load_file(str(lora_file))
        net, _ = kohya_lora.create_network_from_weights(1.0, str(lora_file), vae, te, unet, weights_sd=sd, for_inference=True)
        net.merge_to(te, unet, sd, torch.float32, "cpu")
    return unet.eval()


def comfy_model(comfy: Path, source: Path, lora: Path | None = None, folder: bool = False):
    """ComfyUI's loaders -> its ModelPatcher with weights patched in."""
    _stub_torchvision()
    with _on_path(comfy):
        saved = sys.argv
        sys.argv = [saved[0], "--cpu"]
        try:
            import comfy.options

            comfy.options.enable_args_parsing()
            import comfy.diffusers_load
            import comfy.sd
            import comfy.utils
        finally:
            sys.argv = saved
        if folder:
            model, clip, _ = comfy.diffusers_load.load_diffusers(str(source), output_vae=False, output_clip=True)
        else:
            model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(source), output_vae=False, output_clip=True)
        if lora is not None:
            model, clip = comfy.sd.load_lora_for_models(model, clip, comfy.utils.load_torch_file(str(lora)), 1.0, 1.0)
        model.patch_model()
    return model


@torch.no_grad()
def comfy_eps(model, x: dict) -> torch.Tensor:
    dm = model.model.diffusion_model
    dtype = next(dm.parameters()).dtype
    return dm(x["z"].to(dtype), timesteps=x["t"], context=x["ehs"].to(dtype)).float()


# ---- the run ---------------------------------------------------------------------------------------------------
def run(kohya: Path, comfy: Path, work: Path, log=print) -> list[dict]:
    from peft import LoraConfig

    from ..core.student import build_student
    from ..models import export as X
    from ..models.loading import load_teacher
    from ..training.loop import LORA_TARGETS
    from .gpu_check import build_pipeline

    work.mkdir(parents=True, exist_ok=True)
    teacher_dir = work / "teacher"
    if not (teacher_dir / "model_index.json").is_file():
        log("building an SD1.5-shaped random-weight teacher (a minute or two on a CPU)")
        build_pipeline(teacher_dir, "sd15")
    pipe = load_teacher(str(teacher_dir), torch_dtype=torch.float16)  # fp16 as on disk: half the memory
    teacher_file = X.save_single_file(pipe, work / "teacher.safetensors", dtype=torch.float16)
    student = build_student(pipe.unet, "fresh", generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # a trained projection is larger than the fresh init (the LoRA run of issue 24: 30x lr)
        student.time_embedding.cond_proj.weight.mul_(10.0)
        student.half().float()  # the values an fp16 export holds (save_fp16), so the reference is what travels
    x = probe_inputs(student.config)
    rows: list[dict] = []

    def row(loader, form, got, ref):
        r = {"loader": loader, "form": form, **compare(got, ref), "expected": expectation(loader, form)}
        r["as_expected"] = as_expected(r)
        rows.append(r)
        log(f"{loader:8s} {form:44s} max|d eps| {r['max_abs']:.3g}  rel rms {r['rel_rms']:.3g}  ({r['expected'][:9]})")

    # full student, exported in fp16 (the values above are already fp16-exact)
    cfg = {"run_name": "full", "lora_rank": 0, "w": 8.0, "save_fp16": True}
    out = X.export_run(work / "full", student, pipe, cfg, merged=True)
    ref = student_eps(student, x)
    del student
    gc.collect()
    for form, src, folder in ((SINGLE, out["single_file"], False), (STOCK, out["stock_diffusers"], True)):
        unet = kohya_unet(kohya, src)
        row("kohya", form, kohya_eps(unet, x), ref)
        del unet
        m = comfy_model(comfy, src, folder=folder)
        row("ComfyUI", form, comfy_eps(m, x), ref)
        del m
        gc.collect()
    try:  # the control: the studio's folder (with cond_proj) as a stock tool reads it
        unet = kohya_unet(kohya, _as_pipeline(work, out["run"] / "unet", teacher_dir))
        row("kohya", RUN_UNET, kohya_eps(unet, x), ref)
        del unet
    except Exception as e:  # noqa: BLE001 - the expected refusal, recorded
        r = {"loader": "kohya", "form": RUN_UNET, "expected": expectation("kohya", RUN_UNET),
             "error": error_summary(e)}
        rows.append({**r, "as_expected": as_expected(r)})
        log(f"kohya    run unet/ folder: {r['error']}")
    m = comfy_model(comfy, _as_pipeline(work, out["run"] / "unet", teacher_dir), folder=True)
    row("ComfyUI", RUN_UNET, comfy_eps(m, x), ref)
    del m
    gc.collect()

    # LoRA student: the teacher + the gamma projection + a random LoRA
    student = build_student(pipe.unet, "fresh", generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        student.time_embedding.cond_proj.weight.mul_(10.0)
    torch.manual_seed(3)  # peft draws lora_A from the global generator
    student.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS, init_lora_weights="gaussian"))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in student.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 1e-3)
    out = X.export_run(work / "lora", student, pipe, {"run_name": "lora", "lora_rank": 4, "w": 8.0})
    ref = student_eps(student, x)
    bare = X.export_kohya_lora(X._peft_lora_state(student)[0], work / "lora_unfolded.safetensors")
    del student, pipe
    gc.collect()
    for form, lora_file in ((LORA, out["kohya_lora"]), (LORA_BARE, bare)):
        unet = kohya_lora_unet(kohya, teacher_file, lora_file)
        row("kohya", form, kohya_eps(unet, x), ref)
        del unet
        m = comfy_model(comfy, teacher_file, lora=lora_file)
        row("ComfyUI", form, comfy_eps(m, x), ref)
        del m
        gc.collect()
    return rows


def _as_pipeline(work: Path, unet_dir: Path, teacher_dir: Path) -> Path:
    """A pipeline folder whose unet/ is the given one (symlinks to the teacher's other parts)."""
    out = work / f"pipe-{unet_dir.parent.name}"
    out.mkdir(exist_ok=True)
    for part in ("vae", "text_encoder", "tokenizer", "scheduler", "model_index.json"):
        if not (out / part).exists():
            (out / part).symlink_to((teacher_dir / part).resolve())
    if not (out / "unet").exists():
        (out / "unet").symlink_to(unet_dir.resolve())
    return out


COLUMNS = ["form", "loader", "loaded", "max abs diff of eps", "rel. rms", "expected", "as expected"]


def table_rows(rows: list[dict]) -> list[list]:
    """The rows as report.generic_section's table cells (a refusal shows its error in place of the numbers)."""
    out = []
    for r in rows:
        if "error" in r:
            out.append([r["form"], r["loader"], "no: " + r["error"], "-", "-", r["expected"], "yes" if r["as_expected"] else "NO"])
        else:
            out.append([r["form"], r["loader"], "yes", f"{r['max_abs']:.2e}", f"{r['rel_rms']:.2e}", r["expected"],
                        "yes" if r["as_expected"] else "NO"])
    return out


def section(rows: list[dict], trees: dict, notes: list[str]) -> dict:
    """The benchmarks/interop.json object: generic_section's shape, the raw rows and the trees' commits beside it."""
    kept = sum(r["as_expected"] for r in rows)
    return {
        "description": "`python -m splam_studio.tools.interop --kohya PATH/sd-scripts --comfyui PATH/ComfyUI --json "
                       "benchmarks/interop.json` (outside CI: it needs local copies of both repositories). Every export "
                       "form of an SD1.5-shaped random-weight student, loaded by kohya sd-scripts' and ComfyUI's own "
                       "loading code; each loaded UNet's eps at two (z, t, text) points against the studio's student at "
                       f"gamma = 1. rel. rms < 1e-2 counts as the same model. {kept} of {len(rows)} rows as expected.",
        "tables": [{"title": "Exports in the loaders' own code", "columns": COLUMNS, "rows": table_rows(rows)}],
        "notes": [f"{name}: commit `{c}`" for name, c in trees.items()] + notes,
        "trees": trees,
        "rows": rows,
    }


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in table_rows(rows)])


def _commit(tree: Path) -> str:
    """The tree's commit: `git rev-parse HEAD` in it, else a COMMIT file beside its code (an extracted archive)."""
    import subprocess

    if (tree / "COMMIT").is_file():
        return (tree / "COMMIT").read_text().strip()
    try:
        return subprocess.run(["git", "-C", str(tree), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kohya", type=Path, required=True, help="a kohya-ss/sd-scripts tree")
    p.add_argument("--comfyui", type=Path, required=True, help="a ComfyUI tree")
    p.add_argument("--work", type=Path, default=Path("interop-work"), help="scratch folder (several GB)")
    p.add_argument("--json", type=Path, help="write the rows here (benchmarks/interop.json)")
    p.add_argument("--note", action="append", default=[], help="a note for the table (repeatable)")
    a = p.parse_args(argv)
    for name, path in (("--kohya", a.kohya / "library"), ("--comfyui", a.comfyui / "comfy")):
        if not path.is_dir():
            print(f"error: {name}: {path} not found (give the repository's root)", file=sys.stderr)
            return 2
    notes = [SETUP, SHIMS]
    rows = run(a.kohya.resolve(), a.comfyui.resolve(), a.work)
    print(markdown(rows))
    if a.json:
        trees = {"kohya-ss/sd-scripts": _commit(a.kohya), "Comfy-Org/ComfyUI": _commit(a.comfyui)}
        a.json.write_text(json.dumps(section(rows, trees, notes + a.note), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
