"""BENCHMARKS.md is rendered from the JSON files only: sections appear with their files, numbers come from them."""
import json

from splam_studio.tools.report import write_benchmarks_md


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


def _run(method: str, seed: int, curve: list[float]) -> dict:
    pts = [{"iteration": 100 * (i + 1), **{s: {"fid": v * k, "teacher_mse": v / 100 * k} for s, k in (("1", 4), ("2", 1), ("4", 1.1))}}
           for i, v in enumerate(curve)]
    return {"config": {"method": method, "lr": 1e-5, "seed": seed, "gamma_scale": 10.0, "gamma_one_prob": 0.5}, "points": pts}


def test_plateau_and_seed_verdicts_are_computed_from_the_curves(tmp_path):
    from splam_studio.tools.report import plateau, verdict

    pts = _run("lcm", 0, [90, 60, 50, 52])["points"]
    assert plateau(pts, "2", "fid") == (50, 52, True)  # 52 <= 50 * 1.05
    assert plateau(pts, "4", "fid")[2] and not plateau(_run("lcm", 0, [90, 50, 60])["points"], "2", "fid")[2]
    assert verdict([40, 41, 42], [50, 51, 52]) == "lower"
    assert verdict([40, 48, 56], [50, 51, 52]).startswith("tie")  # spread 8 + 1 > difference 3
    assert verdict([60], [50]).startswith("higher (one seed")

    folder = tmp_path / "benchmarks"
    folder.mkdir()
    seeds = {"n": 500, "guidance": 7.5, "teacher": {"fid": 49.0}, "untrained": {s: {"fid": 80.0, "teacher_mse": 0.45} for s in ("1", "2", "4")},
             "runs": {f"{m}-s{i}": _run(m, i, [70, base + i]) for m, base in (("lcm", 50), ("splam", 40)) for i in range(3)}}
    for m, base in (("lcm", 60), ("splam", 30)):  # a longer sub-path (k = 2 k_phi): judged against LCM at the same m
        for i in range(2):
            seeds["runs"][f"{m}-m2-s{i}"] = r = _run(m, i, [70, base + i])
            r["config"]["m"] = 2
    for m, base in (("lcm", 55), ("splam", 46)):  # distilled from prompts only: judged on the same data and vs images
        for i in range(2):
            seeds["runs"][f"p-{m}-s{i}"] = r = _run(m, i, [70, base + i])
            r["config"]["prompts"] = "prompts.txt"
    (folder / "seeds.json").write_text(json.dumps(seeds))
    text = write_benchmarks_md(folder, tmp_path / "B.md").read_text()
    p_splam, p_lcm = "splam (p(gamma = 1) 0.5) (teacher data (prompts only))", "lcm (teacher data (prompts only))"
    assert f"Verdict, {p_splam} against {p_lcm} (" in text and "- 2 step(s): FID ratio 0.838, lower" in text
    assert f"Verdict, {p_splam} against splam (p(gamma = 1) 0.5) (" in text and "FID ratio 1.134, higher" in text
    assert f"Verdict, {p_lcm} against lcm (" in text and "Verdict, splam (p(gamma = 1) 0.5) against lcm (" in text
    assert "| lcm | 3 | 204.0 ± 4.0 | 51.0 ± 1.0 |" in text  # final points 50, 51, 52 (x4 at 1 step)
    assert "| splam (p(gamma = 1) 0.5) | 3 | 164.0 ± 4.0 | 41.0 ± 1.0 |" in text
    assert "Verdict, splam (p(gamma = 1) 0.5) against lcm (" in text and "- 2 step(s): FID ratio 0.804, lower" in text
    assert "Verdict, splam (m 2) (p(gamma = 1) 0.5) against lcm (m 2) (" in text and "- 2 step(s): FID ratio 0.504, lower" in text
    assert "- splam (p(gamma = 1) 0.5): 1 step FID MISSES, MSE MISSES; 2 step FID beats, MSE beats; 4 step FID beats, " \
           "MSE MISSES" in text  # 0.41 < 0.45 < 0.451


