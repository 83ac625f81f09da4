"""The training loop (training/loop.py): each of its pieces unit-tested, and short in-process runs of `loop.run` on the
tiny SD-shaped pipeline of tests/tiny.py (the CLI maps its flags one to one onto `TrainConfig`; tests/test_train.py
runs the CLI itself).

The runs check what a plausible bug in the loop would change: the first step's loss (golden, and derived
independently from the pieces), fresh randomness every step, the EMA target theta^- and the exported student, the
logged lr of a cosine schedule, the gamma projection's own lr group and its training in a LoRA run, gradient
accumulation with an exact resume that also cleans a stale .tmp-* checkpoint, a second epoch, a streamed source and
unreadable items dropped by the live collate.
"""
import io
import itertools
import json
import math
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from splam_studio.training import loop
from splam_studio.training.loop import (StepBatchSampler, TrainConfig, TrainError, add_lora, advance_schedule,
                                        finite_on_all_ranks, make_lr_scheduler, make_optimizer, on_all_ranks,
                                        optimizer_step, param_groups, step_generator)

CAPTIONS = ["one red circle", "two small blue squares", "a large green star", "three yellow triangles"]
# the first step's loss of the base run (seed 3), measured once on the tiny pipeline (diffusers' expected_slice
# pattern); test_first_step_loss also derives it independently from the pieces
GOLDEN_STEP_1_LOSS = 0.43605414032936096


# ---------------------------------------------------------------- a tiny world: teacher, image folders, a tar shard

def _image(seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(16, 16, 3, generator=g) * 255).to(torch.uint8).numpy())


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _folder(root: Path, n: int, captions) -> Path:
    root.mkdir()
    for i in range(n):
        _image(i).save(root / f"{i:02d}.png")
        (root / f"{i:02d}.txt").write_text(captions[i % len(captions)])
    return root


def _truncated(path: Path, caption: str) -> None:
    """A PNG cut in half: its header reads (the item counts in len), its pixels do not (the item reads as None)."""
    png = _png(_image(99))
    path.write_bytes(png[: len(png) // 2])
    path.with_suffix(".txt").write_text(caption)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from tests.tiny import make_tiny_pipeline

    root = tmp_path_factory.mktemp("loop-world")
    make_tiny_pipeline(root / "tok").save_pretrained(root / "teacher", safe_serialization=True)
    _folder(root / "data", 12, CAPTIONS[:3])  # as tests/test_train.py's
    _folder(root / "four", 4, CAPTIONS)  # 2 steps per epoch at batch 2; each caption names one image
    bad = _folder(root / "bad", 5, CAPTIONS + ["one blue star"])
    _truncated(bad / "05.png", "two red circles")
    half = _folder(root / "half", 2, CAPTIONS)  # 2 readable items, 2 unreadable ones
    for i in (2, 3):
        _truncated(half / f"{i:02d}.png", CAPTIONS[i])
    none = root / "none"
    none.mkdir()
    for i in range(4):
        _truncated(none / f"{i:02d}.png", CAPTIONS[i])
    with tarfile.open(root / "shard-000.tar", "w") as tar:  # a streamed source of 4 samples
        for i, cap in enumerate(CAPTIONS):
            for ext, payload in (("png", _png(_image(i))), ("txt", cap.encode())):
                info = tarfile.TarInfo(f"s{i}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return root


class Spy:
    """Wraps the loop's encode_batch and splad_loss (looked up at call time) to see every micro-batch it trains on."""

    def __init__(self):
        self.batches, self.calls = [], []

    def install(self, monkeypatch):
        real_encode, real_loss = loop.encode_batch, loop.splad_loss

        def encode_batch(pipe, batch, *a, **kw):
            self.batches.append(list(batch["caption"]))
            return real_encode(pipe, batch, *a, **kw)

        def splad_loss(cfg, schedule, student, target, teacher, z_0, cond, uncond, gen):
            self.calls.append({"seed": gen.initial_seed(), "state": gen.get_state().clone(),
                               "target_trainable": any(p.requires_grad for p in target.parameters())})
            return real_loss(cfg, schedule, student, target, teacher, z_0, cond, uncond, gen)

        monkeypatch.setattr(loop, "encode_batch", encode_batch)
        monkeypatch.setattr(loop, "splad_loss", splad_loss)


def train(world, out, spy=None, data="data", **kw) -> tuple[Path, list[str]]:
    """loop.run in this process at seed 3, batch 2, a checkpoint and a stats line every step; (run folder, log lines)."""
    from accelerate.state import AcceleratorState, GradientState

    base = dict(teacher=str(world / "teacher"), data=str(world / data), output_dir=str(out), batch_size=2,
                checkpoint_every=1, log_every=1, device="cpu", seed=3)
    loss_fn = kw.pop("loss_fn", None)
    lines = []
    mp = pytest.MonkeyPatch()
    try:
        if spy is not None:
            spy.install(mp)
        return loop.run(TrainConfig(**{**base, **kw}), log=lines.append, loss_fn=loss_fn), lines
    finally:
        mp.undo()
        AcceleratorState._reset_state(True)  # the next run builds its own Accelerator (grad-accum steps differ)
        GradientState._reset_state()


def nan_at(steps: set[int]):
    """splad_loss, NaN at the given calls (= steps at grad_accum 1): a fault injected through run's loss_fn."""
    calls = iter(range(10**6))

    def loss_fn(*args):
        loss = loop.splad_loss(*args)
        return loss * float("nan") if next(calls) in steps else loss
    return loss_fn


def first(sampler, k: int) -> list[list[int]]:
    """The first k batches of an (endless) StepBatchSampler."""
    return list(itertools.islice(iter(sampler), k))


def stats(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "stats.jsonl").read_text().splitlines()) if "loss" in r]


def ckpt(run: Path, step: int, name: str) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"step-{step:07d}" / f"{name}.safetensors")


