"""The moving average of the trained weights (library/ema.py), alone and in a training run."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import train_network
from library.ema import EMA
from tests.conftest import train_argv


def _hand_average(snapshots: list[torch.Tensor], decay: float, start: torch.Tensor) -> torch.Tensor:
    """average <- d_n * average + (1 - d_n) * snapshot, d_n = min(decay, (1 + n) / (10 + n)), in float64."""
    average = start.double()
    for n, snapshot in enumerate(snapshots):
        d = min(decay, (1 + n) / (10 + n))
        average = d * average + (1 - d) * snapshot.double()
    return average


def test_three_updates_equal_the_hand_computed_average():
    param = torch.nn.Parameter(torch.tensor([1.0, -2.0, 4.0]))
    ema = EMA([("w", param)], decay=0.2)
    start, snapshots = param.detach().clone(), []
    for step, value in enumerate(([3.0, 0.0, 1.0], [-1.0, 5.0, 2.0], [0.5, 0.5, 0.5]), start=1):
        param.data = torch.tensor(value)
        snapshots.append(param.detach().clone())
        assert ema.step(step)
    # decays used: 0.1, 2/11 (both under 0.2), then 0.2 itself (3/12 is above it)
    expected = _hand_average(snapshots, 0.2, start)
    assert torch.allclose(ema.averages["w"].double(), expected, atol=1e-6)
    assert ema.updates == 3 and ema.current_decay() == 0.2


def test_update_interval_and_cpu_copy():
    param = torch.nn.Parameter(torch.zeros(2))
    ema = EMA([("w", param)], decay=0.5, interval=2, device="cpu")
    param.data = torch.ones(2)
    assert [ema.step(s) for s in (1, 2, 3)] == [False, True, False]
    assert ema.updates == 1 and torch.allclose(ema.averages["w"], torch.full((2,), 0.9))


def test_applied_swaps_in_and_restores_even_after_an_error(tmp_path):
    param = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    ema = EMA([("w", param)], decay=0.5)
    ema.averages["w"].copy_(torch.tensor([7.0, 8.0]))
    with ema.applied():
        assert torch.equal(param.detach(), torch.tensor([7.0, 8.0]))
    with pytest.raises(RuntimeError), ema.applied():
        raise RuntimeError("sampling failed")
    assert torch.equal(param.detach(), torch.tensor([1.0, 2.0]))
    ema.updates = 5
    ema.save(str(tmp_path / "ema.safetensors"))
    other = EMA([("w", param)], decay=0.5)
    other.load(str(tmp_path / "ema.safetensors"))
    assert other.updates == 5 and torch.equal(other.averages["w"], torch.tensor([7.0, 8.0]))


def test_ema_file_of_a_run_averages_the_saved_snapshots(tiny_model_dir, demo_data, tmp_path):
    out = tmp_path / "out"
    argv = train_argv(tiny_model_dir, demo_data, str(out), "--max_train_steps", "3", "--save_every_n_steps", "1",
                      "--ema", "--ema_decay", "0.5", "--cache_latents")
    assert train_network.main(argv) == 0
    snapshots = [load_file(out / f"lora-step{s:08d}.safetensors") for s in (1, 2, 3)]
    averaged = load_file(out / "lora-ema.safetensors")
    ups = [k for k in averaged if k.endswith("lora_up.weight")]
    assert ups and any(snapshots[-1][k].abs().sum() > 0 for k in ups)
    for key in ups:  # up weights start at zero, so the snapshots alone give the average
        expected = _hand_average([s[key] for s in snapshots], 0.5, torch.zeros_like(averaged[key]))
        assert torch.allclose(averaged[key].double(), expected, atol=1e-7), key
    assert not torch.equal(averaged[ups[0]], load_file(out / "lora.safetensors")[ups[0]])
    with safe_open(str(out / "lora-ema.safetensors"), "pt") as handle:
        assert json.loads(handle.metadata()["sdtune_ema"]) == {"decay": 0.5, "update_interval": 1, "updates": 3}
