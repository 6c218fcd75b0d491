"""The operating point: fitting temperature and logit bias, and storing them with the checkpoint."""
import re

import numpy as np
import pytest
import torch

from cxr.calibration import Calibration, check_calibration_targets, fit_calibration, negative_log_likelihood
from cxr.checkpoint import read_spec, write_checkpoint_with_spec

NAMES = ["normal", "pneumonia", "tuberculosis"]


def sample_labels(logits: torch.Tensor, calibration: Calibration, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.multinomial(calibration.probabilities(logits), 1, generator=generator).squeeze(1)


@pytest.fixture(scope="module")
def logits() -> torch.Tensor:
    return 3 * torch.randn(20000, 3, generator=torch.Generator().manual_seed(1))


def test_recovers_the_temperature_and_bias_that_generated_the_labels(logits):
    truth = Calibration(temperature=2.0, logit_bias=(0.0, 1.2, -0.6))
    fitted = fit_calibration(logits, sample_labels(logits, truth), NAMES, "temperature_bias")
    assert fitted.temperature == pytest.approx(2.0, rel=0.05)
    assert fitted.logit_bias == pytest.approx(truth.logit_bias, abs=0.08)


def test_temperature_alone_keeps_every_decision_and_lowers_the_nll(logits):
    targets = sample_labels(logits, Calibration(temperature=0.5))
    fitted = fit_calibration(logits, targets, NAMES, "temperature")
    assert fitted.logit_bias is None and fitted.temperature == pytest.approx(0.5, rel=0.05)
    assert torch.equal(fitted.probabilities(logits).argmax(1), logits.argmax(1))
    assert negative_log_likelihood(fitted.probabilities(logits), targets) < \
        negative_log_likelihood(Calibration().probabilities(logits), targets)


def test_bias_corrects_a_shifted_prior(logits):
    """A network trained for balanced classes, deployed where pneumonia is common: the bias raises accuracy."""
    targets = sample_labels(logits, Calibration(logit_bias=(0.0, 2.0, 0.0)))
    fitted = fit_calibration(logits, targets, NAMES, "temperature_bias")
    raw = (logits.argmax(1) == targets).float().mean()
    calibrated = (fitted.probabilities(logits).argmax(1) == targets).float().mean()
    assert calibrated > raw + 0.03


def test_a_perfectly_classified_split_keeps_the_temperature_finite(logits):
    fitted = fit_calibration(logits[:50], logits[:50].argmax(1), NAMES, "temperature_bias")
    assert 0.05 < fitted.temperature < 1.0 and max(map(abs, fitted.logit_bias)) < 3


def test_none_is_the_identity(logits):
    assert fit_calibration(logits, logits.argmax(1), NAMES, "none") == Calibration()
    assert torch.allclose(Calibration().probabilities(logits), torch.softmax(logits.double(), 1))


def test_refuses_what_cannot_be_fitted():
    with pytest.raises(ValueError, match="without images of \\['tuberculosis'\\]"):
        check_calibration_targets([0, 1, 1, 0], NAMES, "temperature_bias")
    check_calibration_targets([0, 1, 1, 0], NAMES, "temperature")  # a temperature needs no class coverage
    with pytest.raises(ValueError, match="no labelled images"):
        check_calibration_targets([], NAMES, "temperature")
    with pytest.raises(ValueError, match="unknown calibration method 'platt'"):
        check_calibration_targets([0, 1, 2], NAMES, "platt")
    with pytest.raises(ValueError, match="temperature must be positive"):
        Calibration(temperature=0.0)


def test_warns_when_a_bias_would_be_fitted_on_few_images(caplog):
    with caplog.at_level("WARNING", logger="cxr.calibration"):
        check_calibration_targets([0] * 40 + [1] * 40 + [2] * 5, NAMES, "temperature_bias")
    assert "only 5 images per class" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="cxr.calibration"):
        check_calibration_targets([0] * 40 + [1] * 40 + [2] * 30, NAMES, "temperature_bias")
        check_calibration_targets([0, 1, 2], NAMES, "temperature")
        # cxr-train warns once, before the fit, and fits the bias afterwards with warn_few=False
        check_calibration_targets([0] * 40 + [1] * 40 + [2] * 5, NAMES, "temperature_bias", warn_few=False)
        logits = torch.randn(85, 3, generator=torch.Generator().manual_seed(0))
        fit_calibration(logits, torch.tensor([0] * 40 + [1] * 40 + [2] * 5), NAMES, "temperature_bias", warn_few=False)
    assert caplog.text == ""


