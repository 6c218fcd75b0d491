"""A pairwise surrogate of one-vs-rest AUROC, added to the cross-entropy when `model.auc_loss_weight` > 0.

Cross-entropy scores each image alone; macro AUROC ranks every positive of a class above every negative,
across hospitals too (an NIH normal against a Kermany pneumonia). The squared hinge on the difference of
softmax scores, averaged over the pairs of a batch, is LibAUC's `PairwiseAUCLoss(surr_loss="squared_hinge")`
(Yuan et al.); that package is not a dependency because it pulls in transformers and torch_geometric.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def pairwise_auc_loss(logits: torch.Tensor, targets: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """Mean over classes of mean over (positive, negative) pairs in the batch of
    max(0, margin - (p_pos - p_neg))^2 on softmax scores; classes with no pair in the batch are skipped."""
    scores = torch.softmax(logits, dim=1)
    per_class = []
    for c in range(scores.shape[1]):
        is_positive = targets == c
        positive, negative = scores[is_positive, c], scores[~is_positive, c]
        if len(positive) and len(negative):
            per_class.append(F.relu(margin - (positive[:, None] - negative[None, :])).square().mean())
    if not per_class:
        return logits.sum() * 0.0  # a batch of one class has no pair to rank
    return torch.stack(per_class).mean()
