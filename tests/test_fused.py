"""--fused_backward_pass (library/fused_backward.py): stepping each parameter inside backward gives bitwise the
weights of an ordinary step for every optimizer it allows, the others are refused in one line, gradients
are freed as they are used, and a fused run resumes exactly."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file

import train_network
from library import fused_backward, optim
from library.advice import RunFacts, rule_of_thumb_warnings
from library.config import parse_args
from library.errors import UserError
from library.fused_backward import FusedBackward
from tests.test_optimizers import _cfg as optimizer_cfg
from tests.conftest import train_argv

pytestmark = pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")


def _cfg(**kw):
    return optimizer_cfg(**{"learning_rate": 1e-2, **kw})


def _model() -> torch.nn.Sequential:
    """Three layers; the middle weight (5,600 values) is large enough for bitsandbytes' 8-bit state."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 80), torch.nn.Tanh(), torch.nn.Linear(80, 70), torch.nn.Tanh(),
                               torch.nn.Linear(70, 1))


def _train_model(name: str, fused: bool, steps: int = 3) -> list[torch.Tensor]:
    """`steps` steps of a small regression with two parameter groups at different rates."""
    model = _model()
    groups = [{"params": list(model[0].parameters()), "lr": 1e-2},
              {"params": [*model[2].parameters(), *model[4].parameters()], "lr": 2e-3}]
    opt = optim.build_optimizer(_cfg(optimizer_type=name, fused_backward_pass=fused), groups)
    hooks = FusedBackward(opt) if fused else None
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        model(torch.randn(16, 8, generator=gen)).pow(2).mean().backward()
        if hooks is None:
            opt.step()
        else:
            assert all(p.grad is None for p in model.parameters())  # each gradient freed once used
        opt.zero_grad(set_to_none=True)
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", sorted(fused_backward.FUSABLE))
def test_every_allowed_optimizer_gives_bitwise_the_weights_of_a_plain_step(name):
    start = [p.detach().clone() for p in _model().parameters()]
    plain, fused = _train_model(name, fused=False), _train_model(name, fused=True)
    assert not torch.equal(plain[2], start[2])  # the optimizer did move the weights
    for a, b in zip(plain, fused):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("kw, message", [
    (dict(optimizer_type="Prodigy"), "--fused_backward_pass with --optimizer_type Prodigy: it estimates one step "
                                     "size from the gradients of every parameter together; use AdamW"),
    (dict(optimizer_type="DAdaptAdam"), "--fused_backward_pass with --optimizer_type DAdaptAdam: it estimates"),
    (dict(optimizer_type="AdamWScheduleFree"), "--fused_backward_pass with --optimizer_type AdamWScheduleFree: it "
                                               "advances per-group counters"),
    (dict(optimizer_type="CAME"), "--fused_backward_pass with --optimizer_type CAME: pytorch-optimizer counts steps "
                                  "per parameter group"),
    (dict(optimizer_type="ASGD"), "--fused_backward_pass with --optimizer_type ASGD: sdtune has not checked"),
    (dict(gradient_accumulation_steps=2), "--fused_backward_pass with --gradient_accumulation_steps > 1:"),
    (dict(mixed_precision="fp16"), "--fused_backward_pass with --mixed_precision fp16: the fp16 loss scaler"),
])
def test_refusals_are_one_line(kw, message):
    with pytest.raises(UserError) as info:
        optim.validate(_cfg(fused_backward_pass=True, **kw))
    assert str(info.value).startswith(message) and "\n" not in str(info.value), str(info.value)
    with pytest.raises(UserError, match="^--fused_backward_pass with 2 processes: each process would step"):
        fused_backward.check_processes(2)


