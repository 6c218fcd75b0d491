"""Classification metrics from predicted probabilities, overall and per source hospital."""
from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np
import torch
from torchmetrics.functional.classification import multiclass_calibration_error, multiclass_confusion_matrix


def _auroc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """ROC AUC, or None when only one of the two classes is present (it is undefined then). Counted pair by pair
    (weighted_auroc, the bootstrap's own): torchmetrics' binary_auroc builds its curve in float32 whatever the input,
    and gave 0.99999994 for a ranking without one error, which a report prints as 99.99999%."""
    if positive.all() or not positive.any():
        return None
    return float(weighted_auroc(scores, positive, np.ones((1, len(scores))))[0])


def pneumonia_vs_normal_scores(probs: np.ndarray, targets: np.ndarray, class_names: Sequence[str]):
    """(rows that are normal or pneumonia, their p(pneumonia) / (p(pneumonia) + p(normal)), is pneumonia),
    or None when the classes lack either."""
    if "pneumonia" not in class_names or "normal" not in class_names:
        return None
    pn, no = list(class_names).index("pneumonia"), list(class_names).index("normal")
    keep = np.isin(targets, [pn, no])
    # The exact ratio however small both are (an image called tuberculosis with near-certainty still ranks
    # pneumonia against normal); no information (both 0) is a tie.
    total = probs[keep, pn] + probs[keep, no]
    score = np.divide(probs[keep, pn], total, out=np.full(total.shape, 0.5), where=total > 0)
    return keep, score, targets[keep] == pn


def pneumonia_vs_normal_auroc(probs: np.ndarray, targets: np.ndarray, class_names: Sequence[str]) -> float | None:
    """AUROC of p(pneumonia) / (p(pneumonia) + p(normal)) among images that are normal or pneumonia."""
    scores = pneumonia_vs_normal_scores(probs, targets, class_names)
    return None if scores is None else _auroc(*scores[1:])


def _ratio(numerator: float, denominator: float) -> float | None:
    return float(numerator / denominator) if denominator else None


def calibration_scores(probs: np.ndarray, targets: np.ndarray) -> dict:
    """How far the probabilities are from the frequencies they claim: expected calibration error (top-label
    confidence, 15 equal-width bins: torchmetrics'), Brier score (squared distance to the one-hot label, summed over
    classes) and negative log-likelihood, each a mean over images; lower is better."""
    k = probs.shape[1]
    ece = multiclass_calibration_error(torch.as_tensor(probs), torch.as_tensor(targets), k, n_bins=15)
    truth = probs[np.arange(len(targets)), targets]
    return {"ece": float(ece), "brier": float(((probs - np.eye(k)[targets]) ** 2).sum(axis=1).mean()),
            "nll": float(-np.log(np.maximum(truth, np.finfo(np.float64).tiny)).mean())}


def compute_metrics(probs: np.ndarray, targets: np.ndarray, class_names: Sequence[str]) -> dict:
    """Accuracy, macro and per-class AUROC, per-class precision/recall/F1, confusion matrix (rows = true).

    Undefined values are None, never a number: a class's recall and AUROC when it does not occur (an external
    hold-out without tuberculosis), its precision and F1 when it neither occurs nor is called. A class that
    occurs but is never called has precision 0 (scikit-learn's convention), so a model that never calls a
    class cannot gain from it."""
    probs = np.asarray(probs, dtype=np.float64)
    if not np.isfinite(probs).all():
        raise ValueError(f"{int((~np.isfinite(probs)).any(axis=1).sum())} of {len(probs)} images have non-finite "
                         "probabilities: no metric can rank them")
    targets = np.array(targets, dtype=int)  # a copy: torch warns about read-only arrays (pandas' to_numpy)
    class_names = list(class_names)
    k = len(class_names)
    p, t = torch.as_tensor(probs, dtype=torch.float64), torch.as_tensor(targets)  # float32 would tie near-equal scores
    confusion = multiclass_confusion_matrix(p, t, k).numpy() if len(targets) else np.zeros((k, k), dtype=int)
    per_class = {}
    for c, name in enumerate(class_names):
        tp, support, called = int(confusion[c, c]), int(confusion[c].sum()), int(confusion[:, c].sum())
        per_class[name] = {
            "precision": _ratio(tp, called) if called else (0.0 if support else None),
            "recall": _ratio(tp, support),
            "f1": _ratio(2 * tp, support + called),
            "auroc": _auroc(probs[:, c], targets == c),
            "support": support,
            "called": _ratio(called, len(targets)) or 0.0,
        }
    # As scikit-learn: a class enters the macro averages if it occurs or is called, so a wrongly called absent
    # class (precision 0, F1 0) is not averaged out; each average skips the values that are undefined.
    present = [name for c, name in enumerate(class_names) if confusion[c].sum() or confusion[:, c].sum()]

    def macro(stat: str) -> float | None:
        values = [per_class[name][stat] for name in present if per_class[name][stat] is not None]
        return float(np.mean(values)) if values else None

    return {
        "classes": class_names,
        "n": int(len(targets)),
        "accuracy": float(np.trace(confusion) / len(targets)) if len(targets) else None,
        "macro_auroc": macro("auroc"),
        "pneumonia_vs_normal_auroc": pneumonia_vs_normal_auroc(probs, targets, class_names),
        "macro_avg": {stat: macro(stat) for stat in ("precision", "recall", "f1")},
        "per_class": per_class,
        "confusion_matrix": confusion.tolist(),
        "calibration": calibration_scores(probs, targets) if len(targets) else None,
    }


