"""The optimizer table: every name builds and steps, its state round-trips bitwise, and bad arguments
are one-line errors naming the optimizer."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from library import optim
from library.config import default_config, parse_args
from library.errors import UserError

pytestmark = pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")


def _cfg(**kw):
    cfg = default_config()
    cfg.learning_rate = 1e-3
    for key, value in kw.items():
        setattr(cfg, key, value)
    return cfg


def _params():
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(4, 64, generator=gen) * 0.1), torch.nn.Parameter(torch.randn(3, generator=gen))]


def _step(optimizer, params, k: int) -> None:
    for p in params:
        p.grad = torch.sin(p.detach() * (k + 3))  # a different, deterministic gradient each step
    optimizer.step()


# These leave the weights unchanged for their first steps by design: RAdam's rectification holds the
# update back early on, and D-Adaptation SGD starts from a step size of 1e-6 x lr.
SLOW_STARTERS = {"RAdamScheduleFree", "DAdaptSGD"}


@pytest.mark.parametrize("row", optim._ROWS, ids=lambda row: row.name)
def test_every_optimizer_steps_and_state_round_trips_bitwise(row):
    cfg = _cfg(optimizer_type=row.name.upper())  # names match in any case
    params = _params()
    start = [p.detach().clone() for p in params]
    opt = optim.build_optimizer(cfg, [{"params": params, "lr": 1e-3}])
    assert type(opt).__name__ == row.path.split(":")[1]
    for k in range(2):
        _step(opt, params, k)
    assert opt.state or row.name == "SGD", row.name  # plain SGD (no momentum) keeps no state
    if row.name not in SLOW_STARTERS:
        assert not torch.equal(start[0], params[0].detach())
    saved, snapshot = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in params]
    _step(opt, params, 2)
    fresh = [torch.nn.Parameter(t.clone()) for t in snapshot]
    again = optim.build_optimizer(cfg, [{"params": fresh, "lr": 1e-3}])
    again.load_state_dict(saved)
    _step(again, fresh, 2)
    for a, b in zip(params, fresh):
        assert torch.equal(a.detach(), b.detach())


@pytest.mark.parametrize("name, cls, extra", [
    ("SGDNesterov", "SGD", {"momentum": 0.9, "nesterov": True}),
    ("sgd_nesterov_8bit", "SGD8bit", {"betas": (0.9, 0)}),  # bitsandbytes keeps momentum in betas
    ("ADAMW_8BIT", "AdamW8bit", {}),  # OneTrainer's spelling
    ("nadam", "NAdam", {}),  # kohya: any other bare name is read from torch.optim
    ("torch.optim.Adamax", "Adamax", {}),
    ("pytorch_optimizer.Lamb", "Lamb", {}),
])
def test_names_aliases_and_class_paths(name, cls, extra):
    opt = optim.build_optimizer(_cfg(optimizer_type=name), _params())
    assert type(opt).__name__ == cls
    assert {k: opt.param_groups[0][k] for k in extra} == extra


def test_legacy_flags():
    assert optim.optimizer_name(_cfg(use_8bit_adam=True, optimizer_type="")) == "AdamW8bit"
    assert optim.optimizer_name(_cfg(use_lion_optimizer=True, optimizer_type="")) == "Lion"
    assert type(optim.build_optimizer(_cfg(use_lion_optimizer=True), _params())).__name__ == "Lion"
    with pytest.raises(UserError, match="--use_lion_optimizer and --optimizer_type AdamW both given"):
        optim.optimizer_name(_cfg(use_lion_optimizer=True, optimizer_type="AdamW"))


@pytest.mark.parametrize("items, expected", [
    (["weight_decay=0.1", "betas=(0.9,0.99)", "decouple=True", "mode=fast"],
     {"weight_decay": 0.1, "betas": (0.9, 0.99), "decouple": True, "mode": "fast"}),
    (["betas=0.9,0.99", "eps=1e-8"], {"betas": (0.9, 0.99), "eps": 1e-8}),  # kohya's tuple without brackets
    (["step_rules=1:10,0.1:20,0.01"], {"step_rules": "1:10,0.1:20,0.01"}),  # bare string
    (["expr=a=b"], {"expr": "a=b"}),  # only the first = splits
    (["use_bias_correction=true", "beta3=none"], {"use_bias_correction": True, "beta3": None}),
    (["weight_decay=0.01 d_coef=2"], {"weight_decay": 0.01, "d_coef": 2}),  # one GUI string, several pairs
    (["betas=(0.9, 0.99)"], {"betas": (0.9, 0.99)}),  # a space inside a value does not split
])
def test_parse_kv_args(items, expected):
    assert optim.parse_kv_args(items, "optimizer_args") == expected


def test_parse_kv_args_needs_key_and_value():
    with pytest.raises(UserError, match="--optimizer_args: 'weight_decay' is not key=value"):
        optim.parse_kv_args(["weight_decay"], "optimizer_args")


def test_optimizer_args_reach_the_optimizer():
    opt = optim.build_optimizer(_cfg(optimizer_type="Prodigy", learning_rate=1.0,
                                     optimizer_args=["betas=0.9,0.99", "d_coef=2", "use_bias_correction=True"]),
                                _params())
    group = opt.param_groups[0]
    assert group["betas"] == (0.9, 0.99) and group["d_coef"] == 2 and group["use_bias_correction"] is True


@pytest.mark.parametrize("kw, message", [
    (dict(optimizer_type="Prodigy", optimizer_args=["dcoef=2"]),
     "--optimizer_args: Prodigy takes no 'dcoef'; valid keys: beta3, betas, d0, d_coef,"),
    # pytorch-optimizer would swallow the unknown key silently; the table checks it
    (dict(optimizer_type="CAME", optimizer_args=["bogus=1"]), "--optimizer_args: CAME takes no 'bogus'"),
    (dict(optimizer_args=["lr=1"]), "--optimizer_args lr=...: set the learning rate with --learning_rate"),
    (dict(optimizer_type="AdamW", optimizer_args=["betas=2"]), "--optimizer_args for AdamW:"),
    (dict(optimizer_type="NoSuchOpt"), "--optimizer_type NoSuchOpt: unknown optimizer; use one of AdamW, AdamW8bit"),
    (dict(optimizer_type="no_such_pkg.Opt"), "--optimizer_type no_such_pkg.Opt needs the 'no_such_pkg' package: "
                                             "pip install no_such_pkg"),
    (dict(optimizer_type="torch.optim.NoSuch"), "--optimizer_type torch.optim.NoSuch: torch.optim has no 'NoSuch'"),
    (dict(fused_backward_pass=True, optimizer_type="Prodigy"),
     "--fused_backward_pass with --optimizer_type Prodigy: it estimates one step size"),
])
def test_optimizer_errors(kw, message):
    with pytest.raises(UserError) as info:
        optim.build_optimizer(_cfg(**kw), _params())
    assert str(info.value).startswith(message), str(info.value)


def test_missing_package_names_the_pip_command(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_lion(name, *args, **kwargs):
        if name.startswith("lion_pytorch"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(__import__("sys").modules, "lion_pytorch", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_lion)
    with pytest.raises(UserError, match="^--optimizer_type Lion needs the 'lion_pytorch' package: pip install lion-pytorch$"):
        optim.build_optimizer(_cfg(optimizer_type="Lion"), _params())


def test_adafactor_relative_step_drops_the_rates_and_uses_its_schedule():
    groups = [{"params": _params()[:1], "lr": 1e-4}, {"params": _params()[1:], "lr": 5e-5}]
    cfg = _cfg(optimizer_type="Adafactor", lr_scheduler="cosine")
    opt = optim.build_optimizer(cfg, groups)
    assert opt.defaults["relative_step"] is True and opt.defaults["lr"] is None
    assert all("lr" not in g or g["lr"] is None for g in opt.param_groups)
    sched = optim.build_scheduler(cfg, opt, 10)
    assert type(sched).__name__ == "AdafactorSchedule" and sched.get_last_lr() == [1e-3, 1e-3]
    with pytest.raises(UserError, match="Adafactor with relative_step=True sets its own rate"):
        optim.build_scheduler(_cfg(optimizer_type="Adafactor", lr_warmup_steps=2), opt, 10)
    # warmup_init needs relative_step, as in kohya; relative_step=False keeps the rates and the schedule
    warm = optim.build_optimizer(_cfg(optimizer_type="Adafactor", optimizer_args=["relative_step=False",
                                                                                  "warmup_init=True"]), _params())
    assert warm.defaults["relative_step"] is True
    plain = optim.build_optimizer(_cfg(optimizer_type="Adafactor", optimizer_args=["relative_step=False",
                                                                                   "scale_parameter=False"]), _params())
    assert plain.param_groups[0]["lr"] == 1e-3
    assert type(optim.build_scheduler(cfg, plain, 10)).__name__ == "LambdaLR"


def test_schedule_free_train_eval_switch_the_weights():
    params = _params()
    opt = optim.build_optimizer(_cfg(optimizer_type="AdamWScheduleFree"), [{"params": params, "lr": 1e-2}])
    for k in range(3):
        _step(opt, params, k)
    wrapped = SimpleNamespace(optimizer=opt)  # as accelerate wraps it
    training = params[0].detach().clone()
    optim.eval_mode(wrapped)  # the averaged weights x, for sampling and saving
    averaged = params[0].detach().clone()
    assert opt.param_groups[0]["train_mode"] is False and not torch.equal(training, averaged)
    optim.train_mode(wrapped)  # back to the weights the gradient is taken at
    assert opt.param_groups[0]["train_mode"] is True
    assert torch.allclose(params[0].detach(), training, atol=1e-6)
    # plain optimizers have no modes: the calls are no-ops
    adamw = optim.build_optimizer(_cfg(), _params())
    optim.eval_mode(adamw)
    optim.train_mode(adamw)


def test_adaptive_lr_logs_and_group_lrs():
    params = _params()
    opt = optim.build_optimizer(_cfg(optimizer_type="DAdaptAdan", learning_rate=1.0),
                                [{"params": params[:1], "lr": 1.0}, {"params": params[1:], "lr": 0.5}])
    assert optim.group_lrs(opt, ["textencoder", "unet"]) == {"textencoder": 1.0, "unet": 0.5}
    assert optim.adaptive_lr_logs(opt, ["textencoder", "unet"]) == {"lr/d*lr/textencoder": 1e-6,
                                                                     "lr/d*lr/unet": 0.5e-6}  # d0 = 1e-6
    assert optim.adaptive_lr_logs(optim.build_optimizer(_cfg(), _params()), ["unet"]) == {}
    # the peak rate, not the scheduled one: a warmup starts at 0
    sched = optim.build_scheduler(_cfg(lr_scheduler="constant_with_warmup", lr_warmup_steps=2), opt, 10)
    assert opt.param_groups[0]["lr"] == 0 and optim.group_lrs(opt, ["textencoder", "unet"])["unet"] == 0.5
    assert sched.get_last_lr() == [0.0, 0.0]


@pytest.mark.parametrize("name", ["Prodigy", "DAdaptAdam", "DAdaptLion", "DAdaptSGD", "DAdaptation"])
def test_one_rate_optimizers_refuse_different_group_rates_before_running(name):
    # these raise a RuntimeError at their first step otherwise (kohya only warns); rate 0 groups are frozen
    groups = [{"params": _params()[:1], "lr": 1.0}, {"params": _params()[1:], "lr": 0.5}]
    with pytest.raises(UserError, match=rf"^--optimizer_type {name} takes one learning rate for every parameter "
                                        r"group \(got 0.5, 1\): give --unet_lr and --text_encoder_lr the same value"):
        optim.build_optimizer(_cfg(optimizer_type=name, learning_rate=1.0), groups)
    same = [{"params": _params()[:1], "lr": 1.0}, {"params": _params()[1:], "lr": 1.0}]
    optim.build_optimizer(_cfg(optimizer_type=name, learning_rate=1.0), same)


def test_option_rows_accept_every_name_and_validate_checks_early():
    cfg = parse_args(["--optimizer_type", "DAdaptAdam", "--optimizer_args", "decouple=True",
                      "--lr_scheduler", "REX", "--lr_scheduler_min_lr_ratio", "0.1"])
    optim.validate(cfg)  # no parameters, no model
    with pytest.raises(UserError, match="DAdaptAdam takes no 'bogus'"):
        optim.validate(parse_args(["--optimizer_type", "DAdaptAdam", "--optimizer_args", "bogus=1"]))


# --- the seeds' recipes as shipped; the command line gives the paths, the tiny model's sizes and the length ---

REPO = __import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.abspath(__file__)))


def _recipe_data(demo_data, root, folder: str) -> str:
    """Four 64x64 demo images with .txt captions (the recipes' caption_extension) in `root/folder`."""
    import shutil
    from pathlib import Path

    target = Path(root) / folder
    target.mkdir(parents=True)
    for i in range(4):
        source = Path(demo_data) / "10_shapes" / f"shape_{i:02d}"
        shutil.copy(source.with_suffix(".png"), target / f"shape_{i:02d}.png")
        shutil.copy(source.with_suffix(".caption"), target / f"shape_{i:02d}.txt")
    return str(root)


@pytest.mark.parametrize("recipe, folder, epochs, optimizer, scheduler", [
    # batch 2 over 4 images: 2 steps in one epoch
    ("prodigy_recipe.toml", "1_shapes", "1",
     "prodigyopt.prodigy.Prodigy(use_bias_correction=True,weight_decay=0.01,decouple=True)", "cosine"),
    # batch 4 x accumulation 2 over 4 images x 2 repeats: one step per epoch
    ("rex_recipe.toml", "2_shapes", "2", "torch.optim.adamw.AdamW", "rex"),
])
def test_seed_recipes_run_unmodified(recipe, folder, epochs, optimizer, scheduler, tiny_model_dir, demo_data,
                                     tmp_path, caplog):
    import logging
    import math

    from safetensors import safe_open

    from library.methods import NetworkMethod
    from library.trainer import train

    data = _recipe_data(demo_data, tmp_path / "data", folder)
    out = tmp_path / "out"
    cfg = parse_args(["--config_file", f"{REPO}/configs/{recipe}", "--pretrained_model_name_or_path", tiny_model_dir,
                      "--train_data_dir", data, "--output_dir", str(out), "--resolution", "64",
                      "--min_bucket_reso", "64", "--max_bucket_reso", "128", "--max_train_epochs", epochs, "--max_data_loader_n_workers", "0"])
    with caplog.at_level(logging.WARNING, logger="library.trainer"):
        losses = train(cfg, NetworkMethod)
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    assert not [r for r in caplog.records if r.name == "library.trainer"]  # the recipes break no rule of thumb
    with safe_open(str(out / f"{cfg.output_name}.safetensors"), "pt") as f:
        meta = f.metadata()
        ups = [f.get_tensor(k) for k in f.keys() if k.startswith("lora_unet_") and k.endswith("lora_up.weight")]
    assert meta["ss_optimizer"] == optimizer and meta["ss_lr_scheduler"] == scheduler and meta["ss_steps"] == "2"
    assert any(up.abs().sum() > 0 for up in ups)  # the optimizer moved the weights
