"""What is trained: a network (LoRA & co.), later an embedding or the full model.

A method decides which parameters train, with which learning rates, and how they are saved.
The training loop only talks to this small interface, so a new method is one new class here and
one line in `METHODS`.
"""

from __future__ import annotations

import logging
import os

import torch

from library.config import text_encoder_lr
from library.errors import UserError, not_supported
from library.full_model import FullModelMethod
from networks import detect
from networks.base import PluginModule, PluginNetwork, load_plugin, parse_network_args

logger = logging.getLogger(__name__)


class NetworkMethod:
    """A kohya network plug-in (`--network_module`) patched into the UNet and text encoder(s).

    Every call to the plug-in goes through networks.base.PluginNetwork, which supplies the optional
    hooks' defaults; `module` is the plug-in's torch module (what the optimizer and saving see)."""

    name = "network"

    @staticmethod
    def trained_models(cfg, family) -> list:
        """Whole models this method trains: none (it adds its own weights)."""
        return []

    @staticmethod
    def text_encoder_trains(cfg) -> bool:
        """Whether the run trains text-encoder weights (known before anything loads)."""
        return not cfg.network_train_unet_only

    @staticmethod
    def check_options(cfg) -> None:
        """--embedding_* options alone: the run calls this before anything loads."""
        from library import embeddings

        embeddings.check_network_options(cfg)

    def __init__(self, cfg, family):
        from library import embeddings

        self.cfg = cfg
        self.family = family
        self.train_unet = not cfg.network_train_text_encoder_only
        self._network_te = not cfg.network_train_unet_only  # the network has text-encoder layers that train
        embeddings.check_network_options(cfg)
        # --embedding_token_string: the text encoders run with gradients even for a U-Net-only network
        self.embedding = embeddings.NetworkEmbedding(cfg, family) if cfg.embedding_token_string else None
        self.train_text_encoder = self._network_te or self.embedding is not None
        plugin = load_plugin(cfg.network_module)
        kwargs = parse_network_args(cfg.network_args)
        check_weights_files(cfg, kwargs)  # a file the module cannot hold fails before anything loads
        # kohya hands SD1/SD2 networks the encoder itself and SDXL networks the list of both.
        encoders = family.text_encoders
        text_encoder = encoders[0] if len(encoders) == 1 else encoders
        merge_base_weights(plugin, cfg, family, text_encoder)
        self.network = self._create_network(plugin, kwargs, text_encoder)
        self._check_network_options()
        self.network.prepare_network(cfg)
        self.network.apply_to(text_encoder, family.unet, self._network_te, self.train_unet)
        if cfg.network_weights:
            info = self.network.load_weights(cfg.network_weights)
            logger.info("loaded network weights from %s: %s", cfg.network_weights, info)
        self._text_encoder = text_encoder
        self._multiplier = 1.0
        self._module = self.network.module
        if self.embedding is not None:  # one module for accelerate, the EMA and the training state
            self._module = NetworkWithEmbedding(self.network.module, self.embedding.tokens.vectors)

    def _create_network(self, plugin: PluginModule, kwargs: dict, text_encoder) -> PluginNetwork:
        """create_network from --network_dim / --network_alpha, or (--dim_from_weights) a network shaped
        after --network_weights, whose ranks and alphas it takes per layer."""
        cfg, family = self.cfg, self.family
        if cfg.dim_from_weights:
            if not cfg.network_weights:
                raise UserError("--dim_from_weights needs --network_weights (the file whose ranks to use)")
            if cfg.network_dropout:
                logger.warning("--network_dropout is not applied with --dim_from_weights (as in kohya)")
            network, _ = plugin.create_network_from_weights(1.0, cfg.network_weights, family.vae, text_encoder,
                                                            family.unet, **kwargs)
            return network
        return plugin.create_network(1.0, cfg.network_dim, cfg.network_alpha, family.vae, text_encoder,
                                     family.unet, neuron_dropout=cfg.network_dropout, **kwargs)

    def _check_network_options(self) -> None:
        """Options that need something of the network or the run, checked before anything is written."""
        cfg, network = self.cfg, self.network
        if cfg.scale_weight_norms is not None and cfg.scale_weight_norms < 0:
            raise UserError(f"--scale_weight_norms {cfg.scale_weight_norms}: must be positive (0 or unset: off)")
        if cfg.scale_weight_norms and not network.can_scale_weight_norms:
            raise UserError(f"--scale_weight_norms: --network_module {cfg.network_module} has no "
                            "apply_max_norm_regularization")
        epochs = cfg.text_encoder_train_epochs
        if epochs is None:
            return
        if epochs < 1:
            raise UserError(f"--text_encoder_train_epochs {epochs}: must be at least 1 "
                            "(to train the U-Net only, use --network_train_unet_only)")
        if network.text_encoder_layers is None:
            raise UserError(f"--text_encoder_train_epochs: --network_module {cfg.network_module} does not list "
                            "its text_encoder_loras")
        # DDP fixes the set of trained parameters when it wraps the network; freezing later would hang it.
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise not_supported("text_encoder_train_epochs with several processes")

    def param_groups(self) -> tuple[list, list[str]]:
        """Optimizer parameter groups and a name for each (used to label learning rates in logs)."""
        cfg = self.cfg
        te_lr = text_encoder_lr(cfg.text_encoder_lr, len(self.family.text_encoders))
        groups, names = self.network.prepare_optimizer_params(te_lr, cfg.unet_lr, cfg.learning_rate)
        if names is None:
            names = self._default_group_names(len(groups))
        if not any(p.requires_grad for g in groups for p in g["params"]):
            raise UserError(f"--network_module {cfg.network_module}: no trainable parameters")
        if self.embedding is not None:
            first_te_lr = te_lr[0] if isinstance(te_lr, list) else te_lr
            groups = [*groups, self.embedding.param_group(first_te_lr or cfg.learning_rate)]
            names = [*names, "embedding"]
        return groups, names

    def _default_group_names(self, count: int) -> list[str]:
        # kohya's order: text encoder group first, then the UNet.
        parts = (["textencoder"] if self._network_te else []) + (["unet"] if self.train_unet else [])
        return parts if len(parts) == count else [f"group{i}" for i in range(count)]

    @property
    def module(self) -> torch.nn.Module:
        return self._module

    def on_epoch_start(self) -> None:
        self.network.on_epoch_start(self._text_encoder, self.family.unet)

    def on_step_start(self) -> None:
        """Before each batch (kohya calls it inside the accumulation context)."""
        self.network.on_step_start(self._text_encoder, self.family.unet)

    def prepare_grad(self) -> None:
        self.network.prepare_grad_etc(self._text_encoder, self.family.unet)

    def enable_gradient_checkpointing(self) -> None:
        self.network.enable_gradient_checkpointing()

    def scale_weight_norms(self, max_norm: float, device) -> dict[str, float]:
        """--scale_weight_norms after an optimizer step; returns kohya's log figures."""
        scaled, mean, top = self.network.apply_max_norm_regularization(max_norm, device)
        return {"max_norm/keys_scaled": scaled, "max_norm/average_key_norm": mean, "max_norm/max_key_norm": top}

    def stop_text_encoder_training(self) -> None:
        """Freeze the text encoder's layers of the network (--text_encoder_train_epochs) for the rest of the run.

        Parameters without a gradient are skipped by optimizers, weight decay and momentum included, so
        the layers keep their values exactly; the text encoder also runs without building a graph.
        """
        if not self._network_te:
            return  # already frozen: only the embedding keeps the text encoders running with gradients
        self.network.freeze_text_encoder()
        self._network_te = False
        self.train_text_encoder = self.embedding is not None  # the embedding keeps training

    def set_multiplier(self, multiplier: float) -> None:
        """The network's strength for the next batch (a dataset's network_multiplier); 1.0 as trained."""
        if multiplier != self._multiplier:
            self.network.set_multiplier(multiplier)
            self._multiplier = multiplier

    def after_optimizer_step(self) -> None:
        """With an embedding, its vectors go into the encoders' rows; the plug-in needs nothing."""
        if self.embedding is not None:
            self.embedding.tokens.sync()

    def save(self, path: str, dtype: torch.dtype | None, metadata: dict | None) -> None:
        self.network.save_weights(path, dtype, metadata)
        if self.embedding is not None:
            self.embedding.save(path, dtype, metadata)


