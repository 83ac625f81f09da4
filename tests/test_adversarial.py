"""The adversarial term for the 1-step student (issue 25, core/adversarial.py): the discriminator reads the frozen
teacher's encoder features, its hinge losses are what they say, each loss trains only its side, and a training run
with --adversarial checkpoints and resumes its discriminator exactly."""
import pytest
import torch
from safetensors.torch import load_file

from splam_studio.core.adversarial import (Heads, adversarial_losses, feature_channels, hinge_losses, one_step,
                                           teacher_features)
from splam_studio.core.splad import SpladConfig, splad_loss
from splam_studio.core.student import make_target, student_F
from tests.test_loop import ckpt, stats, train, world  # noqa: F401 (world is a fixture)


@pytest.fixture(scope="module")
def models(one_step_models):
    return one_step_models[:4]  # (teacher, student, schedule, cond)


def _heads(teacher, seed=0):
    torch.manual_seed(seed)
    return Heads(feature_channels(teacher), width=8)


def test_features_are_the_encoders_outputs_and_the_decoder_never_runs(models):
    teacher, _, _, cond = models
    z, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([10, 700])
    seen, ups = [], []
    hooks = [b.register_forward_hook(lambda _m, _i, out: seen.append(out[0])) for b in teacher.down_blocks]
    hooks.append(teacher.mid_block.register_forward_hook(lambda _m, _i, out: seen.append(out)))
    with torch.no_grad():
        teacher(z, t, encoder_hidden_states=cond)  # a whole forward: what the encoder half computes
    for h in hooks:
        h.remove()
    up = teacher.up_blocks[0].register_forward_hook(lambda *a: ups.append(1))
    with torch.no_grad():
        feats = teacher_features(teacher, z, t, cond)
    up.remove()
    assert not ups  # the decoder half is skipped
    assert len(feats) == len(teacher.down_blocks) + 1 == len(feature_channels(teacher))
    for f, ref, c in zip(feats, seen, feature_channels(teacher)):
        assert f.shape[1] == c
        torch.testing.assert_close(f, ref, rtol=0, atol=0)
    assert not teacher.mid_block._forward_hooks  # no hook left behind


def test_hinge_losses_by_hand():
    d_real, d_fake = torch.tensor([2.0, 0.5]), torch.tensor([-3.0, 0.25])
    l_g, l_d = hinge_losses(d_real, d_fake, d_fake)
    assert l_g.item() == pytest.approx(-(-3.0 + 0.25) / 2)
    assert l_d.item() == pytest.approx((0 + 0.5) / 2 + (0 + 1.25) / 2)


def test_each_loss_trains_only_its_side(models):
    """L_G reaches the fake (and so the student) but not the heads; L_D reaches the heads but not the fake."""
    teacher, _, schedule, cond = models
    heads = _heads(teacher)
    g = torch.Generator().manual_seed(2)
    z_0 = torch.randn(2, 4, 8, 8, generator=g)
    fake = torch.randn(2, 4, 8, 8, generator=g).requires_grad_(True)
    l_g, l_d = adversarial_losses(heads, teacher, schedule, fake, z_0, cond, torch.Generator().manual_seed(3))
    l_g.backward(retain_graph=True)
    assert fake.grad is not None and fake.grad.abs().sum() > 0
    assert all(p.grad is None for p in heads.parameters())
    fake.grad = None
    l_d.backward()
    assert fake.grad is None
    assert all(p.grad is not None for p in heads.parameters()) and sum(p.grad.abs().sum() for p in heads.parameters()) > 0
    assert not any(p.requires_grad for p in teacher.parameters())


