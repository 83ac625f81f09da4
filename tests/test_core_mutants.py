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
from tests.tiny import make_tiny_pipeline, tiny_vae

T, N, K_PHI = 1000, 50, 20  # METHOD.md: DDIM grid t_i = 20 (i + 1) - 1, k_phi = 1000 / N


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return make_tiny_pipeline(tmp_path_factory.mktemp("tiny"))


def _text(pipe, captions):
    ids = pipe.tokenizer(captions, padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


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
    cond = _text(pipe, ["one large red circle", "two small blue squares", "one small green triangle", "two red circles"])
    uncond = _text(pipe, [""] * 4)
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
    ehs = _text(pipe, ["one red circle"] * 3)
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
