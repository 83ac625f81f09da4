"""Smoke runs of the real train_cli.py on a tiny SD-shaped pipeline: both methods, full and LoRA, checkpoint,
resume, atomic writes, NaN faults, and a 2-process CPU `accelerate launch`."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny teacher folder and a tiny captioned image folder."""
    from tests.tiny import make_tiny_pipeline

    root = tmp_path_factory.mktemp("world")
    pipe = make_tiny_pipeline(root / "tok")
    pipe.save_pretrained(root / "teacher", safe_serialization=True)
    data = root / "data"
    data.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(12):
        arr = (torch.rand(16, 16, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(["one red circle", "two small blue squares", "a large green star"][i % 3])
    return root


def cli(world, out, *extra, env=None, launcher=None):
    args = ["--teacher", str(world / "teacher"), "--data", str(world / "data"), "--output-dir", str(out),
            "--batch-size", "2", "--checkpoint-every", "1", "--log-every", "1", "--device", "cpu", "--seed", "3", *extra]
    cmd = (launcher or [sys.executable]) + [str(ROOT / "train_cli.py"), *args]
    e = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=e, timeout=300)


def _state(run: Path) -> int:
    ckpts = sorted((run / "checkpoints").glob("step-*"))
    return json.loads((ckpts[-1] / "state.json").read_text())["step"]


@pytest.mark.parametrize("method,lora", [("splam", 0), ("lcm", 0), ("splam", 4)])
def test_two_steps_checkpoint_and_resume(world, tmp_path, method, lora):
    from splam_studio.models.loading import load_student, load_teacher

    name = f"{method}-{lora}"
    r = cli(world, tmp_path, "--method", method, "--lora-rank", str(lora), "--max-steps", "2", "--run-name", name)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / name
    assert _state(run) == 2
    cfg = json.loads((run / "training_config.json").read_text())
    assert cfg["method"] == method and cfg["k"] == 20 and cfg["seed"] == 3
    assert (run / ("lora" if lora else "unet")).is_dir()
    if lora:
        assert (run / "lora_kohya.safetensors").is_file()
    # resume continues the step count
    r = cli(world, tmp_path, "--method", method, "--lora-rank", str(lora), "--max-steps", "4", "--run-name", name, "--resume", "latest")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "continuing at step 2" in r.stdout + r.stderr
    assert _state(run) == 4
    # the student loads on its teacher and runs in a stock pipeline with LCMScheduler at guidance 1
    from splam_studio.models.generation import generate

    pipe = load_teacher(str(world / "teacher"))
    unet = load_student(str(run), pipe)
    out = generate(pipe, prompt=["one red circle"], sampler="lcm", steps=2, seed=0, unet=unet)
    assert out.latents.shape == (1, 4, 8, 8) and torch.isfinite(out.latents).all()


@pytest.mark.parametrize("extra", [(), ("--gamma-one-prob", "0.5", "--cond-proj-lr-scale", "10", "--gamma-time", "matched")])
def test_resume_is_exact(world, tmp_path, extra):
    """2 + 2 resumed steps give the same student as 4 uninterrupted steps (same seeds); also with the gamma = 1
    mixture, the gamma projection in its own optimiser group and the matched gamma timestep."""
    from safetensors.torch import load_file

    assert cli(world, tmp_path, "--max-steps", "4", "--run-name", "straight", *extra).returncode == 0
    assert cli(world, tmp_path, "--max-steps", "2", "--run-name", "split", *extra).returncode == 0
    if extra:
        cfg = json.loads((tmp_path / "split" / "training_config.json").read_text())
        assert cfg["gamma_sampling"] == "1 with p=0.5, else uniform[0,1]" and cfg["cond_proj_lr_scale"] == 10
        assert cfg["gamma_time"] == "matched"
    r = cli(world, tmp_path, "--max-steps", "4", "--run-name", "split", "--resume", "latest", *extra)
    assert r.returncode == 0, r.stderr[-3000:]
    a = load_file(sorted((tmp_path / "straight" / "checkpoints").glob("step-*"))[-1] / "student.safetensors")
    b = load_file(sorted((tmp_path / "split" / "checkpoints").glob("step-*"))[-1] / "student.safetensors")
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-6, worst


def run_in_process(world, out, *extra, loss_fn=None):
    """The CLI's flags, resolved by cli.resolve and run by loop.run in this process; (exit status, log lines)."""
    from accelerate.state import AcceleratorState, GradientState

    from splam_studio.training import loop
    from splam_studio.training.cli import build_parser, resolve

    args = ["--teacher", str(world / "teacher"), "--data", str(world / "data"), "--output-dir", str(out),
            "--batch-size", "2", "--checkpoint-every", "1", "--log-every", "1", "--device", "cpu", "--seed", "3", *extra]
    lines = []
    try:
        loop.run(resolve(build_parser().parse_args(args)), log=lines.append, loss_fn=loss_fn)
        return 0, lines
    except loop.TrainError as e:
        return 2, lines + [str(e)]
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def test_nan_losses_are_skipped_then_stop_the_run(world, tmp_path):
    from tests.test_loop import nan_at

    rc, lines = run_in_process(world, tmp_path, "--max-steps", "3", "--run-name", "nan1", loss_fn=nan_at({1}))
    assert rc == 0, lines
    assert "step 1: non-finite loss, step skipped (1 in a row, 1 total)" in lines
    logged = [json.loads(x) for x in (tmp_path / "nan1" / "stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == [1, 3]  # step 2 (0-based 1) skipped, the count moved on
    rc, lines = run_in_process(world, tmp_path, "--max-steps", "8", "--run-name", "nan2", "--max-bad-steps", "2",
                               loss_fn=nan_at({2, 3, 4}))
    assert rc == 2 and "2 non-finite losses in a row at step 3" in lines[-1], lines
    assert _state(tmp_path / "nan2") == 2  # the last good checkpoint is intact


def test_bad_arguments_are_clear_errors(world, tmp_path):
    r = cli(world, tmp_path, "--method", "dmd", "--max-steps", "1")
    assert r.returncode == 2 and "method must be 'splam' or 'lcm', got 'dmd'" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, str(ROOT / "train_cli.py"), "--teacher", str(tmp_path / "nope"), "--max-steps", "1",
                        "--output-dir", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "nope" in r.stderr


def test_w_range_lcm_run_records_its_range_and_sampling_guidance(world, tmp_path):
    """diffusers' LCM recipe from the CLI: the run records w_min/w_max; its student samples at CFG w + 1."""
    from splam_studio.models.loading import sampling_guidance

    r = cli(world, tmp_path, "--method", "splam", "--w-min", "3", "--w-max", "10", "--max-steps", "1")
    assert r.returncode == 2 and "method 'lcm'" in r.stderr and "Traceback" not in r.stderr
    r = cli(world, tmp_path, "--method", "lcm", "--w", "6.5", "--w-min", "3", "--w-max", "10", "--max-steps", "1",
            "--run-name", "lcmw")
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = json.loads((tmp_path / "lcmw" / "training_config.json").read_text())
    assert (cfg["w_min"], cfg["w_max"], cfg["w"]) == (3.0, 10.0, 6.5)
    assert sampling_guidance(tmp_path / "lcmw") == 7.5
    # bench --curves evaluates it at that guidance
    from splam_studio.tools.bench import curves
    from splam_studio.models.loading import load_teacher

    seen = []

    class Bench:  # the part of bench.Bench that curves() uses, without the evaluator
        n, guidance, pipe, log = 1, 7.5, load_teacher(str(world / "teacher")), staticmethod(lambda *a: None)

        def evaluate_unet(self, method, unet, steps, student_guidance=1.0):
            seen.append(student_guidance)
            return {"fid": 0.0, "teacher_mse": 0.0}

    res = curves(Bench(), [tmp_path / "lcmw"], untrained=False)
    assert seen == [7.5] * 3 and res["runs"]["lcmw"]["sampling_guidance"] == 7.5
    assert res["runs"]["lcmw"]["config"]["w_min"] == 3.0


def test_two_process_accelerate_launch(world, tmp_path):
    # accelerate's --cpu launcher needs MPI for several processes; --multi_gpu runs torchrun, and --device cpu
    # then gives a gloo process group on the CPU (accelerate's MULTI_CPU)
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517"]
    r = cli(world, tmp_path, "--max-steps", "2", "--run-name", "ddp", launcher=launcher)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    cfg = json.loads((tmp_path / "ddp" / "training_config.json").read_text())
    assert cfg["processes"] == 2
    assert _state(tmp_path / "ddp") == 2


def test_checkpoints_round_trip_prune_and_refuse_incomplete(tmp_path):
    """save_checkpoint / load_checkpoint restore student, target and AdamW state exactly; only `keep` survive; a
    folder without state.json (a write cut short) is never resumed from."""
    from splam_studio.training.checkpoints import CheckpointError, find_checkpoint, load_checkpoint, save_checkpoint

    def model(seed):
        torch.manual_seed(seed)
        m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
        m[0].requires_grad_(False)  # frozen tensors are not checkpointed
        return m

    student, target = model(0), model(1)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-2)
    for step in (1, 2, 3):
        student(torch.ones(5, 3)).square().sum().backward()
        opt.step()
        save_checkpoint(tmp_path, step, student, target, opt, keep=2, grad_scaler={"scale": 1024.0})
    assert [p.name for p in sorted((tmp_path / "checkpoints").iterdir())] == ["step-0000002", "step-0000003"]
    (tmp_path / "checkpoints" / "step-0000009").mkdir()  # no state.json: incomplete
    ckpt = find_checkpoint(tmp_path, "latest")
    assert ckpt.name == "step-0000003"
    with pytest.raises(CheckpointError, match="no state.json"):
        find_checkpoint(tmp_path, str(tmp_path / "checkpoints" / "step-0000009"))

    student2, target2 = model(5), model(6)
    opt2 = torch.optim.AdamW([p for p in student2.parameters() if p.requires_grad], lr=1e-2)

    class Scaler:
        def load_state_dict(self, sd):
            self.sd = sd

    scaler = Scaler()
    assert load_checkpoint(ckpt, student2, target2, opt2, scaler) == 3
    assert scaler.sd == {"scale": 1024.0}
    assert torch.equal(student2[1].weight, student[1].weight) and torch.equal(target2[1].bias, target[1].bias)
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert opt2.state_dict()["state"][0]["step"] == 3
    assert not torch.equal(student2[0].weight, student[0].weight)  # the frozen layer stayed as built


def test_bench_error_bound_uses_the_shared_runner(world):
    """bench's error-bound table averages core.error_bound's runner over prompts: same numbers as the runner."""
    from splam_studio.core.error_bound import guided_trajectory, student_error_bounds
    from splam_studio.models.generation import initial_noise
    from splam_studio.core.schedule import NoiseSchedule
    from splam_studio.core.student import build_student
    from splam_studio.core.teacher import encode_text
    from splam_studio.models.loading import load_teacher
    from splam_studio.tools.bench import Bench

    class Tiny:  # the part of bench.Bench that error_bound() reads
        pipe = load_teacher(str(world / "teacher"))
        schedule = NoiseSchedule.from_scheduler(pipe.scheduler)
        captions, seed, guidance = ["one red circle", "two small blue squares", "x"], 1, 3.0
        students = {"lcm": build_student(pipe.unet, "zero").eval(), "splam": build_student(pipe.unet, "fresh").eval()}

    res = Bench.error_bound(Tiny(), 2, strides=(1, 2))
    assert set(res) == {"lcm", "splam"} and set(res["lcm"]) == {"k=20", "k=40"}
    for by_k in res.values():
        for d in by_k.values():
            assert len(d["t"]) == len(d["term"]) == len(d["bound"]) == len(d["error"])
            assert all(b >= e - 1e-5 for b, e in zip(d["bound"], d["error"]))
            assert abs(d["bound"][-1] - d["term"][-1]) < 1e-6
    t = Tiny()
    cond, uncond = encode_text(t.pipe, t.captions[:2]), encode_text(t.pipe, ["", ""])
    z_T = initial_noise(1, 2, t.pipe.unet, 8, 8, 1)
    traj, times = guided_trajectory(t.pipe.unet, cond, uncond, 2.0, t.schedule, z_T)  # w = CFG 3 - 1
    direct = student_error_bounds(t.students, cond, t.schedule, traj, times, (2,))
    assert res["splam"]["k=40"]["bound"] == direct["splam"][2].bound.mean(1).tolist()
    assert res["lcm"]["k=40"]["bound"] != res["splam"]["k=40"]["bound"]  # two different students, two curves