def test_server_attacks_section_follows_its_json(tmp_path):
    from splam_studio.tools.server_attacks import results

    folder = tmp_path / "benchmarks"
    folder.mkdir()
    assert "attacked" not in write_benchmarks_md(folder, tmp_path / "B.md").read_text()  # no JSON, no section
    rows = [("`Host: evil.example`", "400", "400, echoed: no", True), ("seed 10**400", "one sentence", "a | b", False)]
    (folder / "server_attacks.json").write_text(json.dumps(results(rows, 12.3)))
    text = write_benchmarks_md(folder, tmp_path / "B.md").read_text()
    assert "## The studio as a public server, attacked" in text
    assert "`python -m splam_studio.tools.server_attacks`" in text  # the command that measures it
    assert "| attack | must get | got | held |" in text
    assert "| `Host: evil.example` | 400 | 400, echoed: no | yes |" in text
    assert "| seed 10**400 | one sentence | a \\| b | NO |" in text  # a pipe in what came back stays in its cell
    assert "- 1 of 2 attacks held; the run took 12 s" in text


def test_xl_teacher_section_follows_its_json(tmp_path):
    folder = tmp_path / "benchmarks"
    folder.mkdir()
    assert "Shapes-XL" not in write_benchmarks_md(folder, tmp_path / "B.md").read_text()
    split = {"prompt_acc": 0.912, "per_attribute": {"shape": 0.95}, "fid": 31.5, "fid_floor": 3.3, "n": 100}
    (folder / "teacher-xl.json").write_text(json.dumps({"description": "xl", "splits": {"held-out": split}}))
    text = write_benchmarks_md(folder, tmp_path / "B.md").read_text()
    assert "### The Shapes-XL teacher (SDXL architecture, issue 22)" in text and "| held-out | 0.912 | 0.950 |" in text


def test_xl_students_section_follows_its_json(tmp_path):
    """The Shapes-XL section: a seed table (full pair and LoRA pair apart, each SPLAM judged against the LCM of the
    same form) and the curves per run."""
    folder = tmp_path / "benchmarks"
    folder.mkdir()
    runs = {f"xl-{m}-s{i}": _run(m, i, [70, base + i]) for m, base in (("splam", 40), ("lcm", 50)) for i in range(2)}
    for m, base in (("splam", 120), ("lcm", 110)):
        for i in range(2):
            runs[f"xl-{m}-lora-s{i}"] = r = _run(m, i, [150, base + i])
            r["config"].update(lora_rank=16, lr=5e-4)
    xl = {"n": 500, "guidance": 7.5, "teacher": {"fid": 60.0}, "untrained": {s: {"fid": 80.0, "teacher_mse": 0.45} for s in ("1", "2", "4")},
          "runs": runs}
    (folder / "xl_curves.json").write_text(json.dumps(xl))
    text = write_benchmarks_md(folder, tmp_path / "B.md").read_text()
    assert "### Shapes-XL students over training seeds (issue 22): the SDXL path distils" in text
    assert "### Shapes-XL students along training (issue 22)" in text and "| xl-splam-s0 | splam |" in text
    assert "| lcm (LoRA rank 16, lr 0.0005) | 2 |" in text and "| lcm | 2 |" in text
    assert "Verdict, splam (LoRA rank 16, lr 0.0005)" in text and "against lcm (LoRA rank 16, lr 0.0005)" in text
    assert "lora_rank 16" in text  # the recipe column names the LoRA


def test_a_regression_on_a_pairs_store_of_its_own_is_named_so():
    """The 1-step recipe label tells the regression on the batch's own pairs from one on a store of their own."""
    from splam_studio.tools.report import _one_step_recipe

    own = " (its pairs a store of their own)"
    batch = {"regression": 0.25, "prompts": "p.txt", "prompts_w": None, "w": 6.5}
    assert _one_step_recipe(batch)[0] == "regression 0.25"
    assert _one_step_recipe({**batch, "prompts_w": 6.5})[0] == "regression 0.25"  # the distillation's w: the batch's
    assert _one_step_recipe({**batch, "prompts_w": 0.0})[0] == "regression 0.25" + own
    assert _one_step_recipe({"regression": 0.25, "regression_prompts": "p.txt", "w": 6.5})[0] == "regression 0.25" + own