@pytest.fixture(scope="module")
def base_run(world, tmp_path_factory):
    """SPLAM, full fine-tune, 2 steps on 12 images, mu = 0.9 (not the default, and not 0.5 where mu = 1 - mu)."""
    spy = Spy()
    run, _ = train(world, tmp_path_factory.mktemp("base"), spy=spy, run_name="base", max_steps=2, ema_decay=0.9,
                   keep_checkpoints=2)
    return run, spy


# ---------------------------------------------------------------- the pieces

def test_sampler_gives_each_rank_its_own_batch_and_each_epoch_a_new_order():
    n, bs, world, seed = 12, 2, 2, 5
    per_epoch = n // (bs * world)  # 3 steps
    ranks = [first(StepBatchSampler(n, bs, seed, 0, rank=r, world=world), 2 * per_epoch) for r in range(world)]
    assert all(len(b) == bs for r in ranks for b in r)
    for step in range(2 * per_epoch):  # the ranks of one step read disjoint items
        assert not set(ranks[0][step]) & set(ranks[1][step]), step
    epochs = [[i for r in ranks for b in r[e * per_epoch:(e + 1) * per_epoch] for i in b] for e in (0, 1)]
    for items in epochs:  # an epoch reads every item exactly once over all ranks
        assert sorted(items) == list(range(n))
    order = [[i for b in ranks[0][e * per_epoch:(e + 1) * per_epoch] for i in b] for e in (0, 1)]
    assert order[0] != order[1]  # epoch 2 is a new permutation
    # a resumed sampler continues the same sequence; another seed gives another one
    assert first(StepBatchSampler(n, bs, seed, 4, rank=1, world=world), 2) == ranks[1][4:6]  # a resume continues it
    assert first(StepBatchSampler(n, bs, seed + 1, 0, rank=1, world=world), 6) != ranks[1]
    assert first(StepBatchSampler(n, bs, seed, 0, rank=1, world=world), 40)[:6] == ranks[1]  # endless
    with pytest.raises(TrainError, match="fewer than one batch"):
        StepBatchSampler(3, 2, 0, 0, world=2)


def test_step_generator_is_fresh_per_step_micro_batch_and_rank():
    keys = [(s, m, r) for s in range(4) for m in range(3) for r in range(3)]
    draws = {k: tuple(torch.rand(3, generator=step_generator(7, *k)).tolist()) for k in keys}
    assert len(set(draws.values())) == len(keys)
    assert torch.rand(3, generator=step_generator(7, 2, 1, 1)).tolist() == list(draws[(2, 1, 1)])  # resumable
    assert torch.rand(3, generator=step_generator(8, 2, 1, 1)).tolist() != list(draws[(2, 1, 1)])  # the seed counts


@pytest.fixture(scope="module")
def student():
    from splam_studio.core.student import build_student
    from tests.tiny import tiny_unet

    return build_student(tiny_unet(), "fresh", generator=torch.Generator().manual_seed(0))


