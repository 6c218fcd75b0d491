"""Where AUROC is lost: the split of 1 − AUROC into pairs within and across sources, and the images that cost most."""
import re

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from cxr.evaluation.metrics import auroc_shortfall_by_source, costliest_images
from cxr.evaluation.report import markdown_report, write_report

CLASSES = ["normal", "pneumonia", "tuberculosis"]


def test_parts_add_up_to_one_minus_auroc_with_ties():
    rng = np.random.default_rng(0)
    n = 90
    targets = np.arange(n) % 3
    sources = rng.choice(["a", "b", "c"], size=n)
    probs = rng.dirichlet(np.ones(3), size=n).round(2)  # rounding makes ties
    shortfall = auroc_shortfall_by_source(probs, targets, sources, CLASSES)
    for c, name in enumerate(CLASSES):
        part = shortfall[name]
        assert part["shortfall"] == pytest.approx(1 - roc_auc_score(targets == c, probs[:, c]), abs=1e-12)
        assert part["within_source"] + part["across_sources"] == pytest.approx(part["shortfall"], abs=1e-12)
        assert sum(r["share"] for r in part["pairs"]) == pytest.approx(part["shortfall"], abs=1e-12)
        assert [r["share"] for r in part["pairs"]] == sorted((r["share"] for r in part["pairs"]), reverse=True)


def test_hospitals_ranked_well_alone_but_on_different_scales_lose_only_across():
    # Within each hospital every pneumonia outranks every normal, but hospital b's scores sit lower:
    # b's pneumonias are scored below a's normals.
    score = np.array([0.9, 0.8, 0.5, 0.4,   0.3, 0.25, 0.1, 0.05])
    targets = np.array([1, 1, 0, 0,   1, 1, 0, 0])
    sources = np.array(["a"] * 4 + ["b"] * 4)
    probs = np.stack([1 - score, score, np.zeros_like(score)], axis=1)
    part = auroc_shortfall_by_source(probs, targets, sources, CLASSES)["pneumonia"]
    assert part["within_source"] == 0.0
    assert part["across_sources"] == pytest.approx(1 - roc_auc_score(targets == 1, score)) and part["across_sources"] > 0
    assert part["pairs"] == [{"positive_source": "b", "negative_source": "a", "share": pytest.approx(4 / 16)}]


def test_one_source_gives_nothing_to_split():
    probs = np.full((4, 3), 1 / 3)
    assert auroc_shortfall_by_source(probs, np.array([0, 1, 2, 0]), ["a"] * 4, CLASSES) is None


def test_report_shows_the_split(tmp_path):
    score = np.array([0.9, 0.8, 0.5, 0.4, 0.3, 0.25, 0.1, 0.05])
    frame = pd.DataFrame({"path": [f"{i}.png" for i in range(8)], "label": ["pneumonia", "pneumonia", "normal", "normal"] * 2,
                          "source": ["a"] * 4 + ["b"] * 4, "patient_id": [str(i) for i in range(8)]})
    frame["target"] = [CLASSES.index(label) for label in frame["label"]]
    probs = np.stack([1 - score, score, np.zeros_like(score)], axis=1)
    metrics = write_report(tmp_path, probs, frame, CLASSES)
    assert metrics["auroc_shortfall_by_source"]["pneumonia"]["across_sources"] == pytest.approx(0.25)
    report = (tmp_path / "report.md").read_text()
    assert "## Where AUROC is lost" in report
    assert "| pneumonia | 0.2500 | 0.0000 | 0.2500 | b / a: 0.2500 |" in report


def test_costliest_images_shares_sum_to_one_minus_auroc_on_each_side():
    rng = np.random.default_rng(1)
    n = 60
    targets = np.arange(n) % 3
    probs = rng.dirichlet(np.ones(3), size=n).round(2)  # ties count half
    paths = [f"img{i}.png" for i in range(n)]
    costliest = costliest_images(probs, targets, paths, ["s"] * n, CLASSES, k=n)
    for c, name in enumerate(CLASSES):
        shortfall = 1 - roc_auc_score(targets == c, probs[:, c])
        images = costliest[name]["images"]
        assert costliest[name]["shortfall"] == pytest.approx(shortfall, abs=1e-12)
        for role in ("positive", "negative"):
            assert sum(i["share"] for i in images if i["role"] == role) == pytest.approx(shortfall, abs=1e-12)
        assert [i["share"] for i in images] == sorted((i["share"] for i in images), reverse=True)


