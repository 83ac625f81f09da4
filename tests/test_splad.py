"""A tiny SD-shaped pipeline: the student, one SPLAD step on both methods, and stock-pipeline sampling."""
import pytest
import torch
from diffusers import LCMScheduler, StableDiffusionPipeline

from splam_studio.core.error_bound import error_bound, teacher_trajectory
from splam_studio.core.sampler import consistency_sample
from splam_studio.core.schedule import NoiseSchedule
from splam_studio.core.solver import guided_eps
from splam_studio.core.splad import SpladConfig, splad_loss
from splam_studio.core.student import build_student, clean_fn, ema_update, make_target, unet_eps_model
from tests.tiny import make_tiny_pipeline, tiny_text


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return make_tiny_pipeline(tmp_path_factory.mktemp("tiny"))


@pytest.mark.parametrize("method", ["splam", "lcm"])
def test_one_splad_step_forward_backward(pipe, method):
    teacher = pipe.unet.requires_grad_(False)
    student = build_student(teacher, "fresh", generator=torch.Generator().manual_seed(0))
    target = make_target(student)
    schedule = NoiseSchedule.from_scheduler(pipe.scheduler)
    with torch.no_grad():
        cond, uncond = tiny_text(pipe, ["one large red circle", "two small blue squares"]), tiny_text(pipe, ["", ""])
    z_0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    loss = splad_loss(SpladConfig(method=method), schedule, student, target, teacher, z_0, cond, uncond,
                      torch.Generator().manual_seed(2))
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    g = student.time_embedding.cond_proj.weight.grad
    assert g is not None and g.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    before = [p.clone() for p in target.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    ema_update(target, student, mu=0.95)
    assert all(torch.allclose(a, b + 0.05, atol=1e-5) for a, b in zip(target.parameters(), before))


def test_zero_init_student_is_the_teacher_at_every_gamma(pipe):
    teacher = pipe.unet
    zero = build_student(teacher, "zero")
    fresh = build_student(teacher, "fresh", generator=torch.Generator().manual_seed(0))
    ehs = tiny_text(pipe, ["one large red circle"] * 3)
    z, t = torch.randn(3, 4, 8, 8), torch.tensor([999, 499, 19])
    gamma = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    with torch.no_grad():
        ref = teacher(z, t, encoder_hidden_states=ehs).sample
        assert torch.allclose(unet_eps_model(zero, ehs)(z, t, gamma), ref, atol=1e-5)
        assert not torch.allclose(unet_eps_model(fresh, ehs)(z, t, gamma), ref, atol=1e-3)
    with pytest.raises(ValueError, match="fresh"):
        build_student(teacher, "random")


def test_guided_eps_is_one_batched_call_in_lcm_form(pipe):
    calls = []
    unet = pipe.unet
    hook = unet.register_forward_hook(lambda m, a, k: calls.append(a[0].shape[0]))
    try:
        cond, uncond = tiny_text(pipe, ["one red circle"]), tiny_text(pipe, [""])
        z, t = torch.randn(1, 4, 8, 8), torch.tensor([499])
        with torch.no_grad():
            eps = guided_eps(unet, cond, uncond, w=8.0)(z, t)
            e_c = unet(z, t, encoder_hidden_states=cond).sample
            e_u = unet(z, t, encoder_hidden_states=uncond).sample
    finally:
        hook.remove()
    assert calls[0] == 2  # cond and uncond in one batch
    assert torch.allclose(eps, e_c + 8.0 * (e_c - e_u), atol=1e-4)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_student_runs_in_a_stock_pipeline_like_our_sampler(pipe, steps):
    """Our multistep consistency sampler equals StableDiffusionPipeline + LCMScheduler at guidance_scale = 1."""
    student = build_student(pipe.unet, "fresh", generator=torch.Generator().manual_seed(3)).eval()
    lcm = LCMScheduler.from_config(pipe.scheduler.config)
    stock = StableDiffusionPipeline(**{**pipe.components, "unet": student, "scheduler": lcm})
    stock.set_progress_bar_config(disable=True)
    z_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = stock("one red circle", num_inference_steps=steps, guidance_scale=1.0, latents=z_T.clone(),
                    generator=torch.Generator().manual_seed(5), output_type="latent").images
        ehs = tiny_text(pipe, ["one red circle"])
        ours = consistency_sample(clean_fn(student, ehs, NoiseSchedule.from_scheduler(pipe.scheduler)),
                                  NoiseSchedule.from_scheduler(pipe.scheduler), z_T, steps, torch.Generator().manual_seed(5))
    assert torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()


def test_error_bound_dominates_the_real_error(pipe):
    schedule = NoiseSchedule.from_scheduler(pipe.scheduler)
    student = build_student(pipe.unet, "zero").eval()
    cond, uncond = tiny_text(pipe, ["one red circle"] * 2), tiny_text(pipe, ["", ""])
    with torch.no_grad():
        traj, times = teacher_trajectory(guided_eps(pipe.unet, cond, uncond, 2.0), schedule, torch.randn(2, 4, 8, 8), N=10)
        assert traj.shape == (11, 2, 4, 8, 8) and times[0] == 999 and times[-1] == 0
        for stride in (1, 2, 3):
            F = clean_fn(student, cond, schedule)
            eb = error_bound(F, traj, times, stride)
            assert eb.terms.shape == eb.error.shape == (len(eb.times), 2)
            assert sorted(eb.F) == list(range(len(times) - 1, -1, -stride))[::-1]  # every evaluated point, z_0's too
            j = sorted(eb.F)[1]  # the F values kept are those of the trajectory point they are keyed by
            assert torch.allclose(eb.F[j], F(traj[j], torch.full((2,), times[j], dtype=torch.long)), atol=1e-6)
            assert (eb.bound >= eb.error - 1e-5).all()
            assert torch.allclose(eb.bound[-1], eb.error[-1], atol=1e-6)  # last sub-path ends at z_0 itself


def test_per_sample_w_in_guided_eps_equals_the_scalar_result_row_by_row(pipe):
    cond, uncond = tiny_text(pipe, ["one red circle", "two blue squares", "one red circle"]), tiny_text(pipe, [""] * 3)
    z, t = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([999, 499, 19])
    w = torch.tensor([3.0, 6.5, 10.0], dtype=torch.float64)  # float64, as the draws: must not reach the model
    with torch.no_grad():
        batched = guided_eps(pipe.unet, cond, uncond, w)(z, t)
        assert batched.dtype == torch.float32
        for i in range(3):  # the same batched UNet call at scalar w[i]: row i must agree to float32 rounding
            row = guided_eps(pipe.unet, cond, uncond, float(w[i]))(z, t)[i]
            assert torch.allclose(batched[i], row, atol=1e-6), (batched[i] - row).abs().max()


def test_w_range_draws_reach_the_teacher_and_the_student_embedding(pipe, monkeypatch):
    """diffusers' LCM recipe: w ~ U[w_min, w_max] per sample goes to the teacher's CFG and to student and target."""
    import splam_studio.core.splad as splad

    seen = {}
    real_guided, real_F = splad.guided_eps, splad.student_F
    monkeypatch.setattr(splad, "guided_eps", lambda u, c, n, w: (seen.__setitem__("teacher", w), real_guided(u, c, n, w))[1])
    monkeypatch.setattr(splad, "student_F", lambda u, c, s, w_c: (seen.setdefault("w_c", []).append(w_c), real_F(u, c, s, w_c))[1])
    teacher = pipe.unet.requires_grad_(False)
    student = build_student(teacher, "fresh", generator=torch.Generator().manual_seed(0))
    schedule = NoiseSchedule.from_scheduler(pipe.scheduler)
    with torch.no_grad():
        cond, uncond = tiny_text(pipe, ["one red circle"] * 4), tiny_text(pipe, [""] * 4)
    z_0 = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    cfg = SpladConfig(method="lcm", w_min=3.0, w_max=10.0)
    loss = splad_loss(cfg, schedule, student, make_target(student), teacher, z_0, cond, uncond, torch.Generator().manual_seed(2))
    assert torch.isfinite(loss)
    w = seen["teacher"]
    assert w.shape == (4,) and 3.0 <= w.min() and w.max() <= 10.0 and len(set(w.tolist())) == 4
    assert len(seen["w_c"]) == 2 and all(x is w for x in seen["w_c"])  # student and target embed the same w
    seen.clear()
    splad_loss(SpladConfig(method="lcm", w=6.5), schedule, student, make_target(student), teacher, z_0, cond, uncond,
               torch.Generator().manual_seed(2))
    assert seen["teacher"] == 6.5 and seen["w_c"] == [None, None]  # fixed w: not embedded (= SPLAM at gamma = 1)


def test_w_range_config_errors():
    from splam_studio.training.loop import TrainConfig, TrainError

    with pytest.raises(ValueError, match="method 'lcm'"):
        SpladConfig(method="splam", w_min=3.0, w_max=10.0)
    with pytest.raises(ValueError, match="both"):
        SpladConfig(method="lcm", w_min=3.0)
    with pytest.raises(ValueError, match="w_min <= w_max"):
        SpladConfig(method="lcm", w_min=10.0, w_max=3.0)
    with pytest.raises(TrainError, match="method 'lcm'"):
        TrainConfig(method="splam", w_min=3.0, w_max=10.0).validate()
    with pytest.raises(TrainError, match="both"):
        TrainConfig(method="lcm", w_max=10.0).validate()
    with pytest.raises(TrainError, match="w_min <= w <= w_max"):
        TrainConfig(method="lcm", w=12.0, w_min=3.0, w_max=10.0).validate()
    TrainConfig(method="lcm", w=6.5, w_min=3.0, w_max=10.0).validate()
    assert TrainConfig(method="lcm", w=6.5, w_min=3.0, w_max=10.0).splad().w_conditioned


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_w_conditioned_student_in_a_stock_pipeline_at_w_plus_one_like_our_sampler(pipe, steps):
    """A w-conditioned student: StableDiffusionPipeline + LCMScheduler at guidance_scale = w + 1 equals our sampler
    with w_c = w, and generate(student_guidance_scale = w + 1) is that stock pipeline."""
    from splam_studio.models.loading import sampling_guidance
    from splam_studio.models.generation import generate, initial_noise

    w = 6.5
    assert sampling_guidance({"w": w, "w_min": 3.0, "w_max": 10.0}) == w + 1
    assert sampling_guidance({"w": w, "w_min": None, "w_max": None}) == sampling_guidance({"w": w}) == 1.0
    student = build_student(pipe.unet, "fresh", generator=torch.Generator().manual_seed(3)).eval()
    stock = StableDiffusionPipeline(**{**pipe.components, "unet": student, "scheduler": LCMScheduler.from_config(pipe.scheduler.config)})
    stock.set_progress_bar_config(disable=True)
    z_T = initial_noise(7, 1, student, 8, 8, 1)
    schedule = NoiseSchedule.from_scheduler(pipe.scheduler)
    ehs = tiny_text(pipe, ["one red circle"])
    with torch.no_grad():
        ref = stock("one red circle", num_inference_steps=steps, guidance_scale=w + 1, latents=z_T.clone(),
                    generator=torch.Generator().manual_seed(8), output_type="latent").images
        ours = consistency_sample(clean_fn(student, ehs, schedule, w_c=w), schedule, z_T, steps, torch.Generator().manual_seed(8))
        at_zero = consistency_sample(clean_fn(student, ehs, schedule), schedule, z_T, steps, torch.Generator().manual_seed(8))
    assert torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()
    assert not torch.allclose(at_zero, ref, atol=1e-3)  # the embedded w matters for this student
    if steps == 2:
        pipe.set_progress_bar_config(disable=True)
        gen = generate(pipe, prompt=["one red circle"], sampler="lcm", steps=steps, seed=7, unet=student,
                       student_guidance_scale=w + 1, decode=False).latents
        with torch.no_grad():
            ours7 = consistency_sample(clean_fn(student, ehs, schedule, w_c=w), schedule, z_T, steps, torch.Generator().manual_seed(8))
        assert torch.allclose(gen, ours7, atol=1e-4), (gen - ours7).abs().max()
