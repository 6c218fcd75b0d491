"""Bootstrap confidence intervals over patients."""
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from cxr.evaluation.metrics import compute_metrics, weighted_auroc
from cxr.evaluation.uncertainty import bootstrap_intervals

NAMES = ["normal", "pneumonia", "tuberculosis"]


def noisy_predictions(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, 3, n)
    logits = rng.normal(size=(n, 3)) + 1.5 * np.eye(3)[targets]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return probs, targets


def test_weighted_auroc_matches_scikit_learn_with_ties_and_weights():
    rng = np.random.default_rng(1)
    scores = np.round(rng.random(300), 1)  # many ties
    positive = rng.random(300) < 0.4
    weights = rng.integers(0, 4, size=(5, 300)).astype(float)
    got = weighted_auroc(scores, positive, weights)
    for row, value in zip(weights, got):
        assert value == pytest.approx(roc_auc_score(positive, scores, sample_weight=row))
    assert np.isnan(weighted_auroc(scores, positive, weights * positive)).all()  # no negative drawn


def test_weighted_auroc_memory_grows_with_images_not_their_square():
    """An external set scored whole (data.split=all) can hold 100k images: an N x N matrix of them would need 80 GB."""
    import tracemalloc

    n = 20_000
    rng = np.random.default_rng(2)
    scores, positive = rng.random(n), rng.random(n) < 0.3
    weights = rng.integers(0, 3, size=(3, n)).astype(float)
    tracemalloc.start()
    try:
        got = weighted_auroc(scores, positive, weights)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * n * 8, f"{peak / 1e6:.0f} MB"  # an N x N float64 matrix would be 3200 MB
    for row, value in zip(weights, got):
        assert value == pytest.approx(roc_auc_score(positive, scores, sample_weight=row))


def test_intervals_cover_the_estimate_and_narrow_with_more_patients():
    widths = []
    for n in (150, 1500):
        probs, targets = noisy_predictions(n)
        point = compute_metrics(probs, targets, NAMES)
        ci = bootstrap_intervals(probs, targets, np.arange(n).astype(str), NAMES)
        assert ci["accuracy"][0] <= point["accuracy"] <= ci["accuracy"][1]
        assert ci["macro_auroc"][0] <= point["macro_auroc"] <= ci["macro_auroc"][1]
        assert ci["pneumonia_vs_normal_auroc"][0] <= point["pneumonia_vs_normal_auroc"] <= ci["pneumonia_vs_normal_auroc"][1]
        widths.append(ci["macro_auroc"][1] - ci["macro_auroc"][0])
    assert widths[1] < 0.5 * widths[0]  # ~1/sqrt(10)


def test_repeated_images_of_one_patient_do_not_narrow_the_interval():
    probs, targets = noisy_predictions(200)
    one_each = bootstrap_intervals(probs, targets, np.arange(200).astype(str), NAMES)
    # Every patient imaged four times, with the same prediction: no new evidence about other patients.
    repeated = bootstrap_intervals(np.repeat(probs, 4, axis=0), np.repeat(targets, 4),
                                   np.repeat(np.arange(200), 4).astype(str), NAMES)
    width = lambda ci: ci["accuracy"][1] - ci["accuracy"][0]  # noqa: E731
    assert repeated["patients"] == 200
    assert width(repeated) == pytest.approx(width(one_each), rel=0.2)
    by_image = bootstrap_intervals(np.repeat(probs, 4, axis=0), np.repeat(targets, 4), np.arange(800).astype(str), NAMES)
    assert width(by_image) < 0.7 * width(one_each)  # what treating images as independent would claim


def test_no_interval_from_a_single_patient():
    probs, targets = noisy_predictions(6)
    assert bootstrap_intervals(probs, targets, ["p1"] * 6, NAMES) is None


def test_macro_interval_only_from_resamples_holding_every_class():
    """With tuberculosis in one patient of 20, a resample without that patient would average two classes'
    AUROC instead of three: it is left out, and the count kept says so."""
    rng = np.random.default_rng(1)
    targets = np.array([0] * 10 + [1] * 9 + [2])
    probs = rng.dirichlet(np.ones(3), size=len(targets))
    groups = [f"p{i:02d}" for i in range(len(targets))]
    ci = bootstrap_intervals(probs, targets, groups, ["normal", "pneumonia", "tuberculosis"], n_resamples=500)
    counts = np.random.default_rng(0).multinomial(20, np.full(20, 1 / 20), size=500)  # the draw, replayed
    positives = np.stack([counts[:, targets == c].sum(axis=1) for c in range(3)], axis=1)
    every_class = ((positives > 0) & (positives < 20)).all(axis=1)
    assert 0 < ci["macro_auroc_resamples"] == int(every_class.sum()) < 500


def test_a_flawless_small_group_gets_a_wilson_interval_and_a_perfect_auroc_none():
    # 18 tuberculosis films, all found, against 10 normals, all ranked below them: the bootstrap sees only 100%.
    targets = np.array([2] * 18 + [0] * 10)
    probs = np.where(np.eye(3)[targets] == 1, 0.9, 0.05)
    ci = bootstrap_intervals(probs, targets, np.arange(28).astype(str), NAMES)
    assert ci["recall"]["tuberculosis"] == pytest.approx([18 / (18 + 1.959964 ** 2), 1.0])  # Wilson: n / (n + z²)
    assert ci["accuracy"] == pytest.approx([28 / (28 + 1.959964 ** 2), 1.0])
    assert ci["auroc"]["tuberculosis"] is None and ci["macro_auroc"] is None
    assert ci["wilson"] == ["accuracy", "recall.normal", "recall.tuberculosis"]  # reports mark these as Wilson's
    # one patient imaged 18 times is one trial, not 18
    repeated = bootstrap_intervals(probs, targets, np.array(["tb"] * 18 + [str(i) for i in range(10)]), NAMES)
    assert repeated["recall"]["tuberculosis"] == pytest.approx([1 / (1 + 1.959964 ** 2), 1.0])


def test_a_class_whose_images_are_one_patients_gets_no_interval_not_a_zero_width_one():
    # Ten normals, one patient each, all found; one TB patient's four films, three found: every resample that
    # holds that patient gives 75%, which is no evidence of certainty.
    targets = np.array([0] * 10 + [2] * 4)
    probs = np.where(np.eye(3)[targets] == 1, 0.9, 0.05)
    probs[10] = [0.9, 0.05, 0.05]
    groups = np.array([str(i) for i in range(10)] + ["tb"] * 4)
    ci = bootstrap_intervals(probs, targets, groups, NAMES)
    assert ci["recall"]["tuberculosis"] is None and "recall.tuberculosis" not in ci["wilson"]
    assert ci["recall"]["normal"] == pytest.approx([10 / (10 + 1.959964 ** 2), 1.0])  # Wilson's, as before
    assert ci["accuracy"][0] < 13 / 14 < ci["accuracy"][1]
