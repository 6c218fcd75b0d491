"""Write an evaluation: metrics.json, report.md, predictions.csv and the figures, into one folder."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from cxr.data.index import blank_missing
from cxr.evaluation.figures import plot_confusion_matrix, plot_feature_distances, plot_roc_curves
from cxr.evaluation.metrics import auroc_shortfall_by_source, compute_metrics, costliest_images, metrics_by_group
from cxr.evaluation.formatting import decimals, number, percent
from cxr.evaluation.uncertainty import bootstrap_intervals

NOT_GIVEN = "(not given)"  # the subgroup of images whose manifest leaves that column empty


def format_interval(interval: list[float] | None, fmt) -> str:
    return "–" if interval is None else f"{fmt(interval[0])}–{fmt(interval[1])}"


def proportion_interval(ci: dict, key: str) -> str:
    """A proportion's interval ("accuracy", "recall.<class>"), marked where it is Wilson's, not the bootstrap's."""
    interval = ci["accuracy"] if key == "accuracy" else ci["recall"][key.removeprefix("recall.")]
    return format_interval(interval, percent) + (" Wilson" if key in ci.get("wilson", ()) else "")


def interval_lines(metrics: dict) -> list[str]:
    ci = metrics.get("confidence_intervals")
    if not ci:
        return []
    recalls = ", ".join(f"{name} {proportion_interval(ci, f'recall.{name}')}" for name in ci["recall"])
    kept = ci.get("macro_auroc_resamples", ci["resamples"])
    kept_text = f" from the {kept} resamples holding every class" if kept < ci["resamples"] else ""
    wilson_text = ("; marked Wilson: every patient right (or every one wrong), where the bootstrap can only say "
                   "100–100%, so Wilson's score interval over those patients" if ci.get("wilson") else "")
    return ["", f"{100 * ci['confidence']:.0f}% confidence intervals ({ci['method']}: {ci['patients']} patients, "
                f"{ci['resamples']} resamples{wilson_text}): accuracy {proportion_interval(ci, 'accuracy')}; macro AUROC "
                f"{format_interval(ci['macro_auroc'], number)}{kept_text}; pneumonia-vs-normal AUROC "
                f"{format_interval(ci['pneumonia_vs_normal_auroc'], number)}; recall {recalls}."]


def selection_lines(metrics: dict) -> list[str]:
    if metrics.get("split") != "val":
        return []
    return ["", "cxr-train chooses a checkpoint's epoch by its scores on the val split: if these are the same images, "
                "every figure here is optimistic."]


def operating_point_lines(metrics: dict) -> list[str]:
    fit, raw = metrics.get("calibration_fit"), metrics.get("uncalibrated")
    if not fit and not raw:
        return []
    bias = metrics.get("logit_bias")
    bias_text = ", logit bias " + ", ".join(f"{name} {value:+.2f}" for name, value in bias.items()) if bias else ""
    method = fit["method"] if fit else "not fitted by cxr"
    if not fit:
        where = "the checkpoint does not record where it came from."
    elif "evaluated_images_in_fit" in fit:
        overlap = fit["evaluated_images_in_fit"]
        where = (f"fitted on the {fit['split']} split (n = {fit['n']}), " + (
            f"which holds {overlap} of the {metrics['n']} images evaluated here: the operating point was tuned on "
            "them, so accuracy, precision and recall are optimistic." if overlap else
            f"none of the images of the {metrics.get('split')} split evaluated here."))
    elif fit["split"] == metrics.get("split"):
        where = (f"fitted on a {fit['split']} split (n = {fit['n']}), the split evaluated here: if these are the same "
                 "images, the operating point was tuned on them and accuracy, precision and recall are optimistic.")
    else:
        where = (f"fitted on the {fit['split']} split (n = {fit['n']}), not on the {metrics.get('split')} split "
                 "evaluated here.")
    lines = ["", f"Operating point ({method}): temperature {metrics['temperature']:.3f}{bias_text}; {where}"]
    if raw:
        recalls = ", ".join(f"{name} {percent(value)}" for name, value in raw["recall"].items())
        lines.append(f"The network's own softmax (no temperature, no bias): accuracy {percent(raw['accuracy'])}; "
                     f"macro AUROC {number(raw['macro_auroc'])}; recall {recalls}.")
    return lines


