"""Noise, timesteps and the diffusion training objective, as pure functions.

Later issues add offsets, min-SNR weighting, masked loss, ...: each one is a function here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sample_noise(latents: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard Gaussian noise shaped like the latents (DDPM's epsilon)."""
    return torch.randn(latents.shape, generator=generator, dtype=latents.dtype, device=latents.device)


def sample_timesteps(batch_size: int, num_train_timesteps: int, device, generator=None) -> torch.Tensor:
    """One integer timestep per sample, uniform over [0, num_train_timesteps)."""
    return torch.randint(0, num_train_timesteps, (batch_size,), generator=generator, device=device).long()


def training_target(scheduler, latents, noise, timesteps, v_prediction: bool) -> torch.Tensor:
    """What the UNet is trained to output: the noise (epsilon) or the velocity v (Salimans & Ho, 2022)."""
    if v_prediction:
        return scheduler.get_velocity(latents, noise, timesteps)
    return noise


def diffusion_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error, computed in fp32 whatever the model's dtype: shape (B,)."""
    loss = F.mse_loss(prediction.float(), target.float(), reduction="none")
    return loss.mean(dim=list(range(1, loss.ndim)))
