"""The studio's Gradio layout: Compare, Error bound and Train tabs over a `Studio` (all logic lives there).

`build_ui` composes one builder per part: the model set and models (`_models_section`), `_compare_tab`,
`_error_bound_tab` and the Train tab. Named API endpoints: /compare, /error_bound and /model_set. User mistakes
surface as gr.Error / gr.Warning messages, never as a traceback; unexpected failures are logged on the server and
shown as one line. Result images reach the page as files written once and never rewritten (`served_file`).
"""
from __future__ import annotations

import functools
import hashlib
import io
import logging
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from ..models.model_sets import MODEL_SETS, gpu_seconds, zero_gpu
from ..models.loading import ModelLoadError
from ..shapes.grammar import ATTRIBUTE_VALUES, FILLERS, SHAPE_PLURALS, spec_from_caption
from .colors import METHOD_COLORS, tint
from .logic import (
    DEFAULT_GUIDANCE, GUIDANCE, LATENCY_RUNS, LATENCY_WARMUP, N_GRID, ROLE_TITLE, SEED, STRIDE, STUDENT_STEPS,
    TEACHER_SAMPLERS, TEACHER_STEPS, Studio, StudioError, measured_note, public_text,
)
from .train_tab import train_tab

log = logging.getLogger("splam_studio.studio.ui")

try:  # Hugging Face ZeroGPU: borrow a GPU for the duration of a call; a no-op everywhere else
    import spaces

    gpu = spaces.GPU
except ImportError:
    def gpu(fn=None, **_kwargs):
        return fn if fn is not None else (lambda f: f)

TITLE = "SPLAM Studio"
INTRO = ("**SPLAM** (ECCV 2024) and its baseline **LCM** distil a diffusion teacher into a 1-4 step generator. "
         "Same prompt, same initial noise: teacher, LCM and SPLAM side by side.")
NEGATIVE_INFO = ("Acts on the teacher only: SPLAM and LCM bake guidance in during distillation and sample without "
                 "classifier-free guidance, so there is no unconditional branch for a negative prompt to steer.")
EXAMPLES = [
    "one large red circle at the left on a black background",
    "two small yellow squares at the top on a gray background",
    "one large blue circle at the center on a white background",
    "one small green star at the right on a black background",
    "two large magenta triangles at the bottom on a white background",
    "one large cyan diamond at the center on a gray background",
]
CSS = """
.panel img { image-rendering: pixelated; }
.panel .image-frame img, .panel .image-container img { width: 100%; height: 100%; object-fit: contain; }
.panel-caption { font-size: 0.95em; min-height: 3.2em; }
.panel-caption strong { font-size: 1.1em; }
#title { margin-bottom: 0; }
#intro p { margin: 0; }
#compare-notice:empty { display: none; }
#vocabulary p { font-size: 0.85em; margin: 0; }
#examples button { white-space: normal; text-align: left; justify-content: flex-start; height: auto; font-weight: normal; }
.examples-label p { font-size: 0.9em; margin: 0; }
#history .grid-wrap { padding-top: 30px; }
#history .grid-container { grid-template-columns: repeat(auto-fill, minmax(210px, 1fr)) !important;
  grid-auto-rows: auto !important; }
#history .thumbnail-item { aspect-ratio: auto !important; height: auto !important; display: flex; flex-direction: column; }
#history .thumbnail-item img { aspect-ratio: 3 / 1; height: auto !important; }
#history .caption-label { position: static; white-space: normal; max-width: 100%; opacity: 1; border: none;
  background: none; padding: 2px 4px; }  /* the whole caption: prompt, seed, steps, time tell entries apart */
#eb-summary table { display: block; max-width: 100%; overflow-x: auto; }
#eb-legend .eb-item { white-space: nowrap; }
#eb-summary th:first-child, #eb-summary td:first-child { white-space: nowrap; }
@media (max-width: 640px) {
  .gradio-container { padding-left: 6px !important; padding-right: 6px !important; }
  #title h1 { font-size: 1.4em; margin: 0; }
  #intro, #model-set-about { display: none; }  /* the first screen is for the prompt and Generate */
  #panels { flex-direction: column; }
  #eb-grid .icon-button-wrapper { display: none; }  /* they would cover the t labels of the small grid */
  #eb-summary table { font-size: 0.85em; }
  #eb-summary th, #eb-summary td { padding: 4px !important; white-space: normal; }
}
"""
SCROLL_TO_COMPARE = "() => { document.querySelector('#compare-row')?.scrollIntoView({behavior: 'smooth', block: 'start'}); }"
HISTORY_SIZE = 24
_PUBLIC = [public_text]  # what a visitor may read of a message: build_ui puts its studio's path scrubber here


