"""The Shapes-world benchmark: the paper's comparison table, convergence curve, ablations and error bound.

    python -m splam_studio.tools.bench            # full: >= 1000 held-out captions per row; writes
                                            # benchmarks/results.json, benchmarks/*.png and BENCHMARKS.md
    python -m splam_studio.tools.bench --n 64     # a quick look

Every row starts from the same initial noise per caption (seeded batches), so teacher distance is paired.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..core.error_bound import guided_trajectory, student_error_bounds
from ..core.metrics import feature_statistics, frechet_distance, latent_mse, psnr
from ..models.generation import decode_latents, generate, initial_noise
from ..models.loading import STUDENT_ADAPTER, holds_student
from ..core.schedule import NoiseSchedule
from ..core.teacher import cfg_scale, encode_text, lcm_w

ROWS = [("teacher-ddim", 50), ("ddim", 4), ("ddim", 8), ("dpm++", 4), ("unipc", 4),
        ("lcm", 1), ("lcm", 2), ("lcm", 4), ("splam", 1), ("splam", 2), ("splam", 4)]
SAMPLER = {"teacher-ddim": "ddim", "ddim": "ddim", "dpm++": "dpm++", "unipc": "unipc", "lcm": "lcm", "splam": "lcm"}
# Ablations: each changes one thing against SPLAM at the same (reduced) budget. With a constant learning rate and
# the same seeds, the main runs' snapshots at that step ARE the SPLAM baseline and the gamma = 1 (LCM) arm.
ABLATIONS = {
    "ablate-base": ("shapes-splam", "SPLAM as embedded: gamma = 1 with p = 0.8, else U[0,1]; k = 20 (m = 1); "
                                    "zero-initialised gamma projection at 30x lr"),
    "ablate-uniform": ("ablate-uniform", "gamma ~ U[0,1] only (the paper)"),
    "ablate-gamma1": ("shapes-lcm", "gamma = 1 always (= LCM)"),
    "ablate-k40m2": ("ablate-k40m2", "k = 40 by multiple estimation m = 2"),
    "ablate-freshinit": ("ablate-freshinit", "gamma projection freshly initialised (the authors' choice)"),
}


@dataclass
class Row:
    method: str
    steps: int
    fid: float
    prompt_acc: float
    teacher_mse: float
    psnr: float
    latency_ms: float
    speedup: float = 1.0
    guidance: float = 1.0


def _pixels(images) -> torch.Tensor:
    from ..shapes.grammar import to_tensor

    return to_tensor(images)  # (B, 3, H, W) in [-1, 1]


class Bench:
    def __init__(self, weights: Path, n: int, batch: int, guidance: float, seed: int = 1234, split: str = "heldout", log=print,
                 device: str = "cpu", teacher: str = "shapes-teacher", students: dict[str, str] | None = None):
        """teacher: a teacher folder in weights (the Shapes teacher, or Shapes-XL's); students: method -> the embedded
        student folder of that teacher (default the Shapes pair; {} for a teacher that has none, as --curves needs)."""
        from ..shapes.evaluator import Evaluator
        from ..models.loading import load_student, load_teacher
        from ..shapes.grammar import render, sample_specs

        self.log = log
        self.teacher_name = teacher
        self.pipe = load_teacher(str(weights / teacher))
        students = {m: f"shapes-{m}" for m in ("lcm", "splam")} if students is None else students
        self.students = {m: load_student(str(weights / name), self.pipe) for m, name in students.items()}
        self.evaluator = Evaluator.from_pretrained(weights / "shapes-evaluator")
        if device != "cpu":  # every model on the chosen device, in fp32; noise is still drawn on the CPU
            from ..training.device import pick_device

            dev = pick_device(device)
            self.pipe.to(dev)
            self.students = {m: u.to(dev) for m, u in self.students.items()}
            self.evaluator.to(dev)
        self.schedule = NoiseSchedule.from_scheduler(self.pipe.scheduler)
        self.n, self.batch, self.guidance, self.seed, self.split = n, batch, guidance, seed, split
        specs = sample_specs(n, seed, split)
        self.captions = [s.caption() for s in specs]
        real = [render(s, rng) for s, rng in zip(specs, range(seed + 1, seed + 1 + n))]  # other draws, same captions
        self.real_stats = feature_statistics(self.evaluator.features(real))
        self.real_acc = self.evaluator.prompt_accuracy(real, self.captions)["accuracy"]
        self.reference: torch.Tensor | None = None  # teacher 50-step latents
        self.reference_px: torch.Tensor | None = None

    def _batches(self):
        for b, i in enumerate(range(0, self.n, self.batch)):
            yield self.seed * 1000 + b, self.captions[i: i + self.batch]

    def sample(self, method: str, steps: int, unet=None, student_guidance: float = 1.0) -> torch.Tensor:
        """Clean latents (n, C, h, w) of one row, batch by batch from the seeded noise.

        student_guidance: the guidance_scale a student samples at (models.sampling_guidance; 1 unless w-conditioned).
        """
        unet = unet if unet is not None else self.students.get(method)
        g = self.guidance if method in ("teacher-ddim", "ddim", "dpm++", "unipc") else 1.0
        out = [generate(self.pipe, prompt=caps, sampler=SAMPLER[method], steps=steps, seed=s, unet=unet,
                        guidance_scale=g, decode=False, student_guidance_scale=student_guidance).latents
               for s, caps in self._batches()]
        return torch.cat(out)

    def score(self, latents: torch.Tensor) -> dict:
        images = [im for i in range(0, len(latents), 256) for im in decode_latents(self.pipe, latents[i: i + 256])]
        px = _pixels(images)
        fid = frechet_distance(*feature_statistics(self.evaluator.features(px)), *self.real_stats)
        acc = self.evaluator.prompt_accuracy(px, self.captions)
        res = {"fid": fid, "prompt_acc": acc["accuracy"], "per_attribute": acc["per_attribute"]}
        if self.reference is not None:
            res["teacher_mse"] = float(latent_mse(latents, self.reference).mean())
            res["psnr"] = float(psnr(px, self.reference_px).mean())
        return res, px

    def latency_ms(self, method: str, steps: int, repeats: int) -> float:
        """Median wall time of one image (batch 1, prompt encoding and VAE decode included)."""
        unet = self.students.get(method)
        g = self.guidance if unet is None else 1.0
        times = []
        for r in range(repeats + 1):
            t0 = time.perf_counter()
            generate(self.pipe, prompt=self.captions[:1], sampler=SAMPLER[method], steps=steps, seed=r, unet=unet, guidance_scale=g)
            times.append(1000 * (time.perf_counter() - t0))
        return statistics.median(times[1:])  # the first run warms up

    def table(self, repeats: int) -> list[Row]:
        rows = []
        for method, steps in ROWS:
            t0 = time.time()
            lat = self.sample(method, steps)
            res, px = self.score(lat)
            if method == "teacher-ddim":  # the reference of every later row
                self.reference, self.reference_px = lat, px
                res["teacher_mse"], res["psnr"] = 0.0, float("inf")
            row = Row(method, steps, res["fid"], res["prompt_acc"], res["teacher_mse"], res["psnr"],
                      self.latency_ms(method, steps, repeats),
                      guidance=self.guidance if method not in ("lcm", "splam") else 1.0)
            rows.append(row)
            self.log(f"{method:>12} {steps:>2} steps  FID {row.fid:7.3f}  acc {row.prompt_acc:.3f}  "
                     f"mse {row.teacher_mse:.4f}  psnr {row.psnr:6.2f}  {row.latency_ms:7.1f} ms  ({time.time() - t0:.0f}s)")
        t_teacher = rows[0].latency_ms
        for r in rows:
            r.speedup = t_teacher / r.latency_ms
        return rows

    def error_bound(self, n_prompts: int, strides=(1, 2)) -> dict:
        """Per-sub-path terms, bound and real error averaged over prompts, for LCM and SPLAM."""
        caps = self.captions[:n_prompts]
        with torch.no_grad():
            cond, uncond = encode_text(self.pipe, caps), encode_text(self.pipe, [""] * len(caps))
            size = self.pipe.unet.config.sample_size
            z_T = initial_noise(self.seed, len(caps), self.pipe.unet, size, size, 1)
            traj, times = guided_trajectory(self.pipe.unet, cond, uncond, lcm_w(self.guidance), self.schedule, z_T)
            bounds = student_error_bounds(self.students, cond, self.schedule, traj, times, strides)
        return {m: {f"k={20 * stride}": {"t": eb.times, "term": eb.terms.mean(1).tolist(), "bound": eb.bound.mean(1).tolist(),
                                        "error": eb.error.mean(1).tolist()} for stride, eb in by_stride.items()}
                for m, by_stride in bounds.items()}

    def ensure_reference(self, cache: Path | None = None) -> None:
        """The teacher's 50-step latents of these captions, every later row's reference (cached in a file if given)."""
        from safetensors.torch import load_file, save_file

        if self.reference is not None:
            return
        key = f"{self.teacher_name}-n{self.n}-seed{self.seed}-g{self.guidance:g}-{self.split}"  # one cache, many teachers
        kept = load_file(cache) if cache is not None and cache.is_file() else {}  # read once: other teachers' keys too
        if key in kept:
            lat = kept[key]
        else:
            lat = self.sample("teacher-ddim", 50)
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                save_file({**kept, key: lat.contiguous()}, str(cache))
        res, px = self.score(lat)
        self.reference, self.reference_px = lat, px
        self.log(f"teacher 50 steps: FID {res['fid']:.2f} acc {res['prompt_acc']:.3f}")
        self.teacher_row = {"fid": res["fid"], "prompt_acc": res["prompt_acc"]}

    def evaluate_unet(self, method: str, unet, steps: int, student_guidance: float = 1.0) -> dict:
        res, _ = self.score(self.sample(method, steps, unet, student_guidance))
        res.pop("per_attribute")
        return res


def convergence(bench: Bench, weights: Path, steps: int = 2) -> dict:
    """FID and teacher distance of the snapshots theta^- along training, SPLAM and LCM (same budget)."""
    from safetensors.torch import load_file

    out = {}
    for m in ("lcm", "splam"):
        snaps = sorted((weights / f"shapes-{m}" / "snapshots").glob("step-*.safetensors"))
        if not snaps:
            continue
        unet = bench.students[m]
        final = {k: v.clone() for k, v in unet.state_dict().items()}
        pts = []
        for p in snaps:
            unet.load_state_dict({k: v.float() for k, v in load_file(p).items()}, strict=False)
            res = bench.evaluate_unet(m, unet, steps)
            pts.append({"iteration": int(p.stem.split("-")[1]), **res})
            bench.log(f"convergence {m} {pts[-1]}")
        unet.load_state_dict(final)
        out[m] = pts
    return {"steps": steps, "curves": out}


def untrained_student(pipe):
    """What distillation must beat: the teacher UNet with a zero-initialised gamma projection, no training."""
    from ..core.student import build_student

    return build_student(pipe.unet, "zero").to(pipe.unet.device, pipe.unet.dtype).eval()


def run_points(run_dir: Path) -> list[tuple[int, Path | None]]:
    """(iteration, snapshot file) along a run, ending with its exported student (file None)."""
    cfg = json.loads((run_dir / "training_config.json").read_text())
    snaps = sorted((run_dir / "snapshots").glob("step-*.safetensors"))
    pts = [(int(p.stem.split("-")[1]), p) for p in snaps]
    if holds_student(run_dir) and (not pts or pts[-1][0] != cfg["max_steps"]):
        pts.append((cfg["max_steps"], None))
    return pts


def snapshot_state(snap: dict[str, torch.Tensor], unet, name: str = "snapshot") -> dict[str, torch.Tensor]:
    """A snapshot's tensors under the evaluated UNet's names, in its dtype: training names its LoRA adapter "default",
    a loaded LoRA student STUDENT_ADAPTER. Every tensor must land (a partial load would score another model)."""
    keys = set(unet.state_dict())
    out = {}
    for k, v in snap.items():
        mapped = k if k in keys else k.replace(".default.", f".{STUDENT_ADAPTER}.")
        if mapped not in keys:
            raise ValueError(f"{name}: {k} has no place in the evaluated student (a LoRA run still training has no "
                             "adapter to load it into: evaluate it once it is finished)")
        out[mapped] = v.to(unet.dtype)
    return out


CURVE_CONFIG_KEYS = ("method", "lr", "lr_schedule", "ema_decay", "batch_size", "seed", "w", "gamma_one_prob",
                     "gamma_scale", "gamma_time", "m", "cond_proj_lr_scale", "huber_c", "max_steps", "init_from", "w_min",
                     "w_max", "k_high", "t_high", "t_top_prob", "regression", "prompts", "images_per_prompt", "lora_rank",
                     "adversarial", "adversarial_t_max", "adversarial_lr", "dmd", "dmd_lr",
                     "prompts_w", "data", "regression_prompts")


def write_curves(path: str | Path, res: dict) -> Path:
    """The curves JSON written atomically (a killed bench leaves the earlier file whole: --resume-curves reads it)."""
    from ..store.atomic import atomic_write

    payload = json.dumps(res, indent=2, default=float)
    return atomic_write(path, lambda p: p.write_text(payload))


def merge_curves(done: dict | None, new: dict) -> dict:
    """An earlier curves file (--resume-curves) updated by a new result: its other runs and keys (a note) kept, the
    runs measured now replaced, the new top-level values (untrained row, wall time) taken."""
    return {**(done or {}), **new, "runs": {**(done or {}).get("runs", {}), **new["runs"]}}


def curves(bench: Bench, runs: list[Path], steps=(1, 2, 4), untrained: bool = True, done: dict | None = None,
           save=None) -> dict:
    """FID, prompt accuracy and teacher distance at 1/2/4 sampling steps along each run (snapshots of theta^-).

    `done`: an earlier result of the same bench (same n, guidance); its points are reused, not re-evaluated.
    `save(partial)`: called after every measured point, so an interrupted evaluation loses nothing.
    """
    if done and (done.get("n"), done.get("guidance")) != (bench.n, bench.guidance):
        raise ValueError(f"the earlier curves were measured at n={done.get('n')}, guidance={done.get('guidance')}; "
                         f"this bench is n={bench.n}, guidance={bench.guidance}")
    old = {(name, p["iteration"]): p for name, r in (done or {}).get("runs", {}).items() for p in r["points"]}
    from safetensors.torch import load_file

    from ..models.loading import load_student, sampling_guidance

    out = {"n": bench.n, "guidance": bench.guidance, "teacher": getattr(bench, "teacher_row", None), "runs": {}}
    if untrained and done and done.get("untrained"):
        out["untrained"] = done["untrained"]
    elif untrained:
        unet = untrained_student(bench.pipe)
        out["untrained"] = {s: bench.evaluate_unet("lcm", unet, s) for s in steps}
        bench.log(f"untrained {out['untrained']}")
    for run in runs:
        pts_at = run_points(run)
        if holds_student(run):  # finished: its exported student gives the architecture
            unet = load_student(str(run), bench.pipe)
        else:  # still training: its snapshots on the zero-initialised student's architecture
            unet = untrained_student(bench.pipe)
        final = {k: v.clone() for k, v in unet.state_dict().items()}
        cfg = json.loads((run / "training_config.json").read_text())
        conf = {k: cfg.get(k) for k in CURVE_CONFIG_KEYS}
        g = sampling_guidance(cfg)  # w + 1 for a w-conditioned student (diffusers' LCM recipe), else 1
        pts = []
        for it, snap in pts_at:
            if (run.name, it) in old:
                pts.append(old[(run.name, it)])
                continue
            unet.load_state_dict(snapshot_state(load_file(snap), unet, snap.name) if snap else final, strict=False)
            pts.append({"iteration": it, **{str(s): bench.evaluate_unet("lcm", unet, s, g) for s in steps}})
            if save is not None:
                save({**out, "runs": {**out["runs"], run.name: {"config": conf, "sampling_guidance": g, "points": pts}}})
            bench.log(f"{run.name} @{it}: " + "  ".join(f"{s}-step FID {pts[-1][str(s)]['fid']:.1f} mse {pts[-1][str(s)]['teacher_mse']:.4f}" for s in steps))
        out["runs"][run.name] = {"config": conf, "sampling_guidance": g, "points": pts}
    return out


def ablations(bench: Bench, weights: Path, steps=(1, 2, 4)) -> dict:
    """Every arm evaluated at the budget of the dedicated ablation runs (their max_steps)."""
    from safetensors.torch import load_file

    from ..models.loading import load_student

    budgets = [json.loads((weights / run / "training_config.json").read_text())["max_steps"]
               for run, _ in ABLATIONS.values() if run.startswith("ablate-") and (weights / run).is_dir()]
    if not budgets:
        return {}
    budget = min(budgets)
    out = {}
    for name, (run, what) in ABLATIONS.items():
        if not (weights / run).is_dir():
            continue
        unet = load_student(str(weights / run), bench.pipe)
        cfg = json.loads((weights / run / "training_config.json").read_text())
        if cfg["max_steps"] != budget:  # a main run: take its snapshot at the ablation budget
            snap = weights / run / "snapshots" / f"step-{budget:07d}.safetensors"
            if not snap.is_file():
                bench.log(f"ablation {name}: no snapshot at step {budget} in {run}; skipped")
                continue
            unet.load_state_dict({k: v.float() for k, v in load_file(snap).items()}, strict=False)
        out[name] = {"change": what, "run": run, "iterations": budget,
                     "rows": {s: bench.evaluate_unet("splam", unet, s) for s in steps}}
        bench.log(f"ablation {name}: {out[name]['rows']}")
    return out


def plot(results: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    eb = results.get("error_bound")
    if eb:
        keys = list(next(iter(eb.values())).keys())
        fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4), squeeze=False)
        for ax, k in zip(axes[0], keys):
            for m, c in (("lcm", "tab:orange"), ("splam", "tab:blue")):
                d = eb[m][k]
                ax.plot(d["t"], d["bound"], "--", color=c, label=f"{m.upper()} bound (sum of terms)")
                ax.plot(d["t"], d["error"], "-", color=c, label=f"{m.upper()} real error |F(z_t) - z_0|")
                ax.plot(d["t"], d["term"], ":", color=c, label=f"{m.upper()} sub-path term")
            ax.set_xlabel("t"), ax.set_ylabel("RMS in latent space"), ax.set_title(f"per-sub-path error bound, {k}")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "error_bound.png", dpi=110)
        plt.close(fig)
        files.append("error_bound.png")
    conv = results.get("convergence", {}).get("curves")
    if conv:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for m, c in (("lcm", "tab:orange"), ("splam", "tab:blue")):
            if m in conv:
                it = [p["iteration"] for p in conv[m]]
                axes[0].plot(it, [p["fid"] for p in conv[m]], "o-", color=c, label=m.upper())
                axes[1].plot(it, [p["teacher_mse"] for p in conv[m]], "o-", color=c, label=m.upper())
        axes[0].set_ylabel("Shapes-FID"), axes[1].set_ylabel("latent MSE to teacher (50-step DDIM)")
        for ax in axes:
            ax.set_xlabel("training iteration"), ax.legend()
        fig.suptitle(f"convergence at {results['convergence']['steps']} sampling steps")
        fig.tight_layout()
        fig.savefig(out_dir / "convergence.png", dpi=110)
        plt.close(fig)
        files.append("convergence.png")
    return files


def plot_curves(d: dict, path: Path, title: str) -> Path:
    """FID and teacher MSE against training iterations, at 1 / 2 / 4 sampling steps, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    maps = {"lcm": "Oranges", "splam": "Blues"}  # LCM orange, SPLAM blue (as the studio); shades tell runs apart
    styles = ["-", "--", ":", "-."]
    fig, axes = plt.subplots(2, 3, figsize=(16, 7))
    count = {m: sum(r["config"]["method"] == m for r in d["runs"].values()) for m in maps}
    seen: dict[str, int] = {}
    for name, r in d["runs"].items():
        m = r["config"]["method"]
        i = seen.get(m, 0)
        seen[m] = i + 1
        shade = 0.9 - 0.45 * i / max(count.get(m, 1) - 1, 1)  # from dark to light within a method
        color = plt.get_cmap(maps[m])(shade) if m in maps else "gray"
        its = [p["iteration"] for p in r["points"]]
        for col, s in enumerate(("1", "2", "4")):
            for row, key in enumerate(("fid", "teacher_mse")):
                axes[row][col].plot(its, [p[s][key] for p in r["points"]], styles[i % len(styles)], marker="o", ms=3,
                                    color=color, label=name)
    for col, s in enumerate(("1", "2", "4")):
        for row, key in enumerate(("fid", "teacher_mse")):
            ax = axes[row][col]
            if d.get("untrained"):
                ax.axhline(d["untrained"][s][key], color="gray", lw=1, ls="--", label="untrained student")
            if key == "fid" and d.get("teacher"):
                ax.axhline(d["teacher"]["fid"], color="black", lw=1, ls=":", label="teacher, 50 steps")
            ax.set_title(f"{'Shapes-FID' if key == 'fid' else 'latent MSE to teacher'}, {s}-step sampling", fontsize=9)
            ax.set_xlabel("training iteration")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=7)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 0.84, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=None, help="weights folder (default: the package's weights/)")
    p.add_argument("--teacher", default="shapes-teacher", help="--curves: the teacher folder in --weights the runs were "
                   "distilled from (shapes-xl-teacher: the Shapes-XL world); the full bench needs the Shapes teacher")
    p.add_argument("--n", type=int, default=1000, help="held-out captions (images) per row")
    p.add_argument("--n-curve", type=int, default=250, help="images per convergence / ablation point")
    p.add_argument("--batch", type=int, default=250, help="generation batch size")
    p.add_argument("--guidance", type=float, default=None, help="teacher CFG scale (default: the students' w + 1)")
    p.add_argument("--repeats", type=int, default=7, help="latency repeats (median)")
    p.add_argument("--error-prompts", type=int, default=32, help="prompts averaged in the error bound")
    p.add_argument("--out", default="benchmarks", help="folder of results.json and plots")
    p.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto: where every row runs (fp32)")
    p.add_argument("--no-report", action="store_true", help="do not rewrite BENCHMARKS.md")
    p.add_argument("--curves", nargs="+", default=None, metavar="RUN",
                   help="instead of the full bench: curves of these run folders (snapshots and final) at 1/2/4 steps")
    p.add_argument("--curves-out", default="benchmarks/curves.json", help="where --curves writes its JSON")
    p.add_argument("--reference-cache", default=None, help="file caching the teacher's 50-step latents between runs")
    p.add_argument("--no-untrained", action="store_true", help="--curves: skip the untrained-student row")
    p.add_argument("--curves-plot", default=None, help="--curves: also plot them to this PNG")
    p.add_argument("--resume-curves", action="store_true", help="--curves: reuse the points already in --curves-out")
    a = p.parse_args(argv)
    from ..store.runs import weights_dir

    weights = Path(a.weights) if a.weights else weights_dir()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    guidance = a.guidance
    if guidance is None:
        cfg = json.loads((weights / "shapes-splam" / "training_config.json").read_text())
        guidance = cfg_scale(float(cfg["w"]))
    torch.manual_seed(0)
    t0 = time.time()
    if a.teacher != "shapes-teacher" and not a.curves:
        raise SystemExit(f"--teacher {a.teacher}: only --curves runs on another teacher (its embedded students and "
                         "latency rows are the Shapes teacher's)")
    bench = Bench(weights, a.n, a.batch, guidance, device=a.device, teacher=a.teacher,
                  students=None if a.teacher == "shapes-teacher" else {})
    if a.curves:
        bench.ensure_reference(Path(a.reference_cache) if a.reference_cache else None)
        done = json.loads(Path(a.curves_out).read_text()) if a.resume_curves and Path(a.curves_out).is_file() else None
        Path(a.curves_out).parent.mkdir(parents=True, exist_ok=True)

        def save(partial: dict) -> None:  # earlier points and this run's so far
            write_curves(a.curves_out, merge_curves(done, partial))

        res = curves(bench, [Path(r) for r in a.curves], untrained=not a.no_untrained, done=done, save=save)
        res["wall_s"] = time.time() - t0
        res = merge_curves(done, res)
        write_curves(a.curves_out, res)
        if a.curves_plot:
            plot_curves(res, Path(a.curves_plot), f"{len(res['runs'])} runs, {a.n} held-out captions per point")
        print(f"wrote {a.curves_out} in {res['wall_s']:.0f}s")
        return
    results = {"n": a.n, "split": bench.split, "guidance": guidance, "real_prompt_acc": bench.real_acc,
               "threads": torch.get_num_threads(), "device": a.device}
    results["rows"] = [asdict(r) for r in bench.table(a.repeats)]
    results["error_bound"] = bench.error_bound(a.error_prompts)
    small = Bench.__new__(Bench)
    small.__dict__.update(bench.__dict__)
    small.n, small.captions = a.n_curve, bench.captions[: a.n_curve]
    small.real_stats = bench.real_stats
    small.reference = bench.reference[: a.n_curve] if bench.reference is not None else None
    small.reference_px = bench.reference_px[: a.n_curve] if bench.reference_px is not None else None
    results["convergence"] = convergence(small, weights)
    results["ablations"] = ablations(small, weights)
    results["n_curve"] = a.n_curve
    results["wall_s"] = time.time() - t0
    results["plots"] = plot(results, out)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float))
    if not a.no_report:
        from .report import write_benchmarks_md

        write_benchmarks_md(out)
    print(f"wrote {out / 'results.json'} in {results['wall_s']:.0f}s")


if __name__ == "__main__":
    main()
