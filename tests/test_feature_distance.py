"""The feature distance that flags images unlike the training data: the fit, its storage in the checkpoint, the
evaluation report, the referral rule, the ONNX export and derived checkpoints."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from sklearn.covariance import LedoitWolf

from conftest import CLASS_NAMES, TINY_PREPROCESSING, add_feature_distance, make_tiny_checkpoint
from cxr.checkpoint import CheckpointError, read_checkpoint
from cxr.config import ConfigError
from cxr.data.datamodule import ChestXrayDataModule
from cxr.evaluation.fit_feature_distance import check_feature_distance_config, fit_feature_distance_checkpoint
from cxr.evaluation.figures import legend_label
from cxr.evaluation.report import write_report
from cxr.inference import load_classifier
from cxr.models.feature_distance import SPEC_KEY, TENSORS_KEY, FeatureDistance, supports_feature_distance
from serve.referral import Referral


def noise_images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (80, 70), dtype=np.uint8) for _ in range(n)]


def smooth_images(n: int) -> list[np.ndarray]:
    y, x = np.mgrid[0:80, 0:70]
    return [(128 + 100 * np.sin(x / (6 + i)) * np.cos(y / 9)).astype(np.uint8) for i in range(n)]


@pytest.fixture(scope="module")
def fitted_checkpoint(tmp_path_factory):
    """A tiny checkpoint whose feature distance was fitted on smooth images: noise lies far from them."""
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("fd") / "fitted.ckpt", seed=1)
    return add_feature_distance(path, smooth_images(12))


def test_distance_is_the_squared_mahalanobis_distance_to_the_nearest_class_mean():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 3, (3, 20))
    targets = np.repeat([0, 1, 2], 100)
    features = centres[targets] + rng.normal(0, 1, (300, 20)) @ rng.normal(0, 1, (20, 20)) / 4
    fitted = FeatureDistance.fit(features, targets)
    means = np.stack([features[targets == c].mean(axis=0) for c in range(3)])
    precision = LedoitWolf().fit(features - means[targets]).precision_
    queries = np.concatenate([features[:20], rng.normal(0, 10, (20, 20))])
    expected = np.min([np.einsum("ij,jk,ik->i", queries - m, precision, queries - m) for m in means], axis=0)
    got = fitted(torch.from_numpy(queries)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    assert got[20:].min() > np.quantile(got[:20], 0.95)  # far points score far
    np.testing.assert_allclose(fitted(torch.from_numpy(means)).numpy(), 0.0, atol=1e-3)


def test_fewer_images_than_feature_dimensions_still_give_finite_distances():
    rng = np.random.default_rng(1)
    fitted = FeatureDistance.fit(rng.normal(0, 1, (9, 64)), np.arange(9) % 3)
    distances = fitted(torch.from_numpy(rng.normal(0, 1, (5, 64)))).numpy()
    assert np.isfinite(distances).all() and (distances > 0).all()


def test_the_distance_comes_from_the_same_forward_pass_and_leaves_the_logits_alone(fitted_checkpoint, tiny_checkpoint):
    classifier = load_classifier(fitted_checkpoint)
    assert classifier.feature_distance is not None
    batch = torch.stack([classifier.preprocess(image) for image in noise_images(4)])
    logits, distances = classifier.logits_and_distance(batch)
    torch.testing.assert_close(logits, classifier.logits(batch))
    assert distances.shape == (4,)
    probabilities, scored = classifier.predict_scored(noise_images(4))
    np.testing.assert_allclose(probabilities, classifier.predict(noise_images(4)))
    np.testing.assert_allclose(scored, distances.numpy(), rtol=1e-5)
    # Smooth images like the fit's pass its threshold (the largest of theirs); noise lies beyond it.
    threshold = classifier.spec[SPEC_KEY]["threshold"]
    assert (classifier.predict_scored(smooth_images(12))[1] <= threshold * (1 + 1e-5)).all()
    assert (scored > threshold).all()
    unfitted = load_classifier(tiny_checkpoint)
    assert unfitted.feature_distance is None and unfitted.predict_scored(noise_images(2))[1] is None


def test_networks_without_one_classifier_layer_have_no_feature_distance():
    import timm

    assert supports_feature_distance(timm.create_model("test_efficientnet", pretrained=False, num_classes=3))
    assert not supports_feature_distance(timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False,
                                                           num_classes=3))  # two heads, each on its own token


@pytest.mark.parametrize("features, targets", [(np.eye(3, 8), np.arange(3)), (np.ones((5, 8)), np.zeros(5, int))],
                         ids=["one image per class", "identical images"])
def test_features_that_do_not_vary_are_refused_not_turned_into_nan_distances(features, targets):
    with pytest.raises(ValueError, match="do not vary around their class means"):
        FeatureDistance.fit(features, targets)


def test_a_checkpoint_with_half_a_fit_is_refused(fitted_checkpoint, tmp_path):
    checkpoint = torch.load(fitted_checkpoint, weights_only=False, map_location="cpu")
    no_tensors = {k: v for k, v in checkpoint.items() if k != TENSORS_KEY}
    torch.save(no_tensors, tmp_path / "no_tensors.ckpt")
    no_record = {**checkpoint, "cxr": {k: v for k, v in checkpoint["cxr"].items() if k != SPEC_KEY}}
    torch.save(no_record, tmp_path / "no_record.ckpt")
    with pytest.raises(CheckpointError, match="record without its tensors"):
        load_classifier(tmp_path / "no_tensors.ckpt")
    with pytest.raises(CheckpointError, match="tensors without its record"):
        read_checkpoint(tmp_path / "no_record.ckpt")
    assert load_classifier(fitted_checkpoint).feature_distance is not None


def test_fit_on_a_data_module_stores_a_threshold_that_passes_the_asked_share_of_val(synthetic_manifest, tmp_path):
    datamodule = ChestXrayDataModule.from_manifest(str(synthetic_manifest), preprocessing=TINY_PREPROCESSING,
                                                   class_names=CLASS_NAMES, val_fraction=0.3)
    ckpt = make_tiny_checkpoint(tmp_path / "tiny.ckpt", seed=2)
    before = read_checkpoint(ckpt)[1]
    out = tmp_path / "fitted.ckpt"
    record = fit_feature_distance_checkpoint(ckpt, datamodule, "val", 0.8, out)
    checkpoint, spec = read_checkpoint(out)
    assert spec[SPEC_KEY] == record and set(checkpoint[TENSORS_KEY]) == {"whitening", "whitened_means"}
    assert {k: v for k, v in spec.items() if k != SPEC_KEY} == before  # the rest of the spec is kept
    assert record["fit_images"] == len(datamodule.split_frame("train"))
    assert record["n"] == len(datamodule.split_frame("val")) and record["split"] == "val"
    classifier = load_classifier(out)
    val = datamodule.dataset("val")
    distances = torch.cat([classifier.logits_and_distance(x)[1] for x, _ in torch.utils.data.DataLoader(val, 64)])
    assert record["threshold"] == pytest.approx(float(np.quantile(distances.numpy(), 0.8)), rel=1e-5)
    np.testing.assert_allclose(record["split_percentiles"], np.percentile(distances.numpy(), np.arange(101)), rtol=1e-5)
    # The training images (unaugmented) sit closer to their own class means than held-out images on average.
    train = datamodule.dataset("train")
    train_distances = torch.cat([classifier.logits_and_distance(torch.stack([train.preprocessing.to_tensor(im)
                                                                              for im in train.images]))[1]])
    assert train_distances.mean() < distances.mean()


def test_a_fit_that_cannot_be_made_leaves_the_checkpoint_as_it_was_and_says_why(synthetic_manifest, tmp_path,
                                                                                  monkeypatch, caplog):
    datamodule = ChestXrayDataModule.from_manifest(str(synthetic_manifest), preprocessing=TINY_PREPROCESSING,
                                                   class_names=CLASS_NAMES, val_fraction=0.3)
    ckpt = make_tiny_checkpoint(tmp_path / "tiny.ckpt", seed=2)
    before = ckpt.read_bytes()
    # As if every training image were the same picture: features that do not vary.
    monkeypatch.setattr("cxr.evaluation.fit_feature_distance.pooled_features",
                        lambda classifier, dataset, batch_size: np.ones((len(dataset), 8)))
    assert fit_feature_distance_checkpoint(ckpt, datamodule, "val", 0.95, ckpt) is None
    assert ckpt.read_bytes() == before
    assert "no feature distance fitted" in caplog.text and "do not vary" in caplog.text


def test_the_threshold_split_must_be_held_out_and_not_tested_on_and_the_pass_rate_a_share(synthetic_manifest):
    refit = ChestXrayDataModule.from_manifest(str(synthetic_manifest), preprocessing=TINY_PREPROCESSING,
                                              train_splits=["train", "val"])
    with pytest.raises(ConfigError, match="is trained on"):
        check_feature_distance_config(refit, "val", 0.95)
    plain = ChestXrayDataModule.from_manifest(str(synthetic_manifest), preprocessing=TINY_PREPROCESSING)
    check_feature_distance_config(plain, "val", 0.95, evaluated_split="test")
    with pytest.raises(ConfigError, match="is the split the run is tested on"):
        check_feature_distance_config(plain, "test", 0.95, evaluated_split="test")
    for rate in (0.0, 1.0, 95):
        with pytest.raises(ConfigError, match="pass_rate"):
            check_feature_distance_config(plain, "val", rate)


def test_report_gives_the_flagged_share_per_source(tmp_path):
    frame = pd.DataFrame({"path": [f"{i}.png" for i in range(6)], "label": ["normal", "pneumonia"] * 3,
                          "source": ["a", "a", "a", "a", "b", "b"], "patient_id": [str(i) for i in range(6)],
                          "target": [0, 1] * 3})
    probs = np.array([[0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.9, 0.05, 0.05], [0.1, 0.8, 0.1],
                      [0.2, 0.7, 0.1], [0.1, 0.8, 0.1]])  # right, wrong, right, right, wrong, right
    distances = np.array([1.0, 9.0, 2.0, 3.0, 8.0, 7.0])
    fit = {"threshold": 5.0, "pass_rate": 0.95, "split": "val", "n": 40, "split_percentiles": np.linspace(0.5, 6, 101).tolist()}
    metrics = write_report(tmp_path, probs, frame, CLASS_NAMES, feature_distances=(distances, fit))
    unlike = metrics["unlike_training"]
    assert unlike["flagged"] == pytest.approx(0.5) and unlike["n"] == 6
    assert unlike["by_source"]["a"] == {"n": 4, "flagged": 0.25, "accuracy_flagged": 0.0, "accuracy_not_flagged": 1.0}
    assert unlike["by_source"]["b"] == {"n": 2, "flagged": 1.0, "accuracy_flagged": 0.5, "accuracy_not_flagged": None}
    assert json.loads((tmp_path / "metrics.json").read_text())["unlike_training"] == unlike
    report = (tmp_path / "report.md").read_text()
    assert "## Unlike the training data" in report and "| a | 4 | 25.0% | 0.0% | 100.0% |" in report
    predictions = pd.read_csv(tmp_path / "predictions.csv")
    assert predictions["unlike_training"].tolist() == [False, True, False, False, True, True]
    with Image.open(tmp_path / "feature_distance.png") as figure:
        assert figure.format == "PNG" and len(figure.convert("L").getcolors(maxcolors=100_000)) > 10
    odd_names = write_report(tmp_path / "odd", probs, frame.assign(source=["_site"] * 3 + ["a$^$b"] * 3), CLASS_NAMES,
                             feature_distances=(distances, fit))  # hidden by, and a parse error in, matplotlib
    assert set(odd_names["unlike_training"]["by_source"]) == {"_site", "a$^$b"}
    assert legend_label("_site (n = 3)") == " _site (n = 3)" and legend_label("a$^$b") == r"a\$^\$b"
    no_fit = write_report(tmp_path / "plain", probs, frame, CLASS_NAMES)
    assert "unlike_training" not in no_fit
    assert "Unlike the training data" not in (tmp_path / "plain" / "report.md").read_text()
    assert not (tmp_path / "plain" / "feature_distance.png").exists()


def test_referral_flags_images_beyond_the_threshold():
    spec = {"class_names": CLASS_NAMES, SPEC_KEY: {"threshold": 50.0, "pass_rate": 0.95, "split": "val"}}
    referral = Referral.from_spec(spec, review_confidence=0.5)
    confident = np.array([0.9, 0.05, 0.05])
    assert referral.decide(confident, 49.0)[2:] == (False, None)
    label, _, needs_review, reason = referral.decide(confident, 51.0)
    assert label == "normal" and needs_review and reason == "unlike_training_data: feature distance 51 > 50"
    assert referral.decide(confident, 50.0003)[3] == "unlike_training_data: feature distance 50.0003 > 50"
    assert referral.decide(confident, None)[2] is False
    assert "unlike_training_data" in referral.describe() and "95% of the val split" in referral.describe()
    plain = Referral.from_spec({"class_names": CLASS_NAMES}, review_confidence=0.5)
    assert plain.decide(confident, 1e9)[2] is False and "unlike" not in plain.describe()


def test_onnx_export_carries_the_distance_as_a_second_output(fitted_checkpoint, tmp_path):
    from cxr.export import export_onnx, onnx_differences, read_onnx_spec
    from serve.backends import OnnxBackend, TorchBackend

    classifier = load_classifier(fitted_checkpoint)
    exported = export_onnx(classifier, tmp_path / "fitted.onnx")
    images = noise_images(3) + smooth_images(3)
    differences = onnx_differences(classifier, exported, images)
    assert differences["probability"] <= 1e-5 and differences["feature_distance"] <= 1e-4
    assert read_onnx_spec(exported)[SPEC_KEY] == classifier.spec[SPEC_KEY]
    onnx_probs, onnx_distances = OnnxBackend(exported).predict_scored(images)
    torch_probs, torch_distances = TorchBackend(fitted_checkpoint).predict_scored(images)
    np.testing.assert_allclose(onnx_probs, torch_probs, atol=1e-5)
    np.testing.assert_allclose(onnx_distances, torch_distances, rtol=1e-4)


def test_explanations_carry_the_distance(fitted_checkpoint):
    from cxr.explain import GradCamExplainer

    classifier = load_classifier(fitted_checkpoint)
    image = noise_images(1, seed=4)[0]
    explanation = GradCamExplainer(classifier).explain(image)
    assert explanation.feature_distance == pytest.approx(float(classifier.predict_scored([image])[1][0]), rel=1e-5)


def test_a_soup_does_not_inherit_its_templates_distance(fitted_checkpoint, tmp_path):
    from cxr.soup import write_soup_checkpoint

    net = load_classifier(fitted_checkpoint).net
    checkpoint, spec = read_checkpoint(write_soup_checkpoint(fitted_checkpoint, net, tmp_path / "soup.ckpt", {}))
    assert TENSORS_KEY not in checkpoint and SPEC_KEY not in spec
    assert load_classifier(tmp_path / "soup.ckpt").feature_distance is None
