"""Renders BENCHMARKS.md from the JSON files that the benchmark commands write into benchmarks/.

Each section appears only when its JSON exists; every number comes from those files.
    benchmarks/results.json      python -m splam_studio.tools.bench          (comparison, convergence, ablations, error bound)
    benchmarks/teacher.json      python -m splam_studio.tools.world evaluate (teacher quality on the Shapes world)
    benchmarks/teacher_history.json  earlier embedded teachers' teacher.json, each with its preset and commit
    benchmarks/xl_curves.json    python -m splam_studio.tools.bench --teacher shapes-xl-teacher --curves RUN... (Shapes-XL students)
    benchmarks/prompt_gap.json   bash scripts/prompt_gap.sh (issue 23: teacher images through the image path; --prompts-w)
    benchmarks/teacher-xl.json   python -m splam_studio.tools.world evaluate --teacher shapes-xl-teacher (the SDXL-architecture teacher)
    benchmarks/trainer.json      python -m splam_studio.tools.trainer_bench  (SPLAM vs LCM step time and memory)
    benchmarks/reliability.json  python -m splam_studio.tools.reliability    (faults, bad input, load)
    benchmarks/server_attacks.json python -m splam_studio.tools.server_attacks (the studio as a public server, attacked)
    benchmarks/trainer_cache.json python -m splam_studio.tools.trainer_bench --cache (a step with and without the latent cache)
    benchmarks/trainer_one_step.json python -m splam_studio.tools.trainer_bench --one-step (SPLAM with each 1-step term)
    benchmarks/threads.json      python -m splam_studio.tools.threads_bench  (torch threads, idle and loaded)
    benchmarks/compare_latency.json python -m splam_studio.tools.compare_latency (the Compare tab's latencies, idle and loaded)
    benchmarks/sweep.json        python -m splam_studio.tools.bench --curves RUN... (the recipe sweep, curves along training)
    benchmarks/latency_cpu_xl.json  python -m splam_studio.tools.gpu_check --only latency --teacher shapes-xl-teacher --device cpu
    benchmarks/seeds.json        python -m splam_studio.tools.bench --curves RUN... (SPLAM vs LCM, several training seeds)
"""
from __future__ import annotations

import json
import math
from pathlib import Path


