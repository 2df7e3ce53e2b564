"""Precision and memory options: where the base model and the trained network keep their weights.

- --full_fp16 / --full_bf16: the trained network's weights and gradients in half precision (kohya's
  "full" half training); they need the matching --mixed_precision.
- --fp8_base / --fp8_base_unet: the frozen weights of every Linear and Conv2d layer of the base model
  stored in float8_e4m3fn and cast up to the mixed-precision dtype at each call of the layer. Norms,
  biases and embeddings keep the mixed-precision dtype.
- --no_half_vae: the VAE stays in float32; otherwise it takes the mixed-precision dtype, as in kohya.
- --lowram: on a CUDA machine the base models go to the GPU as soon as they are loaded (kohya loads
  them there), before any dtype conversion; on a CPU it changes nothing.
- --highvram: kohya then skips emptying the CUDA cache after caching latents; sdtune never empties
  it, so the option is accepted and changes nothing.
- --torch_compile with --dynamo_backend: the UNet is compiled in place (`nn.Module.compile`), after the
  network has patched it, so the saved keys and the network hooks stay as they are.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil

import torch
import torch.nn.functional as F

from library.errors import UserError

logger = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
# torch registers these compile backends whether or not the package they call into is installed
BACKEND_PACKAGES = {"tvm": "tvm", "openxla": "torch_xla", "openxla_eval": "torch_xla"}


def check_options(cfg) -> None:
    """The combinations kohya refuses, and compile backends this machine cannot run; before any load."""
    precision = cfg.mixed_precision or "no"
    for flag, needed in (("full_fp16", "fp16"), ("full_bf16", "bf16")):
        if getattr(cfg, flag) and precision != needed:
            raise UserError(f"--{flag} needs --mixed_precision {needed} (it is {precision})")
    if (cfg.fp8_base or cfg.fp8_base_unet) and precision == "no":
        flag = "--fp8_base" if cfg.fp8_base else "--fp8_base_unet"
        raise UserError(f"{flag} needs --mixed_precision bf16 or fp16: fp8 weights are cast up to it to compute")
    if cfg.torch_compile:
        check_backend(cfg.dynamo_backend)


def check_backend(backend: str) -> None:
    """UserError for a --dynamo_backend this torch does not have, or that this machine cannot run."""
    backend = (backend or "no").lower()
    if backend == "no":
        return
    import torch._dynamo

    if backend not in torch._dynamo.list_backends(exclude_tags=()):
        usual = sorted({"eager", "aot_eager", *torch._dynamo.list_backends()})  # without debug-only ones
        raise UserError(f"--dynamo_backend {backend}: not available in torch {torch.__version__} "
                        f"(available: {', '.join(usual)})")
    package = BACKEND_PACKAGES.get(backend)
    if package and importlib.util.find_spec(package) is None:
        raise UserError(f"--dynamo_backend {backend} needs the {package} package; install it, or use "
                        "--dynamo_backend inductor / eager")
    on_gpu = torch.cuda.is_available()
    if backend == "cudagraphs" and not on_gpu:
        raise UserError("--dynamo_backend cudagraphs needs a CUDA GPU; on CPU use eager, aot_eager or inductor")
    if backend == "inductor" and not on_gpu and not _cxx_compiler():
        raise UserError("--dynamo_backend inductor on CPU needs a C++ compiler (g++ or clang++ on PATH, or $CXX); "
                        "install one, or use --dynamo_backend eager / aot_eager")


def _cxx_compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "clang++", "c++"):
        if name and shutil.which(name):
            return name
    return None


def half_models(family, no_half_vae: bool) -> list:
    """The frozen models that take the mixed-precision dtype: UNet and text encoders, and the VAE unless
    --no_half_vae (kohya's default: a half VAE; SDXL's VAE needs --no_half_vae, in fp16 it overflows)."""
    models = [family.unet, *family.text_encoders]
    if not no_half_vae and family.vae is not None:
        models.append(family.vae)
    return models


def store_base_in_fp8(family, cfg, compute_dtype: torch.dtype) -> None:
    """--fp8_base: UNet and text encoders; --fp8_base_unet: the UNet only (see `store_in_fp8`)."""
    if not (cfg.fp8_base or cfg.fp8_base_unet):
        return
    models = [family.unet] + ([] if cfg.fp8_base_unet else list(family.text_encoders))
    for model in models:
        store_in_fp8(model, compute_dtype)
    logger.info("base weights stored in fp8 (%s), computed in %s",
                "U-Net only" if cfg.fp8_base_unet else "U-Net and text encoders", compute_dtype)


def store_in_fp8(model: torch.nn.Module, compute_dtype: torch.dtype) -> None:
    """Store the weight of every Linear and Conv2d layer of `model` in float8_e4m3fn; each call casts it
    (and the input) to `compute_dtype`. Biases, norms and embeddings keep their dtype.

    The cast is a plain tensor op, so autograd keeps what it needs for the backward pass through the
    layer (trained networks sit in front of and beside these layers). diffusers' layerwise casting
    instead casts the stored weights in place, which only suits inference. A network patches these
    layers' forward afterwards and calls the forward set here as the layer's own.
    """
    for layer in model.modules():
        if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)) and layer.weight.dtype != FP8:
            layer.weight = torch.nn.Parameter(layer.weight.detach().to(FP8), requires_grad=False)
            layer.forward = _casting_forward(layer, compute_dtype)


def _casting_forward(layer: torch.nn.Module, dtype: torch.dtype):
    def forward(x: torch.Tensor) -> torch.Tensor:
        weight = layer.weight.to(dtype)
        bias = None if layer.bias is None else layer.bias.to(dtype)
        if isinstance(layer, torch.nn.Linear):
            return F.linear(x.to(dtype), weight, bias)
        return layer._conv_forward(x.to(dtype), weight, bias)

    return forward


def cast_trained_network(module: torch.nn.Module, cfg, weight_dtype: torch.dtype) -> None:
    """--full_fp16 / --full_bf16: the network's own weights (hence its gradients) in half precision."""
    if cfg.full_fp16 or cfg.full_bf16:
        module.to(dtype=weight_dtype)
        logger.info("training the network in %s (weights and gradients)", weight_dtype)


def allow_fp16_gradients(scaler) -> None:
    """torch's GradScaler refuses to unscale fp16 gradients ("Attempting to unscale FP16 gradients"),
    which --full_fp16 makes; let it, as kohya does (the unscaled values are checked for inf/NaN as usual)."""
    if scaler is None:
        return
    unscale = scaler._unscale_grads_

    def unscale_allowing_fp16(optimizer, inv_scale, found_inf, allow_fp16):
        return unscale(optimizer, inv_scale, found_inf, True)

    scaler._unscale_grads_ = unscale_allowing_fp16


def place_for_lowram(family, cfg) -> None:
    """--lowram on a CUDA machine: move the UNet and text encoders to this process's GPU right away."""
    if not cfg.lowram or not torch.cuda.is_available():
        return
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    for model in [family.unet, *family.text_encoders]:
        model.to(device)


def compile_unet(unet: torch.nn.Module, cfg) -> None:
    """--torch_compile: compile the UNet in place with --dynamo_backend (kohya: "no" compiles nothing)."""
    if not cfg.torch_compile:
        return
    backend = (cfg.dynamo_backend or "no").lower()
    if backend == "no":
        logger.warning("--torch_compile with --dynamo_backend no: nothing is compiled")
        return
    unet.compile(backend=backend)
    logger.info("U-Net compiled with torch.compile (backend %s); the first steps are slower", backend)