def test_one_mislabelled_looking_image_carries_its_share_and_is_named(tmp_path):
    # Four normals and four pneumonias ranked perfectly, and a fifth "normal" that scores like the pneumonias: it
    # outranks 2 of the 4 pneumonias: 2 of the 20 pairs (5 normals x 4 pneumonias), all that is lost
    score = np.array([0.1, 0.2, 0.15, 0.05, 0.85,   0.7, 0.8, 0.9, 0.95])
    frame = pd.DataFrame({"path": [f"/data/site/{i}.png" for i in range(9)], "label": ["normal"] * 5 + ["pneumonia"] * 4,
                          "source": "site", "patient_id": [str(i) for i in range(9)]})
    frame["target"] = [CLASSES.index(label) for label in frame["label"]]
    probs = np.stack([1 - score, score, np.zeros_like(score)], axis=1)
    metrics = write_report(tmp_path, probs, frame, CLASSES)
    top = metrics["costliest_images"]["pneumonia"]["images"][0]
    assert (top["path"], top["role"], top["label"], top["share"]) == ("/data/site/4.png", "negative", "normal",
                                                                      pytest.approx(2 / 20))
    assert "| pneumonia (0.1000) | site/4.png | site | normal | negative | 0.850 | 0.1000 | 100.0% |" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize("evaluated, expected", [
    ("test", "fitted on the val split (n = 40), not on the test split evaluated here."),
    ("val", "fitted on a val split (n = 40), the split evaluated here: if these are the same images, the operating "
            "point was tuned on them and accuracy, precision and recall are optimistic."),
])
def test_report_never_claims_the_operating_point_was_fitted_elsewhere_when_it_may_not_be(evaluated, expected):
    from cxr.evaluation.report import operating_point_lines

    metrics = {"split": evaluated, "temperature": 0.5, "logit_bias": None,
               "calibration_fit": {"method": "temperature", "split": "val", "n": 40}}
    assert operating_point_lines(metrics)[1].endswith(expected)


def test_a_report_on_val_says_the_checkpoint_was_chosen_there():
    from cxr.evaluation.report import selection_lines

    assert "chooses a checkpoint's epoch by its scores on the val split" in " ".join(selection_lines({"split": "val"}))
    assert selection_lines({"split": "test"}) == []


def test_a_wrongly_called_absent_class_costs_precision_and_f1_but_has_no_recall():
    """An external hold-out without tuberculosis: its recall and AUROC are undefined (None, shown as "–"), not 0;
    macro precision and F1 count the wrong call as scikit-learn does, macro recall averages the classes present."""
    from sklearn.metrics import precision_recall_fscore_support

    from cxr.evaluation.metrics import compute_metrics

    targets = np.array([0, 0, 1, 1])
    probs = np.array([[.1, .1, .8], [.9, .05, .05], [.2, .7, .1], [.2, .7, .1]])  # tuberculosis called once, wrongly
    metrics = compute_metrics(probs, targets, ["normal", "pneumonia", "tuberculosis"])
    tb = metrics["per_class"]["tuberculosis"]
    assert (tb["recall"], tb["auroc"], tb["precision"], tb["f1"], tb["support"]) == (None, None, 0.0, 0.0, 0)
    macro = metrics["macro_avg"]
    expected = precision_recall_fscore_support(targets, probs.argmax(1), average="macro", zero_division=0)[:3]
    assert [macro["precision"], macro["f1"]] == pytest.approx([expected[0], expected[2]])
    assert macro["recall"] == pytest.approx((0.5 + 1.0) / 2)
    report = markdown_report(metrics, "hold-out")
    assert "| tuberculosis | 0.0% | – | 0.0% | – | 0 |" in report and "| **Macro avg** | 66.7% | 75.0% | 55.6% |" in report