def _heldout_pair(prompt: str) -> str | None:
    """'yellow squares' for a caption whose (shape, colour) pair never appeared in training, else None."""
    try:
        if spec_from_caption(prompt).is_heldout:
            return " ".join(prompt.split()[2:4])
    except ValueError:
        pass
    return None


EXAMPLES_LABEL = ("Shapes prompts, shown whole (a click runs it); held-out pairs, never together in training: "
                  + ", ".join(filter(None, map(_heldout_pair, EXAMPLES))))


def vocabulary_note() -> str:
    """One line: the words the Shapes models know, from the grammar (splam_studio/shapes/grammar.py)."""
    def noun(single: str, plural: str) -> str:
        return f"{single}({plural[len(single):]})" if plural.startswith(single) else f"{single}/{plural}"

    groups = [ATTRIBUTE_VALUES[a] for a in ("count", "size", "colour")]
    groups += [[noun(s, p) for s, p in zip(ATTRIBUTE_VALUES["shape"], SHAPE_PLURALS)], ATTRIBUTE_VALUES["position"],
               ATTRIBUTE_VALUES["background"], FILLERS]
    return ("The Shapes models know only their grammar's words, in prompts and in training captions: "
            + " · ".join(" ".join(g) for g in groups) + ".")


def served_file(image) -> str | None:
    """`image` (PIL) as a PNG in Gradio's cache folder, named by its content, written once (atomically) and never
    rewritten: a file the browser is still reading is never replaced under it. Gradio's own PIL saving rewrites
    its file in place each time the same image is returned again (a slider, a heat-map toggle, the history), which
    cut a download short (ERR_CONTENT_LENGTH_MISMATCH)."""
    if image is None:
        return None
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    data = buf.getvalue()
    folder = Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio") / "splam-studio"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{hashlib.sha256(data).hexdigest()[:32]}.png"
    if not path.exists():
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".", suffix=".png")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return str(path)


def user_errors(fn):
    """StudioError / ModelLoadError / ValueError -> gr.Error with its message; anything else -> one logged line."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except (StudioError, ModelLoadError, ValueError) as e:
            raise gr.Error(_PUBLIC[0](str(e)), print_exception=False) from None
        except Exception as e:  # noqa: BLE001 - the server log keeps the traceback, the user gets one line
            log.exception("studio call failed")
            raise gr.Error(_user_message(e)) from None
    return wrapper


def _warn(notices: list[str]) -> str:
    for n in notices:
        gr.Warning(n)
    return "".join(f"\n\n⚠️ {n}" for n in notices)


def _progress(progress: gr.Progress, lo: float = 0.0, hi: float = 1.0):
    """A Studio progress callback onto the [lo, hi] part of the page's bar."""
    return lambda fraction, desc: progress(lo + (hi - lo) * fraction, desc=desc)


LOADING = (0.0, 0.05)  # the part of a Generate's progress bar for loading models; sampling takes the rest


def _user_message(e: Exception) -> str:
    text = str(e) if isinstance(e, (StudioError, ModelLoadError, ValueError)) else \
        f"internal error ({type(e).__name__}: {str(e)[:200]}); see the server log"
    return _PUBLIC[0](text)


