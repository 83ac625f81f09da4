"""tools.interop's pure parts (the run itself needs kohya sd-scripts and ComfyUI trees: outside CI)."""
import json

import pytest
import torch

from splam_studio.tools import interop as I
from splam_studio.tools.report import write_benchmarks_md


def _row(loader, form, rel_rms):
    r = {"loader": loader, "form": form, "max_abs": rel_rms * 3, "rel_rms": rel_rms, "expected": I.expectation(loader, form)}
    return {**r, "as_expected": I.as_expected(r)}


def test_folded_forms_must_match_and_controls_must_differ():
    assert I.as_expected(_row("ComfyUI", I.SINGLE, 1e-4)) and not I.as_expected(_row("ComfyUI", I.SINGLE, 0.05))
    assert I.as_expected(_row("ComfyUI", I.LORA_BARE, 0.05)) and not I.as_expected(_row("ComfyUI", I.LORA_BARE, 1e-4))
    assert I.as_expected(_row("ComfyUI", I.RUN_UNET, 0.05))  # ComfyUI drops cond_proj silently: a different model
    assert I.as_expected(_row("kohya", I.LORA, 0.05))  # kohya's networks.lora drops diff_b
    assert I.expectation("ComfyUI", I.LORA) == I.SAME


def test_an_error_counts_only_where_one_is_expected():
    refused = {"loader": "kohya", "form": I.RUN_UNET, "expected": I.expectation("kohya", I.RUN_UNET), "error": "E"}
    assert I.as_expected(refused)
    assert not I.as_expected({"loader": "kohya", "form": I.SINGLE, "expected": I.SAME, "error": "E"})
    loaded = {"loader": "kohya", "form": I.RUN_UNET, "expected": I.ERROR, "max_abs": 1.0, "rel_rms": 1.0}
    assert not I.as_expected(loaded)


def test_compare_is_max_abs_and_rms_relative_to_the_reference():
    ref = torch.tensor([3.0, -4.0])
    d = I.compare(torch.tensor([3.0, -3.0]), ref)
    assert d["max_abs"] == pytest.approx(1.0) and d["rel_rms"] == pytest.approx((0.5 ** 0.5) / (12.5 ** 0.5))


def test_a_stubbed_torchvision_name_builds_but_raises_when_used():
    mod = I._StubModule("torchvision.transforms")
    t = mod.Compose([mod.ToTensor(), mod.Normalize([0.5], [0.5])])  # kohya's module-level use
    with pytest.raises(RuntimeError, match="torchvision is stubbed"):
        list(t)
    with pytest.raises(AttributeError):
        mod.__wrapped__


def test_the_section_renders_in_benchmarks_md(tmp_path):
    rows = [_row("kohya", I.SINGLE, 2e-4), _row("ComfyUI", I.LORA_BARE, 1e-4),
            {"loader": "kohya", "form": I.RUN_UNET, "expected": I.ERROR, "error": "RuntimeError: x", "as_expected": True}]
    d = I.section(rows, {"kohya-ss/sd-scripts": "abc"}, ["a note"])
    assert "2 of 3 rows as expected" in d["description"]
    (tmp_path / "interop.json").write_text(json.dumps(d))
    text = write_benchmarks_md(tmp_path, tmp_path / "B.md").read_text()
    assert "| single file <run>.safetensors | kohya | yes | 6.00e-04 | 2.00e-04 | same | yes |" in text
    assert "| kohya LoRA without the fold | ComfyUI | yes | 3.00e-04 | 1.00e-04 | different | NO |" in text
    assert "| no: RuntimeError: x | - | - | error | yes |" in text and "- kohya-ss/sd-scripts: commit `abc`" in text


def test_a_refusal_keeps_the_line_that_names_the_keys():
    e = RuntimeError('Error(s) in loading state_dict for UNet2DConditionModel:\n\tUnexpected key(s) in state_dict: '
                     '"time_embedding.cond_proj.weight". ')
    s = I.error_summary(e)
    assert s.startswith("RuntimeError: Error(s) in loading") and '"time_embedding.cond_proj.weight"' in s
    assert I.error_summary(ValueError("one line")) == "ValueError: one line"
