"""Load a trained checkpoint for inference: weights, classes, preprocessing and calibration together."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import timm
import torch
from torch import nn

from cxr.calibration import Calibration
from cxr.checkpoint import file_sha256, read_checkpoint
from cxr.data.preprocess import Preprocessing
from cxr.models.ensemble import PredictionEnsemble
from cxr.models.feature_distance import TENSORS_KEY, FeatureDistance, ScoredNetwork


@dataclass
class Classifier:
    """A checkpoint ready for inference. `spec` is the checkpoint's inference record; `feature_distance`, when the
    checkpoint has one fitted, scores how unlike the training images an image is (spec["feature_distance"] has
    its threshold)."""

    net: nn.Module
    spec: dict
    sha256: str | None = None  # None for weights not (yet) saved to a file
    path: Path | None = None
    feature_distance: FeatureDistance | None = None
    preprocessing: Preprocessing = field(init=False)
    calibration: Calibration = field(init=False)
    scored: ScoredNetwork | None = field(init=False)  # the network with the distance as its second output

    def __post_init__(self) -> None:
        self.net = self.net.eval().to(memory_format=torch.channels_last)
        self.preprocessing = Preprocessing.from_dict(self.spec["preprocessing"])
        self.calibration = Calibration.from_spec(self.spec)
        self.scored = None if self.feature_distance is None else ScoredNetwork(self.net, self.feature_distance).eval()

    @property
    def class_names(self) -> list[str]:
        return list(self.spec["class_names"])

    def preprocess(self, gray: np.ndarray) -> torch.Tensor:
        return self.preprocessing(gray)

    @torch.inference_mode()
    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        return self.net(batch.contiguous(memory_format=torch.channels_last))

    @torch.inference_mode()
    def logits_and_distance(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(N, C) logits and (N,) feature distances (None without a fitted feature distance), one forward pass."""
        if self.scored is None:
            return self.logits(batch), None
        return self.scored(batch.contiguous(memory_format=torch.channels_last))

    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        return self.calibration.probabilities(self.logits(batch))

    def predict(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Greyscale uint8 images -> (N, C) calibrated probabilities, in one forward pass."""
        return self.predict_scored(images)[0]

    def predict_scored(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        """Greyscale uint8 images -> ((N, C) calibrated probabilities, (N,) feature distances or None)."""
        logits, distance = self.logits_and_distance(torch.stack([self.preprocess(image) for image in images]))
        return self.calibration.probabilities(logits).numpy(), None if distance is None else distance.numpy()


NET_PREFIX = "net."  # ChestXrayClassifier keeps the timm model as `net`


def build_net(spec: dict) -> nn.Module:
    """The checkpoint's architecture with untrained weights (one network, or `ensemble_size` of them)."""
    def network() -> nn.Module:
        return timm.create_model(spec["backbone"], pretrained=False, num_classes=len(spec["class_names"]),
                                 in_chans=spec["preprocessing"]["in_chans"], **spec.get("backbone_kwargs", {}))

    size = spec.get("ensemble_size")
    return PredictionEnsemble([network() for _ in range(size)]) if size else network()


def load_classifier(ckpt_path: str | Path) -> Classifier:
    path = Path(ckpt_path).expanduser()
    checkpoint, spec = read_checkpoint(path)
    net = build_net(spec)
    net.load_state_dict({k.removeprefix(NET_PREFIX): v for k, v in checkpoint["state_dict"].items()
                         if k.startswith(NET_PREFIX)})
    fitted = checkpoint.get(TENSORS_KEY)  # read_checkpoint refuses it without its record, and the reverse
    return Classifier(net=net, spec=spec, sha256=file_sha256(path), path=path,
                      feature_distance=None if fitted is None else FeatureDistance.from_state(fitted))