def test_confident_predictions_of_two_classes_do_not_tie():
    """Logit gaps of 18 and 25: both round to probability 1.0 in float32, and AUROC would count the pair half right."""
    probs = Calibration(1.0).probabilities(torch.tensor([[18.0, 0.0], [25.0, 0.0]]))
    assert probs[0, 0] < probs[1, 0] < 1.0


def test_spec_round_trip_is_keyed_by_class_name():
    calibration = Calibration(0.7, (0.0, 1.1, -0.2))
    spec = {"class_names": NAMES, **calibration.to_spec(NAMES)}
    assert spec["logit_bias"] == {"normal": 0.0, "pneumonia": 1.1, "tuberculosis": -0.2}
    assert Calibration.from_spec(spec) == calibration
    # Stored by name, so a reordered dict reads back in the checkpoint's class order.
    reordered = {**spec, "logit_bias": {"tuberculosis": -0.2, "normal": 0.0, "pneumonia": 1.1}}
    assert Calibration.from_spec(reordered) == calibration
    assert Calibration.from_spec({"class_names": NAMES}) == Calibration()  # checkpoints from before calibration
    with pytest.raises(ValueError, match="differ from the checkpoint's classes"):
        Calibration.from_spec({"class_names": NAMES, "logit_bias": {"normal": 0.0, "covid": 1.0}})


def test_spec_update_writes_a_new_checkpoint_and_keeps_the_weights(tiny_checkpoint, tmp_path):
    out = write_checkpoint_with_spec(tiny_checkpoint, tmp_path / "calibrated.ckpt", temperature=0.5)
    assert read_spec(out)["temperature"] == 0.5
    assert read_spec(tiny_checkpoint)["temperature"] == 1.0
    original, updated = torch.load(tiny_checkpoint, weights_only=False), torch.load(out, weights_only=False)
    assert original["state_dict"].keys() == updated["state_dict"].keys()
    assert all(torch.equal(original["state_dict"][k], updated["state_dict"][k]) for k in original["state_dict"])
    assert not list(tmp_path.glob("*.partial"))


def test_a_temperature_alone_is_reported_beside_the_networks_own_numbers(synthetic_manifest, tmp_path):
    """A temperature changes no decision but does move one-vs-rest AUROC: the report keeps the network's own."""
    from cxr.data.datamodule import ChestXrayDataModule
    from cxr.evaluation.evaluate import evaluate, predict_logits
    from cxr.evaluation.metrics import compute_metrics
    from cxr.inference import load_classifier
    from tests.conftest import TINY_PREPROCESSING, make_tiny_checkpoint

    classifier = load_classifier(make_tiny_checkpoint(tmp_path / "t.ckpt", calibration=Calibration(temperature=3.0)))
    datamodule = ChestXrayDataModule.from_manifest(str(synthetic_manifest), preprocessing=TINY_PREPROCESSING)
    metrics = evaluate(classifier, datamodule, "test", tmp_path / "eval")
    raw = compute_metrics(torch.softmax(predict_logits(classifier, datamodule, "test"), 1).numpy(),
                          datamodule.split_frame("test")["target"].to_numpy(), NAMES)
    assert metrics["uncalibrated"]["macro_auroc"] == pytest.approx(raw["macro_auroc"])
    assert metrics["uncalibrated"]["accuracy"] == metrics["accuracy"]
    assert "The network's own softmax (no temperature, no bias)" in (tmp_path / "eval" / "report.md").read_text()


def test_the_networks_own_numbers_rank_confident_images_in_float64(synthetic_manifest, tmp_path, monkeypatch):
    """Probabilities within 6e-8 of 1 tie in float32, so the network's own AUROC must not come from torch.softmax."""
    import cxr.evaluation.evaluate as evaluate_module
    from cxr.data.datamodule import ChestXrayDataModule
    from cxr.evaluation.metrics import compute_metrics
    from cxr.inference import load_classifier
    from tests.conftest import TINY_PREPROCESSING, make_tiny_checkpoint

    classifier = load_classifier(make_tiny_checkpoint(tmp_path / "t.ckpt", calibration=Calibration(temperature=3.0)))
    datamodule = ChestXrayDataModule.from_manifest(str(synthetic_manifest), preprocessing=TINY_PREPROCESSING)
    targets = datamodule.split_frame("test")["target"].to_numpy().copy()
    sick = int(np.bincount(targets, minlength=3)[1:].argmax()) + 1  # the test split's commonest finding
    logits = 5.0 * torch.eye(3)[torch.as_tensor(targets)]
    positives = np.flatnonzero(targets == sick)
    logits[positives, sick] = 22.0 + 2 * torch.arange(len(positives), dtype=torch.float32)
    normal = np.flatnonzero(targets == 0)[0]  # ranked just below them: in float32 all of them tie at 1.0
    logits[normal] = 0.0
    logits[normal, sick] = 21.0
    monkeypatch.setattr(evaluate_module, "predict_logits_and_distances", lambda *_: (logits, None))
    metrics = evaluate_module.evaluate(classifier, datamodule, "test", tmp_path / "eval")
    in_float64 = compute_metrics(Calibration().probabilities(logits).numpy(), targets, NAMES)["macro_auroc"]
    in_float32 = compute_metrics(torch.softmax(logits, 1).numpy(), targets, NAMES)["macro_auroc"]
    assert metrics["uncalibrated"]["macro_auroc"] == in_float64 != pytest.approx(in_float32)