def calibration_lines(metrics: dict) -> list[str]:
    """Whether the probabilities can be read as probabilities on these images, beside the network's own when an
    operating point was applied: the fit on another split is only worth keeping if it helps here too."""
    if not metrics.get("calibration"):
        return []

    def scores(c: dict) -> str:
        return f"expected calibration error {c['ece']:.3f}, Brier score {c['brier']:.3f}, NLL {c['nll']:.3f}"

    raw = (metrics.get("uncalibrated") or {}).get("calibration")
    return ["", f"Calibration on these images (lower is better; ECE over 15 equal-width bins of the top class's "
                f"probability): {scores(metrics['calibration'])}"
            + (f"; the network's own softmax: {scores(raw)}." if raw else ".")]


def group_table_lines(heading: str, key: str, groups: dict, classes: list[str]) -> list[str]:
    """One row per group (a source, or a value of a subgroup column), 95% patient-bootstrap intervals in brackets."""
    lines = ["", f"## {heading}", "", "95% intervals over patients in brackets (bootstrap; Wilson where marked).", "",
             f"| {key} | n | Accuracy | Pneumonia-vs-normal AUROC | " + " | ".join(f"recall {c}" for c in classes) + " | "
             + " | ".join(f"called {c}" for c in classes) + " |",
             "|---|---|---|---|" + "---|" * (2 * len(classes))]
    for group, g in groups.items():
        ci = g.get("confidence_intervals")

        def cell(value: float | None, key: str) -> str:
            fmt = number if key == "pneumonia_vs_normal_auroc" else percent
            if value is None or ci is None:  # no interval at all for a group of one patient
                return fmt(value)
            if key != "pneumonia_vs_normal_auroc":
                return f"{fmt(value)} ({proportion_interval(ci, key)})"
            interval = ci[key]
            return f"{fmt(value)} ({format_interval(interval, fmt) if interval else 'no interval'})"

        recalls = " | ".join(cell(g["per_class"][c]["recall"], f"recall.{c}") for c in classes)
        called = " | ".join(percent(g["per_class"][c]["called"]) for c in classes)
        cell_name = str(group).replace("|", "\\|")  # a value's own "|" would end its table cell
        lines.append(f"| {cell_name} | {g['n']} | {cell(g['accuracy'], 'accuracy')} | "
                     f"{cell(g['pneumonia_vs_normal_auroc'], 'pneumonia_vs_normal_auroc')} | {recalls} | {called} |")
    return lines


def subgroup_lines(metrics: dict) -> list[str]:
    """A table per `data.subgroups` column."""
    return [line for column, groups in (metrics.get("per_subgroup") or {}).items()
            for line in group_table_lines(f"Per {column}", column, groups, metrics["classes"])]


def shortfall_lines(metrics: dict) -> list[str]:
    """The "Where AUROC is lost" section, when the images come from several sources."""
    shortfall = metrics.get("auroc_shortfall_by_source")
    if not shortfall:
        return []
    lines = ["", "## Where AUROC is lost", "",
             "Share of each class's (positive, negative) pairs ranked the wrong way (= 1 − AUROC), split by "
             "whether the two images come from the same source or from different ones.", "",
             "| Class | 1 − AUROC | within a source | across sources | largest part (positive source / negative source) |",
             "|---|---|---|---|---|"]
    for name, s in shortfall.items():
        top = s["pairs"][0] if s["pairs"] else None
        largest = f"{top['positive_source']} / {top['negative_source']}: {decimals(top['share'], 4)}" if top else "–"
        lines.append(f"| {name} | {decimals(s['shortfall'], 4)} | {decimals(s['within_source'], 4)} | "
                     f"{decimals(s['across_sources'], 4)} | {largest} |")
    return lines


def costliest_image_lines(metrics: dict) -> list[str]:
    """The "Images that cost the most AUROC" section."""
    costliest = {name: c for name, c in (metrics.get("costliest_images") or {}).items() if c["images"]}
    if not costliest:
        return []
    lines = ["", "## Images that cost the most AUROC", "",
             "Each image's share of its class's (positive, negative) pairs ranked the wrong way; the positives' shares "
             "sum to 1 − AUROC, and so do the negatives'. Review these (label noise, unusual acquisitions) before "
             "reading a small AUROC difference.", "",
             "| Class (1 − AUROC) | Image | Source | True label | Role | Score | Share | Of 1 − AUROC |",
             "|---|---|---|---|---|---|---|---|"]
    for name, c in costliest.items():
        for image in c["images"]:
            lines.append(f"| {name} ({decimals(c['shortfall'], 4)}) | {'/'.join(Path(image['path']).parts[-2:])} | "
                         f"{image['source']} | {image['label']} | {image['role']} | {decimals(image['score'], 3)} | "
                         f"{decimals(image['share'], 4)} | "
                         f"{percent(image['share'] / c['shortfall'])} |")
    return lines