def test_a_class_neither_present_nor_called_has_no_precision_and_stays_out_of_the_averages():
    from sklearn.metrics import precision_recall_fscore_support

    from cxr.evaluation.metrics import compute_metrics

    targets = np.array([0, 0, 1, 1, 0])
    probs = np.array([[.8, .1, .1], [.6, .3, .1], [.2, .7, .1], [.7, .2, .1], [.4, .5, .1]])
    metrics = compute_metrics(probs, targets, ["normal", "pneumonia", "tuberculosis"])
    assert all(metrics["per_class"]["tuberculosis"][k] is None for k in ("precision", "recall", "f1", "auroc"))
    expected = precision_recall_fscore_support(targets, probs.argmax(1), average=None, zero_division=0)
    for c, name in enumerate(["normal", "pneumonia"]):
        stats = metrics["per_class"][name]
        assert [stats["precision"], stats["recall"], stats["f1"]] == pytest.approx([v[c] for v in expected[:3]])
    assert metrics["macro_avg"]["recall"] == pytest.approx(expected[1][:2].mean())


def test_training_logs_the_evaluation_numbers_and_nothing_for_an_absent_class():
    """torchmetrics' multiclass AUROC scores a class absent from the split 0 and averages it into the macro
    value; validation (which chooses the checkpoint) and the Lightning test report compute_metrics instead."""
    import torch

    from cxr.evaluation.metrics import compute_metrics
    from cxr.models.module import EvaluatedPredictions

    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=40)
    targets = rng.integers(0, 2, size=40)  # no tuberculosis
    predictions = EvaluatedPredictions()
    for part in np.array_split(np.arange(40), 3):
        predictions.update(torch.as_tensor(probs[part]).float(), torch.as_tensor(targets[part]))
    logged = predictions.compute_and_reset(["normal", "pneumonia", "tuberculosis"], "val")
    expected = compute_metrics(probs.astype(np.float32), targets, ["normal", "pneumonia", "tuberculosis"])
    assert logged["val/auroc_macro"] == pytest.approx(expected["macro_auroc"])
    assert logged["val/auroc_macro"] == pytest.approx(np.mean([roc_auc_score(targets == c, probs[:, c]) for c in (0, 1)]),
                                                      abs=1e-6)
    assert logged["val/acc"] == expected["accuracy"] and "val/auroc_tuberculosis" not in logged
    assert "val/recall_tuberculosis" not in logged and logged["val/precision_tuberculosis"] == 0.0
    assert predictions.probs.update_count == 0  # reset for the next epoch


def test_auroc_and_accuracy_keep_float64_precision():
    from cxr.evaluation.metrics import compute_metrics

    probs = np.array([[1 - 2e-9, 1e-9, 1e-9], [1 - 1e-9, 5e-10, 5e-10], [.1, .8, .1]])
    targets = np.array([1, 0, 2])
    metrics = compute_metrics(probs, targets, ["normal", "pneumonia", "tuberculosis"])
    assert metrics["per_class"]["normal"]["auroc"] == roc_auc_score(targets == 0, probs[:, 0]) == 1.0
    near_tie = np.array([[.3, .3 + 1e-9, .4 - 1e-9], [.4, .4 + 1e-9, .2 - 1e-9]])
    assert compute_metrics(near_tie, np.array([1, 1]), ["normal", "pneumonia", "tuberculosis"])["accuracy"] == 0.5


def test_a_ranking_without_one_error_has_auroc_exactly_one():
    """torchmetrics' binary_auroc gave 0.99999994 here (a float32 curve); a report then read 99.99999%."""
    from cxr.evaluation.metrics import compute_metrics

    rng = np.random.default_rng(3)
    positive = rng.random(500) < 0.2
    score = np.where(positive, 0.9 + 0.1 * rng.random(500), 0.9 * rng.random(500))
    probs = np.stack([1 - score, score / 2, score / 2], axis=1)
    metrics = compute_metrics(probs, np.where(positive, 1, 0), ["normal", "pneumonia", "tuberculosis"])
    assert metrics["per_class"]["pneumonia"]["auroc"] == 1.0 and metrics["per_class"]["normal"]["auroc"] == 1.0
    noisy = np.where(rng.random(500) < 0.1, ~positive, positive)
    assert compute_metrics(probs, np.where(noisy, 1, 0), ["normal", "pneumonia", "tuberculosis"])["per_class"][
        "pneumonia"]["auroc"] == pytest.approx(roc_auc_score(noisy, score), abs=1e-12)


