"""Saving during training and exact resume: kohya's file names and cadence, training-state folders.

Names (kohya's train_util patterns; the defaults apply when --output_name is not given):
    NAME-000004.safetensors         after epoch 4 (--save_every_n_epochs / --save_n_epoch_ratio; default NAME "epoch")
    NAME-step00000100.safetensors   after step 100 (--save_every_n_steps; default NAME "at")
    NAME.safetensors                at the end (default NAME "last")
    ...-state/                      the training state beside a save (--save_state), NAME-state/ at the end
With --ema and --ema_save both, each save also writes the averaged weights as NAME...-ema.safetensors.

A state folder holds accelerate's save_state (network, optimizer, scheduler, RNG states, the accumulation
counter), `train_state.json` and, with --ema, `ema.safetensors`. `train_state.json` keeps kohya's keys
(`current_epoch`, `current_step`: kohya resumes from it too) and, under "sdtune", the global step, the
data-order seed and the resolved options. Steps and epochs are global: a resumed run counts on from the
state, so its file names, logs and ss_steps / ss_epoch continue where the first run stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import shutil
from dataclasses import dataclass

from library import saving
from library.errors import UserError

logger = logging.getLogger(__name__)

STATE_FILE = "train_state.json"
EMA_FILE = "ema.safetensors"
# Files accelerate's save_state always writes: one of them marks a folder as a training state.
ACCELERATE_FILES = ("optimizer.bin", "random_states_0.pkl")
# Never written to a state: it may be shared with others.
SECRET_OPTIONS = ("huggingface_token", "wandb_api_key")
# Options that may differ on resume without changing what is trained (outputs, logging, cadence, workers).
RESUME_FREE_PREFIXES = ("resume", "output_", "logging_dir", "log_", "console_", "save_", "sample_", "initial_",
                        "skip_until", "huggingface", "max_data_loader", "persistent_", "config_file", "ema_sample")


# --- names and cadence ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Names:
    """kohya's names of saved files and state folders (without extension)."""

    output_name: str | None
    extension: str

    @classmethod
    def from_cfg(cls, cfg) -> "Names":
        fmt = cfg.save_model_as or "safetensors"
        return cls(cfg.output_name, "" if fmt.startswith("diffusers") else "." + fmt)  # diffusers: a folder

    def epoch(self, epoch: int) -> str:
        return f"{self.output_name or 'epoch'}-{epoch:06d}"

    def step(self, step: int) -> str:
        return f"{self.output_name or 'at'}-step{step:08d}"

    def last(self) -> str:
        return self.output_name or "last"


def weight_files(stem: str, extension: str, ema_save: str | None) -> list[tuple[str, bool]]:
    """The files of one save as (name, holds the EMA weights); `ema_save` is None without --ema."""
    if ema_save == "ema":
        return [(stem + extension, True)]
    if ema_save == "both":
        return [(stem + extension, False), (stem + "-ema" + extension, True)]
    return [(stem + extension, False)]


