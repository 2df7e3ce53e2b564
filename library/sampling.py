"""Sample images during training: kohya's prompt files, schedule, samplers and file names.

Prompt files (`--sample_prompts`), in kohya sd-scripts' three formats:
- `.txt`: one prompt a line, `#` lines and blank lines skipped; inline options after ` --`:
  `--n` negative prompt, `--w` / `--h` size, `--s` steps, `--l` CFG scale, `--d` seed, `--ss` sampler;
- `.toml`: a `[prompt]` table of defaults and `[[prompt.subset]]` entries that override them;
- `.json`: a list whose items are such lines or tables.
Table keys are kohya's: prompt, negative_prompt, width, height, sample_steps, scale, seed, sample_sampler.

Rounds: before training (`--sample_at_first`, named as epoch 0), every N steps, or every N epochs
(which then wins over steps, as in kohya). Each round writes kohya's file names under output_dir/sample/,
one grid of the round, and the images to TensorBoard. The random states are put back afterwards, so a
run with samples trains exactly the same weights as one without.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import os
import random
import time
import tomllib
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from library import optim
from library.errors import UserError

logger = logging.getLogger(__name__)

# kohya's sampler names -> a diffusers scheduler class and what that sampler needs on top of the
# training scheduler's config.
SAMPLERS = {
    "ddim": ("DDIMScheduler", {}),
    # SD's reference PNDM skips the Runge-Kutta warm-up steps (without it, few steps fail outright)
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    # diffusers only ends plain DPM-Solver (not ++) at sigma_min
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {"lower_order_final": True}),
}
SAMPLERS.update({f"k_{name}": SAMPLERS[name] for name in ("lms", "euler", "euler_a", "dpm_2", "dpm_2_a")})
# SD's inference scheduler settings (kohya sets steps_offset=1 too); a class without the key skips it.
INFERENCE_CONFIG = {"steps_offset": 1, "set_alpha_to_one": False}

FIELDS = {"prompt": str, "negative_prompt": str, "width": int, "height": int, "sample_steps": int,
          "scale": float, "seed": int, "sample_sampler": str}
INLINE = {"n": "negative_prompt", "w": "width", "h": "height", "s": "sample_steps", "l": "scale", "d": "seed",
          "ss": "sample_sampler"}
# kohya options for other model families or tools (FLUX, SD3, Lumina, ControlNet, inpainting): skipped
# with a warning, so one prompt file can serve several trainers.
FOREIGN_INLINE = {"g", "cn", "i", "ctr", "rcfg", "fs", "am"}
FOREIGN_FIELDS = {"guidance_scale", "controlnet_image", "image", "cfg_trunc_ratio", "renorm_cfg", "flow_shift",
                  "additional_network_multiplier", "enum"}
MAX_SAMPLE_STEPS = 1000  # kohya's cap


@dataclass(frozen=True)
class SamplePrompt:
    """One sample image to make each round; width/height None mean the family's resolution."""

    index: int
    prompt: str
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    sample_steps: int = 30  # kohya's defaults
    scale: float = 7.5
    seed: int | None = None
    sample_sampler: str | None = None


# --- prompt files ------------------------------------------------------------------------------------

def load_prompts(path: str) -> list[SamplePrompt]:
    """Read a .txt, .toml or .json prompt file; UserError naming the file and line (or entry)."""
    if not os.path.isfile(path):
        raise UserError(f"--sample_prompts {path}: no such file")
    extension = os.path.splitext(path)[1].lower()
    readers = {".txt": _read_txt, ".toml": _read_toml, ".json": _read_json}
    if extension not in readers:
        raise UserError(f"--sample_prompts {path}: expected a .txt, .toml or .json file")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--sample_prompts {path}: cannot read it ({exc})") from None
    entries = readers[extension](path, text)
    if not entries:
        raise UserError(f"--sample_prompts {path}: no prompts in it")
    return [_make_prompt(i, fields, where) for i, (where, fields) in enumerate(entries)]


def parse_prompt_line(line: str, where: str) -> dict:
    """kohya's line format: `prompt --n negative --w 512 --h 512 --s 30 --l 7.5 --d 1 --ss euler_a`."""
    parts = line.split(" --")
    fields: dict = {"prompt": parts[0].strip()}
    for part in parts[1:]:
        key, _, value = part.strip().partition(" ")
        key, value = key.lower(), value.strip()
        if key in FOREIGN_INLINE:
            logger.warning("%s: --%s is for other model families; ignored", where, key)
            continue
        if key not in INLINE:
            known = " ".join(f"--{k}" for k in INLINE)
            raise UserError(f"{where}: unknown option --{key} (options: {known})")
        if not value:
            raise UserError(f"{where}: --{key} needs a value")
        fields[INLINE[key]] = value
    return fields


