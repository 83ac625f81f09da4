"""Honest latency in Studio.compare: interleaved rounds, warm-up excluded, the students' overlap said in words,
UNet calls per image beside the times. Fake clocks and timings only: no assertion on wall time."""
from __future__ import annotations

import pytest
import torch

from splam_studio.models.generation import generate
from splam_studio.studio.logic import Panel, Studio, interleaved, latency_verdict, unet_calls
from tests.test_app import PROMPT, make_fake_weights

torch.set_num_threads(1)


class FakeClock:
    """A clock that each timed call advances by its programmed duration (seconds)."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_interleaved_runs_round_robin_and_keeps_warm_up_apart():
    clock, calls = FakeClock(), []
    durations = {"teacher": iter([9.0, 1.0, 1.2, 1.1]), "lcm": iter([5.0, 0.10, 0.12, 0.11]),
                 "splam": iter([5.0, 0.11, 0.10, 0.13])}

    def fn(key):
        def run():
            calls.append(key)
            clock.now += next(durations[key])
            return f"{key}-{len(calls)}"
        return run

    stages = []
    t = interleaved({k: fn(k) for k in ("teacher", "lcm", "splam")}, 3, warmup=1, clock=clock, sync=lambda: None,
                    on_call=lambda i, r, k: stages.append((i, r, k)))
    assert calls == ["teacher", "lcm", "splam"] * 4  # round-robin, never one panel's runs back to back
    assert stages == [(i, i // 3, k) for i, k in enumerate(calls)]
    assert t.warmup == {"teacher": [9000.0], "lcm": [5000.0], "splam": [5000.0]}  # the first round, not counted
    assert t.runs["teacher"] == pytest.approx([1000, 1200, 1100])
    assert t.runs["splam"] == pytest.approx([110, 100, 130])
    assert t.outputs == {"teacher": "teacher-1", "lcm": "lcm-2", "splam": "splam-3"}  # the first call's output


def _student(role, runs, calls=2):
    return Panel(role, f"m-{role}", "lcm", 2, 0, 1.0, sorted(runs)[len(runs) // 2], None, latency_runs=runs,
                 unet_calls=calls)


def test_latency_verdict_says_when_the_difference_is_noise():
    lcm, splam = _student("lcm", [148, 820, 130]), _student("splam", [122, 150, 160])
    text = latency_verdict(lcm, splam, True)
    assert text.startswith("LCM and SPLAM: same architecture and UNet calls; their times overlap")
    assert "so the difference is noise" in text and "130–820 ms" in text and "122–160 ms" in text
    apart = latency_verdict(_student("lcm", [100, 104, 102]), _student("splam", [150, 155, 160]), True)
    assert "LCM is faster by 53 ms and the times do not overlap" in apart and "not from the method" in apart
    assert "noise" not in apart
    other = latency_verdict(_student("lcm", [100, 104, 102]), _student("splam", [101, 103, 99], calls=4), True)
    assert "same architecture" not in other and "cannot tell them apart" in other  # other work per image
    assert "too few" in latency_verdict(_student("lcm", [100]), _student("splam", [300]), True)


def test_unet_calls_count_what_the_pipeline_evaluates(tmp_path):
    studio = Studio(make_fake_weights(tmp_path / "weights"))
    pipe = studio.teacher("shapes-teacher")
    student = studio.student("shapes-splam", "shapes-teacher", "splam")
    seen = []

    def count(module, args, kwargs):
        seen.append(args[0].shape[0])  # a CFG pair is one call of batch 2: two images' work

    for unet, sampler, steps, guidance in ((pipe.unet, "ddim", 3, 7.5), (pipe.unet, "dpm++", 4, 7.5),
                                           (pipe.unet, "ddim", 3, 1.0), (student, "lcm", 2, 1.0)):
        seen.clear()
        handle = unet.register_forward_pre_hook(count, with_kwargs=True)
        try:
            generate(pipe, prompt=[PROMPT], sampler=sampler, steps=steps, seed=0, guidance_scale=guidance,
                     unet=None if unet is pipe.unet else unet)
        finally:
            handle.remove()
        role = "teacher" if unet is pipe.unet else "splam"
        assert sum(seen) == unet_calls(role, steps, guidance), (sampler, steps, guidance, seen)


def test_compare_times_interleaved_rounds_with_an_injected_clock(tmp_path):
    studio = Studio(make_fake_weights(tmp_path / "weights"))
    studio.compare(PROMPT, teacher_steps=2, student_steps=1, repeats=1, warmup=0)  # models loaded, off the clock
    programmed = {"teacher": [0.5, 0.200, 0.210, 0.190], "lcm": [0.4, 0.012, 0.030, 0.011],
                  "splam": [0.4, 0.013, 0.011, 0.014]}
    clock, order = FakeClock(), []
    done = {k: 0 for k in programmed}
    real = generate

    def fake_generate(pipe, **kw):  # the real images, the programmed durations
        role = "teacher" if kw.get("unet") is None else \
            "splam" if kw["unet"] is studio.student("shapes-splam", "shapes-teacher", "splam") else "lcm"
        order.append(role)
        clock.now += programmed[role][done[role]]
        done[role] += 1
        return real(pipe, **kw)

    import splam_studio.studio.logic as logic

    stages = []
    old, logic.generate = logic.generate, fake_generate
    try:
        r = studio.compare(PROMPT, seed=3, student_steps=2, teacher_steps=3, guidance_scale=7.5, clock=clock,
                           progress=lambda f, d: stages.append(d))
    finally:
        logic.generate = old
    assert order == ["teacher", "lcm", "splam"] * 4
    t, lcm, splam = r.panels
    assert t.latency_runs == pytest.approx([200, 210, 190]) and t.latency_ms == pytest.approx(200)
    assert t.warmup_ms == pytest.approx([500]) and lcm.warmup_ms == pytest.approx([400])
    assert lcm.latency_ms == pytest.approx(12) and splam.latency_ms == pytest.approx(13)
    assert (t.unet_calls, lcm.unet_calls, splam.unet_calls) == (6, 2, 2)
    assert "6 UNet calls (3 steps × 2, CFG)" in t.caption() and "2 UNet calls" in splam.caption()
    assert r.same_architecture and r.elapsed_s == pytest.approx(sum(map(sum, programmed.values())))
    text = r.summary()
    assert "3 interleaved rounds" in text and "a first warm-up round not counted" in text
    assert "LCM and SPLAM: same architecture and UNet calls; their times overlap (11–30 ms and 11–14 ms), so the " \
           "difference is noise." in text
    assert stages[0] == "loading models" and stages[-1] == "done"
    assert "round 1/4 (warm-up): Teacher, 3 ddim steps + VAE decode" in stages
    assert "round 4/4 (timed): SPLAM, 2 steps + VAE decode" in stages
    assert any(s.startswith("comparing each student") for s in stages)
    assert "seed 3" in r.history_caption() and "teacher 3 ddim / students 2 steps" in r.history_caption()


def test_one_step_students_are_labelled_beside_the_untrained_student(tmp_path):
    """At 1 step each student's distance to the teacher stands beside the untrained student's: the bench's zero-gamma
    student (the teacher UNet, no training) sampled from the same noise. At 2 steps no such label."""
    from splam_studio.core.metrics import latent_mse
    from splam_studio.studio.logic import image_psnr
    from splam_studio.tools.bench import untrained_student

    studio = Studio(make_fake_weights(tmp_path / "weights"))
    r = studio.compare(PROMPT, seed=5, student_steps=1, teacher_steps=3, repeats=1, warmup=0)
    t = r.panel("teacher")
    pipe = studio.teacher("shapes-teacher")
    raw = generate(pipe, prompt=[PROMPT], sampler="lcm", steps=1, seed=5, unet=untrained_student(pipe))
    mse = float(latent_mse(raw.latents, t.latent)[0])
    for p in r.panels[1:]:
        assert p.untrained_mse == pytest.approx(mse, rel=1e-5, abs=1e-7)
        assert p.untrained_psnr == pytest.approx(image_psnr(raw.images[0], t.image), abs=0.01)
        word = "closer to" if p.latent_mse < mse else "**further from**"
        assert f"{word} the teacher than no distillation (untrained student: latent MSE {mse:.3g}" in p.caption()
        assert "· lcm sampler · 1 step ·" in p.caption()
    assert f"1 step: no distillation (the teacher UNet as a 1-step sampler, same noise) is at latent MSE {mse:.3g}" \
        in r.summary() and "; latent MSE of LCM " in r.summary()
    two = studio.compare(PROMPT, seed=5, student_steps=2, teacher_steps=3, repeats=1, warmup=0)
    assert all(p.untrained_mse is None for p in two.panels) and "no distillation" not in two.summary()
