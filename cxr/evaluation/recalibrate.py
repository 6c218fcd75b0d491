"""Fit a checkpoint's operating point on a labelled split and store it in the checkpoint."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from cxr.calibration import (TEMPERATURE_ONLY, Calibration, check_calibration_targets, fit_calibration,
                             negative_log_likelihood)
from cxr.checkpoint import FIT_FINGERPRINTS, write_checkpoint_with_spec
from cxr.config import ConfigError
from cxr.data.datamodule import ChestXrayDataModule
from cxr.evaluation.evaluate import check_compatible, predict_logits
from cxr.inference import load_classifier

log = logging.getLogger(__name__)


def check_calibration_plan(calibration, datamodule: ChestXrayDataModule, evaluated_split: str | None,
                           evaluated: str) -> None:
    """Before any model is made: refuse an operating point fitted on `evaluated_split` (where `evaluated`, the run
    or the soup, is measured), and refuse (or warn about) a calibration split that lacks classes."""
    if calibration["method"] == "none":
        return
    if calibration["split"] == evaluated_split:
        raise ConfigError(f"calibration.split={calibration['split']} is the split the {evaluated} is evaluated on "
                          f"(data.split={evaluated_split}): the operating point would be tuned on the images it is "
                          "measured on; fit it on val and evaluate on test (the defaults)")
    check_calibration_targets(datamodule.split_frame(calibration["split"])["target"].tolist(),
                              datamodule.class_names, calibration["method"])


def recalibrate_checkpoint(ckpt_path: str | Path, datamodule: ChestXrayDataModule, split: str, method: str,
                           out_path: str | Path, warn_few: bool = True) -> dict:
    """Fit `method` on the raw logits of `split` (any earlier calibration is replaced) and write the
    checkpoint with it to `out_path`. Returns the fit record that is also stored as `calibration_fit`.
    `warn_few=False` when the caller already warned about this split's class counts."""
    classifier = load_classifier(ckpt_path)
    check_compatible(classifier, datamodule, split)
    logits = predict_logits(classifier, datamodule, split)
    frame = datamodule.split_frame(split)
    targets = torch.tensor(frame["target"].to_numpy(), dtype=torch.long)  # a copy: pandas may give a read-only array
    calibration = fit_calibration(logits, targets, classifier.class_names, method, warn_few)
    record = {"method": method, "split": split, "n": len(targets),
              "sources": sorted(frame["source"].astype(str).unique().tolist())}
    for name, candidate in (("uncalibrated", Calibration()), ("calibrated", calibration)):
        probs = candidate.probabilities(logits)
        record[f"nll_{name}"] = negative_log_likelihood(probs, targets)
        record[f"accuracy_{name}"] = float((probs.argmax(dim=1) == targets).float().mean())
    # So that an evaluation can tell whether it scores images the operating point was tuned on (a site's data
    # split two ways, or data.split=all) rather than trust split names.
    fingerprints = sorted(datamodule.fingerprints(split))
    write_checkpoint_with_spec(ckpt_path, out_path, **calibration.to_spec(classifier.class_names),
                               calibration_fit={**record, FIT_FINGERPRINTS: fingerprints})
    log.info("calibration on %s (n=%d): %s; NLL %.4f -> %.4f, accuracy %.4f -> %.4f -> %s", split, len(targets),
             calibration.to_spec(classifier.class_names), record["nll_uncalibrated"], record["nll_calibrated"],
             record["accuracy_uncalibrated"], record["accuracy_calibrated"], out_path)
    if problem := accuracy_loss(record):
        log.warning(problem)
    return {**calibration.to_spec(classifier.class_names), **record}


def accuracy_loss(record: dict) -> str | None:
    """A warning when the fitted operating point makes more errors than the network's own argmax on the very
    images it was fitted on: it minimises the negative log-likelihood, not errors, and on few or unusual images
    the two part ways."""
    before, after = record["accuracy_uncalibrated"], record["accuracy_calibrated"]
    if after >= before:
        return None
    return (f"the operating point fitted on the {record['split']} split (n = {record['n']}) lowers its accuracy from "
            f"{before:.1%} to {after:.1%} (it minimises NLL, not errors): with few or unrepresentative images prefer "
            f"{TEMPERATURE_ONLY} (confidence only) or none; report.md gives the network's own numbers too")
