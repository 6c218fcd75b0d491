"""Can a model tell, without labels, that a new hospital's images are unlike its training data?

Every recipe here fails on a held-out hospital (NIH adults called tuberculosis, Kermany's children ranked
at chance), and confidently: its own probabilities give no warning. This probe asks whether the features
do. For a checkpoint trained with `data.holdout_sources=[SOURCE]` it fits the Mahalanobis detector of Lee
et al. (2018) on the training images' pooled features (one mean per class, one shared covariance, Ledoit-Wolf
shrinkage), scores the validation split, the kept sources' test images and every image of SOURCE, and
prints, for that score and for the softmax baseline (1 - max probability):
- AUROC of telling SOURCE's images from the kept sources' test images;
- the share of each flagged at a threshold that passes 95% of the validation split (chosen on validation only).

    python experiments/ood_probe.py RUN_DIR:SOURCE [RUN_DIR:SOURCE ...]
    e.g. logs/exp/lite0_long_s42-no-nih-cxr8:nih-cxr8 logs/exp/lite0_long_s42-no-kermany:kermany
"""
from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
import torch
from sklearn.covariance import LedoitWolf
from sklearn.metrics import roc_auc_score

from cxr.data.dataset import StandardizedImageDataset, load_standardized
from shared_data import checkpoint_on_shared_data  # experiments/shared_data.py

VAL_PASSED = 0.95


@torch.no_grad()
def features_and_probabilities(classifier, datamodule, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Pooled features (before the classifier) and calibrated probabilities, without augmentation."""
    images = load_standardized(frame["path"].tolist(), datamodule.preprocessing, datamodule.cache_dir)
    dataset = StandardizedImageDataset(images, frame["target"].tolist(), datamodule.preprocessing, None)
    net, feats, probs = classifier.net, [], []
    for x, _ in torch.utils.data.DataLoader(dataset, batch_size=64):
        pooled = net.forward_head(net.forward_features(x.contiguous(memory_format=torch.channels_last)),
                                  pre_logits=True)
        feats.append(pooled.double().numpy())
        probs.append(classifier.calibration.probabilities(net.get_classifier()(pooled)).numpy())
    return np.concatenate(feats), np.concatenate(probs)


def mahalanobis_score(train: np.ndarray, targets: np.ndarray):
    """Distance to the nearest class mean under the shared, shrunk covariance of the training features."""
    classes = np.unique(targets)
    means = np.stack([train[targets == c].mean(axis=0) for c in classes])
    precision = LedoitWolf().fit(train - means[np.searchsorted(classes, targets)]).precision_

    def score(x: np.ndarray) -> np.ndarray:
        return np.min([np.einsum("ij,jk,ik->i", x - m, precision, x - m) for m in means], axis=0)
    return score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="RUN_DIR:SOURCE, a run trained without SOURCE")
    args = parser.parse_args()
    print("| run | score | AUROC: held-out vs kept test | flagged: val | flagged: kept test | flagged: held-out | "
          "flagged: held-out called TB |")
    print("|---|---|---|---|---|---|---|")
    for spec in args.runs:
        run, source = spec.rsplit(":", 1)
        classifier, datamodule = checkpoint_on_shared_data(f"{run}/checkpoints/best.ckpt")
        frame = datamodule.build_index()
        kept = frame["source"] != source
        parts = {"train": frame[kept & frame["split"].isin(datamodule.train_splits)],
                 "val": frame[kept & (frame["split"] == "val")],
                 "kept test": frame[kept & (frame["split"] == "test")],
                 "held-out": frame[~kept]}
        out = {name: features_and_probabilities(classifier, datamodule, part) for name, part in parts.items()}
        fitted = mahalanobis_score(out["train"][0], parts["train"]["target"].to_numpy())
        scores = {"Mahalanobis": {name: fitted(f) for name, (f, _) in out.items()},
                  "1 - max probability": {name: 1 - p.max(axis=1) for name, (_, p) in out.items()}}
        tb = classifier.class_names.index("tuberculosis")
        called_tb = out["held-out"][1].argmax(axis=1) == tb
        for name, by_part in scores.items():
            threshold = np.quantile(by_part["val"], VAL_PASSED)
            flagged = {part: by_part[part] > threshold for part in by_part}
            auroc = roc_auc_score(np.r_[np.zeros(len(by_part["kept test"])), np.ones(len(by_part["held-out"]))],
                                  np.r_[by_part["kept test"], by_part["held-out"]])
            tb_share = f"{flagged['held-out'][called_tb].mean():.1%} of {called_tb.sum()}" if called_tb.any() else "–"
            print(f"| {run} ({source} held out) | {name} | {auroc:.3f} | {flagged['val'].mean():.1%} | "
                  f"{flagged['kept test'].mean():.1%} | {flagged['held-out'].mean():.1%} | {tb_share} |", flush=True)


if __name__ == "__main__":
    main()
