"""Shared fixtures: a tiny synthetic data set and a tiny checkpoint, both built at test time."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cxr.calibration import Calibration
from cxr.checkpoint import CHECKPOINT_KEY
from cxr.data.preprocess import Preprocessing
from cxr.data.synthetic import generate
from cxr.models.module import ChestXrayClassifier

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data" / "cxr"
CLASS_NAMES = ["normal", "pneumonia", "tuberculosis"]
TINY_PREPROCESSING = Preprocessing(image_size=64, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


@pytest.fixture(scope="session")
def synthetic_manifest(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("synthetic"), n_per_class=12, size=96, seed=0)


def make_tiny_checkpoint(path: Path, preprocessing: Preprocessing = TINY_PREPROCESSING, seed: int = 0,
                         calibration: Calibration = Calibration()) -> Path:
    """A random-init `test_efficientnet` checkpoint in the same format cxr-train writes."""
    torch.manual_seed(seed)
    module = ChestXrayClassifier("test_efficientnet", CLASS_NAMES, preprocessing, pretrained="none", dropout=0.0)
    module.calibration = calibration
    module.data_summary = {"counts": {"train": {"synthetic": {"normal": 1}}}}
    torch.save({"state_dict": module.state_dict(), CHECKPOINT_KEY: module.inference_spec()}, path)
    return path


def add_feature_distance(path: Path, fit_images: list, threshold: float | None = None) -> Path:
    """Fit `path`'s feature distance on `fit_images` (greyscale uint8, classes taken in turn) and store it in place,
    as cxr-train does, with `threshold` (default: the largest distance among the fit images, so they all pass)."""
    from cxr.checkpoint import write_checkpoint_with_spec
    from cxr.inference import load_classifier
    from cxr.models.feature_distance import SPEC_KEY, TENSORS_KEY, FeatureDistance, pooled_features_and_logits

    classifier = load_classifier(path)
    with torch.no_grad():
        pooled, _ = pooled_features_and_logits(classifier.net, torch.stack([classifier.preprocess(i) for i in fit_images]))
    fitted = FeatureDistance.fit(pooled.double().numpy(), [i % len(CLASS_NAMES) for i in range(len(fit_images))])
    if threshold is None:
        threshold = float(fitted(pooled).max())
    record = {"threshold": threshold, "pass_rate": 0.95, "split": "val", "n": len(fit_images)}
    return write_checkpoint_with_spec(path, path, entries={TENSORS_KEY: fitted.state()}, **{SPEC_KEY: record})


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.ckpt")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "manifest.csv").is_file():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA
