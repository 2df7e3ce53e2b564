"""Full fine-tuning (fine_tune.py, kohya's sdxl_train.py): every U-Net weight trains, and with
--train_text_encoder the text encoder(s) too; the whole model is saved as a checkpoint.

The run freezes the whole base model first (library/trainer.py); this method switches on what trains and
keeps it in float32 (the frozen rest may take the mixed-precision dtype; --full_fp16 / --full_bf16 put the
trained weights in half precision too, library/precision.py). `module` is a ModuleList of the trained
models, which is what the optimizer, EMA and accelerate see.

Learning rates (kohya's semantics; a rate of 0 leaves that part frozen, as in sdxl_train.py):
    U-Net                     --learning_rate (SDXL: or --block_lr, 23 values, one per U-Net block)
    SD 1.x / 2.x text encoder --learning_rate_te, default --learning_rate
    SDXL text encoders        --learning_rate_te1 / --learning_rate_te2, default --learning_rate_te, then
                              --learning_rate

Save formats (--save_model_as; unset: a single file for a single-file model, else a diffusers folder):
    safetensors               one file in the LDM / SGM layout A1111, ComfyUI and kohya read
    ckpt                      torch.save of {"state_dict": the same tensors} (safetensors with --use_safetensors)
    diffusers                 a diffusers folder (safetensors weights with --use_safetensors)
    diffusers_safetensors     a diffusers folder with safetensors weights
Every save is atomic: a file is written beside and renamed, a folder is built as .NAME.partial and moved.
"""

from __future__ import annotations

import logging
import os
import re
import shutil

import torch

from library.errors import UserError

logger = logging.getLogger(__name__)

FORMATS = ("safetensors", "ckpt", "diffusers", "diffusers_safetensors")
# file extension of each format ("" for a folder); state.Names appends it to kohya's names
EXTENSIONS = {"safetensors": ".safetensors", "ckpt": ".ckpt", "diffusers": "", "diffusers_safetensors": ""}
SDXL_BLOCKS = 23  # kohya's --block_lr: time/label embedding, 9 input blocks, 3 middle, 9 output, out


def resolve_save_format(save_model_as: str | None, use_safetensors: bool, source_is_file: bool) -> str:
    """The format to save in. kohya's rules, except that an unset --save_model_as with a single-file source
    writes .safetensors instead of a pickled .ckpt (safetensors cannot run code when loaded)."""
    fmt = (save_model_as or ("safetensors" if source_is_file else "diffusers")).lower()
    if fmt not in FORMATS:
        raise UserError(f"--save_model_as {save_model_as}: fine-tuning saves {', '.join(FORMATS)}")
    if use_safetensors and fmt in ("ckpt", "diffusers"):
        fmt = {"ckpt": "safetensors", "diffusers": "diffusers_safetensors"}[fmt]
    return fmt


def text_encoder_rates(cfg, count: int) -> list[float]:
    """The learning rate of each text encoder (see the module docstring)."""
    te1, te2 = getattr(cfg, "learning_rate_te1", None), getattr(cfg, "learning_rate_te2", None)
    shared = cfg.learning_rate if getattr(cfg, "learning_rate_te", None) is None else cfg.learning_rate_te
    if count == 1:
        if te1 is not None or te2 is not None:
            raise UserError("--learning_rate_te1 / --learning_rate_te2 are for SDXL's two text encoders; "
                            "use --learning_rate_te")
        return [shared]
    return [shared if te1 is None else te1, shared if te2 is None else te2]


def sdxl_block_index(ldm_key: str) -> int:
    """kohya's --block_lr block of an SDXL U-Net weight, from its LDM name (without the model prefix)."""
    if ldm_key.startswith(("time_embed.", "label_emb.")):
        return 0
    found = re.match(r"(input_blocks|middle_block|output_blocks)\.(\d+)\.", ldm_key)
    if found:
        return {"input_blocks": 1, "middle_block": 10, "output_blocks": 13}[found.group(1)] + int(found.group(2))
    if ldm_key.startswith("out."):
        return 22
    raise ValueError(f"no --block_lr block for U-Net weight {ldm_key}")


