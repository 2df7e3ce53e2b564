"""LoRA and LoCon networks in kohya's format (``--network_module networks.lora``).

A LoRA layer adds ``up(down(x)) * multiplier * alpha / dim`` to a frozen Linear or Conv2d. ``down``
has the wrapped layer's input size, kernel, stride and padding; ``up`` is a 1x1 map back to the output
size, zero-initialised so a fresh network changes nothing. Which layers are wrapped and their names:
networks/targets.py. The forward of each wrapped layer is patched rather than the model rebuilt, so
base weights, hooks and checkpointing of the model stay as they are.

Saved keys per layer: ``<name>.lora_down.weight`` (r, in) or (r, in, k, k), ``<name>.lora_up.weight``
(out, r) or (out, r, 1, 1), ``<name>.alpha`` (a scalar). SDXL U-Net layers are named in the original
(LDM) layout as kohya names them (``lora_unet_input_blocks_4_1_...``); SDXL files that name them by
diffusers path (``lora_unet_down_blocks_1_attentions_0_...``) load onto the same layers.

``--network_args``: conv_dim, conv_alpha (LoCon: 3x3 convs of the UNet's resnets and samplers),
rank_dropout, module_dropout, loraplus_lr_ratio, loraplus_unet_lr_ratio, loraplus_text_encoder_lr_ratio,
and the block-wise block_dims, block_alphas, conv_block_dims, conv_block_alphas, down_lr_weight,
mid_lr_weight, up_lr_weight, block_lr_zero_threshold (networks/blocks.py says which layer is in which
block).
"""

from __future__ import annotations

import logging
import math
import os

import torch

from library.errors import UserError, not_supported
from networks import blocks
from networks.base import arg_number, check_network_args, check_weights_fit
from networks.targets import Layer, network_layers, unet_renames

logger = logging.getLogger(__name__)

# The rank keys: a network shaped after a file (--dim_from_weights) takes these from the file instead.
DIM_ARGS = ("conv_dim", "conv_alpha") + blocks.BLOCK_DIM_KEYS
NETWORK_ARGS = DIM_ARGS + ("rank_dropout", "module_dropout", "loraplus_lr_ratio", "loraplus_unet_lr_ratio",
                           "loraplus_text_encoder_lr_ratio") + blocks.LR_WEIGHT_KEYS + ("block_lr_zero_threshold",)


def lora_delta(up: torch.Tensor, down: torch.Tensor, scale: float) -> torch.Tensor:
    """The weight change ``up @ down * scale``, shaped like the wrapped layer's weight.

    Works for Linear (up (o, r), down (r, i)), 1x1 and kxk convs (up (o, r, 1, 1), down (r, i, k, k)):
    a 1x1 conv after a kxk conv is one kxk conv whose kernel mixes down's kernels with up's matrix.
    """
    up2, down2 = up.float().flatten(1), down.float().flatten(1)
    return (up2 @ down2).reshape(up.shape[0], *down.shape[1:]) * scale


