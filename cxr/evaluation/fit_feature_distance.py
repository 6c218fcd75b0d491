"""Fit a checkpoint's feature distance (cxr.models.feature_distance) and store it in the checkpoint.

Class means and covariance come from the training images without augmentation; the threshold is the
distance that `pass_rate` of a held-out labelled split (val) stays under, so by construction about
1 - pass_rate of images like the validation images are flagged, and a far larger share says that the images
differ from what the model was trained on.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from cxr.checkpoint import write_checkpoint_with_spec
from cxr.config import ConfigError
from cxr.data.datamodule import ChestXrayDataModule
from cxr.data.dataset import StandardizedImageDataset
from cxr.evaluation.evaluate import check_compatible
from cxr.inference import Classifier, load_classifier
from cxr.models.feature_distance import (SPEC_KEY, TENSORS_KEY, FeatureDistance, pooled_features_and_logits,
                                         supports_feature_distance)

log = logging.getLogger(__name__)
FEW_THRESHOLD_IMAGES = 100
METHOD = "Squared Mahalanobis distance of pooled features to the nearest training-class mean (Lee et al. 2018), " \
         "Ledoit-Wolf shared covariance"


def check_feature_distance_config(datamodule: ChestXrayDataModule, split: str, pass_rate: float,
                                  evaluated_split: str | None = None) -> None:
    """Before training: the threshold split must exist, be held out from training and not be `evaluated_split`
    (the split the run reports on, where the flagged share would be 1 - pass_rate by construction)."""
    if not 0 < pass_rate < 1:
        raise ConfigError(f"feature_distance.pass_rate must be between 0 and 1, got {pass_rate}")
    if split == "train" or split in datamodule.train_splits:
        raise ConfigError(f"feature_distance.split={split} is trained on: its distances are not those of new images; "
                          "choose a split the model does not train on, or feature_distance=null")
    if split == evaluated_split:
        raise ConfigError(f"feature_distance.split={split} is the split the run is tested on (data.split="
                          f"{evaluated_split}): its threshold would be set on the images it is measured on; fit it on "
                          "val and test on test (the defaults)")
    datamodule.split_frame(split)


@torch.inference_mode()
def pooled_features(classifier: Classifier, dataset: StandardizedImageDataset, batch_size: int) -> np.ndarray:
    """(N, D) pooled features of `dataset`, in order; checks that the pooled path gives the network's own logits."""
    net, out = classifier.net, []
    for i, (x, _) in enumerate(torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)):
        x = x.contiguous(memory_format=torch.channels_last)
        pooled, logits = pooled_features_and_logits(net, x)
        if i == 0 and not torch.allclose(logits, net(x), rtol=1e-4, atol=1e-4):
            raise ValueError(f"{type(net).__name__}'s classifier layer applied to its pooled features does not give "
                             "its logits: the feature distance cannot be fitted for this architecture")
        out.append(pooled.double().numpy())
    return np.concatenate(out)


def fit_feature_distance_checkpoint(ckpt_path: str | Path, datamodule: ChestXrayDataModule, split: str,
                                    pass_rate: float, out_path: str | Path) -> dict | None:
    """Fit on the training images, threshold on `split`, write the checkpoint to `out_path`; returns the record
    stored as spec["feature_distance"], or None for a network without pooled features (an ensemble)."""
    classifier = load_classifier(ckpt_path)
    if not supports_feature_distance(classifier.net):
        log.warning("%s has no single pooled feature vector (an ensemble?): no feature distance fitted, so nothing "
                    "will flag images unlike the training data", type(classifier.net).__name__)
        return None
    check_compatible(classifier, datamodule, split)
    train = datamodule.dataset("train")
    unaugmented = StandardizedImageDataset(train.images, train.targets.tolist(), train.preprocessing, None)
    try:
        fitted = FeatureDistance.fit(pooled_features(classifier, unaugmented, datamodule.eval_batch_size),
                                     train.targets.numpy())
    except ValueError as exc:  # the trained checkpoint stays usable: say why it has no distance, and go on
        log.warning("no feature distance fitted, so nothing will flag images unlike the training data: %s", exc)
        return None
    with torch.inference_mode():
        held_out = fitted(torch.from_numpy(pooled_features(classifier, datamodule.dataset(split),
                                                           datamodule.eval_batch_size))).numpy()
    threshold = float(np.quantile(held_out, pass_rate))
    if len(held_out) < FEW_THRESHOLD_IMAGES:
        log.warning("the feature-distance threshold rests on only %d %s images: the share it flags will be noisy",
                    len(held_out), split)
    record = {"method": METHOD, "threshold": threshold, "pass_rate": pass_rate, "split": split, "n": len(held_out),
              # Percentiles 0..100 of the held-out distances: reports draw new images against them.
              "split_percentiles": np.percentile(held_out, np.arange(101)).tolist(),
              "fit_images": len(unaugmented), "feature_dim": fitted.feature_dim,
              "sources": sorted(datamodule.split_frame(split)["source"].astype(str).unique().tolist())}
    write_checkpoint_with_spec(ckpt_path, out_path, entries={TENSORS_KEY: fitted.state()}, **{SPEC_KEY: record})
    log.info("feature distance fitted on %d training images; threshold %.1f passes %.0f%% of the %s split (n=%d) -> %s",
             len(unaugmented), threshold, 100 * pass_rate, split, len(held_out), out_path)
    return record
