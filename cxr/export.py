"""cxr-export: write a checkpoint as ONNX (logits, and the feature distance where one is fitted; dynamic batch)
with its inference spec.

    cxr-export ckpt_path=PATH [output=model.onnx] [opset=17]

The spec (classes, preprocessing and its steps in words, calibration, ...) is embedded in the ONNX metadata under
`cxr_spec` and written beside it as `<output>.json`, so an ONNX Runtime server needs nothing else. An existing file
is never overwritten; the model is checked in ONNX Runtime against the checkpoint before it is put in place, and a
failed export leaves nothing at the output.
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
from cxr.config import CONFIG_DIR, ConfigError, configure_threads, is_whole_number, log_config, user_errors
from cxr.data.preprocess import Preprocessing
from cxr.inference import Classifier, load_classifier

log = logging.getLogger("cxr.export")
METADATA_KEY = "cxr_spec"
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
DISTANCE_NAME = "feature_distance"  # the second output, present when the checkpoint has a feature distance fitted
# Largest |p_torch - p_onnx| on random images for which an export is kept (measured: below 1e-5, sharp
# temperatures included).
MAX_PROBABILITY_DIFFERENCE = 1e-3


class ExportError(ValueError):
    """The model cannot be exported, written or run as exported; the message says why."""


def onnx_metadata(classifier: Classifier) -> dict:
    spec = classifier.spec
    metadata = {**spec, "data_summary": public_data_summary(spec), "calibration_fit": public_calibration_fit(spec),
                "preprocessing_steps": Preprocessing.from_dict(spec["preprocessing"]).steps(),
                "checkpoint_sha256": classifier.sha256}
    if spec.get("soup"):  # the members by hash and score, not by where they lay on the machine that made them
        metadata["soup"] = {**spec["soup"], "members": [{k: v for k, v in member.items() if k != "path"}
                                                        for member in spec["soup"].get("members", [])]}
    return metadata


def sidecar_path(output: Path) -> Path:
    return output.with_name(output.name + ".json")


def export_onnx(classifier: Classifier, output: str | Path, opset: int = 17) -> Path:
    """Write `output` and its sidecar; both are written and the model checked in ONNX Runtime (parity with the
    checkpoint on random images) before either is put in place."""
    import onnx

    output = Path(output)
    staged = [output.with_name(output.name + ".tmp"), output.with_name(output.name + ".json.tmp")]
    size = classifier.preprocessing.image_size
    dummy = torch.zeros(1, classifier.preprocessing.in_chans, size, size)
    network, outputs = ((classifier.net, [OUTPUT_NAME]) if classifier.scored is None
                        else (classifier.scored, [OUTPUT_NAME, DISTANCE_NAME]))
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        with torch.no_grad():
            torch.onnx.export(network, (dummy,), str(staged[0]), input_names=[INPUT_NAME], output_names=outputs,
                              dynamic_axes={name: {0: "batch"} for name in [INPUT_NAME, *outputs]},
                              opset_version=opset, dynamo=False)
        model, metadata = onnx.load(str(staged[0])), onnx_metadata(classifier)
        meta = model.metadata_props.add()
        meta.key, meta.value = METADATA_KEY, json.dumps(metadata)
        onnx.checker.check_model(model)
        onnx.save(model, str(staged[0]))
        staged[1].write_text(json.dumps(metadata, indent=2))
        rng = np.random.default_rng(0)
        check = [rng.integers(0, 256, (300, 280), dtype=np.uint8) for _ in range(2)]
        difference = onnx_differences(classifier, staged[0], check)["probability"]
        if not difference <= MAX_PROBABILITY_DIFFERENCE:
            raise ExportError(f"the exported model's probabilities differ from the checkpoint's by {difference:.2e} "
                              f"on random images (more than {MAX_PROBABILITY_DIFFERENCE}): not kept")
        staged[0].replace(output)  # each rename is atomic: a reader never sees a half-written file
        staged[1].replace(sidecar_path(output))
    except ExportError:
        raise
    except OSError as exc:
        raise ExportError(f"cannot write {output}: {exc.strerror or exc}") from exc
    except Exception as exc:  # torch.onnx, onnx's checker and ONNX Runtime raise many types
        raise ExportError(f"cannot export the model as ONNX (opset={opset}): {type(exc).__name__}: "
                          f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from exc
    finally:
        for path in staged:
            if path.is_file():  # not unlink(missing_ok=True): under a parent that is a file it raises
                path.unlink()
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
    output = Path(cfg.output).expanduser() if cfg.get("output") else ckpt.with_suffix(".onnx")
    if not is_whole_number(cfg.opset):
        raise ConfigError(f"opset={cfg.opset!r}: give an ONNX opset number, e.g. 17")
    if output.resolve() == ckpt.resolve():
        raise ConfigError(f"output={output} is the checkpoint itself: choose another output=")
    for path in (output, sidecar_path(output)):
        if path.exists():
            raise FileExistsError(f"{path} exists; choose another output=")
    classifier = load_classifier(ckpt)
    export_onnx(classifier, output, opset=cfg.opset)
    log.info("exported %s (checked in ONNX Runtime against the checkpoint)", output)
    print(output)


if __name__ == "__main__":
    main()
