"""The GPU check's own code path at tiny size on the CPU: build from configs, train_cli.py (LoRA, bf16, validation,
export, resume), the trainer bench grid, studio latency against a stock pipeline, gpu.json and its markdown."""
import json

from splam_studio.tools import gpu_check


def test_tiny_gpu_check_end_to_end(tmp_path):
    out = tmp_path / "gpu.json"
    rc = gpu_check.main(["--tiny", "--device", "cpu", "--runs", "splam-lora64-bf16,splam-lora64-fp16", "--repeats", "1",
                         "--workdir", str(tmp_path / "work"), "--out", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    run, fp16 = doc["train"]
    assert run["ok"], run
    assert run["validations"] == ["step-0000001.png", "step-0000002.png", "step-0000003.png"]
    assert run["exported"] and run["final_step"] == 3 and run["lora"] == 4
    assert run["dtypes"] == {"student": "float32", "target": "float32", "teacher": "bfloat16", "text_encoder": "bfloat16",
                             "vae": "bfloat16"}
    assert fp16 == {"run": "splam-lora64-fp16", "skipped": "fp16 needs CUDA or MPS"}
    # the teacher is built from configs that leave the UNet's other settings to diffusers' defaults
    unet_cfg = json.loads((tmp_path / "work" / "teacher" / "unet" / "config.json").read_text())
    assert unet_cfg["block_out_channels"] == [32, 64] and unet_cfg["time_cond_proj_dim"] is None
    # bench: LoRA and full, checkpointing off and on, both methods
    keys = {(r["method"], r["lora"], r["checkpointing"]) for r in doc["bench"]}
    assert keys == {(m, lo, cp) for m in ("lcm", "splam") for lo in (4, 0) for cp in (False, True)}
    assert all(r["step_s"] > 0 and r["peak_mib"] > 0 for r in doc["bench"])
    lat = doc["latency"]["rows"]
    assert [(r["model"], r["steps"]) for r in lat] == [("teacher", 2), ("student", 1), ("student", 2), ("student", 4)]
    assert all(r["studio_ms"] > 0 and r["stock_ms"] > 0 for r in lat)
    assert set(doc["summary"]) >= {"splam_over_lcm_step_time_max", "studio_over_stock_latency_max", "train_runs_ok"}
    # the summary's figures are the rows' own: the worst studio / stock ratio, the worst SPLAM / LCM step time
    assert doc["summary"]["studio_over_stock_latency_max"]["value"] == max(r["ratio"] for r in lat)
    pairs = [(r, b) for r in doc["bench"] for b in doc["bench"] if (r["method"], b["method"]) == ("splam", "lcm")
             and (r["lora"], r["checkpointing"]) == (b["lora"], b["checkpointing"])]
    assert len(pairs) == 4
    assert doc["summary"]["splam_over_lcm_step_time_max"]["value"] == round(max(r["step_s"] / b["step_s"] for r, b in pairs), 3)
    assert doc["summary"]["train_runs_ok"]["value"] == "1/1" and doc["summary"]["train_runs_ok"]["met"] is True
    md = gpu_check.render_markdown(doc)
    assert gpu_check.markdown_section(out) == md and gpu_check.markdown_section(tmp_path / "none.json") is None
    assert md.startswith("## GPU check") and "| splam-lora64-bf16 | bf16 | 2 | 16 |" in md and "skipped: fp16 needs" in md


def test_failed_run_is_reported_and_fails_the_check():
    doc = {"command": "x", "size": "tiny", "device": "cpu", "torch": "t", "time": "now",
           "train": [{"run": "a", "method": "splam", "lora": 4, "precision": "bf16", "batch": 2, "resolution": 16,
                      "ok": False, "failed": "resume", "train_s": 1.0, "resume_s": 2.0}]}
    doc["summary"] = gpu_check._summary(doc)
    assert doc["summary"]["train_runs_ok"] == {"value": "0/1", "target": "all", "met": False}
    assert "FAILED in resume" in gpu_check.render_markdown(doc)


def test_latency_times_an_sdxl_teacher_against_the_stock_sdxl_pipeline(tmp_path):
    """The studio-vs-stock latency rows for an SDXL teacher: the stock side is the teacher family's pipeline (a
    StableDiffusionPipeline cannot take an SDXL teacher's second text encoder)."""
    from splam_studio.core.student import build_student
    from splam_studio.tools.gpu_check import latency
    from tests.tiny import make_tiny_xl_pipeline

    pipe = make_tiny_xl_pipeline(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    rows = latency(pipe, build_student(pipe.unet, "zero").eval(), repeats=1, teacher_steps=2, student_steps=(1,))
    assert [(r["model"], r["steps"]) for r in rows] == [("teacher", 2), ("student", 1)]
    assert all(r["studio_ms"] > 0 and r["stock_ms"] > 0 for r in rows)