def test_gamma_projection_gets_its_own_lr_group(student):
    trainable = {id(p) for p in student.parameters() if p.requires_grad}
    cond_proj = student.time_embedding.cond_proj.weight
    opt = make_optimizer(student, TrainConfig(lr=2e-4))
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["lr"] == opt.param_groups[0]["initial_lr"] == 2e-4
    assert {id(p) for p in opt.param_groups[0]["params"]} == trainable
    opt = make_optimizer(student, TrainConfig(lr=2e-4, cond_proj_lr_scale=10.0))
    rest, gp = opt.param_groups
    assert [id(p) for p in gp["params"]] == [id(cond_proj)]
    assert gp["lr"] == gp["initial_lr"] == pytest.approx(2e-3, rel=1e-12)
    assert rest["lr"] == rest["initial_lr"] == 2e-4 and id(cond_proj) not in {id(p) for p in rest["params"]}
    assert {id(p) for g in opt.param_groups for p in g["params"]} == trainable
    assert isinstance(opt, torch.optim.AdamW) and len(param_groups(student, TrainConfig(cond_proj_lr_scale=0.5))) == 2


def test_lora_student_trains_adapters_and_the_gamma_projection_only(student):
    import copy

    s = add_lora(copy.deepcopy(student), 4)
    names = {n for n, p in s.named_parameters() if p.requires_grad}
    assert "time_embedding.cond_proj.weight" in names
    assert all("lora_" in n for n in names - {"time_embedding.cond_proj.weight"}) and len(names) > 1
    assert not any(p.requires_grad for n, p in s.named_parameters() if "lora_" not in n and "cond_proj" not in n)
    opt = make_optimizer(s, TrainConfig(lr=1e-4, lora_rank=4, cond_proj_lr_scale=3.0))
    assert [p.shape for p in opt.param_groups[1]["params"]] == [s.time_embedding.cond_proj.weight.shape]


class FakeAccelerator:
    """The part of accelerate.Accelerator the step's pieces use; reduce(min) sees the other ranks' values."""

    device = torch.device("cpu")

    def __init__(self, others=(), sync_gradients=True):
        self.others, self.num_processes, self.sync_gradients = list(others), 1 + len(others), sync_gradients

    def reduce(self, t, reduction):
        assert reduction == "min"
        return torch.stack([t, *[torch.tensor(v, dtype=t.dtype) for v in self.others]]).min()

    def clip_grad_norm_(self, params, max_norm):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)


def test_nan_skip_is_decided_for_all_ranks_together():
    good, bad = torch.tensor(0.3), torch.tensor(float("nan"))
    assert finite_on_all_ranks(good, FakeAccelerator())
    assert not finite_on_all_ranks(bad, FakeAccelerator())
    assert not finite_on_all_ranks(torch.tensor(float("inf")), FakeAccelerator())
    assert finite_on_all_ranks(good, FakeAccelerator(others=[1.0, 1.0]))
    assert not finite_on_all_ranks(good, FakeAccelerator(others=[1.0, 0.0]))  # another rank's loss was NaN
    assert not finite_on_all_ranks(bad, FakeAccelerator(others=[1.0]))
    # a batch without one readable item on any rank is skipped by all ranks
    assert on_all_ranks(True, FakeAccelerator()) and not on_all_ranks(False, FakeAccelerator())
    assert on_all_ranks(True, FakeAccelerator(others=[1.0])) and not on_all_ranks(True, FakeAccelerator(others=[0.0]))


