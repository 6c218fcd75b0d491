"""Write a results card for one experiment from its runs' output folders.

    python experiments/make_card.py NAME --command "cxr-train experiment=NAME" \
        --run logs/exp/NAME [--holdout nih-cxr8=logs/exp/NAME-no-nih] [--holdout kermany=logs/exp/NAME-no-kermany]

Copies the figures next to the card (experiments/NAME/) and puts the test table beside the
reference report's Table 4.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from cxr.evaluation.formatting import number, percent
from cxr.evaluation.report import (costliest_image_lines, format_interval, group_table_lines, interval_lines,
                                   operating_point_lines, shortfall_lines, subgroup_lines)

REFERENCE_TABLE4 = {  # the reference technical report, Table 4 (its own test set of 2,569 images)
    "normal": (0.648, 0.804, 0.718, 0.840, 925),
    "pneumonia": (0.775, 1.000, 0.873, 0.987, 580),
    "tuberculosis": (0.975, 0.617, 0.755, 0.897, 1064),
    "macro": (0.799, 0.807, 0.782, 0.908, 2569),
}
REFERENCE_ACCURACY = 0.771


def side_by_side(metrics: dict) -> list[str]:
    lines = ["| Class | Precision | Recall | F1 | AUC | Support | Reference P / R / F1 / AUC (support) |",
             "|---|---|---|---|---|---|---|"]
    for name in metrics["classes"]:
        c = metrics["per_class"][name]
        r = REFERENCE_TABLE4[name]
        lines.append(f"| {name} | {percent(c['precision'])} | {percent(c['recall'])} | {percent(c['f1'])} | {percent(c['auroc'])} | "
                     f"{c['support']} | {percent(r[0])} / {percent(r[1])} / {percent(r[2])} / {percent(r[3])} ({r[4]}) |")
    m, r = metrics["macro_avg"], REFERENCE_TABLE4["macro"]
    lines.append(f"| **Macro avg** | {percent(m['precision'])} | {percent(m['recall'])} | {percent(m['f1'])} | {percent(metrics['macro_auroc'])} | "
                 f"{metrics['n']} | {percent(r[0])} / {percent(r[1])} / {percent(r[2])} / {percent(r[3])} ({r[4]}) |")
    lines.append(f"| **Accuracy** | | | | | | {percent(REFERENCE_ACCURACY)} → here **{percent(metrics['accuracy'])}** |")
    return lines


def wall_time(results: dict) -> str:
    if "soup" in results:  # cxr-soup: its members' fits, then the averaging and selection
        runs = list(results["run_fit_seconds"].values())
        fits = ("one training run" if len(runs) == 1
                else f"{len(runs)} training runs: " + ", ".join(f"{seconds / 60:.1f}" for seconds in runs) + " min")
        step = "to assemble the ensemble" if results["soup"]["method"] == "ensemble" else "to select and average"
        return (f"Wall time: {results['fit_seconds'] / 60:.1f} min of fitting ({fits}), then "
                f"{results['soup_seconds'] / 60:.1f} min {step}")
    return (f"Wall time (fit): {results['fit_seconds'] / 60:.1f} min for {results.get('epochs', '?')} epochs; "
            f"train throughput {results['train_images_per_second']:.1f} images/s")


def at_code(results: dict) -> str:
    """Where a rerun of the command replays this run: the same seed at other code can be a new draw."""
    code = results.get("code")
    if not code:
        return ""
    return f" at commit `{code['commit'][:10]}`" + (" with uncommitted changes" if code["modified"] else "")


def load(run: Path, eval_dir: str = "eval") -> tuple[dict, dict]:
    return json.loads((run / eval_dir / "metrics.json").read_text()), json.loads((run / "results.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("name")
    parser.add_argument("--command", required=True)
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--holdout", action="append", default=[], help="SOURCE=RUN_DIR")
    parser.add_argument("--holdout-command", action="append", default=[])
    parser.add_argument("--eval-dir", default="eval", help="evaluation folder inside every run given (e.g. a cxr-eval of a recalibrated checkpoint)")
    parser.add_argument("--notes", default="")
    args = parser.parse_args()
    out = Path(__file__).parent / args.name
    out.mkdir(parents=True, exist_ok=True)
    metrics, results = load(args.run, args.eval_dir)
    for figure in ("confusion_matrix.png", "roc_curves.png"):
        shutil.copy(args.run / args.eval_dir / figure, out / figure)
    lines = [f"# {args.name}", "", "```bash", args.command, *args.holdout_command, "```", "",
             f"- {wall_time(results)}; test inference {metrics['images_per_second']:.1f} images/s "
             "(this machine: 2 CPU cores, no GPU).",
             f"- Test split of `../shared/data/cxr` (patient-grouped): n = {metrics['n']}. "
             f"Accuracy **{percent(metrics['accuracy'])}**, macro AUROC **{number(metrics['macro_auroc'])}**, "
             f"tuberculosis recall **{percent(metrics['per_class']['tuberculosis']['recall'])}**, "
             f"pneumonia-vs-normal AUROC {number(metrics['pneumonia_vs_normal_auroc'])}.",
             f"- Checkpoint SHA-256 `{metrics['checkpoint_sha256'][:16]}…` (not committed; rerun the command{at_code(results)}).",
             *interval_lines(metrics), *operating_point_lines(metrics), "", args.notes, "", "## Test split, beside the reference report's Table 4", "",
             "The reference numbers are on the report's own 2,569-image test set, not on this data.", "",
             *side_by_side(metrics), "", "![confusion matrix](confusion_matrix.png) ![ROC curves](roc_curves.png)", "",
             *group_table_lines("Per source (in-distribution test split)", "Source", metrics["per_source"], metrics["classes"]),
             *subgroup_lines(metrics), *shortfall_lines(metrics), *costliest_image_lines(metrics), ""]
    if args.holdout:
        lines += ["## Cross-source: trained without a source, tested on all of its images", "",
                  "| Held out | n | Pneumonia-vs-normal AUROC (95% CI) | called normal | called pneumonia | called tuberculosis | accuracy |",
                  "|---|---|---|---|---|---|---|"]
        for item in args.holdout:
            source, run = item.split("=", 1)
            h, _ = load(Path(run), args.eval_dir)
            called = " | ".join(percent(h["per_class"][c]["called"]) for c in h["classes"])
            ci = (h.get("confidence_intervals") or {}).get("pneumonia_vs_normal_auroc")
            pvn = number(h["pneumonia_vs_normal_auroc"]) + (f" ({format_interval(ci, number)})" if ci else "")
            lines.append(f"| {source} | {h['n']} | {pvn} | {called} | {percent(h['accuracy'])} |")
        lines.append("")
    (out / "README.md").write_text("\n".join(lines))
    print(out / "README.md")


if __name__ == "__main__":
    main()
