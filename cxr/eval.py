"""cxr-eval: evaluate a saved checkpoint on a split of any data config.

    cxr-eval ckpt_path=logs/train/runs/.../checkpoints/best.ckpt data=manifest data.manifest=m.csv data.split=test
    cxr-eval ... logger=wandb      # the numbers and figures on the dashboard too (job type "eval")
"""
from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from cxr.config import CONFIG_DIR, configure_threads, instantiate_checkpoint_datamodule, log_config, user_errors
from cxr.evaluation.evaluate import evaluate
from cxr.inference import load_classifier
from cxr.tracking import headline, instantiate_loggers, log_config_to, log_results, run_summary, wandb_run_finished

log = logging.getLogger("cxr.eval")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
@user_errors
def main(cfg: DictConfig) -> float | None:
    log_config(cfg, log)
    configure_threads(cfg)
    classifier = load_classifier(cfg.ckpt_path)
    datamodule = instantiate_checkpoint_datamodule(cfg, classifier.spec)
    datamodule.warn_if_split_was_drawn(datamodule.split)
    loggers = instantiate_loggers(cfg, job_type="eval")  # built first: a logger that cannot start fails fast
    log_config_to(loggers, cfg)
    with wandb_run_finished():
        metrics = evaluate(classifier, datamodule, datamodule.split, cfg.paths.output_dir,
                           title=f"{classifier.spec['backbone']} on {datamodule.describe_split(datamodule.split)}")
        log_results(loggers, run_summary({"eval": headline(metrics)}, datamodule.split), Path(cfg.paths.output_dir),
                    datamodule.split)
    log.info("accuracy %.4f, macro AUROC %s, n %d -> %s", metrics["accuracy"], metrics["macro_auroc"], metrics["n"],
             cfg.paths.output_dir)
    print(Path(cfg.paths.output_dir) / "metrics.json")
    return metrics["macro_auroc"]


if __name__ == "__main__":
    main()