def unlike_training_summary(distances: np.ndarray, fit: dict, correct: np.ndarray, sources: np.ndarray) -> dict:
    """The share of images beyond the checkpoint's feature-distance threshold, overall and per source, and how
    often the model is right on those images and on the rest."""
    flagged = distances > fit["threshold"]

    def share(rows: np.ndarray) -> dict:
        right_flagged, right_rest = correct[rows & flagged], correct[rows & ~flagged]
        return {"n": int(rows.sum()), "flagged": float(flagged[rows].mean()),
                "accuracy_flagged": float(right_flagged.mean()) if right_flagged.size else None,
                "accuracy_not_flagged": float(right_rest.mean()) if right_rest.size else None}
    return {"threshold": fit["threshold"], "pass_rate": fit["pass_rate"], "fit_split": fit["split"],
            **share(np.ones(len(distances), bool)),
            "by_source": {str(source): share(sources == source) for source in np.unique(sources)}}


def unlike_training_lines(metrics: dict) -> list[str]:
    """The "Unlike the training data" section, for a checkpoint with a feature distance fitted."""
    unlike = metrics.get("unlike_training")
    if not unlike:
        return []
    expected = 1 - unlike["pass_rate"]
    same = (" That is the name of the split evaluated here: if these are the same images, the share is about that "
            "by construction."
            if unlike["fit_split"] == metrics.get("split") else "")
    lines = ["", "## Unlike the training data", "",
             f"Flagged: images whose features lie farther from the training images' than {percent(unlike['pass_rate'])} of "
             f"the {unlike['fit_split']} split's do (squared Mahalanobis feature distance > {unlike['threshold']:.1f}). About "
             f"{percent(expected)} of images like the {unlike['fit_split']} split's are flagged.{same} A much larger share "
             "means these images differ from what the model was trained on (another hospital, scanner, population): "
             "its numbers may not hold on them. cxr-serve marks flagged images needs_review (unlike_training_data). "
             "feature_distance.png shows each source's distances against the threshold.", "",
             "| Source | n | Flagged | Accuracy, flagged | Accuracy, not flagged |", "|---|---|---|---|---|"]
    for source, s in [*unlike["by_source"].items(), ("**all**", unlike)]:
        cell_name = str(source).replace("|", "\\|")
        lines.append(f"| {cell_name} | {s['n']} | {percent(s['flagged'])} | "
                     f"{percent(s['accuracy_flagged'])} | {percent(s['accuracy_not_flagged'])} |")
    return lines


def markdown_report(metrics: dict, title: str) -> str:
    lines = [f"# {title}", "", f"n = {metrics['n']} images; accuracy {percent(metrics['accuracy'])}; "
             f"macro AUROC {number(metrics['macro_auroc'])}; pneumonia-vs-normal AUROC {number(metrics['pneumonia_vs_normal_auroc'])}", "",
             "| Class | Precision | Recall | F1 | AUC | Support |", "|---|---|---|---|---|---|"]
    for name in metrics["classes"]:
        c = metrics["per_class"][name]
        lines.append(f"| {name} | {percent(c['precision'])} | {percent(c['recall'])} | {percent(c['f1'])} | {percent(c['auroc'])} | {c['support']} |")
    m = metrics["macro_avg"]
    lines.append(f"| **Macro avg** | {percent(m['precision'])} | {percent(m['recall'])} | {percent(m['f1'])} | "
                 f"{percent(metrics['macro_auroc'])} | {metrics['n']} |")
    lines += interval_lines(metrics)
    lines += selection_lines(metrics)
    lines += operating_point_lines(metrics)
    lines += calibration_lines(metrics)
    lines += ["", "Confusion matrix (rows = true, columns = predicted):", "",
              "| true \\ predicted | " + " | ".join(metrics["classes"]) + " |",
              "|---|" + "---|" * len(metrics["classes"])]
    for name, row in zip(metrics["classes"], metrics["confusion_matrix"]):
        lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
    if metrics.get("per_source"):
        lines += group_table_lines("Per source", "Source", metrics["per_source"], metrics["classes"])
    lines += unlike_training_lines(metrics)
    lines += subgroup_lines(metrics)
    lines += shortfall_lines(metrics)
    lines += costliest_image_lines(metrics)
    return "\n".join(lines) + "\n"