def test_a_split_of_one_image_and_a_diverged_network_are_logged_without_a_crash():
    import torch

    from cxr.models.module import EvaluatedPredictions

    one = EvaluatedPredictions()
    one.update(torch.tensor([[0.2, 0.7, 0.1]]), torch.tensor([1]))  # CatMetric gives 0-d tensors back for this
    logged = one.compute_and_reset(CLASSES, "val")
    assert logged["val/acc"] == 1.0 and np.isnan(logged["val/auroc_macro"]) and logged["val/recall_pneumonia"] == 1.0
    diverged = EvaluatedPredictions()
    diverged.update(torch.tensor([[float("nan")] * 3, [0.2, 0.7, 0.1]]), torch.tensor([0, 1]))
    assert all(np.isnan(v) for v in diverged.compute_and_reset(CLASSES, "val").values())


def test_each_value_of_a_subgroup_column_gets_its_own_numbers_and_empty_ones_are_not_given(tmp_path):
    # Pneumonia found on PA films only: the whole-split recall (50%) hides a subgroup at 0%.
    frame = pd.DataFrame({"path": [f"{i}.png" for i in range(8)], "label": ["pneumonia"] * 4 + ["normal"] * 4,
                          "source": ["a"] * 8, "patient_id": [str(i) for i in range(8)],
                          "view": ["PA", "PA", "AP", "AP", "PA", "AP", "", "NA"]})  # NA: unknown too
    frame["target"] = [CLASSES.index(label) for label in frame["label"]]
    called_pneumonia = np.array([1, 1, 0, 0, 0, 0, 0, 0])
    probs = np.stack([1 - called_pneumonia * 0.8 - 0.1, called_pneumonia * 0.8 + 0.05, np.full(8, 0.05)], axis=1)
    metrics = write_report(tmp_path, probs, frame, CLASSES, subgroups=["view"])
    views = metrics["per_subgroup"]["view"]
    assert sorted(views) == ["(not given)", "AP", "PA"]
    assert [views[v]["n"] for v in ("PA", "AP", "(not given)")] == [3, 3, 2]
    assert views["PA"]["per_class"]["pneumonia"]["recall"] == 1.0
    assert views["AP"]["per_class"]["pneumonia"]["recall"] == 0.0
    assert metrics["per_class"]["pneumonia"]["recall"] == 0.5
    # 0 of 2 patients: Wilson's interval, not the bootstrap's 0-0%
    assert views["AP"]["confidence_intervals"]["recall"]["pneumonia"] == pytest.approx([0.0, 0.6576], abs=1e-4)
    report = (tmp_path / "report.md").read_text()
    assert "## Per view" in report and "| AP | 3 | 33.3% (" in report and "| 0.0% (0.0%–65.8% Wilson) |" in report
    table = markdown_report({**metrics, "per_subgroup": {"view": {"AP|lateral": views["AP"]}}}, "t")
    assert "| AP\\|lateral | 3 |" in table  # a "|" inside a value would end its cell
    predictions = pd.read_csv(tmp_path / "predictions.csv", keep_default_na=False)
    assert predictions["view"].tolist() == frame["view"].tolist()


def test_reports_never_round_a_value_into_perfection_and_mark_wilson_intervals(tmp_path):
    # One normal image outranks one of 40 tuberculosis images: TB AUROC 1 - 1/(40 * 60) = 0.99958, not 1.000.
    targets = np.array([2] * 40 + [0] * 30 + [1] * 30)
    probs = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.05, 0.05, 0.9]])[targets]
    probs[0], probs[40] = [0.3, 0.1, 0.6], [0.3, 0.0, 0.7]  # a TB film scored below a normal one (called TB)
    frame = pd.DataFrame({"path": [f"{i}.png" for i in range(100)], "label": [CLASSES[t] for t in targets],
                          "source": ["a"] * 100, "patient_id": [str(i) for i in range(100)], "target": targets})
    metrics = write_report(tmp_path, probs, frame, CLASSES)
    assert metrics["per_class"]["tuberculosis"]["auroc"] == pytest.approx(1 - 1 / (40 * 60))
    report = (tmp_path / "report.md").read_text()
    tb_row = next(line for line in report.splitlines() if line.startswith("| tuberculosis |"))
    assert tb_row.split("|")[5].strip() == "99.96%"  # the AUC column; was 100.0%
    # 30 of 30 pneumonias and 40 of 40 TB found: Wilson's interval (n / (n + z²) to 1), marked; 29 of 30 normals:
    # the bootstrap's
    assert "pneumonia 88.6%–100.0% Wilson, tuberculosis 91.2%–100.0% Wilson." in report, report
    assert re.search(r"recall normal \d+\.\d%–100\.0%, pneumonia", report), report


