"""Progressive unfreezing: train the head first, then open the backbone stage by stage, top down.

Frozen BatchNorm layers stay in eval mode (their ImageNet running statistics are used and kept),
rather than Lightning's default of normalising frozen layers with batch statistics. When a stage is
unfrozen, its BatchNorm weights train (`train_bn`) and, unless `freeze_bn_stats`, its layers switch to
batch statistics and update their running statistics; with `freeze_bn_stats` they stay in eval mode
on ImageNet's statistics (Keras' advice for fine-tuning small data sets).
"""
from __future__ import annotations

import itertools
import logging
from typing import Sequence

import lightning as L
from lightning.pytorch.callbacks import BaseFinetuning
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim import lr_scheduler

from cxr.config import ConfigError
from cxr.models.schedule import base_lr

log = logging.getLogger(__name__)


# Schedulers whose step scales every parameter group's current learning rate by one factor: a group added by
# unfreezing then follows the schedule from its own rate. The others keep per-group state from construction
# (LambdaLR, OneCycleLR, CyclicLR, warm restarts fail at the next step; CosineAnnealingLR fails once past T_max;
# LinearLR and ConstantLR move the new group wrongly). callbacks.lr_decay, which reaches every group, is the way
# to schedule an unfreezing run.
SCHEDULERS_FOLLOWING_ADDED_GROUPS = (lr_scheduler.StepLR, lr_scheduler.MultiStepLR, lr_scheduler.ExponentialLR,
                                     lr_scheduler.PolynomialLR, lr_scheduler.ReduceLROnPlateau)


def backbone_stages(net: nn.Module) -> list[nn.Module]:
    """The backbone's stages, deepest (closest to the head) first.

    EfficientNet-style timm models: [conv_head + bn2, blocks[-1], ..., blocks[0], conv_stem + bn1].
    Other models: their top-level children except the one holding the classifier (ConvNeXt's `head`,
    whose norm then trains from the start with it), in reverse order.
    """
    head = net.default_cfg.get("classifier", "classifier") if hasattr(net, "default_cfg") else "classifier"
    # A distilled model (DeiT) names two heads.
    head_children = {name.split(".")[0] for name in ((head,) if isinstance(head, str) else head)}
    if hasattr(net, "blocks") and hasattr(net, "conv_stem"):
        top = [m for name in ("conv_head", "bn2") if isinstance(m := getattr(net, name, None), nn.Module)]
        stem = [m for name in ("conv_stem", "bn1") if isinstance(m := getattr(net, name, None), nn.Module)]
        stages = ([nn.ModuleList(top)] if top else []) + list(reversed(list(net.blocks))) + [nn.ModuleList(stem)]
        return stages
    stages = [m for name, m in reversed(list(net.named_children()))
              if name not in head_children and any(True for _ in m.parameters())]
    own = list(net.parameters(recurse=False))  # a ViT's cls_token and pos_embed: with the lowest stage
    return stages[:-1] + [OwnParameters(stages[-1], own)] if stages and own else stages


class OwnParameters(nn.Module):
    """A stage together with parameters its model holds directly rather than in a child module."""

    def __init__(self, stage: nn.Module, parameters: list[nn.Parameter]):
        super().__init__()
        self.stage = stage
        self.own = nn.ParameterList(parameters)


