"""The studio's Gradio layout: Compare, Error bound and Train tabs over a `Studio` (all logic lives there).

Named API endpoints: /compare and /error_bound. User mistakes surface as gr.Error / gr.Warning messages, never as a
traceback; unexpected failures are logged on the server and shown as one line.
"""
from __future__ import annotations

import functools
import logging
import random

import gradio as gr

from .model_sets import MODEL_SETS, gpu_seconds
from .models import ModelLoadError
from .shapes import spec_from_caption
from .studio import (
    DEFAULT_GUIDANCE, GUIDANCE, METHODS, N_GRID, ROLE_TITLE, SEED, STRIDE, STUDENT_STEPS, TEACHER_SAMPLERS,
    TEACHER_STEPS, TRAIN_BATCH, Studio, StudioError,
)

log = logging.getLogger("splam_studio.ui")

try:  # Hugging Face ZeroGPU: borrow a GPU for the duration of a call; a no-op everywhere else
    import spaces

    gpu = spaces.GPU
except ImportError:
    def gpu(fn=None, **_kwargs):
        return fn if fn is not None else (lambda f: f)

TITLE = "SPLAM Studio"
INTRO = ("**SPLAM** (Sub-Path Linear Approximation Model, ECCV 2024) distils a diffusion teacher into a 1-4 step "
         "generator by learning along short linear sub-paths of the teacher's ODE; **LCM**, the baseline, is the same "
         "distillation without them. Same prompt, same initial noise: teacher, LCM and SPLAM side by side.")
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
.panel-caption { font-size: 0.85em; min-height: 3.2em; }
#title { margin-bottom: 0; }
"""


def _example_label(prompt: str) -> str:
    try:
        heldout = spec_from_caption(prompt).is_heldout
    except ValueError:
        heldout = False
    return prompt + ("  (held-out pair)" if heldout else "")


def user_errors(fn):
    """StudioError / ModelLoadError / ValueError -> gr.Error with its message; anything else -> one logged line."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except (StudioError, ModelLoadError, ValueError) as e:
            raise gr.Error(str(e), print_exception=False) from None
        except Exception as e:  # noqa: BLE001 - the server log keeps the traceback, the user gets one line
            log.exception("studio call failed")
            raise gr.Error(f"internal error ({type(e).__name__}: {str(e)[:200]}); see the server log") from None
    return wrapper


def _warn(notices: list[str]) -> str:
    for n in notices:
        gr.Warning(n)
    return "".join(f"\n\n⚠️ {n}" for n in notices)


def _progress(progress: gr.Progress):
    return lambda fraction, desc: progress(fraction, desc=desc)