def build_ui(studio: Studio, *, train: bool = True) -> gr.Blocks:
    """The Blocks app; launch it with css=CSS (gradio 6 takes css and theme at launch)."""
    _PUBLIC[0] = studio.public
    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(f"# {TITLE}", elem_id="title")
        gr.Markdown(INTRO, elem_id="intro")
        models = _models_section(studio)
        with gr.Tab("Compare"):
            prompt, vocabulary = _compare_tab(studio, models)
        with gr.Tab("Error bound"):
            eb_prompt = _error_bound_tab(studio, models)
        _bind_model_set(models, prompt, eb_prompt, vocabulary)
        if train:
            train_tab(studio, demo, models.inputs, models.menus)
    return demo


# ---- model set and models ------------------------------------------------------------------------------------------
@dataclass
class Models:
    """The page's model choice: the set menu and its text, the three role menus, and `menus` to refresh those."""

    set_dd: gr.Dropdown
    set_about: gr.Markdown
    inputs: list  # teacher, SPLAM, LCM dropdowns
    menus: object  # (teacher, splam, lcm) values -> three gr.Dropdown updates
    first_prompt: str


def _models_section(studio: Studio) -> Models:
    """The model set menu and the Models accordion (role menus, Refresh, hub ids), with their events."""
    status = studio.models_status()
    gr.Markdown(f"⚠️ {status}" if status else "", visible=bool(status))
    current = MODEL_SETS.get(studio.model_set)

    def menus(values=(None, None, None)):
        return tuple(gr.Dropdown(choices=_with(studio.menu(role), v), **({"value": v} if v else {}))
                     for role, v in zip(("teacher", "splam", "lcm"), values))

    @user_errors
    def on_load_hub(teacher_id, splam_id, lcm_id, teacher, splam, lcm, progress=gr.Progress()):
        teacher, splam, lcm = (teacher_id.strip() or teacher, splam_id.strip() or splam, lcm_id.strip() or lcm)
        try:
            msg = studio.load_models(teacher, splam, lcm, progress=_progress(progress))
        except (StudioError, ModelLoadError) as e:
            gr.Warning(str(e))
            return gr.skip(), gr.skip(), gr.skip(), f"⚠️ {e}"
        return (*menus((teacher, splam, lcm)), f"✅ {msg}")

    with gr.Row():
        set_dd = gr.Dropdown([(m.title, m.name) for m in MODEL_SETS.values()], value=studio.model_set,
                             label="Model set", info="a teacher with its LCM and SPLAM students; loaded on first "
                             "use, then kept in memory", scale=2, elem_id="model-set")
        set_about = gr.Markdown(_set_about(current), elem_id="model-set-about")
    with gr.Accordion("Models", open=False):
        with gr.Row():
            inputs = [gr.Dropdown(studio.menu(role), value=studio.default(role), label=label,
                                  allow_custom_value=True, scale=3, min_width=220)
                      for role, label in (("teacher", "Teacher"), ("splam", "SPLAM student"), ("lcm", "LCM student"))]
            refresh = gr.Button("↻ Refresh list", scale=1, size="sm", min_width=120)
        gr.Markdown("Each menu lists only models of its role: runs under `weights/`, including the ones you "
                    "distil in the Train tab, tagged with the method they were trained with.")
        with gr.Accordion("SD1.5 setup (Hugging Face Hub ids)", open=False):
            gr.Markdown("Hub ids `owner/name`; they need network access (or a local Hugging Face cache). Local "
                        "folders can only be given on the command line: `python app.py --teacher PATH --splam "
                        "PATH --lcm PATH`.")
            with gr.Row():
                hub = [gr.Textbox(label="Teacher", placeholder="stable-diffusion-v1-5/stable-diffusion-v1-5"),
                       gr.Textbox(label="SPLAM weights", placeholder="alimama-creative/slam-sd1.5"),
                       gr.Textbox(label="LCM weights", placeholder="SimianLuo/LCM_Dreamshaper_v7")]
            load_btn = gr.Button("Load")
            load_status = gr.Markdown()
    refresh.click(lambda t, s, l: menus((t, s, l)), inputs, inputs, api_visibility="private")
    load_btn.click(on_load_hub, [*hub, *inputs], [*inputs, load_status], api_visibility="private")
    first = current.prompts[0] if current and current.prompts else EXAMPLES[0]
    return Models(set_dd, set_about, inputs, menus, first)


