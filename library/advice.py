"""Rules of thumb from the users' guides (the project's seed documents), checked once before training.

Each rule is a small function of the resolved options and a few facts about the run; it returns the
warnings it has (an empty list when the setup looks fine). Nothing here changes the run: a user who
knows better keeps their settings and reads one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from library import optim


@dataclass(frozen=True)
class Bucket:
    """One bucket of one dataset: its size, its images per epoch (repeats included) and that dataset's batch."""

    size: tuple[int, int]
    images: int
    batch_size: int


@dataclass(frozen=True)
class RunFacts:
    """What the rules need beyond the options."""

    group_lrs: dict  # parameter group name -> learning rate (None where the optimizer sets its own)
    buckets: tuple = ()  # Bucket rows
    family: str = ""  # model family name ("sd1", "sd2", "sdxl", ...)


def buckets_of(dataset) -> tuple[Bucket, ...]:
    """The buckets of a TrainDataset, or of each dataset of a --dataset_config group."""
    parts = getattr(dataset, "datasets", None) or [dataset]
    return tuple(Bucket(size, count, part.batch_size) for part in parts for size, count in part.bucket_counts().items())


def _adaptive_rate(cfg, facts: RunFacts) -> list[str]:
    """Prodigy / D-Adaptation estimate the step size themselves and scale it by the learning rate, which
    the guides (and kohya) want at about 1 for every group: anything else silently rescales the run."""
    row = optim.optimizer_row(cfg)
    if not row.adaptive:
        return []
    lrs = {name: lr for name, lr in facts.group_lrs.items() if lr is not None}
    warnings = []
    off = {name: lr for name, lr in lrs.items() if not 0.5 <= lr <= 2}
    if off:
        listed = ", ".join(f"{name} {lr:g}" for name, lr in off.items())
        warnings.append(f"{row.name} picks its own step size and expects learning rates of about 1 ({listed}); "
                        "tune its d_coef optimizer argument instead")
    if len(set(lrs.values())) > 1:
        listed = ", ".join(f"{name} {lr:g}" for name, lr in lrs.items())
        warnings.append(f"{row.name} with different learning rates per group ({listed}): it estimates one step size "
                        "for all of them, and the guides use the same rate (1) for the text encoder and the U-Net")
    return warnings


def _alpha_above_dim(cfg, facts: RunFacts) -> list[str]:
    """alpha / dim scales every update of a LoRA; above 1 it amplifies them, and the guides keep alpha <= dim."""
    if not getattr(cfg, "network_module", None):
        return []
    args = optim.parse_kv_args(cfg.network_args, "network_args")
    pairs = [("network_alpha", cfg.network_alpha, "network_dim", cfg.network_dim or 4),
             ("conv_alpha", args.get("conv_alpha"), "conv_dim", args.get("conv_dim"))]
    return [f"--{alpha_name} {alpha:g} is above --{dim_name} {dim}: updates are scaled by {alpha / dim:g} "
            "(x alpha/dim); alpha is normally at most the rank (equal, or half of it)"
            for alpha_name, alpha, dim_name, dim in pairs
            if isinstance(alpha, (int, float)) and isinstance(dim, (int, float)) and dim > 0 and alpha > dim]


def _warmup(cfg, facts: RunFacts) -> list[str]:
    """REX is meant to start at the peak; adaptive optimizers measure the first steps to set their step
    size, and a warmup distorts that (Prodigy's safeguard_warmup=True is its answer)."""
    if not cfg.lr_warmup_steps:
        return []
    warnings = []
    if (cfg.lr_scheduler or "").lower() == "rex":
        warnings.append("--lr_scheduler rex with a warmup: REX is meant to start at the peak rate; "
                        "set --lr_warmup_steps 0")
    row = optim.optimizer_row(cfg)
    args = optim.parse_kv_args(cfg.optimizer_args, "optimizer_args")
    if row.adaptive and not args.get("safeguard_warmup"):
        hint = "pass safeguard_warmup=True in --optimizer_args" if row.name == "Prodigy" else "drop the warmup"
        warnings.append(f"{row.name} with a warmup: its step-size estimate grows from the small first steps; {hint}")
    return warnings


