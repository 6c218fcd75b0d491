"""cxr-train: fit a classifier, then evaluate its best checkpoint on the test split.

    cxr-train                                   # embedded synthetic data, a few minutes on CPU
    cxr-train experiment=lite0_harmonized       # real data, see configs/experiment/
    cxr-train -m experiment=... model.dropout=0.2,0.3
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig

from cxr.checkpoint import TRAIN_FINGERPRINTS
from cxr.config import (CONFIG_DIR, ConfigError, configure_threads, instantiate_datamodule, instantiate_model,
                        log_config, used_run_folder, user_errors)
from cxr.evaluation.evaluate import evaluate
from cxr.evaluation.fit_feature_distance import check_feature_distance_config, fit_feature_distance_checkpoint
from cxr.evaluation.recalibrate import check_calibration_plan, recalibrate_checkpoint
from cxr.inference import load_classifier
from cxr.models.backbone import input_mismatch
from cxr.models.unfreeze import ProgressiveUnfreezing
from cxr.resume import (RESUME_CHECKPOINT, RecordRunConfig, check_resume, check_same_data, keep_earlier_curves,
                        resume_point_last)
from cxr.run_checks import check_model_selection, check_run_settings
from cxr.tracking import (code_version, headline, instantiate_loggers, log_config_to, log_results, run_summary,
                          wandb_run_finished)

log = logging.getLogger("cxr.train")


def train(cfg: DictConfig) -> dict:
    if cfg.get("experiment"):
        raise ConfigError(f"the experiment's settings landed under `experiment:` ({sorted(cfg.experiment)}) instead of "
                          "replacing the defaults: its file must begin with the line `# @package _global_`, as those "
                          "in configs/experiment/ do")
    check_run_settings(cfg)
    configure_threads(cfg)
    L.seed_everything(cfg.seed, workers=True)
    out_dir = Path(cfg.paths.output_dir)
    best = out_dir / "checkpoints" / "best.ckpt"
    # Also checked before Hydra writes there (RefuseUsedRunFolder); here for callers of this function.
    resume_from = out_dir / RESUME_CHECKPOINT if cfg.get("resume") else None
    first_epoch, interrupted_data = check_resume(out_dir, cfg) if resume_from else (0, {})
    if not resume_from and (reason := used_run_folder(out_dir)):
        raise FileExistsError(f"{reason}; choose a new hydra.run.dir=")
    preprocessing = instantiate(cfg.preprocess)
    datamodule = instantiate_datamodule(cfg, preprocessing)
    test_after_fit = cfg.get("test_after_fit", True)
    # Decode every image now: a missing or broken file stops the run here, with its path, not after the fit.
    datamodule.setup(None if test_after_fit else "fit")
    data_summary = {**datamodule.summary(), TRAIN_FINGERPRINTS: sorted(datamodule.fingerprints("train"))}
    if resume_from:
        check_same_data(interrupted_data, data_summary)
    calibration = cfg.get("calibration") or {"method": "none"}
    # Every split that will choose or measure the model must hold none of its training images: checked now,
    # not after the fit (a refit trains on val, and then must not calibrate there).
    held_out = ({"val", datamodule.split} if test_after_fit else {"val"}) - set(datamodule.train_splits)
    check_calibration_plan(calibration, datamodule, datamodule.split if test_after_fit else None, "run")
    feature_distance = cfg.get("feature_distance")
    if feature_distance:
        check_feature_distance_config(datamodule, feature_distance.split, float(feature_distance.pass_rate),
                                      datamodule.split if test_after_fit else None)
    for split in sorted(held_out | ({calibration["split"]} if calibration["method"] != "none" else set())
                        | ({feature_distance.split} if feature_distance else set())):
        datamodule.check_unseen(split, data_summary, whose="the model", before_training=True)
    model = instantiate_model(cfg, datamodule, preprocessing)
    model.data_summary = data_summary
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    pretrained = str(cfg.model.get("pretrained", "none"))
    if problem := input_mismatch(pretrained, model.net, preprocessing.mean, preprocessing.std):
        log.warning(problem)
    if pretrained == "none" and any(isinstance(c, ProgressiveUnfreezing) for c in callbacks):
        log.warning("model.pretrained=none with progressive unfreezing: the randomly initialised backbone stays frozen "
                    "for the first epochs; to train from scratch, switch unfreezing off (~callbacks.unfreeze)")
    callbacks.append(RecordRunConfig(cfg))
    check_model_selection(callbacks, datamodule, best.stem, datamodule.split if test_after_fit else None)
    loggers = instantiate_loggers(cfg)
    if not loggers:  # logger=none: nothing to log learning rates to, and Lightning refuses the monitor
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    if resume_from:
        keep_earlier_curves(loggers, first_epoch)
    log_config_to(loggers, cfg)
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=resume_point_last(callbacks), logger=loggers or False)

    code = code_version()  # before the fit: files may change while it runs
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule, ckpt_path=resume_from, weights_only=False)
    fit_seconds = time.perf_counter() - start
    # The callback that keeps best.ckpt; others keep last.ckpt (resume) or snapshots.
    checkpoint_cb = next((c for c in trainer.checkpoint_callbacks if c.filename == best.stem), None)
    if checkpoint_cb is None or not checkpoint_cb.best_model_path:
        # fast_dev_run and runs without validation keep no best checkpoint: keep the final weights.
        best.parent.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(best)
    elif Path(checkpoint_cb.best_model_path).resolve() != best.resolve():
        raise RuntimeError(f"best checkpoint is {checkpoint_cb.best_model_path}, expected {best}")

    # trainer.limit_train_batches may cut an epoch short of the training set
    images_per_epoch = min(len(datamodule.dataset("train")), trainer.num_training_batches * datamodule.batch_size)
    epochs_run = trainer.current_epoch - first_epoch
    results = {"best_checkpoint": str(best), "fit_seconds": fit_seconds, "epochs": trainer.current_epoch,
               "train_images_per_second": images_per_epoch * epochs_run / fit_seconds if epochs_run else None,
               "code": code}
    if resume_from:  # fit_seconds and the speed cover only the epochs this process ran
        results["resumed_after_epochs"] = first_epoch
    if checkpoint_cb is not None and checkpoint_cb.best_model_score is not None:
        results["selection"] = {"monitor": checkpoint_cb.monitor,
                                "best": finite_or_none(checkpoint_cb.best_model_score)}
    if calibration["method"] != "none":
        results["calibration"] = recalibrate_checkpoint(best, datamodule, calibration["split"], calibration["method"],
                                                        out_path=best, warn_few=False)
    if feature_distance:
        fitted = fit_feature_distance_checkpoint(best, datamodule, feature_distance.split,
                                                 float(feature_distance.pass_rate), out_path=best)
        # The split's 101 distance percentiles stay in the checkpoint, where reports and /model/info read them.
        results["feature_distance"] = fitted and {k: v for k, v in fitted.items() if k != "split_percentiles"}
    if test_after_fit:
        trainer.test(model, datamodule=datamodule, ckpt_path=str(best), weights_only=False)
        results["test"] = {k: finite_or_none(v) for k, v in trainer.callback_metrics.items()
                           if k.startswith("test/")}
        metrics = evaluate(load_classifier(best), datamodule, datamodule.split, out_dir / "eval",
                           title=f"{cfg.get('task_name', 'train')}: {datamodule.describe_split(datamodule.split)}")
        results["eval"] = headline(metrics)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    (out_dir / RESUME_CHECKPOINT).unlink(missing_ok=True)  # a finished run is not resumed
    log_results(loggers, run_summary(results, datamodule.split), out_dir / "eval" if test_after_fit else None,
                datamodule.split)
    return results


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
@user_errors
def main(cfg: DictConfig) -> float | None:
    """Returns the validation score that chose the checkpoint: what a sweeper (Optuna, ...) optimises, so a
    sweep never tunes on the test split."""
    log_config(cfg, log)
    with wandb_run_finished():
        results = train(cfg)
    log.info("results: %s", results)
    print(results["best_checkpoint"])
    return (results.get("selection") or {}).get("best")


def finite_or_none(value) -> float | None:
    """A metric for results.json: NaN and infinity are not JSON."""
    value = float(value)
    return value if math.isfinite(value) else None


if __name__ == "__main__":
    main()
