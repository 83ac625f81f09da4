"""Threads decided once (training.device): the user's number wins, then SPLAM_THREADS, then the load-aware default;
the choice is handed to child processes through the environment."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from splam_studio.training.device import THREADS_ENV, configure_threads, default_threads


@pytest.fixture(autouse=True)
def _keep_threads(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv(THREADS_ENV, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("cores,load,expected", [(2, 0.0, 2), (2, 0.4, 2), (2, 0.6, 1), (2, 1.0, 1), (2, 5.0, 1),
                                                 (8, 3.2, 5), (8, 0.0, 8), (1, 0.0, 1), (4, 100.0, 1)])
def test_default_is_the_idle_cores_at_least_one(cores, load, expected):
    assert default_threads(cores, load) == expected


def test_user_number_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv(THREADS_ENV, "2")
    assert configure_threads(1) == 1
    assert torch.get_num_threads() == 1
    assert os.environ[THREADS_ENV] == os.environ["OMP_NUM_THREADS"] == "1"


def test_environment_wins_over_the_default(monkeypatch):
    monkeypatch.setattr("splam_studio.training.device.default_threads", lambda: 2)
    monkeypatch.setenv(THREADS_ENV, "1")
    assert configure_threads(None) == 1 and torch.get_num_threads() == 1
    monkeypatch.delenv(THREADS_ENV)
    assert configure_threads(None) == 2 and torch.get_num_threads() == 2


@pytest.mark.parametrize("bad", ["two", "1.5"])
def test_a_bad_environment_value_is_one_clear_error(monkeypatch, bad):
    monkeypatch.setenv(THREADS_ENV, bad)
    with pytest.raises(ValueError, match=THREADS_ENV):
        configure_threads(None)


def test_zero_threads_is_refused():
    with pytest.raises(ValueError, match="at least 1"):
        configure_threads(0)


def test_the_trainer_takes_the_studios_choice_from_the_environment(tmp_path):
    """The Train tab's child inherits SPLAM_THREADS (the launcher passes os.environ on); the trainer applies it."""
    code = ("import os, torch; from splam_studio.training.cli import configure_threads; "
            "configure_threads(None); print(torch.get_num_threads(), os.environ['OMP_NUM_THREADS'])")
    env = {**os.environ, THREADS_ENV: "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["1", "1"]


def test_the_trainer_cli_applies_its_threads_flag(tmp_path):
    r = subprocess.run([sys.executable, "-m", "splam_studio.training", "--preset", "shapes", "--threads", "0",
                        "--output-dir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "threads must be at least 1" in r.stderr, r.stderr
    assert not any(tmp_path.iterdir())  # refused before any run folder
