"""cxr-export: write a checkpoint as ONNX (logits, and the feature distance where one is fitted; dynamic batch)
with its inference spec.

    cxr-export ckpt_path=PATH [output=model.onnx] [opset=17]

The spec (classes, preprocessing, calibration, ...) is embedded in the ONNX metadata under
`cxr_spec` and written beside it as `<output>.json`, so an ONNX Runtime server needs nothing else.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from cxr.checkpoint import public_calibration_fit, public_data_summary
from cxr.config import CONFIG_DIR, configure_threads, log_config, user_errors
from cxr.inference import Classifier, load_classifier

log = logging.getLogger("cxr.export")
METADATA_KEY = "cxr_spec"
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
DISTANCE_NAME = "feature_distance"  # the second output, present when the checkpoint has a feature distance fitted


def onnx_metadata(classifier: Classifier) -> dict:
    return {**classifier.spec, "data_summary": public_data_summary(classifier.spec),
            "calibration_fit": public_calibration_fit(classifier.spec),
            "checkpoint_sha256": classifier.sha256}


def export_onnx(classifier: Classifier, output: str | Path, opset: int = 17) -> Path:
    import onnx

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    size = classifier.preprocessing.image_size
    dummy = torch.zeros(1, classifier.preprocessing.in_chans, size, size)
    tmp = output.with_name(output.name + ".tmp")
    network, outputs = ((classifier.net, [OUTPUT_NAME]) if classifier.scored is None
                        else (classifier.scored, [OUTPUT_NAME, DISTANCE_NAME]))
    with torch.no_grad():
        torch.onnx.export(network, (dummy,), str(tmp), input_names=[INPUT_NAME], output_names=outputs,
                          dynamic_axes={name: {0: "batch"} for name in [INPUT_NAME, *outputs]}, opset_version=opset,
                          dynamo=False)
    model = onnx.load(str(tmp))
    meta = model.metadata_props.add()
    meta.key, meta.value = METADATA_KEY, json.dumps(onnx_metadata(classifier))
    onnx.checker.check_model(model)
    onnx.save(model, str(tmp))
    tmp.replace(output)  # atomic: a reader never sees a half-written model
    sidecar = output.with_name(output.name + ".json")
    sidecar.write_text(json.dumps(onnx_metadata(classifier), indent=2))
    return output


def read_onnx_spec(path: str | Path) -> dict:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            return json.loads(prop.value)
    raise ValueError(f"{path} has no '{METADATA_KEY}' metadata; export it with cxr-export")


def max_probability_difference(classifier: Classifier, onnx_path: str | Path, images: list[np.ndarray]) -> float:
    return onnx_differences(classifier, onnx_path, images)["probability"]


def onnx_differences(classifier: Classifier, onnx_path: str | Path, images: list[np.ndarray]) -> dict:
    """Largest |p_torch - p_onnx| over `images`, and the largest difference of their feature distances relative to
    the largest distance (an image at a class mean has distance ~0, where float32 leaves no relative precision;
    None without a feature distance)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    batch = torch.stack([classifier.preprocess(image) for image in images])
    logits, distance = classifier.logits_and_distance(batch)
    outputs = session.run(None, {INPUT_NAME: batch.numpy()})
    got = classifier.calibration.probabilities(torch.from_numpy(outputs[0])).numpy()
    out = {"probability": float(np.abs(classifier.calibration.probabilities(logits).numpy() - got).max()),
           "feature_distance": None}
    if distance is not None:
        out["feature_distance"] = float(np.abs(distance.numpy() - outputs[1]).max() / distance.numpy().max())
    return out


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="export")
@user_errors
def main(cfg: DictConfig) -> None:
    log_config(cfg, log)
    configure_threads(cfg)
    ckpt = Path(cfg.ckpt_path).expanduser()
    classifier = load_classifier(ckpt)
    output = Path(cfg.output).expanduser() if cfg.get("output") else ckpt.with_suffix(".onnx")
    export_onnx(classifier, output, opset=int(cfg.opset))
    rng = np.random.default_rng(0)
    check = [rng.integers(0, 256, (300, 280), dtype=np.uint8) for _ in range(2)]
    diff = onnx_differences(classifier, output, check)
    log.info("exported %s (on random images: max |p_torch - p_onnx| %.2e, feature distance relative difference %s)",
             output, diff["probability"], diff["feature_distance"])
    print(output)


if __name__ == "__main__":
    main()
