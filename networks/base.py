"""kohya's network plug-in protocol, and how a `--network_module` is found and configured.

A network module is any importable Python module (``networks.lora``, ``networks.dylora``,
``lycoris.kohya`` from the lycoris-lora package, a user's own file on ``sys.path``) that offers the
two factory functions of :class:`NetworkModule`. The objects they return follow :class:`Network`.

What the trainer calls, and when (library/methods.py):

0. With ``--base_weights``: for each file, ``module.create_network_from_weights(multiplier, file, vae,
   text_encoder, unet, for_inference=True)``, then ``is_mergeable()`` and ``merge_to(text_encoder, unet,
   weights_sd, dtype, "cpu")``: the files are baked into the base models before anything else.
1. ``module.create_network(multiplier, dim, alpha, vae, text_encoder, unet, neuron_dropout, **kwargs)``
   builds the network from ``--network_dim``, ``--network_alpha``, ``--network_dropout`` and the
   parsed ``--network_args`` (``kwargs`` values are the raw strings). With ``--dim_from_weights``
   the trainer calls ``create_network_from_weights(1.0, network_weights, vae, text_encoder, unet,
   **kwargs)`` instead, which reads dims and alphas from the file.
2. ``network.apply_to(text_encoder, unet, apply_text_encoder, apply_unet)`` hooks the network into
   the models; ``--network_train_unet_only`` / ``--network_train_text_encoder_only`` pick the halves.
3. ``network.load_weights(file)`` when ``--network_weights`` is given.
4. ``network.prepare_optimizer_params(text_encoder_lr, unet_lr, default_lr)`` gives the optimizer's
   parameter groups and a description per group (used as the learning-rate log names).
5. ``network.enable_gradient_checkpointing()`` when ``--gradient_checkpointing``;
   ``network.prepare_grad_etc(text_encoder, unet)`` before the loop.
6. Each epoch: ``network.on_epoch_start(text_encoder, unet)``, then ``network.train()``.
7. After each optimizer step, with ``--scale_weight_norms``: ``network.apply_max_norm_regularization(
   max_norm, device)`` -> (layers scaled, mean norm, max norm), logged as ``max_norm/*``. A network
   without it is refused when the option is given.
8. With ``--text_encoder_train_epochs N``, after epoch N: every parameter of ``network.text_encoder_loras``
   gets ``requires_grad_(False)``, so optimizers skip it (a network without that list is refused).
9. Saving: ``network.save_weights(file, dtype, metadata)``; ``dtype`` is the ``--save_precision``
   dtype (None keeps the training dtype), ``metadata`` the ``ss_*`` / ``modelspec.*`` strings.

Merging tools use ``create_network_from_weights(..., for_inference=True)`` followed by
``is_mergeable()`` and ``merge_to(text_encoder, unet, weights_sd, dtype, device)``, as in step 0.
``text_encoder`` is one model, or a list of models for families with two text encoders (SDXL).
"""

from __future__ import annotations

import difflib
import importlib
from types import ModuleType
from typing import Any, Iterable, Protocol, runtime_checkable

import torch

from library.errors import UserError


@runtime_checkable
class Network(Protocol):
    """What a network object returned by a plug-in must offer."""

    def apply_to(self, text_encoder, unet, apply_text_encoder: bool = True, apply_unet: bool = True) -> None:
        """Hook the network into the models so that their forward passes include it."""

    def prepare_optimizer_params(self, text_encoder_lr, unet_lr, default_lr) -> tuple[list[dict], list[str]]:
        """Parameter groups for the optimizer (a None lr falls back to `default_lr`) and their names."""

    def load_weights(self, file: str) -> Any:
        """Load saved weights into the applied network."""

    def save_weights(self, file: str, dtype: torch.dtype | None, metadata: dict[str, str] | None) -> None:
        """Write the network's weights (cast to `dtype` when given) with `metadata`."""

    def prepare_grad_etc(self, text_encoder, unet) -> None:
        """Make the network's own parameters trainable before the loop starts."""

    def on_epoch_start(self, text_encoder, unet) -> None:
        """Called at the start of every epoch; switches the network to training mode."""

    def get_trainable_params(self) -> Iterable[torch.nn.Parameter]:
        """The parameters to clip gradients of and to save in training state."""

    def enable_gradient_checkpointing(self) -> None:
        """Called when the models use gradient checkpointing (may do nothing)."""

    def set_multiplier(self, multiplier: float) -> None:
        """Scale the network's effect on the models' outputs (1.0 = as trained)."""


class NetworkModule(Protocol):
    """What an importable `--network_module` must offer."""

    def create_network(self, multiplier, network_dim, network_alpha, vae, text_encoder, unet,
                       neuron_dropout=None, **kwargs) -> Network:
        """A fresh network from dims, alphas and the parsed `--network_args` strings."""

    def create_network_from_weights(self, multiplier, file, vae, text_encoder, unet, weights_sd=None,
                                    for_inference=False, **kwargs) -> tuple[Network, dict]:
        """A network shaped after a saved file (or `weights_sd`), and the state dict it read."""


def load_network_module(name: str) -> ModuleType:
    """Import the `--network_module` named `name`; a UserError when it is missing or not a network module."""
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        # Only the module itself (or a parent package) missing is the user's problem; a missing
        # dependency *inside* an installed plug-in is reported the same way, naming what is missing.
        hint = " (pip install lycoris-lora?)" if name.split(".")[0] == "lycoris" else ""
        missing = f" ({exc.name} is missing)" if exc.name and not name.startswith(exc.name) else ""
        raise UserError(f"--network_module {name}: module not found{hint or missing}") from None
    if module.__name__.split(".")[0] == "lycoris":
        from networks import lycoris_compat

        module = lycoris_compat.adapt(module)
    if not callable(getattr(module, "create_network", None)):
        raise UserError(f"--network_module {name}: the module has no create_network function; "
                        "give a kohya-style network module such as networks.lora")
    return module


def parse_network_args(items: list[str] | None) -> dict[str, str]:
    """`--network_args "k=v" ...` as a dict of strings (values may contain '='); a malformed item is a UserError."""
    parsed: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise UserError(f"--network_args: {item!r} is not of the form key=value (e.g. conv_dim=4)")
        parsed[key] = value
    return parsed


def check_network_args(kwargs: dict[str, str], known: Iterable[str], unbuilt: Iterable[str] = ()) -> None:
    """UserError for a network_args key this module does not know (with a suggestion and the list of
    valid keys) or has not built yet."""
    known, unbuilt = list(known), set(unbuilt)
    for key in kwargs:
        if key in unbuilt:
            raise UserError(f"not supported yet: --network_args {key}")
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise UserError(f"--network_args: unknown key {key!r}{hint}; valid keys: {', '.join(known)}")


def arg_number(kwargs: dict[str, Any], key: str, kind: type, default=None):
    """`kwargs[key]` converted with `kind` (int or float), `default` when absent; UserError naming the key."""
    value = kwargs.get(key)
    if value is None or value == "" or (isinstance(value, str) and value.lower() == "none"):
        return default
    try:
        return kind(value)
    except (TypeError, ValueError):
        expected = "an integer" if kind is int else "a number"
        raise UserError(f"--network_args {key}={value}: expected {expected}") from None
