"""Per-epoch cosine learning-rate decay that also covers parameter groups added mid-training.

torch's LR schedulers remember one base rate per parameter group at construction, so the groups
that progressive unfreezing adds later would never decay. This callback records each group's base
rate when it first sees the group and sets lr = base * factor(epoch) at every epoch start.

With `added_group_warmup_epochs` a group added mid-training ramps up linearly, step by step, over its first
epochs: unfreezing a whole pretrained backbone at full rate, with fresh Adam moments, can throw the network off
its pretrained solution (validation AUROC dropping for epochs) before training settles.

With `cycle_epochs` the decay restarts every `cycle_epochs` epochs (warm restarts, SGDR): the end of each
cycle is a low-rate snapshot, and the snapshots of one run form an ensemble (callbacks=snapshots).
"""
from __future__ import annotations

import math

import lightning as L

BASE_LR_KEY = "base_lr"
ADDED_AT_STEP_KEY = "added_at_step"


def cosine_factor(epoch: int, total_epochs: int, warmup_epochs: int = 0, min_factor: float = 0.05) -> float:
    if epoch < warmup_epochs:
        return (epoch + 1) / (warmup_epochs + 1)
    span = max(1, total_epochs - warmup_epochs - 1)
    progress = min(1.0, (epoch - warmup_epochs) / span)
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def base_lr(group: dict) -> float:
    """The undecayed rate of a parameter group (its current rate if the decay has not seen it yet)."""
    return group.get(BASE_LR_KEY, group["lr"])


def decay_without_end(max_epochs: int | None, total_epochs: int | None, cycle_epochs: int | None) -> bool:
    """A trainer without an epoch limit (max_epochs=-1) leaves a decay that is not given its own length nothing to
    span: the rate would fall to its floor after the first epoch."""
    return max_epochs == -1 and not (total_epochs or cycle_epochs)


class EpochCosineDecay(L.Callback):
    def __init__(self, total_epochs: int | None = None, warmup_epochs: int = 0, min_factor: float = 0.05,
                 cycle_epochs: int | None = None, added_group_warmup_epochs: float = 0.0):
        if cycle_epochs is not None and cycle_epochs < 1:
            raise ValueError(f"cycle_epochs must be a positive number of epochs, got {cycle_epochs}")
        if not added_group_warmup_epochs >= 0:
            raise ValueError(f"added_group_warmup_epochs must be 0 or more, got {added_group_warmup_epochs}")
        self.total_epochs = total_epochs
        self.cycle_epochs = cycle_epochs
        self.warmup_epochs = warmup_epochs
        self.min_factor = min_factor
        self.added_group_warmup_epochs = added_group_warmup_epochs
        self.factor = 1.0  # this epoch's
        self.warmup_steps = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if decay_without_end(trainer.max_epochs, self.total_epochs, self.cycle_epochs):
            raise ValueError(f"max_epochs={trainer.max_epochs} sets no end to decay towards: give total_epochs")

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch, total = trainer.current_epoch, self.total_epochs or trainer.max_epochs
        if self.cycle_epochs:
            epoch, total = epoch % self.cycle_epochs, self.cycle_epochs
        self.factor = cosine_factor(epoch, total, self.warmup_epochs, self.min_factor)
        if self.added_group_warmup_epochs:
            steps_per_epoch = math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)
            self.warmup_steps = max(1, round(self.added_group_warmup_epochs * steps_per_epoch))
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                if BASE_LR_KEY not in group:
                    group[BASE_LR_KEY] = group["lr"]
                    if trainer.global_step > 0:
                        group[ADDED_AT_STEP_KEY] = trainer.global_step
        self.set_rates(trainer)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if self.warmup_steps:
            self.set_rates(trainer)

    def set_rates(self, trainer: L.Trainer) -> None:
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                ramp = 1.0
                if self.warmup_steps and ADDED_AT_STEP_KEY in group:
                    ramp = min(1.0, (trainer.global_step - group[ADDED_AT_STEP_KEY] + 1) / self.warmup_steps)
                group["lr"] = group[BASE_LR_KEY] * self.factor * ramp