def test_numbers_get_more_decimals_only_where_rounding_would_reach_a_perfect_or_null_value():
    from cxr.evaluation.formatting import number, percent

    assert (number(0.99987), percent(0.99987), number(0.9876), percent(0.5)) == ("0.9999", "99.99%", "0.988", "50.0%")
    assert (number(1.0), percent(1.0), percent(0.0), number(None)) == ("1.000", "100.0%", "0.0%", "–")
    assert percent(1 / 2500) == "0.04%"  # one image of 2,500 called tuberculosis is not 0.0%
    # one pair of 3,000 x 50,000 ranked the wrong way is still not 1.000 ...
    assert number(1 - 1 / (3000 * 50000)) == "0.99999999"
    # ... but a ratio that is 1 up to float rounding is 100%, not 99.99999999999999%
    assert percent((0.1 + 0.2) / 0.3) == "100.0%" and percent(2.3e-16) == "0.0%"


def test_pneumonia_vs_normal_ranks_images_that_the_model_calls_tuberculosis_with_near_certainty():
    """Both probabilities far below 1e-12 (a tuberculosis logit ~30 above the others): their ratio still ranks."""
    import torch

    from cxr.calibration import Calibration
    from cxr.evaluation.metrics import compute_metrics

    logits = torch.tensor([[-33.0, -31.0, 0.0], [-20.0, -22.0, 0.0]])  # a pneumonia, then a normal
    probs = Calibration().probabilities(logits).numpy()
    assert compute_metrics(probs, np.array([1, 0]), CLASSES)["pneumonia_vs_normal_auroc"] == 1.0


def test_non_finite_probabilities_are_refused_not_ranked():
    from cxr.evaluation.metrics import compute_metrics

    probs = np.array([[np.nan, np.nan, np.nan], [0.1, 0.8, 0.1], [0.8, 0.1, 0.1]])
    with pytest.raises(ValueError, match="1 of 3 images have non-finite probabilities"):
        compute_metrics(probs, np.array([0, 1, 0]), CLASSES)
    assert compute_metrics(np.zeros((0, 3)), np.zeros(0), CLASSES)["accuracy"] is None


