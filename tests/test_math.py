"""Identities and closed-form checks of the SPLAM math (CPU, milliseconds)."""
import math

import pytest
import torch
from diffusers import LCMScheduler

from splam_studio.core.consistency import boundary, c_out, c_skip, x0_from_eps
from splam_studio.core.schedule import NoiseSchedule, ddim_grid, lcm_timesteps
from splam_studio.core.slode import (distance, gamma_embedding, matched_input, sample_gamma, sigma_gamma, splam_loss,
                                     z_gamma)
from splam_studio.core.solver import solve

SCHED = NoiseSchedule.from_config()


def test_schedule_matches_diffusers_sd15():
    ref = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod
    assert torch.allclose(SCHED.alphas_cumprod.float(), ref, rtol=1e-6)
    t = torch.tensor([0, 499, 999])
    assert torch.allclose(SCHED.alpha(t) ** 2 + SCHED.sigma(t) ** 2, torch.ones(3, dtype=torch.float64))


def _formula_alphas_cumprod(config):
    """The schedule as core/schedule.py computed it before it took diffusers' DDPMScheduler: betas in float64."""
    T, b0, b1 = config.get("num_train_timesteps", 1000), config.get("beta_start", 1e-4), config.get("beta_end", 0.02)
    kind = config.get("beta_schedule", "linear")
    if kind == "linear":
        betas = torch.linspace(b0, b1, T, dtype=torch.float64)
    elif kind == "scaled_linear":
        betas = torch.linspace(b0**0.5, b1**0.5, T, dtype=torch.float64) ** 2
    else:  # squaredcos_cap_v2
        t = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((t + 0.008) / 1.008 * torch.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    return torch.cumprod(1 - betas, 0)


@pytest.mark.parametrize("config", [None, {"num_train_timesteps": 100, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02},
                                    {"beta_schedule": "squaredcos_cap_v2"}])
def test_schedule_is_diffusers_ddpm_and_the_old_tables_to_float32_rounding(config):
    """alpha_bar = float64 cumprod of DDPMScheduler's (float32) betas; within float32 rounding of the former float64
    formula: alpha(t) and sigma(t) differ from it by at most 2 float32 ulps (the betas' own rounding), not bitwise."""
    from diffusers import DDPMScheduler
    from splam_studio.core.schedule import SD15_SCHEDULER_CONFIG

    cfg = SD15_SCHEDULER_CONFIG if config is None else config
    sched = NoiseSchedule.from_config(config)
    assert torch.equal(sched.alphas_cumprod, torch.cumprod(1 - DDPMScheduler.from_config(cfg).betas.double(), 0))
    old = _formula_alphas_cumprod(cfg)
    t = torch.arange(sched.T)
    ulp = torch.finfo(torch.float32).eps
    for new_v, old_v in [(sched.alpha(t), old.sqrt()), (sched.sigma(t[1:]), (1 - old[1:]).sqrt())]:
        big = old_v > 1e-3  # (the cosine schedule's last alpha, 5e-5, sits on diffusers' beta clamp at 0.999)
        assert ((new_v - old_v).abs() / old_v)[big].max() < 2.5 * ulp and (new_v - old_v).abs().max() < 2.5 * ulp


def test_schedule_reads_other_configs_and_rejects_v_prediction():
    lin = NoiseSchedule.from_config({"num_train_timesteps": 100, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02})
    assert lin.T == 100 and abs(lin.alphas_cumprod[0].item() - (1 - 1e-4)) < 1e-11  # beta_0 in float32
    with pytest.raises(ValueError, match="epsilon"):
        NoiseSchedule.from_config({"prediction_type": "v_prediction"})
    with pytest.raises(ValueError, match="out of range"):
        SCHED.alpha(1000)
    with pytest.raises(ValueError, match="beta_schedule 'cubic' not supported"):
        NoiseSchedule.from_config({"beta_schedule": "cubic"})


def test_ddim_grid_and_lcm_timesteps_match_lcmscheduler():
    grid = ddim_grid(1000, 50)
    assert grid[0] == 19 and grid[-1] == 999 and len(grid) == 50
    assert lcm_timesteps(1) == [999]
    assert lcm_timesteps(2) == [999, 499]
    assert lcm_timesteps(4) == [999, 759, 499, 259]
    ref = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    for n in (1, 2, 3, 4, 8):
        ref.set_timesteps(n)
        assert lcm_timesteps(n) == ref.timesteps.tolist(), n


def test_boundary_condition():
    assert c_skip(torch.tensor(0)).item() == 1.0 and c_out(torch.tensor(0)).item() == 0.0
    z, x0 = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    assert torch.equal(boundary(z, x0, torch.zeros(2, dtype=torch.long)), z)
    # matches LCMScheduler's scalings at a large t
    cs, co = LCMScheduler().get_scalings_for_boundary_condition_discrete(torch.tensor(999.0))
    assert math.isclose(c_skip(torch.tensor(999)).item(), cs.item(), rel_tol=1e-6)
    assert math.isclose(c_out(torch.tensor(999)).item(), co.item(), rel_tol=1e-6)


def test_z_gamma_and_sigma_gamma_endpoints():
    t, s = torch.tensor([999, 519]), torch.tensor([979, 499])
    r = SCHED.alpha(t) / SCHED.alpha(s)
    z_t, zhat_s = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    assert torch.equal(z_gamma(z_t, zhat_s, torch.ones(2, dtype=torch.float64), r), z_t)
    assert torch.allclose(z_gamma(z_t, zhat_s, torch.zeros(2, dtype=torch.float64), r), r.float().view(2, 1, 1, 1) * zhat_s)
    assert torch.allclose(sigma_gamma(torch.ones(2), r, SCHED.sigma(s)), SCHED.sigma(t), rtol=1e-12)
    assert torch.allclose(sigma_gamma(torch.zeros(2), r, SCHED.sigma(s)), r * SCHED.sigma(s), rtol=1e-12)
    g = torch.linspace(0, 1, 11, dtype=torch.float64)
    sg = sigma_gamma(g, r[0], SCHED.sigma(s[0]))
    assert (sg.diff() > 0).all()  # noise grows monotonically from the drifted end to z_t


def test_float64_schedule_does_not_leak_into_the_model():
    """The authors' script fed the UNet float64 (METHOD.md): every SL-ODE point keeps the latent dtype."""
    t, s = torch.tensor([999]), torch.tensor([979])
    r = SCHED.alpha(t) / SCHED.alpha(s)
    for dt in (torch.float32, torch.bfloat16):
        z = torch.randn(1, 4, 2, 2, dtype=dt)
        assert z_gamma(z, z, torch.rand(1, dtype=torch.float64), r).dtype == dt
        assert x0_from_eps(z, z, SCHED.alpha(t), SCHED.sigma(t)).dtype == dt


def test_gamma_embedding_matches_diffusers_guidance_embedding():
    from diffusers import StableDiffusionPipeline

    ref = StableDiffusionPipeline.get_guidance_scale_embedding(None, torch.tensor([0.0, 3.0]), embedding_dim=256)
    ours = gamma_embedding(torch.tensor([1.0, 0.7]), 256)
    assert torch.allclose(ours, ref, atol=1e-5)  # gamma = 1 <-> guidance_scale - 1 = 0


def test_distances():
    a, b = torch.zeros(3), torch.tensor([0.0, 1.0, 2.0])
    assert distance(a, b, "l2").item() == pytest.approx(5 / 3)
    c = 1e-3
    assert distance(a, b, "huber", c).item() == pytest.approx(((1 + c * c) ** 0.5 - c + (4 + c * c) ** 0.5 - c) / 3, rel=1e-6)
    with pytest.raises(ValueError, match="l2"):
        distance(a, b, "l1")


# ---- Gaussian data: z_0 ~ N(mu, s0^2 I) has a closed-form eps-predictor and probability-flow map ----
MU, S0 = torch.tensor([0.7, -1.2, 0.1, 2.0], dtype=torch.float64), 0.6


def _S(t):  # std of z_t per dim: sqrt(alpha^2 s0^2 + sigma^2)
    return (SCHED.alpha(t) ** 2 * S0**2 + SCHED.sigma(t) ** 2).sqrt()


def _v(x):  # (B,) -> (B, 1)
    return x.view(-1, 1)


def exact_eps(z, t):
    """E[eps | z_t] = sigma(t) (z - alpha(t) mu) / S(t)^2."""
    return _v(SCHED.sigma(t)) * (z - _v(SCHED.alpha(t)) * MU) / _v(_S(t)) ** 2


def exact_flow(z, t, s):
    """Probability-flow ODE map t -> s: the standardised value (z - alpha mu) / S is constant along it."""
    return _v(SCHED.alpha(s)) * MU + _v(_S(s)) * (z - _v(SCHED.alpha(t)) * MU) / _v(_S(t))


def test_ddim_converges_to_the_exact_flow_at_first_order():
    g = torch.Generator().manual_seed(0)
    B = 64
    t = torch.full((B,), 999)
    z_t = _v(SCHED.alpha(t)) * MU + _v(_S(t)) * torch.randn(B, 4, generator=g, dtype=torch.float64)
    s = torch.full((B,), 199)
    truth = exact_flow(z_t, t, s)
    errs = []
    for n in (5, 10, 20, 40, 80):
        zhat, s_out = solve(exact_eps, SCHED, z_t, t, m=n, k_phi=800 // n)
        assert torch.equal(s_out, s)
        errs.append((zhat - truth).pow(2).mean().sqrt().item())
    orders = [math.log2(a / b) for a, b in zip(errs, errs[1:])]
    assert all(0.8 < p < 1.25 for p in orders), (errs, orders)
    assert errs[-1] < 1e-2


def _exact_F(k, scale=1.0):
    """Exact consistency function of the SL-ODE from z_t to the drifted exact z_{t-k}: mu + s0 u, u standardised."""

    def F(z, t, gamma, sigma, alpha):
        s = (t - k).clamp(min=0)
        r = SCHED.alpha(t) / SCHED.alpha(s)
        S_gamma = gamma * _S(t) + (1 - gamma) * r * _S(s)  # std of z_gamma along the sub-path
        return MU + scale * S0 * (z - _v(SCHED.alpha(t)) * MU) / _v(S_gamma)

    return F


@pytest.mark.parametrize("kind", ["l2", "huber"])
def test_splam_loss_vanishes_for_the_exact_consistency_function(kind):
    g = torch.Generator().manual_seed(1)
    B, k = 256, 40
    t = ddim_grid()[torch.randint(1, 50, (B,), generator=g)]
    s = t - k
    s = s.clamp(min=0)
    z_t = _v(SCHED.alpha(t)) * MU + _v(_S(t)) * torch.randn(B, 4, generator=g, dtype=torch.float64)
    zhat_s = exact_flow(z_t, t, s)
    gamma = torch.rand(B, generator=g, dtype=torch.float64)
    exact = splam_loss(_exact_F(k), _exact_F(k), SCHED, z_t, zhat_s, t, s, gamma, kind)
    perturbed = splam_loss(_exact_F(k, scale=1.05), _exact_F(k), SCHED, z_t, zhat_s, t, s, gamma, kind)
    assert exact.item() < 1e-12
    assert perturbed.item() > 1e-4
    # the student must see the SL-ODE point, not z_t: an exact F evaluated as if gamma were 1 fails on it
    as_if_lcm = lambda z, t_, g_, sg, a: _exact_F(k)(z, t_, torch.ones_like(g_), sg, a)  # noqa: E731
    assert splam_loss(as_if_lcm, _exact_F(k), SCHED, z_t, zhat_s, t, s, gamma, kind).item() > 1e-4


def test_sigma_gamma_between_the_ends():
    """sigma_gamma^2 = r^2 sigma(s)^2 + gamma^2 (1 - r^2) (METHOD.md step 3) at an inner gamma."""
    t, s = torch.tensor([999, 519]), torch.tensor([979, 499])
    r, sig_s = SCHED.alpha(t) / SCHED.alpha(s), SCHED.sigma(s)
    g = torch.tensor([0.5, 0.25], dtype=torch.float64)
    assert torch.allclose(sigma_gamma(g, r, sig_s), (r**2 * sig_s**2 + g**2 * (1 - r**2)).sqrt(), rtol=1e-12)
    assert not torch.allclose(sigma_gamma(g, r, sig_s), (r**2 * sig_s**2 + g * (1 - r**2)).sqrt(), rtol=1e-6)


def _exact_eps_model(k):
    """An eps model whose consistency function, with the sigma it is given, is the exact one of _exact_F.

    It returns the eps for which c_skip z + c_out (z - sigma_true eps) / alpha(t) equals the exact F, with sigma_true
    the noise level of z_gamma by METHOD.md (sqrt(r^2 sigma(s)^2 + gamma^2 (1 - r^2))): F built from it vanishes in
    the loss only if splam_loss passes that sigma.
    """

    def eps(z, t, gamma):
        s = (t - k).clamp(min=0)
        r = SCHED.alpha(t) / SCHED.alpha(s)
        sigma_true = (r**2 * SCHED.sigma(s) ** 2 + gamma**2 * (1 - r**2)).sqrt()
        target = _exact_F(k)(z, t, gamma, None, None)
        cs = 0.25 / ((10.0 * t.double()) ** 2 + 0.25)
        co = 10.0 * t.double() / ((10.0 * t.double()) ** 2 + 0.25).sqrt()
        x0 = (target - _v(cs) * z) / _v(co)
        return (z - _v(SCHED.alpha(t)) * x0) / _v(sigma_true)

    return eps


def test_splam_loss_vanishes_for_an_exact_eps_model_only_with_sigma_gamma():
    from splam_studio.core.consistency import consistency_function

    g = torch.Generator().manual_seed(5)
    B, k = 256, 40
    t = ddim_grid()[torch.randint(2, 50, (B,), generator=g)]  # t >= 59: s = t - 40 > 0, where c_out(s) > 0
    s = t - k
    z_t = _v(SCHED.alpha(t)) * MU + _v(_S(t)) * torch.randn(B, 4, generator=g, dtype=torch.float64)
    zhat_s = exact_flow(z_t, t, s)
    gamma = torch.rand(B, generator=g, dtype=torch.float64)
    F = consistency_function(_exact_eps_model(k))
    assert splam_loss(F, F, SCHED, z_t, zhat_s, t, s, gamma, "l2").item() < 1e-20
    assert splam_loss(F, F, SCHED, z_t, zhat_s, t, s, torch.ones(B, dtype=torch.float64), "l2").item() < 1e-20
    wrong = lambda z, t_, g_, sg, a: F(z, t_, g_, SCHED.sigma(t_), a)  # noqa: E731  (sigma(t) for sigma_gamma)
    assert splam_loss(wrong, F, SCHED, z_t, zhat_s, t, s, gamma, "l2").item() > 1e-6


def test_gamma_one_is_exactly_the_lcm_loss():
    """SPLAM with gamma = 1 equals an independently written LCM loss d(F(z_t, t), F^-(zhat_s, s))."""
    g = torch.Generator().manual_seed(2)
    B = 8
    t = ddim_grid()[torch.randint(0, 50, (B,), generator=g)]
    s = (t - 20).clamp(min=0)
    z_t, zhat_s = torch.randn(B, 4, 2, 2, generator=g), torch.randn(B, 4, 2, 2, generator=g)
    W = torch.randn(4, 4, generator=g)

    def eps_model(z, t_, gamma):  # any model of z, t and gamma
        return torch.einsum("ij,bjhw->bihw", W, z) * (1 + 1e-3 * t_.view(-1, 1, 1, 1)) + gamma.float().view(-1, 1, 1, 1)

    from splam_studio.core.consistency import consistency_function

    F = consistency_function(eps_model)
    ones = torch.ones(B, dtype=torch.float64)
    splam = splam_loss(F, F, SCHED, z_t, zhat_s, t, s, ones, "huber")

    def F_lcm(z, t_, sigma, alpha):
        x0 = (z - sigma.float().view(-1, 1, 1, 1) * eps_model(z, t_, ones)) / alpha.float().view(-1, 1, 1, 1)
        return c_skip(t_).float().view(-1, 1, 1, 1) * z + c_out(t_).float().view(-1, 1, 1, 1) * x0

    lcm = distance(F_lcm(z_t, t, SCHED.sigma(t), SCHED.alpha(t)), F_lcm(zhat_s, s, SCHED.sigma(s), SCHED.alpha(s)), "huber")
    assert torch.allclose(splam, lcm, rtol=1e-6, atol=0), (splam.item(), lcm.item())


def test_timestep_of_inverts_the_alpha_bar_table():
    t = torch.tensor([0, 1, 19, 499, 998, 999])
    assert torch.equal(SCHED.timestep_of(SCHED.alphas_cumprod[t]), t.double())
    mid = 0.5 * (SCHED.alphas_cumprod[499] + SCHED.alphas_cumprod[500])  # alpha_bar is close to linear over one step
    assert abs(SCHED.timestep_of(mid).item() - 499.5) < 1e-3
    assert SCHED.timestep_of(torch.tensor([1.0, 0.0])).tolist() == [0.0, 999.0]  # clamped to the table's ends


def test_matched_input_lies_on_the_marginal_and_keeps_x0():
    g = torch.Generator().manual_seed(3)
    t, s = torch.tensor([999, 519, 39]), torch.tensor([979, 499, 19])
    r = SCHED.alpha(t) / SCHED.alpha(s)
    gamma = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    sg = sigma_gamma(gamma, r, SCHED.sigma(s))
    z, eps = torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64), torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64)
    z_m, t_m, a_m, s_m = matched_input(z, SCHED.alpha(t), sg, SCHED)
    assert torch.allclose(a_m**2 + s_m**2, torch.ones(3, dtype=torch.float64))
    # same signal-to-noise ratio, so the same x0 estimate for any eps
    x0 = (z - sg.view(-1, 1, 1, 1) * eps) / SCHED.alpha(t).view(-1, 1, 1, 1)
    assert torch.allclose((z_m - s_m.view(-1, 1, 1, 1) * eps) / a_m.view(-1, 1, 1, 1), x0, rtol=1e-10)
    # gamma = 0 sits at s (the drifted end r zhat_s is zhat_s moved to t's scale), gamma = 1 at t, gamma = 0.5 between
    assert abs(t_m[0].item() - 979) < 1e-6 and abs(t_m[2].item() - 39) < 1e-9
    assert 499 < t_m[1].item() < 519
    assert torch.allclose(z_m[2], z[2])


