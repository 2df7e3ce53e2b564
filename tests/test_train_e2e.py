"""End to end: kohya command lines through `train_network.main`, on tiny models, asserting numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import train_network
from library.config import parse_args
from library.methods import NetworkMethod
from library.trainer import Run
from tests.conftest import files_under, train_argv

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _metadata(path: str) -> dict:
    with safe_open(path, "pt") as f:
        return f.metadata()


def test_folder_model_trains_and_saves_kohya_file(tiny_model_dir, demo_data, tmp_path):
    out = tmp_path / "out"
    # 9 images x 10 repeats in two buckets (70 + 20) at batch 8: 9 + 3 = 12 steps per epoch.
    argv = train_argv(tiny_model_dir, demo_data, str(out), "--save_every_n_epochs", "1", "--train_batch_size", "8",
                      "--max_train_epochs", "2", "--training_comment", "hello")
    assert train_network.main(argv) == 0
    names = sorted(os.listdir(out))
    assert "lora.safetensors" in names
    # kohya: no epoch file for the last epoch; the pre-flight report sits next to the outputs
    assert names == ["dataset_report.json", "dataset_report.txt", "lora-000001.safetensors", "lora.safetensors"]
    report = json.loads((out / "dataset_report.json").read_text())
    assert report["steps_per_epoch"] == 12 and report["total_steps"] == 24 and report["dropped_samples"] == 0
    sd = load_file(out / "lora.safetensors")
    assert sd and all(k.startswith(("lora_unet_", "lora_te_")) for k in sd)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_") for k in sd)
    modules = {k.split(".")[0] for k in sd}
    for m in modules:
        assert {f"{m}.lora_down.weight", f"{m}.lora_up.weight", f"{m}.alpha"} <= sd.keys()
    # The UNet up weights start at zero and must have moved: training reached the network.
    assert any(sd[k].abs().sum() > 0 for k in sd if k.startswith("lora_unet_") and k.endswith("lora_up.weight"))
    meta = _metadata(str(out / "lora.safetensors"))
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert meta["ss_training_comment"] == "hello"
    assert meta["ss_steps"] == "24" and meta["ss_epoch"] == "2" and meta["ss_num_batches_per_epoch"] == "12"
    assert meta["ss_seed"] == "1"
    assert meta["ss_output_name"] == "lora"
    assert json.loads(meta["ss_dataset_dirs"]) == {"10_shapes": {"n_repeats": 10, "img_count": 9}}
    assert len(meta["sshs_model_hash"]) == 64 and len(meta["sshs_legacy_hash"]) == 8
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"


def test_single_file_checkpoint_trains(tiny_single_file, demo_data, tmp_path):
    out = tmp_path / "out"
    assert train_network.main(train_argv(tiny_single_file, demo_data, str(out))) == 0
    meta = _metadata(str(out / "lora.safetensors"))
    assert meta["ss_sd_model_name"] == os.path.basename(tiny_single_file)
    assert len(meta["ss_new_sd_model_hash"]) == 64


def _eval_loss(run: Run, seed: int = 123) -> float:
    """Loss on fixed noise and timesteps over the whole dataset: comparable before and after training."""
    fam = run.family
    gen = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    run.network.eval()
    with torch.no_grad():
        for i in range(len(run.dataset)):
            batch = run.dataset[i]
            latents = batch["latents"]
            noise = torch.randn(latents.shape, generator=gen)
            t = torch.randint(0, 1000, (latents.shape[0],), generator=gen)
            noisy = fam.noise_scheduler.add_noise(latents, noise, t)
            emb = fam.encode_text(fam.tokenize(batch["captions"]))
            total += torch.nn.functional.mse_loss(fam.predict(noisy, t, emb), noise).item()
            count += 1
    return total / count


def test_loss_goes_down(tiny_model_dir, demo_data, tmp_path):
    argv = train_argv(tiny_model_dir, demo_data, str(tmp_path / "out"), "--cache_latents",
                      "--max_train_steps", "40", "--learning_rate", "5e-3", "--network_dim", "8")
    run = Run(parse_args(argv), NetworkMethod)
    run.prepare()
    run.dataset.set_epoch(0)
    before = _eval_loss(run)
    losses = run.train()
    after = _eval_loss(run)
    assert len(losses) == 40
    assert after < before * 0.9, (before, after)


def test_same_seed_same_weights(tiny_model_dir, demo_data, tmp_path):
    results = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert train_network.main(train_argv(tiny_model_dir, demo_data, str(out))) == 0
        results.append(load_file(out / "lora.safetensors"))
    assert results[0].keys() == results[1].keys()
    for k in results[0]:
        assert torch.equal(results[0][k], results[1][k]), k


def test_trained_file_loads_in_diffusers(tiny_model_dir, demo_data, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "out"
    argv = train_argv(tiny_model_dir, demo_data, str(out), "--network_args", "conv_dim=4", "conv_alpha=2")
    assert train_network.main(argv) == 0
    sd = load_file(out / "lora.safetensors")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, local_files_only=True)
    models = {"lora_unet_": pipe.unet, "lora_te_": pipe.text_encoder}
    before = {p: {k: v.clone() for k, v in m.state_dict().items()} for p, m in models.items()}
    pipe.load_lora_weights(str(out / "lora.safetensors"))
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # keeps the fused weights, restores the plain module names
    for prefix, model in models.items():
        changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[prefix][k])}
        in_file = {k.split(".")[0] for k in sd if k.startswith(prefix)}
        # every module of the file moved exactly one weight (LoRA has no bias) of the fused model
        assert len(changed) == len(in_file) > 0, prefix
        assert all(k.endswith(".weight") for k in changed)


def test_tensorboard_log_has_loss_and_lr(tiny_model_dir, demo_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = tmp_path / "logs"
    argv = train_argv(tiny_model_dir, demo_data, str(tmp_path / "out"), "--logging_dir", str(logs),
                      "--log_prefix", "run_")
    assert train_network.main(argv) == 0
    (run_dir,) = os.listdir(logs)
    assert run_dir.startswith("run_")
    acc = EventAccumulator(str(logs / run_dir / "network_train"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss/current", "loss/average", "lr/unet", "lr/textencoder"} <= tags
    assert len(acc.Scalars("loss/current")) == 4
    assert acc.Scalars("lr/unet")[0].value == pytest.approx(1e-3)


@pytest.mark.parametrize("flag,prefix", [("--network_train_unet_only", "lora_unet_"),
                                         ("--network_train_text_encoder_only", "lora_te_")])
def test_train_one_half_only(flag, prefix, tiny_model_dir, demo_data, tmp_path):
    sd = _train(tiny_model_dir, demo_data, tmp_path, flag, "--unet_lr", "2e-3", "--text_encoder_lr", "1e-4")
    assert sd and all(k.startswith(prefix) for k in sd)
    # the half that trained moved its up weights away from their zero init
    assert any(v.abs().sum() > 0 for k, v in sd.items() if k.endswith("lora_up.weight"))


def test_output_config_writes_and_is_read_back(tiny_model_dir, demo_data, tmp_path):
    out, config = tmp_path / "out", tmp_path / "saved.toml"
    argv = train_argv(tiny_model_dir, demo_data, str(out), "--network_args", "conv_dim=2", "--cache_latents")
    assert train_network.main([*argv, "--output_config", str(config)]) == 0
    assert config.is_file() and files_under(out) == []  # wrote the options, trained nothing
    read_back = vars(parse_args(["--config_file", str(config)]))
    assert read_back.pop("config_file") == str(config)
    assert read_back == {k: v for k, v in vars(parse_args(argv)).items() if k != "config_file"}
    assert train_network.main([*argv, "--output_config", str(config)]) == 2  # never overwrites


@pytest.mark.parametrize("launcher", ["python", "accelerate"])
def test_command_line_runs_unmodified(launcher, tiny_model_dir, demo_data, tmp_path):
    out = tmp_path / "out"
    config = tmp_path / "my_lora.toml"
    config.write_text(
        f'pretrained_model_name_or_path = "{tiny_model_dir}"\ntrain_data_dir = "{demo_data}"\n'
        f'output_dir = "{out}"\noutput_name = "cli"\nresolution = 64\nnetwork_module = "networks.lora"\n'
        'network_dim = 4\nmax_train_steps = 2\nmax_data_loader_n_workers = 0\n'
    )
    if launcher == "python":
        cmd = [sys.executable, "train_network.py"]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--cpu", "train_network.py"]
    proc = subprocess.run([*cmd, "--config_file", str(config)[:-5]], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "cli.safetensors").is_file()


BAD_INPUTS = [
    (["--pretrained_model_name_or_path", "runwayml/stable-diffusion-v1-5"], "offline"),
    (["--pretrained_model_name_or_path", "/nonexistent/model.safetensors"], "/nonexistent/model.safetensors"),
    (["--train_data_dir", "/nonexistent/data"], "/nonexistent/data"),
    (["--network_module", "no_such.module"], "no_such.module"),
    (["--optimizer_type", "NoSuchOpt"], "--optimizer_type NoSuchOpt: unknown optimizer"),
    (["--lr_scheduler", "no_such_schedule"], "not supported yet"),
    (["--adaptive_noise_scale", "0.1"], "--adaptive_noise_scale needs --noise_offset"),
    (["--full_fp16"], "--full_fp16 needs --mixed_precision fp16"),
    (["--dataset_config", "d.toml"], "--dataset_config d.toml: file not found"),
    (["--resume", "no_such_state"], "no_such_state"),
    (["--log_with", "wandb"], "not supported yet"),
    (["--mixed_precision", "fp16"], "fp16"),
    (["--network_args", "conv_dim"], "conv_dim"),
    (["--learnig_rate", "1e-4"], "--learning_rate"),
    (["--resolution", "64,abc"], "--resolution"),
    (["--caption_extension", ".txt", "--train_batch_size", "0"], "--train_batch_size"),
]


@pytest.mark.parametrize("extra,expected", BAD_INPUTS)
def test_bad_input_one_line_exit_2_nothing_written(extra, expected, tiny_model_dir, demo_data, tmp_path, capsys):
    out, logs = tmp_path / "out", tmp_path / "logs"
    argv = train_argv(tiny_model_dir, demo_data, str(out), "--logging_dir", str(logs), *extra)
    assert train_network.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert files_under(out) == [] and files_under(logs) == []


def test_ckpt_needs_opt_in(tmp_path, demo_data, capsys):
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}}, ckpt)
    assert train_network.main(train_argv(str(ckpt), demo_data, str(tmp_path / "out"))) == 2
    assert "--unsafe_load_ckpt" in capsys.readouterr().err


@pytest.mark.parametrize("script", ["fine_tune", "train_textual_inversion", "sdxl_train", "sdxl_train_network",
                                    "sdxl_train_textual_inversion"])
def test_every_script_names_what_is_missing(capsys, script):
    """Every entry script is built: without options it names what is missing, in one line."""
    import importlib

    assert importlib.import_module(script).main([]) == 2
    assert capsys.readouterr().err.strip() == "error: --pretrained_model_name_or_path is required"


def _train(tiny_model_dir, demo_data, out, *extra) -> dict:
    assert train_network.main(train_argv(tiny_model_dir, demo_data, str(out), *extra)) == 0
    return load_file(out / "lora.safetensors")


def test_gradient_checkpointing_gives_the_same_weights(tiny_model_dir, demo_data, tmp_path):
    plain = _train(tiny_model_dir, demo_data, tmp_path / "a")
    checkpointed = _train(tiny_model_dir, demo_data, tmp_path / "b", "--gradient_checkpointing")
    for k in plain:
        assert torch.allclose(plain[k], checkpointed[k], atol=1e-6), k


def test_accumulation_counts_optimizer_steps(tiny_model_dir, demo_data, tmp_path):
    _train(tiny_model_dir, demo_data, tmp_path, "--gradient_accumulation_steps", "2", "--max_train_steps", "3")
    meta = _metadata(str(tmp_path / "lora.safetensors"))
    assert meta["ss_steps"] == "3" and meta["ss_gradient_accumulation_steps"] == "2"


def test_network_weights_resume_with_tiny_lr_is_identity(tiny_model_dir, demo_data, tmp_path):
    first = _train(tiny_model_dir, demo_data, tmp_path / "a", "--network_args", "conv_dim=2")
    again = _train(tiny_model_dir, demo_data, tmp_path / "b", "--network_args", "conv_dim=2",
                   "--network_weights", str(tmp_path / "a" / "lora.safetensors"), "--learning_rate", "1e-30")
    assert first.keys() == again.keys()
    for k in first:  # (a learning rate of 0 would freeze the network: kohya's rule, and ours)
        assert torch.allclose(first[k], again[k], rtol=0, atol=1e-20), k


def test_bf16_training_and_fp16_save(tiny_model_dir, demo_data, tmp_path):
    sd = _train(tiny_model_dir, demo_data, tmp_path, "--mixed_precision", "bf16", "--save_precision", "fp16")
    assert {t.dtype for t in sd.values()} == {torch.float16}
    assert all(torch.isfinite(t.float()).all() for t in sd.values())
    assert _metadata(str(tmp_path / "lora.safetensors"))["ss_mixed_precision"] == "bf16"


def test_text_options_and_8bit_optimizer_reach_metadata(tiny_model_dir, demo_data, tmp_path):
    _train(tiny_model_dir, demo_data, tmp_path, "--clip_skip", "2", "--max_token_length", "150",
           "--optimizer_type", "AdamW8bit", "--network_dropout", "0.1", "--max_grad_norm", "0.5",
           "--metadata_title", "My LoRA", "--metadata_author", "me", "--metadata_trigger_phrase", "sks shape",
           "--shuffle_caption", "--keep_tokens", "1", "--caption_dropout_rate", "0.1", "--enable_wildcard",
           "--weighted_captions")
    meta = _metadata(str(tmp_path / "lora.safetensors"))
    assert meta["modelspec.title"] == "My LoRA" and meta["modelspec.author"] == "me"
    assert meta["modelspec.trigger_phrase"] == "sks shape" and meta["modelspec.encoder_layer"] == "2"
    assert meta["ss_shuffle_caption"] == "True" and meta["ss_keep_tokens"] == "1"
    assert meta["ss_caption_dropout_rate"] == "0.1"
    assert meta["ss_clip_skip"] == "2" and meta["ss_max_token_length"] == "150"
    assert meta["ss_optimizer"].startswith("bitsandbytes.optim.adamw.AdamW8bit")
    assert meta["ss_network_dropout"] == "0.1" and meta["ss_max_grad_norm"] == "0.5"


def test_no_metadata_keeps_only_kohyas_minimum(tiny_model_dir, demo_data, tmp_path):
    _train(tiny_model_dir, demo_data, tmp_path, "--no_metadata")
    meta = _metadata(str(tmp_path / "lora.safetensors"))
    assert "ss_steps" not in meta and "ss_dataset_dirs" not in meta
    assert meta["ss_network_module"] == "networks.lora" and "sshs_model_hash" in meta


def test_warmup_ratio_in_logged_learning_rate(tiny_model_dir, demo_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = tmp_path / "logs"
    _train(tiny_model_dir, demo_data, tmp_path / "out", "--lr_scheduler", "constant_with_warmup",
           "--lr_warmup_steps", "0.5", "--logging_dir", str(logs), "--unet_lr", "2e-3")
    (run_dir,) = os.listdir(logs)
    acc = EventAccumulator(str(logs / run_dir / "network_train"))
    acc.Reload()
    # 4 steps, warmup ceil(0.5 * 4) = 2: the lr logged after steps 1..4 is 1/2, 2/2, 2/2, 2/2 of the peak
    assert [e.value for e in acc.Scalars("lr/unet")] == pytest.approx([1e-3, 2e-3, 2e-3, 2e-3])
    assert [e.value for e in acc.Scalars("lr/textencoder")] == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3])


def test_loader_workers_give_the_same_weights(tiny_model_dir, demo_data, tmp_path):
    # Without a latent cache, batches are decoded by DataLoader workers; epoch 2 must be re-planned
    # inside the (persistent) workers exactly as the main process would.
    extra = ("--max_train_epochs", "2", "--train_batch_size", "8")
    main_process = _train(tiny_model_dir, demo_data, tmp_path / "a", *extra)
    workers = _train(tiny_model_dir, demo_data, tmp_path / "b", *extra, "--max_data_loader_n_workers", "2",
                     "--persistent_data_loader_workers")
    for k in main_process:
        assert torch.equal(main_process[k], workers[k]), k


@pytest.mark.parametrize("workers", ["0", "2"])
def test_corrupt_image_mid_run_is_one_line(workers, tiny_model_dir, demo_data, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    image = sorted((data / "10_shapes").glob("*.png"))[0]
    # the header and the IEND end still read, so the scan-time check passes; decoding fails mid-run
    image.write_bytes(image.read_bytes()[:200] + image.read_bytes()[-12:])
    out = tmp_path / "out"
    argv = train_argv(tiny_model_dir, str(data), str(out), "--max_train_steps", "60", "--train_batch_size", "1",
                      "--max_data_loader_n_workers", workers)
    assert train_network.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.replace("\r", "\n").strip().splitlines()[-1] == f"error: cannot decode image {image}: image file is truncated"
    # found mid-run: only the pre-flight report was written, no model file
    assert [os.path.basename(f) for f in files_under(out)] == ["dataset_report.json", "dataset_report.txt"]


def test_dataset_network_multiplier_is_applied_per_batch(tiny_model_dir, demo_data, tmp_path):
    config = tmp_path / "ds.toml"
    config.write_text(f'[general]\nresolution = 64\n[[datasets]]\nnetwork_multiplier = 0.25\n  [[datasets.subsets]]\n'
                      f'  image_dir = "{os.path.join(demo_data, "10_shapes")}"\n  num_repeats = 1\n'
                      f'[[datasets]]\n  [[datasets.subsets]]\n  image_dir = "{os.path.join(demo_data, "10_shapes")}"\n'
                      '  num_repeats = 1\n')
    argv = [a for a in train_argv(tiny_model_dir, "", str(tmp_path / "out")) if a not in ("--train_data_dir", "")]
    run = Run(parse_args([*argv, "--dataset_config", str(config)]), NetworkMethod)
    run.prepare()
    seen = set()
    for i in range(len(run.dataset)):
        batch = run.dataset[(0, i)]
        run.step_loss(batch)
        seen.add(batch["network_multiplier"])
        assert {lora.multiplier for lora in run.method.module.loras} == {batch["network_multiplier"]}
    assert seen == {0.25, 1.0}
