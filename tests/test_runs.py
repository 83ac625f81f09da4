"""A run as a user meets it through train_cli.py: existing names refused, --overwrite keeps the old run aside, bad data
leaves nothing behind, a small data set clamps the batch, stats.jsonl, and --help with each preset's values."""
import json
import math
from pathlib import Path

import train_cli
from tests import test_train

world = test_train.world  # the tiny teacher and 12-image folder (module fixture)
cli = test_train.cli


def _fake_run(path, method="lcm"):
    path.mkdir(parents=True)
    (path / "training_config.json").write_text(json.dumps({"method": method}))
    (path / "keep.txt").write_text("the user's")


def test_existing_run_is_refused_without_resume_or_overwrite(world, tmp_path):
    _fake_run(tmp_path / "mine")
    r = cli(world, tmp_path, "--max-steps", "1", "--run-name", "mine")
    assert r.returncode == 2
    assert "already exists" in r.stderr and "--resume latest" in r.stderr and "--overwrite" in r.stderr
    assert (tmp_path / "mine" / "keep.txt").read_text() == "the user's"
    r = cli(world, tmp_path, "--max-steps", "1", "--run-name", "mine", "--overwrite", "--resume", "latest")
    assert r.returncode == 2 and "overwrite" in r.stderr


def test_all_corrupt_data_leaves_nothing_and_overwrite_puts_the_old_run_back(world, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(3):
        (bad / f"{i}.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    r = cli(world, out, "--max-steps", "1", "--run-name", "fresh", "--data", str(bad))
    assert r.returncode == 2 and "none of the 3 images" in r.stderr and "0.png, 1.png, 2.png" in r.stderr
    assert "bug" not in r.stderr and not (out / "fresh").exists()
    _fake_run(out / "mine")
    r = cli(world, out, "--max-steps", "1", "--run-name", "mine", "--overwrite", "--data", str(bad))
    assert r.returncode == 2
    assert (out / "mine" / "keep.txt").read_text() == "the user's"  # put back: the new run never got written


def test_overwrite_clamped_batch_and_stats(world, tmp_path):
    _fake_run(tmp_path / "mine", method="lcm")
    r = cli(world, tmp_path, "--max-steps", "2", "--run-name", "mine", "--overwrite", "--method", "splam",
            "--batch-size", "16")
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "mine"
    cfg = json.loads((run / "training_config.json").read_text())
    assert cfg["method"] == "splam" and cfg["batch_size"] == 12  # 12 images: the batch shrank to fit
    assert "using batch size 12" in r.stdout + r.stderr
    old = list((tmp_path / ".trash").iterdir())
    assert len(old) == 1 and (old[0] / "keep.txt").read_text() == "the user's"
    rows = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    assert rows[0]["event"] == "start" and rows[0]["max_steps"] == 2 and rows[-1]["event"] == "done"
    steps = [r for r in rows if "event" not in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 and r["it_s"] > 0 for r in steps)
    assert abs(steps[0]["eta_s"] - 1 / steps[0]["it_s"]) <= 0.05 + 0.01 / steps[0]["it_s"]  # one step left at that speed
    assert steps[-1]["eta_s"] == 0
    text = r.stdout + r.stderr
    assert "safety checker" not in text and "kept in float32" not in text and "torch_dtype" not in text


def test_help_shows_each_default_once_with_the_presets():
    text = train_cli.build_parser().format_help()
    assert "(default: None)" not in text
    flat = " ".join(text.split())
    assert "(default 8; preset sdxl: 2, shapes: 32)" in flat  # --batch-size
    assert "(default 1e-05; preset sd15: 0.0001, sdxl: 0.0001)" in flat  # --lr (shapes uses the default)
    assert "--overwrite" in flat and ".trash" in flat


def test_weights_root_has_one_rule(tmp_path, monkeypatch):
    """$SPLAM_WEIGHTS_DIR, else the checkout's weights/ from any working directory, else ./weights (installed)."""
    from splam_studio.studio.logic import Studio
    from splam_studio.store import runs

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(runs.WEIGHTS_ENV, raising=False)
    assert runs.weights_dir() == Path(train_cli.__file__).resolve().parent / "weights"
    monkeypatch.setattr(runs, "CHECKOUT", tmp_path / "site-packages")  # no pyproject.toml beside the package
    assert runs.weights_dir() == tmp_path / "weights"
    monkeypatch.setenv(runs.WEIGHTS_ENV, str(tmp_path / "mine"))
    assert runs.weights_dir() == tmp_path / "mine"
    assert Studio(warm_up=False).weights == tmp_path / "mine"  # the studio asks the same function
