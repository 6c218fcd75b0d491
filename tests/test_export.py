"""ONNX export and the ONNX Runtime backend: metadata, CLI, and parity with PyTorch on real X-rays."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CLASS_NAMES, add_feature_distance, make_tiny_checkpoint
from cxr.calibration import Calibration
from cxr.checkpoint import CHECKPOINT_KEY
from cxr.data.preprocess import Preprocessing
from cxr.models.module import ChestXrayClassifier
from cxr.data.decode import decode_image
from cxr.export import export_onnx, max_probability_difference, read_onnx_spec
from cxr.inference import file_sha256, load_classifier
from serve.backends import OnnxBackend, TorchBackend, ensure_onnx, onnx_cache_path


@pytest.fixture(scope="module")
def sharp_checkpoint(tmp_path_factory):
    # Temperature 0.05 turns the random net's small logit gaps into confident probabilities, so a
    # numerical mismatch between runtimes shows up in the probabilities the parity test compares;
    # the logit bias must reach the ONNX runtime's probabilities too.
    return make_tiny_checkpoint(tmp_path_factory.mktemp("export") / "sharp.ckpt",
                                calibration=Calibration(0.05, (0.0, 0.7, -0.4)), seed=3)


@pytest.fixture(scope="module")
def exported(sharp_checkpoint, tmp_path_factory):
    return export_onnx(load_classifier(sharp_checkpoint), tmp_path_factory.mktemp("onnx") / "model.onnx")


def real_images(shared_data: Path, n: int = 12) -> list[np.ndarray]:
    with open(shared_data / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    picked, seen = [], {}
    for row in rows:  # a few per label and source, read in place
        key = (row["label"], row["source"])
        if seen.get(key, 0) < 2:
            seen[key] = seen.get(key, 0) + 1
            picked.append(decode_image(shared_data / row["path"]))
        if len(picked) >= n:
            break
    return picked


def test_metadata_embedded_and_sidecar(sharp_checkpoint, exported):
    classifier = load_classifier(sharp_checkpoint)
    spec = read_onnx_spec(exported)
    sidecar = json.loads(exported.with_name(exported.name + ".json").read_text())
    assert spec == sidecar
    assert spec["class_names"] == classifier.class_names
    assert spec["preprocessing"] == classifier.spec["preprocessing"]
    assert spec["temperature"] == pytest.approx(0.05)
    assert spec["logit_bias"] == pytest.approx(dict(zip(CLASS_NAMES, (0.0, 0.7, -0.4))))
    assert spec["checkpoint_sha256"] == file_sha256(sharp_checkpoint)


def test_dynamic_batch(exported, sharp_checkpoint):
    backend = OnnxBackend(exported)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (80, 70), dtype=np.uint8) for _ in range(5)]
    assert backend.predict(images[:1]).shape == (1, 3)
    assert backend.predict(images).shape == (5, 3)
    np.testing.assert_allclose(backend.predict(images).sum(axis=1), 1.0, atol=1e-5)


def production_like_checkpoint(path: Path) -> Path:
    """The production architecture (tf_efficientnet_lite0, 224 px), random init, sharp temperature."""
    torch.manual_seed(0)
    module = ChestXrayClassifier("tf_efficientnet_lite0", CLASS_NAMES, Preprocessing(image_size=224),
                                 pretrained="none", dropout=0.0)
    module.calibration = Calibration(temperature=0.01)
    torch.save({"state_dict": module.state_dict(), CHECKPOINT_KEY: module.inference_spec()}, path)
    return path


@pytest.mark.real_data
@pytest.mark.slow
def test_onnx_parity_on_real_images(shared_data, tmp_path):
    images = real_images(shared_data)
    assert len(images) >= 6
    # With a feature distance (1280 features): float32 in both runtimes must agree on real X-rays too.
    ckpt = add_feature_distance(production_like_checkpoint(tmp_path / "lite0.ckpt"), images[: len(images) // 2])
    onnx_path = export_onnx(load_classifier(ckpt), tmp_path / "lite0.onnx")
    torch_probs, torch_distances = TorchBackend(ckpt).predict_scored(images)
    onnx_probs, onnx_distances = OnnxBackend(onnx_path).predict_scored(images)
    assert torch_probs.max() > 0.6  # the comparison is not between near-uniform vectors
    assert np.abs(torch_probs - onnx_probs).max() <= 1e-4
    assert max_probability_difference(load_classifier(ckpt), onnx_path, images) <= 1e-4
    assert torch_distances.max() > 100 * torch_distances.min()  # images like the fit's and unlike it
    np.testing.assert_allclose(onnx_distances, torch_distances, rtol=1e-4, atol=1e-5 * torch_distances.max())


def test_ensure_onnx_caches_by_checkpoint_hash(sharp_checkpoint, tmp_path):
    path = ensure_onnx(sharp_checkpoint, None, tmp_path)
    assert path == onnx_cache_path(tmp_path, file_sha256(sharp_checkpoint)) and path.is_file()
    mtime = path.stat().st_mtime_ns
    assert ensure_onnx(sharp_checkpoint, None, tmp_path).stat().st_mtime_ns == mtime
    with pytest.raises(FileNotFoundError):
        ensure_onnx(sharp_checkpoint, tmp_path / "missing.onnx", tmp_path)
    assert ensure_onnx(sharp_checkpoint, path, tmp_path / "elsewhere") == path


def test_an_onnx_file_of_another_checkpoint_is_refused(sharp_checkpoint, tmp_path):
    """/model/info and /predict/explain describe ckpt_path: /predict may not silently run another model."""
    from cxr.config import ConfigError

    other = export_onnx(load_classifier(make_tiny_checkpoint(tmp_path / "other.ckpt", seed=5)), tmp_path / "other.onnx")
    with pytest.raises(ConfigError, match="was exported from checkpoint sha256"):
        ensure_onnx(sharp_checkpoint, other, tmp_path)


def test_cli(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "cli.ckpt")
    output = tmp_path / "out" / "model.onnx"
    exe = Path(sys.executable).with_name("cxr-export")
    result = subprocess.run([str(exe), f"ckpt_path={ckpt}", f"output={output}", f"hydra.run.dir={tmp_path}/run"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == str(output)
    assert output.is_file() and output.with_name("model.onnx.json").is_file()
    assert read_onnx_spec(output)["checkpoint_sha256"] == file_sha256(ckpt)


def test_cli_never_overwrites_and_a_failed_export_leaves_nothing(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "cli.ckpt")
    exe = Path(sys.executable).with_name("cxr-export")

    def export(output, *extra):
        return subprocess.run([str(exe), f"ckpt_path={ckpt}", f"output={output}", *extra,
                               f"hydra.run.dir={tmp_path}/run-{uuid.uuid4().hex}"], capture_output=True, text=True,
                              timeout=120)

    checkpoint_bytes = ckpt.read_bytes()
    refused = export(ckpt)
    assert refused.returncode == 1 and "is the checkpoint itself" in refused.stderr, refused.stderr[-2000:]
    existing = tmp_path / "existing.onnx"
    existing.write_bytes(b"an earlier export")
    refused = export(existing)
    assert refused.returncode == 1 and "exists; choose another output=" in refused.stderr, refused.stderr[-2000:]
    failed = export(tmp_path / "old.onnx", "opset=6")  # no BatchNormalization at opset 6: not exportable or not runnable
    assert failed.returncode == 1 and "cannot export the model as ONNX (opset=6)" in failed.stderr, failed.stderr[-2000:]
    assert "Traceback" not in failed.stderr
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    unwritable = export(blocked / "model.onnx")
    assert unwritable.returncode == 1 and f"cannot write {blocked / 'model.onnx'}" in unwritable.stderr
    assert ckpt.read_bytes() == checkpoint_bytes and existing.read_bytes() == b"an earlier export"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("run-")) == \
        ["a-file", "cli.ckpt", "existing.onnx"]


def test_metadata_leaves_out_training_image_fingerprints(sharp_checkpoint):
    from types import SimpleNamespace

    from cxr.export import onnx_metadata

    spec = load_classifier(sharp_checkpoint).spec
    summary = {**spec["data_summary"], "train_image_sha256": ["0123456789abcdef"]}
    soup = {"method": "ensemble", "members": [{"path": "/home/someone/run/best.ckpt", "sha256": "fedcba"}]}
    meta = onnx_metadata(SimpleNamespace(spec={**spec, "data_summary": summary, "soup": soup}, sha256="abc"))
    assert meta["data_summary"] == spec["data_summary"] and "0123456789abcdef" not in json.dumps(meta)
    assert meta["soup"]["members"] == [{"sha256": "fedcba"}] and "/home/someone" not in json.dumps(meta)
