"""Option table and config resolution: CLI > TOML > defaults, conversion, unknown keys, support, output_config."""

from __future__ import annotations

import argparse
import logging
import os

import pytest

from library.config import (
    convert, default_config, parse_args, parse_resolution, suggest, write_output_config,
)
from library.errors import UserError, run_cli
from library.options import SCRIPTS, OPTIONS, int_or_float, options_for

MODEL = ["--pretrained_model_name_or_path", "model.safetensors"]


def write(tmp_path, text: str, name: str = "cfg.toml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def error_of(argv) -> str:
    with pytest.raises(UserError) as info:
        parse_args(argv)
    return str(info.value)


# --- the table ------------------------------------------------------------------------------------

SDTUNE_OPTIONS = [
    "unsafe_load_ckpt", "skip_bad_images", "masked_loss_unmasked_weight", "masked_loss_unmasked_probability",
    "masked_loss_normalize", "text_encoder_train_epochs", "ema", "ema_decay", "ema_update_interval", "ema_device",
    "ema_save", "ema_sample", "embedding_token_string", "embedding_init_word", "embedding_num_vectors",
    "embedding_lr", "embedding_weights", "embedding_save",
]


def test_kohya_train_network_flag_count_is_195():
    # kohya's train_network.py has 193; sdxl_train_network.py adds the two text-encoder cache flags
    kohya = [o for o in OPTIONS if o.kohya and "train_network" in o.scripts]
    assert len(kohya) == 195
    assert [o.name for o in OPTIONS if not o.kohya] == SDTUNE_OPTIONS
    for script in SCRIPTS:  # a name may have a row per script (save_model_as: fine_tune's formats differ)
        names = [o.name for o in OPTIONS if script in o.scripts]
        assert len(set(names)) == len(names), script


def test_kohya_train_textual_inversion_flag_count_is_169():
    # kohya's setup_parser: the shared groups without caption dropout (3) and --weighted_captions, plus
    # --save_model_as, --no_half_vae and its six own options; sdtune adds its five dataset / masking rows
    kohya = [o for o in OPTIONS if o.kohya and "train_textual_inversion" in o.scripts]
    assert len(kohya) == 169
    assert [o.name for o in OPTIONS if not o.kohya and "train_textual_inversion" in o.scripts] == [
        "unsafe_load_ckpt", "skip_bad_images", "masked_loss_unmasked_weight", "masked_loss_unmasked_probability",
        "masked_loss_normalize"]
    assert options_for("train_textual_inversion")["save_model_as"].default == "safetensors"


@pytest.mark.parametrize("group, count", [
    ("logging", 3), ("sd_models", 4), ("model_spec", 11), ("dataset", 38), ("training", 76), ("masked_loss", 2),
    ("deepspeed", 9), ("optimizer", 16), ("config", 1), ("custom_train", 5), ("train_network", 28),
    ("sdxl_training", 2), ("train_textual_inversion", 6),
])
def test_flags_per_kohya_function(group, count):
    assert sum(1 for o in OPTIONS if o.group == group) == count


@pytest.mark.parametrize("name, type_, default, nargs, choices", [
    ("resolution", str, None, None, None),
    ("caption_extension", str, ".caption", None, None),
    ("max_train_steps", int, 1600, None, None),
    ("learning_rate", float, 2.0e-6, None, None),
    ("network_alpha", float, 1, None, None),
    ("lr_warmup_steps", int_or_float, 0, None, None),
    ("text_encoder_lr", float, None, "*", None),
    ("network_args", str, None, "*", None),
    ("optimizer_type", str, "", None, None),
    ("max_data_loader_n_workers", int, 8, None, None),
    ("save_model_as", str, "safetensors", None, (None, "ckpt", "pt", "safetensors")),
    ("mixed_precision", str, "no", None, ("no", "fp16", "bf16")),
    ("zero_stage", int, 2, None, (0, 1, 2, 3)),
    ("multires_noise_discount", float, 0.3, None, None),
    ("token_warmup_step", float, 0, None, None),
])
def test_kohya_types_and_defaults(name, type_, default, nargs, choices):
    opt = options_for("train_network")[name]
    assert (opt.type, opt.default, opt.nargs, opt.choices) == (type_, default, nargs, choices)


@pytest.mark.parametrize("opt", [o for o in OPTIONS if o.default not in (None, False) and not o.nargs],
                         ids=lambda o: o.name)
def test_every_default_survives_its_own_conversion(opt):
    assert convert(opt, str(opt.default)) == opt.default


def test_default_config_holds_every_option():
    cfg = default_config()
    assert len(options_for("train_network")) == 195 + len(SDTUNE_OPTIONS)
    assert len(vars(cfg)) == len({o.name for o in OPTIONS})  # other scripts' options too, at their defaults
    assert (cfg.train_batch_size, cfg.caption_extension, cfg.min_bucket_reso, cfg.max_bucket_reso) == (1, ".caption", 256, 1024)
    assert (cfg.bucket_reso_steps, cfg.cache_latents, cfg.network_args, cfg.unsafe_load_ckpt) == (64, False, None, False)
    assert vars(parse_args([])) == vars(cfg)


# --- command line -----------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, name, expected", [
    (["--cache_latents"], "cache_latents", True),
    (["--cache_latents=true"], "cache_latents", True),
    (["--cache_latents=false"], "cache_latents", False),
    (["--cache_latents", "no"], "cache_latents", False),
    (["--train_batch_size", "4"], "train_batch_size", 4),
    (["--learning_rate=1e-4"], "learning_rate", 1e-4),
    (["--network_alpha", "8"], "network_alpha", 8.0),
    (["--lr_warmup_steps", "100"], "lr_warmup_steps", 100),
    (["--lr_warmup_steps", "0.05"], "lr_warmup_steps", 0.05),
    (["--lr_warmup_steps", "5%"], "lr_warmup_steps", 0.05),
    (["--text_encoder_lr", "1e-5", "2e-5"], "text_encoder_lr", [1e-5, 2e-5]),
    (["--text_encoder_lr"], "text_encoder_lr", []),
    (["--network_args", "conv_dim=4", "conv_alpha=1"], "network_args", ["conv_dim=4", "conv_alpha=1"]),
    (["--max_token_length", "225"], "max_token_length", 225),
    (["--resolution", "512,768"], "resolution", "512,768"),
    (["--optimizer_type", "adamw8bit"], "optimizer_type", "adamw8bit"),
    (["--learning_r", "3e-4"], "learning_rate", 3e-4),  # argparse prefix matching, as kohya allows
    (["--caption_extention", ".txt"], "caption_extension", ".txt"),  # kohya's misspelt alias wins
])
def test_cli_values(argv, name, expected):
    value = getattr(parse_args(argv), name)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("argv, message", [
    (["--train_batch_size", "abc"], "--train_batch_size 'abc': expected an integer"),
    (["--train_batch_size", "1.5"], "--train_batch_size '1.5': expected an integer"),
    (["--lr_warmup_steps", "1.5"], "--lr_warmup_steps '1.5': expected a whole number of steps"),
    (["--cache_latents=maybe"], "--cache_latents 'maybe': expected true or false"),
    (["--mixed_precision", "fp32"], "--mixed_precision 'fp32': expected one of no, fp16, bf16"),
    (["--max_token_length", "100"], "--max_token_length 100: expected one of 75, 150, 225"),
    (["--learnig_rate", "1e-4"], "command line: unknown option --learnig_rate: did you mean --learning_rate?"),
    (["--cache_latnets=true"], "command line: unknown option --cache_latnets: did you mean --cache_latents?"),
    (["--cache_latent"], "command line: ambiguous option: --cache_latent could match --cache_latents, --cache_"),
    (["--frobnicate"], "command line: unknown option --frobnicate (see --help)"),
    (["stray"], "command line: unexpected argument 'stray'"),
    (["--seed"], "command line: argument --seed: expected one argument"),
    (["--network_train"], "command line: ambiguous option: --network_train could match"),
])
def test_cli_errors_are_one_line(argv, message):
    text = error_of(argv)
    assert text.startswith(message) and "\n" not in text