def set_prompts() -> set[str]:
    """Every prompt the page itself puts in a prompt box (each set's first prompts, the examples)."""
    return {p for m in MODEL_SETS.values() for p in m.prompts} | set(EXAMPLES)


def kept_prompt(typed, new: str) -> str:
    """The prompt a box shows after a model-set switch: what the user typed stays; the page's own one is replaced."""
    text = (typed or "").strip()
    return new if not text or text in set_prompts() else typed


def _bind_model_set(models: Models, prompt, eb_prompt, vocabulary) -> None:
    """A model-set switch: its menus and text, and its first prompt in a prompt box the user has not typed in."""
    def on_model_set(name, typed, eb_typed):
        if name not in MODEL_SETS:
            raise gr.Error(f"unknown model set {name!r}; choose one of {sorted(MODEL_SETS)}", print_exception=False)
        m = MODEL_SETS[name]
        first = m.prompts[0] if m.prompts else EXAMPLES[0]
        return (*models.menus((m.teacher, m.splam.repo, m.lcm.repo)), _set_about(m), kept_prompt(typed, first),
                kept_prompt(eb_typed, first))

    def on_vocabulary(name):  # the grammar's words concern the Shapes models only
        return gr.Markdown(visible=name in MODEL_SETS and not MODEL_SETS[name].hub)

    models.set_dd.change(on_model_set, [models.set_dd, prompt, eb_prompt],
                         [*models.inputs, models.set_about, prompt, eb_prompt], api_name="model_set",
                         ).then(on_vocabulary, models.set_dd, vocabulary, api_visibility="private", queue=False)


# ---- Compare -------------------------------------------------------------------------------------------------------
@dataclass
class CompareView:
    """The Compare tab's components that its events read and write."""

    inputs: list  # prompt, negative, seed, student steps, teacher steps, guidance, sampler, teacher, splam, lcm
    panels: list
    captions: list
    summary: gr.Markdown
    notice: gr.Markdown
    show_diff: gr.Checkbox
    history: gr.Gallery
    history_state: gr.State
    images_state: gr.State
    slider_sides: list  # left, right dropdowns
    slider: gr.ImageSlider

    def outputs(self) -> list:
        """What a generation (or a restored history entry) writes."""
        return [*self.panels, *self.captions, self.summary, self.notice, self.images_state, self.history_state,
                self.history]