class LoRAModule(torch.nn.Module):
    """One LoRA layer beside a Linear or Conv2d; `apply_to` routes the layer's forward through it."""

    def __init__(self, lora_name: str, org_module: torch.nn.Module, multiplier: float = 1.0, lora_dim: int = 4,
                 alpha: float | None = 1.0, dropout: float | None = None, rank_dropout: float | None = None,
                 module_dropout: float | None = None):
        super().__init__()
        self.lora_name = lora_name
        self.lora_dim = int(lora_dim)
        if isinstance(org_module, torch.nn.Conv2d):
            self.lora_down = torch.nn.Conv2d(org_module.in_channels, self.lora_dim, org_module.kernel_size,
                                             org_module.stride, org_module.padding, bias=False)
            self.lora_up = torch.nn.Conv2d(self.lora_dim, org_module.out_channels, 1, bias=False)
        else:
            self.lora_down = torch.nn.Linear(org_module.in_features, self.lora_dim, bias=False)
            self.lora_up = torch.nn.Linear(self.lora_dim, org_module.out_features, bias=False)
        # Microsoft's LoRA init: random down, zero up, so the network starts as the identity.
        torch.nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        torch.nn.init.zeros_(self.lora_up.weight)

        alpha = float(alpha.float().item()) if isinstance(alpha, torch.Tensor) else alpha
        alpha = self.lora_dim if not alpha else float(alpha)  # kohya: alpha 0 / None means no scaling
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float32))
        self.scale = alpha / self.lora_dim
        # A loaded file may carry another alpha: keep the cached scale in step with the buffer.
        self.register_load_state_dict_post_hook(lambda module, _keys: module.refresh_scale())

        self.multiplier = multiplier
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        # A list, so the wrapped layer is not registered as a submodule (and not saved with the network).
        self.org_module_ref = [org_module]
        self.org_forward = None

    @property
    def org_module(self) -> torch.nn.Module:
        return self.org_module_ref[0]

    def refresh_scale(self) -> None:
        self.scale = float(self.alpha.float().item()) / self.lora_dim

    def apply_to(self) -> None:
        """Route the wrapped layer's forward through this module (once)."""
        if self.org_forward is None:
            self.org_forward = self.org_module.forward
            self.org_module.forward = self.forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.org_forward(x)
        if self.module_dropout and self.training and torch.rand(1).item() < self.module_dropout:
            return base
        lx = self.lora_down(x)
        if self.dropout and self.training:
            lx = torch.nn.functional.dropout(lx, p=self.dropout)
        scale = self.scale
        if self.rank_dropout and self.training:
            lx = lx * self._rank_mask(lx)
            scale = scale / (1.0 - self.rank_dropout)  # as if the rank shrank: keep the expected size
        return base + self.lora_up(lx) * (self.multiplier * scale)

    def _rank_mask(self, lx: torch.Tensor) -> torch.Tensor:
        """A keep-mask over the rank channel, one draw per sample, broadcastable to `lx`."""
        rank = lx.shape[1] if lx.dim() == 4 else lx.shape[-1]  # DyLoRA runs fewer ranks than lora_dim
        mask = (torch.rand(lx.shape[0], rank, device=lx.device) > self.rank_dropout).to(lx.dtype)
        if lx.dim() == 3:  # (batch, tokens, rank)
            return mask.unsqueeze(1)
        if lx.dim() == 4:  # (batch, rank, h, w)
            return mask[:, :, None, None]
        return mask

    @property
    def trainable(self) -> bool:
        """False once frozen during the run (--text_encoder_train_epochs)."""
        return any(p.requires_grad for p in self.parameters())

    @torch.no_grad()
    def scale_change_(self, ratio: float) -> None:
        """Multiply the layer's change by `ratio`: up and down alike, so neither outgrows the other."""
        for param in self.parameters():
            param.mul_(ratio ** 0.5)

    def get_weight(self, multiplier: float | None = None) -> torch.Tensor:
        """This layer's weight change, shaped like the wrapped layer's weight (float32)."""
        multiplier = self.multiplier if multiplier is None else multiplier
        return lora_delta(self.lora_up.weight, self.lora_down.weight, self.scale * multiplier)

    @torch.no_grad()
    def merge_to(self, sd: dict[str, torch.Tensor], dtype: torch.dtype | None, device) -> None:
        """Add this layer's change from `sd` (lora_up / lora_down / alpha) into the wrapped weight."""
        up, down = sd["lora_up.weight"].to(device), sd["lora_down.weight"].to(device)
        alpha = sd.get("alpha")
        rank = down.shape[0]
        scale = (float(alpha.float().item()) if alpha is not None else rank) / rank
        weight = self.org_module.weight
        merged = weight.to(device, torch.float32) + lora_delta(up, down, scale * self.multiplier)
        weight.copy_(merged.to(dtype or weight.dtype))