class ProgressiveUnfreezing(BaseFinetuning):
    """At epoch `unfreeze_at[i]`, unfreeze the next `stages_per_step[i]` stages (or all that remain, if -1)."""

    def __init__(self, unfreeze_at: Sequence[int] = (1, 3, 5), stages_per_step: Sequence[int] = (2, 3, -1),
                 backbone_lr_factor: float | None = None, train_bn: bool = True, freeze_bn_stats: bool = False):
        super().__init__()
        if len(unfreeze_at) != len(stages_per_step):
            raise ValueError("unfreeze_at and stages_per_step need the same length")
        if list(unfreeze_at) != sorted(unfreeze_at):
            raise ValueError(f"unfreeze_at must be increasing, got {list(unfreeze_at)}")
        self.unfreeze_at = list(unfreeze_at)
        self.stages_per_step = list(stages_per_step)
        self.backbone_lr_factor = backbone_lr_factor
        self.train_bn = train_bn
        self.freeze_bn_stats = freeze_bn_stats
        self.n_unfrozen = 0

    def state_dict(self) -> dict:
        return {**super().state_dict(), "n_unfrozen": self.n_unfrozen}

    def load_state_dict(self, state_dict: dict) -> None:
        self.n_unfrozen = state_dict.pop("n_unfrozen", 0)
        super().load_state_dict(state_dict)

    def freeze_before_training(self, pl_module: L.LightningModule) -> None:
        self.freeze(backbone_stages(pl_module.net), train_bn=False)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for config in trainer.lr_scheduler_configs:
            if not isinstance(config.scheduler, SCHEDULERS_FOLLOWING_ADDED_GROUPS):
                raise ConfigError(
                    f"model.scheduler {type(config.scheduler).__name__} cannot schedule the parameter groups that "
                    "progressive unfreezing adds; decay the learning rate with callbacks=cosine (callbacks.lr_decay) "
                    f"or use one of {[s.__name__ for s in SCHEDULERS_FOLLOWING_ADDED_GROUPS]}")
        if self._restarting and self.n_unfrozen:
            # Resuming: freeze_before_training froze every stage again; the optimizer's groups for the stages
            # opened before the interruption come back below, their parameters must train again too.
            opened = backbone_stages(pl_module.net)[:self.n_unfrozen]
            self.make_trainable(opened)
            self._keep_batchnorm_frozen_unless_trained(opened)
        super().on_fit_start(trainer, pl_module)
        never = [at for at in self.unfreeze_at if trainer.max_epochs is not None and 0 <= trainer.max_epochs <= at]
        if never and self.n_unfrozen < len(backbone_stages(pl_module.net)):
            log.warning("callbacks.unfreeze opens backbone stages at epoch(s) %s, but trainer.max_epochs=%d ends the "
                        "run before: those stages will not train (shift callbacks.unfreeze.unfreeze_at earlier)",
                        never, trainer.max_epochs)

    def finetune_function(self, pl_module: L.LightningModule, epoch: int, optimizer) -> None:
        stages = backbone_stages(pl_module.net)
        for at, count in zip(self.unfreeze_at, self.stages_per_step):
            if epoch != at:
                continue
            end = len(stages) if count < 0 else min(len(stages), self.n_unfrozen + count)
            opening = stages[self.n_unfrozen:end]
            if not opening:
                continue
            factor = self.backbone_lr_factor if self.backbone_lr_factor is not None else pl_module.backbone_lr_factor
            head_lr = base_lr(optimizer.param_groups[0])  # undecayed: a schedule then decays the new group too
            self.unfreeze_and_add_param_group(opening, optimizer, lr=head_lr * factor, initial_denom_lr=1.0,
                                              train_bn=self.train_bn)
            self._keep_batchnorm_frozen_unless_trained(opening)
            taken = {group.get("name") for group in optimizer.param_groups[:-1]}
            # named as without unfreezing ("backbone"), so curves of runs with and without it line up
            optimizer.param_groups[-1]["name"] = next(name for k in itertools.count(1)
                                                      if (name := "backbone" if k == 1 else f"backbone_{k}") not in taken)
            log.info("epoch %d: unfroze backbone stages %d..%d of %d (lr %.2e)", epoch, self.n_unfrozen, end - 1,
                     len(stages), head_lr * factor)
            self.n_unfrozen = end

    def _keep_batchnorm_frozen_unless_trained(self, stages: list[nn.Module]) -> None:
        """Lightning makes a stage's BatchNorm weights require gradients even when train_bn=False leaves them out
        of the optimizer: they would be computed and never applied, and their layers would switch to batch
        statistics (see on_train_epoch_start)."""
        if not self.train_bn:
            for module in (m for stage in stages for m in stage.modules() if isinstance(m, _BatchNorm)):
                module.requires_grad_(False)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        # Lightning restores each module's own mode after validation, so set every BatchNorm's mode here:
        # an unfrozen layer would otherwise stay in the eval mode it was frozen in.
        for module in pl_module.net.modules():
            if isinstance(module, _BatchNorm):
                trainable = any(p.requires_grad for p in module.parameters())
                module.train(trainable and not self.freeze_bn_stats)
