"""Shared fixtures: tiny SD1 models built from configs in code, a generated dataset, argv helpers."""

from __future__ import annotations

import logging
import os
import warnings

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A tiny SD1-architecture diffusers folder (UNet, VAE, CLIP, tokenizer, scheduler)."""
    from library.models.synthetic import build_sd1_pipeline_folder

    path = str(tmp_path_factory.mktemp("models") / "tiny_sd1")
    build_sd1_pipeline_folder(path, size="tiny", seed=0)
    return path


@pytest.fixture(scope="session")
def tiny_single_file(tiny_model_dir, tmp_path_factory) -> str:
    """The same tiny model as one original-layout (LDM) .safetensors file."""
    from library.models.synthetic import write_sd1_single_file

    path = str(tmp_path_factory.mktemp("models") / "tiny_sd1.safetensors")
    write_sd1_single_file(tiny_model_dir, path)
    return path


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> str:
    """The demo dataset: `10_shapes/` with captioned PNGs."""
    from library.dataset.demo_data import make_demo_dataset

    path = str(tmp_path_factory.mktemp("data") / "train")
    make_demo_dataset(path, seed=0)
    return path


def train_argv(model: str, data: str, out: str, *extra: str) -> list[str]:
    """A short kohya-style command line for the tiny model (tests add their own flags)."""
    return [
        "--pretrained_model_name_or_path", model,
        "--train_data_dir", data,
        "--output_dir", out,
        "--output_name", "lora",
        "--resolution", "64",
        "--network_module", "networks.lora",
        "--network_dim", "4",
        "--network_alpha", "2",
        "--learning_rate", "1e-3",
        "--max_train_steps", "4",
        "--train_batch_size", "2",
        "--seed", "1",
        "--max_data_loader_n_workers", "0",
        *extra,
    ]


def files_under(path) -> list[str]:
    """Every file below `path` (empty when it does not exist): 'nothing written' checks."""
    found = []
    for root, _, names in os.walk(path):
        found += [os.path.join(root, n) for n in names]
    return sorted(found)


# --- diffusers interop: load a LoRA file with load_lora_weights, fuse, compare with our own change ---

def pipeline_models(pipe) -> dict[str, torch.nn.Module]:
    models = {"text_encoder": pipe.text_encoder, "unet": pipe.unet}
    if getattr(pipe, "text_encoder_2", None) is not None:
        models["text_encoder_2"] = pipe.text_encoder_2
    return models


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def load_fuse_and_compare(pipe, path: str, deltas: dict, capfd) -> None:
    """diffusers' load_lora_weights takes every key of `path` (no warning, no unexpected key), adapts exactly
    the layers in `deltas`, and fusing gives W + delta for those and leaves every other weight as it was."""
    models = pipeline_models(pipe)
    base = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in models.items()}
    records = _Records()
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers", "peft")]
    for logger in loggers:
        logger.addHandler(records)
    capfd.readouterr()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(path)  # raises on a key it cannot rename
    finally:
        for logger in loggers:
            logger.removeHandler(records)
    assert not [str(w.message) for w in caught if "did not match" in str(w.message)]
    assert "UNEXPECTED" not in capfd.readouterr().err
    assert not [m for m in records.messages if "unexpected" in m.lower() or "did not match" in m]
    adapted = {(name, p) for name, m in models.items() for p, sub in m.named_modules() if hasattr(sub, "lora_A")}
    assert adapted == set(deltas)

    pipe.fuse_lora()
    pipe.unload_lora_weights()
    for name, model in models.items():
        fused = model.state_dict()
        assert fused.keys() == base[name].keys()
        for key, weight in fused.items():
            module_path = key.rpartition(".")[0]
            if key.endswith(".weight") and (name, module_path) in deltas:
                want = base[name][key] + deltas[(name, module_path)]
                torch.testing.assert_close(weight, want, atol=2e-6, rtol=0, msg=key)
            else:
                assert torch.equal(weight, base[name][key]), key


# --- H1: SD2 fixtures ---

@pytest.fixture(scope="session")
def tiny_sd2_dir(tmp_path_factory) -> str:
    """A tiny SD 2.x diffusers folder (linear projections, gelu CLIP, pad "!"), epsilon prediction."""
    from library.models.synthetic import build_sd2_pipeline_folder

    path = str(tmp_path_factory.mktemp("models") / "tiny_sd2")
    build_sd2_pipeline_folder(path, size="tiny", seed=0)
    return path


@pytest.fixture(scope="session")
def tiny_sd2_v_dir(tmp_path_factory) -> str:
    """The same tiny SD 2.x model whose scheduler config says prediction_type v_prediction (a 768-v)."""
    from library.models.synthetic import build_sd2_pipeline_folder

    path = str(tmp_path_factory.mktemp("models") / "tiny_sd2_v")
    build_sd2_pipeline_folder(path, size="tiny", seed=0, v_prediction=True)
    return path


# --- H2: tiny SDXL fixtures ---

@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory) -> str:
    """A tiny SDXL diffusers folder (two text encoders and tokenizers, size / crop time embedding)."""
    from library.models.synthetic_sdxl import build_sdxl_pipeline_folder

    path = str(tmp_path_factory.mktemp("models") / "tiny_sdxl")
    build_sdxl_pipeline_folder(path, size="tiny", seed=0)
    return path
