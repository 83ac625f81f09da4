"""Fixtures that several test files share.

`plain_app`: one studio started as a user starts it (`python app.py`, no flags) for the whole session, on its own
tiny fake weights, so that the files whose tests drive a plain app (tests/test_app.py, tests/test_browser.py) pay its
start-up once. Tests that need other flags or a server they may end start their own with tests/live.py.
"""
from __future__ import annotations

import pytest

from tests.live import launch_app, stop_app


@pytest.fixture(scope="session")
def plain_app(tmp_path_factory) -> str:
    """The URL of a live `app.py` with no flags on fake weights (shapes-teacher, shapes-splam, shapes-lcm)."""
    from tests.test_app import make_fake_weights

    root = tmp_path_factory.mktemp("plain-app")
    proc, url = launch_app(make_fake_weights(root / "weights"), root / "app.log")
    yield url
    stop_app(proc)