def _schedule_free(cfg, facts: RunFacts) -> list[str]:
    """Schedule-free optimizers replace the schedule (kohya ignores one given too)."""
    if not optim.optimizer_row(cfg).schedule_free:
        return []
    ignored = [f"--{name} {getattr(cfg, name)}" for name in ("lr_scheduler", "lr_warmup_steps")
               if getattr(cfg, name) and getattr(cfg, name) != "constant"]
    if not ignored:
        return []
    return [f"{optim.optimizer_row(cfg).name} runs without a schedule, so {' and '.join(ignored)} are ignored; "
            "its own warmup is the warmup_steps optimizer argument"]


def _small_buckets(cfg, facts: RunFacts) -> list[str]:
    """A bucket smaller than batch x accumulation cannot fill one optimizer step: its images train in
    smaller batches than the user set (the guides: keep batch x accumulation at most the image count)."""
    accumulation = cfg.gradient_accumulation_steps or 1
    small = [b for b in facts.buckets if b.images < b.batch_size * accumulation]
    if not small:
        return []
    listed = ", ".join(f"{b.size[0]}x{b.size[1]} ({b.images})" for b in small[:6]) + (" ..." if len(small) > 6 else "")
    effective = max(b.batch_size for b in small) * accumulation
    return [f"{len(small)} bucket(s) hold fewer images (repeats included) than the batch x accumulation of "
            f"{effective}: {listed}; those images train in smaller batches (add images of those shapes, or lower "
            "--train_batch_size / --gradient_accumulation_steps)"]


def _fp16(cfg, facts: RunFacts) -> list[str]:
    """fp16 overflows where bf16 does not: SDXL's VAE gives NaN latents (black samples), and fp16 gradients
    (--full_fp16) turn the loss NaN easily."""
    if cfg.mixed_precision != "fp16":
        return []
    warnings = []
    if facts.family == "sdxl" and not getattr(cfg, "no_half_vae", False):
        warnings.append("SDXL's VAE overflows in fp16 (NaN latents, black samples): add --no_half_vae, or use a VAE "
                        "fixed for fp16 with --vae")
    if getattr(cfg, "full_fp16", False):
        warnings.append("--full_fp16 keeps gradients in fp16, where the loss turns NaN easily: prefer "
                        "--mixed_precision bf16 --full_bf16 on GPUs that have bf16")
    return warnings


def _ignored_schedule_options(cfg, facts: RunFacts) -> list[str]:
    """Options a schedule does not read are silently ignored by kohya; say so."""
    name = (cfg.lr_scheduler or "constant").lower()
    if cfg.lr_decay_steps and name != "warmup_stable_decay" and not cfg.lr_scheduler_type:
        return [f"--lr_decay_steps is read by --lr_scheduler warmup_stable_decay only; {name} ignores it"]
    return []


def _fused_clipping(cfg, facts: RunFacts) -> list[str]:
    """With --fused_backward_pass no step ever sees all the gradients, so --max_grad_norm (default 1) clips
    each tensor by its own norm, as kohya does: a different, weaker rule than the global norm it names."""
    if not getattr(cfg, "fused_backward_pass", False) or not cfg.max_grad_norm:
        return []
    return [f"--fused_backward_pass clips each tensor's gradient to --max_grad_norm {cfg.max_grad_norm:g} on its own, "
            "as kohya does (the norm over all of them is never known); --max_grad_norm 0 turns clipping off"]


RULES: tuple[Callable, ...] = (_adaptive_rate, _alpha_above_dim, _warmup, _schedule_free, _small_buckets, _fp16,
                               _ignored_schedule_options, _fused_clipping)


def rule_of_thumb_warnings(cfg, facts: RunFacts) -> list[str]:
    """Every rule's warnings, in a fixed order."""
    return [line for rule in RULES for line in rule(cfg, facts)]
