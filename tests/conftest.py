"""Fixtures that several test files share.

`one_step_models`: the tiny teacher, a fresh student, the schedule and a two-caption (cond, uncond) that the tests of
the 1-step critics (tests/test_adversarial.py, tests/test_dmd.py) share, built once per module.

`plain_app`: one studio started as a user starts it (`python app.py`, no flags) for the whole session, on its own
tiny fake weights, so that the files whose tests drive a plain app (tests/test_app.py, tests/test_browser.py) pay its
start-up once. Tests that need other flags or a server they may end start their own with tests/live.py.
"""
from __future__ import annotations

import pytest

from tests.live import launch_app, stop_app


@pytest.fixture(scope="module")
def one_step_models(tmp_path_factory):
    """(teacher, student, schedule, cond, uncond) on a tiny pipeline: the teacher frozen, the student fresh at seed 0."""
    import torch

    from splam_studio.core.schedule import NoiseSchedule
    from splam_studio.core.student import build_student
    from tests.tiny import make_tiny_pipeline, tiny_text

    pipe = make_tiny_pipeline(tmp_path_factory.mktemp("tiny"))
    teacher = pipe.unet.requires_grad_(False)
    student = build_student(teacher, "fresh", generator=torch.Generator().manual_seed(0))
    cond, uncond = tiny_text(pipe, ["one red circle", "two blue squares"]), tiny_text(pipe, ["", ""])
    return teacher, student, NoiseSchedule.from_scheduler(pipe.scheduler), cond, uncond


@pytest.fixture(scope="session")
def plain_app(tmp_path_factory) -> str:
    """The URL of a live `app.py` with no flags on fake weights (shapes-teacher, shapes-splam, shapes-lcm)."""
    from tests.test_app import make_fake_weights

    root = tmp_path_factory.mktemp("plain-app")
    proc, url = launch_app(make_fake_weights(root / "weights"), root / "app.log")
    yield url
    stop_app(proc)