def _compare_tab(studio: Studio, models: Models):
    """Prompt, Generate, settings, the three panels, history, examples and the A/B slider; (prompt box, vocabulary
    line) for the model-set switch."""
    with gr.Row(elem_id="compare-row"):
        with gr.Column(scale=1, min_width=280, elem_id="controls"):
            prompt = gr.Textbox(label="Prompt", value=models.first_prompt, lines=2, elem_id="prompt")
            go = gr.Button("Generate", variant="primary", elem_id="generate")
            notice = gr.Markdown(elem_id="compare-notice")
            current = MODEL_SETS.get(studio.model_set)
            vocabulary = gr.Markdown(vocabulary_note(), elem_id="vocabulary", visible=not (current and current.hub))
            settings = _compare_settings()
        with gr.Column(scale=3, min_width=300, elem_id="results"):
            with gr.Row(equal_height=True, elem_id="panels"):
                panels, captions = [], []
                for role in ("teacher", "lcm", "splam"):
                    with gr.Column(min_width=160):
                        panels.append(gr.Image(label=ROLE_TITLE[role], type="pil", height=320, interactive=False,
                                               elem_classes="panel", elem_id=f"panel-{role}"))
                        captions.append(gr.Markdown(elem_classes="panel-caption", elem_id=f"caption-{role}"))
            show_diff = gr.Checkbox(label="Show each student's difference to the teacher as a heat map "
                                          "(black = same pixel, yellow = the largest difference of the two)",
                                    value=False, elem_id="show-diff")
            summary = gr.Markdown(elem_id="summary")
    history = gr.Gallery(label="History (teacher | LCM | SPLAM, newest first; click one to bring it back)", columns=4,
                         rows=1, height=170, object_fit="contain", allow_preview=False, elem_id="history",
                         elem_classes="panel")
    gr.Markdown(EXAMPLES_LABEL, elem_classes="examples-label")
    with gr.Row(elem_id="examples"):  # buttons, not gr.Examples: those cut a caption at 60 characters
        examples = [gr.Button(text, size="sm", min_width=240) for text in EXAMPLES]
    with gr.Accordion("A/B slider", open=False):
        with gr.Row():
            sides = [gr.Dropdown([ROLE_TITLE[r] for r in ROLE_TITLE], value=v, label=label, scale=1)
                     for v, label in (("LCM", "Left"), ("SPLAM", "Right"))]
        slider = gr.ImageSlider(label="Drag to compare", type="filepath", height=360, elem_classes="panel")
    api_button = gr.Button(visible=False)  # the named endpoint: the same call, errors raised to the client
    s = settings
    inputs = [prompt, s["negative"], s["seed"], s["student_steps"], s["teacher_steps"], s["guidance"], s["sampler"],
              *models.inputs]
    view = CompareView(inputs, panels, captions, summary, notice, show_diff, history, gr.State([]), gr.State({}),
                       sides, slider)
    _compare_events(studio, view, go, examples, api_button)
    return prompt, vocabulary


def _compare_settings() -> dict:
    """The Settings accordion, its inputs by name (seed, student_steps, teacher_steps, guidance, sampler, negative)."""
    with gr.Accordion("Settings", open=False):
        with gr.Row():
            seed = gr.Number(label="Seed", value=0, precision=0, min_width=120, elem_id="seed",
                             info=f"{SEED[0]}-{SEED[1]}; the same noise for all three panels")
            dice = gr.Button("Random seed", size="sm", min_width=100)
        student_steps = gr.Slider(*STUDENT_STEPS, value=2, step=1, label="Student steps (LCM, SPLAM)")
        teacher_steps = gr.Slider(*TEACHER_STEPS, value=25, step=1, label="Teacher steps")
        guidance = gr.Slider(*GUIDANCE, value=DEFAULT_GUIDANCE, step=0.5, label="Teacher guidance (CFG)")
        sampler = gr.Radio(list(TEACHER_SAMPLERS), value="ddim", label="Teacher sampler")
        negative = gr.Textbox(label="Negative prompt (teacher only)", info=NEGATIVE_INFO, lines=1)
    dice.click(lambda: random.randint(*SEED), None, seed, api_visibility="private", queue=False)
    return {"seed": seed, "student_steps": student_steps, "teacher_steps": teacher_steps, "guidance": guidance,
            "sampler": sampler, "negative": negative}


def _px(studio: Studio, teacher) -> int:
    pipe = studio.teacher(teacher)
    return pipe.unet.config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1)


def _compare_runner(studio: Studio):
    """run(args, progress) -> CompareResult: models loaded here with progress, the sampling on the GPU (ZeroGPU runs
    each @gpu call in a forked worker, for a duration sized to all its rounds); the models stay cached here."""
    def compare_seconds(prompt, negative_prompt, seed, student_steps, teacher_steps, guidance_scale, sampler,
                        teacher, splam, lcm, progress=None) -> int:  # spaces.GPU calls it with the task's arguments
        per_round = _int(teacher_steps, TEACHER_STEPS) + 2 * _int(student_steps, STUDENT_STEPS) + 3
        return gpu_seconds(_px(studio, teacher), (LATENCY_WARMUP + LATENCY_RUNS) * per_round,
                           studio.weights_bytes(teacher, splam, lcm))

    @gpu(duration=compare_seconds)
    def compare_on_gpu(prompt, negative_prompt, seed, student_steps, teacher_steps, guidance_scale, sampler,
                       teacher, splam, lcm, progress=None):
        kwargs = {"progress": progress} if progress is not None else {}
        return studio.compare(prompt, negative_prompt, seed, student_steps, teacher_steps, guidance_scale, sampler,
                              teacher=teacher, splam=splam, lcm=lcm, **kwargs)

    def run(args, progress):
        studio.load_models(*args[-3:], progress=_progress(progress, *LOADING))
        # a forked ZeroGPU worker cannot report to this page's bar: there the bar says what runs, once
        sampling = None if zero_gpu() else _progress(progress, LOADING[1], 1.0)
        if sampling is None:
            progress(LOADING[1], desc="teacher, LCM and SPLAM in interleaved timed rounds (on the GPU)")
        return compare_on_gpu(*args, sampling)

    return run


