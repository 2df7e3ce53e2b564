"""Saving on the way, training states and exact resume (library/state.py), and the NaN stop."""

from __future__ import annotations

import argparse
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import train_network
from library import state
from library.config import parse_args
from library.errors import UserError
from library.methods import NetworkMethod
from library.trainer import Run
from tests.conftest import files_under, train_argv

# 9 images x 10 repeats at batch 6: 15 batches an epoch; with accumulation 2 that is 8 steps, the last
# one from a single batch. 10 steps run into the second epoch.
RESUMABLE = ("--train_batch_size", "6", "--gradient_accumulation_steps", "2", "--network_dropout", "0.1",
             "--max_train_steps", "10", "--cache_latents", "--ema", "--ema_decay", "0.9")


def _train(model, data, out, *extra) -> None:
    assert train_network.main(train_argv(model, data, str(out), *RESUMABLE, *extra)) == 0


def _assert_same(path_a, path_b) -> None:
    a, b = load_file(path_a), load_file(path_b)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _metadata(path) -> dict:
    with safe_open(str(path), "pt") as handle:
        return handle.metadata()


def test_resumed_twice_gives_bitwise_the_same_weights(tiny_model_dir, demo_data, tmp_path, capsys):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    _train(tiny_model_dir, demo_data, a, "--save_every_n_steps", "3", "--save_state")
    # b resumes a's state of step 3 (mid-epoch 1), c resumes b's of step 9 (epoch 2, after 2 of its batches)
    _train(tiny_model_dir, demo_data, b, "--save_every_n_steps", "3", "--save_state",
           "--resume", str(a / "lora-step00000003-state"))
    _train(tiny_model_dir, demo_data, c, "--resume", str(b / "lora-step00000009-state"))
    for name in ("lora.safetensors", "lora-ema.safetensors"):
        _assert_same(a / name, b / name)
        _assert_same(a / name, c / name)
    _assert_same(a / "lora-step00000006.safetensors", b / "lora-step00000006.safetensors")
    # steps are global: b's first save is step 6, and c's final file says 10 steps, 2 epochs
    assert not (b / "lora-step00000003.safetensors").exists()
    meta = _metadata(c / "lora.safetensors")
    assert (meta["ss_steps"], meta["ss_epoch"]) == ("10", "2")
    assert _metadata(a / "lora-step00000009.safetensors")["ss_epoch"] == "1"  # kohya: epochs finished before
    saved = json.loads((a / "lora-step00000003-state" / state.STATE_FILE).read_text())
    assert (saved["current_epoch"], saved["current_step"]) == (1, 3)  # the keys kohya's resume reads
    assert saved["sdtune"]["seed"] == 1 and saved["sdtune"]["config"]["gradient_accumulation_steps"] == 2
    assert sorted(os.listdir(a / "lora-state")) == ["ema.safetensors", "model.safetensors", "optimizer.bin",
                                                    "random_states_0.pkl", "scheduler.bin", state.STATE_FILE]
    # the final state has nothing left to train: one line, and nothing is written
    argv = train_argv(tiny_model_dir, demo_data, str(tmp_path / "d"), *RESUMABLE, "--resume", str(a / "lora-state"))
    assert train_network.main(argv) == 2
    assert "error: the run would start at step 10 but --max_train_steps is 10" in capsys.readouterr().err
    assert files_under(tmp_path / "d") == []


def test_save_cadence_removal_and_pt_format(tiny_model_dir, demo_data, tmp_path):
    out = tmp_path / "out"
    argv = train_argv(tiny_model_dir, demo_data, str(out), "--save_every_n_steps", "1", "--save_last_n_steps", "2",
                      "--save_state", "--save_last_n_steps_state", "1", "--save_model_as", "pt")
    assert train_network.main(argv) == 0
    names = sorted(n for n in os.listdir(out) if not n.startswith("dataset_report"))
    # kohya: step s removes the model of step s - 2 - 1 and the state of step s - 1 - 1
    assert names == ["lora-state", "lora-step00000002.pt", "lora-step00000003-state", "lora-step00000003.pt",
                     "lora-step00000004-state", "lora-step00000004.pt", "lora.pt"]
    final = torch.load(out / "lora.pt", weights_only=True)
    at_step_4 = torch.load(out / "lora-step00000004.pt", weights_only=True)
    assert final and all(k.startswith(("lora_unet_", "lora_te_")) for k in final)
    assert all(torch.equal(final[k], at_step_4[k]) for k in final)


def test_nan_loss_stops_with_one_line_and_keeps_the_last_save(tiny_model_dir, demo_data, tmp_path, monkeypatch,
                                                              capsys):
    calls = []
    step_loss = Run.step_loss

    def poisoned(self, batch):
        calls.append(1)
        loss = step_loss(self, batch)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(Run, "step_loss", poisoned)
    out = tmp_path / "out"
    argv = train_argv(tiny_model_dir, demo_data, str(out), "--save_every_n_steps", "2", "--cache_latents")
    assert train_network.main(argv) == 2
    err = capsys.readouterr().err
    last = err.replace("\r", "\n").strip().splitlines()[-1]  # after the progress bars
    assert "Traceback" not in err and last.startswith("error: step 3: the loss is nan; training stopped"), last
    assert str(out / "lora-step00000002.safetensors") in last and "--learning_rate" in last
    assert sorted(os.listdir(out)) == ["dataset_report.json", "dataset_report.txt", "lora-step00000002.safetensors"]


