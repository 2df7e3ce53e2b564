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


def prior_loss_weights(is_reg: torch.Tensor, prior_loss_weight: float) -> torch.Tensor:
    """Per-sample loss weights: 1 for a training image, `prior_loss_weight` for a regularisation image.

    DreamBooth's prior-preservation term (Ruiz et al., 2022), as kohya applies it: each sample's loss
    is multiplied by its weight and the batch mean is taken over samples, not divided by the sum of
    the weights, so a batch of only reg images at weight 0.5 has half the loss.
    """
    ones = torch.ones(is_reg.shape, dtype=torch.float32, device=is_reg.device)
    return torch.where(is_reg.bool(), ones * prior_loss_weight, ones)


def weighted_mean(per_sample: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The batch loss: mean over samples of per-sample loss x weight (shapes (B,))."""
    return (per_sample * weights.to(per_sample.device)).mean()


def masked_loss_weights(mask: torch.Tensor, unmasked_weight: float = 0.0) -> torch.Tensor:
    """Per-element loss weights from a mask in [0, 1]: the mask, raised to at least `unmasked_weight`.

    OneTrainer's masked training: masked-out areas still teach a little (weight `unmasked_weight`), so
    the model does not forget what surrounds the subject; 0 gives kohya's --masked_loss exactly.
    """
    return torch.clamp(mask.float(), min=float(unmasked_weight), max=1.0)


def masked_diffusion_loss(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                          unmasked_weight: float = 0.0, normalize: bool = False) -> torch.Tensor:
    """Per-sample masked mean squared error, shape (B,).

    The element-wise error (B, C, h, w) is multiplied by masked_loss_weights of `mask` (B, 1, h', w'),
    area-averaged to the latent size first when it is bigger (kohya's apply_masked_loss), then averaged
    over C, h, w as diffusion_loss does. With `normalize` (OneTrainer's "normalize masked area loss")
    each sample is divided by its mean weight, so a small subject teaches as much as a large one.
    """
    loss = F.mse_loss(prediction.float(), target.float(), reduction="none")
    mask = mask.to(loss.device, torch.float32)
    if mask.shape[-2:] != loss.shape[-2:]:
        mask = F.interpolate(mask, size=loss.shape[-2:], mode="area")
    weights = masked_loss_weights(mask, unmasked_weight)
    per_sample = (loss * weights).mean(dim=(1, 2, 3))
    if normalize:
        per_sample = per_sample / weights.mean(dim=(1, 2, 3)).clamp_min(1e-8)
    return per_sample
