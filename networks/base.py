"""kohya's network plug-in protocol, and the one adapter through which sdtune talks to a plug-in.

A network module is any importable Python module (``networks.lora``, ``networks.dylora``,
``lycoris.kohya`` from the lycoris-lora package, a user's own file on ``sys.path``). It must define two
factory functions; the network object they return must be a ``torch.nn.Module`` with four methods.
Everything else is optional: :class:`PluginNetwork` supplies a default when a hook is missing, so no
other part of sdtune asks a plug-in what it has.

Required of the module:

- ``create_network(multiplier, network_dim, network_alpha, vae, text_encoder, unet, neuron_dropout=None,
  **kwargs)`` -> network: a fresh network; ``kwargs`` are the ``--network_args`` as strings.
- ``create_network_from_weights(multiplier, file, vae, text_encoder, unet, weights_sd=None,
  for_inference=False, **kwargs)`` -> (network, state dict): a network shaped after a saved file
  (``--dim_from_weights``, ``--base_weights``, tools).

Required of the network:

- ``apply_to(text_encoder, unet, apply_text_encoder, apply_unet)``: hook into the models.
- ``prepare_optimizer_params(text_encoder_lr, unet_lr, default_lr)`` -> (groups, descriptions), or a
  list of groups only (kohya's older form; a two-argument ``(text_encoder_lr, unet_lr)`` form is
  called with the learning rates already resolved).
- ``save_weights(file, dtype, metadata)`` and ``load_weights(file)``.

Optional hooks of the network, and what happens without them:

- ``prepare_network(args)``: called once after creation with the resolved options (nothing).
- ``prepare_optimizer_params_with_multiple_te_lrs(...)``: takes one learning rate per text encoder
  (SDXL); without it the first ``--text_encoder_lr`` is used, as kohya does.
- ``prepare_grad_etc(text_encoder, unet)`` (nothing), ``on_epoch_start(text_encoder, unet)``
  (``network.train()``), ``on_step_start(text_encoder, unet)`` (nothing),
  ``enable_gradient_checkpointing()`` (nothing), ``get_trainable_params()`` (all parameters).
- ``set_multiplier(multiplier)``: a dataset's ``network_multiplier`` other than 1 is ignored, with a warning.
- ``apply_max_norm_regularization(max_norm, device)`` -> (layers scaled, mean norm, max norm):
  ``--scale_weight_norms`` is refused at start without it.
- ``text_encoder_loras`` (a list of modules): ``--text_encoder_train_epochs`` is refused without it.
- ``merge_to(text_encoder, unet, weights_sd, dtype, device)`` and ``is_mergeable()``: ``--base_weights``
  and merging tools refuse a network without ``merge_to``.

When the trainer calls what (library/methods.py): ``--base_weights`` files are merged first
(``create_network_from_weights(..., for_inference=True)``, ``merge_to``); then ``create_network`` (or
``create_network_from_weights`` with ``--dim_from_weights``), ``prepare_network``, ``apply_to``,
``load_weights`` (``--network_weights``, after networks/detect.py has checked that the module can hold
the file), ``prepare_optimizer_params``, ``enable_gradient_checkpointing``, ``prepare_grad_etc``; each
epoch ``on_epoch_start``, each batch ``set_multiplier`` and ``on_step_start``, after each optimizer step
``apply_max_norm_regularization``; ``save_weights`` with the ``--save_precision`` dtype (None keeps
the training dtype) and the ``ss_*`` / ``modelspec.*`` metadata. ``text_encoder`` is one model, or a list
for families with two text encoders (SDXL).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import logging
from types import ModuleType
from typing import Any, Iterable

import torch

from library.errors import UserError

logger = logging.getLogger(__name__)

MODULE_FUNCTIONS = ("create_network", "create_network_from_weights")
NETWORK_METHODS = ("apply_to", "prepare_optimizer_params", "save_weights", "load_weights")
OPTIONAL_HOOKS = ("prepare_network", "prepare_optimizer_params_with_multiple_te_lrs", "prepare_grad_etc",
                  "on_epoch_start", "on_step_start", "enable_gradient_checkpointing", "get_trainable_params",
                  "set_multiplier", "apply_max_norm_regularization", "merge_to", "is_mergeable")


def _callable_attr(obj, name: str):
    """`obj.<name>` when it is callable, else None: the one place where a plug-in is asked what it has."""
    value = getattr(obj, name, None)
    return value if callable(value) else None


def _require(obj, names: Iterable[str], what: str) -> None:
    """UserError listing the required functions `obj` lacks (`what` names it in the message)."""
    missing = [name for name in names if _callable_attr(obj, name) is None]
    if missing:
        raise UserError(f"{what} has no {', '.join(missing)}; a network plug-in must offer "
                        f"{', '.join(names)} (see the README's network plug-in protocol)")


def load_network_module(name: str) -> ModuleType:
    """Import the `--network_module` named `name`; a UserError when it is missing or lacks a required factory."""
    try:
        module = importlib.import_module(name)
        if module.__name__.split(".")[0] == "lycoris":  # sdtune's side of lycoris.kohya, which imports it too
            from networks import lycoris_compat

            module = lycoris_compat.adapt(module)
    except ModuleNotFoundError as exc:
        # Only the module itself (or a parent package) missing is the user's problem; a missing
        # dependency *inside* an installed plug-in is reported the same way, naming what is missing.
        hint = " (pip install lycoris-lora?)" if name.split(".")[0] == "lycoris" else ""
        missing = f" ({exc.name} is missing)" if exc.name and not name.startswith(exc.name) else ""
        raise UserError(f"--network_module {name}: module not found{hint or missing}") from None
    _require(module, MODULE_FUNCTIONS, f"--network_module {name}: the module")
    return module


def load_plugin(name: str) -> PluginModule:
    """The `--network_module` named `name`, wrapped in the protocol's adapter."""
    return PluginModule(load_network_module(name), name)


