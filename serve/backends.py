"""Inference backends: the PyTorch checkpoint, or its ONNX export under ONNX Runtime (CPU).

Both take greyscale uint8 images, apply the checkpoint's own preprocessing, and return calibrated
probabilities (the checkpoint's Calibration) as an (N, C) array from one forward pass; `predict_scored` also
returns the (N,) feature distances of a checkpoint that has one fitted (else None).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from cxr.calibration import Calibration
from cxr.data.preprocess import Preprocessing

log = logging.getLogger("serve.backends")


class TorchBackend:
    name = "torch"

    def __init__(self, ckpt_path: str | Path, num_threads: int | None = None):
        import torch

        from cxr.inference import load_classifier

        if num_threads:
            torch.set_num_threads(int(num_threads))
        self.classifier = load_classifier(ckpt_path)
        self.spec = self.classifier.spec
        self.preprocessing = self.classifier.preprocessing

    def predict(self, images: Sequence[np.ndarray]) -> np.ndarray:
        return self.classifier.predict(images)

    def predict_scored(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        return self.classifier.predict_scored(images)


class OnnxBackend:
    name = "onnx"

    def __init__(self, onnx_path: str | Path, num_threads: int | None = None):
        import onnxruntime as ort

        from cxr.export import DISTANCE_NAME, INPUT_NAME, OUTPUT_NAME, read_onnx_spec
        from cxr.models.feature_distance import SPEC_KEY

        self.spec = read_onnx_spec(onnx_path)
        self.preprocessing = Preprocessing.from_dict(self.spec["preprocessing"])
        self.calibration = Calibration.from_spec(self.spec)
        options = ort.SessionOptions()
        if num_threads:
            options.intra_op_num_threads = int(num_threads)
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self._input = INPUT_NAME
        self._outputs = [OUTPUT_NAME, DISTANCE_NAME] if self.spec.get(SPEC_KEY) else [OUTPUT_NAME]

    def predict(self, images: Sequence[np.ndarray]) -> np.ndarray:
        return self.predict_scored(images)[0]

    def predict_scored(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        batch = np.stack([self.preprocessing(image).numpy() for image in images]).astype(np.float32)
        logits, *distance = self.session.run(self._outputs, {self._input: batch})
        return self.calibration.probabilities(torch.from_numpy(logits)).numpy(), distance[0] if distance else None


def onnx_cache_path(cache_dir: str | Path, sha256: str) -> Path:
    return Path(cache_dir) / "onnx" / f"{sha256[:16]}.onnx"


def ensure_onnx(ckpt_path: str | Path, onnx_path: str | Path | None, cache_dir: str | Path) -> Path:
    """The ONNX file to serve: the configured one, or an export of the checkpoint cached by its hash."""
    from cxr.export import export_onnx
    from cxr.checkpoint import file_sha256
    from cxr.inference import load_classifier

    if onnx_path:
        from cxr.config import ConfigError
        from cxr.export import read_onnx_spec

        path = Path(onnx_path)
        if not path.is_file():
            raise FileNotFoundError(f"server.onnx_path {path} does not exist")
        # /model/info, the audit log and /predict/explain describe ckpt_path: /predict must run that model too.
        exported_from, checkpoint = read_onnx_spec(path).get("checkpoint_sha256"), file_sha256(ckpt_path)
        if exported_from != checkpoint:
            raise ConfigError(f"server.onnx_path {path} was exported from checkpoint sha256 {exported_from}, not "
                              f"from server.ckpt_path {ckpt_path} (sha256 {checkpoint}); export this checkpoint with "
                              "cxr-export, or leave server.onnx_path unset to export it automatically")
        return path
    path = onnx_cache_path(cache_dir, file_sha256(ckpt_path))
    if not path.is_file():
        log.info("exporting %s to %s for the onnx backend", ckpt_path, path)
        export_onnx(load_classifier(ckpt_path), path)
    return path


def make_backend(kind: str, ckpt_path: str | Path, onnx_path: str | Path | None, num_threads: int | None):
    if kind == "torch":
        return TorchBackend(ckpt_path, num_threads)
    if kind == "onnx":
        return OnnxBackend(onnx_path, num_threads)
    raise ValueError(f"server.backend must be 'torch' or 'onnx', got {kind!r}")