def subgroup_values(column: pd.Series) -> np.ndarray:
    """A subgroup column's values, every way of writing "unknown" (empty, NA, null, ...) as NOT_GIVEN."""
    return blank_missing(column).replace("", NOT_GIVEN).to_numpy()


def metrics_by_group_with_intervals(probs: np.ndarray, targets: np.ndarray, groups: np.ndarray, patients: np.ndarray,
                                    class_names: list[str]) -> dict:
    """metrics_by_group, each group with its own patient-bootstrap confidence intervals."""
    by_group = metrics_by_group(probs, targets, groups, class_names)
    for name, metrics in by_group.items():
        rows = groups == name
        metrics["confidence_intervals"] = bootstrap_intervals(probs[rows], targets[rows], patients[rows], class_names)
    return by_group


def write_report(out_dir: str | Path, probs: np.ndarray, frame: pd.DataFrame, class_names: list[str],
                 title: str = "Evaluation", extra: dict | None = None, subgroups: Sequence[str] = (),
                 feature_distances: tuple[np.ndarray, dict] | None = None) -> dict:
    """`frame` has one row per image (columns path, label, source, patient_id, target, and the `subgroups`
    columns) in the order of `probs`; images without a patient id count as their own patient in the
    confidence intervals. `feature_distances`: each image's feature distance and the checkpoint's record of
    its fit (spec["feature_distance"]), for the share of images unlike the training data."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    targets = frame["target"].to_numpy()
    metrics = compute_metrics(probs, targets, class_names)
    sources = frame["source"].astype(str).to_numpy()
    patients = frame["patient_id"].astype(str).where(frame["patient_id"].astype(str) != "", frame["path"].astype(str)).to_numpy()
    metrics["per_source"] = metrics_by_group_with_intervals(probs, targets, sources, patients, class_names)
    metrics["per_subgroup"] = {
        column: metrics_by_group_with_intervals(probs, targets, subgroup_values(frame[column]), patients, class_names)
        for column in subgroups}
    metrics["auroc_shortfall_by_source"] = auroc_shortfall_by_source(probs, targets, sources, class_names)
    metrics["costliest_images"] = costliest_images(probs, targets, frame["path"].astype(str).to_numpy(), sources,
                                                   class_names)
    metrics["confidence_intervals"] = bootstrap_intervals(probs, targets, patients, class_names)
    if feature_distances is not None:
        metrics["unlike_training"] = unlike_training_summary(feature_distances[0], feature_distances[1],
                                                             probs.argmax(axis=1) == targets, sources)
    metrics.update(extra or {})
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out_dir / "report.md").write_text(markdown_report(metrics, title))
    predictions = frame[["path", "label", "source", *subgroups]].copy()
    for c, name in enumerate(class_names):
        predictions[f"p_{name}"] = probs[:, c]
    predictions["predicted"] = [class_names[i] for i in probs.argmax(axis=1)]
    if feature_distances is not None:
        distances, fit = feature_distances
        predictions["feature_distance"] = distances
        predictions["unlike_training"] = distances > fit["threshold"]
        reference = ((f"{fit['split']} split, where the threshold was set (n = {fit['n']})", fit["split_percentiles"])
                     if fit.get("split_percentiles") is not None else None)  # older fits did not record them
        plot_feature_distances(distances, sources, fit["threshold"], out_dir / "feature_distance.png",
                               f"{title}: feature distance per source", reference)
    predictions.to_csv(out_dir / "predictions.csv", index=False)
    plot_confusion_matrix(metrics["confusion_matrix"], class_names, out_dir / "confusion_matrix.png", f"{title}: confusion matrix")
    plot_roc_curves(probs, targets, class_names, {n: metrics["per_class"][n]["auroc"] for n in class_names},
                    out_dir / "roc_curves.png", f"{title}: one-vs-rest ROC")
    return metrics