def _f(x, nd=3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def _load(folder: Path, name: str) -> dict | None:
    p = folder / name
    return json.loads(p.read_text()) if p.is_file() else None


def comparison_section(r: dict) -> list[str]:
    L = ["## Comparison on the Shapes world (the paper's table, reproduced)", "",
         f"`python -m splam_studio.tools.bench`: {r['n']} {r['split']} captions per row (held-out (shape, colour) pairs never seen in "
         f"training), fixed seeds, the same initial noise per caption in every row. Teacher guidance {r['guidance']} "
         f"(CFG form); students run at guidance 1 (distilled at w = {r['guidance'] - 1:g}). Shapes-FID uses the evaluator's "
         f"features against real renders of the same captions (real images score {r['real_prompt_acc']:.3f} prompt accuracy). "
         f"Latency: median of repeated single-image runs (text encoding + sampling + VAE decode) in the same process, "
         f"CPU, {r['threads']} threads.", "",
         "| method | steps | Shapes-FID | prompt acc | latent MSE to teacher | PSNR to teacher (dB) | latency (ms) | speed-up |",
         "|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        L.append(f"| {row['method']} | {row['steps']} | {_f(row['fid'])} | {_f(row['prompt_acc'])} | {_f(row['teacher_mse'], 4)} | "
                 f"{_f(row['psnr'], 2)} | {_f(row['latency_ms'], 1)} | {_f(row['speedup'], 1)}x |")
    L += ["", *goals(r), ""]
    if "error_bound.png" in r.get("plots", []):
        L += ["### Per-sub-path error bound", "", "![error bound](benchmarks/error_bound.png)", ""]
        for k in next(iter(r["error_bound"].values())):
            parts = []
            for m in ("lcm", "splam"):
                d = r["error_bound"][m][k]
                parts.append(f"{m.upper()}: bound at t = {d['t'][0]} is {d['bound'][0]:.3f}, real error {d['error'][0]:.3f}")
            L.append(f"- {k}: " + "; ".join(parts))
        L.append("")
    conv = r.get("convergence", {}).get("curves")
    if conv:
        L += [f"### Convergence ({r['convergence']['steps']}-step sampling, {r['n_curve']} images per point)", "",
              "![convergence](benchmarks/convergence.png)", "", "| iteration | LCM FID | SPLAM FID | LCM MSE | SPLAM MSE |", "|---|---|---|---|---|"]
        its = sorted({p["iteration"] for m in conv for p in conv[m]})
        get = lambda m, i, key: next((p[key] for p in conv.get(m, []) if p["iteration"] == i), None)  # noqa: E731
        for i in its:
            L.append(f"| {i} | {_f(get('lcm', i, 'fid'))} | {_f(get('splam', i, 'fid'))} | "
                     f"{_f(get('lcm', i, 'teacher_mse'), 4)} | {_f(get('splam', i, 'teacher_mse'), 4)} |")
        L.append("")
    if r.get("ablations"):
        L += [f"### Ablations ({r['n_curve']} images per cell; all runs share one reduced budget)", "",
              "| run | change | FID 1 / 2 / 4 steps | MSE to teacher 1 / 2 / 4 steps |", "|---|---|---|---|"]
        for name, a in r["ablations"].items():
            rows = a["rows"]
            ks = sorted(rows, key=int)
            L.append(f"| {name} | {a['change']} | {' / '.join(_f(rows[k]['fid'], 2) for k in ks)} | "
                     f"{' / '.join(_f(rows[k]['teacher_mse'], 4) for k in ks)} |")
        L.append("")
    return L


def goals(r: dict) -> list[str]:
    rows = {(x["method"], x["steps"]): x for x in r["rows"]}
    out = ["Goals (measured above, met or not):"]
    for s in (1, 2, 4):
        lcm, spl = rows.get(("lcm", s)), rows.get(("splam", s))
        if lcm and spl:
            fid_ok, mse_ok = spl["fid"] < lcm["fid"], spl["teacher_mse"] < lcm["teacher_mse"]
            out.append(f"- {s} step(s), SPLAM vs LCM: FID {spl['fid']:.3f} vs {lcm['fid']:.3f} ({'met' if fid_ok else 'MISSED'}); "
                       f"teacher MSE {spl['teacher_mse']:.4f} vs {lcm['teacher_mse']:.4f} ({'met' if mse_ok else 'MISSED'})")
    spl4 = rows.get(("splam", 4))
    for solver in ("dpm++", "unipc"):
        o = rows.get((solver, 4))
        if spl4 and o:
            out.append(f"- SPLAM 4 steps vs {solver} 4 steps: FID {spl4['fid']:.3f} vs {o['fid']:.3f} "
                       f"({'met' if spl4['fid'] < o['fid'] else 'MISSED'})")
    t = rows.get(("teacher-ddim", 50))
    if spl4 and t:
        ratio = spl4["latency_ms"] / t["latency_ms"]
        out.append(f"- SPLAM 4-step latency / teacher 50-step latency = {ratio:.3f} (goal <= 1/15 = 0.067: "
                   f"{'met' if ratio <= 1 / 15 else 'MISSED'})")
    return out


READING_GUIDE = [
    "How to read the numbers:",
    "- **Shapes-FID compares with real renders, not with the teacher.** A student can score a better FID than the "
    "teacher's 50 steps: the teacher's own samples carry its errors (faint VAE ghosts, colours pushed by guidance "
    "7.5), and a student that lands nearer the real renders scores lower. Distance to the teacher's image from the "
    "same noise (latent MSE, PSNR) is what measures distillation; it favours blurry means, so read both.",
    "- **FID depends on the number of images.** With fewer images the covariance estimate is noisier and FID is "
    "biased upward: the same student reads higher at 250 images than at 1000. Compare FIDs only within one table "
    "(each names its n).",
    "- **w and CFG are one setting in two conventions.** The trainer's w is the LCM form eps_c + w (eps_c - eps_u); "
    "the usual classifier-free guidance scale is uncond + s (cond - uncond) with s = w + 1. The Shapes students are "
    "distilled at w = 6.5, which is the teacher's CFG 7.5.",
]
STEPS = ("1", "2", "4")
PLATEAU_TOL = 0.05  # a converged curve: its last point within 5% of its best


def plateau(points: list[dict], steps: str, key: str) -> tuple[float, float, bool]:
    """(best, last, last within PLATEAU_TOL of best) of one curve; lower is better for FID and teacher MSE."""
    vals = [p[steps][key] for p in points]
    best, last = min(vals), vals[-1]
    return best, last, last <= best * (1 + PLATEAU_TOL)


def _recipe(cfg: dict) -> str:
    keys = ("lora_rank", "lr", "lr_schedule", "ema_decay", "batch_size", "seed", "m", "gamma_one_prob", "gamma_scale", "gamma_time",
            "cond_proj_lr_scale", "huber_c", "w", "w_min", "w_max", "init_from")
    gamma_only = ("gamma_one_prob", "gamma_scale", "gamma_time", "cond_proj_lr_scale")  # meaningless at gamma = 1 (LCM)
    parts = [f"{k} {cfg[k]}" for k in keys if cfg.get(k) is not None and not (k == "lora_rank" and not cfg[k])
             and not (cfg.get("method") == "lcm" and k in gamma_only)]
    return ", ".join(parts + _one_step_recipe(cfg))


def _one_step_recipe(cfg: dict) -> list[str]:
    """The 1-step ablations' settings (issue 25) and teacher data, named only where they leave the paper's recipe."""
    out = []
    if cfg.get("k_high"):
        out.append(f"k {cfg['k_high']} from t >= {cfg.get('t_high', 500)}")
    if cfg.get("t_top_prob"):
        out.append(f"p(t = 999) {cfg['t_top_prob']:g}")
    if cfg.get("regression"):
        own = cfg.get("regression_prompts") or (cfg.get("prompts") and cfg.get("prompts_w") is not None
                                                 and cfg["prompts_w"] != cfg.get("w"))
        out.append(f"regression {cfg['regression']:g}" + (" (its pairs a store of their own)" if own else ""))
    if cfg.get("adversarial"):
        out.append(f"adversarial {cfg['adversarial']:g} (t_d <= {cfg.get('adversarial_t_max')}, "
                   f"D lr {cfg.get('adversarial_lr'):g})")
    if cfg.get("dmd"):
        out.append(f"DMD {cfg['dmd']:g} (fake score lr {cfg.get('dmd_lr'):g})")
    if cfg.get("data") not in (None, "shapes") and not cfg.get("prompts"):
        out.append(f"data {cfg['data']}")
    if cfg.get("prompts"):
        n = cfg.get("images_per_prompt") or 1
        out.append("teacher data (prompts only)" + (f", {n} images per prompt" if n > 1 else "")
                   + (f", made at CFG {cfg['prompts_w'] + 1:g}" if cfg.get("prompts_w") is not None else ""))
    return out


def sweep_section(d: dict, title: str = "The recipe sweep", source: str = "`scripts/sweep.sh`") -> list[str]:
    """One row per run: its recipe and, at 1 / 2 / 4 steps, best and last FID and teacher MSE along training."""
    L = [f"### {title}", "",
         f"`python -m splam_studio.tools.bench --curves RUN...` over the runs of {source}: {d['n']} held-out captions per "
         f"point, teacher guidance {d['guidance']:g}, the same noise in every row. Each run's snapshots of theta^- are "
         f"evaluated along training; 'last / best' is the final point against the best one, and a curve has converged "
         f"(✓) when its last point is within {PLATEAU_TOL:.0%} of its best.", ""]
    head = " | ".join(f"FID {s} step last / best" for s in STEPS) + " | " + " | ".join(f"MSE {s} step last / best" for s in STEPS)
    L += [f"| run | method | recipe | iterations | {head} |", "|---|---|---|---|" + "---|" * 6]
    if d.get("teacher"):
        L.append(f"| teacher, DDIM 50 steps | - | CFG {d['guidance']:g} | - | FID {_f(d['teacher']['fid'], 1)} | | | | | |")
    if d.get("untrained"):
        u = d["untrained"]
        L.append("| untrained student | - | teacher UNet, zero gamma projection | 0 | "
                 + " | ".join(_f(u[s]["fid"], 1) for s in STEPS) + " | " + " | ".join(_f(u[s]["teacher_mse"], 4) for s in STEPS) + " |")
    for name, r in d["runs"].items():
        pts, cells = r["points"], []
        for key, nd in (("fid", 1), ("teacher_mse", 4)):
            for s in STEPS:
                best, last, ok = plateau(pts, s, key)
                cells.append(f"{_f(last, nd)} / {_f(best, nd)}{' ✓' if ok else ''}")
        L.append(f"| {name} | {r['config']['method']} | {_cell(_recipe(r['config']))} | {pts[-1]['iteration']} | " + " | ".join(cells) + " |")
    return L + ([""] + [f"- {d['note']}"] if d.get("note") else []) + [""]


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0


def seed_groups(d: dict) -> dict[str, list[dict]]:
    """Runs that differ only in their seed, grouped by method and recipe variant (final points)."""
    groups: dict[str, list[dict]] = {}
    for r in d["runs"].values():
        c = r["config"]
        label = c["method"] + _lora_label(c)
        if (c.get("m") or 1) != 1:
            label += f" (m {c['m']})"
        if c["method"] == "splam" and (c.get("gamma_scale") or 10.0) != 10.0:
            label += f" (gamma scale {c['gamma_scale']:g})"
        if c["method"] == "splam" and (c.get("gamma_time") or "t") != "t":
            label += f" (gamma time {c['gamma_time']})"
        if c["method"] == "splam" and c.get("gamma_one_prob") is not None:
            label += f" (p(gamma = 1) {c['gamma_one_prob']:g})"
        if (extra := _one_step_recipe(c)):
            label += f" ({', '.join(extra)})"
        if c.get("w_min") is not None:
            label += f" (w ~ U[{c['w_min']:g}, {c['w_max']:g}])"
        groups.setdefault(label, []).append(r)
    return groups


PROMPTS_ONLY = " (teacher data (prompts only))"


def _lora_label(c: dict) -> str:
    """A LoRA recipe's part of a group label: rank, lr and, when recorded, the gamma projection's lr scale."""
    if not c.get("lora_rank"):
        return ""
    scale = f", gamma projection at {c['cond_proj_lr_scale']:g}x lr" if c.get("cond_proj_lr_scale") is not None else ""
    return f" (LoRA rank {c['lora_rank']}, lr {c['lr']:g}{scale})"


def _lcm_group_for(label: str, groups: dict[str, list[dict]]) -> str | None:
    """The LCM group a SPLAM group is judged against: LCM at the same m (the same sub-path length k), on the same
    data (teacher data from prompts, or the rendered images)."""
    c = groups[label][0]["config"]
    m = c.get("m") or 1
    base = ("lcm" + _lora_label(c) + ("" if m == 1 else f" (m {m})") + (PROMPTS_ONLY if c.get("prompts") else ""))
    return base if base in groups else None


def _image_group_for(label: str, groups: dict[str, list[dict]]) -> str | None:
    """For a prompt-only group (teacher data, no other change), the same recipe on the rendered images (issue 23)."""
    base = label[:-len(PROMPTS_ONLY)] if label.endswith(PROMPTS_ONLY) else None
    return base if base in groups else None


def verdict(a: list[float], b: list[float]) -> str:
    """'a < b' / 'a > b' when the means differ by more than the two seed spreads together, else 'tie'."""
    (ma, sa), (mb, sb) = _mean_sd(a), _mean_sd(b)
    if min(len(a), len(b)) < 2:
        return "lower (one seed, no spread)" if ma < mb else "higher (one seed, no spread)"
    if abs(ma - mb) <= sa + sb:
        return "tie (within the seed spread)"
    return "lower" if ma < mb else "higher"


def seeds_section(d: dict, title: str = "SPLAM against LCM over training seeds",
                  source: str = "`scripts/train_students.sh`") -> list[str]:
    groups = seed_groups(d)
    L = [f"### {title}", "",
         f"`python -m splam_studio.tools.bench --curves RUN...` over the final students of {source} "
         f"(identical recipe and budget, seeds differ): {d['n']} held-out captions per cell; mean ± standard deviation "
         f"over the seeds.", "",
         "| student | seeds | " + " | ".join(f"FID {s} step" for s in STEPS) + " | " + " | ".join(f"MSE {s} step" for s in STEPS) + " |",
         "|---|---|" + "---|" * 6]
    if d.get("untrained"):
        u = d["untrained"]
        L.append("| untrained (teacher UNet, zero gamma projection) | - | " + " | ".join(_f(u[s]["fid"], 1) for s in STEPS)
                 + " | " + " | ".join(_f(u[s]["teacher_mse"], 4) for s in STEPS) + " |")
    finals = {g: [r["points"][-1] for r in rs] for g, rs in groups.items()}
    for g, pts in finals.items():
        cells = []
        for key, nd in (("fid", 1), ("teacher_mse", 4)):
            for s in STEPS:
                m, sd = _mean_sd([p[s][key] for p in pts])
                cells.append(f"{_f(m, nd)} ± {_f(sd, nd)}")
        L.append(f"| {g} | {len(pts)} | " + " | ".join(cells) + " |")
    L.append("")
    pairs = [(g, b) for g in finals for b in (_lcm_group_for(g, groups), _image_group_for(g, groups))
             if b is not None and b != g and len(finals[g]) >= 2]
    for g, base in pairs:
        L.append(f"Verdict, {g} against {base} (a difference counts when the means differ by more than the two spreads "
                 f"together):")
        for s in STEPS:
            parts = []
            for key, what in (("fid", "FID"), ("teacher_mse", "teacher MSE")):
                a, b = [p[s][key] for p in finals[g]], [p[s][key] for p in finals[base]]
                ratio = _mean_sd(a)[0] / _mean_sd(b)[0]
                parts.append(f"{what} ratio {ratio:.3f}, {verdict(a, b)}")
            L.append(f"- {s} step(s): " + "; ".join(parts))
        L.append("")
    if d.get("untrained"):
        L.append("Against the untrained student (what distillation must beat), mean over seeds:")
        u = d["untrained"]
        for g, pts in finals.items():
            beats = [f"{s} step FID {'beats' if _mean_sd([p[s]['fid'] for p in pts])[0] < u[s]['fid'] else 'MISSES'}, "
                     f"MSE {'beats' if _mean_sd([p[s]['teacher_mse'] for p in pts])[0] < u[s]['teacher_mse'] else 'MISSES'}"
                     for s in STEPS]
            L.append(f"- {g}: " + "; ".join(beats))
    if d.get("note"):
        L += ["", f"- {d['note']}"]
    return L + [""]


def teacher_section(t: dict, title: str = "## The Shapes teacher") -> list[str]:
    attrs = list(next(iter(t["splits"].values())).get("per_attribute", {}))
    L = [title, "", t.get("description", ""), "",
         "| split | prompt accuracy (goal 0.9) | " + " | ".join(attrs) + " | Shapes-FID | real-vs-real FID floor | n |",
         "|---|---|" + "---|" * len(attrs) + "---|---|---|"]
    for split, d in t["splits"].items():
        per = d.get("per_attribute", {})
        L.append(f"| {split} | {_f(d.get('prompt_acc'))} | " + " | ".join(_f(per.get(a)) for a in attrs)
                 + f" | {_f(d.get('fid'))} | {_f(d.get('fid_floor'))} | {d.get('n')} |")
    if (p := t.get("position_probe")):
        L += ["", f"**Position probe** ({p['n_noise_draws']} noise draws, each caption generated once per position word "
              f"from the same noise): the position follows the prompt in {_f(p['follows_prompt'])} of the images "
              f"(chance {_f(p['chance_follows'])}); for {_f(p['same_place_for_all_words'])} of the draws the object lands "
              f"in the same place whatever the word says (chance {p['chance_same']:.4f})."
              + (" The teacher reads the layout out of the initial noise, not the prompt."
                 if p["same_place_for_all_words"] > 0.5 and p["follows_prompt"] < 0.5 else "")]
        if (sep := p.get("text_separation")):
            L += ["", "**Text-encoder separation** (`python -m splam_studio.tools.world diagnose`): relative change of the "
                  "text encoder's output when only one attribute's word changes: "
                  + ", ".join(f"{a} {_f(v)}" for a, v in sep.items())
                  + ". A value near 0 means the UNet gets (almost) the same conditioning whatever that word says."]
    for note in t.get("notes", []):
        L.append(f"- {note}")
    return L + [""]


def teacher_history_section(h: dict, current: dict | None) -> list[str]:
    """One row per teacher, earlier ones first and the embedded one last: what changed and what it measured."""
    L = ["### Earlier teachers", "", h.get("description", ""), "",
         "| preset | recipe | train acc | held-out acc | held-out shape | position (held-out) | held-out Shapes-FID |",
         "|---|---|---|---|---|---|---|"]
    rows = [(e["preset"], f"{e['what']} (commit {e['commit']})", e["evaluation"]) for e in h.get("teachers", [])]
    if current:
        rows.append(("full", "the embedded teacher (above)", current))
    for preset, what, t in rows:
        tr, ho = t["splits"].get("train", {}), t["splits"].get("heldout", {})
        per = ho.get("per_attribute", {})
        L.append(f"| {preset} | {_cell(what)} | {_f(tr.get('prompt_acc'))} | {_f(ho.get('prompt_acc'))} | "
                 f"{_f(per.get('shape'))} | {_f(per.get('position'))} | {_f(ho.get('fid'), 1)} |")
    return L + [""]


def _cell(v) -> str:
    """A value as one Markdown table cell: no pipes, no line breaks."""
    return " ".join(str(v).split()).replace("|", "\\|")


def generic_section(title: str, d: dict) -> list[str]:
    L = [f"## {title}", ""]
    if d.get("description"):
        L += [d["description"], ""]
    for table in d.get("tables", []):
        L += [f"**{table['title']}**", "" , "| " + " | ".join(table["columns"]) + " |", "|" + "---|" * len(table["columns"])]
        L += ["| " + " | ".join(_f(v) if isinstance(v, float) else _cell(v) for v in row) + " |" for row in table["rows"]]
        L.append("")
    for note in d.get("notes", []):
        L.append(f"- {note}")
    return L + [""]


def write_benchmarks_md(folder: Path | str = "benchmarks", out: Path | str = "BENCHMARKS.md") -> Path:
    folder, out = Path(folder), Path(out)
    L = ["# Benchmarks", "", "Generated by `python -m splam_studio.tools.report` from the JSON files in `benchmarks/`; "
         "each section names the command that measures it. Nothing here is typed by hand.", "", *READING_GUIDE, ""]
    if (t := _load(folder, "teacher.json")):
        L += teacher_section(t)
    if (h := _load(folder, "teacher_history.json")):
        L += teacher_history_section(h, t)
    if (tx := _load(folder, "teacher-xl.json")):
        L += teacher_section(tx, "### The Shapes-XL teacher (SDXL architecture, issue 22)")
    if (r := _load(folder, "results.json")):
        L += comparison_section(r)
    if (sd := _load(folder, "seeds.json")) or _load(folder, "sweep.json") or _load(folder, "variants.json"):
        L += ["## Distillation: does the student beat what it replaces?", ""]
        if sd:
            L += seeds_section(sd)
        if (sw := _load(folder, "sweep.json")):
            L += sweep_section(sw)
        if (folder / "sweep.png").is_file():
            L += ["![sweep](benchmarks/sweep.png)", ""]
        if (va := _load(folder, "variants.json")):
            L += sweep_section(va, "SL-ODE variants past the paper", "`scripts/variants.sh`")
            if (folder / "variants.png").is_file():
                L += ["![variants](benchmarks/variants.png)", ""]
        if (os_ := _load(folder, "one_step.json")):
            L += sweep_section(os_, "1-step ablations (issue 25)", "`scripts/one_step.sh`, `scripts/one_step_dmd.sh`, `scripts/one_step_pairs.sh`")
        if (pg := _load(folder, "prompt_gap.json")):
            L += seeds_section(pg, "Prompt-only students: where the gap to image data comes from (issue 23)",
                               "`scripts/prompt_gap.sh`")
            L += sweep_section(pg, "Prompt-only students along training (issue 23)", "`scripts/prompt_gap.sh`")
    if (xl := _load(folder, "xl_curves.json")):
        L += seeds_section(xl, "Shapes-XL students over training seeds (issue 22): the SDXL path distils",
                           "`scripts/xl_students.sh` (students of the Shapes-XL teacher)")
        L += sweep_section(xl, "Shapes-XL students along training (issue 22)",
                           "`scripts/xl_students.sh` (students of the Shapes-XL teacher)")
    if (tr := _load(folder, "trainer.json")):
        L += generic_section("Trainer: SPLAM vs LCM step time and memory", tr)
    if (tc := _load(folder, "trainer_cache.json")):
        L += generic_section("Trainer: the latent cache", tc)
    if (to := _load(folder, "trainer_one_step.json")):
        L += generic_section("Trainer: the 1-step terms (issue 25)", to)
    if (th := _load(folder, "threads.json")):
        L += generic_section("Threads on a shared CPU", th)
    if (lat := _load(folder, "latency_cpu.json")):
        from .gpu_check import render_markdown

        L += [render_markdown(lat, "Studio latency against a stock pipeline, CPU"), ""]
    if (lx := _load(folder, "latency_cpu_xl.json")):
        from .gpu_check import render_markdown

        L += [render_markdown(lx, "Studio latency against a stock StableDiffusionXLPipeline, CPU (Shapes-XL teacher)"), ""]
    if (g := _load(folder, "gpu.json")):
        from .gpu_check import render_markdown

        L += [render_markdown(g), ""]
    else:
        L += ["## GPU check", "", "`python -m splam_studio.tools.gpu_check` (SD1.5-sized pipeline from configs: train_cli runs in "
              "bf16 and fp16, the trainer bench grid, studio against a stock pipeline) has not run on a GPU yet: no GPU was "
              "at hand. Its CPU path (`--tiny`) runs in the tests.", ""]
    if (gpu := _load(folder, "trainer_gpu.json")):
        L += generic_section("Trainer on an H200 (SD1.5-sized UNet, random weights)", gpu)
    if (mu := _load(folder, "mutation.json")):
        L += ["## Mutation check", "", f"`nice -n 10 python -m splam_studio.tools.mutation`: {mu['killed']} of {mu['total']} "
              f"mutants killed ({mu['note']}).", "", mu["markdown"], ""]
    if (io := _load(folder, "interop.json")):
        L += generic_section("Exports in kohya sd-scripts and ComfyUI", io)
    if (cl := _load(folder, "compare_latency.json")):
        L += generic_section("Compare-tab latency: interleaved rounds, idle and loaded", cl)
    if (rel := _load(folder, "reliability.json")):
        L += generic_section("Reliability", rel)
    if (atk := _load(folder, "server_attacks.json")):
        L += generic_section("The studio as a public server, attacked", atk)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text("\n".join(L).rstrip() + "\n")
    tmp.replace(out)
    return out


if __name__ == "__main__":
    print(write_benchmarks_md())