def _read_txt(path: str, text: str) -> list[tuple[str, dict]]:
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            where = f"{path}:{number}"
            entries.append((where, parse_prompt_line(line, where)))
    return entries


def _read_toml(path: str, text: str) -> list[tuple[str, dict]]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"--sample_prompts {path}: not valid TOML ({exc})") from None
    table = data.get("prompt")
    subsets = table.get("subset") if isinstance(table, dict) else None
    if not isinstance(subsets, list) or not all(isinstance(s, dict) for s in subsets):
        raise UserError(f"{path}: expected a [prompt] table with [[prompt.subset]] entries (kohya's layout)")
    defaults = {k: v for k, v in table.items() if k != "subset"}
    return [(f"{path}: [[prompt.subset]] #{i}", {**defaults, **subset}) for i, subset in enumerate(subsets, 1)]


def _read_json(path: str, text: str) -> list[tuple[str, dict]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"--sample_prompts {path}: not valid JSON ({exc})") from None
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a list of prompts (strings or objects)")
    entries = []
    for i, item in enumerate(data, 1):
        where = f"{path}: entry {i}"
        if isinstance(item, str):
            entries.append((where, parse_prompt_line(item, where)))
        elif isinstance(item, dict):
            entries.append((where, item))
        else:
            raise UserError(f"{where}: expected a string or an object, not {type(item).__name__}")
    return entries


def _make_prompt(index: int, fields: dict, where: str) -> SamplePrompt:
    """Check and convert one entry's fields (strings from a .txt line, typed values from TOML/JSON)."""
    values = {}
    for key, raw in fields.items():
        if key in FOREIGN_FIELDS:
            logger.warning("%s: %s is for other model families; ignored", where, key)
            continue
        if key not in FIELDS:
            raise UserError(f"{where}: unknown key {key!r} (keys: {', '.join(FIELDS)})")
        values[key] = _convert(key, raw, where)
    if "prompt" not in values:
        raise UserError(f"{where}: no prompt")
    if values.get("sample_sampler") is not None:
        values["sample_sampler"] = check_sampler(values["sample_sampler"], where)
    return SamplePrompt(index=index, **values)


def _convert(key: str, raw, where: str):
    kind = FIELDS[key]
    if kind is str:
        if not isinstance(raw, str):
            raise UserError(f"{where}: {key} must be a string, not {raw!r}")
        return raw
    try:
        if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
            raise ValueError
        value = kind(raw) if isinstance(raw, str) or kind is float else raw
        if kind is int and not isinstance(value, int):
            raise ValueError
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise UserError(f"{where}: {key} must be {what}, not {raw!r}") from None
    low = {"width": 1, "height": 1, "sample_steps": 1, "seed": 0}.get(key)
    if low is not None and value < low:
        raise UserError(f"{where}: {key} must be at least {low}, not {value}")
    if key == "sample_steps" and value > MAX_SAMPLE_STEPS:
        raise UserError(f"{where}: sample_steps must be at most {MAX_SAMPLE_STEPS}, not {value}")
    return value


# --- samplers ------------------------------------------------------------------------------------

def check_sampler(name: str, where: str = "--sample_sampler") -> str:
    """A kohya sampler name, lower-cased; UserError for an unknown one or a missing optional package."""
    key = name.strip().lower()
    if key not in SAMPLERS:
        raise UserError(f"{where}: unknown sampler {name!r} (samplers: {', '.join(SAMPLERS)})")
    if SAMPLERS[key][0] == "LMSDiscreteScheduler":
        try:
            import scipy  # noqa: F401 - diffusers' LMS scheduler integrates its coefficients with scipy
        except ImportError:
            raise UserError(f"{where}: sampler {key} needs the scipy package: pip install scipy") from None
    return key


def make_scheduler(name: str, train_scheduler, v_prediction: bool):
    """The diffusers scheduler for a kohya sampler name, built from the training scheduler's config (its
    betas and timesteps), with v-prediction kept."""
    import diffusers

    class_name, extra = SAMPLERS[check_sampler(name)]
    cls = getattr(diffusers, class_name)
    accepted = inspect.signature(cls.__init__).parameters
    overrides = {k: v for k, v in {**INFERENCE_CONFIG, **extra}.items() if k in accepted}
    overrides["prediction_type"] = "v_prediction" if v_prediction else "epsilon"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # diffusers deprecates plain "dpmsolver"; kohya offers it
        return cls.from_config(train_scheduler.config, **overrides)


# --- schedule, names, images -----------------------------------------------------------------------

def wanted(cfg) -> bool:
    """Whether this run makes sample images at all (the VAE must then stay after latent caching)."""
    every = cfg.sample_at_first or cfg.sample_every_n_steps or cfg.sample_every_n_epochs
    return bool(cfg.sample_prompts and every)