def test_the_drawn_roc_curve_encloses_the_auroc_its_legend_gives(tmp_path, monkeypatch):
    """Confident images within 6e-8 of probability 1 tie in float32: the curve must be drawn in float64."""
    import matplotlib.axes
    import torch

    from cxr.calibration import Calibration
    from cxr.evaluation.figures import plot_roc_curves
    from cxr.evaluation.metrics import compute_metrics

    logits = torch.tensor([[0., 20, 0], [0, 22, 0], [0, 24, 0], [0, 26, 0], [0, 21, 0], [5, 0, 0], [6, 0, 0],
                           [0, 0, 7], [0, 0, 8]])
    targets = np.array([1, 1, 1, 1, 0, 0, 0, 2, 2])
    probs = Calibration().probabilities(logits).numpy()
    aurocs = {name: stats["auroc"] for name, stats in compute_metrics(probs, targets, CLASSES)["per_class"].items()}
    assert aurocs["pneumonia"] == pytest.approx(19 / 20)  # the normal at gap 21 outranks only the positive at 20
    drawn = {}
    plot = matplotlib.axes.Axes.plot

    def record(ax, x, y, *args, label=None, **kwargs):
        drawn[label] = (np.asarray(x), np.asarray(y))
        return plot(ax, x, y, *args, label=label, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", record)
    plot_roc_curves(probs, targets, CLASSES, aurocs, tmp_path / "roc.png")
    fpr, tpr = drawn["pneumonia (AUC 0.950)"]
    assert np.trapezoid(tpr, fpr) == pytest.approx(0.95)


def test_calibration_scores_and_their_report_line(tmp_path):
    from cxr.evaluation.metrics import calibration_scores

    probs = np.array([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1]])
    targets = np.array([0, 2])
    scores = calibration_scores(probs, targets)
    # ECE: confidence 0.9 right and 0.7 wrong, each in its own bin: (|1 - 0.9| + |0 - 0.7|) / 2
    assert scores["ece"] == pytest.approx(0.4, abs=1e-6)
    assert scores["brier"] == pytest.approx((0.1 ** 2 + 2 * 0.05 ** 2 + 0.2 ** 2 + 0.7 ** 2 + 0.9 ** 2) / 2)
    assert scores["nll"] == pytest.approx(-(np.log(0.9) + np.log(0.1)) / 2)
    assert calibration_scores(np.eye(3), np.arange(3)) == {"ece": 0.0, "brier": 0.0, "nll": 0.0}
    frame = pd.DataFrame({"path": ["a.png", "b.png"], "label": ["normal", "tuberculosis"], "source": ["s", "s"],
                          "patient_id": ["1", "2"], "target": targets})
    raw = {"accuracy": 0.5, "macro_auroc": 0.5, "recall": dict(zip(CLASSES, (1.0, None, 0.0))),
           "calibration": {"ece": 0.25, "brier": 0.5, "nll": 0.75}}
    metrics = write_report(tmp_path, probs, frame, CLASSES, extra={"temperature": 2.0, "uncalibrated": raw})
    assert metrics["calibration"] == scores
    assert (f"expected calibration error 0.400, Brier score {scores['brier']:.3f}, NLL 1.204; the network's own "
            "softmax: expected calibration error 0.250, Brier score 0.500, NLL 0.750.") in (tmp_path / "report.md").read_text()


def test_written_report_predictions_and_figure_keep_true_rows_predicted_columns_and_patients(tmp_path, monkeypatch):
    """Two normals called pneumonia, none the other way, one TB film called normal and tuberculosis never called:
    every table and the figure must put them where they belong; six images of four patients."""
    import matplotlib.axes

    drawn = {}
    text = matplotlib.axes.Axes.text

    def record(ax, x, y, s, *args, **kwargs):
        drawn[(y, x)] = s  # imshow: x is the column (predicted), y the row (true)
        return text(ax, x, y, s, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "text", record)
    called = [0, 1, 1, 1, 1, 0]
    frame = pd.DataFrame({"path": [f"{i}.png" for i in range(6)],
                          "label": ["normal", "normal", "normal", "pneumonia", "pneumonia", "tuberculosis"],
                          "source": ["a"] * 6, "patient_id": ["p1", "p1", "p2", "p3", "p3", "p4"]})
    frame["target"] = [CLASSES.index(label) for label in frame["label"]]
    probs = np.full((6, 3), 0.1)
    probs[np.arange(6), called] = 0.8
    probs[:, 2] = np.linspace(0.05, 0.1, 6)  # distinct: the columns must not be told apart by value alone
    probs /= probs.sum(axis=1, keepdims=True)
    metrics = write_report(tmp_path, probs, frame, CLASSES)
    assert metrics["confusion_matrix"] == [[1, 2, 0], [0, 2, 0], [1, 0, 0]]
    report = (tmp_path / "report.md").read_text()
    assert "| normal | 1 | 2 | 0 |" in report and "| tuberculosis | 1 | 0 | 0 |" in report
    assert drawn[(0, 1)].startswith("0.67\n(2)") and drawn[(1, 0)].startswith("0.00\n(0)")
    assert drawn[(2, 0)].startswith("1.00\n(1)")
    predictions = pd.read_csv(tmp_path / "predictions.csv")
    assert predictions["predicted"].tolist() == [CLASSES[c] for c in called]
    for c, name in enumerate(CLASSES):
        assert np.allclose(predictions[f"p_{name}"], probs[:, c])
    assert metrics["confidence_intervals"]["patients"] == 4
    # Present but never called: precision 0 (sklearn's zero_division=0), counted in the macro average.
    assert metrics["per_class"]["tuberculosis"]["precision"] == 0.0
    assert metrics["macro_avg"]["precision"] == pytest.approx((1 / 2 + 2 / 4 + 0) / 3)