def test_matched_gamma_time_is_the_lcm_loss_at_gamma_one_and_differs_below():
    g = torch.Generator().manual_seed(4)
    B = 8
    t = ddim_grid()[torch.randint(1, 50, (B,), generator=g)]
    s = t - 20
    z_t, zhat_s = torch.randn(B, 4, 2, 2, generator=g), torch.randn(B, 4, 2, 2, generator=g)
    W = torch.randn(4, 4, generator=g)

    def eps_model(z, t_, gamma):
        return torch.einsum("ij,bjhw->bihw", W, z) * (1 + 1e-3 * t_.float().view(-1, 1, 1, 1))

    from splam_studio.core.consistency import consistency_function

    F = consistency_function(eps_model)
    ones, half = torch.ones(B, dtype=torch.float64), torch.full((B,), 0.5, dtype=torch.float64)
    assert torch.allclose(splam_loss(F, F, SCHED, z_t, zhat_s, t, s, ones, "huber", gamma_time="matched"),
                          splam_loss(F, F, SCHED, z_t, zhat_s, t, s, ones, "huber"), rtol=1e-6, atol=0)
    assert not torch.allclose(splam_loss(F, F, SCHED, z_t, zhat_s, t, s, half, "huber", gamma_time="matched"),
                              splam_loss(F, F, SCHED, z_t, zhat_s, t, s, half, "huber"), rtol=1e-3)
    with pytest.raises(ValueError, match="gamma_time"):
        splam_loss(F, F, SCHED, z_t, zhat_s, t, s, ones, "huber", gamma_time="sigma")


