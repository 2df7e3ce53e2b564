"""EMA: an exponential moving average of the trained weights (--ema), for samples and saved files.

After n updates the average moves towards the live weights with decay

    d_n = min(ema_decay, (1 + n) / (10 + n)),    average <- d_n * average + (1 - d_n) * weights

the warm-up diffusers' EMAModel and OneTrainer use too: without it a LoRA's average would stay near its
initial (zero) up-weights for thousands of steps. The average is kept in float32 on the training device or,
with --ema_device cpu, in main memory. Neither diffusers' EMAModel (no update interval; average and
weights must share a device) nor torch's AveragedModel (a deep copy of the module, which for a network
patched into a UNet drags the UNet along) fits, hence this small class.
"""

from __future__ import annotations

import contextlib
import json
import logging
from typing import Iterable, Iterator

import torch

logger = logging.getLogger(__name__)


class EMA:
    """The moving average of some named parameters; `step` after each optimizer step, `applied` to use it."""

    def __init__(self, named_parameters: Iterable[tuple[str, torch.nn.Parameter]], decay: float,
                 interval: int = 1, device: str | torch.device | None = None):
        self.parameters = dict(named_parameters)
        self.decay = decay
        self.interval = interval
        self.averages = {name: p.detach().to(device or p.device, torch.float32, copy=True)
                         for name, p in self.parameters.items()}
        self.updates = 0

    def current_decay(self) -> float:
        """The decay of the next update (see the module docstring)."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def step(self, global_step: int) -> bool:
        """Update after optimizer step `global_step` (1-based) when it falls on the interval; True if it did."""
        if global_step % self.interval:
            return False
        weight = 1.0 - self.current_decay()
        for name, param in self.parameters.items():
            average = self.averages[name]
            average.lerp_(param.detach().to(average.device, torch.float32), weight)
        self.updates += 1
        return True

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Within the block the parameters hold the averaged weights; the trained ones come back after it."""
        raw = {name: p.detach().clone() for name, p in self.parameters.items()}
        try:
            with torch.no_grad():
                for name, param in self.parameters.items():
                    param.copy_(self.averages[name])
            yield
        finally:
            with torch.no_grad():
                for name, param in self.parameters.items():
                    param.copy_(raw[name])

    def metadata(self) -> dict[str, str]:
        """What a saved averaged file records about the average."""
        return {"sdtune_ema": json.dumps({"decay": self.decay, "update_interval": self.interval,
                                          "updates": self.updates})}

    def save(self, path: str) -> None:
        """The averages and the update count, for a training state (atomic safetensors)."""
        from library.saving import save_safetensors

        save_safetensors(self.averages, path, {"updates": str(self.updates)})

    def load(self, path: str) -> None:
        """Continue from a saved average; a parameter missing from the file is a UserError."""
        from safetensors import safe_open

        from library.errors import UserError

        with safe_open(path, framework="pt", device="cpu") as handle:
            missing = sorted(set(self.averages) - set(handle.keys()))
            if missing:
                raise UserError(f"{path}: the saved EMA lacks {missing[0]} (and {len(missing) - 1} more): "
                                "was the state written for another network?")
            for name, average in self.averages.items():
                average.copy_(handle.get_tensor(name))
            self.updates = int((handle.metadata() or {}).get("updates", 0))


def build_ema(cfg, network: torch.nn.Module) -> EMA | None:
    """The EMA of `network`'s trainable parameters when --ema is on, else None."""
    if not getattr(cfg, "ema", False):
        return None
    named = [(name, p) for name, p in network.named_parameters() if p.requires_grad]
    device = "cpu" if cfg.ema_device == "cpu" else None
    ema = EMA(named, cfg.ema_decay, cfg.ema_update_interval, device)
    logger.info("EMA of %d tensors, decay %s every %d step(s), on %s", len(named), cfg.ema_decay,
                cfg.ema_update_interval, "cpu" if device else "the training device")
    return ema
