"""Noise, timesteps, per-timestep weights and loss types (library/losses.py) against hand-computed numbers,
and their path through the trainer's step."""

from __future__ import annotations

import argparse
import math
from types import SimpleNamespace

import pytest
import torch

from library import losses
from library.errors import UserError
from library.models.sd1 import kohya_noise_scheduler


def schedule(alphas_cumprod):
    """A stand-in scheduler with the two attributes the weight functions read."""
    alphas = torch.tensor(alphas_cumprod)
    return SimpleNamespace(alphas_cumprod=alphas, config=SimpleNamespace(num_train_timesteps=len(alphas)))


def settings(**kw):
    return losses.LossSettings(**kw)


# --- SNR and the per-timestep weights ------------------------------------------------------------------------

def test_snr_table():
    assert losses.snr_table(torch.tensor([0.5, 0.75, 0.0, 1.0])).tolist() == [1.0, 3.0, 0.0, math.inf]


def test_min_snr_weights_epsilon_and_v():
    snr = torch.tensor([0.5, 5.0, 20.0, 0.0])
    # epsilon: min(snr, 5) / snr = 1, 1, 5/20; SNR 0 (zero terminal SNR) gives the limit 1, not 0/0
    assert losses.min_snr_weights(snr, 5.0, v_prediction=False).tolist() == [1.0, 1.0, 0.25, 1.0]
    # v: min(snr, 5) / (snr + 1) = 0.5/1.5, 5/6, 5/21, 0
    assert torch.allclose(losses.min_snr_weights(snr, 5.0, v_prediction=True),
                          torch.tensor([1 / 3, 5 / 6, 5 / 21, 0.0]))


def test_min_snr_on_kohyas_schedule():
    sched = kohya_noise_scheduler()
    snr = losses.snr_at(sched, torch.tensor([0, 999]))
    # alpha_bar_0 = 1 - 0.00085: SNR 0.99915 / 0.00085 = 1175.47; min-SNR-5 weight 5 / 1175.47
    assert snr[0].item() == pytest.approx(0.99915 / 0.00085, rel=1e-4)
    assert losses.min_snr_weights(snr, 5.0, False).tolist() == pytest.approx([5 / 1175.4706, 1.0], rel=1e-4)


def test_v_pred_scale_like_loss_and_debiased():
    snr = torch.tensor([1.0, 4.0, 2000.0, 0.0])
    # snr / (snr + 1), the SNR bounded to [1e-3, 1000] (kohya's cap 1000; 0 is floored)
    expected = [0.5, 0.8, 1000 / 1001, 1e-3 / 1.001]
    assert losses.v_pred_loss_scale(snr).tolist() == pytest.approx(expected, rel=1e-6)
    # loss + 0.5 x loss / scale = loss x (1 + 0.5 / scale): 1 + 0.5/0.5 = 2, 1 + 0.5/0.8 = 1.625
    assert losses.v_pred_like_weights(snr[:2], 0.5).tolist() == pytest.approx([2.0, 1.625])
    # debiased: 1/sqrt(snr) for epsilon, 1/(snr+1) for v
    debiased_eps = losses.debiased_weights(torch.tensor([4.0, 0.25, 2000.0]), v_prediction=False)
    assert debiased_eps.tolist() == pytest.approx([0.5, 2.0, 1 / math.sqrt(1000)], rel=1e-6)
    debiased_v = losses.debiased_weights(torch.tensor([4.0, 0.25, 2000.0]), v_prediction=True)
    assert debiased_v.tolist() == pytest.approx([0.2, 0.8, 1 / 1001], rel=1e-6)


def test_timestep_weights_multiply():
    sched = schedule([0.8, 0.5, 0.2])  # SNR 4, 1, 0.25
    t = torch.tensor([0, 1, 2])
    assert losses.timestep_weights(settings(), sched, t, False).tolist() == [1.0, 1.0, 1.0]
    # min-SNR-2 (0.5, 1, 1) x debiased (1/2, 1, 2)
    both = losses.timestep_weights(settings(min_snr_gamma=2.0, debiased_estimation_loss=True), sched, t, False)
    assert both.tolist() == pytest.approx([0.25, 1.0, 2.0])
    # v: min-SNR-2 (2/5, 1/2, 0.25/1.25) x scale like noise (4/5, 1/2, 0.25/1.25)
    v = losses.timestep_weights(settings(min_snr_gamma=2.0, scale_v_pred_loss_like_noise_pred=True), sched, t, True)
    assert v.tolist() == pytest.approx([0.32, 0.25, 0.04])


