"""The loss functions, against hand-computed numbers (optimizers and schedules: test_optimizers.py,
test_schedulers.py)."""

from __future__ import annotations

import torch

from library import losses


def test_training_target_epsilon_and_v():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          num_train_timesteps=1000, clip_sample=False)
    latents, noise = torch.full((1, 4, 2, 2), 2.0), torch.full((1, 4, 2, 2), 0.5)
    t = torch.tensor([500])
    assert torch.equal(losses.training_target(sched, latents, noise, t, v_prediction=False), noise)
    a = sched.alphas_cumprod[500]
    expected_v = a.sqrt() * 0.5 - (1 - a).sqrt() * 2.0  # v = sqrt(a) * eps - sqrt(1 - a) * x0
    v = losses.training_target(sched, latents, noise, t, v_prediction=True)
    assert torch.allclose(v, torch.full_like(v, float(expected_v)), atol=1e-6)


def test_diffusion_loss_is_per_sample_fp32_mse():
    pred = torch.zeros(2, 1, 2, 2, dtype=torch.bfloat16)
    target = torch.stack([torch.full((1, 2, 2), 1.0), torch.full((1, 2, 2), 3.0)])
    loss = losses.diffusion_loss(pred, target)
    assert loss.dtype == torch.float32 and loss.tolist() == [1.0, 9.0]


def test_sample_timesteps_range_and_noise_shape():
    t = losses.sample_timesteps(1000, 1000, "cpu", generator=torch.Generator().manual_seed(0))
    assert t.min() >= 0 and t.max() <= 999 and t.dtype == torch.long
    x = torch.zeros(2, 4, 3, 3, dtype=torch.float64)
    n = losses.sample_noise(x, generator=torch.Generator().manual_seed(0))
    assert n.shape == x.shape and n.dtype == torch.float64 and n.std() > 0.5
