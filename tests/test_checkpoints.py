"""Checkpoints and snapshots of a run (training/checkpoints.py) on small modules: what is written is what comes back."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from splam_studio.training.checkpoints import (CheckpointError, find_checkpoint, load_checkpoint, save_checkpoint,
                                               save_snapshot)


def _models(seed: int):
    """A student with a frozen part (as a LoRA run's base), its target (differing from it), and an Adam after a step."""
    torch.manual_seed(seed)
    student = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    student[0].requires_grad_(False)
    target = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)).requires_grad_(False)
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=1e-2)
    student(torch.randn(5, 3)).pow(2).sum().backward()
    opt.step()
    return student, target, opt


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_checkpoint_round_trip(tmp_path):
    student, target, opt = _models(0)
    scaler = {"scale": 512.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000, "_growth_tracker": 7}
    ckpt = save_checkpoint(tmp_path, 30, student, target, opt, keep=3, grad_scaler=scaler)
    assert ckpt == tmp_path / "checkpoints" / "step-0000030"
    s2, t2, o2 = _models(1)
    frozen_before = _state(s2)["0.weight"]

    class Scaler:
        def load_state_dict(self, sd):
            self.sd = sd

    sc = Scaler()
    assert load_checkpoint(ckpt, s2, t2, o2, sc) == 30
    assert sc.sd == scaler
    for k in ("1.weight", "1.bias"):  # trainable tensors: the student's and the target's own
        assert torch.equal(s2.state_dict()[k], student.state_dict()[k])
        assert torch.equal(t2.state_dict()[k], target.state_dict()[k])
        assert not torch.equal(t2.state_dict()[k], student.state_dict()[k])
    assert torch.equal(s2.state_dict()["0.weight"], frozen_before)  # frozen tensors are not in the checkpoint
    a, b = opt.state_dict(), o2.state_dict()
    assert json.loads(json.dumps(a["param_groups"])) == json.loads(json.dumps(b["param_groups"]))  # (betas: a list after JSON)
    for idx in a["state"]:
        for name, v in a["state"][idx].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(b["state"][idx][name])), (idx, name)


def test_a_checkpoint_missing_tensors_is_refused(tmp_path):
    student, target, opt = _models(0)
    ckpt = save_checkpoint(tmp_path, 5, student, target, opt, keep=1)
    sd = load_file(ckpt / "student.safetensors")
    del sd["1.bias"]
    save_file(sd, ckpt / "student.safetensors")
    s2, t2, o2 = _models(1)
    with pytest.raises(CheckpointError, match=r"student\.safetensors does not match this run's (student|model).*1 missing tensors, e\.g\. 1\.bias"):
        load_checkpoint(ckpt, s2, t2, o2)


def test_snapshots_hold_the_target_in_fp16(tmp_path):
    student, target, _ = _models(0)
    out = save_snapshot(tmp_path, 12, student, target)
    assert out == tmp_path / "snapshots" / "step-0000012.safetensors"
    sd = load_file(out)
    assert set(sd) == {"1.weight", "1.bias"}  # theta^-'s trainable tensors only
    for k, v in sd.items():
        assert v.dtype == torch.float16
        assert torch.equal(v, target.state_dict()[k].half()) and not torch.equal(v, student.state_dict()[k].half())


def test_keep_latest_and_incomplete(tmp_path):
    student, target, opt = _models(0)
    for step in (10, 20, 30):
        save_checkpoint(tmp_path, step, student, target, opt, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-0000020", "step-0000030"]  # the newest `keep`, no temporary folder left
    assert find_checkpoint(tmp_path, "latest") == tmp_path / "checkpoints" / "step-0000030"
    broken = tmp_path / "checkpoints" / "step-0000040"  # a checkpoint cut off before its state.json
    broken.mkdir()
    (broken / "student.safetensors").write_bytes(b"")
    assert find_checkpoint(tmp_path, "latest") == tmp_path / "checkpoints" / "step-0000030"
    with pytest.raises(CheckpointError, match="no state.json"):
        find_checkpoint(tmp_path, str(broken))
    assert find_checkpoint(tmp_path / "nothing-here", "latest") is None
    state = json.loads((tmp_path / "checkpoints" / "step-0000030" / "state.json").read_text())
    assert state["step"] == 30 and state["grad_scaler"] is None


def test_a_checkpoint_missing_a_file_or_past_max_steps_is_refused(tmp_path):
    student, target, opt = _models(0)
    ckpt = save_checkpoint(tmp_path, 5, student, target, opt, keep=1)
    s2, t2, o2 = _models(1)
    with pytest.raises(CheckpointError, match="at step 5, past --max-steps 4"):
        load_checkpoint(ckpt, s2, t2, o2, max_steps=4)
    assert load_checkpoint(ckpt, s2, t2, o2, max_steps=5) == 5
    (ckpt / "optimizer.safetensors").unlink()
    with pytest.raises(CheckpointError, match="lacks optimizer.safetensors"):
        load_checkpoint(ckpt, s2, t2, o2)