def test_sample_gamma_modes():
    g = torch.Generator().manual_seed(0)
    u = sample_gamma(4000, g, "splam")
    assert u.dtype == torch.float64 and 0 <= u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.02
    assert (u == 1).sum() == 0  # U[0, 1] never draws the sampling point gamma = 1 exactly
    mixed = sample_gamma(4000, torch.Generator().manual_seed(0), "splam", p_one=0.25)
    share = (mixed == 1).double().mean().item()
    assert abs(share - 0.25) < 0.03 and ((mixed < 1) | (mixed == 1)).all()
    assert torch.equal(sample_gamma(5, None, "lcm"), torch.ones(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="p_one"):
        sample_gamma(3, None, "splam", p_one=1.5)
    with pytest.raises(ValueError, match="method"):
        sample_gamma(3, None, "dmd")


def test_gamma_embedding_scale_keeps_gamma_one_at_embedding_zero_and_smooths():
    """emb(1) = embedding(0) at any scale (stock pipelines at guidance_scale 1); a small scale is smooth in gamma."""
    from splam_studio.core.slode import guidance_embedding

    zero = guidance_embedding(torch.zeros(1), 256)
    for scale in (10.0, 0.005):
        assert torch.equal(gamma_embedding(torch.ones(1), 256, scale), zero)
    g = torch.tensor([0.50, 0.51])
    step = lambda scale: (gamma_embedding(g, 256, scale).diff(dim=0).abs().max().item())  # noqa: E731
    assert step(0.005) < 0.06  # every frequency moves by less than 1000 * 0.005 * 0.01 = 0.05 rad
    assert step(10.0) > 1.0  # the authors' scale: some frequency turns by radians for a 0.01 change in gamma


def test_w_offset_embedding_matches_diffusers_guidance_embedding():
    """diffusers' LCM recipe: at gamma = 1 and w_c = w the student sees get_guidance_scale_embedding(w) at any scale."""
    from diffusers import StableDiffusionPipeline

    w = torch.tensor([0.0, 3.0, 6.5, 10.0], dtype=torch.float64)
    ref = StableDiffusionPipeline.get_guidance_scale_embedding(None, w.float(), embedding_dim=256)
    for scale in (10.0, 0.005):
        ours = gamma_embedding(torch.ones(4, dtype=torch.float64), 256, scale, w_c=w)
        assert torch.allclose(ours, ref, atol=1e-5)
    # the offset adds to omega = scale (1 - gamma): gamma = 0.7 at scale 10 with w_c = 1 is omega = 4
    both = gamma_embedding(torch.tensor([0.7]), 256, 10.0, w_c=1.0)
    assert torch.allclose(both, StableDiffusionPipeline.get_guidance_scale_embedding(None, torch.tensor([4.0]), 256), atol=1e-4)


def test_sample_w_is_uniform_on_the_range():
    from splam_studio.core.slode import sample_w

    w = sample_w(4000, 3.0, 10.0, torch.Generator().manual_seed(0))
    assert w.shape == (4000,) and w.dtype == torch.float64
    assert 3.0 <= w.min() and w.max() <= 10.0 and abs(w.mean().item() - 6.5) < 0.1
    assert torch.equal(sample_w(3, 2.0, 2.0), torch.full((3,), 2.0, dtype=torch.float64))
