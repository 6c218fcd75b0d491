"""One table for a whole sweep: `<sweep folder>/summary.csv`, a row per job as it ends.

A `-m` sweep leaves one run folder per job; comparing them would otherwise mean joining each folder's
.hydra/overrides.yaml and results.json by hand. Jobs are meant to be compared by the validation score
that chose their checkpoint (`selected_score`); the evaluated split's numbers sit beside it, named for
that split, and a failed job keeps its row with the error. A job interrupted and resumed on its own
(`hydra.run.dir=<sweep>/<job> resume=true`) adds its row when it ends.
"""
from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

SUMMARY_FILE = "summary.csv"
COLUMNS = ["job", "status", "overrides", "selected_metric", "selected_score", "eval_split", "eval_accuracy",
           "eval_macro_auroc", "eval_pneumonia_vs_normal_auroc", "fit_minutes", "folder", "error"]


def sweep_folder(mode: RunMode, sweep_dir: str, run_folder: Path) -> Path | None:
    """The sweep a run belongs to: the one running it, or, for one job resumed on its own, the folder above it."""
    if mode == RunMode.MULTIRUN:
        return Path(sweep_dir)
    if (run_folder.parent / "multirun.yaml").exists():
        return run_folder.parent
    return None


def summary_row(config: DictConfig, job_return: JobReturn) -> dict:
    folder = Path(config.paths.output_dir)
    job = config.hydra.job.num if config.hydra.mode == RunMode.MULTIRUN else folder.name  # resumed: its folder
    row = {"job": job, "overrides": " ".join(job_return.overrides or []), "folder": str(folder),
           "status": "completed" if job_return.status == JobStatus.COMPLETED else "failed"}
    if job_return.status != JobStatus.COMPLETED:
        error = job_return._return_value
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        row["error"] = f"{type(error).__name__}: {message}" if message else type(error).__name__
    results_file = folder / "results.json"
    if results_file.is_file():
        results = json.loads(results_file.read_text())
        selection, evaluated = results.get("selection") or {}, results.get("eval") or {}
        row.update({"selected_metric": selection.get("monitor"), "selected_score": selection.get("best"),
                    "eval_split": config.data.get("split") if evaluated else None,
                    "eval_accuracy": evaluated.get("accuracy"), "eval_macro_auroc": evaluated.get("macro_auroc"),
                    "eval_pneumonia_vs_normal_auroc": evaluated.get("pneumonia_vs_normal_auroc"),
                    "fit_minutes": round(results["fit_seconds"] / 60, 2)})
    return row


class SweepSummary(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        path = Path(config.hydra.sweep.dir) / SUMMARY_FILE
        if path.exists():  # a sweep folder reused after every job of it failed: those rows are not this sweep's
            earlier = path.with_name(f"{path.stem}.before-{time.strftime('%Y%m%d-%H%M%S')}{path.suffix}")
            path.rename(earlier)
            print(f"the earlier sweep's {SUMMARY_FILE} in this folder is now {earlier.name}", file=sys.stderr)
        print(f"each job is summarised in {path} as it ends", file=sys.stderr)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs) -> None:
        sweep = sweep_folder(config.hydra.mode, config.hydra.sweep.dir, Path(config.paths.output_dir))
        if sweep is None:
            return
        path = sweep / SUMMARY_FILE
        new = not path.exists()
        with path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS)
            if new:
                writer.writeheader()
            writer.writerow(summary_row(config, job_return))