def _compare_events(studio: Studio, v: CompareView, go, examples, api_button) -> None:
    """Generate (page and /compare), the examples, the history, the heat-map toggle and the slider."""
    run = _compare_runner(studio)

    @user_errors
    def api_compare(prompt, negative_prompt, seed, student_steps, teacher_steps, guidance_scale, sampler,
                    teacher, splam, lcm, progress=gr.Progress()):
        r = run((prompt, negative_prompt, seed, student_steps, teacher_steps, guidance_scale, sampler, teacher,
                 splam, lcm), progress)
        return (*[gr.Image(value=served_file(p.image), label=p.label()) for p in r.panels],
                *[p.caption() for p in r.panels], r.summary() + _warn(r.notices))

    def on_compare(prompt, negative_prompt, seed, student_steps, teacher_steps, guidance_scale, sampler,
                   teacher, splam, lcm, show_diff, history, progress=gr.Progress()):
        """The page's Generate: a bad input names its field and keeps the previous results on screen."""
        args = (prompt, negative_prompt, seed, student_steps, teacher_steps, guidance_scale, sampler, teacher, splam,
                lcm)
        try:
            r = run(args, progress)
        except Exception as e:  # noqa: BLE001 - shown in the notice line; unexpected ones also logged
            if not isinstance(e, (StudioError, ModelLoadError, ValueError)):
                log.exception("compare failed")
            msg = _user_message(e)
            gr.Warning(msg)
            return (*(gr.skip(),) * 7, f"⚠️ {msg} (the results below are from the previous run)", gr.skip(),
                    gr.skip(), gr.skip())
        for n in r.notices:
            gr.Warning(n)
        entry = history_entry(r, args)
        history = [entry, *(history or [])][:HISTORY_SIZE]
        return (*shown(entry, show_diff), entry["notice"], entry["images"], history, gallery(history))

    def on_history(history, show_diff, evt: gr.SelectData):
        """A click on a history strip brings that result back, and the inputs that made it."""
        history = history or []
        if not isinstance(evt.index, int) or not 0 <= evt.index < len(history):
            return (gr.skip(),) * (11 + len(v.inputs))
        entry = history[evt.index]
        return (*shown(entry, show_diff), "", entry["images"], gr.skip(), gr.skip(), *entry["inputs"])

    page_inputs, slider = [*v.inputs, v.show_diff, v.history_state], [v.images_state, *v.slider_sides]
    # progress on the three images only: the captions and summary of the previous run stay readable under it
    go.click(on_compare, page_inputs, v.outputs(), api_visibility="private", concurrency_id="generate",
             show_progress_on=v.panels).then(on_slider, slider, v.slider, api_visibility="private")
    for button, text in zip(examples, EXAMPLES):  # an example fills the prompt, runs it, and shows the results
        button.click(None, None, None, js=SCROLL_TO_COMPARE)
        button.click(lambda t=text: t, None, v.inputs[0], api_visibility="private", queue=False).then(
            on_compare, page_inputs, v.outputs(), api_visibility="private", concurrency_id="generate",
            show_progress_on=v.panels).then(
            on_slider, slider, v.slider, api_visibility="private")
    api_button.click(api_compare, v.inputs, [*v.panels, *v.captions, v.summary], api_name="compare",
                     concurrency_id="generate")
    v.history.select(on_history, [v.history_state, v.show_diff], [*v.outputs()[:-3], v.images_state, v.history_state,
                     v.history, *v.inputs], api_visibility="private", queue=False).then(
        on_slider, slider, v.slider, api_visibility="private")
    v.show_diff.change(on_show_diff, [v.show_diff, v.images_state], v.panels[1:], api_visibility="private",
                       queue=False)
    for dd in v.slider_sides:
        dd.change(on_slider, slider, v.slider, api_visibility="private")


