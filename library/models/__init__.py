"""Model families: which one a checkpoint is, and loading it.

A family (SD 1.x, SD 2.x, SDXL) is one module with one class exposing the interface the trainer uses:
unet, vae, text_encoders, tokenizers, noise_scheduler, v_prediction, model_path, vae_path,
resolution_default, bucket_divisor, tokenize(), count_tokens(), encode_conditioning() (text-encoder
outputs under kohya's npz key names), encode_images(), predict(noisy, timesteps, cond, batch),
pipeline() and prompt_embeds() for samples. Adding a family is one module and one line in FAMILIES;
nothing else asks which family it runs.
"""

from __future__ import annotations

import importlib

from library.errors import UserError
from library.models.files import detect_family as _detect_family

# family name -> "module:Class", imported on first use.
FAMILIES = {
    "sd1": "library.models.sd1:SD1Family",
    "sd2": "library.models.sd2:SD2Family",
    "sdxl": "library.models.sdxl:SDXLFamily",
}
_LABELS = {"sd1": "an SD 1.x", "sd2": "an SD 2.x", "sdxl": "an SDXL"}


def detect_family(path: str, unsafe_load_ckpt: bool = False) -> str:
    """'sd1' | 'sd2' | 'sdxl' for a local single file or diffusers folder, read without a full load.

    UserError for a missing path, a hub id, a pickle without `unsafe_load_ckpt`, or an unrecognised file.
    """
    return _detect_family(path, unsafe_load_ckpt)


def family_class(name: str, path: str = "the model"):
    """The class registered for a family; UserError naming the file for families not built yet."""
    if name not in FAMILIES:
        raise UserError(f"{path} is {_LABELS.get(name, 'a ' + name)} checkpoint: not supported yet")
    module_name, class_name = FAMILIES[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def load_model(cfg):
    """Load the base model named by cfg.pretrained_model_name_or_path into its family object."""
    path = cfg.pretrained_model_name_or_path
    name = detect_family(path, bool(getattr(cfg, "unsafe_load_ckpt", False)))
    if getattr(cfg, "v2", False) and name != "sd2":
        raise UserError(f"--v2 is given but {path} is {_LABELS[name]} checkpoint, not SD 2.x: remove --v2 "
                        "(sdtune detects the model family from the weights)")
    return family_class(name, path).load(cfg)


def enable_xformers(family) -> None:
    """Switch the UNet and VAE to xformers attention (--xformers); the default is PyTorch SDPA."""
    try:
        import xformers  # noqa: F401 - only checking that the optional extra is installed
    except ImportError:
        raise UserError(
            "--xformers needs the xformers package (a CUDA-only extra): pip install xformers, or use --sdpa"
        ) from None
    for model in (family.unet, family.vae):
        if model is not None:
            model.enable_xformers_memory_efficient_attention()