def due_on_step(cfg, step: int) -> bool:
    """kohya: every N steps, unless --sample_every_n_epochs is set (it wins)."""
    n = cfg.sample_every_n_steps
    return bool(n) and not cfg.sample_every_n_epochs and step % n == 0


def due_on_epoch(cfg, epoch: int) -> bool:
    n = cfg.sample_every_n_epochs
    return bool(n) and epoch % n == 0


def round_prefix(output_name: str | None, epoch: int | None, steps: int) -> str:
    """`{output_name}_` then `e{epoch:06d}` for rounds at epoch ends (and at first: epoch 0) or `{steps:06d}`."""
    prefix = f"{output_name}_" if output_name else ""
    return prefix + (f"e{epoch:06d}" if epoch is not None else f"{steps:06d}")


def image_name(output_name: str | None, epoch: int | None, steps: int, index: int, timestamp: str,
               seed: int | None, suffix: str = "") -> str:
    """kohya's sample file name `{round_prefix}_{index:02d}_{timestamp}[_{seed}].png` (the seed only when the
    prompt gives one); `suffix` (`_ema`) marks images made with averaged weights."""
    seed_part = f"_{seed}" if seed is not None else ""
    return f"{round_prefix(output_name, epoch, steps)}_{index:02d}_{timestamp}{seed_part}{suffix}.png"


def black_reason(latents: torch.Tensor, pixels: torch.Tensor) -> str | None:
    """Why a sample is unusable, from its latents and its decoded pixels (VAE output, [-1, 1]); None when fine.

    NaN latents come from the UNet (diverged weights); NaN or all-black pixels from finite latents are the
    classic sign of a float16 VAE overflowing (seed 000: set the VAE to float32 or bfloat16)."""
    if not torch.isfinite(latents).all():
        return ("the UNet gave NaN/inf latents: the trained weights may have diverged (lower the learning "
                "rate; prefer --mixed_precision bf16 to fp16)")
    if not torch.isfinite(pixels).all():
        return f"the VAE decoded NaN/inf values: {VAE_FIX}"
    if _to_uint8(pixels).max() == 0:
        return f"it is all black: {VAE_FIX}"
    return None


VAE_FIX = "a float16 VAE overflows: keep the VAE in float32 (--no_half_vae) or load a bfloat16 one"


def to_image(pixels: torch.Tensor):
    """(3, H, W) VAE output in [-1, 1] -> an RGB PIL image (NaN shown as black)."""
    from PIL import Image

    return Image.fromarray(_to_uint8(torch.nan_to_num(pixels, nan=-1.0)).permute(1, 2, 0).cpu().numpy())