def on_show_diff(show: bool, images: dict) -> list:
    """The students' panels as heat maps (show) or images, from the shown result's files."""
    images = images or {}
    return [images.get(f"{role}-diff" if show else role) or gr.skip() for role in ("lcm", "splam")]


def on_slider(images: dict, left: str, right: str):
    """The A/B slider's two images, by panel title."""
    images = images or {}
    a, b = images.get(left.lower()), images.get(right.lower())
    return (a, b) if a is not None and b is not None else None


def history_entry(r, inputs: list) -> dict:
    """One generation as the history keeps it: its images as served files, captions, summary and inputs."""
    strip, caption = r.history_item()
    images = {p.role: served_file(p.image) for p in r.panels} | \
        {f"{p.role}-diff": served_file(p.heatmap) for p in r.panels[1:]}
    return {"strip": served_file(strip), "caption": caption, "images": images,
            "labels": [p.label() for p in r.panels], "captions": [p.caption() for p in r.panels],
            "summary": r.summary(), "notice": "".join(f"⚠️ {n}  \n" for n in r.notices), "inputs": list(inputs)}


def gallery(history: list[dict]) -> list[tuple[str, str]]:
    return [(e["strip"], e["caption"]) for e in history]


def shown(entry: dict, show_diff: bool) -> list:
    """The three panels (students as heat maps when show_diff), their captions and the summary of a history entry."""
    roles = ("teacher", "lcm", "splam")
    images = [gr.Image(value=entry["images"][f"{r}-diff" if show_diff and r != "teacher" else r],
                       label=label + (" · difference" if show_diff and r != "teacher" else ""))
              for r, label in zip(roles, entry["labels"])]
    return [*images, *entry["captions"], entry["summary"]]


# ---- Error bound ---------------------------------------------------------------------------------------------------
def legend_html(colors: dict[str, str]) -> str:
    """The plots' legend as one wrapping line, a swatch per colour with the series drawn in it, each item kept whole
    (the plots' own legends are one row, cut off on a phone)."""
    by_color: dict[str, list[str]] = {}
    for series, c in colors.items():
        method, kind = series.split()
        by_color.setdefault(c, [method]).append("real error" if kind == "error" else kind)
    items = [f"<span class='eb-item'><span style='color:{c}'>■</span> {names[0]} {' / '.join(names[1:])}</span>"
             for c, names in by_color.items()]
    return "Colours: " + " · ".join(items)


