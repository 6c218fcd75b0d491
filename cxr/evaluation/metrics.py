"""Classification metrics from predicted probabilities, overall and per source hospital."""
from __future__ import annotations

import itertools
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


def _misranked_pairs(positive_scores: np.ndarray, negative_scores: np.ndarray) -> float:
    """Number of (positive, negative) pairs with the negative scored higher, ties counting half."""
    ordered = np.sort(negative_scores)
    above = len(ordered) - np.searchsorted(ordered, positive_scores, side="right")
    tied = np.searchsorted(ordered, positive_scores, side="right") - np.searchsorted(ordered, positive_scores, side="left")
    return float(above.sum() + 0.5 * tied.sum())


def auroc_shortfall_by_source(probs: np.ndarray, targets: np.ndarray, sources: Sequence[str],
                              class_names: Sequence[str]) -> dict | None:
    """Where each class's one-vs-rest AUROC is lost when several sources share a test set.

    1 − AUROC is the share of (positive, negative) pairs ranked the wrong way (ties half). Split by the
    two images' sources, it says whether the errors lie within a hospital (the model confuses the
    classes there) or across hospitals (each hospital is ranked well, but their scores are not on one
    scale). Per class: `shortfall` (= 1 − AUROC), `within_source`, `across_sources` (they sum to it) and
    `pairs`, one record per (positive source, negative source) with a non-zero share, largest first.
    None when the images come from one source.
    """
    probs, targets, sources = np.asarray(probs, dtype=np.float64), np.asarray(targets), np.asarray(sources, dtype=str)
    names = sorted(set(sources.tolist()))
    if len(names) < 2:
        return None
    out = {}
    for c, class_name in enumerate(class_names):
        positive = targets == c
        total_pairs = int(positive.sum()) * int((~positive).sum())
        if total_pairs == 0:
            continue
        pairs = []
        for pos_source, neg_source in itertools.product(names, names):
            share = _misranked_pairs(probs[positive & (sources == pos_source), c],
                                     probs[~positive & (sources == neg_source), c]) / total_pairs
            if share > 0:
                pairs.append({"positive_source": pos_source, "negative_source": neg_source, "share": share})
        pairs.sort(key=lambda record: -record["share"])
        within = sum(r["share"] for r in pairs if r["positive_source"] == r["negative_source"])
        across = sum(r["share"] for r in pairs if r["positive_source"] != r["negative_source"])
        out[class_name] = {"shortfall": within + across, "within_source": within, "across_sources": across, "pairs": pairs}
    return out