def test_zero_terminal_snr_rescales_and_weights_use_the_new_schedule():
    old = kohya_noise_scheduler()
    new = losses.zero_terminal_snr_scheduler(old)
    a, b = old.alphas_cumprod, new.alphas_cumprod
    # Lin et al. Algorithm 1: sqrt(alpha_bar) shifted so the last is 0, scaled so the first is kept
    root = a.sqrt()
    expected_500 = (root[500] - root[999]) * root[0] / (root[0] - root[999])
    assert b[500].sqrt().item() == pytest.approx(expected_500.item(), rel=1e-5)
    assert b[999].item() == 0.0 and b[0].item() == pytest.approx(a[0].item())
    snr_new = losses.snr_at(new, torch.tensor([999]))
    snr_old = losses.snr_at(old, torch.tensor([999]))  # what kohya's weights still use (issues #1263, #1905)
    assert snr_new.item() == 0.0 and snr_old.item() == pytest.approx(0.00468, rel=1e-2)
    assert losses.min_snr_weights(snr_new, 5.0, True).item() == 0.0  # the pure-noise step teaches v nothing
    debiased = losses.timestep_weights(settings(debiased_estimation_loss=True), new, torch.tensor([999]), False)
    assert debiased.item() == pytest.approx(1 / math.sqrt(1e-3))  # finite: the SNR floor


# --- noise and timesteps -------------------------------------------------------------------------------------

def test_offset_noise_fixed_adaptive_and_random():
    latents = torch.zeros(1, 2, 2, 2)
    latents[0, 0] = 2.0
    latents[0, 1] = -1.0
    noise = torch.zeros(1, 2, 2, 2)
    torch.manual_seed(0)
    shift = torch.randn(1, 2, 1, 1)
    torch.manual_seed(0)
    fixed = losses.offset_noise(noise, latents, 0.1)
    assert torch.allclose(fixed, (0.1 * shift).expand(1, 2, 2, 2))
    # adaptive: 0.1 + 0.5 x |channel mean| = 1.1 and 0.6
    torch.manual_seed(0)
    adaptive = losses.offset_noise(noise, latents, 0.1, adaptive_scale=0.5)
    assert torch.allclose(adaptive[0, :, 0, 0], torch.tensor([1.1, 0.6]) * shift.flatten())
    # a negative scale can push the offset below 0: clamped to 0 (0.1 - 0.2 x 2 < 0; 0.1 - 0.2 x 1 < 0)
    torch.manual_seed(0)
    assert torch.equal(losses.offset_noise(noise, latents, 0.1, adaptive_scale=-0.2), noise)
    # random strength: U(0, 1) x offset drawn first, then the shift
    torch.manual_seed(0)
    strength = torch.rand(1).item() * 0.1
    shift_after = torch.randn(1, 2, 1, 1)
    torch.manual_seed(0)
    randomised = losses.offset_noise(noise, latents, 0.1, random_strength=True)
    assert torch.allclose(randomised[0, :, 0, 0], strength * shift_after.flatten())


def test_pyramid_noise_levels_discount_and_stop():
    noise = torch.zeros(1, 1, 2, 2)
    torch.manual_seed(0)
    torch.rand(1)
    level0 = torch.randn(1, 1, 2, 2)  # full size (ratio**0 = 1), weight 1
    torch.rand(1)
    level1 = torch.randn(1, 1, 1, 1)  # 2 / ratio < 1: one pixel, upsampled to a constant, weight 0.3; then stop
    expected = level0 + 0.3 * level1
    expected = expected / expected.std()
    torch.manual_seed(0)
    result = losses.pyramid_noise(noise, iterations=10, discount=0.3)
    assert torch.allclose(result, expected, atol=1e-6)
    assert result.std().item() == pytest.approx(1.0)


def test_sample_timesteps_range():
    t = losses.sample_timesteps(2000, 1000, "cpu", min_timestep=10, max_timestep=20)
    assert t.min().item() == 10 and t.max().item() == 19
    assert losses.sample_timesteps(3, 1000, "cpu", min_timestep=500, max_timestep=500).tolist() == [500] * 3


def test_noisy_latents_default_draws_and_input_perturbation():
    sched = kohya_noise_scheduler()
    latents = torch.randn(2, 4, 2, 2)
    torch.manual_seed(1)
    noise_ref = torch.randn(2, 4, 2, 2)
    t_ref = torch.randint(0, 1000, (2,))
    extra = torch.randn(2, 4, 2, 2)
    torch.manual_seed(1)
    noise, noisy, t = losses.noisy_latents(settings(), sched, latents)
    # defaults draw exactly what the plain loop drew: the noise, then the timesteps
    assert torch.equal(noise, noise_ref) and torch.equal(t, t_ref)
    assert torch.equal(noisy, sched.add_noise(latents, noise_ref, t_ref))
    torch.manual_seed(1)
    noise, noisy, t = losses.noisy_latents(settings(ip_noise_gamma=0.1), sched, latents)
    # the extra noise reaches the input only: the target's noise is unchanged
    assert torch.equal(noise, noise_ref)
    assert torch.allclose(noisy, sched.add_noise(latents, noise_ref + 0.1 * extra, t_ref))