def _to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    return ((pixels.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)


def make_grid(images: list):
    """The round's images in rows of ceil(sqrt(n)), each in a cell as large as the largest image."""
    from PIL import Image

    columns = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    cell_w, cell_h = max(im.width for im in images), max(im.height for im in images)
    grid = Image.new("RGB", (columns * cell_w, rows * cell_h))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * cell_w, (i // columns) * cell_h))
    return grid


def snap(size: int, divisor: int) -> int:
    """Round a requested side down to what the UNet takes (at least one divisor), as kohya does."""
    return max(divisor, size - size % divisor)


@contextlib.contextmanager
def preserved_rng():
    """Put back Python's, numpy's and torch's (CPU and CUDA) random states on exit."""
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
              torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if states[3] is not None:
            torch.cuda.set_rng_state_all(states[3])


def _save_png(path: str, image) -> None:
    """PNG through the atomic writer: an interrupted round never leaves half an image."""
    from library.saving import _atomic_write

    _atomic_write(path, lambda tmp_path: image.save(tmp_path, format="PNG"))


# --- a round of samples ----------------------------------------------------------------------------

class Sampler:
    """A run's sample prompts, and one round of images made from the run's live (trained) models."""

    def __init__(self, cfg, prompts: list[SamplePrompt]):
        self.cfg, self.prompts = cfg, prompts

    @classmethod
    def from_config(cls, cfg) -> "Sampler | None":
        """Check the --sample_* options and read the prompt file (a bad one stops the run before any
        step); None when the run makes no samples."""
        for name in ("sample_every_n_steps", "sample_every_n_epochs"):
            value = getattr(cfg, name)
            if value is not None and value < 1:
                raise UserError(f"--{name} {value}: must be at least 1")
        check_sampler(cfg.sample_sampler)
        if not cfg.sample_prompts:
            if cfg.sample_at_first or cfg.sample_every_n_steps or cfg.sample_every_n_epochs:
                logger.warning("no --sample_prompts file: no sample images are made")
            return None
        prompts = load_prompts(cfg.sample_prompts)
        if not wanted(cfg):
            logger.warning("--sample_prompts without --sample_every_n_steps, --sample_every_n_epochs or "
                           "--sample_at_first: no sample images are made")
            return None
        if cfg.sample_every_n_steps and cfg.sample_every_n_epochs:
            logger.warning("--sample_every_n_epochs wins: --sample_every_n_steps is ignored (as in kohya)")
        return cls(cfg, prompts)

    def round(self, run, epoch: int | None, steps: int) -> None:
        """Make, save and log every prompt's image (epoch None: a round on a step count)."""
        acc = run.accelerator
        if acc.is_main_process:  # nothing in a UNet forward talks to other processes
            logger.info("sample images at step %d", steps)
            timestamp = time.strftime("%Y%m%d%H%M%S")
            with preserved_rng(), torch.no_grad(), _sampling_mode(run):
                pipe = run.family.pipeline(make_scheduler(self.cfg.sample_sampler, run.family.noise_scheduler,
                                                          run.family.v_prediction))
                for suffix, weights in _variants(run):
                    with weights():
                        images = [self._generate(run, pipe, prompt) for prompt in self.prompts]
                    self._save(run, images, epoch, steps, timestamp, suffix)
        acc.wait_for_everyone()

    def _generate(self, run, pipe, prompt: SamplePrompt):
        fam, acc = run.family, run.accelerator
        pipe.scheduler = make_scheduler(prompt.sample_sampler or self.cfg.sample_sampler, fam.noise_scheduler,
                                        fam.v_prediction)
        width = snap(prompt.width or fam.resolution_default, fam.bucket_divisor)
        height = snap(prompt.height or fam.resolution_default, fam.bucket_divisor)
        generator = torch.Generator(acc.device).manual_seed(self.seed_of(prompt))
        with acc.autocast():
            text = fam.prompt_embeds(prompt.prompt, prompt.negative_prompt)
            latents = pipe(**text, width=width, height=height, num_inference_steps=prompt.sample_steps,
                           guidance_scale=prompt.scale, generator=generator, output_type="latent").images
        pixels = fam.decode_latents(latents)[0]  # outside autocast: the VAE runs in its own dtype
        reason = black_reason(latents, pixels)
        if reason:
            logger.warning("sample %02d (%s) is unusable, %s", prompt.index, prompt.prompt[:40], reason)
        return to_image(pixels)

    def seed_of(self, prompt: SamplePrompt) -> int:
        """The prompt's --d; without one, --seed plus the prompt's number: every round then starts from the
        same noise, so the rounds show what training changed (kohya draws a new random seed each time)."""
        return prompt.seed if prompt.seed is not None else (self.cfg.seed or 0) + prompt.index

    def _save(self, run, images: list, epoch: int | None, steps: int, timestamp: str, suffix: str) -> None:
        cfg = self.cfg
        folder = os.path.join(cfg.output_dir, "sample")
        for prompt, image in zip(self.prompts, images):
            name = image_name(cfg.output_name, epoch, steps, prompt.index, timestamp, prompt.seed, suffix)
            _save_png(os.path.join(folder, name), image)
        grid = f"{round_prefix(cfg.output_name, epoch, steps)}_grid_{timestamp}{suffix}.png"
        _save_png(os.path.join(folder, grid), make_grid(images))
        for tracker in run.accelerator.trackers:
            writer = getattr(tracker, "writer", None)
            if tracker.name == "tensorboard" and writer is not None:
                for prompt, image in zip(self.prompts, images):
                    writer.add_image(f"samples/{prompt.index:02d}{suffix}", np.asarray(image), global_step=steps,
                                     dataformats="HWC")


def _variants(run) -> list:
    """(file-name suffix, context) per set of weights to sample with: the trained weights, and/or the EMA
    weights when --ema is on (--ema_sample raw | ema | both)."""
    ema = getattr(run, "ema", None)
    if ema is None:
        return [("", contextlib.nullcontext)]
    mode = getattr(run.cfg, "ema_sample", None) or "ema"
    raw, averaged = ("", contextlib.nullcontext), ("_ema", ema.applied)
    return {"raw": [raw], "ema": [averaged], "both": [raw, averaged]}[mode]


@contextlib.contextmanager
def _sampling_mode(run):
    """Inference settings for one round, undone afterwards: a schedule-free optimizer's averaged weights,
    no dropout, network multiplier 1, the VAE on the accelerator."""
    fam = run.family
    modules = [run.network, fam.unet, *fam.text_encoders]
    modes = [module.training for module in modules]
    vae_device = next(fam.vae.parameters()).device
    optim.eval_mode(run.optimizer)
    for module in modules:
        module.eval()
    run.method.set_multiplier(1.0)
    fam.vae.to(run.accelerator.device)
    try:
        yield
    finally:
        fam.vae.to(vae_device)
        for module, mode in zip(modules, modes):
            module.train(mode)
        optim.train_mode(run.optimizer)