def metrics_by_group(probs: np.ndarray, targets: np.ndarray, groups: Sequence[str], class_names: Sequence[str]) -> dict:
    """compute_metrics for each group (e.g. source hospital), keyed by group name."""
    groups = np.asarray(groups)
    return {str(g): compute_metrics(probs[groups == g], np.asarray(targets)[groups == g], class_names)
            for g in sorted(set(groups.tolist()))}


def weighted_auroc(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray,
                   rows_at_a_time: int = 64) -> np.ndarray:
    """ROC AUC of `scores` for each row of `weights` (R, N): the weighted share of (positive, negative)
    pairs ranked the right way round, ties counted half. NaN where a row weighs no positive or no negative.
    Memory grows with R x N, not N x N: a bootstrap over a whole external set of 100k images must fit."""
    values, inverse = np.unique(scores, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    first_of_value = np.searchsorted(inverse[order], np.arange(len(values)))  # every distinct score occurs
    positive = np.asarray(positive, dtype=bool)[order]
    out = np.empty(len(weights))
    for start in range(0, len(weights), rows_at_a_time):
        rows = np.asarray(weights[start:start + rows_at_a_time], dtype=np.float64)[:, order]
        pos = np.add.reduceat(rows * positive, first_of_value, axis=1)  # (rows, distinct scores), ascending
        neg = np.add.reduceat(rows * ~positive, first_of_value, axis=1)
        below = np.cumsum(neg, axis=1) - neg
        pairs = pos.sum(axis=1) * neg.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[start:start + len(rows)] = np.where(pairs > 0, (pos * (below + 0.5 * neg)).sum(axis=1) / pairs,
                                                    np.nan)
    return out


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
    source_pairs = list(itertools.product(names, names))
    out = {}
    for c, class_name in enumerate(class_names):
        positive = targets == c
        total_pairs = int(positive.sum()) * int((~positive).sum())
        if total_pairs == 0:
            continue
        # One weight row per (positive source, negative source): its AUROC counts only those pairs.
        weights = np.stack([(positive & (sources == pos)) | (~positive & (sources == neg)) for pos, neg in source_pairs])
        aurocs = weighted_auroc(probs[:, c], positive, weights.astype(np.float64))
        pairs = []
        for (pos_source, neg_source), row, auroc in zip(source_pairs, weights, aurocs):
            share = (1 - auroc) * int((row & positive).sum()) * int((row & ~positive).sum()) / total_pairs
            if share > 0:  # NaN (no pair of these two sources) is not > 0
                pairs.append({"positive_source": pos_source, "negative_source": neg_source, "share": float(share)})
        pairs.sort(key=lambda record: -record["share"])
        within = sum(r["share"] for r in pairs if r["positive_source"] == r["negative_source"])
        across = sum(r["share"] for r in pairs if r["positive_source"] != r["negative_source"])
        out[class_name] = {"shortfall": within + across, "within_source": within, "across_sources": across, "pairs": pairs}
    return out


def costliest_images(probs: np.ndarray, targets: np.ndarray, paths: Sequence[str], sources: Sequence[str],
                     class_names: Sequence[str], k: int = 5) -> dict:
    """The images that take part in most of each class's misranked (positive, negative) pairs.

    A positive's `share` is the share of all pairs in which a negative outscores it (ties half); a
    negative's, the share in which it outscores a positive. Positives' shares sum to 1 − AUROC, and so do
    negatives'. A few images often carry much of the shortfall: those are the ones to review (label
    noise, an unusual acquisition) before reading a small AUROC difference between two models.
    Per class: `shortfall` (1 − AUROC) and `images`, the `k` largest shares of either role, largest first.
    """
    probs, targets = np.asarray(probs, dtype=np.float64), np.asarray(targets)
    out = {}
    for c, class_name in enumerate(class_names):
        scores, positive = probs[:, c], targets == c
        pos_scores, neg_scores = np.sort(scores[positive]), np.sort(scores[~positive])
        total_pairs = len(pos_scores) * len(neg_scores)
        if total_pairs == 0:
            continue

        def outranked(values: np.ndarray, others: np.ndarray, above: bool) -> np.ndarray:
            below = np.searchsorted(others, values, side="left")
            ties = np.searchsorted(others, values, side="right") - below
            return (len(others) - below - ties if above else below) + 0.5 * ties

        misranked = np.where(positive, outranked(scores, neg_scores, above=True),
                             outranked(scores, pos_scores, above=False)) / total_pairs
        shortfall = float(misranked[positive].sum())
        order = [i for i in np.argsort(-misranked, kind="stable")[:k] if misranked[i] > 0]
        out[class_name] = {"shortfall": shortfall, "images": [
            {"path": str(paths[i]), "source": str(sources[i]), "label": class_names[targets[i]],
             "role": "positive" if positive[i] else "negative", "score": float(scores[i]), "share": float(misranked[i])}
            for i in order]}
    return out