# --- loss types ----------------------------------------------------------------------------------------------

def test_elementwise_loss_types():
    pred = torch.zeros(2, 1, 1, 3)
    target = torch.tensor([0.0, 1.0, 3.0]).expand(2, 1, 1, 3)
    c = torch.tensor([0.5, 1.0])
    assert losses.elementwise_loss(pred, target, "l2")[0].flatten().tolist() == [0.0, 1.0, 9.0]
    assert losses.elementwise_loss(pred, target, "l1")[0].flatten().tolist() == [0.0, 1.0, 3.0]
    huber = losses.elementwise_loss(pred, target, "huber", c)
    # 2c (sqrt(d^2 + c^2) - c): c = 0.5 -> 0, sqrt(1.25) - 0.5, sqrt(9.25) - 0.5; c = 1 -> 2 (sqrt(2) - 1), ...
    assert huber[0].flatten().tolist() == pytest.approx([0.0, 0.618034, 2.541381], rel=1e-5)
    assert huber[1].flatten().tolist() == pytest.approx([0.0, 0.828427, 4.324555], rel=1e-5)
    smooth = losses.elementwise_loss(pred, target, "smooth_l1", c)  # 2 (sqrt(d^2 + c^2) - c)
    assert smooth[0].flatten().tolist() == pytest.approx([0.0, 1.236068, 5.082763], rel=1e-5)


def test_huber_threshold_schedules():
    t = torch.tensor([0, 1, 2])
    sched = schedule([0.8, 0.5, 0.0])  # sigma = sqrt((1 - a) / a) = 0.5, 1, inf
    assert losses.huber_threshold(settings(), sched, t) is None  # l2
    constant = settings(loss_type="huber", huber_schedule="constant", huber_c=0.1, huber_scale=2.0)
    assert losses.huber_threshold(constant, sched, t).tolist() == pytest.approx([0.2] * 3)
    # (1 - c) / (1 + sigma)^2 + c: 0.9 / 2.25 + 0.1, 0.9 / 4 + 0.1, 0.1 (huber_scale not applied, as kohya)
    snr = settings(loss_type="smooth_l1", huber_schedule="snr", huber_c=0.1, huber_scale=2.0)
    assert losses.huber_threshold(snr, sched, t).tolist() == pytest.approx([0.5, 0.325, 0.1])
    # exp(-a t) x scale, a = -ln(c) / T: 2 at t = 0, 2 sqrt(0.1) at T / 2, 0.2 at T
    exponential = settings(loss_type="huber", huber_schedule="exponential", huber_c=0.1, huber_scale=2.0)
    values = losses.huber_threshold(exponential, kohya_noise_scheduler(), torch.tensor([0, 500, 1000]))
    assert values.tolist() == pytest.approx([2.0, 2 * math.sqrt(0.1), 0.2], rel=1e-5)


def test_masked_loss_with_l1():
    pred = torch.zeros(1, 1, 1, 2)
    target = torch.tensor([[[[1.0, 3.0]]]])
    mask = torch.tensor([[[[1.0, 0.0]]]])
    # |d| x mask, mean over the 2 elements: (1 x 1 + 3 x 0) / 2; with floor 0.1: (1 + 0.3) / 2
    assert losses.masked_diffusion_loss(pred, target, mask, loss_type="l1").tolist() == [0.5]
    assert losses.masked_diffusion_loss(pred, target, mask, 0.1, loss_type="l1").tolist() == pytest.approx([0.65])


# --- options ---------------------------------------------------------------------------------------------------

def _cfg(**kw):
    names = [f.name for f in losses.LossSettings.__dataclass_fields__.values()]
    base = {name: losses.LossSettings.__dataclass_fields__[name].default for name in names}
    return argparse.Namespace(**{**base, "v_parameterization": False, "zero_terminal_snr": False, **kw})


@pytest.mark.parametrize("options, message", [
    (dict(adaptive_noise_scale=0.1), "--adaptive_noise_scale needs --noise_offset"),
    (dict(scale_v_pred_loss_like_noise_pred=True), "--scale_v_pred_loss_like_noise_pred needs v-prediction"),
    (dict(v_pred_like_loss=0.1, v_parameterization=True), "--v_pred_like_loss cannot be used with"),
    (dict(min_timestep=1000), "--min_timestep 1000: must be between 0 and 999"),
    (dict(max_timestep=0), "--max_timestep 0: must be between 1 and 1000"),
    (dict(min_timestep=600, max_timestep=500), "--min_timestep 600 is above --max_timestep 500"),
    (dict(loss_type="huber", huber_c=0.0), "--huber_c 0.0: must be above 0 for --loss_type huber"),
    (dict(min_snr_gamma=-1.0), "--min_snr_gamma -1.0: must not be negative"),
])
def test_refused_combinations(options, message):
    cfg = _cfg(**options)
    with pytest.raises(UserError) as info:  # prediction checks run again once the model says v or epsilon
        losses.LossSettings.from_cfg(cfg).check_prediction(cfg.v_parameterization)
    assert str(info.value).startswith(message)


