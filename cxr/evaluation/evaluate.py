"""Evaluate a saved checkpoint on one split of a data module; the one path behind cxr-train's test
report and cxr-eval, so both give the same numbers."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from cxr.data.datamodule import ChestXrayDataModule
from cxr.evaluation.report import write_report
from cxr.inference import Classifier


def predict_split(classifier: Classifier, datamodule: ChestXrayDataModule, split: str) -> np.ndarray:
    dataset = datamodule.dataset(split)
    loader = torch.utils.data.DataLoader(dataset, batch_size=datamodule.eval_batch_size, shuffle=False)
    return np.concatenate([classifier.probabilities(x).numpy() for x, _ in loader])


def evaluate(classifier: Classifier, datamodule: ChestXrayDataModule, split: str, out_dir: str | Path,
             title: str | None = None) -> dict:
    if list(datamodule.class_names) != classifier.class_names:
        raise ValueError(f"data classes {datamodule.class_names} differ from the checkpoint's {classifier.class_names}")
    if datamodule.preprocessing != classifier.preprocessing:
        raise ValueError("the data module's preprocessing differs from the checkpoint's; build it from the checkpoint")
    frame = datamodule.split_frame(split)
    start = time.perf_counter()
    probs = predict_split(classifier, datamodule, split)
    seconds = time.perf_counter() - start
    extra = {
        "split": split,
        "checkpoint": str(classifier.path),
        "checkpoint_sha256": classifier.sha256,
        "temperature": classifier.temperature,
        "holdout_sources": datamodule.holdout_sources,
        "images_per_second": len(frame) / seconds if seconds > 0 else None,
    }
    return write_report(out_dir, probs, frame, classifier.class_names, title or f"{split} split", extra)
