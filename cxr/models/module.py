"""LightningModule: a timm backbone, dropout before the head, label smoothing, class weights, and
optionally mixup/cutmix of training batches, a pairwise AUROC surrogate added to the loss, or sharpness-aware
steps."""
from __future__ import annotations

from typing import Callable, Sequence

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics import CatMetric

from cxr.calibration import Calibration
from cxr.checkpoint import CHECKPOINT_KEY
from cxr.data.preprocess import Preprocessing
from cxr.evaluation.metrics import compute_metrics
from cxr.models.backbone import create_backbone, head_parameter_names
from cxr.models.losses import pairwise_auc_loss
from cxr.models.sharpness import ascended, batchnorm_statistics_kept, trained_parameters


class EvaluatedPredictions(torch.nn.Module):
    """A stage's probabilities and targets, gathered over its batches (and devices), scored at epoch end by
    the evaluation's own compute_metrics: validation, the Lightning test and cxr-eval share one definition
    of every number (torchmetrics' own macro AUROC would score a class absent from the split 0 and average
    it in)."""

    def __init__(self):
        super().__init__()
        # nan_strategy: CatMetric would drop NaN entries (and so misalign probabilities and targets).
        self.probs, self.targets = CatMetric(nan_strategy="disable"), CatMetric(nan_strategy="disable")

    def update(self, probs: torch.Tensor, targets: torch.Tensor) -> None:
        self.probs.update(probs.detach().double())
        self.targets.update(targets)

    def compute_and_reset(self, class_names: Sequence[str], prefix: str) -> dict[str, float]:
        # reshape: CatMetric gives a 0-d tensor back for a split of one image.
        probs = self.probs.compute().reshape(-1, len(class_names)).cpu().numpy()
        targets = self.targets.compute().reshape(-1).long().cpu().numpy()
        self.probs.reset()
        self.targets.reset()
        if not np.isfinite(probs).all():  # a diverged network: NaN stops early stopping's check_finite, with its reason
            return {f"{prefix}/acc": float("nan"), f"{prefix}/auroc_macro": float("nan")}
        metrics = compute_metrics(probs, targets, class_names)
        # Undefined values (a class absent from the split) are left out, except the score checkpoints watch.
        logged = {f"{prefix}/acc": float("nan") if metrics["accuracy"] is None else metrics["accuracy"],
                  f"{prefix}/auroc_macro": float("nan") if metrics["macro_auroc"] is None else metrics["macro_auroc"]}
        if metrics["pneumonia_vs_normal_auroc"] is not None:
            logged[f"{prefix}/auroc_pneumonia_vs_normal"] = metrics["pneumonia_vs_normal_auroc"]
        for name, stats in metrics["per_class"].items():
            logged.update({f"{prefix}/{stat}_{name}": stats[stat] for stat in ("auroc", "recall", "precision", "f1")
                           if stats[stat] is not None})
        return logged