class NetworkWithEmbedding(torch.nn.Module):
    """The network's module and the embedding's vectors as the one trained module."""

    def __init__(self, network: torch.nn.Module, vectors: torch.nn.Module):
        super().__init__()
        self.network = network
        self.embedding = vectors


def check_weights_files(cfg, kwargs: dict) -> None:
    """--network_weights and --base_weights files whose algorithm the --network_module cannot load are
    refused with the options that would load them (networks/detect.py). Base weights, like
    --dim_from_weights, build their network from the file, so lycoris' algo= does not matter there."""
    module = cfg.network_module
    detect.check_weights_module(cfg.network_weights, module, kwargs, from_weights=bool(cfg.dim_from_weights))
    for path in cfg.base_weights or []:
        detect.check_weights_module(path, module, {}, flag="--base_weights", from_weights=True)


def merge_base_weights(plugin: PluginModule, cfg, family, text_encoder) -> None:
    """--base_weights: bake each network file into the base models (times its --base_weights_multiplier,
    1 when not given) before the trained network is applied, as kohya does, with the same network module."""
    paths = cfg.base_weights or []
    multipliers = cfg.base_weights_multiplier or []
    if len(multipliers) > len(paths):
        logger.warning("--base_weights_multiplier: %d values for %d --base_weights; the extra ones are ignored",
                       len(multipliers), len(paths))
    for i, path in enumerate(paths):
        multiplier = multipliers[i] if i < len(multipliers) else 1.0
        network, weights_sd = plugin.create_network_from_weights(multiplier, path, family.vae, text_encoder,
                                                                 family.unet, for_inference=True)
        if not network.is_mergeable():
            raise UserError(f"--base_weights {path}: --network_module {cfg.network_module} cannot merge it")
        # Merged on the CPU, in each weight's own dtype (the models have not moved to the device yet).
        network.merge_to(text_encoder, family.unet, weights_sd, family.unet.dtype, "cpu")
        logger.info("merged %s into the base model with multiplier %s", path, multiplier)