def test_losses_derived_independently(models):
    """The losses from the draw order (t_d, then one shared noise) and the hinge formulas, computed here by hand."""
    teacher, _, schedule, cond = models
    heads = _heads(teacher)
    g = torch.Generator().manual_seed(4)
    z_0, fake = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    l_g, l_d = adversarial_losses(heads, teacher, schedule, fake, z_0, cond, torch.Generator().manual_seed(5), t_d_max=600)
    r = torch.Generator().manual_seed(5)
    t_d = torch.randint(0, 601, (2,), generator=r)
    noise = torch.randn(z_0.shape, generator=r)
    a = schedule.alphas_cumprod[t_d].sqrt().float().view(2, 1, 1, 1)
    s = (1 - schedule.alphas_cumprod[t_d]).sqrt().float().view(2, 1, 1, 1)
    with torch.no_grad():
        d_real = heads(teacher_features(teacher, a * z_0 + s * noise, t_d, cond))
        d_fake = heads(teacher_features(teacher, a * fake + s * noise, t_d, cond))
    torch.testing.assert_close(l_g, -d_fake.mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(l_d, torch.relu(1 - d_real).mean() + torch.relu(1 + d_fake).mean(), rtol=1e-5, atol=1e-6)
    # the same image as real and fake: the same noise and t_d, so the same score
    _, l_same = adversarial_losses(heads, teacher, schedule, z_0, z_0, cond, torch.Generator().manual_seed(5), t_d_max=600)
    with torch.no_grad():
        d = heads(teacher_features(teacher, a * z_0 + s * noise, t_d, cond))
    torch.testing.assert_close(l_same, torch.relu(1 - d).mean() + torch.relu(1 + d).mean(), rtol=1e-5, atol=1e-6)


def test_splad_loss_adds_the_weighted_term_on_the_one_step_sample(one_step_models):
    teacher, student, schedule, cond, uncond = one_step_models
    target = make_target(student)
    heads = _heads(teacher)
    g = torch.Generator().manual_seed(6)
    z_0, z_T = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    lam = 0.3
    got = splad_loss(SpladConfig(adversarial=lam), schedule, student, target, teacher, z_0, cond, uncond,
                     torch.Generator().manual_seed(7), critic=heads)
    ref_gen = torch.Generator().manual_seed(7)
    base = splad_loss(SpladConfig(), schedule, student, target, teacher, z_0, cond, uncond, ref_gen)
    fresh = torch.randn(z_0.shape, generator=ref_gen)  # the fake's noise: drawn after the SPLAD draws
    l_g, l_d = adversarial_losses(heads, teacher, schedule, one_step(student_F(student, cond), schedule, fresh), z_0,
                                  cond, ref_gen)
    torch.testing.assert_close(got, base + lam * l_g + l_d, rtol=1e-5, atol=1e-6)
    # teacher data: the fake starts from the stored z_T, as the regression's sample does
    got_T = splad_loss(SpladConfig(adversarial=lam), schedule, student, target, teacher, z_0, cond, uncond,
                       torch.Generator().manual_seed(7), z_T=z_T, critic=heads)
    ref_gen = torch.Generator().manual_seed(7)
    base = splad_loss(SpladConfig(), schedule, student, target, teacher, z_0, cond, uncond, ref_gen)
    l_g, l_d = adversarial_losses(heads, teacher, schedule, one_step(student_F(student, cond), schedule, z_T), z_0,
                                  cond, ref_gen)
    torch.testing.assert_close(got_T, base + lam * l_g + l_d, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="discriminator"):
        splad_loss(SpladConfig(adversarial=lam), schedule, student, target, teacher, z_0, cond, uncond)
    for bad in (dict(adversarial=-0.1), dict(adversarial_t_max=1000), dict(adversarial_t_max=-1)):
        with pytest.raises(ValueError, match="adversarial"):
            SpladConfig(**bad)


def test_adversarial_run_checkpoints_and_resumes_its_discriminator_exactly(world, tmp_path):  # noqa: F811
    straight, _ = train(world, tmp_path, run_name="adv", max_steps=2, adversarial=0.5, adversarial_t_max=500)
    assert all(map(lambda r: r["loss"] == r["loss"], stats(straight)))  # finite
    d1, d2 = ckpt(straight, 1, "critic"), ckpt(straight, 2, "critic")
    assert d1.keys() == d2.keys() and any((d1[k] - d2[k]).abs().max() > 0 for k in d1)  # the heads train
    assert (straight / "checkpoints" / "step-0000002" / "critic_optimizer.json").is_file()
    exported = load_file(next((straight / "unet").glob("*.safetensors")))
    assert not any("heads" in k for k in exported)  # the discriminator is not part of the student
    split, _ = train(world, tmp_path, run_name="adv-split", max_steps=1, adversarial=0.5, adversarial_t_max=500)
    _, lines = train(world, tmp_path, run_name="adv-split", max_steps=2, adversarial=0.5, adversarial_t_max=500,
                     resume="latest")
    assert any("continuing at step 1" in x for x in lines)
    for name in ("student", "critic"):
        a, b = ckpt(straight, 2, name), ckpt(split, 2, name)
        assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6, name
    # the checkpoint check itself: a discriminator's checkpoint against a run without one, and the reverse
    from splam_studio.core.student import build_student, make_target
    from splam_studio.models.loading import load_teacher
    from splam_studio.training.checkpoints import CheckpointError, check_checkpoint, read_checkpoint
    from splam_studio.training.loop import TrainConfig, make_critic_optimizer, make_optimizer

    teacher = load_teacher(str(world / "teacher")).unet
    student = build_student(teacher, "fresh")
    opt = make_optimizer(student, TrainConfig())
    heads = Heads(feature_channels(teacher))
    disc = (heads, make_critic_optimizer(heads, TrainConfig(adversarial=0.5)))
    ck = read_checkpoint(straight / "checkpoints" / "step-0000002")
    check_checkpoint(ck, student, make_target(student), opt, 2, disc)
    with pytest.raises(CheckpointError, match="has a critic and this run has none"):
        check_checkpoint(ck, student, make_target(student), opt, 2, None)
    plain, _ = train(world, tmp_path, run_name="plain", max_steps=1)
    with pytest.raises(CheckpointError, match="lacks critic.safetensors"):
        check_checkpoint(read_checkpoint(plain / "checkpoints" / "step-0000001"), student, make_target(student), opt, 2,
                         disc)
    # a plain run cannot resume an adversarial checkpoint, and the reverse: each says why
    from splam_studio.training.loop import TrainError

    with pytest.raises(TrainError, match="adversarial"):
        train(world, tmp_path, run_name="adv-split", max_steps=3, resume="latest")