class ChestXrayClassifier(L.LightningModule):
    def __init__(
        self,
        backbone: str,
        class_names: Sequence[str],
        preprocessing: Preprocessing | dict,
        pretrained: str = "none",
        dropout: float = 0.3,
        label_smoothing: float = 0.1,
        class_weights: Sequence[float] | None = None,
        optimizer: Callable | None = None,
        scheduler: Callable | None = None,
        backbone_lr_factor: float = 0.1,
        backbone_kwargs: dict | None = None,
        channels_last: bool = True,
        auc_loss_weight: float = 0.0,
        auc_margin: float = 1.0,
        mixup: Callable | None = None,
        sam_rho: float = 0.0,
    ):
        super().__init__()
        self.class_names = list(class_names)
        self.preprocessing = preprocessing if isinstance(preprocessing, Preprocessing) else Preprocessing.from_dict(preprocessing)
        self.backbone_name = backbone
        self.net = create_backbone(backbone, len(self.class_names), pretrained=pretrained, dropout=dropout,
                                   in_chans=self.preprocessing.in_chans, **(backbone_kwargs or {}))
        # channels_last convolutions run several times faster on CPU for EfficientNet-style nets.
        self.channels_last = channels_last
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.head_names = set(head_parameter_names(self.net))
        weights = None if class_weights is None else torch.as_tensor(list(class_weights), dtype=torch.float32)
        self.register_buffer("class_weights", weights, persistent=False)
        self.label_smoothing = label_smoothing
        if auc_loss_weight < 0:
            raise ValueError(f"auc_loss_weight must be >= 0, got {auc_loss_weight}")
        self.auc_loss_weight = auc_loss_weight
        self.auc_margin = auc_margin
        # timm's Mixup, given as a partial: it mixes images and builds the smoothed soft targets itself.
        self.mixup = None if mixup is None else mixup(num_classes=len(self.class_names), label_smoothing=label_smoothing)
        if self.mixup is not None and auc_loss_weight:
            raise ValueError("mixup and auc_loss_weight cannot be combined: the AUROC surrogate needs hard labels")
        if not isinstance(sam_rho, (int, float)) or isinstance(sam_rho, bool) or sam_rho < 0:
            raise ValueError(f"sam_rho={sam_rho!r}: give the radius of the sharpness-aware ascent, >= 0 (0: plain steps)")
        if sam_rho and self.mixup is not None:
            raise ValueError("sam_rho and mixup cannot be combined: the second pass of each step would mix the batch "
                             "differently from the first")
        self.sam_rho = float(sam_rho)
        self._ascent_pass = False  # True while a sharpness-aware step takes its second gradient
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.backbone_lr_factor = backbone_lr_factor
        self.calibration = Calibration()  # fitted after training, on the validation split
        self.data_summary: dict = {}
        # logger=False: the loggers get the whole composed config (cxr-train logs it), not these again at top level
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "mixup", "preprocessing", "class_weights"], logger=False)
        self.val_predictions, self.test_predictions = EvaluatedPredictions(), EvaluatedPredictions()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(logits, targets, weight=self.class_weights, label_smoothing=self.label_smoothing)
        if self.auc_loss_weight:
            loss = loss + self.auc_loss_weight * pairwise_auc_loss(logits, targets, self.auc_margin)
        return loss

    def mixed_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Cross-entropy on a mixed batch against timm's mixed, already smoothed soft targets. With class
        weights, each image's term is weighted by its soft target (no renormalisation by the weights)."""
        x, soft_targets = self.mixup(x, y)
        return F.cross_entropy(self(x), soft_targets, weight=self.class_weights)

    def training_step(self, batch, batch_idx):
        x, y = batch
        # timm mixes each image with the batch reversed, so an odd-sized last batch trains unmixed.
        loss = self.mixed_loss(x, y) if self.mixup is not None and len(y) % 2 == 0 else self.loss(self(x), y)
        if not self._ascent_pass:  # the training loss is the one at the weights being trained
            self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(y))
        return loss

    def _eval_step(self, batch, predictions: EvaluatedPredictions, stage: str):
        x, y = batch
        logits = self(x)
        self.log(f"{stage}/loss", self.loss(logits, y), on_epoch=True, batch_size=len(y))
        predictions.update(self.calibration.probabilities(logits), y)

    def _log_metrics(self, predictions: EvaluatedPredictions, stage: str) -> None:
        for name, value in predictions.compute_and_reset(self.class_names, stage).items():
            self.log(name, value, prog_bar=name.endswith(("auroc_macro", "acc")))

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, self.val_predictions, "val")

    def on_validation_epoch_end(self):
        self._log_metrics(self.val_predictions, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, self.test_predictions, "test")

    def on_test_epoch_end(self):
        self._log_metrics(self.test_predictions, "test")

    def predict_step(self, batch, batch_idx):
        return self.calibration.probabilities(self(batch[0]))

    # ---- optimisation -----------------------------------------------------------------------
    def parameter_groups(self, base_lr: float) -> list[dict]:
        """Trainable head parameters at `base_lr`, trainable backbone parameters at a lower rate."""
        head, body = [], []
        for name, p in self.net.named_parameters():
            if p.requires_grad:
                (head if name in self.head_names else body).append(p)
        groups = [{"params": head, "lr": base_lr, "name": "head"}]
        if body:
            groups.append({"params": body, "lr": base_lr * self.backbone_lr_factor, "name": "backbone"})
        return groups

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        if not self.sam_rho:
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)

        def sharpness_aware_closure():
            loss = optimizer_closure()  # gradient at w
            self._ascent_pass = True
            try:
                with ascended(trained_parameters(optimizer.param_groups), self.sam_rho), batchnorm_statistics_kept(self):
                    optimizer_closure()  # gradient at w + e, which the optimizer applies at w
            finally:
                self._ascent_pass = False
            return loss

        return optimizer.step(closure=sharpness_aware_closure)

    def configure_optimizers(self):
        factory = self.optimizer_factory or torch.optim.AdamW
        base_lr = factory.keywords.get("lr", 1e-3) if hasattr(factory, "keywords") else 1e-3
        optimizer = factory(self.parameter_groups(base_lr))
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) and scheduler.mode != "max":
            raise ValueError("ReduceLROnPlateau watches val/auroc_macro, where higher is better: its default "
                             "mode 'min' would cut the learning rate while the model improves; set "
                             "model.scheduler.mode=max")
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": "val/auroc_macro"}}

    # ---- what inference needs, stored with the weights -----------------------------------------
    def inference_spec(self) -> dict:
        from cxr import __version__

        return {
            "class_names": self.class_names,
            "backbone": self.backbone_name,
            "backbone_kwargs": self.hparams.get("backbone_kwargs") or {},
            "preprocessing": self.preprocessing.to_dict(),
            **self.calibration.to_spec(self.class_names),
            "data_summary": self.data_summary,
            "cxr_version": __version__,
        }

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_KEY] = self.inference_spec()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        spec = checkpoint.get(CHECKPOINT_KEY, {})
        self.calibration = Calibration.from_spec(spec)
        self.data_summary = spec.get("data_summary", {})
