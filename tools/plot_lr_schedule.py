"""Draw the learning-rate schedule of a kohya training config to a PNG, without loading a model.

    python tools/plot_lr_schedule.py my_lora.toml [--out my_lora_lr.png] [--steps N]

The config is read as train_network.py reads it (flat or sectioned TOML, the same checks). The schedule is
built with the configured optimizer on a dummy parameter, so optimizer rules apply too (schedule-free
optimizers run flat; Adafactor with relative_step shows its starting rate). The step count is --steps,
else the config's max_train_steps; a config that sets max_train_epochs needs its data set to count the
steps (or --steps).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings

if __package__ in (None, ""):  # run as a script: make the repository's packages importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from library import optim  # noqa: E402
from library.config import parse_args, text_encoder_lr  # noqa: E402
from library.errors import UserError, run_cli  # noqa: E402

COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]
SIZE, MARGIN = (900, 480), (90, 20, 40, 50)  # left, right, top, bottom


def total_steps(cfg, steps: int | None, config: str) -> int:
    """--steps, else the config's length by kohya's rule (epochs need the data set's batch count)."""
    if steps:
        return steps
    if not cfg.max_train_epochs:
        return cfg.max_train_steps
    if not (cfg.train_data_dir or cfg.dataset_config):
        raise UserError(f"{config} sets max_train_epochs = {cfg.max_train_epochs}: the step count depends on the "
                        "data set; give --steps N (or a train_data_dir / dataset_config to count it)")
    from library.dataset import build_dataset
    from library.dataset.report import schedule_length

    per_epoch = math.ceil(len(build_dataset(cfg)) / cfg.gradient_accumulation_steps)
    return schedule_length(per_epoch, cfg.max_train_steps, cfg.max_train_epochs)[0]


def group_rates(cfg) -> list[tuple[str, float]]:
    """The parameter groups a LoRA run makes (text encoder(s), then U-Net), with their peak rates."""
    te = text_encoder_lr(cfg.text_encoder_lr, 2 if len(cfg.text_encoder_lr or []) > 1 else 1)
    te_rates = te if isinstance(te, list) else [te]
    names = ["textencoder"] if len(te_rates) == 1 else [f"textencoder{i + 1}" for i in range(len(te_rates))]
    groups = [] if cfg.network_train_unet_only else list(zip(names, te_rates))
    if not cfg.network_train_text_encoder_only:
        groups.append(("unet", cfg.unet_lr))
    groups = [(name, cfg.learning_rate if lr is None else lr) for name, lr in groups]
    return [(name, lr) for name, lr in groups if lr] or [("unet", cfg.learning_rate)]


def schedule_values(cfg, steps: int) -> dict[str, list[float]]:
    """The rate of each group at steps 1..steps, as the trainer logs it."""
    rates = group_rates(cfg)
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for _, lr in rates]
    optimizer = optim.build_optimizer(cfg, groups)
    scheduler = optim.build_scheduler(cfg, optimizer, steps)
    values: dict[str, list[float]] = {name: [] for name, _ in rates}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # stepping without gradients is the point here
        for _ in range(steps):
            for name, lr in zip(values, scheduler.get_last_lr()):
                values[name].append(float(lr))
            optimizer.step()  # no gradients: nothing moves, but the order is the trainer's
            scheduler.step()
    return values


def draw(values: dict[str, list[float]], title: str) -> Image.Image:
    """A line chart: one line per group, step on x, learning rate on y (from 0 to the peak)."""
    (width, height), (left, right, top, bottom) = SIZE, MARGIN
    image = Image.new("RGB", SIZE, "white")
    pen, font = ImageDraw.Draw(image), ImageFont.load_default()
    steps = len(next(iter(values.values())))
    peak = max(max(v) for v in values.values()) or 1.0

    def x(step: int) -> float:
        return left + (width - left - right) * (step - 1) / max(1, steps - 1)

    def y(lr: float) -> float:
        return top + (height - top - bottom) * (1 - lr / peak)

    for i in range(5):
        lr, step = peak * i / 4, 1 + round((steps - 1) * i / 4)
        pen.line([(left, y(lr)), (width - right, y(lr))], fill=(225, 225, 225))
        pen.text((left - 8, y(lr)), f"{lr:.3g}", fill="black", font=font, anchor="rm")
        pen.text((x(step), height - bottom + 8), str(step), fill="black", font=font, anchor="mt")
    pen.line([(left, top), (left, height - bottom), (width - right, height - bottom)], fill="black")
    pen.text((width / 2, height - 14), "step", fill="black", font=font, anchor="mm")
    pen.text((width / 2, top / 2), title, fill="black", font=font, anchor="mm")
    for i, (name, lrs) in enumerate(values.items()):
        color = COLORS[i % len(COLORS)]
        points = [(x(s + 1), y(lr)) for s, lr in enumerate(lrs)] if steps > 1 else [(left, y(lrs[0])),
                                                                                   (width - right, y(lrs[0]))]
        pen.line(points, fill=color, width=2 * (len(values) - i))  # earlier lines wider: equal ones stay visible
        pen.rectangle([width - right - 140, top + 6 + 16 * i, width - right - 128, top + 16 + 16 * i], fill=color)
        pen.text((width - right - 122, top + 11 + 16 * i), name, fill="black", font=font, anchor="lm")
    return image


def summary(values: dict[str, list[float]]) -> str:
    """The rates at the start, the quarters and the end of the run, one line per group."""
    steps = len(next(iter(values.values())))
    marks = sorted({1 + round((steps - 1) * q / 4) for q in range(5)})
    width = max(len(name) for name in [*values, "step"]) + 1
    lines = [f"{'step':<{width}}" + "".join(f"{m:>11d}" for m in marks)]
    lines += [f"{name:<{width}}" + "".join(f"{lrs[m - 1]:>11.4g}" for m in marks) for name, lrs in values.items()]
    return "\n".join(lines)


def plot(config: str, out: str | None = None, steps: int | None = None) -> dict[str, list[float]]:
    """Read `config`, write the PNG and print the summary; returns the rates per group."""
    cfg = parse_args(["--config_file", config])
    if steps is not None and steps < 1:
        raise UserError(f"--steps {steps}: must be at least 1")
    steps = total_steps(cfg, steps, cfg.config_file)
    values = schedule_values(cfg, steps)
    name = os.path.splitext(os.path.basename(cfg.config_file))[0]
    out = out or f"{name}_lr.png"
    image = draw(values, f"{name}: {optim.optimizer_row(cfg).name}, {cfg.lr_scheduler_type or cfg.lr_scheduler}, "
                         f"{steps} steps")
    from library.saving import _atomic_write  # the PNG appears whole or not at all

    _atomic_write(out, lambda tmp: image.save(tmp, format="PNG"))
    print(summary(values))
    print(f"wrote {out}")
    return values


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="plot_lr_schedule.py", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="a kohya training config (.toml)")
    parser.add_argument("--out", help="PNG to write (default: <config name>_lr.png in the current folder)")
    parser.add_argument("--steps", type=int, help="steps to draw (default: the config's run length)")
    args = parser.parse_args(argv)
    return run_cli(lambda _: plot(args.config, args.out, args.steps) and 0, [])


if __name__ == "__main__":
    sys.exit(main())
