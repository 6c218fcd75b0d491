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


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.ckpt")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "manifest.csv").is_file():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA
