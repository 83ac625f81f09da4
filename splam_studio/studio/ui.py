"""The studio's Gradio layout: Compare, Error bound and Train tabs over a `Studio` (all logic lives there).

Named API endpoints: /compare and /error_bound. User mistakes surface as gr.Error / gr.Warning messages, never as a
traceback; unexpected failures are logged on the server and shown as one line.
"""
from __future__ import annotations

import functools
import logging
import random

import gradio as gr

from ..models.model_sets import MODEL_SETS, gpu_seconds
from ..models.loading import ModelLoadError
from ..shapes.grammar import spec_from_caption
from .colors import METHOD_COLORS, tint
from .logic import (
    DEFAULT_GUIDANCE, GUIDANCE, N_GRID, ROLE_TITLE, SEED, STRIDE, STUDENT_STEPS, TEACHER_SAMPLERS, TEACHER_STEPS,
    Studio, StudioError, measured_note, public_text,
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
#examples button { white-space: normal; text-align: left; justify-content: flex-start; height: auto; font-weight: normal; }
.examples-label p { font-size: 0.9em; margin: 0; }
#history .grid-wrap { padding-top: 30px; }
#history .grid-container { grid-template-columns: repeat(auto-fill, minmax(210px, 1fr)) !important;
  grid-auto-rows: auto !important; }
#history .thumbnail-item { aspect-ratio: 3 / 1 !important; height: auto !important; }
@media (max-width: 640px) {
  .gradio-container { padding-left: 6px !important; padding-right: 6px !important; }
  #panels { flex-direction: column; }
  #eb-grid .icon-button-wrapper { display: none; }  /* they would cover the t labels of the small grid */
}
"""
_PUBLIC = [public_text]  # what a visitor may read of a message: build_ui puts its studio's path scrubber here


def _heldout_pair(prompt: str) -> str | None:
    """'yellow squares' for a caption whose (shape, colour) pair never appeared in training, else None."""
    try:
        if spec_from_caption(prompt).is_heldout:
            return " ".join(prompt.split()[2:4])
    except ValueError:
        pass
    return None


EXAMPLES_LABEL = ("Shapes prompts, shown whole; held-out pairs, never together in training: "
                  + ", ".join(filter(None, map(_heldout_pair, EXAMPLES))))


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


def _progress(progress: gr.Progress):
    return lambda fraction, desc: progress(fraction, desc=desc)


def _user_message(e: Exception) -> str:
    text = str(e) if isinstance(e, (StudioError, ModelLoadError, ValueError)) else \
        f"internal error ({type(e).__name__}: {str(e)[:200]}); see the server log"
    return _PUBLIC[0](text)


def build_ui(studio: Studio, *, train: bool = True) -> gr.Blocks:
    """The Blocks app; launch it with css=CSS (gradio 6 takes css and theme at launch)."""
    roles = ("teacher", "lcm", "splam")
    _PUBLIC[0] = studio.public

    def compare_outputs(r):
        images = [gr.Image(value=p.image, label=p.label()) for p in r.panels]
        captions = [p.caption() for p in r.panels]
        return images, captions

    # ZeroGPU runs each @gpu call in a forked worker: models load (and stay cached) in this process first, with
    # progress shown; only the sampling borrows the GPU, for a duration sized to the call.
    def px(teacher) -> int:
        pipe = studio.teacher(teacher)
        return pipe.unet.config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1)

    def compare_seconds(prompt, negative_prompt, seed, student_steps, teacher_steps, guidance_scale, sampler,
                        teacher, splam, lcm) -> int:  # spaces.GPU calls it with the task's arguments
        return gpu_seconds(px(teacher), _int(teacher_steps, TEACHER_STEPS) + 2 * _int(student_steps, STUDENT_STEPS) + 3)

    def error_bound_seconds(prompt, seed, stride, guidance_scale, teacher, splam, lcm) -> int:
        return gpu_seconds(px(teacher), N_GRID + 2 * (N_GRID // _int(stride, STRIDE) + 1) + 13)

    @gpu(duration=compare_seconds)
    def compare_on_gpu(prompt, negative_prompt, seed, student_steps, teacher_steps, guidance_scale, sampler,
                       teacher, splam, lcm):
        return studio.compare(prompt, negative_prompt, seed, student_steps, teacher_steps, guidance_scale, sampler,
                              teacher=teacher, splam=splam, lcm=lcm)

    @gpu(duration=error_bound_seconds)
    def error_bound_on_gpu(prompt, seed, stride, guidance_scale, teacher, splam, lcm):
        return studio.error_bound_plot(prompt, seed, stride, guidance_scale, teacher=teacher, splam=splam, lcm=lcm)

    @user_errors
    def api_compare(prompt, negative_prompt, seed, student_steps, teacher_steps, guidance_scale, sampler,
                    teacher, splam, lcm, progress=gr.Progress()):
        studio.load_models(teacher, splam, lcm, progress=_progress(progress))
        r = compare_on_gpu(prompt, negative_prompt, seed, student_steps, teacher_steps, guidance_scale, sampler,
                           teacher, splam, lcm)
        images, captions = compare_outputs(r)
        return (*images, *captions, r.summary() + _warn(r.notices))

    def on_compare(prompt, negative_prompt, seed, student_steps, teacher_steps, guidance_scale, sampler,
                   teacher, splam, lcm, show_diff, history, progress=gr.Progress()):
        """The page's Generate: a bad input names its field and keeps the previous results on screen."""
        try:
            studio.load_models(teacher, splam, lcm, progress=_progress(progress))
            r = compare_on_gpu(prompt, negative_prompt, seed, student_steps, teacher_steps, guidance_scale, sampler,
                               teacher, splam, lcm)
        except Exception as e:  # noqa: BLE001 - shown in the notice line; unexpected ones also logged
            if not isinstance(e, (StudioError, ModelLoadError, ValueError)):
                log.exception("compare failed")
            msg = _user_message(e)
            gr.Warning(msg)
            return (*(gr.skip(),) * 7, f"⚠️ {msg} (the results below are from the previous run)", gr.skip(),
                    gr.skip(), gr.skip())
        images, captions = compare_outputs(r)
        if show_diff:
            images[1:] = [gr.Image(value=p.heatmap, label=p.label() + " · difference") for p in r.panels[1:]]
        state = {p.role: p.image for p in r.panels} | {f"{p.role}-diff": p.heatmap for p in r.panels[1:]}
        history = [r.history_item(), *(history or [])][:24]
        notice = "".join(f"⚠️ {n}  \n" for n in r.notices)
        for n in r.notices:
            gr.Warning(n)
        return (*images, *captions, r.summary(), notice, state, history, history)

    def on_show_diff(show, images):
        images = images or {}
        out = []
        for role in ("lcm", "splam"):
            key = f"{role}-diff" if show else role
            out.append(images[key] if images.get(key) is not None else gr.skip())
        return out

    @user_errors
    def on_error_bound(prompt, seed, stride, guidance_scale, teacher, splam, lcm, progress=gr.Progress()):
        studio.load_models(teacher, splam, lcm, progress=_progress(progress))
        r = error_bound_on_gpu(prompt, seed, stride, guidance_scale, teacher, splam, lcm)
        return r.frame(), r.terms_frame(), r.grid_image(), r.summary() + _warn(r.notices)

    def on_slider(images, left, right):
        images = images or {}
        a, b = images.get(left.lower()), images.get(right.lower())
        return (a, b) if a is not None and b is not None else None

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

    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(f"# {TITLE}", elem_id="title")
        gr.Markdown(INTRO, elem_id="intro")
        status = studio.models_status()
        gr.Markdown(f"⚠️ {status}" if status else "", visible=bool(status))

        current = MODEL_SETS.get(studio.model_set)
        first_prompt = current.prompts[0] if current and current.prompts else EXAMPLES[0]
        with gr.Row():
            set_dd = gr.Dropdown([(m.title, m.name) for m in MODEL_SETS.values()], value=studio.model_set,
                                 label="Model set", info="a teacher with its LCM and SPLAM students; loaded on first "
                                 "use, then kept in memory", scale=2)
            set_about = gr.Markdown(_set_about(current), elem_id="model-set-about")
        with gr.Accordion("Models", open=False):
            with gr.Row():
                teacher_dd = gr.Dropdown(studio.menu("teacher"), value=studio.default("teacher"), label="Teacher",
                                         allow_custom_value=True, scale=3, min_width=220)
                splam_dd = gr.Dropdown(studio.menu("splam"), value=studio.default("splam"),
                                       label="SPLAM student", allow_custom_value=True, scale=3, min_width=220)
                lcm_dd = gr.Dropdown(studio.menu("lcm"), value=studio.default("lcm"), label="LCM student",
                                     allow_custom_value=True, scale=3, min_width=220)
                refresh = gr.Button("↻ Refresh list", scale=1, size="sm", min_width=120)
            gr.Markdown("Each menu lists only models of its role: runs under `weights/`, including the ones you "
                        "distil in the Train tab, tagged with the method they were trained with.")
            with gr.Accordion("SD1.5 setup (Hugging Face Hub ids)", open=False):
                gr.Markdown("Hub ids `owner/name`; they need network access (or a local Hugging Face cache). Local "
                            "folders can only be given on the command line: `python app.py --teacher PATH --splam "
                            "PATH --lcm PATH`.")
                with gr.Row():
                    hub_teacher = gr.Textbox(label="Teacher", placeholder="stable-diffusion-v1-5/stable-diffusion-v1-5")
                    hub_splam = gr.Textbox(label="SPLAM weights", placeholder="alimama-creative/slam-sd1.5")
                    hub_lcm = gr.Textbox(label="LCM weights", placeholder="SimianLuo/LCM_Dreamshaper_v7")
                load_btn = gr.Button("Load")
                load_status = gr.Markdown()
        model_inputs = [teacher_dd, splam_dd, lcm_dd]

        def on_model_set(name):
            if name not in MODEL_SETS:
                raise gr.Error(f"unknown model set {name!r}; choose one of {sorted(MODEL_SETS)}", print_exception=False)
            m = MODEL_SETS[name]
            first = m.prompts[0] if m.prompts else EXAMPLES[0]
            return (*menus((m.teacher, m.splam.repo, m.lcm.repo)), _set_about(m), first, first)
        refresh.click(lambda t, s, l: menus((t, s, l)), model_inputs, model_inputs, api_visibility="private")
        load_btn.click(on_load_hub, [hub_teacher, hub_splam, hub_lcm, *model_inputs], [*model_inputs, load_status],
                       api_visibility="private")

        with gr.Tab("Compare"):
            with gr.Row(elem_id="compare-row"):
                with gr.Column(scale=1, min_width=280, elem_id="controls"):
                    prompt = gr.Textbox(label="Prompt", value=first_prompt, lines=3, elem_id="prompt")
                    go = gr.Button("Generate", variant="primary", elem_id="generate")
                    notice = gr.Markdown(elem_id="compare-notice")
                    with gr.Accordion("Settings", open=False):
                        with gr.Row():
                            seed = gr.Number(label="Seed", value=0, precision=0, min_width=120, elem_id="seed",
                                             info=f"{SEED[0]}-{SEED[1]}; the same noise for all three panels")
                            dice = gr.Button("Random seed", size="sm", min_width=100)
                        student_steps = gr.Slider(*STUDENT_STEPS, value=2, step=1, label="Student steps (LCM, SPLAM)")
                        teacher_steps = gr.Slider(*TEACHER_STEPS, value=25, step=1, label="Teacher steps")
                        guidance = gr.Slider(*GUIDANCE, value=DEFAULT_GUIDANCE, step=0.5,
                                             label="Teacher guidance (CFG)")
                        sampler = gr.Radio(list(TEACHER_SAMPLERS), value="ddim", label="Teacher sampler")
                        negative = gr.Textbox(label="Negative prompt (teacher only)", info=NEGATIVE_INFO, lines=1)
                with gr.Column(scale=3, min_width=300, elem_id="results"):
                    with gr.Row(equal_height=True, elem_id="panels"):
                        panels, captions = [], []
                        for role in roles:
                            with gr.Column(min_width=160):
                                panels.append(gr.Image(label=ROLE_TITLE[role], type="pil", height=320,
                                                       interactive=False, elem_classes="panel",
                                                       elem_id=f"panel-{role}"))
                                captions.append(gr.Markdown(elem_classes="panel-caption", elem_id=f"caption-{role}"))
                    show_diff = gr.Checkbox(label="Show each student's difference to the teacher as a heat map "
                                                  "(black = same pixel, yellow = the largest difference of the two)",
                                            value=False, elem_id="show-diff")
                    summary = gr.Markdown(elem_id="summary")
            history = gr.Gallery(label="History (teacher | LCM | SPLAM, newest first)", columns=4, rows=1,
                                 height=170, object_fit="contain", allow_preview=False, elem_id="history",
                                 elem_classes="panel")
            history_state = gr.State([])
            images_state = gr.State({})
            gr.Markdown(EXAMPLES_LABEL, elem_classes="examples-label")
            with gr.Row(elem_id="examples"):  # buttons, not gr.Examples: those cut a caption at 60 characters
                for text in EXAMPLES:
                    gr.Button(text, size="sm", min_width=240).click(
                        lambda t=text: t, None, prompt, api_visibility="private", queue=False)
            with gr.Accordion("A/B slider", open=False):
                with gr.Row():
                    left = gr.Dropdown([ROLE_TITLE[r] for r in roles], value="LCM", label="Left", scale=1)
                    right = gr.Dropdown([ROLE_TITLE[r] for r in roles], value="SPLAM", label="Right", scale=1)
                slider = gr.ImageSlider(label="Drag to compare", type="pil", height=360, elem_classes="panel")
            api_button = gr.Button(visible=False)  # the named endpoint: the same call, errors raised to the client
        dice.click(lambda: random.randint(*SEED), None, seed, api_visibility="private", queue=False)
        compare_inputs = [prompt, negative, seed, student_steps, teacher_steps, guidance, sampler, *model_inputs]
        go.click(on_compare, [*compare_inputs, show_diff, history_state],
                 [*panels, *captions, summary, notice, images_state, history_state, history],
                 api_visibility="private", concurrency_id="generate",
                 ).then(on_slider, [images_state, left, right], slider, api_visibility="private")
        api_button.click(api_compare, compare_inputs, [*panels, *captions, summary], api_name="compare",
                         concurrency_id="generate")
        show_diff.change(on_show_diff, [show_diff, images_state], panels[1:], api_visibility="private", queue=False)
        for dd in (left, right):
            dd.change(on_slider, [images_state, left, right], slider, api_visibility="private")

        with gr.Tab("Error bound"):
            gr.Markdown("Along the teacher's guided DDIM trajectory z_T … z_0 (50-step grid), the error of a student's "
                        "one-jump estimate is bounded by a sum over sub-paths of length k: "
                        "|F(z_t) − z_0| ≤ Σ |F(z_t′) − F(z_t′−k)|. SPLAM aims to shrink each term. "
                        "Cost: the teacher trajectory (50 guided steps) is computed once per teacher, prompt, seed and "
                        "guidance and then reused; a larger stride means fewer student evaluations (50 / stride + 1 "
                        "each), which matters at 512 px. "
                        "Colours: " + " · ".join(f"<span style='color:{METHOD_COLORS[m]}'>■ {ROLE_TITLE[m]}</span>"
                                                 for m in ("lcm", "splam")) + " (lighter: real error).")
            if (note := measured_note()):
                gr.Markdown(note, elem_id="error-bound-measured")
            with gr.Row(equal_height=True):
                eb_prompt = gr.Textbox(label="Prompt", value=first_prompt, scale=4, min_width=240)
                eb_seed = gr.Number(label="Seed", value=0, precision=0, scale=1, min_width=100)
                eb_stride = gr.Slider(*STRIDE, value=1, step=1, label="Sub-path stride (k = 20 × stride)", scale=2,
                                      min_width=200)
                eb_guidance = gr.Slider(*GUIDANCE, value=DEFAULT_GUIDANCE, step=0.5, label="Teacher guidance (CFG)",
                                        scale=2, min_width=200)
            eb_go = gr.Button("Compute error bound", variant="primary", elem_id="eb-go")
            eb_summary = gr.Markdown(elem_id="eb-summary")
            colors = {f"{n} {kind}": (METHOD_COLORS[n.lower()] if kind != "error" else tint(METHOD_COLORS[n.lower()]))
                      for n in ("LCM", "SPLAM") for kind in ("bound", "error", "term")}
            with gr.Row():
                eb_plot = gr.LinePlot(x="t", y="rms", color="series", title="Bound (sum of terms) vs real error",
                                      x_title="t (timestep)", y_title="RMS in latent space", height=320,
                                      color_map={k: v for k, v in colors.items() if not k.endswith("term")},
                                      min_width=300, elem_id="eb-plot")
                eb_terms = gr.LinePlot(x="t", y="rms", color="series", title="Per-sub-path terms |F(z_t′) − F(z_t′−k)|",
                                       x_title="t′ (timestep)", y_title="RMS in latent space", height=320,
                                       color_map={k: v for k, v in colors.items() if k.endswith("term")},
                                       min_width=300, elem_id="eb-terms")
            gr.Markdown("**Decoded F(z_t) along the trajectory**: one row per student, the same t above each other; "
                        "the teacher's final image z_0 on the right.")
            eb_grid = gr.Image(show_label=False, type="pil", interactive=False, elem_classes="panel",
                               elem_id="eb-grid")
        eb_go.click(on_error_bound, [eb_prompt, eb_seed, eb_stride, eb_guidance, *model_inputs],
                    [eb_plot, eb_terms, eb_grid, eb_summary], api_name="error_bound", concurrency_id="generate")

        set_dd.change(on_model_set, set_dd, [*model_inputs, set_about, prompt, eb_prompt], api_name="model_set")
        if train:
            train_tab(studio, demo, model_inputs, menus)
    return demo


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