def parse_block_lr(text: str | None, family_name: str) -> list[float] | None:
    """--block_lr "1e-6,2e-6,..." (23 values, SDXL only) -> floats; None when unset."""
    if not text:
        return None
    if family_name != "sdxl":
        raise UserError("--block_lr is for SDXL U-Nets (kohya's sdxl_train.py); use --learning_rate")
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise UserError(f"--block_lr {text}: comma-separated numbers expected") from None
    if len(values) != SDXL_BLOCKS:
        raise UserError(f"--block_lr: {SDXL_BLOCKS} values expected (one per SDXL U-Net block), got {len(values)}")
    return values


def _te_rates(cfg, family) -> list[float]:
    count = len(family.text_encoders)
    return text_encoder_rates(cfg, count) if getattr(cfg, "train_text_encoder", False) else [0.0] * count


def _trains_unet(cfg, block_lrs: list[float] | None) -> bool:
    return any(block_lrs) if block_lrs else cfg.learning_rate != 0


class FullModelMethod:
    """Train the U-Net (and text encoders) themselves; save the whole model."""

    name = "fine_tune"  # library.metadata names the method so (a "Checkpoint" ModelSpec)

    def __init__(self, cfg, family):
        self.cfg, self.family = cfg, family
        self.vae = family.vae  # the loop may drop family.vae after caching latents; a checkpoint needs it
        self.format = resolve_save_format(getattr(cfg, "save_model_as", None), getattr(cfg, "use_safetensors", False),
                                          os.path.isfile(family.model_path))
        cfg.save_model_as = self.format  # state.Names names the files after it
        self.block_lrs = parse_block_lr(getattr(cfg, "block_lr", None), family.name)
        if getattr(cfg, "diffusers_xformers", False) and not cfg.xformers:  # kohya's other spelling
            from library.models import enable_xformers

            enable_xformers(family)
        self.te_rates = _te_rates(cfg, family)
        self.train_unet = _trains_unet(cfg, self.block_lrs)
        self.trained_encoders = [te for te, lr in zip(family.text_encoders, self.te_rates) if lr != 0]
        self.train_text_encoder = bool(self.trained_encoders)
        models = self.trained_models(cfg, family)
        for model in models:
            if any(p.dtype != torch.float32 for p in model.parameters()):  # the run may have halved it
                model.to(dtype=torch.float32)  # trained weights are float32 (half: --full_fp16 / --full_bf16)
            model.requires_grad_(True)
        self.models = torch.nn.ModuleList(models)

    @staticmethod
    def trained_models(cfg, family) -> list[torch.nn.Module]:
        """The models this run trains (whole), known before the method is built: the run leaves them in
        float32 when it halves the frozen base (a round trip through bf16 would round the weights)."""
        block_lrs = parse_block_lr(getattr(cfg, "block_lr", None), family.name)
        rates = _te_rates(cfg, family)
        models = ([family.unet] if _trains_unet(cfg, block_lrs) else [])
        models += [te for te, lr in zip(family.text_encoders, rates) if lr != 0]
        if not models:
            raise UserError("nothing to train: --learning_rate is 0 and no text encoder trains")
        return models

    @staticmethod
    def text_encoder_trains(cfg) -> bool:
        """--train_text_encoder, unless every text-encoder rate given is 0 (known before anything loads)."""
        rates = [getattr(cfg, n, None) for n in ("learning_rate_te", "learning_rate_te1", "learning_rate_te2")]
        given = [r for r in rates if r is not None]
        return bool(getattr(cfg, "train_text_encoder", False)) and not (given and all(r == 0 for r in given))

    @property
    def module(self) -> torch.nn.Module:
        return self.models

    def param_groups(self) -> tuple[list, list[str]]:
        """kohya's order: the U-Net group(s), then one group per trained text encoder."""
        groups, names = [], []
        if self.train_unet:
            groups, names = self._unet_groups()
        trained = [(i, lr) for i, lr in enumerate(self.te_rates) if lr != 0]
        for i, lr in trained:
            encoder = self.family.text_encoders[i]
            groups.append({"params": list(encoder.parameters()), "lr": lr})
            names.append("textencoder" if len(self.te_rates) == 1 else f"textencoder{i + 1}")
        return groups, names

    def _unet_groups(self) -> tuple[list, list[str]]:
        unet = self.family.unet
        if self.block_lrs is None:
            return [{"params": list(unet.parameters()), "lr": self.cfg.learning_rate}], ["unet"]
        from library.models.ldm_keys import unet_key_map

        named = dict(unet.named_parameters())
        ldm = unet_key_map(list(named))
        blocks: list[list] = [[] for _ in range(SDXL_BLOCKS)]
        for key, param in named.items():
            blocks[sdxl_block_index(ldm[key])].append(param)
        groups, names = [], []
        for i, (params, lr) in enumerate(zip(blocks, self.block_lrs)):
            if lr == 0:  # kohya: a block with rate 0 does not train
                for param in params:
                    param.requires_grad_(False)
            elif params:
                groups.append({"params": params, "lr": lr})
                names.append(f"unet_block{i:02d}")
        return groups, names

    # --- hooks of the loop: nothing to do for whole models ------------------------------------------

    def on_epoch_start(self) -> None:
        pass

    def on_step_start(self) -> None:
        pass

    def prepare_grad(self) -> None:
        pass

    def enable_gradient_checkpointing(self) -> None:
        pass  # the run turned it on for the U-Net and text encoders already

    def set_multiplier(self, multiplier: float) -> None:
        pass  # a dataset's network_multiplier means nothing without a network

    def after_optimizer_step(self) -> None:
        pass

    def stop_text_encoder_training(self) -> None:
        """Freeze the text encoders for the rest of the run (their optimizer entries then get no gradient)."""
        for encoder in self.trained_encoders:
            encoder.requires_grad_(False)
        self.train_text_encoder = False

    # --- saving -------------------------------------------------------------------------------------

    def components(self) -> dict:
        fam = self.family
        return {"unet": fam.unet, "vae": self.vae, "text_encoders": list(fam.text_encoders)}

    def save(self, path: str, dtype: torch.dtype | None, metadata: dict | None) -> None:
        """Write the whole model as `path` in --save_model_as's format (see the module docstring)."""
        if self.format in ("diffusers", "diffusers_safetensors"):
            self._save_folder(path, dtype)
        elif self.format == "ckpt":
            self._save_ckpt(path, dtype)
        else:
            from library.models.single_file import write_single_file

            write_single_file(self.family.name, self.components(), path, dtype, metadata)

    def _save_ckpt(self, path: str, dtype: torch.dtype | None) -> None:
        from library.models.single_file import cast_to, to_ldm
        from library.saving import _atomic_write, _prepare_tensors

        comps = self.components()
        tensors = to_ldm(self.family.name, comps["unet"], comps["vae"], comps["text_encoders"], cast_to(dtype))
        checkpoint = {"state_dict": _prepare_tensors(tensors)}
        _atomic_write(path, lambda tmp_path: torch.save(checkpoint, tmp_path))

    def _save_folder(self, path: str, dtype: torch.dtype | None) -> None:
        """A diffusers folder: each model's save_pretrained, the tokenizers, a scheduler and model_index.json."""
        from library.saving import partial_folder, replace_folder

        partial = partial_folder(path)
        if os.path.exists(partial):
            shutil.rmtree(partial)  # left behind by a crash
        pipe = self._pipeline()
        pipe.save_pretrained(partial, safe_serialization=self.format == "diffusers_safetensors")
        if dtype is not None:  # save_pretrained writes each model as it is: cast the written files
            _cast_folder(partial, dtype)
        replace_folder(partial, path)

    def _pipeline(self):
        from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

        fam = self.family
        scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False,
                                  steps_offset=1,
                                  prediction_type="v_prediction" if fam.v_prediction else "epsilon")
        if fam.name == "sdxl":
            return StableDiffusionXLPipeline(vae=self.vae, text_encoder=fam.text_encoders[0],
                                             text_encoder_2=fam.text_encoders[1], tokenizer=fam.tokenizers[0],
                                             tokenizer_2=fam.tokenizers[1], unet=fam.unet, scheduler=scheduler,
                                             add_watermarker=False)
        return StableDiffusionPipeline(vae=self.vae, text_encoder=fam.text_encoders[0], tokenizer=fam.tokenizers[0],
                                       unet=fam.unet, scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)


def _cast_folder(folder: str, dtype: torch.dtype) -> None:
    """--save_precision for a folder: rewrite each written weight file with its floating tensors cast (the
    live models keep training in their own dtype, so they are not cast in place)."""
    from safetensors.torch import load_file, save_file

    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        sub = os.path.join(folder, name)
        if not os.path.isdir(sub):
            continue
        for file in os.listdir(sub):
            path = os.path.join(sub, file)
            if file.endswith(".safetensors"):
                tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in load_file(path).items()}
                save_file(tensors, path, {"format": "pt"})
            elif file.endswith(".bin"):
                state = torch.load(path, map_location="cpu", weights_only=True)
                torch.save({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}, path)
