import torch

from distill.samplers import sample_ddim, sample_euler, sample_hybrid, sample_student
from distill.metrics.toy import energy_distance, mode_report
from distill.models.analytic import build_mixture, mixture_denoiser
from distill.models.denoiser import Denoiser
from distill.models.roles import Student, Teacher
from distill.models.schedules import FlowSchedule, VPSchedule
from distill.models.toy import ToyMLP

LINEAR = dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)


def ring_teacher(schedule=None):
    mix = build_mixture("ring8")
    return mix, Teacher(mixture_denoiser(mix, schedule or VPSchedule(**LINEAR)))


def test_ddim_50_steps_reaches_the_true_distribution():
    mix, teacher = ring_teacher()
    g = torch.Generator().manual_seed(0)
    ref, other = mix.sample(3000, generator=g), mix.sample(3000, generator=g)
    x = sample_ddim(teacher, torch.randn(3000, 2, generator=g), None, teacher.schedule.inference_timesteps(50, "trailing"))
    x1 = sample_ddim(teacher, torch.randn(3000, 2, generator=g), None, teacher.schedule.inference_timesteps(1, "trailing"))
    floor = abs(energy_distance(other, ref))
    assert energy_distance(x, ref) < max(3 * floor, 1e-3)
    assert energy_distance(x1, ref) > 0.3  # one step gives the mean: far from the data
    assert mode_report(x, mix, ref).precision > 0.95


def test_euler_equals_ddim_without_churn_and_flow_schedule_works():
    mix, teacher = ring_teacher()
    z = torch.randn(500, 2)
    ts = teacher.schedule.inference_timesteps(10, "trailing")
    assert torch.allclose(sample_ddim(teacher, z, None, ts), sample_euler(teacher, z, None, ts), atol=1e-4)
    churned = sample_euler(teacher, z, None, ts, s_churn=1.0, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(churned, sample_ddim(teacher, z, None, ts), atol=1e-3)
    flow = Teacher(mixture_denoiser(mix, FlowSchedule()))
    x = sample_euler(flow, torch.randn(3000, 2), None, torch.linspace(1, 0.02, 50, dtype=torch.float64))
    assert mode_report(x, mix).precision > 0.9


def test_ddim_eta_one_is_stochastic_and_still_correct():
    mix, teacher = ring_teacher()
    z = torch.randn(2000, 2)
    ts = teacher.schedule.inference_timesteps(50, "trailing")
    a = sample_ddim(teacher, z, None, ts, eta=1.0, generator=torch.Generator().manual_seed(1))
    b = sample_ddim(teacher, z, None, ts, eta=1.0, generator=torch.Generator().manual_seed(2))
    assert not torch.allclose(a, b)
    assert mode_report(a, mix).precision > 0.9


def test_student_multistep_renoises_with_fresh_noise_and_hybrid_runs():
    mix, teacher = ring_teacher()
    schedule = teacher.schedule
    # a "student" that is the teacher itself: sample_student over [999, 749, 499, 249] is a stochastic sampler
    student = Student(teacher.denoiser, timesteps=[999, 749, 499, 249])
    z = torch.randn(64, 2)
    x_a, traj = sample_student(student, z, None, generator=torch.Generator().manual_seed(0), return_trajectory=True)
    x_b = sample_student(student, z, None, generator=torch.Generator().manual_seed(1))
    assert len(traj) == 4 and torch.equal(traj[-1], x_a)
    assert not torch.allclose(x_a, x_b)  # fresh noise at each re-noise
    # first step is the plain one-step prediction from pure noise
    assert torch.allclose(traj[0], teacher.denoiser(z, torch.full((64,), 999)))
    x_h = sample_hybrid(teacher, student, z, None, teacher_timesteps=[999], student_timesteps=[749, 499],
                        generator=torch.Generator().manual_seed(0))
    assert x_h.shape == z.shape and torch.isfinite(x_h).all()


def test_student_noise_scale_sigma():
    schedule = VPSchedule()
    student = Student(Denoiser(ToyMLP(2, 16, 1), schedule, "v"), timesteps=[625], noise_scale="sigma")
    z = torch.ones(3, 2)
    _, sigma = schedule.alpha_sigma(torch.tensor([625]))
    assert torch.allclose(student.input_from_noise(z), z * sigma.float())
