"""Training SD 1.x / 2.x inpainting checkpoints: U-Nets with 9 input channels.

Such a U-Net reads the noisy latents (4 channels), then the inpaint mask at latent size (1; 1 = paint
here), then the latents of the masked image (4), in that order (diffusers' StableDiffusionInpaintPipeline:
the image in [-1, 1] times (mask < 0.5), encoded by the VAE and multiplied by its scaling factor; the
pixel mask reaches latent size by nearest interpolation). `add_conditioning` builds the last 5 channels
for a training batch as batch["inpaint_cond"] (B, 5, h, w); the family's predict puts them after the
noisy latents. For a 4-channel U-Net it does nothing.

Which mask a sample gets:
- with loss masks in the batch (--masked_loss, --alpha_mask): the sample's loss mask, binarized at 0.5
  (the pipeline binarizes its mask too) — the model learns to paint what the loss learns from; a sample
  without a mask file has an all-ones mask and is painted whole (text to image);
- else a random mask drawn per sample from --seed, the optimizer step, the sample's position in the batch
  and its image path (so a resumed run draws the same): a share FULL_SHARE of the samples is masked whole,
  the others get 1-3 rectangles or 1-4 brush strokes at latent size.

The masked image needs the VAE on the batch's pixels at every step, so --cache_latents (which keeps no
pixels) is refused before anything is cached (check_options). Sample images during training run
text to image through the inpainting pipeline on a blank image with everything masked (sample_pipeline).
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from library.errors import UserError

INPAINT_CHANNELS = 9
FULL_SHARE = 0.25  # samples painted whole: the model keeps its text-to-image skill
RECT_SHARE = 0.5  # of the others: rectangles; the rest get brush strokes


def is_inpainting(family) -> bool:
    """Whether the family's U-Net takes the inpainting input (9 channels)."""
    unet = getattr(family, "unet", None)
    return getattr(getattr(unet, "config", None), "in_channels", 4) == INPAINT_CHANNELS


def check_options(cfg, family) -> None:
    """Options an inpainting model cannot train with; call before anything is cached or written."""
    if not is_inpainting(family):
        return
    if family.name not in ("sd1", "sd2"):
        raise UserError(f"inpainting models (9 input channels) train with SD 1.x / 2.x only, not {family.name}")
    if getattr(cfg, "cache_latents", False) or getattr(cfg, "cache_latents_to_disk", False):
        raise UserError("an inpainting model encodes the masked image at every step: drop --cache_latents "
                        "(and --cache_latents_to_disk)")


def add_conditioning(batch: dict, latents: torch.Tensor, family, cfg, step: int = 0) -> None:
    """Set batch["inpaint_cond"] (B, 5, h, w: mask, masked-image latents) when the family's U-Net takes
    9 channels; otherwise leave the batch as it is. `latents` are the batch's (B, 4, h, w) latents."""
    if not is_inpainting(family):
        return
    check_options(cfg, family)  # where the run did not call it first
    images = batch.get("images")
    if images is None:
        raise UserError("an inpainting model needs the batch's images: drop --cache_latents")
    h, w = latents.shape[-2:]
    if batch.get("masks") is not None:
        mask = (batch["masks"].float() >= 0.5).float()
    else:
        seed = getattr(cfg, "seed", None) or 0
        paths = batch.get("image_paths") or [""] * len(latents)
        mask = torch.stack([random_mask(sample_rng(seed, step, i, p), h, w) for i, p in enumerate(paths)])
    masked_latents = masked_image_latents(family, images, mask)
    mask = mask.to(latents.device, torch.float32)
    batch["inpaint_cond"] = torch.cat([mask, masked_latents.to(latents.device, torch.float32)], dim=1)


def masked_image_latents(family, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """VAE latents (times the scaling factor) of images in [-1, 1] with the masked part zeroed, as the
    pipeline builds them; `mask` (B, 1, h, w) at latent size is brought to pixel size by nearest."""
    pixel_mask = F.interpolate(mask.float().to(images.device), size=images.shape[-2:], mode="nearest")
    return family.encode_images(images * (pixel_mask < 0.5))


def sample_rng(seed: int, step: int, position: int, path: str) -> random.Random:
    """The random source of one sample's mask: the same in any process and on resume."""
    return random.Random(f"{seed}:{step}:{position}:{path}:inpaint")


def random_mask(rng: random.Random, h: int, w: int) -> torch.Tensor:
    """A (1, h, w) mask at latent size, 1 = paint: whole, rectangles or strokes (see the module doc)."""
    mask = torch.zeros(1, h, w)
    if rng.random() < FULL_SHARE:
        return mask + 1
    if rng.random() < RECT_SHARE:
        for _ in range(rng.randint(1, 3)):
            rh, rw = rng.randint(max(1, h // 4), h), rng.randint(max(1, w // 4), w)
            top, left = rng.randint(0, h - rh), rng.randint(0, w - rw)
            mask[:, top:top + rh, left:left + rw] = 1
        return mask
    return _strokes(rng, h, w)


def _strokes(rng: random.Random, h: int, w: int) -> torch.Tensor:
    """1-4 brush strokes: polylines of 2-5 points, a few latent cells thick."""
    from PIL import Image, ImageDraw

    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    for _ in range(rng.randint(1, 4)):
        points = [(rng.randint(0, w - 1), rng.randint(0, h - 1)) for _ in range(rng.randint(2, 5))]
        width = rng.randint(max(1, min(h, w) // 10), max(1, min(h, w) // 4))
        draw.line(points, fill=255, width=width, joint="curve")
        for x, y in (points[0], points[-1]):  # round ends
            r = width // 2
            draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
    pixels = torch.frombuffer(bytearray(canvas.tobytes()), dtype=torch.uint8).reshape(1, h, w)
    return (pixels > 0).float()


def sample_pipeline(family, scheduler):
    """An inpainting pipeline over the family's live modules that a text-to-image call drives: it paints
    a blank image masked whole (mask all ones, so the masked image is zero), at the call's size."""
    from diffusers import StableDiffusionInpaintPipeline

    class BlankInpaintPipeline(StableDiffusionInpaintPipeline):
        def __call__(self, *args, width: int, height: int, **kwargs):
            kwargs.setdefault("image", torch.zeros(1, 3, height, width))
            kwargs.setdefault("mask_image", torch.ones(1, 1, height, width))
            return super().__call__(*args, width=width, height=height, **kwargs)

    pipe = BlankInpaintPipeline(
        vae=family.vae, text_encoder=family.text_encoders[0], tokenizer=family.tokenizers[0], unet=family.unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