class PluginModule:
    """A network module as sdtune uses it: its two factories, returning :class:`PluginNetwork` objects."""

    def __init__(self, module, name: str):
        _require(module, MODULE_FUNCTIONS, f"--network_module {name}: the module")
        self.name = name
        self._module = module

    def create_network(self, multiplier: float, network_dim, network_alpha, vae, text_encoder, unet,
                       neuron_dropout=None, **kwargs) -> PluginNetwork:
        """A fresh network from dims, alphas and the parsed `--network_args` strings."""
        network = self._module.create_network(multiplier, network_dim, network_alpha, vae, text_encoder, unet,
                                              neuron_dropout=neuron_dropout, **kwargs)
        return PluginNetwork(network, self.name, "create_network")

    def create_network_from_weights(self, multiplier: float, file, vae, text_encoder, unet, weights_sd=None,
                                    for_inference: bool = False, **kwargs) -> tuple[PluginNetwork, dict]:
        """A network shaped after `file` (or `weights_sd`) and the state dict it read. Keywords a plug-in
        may not know are passed only when set, as kohya's trainer does."""
        if weights_sd is not None:
            kwargs["weights_sd"] = weights_sd
        if for_inference:
            kwargs["for_inference"] = True
        result = self._module.create_network_from_weights(multiplier, file, vae, text_encoder, unet, **kwargs)
        if not (isinstance(result, tuple) and len(result) == 2):
            raise UserError(f"--network_module {self.name}: create_network_from_weights returned "
                            f"{type(result).__name__}, not (network, state dict)")
        network, state_dict = result
        return PluginNetwork(network, self.name, "create_network_from_weights"), state_dict