def test_zero_values_mean_off():
    # kohya_ss GUI files write 0 for unused features; kohya switches them on with `if args.x:`
    s = losses.LossSettings.from_cfg(_cfg(noise_offset=0.0, min_snr_gamma=0.0, multires_noise_iterations=0,
                                          ip_noise_gamma=0.0, v_pred_like_loss=0.0, adaptive_noise_scale=0.0))
    assert (s.noise_offset, s.min_snr_gamma, s.multires_noise_iterations, s.ip_noise_gamma) == (None,) * 4


# --- through the trainer -------------------------------------------------------------------------------------

def test_step_loss_applies_timestep_weights_after_the_loss(tiny_model_dir, demo_data, tmp_path, monkeypatch):
    from library.config import parse_args
    from library.methods import NetworkMethod
    from library.trainer import Run
    from tests.conftest import train_argv

    argv = train_argv(tiny_model_dir, demo_data, str(tmp_path / "out"), "--min_snr_gamma", "5", "--loss_type",
                      "huber", "--huber_schedule", "constant", "--huber_c", "0.5", "--prior_loss_weight", "0.5")
    run = Run(parse_args(argv), NetworkMethod)
    run.prepare()
    run.dataset.set_epoch(0)
    batch = dict(run.dataset[0], is_reg=torch.tensor([True, False]))
    seen = {}
    diffusion_loss, noisy_latents = losses.diffusion_loss, losses.noisy_latents

    def record_loss(*args):
        seen["huber_c"] = args[3]
        seen["per_sample"] = diffusion_loss(*args)
        return seen["per_sample"]

    def record_noise(*args):
        result = noisy_latents(*args)
        seen["timesteps"] = result[2]
        return result

    monkeypatch.setattr(losses, "diffusion_loss", record_loss)
    monkeypatch.setattr(losses, "noisy_latents", record_noise)
    with torch.no_grad():
        loss = run.step_loss(batch).item()
    assert seen["huber_c"].tolist() == [0.5, 0.5]
    snr = losses.snr_table(run.family.noise_scheduler.alphas_cumprod)[seen["timesteps"]]
    min_snr = torch.clamp(snr, max=5.0) / snr
    per_sample = seen["per_sample"]
    assert loss == pytest.approx(((0.5 * min_snr[0] * per_sample[0] + min_snr[1] * per_sample[1]) / 2).item(),
                                 rel=1e-5)


def _train_two_steps(model, data, out, *extra):
    """A 2-step run; returns its per-step losses, the saved network and the run."""
    from safetensors.torch import load_file

    from library.config import parse_args
    from library.methods import NetworkMethod
    from library.trainer import Run
    from tests.conftest import train_argv

    run = Run(parse_args(train_argv(model, data, str(out), "--max_train_steps", "2", *extra)), NetworkMethod)
    step_losses = run.train()
    return step_losses, load_file(str(out / "lora.safetensors")), run


def test_noise_and_loss_options_train(tiny_model_dir, demo_data, tmp_path):
    plain_losses, plain, _ = _train_two_steps(tiny_model_dir, demo_data, tmp_path / "plain")
    options = ("--min_snr_gamma", "5", "--noise_offset", "0.1", "--loss_type", "huber")
    tuned_losses, tuned, _ = _train_two_steps(tiny_model_dir, demo_data, tmp_path / "tuned", *options)
    assert all(math.isfinite(x) for x in tuned_losses) and tuned_losses != plain_losses
    ups = [k for k in plain if k.endswith("lora_up.weight")]
    assert any(not torch.equal(plain[k], tuned[k]) for k in ups)
    # v-prediction on the zero-terminal-SNR schedule with every other noise option: finite, and the run
    # holds the rescaled schedule (its last step is pure noise)
    options = ("--v_parameterization", "--zero_terminal_snr", "--scale_v_pred_loss_like_noise_pred",
               "--debiased_estimation_loss", "--multires_noise_iterations", "6", "--ip_noise_gamma", "0.1",
               "--ip_noise_gamma_random_strength", "--noise_offset", "0.05", "--adaptive_noise_scale", "0.01",
               "--min_timestep", "100", "--max_timestep", "1000", "--loss_type", "smooth_l1")
    v_losses, _, run = _train_two_steps(tiny_model_dir, demo_data, tmp_path / "v", *options)
    assert all(math.isfinite(x) for x in v_losses)
    assert run.family.noise_scheduler.alphas_cumprod[-1].item() == 0.0 and run.family.v_prediction
