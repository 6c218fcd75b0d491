"""Confidence intervals for the headline metrics by a bootstrap over patients, not images: images of one
patient are not independent evidence. On the shared test split (506 images, 362 patients) a macro AUROC near
0.99 is known to about ±0.005-0.008 (weaker models: wider), so differences that small between recipes are
not findings.

Each resample is a multinomial count per patient, i.e. a weight per image, so every resample's metrics
come from a few array operations instead of one metric call per resample.

A bootstrap cannot see beyond its sample: when every image of a group is right (18 of 18 latent-TB films
found), every resample gives 100% and the percentile interval is 100–100%. Such a proportion gets the
Wilson score interval over the patients concerned instead (82–100%), listed under "wilson" so reports can
say so. Any other value that every resample gives alike (an AUROC of perfectly separated images; the recall
of a class whose images are all one patient's) gets no interval rather than a zero-width one.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.stats import binomtest

from cxr.evaluation.metrics import pneumonia_vs_normal_scores, weighted_auroc

CONFIDENCE = 0.95
RESAMPLES = 2000


def _weighted_mean(hit: np.ndarray, mask: np.ndarray, weights: np.ndarray) -> np.ndarray:
    total = weights @ mask
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, weights @ (hit & mask) / total, np.nan)


def _interval(samples: np.ndarray, confidence: float) -> list[float] | None:
    samples = samples[~np.isnan(samples)]
    if len(samples) == 0:
        return None
    tail = 100 * (1 - confidence) / 2
    return [float(np.percentile(samples, tail)), float(np.percentile(samples, 100 - tail))]


def _auroc_interval(samples: np.ndarray, confidence: float) -> list[float] | None:
    interval = _interval(samples, confidence)
    return None if interval is None or interval[0] == interval[1] else interval


def _proportion_interval(samples: np.ndarray, patients: int, confidence: float) -> tuple[list[float] | None, bool]:
    """The percentile interval, or Wilson's over `patients` where every resample gives 0 or 1, or none where every
    resample gives one other value (the images concerned are one patient's); and whether Wilson's."""
    interval = _interval(samples, confidence)
    if interval is None or interval[0] != interval[1]:
        return interval, False
    if interval[0] not in (0.0, 1.0):
        return None, False
    wilson = binomtest(round(interval[0] * patients), patients).proportion_ci(confidence, method="wilson")
    return [float(wilson.low), float(wilson.high)], True


def bootstrap_intervals(probs: np.ndarray, targets: np.ndarray, groups: Sequence[str], class_names: Sequence[str],
                        n_resamples: int = RESAMPLES, confidence: float = CONFIDENCE, seed: int = 0) -> dict | None:
    """Percentile intervals from resampling whole `groups` (patients) with replacement (Wilson's for a proportion
    of 0 or 1, named in "wilson" as "accuracy" or "recall.<class>"; none for another value every resample gives
    alike);
    None under 2 groups."""
    probs, targets = np.asarray(probs, dtype=np.float64), np.asarray(targets, dtype=int)
    class_names = list(class_names)
    _, row_group = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    n_groups = int(row_group.max()) + 1 if len(row_group) else 0
    if n_groups < 2:
        return None
    counts = np.random.default_rng(seed).multinomial(n_groups, np.full(n_groups, 1 / n_groups), size=n_resamples)
    weights = counts[:, row_group].astype(np.float64)  # (R, N): how often each image is drawn
    predicted = probs.argmax(axis=1)
    correct = predicted == targets
    auroc = {name: weighted_auroc(probs[:, c], targets == c, weights) for c, name in enumerate(class_names)}
    recall = {name: _weighted_mean(correct, targets == c, weights) for c, name in enumerate(class_names)}
    # The macro average of the classes the point estimate averages: a resample that lacks one of them is left
    # out (a 2-class mean is another statistic), and the count of resamples kept is reported.
    ranked = [c for c in range(len(class_names)) if 0 < (targets == c).sum() < len(targets)]
    macro = np.stack([auroc[class_names[c]] for c in ranked]).mean(axis=0) if ranked else np.full(n_resamples, np.nan)
    proportions = {"accuracy": _proportion_interval(_weighted_mean(correct, np.ones_like(correct), weights), n_groups,
                                                    confidence)}
    for c, name in enumerate(class_names):
        proportions[f"recall.{name}"] = _proportion_interval(recall[name], len(np.unique(row_group[targets == c])),
                                                             confidence)
    out = {"confidence": confidence, "resamples": n_resamples, "patients": n_groups,
           "method": "percentile bootstrap over patients",
           "wilson": [key for key, (_, wilson) in proportions.items() if wilson],
           "macro_auroc_resamples": int(np.isfinite(macro).sum()),
           "accuracy": proportions["accuracy"][0],
           "macro_auroc": _auroc_interval(macro, confidence),
           "pneumonia_vs_normal_auroc": None,
           "auroc": {name: _auroc_interval(v, confidence) for name, v in auroc.items()},
           "recall": {name: proportions[f"recall.{name}"][0] for name in class_names}}
    pvn = pneumonia_vs_normal_scores(probs, targets, class_names)
    if pvn is not None:
        keep, score, is_pneumonia = pvn
        out["pneumonia_vs_normal_auroc"] = _auroc_interval(weighted_auroc(score, is_pneumonia, weights[:, keep]), confidence)
    return out