def _error_bound_tab(studio: Studio, models: Models):
    """The bound-vs-error plots and the F(z_t) grid; the prompt box, for the model-set switch."""
    def error_bound_seconds(prompt, seed, stride, guidance_scale, teacher, splam, lcm) -> int:
        return gpu_seconds(_px(studio, teacher), N_GRID + 2 * (N_GRID // _int(stride, STRIDE) + 1) + 13,
                           studio.weights_bytes(teacher, splam, lcm))

    @gpu(duration=error_bound_seconds)
    def error_bound_on_gpu(prompt, seed, stride, guidance_scale, teacher, splam, lcm):
        return studio.error_bound_plot(prompt, seed, stride, guidance_scale, teacher=teacher, splam=splam, lcm=lcm)

    @user_errors
    def on_error_bound(prompt, seed, stride, guidance_scale, teacher, splam, lcm, progress=gr.Progress()):
        studio.load_models(teacher, splam, lcm, progress=_progress(progress))
        r = error_bound_on_gpu(prompt, seed, stride, guidance_scale, teacher, splam, lcm)
        return r.frame(), r.terms_frame(), served_file(r.grid_image()), r.summary() + _warn(r.notices)

    gr.Markdown("Along the teacher's guided DDIM trajectory z_T … z_0 (50-step grid), the error of a student's "
                "one-jump estimate is bounded by a sum over sub-paths of length k: "
                "|F(z_t) − z_0| ≤ Σ |F(z_t′) − F(z_t′−k)|. SPLAM aims to shrink each term. "
                "Cost: the teacher trajectory (50 guided steps) is computed once per teacher, prompt, seed and "
                "guidance and then reused; a larger stride means fewer student evaluations (50 / stride + 1 "
                "each), which matters at 512 px and more at 1024 px (SDXL), where each UNet call costs about 4× "
                "a 512 px one and the 13 thumbnails are decoded 3 at a time. Each result states the work it took.")
    if (note := measured_note()):
        gr.Markdown(note, elem_id="error-bound-measured")
    with gr.Row(equal_height=True):
        prompt = gr.Textbox(label="Prompt", value=models.first_prompt, scale=4, min_width=240)
        seed = gr.Number(label="Seed", value=0, precision=0, scale=1, min_width=100)
        stride = gr.Slider(*STRIDE, value=1, step=1, label="Sub-path stride (k = 20 × stride)", scale=2, min_width=200)
        guidance = gr.Slider(*GUIDANCE, value=DEFAULT_GUIDANCE, step=0.5, label="Teacher guidance (CFG)", scale=2,
                             min_width=200)
    go = gr.Button("Compute error bound", variant="primary", elem_id="eb-go")
    summary = gr.Markdown(elem_id="eb-summary")
    colors = {f"{n} {kind}": (METHOD_COLORS[n.lower()] if kind != "error" else tint(METHOD_COLORS[n.lower()]))
              for n in ("LCM", "SPLAM") for kind in ("bound", "error", "term")}
    gr.Markdown(legend_html(colors), elem_id="eb-legend")
    with gr.Row():
        plot = gr.LinePlot(x="t", y="rms", color="series", title="Bound (sum of terms) vs real error",
                           x_title="t (timestep)", y_title="RMS in latent space", height=320,
                           color_map={k: c for k, c in colors.items() if not k.endswith("term")}, min_width=300,
                           colors_in_legend=[], elem_id="eb-plot")
        terms = gr.LinePlot(x="t", y="rms", color="series", title="Per-sub-path terms |F(z_t′) − F(z_t′−k)|",
                            x_title="t′ (timestep)", y_title="RMS in latent space", height=320,
                            color_map={k: c for k, c in colors.items() if k.endswith("term")}, min_width=300,
                            colors_in_legend=[], elem_id="eb-terms")
    gr.Markdown("**Decoded F(z_t) along the trajectory**: one row per student, the same t above each other; "
                "the teacher's final image z_0 on the right.")
    grid = gr.Image(show_label=False, type="filepath", interactive=False, elem_classes="panel", elem_id="eb-grid")
    go.click(on_error_bound, [prompt, seed, stride, guidance, *models.inputs], [plot, terms, grid, summary],
             api_name="error_bound", concurrency_id="generate")
    return prompt


def _set_about(m) -> str:
    if m is None:
        return ""
    where = "from the Hugging Face Hub (downloaded on first use)" if m.hub else "embedded in this repository"
    return f"**{m.title}**: {m.about} Models {where}: teacher `{m.teacher}`, LCM `{m.lcm.repo}`, SPLAM `{m.splam.repo}`."


def _int(value, bounds) -> int:
    """A slider value as an int within bounds, for sizing a GPU call (the Studio validates and reports)."""
    try:
        return min(max(int(round(float(value))), bounds[0]), bounds[1])
    except (TypeError, ValueError):
        return bounds[1]


def _with(choices: list, value) -> list:
    names = [c[1] if isinstance(c, tuple) else c for c in choices]
    return choices if value is None or value in names else [*choices, value]
