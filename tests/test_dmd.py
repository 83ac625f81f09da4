"""Distribution matching for the 1-step student (issue 25, core/dmd.py): the normalised gradient is DMD's, each loss
trains only its side, the losses derive by hand from the draw order, splad_loss adds exactly W L_DM + L_fake, and a
training run with --dmd checkpoints and resumes its fake score exactly."""
import pytest
import torch

from splam_studio.core.adversarial import one_step
from splam_studio.core.dmd import dm_gradient, dmd_losses, make_fake_score
from splam_studio.core.splad import SpladConfig, splad_loss
from splam_studio.core.student import make_target, student_F
from tests.test_loop import ckpt, stats, train, world  # noqa: F401 (world is a fixture)


@pytest.fixture(scope="module")
def models(one_step_models):
    return one_step_models  # (teacher, student, schedule, cond, uncond)


def _fake(teacher, seed=0):
    """A fake score that differs from the teacher (a fresh copy equals it, and then the gradient is 0)."""
    fake = make_fake_score(teacher)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in fake.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return fake


def test_dm_gradient_by_hand():
    x = torch.tensor([[[[1.0, 2.0]]], [[[0.0, 0.0]]]])
    real = torch.tensor([[[[0.0, 0.0]]], [[[1.0, -1.0]]]])
    fake = torch.tensor([[[[3.0, 1.0]]], [[[0.0, 0.0]]]])
    g = dm_gradient(x, real, fake)
    # sample 0: mean |x - real| = 1.5, g = (fake - real) / 1.5; sample 1: mean |x - real| = 1, g = -real
    torch.testing.assert_close(g, torch.tensor([[[[2.0, 2 / 3]]], [[[-1.0, 1.0]]]]))


def test_fake_score_starts_as_the_teacher_and_trains_apart(models):
    teacher, *_ = models
    fake = make_fake_score(teacher)
    assert all(p.requires_grad for p in fake.parameters()) and not any(p.requires_grad for p in teacher.parameters())
    for (k, a), (_, b) in zip(teacher.state_dict().items(), fake.state_dict().items()):
        torch.testing.assert_close(a.float(), b, rtol=0, atol=0, msg=k)
    with torch.no_grad():
        next(fake.parameters()).add_(1.0)
    assert (next(fake.parameters()) - next(teacher.parameters())).abs().max() > 0.5  # a copy, not shared weights


def test_each_loss_trains_only_its_side(models):
    """L_DM reaches x^ (and so the student) but not the fake score; L_fake reaches the fake score but not x^."""
    teacher, _, schedule, cond, uncond = models
    fake = _fake(teacher)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    l_dm, l_fake = dmd_losses(fake, teacher, schedule, x, cond, uncond, 6.5, torch.Generator().manual_seed(3))
    l_dm.backward(retain_graph=True)
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in fake.parameters())
    x.grad = None
    l_fake.backward()
    assert x.grad is None
    assert sum(p.grad.abs().sum() for p in fake.parameters() if p.grad is not None) > 0
    assert not any(p.requires_grad for p in teacher.parameters())


