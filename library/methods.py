"""What is trained: a network (LoRA & co.), later an embedding or the full model.

A method decides which parameters train, with which learning rates, and how they are saved.
The training loop only talks to this small interface, so a new method is one new class here and
one line in `METHODS`.
"""

from __future__ import annotations

import logging

import torch

from library.config import text_encoder_lr
from library.errors import UserError
from networks.base import load_network_module, parse_network_args

logger = logging.getLogger(__name__)


class NetworkMethod:
    """A kohya network plug-in (`--network_module`) patched into the UNet and text encoder(s)."""

    name = "network"

    def __init__(self, cfg, family):
        self.cfg = cfg
        self.family = family
        self.train_unet = not cfg.network_train_text_encoder_only
        self.train_text_encoder = not cfg.network_train_unet_only
        module = load_network_module(cfg.network_module)
        kwargs = parse_network_args(cfg.network_args)
        # kohya hands SD1/SD2 networks the encoder itself and SDXL networks the list of both.
        encoders = family.text_encoders
        text_encoder = encoders[0] if len(encoders) == 1 else encoders
        self.network = module.create_network(
            1.0, cfg.network_dim, cfg.network_alpha, family.vae, text_encoder, family.unet,
            neuron_dropout=cfg.network_dropout, **kwargs,
        )
        if self.network is None:
            raise UserError(f"--network_module {cfg.network_module}: create_network returned nothing")
        self.network.apply_to(text_encoder, family.unet, self.train_text_encoder, self.train_unet)
        if cfg.network_weights:
            info = self.network.load_weights(cfg.network_weights)
            logger.info("loaded network weights from %s: %s", cfg.network_weights, info)
        self._text_encoder = text_encoder
        self._multiplier = 1.0

    def param_groups(self) -> tuple[list, list[str]]:
        """Optimizer parameter groups and a name for each (used to label learning rates in logs)."""
        cfg = self.cfg
        te_lr = text_encoder_lr(cfg.text_encoder_lr, len(self.family.text_encoders))
        result = self.network.prepare_optimizer_params(te_lr, cfg.unet_lr, cfg.learning_rate)
        groups, names = result if isinstance(result, tuple) else (result, None)
        if names is None or len(names) != len(groups):
            names = self._default_group_names(len(groups))
        if not any(p.requires_grad for g in groups for p in g["params"]):
            raise UserError(f"--network_module {cfg.network_module}: no trainable parameters")
        return groups, names

    def _default_group_names(self, count: int) -> list[str]:
        # kohya's order: text encoder group first, then the UNet.
        parts = (["textencoder"] if self.train_text_encoder else []) + (["unet"] if self.train_unet else [])
        return parts if len(parts) == count else [f"group{i}" for i in range(count)]

    @property
    def module(self) -> torch.nn.Module:
        return self.network

    def on_epoch_start(self) -> None:
        self.network.on_epoch_start(self._text_encoder, self.family.unet)

    def prepare_grad(self) -> None:
        self.network.prepare_grad_etc(self._text_encoder, self.family.unet)

    def enable_gradient_checkpointing(self) -> None:
        self.network.enable_gradient_checkpointing()

    def set_multiplier(self, multiplier: float) -> None:
        """The network's strength for the next batch (a dataset's network_multiplier); 1.0 as trained."""
        if multiplier != self._multiplier:
            self.network.set_multiplier(multiplier)
            self._multiplier = multiplier

    def save(self, path: str, dtype: torch.dtype | None, metadata: dict | None) -> None:
        self.network.save_weights(path, dtype, metadata)


METHODS = {"network": NetworkMethod}
