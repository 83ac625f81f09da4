"""One SPLAD step (Algorithm 1 of the slides), as a pure function of models and a batch.

The training loop (`training/loop.py`) only adds the optimiser step and the EMA update (step 7, `student.ema_update`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers import UNet2DConditionModel

from .adversarial import adversarial_losses, one_step
from .dmd import dmd_losses
from .schedule import NoiseSchedule, coef, ddim_grid, sample_grid_t, sub_path_k
from .slode import GAMMA_SCALE_PAPER, GAMMA_TIMES, Distance, GammaTime, distance, sample_gamma, sample_w, splam_loss
from .solver import guided_eps, solve
from .student import student_F
from .teacher import Condition


@dataclass(frozen=True)
class SpladConfig:
    """The objective; each field's help is the trainer's flag help (training/cli.py builds --method, --w, ... from it)."""
    method: str = field(default="splam", metadata={"help": "splam (gamma ~ U[0,1] on the SL-ODE) or lcm (gamma = 1; "
                                                           "everything else identical)"})
    w: float = field(default=8.0, metadata={"help": "teacher guidance w in the LCM form eps_c + w (eps_c - eps_u); "
                                                    "8 = CFG 9 (authors)"})
    num_ddim_steps: int = field(default=50, metadata={"help": "N of the DDIM grid t_i = 20 (i + 1) - 1; k_phi = 1000 / N"})
    m: int = field(default=1, metadata={"help": "multiple estimation: m chained teacher DDIM steps, k = m * k_phi "
                                                "(authors: m = 1, k = 20)"})
    distance: Distance = field(default="huber", metadata={"help": "loss distance: huber (pseudo-Huber, c = 0.001, as "
                                                                  "the authors and diffusers' LCM script) or l2"})
    huber_c: float = field(default=1e-3, metadata={"help": "pseudo-Huber c, in latent units"})
    gamma_one_prob: float = field(default=0.0, metadata={"help": "SPLAM: probability of gamma = 1, the point the "
                                                                 "sampler uses (0 = the paper's U[0,1])"})
    gamma_scale: float = field(default=GAMMA_SCALE_PAPER, metadata={
        "help": "gamma embedding = guidance embedding of gamma_scale * (1 - gamma); 10 = the authors' "
                "(gamma = 1 -> 0 at any scale)"})
    gamma_time: GammaTime = field(default="t", metadata={
        "help": "SPLAM: timestep the student sees at z_gamma: t (the paper, every gamma) or matched (the timestep of "
                "z_gamma's own noise level, input rescaled onto the marginal)"})
    # 1-step ablations (issue 25): a k schedule, timesteps weighted toward t = 999, and DMD's regression on the
    # teacher's own (z_T, z_0) ODE pairs. Their defaults draw and compute exactly as the paper's Algorithm 1.
    k_high: int | None = field(default=None, metadata={
        "help": "k schedule: sub-paths of length k_high (a multiple of k = m * k_phi) from t >= --t-high, the paper's "
                "k below (default: k everywhere)"})
    t_high: int = field(default=500, metadata={"help": "where the k schedule's long sub-paths start (with --k-high)"})
    t_top_prob: float = field(default=0.0, metadata={
        "help": "probability of drawing the top grid timestep t = 999, where 1-step sampling starts (else uniform on "
                "the grid; 0 = the paper)"})
    regression: float = field(default=0.0, metadata={
        "help": "weight of a regression of the 1-step student F(z_T, 999) onto the teacher's own z_0 from the same "
                "noise z_T (DMD's paired loss); its pairs: teacher data (--prompts), which stores each z_T, or a "
                "pairs store of their own (--regression-prompts)"})
    adversarial: float = field(default=0.0, metadata={
        "help": "weight of an adversarial term on the 1-step student F(z_T, 999) (LADD style, core/adversarial.py): "
                "a discriminator of small heads on the frozen teacher UNet's encoder features, hinge loss, the batch's "
                "z_0 as real (0 = off, the paper)"})
    adversarial_t_max: int = field(default=250, metadata={
        "help": "the discriminator sees real and fake re-noised to t_d ~ U{0 .. this} (with --adversarial; at 750 the "
                "Shapes discriminator stayed at chance for 600 steps)"})
    dmd: float = field(default=0.0, metadata={
        "help": "weight of distribution matching on the 1-step student F(z_T, 999) (DMD / DMD2, core/dmd.py): the "
                "gradient between the teacher's CFG score and a fake score fitted online to the student's images "
                "(0 = off, the paper; not with --adversarial)"})
    # diffusers' LCM recipe (LCM only): w ~ U[w_min, w_max] per sample, used by the teacher and embedded for student
    # and target (omega = w at gamma = 1). None = the fixed w above, unembedded (= SPLAM at gamma = 1)
    w_min: float | None = field(default=None, metadata={
        "help": "lcm only, diffusers' LCM recipe: draw w ~ U[w_min, w_max] per sample for the teacher and embed it "
                "for the student (with --w-max; default: fixed --w, not embedded)"})
    w_max: float | None = field(default=None, metadata={
        "help": "upper end of the w range (with --w-min); the student then samples at CFG w + 1 (w from --w, inside "
                "the range)"})

    def __post_init__(self):
        if self.method not in ("splam", "lcm"):
            raise ValueError(f"method must be 'splam' or 'lcm', got {self.method!r}")
        if self.m < 1 or self.num_ddim_steps < 1:
            raise ValueError(f"need m >= 1 and num_ddim_steps >= 1, got m={self.m}, N={self.num_ddim_steps}")
        if not self.gamma_scale > 0:
            raise ValueError(f"gamma_scale must be > 0, got {self.gamma_scale}")
        if self.gamma_time not in GAMMA_TIMES:
            raise ValueError(f"gamma_time must be one of {GAMMA_TIMES}, got {self.gamma_time!r}")
        if self.k_high is not None and self.k_high < 1:
            raise ValueError(f"k_high must be a positive multiple of k = m * k_phi, got {self.k_high}")
        if not 0.0 <= self.t_top_prob <= 1.0:
            raise ValueError(f"t_top_prob must be in [0, 1], got {self.t_top_prob}")
        if not self.adversarial >= 0:
            raise ValueError(f"adversarial weight must be >= 0, got {self.adversarial}")
        if not 0 <= self.adversarial_t_max <= 999:
            raise ValueError(f"adversarial_t_max must be in [0, 999], got {self.adversarial_t_max}")
        if not self.dmd >= 0:
            raise ValueError(f"dmd weight must be >= 0, got {self.dmd}")
        if self.dmd > 0 and self.adversarial > 0:
            raise ValueError("--dmd and --adversarial each train their own critic; use one of them")
        if not self.regression >= 0:
            raise ValueError(f"regression weight must be >= 0, got {self.regression}")
        if self.regression > 0 and self.w_min is not None:
            raise ValueError("the regression's teacher pairs are made at one w; it does not go with a w range "
                             "(w_min, w_max)")
        if self.distance not in ("l2", "huber"):
            raise ValueError(f"distance must be 'l2' or 'huber', got {self.distance!r}")
        if (self.w_min is None) != (self.w_max is None):
            raise ValueError(f"set both w_min and w_max (a w range) or neither, got w_min={self.w_min}, w_max={self.w_max}")
        if self.w_min is not None:
            if self.method != "lcm":
                raise ValueError(f"a w range (w_min, w_max) is diffusers' LCM recipe: it needs method 'lcm', got {self.method!r}")
            if not 0 <= self.w_min <= self.w_max:
                raise ValueError(f"need 0 <= w_min <= w_max, got w_min={self.w_min}, w_max={self.w_max}")

    @property
    def w_conditioned(self) -> bool:
        """True when w is drawn per sample and embedded (diffusers' LCM recipe)."""
        return self.w_min is not None


def splad_loss(
    cfg: SpladConfig,
    schedule: NoiseSchedule,
    student: UNet2DConditionModel,
    target: UNet2DConditionModel,
    teacher: UNet2DConditionModel,
    z_0: torch.Tensor,
    cond: Condition,
    uncond: Condition,
    generator: torch.Generator | None = None,
    z_T: torch.Tensor | None = None,
    critic: torch.nn.Module | None = None,
    pairs: tuple[torch.Tensor, torch.Tensor, Condition] | None = None,
) -> torch.Tensor:
    """Steps 1-6 of Algorithm 1 for clean latents z_0 (B, C, h, w) and text conditions cond, uncond: embeddings
    (B, L, D), or SDXL TextConditions (core.teacher), each branch with its own pooled embeds and time ids.

    z_T: the initial noise the teacher made each z_0 from (teacher data), for cfg.regression > 0.
    pairs: (z_T, z_0, cond) of the teacher's guided ODE apart from the batch (a pairs store beside image data, or
    beside teacher data at another guidance), for cfg.regression > 0; default: the batch's own (z_T, z_0, cond).
    critic: the network trained against the student: the heads of core.adversarial (cfg.adversarial > 0), or the fake
    score of core.dmd (cfg.dmd > 0). The returned loss then also holds its own loss (the heads' hinge loss L_D, the fake
    score's denoising loss L_fake), whose gradient reaches only the critic (the student's gradient is that of the rest)."""
    B = z_0.shape[0]
    if cfg.regression > 0 and z_T is None and pairs is None:
        raise ValueError("the regression term needs the teacher's (z_T, z_0) pairs: train on teacher data (--prompts), "
                         "or give a pairs store (--regression-prompts)")
    if cfg.adversarial > 0 and critic is None:
        raise ValueError("the adversarial term needs a critic: the discriminator heads (core.adversarial.Heads)")
    if cfg.dmd > 0 and critic is None:
        raise ValueError("distribution matching needs a critic: the fake score (core.dmd.make_fake_score)")
    # 1. grid time t, s = t - k(t), and z_t = alpha(t) z_0 + sigma(t) eps
    grid = ddim_grid(schedule.T, cfg.num_ddim_steps)
    k_phi = schedule.T // cfg.num_ddim_steps
    t = sample_grid_t(grid, B, generator, cfg.t_top_prob)
    step = k_phi if cfg.k_high is None else sub_path_k(t, cfg.m * k_phi, cfg.k_high, cfg.t_high) // cfg.m
    eps = torch.randn(z_0.shape, generator=generator, dtype=z_0.dtype).to(z_0.device)
    z_t = coef(schedule.alpha(t), z_0) * z_0 + coef(schedule.sigma(t), z_0) * eps
    t_dev = t.to(z_0.device)
    # 2. teacher, no grad: zhat_s = m chained guided DDIM steps of size k_phi, at fixed w or w ~ U[w_min, w_max]
    w = sample_w(B, cfg.w_min, cfg.w_max, generator) if cfg.w_conditioned else cfg.w  # (B,) float64 or float
    with torch.no_grad():
        zhat_s, s = solve(guided_eps(teacher, cond, uncond, w), schedule, z_t, t_dev, cfg.m, step)
    # 3. gamma ~ U[0, 1] (SPLAM) or gamma = 1 (LCM)
    gamma = sample_gamma(B, generator, cfg.method, cfg.gamma_one_prob)
    # 4-6. student on the SL-ODE point, EMA target at (zhat_s, s, gamma = 1), distance; a drawn w is embedded in both
    w_c = w if cfg.w_conditioned else None
    F_student, F_target = student_F(student, cond, cfg.gamma_scale, w_c), student_F(target, cond, cfg.gamma_scale, w_c)
    loss = splam_loss(F_student, F_target, schedule, z_t, zhat_s, t, s.cpu(), gamma, cfg.distance, cfg.huber_c,
                      cfg.gamma_time)
    x_1 = None  # the 1-step sample F(z_T, T - 1), shared by the 1-step terms on the batch
    if cfg.regression > 0:  # DMD's regression: onto the teacher's own ODE solution from the same noise
        # teacher data: the batch holds its own pairs (and its 1-step sample serves the critics too)
        p_T, p_0, F_p = (z_T, z_0, F_student) if pairs is None else \
            (pairs[0], pairs[1], student_F(student, pairs[2], cfg.gamma_scale))
        x_p = one_step(F_p, schedule, p_T.to(p_0))
        loss = loss + cfg.regression * distance(x_p, p_0, cfg.distance, cfg.huber_c)
        x_1 = x_p if pairs is None else None
    if cfg.adversarial > 0 or cfg.dmd > 0:
        if x_1 is None:
            if z_T is None:  # image data: fresh noise
                z_T = torch.randn(z_0.shape, generator=generator, dtype=z_0.dtype)
            x_1 = one_step(F_student, schedule, z_T.to(z_0))
        if cfg.adversarial > 0:
            l_g, l_d = adversarial_losses(critic, teacher, schedule, x_1, z_0, cond, generator,
                                          cfg.adversarial_t_max)
            loss = loss + cfg.adversarial * l_g + l_d
        if cfg.dmd > 0:  # the real score at the step's w, the fake score fitted to the student here
            l_dm, l_fake = dmd_losses(critic, teacher, schedule, x_1, cond, uncond, w, generator)
            loss = loss + cfg.dmd * l_dm + l_fake
    return loss

