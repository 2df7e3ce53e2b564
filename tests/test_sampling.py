"""Sample images during training: prompt files, samplers, names, black-image detection, and end to end."""

from __future__ import annotations

import json
import os
import random
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import train_network
from library import sampling
from library.errors import UserError
from library.sampling import SamplePrompt, load_prompts
from tests.conftest import files_under, train_argv

TXT = """# kohya's line format
a red square --w 64 --h 48 --s 2 --d 7

  a blue circle --n green, blurry --L 5.5 --ss Euler_A --S 3
plain prompt
"""


def _write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


# --- prompt files ------------------------------------------------------------------------------------

def test_txt_prompts_with_inline_options(tmp_path):
    prompts = load_prompts(_write(tmp_path, "p.txt", TXT))
    assert prompts == [
        SamplePrompt(0, "a red square", width=64, height=48, sample_steps=2, seed=7),
        SamplePrompt(1, "a blue circle", negative_prompt="green, blurry", scale=5.5, sample_sampler="euler_a",
                     sample_steps=3),
        SamplePrompt(2, "plain prompt"),  # kohya's defaults: 30 steps, scale 7.5, no seed
    ]
    assert prompts[2].sample_steps == 30 and prompts[2].scale == 7.5


def test_toml_and_json_formats_match_the_txt_entries(tmp_path):
    toml_path = _write(tmp_path, "p.toml", """
[prompt]
width = 64
height = 48
sample_steps = 2

[[prompt.subset]]
prompt = "a red square"
seed = 7

[[prompt.subset]]
prompt = "a blue circle"
negative_prompt = "green, blurry"
scale = 5.5
sample_sampler = "euler_a"
sample_steps = 3
""")
    assert load_prompts(toml_path) == [
        SamplePrompt(0, "a red square", width=64, height=48, sample_steps=2, seed=7),
        SamplePrompt(1, "a blue circle", negative_prompt="green, blurry", width=64, height=48, sample_steps=3,
                     scale=5.5, sample_sampler="euler_a"),
    ]
    json_path = _write(tmp_path, "p.json", json.dumps([
        "a red square --w 64 --h 48 --s 2 --d 7",
        {"prompt": "a blue circle", "negative_prompt": "green, blurry", "scale": 5.5, "sample_steps": 3,
         "sample_sampler": "euler_a"},
    ]))
    assert load_prompts(json_path) == load_prompts(_write(tmp_path, "q.txt", TXT))[:2]


@pytest.mark.parametrize("name,text,message", [
    ("p.txt", "ok\n# c\nbad --q 3\n", "p.txt:3: unknown option --q (options: --n --w --h --s --l --d --ss)"),
    ("p.txt", "bad --w abc\n", "p.txt:1: width must be a whole number, not 'abc'"),
    ("p.txt", "bad --l 1.2.3\n", "p.txt:1: scale must be a number, not '1.2.3'"),
    ("p.txt", "bad --s 0\n", "p.txt:1: sample_steps must be at least 1, not 0"),
    ("p.txt", "bad --s 1001\n", "p.txt:1: sample_steps must be at most 1000"),
    ("p.txt", "bad --n\n", "p.txt:1: --n needs a value"),
    ("p.txt", "bad --ss k_foo\n", "p.txt:1: unknown sampler 'k_foo'"),
    ("p.txt", "# only a comment\n\n", "p.txt: no prompts in it"),
    ("p.toml", "[prompt]\nwidth = 64\n", "p.toml: expected a [prompt] table with [[prompt.subset]] entries"),
    ("p.toml", "[prompt\n", "p.toml: not valid TOML"),
    ("p.toml", "[prompt]\n[[prompt.subset]]\nprompt = 'a'\nwidht = 3\n", "[[prompt.subset]] #1: unknown key 'widht'"),
    ("p.toml", "[prompt]\n[[prompt.subset]]\nprompt = 'a'\nwidth = 6.5\n", "width must be a whole number"),
    ("p.json", '[{"negative_prompt": "x"}]', "p.json: entry 1: no prompt"),
    ("p.json", '[3]', "p.json: entry 1: expected a string or an object, not int"),
    ("p.json", '{"prompt": "a"}', "p.json: expected a list of prompts"),
    ("p.yaml", "a", "p.yaml: expected a .txt, .toml or .json file"),
])
def test_bad_prompt_files_name_file_and_line(tmp_path, name, text, message):
    with pytest.raises(UserError) as info:
        load_prompts(_write(tmp_path, name, text))
    assert message in str(info.value) and str(tmp_path) in str(info.value)


