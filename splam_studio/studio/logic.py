"""The studio's logic, testable without a browser: models with a cache, side-by-side comparison, the error-bound
plot and input validation with messages; training runs are started and followed by `launcher.Trainer`.

`splam_studio.studio.ui` lays this out in Gradio; `app.py` (`python -m splam_studio.studio`) parses flags and launches. Nothing here imports gradio.
User mistakes raise `StudioError` (a ValueError) whose message is meant for the user; `notices` lists what was
clamped or truncated.
"""
from __future__ import annotations

import math
import socket
import statistics
import os
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .colors import METHOD_COLORS, tint
from .launcher import Trainer
from .validation import StudioError, clamp_float, clamp_int
from ..training.device import resolve_runtime
from ..training.memory import weights_bytes
from ..core.error_bound import ErrorBound, guided_trajectory, student_error_bounds
from ..models.adapters import activate
from ..models.loading import (
    ModelLoadError, RunInfo, holds_student, hub_cache_text, hub_offline, is_hub_id, list_runs, load_hub_teacher,
    load_student, load_teacher, resolve_run, sampling_guidance,
)
from ..models.generation import decode_latents, generate, initial_noise
from ..core.metrics import latent_mse, psnr
from ..core.schedule import NoiseSchedule
from ..core.student import clean_fn
from ..core.teacher import cfg_scale, lcm_w, pipeline_conditions, vae_scale_factor
from ..store.runs import read_training_config, valid_run_name, weights_dir

# ---- limits of the inputs (the UI's sliders use the same numbers) ---------------------------------------------
STUDENT_STEPS = (1, 8)  # consistency sampling: SPLAM/LCM are meant for 1-4 steps
TEACHER_STEPS = (1, 100)
GUIDANCE = (1.0, 20.0)  # CFG in the usual `uncond + s (cond - uncond)` form; 1 = no guidance
SEED = (0, 2**31 - 1)
STRIDE = (1, 5)  # sub-path length k = stride * k_phi (k_phi = 20 on the 50-point DDIM grid)
MAX_PROMPT_CHARS = 500
LATENCY_RUNS = 3  # timed rounds: each panel once per round, interleaved; the median is shown, with the range
LATENCY_WARMUP = 1  # rounds run first and not counted: the first call at a shape pays one-off allocations
TEACHER_SAMPLERS = ("ddim", "dpm++", "unipc")
DEFAULT_GUIDANCE = 7.5  # the Shapes students were distilled at w = 6.5, i.e. CFG 7.5
N_GRID = 50  # DDIM grid of the error bound; k_phi = 1000 / 50 = 20
TRAJECTORY_CACHE = 8  # teacher trajectories kept for the error bound (one 512 px SD trajectory: 51 x 64 KB latents)
DECODE_PIXELS = 13 * 512 * 512  # VAE decode budget per call: the 13 thumbnails of a 512 px error bound at once
LOCAL_PREFIX = "local:"  # names of models given as paths on the command line

Progress = Callable[[float, str], None]
Clock = Callable[[], float]  # seconds, monotonic (time.perf_counter); tests inject a fake one


def _no_progress(fraction: float, desc: str) -> None:
    pass


# ---- validation ---------------------------------------------------------------------------------------------------
def clean_prompt(prompt, notices: list[str], *, what: str = "prompt", required: bool = True) -> str:
    """Stripped prompt, control characters removed, truncated to MAX_PROMPT_CHARS with a notice."""
    if prompt is None:
        prompt = ""
    if not isinstance(prompt, str):
        raise StudioError(f"the {what} must be text, got {type(prompt).__name__}")
    text = re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", " ", prompt).strip()
    if required and not text:
        raise StudioError(f"enter a {what}, e.g. 'one large red circle at the left on a black background'")
    if len(text) > MAX_PROMPT_CHARS:
        notices.append(f"the {what} was {len(text)} characters; truncated to {MAX_PROMPT_CHARS} "
                       "(the text encoder reads at most 77 tokens anyway)")
        text = text[:MAX_PROMPT_CHARS]
    return text


def check_sampler(sampler) -> str:
    if sampler not in TEACHER_SAMPLERS:
        raise StudioError(f"unknown teacher sampler {sampler!r}; choose one of {list(TEACHER_SAMPLERS)}")
    return sampler


# ---- results ------------------------------------------------------------------------------------------------------
ROLE_TITLE = {"teacher": "Teacher", "lcm": "LCM", "splam": "SPLAM"}


@dataclass
class Panel:
    """One generated image and everything needed to reproduce it."""

    role: str  # teacher | lcm | splam
    model: str
    sampler: str
    steps: int
    seed: int
    guidance: float  # CFG at run time (students: 1, guidance baked in; w + 1 for a w-conditioned student)
    latency_ms: float
    image: object  # PIL image
    baked_guidance: float | None = None  # students: the CFG they were distilled at, when known
    negative_prompt: str = ""
    speedup: float | None = None  # teacher latency / this latency (students)
    latency_runs: list[float] = field(default_factory=list)  # every timed run, ms; latency_ms is their median
    psnr_db: float | None = None  # students: PSNR of the image against the teacher's (same noise)
    latent_mse: float | None = None  # students: mean squared latent difference to the teacher's final latent
    heatmap: object = None  # students: |image - teacher image| as a heat map (PIL)
    latent: object = field(default=None, repr=False)  # (1, C, h, w) final latent
    unet_calls: int | None = None  # UNet evaluations per image (unet_calls())
    warmup_ms: list[float] = field(default_factory=list)  # the untimed warm-up runs, ms; not in latency_runs
    untrained_psnr: float | None = None  # 1-step students: the untrained student's PSNR / latent MSE to the teacher
    untrained_mse: float | None = None  # (the teacher UNet as a 1-step LCM sampler, same noise): what it must beat

    @property
    def title(self) -> str:
        return ROLE_TITLE[self.role]

    def label(self) -> str:
        """Short panel label: model kind, steps, latency, speed-up."""
        s = f"{self.title} · {self.steps} step{'s' if self.steps != 1 else ''} · {self.latency_ms:.0f} ms"
        return s + (f" · {self.speedup:.1f}× faster" if self.speedup else "")

    def latency_text(self) -> str:
        """'95 ms (90-101 ms, 3 runs)': the median and the range of the timed runs."""
        runs = self.latency_runs or [self.latency_ms]
        if len(runs) == 1:
            return f"{self.latency_ms:.0f} ms (1 run)"
        return f"{self.latency_ms:.0f} ms ({min(runs):.0f}–{max(runs):.0f} ms, {len(runs)} runs)"

    def calls_text(self) -> str:
        """'50 UNet calls (25 steps × 2, CFG)' / '2 UNet calls': the work behind one image."""
        if self.unet_calls is None:
            return ""
        n = f"{self.unet_calls} UNet call{'s' if self.unet_calls != 1 else ''}"
        return n + (" (%d steps × 2, CFG)" % self.steps if self.unet_calls == 2 * self.steps else "")

    def metrics(self) -> str:
        """The panel's headline: speed-up, latency, UNet calls, and for students the distance to the teacher's image."""
        parts = []
        if self.speedup:
            parts.append(f"**{self.speedup:.1f}× faster**")
        parts.append(self.latency_text())
        if self.unet_calls is not None:
            parts.append(self.calls_text())
        if self.psnr_db is not None:
            parts.append(f"**PSNR {self.psnr_db:.1f} dB** to the teacher")
        if self.latent_mse is not None:
            parts.append(f"latent MSE {self.latent_mse:.3g}")
        if self.untrained_mse is not None:
            parts.append(self.untrained_verdict())
        return " · ".join(parts)

    def untrained_verdict(self) -> str:
        """At 1 step: the student's distance to the teacher beside the untrained student's (no distillation)."""
        better = self.latent_mse < self.untrained_mse
        return (f"{'closer to' if better else '**further from**'} the teacher than no distillation "
                f"(untrained student: latent MSE {self.untrained_mse:.3g}, PSNR {self.untrained_psnr:.1f} dB)")

    def caption(self) -> str:
        """Metrics, then the reproduction line: model, sampler, steps, guidance, seed (the prompt is shared)."""
        if self.role == "teacher":
            g = f"CFG {self.guidance:g}" + (f", negative prompt {self.negative_prompt!r}" if self.negative_prompt else "")
        else:
            baked = f"CFG {self.baked_guidance:g} baked in" if self.baked_guidance else "guidance baked in"
            g = f"{baked}, run at guidance 1"
        steps = f"{self.steps} step{'s' if self.steps != 1 else ''}"
        return f"{self.metrics()}  \n`{self.model}` · {self.sampler} sampler · {steps} · {g} · seed {self.seed}"