def build_ui(studio: Studio, *, train: bool = True) -> gr.Blocks:
    """The Blocks app; launch it with css=CSS (gradio 6 takes css and theme at launch)."""
    roles = ("teacher", "lcm", "splam")

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
    @user_errors
    def compare_on_gpu(prompt, negative_prompt, seed, student_steps, teacher_steps, guidance_scale, sampler,
                       teacher, splam, lcm):
        return studio.compare(prompt, negative_prompt, seed, student_steps, teacher_steps, guidance_scale, sampler,
                              teacher=teacher, splam=splam, lcm=lcm, progress=_progress(gr.Progress()))

    @gpu(duration=error_bound_seconds)
    @user_errors
    def error_bound_on_gpu(prompt, seed, stride, guidance_scale, teacher, splam, lcm):
        return studio.error_bound_plot(prompt, seed, stride, guidance_scale, teacher=teacher, splam=splam, lcm=lcm,
                                       progress=_progress(gr.Progress()))

    @user_errors
    def on_compare(prompt, negative_prompt, seed, student_steps, teacher_steps, guidance_scale, sampler,
                   teacher, splam, lcm, progress=gr.Progress()):
        studio.load_models(teacher, splam, lcm, progress=_progress(progress))
        r = compare_on_gpu(prompt, negative_prompt, seed, student_steps, teacher_steps, guidance_scale, sampler,
                           teacher, splam, lcm)
        images = [gr.Image(value=p.image, label=p.label()) for p in r.panels]
        captions = [p.caption() for p in r.panels]
        return (*images, *captions, r.summary() + _warn(r.notices), {p.role: p.image for p in r.panels})

    @user_errors
    def on_error_bound(prompt, seed, stride, guidance_scale, teacher, splam, lcm, progress=gr.Progress()):
        studio.load_models(teacher, splam, lcm, progress=_progress(progress))
        r = error_bound_on_gpu(prompt, seed, stride, guidance_scale, teacher, splam, lcm)
        return r.frame(), r.terms_frame(), r.thumbnails, r.summary() + _warn(r.notices)

    def on_slider(images, left, right):
        images = images or {}
        a, b = images.get(left.lower()), images.get(right.lower())
        return (a, b) if a is not None and b is not None else None

    def model_updates():
        return (gr.Dropdown(choices=studio.teacher_choices()), gr.Dropdown(choices=studio.student_choices("splam")),
                gr.Dropdown(choices=studio.student_choices("lcm")))

    @user_errors
    def on_load_hub(teacher_id, splam_id, lcm_id, teacher, splam, lcm, progress=gr.Progress()):
        teacher, splam, lcm = (teacher_id.strip() or teacher, splam_id.strip() or splam, lcm_id.strip() or lcm)
        try:
            msg = studio.load_models(teacher, splam, lcm, progress=_progress(progress))
        except (StudioError, ModelLoadError) as e:
            gr.Warning(str(e))
            return gr.skip(), gr.skip(), gr.skip(), f"⚠️ {e}"
        t_choices, s_choices, l_choices = (studio.teacher_choices(), studio.student_choices("splam"),
                                           studio.student_choices("lcm"))
        return (gr.Dropdown(choices=_with(t_choices, teacher), value=teacher),
                gr.Dropdown(choices=_with(s_choices, splam), value=splam),
                gr.Dropdown(choices=_with(l_choices, lcm), value=lcm), f"✅ {msg}")

    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(f"# {TITLE}", elem_id="title")
        gr.Markdown(INTRO)
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
                teacher_dd = gr.Dropdown(studio.teacher_choices(), value=studio.default("teacher"), label="Teacher",
                                         allow_custom_value=True, scale=3)
                splam_dd = gr.Dropdown(studio.student_choices("splam"), value=studio.default("splam"),
                                       label="SPLAM student", allow_custom_value=True, scale=3)
                lcm_dd = gr.Dropdown(studio.student_choices("lcm"), value=studio.default("lcm"), label="LCM student",
                                     allow_custom_value=True, scale=3)
                refresh = gr.Button("↻ Refresh list", scale=1, size="sm")
            gr.Markdown("Runs under `weights/` are listed here, including the ones you distil in the Train tab.")
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
            return (gr.Dropdown(choices=_with(studio.teacher_choices(), m.teacher), value=m.teacher),
                    gr.Dropdown(choices=_with(studio.student_choices("splam"), m.splam.repo), value=m.splam.repo),
                    gr.Dropdown(choices=_with(studio.student_choices("lcm"), m.lcm.repo), value=m.lcm.repo),
                    _set_about(m), first, first)
        refresh.click(model_updates, None, model_inputs, api_visibility="private")
        load_btn.click(on_load_hub, [hub_teacher, hub_splam, hub_lcm, *model_inputs], [*model_inputs, load_status],
                       api_visibility="private")

        with gr.Tab("Compare"):
            with gr.Row():
                prompt = gr.Textbox(label="Prompt", value=first_prompt, lines=2, scale=3, max_length=2000)
                negative = gr.Textbox(label="Negative prompt (teacher only)", info=NEGATIVE_INFO, lines=2, scale=2)
            with gr.Row():
                with gr.Column(scale=2, min_width=140):
                    seed = gr.Number(label="Seed", value=0, precision=0, minimum=SEED[0], maximum=SEED[1])
                    dice = gr.Button("Random seed", size="sm")
                student_steps = gr.Slider(*STUDENT_STEPS, value=2, step=1, label="Student steps (LCM, SPLAM)", scale=3)
                teacher_steps = gr.Slider(*TEACHER_STEPS, value=25, step=1, label="Teacher steps", scale=3)
                guidance = gr.Slider(*GUIDANCE, value=DEFAULT_GUIDANCE, step=0.5, label="Teacher guidance (CFG)", scale=3)
                sampler = gr.Radio(list(TEACHER_SAMPLERS), value="ddim", label="Teacher sampler", scale=2)
            go = gr.Button("Generate", variant="primary", elem_id="generate")
            gr.Examples([[p] for p in EXAMPLES], inputs=[prompt], example_labels=[_example_label(p) for p in EXAMPLES],
                        label="Shapes prompts (held-out pairs never appeared together in training)")
            with gr.Row(equal_height=True):
                panels, captions = [], []
                for role in roles:
                    with gr.Column(min_width=200):
                        panels.append(gr.Image(label=ROLE_TITLE[role], type="pil", height=300, interactive=False,
                                               elem_classes="panel", elem_id=f"panel-{role}"))
                        captions.append(gr.Markdown(elem_classes="panel-caption", elem_id=f"caption-{role}"))
            summary = gr.Markdown()
            images_state = gr.State({})
            with gr.Accordion("A/B slider", open=True):
                with gr.Row():
                    left = gr.Dropdown([ROLE_TITLE[r] for r in roles], value="LCM", label="Left", scale=1)
                    right = gr.Dropdown([ROLE_TITLE[r] for r in roles], value="SPLAM", label="Right", scale=1)
                slider = gr.ImageSlider(label="Drag to compare", type="pil", height=360, elem_classes="panel")
        dice.click(lambda: random.randint(*SEED), None, seed, api_visibility="private", queue=False)
        go.click(on_compare, [prompt, negative, seed, student_steps, teacher_steps, guidance, sampler, *model_inputs],
                 [*panels, *captions, summary, images_state], api_name="compare", concurrency_id="generate",
                 ).then(on_slider, [images_state, left, right], slider, api_visibility="private")
        for dd in (left, right):
            dd.change(on_slider, [images_state, left, right], slider, api_visibility="private")

        with gr.Tab("Error bound"):
            gr.Markdown("Along the teacher's guided DDIM trajectory z_T … z_0 (50-step grid), the error of a student's "
                        "one-jump estimate is bounded by a sum over sub-paths of length k: "
                        "|F(z_t) − z_0| ≤ Σ |F(z_t′) − F(z_t′−k)|. SPLAM aims to shrink each term. "
                        "Cost: the teacher trajectory is 50 guided steps, computed once per teacher, prompt, seed and "
                        "guidance and then reused (changing the stride only re-runs the students); at 512 px a larger "
                        "stride also means fewer student evaluations (50 / stride + 1 per student).")
            with gr.Row(equal_height=True):
                eb_prompt = gr.Textbox(label="Prompt", value=first_prompt, scale=4)
                eb_seed = gr.Number(label="Seed", value=0, precision=0, minimum=SEED[0], maximum=SEED[1], scale=1)
                eb_stride = gr.Slider(*STRIDE, value=1, step=1, label="Sub-path stride (k = 20 × stride)", scale=2)
                eb_guidance = gr.Slider(*GUIDANCE, value=DEFAULT_GUIDANCE, step=0.5, label="Teacher guidance (CFG)",
                                        scale=2)
            eb_go = gr.Button("Compute error bound", variant="primary")
            with gr.Row():
                eb_plot = gr.LinePlot(x="t", y="rms", color="series", title="Bound (sum of terms) vs real error",
                                      x_title="t (timestep)", y_title="RMS in latent space", height=320)
                eb_terms = gr.LinePlot(x="t", y="rms", color="series", title="Per-sub-path terms |F(z_t′) − F(z_t′−k)|",
                                       x_title="t′ (timestep)", y_title="RMS in latent space", height=320)
            eb_summary = gr.Markdown()
            eb_gallery = gr.Gallery(label="Decoded F(z_t) along the trajectory", columns=7, height="auto",
                                    elem_classes="panel")
        eb_go.click(on_error_bound, [eb_prompt, eb_seed, eb_stride, eb_guidance, *model_inputs],
                    [eb_plot, eb_terms, eb_gallery, eb_summary], api_name="error_bound", concurrency_id="generate")

        set_dd.change(on_model_set, set_dd, [*model_inputs, set_about, prompt, eb_prompt], api_name="model_set")
        if train:
            _train_tab(studio, model_inputs)
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