def test_max_grad_norm_clips_each_tensor_on_its_own(caplog):
    """kohya's rule: grad (3, 4) has norm 5 and is scaled to norm 1 (torch divides by norm + 1e-6); grad
    (0.3, 0.4) (norm 0.5) is left alone. Clipping by the global norm (about 5.02) would have scaled both."""
    big, small = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([big, small], lr=1.0)
    with caplog.at_level(logging.INFO):
        hooks = FusedBackward(opt, max_grad_norm=1.0)
    assert "fused backward pass: 2 tensors step inside backward; their 0.0 MB of gradients" in caplog.text
    (big @ torch.tensor([3.0, 4.0]) + small @ torch.tensor([0.3, 0.4])).backward()
    torch.testing.assert_close(big.detach(), torch.tensor([-0.6, -0.8]), rtol=0, atol=1e-6)
    torch.testing.assert_close(small.detach(), torch.tensor([-0.3, -0.4]), rtol=0, atol=1e-6)
    hooks.remove()
    assert big.grad is None and small.grad is None


def test_hooks_follow_the_groups_that_load_state_dict_puts_in():
    """--resume replaces the optimizer's group dicts; the hooks must step with the new ones (here lr 0)."""
    weight = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([weight], lr=0.5)
    FusedBackward(opt)
    saved = opt.state_dict()
    saved["param_groups"][0]["lr"] = 0.0
    opt.load_state_dict(saved)
    weight.sum().backward()
    assert torch.equal(weight.detach(), torch.ones(3))  # the stale group (lr 0.5) would give 0.5


def test_bitsandbytes_first_step_sets_up_every_parameter(monkeypatch):
    """bitsandbytes moves a resumed state to the parameters' device on its first step, for the parameters
    that step shows it: a fused run's first step must show all of them."""
    model = _model()
    opt = optim.build_optimizer(_cfg(optimizer_type="AdamW8bit"), list(model.parameters()))
    seen = []
    monkeypatch.setattr(opt, "to_gpu", lambda: seen.extend(p for g in opt.param_groups for p in g["params"]))
    FusedBackward(opt)
    model(torch.ones(2, 8)).sum().backward()
    assert opt.initialized and len(seen) == 6 and all(p.grad is None for p in model.parameters())
    assert all(len(opt.state[p]) > 0 for p in model.parameters())  # every tensor was stepped


def _run(model, data, out, *extra) -> dict:
    argv = train_argv(model, data, str(out), "--max_grad_norm", "0", "--max_train_steps", "4", *extra)
    assert train_network.main(argv) == 0
    return load_file(str(out / "lora.safetensors"))


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("extra", [("--optimizer_type", "AdamW8bit", "--gradient_checkpointing"), ()],
                         ids=["AdamW8bit-checkpointing", "AdamW-resume"])
def test_fused_training_run_equals_a_plain_one(extra, tiny_model_dir, demo_data, tmp_path):
    plain = _run(tiny_model_dir, demo_data, tmp_path / "plain", *extra)
    assert any(key.endswith("lora_up.weight") and plain[key].abs().max() > 0 for key in plain)  # it trained
    saves = ("--save_every_n_steps", "2", "--save_state") if not extra else ()
    fused = _run(tiny_model_dir, demo_data, tmp_path / "fused", "--fused_backward_pass", *extra, *saves)
    _assert_same(plain, fused)
    if saves:  # a fused run resumed from its step-2 state ends where the straight runs end
        resumed = _run(tiny_model_dir, demo_data, tmp_path / "resumed", "--fused_backward_pass", "--resume",
                       str(tmp_path / "fused" / "lora-step00000002-state"))
        _assert_same(plain, resumed)


def test_the_clipping_difference_is_said_once_before_training():
    facts = RunFacts({"unet": 1e-4})
    (line,) = rule_of_thumb_warnings(parse_args(["--fused_backward_pass"]), facts)
    assert line.startswith("--fused_backward_pass clips each tensor's gradient to --max_grad_norm 1 on its own")
    assert rule_of_thumb_warnings(parse_args(["--fused_backward_pass", "--max_grad_norm", "0"]), facts) == []
    assert rule_of_thumb_warnings(parse_args([]), facts) == []