class PluginNetwork:
    """The network a plug-in built, behind the protocol: required methods are checked here, once, and
    every optional hook has its default. `module` is the plug-in's own torch module (what the optimizer,
    accelerate, EMA and state saving see)."""

    def __init__(self, network, source: str, factory: str = "create_network"):
        if network is None:
            raise UserError(f"--network_module {source}: {factory} returned None; it must return the network "
                            "to train (check its --network_args)")
        if not isinstance(network, torch.nn.Module):
            raise UserError(f"--network_module {source}: {factory} returned a {type(network).__name__}, "
                            "not a torch.nn.Module")
        _require(network, NETWORK_METHODS, f"--network_module {source}: its network ({type(network).__name__})")
        self.module = network
        self.source = source
        self._warned_multiplier = False

    def _hook(self, name: str):
        """The plug-in's optional hook `name`, or None. Looked up at each call: a plug-in may offer a hook
        only in some configurations (lycoris' max norm, for algorithms that have one)."""
        assert name in OPTIONAL_HOOKS, name
        return _callable_attr(self.module, name)

    # --- required -------------------------------------------------------------------------------

    def apply_to(self, text_encoder, unet, apply_text_encoder: bool = True, apply_unet: bool = True) -> None:
        """Hook the network into the models; the halves not applied are not trained."""
        self.module.apply_to(text_encoder, unet, apply_text_encoder, apply_unet)

    def load_weights(self, file: str):
        return self.module.load_weights(file)

    def save_weights(self, file: str, dtype: torch.dtype | None, metadata: dict[str, str] | None) -> None:
        self.module.save_weights(file, dtype, metadata)

    def prepare_optimizer_params(self, text_encoder_lr, unet_lr, default_lr) -> tuple[list[dict], list[str] | None]:
        """Parameter groups (each a dict whose "params" is a list) and their names, or None for the names
        when the plug-in gives none. `text_encoder_lr` may be a list, one per text encoder."""
        several = self._hook("prepare_optimizer_params_with_multiple_te_lrs")
        if isinstance(text_encoder_lr, (list, tuple)):
            if several is not None:
                return optimizer_groups(several(text_encoder_lr, unet_lr, default_lr), self.source)
            text_encoder_lr = text_encoder_lr[0] if text_encoder_lr else None  # kohya's rule for such networks
        prepare = self.module.prepare_optimizer_params
        if _positional_count(prepare) >= 3:
            result = prepare(text_encoder_lr, unet_lr, default_lr)
        else:  # kohya's older two-argument form has no default to fall back on: resolve it here
            result = prepare(default_lr if text_encoder_lr is None else text_encoder_lr,
                             default_lr if unet_lr is None else unet_lr)
        return optimizer_groups(result, self.source)

    # --- optional, with defaults ----------------------------------------------------------------

    def prepare_network(self, args) -> None:
        """kohya's hook to read the run's options (sdtune passes its resolved config); default: nothing."""
        if (hook := self._hook("prepare_network")) is not None:
            hook(args)

    def prepare_grad_etc(self, text_encoder, unet) -> None:
        """Before the loop; default: nothing (a fresh module's parameters already require gradients)."""
        if (hook := self._hook("prepare_grad_etc")) is not None:
            hook(text_encoder, unet)

    def on_epoch_start(self, text_encoder, unet) -> None:
        """At each epoch's start; default: training mode, which kohya's networks set here."""
        if (hook := self._hook("on_epoch_start")) is not None:
            hook(text_encoder, unet)
        else:
            self.module.train()

    def on_step_start(self, text_encoder, unet) -> None:
        """Before each batch; default: nothing."""
        if (hook := self._hook("on_step_start")) is not None:
            hook(text_encoder, unet)

    def enable_gradient_checkpointing(self) -> None:
        """With --gradient_checkpointing; default: nothing (the models checkpoint their own blocks)."""
        if (hook := self._hook("enable_gradient_checkpointing")) is not None:
            hook()

    def get_trainable_params(self) -> list[torch.nn.Parameter]:
        """The parameters to clip; default: all of the network's."""
        hook = self._hook("get_trainable_params")
        return list(hook() if hook is not None else self.module.parameters())

    def set_multiplier(self, multiplier: float) -> None:
        """The network's strength; without the hook only 1.0 (as trained) is possible, as in kohya."""
        if (hook := self._hook("set_multiplier")) is not None:
            hook(multiplier)
        elif multiplier != 1.0 and not self._warned_multiplier:
            logger.warning("--network_module %s has no set_multiplier: network_multiplier %s is ignored",
                           self.source, multiplier)
            self._warned_multiplier = True

    @property
    def can_scale_weight_norms(self) -> bool:
        return self._hook("apply_max_norm_regularization") is not None

    def apply_max_norm_regularization(self, max_norm: float, device) -> tuple[int, float, float]:
        """--scale_weight_norms: (layers scaled, mean norm, max norm), as plain numbers for the logs."""
        hook = self._hook("apply_max_norm_regularization")
        if hook is None:
            raise UserError(f"--scale_weight_norms: --network_module {self.source} has no "
                            "apply_max_norm_regularization")
        scaled, mean, top = hook(max_norm, device)
        return int(scaled), float(mean), float(top)

    @property
    def text_encoder_layers(self) -> list[torch.nn.Module] | None:
        """kohya's `text_encoder_loras`, read when asked (apply_to may replace the list); None without it."""
        layers = getattr(self.module, "text_encoder_loras", None)
        return None if layers is None else list(layers)

    def freeze_text_encoder(self) -> None:
        """Stop training the text encoder's layers: no gradient, so optimizers leave them exactly as they are."""
        layers = self.text_encoder_layers
        if layers is None:
            raise UserError(f"--text_encoder_train_epochs: --network_module {self.source} does not list "
                            "its text_encoder_loras")
        for layer in layers:
            for param in layer.parameters():
                param.requires_grad_(False)
                param.grad = None  # an unfinished accumulation must not reach the next step

    def is_mergeable(self) -> bool:
        """Whether merge_to can bake this network into the models: its own answer, else whether it has merge_to."""
        if self._hook("merge_to") is None:
            return False
        hook = self._hook("is_mergeable")
        return hook is None or bool(hook())

    def merge_to(self, text_encoder, unet, weights_sd: dict, dtype, device) -> None:
        """Bake `weights_sd` into the models' weights (--base_weights, merging tools)."""
        hook = self._hook("merge_to")
        if hook is None:
            raise UserError(f"--network_module {self.source}: its network has no merge_to; it cannot be merged")
        hook(text_encoder, unet, weights_sd, dtype, device)