def test_other_families_options_are_skipped_with_a_warning(tmp_path, caplog):
    (prompt,) = load_prompts(_write(tmp_path, "p.txt", "a cat --g 3.5 --w 64\n"))
    assert prompt == SamplePrompt(0, "a cat", width=64)
    assert "p.txt:1: --g is for other model families; ignored" in caplog.text


# --- samplers, schedule, names -------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(sampling.SAMPLERS))
def test_each_kohya_sampler_is_built_from_the_training_schedule(name):
    from library.models.sd1 import kohya_noise_scheduler

    train = kohya_noise_scheduler()
    class_name = sampling.SAMPLERS[name][0]
    if class_name == "LMSDiscreteScheduler" and not _has_scipy():
        with pytest.raises(UserError, match="needs the scipy package"):
            sampling.make_scheduler(name, train, False)
        return
    scheduler = sampling.make_scheduler(name.upper(), train, v_prediction=True)
    assert type(scheduler).__name__ == class_name
    assert scheduler.config.prediction_type == "v_prediction"
    assert scheduler.config.num_train_timesteps == 1000 and scheduler.config.get("steps_offset", 1) == 1
    assert torch.equal(scheduler.alphas_cumprod, train.alphas_cumprod)  # the same betas as training
    if name == "ddim":
        assert sampling.make_scheduler(name, train, v_prediction=False).config.prediction_type == "epsilon"


def _has_scipy() -> bool:
    try:
        import scipy  # noqa: F401
    except ImportError:
        return False
    return True


def test_schedule_epochs_win_over_steps():
    cfg = SimpleNamespace(sample_every_n_steps=2, sample_every_n_epochs=None)
    assert [s for s in range(1, 7) if sampling.due_on_step(cfg, s)] == [2, 4, 6]
    cfg.sample_every_n_epochs = 3
    assert not any(sampling.due_on_step(cfg, s) for s in range(1, 7))
    assert [e for e in range(1, 7) if sampling.due_on_epoch(cfg, e)] == [3, 6]


def test_kohya_file_names():
    assert sampling.image_name("lora", None, 12, 3, "20240102030405", 7) == "lora_000012_03_20240102030405_7.png"
    assert sampling.image_name("lora", 2, 40, 0, "20240102030405", None) == "lora_e000002_00_20240102030405.png"
    assert sampling.image_name(None, 0, 0, 1, "t", 5, "_ema") == "e000000_01_t_5_ema.png"
    assert [sampling.snap(s, 64) for s in (30, 100, 512)] == [64, 64, 512]


def test_black_and_nan_samples_are_detected():
    latents, pixels = torch.zeros(1, 4, 2, 2), torch.zeros(3, 4, 4)  # mid grey
    assert sampling.black_reason(latents, pixels) is None
    assert "all black" in sampling.black_reason(latents, torch.full((3, 4, 4), -1.0))
    nan_pixels = pixels.clone()
    nan_pixels[0, 1, 1] = float("nan")
    reason = sampling.black_reason(latents, nan_pixels)
    assert "VAE decoded NaN/inf" in reason and "--no_half_vae" in reason
    assert "UNet gave NaN/inf latents" in sampling.black_reason(latents / 0 * 0, pixels)  # 0/0: NaN
    # NaN shows as black in the saved image; grey stays grey (0 -> 127.5 -> 128)
    assert np.asarray(sampling.to_image(nan_pixels))[1, 1].tolist() == [0, 128, 128]


