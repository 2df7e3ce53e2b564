"""Optimizer / scheduler tables and the loss functions, against hand-computed numbers."""

from __future__ import annotations

import argparse

import pytest
import torch

from library import losses, optim
from library.errors import UserError


def _cfg(**kw):
    base = dict(optimizer_type="AdamW", use_8bit_adam=False, optimizer_args=None, learning_rate=1e-3,
                lr_scheduler="constant", lr_warmup_steps=0)
    return argparse.Namespace(**{**base, **kw})


def _params():
    return [{"params": [torch.nn.Parameter(torch.ones(3))], "lr": 1e-3}]


def test_parse_kv_args_literals_and_strings():
    parsed = optim.parse_kv_args(["weight_decay=0.1", "betas=(0.9,0.99)", "decouple=True", "mode=fast"], "x")
    assert parsed == {"weight_decay": 0.1, "betas": (0.9, 0.99), "decouple": True, "mode": "fast"}
    with pytest.raises(UserError, match="'weight_decay' is not key=value"):
        optim.parse_kv_args(["weight_decay"], "optimizer_args")


@pytest.mark.parametrize("name,cls", [("AdamW", "torch.optim.adamw.AdamW"), ("adamw8bit", "bitsandbytes.optim.adamw.AdamW8bit")])
def test_optimizer_table(name, cls):
    opt = optim.build_optimizer(_cfg(optimizer_type=name, optimizer_args=["weight_decay=0.05"]), _params())
    assert f"{type(opt).__module__}.{type(opt).__name__}" == cls
    assert opt.param_groups[0]["weight_decay"] == 0.05


def test_use_8bit_adam_is_adamw8bit_and_escape_hatch():
    assert optim.optimizer_name(_cfg(use_8bit_adam=True)) == "AdamW8bit"
    opt = optim.build_optimizer(_cfg(optimizer_type="torch.optim.SGD"), _params())
    assert isinstance(opt, torch.optim.SGD)


def test_optimizer_errors():
    with pytest.raises(UserError, match="not supported yet: --optimizer_type Lion"):
        optim.build_optimizer(_cfg(optimizer_type="Lion"), _params())
    with pytest.raises(UserError, match="needs the 'no_such_pkg' package"):
        optim.build_optimizer(_cfg(optimizer_type="no_such_pkg.Opt"), _params())
    with pytest.raises(UserError, match="--optimizer_args for AdamW"):
        optim.build_optimizer(_cfg(optimizer_args=["bogus=1"]), _params())


def test_warmup_steps_int_or_ratio():
    assert optim.warmup_steps(_cfg(lr_warmup_steps=7), 100) == 7
    assert optim.warmup_steps(_cfg(lr_warmup_steps=0.1), 100) == 10
    assert optim.warmup_steps(_cfg(lr_warmup_steps=0.05), 30) == 2  # ceil(1.5)


def _lrs(cfg, total):
    opt = optim.build_optimizer(cfg, _params())
    sched = optim.build_scheduler(cfg, opt, total)
    lrs = []
    for _ in range(total):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return lrs


def test_scheduler_values():
    assert _lrs(_cfg(lr_scheduler="constant"), 3) == [1e-3] * 3
    warm = _lrs(_cfg(lr_scheduler="constant_with_warmup", lr_warmup_steps=2), 4)
    assert warm == pytest.approx([0.0, 5e-4, 1e-3, 1e-3])
    assert _lrs(_cfg(lr_scheduler="linear"), 4) == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])
    cosine = _lrs(_cfg(lr_scheduler="cosine"), 4)
    assert cosine == pytest.approx([1e-3, 1e-3 * (1 + 0.7071067811865476) / 2, 5e-4, 1e-3 * (1 - 0.7071067811865476) / 2])


def test_scheduler_errors():
    with pytest.raises(UserError, match="not supported yet: --lr_scheduler polynomial"):
        _lrs(_cfg(lr_scheduler="polynomial"), 2)
    with pytest.raises(UserError, match="constant_with_warmup"):
        _lrs(_cfg(lr_scheduler="constant", lr_warmup_steps=3), 2)


def test_training_target_epsilon_and_v():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          num_train_timesteps=1000, clip_sample=False)
    latents, noise = torch.full((1, 4, 2, 2), 2.0), torch.full((1, 4, 2, 2), 0.5)
    t = torch.tensor([500])
    assert torch.equal(losses.training_target(sched, latents, noise, t, v_prediction=False), noise)
    a = sched.alphas_cumprod[500]
    expected_v = a.sqrt() * 0.5 - (1 - a).sqrt() * 2.0  # v = sqrt(a) * eps - sqrt(1 - a) * x0
    v = losses.training_target(sched, latents, noise, t, v_prediction=True)
    assert torch.allclose(v, torch.full_like(v, float(expected_v)), atol=1e-6)


def test_diffusion_loss_is_per_sample_fp32_mse():
    pred = torch.zeros(2, 1, 2, 2, dtype=torch.bfloat16)
    target = torch.stack([torch.full((1, 2, 2), 1.0), torch.full((1, 2, 2), 3.0)])
    loss = losses.diffusion_loss(pred, target)
    assert loss.dtype == torch.float32 and loss.tolist() == [1.0, 9.0]


def test_sample_timesteps_range_and_noise_shape():
    t = losses.sample_timesteps(1000, 1000, "cpu", generator=torch.Generator().manual_seed(0))
    assert t.min() >= 0 and t.max() <= 999 and t.dtype == torch.long
    x = torch.zeros(2, 4, 3, 3, dtype=torch.float64)
    n = losses.sample_noise(x, generator=torch.Generator().manual_seed(0))
    assert n.shape == x.shape and n.dtype == torch.float64 and n.std() > 0.5