@dataclass
class CompareResult:
    prompt: str
    panels: list[Panel]  # teacher, lcm, splam
    notices: list[str] = field(default_factory=list)
    same_architecture: bool = False  # the two students' UNets have one config: the same work per UNet call
    elapsed_s: float | None = None  # wall time of the whole comparison (all rounds), for the history

    def panel(self, role: str) -> Panel:
        return next(p for p in self.panels if p.role == role)

    def summary(self) -> str:
        t = self.panel("teacher")
        rounds = len(t.latency_runs) or 1
        warm = len(t.warmup_ms)
        parts = [f"**{p.title}** {p.latency_text()}, {p.calls_text() or 'UNet calls unknown'}"
                 + (f", {p.speedup:.1f}× faster" if p.speedup else "") for p in self.panels]
        how = (f"median and range of {rounds} interleaved round{'s' if rounds != 1 else ''} (teacher, LCM, SPLAM in "
               "turn, so a change of this machine's load hits all three alike"
               + (f"; {'a first warm-up round' if warm == 1 else f'{warm} warm-up rounds'} not counted" if warm else "")
               + "), each a whole image: text encoding + sampling + VAE decode")
        return (f"Prompt: “{self.prompt}” · seed {t.seed} · same initial noise for all three.  \n"
                + " · ".join(parts) + f".  \nLatency: {how}. "
                + latency_verdict(self.panel("lcm"), self.panel("splam"), self.same_architecture)
                + "  \nPSNR: the student's image against the teacher's (higher = closer; ∞ = identical)."
                + self.untrained_line())

    def untrained_line(self) -> str:
        """At 1 step, each student beside the untrained student (the teacher UNet as a 1-step sampler, same noise)."""
        students = [p for p in self.panels if p.role != "teacher" and p.untrained_mse is not None]
        if not students:
            return ""
        u = students[0]
        verdicts = ", ".join(f"{p.title} {p.latent_mse:.3g} ({'closer' if p.latent_mse < u.untrained_mse else 'further'})"
                             for p in students)
        return (f"  \n1 step: no distillation (the teacher UNet as a 1-step sampler, same noise) is at latent MSE "
                f"{u.untrained_mse:.3g} / PSNR {u.untrained_psnr:.1f} dB to the teacher; latent MSE of {verdicts}.")

    def history_item(self) -> tuple[object, str]:
        """(teacher | LCM | SPLAM side by side, caption) for the history strip."""
        from PIL import Image

        images = [p.image for p in self.panels]
        w, h = images[0].size
        gap = max(1, w // 32)
        strip = Image.new("RGB", (3 * w + 2 * gap, h), (255, 255, 255))
        for i, im in enumerate(images):
            strip.paste(im.convert("RGB"), (i * (w + gap), 0))
        return strip, self.history_caption()

    def history_caption(self) -> str:
        """'“two small …” · seed 3 · teacher 25 ddim / students 2 steps · 4.1 s': what tells one entry from another."""
        t, s = self.panel("teacher"), self.panel("splam")
        prompt = self.prompt if len(self.prompt) <= 60 else self.prompt[:59] + "…"
        took = f" · {self.elapsed_s:.1f} s" if self.elapsed_s is not None else ""
        return (f"“{prompt}” · seed {t.seed} · teacher {t.steps} {t.sampler} / students {s.steps} "
                f"step{'s' if s.steps != 1 else ''}{took}")


def unet_calls(role: str, steps: int, guidance_scale: float) -> int:
    """UNet evaluations for one image: a guided teacher (CFG > 1) evaluates cond and uncond at each step (diffusers
    batches the pair, two images' work), an unguided one and a student one per step."""
    return steps * 2 if role == "teacher" and guidance_scale > 1 else steps


def latency_verdict(a: Panel, b: Panel, same_architecture: bool) -> str:
    """One sentence on whether two students' latencies differ beyond their runs' spread (the range of the timed runs)."""
    ra, rb = a.latency_runs or [a.latency_ms], b.latency_runs or [b.latency_ms]
    same = same_architecture and a.unet_calls is not None and a.unet_calls == b.unet_calls
    who = f"{a.title} and {b.title}: " + ("same architecture and UNet calls; " if same else "")
    if len(ra) < 2 or len(rb) < 2:
        return who + "one timed run each, too few to tell a difference from noise."
    if min(ra) <= max(rb) and min(rb) <= max(ra):
        return who + (f"their times overlap ({_range(ra)} and {_range(rb)}), so the difference is noise."
                      if same else f"their times overlap ({_range(ra)} and {_range(rb)}), so these runs cannot tell "
                      "them apart.")
    fast, slow = (a, b) if a.latency_ms < b.latency_ms else (b, a)
    gap = f"{fast.title} is faster by {slow.latency_ms - fast.latency_ms:.0f} ms and the times do not overlap " \
          f"({_range(ra)} and {_range(rb)})"
    return who + gap + ("; for the same work, that comes from this machine (its load, caches), not from the method."
                        if same else ".")


def _range(runs: list[float]) -> str:
    return f"{min(runs):.0f}–{max(runs):.0f} ms"


def decode_chunk(px: int) -> int:
    """Images per VAE decode call at `px`: DECODE_PIXELS of them at once (13 at 512 px, 3 at 1024 px, SDXL)."""
    return max(1, DECODE_PIXELS // (px * px))


@dataclass(frozen=True)
class ErrorBoundCost:
    """The work behind one error-bound plot, as the page states it."""

    teacher_calls: int  # guided teacher steps (a batched cond/uncond pair each); 0 when the trajectory was reused
    student_calls: int  # student evaluations F(z_t') for the bound, both students
    extra_calls: int  # student evaluations for thumbnails at points the bound did not evaluate
    decodes: int  # VAE decodes (the thumbnails and the teacher's z_0)
    decode_chunk: int  # images per VAE call
    px: int

    def text(self) -> str:
        calls = -(-self.decodes // self.decode_chunk)
        teacher = (f"{self.teacher_calls} guided teacher steps" if self.teacher_calls else
                   "no teacher steps (trajectory reused)")
        return (f"Cost at {self.px} px: {teacher}, {self.student_calls + self.extra_calls} student UNet calls, "
                f"{self.decodes} VAE decodes in {calls} call{'s' if calls != 1 else ''} (at most {self.decode_chunk} "
                f"images each); a larger stride means fewer student calls.")


@dataclass
class ErrorBoundResult:
    prompt: str
    seed: int
    stride: int
    k: int
    guidance: float
    curves: dict[str, ErrorBound]  # "LCM" / "SPLAM" -> terms, bound, error (batch of 1)
    thumbnails: list[tuple[object, str]]  # (PIL image, caption): decoded F(z_t) along the trajectory
    notices: list[str] = field(default_factory=list)
    trajectory_reused: bool = False  # the teacher trajectory came from the cache (same teacher, prompt, seed, CFG)
    cost: "ErrorBoundCost | None" = None  # the work this plot took

    def frame(self):
        """Long-format DataFrame (t, rms, series) of bound and real error, for gr.LinePlot."""
        import pandas as pd

        rows = []
        for name, eb in self.curves.items():
            for i, t in enumerate(eb.times):
                rows.append({"t": t, "rms": float(eb.bound[i, 0]), "series": f"{name} bound"})
                rows.append({"t": t, "rms": float(eb.error[i, 0]), "series": f"{name} error"})
        return pd.DataFrame(rows, columns=["t", "rms", "series"])

    def terms_frame(self):
        """Long-format DataFrame (t, rms, series) of the per-sub-path terms |F(z_t') - F(z_{t'-k})|."""
        import pandas as pd

        rows = [{"t": t, "rms": float(eb.terms[i, 0]), "series": f"{name} term"}
                for name, eb in self.curves.items() for i, t in enumerate(eb.times)]
        return pd.DataFrame(rows, columns=["t", "rms", "series"])

    def color_map(self) -> dict[str, str]:
        """Series name -> colour: one colour per method (METHOD_COLORS), the real error a lighter shade of it."""
        out = {}
        for name in self.curves:
            c = METHOD_COLORS[name.lower()]
            out.update({f"{name} bound": c, f"{name} error": tint(c), f"{name} term": c})
        return out

    def verdict(self) -> str:
        """What the numbers show for this prompt and seed: SPLAM's bound, error and terms against LCM's."""
        lcm, splam = self.curves["LCM"], self.curves["SPLAM"]
        t0 = lcm.times[0]

        def compare(a: float, b: float) -> str:
            if math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-6):
                return "equal to"
            pct = abs(a - b) / max(b, 1e-12) * 100
            return f"{pct:.0f}% {'below' if a < b else 'above'}"

        b_s, b_l = float(splam.bound[0, 0]), float(lcm.bound[0, 0])
        e_s, e_l = float(splam.error[0, 0]), float(lcm.error[0, 0])
        smaller = int((splam.terms[:, 0] < lcm.terms[:, 0]).sum())
        n = len(lcm.times)
        holds = b_s < b_l
        return (f"**For this prompt and seed, SPLAM's bound at t = {t0} is {compare(b_s, b_l)} LCM's** "
                f"({b_s:.4f} vs {b_l:.4f}); its real error is {compare(e_s, e_l)} LCM's ({e_s:.4f} vs {e_l:.4f}); "
                f"its per-sub-path term is the smaller one at {smaller} of {n} t′. "
                + ("This is what SPLAM aims for: smaller sub-path terms, so a smaller bound." if holds else
                   "SPLAM aims for smaller sub-path terms and so a smaller bound; here that does not hold."))

    def summary(self) -> str:
        lines = [self.verdict(), "",
                 f"Teacher: guided DDIM on the {N_GRID}-step grid, CFG {self.guidance:g}, seed {self.seed}; "
                 f"sub-paths of k = {self.k}. At the largest t on the sub-path grid, t = "
                 f"{self.curves[next(iter(self.curves))].times[0]} (one-step generation starts at t = 999):", "",
                 "| student | bound (sum of terms) | real error ‖F(z_t) − z_0‖ |", "|---|---|---|"]
        for name, eb in self.curves.items():
            lines.append(f"| {name} | {float(eb.bound[0, 0]):.4f} | {float(eb.error[0, 0]):.4f} |")
        lines.append("")
        lines.append("RMS over latent elements; smaller is better.")
        if self.trajectory_reused:
            lines.append("The teacher trajectory was reused from an earlier run with the same prompt, seed and guidance.")
        if self.cost is not None:
            lines.append(self.cost.text())
        return "\n".join(lines)

    def grid_image(self, cell: int = 96):
        """One image: a row per student (F(z_t) at the same t in the same column), the teacher's z_0 at the end."""
        from PIL import Image, ImageDraw

        teacher = self.thumbnails[0][0]
        rows: dict[str, list[tuple[int, object]]] = {}
        for img, caption in self.thumbnails[1:]:
            name, t = caption.split(" F(z_t), t=")
            rows.setdefault(name, []).append((int(t), img))
        cols = max(len(r) for r in rows.values())
        font = _font(max(11, cell // 4))  # large: on a phone the whole grid is shown at about a third of its size
        label_w, head_h, gap = cell, cell // 2, 4
        W = label_w + (cols + 1) * (cell + gap) + gap
        H = head_h + len(rows) * (cell + gap) + gap
        grid = Image.new("RGB", (W, H), (255, 255, 255))
        draw = ImageDraw.Draw(grid)
        first = next(iter(rows.values()))
        for c, (t, _) in enumerate(first):
            draw.text((label_w + c * (cell + gap) + cell // 2, head_h // 2), f"t = {t}", fill=(0, 0, 0), font=font,
                      anchor="mm")
        x_t = label_w + cols * (cell + gap) + gap
        draw.text((x_t + cell // 2, head_h // 2), "teacher", fill=(0, 0, 0), font=font, anchor="mm")
        for r, (name, cells) in enumerate(rows.items()):
            y = head_h + r * (cell + gap)
            draw.text((label_w // 2, y + cell // 2), name, fill=METHOD_COLORS.get(name.lower(), "#000000"), font=font,
                      anchor="mm")
            for c, (_, img) in enumerate(cells):
                grid.paste(img.convert("RGB").resize((cell, cell), Image.NEAREST), (label_w + c * (cell + gap), y))
        y_t = head_h + (len(rows) - 1) * (cell + gap) // 2
        grid.paste(teacher.convert("RGB").resize((cell, cell), Image.NEAREST), (x_t, y_t))
        return grid


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


# ---- the studio ---------------------------------------------------------------------------------------------------
class Studio:
    """Loaded models (cached) and the operations behind the UI.

    Model names the web UI may send: a run name under the weights folder, a `local:NAME` registered from the command
    line (`local`), or a hub id `owner/name`. Never a path.
    """

    def __init__(self, weights: str | Path | None = None, *, teacher: str | None = None, splam: str | None = None,
                 lcm: str | None = None, local: dict[str, str | Path] | None = None,
                 data_dirs: dict[str, str | Path] | None = None, device: str = "auto", allow_hub: bool = True,
                 cache_size: int = 6, precision: str = "auto", warm_up: bool = True, model_set: str | None = None,
                 train_shared: bool = False, train_quota_mb: float | None = None):
        self.weights = Path(weights) if weights is not None else weights_dir()
        self.runtime = resolve_runtime(device, precision)
        self.warm_up = warm_up  # one 1-step generation per loaded model, so measured latencies carry no start-up cost
        self.model_set = model_set  # name in model_sets.MODEL_SETS whose models are the defaults, if any
        self.local = {self._local_name(k): Path(v).expanduser().resolve() for k, v in (local or {}).items()}
        self.allow_hub = allow_hub
        self._cache: OrderedDict[tuple, object] = OrderedDict()
        self._cache_size = cache_size
        self._trajectories: OrderedDict[tuple, tuple] = OrderedDict()  # error-bound teacher trajectories, newest last
        self._lock = threading.RLock()  # guards the dicts only; a model load holds its own lock (_loading)
        self._loading: dict[tuple, threading.Lock] = {}
        self.defaults = {"teacher": teacher, "splam": splam, "lcm": lcm}
        # train_shared: runs belong to the browser session that started them (launcher.Trainer); the quota bounds the
        # disk that the page's runs may fill
        self.trainer = Trainer(self.weights, data_dirs or {}, shared=train_shared, quota_mb=train_quota_mb,
                               public=self.public)

    @classmethod
    def for_model_set(cls, name: str, weights: str | Path | None = None, *, device: str = "auto", **kwargs) -> "Studio":
        """A studio whose defaults are the named model set's teacher, SPLAM and LCM (see model_sets.MODEL_SETS).

        On CUDA the set's models run in its gpu_precision (fp16 for SD); on a ZeroGPU Space there is no GPU outside
        a call, so models load on the CPU side without the warm-up generation. teacher / splam / lcm given (not
        None) replace the set's member; other kwargs go to Studio().
        """
        from ..training.device import pick_device
        from ..models.model_sets import get_model_set, zero_gpu

        try:
            ms = get_model_set(name)
        except ValueError as e:
            raise StudioError(str(e)) from None
        precision = ms.gpu_precision if pick_device(device).type == "cuda" else "auto"
        kwargs.setdefault("warm_up", not zero_gpu())
        members = {"teacher": ms.teacher, "splam": ms.splam.repo, "lcm": ms.lcm.repo}
        members.update({role: kwargs.pop(role) for role in members if kwargs.get(role)})  # the CLI's overrides
        kwargs = {k: v for k, v in kwargs.items() if k not in members}
        return cls(weights, **members, device=device, precision=precision, model_set=name, **kwargs)

    @staticmethod
    def _local_name(name: str) -> str:
        return name if name.startswith(LOCAL_PREFIX) else LOCAL_PREFIX + name

    # -- listing ------------------------------------------------------------------------------------------------
    def runs(self) -> list[RunInfo]:
        return list_runs(self.weights)

    def teacher_choices(self) -> list[str]:
        local = [k for k, p in self.local.items() if (p / "model_index.json").is_file() or p.is_file()]
        return local + [r.name for r in self.runs() if r.kind == "teacher"]

    def _local_students(self) -> dict[str, str | None]:
        """local:NAME -> its method (training_config.json), for the student folders given on the command line."""
        out = {}
        for k, p in self.local.items():
            if holds_student(p):
                out[k] = _config(p).get("method")
        return out

    def student_choices(self, method: str | None = None) -> list[str]:
        """Student runs trained with `method` (all students when None); those whose method is unknown too."""
        keep = lambda m: method is None or m is None or m == method  # noqa: E731
        local = [k for k, m in self._local_students().items() if keep(m)]
        return local + [r.name for r in self.runs() if r.kind == "student" and keep(r.method)]

    def menu(self, role: str) -> list[tuple[str, str]]:
        """(label, name) pairs of the models for `role` (teacher | splam | lcm), each tagged with its method."""
        if role == "teacher":
            return [(f"{n} · teacher", n) for n in self.teacher_choices()]
        methods = {**{r.name: r.method for r in self.runs()}, **self._local_students()}
        return [(f"{n} · {ROLE_TITLE.get(methods.get(n) or '', 'method unknown')}", n)
                for n in self.student_choices(role)]

    def default(self, role: str) -> str | None:
        """The model shown first: the CLI's choice, else the embedded Shapes one, else the first that fits."""
        if self.defaults.get(role):
            name = self.defaults[role]
            return self._local_name(name) if self._local_name(name) in self.local else name
        if role == "teacher":
            choices = self.teacher_choices()
            return "shapes-teacher" if "shapes-teacher" in choices else (choices[0] if choices else None)
        choices = self.student_choices(role)
        embedded = f"shapes-{role}"
        if embedded in choices:
            return embedded
        matching = [r.name for r in self.runs() if r.kind == "student" and r.method == role]
        return matching[0] if matching else (choices[0] if choices else None)

    def models_status(self) -> str:
        """One line on what is missing, or '' when a teacher and both students are there."""
        missing = [ROLE_TITLE[r] for r in ("teacher", "lcm", "splam") if not self.default(r)]
        if not missing:
            return ""
        return (f"No {' / '.join(missing)} model found under `weights/`. The embedded Shapes models appear in "
                "weights/ once built; or train a student in the Train tab, or enter hub ids under SD1.5 setup.")

    # -- resolving and loading --------------------------------------------------------------------------------------
    def resolve(self, name, role: str) -> tuple[str, str | Path]:
        """(kind, source) for a model name from the UI: ('path', Path) or ('hub', id). Never an arbitrary path."""
        what = "teacher" if role == "teacher" else f"{ROLE_TITLE.get(role, role)} student"
        if not isinstance(name, str) or not name.strip():
            raise StudioError(f"choose a {what} model")
        name = name.strip()
        if name in self.local:
            return "path", self.local[name]
        if valid_run_name(name):
            try:
                path = resolve_run(name, self.weights)
            except ModelLoadError:
                path = None
            if path is not None:
                kind = "teacher" if (path / "model_index.json").is_file() else "student"
                if (kind == "teacher") != (role == "teacher"):
                    raise StudioError(f"{name!r} is a {kind}, not a {what}; choose one of "
                                      f"{self.teacher_choices() if role == 'teacher' else self.student_choices(role)}")
                return "path", path
        if is_hub_id(name):  # huggingface_hub's rules, before any cache path is built
            if not self.allow_hub:
                raise StudioError(f"hub models are disabled on this server; choose one of {self._choices(role)}")
            return "hub", name  # loaded from the hub (or its cache) only: never a folder of that name on this machine
        raise StudioError(f"unknown {what} {name[:120]!r}: choose one of {self._choices(role)} or a hub id "
                          "'owner/name' (local folders can only be given on the command line)")

    def _choices(self, role: str) -> list[str]:
        return self.teacher_choices() if role == "teacher" else self.student_choices(role)

    def public(self, text: str) -> str:
        """`text` as a visitor may read it: the server's folders (weights root, command-line models, the package, the
        Hugging Face cache, the home folder) replaced by names."""
        return public_text(text, self.weights, self.local)

    def _cached(self, key: tuple, build: Callable[[], object]) -> object:
        """The cached object for `key`, built once. A build holds only that key's lock: requests for other models,
        loaded or loading, go on meanwhile; a second request for the same model waits for the first one's build."""
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:
            with self._lock:
                if key in self._cache:  # built by the request we waited for
                    self._cache.move_to_end(key)
                    return self._cache[key]
            try:
                obj = build()
            finally:
                with self._lock:
                    if self._loading.get(key) is loading:
                        del self._loading[key]
            with self._lock:
                self._cache[key] = obj
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
            return obj

    def teacher(self, name: str | None = None):
        """The teacher StableDiffusionPipeline, loaded once."""
        name = name or self.default("teacher")
        kind, source = self.resolve(name, "teacher")

        def build():
            if kind == "hub":
                check_hub(str(source), "teacher")
            try:
                if kind == "hub":
                    pipe = load_hub_teacher(str(source), torch_dtype=self.runtime.sample_dtype)
                else:
                    pipe = load_teacher(source, torch_dtype=self.runtime.sample_dtype)
            except ModelLoadError as e:
                raise StudioError(_hub_hint(str(e), source) if kind == "hub" else self.public(str(e))) from None
            pipe = pipe.to(self.runtime.device)
            if self.warm_up:
                _warm_up(pipe, None)
            return pipe

        return self._cached(("teacher", str(source)), build)

    def student(self, name: str | None, teacher: str | None = None, role: str = "splam"):
        """A student UNet (SPLAM or LCM) fitted to the teacher, loaded once."""
        name = name or self.default(role)
        tname = teacher or self.default("teacher")
        kind, source = self.resolve(name, role)
        pipe = self.teacher(tname)

        def build():
            if kind == "hub":
                check_hub(str(source), ROLE_TITLE.get(role, role) + " student")
                unet = _load_hub_student(str(source), pipe)
            else:
                try:
                    unet = load_student(source, pipe, weights=self.weights)
                except ModelLoadError as e:
                    raise StudioError(self.public(str(e))) from None
            if self.warm_up:
                _warm_up(pipe, unet)
            return unet

        return self._cached(("student", str(source), str(self.resolve(tname, "teacher")[1])), build)

    def baked_guidance(self, name: str | None) -> float | None:
        """CFG a student was distilled at, when known: a run's training_config.json (w in the LCM form, CFG = w + 1),
        or for a hub student what the model table records of its release (models.model_sets.baked_guidance)."""
        try:
            kind, source = self.resolve(name, "splam")
        except StudioError:
            return None
        if kind == "hub":
            from ..models.model_sets import baked_guidance

            return baked_guidance(str(source))
        if kind != "path":
            return None
        w = _config(source).get("w")
        return cfg_scale(float(w)) if isinstance(w, (int, float)) else None

    def sampling_guidance(self, name: str | None, role: str) -> float:
        """guidance_scale a student samples at: 1 (gamma = 1), or w + 1 for a w-conditioned run (diffusers' LCM)."""
        try:
            kind, source = self.resolve(name, role)
            return sampling_guidance(source) if kind == "path" else 1.0
        except (StudioError, OSError, ValueError, KeyError, TypeError, AttributeError):
            return 1.0

    def weights_bytes(self, teacher: str | None = None, splam: str | None = None, lcm: str | None = None) -> int:
        """Bytes of the weights the three models hold, loading them if needed: every component of the teacher (SDXL:
        both text encoders) and the students, a UNet that LoRA adapters share counted once (training.memory)."""
        pipe = self.teacher(teacher)
        modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
        return weights_bytes(*modules, self.student(splam, teacher, "splam"), self.student(lcm, teacher, "lcm"))

    def load_models(self, teacher: str, splam: str, lcm: str, progress: Progress = _no_progress) -> str:
        """Load (and cache) a teacher and two students; a one-line status, or StudioError saying what failed."""
        progress(0.1, f"loading teacher {teacher}")
        self.teacher(teacher)
        progress(0.5, f"loading SPLAM student {splam}")
        self.student(splam, teacher, "splam")
        progress(0.8, f"loading LCM student {lcm}")
        self.student(lcm, teacher, "lcm")
        return f"Loaded teacher `{teacher}`, SPLAM `{splam}`, LCM `{lcm}`."

    def start_training(self, teacher: str, data: str, method: str, steps, run_name: str, batch_size=32,
                       owner: str | None = None, **data_options) -> str:
        """Start a distillation run for `owner` (a browser session) from a listed teacher (resolved here, so the UI
        never passes a path; a hub id reaches the trainer as a hub id, run from a folder that holds no folders).
        data_options: the typed prompts and images per prompt (launcher.Trainer.start)."""
        kind, source = self.resolve(teacher, "teacher")
        return self.trainer.start(source, data, method, steps, run_name, batch_size, owner=owner, **data_options)

    # -- compare ------------------------------------------------------------------------------------------------
    def compare(self, prompt: str, negative_prompt: str = "", seed=0, student_steps=4, teacher_steps=25,
                guidance_scale=DEFAULT_GUIDANCE, sampler: str = "ddim", *, teacher: str | None = None,
                splam: str | None = None, lcm: str | None = None, progress: Progress = _no_progress,
                repeats: int = LATENCY_RUNS, warmup: int = LATENCY_WARMUP, clock: Clock = time.perf_counter
                ) -> CompareResult:
        """Teacher, LCM and SPLAM from the same initial noise of `seed`, timed in `repeats` interleaved rounds after
        `warmup` uncounted ones (median and range shown); each student's image is measured against the teacher's
        (PSNR, latent MSE, a difference heat map)."""
        notices: list[str] = []
        prompt = clean_prompt(prompt, notices)
        negative_prompt = clean_prompt(negative_prompt, notices, what="negative prompt", required=False)
        seed = clamp_int("seed", seed, SEED, notices)
        student_steps = clamp_int("student steps", student_steps, STUDENT_STEPS, notices)
        teacher_steps = clamp_int("teacher steps", teacher_steps, TEACHER_STEPS, notices)
        guidance_scale = clamp_float("guidance scale", guidance_scale, GUIDANCE, notices)
        sampler = check_sampler(sampler)
        teacher, splam, lcm = (teacher or self.default("teacher"), splam or self.default("splam"),
                               lcm or self.default("lcm"))
        started = clock()

        progress(0.02, "loading models")
        pipe = self.teacher(teacher)
        names = {"lcm": lcm, "splam": splam}
        unets = {role: self.student(name, teacher, role) for role, name in names.items()}
        g = {role: self.sampling_guidance(name, role) for role, name in names.items()}
        steps = {"teacher": teacher_steps, "lcm": student_steps, "splam": student_steps}
        fns = {"teacher": lambda: generate(pipe, prompt=[prompt], sampler=sampler, steps=teacher_steps, seed=seed,
                                           guidance_scale=guidance_scale,
                                           negative_prompt=[negative_prompt] if negative_prompt else None)}
        for role in names:
            fns[role] = (lambda r: lambda: generate(pipe, prompt=[prompt], sampler="lcm", steps=student_steps,
                                                    seed=seed, unet=unets[r], student_guidance_scale=g[r]))(role)

        rounds = max(0, int(warmup)) + max(1, int(repeats))
        what = {"teacher": f"{teacher_steps} {sampler} steps", "lcm": f"{student_steps} step{'s' if student_steps > 1 else ''}"}
        what["splam"] = what["lcm"]

        def stage(i: int, r: int, role: str) -> None:
            kind = "warm-up" if r < warmup else "timed"
            progress(0.05 + 0.85 * i / (3 * rounds), f"round {r + 1}/{rounds} ({kind}): {ROLE_TITLE[role]}, "
                     f"{what[role]} + VAE decode")

        models = {"teacher": pipe.unet, **unets}

        def before(i: int, r: int, role: str) -> None:  # a LoRA adapter switch happens here, outside the timing
            stage(i, r, role)
            activate(models[role])

        t = interleaved(fns, repeats, warmup=warmup, clock=clock, on_call=before)
        progress(0.92, "comparing each student to the teacher (PSNR, latent MSE, heat maps)")
        out = t.outputs["teacher"]
        ref = Panel("teacher", teacher, sampler, teacher_steps, seed, guidance_scale, statistics.median(t.runs["teacher"]),
                    out.images[0], negative_prompt=negative_prompt, latency_runs=t.runs["teacher"], latent=out.latents,
                    unet_calls=unet_calls("teacher", teacher_steps, guidance_scale), warmup_ms=t.warmup["teacher"])
        panels = [ref]
        for role, name in names.items():
            out, runs = t.outputs[role], t.runs[role]
            ms = statistics.median(runs)
            panels.append(Panel(role, name, "lcm", student_steps, seed, g[role], ms, out.images[0],
                                baked_guidance=self.baked_guidance(name), speedup=ref.latency_ms / max(ms, 1e-6),
                                latency_runs=runs, psnr_db=image_psnr(out.images[0], ref.image),
                                latent_mse=float(latent_mse(out.latents, ref.latent)[0]), latent=out.latents,
                                unet_calls=unet_calls(role, steps[role], g[role]), warmup_ms=t.warmup[role]))
        if student_steps == 1:  # the honest 1-step label: what one step of the teacher UNet itself gives
            progress(0.95, "1 step: the untrained student (the teacher UNet as a 1-step sampler), for reference")
            activate(pipe.unet)
            raw = generate(pipe, prompt=[prompt], sampler="lcm", steps=1, seed=seed)
            raw_psnr, raw_mse = image_psnr(raw.images[0], ref.image), float(latent_mse(raw.latents, ref.latent)[0])
            for p in panels[1:]:
                p.untrained_psnr, p.untrained_mse = raw_psnr, raw_mse
        scale = max(float(_abs_diff(p.image, ref.image).max()) for p in panels[1:])  # one scale for both maps
        for p in panels[1:]:
            p.heatmap = difference_heatmap(p.image, ref.image, scale)
        progress(1.0, "done")
        return CompareResult(prompt=prompt, panels=panels, notices=notices,
                             same_architecture=same_architecture(unets["lcm"], unets["splam"]),
                             elapsed_s=clock() - started)

    # -- error bound --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def error_bound_plot(self, prompt: str, seed=0, stride=1, guidance_scale=None, *, teacher: str | None = None,
                         splam: str | None = None, lcm: str | None = None, n_thumbnails: int = 6,
                         progress: Progress = _no_progress) -> ErrorBoundResult:
        """Per-sub-path terms, bound and real error of LCM and SPLAM along the teacher's guided DDIM trajectory."""
        notices: list[str] = []
        prompt = clean_prompt(prompt, notices)
        seed = clamp_int("seed", seed, SEED, notices)
        stride = clamp_int("stride", stride, STRIDE, notices)
        teacher, splam, lcm = (teacher or self.default("teacher"), splam or self.default("splam"),
                               lcm or self.default("lcm"))
        if guidance_scale is None:
            guidance_scale = self.baked_guidance(splam) or DEFAULT_GUIDANCE
        guidance_scale = clamp_float("guidance scale", guidance_scale, GUIDANCE, notices)

        progress(0.02, "loading models")
        pipe = self.teacher(teacher)
        students = {"LCM": self.student(lcm, teacher, "lcm"), "SPLAM": self.student(splam, teacher, "splam")}
        device = self.runtime.device
        schedule = NoiseSchedule.from_scheduler(pipe.scheduler)
        # c and c_uncond from the teacher driver, as the stock pipeline builds them without a negative prompt (SD1.5:
        # the encoded ""; SDXL: zeros under force_zeros_for_empty_prompt, with the pooled embeds and time ids)
        cond, uncond = pipeline_conditions(pipe, [prompt], device, True, None)

        progress(0.1, f"teacher trajectory ({N_GRID} guided DDIM steps)")
        unet = pipe.unet
        vae_scale = vae_scale_factor(pipe.vae)
        size = unet.config.sample_size * vae_scale
        z_T = initial_noise(seed, 1, unet, size, size, vae_scale).to(device)  # same noise as compare()
        key = (str(self.resolve(teacher, "teacher")[1]), prompt, seed, guidance_scale)
        with self._lock:
            cached = self._trajectories.get(key)
        reused = cached is not None
        if cached is None:  # the costly part at 512 px: 50 guided teacher steps; the stride and students reuse it
            cached = guided_trajectory(unet, cond, uncond, lcm_w(guidance_scale), schedule, z_T, N=N_GRID)
            with self._lock:
                self._trajectories[key] = cached
                while len(self._trajectories) > TRAJECTORY_CACHE:
                    self._trajectories.popitem(last=False)
        traj, times = cached
        k = stride * (schedule.T // N_GRID)

        progress(0.5, "LCM and SPLAM: F along the trajectory")
        curves = {name: by_stride[stride] for name, by_stride in
                  student_error_bounds(students, cond, schedule, traj, times, (stride,)).items()}
        show = _spread(len(times) - 1, n_thumbnails)  # trajectory indices to decode
        Fs = {}
        for name, s_unet in students.items():  # F at the shown points: from the bound where it was evaluated
            F = clean_fn(s_unet, cond, schedule)
            done = curves[name].F
            Fs[name] = torch.cat([(done[j] if j in done else F(traj[j], torch.tensor([times[j]], dtype=torch.long))).float()
                                  for j in show])

        progress(0.9, "decoding thumbnails")
        latents = torch.cat([traj[-1].float()] + list(Fs.values()))  # (1 + 2 n, C, h, w)
        chunk = decode_chunk(size)
        images = [im for i in range(0, len(latents), chunk) for im in decode_latents(pipe, latents[i:i + chunk])]
        thumbs = [(images[0], f"Teacher z_0 ({N_GRID}-step DDIM)")]
        for a, name in enumerate(Fs):
            thumbs += [(images[1 + a * len(show) + b], f"{name} F(z_t), t={times[j]}") for b, j in enumerate(show)]
        progress(1.0, "done")
        cost = ErrorBoundCost(teacher_calls=0 if reused else N_GRID, student_calls=sum(len(c.F) for c in curves.values()),
                              extra_calls=sum(j not in curves[n].F for n in Fs for j in show), decodes=len(latents),
                              decode_chunk=chunk, px=size)
        return ErrorBoundResult(prompt=prompt, seed=seed, stride=stride, k=k, guidance=guidance_scale,
                                curves=curves, thumbnails=thumbs, notices=notices, trajectory_reused=reused, cost=cost)


def measured_note(benchmarks: Path | None = None) -> str:
    """What the committed benchmarks measured for the embedded Shapes students (BENCHMARKS.md), as one Markdown line.

    Read from `benchmarks/results.json` (error bound at t = 999 per stride) and `benchmarks/seeds.json` (FID and teacher
    distance at 2 steps over training seeds); "" when the files are absent (an installed package without them).
    """
    import json

    from ..store.runs import CHECKOUT

    folder = Path(benchmarks) if benchmarks is not None else CHECKOUT / "benchmarks"
    parts = []
    try:
        eb = json.loads((folder / "results.json").read_text())["error_bound"]
        k = sorted(eb["lcm"], key=lambda s: int(s.split("=")[1]))[0]  # the shortest stride, k = 20
        lcm, spl = eb["lcm"][k], eb["splam"][k]
        parts.append(f"at {k}, t = 999: bound LCM {lcm['bound'][0]:.3f} / SPLAM {spl['bound'][0]:.3f}, real error "
                     f"LCM {lcm['error'][0]:.3f} / SPLAM {spl['error'][0]:.3f}")
    except (OSError, KeyError, IndexError, ValueError):
        pass
    try:
        runs = json.loads((folder / "seeds.json").read_text())["runs"]
        embedded = {r: runs[r]["points"][-1]["2"] for r in ("shapes-lcm", "shapes-splam") if r in runs}
        if len(embedded) == 2:
            lcm, spl = embedded["shapes-lcm"], embedded["shapes-splam"]
            parts.append(f"2-step Shapes-FID LCM {lcm['fid']:.1f} / SPLAM {spl['fid']:.1f}, latent MSE to the teacher "
                         f"LCM {lcm['teacher_mse']:.4f} / SPLAM {spl['teacher_mse']:.4f}")
    except (OSError, KeyError, IndexError, ValueError):
        pass
    if not parts:
        return ""
    return ("Measured on the embedded Shapes students (500 held-out captions; BENCHMARKS.md has the seeds and spreads): "
            + "; ".join(parts) + ".")


def _spread(last: int, n: int) -> list[int]:
    """n indices from 0 to last-1 (excluding the end z_0 itself), evenly spread, starting at 0 (t = T - 1)."""
    n = max(1, min(n, last))
    return sorted({round(i * (last - 1) / max(n - 1, 1)) for i in range(n)})


def _warm_up(pipe, unet) -> None:
    """One 1-step generation, so the first measured latency carries no one-off start-up cost."""
    generate(pipe, prompt=[""], sampler="lcm" if unet is not None else "ddim", steps=1, seed=0, unet=unet)


@dataclass
class Timings:
    """What `interleaved` measured: each function's first output, and its timed and warm-up runs in ms."""

    outputs: dict[str, object]
    runs: dict[str, list[float]]
    warmup: dict[str, list[float]]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # CUDA runs asynchronously: a run ends when its kernels have


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, *, warmup: int = 0, clock: Clock = time.perf_counter,
                sync: Callable[[], None] = _sync, on_call: Callable[[int, int, str], None] | None = None) -> Timings:
    """Run every function once per round, round-robin in the dict's order (a, b, c, a, b, c, ...), `warmup` rounds
    uncounted and then `repeats` timed: a load that comes and goes on the machine then falls on all of them alike,
    not on whichever ran while it lasted. on_call(i, round, key) is called before each call (progress)."""
    repeats, warmup = max(1, int(repeats)), max(0, int(warmup))
    outputs: dict[str, object] = {}
    runs: dict[str, list[float]] = {k: [] for k in fns}
    warm: dict[str, list[float]] = {k: [] for k in fns}
    i = 0
    for r in range(warmup + repeats):
        for key, fn in fns.items():
            if on_call is not None:
                on_call(i, r, key)
            t0 = clock()
            out = fn()
            sync()
            ms = (clock() - t0) * 1000
            (warm if r < warmup else runs)[key].append(ms)
            outputs.setdefault(key, out)  # runs are identical by seed: the first output stands for all
            i += 1
    return Timings(outputs, runs, warm)


def same_architecture(a, b) -> bool:
    """Whether two UNets have one config (the private `_…` keys aside): the same work per call."""
    def arch(unet) -> dict:
        return {k: v for k, v in dict(getattr(unet, "config", {})).items() if not str(k).startswith("_")}
    return arch(a) == arch(b)


def _pixels(image):
    import numpy as np

    return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0  # (H, W, 3) in [0, 1]


def _abs_diff(image, ref):
    """Per-pixel |image - ref| averaged over RGB, (H, W) in [0, 1]."""
    return abs(_pixels(image) - _pixels(ref)).mean(axis=2)


def image_psnr(image, ref) -> float:
    """PSNR in dB of two same-size images (core.metrics.psnr, data range 1); inf when identical."""
    a, b = (torch.from_numpy(_pixels(x))[None] for x in (image, ref))
    return math.inf if torch.equal(a, b) else float(psnr(a, b, data_range=1.0)[0])


def difference_heatmap(image, ref, scale: float | None = None, min_size: int = 256):
    """|image - ref| as a 'magma' heat map (black = same, yellow = `scale` or more), upscaled to min_size pixels."""
    import numpy as np
    from matplotlib import colormaps
    from PIL import Image

    d = _abs_diff(image, ref)
    scale = scale if scale and scale > 0 else max(float(d.max()), 1e-6)
    rgb = (colormaps["magma"](np.clip(d / scale, 0, 1))[..., :3] * 255).astype(np.uint8)
    heat = Image.fromarray(rgb, "RGB")
    f = max(1, -(-min_size // heat.width))
    return heat.resize((heat.width * f, heat.height * f), Image.NEAREST)


def _config(run: Path) -> dict:
    """A run's training_config.json as a dict; {} when missing, unreadable or not a JSON object."""
    try:
        cfg = read_training_config(run)
    except (OSError, ValueError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def public_text(text: str, weights: Path | None = None, local: dict[str, Path] | None = None) -> str:
    """`text` without server paths: run folders become `weights/<run>`, command-line models their `local:` names,
    the Hugging Face cache `<HF cache>`, the package folder and the home folder `<server>`; nothing else changes."""
    from .launcher import PACKAGE_ROOT

    pairs: list[tuple[str, str]] = []
    for name, path in (local or {}).items():
        pairs.append((str(path), name))
    if weights is not None:
        for w in {str(Path(weights)), os.path.realpath(weights), os.path.abspath(weights)}:
            pairs.append((w, "weights"))
    pairs += [(str(PACKAGE_ROOT), "<server>"), (os.path.expanduser("~"), "<server>")]
    text = hub_cache_text(text)
    for path, name in sorted(pairs, key=lambda p: -len(p[0])):  # the longest first: a run folder before its root
        if path and path not in (".", "/"):
            text = text.replace(path, name)
    return text


HUB_HOST = ("huggingface.co", 443)
_reachable: dict[str, tuple[float, bool]] = {}  # host -> (checked at, reachable), remembered for a minute


def hub_reachable(timeout: float = 1.0) -> bool:
    """False when HF_HUB_OFFLINE is set or huggingface.co does not accept a connection within `timeout` seconds."""
    if hub_offline():
        return False
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("//")[-1].split("/")[0].split(":")[0]
    checked = _reachable.get(host)
    if checked and time.time() - checked[0] < 60:
        return checked[1]
    try:
        with socket.create_connection((host, HUB_HOST[1]), timeout=timeout):
            ok = True
    except OSError:
        ok = False
    _reachable[host] = (time.time(), ok)
    return ok


def hub_cached(repo: str) -> bool:
    """Whether any file of model repo `repo` is in the local Hugging Face cache."""
    from huggingface_hub import constants

    folder = Path(constants.HF_HUB_CACHE) / ("models--" + repo.replace("/", "--")) / "snapshots"
    return folder.is_dir() and any(folder.iterdir())


def check_hub(repo: str, what: str) -> None:
    """Fail in about a second, in one sentence, for a hub model that is neither cached nor reachable."""
    if not hub_cached(repo) and not hub_reachable():
        raise StudioError(f"The {what} {repo!r} is not in this machine's Hugging Face cache and the hub cannot be "
                          f"reached (offline): run `hf download {repo}` where there is network, or start "
                          "the app with a local folder (--teacher / --splam / --lcm PATH).")


def _hub_hint(message: str, repo: str) -> str:
    return (f"{message}. Offline or behind a firewall, hub models cannot be fetched: download it where there is "
            f"network (`hf download {repo}`), or start the app with a local folder (--teacher PATH).")


def _load_hub_student(repo: str, pipe):
    """A student UNet from the hub, stored as model_sets.MODEL_SETS says (unet/ of a full pipeline, a LoRA fused into a
    copy of the teacher UNet, or a LoRA adapter on the teacher's own UNet); a repo no set lists is tried as a UNet,
    then as a fused LoRA."""
    from ..models.model_sets import student_kind
    from ..models.loading import load_hub_student

    try:
        return load_hub_student(repo, pipe, student_kind(repo))
    except ModelLoadError as e:
        raise StudioError(_hub_hint(str(e), repo)) from None


