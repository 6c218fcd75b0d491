"""Classification metrics from predicted probabilities, overall and per source hospital."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torchmetrics.functional.classification import (binary_auroc, multiclass_accuracy, multiclass_confusion_matrix,
                                                    multiclass_f1_score, multiclass_precision, multiclass_recall)


def _auroc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """ROC AUC, or None when only one of the two classes is present (it is undefined then)."""
    if positive.all() or not positive.any():
        return None
    return float(binary_auroc(torch.as_tensor(scores, dtype=torch.float32), torch.as_tensor(positive, dtype=torch.long)))


def pneumonia_vs_normal_scores(probs: np.ndarray, targets: np.ndarray, class_names: Sequence[str]):
    """(rows that are normal or pneumonia, their p(pneumonia) / (p(pneumonia) + p(normal)), is pneumonia),
    or None when the classes lack either."""
    if "pneumonia" not in class_names or "normal" not in class_names:
        return None
    pn, no = list(class_names).index("pneumonia"), list(class_names).index("normal")
    keep = np.isin(targets, [pn, no])
    score = probs[keep, pn] / np.clip(probs[keep, pn] + probs[keep, no], 1e-12, None)
    return keep, score, targets[keep] == pn


def pneumonia_vs_normal_auroc(probs: np.ndarray, targets: np.ndarray, class_names: Sequence[str]) -> float | None:
    """AUROC of p(pneumonia) / (p(pneumonia) + p(normal)) among images that are normal or pneumonia."""
    scores = pneumonia_vs_normal_scores(probs, targets, class_names)
    return None if scores is None else _auroc(*scores[1:])


def compute_metrics(probs: np.ndarray, targets: np.ndarray, class_names: Sequence[str]) -> dict:
    probs = np.asarray(probs, dtype=np.float64)
    targets = np.asarray(targets, dtype=int)
    class_names = list(class_names)
    k = len(class_names)
    p, t = torch.as_tensor(probs, dtype=torch.float32), torch.as_tensor(targets)
    per_class_stats = {
        "precision": multiclass_precision(p, t, k, average=None),
        "recall": multiclass_recall(p, t, k, average=None),
        "f1": multiclass_f1_score(p, t, k, average=None),
    }
    support = np.bincount(targets, minlength=k)
    predicted = probs.argmax(axis=1)
    per_class = {}
    for c, name in enumerate(class_names):
        per_class[name] = {stat: float(values[c]) for stat, values in per_class_stats.items()}
        per_class[name]["auroc"] = _auroc(probs[:, c], targets == c)
        per_class[name]["support"] = int(support[c])
        per_class[name]["called"] = float((predicted == c).mean()) if len(targets) else 0.0
    present = [name for name in class_names if per_class[name]["support"] > 0]
    aurocs = [per_class[name]["auroc"] for name in present if per_class[name]["auroc"] is not None]
    return {
        "classes": class_names,
        "n": int(len(targets)),
        "accuracy": float(multiclass_accuracy(p, t, k, average="micro")) if len(targets) else 0.0,
        "macro_auroc": float(np.mean(aurocs)) if aurocs else None,
        "pneumonia_vs_normal_auroc": pneumonia_vs_normal_auroc(probs, targets, class_names),
        "macro_avg": {stat: float(np.mean([per_class[n][stat] for n in present])) for stat in ("precision", "recall", "f1")},
        "per_class": per_class,
        "confusion_matrix": multiclass_confusion_matrix(p, t, k).tolist(),
    }


def metrics_by_group(probs: np.ndarray, targets: np.ndarray, groups: Sequence[str], class_names: Sequence[str]) -> dict:
    """compute_metrics for each group (e.g. source hospital), keyed by group name."""
    groups = np.asarray(groups)
    return {str(g): compute_metrics(probs[groups == g], np.asarray(targets)[groups == g], class_names)
            for g in sorted(set(groups.tolist()))}