def save_every_n_epochs(cfg, num_epochs: int) -> int | None:
    """--save_n_epoch_ratio N wins over --save_every_n_epochs: every floor(epochs / N) epochs, at least 1 (kohya)."""
    if cfg.save_n_epoch_ratio:
        return max(num_epochs // cfg.save_n_epoch_ratio, 1)
    return cfg.save_every_n_epochs


def epoch_to_remove(epoch: int, every: int, keep: int | None) -> int | None:
    """kohya's --save_last_n_epochs N: saving epoch e removes the save of epoch e - every * N."""
    if not keep:
        return None
    old = epoch - every * keep
    return old if old > 0 else None


def step_to_remove(step: int, every: int, keep: int | None) -> int | None:
    """kohya's --save_last_n_steps N: saving step s removes the save at the multiple of `every` at or below
    s - N - 1, so the saves of the last N steps stay (every 10, N 30: step 50 removes step 10)."""
    if not keep:
        return None
    old = step - keep - 1
    old -= old % every
    return old if old > 0 else None


# --- checks before anything is loaded -----------------------------------------------------------------------

def check_options(cfg) -> None:
    """One-line errors for values kohya would crash on later (or silently misuse)."""
    lows = {"initial_epoch": 1, "initial_step": 0, "save_every_n_steps": 0, "save_n_epoch_ratio": 0,
            "save_last_n_epochs": 0, "save_last_n_epochs_state": 0, "save_last_n_steps": 0,
            "save_last_n_steps_state": 0, "ema_update_interval": 1}
    for name, low in lows.items():
        value = getattr(cfg, name, None)
        if value is not None and value < low:
            raise UserError(f"--{name} {value}: must be at least {low}")
    if getattr(cfg, "ema", False) and not 0 < cfg.ema_decay < 1:
        raise UserError(f"--ema_decay {cfg.ema_decay}: must be between 0 and 1, e.g. 0.999")


def check_before_loading(cfg) -> None:
    """Check the options of this module and the --resume folder; take the state's seed when none is given
    (the data order follows the seed, so an exact resume needs the same one)."""
    check_options(cfg)
    if not cfg.resume:
        return
    saved = read_state(cfg.resume)
    if cfg.seed is None and saved.seed is not None:
        cfg.seed = saved.seed
        logger.info("--resume: seed %d taken from the state", saved.seed)


def changed_options(saved: dict, cfg) -> list[str]:
    """Options that change what is trained and differ from the saved run's."""
    current = config_dict(cfg)
    return sorted(name for name, value in saved.items()
                  if name in current and current[name] != value and not name.startswith(RESUME_FREE_PREFIXES))


def config_dict(cfg) -> dict:
    """The resolved options as JSON values, secrets left out."""
    values = {k: v for k, v in sorted(vars(cfg).items()) if k not in SECRET_OPTIONS}
    return json.loads(json.dumps(values, default=str))


# --- state folders ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SavedState:
    """What train_state.json says about a state folder."""

    folder: str
    step: int
    seed: int | None = None
    config: dict | None = None
    rng: dict | None = None  # the RNG states as loaded, put back just before the first step


def read_state(folder: str) -> SavedState:
    """Read a state folder's train_state.json (kohya's or ours); a folder that is not a state is a UserError."""
    if not os.path.isdir(folder):
        raise UserError(f"--resume {folder}: no such folder")
    if not any(os.path.isfile(os.path.join(folder, name)) for name in ACCELERATE_FILES):
        raise UserError(f"--resume {folder}: not a training state (it has no {ACCELERATE_FILES[0]}); "
                        "give a folder written with --save_state, such as OUTPUT_NAME-step00000100-state")
    path = os.path.join(folder, STATE_FILE)
    if not os.path.isfile(path):
        logger.warning("--resume %s: no %s (an older kohya state): training restarts at step 0", folder, STATE_FILE)
        return SavedState(folder, 0)
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        ours = data.get("sdtune", {})
        return SavedState(folder, int(data["current_step"]), ours.get("seed"), ours.get("config") or {})
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"{path}: not a readable training state ({exc})") from None


def train_state(run, epoch: int, step: int) -> dict:
    """train_state.json: kohya's two keys, then ours (global step, 1-based epoch, seed, options)."""
    return {
        "current_epoch": epoch,
        "current_step": step,
        "sdtune": {"global_step": step, "epoch": epoch, "steps_per_epoch": run.steps_per_epoch,
                   "max_train_steps": run.max_steps, "seed": run.cfg.seed, "ema": run.ema is not None,
                   "config": config_dict(run.cfg)},
    }


def save_state(run, name: str, epoch: int, step: int) -> str:
    """Write the training state as folder `name`: built under a temporary name and moved into place when
    complete, so an interrupted save never damages an earlier state of the same name."""
    cfg, acc = run.cfg, run.accelerator
    path = os.path.join(cfg.output_dir, name)
    partial = saving.partial_folder(path)
    if acc.is_main_process and os.path.exists(partial):
        shutil.rmtree(partial)  # left behind by a crash
    acc.wait_for_everyone()
    acc.save_state(partial)  # every process writes its own RNG state
    if acc.is_main_process:
        text = json.dumps(train_state(run, epoch, step), indent=1)
        saving.atomic_write_text(os.path.join(partial, STATE_FILE), text + "\n")
        if run.ema is not None:
            run.ema.save(os.path.join(partial, EMA_FILE))
        saving.replace_folder(partial, path)
        logger.info("saved state %s", path)
    acc.wait_for_everyone()
    return path


