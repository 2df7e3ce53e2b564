"""--fused_backward_pass: each parameter is updated inside backward, as soon as its gradient is complete.

A hook registered with `register_post_accumulate_grad_hook` runs the optimizer on that one parameter and
then frees its gradient, so the gradients of the whole model are never held at once (kohya's reason for
the flag: a full SDXL fine-tune keeps gigabytes of gradients otherwise). The run keeps ONE optimizer, so
its state saves and resumes as usual, and the learning-rate schedule still steps once per step.

This is exact only for optimizers whose update of one tensor reads nothing but that tensor's gradient and
state: the table of FUSABLE names below, each checked against an ordinary step in tests/test_fused.py.
"""

from __future__ import annotations

import logging

import torch

from library.errors import UserError

logger = logging.getLogger(__name__)

# Optimizers that update each tensor from its own gradient and state (and per-tensor step counts):
# stepping one parameter at a time gives the weights of one step over all of them.
FUSABLE = frozenset({
    "AdamW", "Adam", "SGD", "SGDNesterov", "Adagrad", "RMSprop", "Lion", "Adafactor",
    "NAdam", "RAdam", "Adamax", "Adadelta",  # torch.optim names kohya reads by name
    "AdamW8bit", "Adam8bit", "PagedAdamW", "PagedAdamW8bit", "PagedAdamW32bit", "Lion8bit", "PagedLion8bit",
    "SGD8bit", "SGDNesterov8bit", "Adagrad8bit", "RMSprop8bit", "AdEMAMix8bit", "PagedAdEMAMix8bit",
    "LAMB", "LAMB8bit", "LARS", "LARS8bit",  # bitsandbytes' trust ratio is per tensor
})

# Why the others cannot run fused; an optimizer in neither table gets the generic reason.
_REASONS = {
    "adaptive": "it estimates one step size from the gradients of every parameter together",
    "schedule_free": "it advances per-group counters and weight sums once per step() call",
    "pytorch_optimizer": "pytorch-optimizer counts steps per parameter group, once per step() call",
}


def check(cfg, row) -> None:
    """Refuse --fused_backward_pass where it would change the training (before anything loads)."""
    if not getattr(cfg, "fused_backward_pass", False):
        return
    if row.name not in FUSABLE:
        kind = ("adaptive" if row.adaptive else "schedule_free" if row.schedule_free
                else "pytorch_optimizer" if row.path.startswith("pytorch_optimizer:") else None)
        reason = _REASONS.get(kind, "sdtune has not checked that it updates each parameter on its own")
        raise UserError(f"--fused_backward_pass with --optimizer_type {row.name}: {reason}; use AdamW, AdamW8bit, "
                        "Adafactor, Lion or SGD (see README), or drop --fused_backward_pass")
    if (cfg.gradient_accumulation_steps or 1) > 1:
        raise UserError("--fused_backward_pass with --gradient_accumulation_steps > 1: the optimizer steps inside "
                        "each backward pass, so gradients cannot add up over batches; raise --train_batch_size instead")
    if cfg.mixed_precision == "fp16":
        raise UserError("--fused_backward_pass with --mixed_precision fp16: the fp16 loss scaler must see every "
                        "gradient before any step (to skip steps that overflow); use --mixed_precision bf16")


def check_processes(num_processes: int) -> None:
    """Several processes average gradients after each one's own backward, too late for the hooks."""
    if num_processes > 1:
        raise UserError(f"--fused_backward_pass with {num_processes} processes: each process would step on its own "
                        "gradients before they are averaged; train in one process or drop --fused_backward_pass")


class FusedBackward:
    """The hooks of one run: every trainable parameter of `optimizer` is stepped from its own hook.

    `optimizer` may be accelerate's wrapper; the hooks step the optimizer inside it (the wrapper's own step
    only adds the fp16 scaler, which is refused here). Groups are looked up when a hook runs, because
    load_state_dict (--resume) replaces the optimizer's group dicts.
    """

    def __init__(self, optimizer, max_grad_norm: float = 0.0):
        self.optimizer = getattr(optimizer, "optimizer", optimizer)
        self.max_grad_norm = max_grad_norm or 0.0
        self.started = False
        self.handles = []
        held = 0  # bytes of gradients an ordinary step holds at once
        for index, group in enumerate(self.optimizer.param_groups):
            for param in group["params"]:
                if param.requires_grad:
                    self.handles.append(param.register_post_accumulate_grad_hook(self._hook(index)))
                    held += param.numel() * param.element_size()
        logger.info("fused backward pass: %d tensors step inside backward; their %.1f MB of gradients are never all "
                    "held", len(self.handles), held / 2**20)

    def _hook(self, index: int):
        def step_param(param: torch.Tensor) -> None:
            if self.max_grad_norm:
                torch.nn.utils.clip_grad_norm_([param], self.max_grad_norm)
            self.step_one(param, index)
            param.grad = None  # the point of the flag: this gradient is no longer held

        return step_param

    def step_one(self, param: torch.Tensor, index: int) -> None:
        """One optimizer step over `param` alone: the optimizer briefly sees one group holding one tensor,
        so it does O(1) work per hook instead of scanning every parameter.

        The run's first call steps over all groups instead (the other gradients are None then, so only
        `param` moves): bitsandbytes sets itself up on its first step, moving a resumed state to the GPU
        for every parameter it sees, and must see them all."""
        opt = self.optimizer
        if not self.started:
            self.started = True
            opt.step()
            return
        groups, group = opt.param_groups, opt.param_groups[index]
        params = group["params"]
        group["params"], opt.param_groups = [param], [group]
        try:
            opt.step()
        finally:
            group["params"], opt.param_groups = params, groups

    def remove(self) -> None:
        """Take the hooks off (tests build several runs over the same parameters)."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def install(cfg, optimizer) -> FusedBackward | None:
    """The hooks for --fused_backward_pass, or None when it is off."""
    if not getattr(cfg, "fused_backward_pass", False):
        return None
    return FusedBackward(optimizer, cfg.max_grad_norm)
