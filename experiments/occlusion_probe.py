"""Where does a trained model look for each class? Predictions with the lung fields, or everything but
them, replaced by flat grey.

If a network calls a film tuberculosis from the disease, hiding the lungs should take that call away;
if it still calls tuberculosis from the strip of image around them (collimation, markers, the
shoulders, the acquisition's noise and contrast), it has learnt the source hospital. For a checkpoint,
this scores the test split of `../shared/data/cxr` three ways: the image as it is; the central box
(rows 10-90%, columns 12-88% of the model's input, where the lungs lie on a chest film) set to the
normalised value 0 (mid grey for mean = std = 0.5); and everything outside that box set to it. It prints
the pneumonia-vs-normal AUROC of each source, and per source and true class the share called each class.

    python experiments/occlusion_probe.py CKPT > experiments/occlusion_probe.md
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from cxr.evaluation.evaluate import predict_logits
from cxr.evaluation.metrics import pneumonia_vs_normal_auroc
from cxr.inference import Classifier
from shared_data import checkpoint_on_shared_data  # experiments/shared_data.py

ROWS, COLUMNS = (0.10, 0.90), (0.12, 0.88)


def lung_box(batch: torch.Tensor) -> torch.Tensor:
    """A boolean (H, W) mask of the central box of `batch`'s images."""
    height, width = batch.shape[-2:]
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[int(ROWS[0] * height):int(ROWS[1] * height), int(COLUMNS[0] * width):int(COLUMNS[1] * width)] = True
    return mask


class Occluded:
    """`classifier`'s logits with the central box (`hide="lungs"`) or the rest (`hide="surround"`) set to 0."""

    def __init__(self, classifier: Classifier, hide: str):
        self.classifier, self.hide = classifier, hide

    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        mask = lung_box(batch)
        hidden = mask if self.hide == "lungs" else ~mask
        return self.classifier.logits(batch.masked_fill(hidden, 0.0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    args = parser.parse_args()
    classifier, datamodule = checkpoint_on_shared_data(args.checkpoint)
    frame = datamodule.split_frame("test")
    names = classifier.class_names
    called, probabilities = {}, {}
    for view, scorer in (("as it is", classifier), ("lungs hidden", Occluded(classifier, "lungs")),
                         ("only the lungs", Occluded(classifier, "surround"))):
        probs = classifier.calibration.probabilities(predict_logits(scorer, datamodule, "test")).numpy()
        called[view], probabilities[view] = probs.argmax(axis=1), probs
    targets, sources = frame["target"].to_numpy(), frame["source"].to_numpy()
    print("| source | " + " | ".join(f"pneumonia-vs-normal AUROC, {view}" for view in called) + " |")
    print("|---|" + "---|" * len(called))
    for source in sorted(set(sources)):
        rows = sources == source
        scores = [pneumonia_vs_normal_auroc(probs[rows], targets[rows], names) for probs in probabilities.values()]
        if scores[0] is not None:
            print(f"| {source} | " + " | ".join(f"{score:.3f}" for score in scores) + " |")
    print()
    print("| source | true class | n | image | " + " | ".join(f"called {name}" for name in names) + " |")
    print("|---|---|---|---|" + "---|" * len(names))
    for (source, label), rows in frame.reset_index(drop=True).groupby(["source", "label"]).groups.items():
        for view, predicted in called.items():
            shares = np.bincount(predicted[rows], minlength=len(names)) / len(rows)
            print(f"| {source} | {label} | {len(rows)} | {view} | " + " | ".join(f"{s:.0%}" for s in shares) + " |")


if __name__ == "__main__":
    main()