def _positional_count(function) -> int:
    """How many positional arguments `function` takes (a large number for *args)."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: assume the current form
        return 3
    kinds = [p.kind for p in parameters]
    if inspect.Parameter.VAR_POSITIONAL in kinds:
        return 99
    return sum(kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD) for kind in kinds)


def optimizer_groups(result, source: str) -> tuple[list[dict], list[str] | None]:
    """What prepare_optimizer_params returned, as (groups, names or None): a (groups, descriptions) tuple
    or a bare list; groups are dicts with "params", or bare parameters (one group). Each group's "params"
    becomes a list, so a generator is not used up by the first reader."""
    groups, names = result if isinstance(result, tuple) and len(result) == 2 else (result, None)
    try:
        groups = list(groups)
    except TypeError:
        groups = None
    if groups and all(isinstance(group, torch.Tensor) for group in groups):
        groups = [{"params": groups}]
    if not groups or not all(isinstance(group, dict) and "params" in group for group in groups):
        raise UserError(f"--network_module {source}: prepare_optimizer_params must return parameter groups "
                        "(dicts with 'params'), optionally with their descriptions")
    groups = [{**group, "params": list(group["params"])} for group in groups]
    names = [str(name) for name in names] if names is not None and len(names) == len(groups) else None
    return groups, names


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


def check_weights_fit(file: str, weights_sd: dict, own: dict, hint: str) -> None:
    """A saved file must fit the network it is loaded into: same shape for every shared key, and at least
    one shared key. `hint` says which options shape the network (e.g. "match --network_dim to the file")."""
    for key, value in weights_sd.items():
        if key in own and own[key].shape != value.shape:
            raise UserError(f"{file}: {key} has shape {tuple(value.shape)}, this network needs "
                            f"{tuple(own[key].shape)}; {hint}")
    if not set(weights_sd) & set(own):
        raise UserError(f"{file}: none of its keys belong to this network (one for another model?)")
