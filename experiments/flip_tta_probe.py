"""Does left-right flip test-time augmentation help? Measured on saved checkpoints.

Every recipe here trains with horizontal flips, so averaging the predicted probabilities of an image
and its mirror image is the cheapest test-time augmentation there is (two forward passes). For each
checkpoint this prints macro AUROC and accuracy on the validation and test splits of
`../shared/data/cxr` for the image as it is, its mirror image, and the average of the two
(probabilities averaged, then the checkpoint's operating point applied, as for an ensemble).

    python experiments/flip_tta_probe.py CKPT [CKPT ...] > experiments/flip_tta_probe.md
"""
from __future__ import annotations

import argparse

import torch

from cxr.evaluation.evaluate import predict_logits
from cxr.evaluation.metrics import compute_metrics
from cxr.inference import Classifier
from shared_data import checkpoint_on_shared_data  # experiments/shared_data.py


class Mirrored:
    """`classifier`'s logits for the left-right mirror image of each input."""

    def __init__(self, classifier: Classifier):
        self.classifier = classifier

    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        return self.classifier.logits(torch.flip(batch, dims=[3]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+")
    args = parser.parse_args()
    print("| checkpoint | split | as is: macro AUROC | mirrored | averaged | as is: accuracy | mirrored | averaged |")
    print("|---|---|---|---|---|---|---|---|")
    for path in args.checkpoints:
        classifier, datamodule = checkpoint_on_shared_data(path)
        for split in ("val", "test"):
            targets = datamodule.split_frame(split)["target"].to_numpy()
            plain = predict_logits(classifier, datamodule, split)
            mirrored = predict_logits(Mirrored(classifier), datamodule, split)
            averaged = torch.logsumexp(torch.stack([plain.log_softmax(1), mirrored.log_softmax(1)]), 0)
            scores = [compute_metrics(classifier.calibration.probabilities(logits).numpy(), targets, classifier.class_names)
                      for logits in (plain, mirrored, averaged)]
            print(f"| {path} | {split} | " + " | ".join(f"{s['macro_auroc']:.4f}" for s in scores) + " | "
                  + " | ".join(f"{100 * s['accuracy']:.1f}%" for s in scores) + " |", flush=True)


if __name__ == "__main__":
    main()
