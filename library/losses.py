"""Noise, timesteps and the diffusion training objective, as pure functions.

One training step, in kohya's order; every random draw comes from torch's global RNG, always in this
order, so a seed (and a resumed RNG state) gives the same run:
  1. noise: Gaussian, plus an offset per sample and channel (--noise_offset) and pyramid noise
     (--multires_noise_iterations);
  2. timesteps: uniform integers in [--min_timestep, --max_timestep);
  3. the noisy input, with extra noise in the input only (--ip_noise_gamma, input perturbation);
  4. the target: the noise (epsilon) or the velocity v (--v_parameterization);
  5. the element-wise loss (--loss_type l2 / l1 / huber / smooth_l1), the mask, the mean per sample;
  6. per-sample weights: regularisation images (--prior_loss_weight) x timestep weights (--min_snr_gamma,
     --scale_v_pred_loss_like_noise_pred, --v_pred_like_loss, --debiased_estimation_loss).
`LossSettings` holds the options; `noisy_latents`, `huber_threshold` and `timestep_weights` are the three
calls the trainer makes around the model.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import torch
import torch.nn.functional as F

from library.errors import UserError

logger = logging.getLogger(__name__)

LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")
NUM_TRAIN_TIMESTEPS = 1000  # every SD family trains on 1000 DDPM steps; kohya's timestep ranges assume it
# kohya caps the SNR at 1000 where it divides by it or takes its root (t = 0 has an SNR of about 1175 in
# SD's schedule). sdtune also floors it: with --zero_terminal_snr the last step has an SNR of exactly 0.
SNR_MAX = 1000.0
SNR_MIN = 1e-3


def _on(value):
    """kohya switches these features on with `if args.x:`: 0 (what GUI files write) means off."""
    return value if value else None


@dataclasses.dataclass(frozen=True)
class LossSettings:
    """The noise and loss options of a run (kohya's names), checked once by `from_cfg`."""

    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = 0.1
    huber_scale: float = 1.0
    min_snr_gamma: float | None = None
    scale_v_pred_loss_like_noise_pred: bool = False
    v_pred_like_loss: float | None = None
    debiased_estimation_loss: bool = False
    noise_offset: float | None = None
    noise_offset_random_strength: bool = False
    adaptive_noise_scale: float | None = None
    multires_noise_iterations: int | None = None
    multires_noise_discount: float = 0.3
    ip_noise_gamma: float | None = None
    ip_noise_gamma_random_strength: bool = False
    min_timestep: int | None = None
    max_timestep: int | None = None

    @classmethod
    def from_cfg(cls, cfg) -> "LossSettings":
        """Read and check the options; UserError for the combinations kohya refuses and for bad ranges."""
        values = {f.name: getattr(cfg, f.name, f.default) for f in dataclasses.fields(cls)}
        for name in ("min_snr_gamma", "v_pred_like_loss", "noise_offset", "multires_noise_iterations",
                     "ip_noise_gamma"):
            values[name] = _on(values[name])
        settings = cls(**values)
        settings.check()
        if getattr(cfg, "v_parameterization", False):  # fail early when the flag alone decides
            settings.check_prediction(True)
        return settings

    def check_prediction(self, v_prediction: bool, zero_terminal_snr: bool = False) -> None:
        """Checks that depend on the prediction type, which a model folder may set on its own: run once the
        model is loaded (and early when --v_parameterization is given)."""
        if self.scale_v_pred_loss_like_noise_pred and not v_prediction:
            raise UserError("--scale_v_pred_loss_like_noise_pred needs v-prediction (--v_parameterization, or a "
                            "model whose scheduler config says v_prediction)")
        if self.v_pred_like_loss and v_prediction:
            raise UserError("--v_pred_like_loss cannot be used with v-prediction (the loss already is v)")
        if zero_terminal_snr and not v_prediction:
            logger.warning("--zero_terminal_snr without v-prediction: at the last timestep the input is "
                           "pure noise, where predicting the noise says nothing about the image (Lin et al. train "
                           "v-prediction; kohya warns the same)")

    def check(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise UserError(f"--loss_type {self.loss_type}: expected one of {', '.join(LOSS_TYPES)}")
        if self.loss_type in ("huber", "smooth_l1") and not self.huber_c > 0:
            raise UserError(f"--huber_c {self.huber_c}: must be above 0 for --loss_type {self.loss_type}")
        if self.loss_type in ("huber", "smooth_l1") and self.huber_schedule == "snr" and self.huber_scale != 1:
            logger.warning("--huber_scale %s is not used by --huber_schedule snr (as in kohya)", self.huber_scale)
        if self.adaptive_noise_scale and not self.noise_offset:
            raise UserError("--adaptive_noise_scale needs --noise_offset (it is added to the offset)")
        for name in ("min_snr_gamma", "noise_offset", "multires_noise_iterations", "ip_noise_gamma"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise UserError(f"--{name} {getattr(self, name)}: must not be negative")
        self._check_timesteps()

    def _check_timesteps(self) -> None:
        low = 0 if self.min_timestep is None else self.min_timestep
        high = NUM_TRAIN_TIMESTEPS if self.max_timestep is None else self.max_timestep
        if not 0 <= low <= NUM_TRAIN_TIMESTEPS - 1:
            raise UserError(f"--min_timestep {low}: must be between 0 and {NUM_TRAIN_TIMESTEPS - 1}")
        if not 1 <= high <= NUM_TRAIN_TIMESTEPS:
            raise UserError(f"--max_timestep {high}: must be between 1 and {NUM_TRAIN_TIMESTEPS}")
        if low > high:
            raise UserError(f"--min_timestep {low} is above --max_timestep {high}")


# --- noise and timesteps -------------------------------------------------------------------------------

def sample_noise(latents: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard Gaussian noise shaped like the latents (DDPM's epsilon)."""
    return torch.randn(latents.shape, generator=generator, dtype=latents.dtype, device=latents.device)


def sample_timesteps(batch_size: int, num_train_timesteps: int, device, generator=None,
                     min_timestep: int | None = None, max_timestep: int | None = None) -> torch.Tensor:
    """One integer timestep per sample, uniform over [min_timestep, max_timestep) (default: all of them).

    kohya's rule for an empty range: min_timestep == max_timestep gives every sample that timestep.
    """
    low = 0 if min_timestep is None else min_timestep
    high = num_train_timesteps if max_timestep is None else max_timestep
    if low >= high:
        return torch.full((batch_size,), min(low, num_train_timesteps - 1), dtype=torch.long, device=device)
    return torch.randint(low, high, (batch_size,), generator=generator, device=device).long()


def offset_noise(noise: torch.Tensor, latents: torch.Tensor, offset: float, adaptive_scale: float | None = None,
                 random_strength: bool = False) -> torch.Tensor:
    """Noise offset (Guttenberg, crosslabs.org 2023): a constant shift per sample and channel, so the model
    also learns to change an image's mean brightness.

    noise + s * N(0, 1) of shape (B, C, 1, 1), where s = offset, or U(0, 1) x offset with
    `random_strength`; `adaptive_scale` adds adaptive_scale x |mean of each latent channel| to s (then >= 0).
    """
    strength = offset
    if random_strength:
        strength = torch.rand(1, device=latents.device) * offset
    if adaptive_scale is not None:
        channel_mean = latents.mean(dim=(2, 3), keepdim=True).abs()
        strength = torch.clamp(strength + adaptive_scale * channel_mean, min=0.0)
    shift = torch.randn((latents.shape[0], latents.shape[1], 1, 1), device=latents.device, dtype=noise.dtype)
    return noise + strength * shift


def pyramid_noise(noise: torch.Tensor, iterations: int, discount: float) -> torch.Tensor:
    """Multi-resolution ("pyramid") noise (Whitaker, 2023), as kohya builds it.

    Level i (from 0) adds Gaussian noise drawn at 1 / r**i of the size (r uniform in [2, 4) per level,
    at least 1x1) and upsampled bilinearly, times discount**i; it stops after a 1-pixel side. The sum is
    divided by its standard deviation over the whole batch, back to about unit variance.
    """
    batch, channels, height, width = noise.shape
    upsample = torch.nn.Upsample(size=(height, width), mode="bilinear")
    total = noise
    for level in range(iterations):
        ratio = 2.0 + 2.0 * torch.rand(1).item()  # torch's RNG (kohya: Python's random), one stream to restore
        h, w = max(1, int(height / ratio**level)), max(1, int(width / ratio**level))
        coarse = torch.randn(batch, channels, h, w, device=noise.device, dtype=noise.dtype)
        total = total + upsample(coarse) * discount**level
        if h == 1 or w == 1:
            break
    return total / total.std()


def noisy_latents(settings: LossSettings, scheduler, latents: torch.Tensor):
    """Steps 1-3 of the module doc: (noise, noisy latents for the model, timesteps).

    The returned noise is the one the target is built from; --ip_noise_gamma's extra noise (strength
    gamma, or U(0, 1) x gamma with its random-strength flag) goes into the model's input only
    (Ning et al., 2023, "input perturbation").
    """
    s = settings
    noise = sample_noise(latents)
    if s.noise_offset:
        noise = offset_noise(noise, latents, s.noise_offset, s.adaptive_noise_scale, s.noise_offset_random_strength)
    if s.multires_noise_iterations:
        noise = pyramid_noise(noise, s.multires_noise_iterations, s.multires_noise_discount)
    timesteps = sample_timesteps(latents.shape[0], scheduler.config.num_train_timesteps, latents.device,
                                 min_timestep=s.min_timestep, max_timestep=s.max_timestep)
    input_noise = noise
    if s.ip_noise_gamma:
        strength = s.ip_noise_gamma
        if s.ip_noise_gamma_random_strength:
            strength = torch.rand(1, device=latents.device) * s.ip_noise_gamma
        input_noise = noise + strength * torch.randn_like(latents)
    return noise, scheduler.add_noise(latents, input_noise, timesteps), timesteps


def training_target(scheduler, latents, noise, timesteps, v_prediction: bool) -> torch.Tensor:
    """What the UNet is trained to output: the noise (epsilon) or the velocity v (Salimans & Ho, 2022)."""
    if v_prediction:
        return scheduler.get_velocity(latents, noise, timesteps)
    return noise


def zero_terminal_snr_scheduler(scheduler):
    """The same DDPM schedule with its betas rescaled to zero terminal SNR (Lin et al., 2023, Algorithm 1;
    diffusers' `rescale_betas_zero_snr`, the same formula as kohya's): the last timestep is pure noise.

    Every SNR-based weight is then computed from the rescaled schedule; kohya computes them from the
    original one (sd-scripts issues #1263, #1905), so its weights differ slightly from sdtune's here.
    """
    return type(scheduler).from_config(scheduler.config, rescale_betas_zero_snr=True)


# --- signal-to-noise ratio and per-timestep weights ------------------------------------------------------

def snr_table(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """SNR(t) = alpha_bar_t / (1 - alpha_bar_t) for every timestep (inf where alpha_bar is 1, 0 where it is 0)."""
    alphas_cumprod = alphas_cumprod.float()
    return alphas_cumprod / (1.0 - alphas_cumprod)


def snr_at(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """SNR of each sample's timestep, float32 on the CPU, shape (B,)."""
    return snr_table(scheduler.alphas_cumprod.cpu())[timesteps.cpu()]


def min_snr_weights(snr: torch.Tensor, gamma: float, v_prediction: bool) -> torch.Tensor:
    """Min-SNR-gamma weighting (Hang et al., 2023): min(SNR, gamma) / SNR for an epsilon target,
    min(SNR, gamma) / (SNR + 1) for a v target. Written so that SNR 0 gives 1 (epsilon) and 0 (v)."""
    if v_prediction:
        return torch.clamp(snr, max=gamma) / (snr + 1.0)
    return torch.where(snr > gamma, gamma / snr.clamp(min=gamma), torch.ones_like(snr))


def v_pred_loss_scale(snr: torch.Tensor) -> torch.Tensor:
    """SNR / (SNR + 1), the SNR bounded to [SNR_MIN, SNR_MAX]: a v-prediction loss times this is on the scale
    of an epsilon-prediction loss (kohya's --scale_v_pred_loss_like_noise_pred)."""
    snr = snr.clamp(min=SNR_MIN, max=SNR_MAX)
    return snr / (snr + 1.0)


def v_pred_like_weights(snr: torch.Tensor, factor: float) -> torch.Tensor:
    """kohya's --v_pred_like_loss: loss + factor x loss / v_pred_loss_scale, i.e. loss x (1 + factor / scale),
    which mixes an epsilon loss with a v-like loss that weighs noisy timesteps more."""
    return 1.0 + factor / v_pred_loss_scale(snr)


def debiased_weights(snr: torch.Tensor, v_prediction: bool) -> torch.Tensor:
    """Debiased estimation (Yu et al., 2024): 1 / sqrt(SNR) for epsilon, 1 / (SNR + 1) for v, the SNR
    bounded to [SNR_MIN, SNR_MAX] as in kohya (whose bound is only the upper one)."""
    snr = snr.clamp(min=SNR_MIN, max=SNR_MAX)
    return 1.0 / (snr + 1.0) if v_prediction else 1.0 / torch.sqrt(snr)


def timestep_weights(settings: LossSettings, scheduler, timesteps: torch.Tensor, v_prediction: bool) -> torch.Tensor:
    """The product of the per-timestep weights switched on in `settings`, float32 on the CPU, shape (B,).

    They multiply each sample's loss after the mask and the mean, like --prior_loss_weight (kohya's order:
    min-SNR, v scaling, v-like loss, debiased; all products, so the order does not change the result).
    """
    s = settings
    snr = snr_at(scheduler, timesteps)
    weights = torch.ones_like(snr)
    if s.min_snr_gamma:
        weights = weights * min_snr_weights(snr, s.min_snr_gamma, v_prediction)
    if s.scale_v_pred_loss_like_noise_pred:
        weights = weights * v_pred_loss_scale(snr)
    if s.v_pred_like_loss:
        weights = weights * v_pred_like_weights(snr, s.v_pred_like_loss)
    if s.debiased_estimation_loss:
        weights = weights * debiased_weights(snr, v_prediction)
    return weights


# --- element-wise losses -----------------------------------------------------------------------------------

def huber_threshold(settings: LossSettings, scheduler, timesteps: torch.Tensor) -> torch.Tensor | None:
    """The per-sample Huber parameter c of --loss_type huber / smooth_l1 (None for l2 / l1), kohya's schedules:

    constant:     c = huber_c x huber_scale
    exponential:  c = exp(-a t) x huber_scale, a = -ln(huber_c) / T: 1 at t = 0, huber_c at t = T
    snr:          c = (1 - huber_c) / (1 + sigma_t)**2 + huber_c, sigma_t = sqrt((1 - alpha_bar) / alpha_bar)
                  (huber_scale is not applied, as in kohya)
    """
    s = settings
    if s.loss_type not in ("huber", "smooth_l1"):
        return None
    if s.huber_schedule == "constant":
        return torch.full(timesteps.shape, s.huber_c * s.huber_scale, device=timesteps.device)
    if s.huber_schedule == "exponential":
        rate = -math.log(s.huber_c) / scheduler.config.num_train_timesteps
        return torch.exp(-rate * timesteps.float()) * s.huber_scale
    alphas = scheduler.alphas_cumprod.cpu().float()[timesteps.cpu()]
    sigmas = ((1.0 - alphas) / alphas).sqrt()
    return ((1.0 - s.huber_c) / (1.0 + sigmas) ** 2 + s.huber_c).to(timesteps.device)


def elementwise_loss(prediction: torch.Tensor, target: torch.Tensor, loss_type: str = "l2",
                     huber_c: torch.Tensor | None = None) -> torch.Tensor:
    """The loss of every element, in fp32 whatever the model's dtype.

    l2: d**2; l1: |d|; huber (pseudo-Huber): 2 c (sqrt(d**2 + c**2) - c), about d**2 near 0 and 2 c |d|
    far out; smooth_l1: 2 (sqrt(d**2 + c**2) - c), about d**2 / c near 0 and 2 |d| far out (kohya's
    formulas), with d = prediction - target and c one value per sample (`huber_threshold`).
    """
    prediction, target = prediction.float(), target.float()
    if loss_type == "l2":
        return F.mse_loss(prediction, target, reduction="none")
    if loss_type == "l1":
        return F.l1_loss(prediction, target, reduction="none")
    if huber_c is None:
        raise ValueError(f"loss_type {loss_type} needs huber_c")
    c = huber_c.float().to(prediction.device).view(-1, *([1] * (prediction.ndim - 1)))
    smooth = torch.sqrt((prediction - target) ** 2 + c**2) - c
    if loss_type == "huber":
        return 2.0 * c * smooth
    if loss_type == "smooth_l1":
        return 2.0 * smooth
    raise ValueError(f"unknown loss_type {loss_type}")


def diffusion_loss(prediction: torch.Tensor, target: torch.Tensor, loss_type: str = "l2",
                   huber_c: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample mean of the element-wise loss (mean squared error by default), fp32: shape (B,)."""
    loss = elementwise_loss(prediction, target, loss_type, huber_c)
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
                          unmasked_weight: float = 0.0, normalize: bool = False, loss_type: str = "l2",
                          huber_c: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample masked loss, shape (B,).

    The element-wise loss (B, C, h, w) is multiplied by masked_loss_weights of `mask` (B, 1, h', w'),
    area-averaged to the latent size first when it is bigger (kohya's apply_masked_loss), then averaged
    over C, h, w as diffusion_loss does. With `normalize` (OneTrainer's "normalize masked area loss")
    each sample is divided by its mean weight, so a small subject teaches as much as a large one.
    """
    loss = elementwise_loss(prediction, target, loss_type, huber_c)
    mask = mask.to(loss.device, torch.float32)
    if mask.shape[-2:] != loss.shape[-2:]:
        mask = F.interpolate(mask, size=loss.shape[-2:], mode="area")
    weights = masked_loss_weights(mask, unmasked_weight)
    per_sample = (loss * weights).mean(dim=(1, 2, 3))
    if normalize:
        per_sample = per_sample / weights.mean(dim=(1, 2, 3)).clamp_min(1e-8)
    return per_sample
