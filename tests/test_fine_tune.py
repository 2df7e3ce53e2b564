"""fine_tune.py: full U-Net (+ text encoder) training on the shared loop, and checkpoint saving
(library/full_model.py)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from diffusers import UNet2DConditionModel
from library import trainer
from library.config import parse_args
from library.errors import UserError
from library.full_model import (FullModelMethod, parse_block_lr, resolve_save_format, sdxl_block_index,
                                text_encoder_rates)
from library.models import single_file
from library.models.synthetic import build_sd1_pipeline_folder
from tests.test_dataset import write_image



@pytest.fixture
def ft_data(tmp_path):
    """imgs/ with four 64x64 images and kohya's metadata JSON for them."""
    meta = {}
    for i in range(4):
        write_image(str(tmp_path / "imgs" / f"im{i}.png"), (64, 64), value=40 * i)
        meta[f"im{i}"] = {"caption": f"a picture number {i}", "tags": "red, square"}
    (tmp_path / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    return tmp_path


def ft_argv(model, root, *extra) -> list[str]:
    """A kohya fine_tune command line for the tiny model."""
    return ["--pretrained_model_name_or_path", model, "--in_json", str(root / "meta.json"),
            "--train_data_dir", str(root / "imgs"), "--output_dir", str(root / "out"), "--resolution", "64",
            "--learning_rate", "1e-3", "--max_train_steps", "3", "--train_batch_size", "2", "--seed", "1",
            "--max_data_loader_n_workers", "0", "--optimizer_type", "AdamW", *extra]


def ft_cfg(model, root, *extra, **options):
    """fine_tune's resolved options for ft_argv, with `options` set on top."""
    cfg = parse_args(ft_argv(model, root, *extra), "fine_tune")
    for name, value in options.items():
        setattr(cfg, name, value)
    return cfg


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed(before: dict, model) -> int:
    after = model.state_dict()
    return sum(not torch.equal(before[k], after[k].to(before[k].dtype)) for k in before)


def max_diff(a, b) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    return max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa)


def train_run(cfg) -> trainer.Run:
    run = trainer.Run(cfg, FullModelMethod)
    run.train()
    return run


@pytest.fixture(scope="module")
def sd1_file(tmp_path_factory):
    """A tiny SD1 single file of its own (tests may not share the session one's folder state)."""
    from library.models.synthetic import write_sd1_single_file

    folder = str(tmp_path_factory.mktemp("ftmodels") / "sd1")
    build_sd1_pipeline_folder(folder, size="tiny", seed=0)
    path = str(tmp_path_factory.mktemp("ftmodels") / "sd1.safetensors")
    write_sd1_single_file(folder, path)
    return folder, path


# --- pure helpers ---------------------------------------------------------------------------------------

def test_save_format_follows_kohya_with_a_safer_default():
    assert resolve_save_format(None, False, True) == "safetensors"  # kohya: a pickled .ckpt
    assert resolve_save_format(None, False, False) == "diffusers"
    assert resolve_save_format(None, True, False) == "diffusers_safetensors"
    assert resolve_save_format("ckpt", True, False) == "safetensors"
    assert resolve_save_format("CKPT", False, False) == "ckpt"
    with pytest.raises(UserError, match="pt"):
        resolve_save_format("pt", False, True)


def test_text_encoder_rates():
    class C:
        learning_rate, learning_rate_te, learning_rate_te1, learning_rate_te2 = 1e-5, None, None, None

    cfg = C()
    assert text_encoder_rates(cfg, 1) == [1e-5]
    cfg.learning_rate_te = 2e-6
    assert text_encoder_rates(cfg, 1) == [2e-6]
    assert text_encoder_rates(cfg, 2) == [2e-6, 2e-6]
    cfg.learning_rate_te2 = 0.0
    assert text_encoder_rates(cfg, 2) == [2e-6, 0.0]
    with pytest.raises(UserError, match="learning_rate_te"):
        text_encoder_rates(cfg, 1)


