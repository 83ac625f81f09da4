"""Mutation check: plausible bugs put into a copy of the package one at a time; do the tests notice?

    nice -n 10 python -m splam_studio.tools.mutation           # every file below; writes benchmarks/mutation.json
    python -m splam_studio.tools.mutation --files core/splad.py core/slode.py
    python -m splam_studio.tools.mutation --files training/loop.py --tests training/loop.py=tests/test_loop.py
    python -m splam_studio.tools.mutation --list               # the mutants, no run

Each mutant is a named source edit (an exact snippet and its replacement) of one file of `splam_studio/`. For each,
the package and `tests/` are copied to a temporary folder (weights/ linked), the edit is applied there, and the
tests that reach that file (TESTS, or --tests) run with a timeout. A mutant is *killed* when they fail (or time out),
*survived* when they pass. A snippet that no longer occurs exactly once is reported *stale* (the source changed:
update the mutant), never silently skipped. The unmutated tests must pass first, else the file is reported *broken*.

Runs are forked from one process that has imported torch and diffusers once (about 3 s saved per mutant on this
CPU); `--no-fork` starts a fresh interpreter per mutant instead. The result file is merged per file: a run of some
files keeps the last result of the others. Exit status: 0 all killed, 1 a survivor or a stale mutant, 2 broken tests.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = "splam_studio"


@dataclass(frozen=True)
class Mutant:
    name: str
    old: str
    new: str


def M(name: str, old: str, new: str) -> Mutant:
    return Mutant(name, old, new)


# ---- the mutants: issue 27's survivors first, then the usual operator swaps ---------------------------------------
MUTANTS: dict[str, list[Mutant]] = {
    "core/splad.py": [
        M("alpha and sigma swapped in z_t", "coef(schedule.alpha(t), z_0) * z_0 + coef(schedule.sigma(t), z_0) * eps",
          "coef(schedule.sigma(t), z_0) * z_0 + coef(schedule.alpha(t), z_0) * eps"),
        M("target built from the online student", "student_F(target, cond, cfg.gamma_scale, w_c)",
          "student_F(student, cond, cfg.gamma_scale, w_c)"),
        M("LCM draws gamma ~ U[0, 1]", "sample_gamma(B, generator, cfg.method, cfg.gamma_one_prob)",
          "sample_gamma(B, generator, 'splam', cfg.gamma_one_prob)"),
        M("teacher cond and uncond swapped", "guided_eps(teacher, cond, uncond, w)", "guided_eps(teacher, uncond, cond, w)"),
        M("k_phi = 19", "k_phi = schedule.T // cfg.num_ddim_steps", "k_phi = schedule.T // cfg.num_ddim_steps - 1"),
        M("fixed w ignored (w = 0)", "if cfg.w_conditioned else cfg.w  #", "if cfg.w_conditioned else 0.0  #"),
        M("m ignored", "z_t, t_dev, cfg.m, step)", "z_t, t_dev, 1, step)"),
        M("k schedule ignored", "step = k_phi if cfg.k_high is None else", "step = k_phi if True else"),
        M("t_top_prob ignored", "sample_grid_t(grid, B, generator, cfg.t_top_prob)", "sample_grid_t(grid, B, generator)"),
        M("regression weight ignored", "loss + cfg.regression * distance(x_p", "loss + distance(x_p"),
        M("regression from z_0, not z_T", "x_p = one_step(F_p, schedule, p_T.to(p_0))", "x_p = one_step(F_p, schedule, p_0)"),
        M("store pairs on the batch's text", "student_F(student, pairs[2], cfg.gamma_scale)",
          "student_F(student, cond, cfg.gamma_scale)"),
        M("store pairs regressed onto the batch's z_0", "(pairs[0], pairs[1], student_F", "(pairs[0], z_0, student_F"),
        M("adversarial weight ignored", "loss + cfg.adversarial * l_g + l_d", "loss + l_g + l_d"),
        M("discriminator loss dropped", "loss + cfg.adversarial * l_g + l_d", "loss + cfg.adversarial * l_g"),
        M("dmd weight ignored", "loss + cfg.dmd * l_dm + l_fake", "loss + l_dm + l_fake"),
        M("fake score's loss dropped", "loss + cfg.dmd * l_dm + l_fake", "loss + cfg.dmd * l_dm"),
        M("real score without CFG", "x_1, cond, uncond, w, generator)", "x_1, cond, uncond, 0.0, generator)"),
        M("distance ignored (always l2)", "gamma, cfg.distance, cfg.huber_c,", "gamma, 'l2', cfg.huber_c,"),
        M("gamma_time ignored", "cfg.gamma_time)\n", "'t')\n"),
        M("target without the drawn w", "student_F(target, cond, cfg.gamma_scale, w_c)",
          "student_F(target, cond, cfg.gamma_scale, None)"),
        M("m >= 1 not checked", "if self.m < 1 or", "if self.m < 0 or"),
        M("gamma_scale > 0 not checked", "if not self.gamma_scale > 0:", "if not self.gamma_scale > -1:"),
    ],
    "core/adversarial.py": [
        M("1-step sample at t = 0, not 999", "t = torch.full((B,), schedule.T - 1, dtype=torch.long)",
          "t = torch.full((B,), 0, dtype=torch.long)"),
        M("generator loss sign swapped", "return -d_fake_for_g.mean(), l_d", "return d_fake_for_g.mean(), l_d"),
        M("hinge on the real side flipped", "torch.relu(1 - d_real)", "torch.relu(1 + d_real)"),
        M("L_G trains the heads", "{k: v.detach() for k, v in base.named_parameters()}", "dict(base.named_parameters())"),
        M("L_D reaches the student", "r, f.detach()]) for r, f in", "r, f]) for r, f in"),
        M("the mid block's features dropped", "        feats.append(out)\n        raise _Encoded", "        raise _Encoded"),
        M("fake and real at different noise", "teacher_features(teacher, a * z_0 + s * noise, t_d, cond)",
          "teacher_features(teacher, a * z_0 + s * torch.randn_like(noise), t_d, cond)"),
        M("discriminator sees the clean latents", "a, s = coef(schedule.alpha(t_d), z_0), coef(schedule.sigma(t_d), z_0)",
          "a, s = coef(schedule.alpha(t_d) * 0 + 1, z_0), coef(schedule.sigma(t_d) * 0, z_0)"),
    ],
    "core/dmd.py": [
        M("gradient sign swapped", "(x0_fake - x0_real) / weight", "(x0_real - x0_fake) / weight"),
        M("gradient not normalised", "torch.nan_to_num((x0_fake - x0_real) / weight)", "torch.nan_to_num(x0_fake - x0_real)"),
        M("normalised by the fake's distance", "weight = (x_hat - x0_real).abs()", "weight = (x_hat - x0_fake).abs()"),
        M("L_fake reaches the student", "x_f = coef(schedule.alpha(t_f), x) * x + coef(schedule.sigma(t_f), x) * n_f",
          "x_f = coef(schedule.alpha(t_f), x) * x_hat + coef(schedule.sigma(t_f), x) * n_f"),
        M("real score unguided", "guided_eps(teacher, cond, uncond, w)(x_t, t_dev)", "guided_eps(teacher, cond, uncond, 0.0)(x_t, t_dev)"),
        M("fake score fitted to x0, not eps", "t_f.to(x.device), cond), n_f)", "t_f.to(x.device), cond), x)"),
        M("fake score shares the teacher", "fake = copy.deepcopy(teacher).float()", "fake = teacher.float()"),
        M("t drawn from 0", "t = torch.randint(t_min, t_max + 1, (B,), generator=generator)",
          "t = torch.randint(0, t_max + 1, (B,), generator=generator)"),
    ],
    "core/slode.py": [
        M("sigma_gamma with gamma for gamma^2", "g**2 * (1 - r**2)", "g * (1 - r**2)"),
        M("student's x0 with sigma(t) instead of sigma_gamma", "pred = F_student(z_g, t, gamma, sigma_g, alpha_t)",
          "pred = F_student(z_g, t, gamma, schedule.sigma(t), alpha_t)"),
        M("z_gamma ends swapped", "return g * z_t + (1 - g) * coef(r, z_t) * zhat_s",
          "return (1 - g) * z_t + g * coef(r, z_t) * zhat_s"),
        M("z_gamma without the drift r", "(1 - g) * coef(r, z_t) * zhat_s", "(1 - g) * zhat_s"),
        M("r inverted", "r = alpha_t / alpha_s  #", "r = alpha_s / alpha_t  #"),
        M("target at the student's gamma", "F_target(zhat_s, s, torch.ones_like(gamma), sigma_s, alpha_s)",
          "F_target(zhat_s, s, gamma, sigma_s, alpha_s)"),
        M("target with grad", "    with torch.no_grad():\n        target = F_target", "    if True:\n        target = F_target"),
        M("pseudo-Huber without - c", "(torch.sqrt(d**2 + c**2) - c).mean()", "torch.sqrt(d**2 + c**2).mean()"),
        M("l2 summed", "return (d**2).mean()", "return (d**2).sum()"),
        M("omega = scale gamma", "omega = scale * (1.0 - torch.as_tensor(gamma", "omega = scale * (0.0 + torch.as_tensor(gamma"),
        M("w_c subtracted", "omega + torch.as_tensor(w_c", "omega - torch.as_tensor(w_c"),
        M("embedding input not times 1000", ".reshape(-1) * 1000.0  # (B,)", ".reshape(-1) * 100.0  # (B,)"),
        M("sin and cos swapped", "torch.cat([torch.sin(args), torch.cos(args)], dim=1)",
          "torch.cat([torch.cos(args), torch.sin(args)], dim=1)"),
        M("p_one comparison flipped", "< p_one, 1.0, gamma)", "> p_one, 1.0, gamma)"),
        M("w drawn from the wrong end", "dtype=torch.float64) + w_min", "dtype=torch.float64) + w_max"),
        M("matched alpha_bar without squares", "alpha_bar = alpha_t**2 / (alpha_t**2 + sigma**2)",
          "alpha_bar = alpha_t / (alpha_t + sigma)"),
        M("matched input not rescaled", "return coef(alpha_m / alpha_t, z) * z,", "return z,"),
    ],
    "core/student.py": [
        M("student always embedding gamma = 1", "cond = gamma_embedding(gamma, dim, gamma_scale, w_c)",
          "cond = gamma_embedding(torch.ones_like(torch.as_tensor(gamma)), dim, gamma_scale, w_c)"),
        M("gamma_scale ignored", "cond = gamma_embedding(gamma, dim, gamma_scale, w_c)",
          "cond = gamma_embedding(gamma, dim, 10.0, w_c)"),
        M("fresh cond_proj init bound 1/d", "bound = 1.0 / embed_dim**0.5", "bound = 1.0 / embed_dim"),
        M("fresh cond_proj init not centred", "* 2 * bound - bound)", "* 2 * bound)"),
        M("target trainable", "copy.deepcopy(student).requires_grad_(False)", "copy.deepcopy(student)"),
        M("target in train mode", "return target.eval()", "return target"),
        M("EMA decay mu passed as 1 - mu", "p_t.lerp_(p.detach().to(p_t.dtype), 1.0 - mu)", "p_t.lerp_(p.detach().to(p_t.dtype), mu)"),
        M("zero init not zero", "w.zero_()", "w.mul_(1.0)"),
        M("clean_fn at gamma = 0", "ones = torch.ones(z.shape[0], dtype=torch.float64)",
          "ones = torch.zeros(z.shape[0], dtype=torch.float64)"),
        M("clean_fn sigma and alpha swapped", "F(z, t, ones, schedule.sigma(t), schedule.alpha(t))",
          "F(z, t, ones, schedule.alpha(t), schedule.sigma(t))"),
        M("a distilled student accepted as teacher", "if teacher.config.time_cond_proj_dim is not None:", "if False:"),
        M("clean_fn's w_c dropped", "F = student_F(unet, encoder_hidden_states, w_c=w_c)", "F = student_F(unet, encoder_hidden_states)"),
    ],
    "core/schedule.py": [
        M("t = 999 never drawn", "grid[torch.randint(len(grid), (batch,)", "grid[torch.randint(len(grid) - 1, (batch,)"),
        M("top draw at the bottom", "t = torch.where(top, grid[-1], t)", "t = torch.where(top, grid[0], t)"),
        M("k_high from t > t_high", "torch.where(t >= t_high, torch.full_like(t, k_high)", "torch.where(t > t_high, torch.full_like(t, k_high)"),
        M("sigma without sqrt", "return (1.0 - self._table(t)).sqrt()", "return 1.0 - self._table(t)"),
        M("alpha without sqrt", "return self._table(t).sqrt()", "return self._table(t)"),
        M("upper range check off by one", "(t >= self.T).any()", "(t > self.T).any()"),
        M("DDIM grid without - 1", "* k_phi - 1\n", "* k_phi\n"),
        M("LCM timesteps from the wrong end", "num_steps + 1, dtype=torch.float64)[:-1]", "num_steps + 1, dtype=torch.float64)[1:]"),
        M("timestep_of fraction added", "(self.T - j).to(torch.float64) - frac", "(self.T - j).to(torch.float64) + frac"),
        M("coef keeps float64", "like.ndim).to(like.dtype).to(like.device)", "like.ndim).to(like.device)"),
        M("v-prediction accepted", 'if pred != "epsilon":', "if False:"),
        M("the schedule ignores its config", "DDPMScheduler.from_config(dict(config))", "DDPMScheduler.from_config(SD15_SCHEDULER_CONFIG)"),
        M("alpha_bar of the betas themselves", "torch.cumprod(1.0 - betas_from_config(config), dim=0)", "torch.cumprod(betas_from_config(config), dim=0)"),
    ],
    "core/consistency.py": [
        M("c_skip with sigma_data", "return sigma_data**2 / (st**2 + sigma_data**2)", "return sigma_data / (st**2 + sigma_data**2)"),
        M("c_out without sqrt", "return st / (st**2 + sigma_data**2).sqrt()", "return st / (st**2 + sigma_data**2)"),
        M("timestep scaling 1", "TIMESTEP_SCALING = 10.0", "TIMESTEP_SCALING = 1.0"),
        M("x0 with + sigma eps", "(z - coef(sigma, z) * eps) / coef(alpha, z)", "(z + coef(sigma, z) * eps) / coef(alpha, z)"),
        M("boundary scalings swapped", "coef(c_skip(t), z) * z + coef(c_out(t), z) * x0", "coef(c_out(t), z) * z + coef(c_skip(t), z) * x0"),
        M("F with alpha and sigma swapped", "x0_from_eps(z, eps, alpha, sigma)", "x0_from_eps(z, eps, sigma, alpha)"),
    ],
    "core/solver.py": [
        M("guidance from eps_u", "return eps_c + w_ * (eps_c - eps_u)", "return eps_u + w_ * (eps_c - eps_u)"),
        M("guidance sign", "return eps_c + w_ * (eps_c - eps_u)", "return eps_c + w_ * (eps_u - eps_c)"),
        M("DDIM step with sigma(t)", "coef(alpha_s, z_t) * x0 + coef(sigma_s, z_t) * eps", "coef(alpha_s, z_t) * x0 + coef(sigma_t, z_t) * eps"),
        M("DDIM x0 with sigma(s)", "x0 = x0_from_eps(z_t, eps, alpha_t, sigma_t)", "x0 = x0_from_eps(z_t, eps, alpha_t, sigma_s)"),
        M("solver step k_phi - 1", "s_j = (t_j - k_phi).clamp(min=0)", "s_j = (t_j - k_phi + 1).clamp(min=0)"),
        M("one step whatever m", "for _ in range(m):", "for _ in range(1):"),
        M("time not advanced", "        t_j = s_j\n", "        t_j = t_j\n"),
    ],
    "core/teacher.py": [
        M("VAE scale factor off by one power", "2 ** (len(vae.config.block_out_channels) - 1)", "2 ** len(vae.config.block_out_channels)"),
        M("cfg_scale = w", "return w + 1.0", "return w"),
        M("lcm_w = s", "return cfg - 1.0", "return cfg"),
        M("tokens padded to the longest", 'padding="max_length"', 'padding="longest"'),
        M("pooled output instead of hidden states", "return pipe.text_encoder(ids)[0]", "return pipe.text_encoder(ids)[1]"),
        M("SDXL embeds from the last layer", "hidden.append(out.hidden_states[-2])", "hidden.append(out.hidden_states[-1])"),
        M("SDXL empty prompt not zeroed", "c = TextCondition(torch.zeros_like(c.embeds), torch.zeros_like(c.pooled), c.time_ids)",
          "c = c"),
        M("SDXL uncond with the default time ids", "as_condition(cond).time_ids)", "uncond_1.time_ids.expand(n, -1))"),
        M("SDXL batched uncond takes cond's ids", "else torch.cat([a, b]) for a, b in parts", "else torch.cat([a, a]) for a, b in parts"),
        M("SDXL time ids out of order", "for x in (original_size, crop_top_left, target_size)]",
          "for x in (crop_top_left, original_size, target_size)]"),
        M("SDXL time ids reversed at the UNet", '"time_ids": self.time_ids.to(dtype)}', '"time_ids": self.time_ids.flip(1).to(dtype)}'),
    ],
    "core/sampler.py": [
        M("re-noise with alpha and sigma swapped", "z = coef(schedule.alpha(t_next), z) * x0 + coef(schedule.sigma(t_next), z) * noise",
          "z = coef(schedule.sigma(t_next), z) * x0 + coef(schedule.alpha(t_next), z) * noise"),
        M("last step returns z", "            return x0\n", "            return z\n"),
    ],
    "models/generation.py": [
        M("initial noise of seed + 1", "g = torch.Generator(\"cpu\").manual_seed(int(seed))\n", "g = torch.Generator(\"cpu\").manual_seed(int(seed) + 1)\n"),
        M("student guidance ignored", "guidance_scale, negative_prompt = student_guidance_scale, None",
          "guidance_scale, negative_prompt = 1.0, None"),
        M("re-noising generator of seed", "manual_seed(int(seed) + 1)  # re-noising", "manual_seed(int(seed))  # re-noising"),
        M("decode multiplies by the scaling factor", "z = latents.to(device) / vae.config.scaling_factor",
          "z = latents.to(device) * vae.config.scaling_factor"),
        M("DPM++ as dpmsolver", '"algorithm_type": "dpmsolver++"', '"algorithm_type": "dpmsolver"'),
        M("students may use a teacher solver", 'if is_student and sampler != "lcm":', "if False:"),
    ],
    "core/error_bound.py": [
        M("rms without sqrt", ".flatten(1).mean(1).sqrt()", ".flatten(1).mean(1)"),
        M("bound summed from the start", "bound = terms.flip(0).cumsum(0).flip(0)", "bound = terms.cumsum(0)"),
        M("error against z_T", "rms(Fs[j] - z_0)", "rms(Fs[j] - trajectory[0])"),
        M("trajectory without t = 0", "times = grid + [0]", "times = grid + [grid[-1]]"),
        M("guided trajectory at w + 1", "teacher_trajectory(guided_eps(unet, cond, uncond, w), schedule",
          "teacher_trajectory(guided_eps(unet, cond, uncond, w + 1), schedule"),
        M("stride ignored", "idx = list(range(len(times) - 1, -1, -stride))[::-1]", "idx = list(range(len(times) - 1, -1, -1))[::-1]"),
    ],
    "core/metrics.py": [
        M("PSNR with data_range not squared", "10.0 * torch.log10(data_range**2 / mse", "10.0 * torch.log10(data_range / mse"),
        M("PSNR of summed error", ".pow(2).flatten(1).mean(1)\n    return 10.0", ".pow(2).flatten(1).sum(1)\n    return 10.0"),
        M("FID without the factor 2", "- 2.0 * np.trace(covmean)", "- np.trace(covmean)"),
        M("FID without the mean term", "return float(diff @ diff + np.trace", "return float(np.trace"),
        M("covariance over features", "np.cov(f, rowvar=False)", "np.cov(f, rowvar=True)"),
        M("latent MSE summed", 'return (a.float() - b.float()).pow(2).flatten(1).mean(1)\n', 'return (a.float() - b.float()).pow(2).flatten(1).sum(1)\n'),
    ],
    "training/checkpoints.py": [
        M("a checkpoint missing tensors is not refused", 'if missing or extra:\n        raise CheckpointError(f"{kind} does not match',
          'if extra:\n        raise CheckpointError(f"{kind} does not match'),
        M("a checkpoint missing a file is not refused", '    if missing:\n        raise CheckpointError(f"it lacks',
          '    if False:\n        raise CheckpointError(f"it lacks'),
        M("snapshots keeping the online student", "for k, v in target.state_dict().items() if k in trainable}\n    try:",
          "for k, v in student.state_dict().items() if k in trainable}\n    try:"),
        M("checkpoint target from the student", "for k, v in target.state_dict().items() if k in student_sd}",
          "for k, v in student.state_dict().items() if k in student_sd}"),
        M("target restored from the student file", 'target.load_state_dict(ck["target"], strict=False)',
          'target.load_state_dict(ck["student"], strict=False)'),
        M("one checkpoint too many kept", "if p.is_dir())[:-keep]:", "if p.is_dir())[:-keep - 1]:"),
        M("latest is the oldest", "return done[-1] if done else None", "return done[0] if done else None"),
        M("incomplete checkpoints resumed", 'glob("step-*") if (p / "state.json").is_file())', 'glob("step-*"))'),
        M("loss scale not restored", '            grad_scaler.load_state_dict(ck["state"]["grad_scaler"])', "            pass"),
        M("snapshots in fp32", "v.detach().cpu().half().contiguous()", "v.detach().cpu().contiguous()"),
        M("optimiser state not restored", '        _load_optimizer(opt, ck["opt_tensors"], ck["opt_meta"])', "        pass"),
        M("a checkpoint past --max-steps accepted", "if max_steps is not None and ck[\"step\"] > max_steps:", "if False:"),
        M("the critic not restored", '            critic[0].load_state_dict(ck["critic"]["params"], strict=False)\n',
          "            pass\n"),
        M("a critic mismatch accepted", 'if (disc is None) != (critic is None):', "if False:"),
    ],
    "training/data.py": [
        M("is_relative_to(root) traversal guard removed", "if not path.is_relative_to(self.root) or not path.is_file():",
          "if not path.is_file():"),
        M("split_by_worker removed", "wds.SimpleShardList(self.shards), wds.split_by_worker,", "wds.SimpleShardList(self.shards),"),
        M("steps per epoch without the worker split", "return int(rounding(per_worker / batch_size)) * workers",
          "return int(rounding(num_examples / batch_size))"),
        M("alpha composited on black", "Image.new(\"RGBA\", rgba.size, WHITE + (255,))", "Image.new(\"RGBA\", rgba.size, (0, 0, 0, 255))"),
        M("16-bit not rescaled", "np.clip(arr / peak * 255.0 + 0.5, 0, 255)", "np.clip(arr + 0.5, 0, 255)"),
        M("resize to the longer side", "scale = resolution / min(w, h)", "scale = resolution / max(w, h)"),
        M("crop at the corner", "left, top = (nw - resolution) // 2, (nh - resolution) // 2", "left, top = 0, 0"),
        M("pixels in [0, 2]", ".float().div(127.5).sub(1.0)", ".float().div(127.5)"),
        M("max_pixels not enforced", "        if w * h > max_pixels:\n            raise _TooLarge", "        if False:\n            raise _TooLarge"),
        M("undecodable caption kept", "            counter.skip(NOT_UTF8, where)\n            return None", "            counter.skip(NOT_UTF8, where)\n            return ''"),
        M("caption whitespace kept", 'text = " ".join(str(raw).split())', "text = str(raw)"),
        M("missing image not counted", "        counter.skip(NO_IMAGE, where)\n        return None", "        return None"),
        M("batch fits when it does not", "if n >= batch_size * world:", "if n >= batch_size:"),
        M("collate keeps None", "kept = [b for b in batch if b is not None]", "kept = [b for b in batch]"),
        M("map-style data not shuffled", "shuffle=shuffle and not iterable", "shuffle=False"),
    ],
    "training/loop.py": [
        M("EMA decay mu passed as 1 - mu", "ema_update(m.target, acc.unwrap_model(m.student), cfg.ema_decay)",
          "ema_update(m.target, acc.unwrap_model(m.student), 1 - cfg.ema_decay)"),
        M("the online student exported instead of theta^-", "exports = export_run(self.run_dir, m.target,",
          "exports = export_run(self.run_dir, self.acc.unwrap_model(m.student),"),
        M("the same t, eps and gamma every step", "step_generator(cfg.seed, step, micro, acc.process_index)",
          "step_generator(cfg.seed, 0, 0, acc.process_index)"),
        M("the step generator ignores the rank", "step * 104729 + micro * 31 + rank)", "step * 104729 + micro * 31)"),
        M("every rank reading the same batch", "off = (pos * self.world + self.rank) * self.bs", "off = (pos * self.world) * self.bs"),
        M("each epoch the same permutation", "manual_seed(self.seed * 1_000_003 + epoch)", "manual_seed(self.seed * 1_000_003)"),
        M("no gradient clipping", "        acc.clip_grad_norm_(params, cfg.max_grad_norm)\n", "        pass\n"),
        M("--cond-proj-lr-scale ignored", '"lr": cfg.lr * cfg.cond_proj_lr_scale}', '"lr": cfg.lr}'),
        M("--lr-schedule cosine never applied", "else cfg.lr_schedule\n", "else \"constant\"\n"),
        M("--lr-warmup-steps ignored", "num_warmup_steps=cfg.lr_warmup_steps,", "num_warmup_steps=0,"),
        M("a resumed schedule restarts at step 0", "lr_scheduler = make_lr_scheduler(opt, cfg, start)",
          "lr_scheduler = make_lr_scheduler(opt, cfg, 0)"),
        M("a skipped step does not advance the schedule", "            trail.skipped(step)\n            advance_schedule(lr_scheduler)\n",
          "            trail.skipped(step)\n"),
        M("the LoRA run's gamma projection left frozen", "student.time_embedding.cond_proj.requires_grad_(True)",
          "student.time_embedding.cond_proj.requires_grad_(False)"),
        M("run_name never validated", "if self.run_name is not None and not valid_run_name(self.run_name):", "if False:"),
        M("unreadable items kept in the live collate", "kw = dict(collate_fn=collate_drop_none,", "kw = dict(collate_fn=None,"),
        M("stale .tmp-* checkpoints never cleaned", "                shutil.rmtree(stale, ignore_errors=True)", "                pass"),
        M("the NaN skip decided per rank", '        finite = acc.reduce(finite, "min")', "        pass"),
        M("an unreadable batch decided per rank", 'return acc.reduce(torch.tensor(float(flag), device=acc.device), "min").item() >= 1',
          "return flag"),
        M("--grad-accum ignored", "gradient_accumulation_steps=cfg.grad_accum,", "gradient_accumulation_steps=1,"),
        M("EMA on every micro-step", "        if not acc.sync_gradients:\n            continue\n        ema_update",
          "        ema_update"),
        M("a resumed sampler starts at step 0", "cfg.seed, start * cfg.grad_accum, acc.process_index,", "cfg.seed, 0, acc.process_index,"),
        M("a streamed source not fast-forwarded on resume", "start * cfg.grad_accum, cfg.batch_size", "0, cfg.batch_size"),
        M("a finite stream not read again", "            it = iter(loader)\n            batch = next(it, end)", "            return"),
        M("max_bad_steps off by one", "if self.bad_in_row >= self.cfg.max_bad_steps:", "if self.bad_in_row > self.cfg.max_bad_steps:"),
        M("the bad-step count never reset", "        self.bad_in_row = 0\n        self.losses.append(loss)", "        self.losses.append(loss)"),
        M("checkpoint_every ignored", "if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:", "if step == cfg.max_steps:"),
        M("the lr range not checked", '"lr": 0 < self.lr < 1,', '"lr": True,'),
        M("a --resume that changes the run not refused", "    if bad:\n        raise TrainError(f\"--resume continues run",
          "    if False:\n        raise TrainError(f\"--resume continues run"),
        M("the pair batch's text from the data batch", '(pair_batch["z_T"].to(p_0.device), p_0, p_cond)',
          '(pair_batch["z_T"].to(p_0.device), p_0, cond)'),
        M("the same pair batch every step", "pairs(step * cfg.grad_accum + micro)", "pairs(0)"),
        M("data at the pairs' w beside a pairs store", "if cfg.regression > 0 and not cfg.regression_prompts else 0.0",
          "if cfg.regression > 0 else 0.0"),
        M("no pairs store for data at another w", "return cfg.prompts if teacher_data_w(cfg) != cfg.w else None",
          "return None"),
        M("flat settings not routed to their section", "mine = {k: v for k, v in flat.items() if _SECTION_OF[k] == sec}",
          "mine = {k: v for k, v in flat.items() if _SECTION_OF[k] == sec and sec != 'optimisation'}"),
    ],
    "training/latents.py": [
        M("latents not multiplied by the VAE scaling factor", ".latent_dist.sample(generator=generator) * sf).float()",
          ".latent_dist.sample(generator=generator)).float()"),
        M("cached latents not multiplied by the VAE scaling factor", "std.to(vae_dtype) * eps) * sf).float()",
          "std.to(vae_dtype) * eps)).float()"),
        M("cached draw without its std", "(mean.to(vae_dtype) + std.to(vae_dtype) * eps)", "(mean.to(vae_dtype) + 0 * eps)"),
    ],
}

# the test modules of tests/ that reach each file; fast, sharp ones first (pytest runs with -x)
TESTS: dict[str, list[str]] = {
    "core/splad.py": ["test_core_mutants", "test_splad", "test_one_step", "test_adversarial", "test_dmd"],
    "core/adversarial.py": ["test_adversarial", "test_one_step"],
    "core/dmd.py": ["test_dmd"],
    "core/slode.py": ["test_math", "test_core_mutants"],
    "core/student.py": ["test_core_mutants", "test_splad"],
    "core/schedule.py": ["test_math", "test_core_mutants", "test_one_step"],
    "core/consistency.py": ["test_math"],
    "core/solver.py": ["test_math", "test_core_mutants", "test_splad"],
    "core/teacher.py": ["test_core_mutants", "test_sdxl"],
    "core/sampler.py": ["test_samplers", "test_splad"],
    "models/generation.py": ["test_samplers", "test_splad"],
    "core/error_bound.py": ["test_core_mutants", "test_splad"],
    "core/metrics.py": ["test_core_mutants"],
    "training/checkpoints.py": ["test_checkpoints", "test_adversarial"],
    "training/data.py": ["test_data"],
    "training/loop.py": ["test_loop", "test_latents"],
    "training/latents.py": ["test_loop", "test_latents"],
}


@dataclass
class Outcome:
    file: str
    mutant: str
    status: str  # killed | survived | timeout | stale
    seconds: float
    detail: str = ""


@dataclass
class FileResult:
    file: str
    tests: list[str]
    baseline: str  # ok | broken: ...
    outcomes: list[Outcome] = field(default_factory=list)

    def count(self, *status: str) -> int:
        return sum(o.status in status for o in self.outcomes)


def _copy_tree(dest: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / PACKAGE, dest / PACKAGE, ignore=ignore)
    shutil.copytree(REPO / "tests", dest / "tests", ignore=ignore)
    for name in ("pyproject.toml", "conftest.py"):
        if (REPO / name).is_file():
            shutil.copy2(REPO / name, dest / name)
    if (REPO / "weights").exists():
        (dest / "weights").symlink_to(REPO / "weights")


def _pytest_args(tests: list[str], log: Path) -> list[str]:
    return ["-x", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "--tb=line", *tests]


def _run_tests(root: Path, tests: list[str], timeout: float, fork: bool) -> tuple[str, float, str]:
    """Run pytest on `tests` in `root`: ('passed' | 'failed' | 'timeout', seconds, last lines of output)."""
    log = root / ".mutation-log.txt"
    t0 = time.monotonic()
    if fork:
        pid = os.fork()
        if pid == 0:  # child: a fresh import of the (mutated) package from root
            os.setsid()
            try:
                fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                os.dup2(fd, 1), os.dup2(fd, 2)
                os.chdir(root)
                for name in [m for m in sys.modules if m.split(".")[0] in (PACKAGE, "tests")]:
                    del sys.modules[name]  # this tool's own import of the package (python -m) must not be reused
                sys.path.insert(0, str(root))
                import pytest

                rc = pytest.main(_pytest_args(tests, log))
            except BaseException:  # noqa: BLE001 - whatever happens, the child must exit here
                rc = 99
            os._exit(int(rc))
        deadline = t0 + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                rc = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() > deadline:
                os.killpg(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                rc = None
                break
            time.sleep(0.05)
    else:
        env = {**os.environ, "PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1"}
        try:
            with open(log, "w") as f:
                rc = subprocess.run([sys.executable, "-m", "pytest", *_pytest_args(tests, log)], cwd=root, env=env,
                                    stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = None
    seconds = time.monotonic() - t0
    tail = " | ".join(line.strip() for line in log.read_text(errors="replace").splitlines()[-3:]) if log.exists() else ""
    if rc is None:
        return "timeout", seconds, tail
    return ("passed" if rc == 0 else "failed"), seconds, tail


def run_file(rel: str, mutants: list[Mutant], tests: list[str], timeout: float, fork: bool, log=print) -> FileResult:
    src_path = REPO / PACKAGE / rel
    original = src_path.read_text()
    result = FileResult(rel, tests, "ok")
    with tempfile.TemporaryDirectory(prefix="splam-mutation-") as tmp:
        root = Path(tmp)
        _copy_tree(root)
        target = root / PACKAGE / rel
        status, secs, tail = _run_tests(root, tests, timeout * 2, fork)
        if status != "passed":
            result.baseline = f"broken: the unmutated tests {status} ({tail})"
            log(f"{rel}: {result.baseline}")
            return result
        log(f"{rel}: baseline passes in {secs:.0f}s; {len(mutants)} mutants")
        for mu in mutants:
            n = original.count(mu.old)
            if n != 1:
                result.outcomes.append(Outcome(rel, mu.name, "stale", 0.0, f"snippet occurs {n} times"))
                log(f"  stale     {mu.name} (snippet occurs {n} times)")
                continue
            target.write_text(original.replace(mu.old, mu.new))
            try:
                status, secs, tail = _run_tests(root, tests, timeout, fork)
            finally:
                target.write_text(original)
            outcome = {"passed": "survived", "failed": "killed", "timeout": "timeout"}[status]
            result.outcomes.append(Outcome(rel, mu.name, outcome, round(secs, 1), tail if outcome == "killed" else ""))
            log(f"  {outcome:<9} {mu.name} ({secs:.0f}s)")
    return result


def markdown(results: list[FileResult]) -> str:
    return markdown_rows([{"file": r.file, "baseline": r.baseline, "killed": r.count("killed", "timeout"),
                           "survived": r.count("survived"), "stale": r.count("stale"),
                           "mutants": [asdict(o) for o in r.outcomes]} for r in results])


def write_json(path: Path, results: list[FileResult], command: str, seconds: int) -> None:
    """Merge this run's files into the result file: files not run this time keep their last result (and the file its
    note, which BENCHMARKS.md quotes)."""
    old = json.loads(path.read_text()) if path.is_file() else {}
    files = {f["file"]: f for f in old.get("files", [])}
    for r in results:
        files[r.file] = {**{k: v for k, v in asdict(r).items() if k != "outcomes"}, "killed": r.count("killed", "timeout"),
                         "survived": r.count("survived"), "stale": r.count("stale"), "seconds": round(sum(o.seconds for o in r.outcomes)),
                         "command": command, "run_seconds": seconds, "mutants": [asdict(o) for o in r.outcomes]}
    rows = list(files.values())
    out = {"note": old.get("note", ""), "killed": sum(f["killed"] for f in rows), "total": sum(len(f["mutants"]) for f in rows),
           "markdown": markdown_rows(rows), "files": rows}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")


def markdown_rows(rows: list[dict]) -> str:
    lines = ["| file | mutants | killed | survived | stale | survivors |", "|---|---|---|---|---|---|"]
    for f in rows:
        if f["baseline"] != "ok":
            lines.append(f"| `{f['file']}` | - | - | - | - | {f['baseline']} |")
            continue
        surv = "; ".join(m["mutant"] for m in f["mutants"] if m["status"] == "survived") or "-"
        lines.append(f"| `{f['file']}` | {len(f['mutants'])} | {f['killed']} | {f['survived']} | {f['stale']} | {surv} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", nargs="*", default=None, help="files under splam_studio/ (default: every file with mutants)")
    p.add_argument("--tests", nargs="*", default=[], metavar="FILE=TEST[,TEST]",
                   help="tests for a file, replacing TESTS' entry (e.g. training/loop.py=tests/test_loop.py)")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds per mutant's test run (a timeout is killed)")
    p.add_argument("--json", default=str(REPO / "benchmarks" / "mutation.json"), help="result file ('' = none)")
    p.add_argument("--no-fork", action="store_true", help="a fresh interpreter per mutant instead of forking")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = p.parse_args(argv)
    tests = {f: [f"tests/{m}.py" for m in mods] for f, mods in TESTS.items()}
    for item in args.tests:
        if "=" not in item:
            p.error(f"--tests takes FILE=TEST[,TEST], got {item!r}")
        f, t = item.split("=", 1)
        tests[f] = [x for x in t.split(",") if x]
    files = args.files if args.files is not None else list(MUTANTS)
    unknown = [f for f in files if f not in MUTANTS]
    if unknown:
        p.error(f"no mutants for {unknown}; files with mutants: {sorted(MUTANTS)}")
    missing = [f for f in files if f not in tests]
    if missing:
        p.error(f"no tests for {missing}; give them with --tests FILE=TEST")
    if args.list:
        for f in files:
            print(f"{f}  (tests: {' '.join(tests[f])})")
            for mu in MUTANTS[f]:
                print(f"  - {mu.name}")
        return 0
    fork = hasattr(os, "fork") and not args.no_fork
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
    sys.dont_write_bytecode = True
    if fork:  # imported once here, shared by every forked test run (nothing of the package is imported)
        import diffusers  # noqa: F401
        import pytest  # noqa: F401
        import torch
        import transformers  # noqa: F401

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    t0 = time.time()
    results = [run_file(f, MUTANTS[f], tests[f], args.timeout, fork) for f in files]
    table = markdown(results)
    print(table)
    total = sum(len(r.outcomes) for r in results)
    killed = sum(r.count("killed", "timeout") for r in results)
    print(f"{killed} of {total} mutants killed in {time.time() - t0:.0f}s")
    if args.json:
        write_json(Path(args.json), results, "python -m splam_studio.tools.mutation " +
                   " ".join(argv if argv is not None else sys.argv[1:]), round(time.time() - t0))
    broken = any(r.baseline != "ok" for r in results)
    survived = any(r.count("survived", "stale") for r in results)
    return 2 if broken else (1 if survived else 0)


if __name__ == "__main__":
    sys.exit(main())
