"""Figures for the evaluation report: row-normalised confusion matrix, one-vs-rest ROC curves and the feature
distances per source against the unlike-the-training-data threshold."""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from cxr.evaluation.formatting import number  # noqa: E402


def set_title(ax, title: str) -> None:
    """Wrapped, so a long run name never runs off the figure."""
    ax.set_title(textwrap.fill(title, width=44), fontsize=10)


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], class_names: Sequence[str], path: Path, title: str = "") -> None:
    counts = np.asarray(matrix, dtype=float)
    rows = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(class_names)):
        for j in range(len(class_names)):
            # A class without images here (an external hold-out without TB) has no row to normalise.
            text = f"{normalised[i, j]:.2f}\n({int(counts[i, j])})" if rows[i, 0] else "no images"
            ax.text(j, i, text, ha="center", va="center", color="white" if normalised[i, j] > 0.5 else "black",
                    fontsize=9)
    ax.set_xticks(range(len(class_names)), class_names, rotation=20)
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true (rows sum to 1)")
    set_title(ax, title or "Confusion matrix (row-normalised)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_roc_curves(probs: np.ndarray, targets: np.ndarray, class_names: Sequence[str], aurocs: dict, path: Path,
                    title: str = "") -> None:
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    for c, name in enumerate(class_names):
        positive = np.asarray(targets) == c
        if aurocs.get(name) is None:
            continue
        # In float64, as the AUROC in the legend: torchmetrics' curve rounds scores to float32, which ties
        # confident images and draws a smaller area than the legend gives.
        fpr, tpr, _ = roc_curve(positive, np.asarray(probs[:, c], dtype=np.float64))
        ax.plot(fpr, tpr, label=f"{name} (AUC {number(aurocs[name])})")
    ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    set_title(ax, title or "One-vs-rest ROC")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def legend_label(text: str) -> str:
    """A data name as a literal legend entry: matplotlib hides a label that starts with "_" and reads "$...$" as
    mathematics (an unbalanced "$" raises)."""
    text = text.replace("$", r"\$")
    return " " + text if text.startswith("_") else text


def plot_feature_distances(distances: np.ndarray, sources: np.ndarray, threshold: float, path: Path,
                           title: str = "", reference: tuple[str, Sequence[float]] | None = None) -> None:
    """One histogram per source, each scaled to its own image count, so a small source's shift stays visible; on
    a log axis, since a new hospital's distances run to tens of times the threshold. `reference`: (label,
    percentiles 0..100) of the images the threshold was set on, drawn shaded behind them."""
    fig, ax = plt.subplots(figsize=(8.0, 3.8))
    span = np.concatenate([distances, [threshold], [] if reference is None else reference[1]])
    low = max(span[span > 0].min(initial=threshold), threshold * 1e-3)
    bins = np.geomspace(low, max(span.max(), low * 1.01), 41)
    if reference is not None:  # each bin's share, read off the percentiles' cumulative distribution
        shares = np.diff(np.interp(bins, reference[1], np.linspace(0, 1, len(reference[1]))))
        ax.stairs(shares, bins, fill=True, color="0.85", label=legend_label(reference[0]))
    for source in np.unique(sources):
        values = distances[sources == source]
        ax.hist(np.clip(values, bins[0], bins[-1]), bins=bins, weights=np.full(len(values), 1 / len(values)),
                histtype="step", linewidth=1.4,
                label=legend_label(f"{source} (n = {len(values)}, {np.mean(values > threshold):.0%} beyond)"))
    ax.axvline(threshold, color="k", linestyle="--", linewidth=1, label=f"threshold {threshold:.1f}")
    ax.set_xscale("log")
    # Labels at 1, 2, 5 x 10^k (1 x 10^k over a wide range) in plain numbers: the default labels every minor tick
    # in 10^k notation when the data span under a decade, and they run into each other.
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0) if bins[-1] / bins[0] < 100 else (1.0,)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("feature distance to the nearest training class (squared Mahalanobis)")
    ax.set_ylabel("share of the source's images")
    set_title(ax, title or "Feature distance per source")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the plot: the curves fill it
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
