"""Evaluate a saved checkpoint on one split of a data module; the one path behind cxr-train's test
report and cxr-eval, so both give the same numbers."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from cxr.calibration import Calibration
from cxr.checkpoint import FIT_FINGERPRINTS, CheckpointError, public_calibration_fit
from cxr.config import ConfigError
from cxr.data.datamodule import ChestXrayDataModule
from cxr.evaluation.metrics import compute_metrics
from cxr.evaluation.report import write_report
from cxr.inference import Classifier
from cxr.models.feature_distance import SPEC_KEY


def check_compatible(classifier: Classifier, datamodule: ChestXrayDataModule, split: str) -> None:
    """`classifier` may be measured on `datamodule`'s `split`: same classes and pixels, images it did not train on."""
    if list(datamodule.class_names) != classifier.class_names:
        raise ConfigError(f"data classes {datamodule.class_names} differ from the checkpoint's "
                          f"{classifier.class_names}")
    if datamodule.preprocessing != classifier.preprocessing:
        raise ConfigError("the data module's preprocessing differs from the checkpoint's; build it from the checkpoint")
    datamodule.check_unseen(split, classifier.spec.get("data_summary", {}))


def predict_logits_and_distances(classifier: Classifier, datamodule: ChestXrayDataModule,
                                 split: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N, C) logits in the order of `datamodule.split_frame(split)`, and the (N,) feature distances (None when
    the checkpoint has no feature distance fitted), in one pass over the split."""
    loader = torch.utils.data.DataLoader(datamodule.dataset(split), batch_size=datamodule.eval_batch_size, shuffle=False)
    logits, distances = zip(*(classifier.logits_and_distance(x) for x, _ in loader))
    logits = torch.cat(logits)
    if not (finite := torch.isfinite(logits).all(dim=1)).all():
        paths = datamodule.split_frame(split)["path"].to_numpy()[~finite.numpy()]
        raise CheckpointError(f"{classifier.path or 'the model'} gives non-finite logits (NaN or infinity) for "
                              f"{len(paths)} of {len(logits)} images of the {split} split (e.g. {paths[0]}): its "
                              "weights diverged; use a checkpoint from before")
    return logits, None if classifier.scored is None else torch.cat(distances)


def predict_logits(classifier: Classifier, datamodule: ChestXrayDataModule, split: str) -> torch.Tensor:
    return predict_logits_and_distances(classifier, datamodule, split)[0]


def calibration_fit_seen_from(spec: dict, datamodule: ChestXrayDataModule, split: str) -> dict | None:
    """The checkpoint's calibration_fit, with how many of `split`'s images it was fitted on (when it recorded its
    images: checkpoints calibrated before it did are judged by split name in the report)."""
    fit = public_calibration_fit(spec)
    fitted_on = (spec.get("calibration_fit") or {}).get(FIT_FINGERPRINTS)
    if fit is None or fitted_on is None:
        return fit
    fitted_on = set(fitted_on)
    return {**fit, "evaluated_images_in_fit": sum(f in fitted_on for f in datamodule.fingerprints(split))}


def evaluate(classifier: Classifier, datamodule: ChestXrayDataModule, split: str, out_dir: str | Path,
             title: str | None = None) -> dict:
    check_compatible(classifier, datamodule, split)
    frame = datamodule.split_frame(split)
    start = time.perf_counter()
    logits, distances = predict_logits_and_distances(classifier, datamodule, split)
    seconds = time.perf_counter() - start
    probs = classifier.calibration.probabilities(logits).numpy()
    extra = {
        "split": split,
        "checkpoint": str(classifier.path),
        "checkpoint_sha256": classifier.sha256,
        **classifier.calibration.to_spec(classifier.class_names),
        "calibration_fit": calibration_fit_seen_from(classifier.spec, datamodule, split),
        "holdout_sources": datamodule.holdout_sources,
        "images_per_second": len(frame) / seconds if seconds > 0 else None,
    }
    if classifier.calibration.logit_bias is not None or classifier.calibration.temperature != 1.0:
        # A bias moves decisions, and a temperature alone still moves one-vs-rest AUROC: report the network's own.
        raw = compute_metrics(Calibration().probabilities(logits).numpy(), frame["target"].to_numpy(),
                              classifier.class_names)
        extra["uncalibrated"] = {"accuracy": raw["accuracy"], "macro_auroc": raw["macro_auroc"],
                                 "recall": {name: raw["per_class"][name]["recall"] for name in classifier.class_names},
                                 "calibration": raw["calibration"]}
    unlike = None if distances is None else (distances.numpy(), classifier.spec[SPEC_KEY])
    return write_report(out_dir, probs, frame, classifier.class_names, title or f"{split} split", extra,
                        subgroups=datamodule.subgroups, feature_distances=unlike)