def test_sdxl_blocks_are_kohyas_23():
    assert sdxl_block_index("time_embed.0.weight") == 0
    assert sdxl_block_index("label_emb.0.0.bias") == 0
    assert sdxl_block_index("input_blocks.8.0.in_layers.2.weight") == 9
    assert sdxl_block_index("middle_block.2.out_layers.3.weight") == 12
    assert sdxl_block_index("output_blocks.0.1.proj_in.weight") == 13
    assert sdxl_block_index("out.2.weight") == 22
    assert parse_block_lr(",".join(["1e-6"] * 23), "sdxl") == [1e-6] * 23
    with pytest.raises(UserError, match="23 values"):
        parse_block_lr("1e-6,2e-6", "sdxl")
    with pytest.raises(UserError, match="SDXL"):
        parse_block_lr(",".join(["1e-6"] * 23), "sd1")


# --- SD1 end to end through the loop ------------------------------------------------------------------------

def test_unet_trains_text_encoder_stays_and_the_file_reloads(sd1_file, ft_data):
    folder, path = sd1_file
    cfg = ft_cfg(path, ft_data)
    run = trainer.Run(cfg, FullModelMethod)
    fam = run.family
    unet0, te0 = snapshot(fam.unet), snapshot(fam.text_encoders[0])
    losses = run.train()
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert changed(unet0, fam.unet) > 0.9 * len(unet0)  # (nearly) every U-Net tensor moved
    assert changed(te0, fam.text_encoders[0]) == 0  # frozen: bitwise
    assert all(p.dtype == torch.float32 for p in fam.unet.parameters())
    saved = str(ft_data / "out" / "last.safetensors")
    assert cfg.save_model_as == "safetensors" and os.path.isfile(saved)

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_single_file(saved, config=folder, local_files_only=True)
    assert max_diff(pipe.unet, fam.unet) == 0.0
    assert max_diff(pipe.text_encoder, fam.text_encoders[0]) == 0.0
    _, ours = single_file.load_model(saved)
    assert max_diff(ours["unet"], fam.unet) == 0.0


def test_loss_of_a_fixed_batch_goes_down(sd1_file, ft_data):
    _, path = sd1_file
    cfg = ft_cfg(path, ft_data, "--max_train_steps", "8", "--learning_rate", "3e-3")
    run = trainer.Run(cfg, FullModelMethod)
    run.prepare()
    batch = next(iter(run.loader))

    def fixed_loss() -> float:
        torch.manual_seed(5)
        with torch.no_grad():
            return run.step_loss(batch).item()

    before = fixed_loss()
    run.train()
    after = fixed_loss()
    assert after < before, (before, after)


def test_train_text_encoder_changes_it(sd1_file, ft_data):
    _, path = sd1_file
    cfg = ft_cfg(path, ft_data, train_text_encoder=True, learning_rate_te=5e-3)
    run = trainer.Run(cfg, FullModelMethod)
    te0 = snapshot(run.family.text_encoders[0])
    groups, names = run.method.param_groups()
    assert names == ["unet", "textencoder"] and [g["lr"] for g in groups] == [1e-3, 5e-3]
    run.train()
    assert changed(te0, run.family.text_encoders[0]) > 0
    saved = str(ft_data / "out" / "last.safetensors")
    _, ours = single_file.load_model(saved)
    assert max_diff(ours["text_encoders"][0], run.family.text_encoders[0]) == 0.0


def test_bf16_keeps_trained_weights_float32_and_saves_fp16(sd1_file, ft_data):
    _, path = sd1_file
    cfg = ft_cfg(path, ft_data, "--mixed_precision", "bf16", "--save_precision", "fp16")
    run = train_run(cfg)
    assert {p.dtype for p in run.family.unet.parameters()} == {torch.float32}
    assert {p.dtype for p in run.family.text_encoders[0].parameters()} == {torch.bfloat16}  # frozen: halved
    tensors = load_file(str(ft_data / "out" / "last.safetensors"))
    assert {t.dtype for t in tensors.values() if t.is_floating_point()} == {torch.float16}


def test_bf16_run_does_not_round_the_trained_weights(sd1_file, ft_data):
    _, path = sd1_file
    _, base = single_file.load_model(path)
    cfg = ft_cfg(path, ft_data, "--mixed_precision", "bf16", train_text_encoder=True)
    run = trainer.Run(cfg, FullModelMethod)  # built, not trained: the weights are the file's
    assert max_diff(run.family.unet, base["unet"]) == 0.0
    assert max_diff(run.family.text_encoders[0], base["text_encoders"][0]) == 0.0