class EmbeddingMethod:
    """Textual inversion (train_textual_inversion.py): --token_string and its extra vectors become new tokens
    of every tokenizer; only their vectors train (library/embeddings.py holds the how and why).

    Captions and sample prompts reach the text encoders through the family's encode_conditioning /
    prompt_embeds / count_tokens, which this method wraps on the family object so the token string
    expands to all N tokens (and --use_*_template captions replace the dataset's)."""

    name = "embedding"
    train_unet = False
    train_text_encoder = True  # the text encoders run with gradients: the vectors sit at their input

    @staticmethod
    def trained_models(cfg, family) -> list:
        """Whole models this method trains: none (it adds its own weights)."""
        return []

    @staticmethod
    def text_encoder_trains(cfg) -> bool:
        return True  # the new vectors sit at the text encoders' input

    @staticmethod
    def check_options(cfg) -> None:
        """The embedding options alone: the run calls this before anything loads."""
        from library import embeddings

        embeddings.check_options(cfg)

    def __init__(self, cfg, family):
        from library import embeddings

        self.cfg, self.family = cfg, family
        if not cfg.output_name:
            cfg.output_name = cfg.token_string  # kohya names the files after the token
        self.tokens = embeddings.NewTokens(family, cfg.token_string, cfg.init_word, cfg.num_vectors_per_token,
                                           cfg.weights)
        cfg.num_vectors_per_token = self.tokens.count
        self.vectors, self.token_ids = self.tokens.vectors, self.tokens.token_ids
        templates = (embeddings.OBJECT_TEMPLATES if cfg.use_object_template
                     else embeddings.STYLE_TEMPLATES if cfg.use_style_template else None)
        self.captions = embeddings.CaptionRewriter(cfg.token_string, self.tokens.strings, templates, cfg.seed or 0)
        embeddings.wrap_family_text(family, self.captions)

    def param_groups(self) -> tuple[list, list[str]]:
        return [{"params": list(self.vectors.parameters()), "lr": self.cfg.learning_rate}], ["embedding"]

    @property
    def module(self) -> torch.nn.Module:
        return self.vectors

    def on_epoch_start(self) -> None:
        pass

    def on_step_start(self) -> None:
        pass

    def prepare_grad(self) -> None:
        pass

    def enable_gradient_checkpointing(self) -> None:
        pass  # the trainer checkpoints the UNet and text encoders; the vectors are a lookup

    def set_multiplier(self, multiplier: float) -> None:
        pass  # an embedding has no strength of its own

    def after_optimizer_step(self) -> None:
        """Copy the trained vectors into the text encoders' rows for the new ids (every other row is never
        touched: the vectors are separate parameters, see library/embeddings.py)."""
        self.tokens.sync()

    def save(self, path: str, dtype: torch.dtype | None, metadata: dict | None) -> None:
        """The embedding file (A1111 / ComfyUI layout) with `metadata` and its model hashes."""
        from library.saving import add_model_hashes, save_safetensors

        tensors = self.tokens.tensors(dtype)
        save_safetensors(tensors, path, add_model_hashes(tensors, metadata) if metadata is not None else None)


METHODS = {"network": NetworkMethod, "embedding": EmbeddingMethod, "full": FullModelMethod}
