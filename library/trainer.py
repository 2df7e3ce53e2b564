"""THE training loop, shared by every script: it never asks which model family or method it runs."""

from __future__ import annotations

import logging
import math
import os
import random
import time

import torch
from tqdm.auto import tqdm

from library import caching, fused_backward, inpainting, losses, optim, precision, sampling, state
from library.config import parse_args, write_output_config
from library.dataset import BatchLoader, build_dataset
from library.dataset.report import build_report, schedule_length
from library.ema import build_ema
from library.errors import UserError
from library.methods import METHODS
from library.models import load_model

logger = logging.getLogger(__name__)

SAVE_DTYPES = {None: None, "float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# kohya's default TensorBoard run name of each script (--log_tracker_name overrides it)
TRACKER_NAMES = {"network": "network_train", "embedding": "textual_inversion", "fine_tune": "finetuning"}


def run(argv, script: str, method: str) -> int:
    """Parse the options of `script`, then write them (--output_config), show the dataset
    (--debug_dataset: no model is loaded, nothing is written) or train."""
    cfg = parse_args(argv, script)
    if cfg.output_config:
        write_output_config(cfg, cfg.output_config, script)
        logger.info("wrote %s", cfg.output_config)
        return 0
    if cfg.debug_dataset:
        from library.dataset.report import debug_dataset

        print(debug_dataset(build_dataset(cfg)), end="")
        return 0
    train(cfg, METHODS[method])
    return 0


def check_required(cfg) -> None:
    """Options kohya also needs, checked before anything is loaded or written."""
    for name in ("pretrained_model_name_or_path", "output_dir"):
        if not getattr(cfg, name):
            raise UserError(f"--{name} is required")
    if not cfg.train_data_dir and not cfg.dataset_config:
        raise UserError("--train_data_dir or --dataset_config is required")


class Run:
    """Everything one training run holds: built in order, so bad input fails before any write."""

    def __init__(self, cfg, method_cls):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import set_seed

        check_required(cfg)
        optim.validate(cfg)  # names, packages and argument keys: checked before anything loads
        if hasattr(method_cls, "check_options"):
            method_cls.check_options(cfg)  # the method's own options, before anything loads
        self.sampler = sampling.Sampler.from_config(cfg)  # a bad prompt file stops the run here
        caching.resolve_cache_options(cfg)
        if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise UserError("--mixed_precision fp16 needs a CUDA GPU; on CPU use bf16 or no")
        precision.check_options(cfg)
        self.loss_settings = losses.LossSettings.from_cfg(cfg)
        if cfg.seed is None:
            cfg.seed = random.randint(0, 2**32 - 1)  # kohya draws one too, and records it in metadata
        set_seed(cfg.seed)
        self.cfg = cfg
        self.dataset = build_dataset(cfg)  # before the model: a bad folder is reported in a second
        if cfg.cache_text_encoder_outputs:
            # fixed captions, frozen text encoders (the method says whether its run trains one)
            caching.check_text_cache_options(cfg, self.dataset, method_cls.text_encoder_trains(cfg))
        self.family = load_model(cfg)
        inpainting.check_options(cfg, self.family)  # a 9-channel U-Net needs its images at every step
        self.loss_settings.check_prediction(self.family.v_prediction, cfg.zero_terminal_snr)  # a folder may set v
        if cfg.zero_terminal_snr:  # before anything reads the schedule: SNR weights use the rescaled one
            self.family.noise_scheduler = losses.zero_terminal_snr_scheduler(self.family.noise_scheduler)
        self.dataset.verify_bucket_reso_steps(self.family.bucket_divisor)
        self.weight_dtype = WEIGHT_DTYPES[cfg.mixed_precision or "no"]
        self._freeze_base(method_cls.trained_models(cfg, self.family))
        self.method = method_cls(cfg, self.family)
        precision.cast_trained_network(self.method.module, cfg, self.weight_dtype)
        precision.compile_unet(self.family.unet, cfg)  # after the network has patched the UNet's layers
        groups, self.group_names = self.method.param_groups()
        self.optimizer = optim.build_optimizer(cfg, groups)
        self.steps_per_epoch = math.ceil(len(self.dataset) / cfg.gradient_accumulation_steps)
        self.max_steps, self.num_epochs = self._schedule_length()
        self.logging_dir = self._logging_dir()
        # accelerate keeps its state per process; a second in-process run (tests, notebooks) may
        # ask for another precision, so start from a clean state.
        AcceleratorState._reset_state(reset_partial_state=True)
        self.accelerator = Accelerator(
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            mixed_precision=cfg.mixed_precision or "no",
            log_with=cfg.log_with or ("tensorboard" if self.logging_dir else None),
            project_dir=self.logging_dir,
            cpu=not torch.cuda.is_available(),
        )
        # accelerate steps a prepared scheduler once per process on every optimizer step.
        total = self.max_steps * self.accelerator.num_processes
        self.lr_scheduler = optim.build_scheduler(cfg, self.optimizer, total)
        if cfg.full_fp16:
            precision.allow_fp16_gradients(self.accelerator.scaler)

    def _freeze_base(self, trained: list) -> None:
        """Freeze the base model; the method unfreezes what it trains. Frozen weights may drop to the
        mixed-precision dtype (the VAE too, unless --no_half_vae) or be stored in fp8 (--fp8_base); see
        library/precision.py. `trained` (whole models a full fine-tune trains) keep float32."""
        fam = self.family
        for model in [fam.unet, fam.vae, *fam.text_encoders]:
            model.requires_grad_(False)
            model.eval()
        precision.place_for_lowram(fam, self.cfg)
        if self.cfg.xformers:
            from library.models import enable_xformers

            enable_xformers(fam)
        if self.cfg.gradient_checkpointing:
            fam.unet.enable_gradient_checkpointing()
            for te in fam.text_encoders:
                te.gradient_checkpointing_enable()
        if self.weight_dtype != torch.float32:  # frozen weights in half precision save memory
            for model in precision.half_models(fam, self.cfg.no_half_vae):
                if not any(model is kept for kept in trained):
                    model.to(dtype=self.weight_dtype)
        precision.store_base_in_fp8(fam, self.cfg, self.weight_dtype)

    def _schedule_length(self) -> tuple[int, int]:
        """kohya's rule (library.dataset.report.schedule_length, which the report shows too)."""
        return schedule_length(self.steps_per_epoch, self.cfg.max_train_steps, self.cfg.max_train_epochs)

    def _logging_dir(self) -> str | None:
        cfg = self.cfg
        if not cfg.logging_dir:
            if cfg.log_with:
                raise UserError(f"--log_with {cfg.log_with} needs --logging_dir")
            return None
        return os.path.join(cfg.logging_dir, (cfg.log_prefix or "") + time.strftime("%Y%m%d%H%M%S"))

    # --- the loop -------------------------------------------------------------------------------

    def cache_latents(self) -> None:
        """Encode every image once; the VAE then leaves memory, or waits on the CPU for sample images."""
        device = self.accelerator.device
        vae = self.family.vae.to(device)
        cache = caching.make_latent_cache(self.cfg, vae, self.family.name)
        with torch.no_grad():
            self.dataset.cache_latents(self.family.encode_images, self.cfg.vae_batch_size or 1, cache)
        vae.to("cpu")
        if not sampling.wanted(self.cfg):
            self.family.vae = None  # nothing else holds it during a network run
        del vae

    def cache_text_encoder_outputs(self) -> None:
        """Encode every caption once (library/caching.py); the text encoders then wait on the CPU, where
        sample rounds find them."""
        caching.cache_text_encoder_outputs(self.dataset, self.family, self.cfg, self.accelerator.device)
        for te in self.family.text_encoders:
            te.to("cpu")

    def prepare(self) -> None:
        """Cache latents, place models, hand the trainable parts to accelerate (once)."""
        if getattr(self, "network", None) is not None:
            return
        acc, fam = self.accelerator, self.family
        if self.cfg.fused_backward_pass:
            fused_backward.check_processes(acc.num_processes)  # before the latent cache writes anything
        if self.cfg.cache_latents:
            self.cache_latents()
        else:
            fam.vae.to(acc.device)
        fam.unet.to(acc.device)
        for te in fam.text_encoders:
            te.to(acc.device)
        if self.cfg.cache_text_encoder_outputs:
            self.cache_text_encoder_outputs()
        if self.cfg.gradient_checkpointing:
            self.method.enable_gradient_checkpointing()
            # diffusers and transformers only checkpoint in training mode (SD's CLIP has no dropout)
            for model in [fam.unet, *fam.text_encoders]:
                model.train()
        self.loader = BatchLoader(self.dataset, self.cfg.max_data_loader_n_workers,
                                  self.cfg.persistent_data_loader_workers)
        self.network, self.optimizer, self.lr_scheduler = acc.prepare(
            self.method.module, self.optimizer, self.lr_scheduler
        )
        self.method.prepare_grad()
        self.fused = fused_backward.install(self.cfg, self.optimizer)
        self.resumed = state.load_state(self) if self.cfg.resume else None

    def step_loss(self, batch) -> torch.Tensor:
        """One batch: encode, noise, predict, compare (each part is in library/losses.py). Returns the mean loss."""
        fam, acc, settings = self.family, self.accelerator, self.loss_settings
        self.method.set_multiplier(batch.get("network_multiplier", 1.0))
        latents = batch["latents"]
        if latents is None:
            with torch.no_grad():
                latents = fam.encode_images(batch["images"])  # moved to the VAE's device and dtype
        latents = latents.to(acc.device, dtype=torch.float32)
        inpainting.add_conditioning(batch, latents, fam, self.cfg, getattr(self, "global_step", 0))  # 9-ch U-Nets
        cond = batch.get("text_outputs")  # --cache_text_encoder_outputs
        if cond is None:
            with torch.set_grad_enabled(self.method.train_text_encoder), acc.autocast():
                cond = fam.encode_conditioning(batch["captions"])
        noise, noisy, timesteps = losses.noisy_latents(settings, fam.noise_scheduler, latents)
        with acc.autocast():
            prediction = fam.predict(noisy.to(self.weight_dtype), timesteps, cond, batch)
        target = losses.training_target(fam.noise_scheduler, latents, noise, timesteps, fam.v_prediction)
        huber_c = losses.huber_threshold(settings, fam.noise_scheduler, timesteps)
        per_sample = self._per_sample_loss(prediction, target, batch.get("masks"), huber_c)
        # per-sample weights multiply each sample's loss after its mask and mean (kohya's order)
        weights = losses.prior_loss_weights(batch["is_reg"], self.cfg.prior_loss_weight)
        weights = weights * losses.timestep_weights(settings, fam.noise_scheduler, timesteps, fam.v_prediction)
        return losses.weighted_mean(per_sample, weights)

    def _per_sample_loss(self, prediction, target, masks, huber_c=None) -> torch.Tensor:
        """Per-sample --loss_type loss, plain or masked (--masked_loss / --alpha_mask; see library/losses.py)."""
        loss_type = self.loss_settings.loss_type
        if masks is None:
            return losses.diffusion_loss(prediction, target, loss_type, huber_c)
        cfg = self.cfg
        return losses.masked_diffusion_loss(prediction, target, masks, cfg.masked_loss_unmasked_weight,
                                            cfg.masked_loss_normalize, loss_type, huber_c)

    def train(self) -> list[float]:
        """Run all steps (from a --resume state's step on); returns this run's per-step losses (tests read them)."""
        from library.metadata import build_training_metadata

        cfg, acc = self.cfg, self.accelerator
        self.prepare()
        start = state.run_start(self)  # a start past the end stops here, before the report is written
        self._report_dataset()
        if self.logging_dir:
            acc.init_trackers(cfg.log_tracker_name or TRACKER_NAMES.get(self.method.name, "network_train"))
        self.metadata = build_training_metadata(
            cfg, dataset_info=self.dataset.info, family_name=self.family.name,
            v_prediction=self.family.v_prediction, num_batches_per_epoch=len(self.dataset),
            num_epochs=self.num_epochs, max_train_steps=self.max_steps,
            optimizer_name=_optimizer_label(self.optimizer, cfg), session_id=random.randint(0, 2**32),
            training_started_at=time.time(), model_path=self.family.model_path, vae_path=self.family.vae_path,
            method=self.method.name,
        )
        logger.info("%d images x repeats, %d batches/epoch, %d epochs, %d steps",
                    self.dataset.info["num_train_images"], len(self.dataset), self.num_epochs, self.max_steps)
        self.extra_logs: dict[str, float] = {}
        self.ema = build_ema(cfg, self.method.module)  # before the text-encoder schedule may freeze a part
        state.resume_ema(self)
        self.global_step, self.last_saved = start.step, None
        if start.epoch:
            self._text_encoder_schedule(start.epoch)  # as the epochs before the start would have left it
        self._before_training()
        if self.resumed is not None:
            state.restore_rng(self.resumed.rng)
        step_losses: list[float] = []
        self.step_times: list[float] = []
        # The context closes the bar on any exit, so an error line starts on a line of its own.
        with tqdm(total=self.max_steps, initial=start.step, desc="steps",
                  disable=not acc.is_local_main_process) as progress:
            for epoch in range(start.epoch, self.num_epochs):
                skip = start.skip_batches if epoch == start.epoch else 0
                epoch_losses = self._train_epoch(epoch, step_losses, progress, skip)
                if epoch_losses:
                    acc.log({"loss/epoch": sum(epoch_losses) / len(epoch_losses)}, step=epoch + 1)
                if self.global_step >= self.max_steps:
                    break
                self._after_epoch(epoch + 1, self.global_step)
        self._log_speed()
        state.save_on_train_end(self, epoch + 1, self.global_step)
        acc.end_training()
        return step_losses

    def _train_epoch(self, epoch: int, step_losses: list[float], progress, skip: int = 0) -> list[float]:
        """One epoch (0-based), from batch `skip` on (a resumed run skips what the state had trained)."""
        cfg, acc = self.cfg, self.accelerator
        self.dataset.set_epoch(epoch)
        self.loader.sampler.set_epoch(epoch, start=skip)
        self.method.on_epoch_start()
        self.network.train()
        optim.train_mode(self.optimizer)
        epoch_losses: list[float] = []
        accumulated = []
        last = len(self.dataset) - 1
        started = time.perf_counter()
        # batches are a pure function of (seed, epoch, index): a resumed epoch starts at `skip`, nothing to replay
        for index, batch in enumerate(self.loader, start=skip):
            if index == last:
                # accelerate ends an accumulation at the end of loaders it prepared, not of this one: the
                # epoch's last batch steps the optimizer, so an epoch holds ceil(batches / accumulation) steps
                acc.step = cfg.gradient_accumulation_steps - 1
            with acc.accumulate(self.network):
                self.method.on_step_start()
                loss = self.step_loss(batch)
                accumulated.append(loss.item())
                state.check_finite(accumulated[-1], self.global_step + 1, self.last_saved)
                acc.backward(loss)
                if self.fused is None:  # --fused_backward_pass stepped each parameter inside backward
                    if acc.sync_gradients and cfg.max_grad_norm:
                        acc.clip_grad_norm_(self.network.parameters(), cfg.max_grad_norm)
                    self.optimizer.step()
                self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            if not acc.sync_gradients:
                continue
            self.global_step += 1
            self._after_optimizer_step()
            current = sum(accumulated) / len(accumulated)
            accumulated.clear()
            step_losses.append(current)
            self.step_times.append(time.perf_counter() - started)
            started = time.perf_counter()
            epoch_losses.append(current)
            average = sum(epoch_losses) / len(epoch_losses)
            progress.update(1)
            progress.set_postfix(avr_loss=f"{average:.4f}", epoch=epoch + 1)
            acc.log(self._step_logs(current, average), step=self.global_step)
            self._after_step(self.global_step, epoch + 1)
            if self.global_step >= self.max_steps:
                break
        return epoch_losses

    # --- hooks: each feature owns one method; the loop only calls them ----------------------------

    def _before_training(self) -> None:
        """Once, after the dataset report and before the first step."""
        self._warn_rules_of_thumb()
        self._sample_before_training()

    def _after_optimizer_step(self) -> None:
        """After each real optimizer step (not each accumulation micro-batch), before logging."""
        self.method.after_optimizer_step()
        self._scale_weight_norms()
        self._update_ema()

    def _after_step(self, step: int, epoch: int) -> None:
        """After step `step` (1-based, counted over the run) has been logged; `epoch` is 1-based."""
        self._sample_on_step(step, epoch)
        self._save_on_step(step, epoch)

    def _after_epoch(self, epoch: int, steps: int) -> None:
        """After epoch `epoch` (1-based) unless it was the last one; `steps` done so far."""
        self._text_encoder_schedule(epoch)
        self._sample_on_epoch(epoch, steps)
        self._save_on_epoch(epoch, steps)

    # One method per feature; each is filled in by the module that owns the feature.

    def _warn_rules_of_thumb(self) -> None:
        """Warnings from the seeds' rules of thumb (library/advice.py), once, from the main process."""
        from library import advice

        if not self.accelerator.is_main_process:
            return
        facts = advice.RunFacts(optim.group_lrs(self.optimizer, self.group_names), advice.buckets_of(self.dataset),
                                self.family.name)
        for line in advice.rule_of_thumb_warnings(self.cfg, facts):
            logger.warning("%s", line)

    def _sample_before_training(self) -> None:
        """--sample_at_first (library/sampling.py); the prompt file was read when the run was built."""
        if self.sampler is not None and self.cfg.sample_at_first:
            self.sampler.round(self, epoch=0, steps=0)  # kohya names this round as epoch 0

    def _sample_on_step(self, step: int, epoch: int) -> None:
        """--sample_every_n_steps; also the last epoch's --sample_every_n_epochs round, as the loop
        ends there without calling _after_epoch (library/sampling.py)."""
        sampler, cfg = self.sampler, self.cfg
        if sampler is None:
            return
        if sampling.due_on_step(cfg, step):
            sampler.round(self, epoch=None, steps=step)
        elif step >= self.max_steps and sampling.due_on_epoch(cfg, epoch):
            sampler.round(self, epoch=epoch, steps=step)

    def _sample_on_epoch(self, epoch: int, steps: int) -> None:
        """--sample_every_n_epochs (library/sampling.py)."""
        sampler = self.sampler
        if sampler is not None and sampling.due_on_epoch(self.cfg, epoch):
            sampler.round(self, epoch=epoch, steps=steps)

    def _scale_weight_norms(self) -> None:
        """--scale_weight_norms: max-norm regularisation; its figures go to self.extra_logs."""
        max_norm = self.cfg.scale_weight_norms
        if max_norm:
            self.extra_logs.update(self.method.scale_weight_norms(max_norm, self.accelerator.device))

    def _update_ema(self) -> None:
        """--ema: update the moving average of the trained weights (library/ema.py)."""
        if self.ema is not None:
            self.ema.step(self.global_step)

    def _text_encoder_schedule(self, epoch: int) -> None:
        """--text_encoder_train_epochs: once `epoch` epochs are done (1-based), the text encoder's part of
        the network is frozen. It depends on `epoch` only, so a resumed run calls it with its epoch count."""
        limit = self.cfg.text_encoder_train_epochs
        # an embedding trained with the network keeps the text encoders running with gradients: stop once
        if limit and epoch >= limit and self.method.train_text_encoder and not getattr(self, "_te_stopped", False):
            self._te_stopped = True
            self.method.stop_text_encoder_training()
            logger.info("text encoder training stopped after epoch %d (--text_encoder_train_epochs)", epoch)

    def _save_on_step(self, step: int, epoch: int) -> None:
        """--save_every_n_steps, --save_last_n_steps and their states (library/state.py)."""
        state.save_on_step(self, step, epoch)

    def _save_on_epoch(self, epoch: int, steps: int) -> None:
        """--save_every_n_epochs / --save_n_epoch_ratio, --save_last_n_epochs and their states."""
        state.save_on_epoch(self, epoch, steps)

    def _report_dataset(self) -> None:
        """The pre-flight report: logged, and written next to the outputs (dataset_report.txt / .json)."""
        if not self.accelerator.is_main_process:
            return
        report = build_report(self.dataset, self.cfg, self.family.count_tokens)
        logger.info("dataset report:\n%s", report.text())
        report.write(self.cfg.output_dir)

    def _log_speed(self) -> None:
        """One line of speed figures (bench/ reads it): the first step pays for warm-up, so it is apart."""
        times = self.step_times
        warm = times[1:] or times
        logger.info("speed: %d steps, first %.3f s, %.3f s/step after", len(times), times[0] if times else 0.0,
                    sum(warm) / max(len(warm), 1))

    def _step_logs(self, current: float, average: float) -> dict:
        """This step's figures; hooks that ran since the last step may have added to extra_logs."""
        logs = {"loss/current": current, "loss/average": average, **self.extra_logs,
                **optim.adaptive_lr_logs(self.optimizer, self.group_names)}
        self.extra_logs.clear()
        for name, lr in zip(self.group_names, self.lr_scheduler.get_last_lr()):
            logs[f"lr/{name}"] = lr
        return logs

    # --- saving -----------------------------------------------------------------------------------

    @property
    def output_name(self) -> str:
        return self.cfg.output_name or "last"

    def save(self, stem: str, epoch: int, steps: int) -> str:
        """Write the trained weights as `stem` in the --save_model_as format; with --ema, the averaged ones
        beside or instead of them (--ema_save). Returns the main file's path."""
        from library.metadata import finalize_metadata

        cfg, acc = self.cfg, self.accelerator
        acc.wait_for_everyone()
        names = state.Names.from_cfg(cfg)
        files = [(os.path.join(cfg.output_dir, name), averaged) for name, averaged in
                 state.weight_files(stem, names.extension, cfg.ema_save if self.ema is not None else None)]
        if acc.is_main_process:
            metadata = finalize_metadata(self.metadata, epoch=epoch, steps=steps)
            optim.eval_mode(self.optimizer)  # a schedule-free optimizer saves its averaged weights
            try:
                state.write_weights(self.method, self.ema, files, SAVE_DTYPES[cfg.save_precision], metadata)
            finally:
                optim.train_mode(self.optimizer)
        self.last_saved = files[0][0]
        return files[0][0]


def _optimizer_label(optimizer, cfg) -> str:
    """kohya records the class path and the args: `torch.optim.adamw.AdamW(weight_decay=0.1)`."""
    inner = getattr(optimizer, "optimizer", optimizer)
    cls = type(inner)
    args = ",".join(cfg.optimizer_args or [])
    return f"{cls.__module__}.{cls.__name__}" + (f"({args})" if args else "")


def train(cfg, method_cls) -> list[float]:
    """Build a run from a resolved config and train it; returns the per-step losses."""
    state.check_before_loading(cfg)  # a bad --resume folder fails before the model loads
    return Run(cfg, method_cls).train()