def _with(choices: list[str], value: str) -> list[str]:
    return choices if value in choices else [*choices, value]


def _train_tab(studio: Studio, model_inputs: list) -> None:
    trainer = studio.trainer

    @user_errors
    def on_start(teacher, data, method, steps, batch_size, run_name):
        msg = studio.start_training(teacher, data, method, steps, run_name, batch_size)
        gr.Info(msg)
        return msg, gr.Timer(active=True)

    def on_stop():
        return trainer.stop()

    def on_poll(last_state):
        s = trainer.status()
        finished = s.state not in ("running", "stopping")
        refresh = finished and last_state in ("running", "stopping")
        lists = ((gr.Dropdown(choices=studio.teacher_choices()), gr.Dropdown(choices=studio.student_choices("splam")),
                  gr.Dropdown(choices=studio.student_choices("lcm"))) if refresh else (gr.skip(),) * 3)
        gallery = [(str(p), c) for p, c in s.validation]
        return (s.message, s.loss_frame(), gallery, s.log_tail, s.state, gr.Timer(active=not finished), *lists)

    with gr.Tab("Train"):
        gr.Markdown("Distil your own student. The run is a `train_cli.py` subprocess (one at a time); its checkpoint "
                    "lands in `weights/<run name>/` and then appears in the model lists.")
        with gr.Row():
            t_teacher = gr.Dropdown(studio.teacher_choices(), value=studio.default("teacher"), label="Teacher")
            t_data = gr.Dropdown(trainer.data_choices(), value="shapes", label="Data",
                                 info="'shapes' or a folder allowed on the command line (--data-dir NAME=PATH)")
            t_method = gr.Radio(list(METHODS), value="splam", label="Method")
        with gr.Row():
            t_steps = gr.Number(label="Steps", value=200, precision=0, minimum=1)
            t_batch = gr.Slider(*TRAIN_BATCH, value=32, step=1, label="Batch size")
            t_name = gr.Textbox(label="Run name", placeholder="my-splam (default: <method>-<time>)")
        with gr.Row():
            start = gr.Button("Start", variant="primary")
            stop = gr.Button("Stop", variant="stop")
        t_status = gr.Markdown(trainer.status().message)
        with gr.Row():
            t_loss = gr.LinePlot(x="step", y="loss", title="Training loss", height=280)
            t_val = gr.Gallery(label="Validation samples (rows: 1, 2, 4 steps)", columns=2, height=280,
                               elem_classes="panel")
        t_log = gr.Textbox(label="Log (tail)", lines=8, max_lines=8, autoscroll=True)
        last_state = gr.State("idle")
        timer = gr.Timer(2.0, active=False)
        start.click(on_start, [t_teacher, t_data, t_method, t_steps, t_batch, t_name], [t_status, timer],
                    api_visibility="private")
        stop.click(on_stop, None, t_status, api_visibility="private")
        timer.tick(on_poll, last_state, [t_status, t_loss, t_val, t_log, last_state, timer, *model_inputs],
                   api_visibility="private", show_progress="hidden")