def test_losses_derived_independently(models):
    """From the draw order (t, n for the gradient; t', n' for the fake's loss): the gradient in x^ is
    (x0_fake - x0_real) / mean |x^ - x0_real| / numel, x0 = (x_t - sigma eps) / alpha, the real eps the teacher's CFG."""
    teacher, _, schedule, cond, uncond = models
    fake, w = _fake(teacher), 3.0
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4)).requires_grad_(True)
    l_dm, l_fake = dmd_losses(fake, teacher, schedule, x, cond, uncond, w, torch.Generator().manual_seed(5),
                              t_min=100, t_max=900)
    (grad,) = torch.autograd.grad(l_dm, x)
    r = torch.Generator().manual_seed(5)
    t = torch.randint(100, 901, (2,), generator=r)
    n = torch.randn(x.shape, generator=r)
    ac = schedule.alphas_cumprod[t]
    a, s = ac.sqrt().float().view(2, 1, 1, 1), (1 - ac).sqrt().float().view(2, 1, 1, 1)
    xd = x.detach()
    x_t = a * xd + s * n
    with torch.no_grad():
        e_c = teacher(x_t, t, encoder_hidden_states=cond).sample
        e_u = teacher(x_t, t, encoder_hidden_states=uncond).sample
        e_f = fake(x_t, t, encoder_hidden_states=cond).sample
    x0_real = (x_t - s * (e_c + w * (e_c - e_u))) / a
    x0_fake = (x_t - s * e_f) / a
    weight = (xd - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(grad, (x0_fake - x0_real) / weight / x.numel(), rtol=1e-4, atol=1e-8)
    t_f = torch.randint(0, schedule.T, (2,), generator=r)
    n_f = torch.randn(x.shape, generator=r)
    acf = schedule.alphas_cumprod[t_f]
    x_f = acf.sqrt().float().view(2, 1, 1, 1) * xd + (1 - acf).sqrt().float().view(2, 1, 1, 1) * n_f
    with torch.no_grad():
        ref_fake = ((fake(x_f, t_f, encoder_hidden_states=cond).sample - n_f) ** 2).mean()
    torch.testing.assert_close(l_fake.detach(), ref_fake, rtol=1e-5, atol=1e-7)
    # a fake score equal to the real one (a fresh copy, w = 0: the conditional teacher) gives no gradient
    l0, _ = dmd_losses(make_fake_score(teacher), teacher, schedule, x, cond, uncond, 0.0, torch.Generator().manual_seed(5))
    (g0,) = torch.autograd.grad(l0, x)
    assert g0.abs().max() < 1e-6


def test_splad_loss_adds_the_weighted_terms_on_the_one_step_sample(models):
    teacher, student, schedule, cond, uncond = models
    target, fake = make_target(student), _fake(teacher)
    g = torch.Generator().manual_seed(6)
    z_0, z_T = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    lam, w = 0.4, 6.5
    for kw in ({}, {"z_T": z_T}):  # image data (fresh noise for the sample) and teacher data (the stored z_T)
        got = splad_loss(SpladConfig(dmd=lam, w=w), schedule, student, target, teacher, z_0, cond, uncond,
                         torch.Generator().manual_seed(7), critic=fake, **kw)
        ref_gen = torch.Generator().manual_seed(7)
        base = splad_loss(SpladConfig(w=w), schedule, student, target, teacher, z_0, cond, uncond, ref_gen)
        noise = kw.get("z_T", None)
        noise = torch.randn(z_0.shape, generator=ref_gen) if noise is None else noise
        l_dm, l_fake = dmd_losses(fake, teacher, schedule, one_step(student_F(student, cond), schedule, noise), cond,
                                  uncond, w, ref_gen)
        torch.testing.assert_close(got, base + lam * l_dm + l_fake, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="fake score"):
        splad_loss(SpladConfig(dmd=lam), schedule, student, target, teacher, z_0, cond, uncond)
    with pytest.raises(ValueError, match="dmd"):
        SpladConfig(dmd=-1.0)
    with pytest.raises(ValueError, match="one of them"):
        SpladConfig(dmd=0.1, adversarial=0.1)


def test_dmd_run_checkpoints_and_resumes_its_fake_score_exactly(world, tmp_path):  # noqa: F811
    straight, _ = train(world, tmp_path, run_name="dmd", max_steps=2, dmd=0.5, dmd_lr=1e-3)
    assert all(r["loss"] == r["loss"] for r in stats(straight))  # finite
    f1, f2 = ckpt(straight, 1, "critic"), ckpt(straight, 2, "critic")
    assert f1.keys() == f2.keys() and any((f1[k] - f2[k]).abs().max() > 0 for k in f1)  # the fake score trains
    assert any(k.startswith("down_blocks") for k in f1)  # a whole UNet, not heads
    split, _ = train(world, tmp_path, run_name="dmd-split", max_steps=1, dmd=0.5, dmd_lr=1e-3)
    _, lines = train(world, tmp_path, run_name="dmd-split", max_steps=2, dmd=0.5, dmd_lr=1e-3, resume="latest")
    assert any("continuing at step 1" in x for x in lines)
    for name in ("student", "critic"):
        a, b = ckpt(straight, 2, name), ckpt(split, 2, name)
        assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6, name
    from splam_studio.training.loop import TrainError

    with pytest.raises(TrainError, match="dmd"):  # a plain resume of a --dmd run says what differs
        train(world, tmp_path, run_name="dmd-split", max_steps=3, resume="latest")


def test_the_fake_score_starts_from_the_fp32_teacher_under_bf16(world):  # noqa: F811
    """--precision bf16 casts the frozen teacher; the fake score, trained in fp32, is copied from its fp32 weights."""
    from splam_studio.models.loading import load_teacher
    from splam_studio.training.device import resolve_runtime
    from splam_studio.training.loop import TrainConfig, setup_models

    rt = resolve_runtime("cpu", "bf16")
    m = setup_models(TrainConfig(teacher=str(world / "teacher"), dmd=0.5), rt, rt.device)
    fp32 = load_teacher(str(world / "teacher"), torch_dtype=torch.float32).unet.state_dict()
    assert m.teacher.dtype == rt.weight_dtype != torch.float32  # the cast happened
    fake = m.critic.state_dict()
    assert all(fake[k].dtype == torch.float32 for k in fake)
    assert max((fake[k] - fp32[k]).abs().max().item() for k in fp32) == 0.0