def test_initial_step_with_skip_counts_steps_globally(tiny_model_dir, demo_data, tmp_path):
    out = tmp_path / "out"
    cfg = parse_args(train_argv(tiny_model_dir, demo_data, str(out), "--max_train_steps", "5", "--initial_step", "3",
                                "--skip_until_initial_step", "--save_every_n_steps", "1", "--cache_latents"))
    losses = Run(cfg, NetworkMethod).train()
    assert len(losses) == 2
    assert sorted(n for n in os.listdir(out) if n.endswith(".safetensors")) == [
        "lora-step00000004.safetensors", "lora-step00000005.safetensors", "lora.safetensors"]
    assert _metadata(out / "lora.safetensors")["ss_steps"] == "5"


@pytest.mark.parametrize("folder,expected", [
    ("missing", "no such folder"),
    ("data", "not a training state (it has no optimizer.bin)"),
])
def test_resume_of_a_non_state_is_one_line(folder, expected, tiny_model_dir, demo_data, tmp_path, capsys):
    target = str(tmp_path / "missing") if folder == "missing" else demo_data
    out = tmp_path / "out"
    assert train_network.main(train_argv(tiny_model_dir, demo_data, str(out), "--resume", target)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0] == f"error: --resume {target}: {expected}" + (
        "; give a folder written with --save_state, such as OUTPUT_NAME-step00000100-state" if folder == "data" else "")
    assert files_under(out) == []


def test_kohya_state_file_is_read(tmp_path):
    (tmp_path / "optimizer.bin").write_bytes(b"")
    (tmp_path / state.STATE_FILE).write_text('{"current_epoch": 2, "current_step": 7}')
    saved = state.read_state(str(tmp_path))
    assert (saved.step, saved.seed) == (7, None)


def _cfg(**values) -> argparse.Namespace:
    base = {"initial_step": None, "initial_epoch": None, "skip_until_initial_step": False}
    return argparse.Namespace(**{**base, **values})


@pytest.mark.parametrize("values,saved_step,expected", [
    ({}, None, state.Start(0, 0, 0)),
    ({}, 11, state.Start(11, 1, 6)),  # 8 steps an epoch: 3 steps into epoch 2 = 6 batches at accumulation 2
    ({"initial_step": 11}, None, state.Start(8, 1, 0)),  # kohya: without the skip flag, whole epochs only
    ({"initial_step": 11, "skip_until_initial_step": True}, None, state.Start(11, 1, 6)),
    ({"initial_epoch": 2}, 5, state.Start(8, 1, 0)),  # --initial_epoch wins over the state's step
    ({"initial_step": 0}, 5, state.Start(0, 0, 0)),
])
def test_start_point(values, saved_step, expected):
    assert state.start_point(_cfg(**values), saved_step, 8, 2, 20) == expected


def test_start_point_past_the_end_is_a_user_error():
    with pytest.raises(UserError, match="would start at step 20 but --max_train_steps is 20"):
        state.start_point(_cfg(initial_step=20, skip_until_initial_step=True), None, 8, 2, 20)


def test_kohya_removal_arithmetic():
    # save_every_n_steps 10, save_last_n_steps 30: step 50 removes step 10 (kohya's own example)
    assert [state.step_to_remove(s, 10, 30) for s in (30, 40, 50, 60)] == [None, None, 10, 20]
    assert state.step_to_remove(50, 10, None) is None
    # every 2 epochs, keep 2: epoch 6 removes epoch 2
    assert [state.epoch_to_remove(e, 2, 2) for e in (2, 4, 6)] == [None, None, 2]
    ratio = argparse.Namespace(save_n_epoch_ratio=3, save_every_n_epochs=5)
    assert state.save_every_n_epochs(ratio, 10) == 3 and state.save_every_n_epochs(ratio, 2) == 1


def test_names_and_ema_files():
    names = state.Names(None, ".safetensors")
    assert (names.epoch(4), names.step(100), names.last()) == ("epoch-000004", "at-step00000100", "last")
    assert state.weight_files("x", ".pt", "both") == [("x.pt", False), ("x-ema.pt", True)]
    assert state.weight_files("x", ".pt", "ema") == [("x.pt", True)]
    assert state.weight_files("x", ".pt", None) == state.weight_files("x", ".pt", "raw") == [("x.pt", False)]


def test_replace_folder_swaps_complete_folders(tmp_path):
    from library.saving import partial_folder, replace_folder

    target = tmp_path / "lora-state"
    target.mkdir()
    (target / "old").write_text("old")
    partial = partial_folder(str(target))
    os.makedirs(partial)
    with open(os.path.join(partial, "new"), "w") as handle:
        handle.write("new")
    replace_folder(partial, str(target))
    assert os.listdir(tmp_path) == ["lora-state"] and os.listdir(target) == ["new"]
