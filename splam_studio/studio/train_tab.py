"""The studio's Train tab: distil a student from a listed teacher in a `python -m splam_studio.training` subprocess
(`launcher.Trainer`), followed every TRAIN_POLL_S seconds.

Before Start the page states the recipe the run will use and why (`launcher.recipe`: the `shapes` preset for the
embedded Shapes teacher, `sd15` with SPLAM's measured gamma sampling for any other). The data is the Shapes generator,
a folder or prompts file allowed on the command line, or prompts typed in the Prompts box (the teacher makes its own
images first). A bad input is one notice line; the other outputs keep what they show.
"""
from __future__ import annotations

import logging

import gradio as gr

from ..models.loading import ModelLoadError
from .launcher import (IMAGES_PER_PROMPT, MAX_PROMPTS, MAX_PROMPTS_CHARS, METHODS, TRAIN_BATCH, TYPED_PROMPTS,
                       TrainStatus, format_duration, recipe)
from .logic import Studio, StudioError

log = logging.getLogger("splam_studio.studio.train_tab")
TRAIN_POLL_S = 2.0
VALIDATION_CAPTIONS = 4  # the trainer validates on this many of the run's own captions (training.loop)
INTRO = ("Distil your own student. The run is a `python -m splam_studio.training` subprocess (one at a time); its "
         "checkpoint lands in `weights/<run name>/` and then appears in the model lists. A batch larger than the data "
         "set shrinks to fit.")
PROMPTS_INFO = (f"with Data '{TYPED_PROMPTS}': one prompt a line, or JSON lines {{\"prompt\": ..., "
                f"\"negative_prompt\": ...}}; at most {MAX_PROMPTS} prompts. The teacher makes its own images from them "
                "before the first step (no image data needed)")


def _owner(request: gr.Request | None) -> str | None:
    """The browser session a Train-tab call comes from: runs belong to it (launcher.Trainer, on a shared server)."""
    return getattr(request, "session_hash", None) if request is not None else None


def _message(studio: Studio, e: Exception) -> str:
    """One line for the notice: a user mistake as its message, anything else as its type (the server logs it)."""
    if isinstance(e, (StudioError, ModelLoadError, ValueError)):
        return studio.public(str(e))
    return studio.public(f"internal error ({type(e).__name__}: {str(e)[:200]}); see the server log")


def recipe_note(studio: Studio, teacher, data, method) -> str:
    """What Start would run, in words: the recipe for the chosen teacher and why, and where validation prompts and
    images come from."""
    try:
        _kind, source = studio.resolve(teacher, "teacher")
    except StudioError as e:
        return f"⚠️ {studio.public(str(e))}"
    r = recipe(source, studio.weights)
    flags = f" with `{' '.join(r.flags)}`" if r.flags else ""
    lines = [f"**Recipe: preset `{r.preset}`{flags}**: {r.why}."]
    if method == "lcm":
        lines[0] += " p(gamma = 1) acts on SPLAM only; LCM trains at gamma = 1."
    trainer = studio.trainer
    if data == "shapes":
        val = ("the preset's Shapes prompts" if r.preset == "shapes"
               else f"the first {VALIDATION_CAPTIONS} Shapes captions")
        lines.append(f"**Data**: the Shapes generator. **Validation**: {val}.")
    elif data == TYPED_PROMPTS or trainer.prompts_file(data) is not None:
        src = "the Prompts box" if data == TYPED_PROMPTS else f"the prompts file `{data}`"
        lines.append(f"**Data**: the teacher makes its own images from {src} (guided DDIM at the recipe's w, the "
                     "images per prompt below) before the first step; the log shows its progress. **Validation**: "
                     f"the first {VALIDATION_CAPTIONS} prompts.")
    else:
        lines.append(f"**Data**: the folder `{data}`, at the recipe's resolution. **Validation**: the first "
                     f"{VALIDATION_CAPTIONS} distinct captions of the folder (none when its images have no captions).")
    return "  \n".join(lines)


def validation_note(s: TrainStatus) -> str:
    """Why the Validation panel is empty, when it is; '' when it shows grids."""
    if s.validation:
        return ""
    if s.state in ("idle", "busy"):
        return "Validation grids appear here during a run (rows: 1, 2, 4 steps; one column per validation prompt)."
    if s.validation_prompts is None:
        return ("No validation grid yet: the run has not started training (it is loading the teacher and the data)."
                if s.running else "No validation grid: the run ended before it started training.")
    if not s.validation_prompts:
        return ("No validation grid: the run has no validation prompts (its data gave no captions to take them from: "
                "images without captions, or shards that cannot be read ahead).")
    first = f"step {s.validate_every}" if s.validate_every else "the end"
    if s.running:
        return f"No validation grid yet: the first comes at {first} (and one at the end)."
    return f"No validation grid: the run ended before its first validation ({first})."


def view(s: TrainStatus) -> tuple:
    """Every Train-tab output for status `s` (also after a page reload): text, chart, grids, their note, log, buttons."""
    speed = f"{s.it_s:.2f} it/s · ETA {format_duration(s.eta_s)}" if s.running and s.it_s else ""
    gallery = [(str(p), c) for p, c in s.validation]
    busy = s.state == "busy"  # another visitor's run holds the server's training slot
    return (s.message, speed, s.loss_frame(), gallery, validation_note(s), s.log_tail,
            gr.Button(interactive=not s.running and not busy), gr.Button(interactive=s.running),
            gr.Timer(active=s.running or busy))


N_VIEW = 9  # outputs of view()