class LoRANetwork(torch.nn.Module):
    """All LoRA layers of one network. Attribute names follow kohya's (tools reach for them)."""

    module_class = LoRAModule  # networks.dylora puts its own layer kind here

    def __init__(self, text_encoder, unet, multiplier: float = 1.0, lora_dim: int = 4, alpha: float = 1.0,
                 dropout: float | None = None, rank_dropout: float | None = None,
                 module_dropout: float | None = None, conv_lora_dim: int | None = None,
                 conv_alpha: float | None = None, modules_dim: dict[str, int] | None = None,
                 modules_alpha: dict[str, float] | None = None, block_plan: blocks.BlockDims | None = None,
                 module_kwargs: dict | None = None):
        """Either (lora_dim, alpha, conv_lora_dim, conv_alpha) for every layer, per-block U-Net ranks
        (`block_plan`; the text encoder keeps lora_dim and alpha), or per-layer `modules_dim` /
        `modules_alpha` (a network shaped after a file: layers not in it are skipped). A rank of 0 or
        None leaves a layer out. `module_kwargs` go to every layer's `module_class`."""
        super().__init__()
        self.multiplier = multiplier
        self.lora_dim, self.alpha = lora_dim, alpha
        self.conv_lora_dim, self.conv_alpha = conv_lora_dim, conv_alpha
        self.dropout, self.rank_dropout, self.module_dropout = dropout, rank_dropout, module_dropout
        self.loraplus_lr_ratio = self.loraplus_unet_lr_ratio = self.loraplus_text_encoder_lr_ratio = None
        self.block_plan = block_plan
        self.block_lr_weight: list[float] | None = None

        # SDXL files named by diffusers path (not kohya's original layout) still load: see `kohya_keys`
        self.renames = unet_renames(unet)
        with_conv = modules_dim is not None or bool(conv_lora_dim) or bool(block_plan and block_plan.has_conv)
        self.text_encoder_loras: list[LoRAModule] = []
        self.unet_loras: list[LoRAModule] = []
        for layer in network_layers(text_encoder, unet, with_conv):
            dim, layer_alpha = self._dim_alpha(layer, modules_dim, modules_alpha)
            if not dim:
                continue
            lora = self.module_class(layer.name, layer.module, multiplier, dim, layer_alpha, dropout=dropout,
                                     rank_dropout=rank_dropout, module_dropout=module_dropout, **(module_kwargs or {}))
            (self.unet_loras if layer.is_unet else self.text_encoder_loras).append(lora)
            self.add_module(lora.lora_name, lora)
        logger.info("LoRA: %d text encoder modules, %d U-Net modules", len(self.text_encoder_loras),
                    len(self.unet_loras))

    def _dim_alpha(self, layer: Layer, modules_dim, modules_alpha) -> tuple[int | None, float | None]:
        if modules_dim is not None:
            return modules_dim.get(layer.name), (modules_alpha or {}).get(layer.name)
        if self.block_plan is not None and layer.is_unet:
            return self.block_plan.dim_alpha(layer.name, layer.is_spatial_conv)
        if layer.is_spatial_conv:
            return self.conv_lora_dim, self.conv_alpha
        return self.lora_dim, self.alpha

    @property
    def loras(self) -> list[LoRAModule]:
        return self.text_encoder_loras + self.unet_loras

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = multiplier
        for lora in self.loras:
            lora.multiplier = multiplier

    def set_block_lr_weight(self, weights: list[float] | None) -> None:
        """kohya's block learning rates: U-Net block i learns at unet_lr * weights[i] (networks/blocks.py)."""
        self.block_lr_weight = weights

    def get_lr_weight(self, block: int) -> float:
        if self.block_lr_weight is None or block < 0:
            return 1.0
        return self.block_lr_weight[block]

    def set_loraplus_lr_ratio(self, ratio=None, unet_ratio=None, text_encoder_ratio=None) -> None:
        """LoRA+: the up matrices learn `ratio` times faster (per half when its own ratio is given)."""
        self.loraplus_lr_ratio = ratio
        self.loraplus_unet_lr_ratio = unet_ratio
        self.loraplus_text_encoder_lr_ratio = text_encoder_ratio

    def apply_to(self, text_encoder, unet, apply_text_encoder: bool = True, apply_unet: bool = True) -> None:
        """Patch the wrapped layers; a half not applied is dropped from the network (not trained, not saved)."""
        if not apply_text_encoder:
            self._drop(self.text_encoder_loras)
            self.text_encoder_loras = []
        if not apply_unet:
            self._drop(self.unet_loras)
            self.unet_loras = []
        for lora in self.loras:
            lora.apply_to()
        logger.info("LoRA applied: %d text encoder modules, %d U-Net modules",
                    len(self.text_encoder_loras), len(self.unet_loras))

    def _drop(self, loras: list[LoRAModule]) -> None:
        for lora in loras:
            delattr(self, lora.lora_name)

    def is_mergeable(self) -> bool:
        return True

    def kohya_keys(self, weights_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`weights_sd` with SDXL U-Net layers named by diffusers path renamed to kohya's names."""
        return rename_layers(weights_sd, self.renames)

    def merge_to(self, text_encoder, unet, weights_sd: dict[str, torch.Tensor], dtype=None, device="cpu") -> None:
        """Bake `weights_sd` (a kohya LoRA state dict) into the models' weights; nothing is patched."""
        by_layer: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in self.kohya_keys(weights_sd).items():
            name, _, rest = key.partition(".")
            by_layer.setdefault(name, {})[rest] = value
        merged = 0
        for lora in self.loras:
            if "lora_down.weight" in by_layer.get(lora.lora_name, {}):
                lora.merge_to(by_layer[lora.lora_name], dtype, device)
                merged += 1
        if merged == 0:
            raise UserError("merge: none of the LoRA's layers exist in this model (wrong base model family?)")
        logger.info("merged %d LoRA layers", merged)

    def prepare_optimizer_params(self, text_encoder_lr, unet_lr, default_lr) -> tuple[list[dict], list[str]]:
        """kohya's groups: text encoder, then the U-Net (one group per block, "unet_block<i>", with block
        learning-rate weights), each split in two under LoRA+ (up matrices apart, " plus").

        A None lr falls back to `default_lr`; a group whose lr ends up None or 0 is left out (frozen).
        """
        self.requires_grad_(True)
        unet_lr = default_lr if unet_lr is None else unet_lr
        te_ratio = self.loraplus_text_encoder_lr_ratio or self.loraplus_lr_ratio
        unet_ratio = self.loraplus_unet_lr_ratio or self.loraplus_lr_ratio
        parts = [(label, loras, default_lr if lr is None else lr, te_ratio)
                 for label, loras, lr in self._text_encoder_parts(text_encoder_lr)]
        if self.block_lr_weight is None:
            parts.append(("unet", self.unet_loras, unet_lr, unet_ratio))
        else:
            by_block: dict[int, list[LoRAModule]] = {}
            for lora in self.unet_loras:
                by_block.setdefault(blocks.block_index(lora.lora_name), []).append(lora)
            for block in sorted(by_block):
                lr = unet_lr * self.get_lr_weight(block) if unet_lr else unet_lr
                parts.append((f"unet_block{block}", by_block[block], lr, unet_ratio))
        groups: list[dict] = []
        names: list[str] = []
        for label, loras, lr, ratio in parts:
            plain = [p for lora in loras for n, p in lora.named_parameters() if not (ratio and "lora_up" in n)]
            plus = [p for lora in loras for n, p in lora.named_parameters() if ratio and "lora_up" in n]
            for params, group_lr, suffix in ((plain, lr, ""), (plus, lr * ratio if ratio and lr else lr, " plus")):
                if params and group_lr:
                    groups.append({"params": params, "lr": group_lr})
                    names.append(label + suffix)
        return groups, names

    def _text_encoder_parts(self, text_encoder_lr) -> list[tuple[str, list, float | None]]:
        """(label, layers, lr) of the text-encoder groups. One group, as kohya, unless SDXL's two encoders are
        given two different rates (--text_encoder_lr A B), which kohya's SDXL LoRA would fold into the first:
        then "textencoder1" (lora_te1_) and "textencoder2" (lora_te2_) get their own."""
        rates = text_encoder_lr if isinstance(text_encoder_lr, (list, tuple)) else [text_encoder_lr]
        if len(set(rates)) < 2:
            return [("textencoder", self.text_encoder_loras, rates[0] if rates else None)]
        def of_encoder(i: int) -> list:
            return [lora for lora in self.text_encoder_loras if lora.lora_name.startswith(f"lora_te{i + 1}_")]

        return [(f"textencoder{i + 1}", of_encoder(i), rate) for i, rate in enumerate(rates)]

    def enable_gradient_checkpointing(self) -> None:
        """Nothing to do: the LoRA layers are tiny and run inside the model's checkpointed blocks."""

    def prepare_grad_etc(self, text_encoder, unet) -> None:
        self.requires_grad_(True)

    def on_epoch_start(self, text_encoder, unet) -> None:
        self.train()

    def train(self, mode: bool = True):
        """Training mode, except for layers frozen during the run (--text_encoder_train_epochs): with no
        trainable parameter left they run as at inference, so their dropout no longer adds noise."""
        super().train(mode)
        for lora in self.loras:
            if mode and not any(p.requires_grad for p in lora.parameters()):
                lora.eval()
        return self

    def get_trainable_params(self):
        return self.parameters()

    def load_weights(self, file: str):
        """Load a saved LoRA into this network. Shapes must match; other key differences are logged."""
        weights_sd = self.kohya_keys(read_weights(file))
        check_weights_fit(file, weights_sd, self.state_dict(),
                          "match --network_dim / conv_dim to the file or use --dim_from_weights")
        info = self.load_state_dict(weights_sd, strict=False)
        if info.unexpected_keys:
            logger.warning("%s: %d keys not used, e.g. %s", file, len(info.unexpected_keys), info.unexpected_keys[0])
        if info.missing_keys:
            logger.warning("%s: %d keys of the network not in the file, e.g. %s", file, len(info.missing_keys),
                           info.missing_keys[0])
        return info

    def save_weights(self, file: str, dtype: torch.dtype | None, metadata: dict[str, str] | None) -> None:
        """Write the network as .safetensors (atomically), with kohya's sshs_* hashes added to `metadata`."""
        from library.saving import add_model_hashes, save_safetensors

        if os.path.splitext(file)[1].lower() != ".safetensors":
            raise not_supported("save_model_as (only safetensors for networks)")
        tensors = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in self.state_dict().items()}
        save_safetensors(tensors, file, add_model_hashes(tensors, metadata))

    @torch.no_grad()
    def apply_max_norm_regularization(self, max_norm_value: float, device) -> tuple[int, float, float]:
        """--scale_weight_norms: shrink each layer's up and down alike so ||delta W|| <= max_norm_value.

        Returns (layers scaled, mean norm, max norm) after scaling, as kohya's trainer logs them. Frozen
        layers (--text_encoder_train_epochs) are counted but never rescaled: they already met the bound,
        and rounding must not move them.
        """
        norms, scaled = [], 0
        for lora in self.loras:
            # The floor only guards the division: norms below it are left alone (ratio 1).
            norm = lora.get_weight(multiplier=1.0).to(device).norm()
            floored = norm.clamp(min=max_norm_value / 2)
            ratio = float(floored.clamp(max=max_norm_value) / floored)
            if not lora.trainable:
                ratio = 1.0
            if ratio != 1:
                scaled += 1
                lora.scale_change_(ratio)
            norms.append(float(norm) * ratio)
        return scaled, sum(norms) / max(len(norms), 1), max(norms, default=0.0)