def test_grid_places_images_in_rows():
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    images = [Image.new("RGB", (8, 8), colours[0]), Image.new("RGB", (8, 8), colours[1]),
              Image.new("RGB", (8, 16), colours[2])]
    grid = sampling.make_grid(images)
    assert grid.size == (16, 32)  # 2 columns x 2 rows of 8x16 cells
    assert [grid.getpixel(xy) for xy in [(0, 0), (8, 0), (0, 16), (0, 12), (8, 16)]] == [
        colours[0], colours[1], colours[2], (0, 0, 0), (0, 0, 0)]


def test_random_states_are_put_back():
    before = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    with sampling.preserved_rng():
        random.random(), np.random.rand(5), torch.rand(7), torch.manual_seed(0)
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected != before


# --- end to end --------------------------------------------------------------------------------------

PROMPTS = "a red square --w 64 --h 64 --s 2 --d 7\na green circle --n blue --w 32 --h 48 --s 2 --ss euler_a\n"


def test_samples_never_change_training(tiny_model_dir, demo_data, tmp_path):
    """3 steps with a round before training and after every step (TensorBoard on, latents cached) train
    bitwise the same network as without samples; dropout makes a left-over eval mode visible."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    prompts = _write(tmp_path, "p.txt", PROMPTS)
    common = ("--max_train_steps", "3", "--cache_latents", "--network_dropout", "0.3")
    plain, sampled, logs = tmp_path / "plain", tmp_path / "sampled", tmp_path / "logs"
    assert train_network.main(train_argv(tiny_model_dir, demo_data, str(plain), *common)) == 0
    assert train_network.main(train_argv(tiny_model_dir, demo_data, str(sampled), *common, "--sample_prompts",
                                         prompts, "--sample_every_n_steps", "1", "--sample_at_first",
                                         "--logging_dir", str(logs))) == 0
    a, b = load_file(plain / "lora.safetensors"), load_file(sampled / "lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    names = sorted(os.listdir(sampled / "sample"))
    rounds = ["e000000", "000001", "000002", "000003"]
    assert len(names) == 12 and sorted({n[len("lora_"):].split("_")[0] for n in names}) == sorted(rounds)
    first = [n for n in names if n.startswith("lora_e000000_")]
    assert [n.split("_")[2] for n in first] == ["00", "01", "grid"]
    assert first[0].endswith("_7.png") and len(first[1].split("_")) == 4  # the seed only when --d gives one
    assert Image.open(sampled / "sample" / first[0]).size == (64, 64)
    assert Image.open(sampled / "sample" / first[1]).size == (32, 48)
    assert Image.open(sampled / "sample" / first[2]).size == (128, 64)  # a grid of two 64x64 cells

    (run_dir,) = os.listdir(logs)
    events = EventAccumulator(str(logs / run_dir / "network_train"), size_guidance={"images": 0})
    events.Reload()
    assert {"samples/00", "samples/01"} <= set(events.Tags()["images"])
    assert [e.step for e in events.Images("samples/01")] == [0, 1, 2, 3]
    assert (events.Images("samples/01")[0].width, events.Images("samples/01")[0].height) == (32, 48)


def test_epoch_rounds_include_the_last_epoch(tiny_model_dir, demo_data, tmp_path):
    """Two images, batch 1, two epochs: a round after each epoch (the last one too, as kohya), none on
    steps; bf16 mixed precision samples too."""
    data = tmp_path / "data" / "1_shapes"
    data.mkdir(parents=True)
    for stem in ("shape_00", "shape_01"):
        for ext in (".png", ".caption"):
            shutil.copy(os.path.join(demo_data, "10_shapes", stem + ext), data / (stem + ext))
    prompts = _write(tmp_path, "p.toml", '[prompt]\nwidth = 32\nheight = 32\nsample_steps = 1\n'
                                         '[[prompt.subset]]\nprompt = "a square"\n')
    out = tmp_path / "out"
    argv = train_argv(tiny_model_dir, str(tmp_path / "data"), str(out), "--train_batch_size", "1",
                      "--max_train_epochs", "2", "--sample_prompts", prompts,
                      "--sample_every_n_epochs", "1", "--sample_every_n_steps", "1", "--mixed_precision", "bf16")
    assert train_network.main(argv) == 0
    names = sorted(os.listdir(out / "sample"))
    assert [n.rsplit("_", 1)[0] for n in names] == ["lora_e000001_00", "lora_e000001_grid",
                                                    "lora_e000002_00", "lora_e000002_grid"]
    assert np.asarray(Image.open(out / "sample" / names[0])).std() > 0  # a real picture, not flat or black


def test_bad_prompt_file_stops_before_anything_is_written(tiny_model_dir, demo_data, tmp_path, capsys):
    prompts = _write(tmp_path, "p.txt", "fine\nbroken --x 1\n")
    out = tmp_path / "out"
    argv = train_argv(tiny_model_dir, demo_data, str(out), "--sample_prompts", prompts,
                      "--sample_every_n_steps", "1")
    assert train_network.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {prompts}:2: unknown option --x (options: --n --w --h --s --l --d --ss)"]
    assert files_under(out) == []


class _FakeEMA:
    """Swaps doubled LoRA weights in while applied, as library/ema.py swaps the averaged ones."""

    def __init__(self, network):
        self.network, self.entered = network, 0

    def applied(self):
        from contextlib import contextmanager

        @contextmanager
        def swap():
            saved = [p.detach().clone() for p in self.network.parameters()]
            self.entered += 1
            with torch.no_grad():
                for p in self.network.parameters():
                    p.add_(0.5)
            try:
                yield
            finally:
                with torch.no_grad():
                    for p, s in zip(self.network.parameters(), saved):
                        p.copy_(s)

        return swap()


def test_ema_both_and_schedule_free_switching(tiny_model_dir, demo_data, tmp_path, monkeypatch):
    from library import optim
    from library.config import parse_args
    from library.methods import NetworkMethod
    from library.trainer import Run

    calls = []
    monkeypatch.setattr(optim, "eval_mode", lambda o: calls.append("eval"))
    monkeypatch.setattr(optim, "train_mode", lambda o: calls.append("train"))
    prompts = _write(tmp_path, "p.txt", "a red square --w 32 --h 32 --s 1 --d 3\n")
    out = tmp_path / "out"
    cfg = parse_args(train_argv(tiny_model_dir, demo_data, str(out), "--sample_prompts", prompts,
                                "--sample_every_n_steps", "5", "--cache_latents"))
    run = Run(cfg, NetworkMethod)
    run.prepare()
    assert run.family.vae is not None  # kept after caching, on the CPU, for the samples
    run.network.train()
    before = {k: v.clone() for k, v in run.network.state_dict().items()}
    run.ema, cfg.ema_sample = _FakeEMA(run.network), "both"
    calls.clear()
    sampling.Sampler.from_config(cfg).round(run, epoch=None, steps=5)
    names = sorted(os.listdir(out / "sample"))
    assert [n.split("_", 3)[1:3] + [n.endswith("_ema.png")] for n in names] == [
        ["000005", "00", False], ["000005", "00", True], ["000005", "grid", False], ["000005", "grid", True]]
    raw, ema = (np.asarray(Image.open(out / "sample" / n)).astype(int) for n in names[:2])
    assert np.abs(raw - ema).max() > 0  # the EMA weights were in place for the second image
    assert run.ema.entered == 1 and calls == ["eval", "train"]
    assert run.network.training and next(run.family.vae.parameters()).device.type == "cpu"
    assert all(torch.equal(v, before[k]) for k, v in run.network.state_dict().items())