def test_optimizer_step_clips_the_gradient_and_follows_the_schedule():
    w = torch.nn.Parameter(torch.zeros(10))
    opt = torch.optim.SGD([w], lr=1.0)
    opt.param_groups[0]["initial_lr"] = 1.0  # as make_optimizer sets it
    cfg = TrainConfig(max_steps=4, lr_schedule="cosine", max_grad_norm=0.5)
    sched = make_lr_scheduler(opt, cfg, start=1)  # a run resumed at step 1
    w.grad = torch.full((10,), 3.0)  # norm 9.49
    lr = optimizer_step(FakeAccelerator(), opt, [w], 1, cfg, sched)
    assert lr == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)), rel=1e-12)
    assert w.detach().norm().item() == pytest.approx(lr * 0.5, rel=1e-6)  # SGD moved by lr x the clipped gradient
    assert w.grad is None and opt.param_groups[0]["lr"] == pytest.approx(0.5, rel=1e-12)  # step 2's lr is next
    with pytest.raises(RuntimeError, match="schedule is at step 2, the loop at 3"):  # a skipped step not advanced
        optimizer_step(FakeAccelerator(), opt, [w], 3, cfg, sched)
    w.grad = torch.full((10,), 3.0)
    optimizer_step(FakeAccelerator(sync_gradients=False), opt, [w], 2, cfg, sched)  # a micro-step inside accumulation
    assert sched.last_epoch == 2 and w.detach().norm().item() > lr * 0.5  # no clip there, and no schedule step
    advance_schedule(sched)  # a skipped (non-finite) step moves the schedule too
    w.grad = torch.full((10,), 3.0)
    assert optimizer_step(FakeAccelerator(), opt, [w], 3, cfg, sched) == pytest.approx(0.5 * (1 + math.cos(3 * math.pi / 4)))


@pytest.mark.parametrize("schedule,warmup,expected", [
    ("constant", 0, [1, 1, 1, 1, 1]),
    ("cosine", 0, [1, 0.5 * (1 + math.cos(math.pi / 5)), 0.5 * (1 + math.cos(2 * math.pi / 5)),
                   0.5 * (1 + math.cos(3 * math.pi / 5)), 0.5 * (1 + math.cos(4 * math.pi / 5))]),
    ("constant", 2, [0, 0.5, 1, 1, 1]),
    ("cosine", 2, [0, 0.5, 1, 0.5 * (1 + math.cos(math.pi / 3)), 0.5 * (1 + math.cos(2 * math.pi / 3))]),
])
def test_lr_schedule_per_step_and_resumed(schedule, warmup, expected):
    """The lr of steps 0..4 of max_steps 5 (diffusers' get_scheduler, formulas written out here), the same when the
    schedule is built at a resumed step."""
    cfg = TrainConfig(max_steps=5, lr=1e-4, lr_schedule=schedule, lr_warmup_steps=warmup)
    w = torch.nn.Parameter(torch.zeros(1))
    opt = make_optimizer(torch.nn.Linear(1, 1), cfg)
    sched = make_lr_scheduler(opt, cfg)
    lrs = []
    for step in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        advance_schedule(sched)
    assert lrs == pytest.approx([1e-4 * e for e in expected], rel=1e-12, abs=1e-15)
    resumed = make_optimizer(torch.nn.Linear(1, 1), cfg)
    make_lr_scheduler(resumed, cfg, start=3)
    assert resumed.param_groups[0]["lr"] == pytest.approx(lrs[3], rel=1e-12)
    assert w.grad is None