def read_weights(file: str) -> dict[str, torch.Tensor]:
    """A LoRA state dict from a .safetensors file; UserError when it is missing or not readable."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not os.path.isfile(file):
        raise UserError(f"{file}: network weights file not found")
    if os.path.splitext(file)[1].lower() != ".safetensors":
        raise UserError(f"{file}: network weights must be a .safetensors file (pickled files are not loaded)")
    try:
        return load_file(file)
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{file}: not a readable safetensors file ({exc})") from None


def rename_layers(weights_sd: dict[str, torch.Tensor], renames: dict[str, str]) -> dict[str, torch.Tensor]:
    """`weights_sd` with each layer name (the part before the first dot) renamed by `renames`."""
    if not renames:
        return weights_sd
    out = {}
    for key, value in weights_sd.items():
        name, dot, rest = key.partition(".")
        out[renames.get(name, name) + dot + rest] = value
    return out


def _dropout_arg(kwargs: dict, key: str) -> float | None:
    value = arg_number(kwargs, key, float)
    if value is not None and not 0.0 <= value < 1.0:
        raise UserError(f"--network_args {key}={value}: expected a probability in [0, 1)")
    return value


def _network_options(kwargs: dict, neuron_dropout: float | None, known=NETWORK_ARGS) -> dict:
    """Dropout settings shared by both factories (and networks.dylora's), validated."""
    check_network_args(kwargs, known)
    if neuron_dropout is not None and not 0.0 <= neuron_dropout < 1.0:
        raise UserError(f"--network_dropout {neuron_dropout}: expected a probability in [0, 1)")
    return dict(dropout=neuron_dropout, rank_dropout=_dropout_arg(kwargs, "rank_dropout"),
                module_dropout=_dropout_arg(kwargs, "module_dropout"))


def _set_loraplus(network: LoRANetwork, kwargs: dict) -> None:
    ratios = [arg_number(kwargs, key, float) for key in
              ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")]
    if any(r is not None for r in ratios):
        network.set_loraplus_lr_ratio(*ratios)


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae,
                   text_encoder, unet, neuron_dropout: float | None = None, **kwargs) -> LoRANetwork:
    """kohya's factory: a fresh LoRA (LoCon with conv_dim) for `text_encoder` (one or a list) and `unet`."""
    options = _network_options(kwargs, neuron_dropout)
    network_dim = 4 if network_dim is None else int(network_dim)
    network_alpha = 1.0 if network_alpha is None else float(network_alpha)
    # conv_dim 0 means no LoCon (kohya would still wrap the resnets' Linear / 1x1 layers then).
    conv_dim = arg_number(kwargs, "conv_dim", int) or None
    conv_alpha = arg_number(kwargs, "conv_alpha", float, 1.0)
    plan = lr_weights = None
    layout = _block_layout(unet, kwargs)
    if layout is not None:
        lr_weights = blocks.block_lr_weights(kwargs, layout)
        plan = blocks.block_dims(kwargs, layout, network_dim, network_alpha, conv_dim, conv_alpha, lr_weights)
    network = LoRANetwork(text_encoder, unet, multiplier, network_dim, network_alpha, conv_lora_dim=conv_dim,
                          conv_alpha=conv_alpha if conv_dim else None, block_plan=plan, **options)
    _set_loraplus(network, kwargs)
    network.set_block_lr_weight(lr_weights)
    return network


def _block_layout(unet, kwargs: dict) -> blocks.Layout | None:
    """The U-Net's block numbering when a block-wise network_args key is given, else None."""
    keys = blocks.BLOCK_DIM_KEYS + blocks.LR_WEIGHT_KEYS + ("block_lr_zero_threshold",)
    if not any(kwargs.get(k) for k in keys):
        return None
    names = [layer.name for layer in network_layers(None, unet, with_conv=True)] if unet is not None else []
    return blocks.layout_of(names)


def dims_from_weights(weights_sd: dict[str, torch.Tensor]) -> tuple[dict[str, int], dict[str, float]]:
    """Per-layer rank (rows of lora_down) and alpha from a saved state dict; no alpha means alpha = rank."""
    dims: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for key, value in weights_sd.items():
        name, _, rest = key.partition(".")
        if rest == "lora_down.weight":
            dims[name] = int(value.shape[0])
        elif rest == "alpha":
            alphas[name] = float(value.float().item())
    return dims, {name: alphas.get(name, float(dim)) for name, dim in dims.items()}


def create_network_from_weights(multiplier: float, file: str | None, vae, text_encoder, unet,
                                weights_sd: dict | None = None, for_inference: bool = False,
                                **kwargs) -> tuple[LoRANetwork, dict]:
    """kohya's factory: a network shaped after a saved file (dims, alphas, LoCon layers). Weights are
    not loaded here: call `load_weights` or `merge_to`."""
    if weights_sd is None:
        weights_sd = read_weights(file)
    weights_sd = rename_layers(weights_sd, unet_renames(unet))
    options = _network_options(kwargs, None)
    ignored = [key for key in DIM_ARGS if kwargs.get(key)]
    if ignored:
        logger.warning("%s: ranks and alphas come from the file; --network_args %s ignored", file or "weights",
                       ", ".join(ignored))
    dims, alphas = dims_from_weights(weights_sd)
    network = LoRANetwork(text_encoder, unet, multiplier, modules_dim=dims, modules_alpha=alphas, **options)
    unmatched = sorted(set(dims) - {lora.lora_name for lora in network.loras})
    if unmatched:
        logger.warning("%s: %d LoRA layers match no layer of the model, e.g. %s", file or "weights",
                       len(unmatched), unmatched[0])
    _set_loraplus(network, kwargs)
    # Block learning rates still apply; a block weighted 0 keeps its layers from the file, untrained.
    network.set_block_lr_weight(blocks.block_lr_weights(kwargs, blocks.layout_of(dims)))
    return network, weights_sd