def load_state(run) -> SavedState:
    """Load --resume into the prepared network, optimizer, scheduler and RNGs (after accelerate.prepare)."""
    saved = read_state(run.cfg.resume)
    try:
        run.accelerator.load_state(saved.folder)
    except (RuntimeError, KeyError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"--resume {saved.folder}: the state does not fit this run ({first})") from None
    saved = dataclasses.replace(saved, rng=capture_rng())
    logger.info("resumed from %s at step %d", saved.folder, saved.step)
    changed = changed_options(saved.config or {}, run.cfg)
    if changed:
        logger.warning("--resume %s: options differ from the run that saved it (%s): training goes on with "
                       "the new values, so it no longer matches an uninterrupted run", saved.folder, ", ".join(changed))
    return saved


def capture_rng() -> dict:
    """The global random states training draws from (torch CPU and CUDA, Python, numpy)."""
    import numpy
    import torch

    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return {"torch": torch.get_rng_state(), "cuda": cuda, "python": random.getstate(),
            "numpy": numpy.random.get_state()}


def restore_rng(states: dict) -> None:
    """Put back `capture_rng`'s states: whatever ran between loading a state and the first step (a sample
    round, a report) then leaves the resumed run's noise as it was when the state was saved."""
    import numpy
    import torch

    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None:
        torch.cuda.set_rng_state_all(states["cuda"])
    random.setstate(states["python"])
    numpy.random.set_state(states["numpy"])


def resume_ema(run) -> None:
    """Continue the EMA from the state when it has one; otherwise it starts from the resumed weights."""
    if run.ema is None or run.resumed is None:
        return
    path = os.path.join(run.resumed.folder, EMA_FILE)
    if os.path.isfile(path):
        run.ema.load(path)
    else:
        logger.warning("--resume %s holds no EMA: the average starts from the resumed weights", run.resumed.folder)


# --- where a run starts --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Start:
    """Where the loop begins: `step` optimizer steps are done, in epoch `epoch` (0-based) whose first
    `skip_batches` batches were already trained."""

    step: int = 0
    epoch: int = 0
    skip_batches: int = 0


def start_point(cfg, saved_step: int | None, steps_per_epoch: int, accumulation: int, max_steps: int) -> Start:
    """kohya's rules: --initial_step (or --initial_epoch) wins over the state's step; without
    --skip_until_initial_step only whole epochs are skipped. A resumed state continues exactly at its step
    (kohya restarts the epoch unless --skip_until_initial_step is given)."""
    step, exact = (saved_step, True) if saved_step is not None else (0, False)
    if cfg.initial_step is not None or cfg.initial_epoch is not None:
        if saved_step is not None:
            logger.warning("--initial_step / --initial_epoch given: the state's step %d is not used", saved_step)
        step = cfg.initial_step if cfg.initial_step is not None else (cfg.initial_epoch - 1) * steps_per_epoch
        exact = bool(cfg.skip_until_initial_step)
    if step and step >= max_steps:
        raise UserError(f"the run would start at step {step} but --max_train_steps is {max_steps}: nothing left "
                        "to train (raise --max_train_steps or --max_train_epochs)")
    epoch = step // steps_per_epoch
    if not exact:
        step = epoch * steps_per_epoch
    return Start(step, epoch, (step - epoch * steps_per_epoch) * accumulation)


def run_start(run) -> Start:
    """The run's Start, logged."""
    cfg = run.cfg
    saved_step = run.resumed.step if run.resumed is not None else None
    start = start_point(cfg, saved_step, run.steps_per_epoch, cfg.gradient_accumulation_steps, run.max_steps)
    if start.step:
        logger.info("starting after step %d, in epoch %d%s", start.step, start.epoch + 1,
                    f" after its first {start.skip_batches} batches" if start.skip_batches else "")
        if run.resumed is None:
            logger.warning("without --resume the learning-rate schedule and the optimizer start afresh (as kohya)")
    return start