def test_ckpt_and_diffusers_formats(sd1_file, ft_data, tmp_path):
    _, path = sd1_file
    run = train_run(ft_cfg(path, ft_data, "--max_train_steps", "1"))
    fam = run.family
    run.method.format = "ckpt"
    ckpt = str(tmp_path / "model.ckpt")
    run.method.save(ckpt, None, None)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    single = load_file(str(ft_data / "out" / "last.safetensors"))
    assert set(state) == set(single) and all(torch.equal(state[k], single[k]) for k in single)

    from diffusers import StableDiffusionPipeline

    for fmt, weights in (("diffusers", "diffusion_pytorch_model.bin"),
                         ("diffusers_safetensors", "diffusion_pytorch_model.safetensors")):
        run.method.format = fmt
        out = str(tmp_path / fmt)
        run.method.save(out, None, None)
        assert os.path.isfile(os.path.join(out, "unet", weights))
        assert not os.path.exists(os.path.join(tmp_path, f".{fmt}.partial"))
        pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
        assert max_diff(pipe.unet, fam.unet) == 0.0
        assert max_diff(pipe.text_encoder, fam.text_encoders[0]) == 0.0
        assert pipe.tokenizer("a cat").input_ids == fam.tokenizers[0]("a cat").input_ids
    run.method.format = "diffusers_safetensors"
    half = str(tmp_path / "half")
    run.method.save(half, torch.float16, None)
    weights = load_file(os.path.join(half, "unet", "diffusion_pytorch_model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.float16}
    pipe = StableDiffusionPipeline.from_pretrained(half, local_files_only=True, torch_dtype=torch.float16)
    assert 0 < max_diff(pipe.unet, fam.unet) < 1e-2


def test_ema_saves_the_averaged_weights(sd1_file, ft_data):
    _, path = sd1_file
    cfg = ft_cfg(path, ft_data, "--max_train_steps", "4")
    cfg.ema, cfg.ema_decay, cfg.ema_save = True, 0.5, "both"
    run = train_run(cfg)
    raw = load_file(str(ft_data / "out" / "last.safetensors"))
    ema = load_file(str(ft_data / "out" / "last-ema.safetensors"))
    key, name = "model.diffusion_model.out.2.weight", "0.conv_out.weight"
    assert torch.equal(ema[key], run.ema.averages[name])
    assert torch.equal(raw[key], run.family.unet.conv_out.weight.detach())
    assert not torch.equal(raw[key], ema[key])


@pytest.mark.parametrize("extra", [
    ("--optimizer_type", "Adafactor", "--optimizer_args", "relative_step=False", "scale_parameter=False",
     "warmup_init=False", "--gradient_checkpointing"),
    ("--gradient_accumulation_steps", "2", "--gradient_checkpointing", "--max_grad_norm", "0.5"),
])
def test_optimizers_checkpointing_and_accumulation(sd1_file, ft_data, extra):
    _, path = sd1_file
    cfg = ft_cfg(path, ft_data, "--max_train_steps", "2", *extra, train_text_encoder=True)
    run = trainer.Run(cfg, FullModelMethod)
    unet0, te0 = snapshot(run.family.unet), snapshot(run.family.text_encoders[0])
    losses = run.train()
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert run.family.unet.is_gradient_checkpointing
    assert changed(unet0, run.family.unet) > 0 and changed(te0, run.family.text_encoders[0]) > 0


def test_nothing_to_train_is_refused(sd1_file, ft_data):
    _, path = sd1_file
    with pytest.raises(UserError, match="nothing to train"):
        trainer.Run(ft_cfg(path, ft_data, "--learning_rate", "0"), FullModelMethod)


# --- SDXL ----------------------------------------------------------------------------------------------------

def test_sdxl_per_encoder_rates_and_block_lr(tiny_sdxl_dir, ft_data, tmp_path):
    rates = ["0"] * 22 + ["1e-3"]  # only the `out` block trains
    cfg = ft_cfg(tiny_sdxl_dir, ft_data, "--max_train_steps", "2", train_text_encoder=True,
                 learning_rate_te1=0.0, learning_rate_te2=5e-3, block_lr=",".join(rates))
    run = trainer.Run(cfg, FullModelMethod)
    fam = run.family
    unet0, te10, te20 = snapshot(fam.unet), snapshot(fam.text_encoders[0]), snapshot(fam.text_encoders[1])
    run.train()
    moved = {k for k in unet0 if not torch.equal(unet0[k], fam.unet.state_dict()[k])}
    assert moved == {"conv_norm_out.weight", "conv_norm_out.bias", "conv_out.weight", "conv_out.bias"}
    assert changed(te10, fam.text_encoders[0]) == 0 and changed(te20, fam.text_encoders[1]) > 0
    assert cfg.save_model_as == "diffusers"  # a folder model saves a folder by default
    out = str(ft_data / "out" / "sdxl.safetensors")
    run.method.format = "safetensors"
    run.method.save(out, None, None)
    _, ours = single_file.load_model(out)
    assert max_diff(ours["unet"], fam.unet) == 0.0
    assert max_diff(ours["text_encoders"][1], fam.text_encoders[1]) == 0.0


# --- fine_tune.py itself (once its options are wired) -------------------------------------------------------

def test_fine_tune_main_writes_a_checkpoint(sd1_file, ft_data):
    import fine_tune

    folder, path = sd1_file
    assert fine_tune.main(ft_argv(path, ft_data, "--output_name", "ft")) == 0
    saved = str(ft_data / "out" / "ft.safetensors")
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_single_file(saved, config=folder, local_files_only=True)
    base = StableDiffusionPipeline.from_single_file(path, config=folder, local_files_only=True)
    assert max_diff(pipe.unet, base.unet) > 0 and max_diff(pipe.text_encoder, base.text_encoder) == 0.0


def test_fine_tune_main_diffusers_folder(sd1_file, ft_data):
    import fine_tune

    _, path = sd1_file
    assert fine_tune.main(ft_argv(path, ft_data, "--save_model_as", "diffusers", "--use_safetensors",
                                  "--train_text_encoder")) == 0
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(ft_data / "out" / "last"), local_files_only=True)
    assert os.path.isfile(str(ft_data / "out" / "last" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert pipe.unet is not None


def test_fine_tune_saves_folders_per_epoch_and_keeps_the_last_n(sd1_file, ft_data):
    import fine_tune

    _, path = sd1_file
    argv = ft_argv(path, ft_data, "--save_model_as", "diffusers_safetensors", "--max_train_epochs", "3",
                   "--save_every_n_epochs", "1", "--save_last_n_epochs", "1", "--output_name", "ft")
    assert fine_tune.main(argv) == 0
    out = ft_data / "out"
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["ft", "ft-000002"]
    assert os.path.isfile(out / "ft" / "model_index.json")


def test_fine_tune_refuses_reg_data_dir(sd1_file, ft_data, capsys):
    import fine_tune

    _, path = sd1_file
    assert fine_tune.main(ft_argv(path, ft_data, "--reg_data_dir", str(ft_data))) == 2
    assert not os.path.exists(ft_data / "out")


def test_sdxl_cached_text_encoder_outputs_train_the_unet(tiny_sdxl_dir, ft_data, capsys):
    """kohya's sdxl_train.py low-memory path: the U-Net trains on text-encoder outputs encoded once."""
    import sdxl_train

    argv = ft_argv(tiny_sdxl_dir, ft_data, "--cache_text_encoder_outputs", "--save_model_as", "diffusers_safetensors")
    assert sdxl_train.main(argv) == 0
    unet = UNet2DConditionModel.from_pretrained(str(ft_data / "out" / "last"), subfolder="unet")
    base = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")
    assert max_diff(unet, base) > 0
    assert sdxl_train.main(argv + ["--train_text_encoder"]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "--cache_text_encoder_outputs cannot be used with --train_text_encoder: a text encoder that trains "
        "cannot use outputs encoded once (kohya refuses it too)")