def test_run_name_cannot_leave_the_output_dir(world, tmp_path):
    out = tmp_path / "out"
    for bad in ("../escaped", "a/b", "..", ".hidden", str(tmp_path / "absolute")):
        with pytest.raises(TrainError, match="run_name must be a plain folder name"):
            train(world, out, run_name=bad, max_steps=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written, inside or outside


# ---------------------------------------------------------------- runs

def test_first_step_loss_is_golden_and_derived_independently(world, base_run):
    """Step 1 rebuilt from its parts: the sampler's first batch, the step's generator, z_0 = VAE sample x scaling_factor,
    the student from the seed, theta^- its copy, and splad_loss; equal to the run's logged loss."""
    from splam_studio.core.schedule import NoiseSchedule
    from splam_studio.core.splad import splad_loss
    from splam_studio.core.student import build_student, make_target
    from splam_studio.core.teacher import encode_text
    from splam_studio.models.loading import load_teacher
    from splam_studio.training.data import build_dataset, collate_drop_none

    run, _ = base_run
    logged = stats(run)
    assert [r["step"] for r in logged] == [1, 2]
    pipe = load_teacher(str(world / "teacher"))
    ds = build_dataset(str(world / "data"), 16, seed=3)
    batch = collate_drop_none([ds[i] for i in next(iter(StepBatchSampler(len(ds), 2, 3, 0)))])
    gen = step_generator(3, 0, 0, 0)
    with torch.no_grad():
        z_0 = pipe.vae.encode(batch["pixel_values"]).latent_dist.sample(generator=gen) * pipe.vae.config.scaling_factor
        cond, uncond = encode_text(pipe, batch["caption"]), encode_text(pipe, [""]).expand(2, -1, -1)
    assert pipe.vae.config.scaling_factor != 1.0  # else the factor could not be seen
    student = build_student(pipe.unet.requires_grad_(False), "fresh", generator=torch.Generator().manual_seed(3))
    cfg = TrainConfig(seed=3, ema_decay=0.9).splad()
    loss = splad_loss(cfg, NoiseSchedule.from_scheduler(pipe.scheduler), student, make_target(student), pipe.unet,
                      z_0, cond, uncond, gen).item()
    assert logged[0]["loss"] == pytest.approx(loss, rel=1e-6, abs=1e-7)
    assert logged[0]["loss"] == pytest.approx(GOLDEN_STEP_1_LOSS, rel=1e-5)
    assert logged[1]["loss"] != logged[0]["loss"]
    assert [r["lr"] for r in logged] == [1e-5, 1e-5]  # the constant schedule at the default lr


def test_every_step_draws_fresh_t_eps_and_gamma(base_run):
    _, spy = base_run
    assert len(spy.calls) == 2
    assert spy.calls[0]["seed"] != spy.calls[1]["seed"]
    assert not torch.equal(spy.calls[0]["state"], spy.calls[1]["state"])
    assert not any(c["target_trainable"] for c in spy.calls)  # theta^- is frozen: no gradient reaches it


def test_target_is_the_ema_of_the_student_and_is_what_is_exported(base_run):
    run, _ = base_run
    t1, t2, s2 = ckpt(run, 1, "target"), ckpt(run, 2, "target"), ckpt(run, 2, "student")
    assert t1.keys() == t2.keys() == s2.keys() and len(t2) > 10
    for k in t2:  # Algorithm 1 step 7: theta^- <- mu theta^- + (1 - mu) theta, mu = 0.9
        assert torch.allclose(t2[k], 0.9 * t1[k] + 0.1 * s2[k], rtol=1e-5, atol=1e-7), k
    assert any(not torch.equal(t2[k], s2[k]) for k in t2)
    exported = load_file(run / "unet" / "diffusion_pytorch_model.safetensors")
    for k in t2:  # the exported student is the last checkpoint's theta^-, not the online student
        assert torch.equal(exported[k], t2[k]), k


def test_the_run_clips_the_gradient_norm(world, tmp_path, base_run):
    """Clipped to a norm of 1e-12, AdamW's first update is lr g / (|g| + eps) ~ lr 1e-7: the student stays put.
    Step 1's theta^- = mu theta_0 + (1 - mu) theta_1, so theta_1 - theta^-_1 = mu (theta_1 - theta_0) shows the move."""
    run, _ = train(world, tmp_path, run_name="clip", max_steps=1, max_grad_norm=1e-12)

    def moved(r):
        s, t = ckpt(r, 1, "student"), ckpt(r, 1, "target")
        return max((s[k] - t[k]).abs().max().item() for k in s)

    assert moved(base_run[0]) > 1e-6  # at max_grad_norm 1, lr 1e-5: about 0.9 lr
    assert moved(run) < 1e-9


def test_lora_run_with_cosine_lr_and_gamma_projection_group(world, tmp_path):
    from splam_studio.core.student import build_student
    from splam_studio.models.loading import load_teacher

    run, _ = train(world, tmp_path, run_name="lora", max_steps=3, lora_rank=4, lr=1e-4, lr_schedule="cosine",
                   cond_proj_lr_scale=10.0, snapshot_every=1)
    rows = stats(run)
    expected = [1e-4 * 0.5 * (1 + math.cos(math.pi * s / 3)) for s in range(3)]  # 1e-4, 7.5e-5, 2.5e-5
    assert [r["lr"] for r in rows] == pytest.approx(expected, rel=1e-12)
    groups = json.loads((run / "checkpoints" / "step-0000002" / "optimizer.json").read_text())["param_groups"]
    assert [g["initial_lr"] for g in groups] == pytest.approx([1e-4, 1e-3], rel=1e-12)
    # after 2 steps the schedule is at step 3's lr (0-based 2): 0.25 x each group's own initial_lr
    assert [g["lr"] for g in groups] == pytest.approx([1e-4 * 0.25, 1e-3 * 0.25], rel=1e-12) and len(groups[1]["params"]) == 1
    s = ckpt(run, 3, "student")
    assert any("lora" in k for k in s)
    fresh = build_student(load_teacher(str(world / "teacher")).unet, "fresh", generator=torch.Generator().manual_seed(3))
    trained = s["time_embedding.cond_proj.weight"]  # the LoRA run trains the gamma projection
    assert not torch.allclose(trained, fresh.time_embedding.cond_proj.weight)
    assert (run / "lora").is_dir() and (run / "lora_kohya.safetensors").is_file()
    # bench --curves scores each snapshot with its own LoRA weights (training's adapter "default", the loaded
    # student's "student"), not the final adapter with the snapshot's gamma projection
    from splam_studio.tools.bench import curves

    seen = {}

    class Bench:  # the part of bench.Bench that curves() uses, without the evaluator
        n, guidance, pipe, log = 1, 7.5, load_teacher(str(world / "teacher")), staticmethod(lambda *a: None)

        def evaluate_unet(self, method, unet, steps, student_guidance=1.0):
            seen.setdefault(len(seen) // 1, {k: v.clone() for k, v in unet.state_dict().items() if "lora_B" in k})
            return {"fid": 0.0, "teacher_mse": 0.0}

    curves(Bench(), [run], steps=(1,), untrained=False)
    snaps = [load_file(p) for p in sorted((run / "snapshots").glob("step-*.safetensors"))]
    assert len(snaps) == 3 and len(seen) == 3
    for i, snap in enumerate(snaps):
        got = {k.replace(".student.", ".default."): v for k, v in seen[i].items()}
        assert got.keys() == {k for k in snap if "lora_B" in k}
        assert all(torch.equal(got[k].half(), snap[k]) for k in got), i
    assert any(not torch.equal(snaps[0][k], snaps[2][k]) for k in got)  # the points are different models


def test_grad_accum_resume_is_exact_and_cleans_stale_tmp_checkpoints(world, tmp_path):
    straight_spy, split_spy = Spy(), Spy()
    straight, _ = train(world, tmp_path, spy=straight_spy, run_name="straight", max_steps=2, grad_accum=2)
    assert [r["step"] for r in stats(straight)] == [1, 2]
    assert len(straight_spy.calls) == 4 and len({c["seed"] for c in straight_spy.calls}) == 4
    sampler = [[CAPTIONS[i % 3] for i in b] for b in first(StepBatchSampler(12, 2, 3, 0), 4)]
    assert straight_spy.batches == sampler  # 2 micro-batches per step, in the sampler's order
    split, _ = train(world, tmp_path, run_name="split", max_steps=1, grad_accum=2)
    stale = split / "checkpoints" / ".tmp-step-0000002-4242"  # a checkpoint write cut short by kill -9
    stale.mkdir()
    (stale / "student.safetensors").write_bytes(b"half")
    _, lines = train(world, tmp_path, spy=split_spy, run_name="split", max_steps=2, grad_accum=2, resume="latest")
    assert any("continuing at step 1" in x for x in lines)
    assert split_spy.batches == sampler[2:] and [c["seed"] for c in split_spy.calls] == [c["seed"] for c in straight_spy.calls[2:]]
    assert not list((split / "checkpoints").glob(".tmp-*"))
    a, b = ckpt(straight, 2, "student"), ckpt(split, 2, "student")
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_second_epoch_reads_every_item_again(world, tmp_path):
    spy = Spy()
    run, _ = train(world, tmp_path, spy=spy, data="four", run_name="epochs", max_steps=5)
    assert [r["step"] for r in stats(run)] == [1, 2, 3, 4, 5]
    assert [len(b) for b in spy.batches] == [2] * 5
    for e in (0, 1):  # 2 steps per epoch
        assert sorted(spy.batches[2 * e] + spy.batches[2 * e + 1]) == sorted(CAPTIONS), e
    assert spy.batches[4][0] in CAPTIONS


def test_streamed_source_is_read_again_when_it_ends(world, tmp_path):
    spy = Spy()
    run, _ = train(world, tmp_path, spy=spy, data="shard-000.tar", run_name="stream", max_steps=3)
    assert [r["step"] for r in stats(run)] == [1, 2, 3]
    assert spy.batches[:2] == [CAPTIONS[:2], CAPTIONS[2:]] and spy.batches[2] == CAPTIONS[:2]  # a second pass


def test_unreadable_items_are_dropped_by_the_live_collate(world, tmp_path):
    spy = Spy()
    run, lines = train(world, tmp_path, spy=spy, data="bad", run_name="bad", max_steps=3)
    assert [r["step"] for r in stats(run)] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in stats(run))
    assert sorted(c for b in spy.batches for c in b) == sorted(CAPTIONS + ["one blue star"])  # 05.png never trains
    assert sorted(len(b) for b in spy.batches) == [1, 2, 2]
    done = [x for x in lines if x.startswith("done:")]
    assert len(done) == 1 and "truncated image (05.png)" in done[0], lines


def test_a_batch_of_only_unreadable_items_is_replaced_by_the_next(world, tmp_path):
    """2 of 4 items unreadable at batch 2: the step whose batch holds both trains on the next batch instead (it used
    to end the run with 'the data ran out'); with no readable item at all the run stops with one clear sentence."""
    from splam_studio.training.data import DataError

    assert [2, 3] in [sorted(b) for b in first(StepBatchSampler(4, 2, 0, 0), 2)]  # seed 0
    spy = Spy()
    run, _ = train(world, tmp_path, spy=spy, data="half", run_name="half", max_steps=2, seed=0)
    assert [r["step"] for r in stats(run)] == [1, 2]
    assert len(spy.batches) == 2 and all(set(b) <= set(CAPTIONS[:2]) for b in spy.batches)
    with pytest.raises(DataError, match=r"4 batches in a row had no readable item .*4 x corrupt or truncated"):
        train(world, tmp_path, data="none", run_name="none", max_steps=2)
    assert not (tmp_path / "none").exists()


def test_streamed_source_resumes_at_its_position(world, tmp_path):
    spy = Spy()
    train(world, tmp_path, data="shard-000.tar", run_name="s", max_steps=1)
    _, lines = train(world, tmp_path, spy=spy, data="shard-000.tar", run_name="s", max_steps=2, resume="latest")
    assert any("continuing at step 1" in x for x in lines)
    assert spy.batches == [CAPTIONS[2:]]  # the stream's second batch, not its first again


def test_non_finite_steps_are_skipped_on_schedule_and_counted_in_a_row(world, tmp_path):
    run, lines = train(world, tmp_path, run_name="nan", max_steps=4, lr=1e-4, lr_schedule="cosine", loss_fn=nan_at({1}))
    rows = stats(run)
    assert [r["step"] for r in rows] == [1, 3, 4]  # step 2 skipped; the schedule moved on with it
    assert [r["lr"] for r in rows] == pytest.approx([1e-4 * 0.5 * (1 + math.cos(math.pi * s / 4)) for s in (0, 2, 3)],
                                                    rel=1e-12)
    _, lines = train(world, tmp_path, run_name="nan2", max_steps=6, max_bad_steps=3, loss_fn=nan_at({0, 1, 3, 4}))
    assert "step 4: non-finite loss, step skipped (2 in a row, 4 total)" in lines  # a good step resets the count
    with pytest.raises(TrainError, match="3 non-finite losses in a row at step 2"):
        train(world, tmp_path, run_name="nan3", max_steps=6, max_bad_steps=3, loss_fn=nan_at({0, 1, 2}))


# ---------------------------------------------------------------- the config: nested, built and read flat

# the settings of a training_config.json as the trainer wrote it before TrainConfig was nested (flat, no
# lr_warmup_steps), in its order; derived keys (k, dtypes, ...) follow them in the file
FLAT_LAYOUT = ["teacher", "teacher_config", "data", "prompts", "images_per_prompt", "cache_latents", "method", "run_name",
               "output_dir", "w", "num_ddim_steps", "m", "distance", "huber_c", "ema_decay", "cond_proj_init",
               "gamma_one_prob", "cond_proj_lr_scale", "gamma_scale", "gamma_time", "w_min", "w_max", "init_from",
               "save_fp16", "export_merged", "max_steps", "batch_size", "grad_accum", "lr", "lr_schedule", "weight_decay",
               "max_grad_norm", "lora_rank", "use_8bit_adam", "gradient_checkpointing", "resolution", "caption_column",
               "image_column", "num_workers", "shapes_size", "device", "precision", "seed", "allow_pickle",
               "checkpoint_every", "keep_checkpoints", "validate_every", "snapshot_every", "validation_prompts",
               "log_every", "max_bad_steps", "resume", "overwrite"]


def test_config_is_nested_and_keeps_its_flat_names():
    from splam_studio.core.splad import SpladConfig
    from splam_studio.training.loop import Optimisation, flat_fields

    cfg = TrainConfig(method="lcm", w=6.5, lr=2e-4, data="x", seed=4)
    assert cfg.objective == SpladConfig(method="lcm", w=6.5) and cfg.splad() is cfg.objective
    assert cfg.optimisation.lr == cfg.lr == 2e-4 and cfg.inputs.data == cfg.data == "x" and cfg.run.seed == 4
    assert TrainConfig(optimisation=Optimisation(lr=3e-4), max_steps=7).optimisation == Optimisation(lr=3e-4, max_steps=7)
    names = [f.name for _, f in flat_fields()]
    assert sorted(names) == sorted(FLAT_LAYOUT + ["lr_warmup_steps", "vae", "prompts_seed", "k_high", "t_high", "t_top_prob", "regression", "adversarial", "adversarial_t_max", "adversarial_lr", "dmd", "dmd_lr", "prompts_w", "regression_prompts"]) and list(cfg.flat()) == names
    assert all(f.metadata["help"] for _, f in flat_fields())  # every default documented where it is declared
    with pytest.raises(TypeError, match="unknown settings"):
        TrainConfig(learning_rate=1e-4)
    for bad in (dict(lr=2.0), dict(lr=0.0), dict(lr_warmup_steps=-1), dict(lr_schedule="linear")):
        with pytest.raises(TrainError, match=f"invalid config values: {next(iter(bad))}="):
            TrainConfig(**bad).validate()
    with pytest.raises(TrainError, match="method must be 'splam' or 'lcm', got 'dmd'"):
        TrainConfig(method="dmd")  # the objective's own check (SpladConfig), at once


def test_a_run_written_with_the_flat_layout_resumes(world, tmp_path):
    from splam_studio.store.atomic import write_json

    run, _ = train(world, tmp_path, run_name="old", max_steps=1, lr=2e-5)
    written = json.loads((run / "training_config.json").read_text())
    assert set(FLAT_LAYOUT) <= set(written) and not any(isinstance(v, dict) for k, v in written.items()
                                                         if k in FLAT_LAYOUT)  # flat on disk
    write_json(run / "training_config.json", {k: written[k] for k in [*FLAT_LAYOUT, "k", "batch_size_requested"]})
    with pytest.raises(TrainError, match=r"--lr 3e-05 \(the run has 2e-05\)"):
        train(world, tmp_path, run_name="old", max_steps=2, lr=3e-5, resume="latest")
    resumed, lines = train(world, tmp_path, run_name="old", max_steps=2, lr=2e-5, resume="latest")
    assert any("continuing at step 1" in x for x in lines) and [r["step"] for r in stats(resumed)] == [1, 2]
    assert json.loads((run / "training_config.json").read_text())["lr_warmup_steps"] == 0


def test_resumed_curves_keep_the_runs_not_measured_again():
    """bench --curves --resume-curves over some runs keeps the file's other runs and its note (it dropped them)."""
    from splam_studio.tools.bench import merge_curves

    done = {"n": 500, "guidance": 7.5, "note": "how", "untrained": {"1": 1}, "runs": {"a": {"points": [1]}, "b": {"points": [2]}}}
    new = {"n": 500, "guidance": 7.5, "untrained": {"1": 1}, "runs": {"b": {"points": [3]}, "c": {"points": [4]}}, "wall_s": 9}
    out = merge_curves(done, new)
    assert out["runs"] == {"a": {"points": [1]}, "b": {"points": [3]}, "c": {"points": [4]}}
    assert out["note"] == "how" and out["wall_s"] == 9
    assert merge_curves(None, new) == new


def test_curves_are_written_atomically(tmp_path, monkeypatch):
    """A bench killed while writing its curves leaves the earlier file whole (--resume-curves reads it next)."""
    import numpy as np

    from splam_studio.tools.bench import write_curves

    path = tmp_path / "c.json"
    write_curves(path, {"runs": {"a": {"fid": np.float32(1.5)}}})
    assert json.loads(path.read_text()) == {"runs": {"a": {"fid": 1.5}}}

    def killed(self, *a, **k):  # the file opened for writing (truncated), then the process is killed
        open(self, "w").close()
        raise KeyboardInterrupt
    monkeypatch.setattr(type(path), "write_text", killed)
    with pytest.raises(KeyboardInterrupt):
        write_curves(path, {"runs": {}})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"runs": {"a": {"fid": 1.5}}} and [p.name for p in tmp_path.iterdir()] == ["c.json"]
