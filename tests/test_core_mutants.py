"""Tests that pin the method core to METHOD.md's formulas, so that plausible bugs fail (issue 27's mutants).

The golden tests recompute a whole SPLAD step on the tiny pipeline with plain tensor ops, from METHOD.md's
formulas (no helper of the package is called for the expected value), on the same seeded draws, and compare.
"""
from types import SimpleNamespace

import pytest
import torch
from diffusers import StableDiffusionPipeline

from splam_studio.core.schedule import NoiseSchedule
from splam_studio.core.splad import SpladConfig, splad_loss
from splam_studio.core.student import build_student, make_target, unet_eps_model
from splam_studio.core.teacher import vae_scale_factor
from tests.tiny import make_tiny_pipeline, tiny_vae, tiny_text

T, N, K_PHI = 1000, 50, 20  # METHOD.md: DDIM grid t_i = 20 (i + 1) - 1, k_phi = 1000 / N


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return make_tiny_pipeline(tmp_path_factory.mktemp("tiny"))


def _alphas_cumprod():
    """SD1.5's scaled_linear schedule, written out: beta = linspace(sqrt(0.00085), sqrt(0.012), 1000)^2."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, T, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def _v(x):
    return x.float().view(-1, 1, 1, 1)


def reference_splad_loss(teacher, student, target, z_0, cond, uncond, seed, method="splam", m=1, w=8.0, c=1e-3,
                         gamma_one_prob=0.0):
    """Steps 1-6 of Algorithm 1 (METHOD.md), in plain tensor ops, on the draws of Generator(seed) in the order
    t, eps, gamma."""
    ac = _alphas_cumprod()
    alpha, sigma = (lambda t: ac[t].sqrt()), (lambda t: (1 - ac[t]).sqrt())
    c_skip = lambda t: 0.25 / ((10.0 * t.double()) ** 2 + 0.25)  # noqa: E731
    c_out = lambda t: 10.0 * t.double() / ((10.0 * t.double()) ** 2 + 0.25).sqrt()  # noqa: E731
    B = z_0.shape[0]
    g = torch.Generator().manual_seed(seed)
    t = K_PHI * (torch.randint(N, (B,), generator=g) + 1) - 1
    eps = torch.randn(z_0.shape, generator=g)
    z_t = _v(alpha(t)) * z_0 + _v(sigma(t)) * eps
    z, tj = z_t, t
    with torch.no_grad():
        for _ in range(m):  # guided DDIM steps of size k_phi, two separate UNet calls
            sj = (tj - K_PHI).clamp(min=0)
            e_c = teacher(z, tj, encoder_hidden_states=cond).sample
            e_u = teacher(z, tj, encoder_hidden_states=uncond).sample
            e = e_c + w * (e_c - e_u)
            x0 = (z - _v(sigma(tj)) * e) / _v(alpha(tj))
            z, tj = _v(alpha(sj)) * x0 + _v(sigma(sj)) * e, sj
    zhat, s = z, tj
    if method == "splam":
        gamma = torch.rand(B, generator=g, dtype=torch.float64)
        if gamma_one_prob > 0:
            gamma = torch.where(torch.rand(B, generator=g, dtype=torch.float64) < gamma_one_prob, 1.0, gamma)
    else:
        gamma = torch.ones(B, dtype=torch.float64)
    r = alpha(t) / alpha(s)
    z_g = _v(gamma) * z_t + (1 - _v(gamma)) * _v(r) * zhat
    sigma_g = (r**2 * sigma(s) ** 2 + gamma**2 * (1 - r**2)).sqrt()
    emb = StableDiffusionPipeline.get_guidance_scale_embedding(None, (10.0 * (1 - gamma)).float(), 256)
    e_s = student(z_g, t, encoder_hidden_states=cond, timestep_cond=emb).sample
    pred = _v(c_skip(t)) * z_g + _v(c_out(t)) * (z_g - _v(sigma_g) * e_s) / _v(alpha(t))
    with torch.no_grad():
        emb1 = StableDiffusionPipeline.get_guidance_scale_embedding(None, torch.zeros(B), 256)
        e_tg = target(zhat, s, encoder_hidden_states=cond, timestep_cond=emb1).sample
        tgt = _v(c_skip(s)) * zhat + _v(c_out(s)) * (zhat - _v(sigma(s)) * e_tg) / _v(alpha(s))
    d = pred - tgt
    return (torch.sqrt(d**2 + c**2) - c).mean()


@pytest.fixture(scope="module")
def models(pipe):
    """Teacher, a fresh student and a target that differs from the student (as after some EMA steps)."""
    teacher = pipe.unet.requires_grad_(False)
    student = build_student(teacher, "fresh", generator=torch.Generator().manual_seed(0))
    target = make_target(student)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for p in target.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    cond = tiny_text(pipe, ["one large red circle", "two small blue squares", "one small green triangle", "two red circles"])
    uncond = tiny_text(pipe, [""] * 4)
    z_0 = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    return SimpleNamespace(teacher=teacher, student=student, target=target, cond=cond, uncond=uncond, z_0=z_0)


@pytest.mark.parametrize("method,m,seed", [("splam", 1, 2), ("splam", 2, 3), ("lcm", 1, 2), ("splam", 1, 11)])
def test_splad_loss_equals_an_independent_recomputation(models, method, m, seed):
    M = models
    cfg = SpladConfig(method=method, m=m, w=8.0)
    ours = splad_loss(cfg, NoiseSchedule.from_config(), M.student, M.target, M.teacher, M.z_0, M.cond, M.uncond,
                      torch.Generator().manual_seed(seed))
    ref = reference_splad_loss(M.teacher, M.student, M.target, M.z_0, M.cond, M.uncond, seed, method, m)
    assert ref.item() > 0
    assert torch.allclose(ours, ref, rtol=2e-5, atol=0), (ours.item(), ref.item())
    ours.backward()  # the gradient reaches the student only: theta^- and the teacher are frozen
    assert M.student.time_embedding.cond_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in M.target.parameters()) and all(p.grad is None for p in M.teacher.parameters())
    M.student.zero_grad(set_to_none=True)


def test_lcm_is_splam_with_gamma_always_one(models):
    M = models
    sched = NoiseSchedule.from_config()
    lcm = splad_loss(SpladConfig(method="lcm"), sched, M.student, M.target, M.teacher, M.z_0, M.cond, M.uncond,
                     torch.Generator().manual_seed(5))
    splam1 = splad_loss(SpladConfig(method="splam", gamma_one_prob=1.0), sched, M.student, M.target, M.teacher, M.z_0,
                        M.cond, M.uncond, torch.Generator().manual_seed(5))
    splam = splad_loss(SpladConfig(method="splam"), sched, M.student, M.target, M.teacher, M.z_0, M.cond, M.uncond,
                       torch.Generator().manual_seed(5))
    assert torch.equal(lcm, splam1)
    assert not torch.allclose(lcm, splam, rtol=1e-3)


def test_target_is_frozen_and_in_eval_mode(models):
    target = make_target(models.student)
    assert all(not p.requires_grad for p in target.parameters()) and not target.training
    assert all(p.requires_grad for p in models.student.parameters())
    assert all(torch.equal(a, b) for a, b in zip(target.parameters(), models.student.parameters()))


# ---- the draws of one step: a fake, instant UNet records the timesteps each model sees ------------------------------
class _RecordingUNet(torch.nn.Module):
    """eps = a z (1 + t / 1000) + mean(text) (+ mean(timestep_cond)): records the timesteps it is called at."""

    def __init__(self, a: float, cond_dim: int | None = None):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(a))
        self.config = SimpleNamespace(time_cond_proj_dim=cond_dim)
        self.calls: list[torch.Tensor] = []

    @property
    def dtype(self):
        return torch.float32

    def forward(self, z, t, encoder_hidden_states, timestep_cond=None):
        self.calls.append(t.detach().clone())
        eps = self.a * z * (1 + t.float().view(-1, 1, 1, 1) / 1000) + encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        if timestep_cond is not None:
            eps = eps + timestep_cond.mean(1).view(-1, 1, 1, 1)
        return SimpleNamespace(sample=eps)


@pytest.mark.parametrize("m", [1, 3])
def test_t_is_uniform_on_the_ddim_grid_and_s_is_t_minus_m_k_phi(m):
    B = 20000
    teacher, student, target = _RecordingUNet(0.1), _RecordingUNet(0.2, 8), _RecordingUNet(0.3, 8)
    g = torch.Generator().manual_seed(0)
    z_0, cond, uncond = torch.randn(B, 4, 1, 1, generator=g), torch.randn(B, 2, 3, generator=g), torch.zeros(B, 2, 3)
    splad_loss(SpladConfig(m=m), NoiseSchedule.from_config(), student, target, teacher, z_0, cond, uncond,
               torch.Generator().manual_seed(1))
    t = teacher.calls[0][:B]  # the teacher's one batched call over [cond; uncond]
    assert torch.equal(teacher.calls[0][B:], t) and len(teacher.calls) == m
    grid = torch.arange(K_PHI - 1, T, K_PHI)
    counts = torch.stack([(t == v).sum() for v in grid])
    assert counts.sum() == B  # every t is a grid point
    share = counts.double() / B
    assert ((share - 1 / N).abs() < 0.006).all(), share  # each of the 50 points, 999 (1-step sampling) included
    assert share[-1] > 0.014 and t.max() == T - 1
    for j, tj in enumerate(teacher.calls):  # chained steps of size k_phi
        assert torch.equal(tj[:B], (t - j * K_PHI).clamp(min=0))
    assert torch.equal(student.calls[0], t)  # the student sees t for every gamma (METHOD.md step 4)
    assert torch.equal(target.calls[0], (t - m * K_PHI).clamp(min=0))  # the target sees s = t - m k_phi


def test_teacher_guidance_uses_cond_and_uncond_in_that_order():
    """With eps = a z + mean(text), the guided eps is a z + mean(c) + w (mean(c) - mean(u)): swapping c, u changes it."""
    from splam_studio.core.solver import guided_eps

    unet = _RecordingUNet(0.0)
    z, t = torch.zeros(2, 4, 1, 1), torch.tensor([19, 999])
    cond, uncond = torch.full((2, 2, 3), 1.0), torch.full((2, 2, 3), 0.25)
    eps = guided_eps(unet, cond, uncond, 8.0)(z, t)
    assert torch.allclose(eps, torch.full_like(eps, 1.0 + 8.0 * 0.75))


# ---- the student -------------------------------------------------------------------------------------------------
def test_fresh_cond_proj_is_nn_linears_default_init(pipe):
    """Fresh init: U(-1/sqrt(256), 1/sqrt(256)) drawn from the injected generator, the rest exactly the teacher."""
    student = build_student(pipe.unet, "fresh", generator=torch.Generator().manual_seed(4))
    w = student.time_embedding.cond_proj.weight
    expected = (torch.rand(w.shape, generator=torch.Generator().manual_seed(4)) * 2 - 1) / 16.0
    assert torch.allclose(w, expected, atol=1e-7)
    ref = torch.nn.Linear(256, w.shape[0], bias=False).weight
    assert w.abs().max() <= 1 / 16 and abs(w.std().item() - ref.std().item()) < 0.1 * ref.std().item()
    teacher_sd = pipe.unet.state_dict()
    assert all(torch.equal(v, teacher_sd[k]) for k, v in student.state_dict().items() if k in teacher_sd)


def test_student_eps_embeds_the_given_gamma(pipe):
    """eps_theta(z, t, gamma) is the UNet at timestep_cond = embedding(10 (1 - gamma)), per sample."""
    student = build_student(pipe.unet, "fresh", generator=torch.Generator().manual_seed(0))
    ehs = tiny_text(pipe, ["one red circle"] * 3)
    z, t = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2)), torch.tensor([999, 499, 19])
    gamma = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    with torch.no_grad():
        ours = unet_eps_model(student, ehs)(z, t, gamma)
        emb = StableDiffusionPipeline.get_guidance_scale_embedding(None, torch.tensor([10.0, 7.0, 0.0]), 256)
        ref = student(z, t, encoder_hidden_states=ehs, timestep_cond=emb).sample
        at_one = unet_eps_model(student, ehs)(z, t, torch.ones(3, dtype=torch.float64))
    assert torch.allclose(ours, ref, atol=1e-5)
    assert not torch.allclose(ours[:2], at_one[:2], atol=1e-3)  # gamma < 1 is not gamma = 1


# ---- the teacher driver ------------------------------------------------------------------------------------------
def test_vae_scale_factor_is_the_measured_pixels_per_latent():
    vae = tiny_vae()  # 2 down blocks
    with torch.no_grad():
        lat = vae.encode(torch.zeros(1, 3, 16, 16)).latent_dist.mean
    assert vae_scale_factor(vae) == 16 // lat.shape[-1] == 2
    sd15 = SimpleNamespace(config=SimpleNamespace(block_out_channels=[128, 256, 512, 512]))
    assert vae_scale_factor(sd15) == 8


def test_splad_config_refuses_bad_values():
    for bad, match in [({"m": 0}, "m >= 1"), ({"num_ddim_steps": 0}, "num_ddim_steps"), ({"gamma_scale": 0.0}, "gamma_scale"),
                       ({"method": "dmd"}, "method"), ({"distance": "l1"}, "distance"), ({"gamma_time": "sigma"}, "gamma_time")]:
        with pytest.raises(ValueError, match=match):
            SpladConfig(**bad)


def test_matched_gamma_time_reaches_the_loss(models):
    M = models
    sched = NoiseSchedule.from_config()
    args = (sched, M.student, M.target, M.teacher, M.z_0, M.cond, M.uncond)
    paper = splad_loss(SpladConfig(), *args, torch.Generator().manual_seed(2))
    matched = splad_loss(SpladConfig(gamma_time="matched"), *args, torch.Generator().manual_seed(2))
    assert not torch.allclose(paper, matched, rtol=1e-4)


def test_the_target_branch_carries_no_gradient():
    """splam_loss evaluates F_theta^- under no_grad, even for a target whose parameters would take gradients."""
    from splam_studio.core.slode import splam_loss

    p = torch.nn.Parameter(torch.tensor(1.5))
    F_student = lambda z, t, g, s, a: z * p  # noqa: E731
    F_target = lambda z, t, g, s, a: z * p * 0.5  # noqa: E731
    t, s = torch.tensor([999, 519]), torch.tensor([979, 499])
    z_t, zhat = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)
    loss = splam_loss(F_student, F_target, NoiseSchedule.from_config(), z_t, zhat, t, s, torch.ones(2, dtype=torch.float64))
    loss.backward()
    d = (z_t * 1.5 - zhat * 0.75)  # d loss / d p through the student branch only: mean(2 d z_t)
    assert torch.allclose(p.grad, (2 * d * z_t).mean(), rtol=1e-5)


def test_student_eps_uses_the_gamma_scale(pipe):
    student = build_student(pipe.unet, "fresh", generator=torch.Generator().manual_seed(0))
    ehs = tiny_text(pipe, ["one red circle"] * 2)
    z, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2)), torch.tensor([999, 19])
    gamma = torch.tensor([0.0, 0.5], dtype=torch.float64)
    with torch.no_grad():
        ours = unet_eps_model(student, ehs, gamma_scale=0.005)(z, t, gamma)
        emb = StableDiffusionPipeline.get_guidance_scale_embedding(None, torch.tensor([0.005, 0.0025]), 256)
        ref = student(z, t, encoder_hidden_states=ehs, timestep_cond=emb).sample
    assert torch.allclose(ours, ref, atol=1e-5)
    with pytest.raises(ValueError, match="distilled student"):
        build_student(student)


def test_guidance_conventions_and_text_encoding(pipe):
    from splam_studio.core.teacher import cfg_scale, encode_text, lcm_w

    assert cfg_scale(8.0) == 9.0 and lcm_w(7.5) == 6.5 and lcm_w(cfg_scale(3.25)) == 3.25
    caps = ["one red circle", "two small blue squares at the left"]
    with torch.no_grad():
        ours = encode_text(pipe, caps)
        ref = pipe.encode_prompt(caps, "cpu", 1, False)[0]
    assert ours.shape == ref.shape and torch.equal(ours, ref)


# ---- error bound and metrics -------------------------------------------------------------------------------------
def test_rms_and_the_guided_trajectory(pipe):
    from splam_studio.core.error_bound import guided_trajectory, rms, teacher_trajectory
    from splam_studio.core.solver import guided_eps

    x = torch.tensor([[3.0, 4.0], [1.0, 1.0]])
    assert torch.allclose(rms(x), torch.tensor([12.5**0.5, 1.0]))
    cond, uncond = tiny_text(pipe, ["one red circle"]), tiny_text(pipe, [""])
    z_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sched = NoiseSchedule.from_config()
    with torch.no_grad():
        ours, times = guided_trajectory(pipe.unet, cond, uncond, 3.0, sched, z_T, N=5)
        ref, _ = teacher_trajectory(guided_eps(pipe.unet, cond, uncond, 3.0), sched, z_T, N=5)
    assert times == [999, 799, 599, 399, 199, 0] and torch.equal(ours, ref)


def test_error_bound_on_a_known_sequence():
    """F(z, t) = z on a trajectory of scalars: terms are |z_j - z_j+1|, errors |z_j - z_0|."""
    from splam_studio.core.error_bound import error_bound

    traj = torch.tensor([4.0, 1.0, 3.0, 0.0]).view(4, 1, 1)  # (N + 1, B, 1)
    eb = error_bound(lambda z, t: z, traj, [999, 599, 199, 0], stride=1)
    assert eb.terms[:, 0].tolist() == [3.0, 2.0, 3.0] and eb.bound[:, 0].tolist() == [8.0, 5.0, 3.0]
    assert eb.error[:, 0].tolist() == [4.0, 1.0, 3.0] and eb.times == [999, 599, 199]
    eb2 = error_bound(lambda z, t: z, traj, [999, 599, 199, 0], stride=2)
    assert eb2.times == [599] and eb2.terms[:, 0].tolist() == [1.0]  # sub-paths end at z_0: indices 1 -> 3


def test_metrics_against_closed_forms():
    import numpy as np

    from splam_studio.core.metrics import feature_statistics, frechet_distance, latent_mse, psnr

    a = torch.zeros(2, 1, 2, 2)
    b = torch.stack([torch.full((1, 2, 2), 0.2), torch.tensor([[[0.2, 0.0], [0.0, 0.0]]])])
    assert torch.allclose(psnr(a, b), 10 * torch.log10(torch.tensor([4 / 0.04, 4 / 0.01])))
    assert torch.allclose(latent_mse(a, b), torch.tensor([0.04, 0.01]))
    # 1-D Gaussians: FID = (mu1 - mu2)^2 + (s1 - s2)^2
    assert frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([3.0]), np.array([[1.0]])) == pytest.approx(4.0 + 1.0)
    f = np.random.default_rng(0).normal(size=(500, 3)) * np.array([1.0, 2.0, 3.0])
    mu, cov = feature_statistics(f)
    assert mu.shape == (3,) and cov.shape == (3, 3) and np.allclose(np.diag(cov), [1, 4, 9], rtol=0.2)
