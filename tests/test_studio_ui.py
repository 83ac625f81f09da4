"""The studio page's pieces without a browser: files served once and never rewritten, the grammar's words by the
prompt, the typed prompt kept over a model-set switch, history entries told apart, and the per-tab builders."""
from __future__ import annotations

import os

import pytest
from PIL import Image

from splam_studio.models.model_sets import MODEL_SETS
from splam_studio.shapes.grammar import VOCAB
from splam_studio.studio import ui


@pytest.fixture(autouse=True)
def gradio_temp(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))


def test_served_file_is_written_once_and_never_rewritten():
    red = Image.new("RGB", (8, 8), (255, 0, 0))
    path = ui.served_file(red)
    first = os.stat(path)
    again = ui.served_file(red.copy())  # the same image returned again (slider, heat-map toggle, history)
    assert again == path and os.stat(path).st_ino == first.st_ino and os.stat(path).st_mtime_ns == first.st_mtime_ns
    assert Image.open(path).getpixel((0, 0)) == (255, 0, 0)
    other = ui.served_file(Image.new("RGB", (8, 8), (0, 0, 255)))
    assert other != path and ui.served_file(None) is None
    assert not [n for n in os.listdir(os.path.dirname(path)) if n.startswith(".")]  # no temporary file left


def test_vocabulary_note_lists_every_grammar_word():
    note = ui.vocabulary_note()
    words = set(note.split(":", 1)[1].replace("(", " ").replace(")", " ").replace("·", " ").replace(".", " ").split())
    plurals = {w for w in VOCAB if w not in words}  # circles = circle(s), crosses = cross(es)
    assert all(any(p == w + s for w in words for s in ("s", "es")) for p in plurals), plurals
    assert "background" in words and "magenta" in words


def test_model_set_switch_keeps_a_typed_prompt():
    sd = MODEL_SETS["dreamshaper7"].prompts[0]
    assert ui.kept_prompt("a red fox in snow, my own words", sd) == "a red fox in snow, my own words"
    assert ui.kept_prompt(ui.EXAMPLES[0], sd) == sd  # the page's own prompt follows the set
    assert ui.kept_prompt("   ", sd) == sd and ui.kept_prompt(None, sd) == sd


def test_page_endpoints_and_builders(tmp_path):
    from splam_studio.studio.logic import Studio
    from tests.test_app import make_fake_weights

    studio = Studio(make_fake_weights(tmp_path / "weights"), model_set="shapes", warm_up=False)
    demo = ui.build_ui(studio, train=False)
    names = {fn.api_name for fn in demo.fns.values() if fn.api_name}
    assert {"compare", "error_bound", "model_set"} <= names
    model_set = next(fn for fn in demo.fns.values() if fn.api_name == "model_set")
    assert [getattr(c, "label", None) for c in model_set.inputs] == ["Model set", "Prompt", "Prompt"]  # typed text in
    r = studio.compare("one large red circle at the left on a black background", seed=5, teacher_steps=2,
                       student_steps=1, repeats=1, warmup=0)
    entry = ui.history_entry(r, ["p", "", 5, 1, 2, 7.5, "ddim", "t", "s", "l"])
    assert entry["caption"].startswith("“one large red circle") and "seed 5" in entry["caption"]
    assert "teacher 2 ddim / students 1 step" in entry["caption"] and " s" in entry["caption"]
    assert set(entry["images"]) == {"teacher", "lcm", "splam", "lcm-diff", "splam-diff"}
    assert all(os.path.isfile(p) for p in entry["images"].values()) and entry["inputs"][2] == 5