def test_a_diverged_checkpoint_is_refused_naming_an_image_not_scored(synthetic_manifest, tmp_path):
    from cxr.checkpoint import CheckpointError
    from cxr.data.datamodule import ChestXrayDataModule
    from cxr.evaluation.evaluate import evaluate
    from cxr.inference import load_classifier
    from tests.conftest import TINY_PREPROCESSING, make_tiny_checkpoint

    classifier = load_classifier(make_tiny_checkpoint(tmp_path / "t.ckpt"))
    with torch.no_grad():
        classifier.net.get_classifier().bias.fill_(float("nan"))
    datamodule = ChestXrayDataModule.from_manifest(str(synthetic_manifest), preprocessing=TINY_PREPROCESSING)
    n = len(datamodule.split_frame("test"))
    first = datamodule.split_frame("test")["path"].iloc[0]
    with pytest.raises(CheckpointError, match=f"non-finite logits .* for {n} of {n} images of the test split "
                                              f"\\(e.g. {re.escape(str(first))}\\): its weights diverged"):
        evaluate(classifier, datamodule, "test", tmp_path / "eval")
    assert not (tmp_path / "eval").exists()


def test_an_operating_point_that_costs_accuracy_where_it_was_fitted_is_warned_about():
    from cxr.evaluation.recalibrate import accuracy_loss

    record = {"split": "val", "n": 34, "accuracy_uncalibrated": 0.353, "accuracy_calibrated": 0.088}
    assert "lowers its accuracy from 35.3% to 8.8%" in accuracy_loss(record)
    assert accuracy_loss({**record, "accuracy_calibrated": 0.353}) is None


@pytest.mark.parametrize("fit_split, overlap_in_report", [("all", "which holds {n} of the {n} images evaluated here"),
                                                          ("val", "none of the images of the test split")])
def test_the_report_says_whether_the_operating_point_was_fitted_on_the_images_it_scores(
        synthetic_manifest, tmp_path, fit_split, overlap_in_report):
    """Judged by the images, not by split names: a site's data calibrated as a whole (data.split=all), then scored on
    its test split, is scored on images the operating point was tuned on."""
    import json
    from types import SimpleNamespace

    from cxr.data.datamodule import ChestXrayDataModule
    from cxr.evaluation.evaluate import evaluate
    from cxr.evaluation.recalibrate import recalibrate_checkpoint
    from cxr.inference import load_classifier
    from serve.api import Settings
    from serve.app import model_info
    from tests.conftest import TINY_PREPROCESSING, make_tiny_checkpoint

    datamodule = ChestXrayDataModule.from_manifest(str(synthetic_manifest), preprocessing=TINY_PREPROCESSING)
    n_test = len(datamodule.split_frame("test"))
    calibrated = recalibrate_checkpoint(make_tiny_checkpoint(tmp_path / "t.ckpt"), datamodule, fit_split,
                                        "temperature", tmp_path / "calibrated.ckpt", warn_few=False)
    metrics = evaluate(load_classifier(tmp_path / "calibrated.ckpt"), datamodule, "test", tmp_path / "eval")
    assert metrics["calibration_fit"]["evaluated_images_in_fit"] == (n_test if fit_split == "all" else 0)
    report = (tmp_path / "eval" / "report.md").read_text()
    assert f"fitted on the {fit_split} split (n = {calibrated['n']}), {overlap_in_report.format(n=n_test)}" in report
    # The fit's fingerprints stay in the checkpoint: not in the report, calibration.json or /model/info.
    published = [json.loads((tmp_path / "eval" / "metrics.json").read_text())["calibration_fit"], calibrated,
                 model_info(read_spec(tmp_path / "calibrated.ckpt"), Settings(ckpt_path=str(tmp_path / "calibrated.ckpt")),
                            SimpleNamespace(max_payload_bytes=1000, max_in_flight=32))["calibration_fit"]]
    assert all("image_sha256" not in fit for fit in published)