def test_run_cli_turns_errors_into_exit_code_2(capsys):
    assert run_cli(lambda argv: parse_args(argv) and 0, ["--learnig_rate", "1"]) == 2
    assert capsys.readouterr().err == "error: command line: unknown option --learnig_rate: did you mean --learning_rate?\n"


def test_help_still_works(capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(["--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0
    assert "--network_dim INT" in out and "--flip_aug [true|false]" in out
    assert "piecewise_constant, rex, adafactor]" in out and "[not supported yet]" in out


@pytest.mark.parametrize("typo, expected", [
    ("learnig_rate", "learning_rate"), ("seeds", "seed"), ("network-dim", "network_dim"),
    ("epoch", None), ("ae", None), ("totally_unrelated", None),
])
def test_suggest(typo, expected):
    assert suggest(typo, list(options_for("train_network"))) == expected


# --- config files --------------------------------------------------------------------------------------

def test_flat_toml_and_cli_precedence(tmp_path):
    path = write(tmp_path, 'learning_rate = 1e-4\ntrain_batch_size = 2\ncache_latents = true\nresolution = 512\n')
    cfg = parse_args(["--config_file", path, "--train_batch_size", "3", "--cache_latents=false"])
    assert (cfg.learning_rate, cfg.train_batch_size, cfg.cache_latents, cfg.resolution) == (1e-4, 3, False, "512")
    assert cfg.config_file == path


def test_toml_extension_is_appended(tmp_path):
    path = write(tmp_path, "seed = 42\n")
    assert parse_args(["--config_file", path[: -len(".toml")]]).seed == 42


def test_sectioned_toml_is_flattened_and_later_wins(tmp_path):
    path = write(tmp_path, '[model]\npretrained_model_name_or_path = "a.safetensors"\nseed = 1\n'
                           '[training]\nseed = 7\nnetwork_args = "conv_dim=4"\ntext_encoder_lr = [1e-5, 2e-5]\n')
    cfg = parse_args(["--config_file", path])
    assert (cfg.pretrained_model_name_or_path, cfg.seed) == ("a.safetensors", 7)
    assert cfg.network_args == ["conv_dim=4"] and cfg.text_encoder_lr == [1e-5, 2e-5]


def test_gui_written_values(tmp_path, caplog):
    """What bmaltais kohya_ss writes: ints for flags, max_token_length 75, dynamo_backend "no", GUI-only keys."""
    path = write(tmp_path, 'persistent_data_loader_workers = 1\nmax_token_length = 75\ndynamo_backend = "no"\n'
                           'epoch = 10\nnoise_offset_type = "Original"\nlowvram = false\nclip_l = "x"\n'
                           'lr_scheduler_num_cycles = 10\nsample_sampler = "euler_a"\nnetwork_args = []\n')
    with caplog.at_level(logging.WARNING, logger="library.config"):
        cfg = parse_args(["--config_file", path])
    assert (cfg.persistent_data_loader_workers, cfg.max_token_length, cfg.dynamo_backend) == (True, 75, "no")
    assert cfg.network_args == [] and not hasattr(cfg, "epoch")
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == [f"{path}: ignoring keys sdtune (like sd-scripts) does not use: "
                        "epoch, noise_offset_type, lowvram, clip_l"]


@pytest.mark.parametrize("text, message", [
    ("learnig_rate = 1e-4\n", "unknown option 'learnig_rate': did you mean --learning_rate?"),
    ("[a]\nlearnig_rate = 1e-4\n", "unknown option 'learnig_rate': did you mean --learning_rate?"),
    ("train_batch_size = 1.5\n", "train_batch_size = 1.5: expected an integer"),
    ("train_batch_size = true\n", "train_batch_size = True: expected an integer"),
    ("cache_latents = 2\n", "cache_latents = 2: expected true or false"),
    ("lr_warmup_steps = 10.5\n", "lr_warmup_steps = 10.5: expected a whole number of steps, or a ratio below 1 (or N%)"),
    ("resolution = [512, 768]\n", "resolution = [512, 768]: expected a string"),
    ('save_precision = "fp8"\n', "save_precision = 'fp8': expected one of float, fp16, bf16"),
    ("[a.b]\nseed = 1\n", "[a.b] is nested too deeply: options go at the top level or in one level of [section]"),
    ('[[datasets]]\nbatch_size = 1\n', "[[datasets]] is a dataset-config table; pass dataset files with --dataset_config"),
    ("seed = = 1\n", "not valid TOML: Invalid value (at line 1, column 8)"),
])
def test_toml_errors_name_the_file(tmp_path, text, message):
    path = write(tmp_path, text)
    assert error_of(["--config_file", path]) == f"{path}: {message}"


def test_missing_config_file(tmp_path):
    path = str(tmp_path / "nope")
    assert error_of(["--config_file", path]) == f"{path}.toml: config file not found"


# --- support and cross-checks ------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--mem_eff_attn"], "not supported yet: --mem_eff_attn"),
    (["--mem_eff_attn", "--async_upload"], "not supported yet: --async_upload, --mem_eff_attn"),
    (["--huggingface_repo_id", "me/lora"], "not supported yet: --huggingface_repo_id"),
    (["--deepspeed"], "not supported yet: --deepspeed"),
    (["--lr_scheduler", "no_such_schedule"], "not supported yet: --lr_scheduler no_such_schedule (supported: constant,"),
    (["--save_state_to_huggingface"], "not supported yet: --save_state_to_huggingface"),
    (["--log_with", "wandb"], "not supported yet: --log_with wandb"),
    (["--network_train_unet_only", "--network_train_text_encoder_only"], "--network_train_unet_only and"),
    (["--use_8bit_adam", "--optimizer_type", "AdamW"], "--use_8bit_adam and --optimizer_type AdamW both given"),
    (["--resolution", "512x512"], "--resolution '512x512': expected SIZE or WIDTH,HEIGHT"),
    (["--resolution", "512,512,512"], "--resolution '512,512,512': sizes must be positive and different"),
    (["--train_batch_size", "0"], "--train_batch_size 0: must be at least 1"),
    (["--clip_skip", "0"], "--clip_skip 0: must be at least 1"),
    (["--min_bucket_reso", "1024", "--max_bucket_reso", "512"], "--min_bucket_reso 1024 is above"),
    (["--network_dropout", "1.5"], "--network_dropout 1.5: must be between 0 and 1"),
])
def test_refusals_and_cross_checks(argv, message):
    assert error_of(argv).startswith(message)


@pytest.mark.parametrize("argv", [
    ["--v2=false", "--flip_aug=false", "--noise_offset_random_strength=false"],  # defaults, given explicitly
    ["--optimizer_type", "ADAMW8BIT", "--lr_scheduler", "cosine", "--save_model_as", "safetensors"],
    ["--huber_c", "0.2", "--sample_sampler", "euler_a", "--zero_stage", "3"],  # inert without their switch
    ["--lr_scheduler_args", "--optimizer_args", "weight_decay=0.1"],
])
def test_accepted(argv):
    assert isinstance(parse_args(argv), argparse.Namespace)


@pytest.mark.parametrize("text, expected", [("512", (512, 512)), ("512,768", (512, 768)), (" 640 , 448 ", (640, 448))])
def test_parse_resolution(text, expected):
    assert parse_resolution(text) == expected


# --- output_config -------------------------------------------------------------------------------------

ROUNDTRIP_ARGV = MODEL + [
    "--train_data_dir", "C:\\data\\\"quoted\" ü", "--resolution", "512,768", "--cache_latents",
    "--network_module", "networks.lora", "--network_dim", "8", "--network_alpha", "4",
    "--network_args", "conv_dim=4", "conv_alpha=1", "--text_encoder_lr", "5e-5",
    "--lr_warmup_steps", "0.1", "--max_train_steps", "20", "--seed", "3", "--training_comment", "line1\nline2",
]


def test_output_config_writes_non_defaults_and_reads_back(tmp_path):
    out = str(tmp_path / "out.toml")
    cfg = parse_args(ROUNDTRIP_ARGV + ["--output_config", out])
    assert cfg.output_config == out
    write_output_config(cfg, out)
    lines = open(out, encoding="utf-8").read().splitlines()
    assert len(lines) == 1 + 13 and lines[0].startswith("#")
    assert 'network_args = ["conv_dim=4", "conv_alpha=1"]' in lines and "lr_warmup_steps = 0.1" in lines
    assert "cache_latents = true" in lines and "network_alpha = 4.0" in lines
    back = parse_args(["--config_file", out])
    for name in ("config_file", "output_config"):
        delattr(back, name), delattr(cfg, name)
    assert vars(back) == vars(cfg)
    assert os.listdir(tmp_path) == ["out.toml"]  # no temporary file left behind


def test_output_config_refuses_to_overwrite(tmp_path):
    out = write(tmp_path, "seed = 1\n", "taken.toml")
    with pytest.raises(UserError, match="taken.toml: already exists"):
        write_output_config(parse_args(["--seed", "2"]), out)
    assert open(out).read() == "seed = 1\n"


def test_bare_output_config_targets_config_file_like_kohya(tmp_path):
    target = str(tmp_path / "new")  # does not exist: kohya writes it instead of reading it
    cfg = parse_args(["--seed", "5", "--output_config", "--config_file", target])
    assert (cfg.output_config, cfg.config_file, cfg.seed) == (target + ".toml", None, 5)
    assert error_of(["--output_config"]).startswith("--output_config needs a PATH")


@pytest.mark.parametrize("value,encoders,expected", [
    (None, 1, None), ([], 1, None), ([1e-4], 1, 1e-4), ([1e-4, 2e-4], 1, 1e-4),
    ([1e-4], 2, [1e-4, 1e-4]), ([1e-4, 2e-4], 2, [1e-4, 2e-4]), (5e-5, 1, 5e-5),
])
def test_text_encoder_lr_per_encoder(value, encoders, expected):
    from library.config import text_encoder_lr

    assert text_encoder_lr(value, encoders) == expected


def test_gui_off_values_of_unbuilt_features_are_accepted(tmp_path):
    # kohya_ss GUI files list every option; unused features hold "", 0 or []: kohya treats those as off.
    path = tmp_path / "gui.toml"
    path.write_text('sample_prompts = ""\nreg_data_dir = ""\ndataset_config = ""\nnoise_offset = 0\n'
                    'min_snr_gamma = 0\nlr_scheduler_args = []\nflip_aug = false\nvae = ""\n')
    cfg = parse_args(["--config_file", str(path)])
    assert cfg.noise_offset == 0.0 and cfg.sample_prompts == "" and cfg.lr_scheduler_args == []
    with pytest.raises(UserError, match=r"^not supported yet: --huggingface_repo_id$"):
        parse_args(["--config_file", str(path), "--huggingface_repo_id", "me/lora"])


@pytest.mark.parametrize("name", ["quickstart.toml", "sd15_lora.toml"])
def test_shipped_configs_use_only_supported_options(name):
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", name)
    cfg = parse_args(["--config_file", path])  # raises on unknown or not-yet-supported options
    assert cfg.network_module == "networks.lora" and cfg.config_file == path