def check_finite(loss: float, step: int, last_saved: str | None) -> None:
    """Stop at a NaN or infinite loss, before it reaches the weights or any save."""
    if math.isfinite(loss):
        return
    kept = f"the last save, {last_saved}, is kept" if last_saved else "nothing was saved in this run"
    raise UserError(f"step {step}: the loss is {loss}; training stopped and {kept}. Try a lower --learning_rate, "
                    "--mixed_precision bf16 instead of fp16, or --no_half_vae")


# --- saving on the way ----------------------------------------------------------------------------------

def write_weights(method, ema, files: list[tuple[str, bool]], dtype, metadata: dict) -> None:
    """Write each (path, averaged) file: .safetensors through the method, .ckpt / .pt as a torch.save of the
    network's state dict, as kohya's networks do."""
    from library.metadata import SESSION_KEY

    for path, averaged in files:
        with ema.applied() if averaged else contextlib.nullcontext():
            meta = {**metadata, **ema.metadata()} if averaged and SESSION_KEY in metadata else metadata
            if path.endswith(".safetensors") or method.name == "fine_tune":  # a checkpoint: every format
                method.save(path, dtype, meta)
            else:
                tensors = {k: v.detach().to("cpu", dtype or v.dtype) for k, v in method.module.state_dict().items()}
                saving.save_torch_file(tensors, path)
        logger.info("saved %s", path)


def remove_save(run, stem: str) -> None:
    """Remove an older save (both its raw and EMA files), as --save_last_n_* ask."""
    extension = Names.from_cfg(run.cfg).extension
    # with --embedding_token_string a network save has its embedding file beside it (NAME_emb)
    names = [name + suffix + extension for name in (stem, stem + "-ema") for suffix in ("", "_emb")]
    for name in names:
        path = os.path.join(run.cfg.output_dir, name)
        if os.path.isfile(path):
            logger.info("removing old save %s", path)
            os.remove(path)
        elif os.path.isfile(os.path.join(path, "model_index.json")):  # a diffusers folder (fine_tune)
            logger.info("removing old save %s", path)
            shutil.rmtree(path)


def remove_state(run, name: str) -> None:
    path = os.path.join(run.cfg.output_dir, name)
    if os.path.isdir(path):
        logger.info("removing old state %s", path)
        shutil.rmtree(path)


def save_on_step(run, step: int, epoch: int) -> None:
    """--save_every_n_steps (kohya records the epochs finished before the step as ss_epoch)."""
    cfg, names = run.cfg, Names.from_cfg(run.cfg)
    every = cfg.save_every_n_steps
    if not every or step % every:
        return
    run.save(names.step(step), epoch - 1, step)
    main = run.accelerator.is_main_process
    if cfg.save_state:
        save_state(run, names.step(step) + "-state", epoch, step)
        old = step_to_remove(step, every, cfg.save_last_n_steps_state or cfg.save_last_n_steps)
        if old is not None and main:
            remove_state(run, names.step(old) + "-state")
    old = step_to_remove(step, every, cfg.save_last_n_steps)
    if old is not None and main:
        remove_save(run, names.step(old))


def save_on_epoch(run, epoch: int, steps: int) -> None:
    """--save_every_n_epochs / --save_n_epoch_ratio, after every epoch but the last."""
    cfg, names = run.cfg, Names.from_cfg(run.cfg)
    every = save_every_n_epochs(cfg, run.num_epochs)
    if not every or epoch % every:
        return
    run.save(names.epoch(epoch), epoch, steps)
    main = run.accelerator.is_main_process
    old = epoch_to_remove(epoch, every, cfg.save_last_n_epochs)
    if old is not None and main:
        remove_save(run, names.epoch(old))
    if cfg.save_state:
        save_state(run, names.epoch(epoch) + "-state", epoch, steps)
        old = epoch_to_remove(epoch, every, cfg.save_last_n_epochs_state or cfg.save_last_n_epochs)
        if old is not None and main:
            remove_state(run, names.epoch(old) + "-state")


def save_on_train_end(run, epoch: int, steps: int) -> None:
    """The state first (--save_state / --save_state_on_train_end), then the final weights, as kohya."""
    cfg, names = run.cfg, Names.from_cfg(run.cfg)
    if cfg.save_state or cfg.save_state_on_train_end:
        save_state(run, names.last() + "-state", epoch, steps)
    run.save(names.last(), run.num_epochs, steps)
