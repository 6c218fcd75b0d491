"""Can a model trained without a hospital adapt to it from unlabeled images alone? AdaBN, measured.

AdaBN (Li et al., 2016) re-estimates every BatchNorm layer's running mean and variance on images of
the new hospital, with no labels, and leaves the learned weights alone. For each checkpoint trained
with `data.holdout_sources=[SOURCE]`, this script evaluates it on all of SOURCE's images before and
after that re-estimation (on the same unlabeled images, as a site would on its own archive) and
prints pneumonia-vs-normal AUROC and the share of images called each class.

    python experiments/batchnorm_adaptation.py RUN_DIR:SOURCE [RUN_DIR:SOURCE ...]
    e.g. logs/exp/lite0_finetune-no-nih:nih-cxr8 logs/exp/lite0_finetune-no-kermany:kermany
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
from torch.optim.swa_utils import update_bn

from cxr.evaluation.evaluate import predict_logits
from cxr.evaluation.metrics import pneumonia_vs_normal_auroc
from shared_data import checkpoint_on_shared_data  # experiments/shared_data.py


def row(run: str, source: str, classifier, logits: torch.Tensor, targets: np.ndarray) -> str:
    probs = classifier.calibration.probabilities(logits).numpy()
    called = np.bincount(probs.argmax(axis=1), minlength=len(classifier.class_names)) / len(probs)
    shares = " | ".join(f"{share:.1%}" for share in called)
    return f"| {run} | {source} | {pneumonia_vs_normal_auroc(probs, targets, classifier.class_names):.3f} | {shares} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="RUN_DIR:SOURCE, a run trained without SOURCE")
    args = parser.parse_args()
    torch.manual_seed(0)
    print("| run | held-out source | pneumonia-vs-normal AUROC | called normal | called pneumonia | called TB |")
    print("|---|---|---|---|---|---|")
    for spec in args.runs:
        run, source = spec.rsplit(":", 1)
        classifier, datamodule = checkpoint_on_shared_data(f"{run}/checkpoints/best.ckpt",
                                                           f"data.holdout_sources=[{source}]")
        targets = datamodule.split_frame("test")["target"].to_numpy()
        before = predict_logits(classifier, datamodule, "test")
        loader = torch.utils.data.DataLoader(datamodule.dataset("test"), batch_size=64, shuffle=True)
        update_bn(loader, classifier.net)  # every BatchNorm's running statistics: the average over these images
        after = predict_logits(classifier, datamodule, "test")
        print(row(run, source, classifier, before, targets))
        print(row(f"{run} + AdaBN", source, classifier, after, targets), flush=True)


if __name__ == "__main__":
    main()