def train_tab(studio: Studio, demo: gr.Blocks, model_inputs: list, menus) -> None:
    """The Train tab inside `demo` (call it within the Blocks, after the Models menus `model_inputs`)."""
    trainer = studio.trainer

    def on_start(teacher, data, method, steps, batch_size, run_name, prompts, images_per_prompt,
                 request: gr.Request):
        """Start: a bad input is one notice line (and a toast); every other output keeps what it shows."""
        try:
            msg = studio.start_training(teacher, data, method, steps, run_name, batch_size, owner=_owner(request),
                                        prompts=prompts, images_per_prompt=images_per_prompt)
        except Exception as e:  # noqa: BLE001 - one line on the page; unexpected ones also logged on the server
            if not isinstance(e, (StudioError, ModelLoadError, ValueError)):
                log.exception("train start failed")
            text = _message(studio, e)
            gr.Warning(text)
            return (*(gr.skip(),) * N_VIEW, f"⚠️ {text}")
        gr.Info(msg)
        return (*view(trainer.status(_owner(request))), msg)

    def on_stop(request: gr.Request):
        msg = trainer.stop(owner=_owner(request))  # "Stopping ..." shows in the status line; a refusal as the notice
        return (*view(trainer.status(_owner(request))), "" if msg.startswith("Stopping") else msg)

    def on_load(request: gr.Request):
        return view(trainer.status(_owner(request)))

    def listed():
        return [studio.menu(role) for role in ("teacher", "splam", "lcm")]

    def on_poll(seen, teacher, splam, lcm, request: gr.Request):
        s = trainer.status(_owner(request))
        now = listed()  # a run enters the menus when its student is exported, at the end
        lists = menus((teacher, splam, lcm)) if now != seen else (gr.skip(),) * 3
        return (*view(s), now, *lists)

    with gr.Tab("Train"):
        gr.Markdown(INTRO)
        with gr.Row():
            t_teacher = gr.Dropdown(studio.menu("teacher"), value=studio.default("teacher"), label="Teacher",
                                    min_width=200)
            t_data = gr.Dropdown([*trainer.data_choices(), TYPED_PROMPTS], value="shapes", label="Data", min_width=200,
                                 info="'shapes', prompts typed below, or a folder or prompts file allowed on the "
                                      "command line (--data-dir NAME=PATH)")
            t_method = gr.Radio(list(METHODS), value="splam", label="Method", min_width=160)
        with gr.Row():
            t_prompts = gr.Textbox(label="Prompts", lines=4, max_lines=12, max_length=MAX_PROMPTS_CHARS,
                                   placeholder="one large red circle at the left on a black background",
                                   info=PROMPTS_INFO, scale=3, min_width=240, elem_id="train-prompts")
            t_images = gr.Number(label="Images per prompt", value=4, precision=0, minimum=IMAGES_PER_PROMPT[0],
                                 maximum=IMAGES_PER_PROMPT[1], scale=1, min_width=120, elem_id="train-images",
                                 info=f"{IMAGES_PER_PROMPT[0]}-{IMAGES_PER_PROMPT[1]}, with prompts")
        with gr.Row():
            t_steps = gr.Number(label="Steps", value=200, precision=0, minimum=1, min_width=120)
            t_batch = gr.Slider(*TRAIN_BATCH, value=32, step=1, label="Batch size", min_width=200)
            t_name = gr.Textbox(label="Run name", placeholder="my-splam (default: <method>-<time>)", min_width=200)
        t_recipe = gr.Markdown(recipe_note(studio, studio.default("teacher"), "shapes", "splam"),
                               elem_id="train-recipe")
        with gr.Row():
            start = gr.Button("Start", variant="primary", elem_id="train-start")
            stop = gr.Button("Stop", variant="stop", interactive=False, elem_id="train-stop")
        t_notice = gr.Markdown(elem_id="train-notice")
        t_status = gr.Markdown(elem_id="train-status")
        t_speed = gr.Markdown(elem_id="train-speed")
        with gr.Row():
            t_loss = gr.LinePlot(x="step", y="loss", title="Training loss", x_title="step", y_title="loss",
                                 height=280, min_width=300, elem_id="train-loss")
            with gr.Column(min_width=300):
                t_val = gr.Gallery(label="Validation samples (rows: 1, 2, 4 steps)", columns=2, height=280,
                                   elem_classes="panel", elem_id="train-validation")
                t_val_note = gr.Markdown(elem_id="train-validation-note")
        t_log = gr.Textbox(label="Log (tail)", lines=8, max_lines=8, autoscroll=True)
        runs_seen = gr.State(listed())
        timer = gr.Timer(TRAIN_POLL_S, active=False)
        outputs = [t_status, t_speed, t_loss, t_val, t_val_note, t_log, start, stop, timer]
        assert len(outputs) == N_VIEW
        choices = [t_teacher, t_data, t_method]
        for c in choices:
            c.change(lambda t, d, m: recipe_note(studio, t, d, m), choices, t_recipe, api_visibility="private",
                     queue=False)
        t_prompts.input(lambda text, d: TYPED_PROMPTS if (text or "").strip() else d, [t_prompts, t_data], t_data,
                        api_visibility="private", queue=False)  # typing prompts picks them as the data
        start.click(on_start, [*choices, t_steps, t_batch, t_name, t_prompts, t_images], [*outputs, t_notice],
                    api_visibility="private")
        stop.click(on_stop, None, [*outputs, t_notice], api_visibility="private")
        timer.tick(on_poll, [runs_seen, *model_inputs], [*outputs, runs_seen, *model_inputs],
                   api_visibility="private", show_progress="hidden")
        demo.load(on_load, None, outputs, api_visibility="private")
