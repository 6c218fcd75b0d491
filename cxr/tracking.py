"""Experiment tracking shared by the entry points: loggers (CSV, W&B) built from the `logger` config, named
and grouped after the run, and the numbers and figures a finished run or evaluation puts on the dashboard."""
from __future__ import annotations

import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from cxr.config import PROJECT_ROOT, ConfigError


def instantiate_loggers(cfg: DictConfig, **overrides) -> list:
    return [instantiate(c, **{**wandb_identity(c, cfg), **(overrides if is_wandb(c) else {})})
            for c in (cfg.get("logger") or {}).values() if c is not None]


def is_wandb(logger_cfg: DictConfig) -> bool:
    return str(logger_cfg.get("_target_", "")).endswith("WandbLogger")


def log_config_to(loggers: list, cfg: DictConfig) -> None:
    """The first thing a run logs, so where a W&B run cannot start (online without an API key) it stops here,
    with what to do, before the fit."""
    for logger in loggers:
        try:
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        except Exception as exc:
            if not type(exc).__module__.startswith("wandb"):
                raise
            raise ConfigError(f"W&B could not start the run ({type(exc).__name__}: {str(exc).strip()}): to log online "
                              "run `wandb login` or set WANDB_API_KEY; or log offline (unset CXR_WANDB_OFFLINE, the "
                              "default) and `wandb sync` the run later") from exc


def wandb_identity(logger_cfg: DictConfig, cfg: DictConfig) -> dict:
    """A W&B run's name and group where its config leaves them null: the name lists the command-line overrides
    that make this run what it is (the task name without any); the group is the sweep's folder (every job of
    one sweep, and a job resumed later) or the task and the run's folder (a run and its resumed part)."""
    from hydra.core.hydra_config import HydraConfig

    from cxr.sweep import sweep_folder

    if not is_wandb(logger_cfg) or not HydraConfig.initialized():
        return {}
    hydra_cfg = HydraConfig.get()
    bookkeeping = ("hydra.", "paths.", "logger", "num_threads", "resume", "trainer.enable_progress_bar")
    overrides = [o for o in hydra_cfg.overrides.task if not o.lstrip("+~").startswith(bookkeeping)]
    folder = Path(cfg.paths.output_dir)  # the run's own folder, which its resumed part is given again
    sweep = sweep_folder(hydra_cfg.mode, hydra_cfg.sweep.dir, folder)
    group = f"multirun/{sweep.name}" if sweep else f"{cfg.task_name}/{folder.name}"
    identity = {"name": " ".join(overrides) or cfg.task_name, "group": group}
    return {key: value for key, value in identity.items() if logger_cfg.get(key) is None}


def headline(metrics: dict) -> dict:
    """The numbers of an evaluation (metrics.json) that results.json and the dashboard carry."""
    out = {k: metrics[k] for k in ("n", "accuracy", "macro_auroc", "pneumonia_vs_normal_auroc")}
    out.update({k: metrics[k] for k in ("calibration", "uncalibrated") if k in metrics})
    return out


def run_summary(results: dict, split: str) -> dict:
    """A run's headline numbers for the dashboard: the validation score that chose the checkpoint (what to
    compare runs by) and the evaluated split's numbers, each named for its split."""
    summary = {}
    if selection := results.get("selection"):
        summary[f"summary/selected_{selection['monitor'].replace('/', '_')}"] = selection["best"]
    evaluated = dict(results.get("eval") or {})
    uncalibrated = {k: v for k, v in evaluated.pop("uncalibrated", {}).items() if k != "recall"}
    summary.update(flat_numbers(evaluated, f"summary/{split}_"))
    summary.update(flat_numbers(uncalibrated, f"summary/{split}_uncalibrated_"))
    return {k: v for k, v in summary.items() if v is not None}


def flat_numbers(values: dict, prefix: str) -> dict:
    """One key per number, `{"calibration": {"ece": x}}` as `<prefix>calibration_ece`: a CSV column holds numbers,
    not a dict's text."""
    flat = {}
    for key, value in values.items():
        flat.update(flat_numbers(value, f"{prefix}{key}_") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat


EVAL_FIGURES = (("confusion_matrix", "rows = true class"), ("roc_curves", "one-vs-rest"),
                ("feature_distance", "per source, against the unlike-the-training-data threshold"))


def log_results(loggers: list, summary: dict, eval_dir: Path | None, split: str) -> None:
    """`summary` to every logger, and the evaluation's figures in `eval_dir` to those that take images (W&B),
    one key each (W&B shows one image size per key); then close them."""
    for logger in loggers:
        logger.log_metrics(summary)
        if eval_dir is not None and hasattr(logger, "log_image"):
            for name, caption in EVAL_FIGURES:
                figure = eval_dir / f"{name}.png"
                if figure.is_file():  # feature_distance only where the checkpoint has one fitted
                    logger.log_image(f"eval/{name}", [str(figure)], caption=[f"{caption} ({split} split)"])
        logger.finalize("success")


@contextmanager
def wandb_run_finished():
    """Close the W&B run when the block ends, marked failed if it raised: Lightning's WandbLogger.finalize leaves
    it open, and the next job of a sweep would log into it."""
    try:
        yield
    except BaseException:
        _finish_wandb_run(exit_code=1)
        raise
    _finish_wandb_run(exit_code=0)


def _finish_wandb_run(exit_code: int) -> None:
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish(exit_code=exit_code)


def code_version(root: Path = PROJECT_ROOT) -> dict | None:
    """The git commit of the code that ran and whether tracked files differed from it, or None outside a git
    checkout (an installed wheel). A seeded run replays exactly only at the same code: later changes to a
    random stream (augmentation, sampling, initialisation) make the same seed a new draw."""
    if not (root / ".git").exists():  # else git would answer for whatever repository encloses site-packages
        return None

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30,
                              check=True).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"),
                "modified": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return None
