"""BENCHMARKS.md is rendered from the JSON files only: sections appear with their files, numbers come from them."""
import json

from splam_studio.report import write_benchmarks_md


def _teacher(train_acc: float, heldout_acc: float, shape: float) -> dict:
    split = lambda acc: {"n": 1000, "prompt_acc": acc, "fid": 12.5, "fid_floor": 3.0,
                         "per_attribute": {"shape": shape, "colour": 1.0}}
    return {"description": "d", "splits": {"train": split(train_acc), "heldout": split(heldout_acc)}}


def test_teacher_and_history_sections_follow_the_json(tmp_path):
    folder = tmp_path / "benchmarks"
    folder.mkdir()
    out = write_benchmarks_md(folder, tmp_path / "B.md")
    assert "## The Shapes teacher" not in out.read_text()  # no JSON, no section

    (folder / "teacher.json").write_text(json.dumps(_teacher(0.931, 0.917, 0.924)))
    (folder / "teacher_history.json").write_text(json.dumps({"description": "earlier", "teachers": [
        {"preset": "old-a", "what": "first | try", "commit": "abc1234", "evaluation": _teacher(0.175, 0.168, 0.836)},
        {"preset": "old-b", "what": "second", "commit": "def5678", "evaluation": _teacher(0.945, 0.846, 0.857)},
    ]}))
    text = write_benchmarks_md(folder, tmp_path / "B.md").read_text()
    assert "| train | 0.931 | 0.924 | 1.000 |" in text
    rows = [line for line in text.splitlines() if line.startswith("| old-") or line.startswith("| full |")]
    assert [r.split(" | ")[0] for r in rows] == ["| old-a", "| old-b", "| full"]  # earlier first, embedded last
    assert rows[0].endswith("| 0.175 | 0.168 | 0.836 | - | 12.5 |") and "first \\| try (commit abc1234)" in rows[0]
    assert rows[2].startswith("| full | the embedded teacher (above) | 0.931 | 0.917 | 0.924 |")
    assert not list(tmp_path.glob(".B.md*"))  # written atomically, no temp file left
