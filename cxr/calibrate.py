"""cxr-calibrate: refit a checkpoint's operating point on a labelled split and save it as a new checkpoint.

    cxr-calibrate ckpt_path=.../best.ckpt data=manifest data.manifest=site.csv data.split=val
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from cxr.checkpoint import read_spec
from cxr.config import CONFIG_DIR, configure_threads, instantiate_checkpoint_datamodule, log_config, user_errors
from cxr.evaluation.recalibrate import recalibrate_checkpoint

log = logging.getLogger("cxr.calibrate")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="calibrate")
@user_errors
def main(cfg: DictConfig) -> None:
    log_config(cfg, log)
    configure_threads(cfg)
    ckpt = Path(cfg.ckpt_path).expanduser()
    output = Path(cfg.output).expanduser() if cfg.get("output") else ckpt.with_name(f"{ckpt.stem}.calibrated.ckpt")
    if output.exists():
        raise FileExistsError(f"{output} exists; choose another output=")
    datamodule = instantiate_checkpoint_datamodule(cfg, read_spec(ckpt))
    datamodule.warn_if_split_was_drawn(datamodule.split)
    record = recalibrate_checkpoint(ckpt, datamodule, datamodule.split, cfg.method, output)
    Path(cfg.paths.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.paths.output_dir) / "calibration.json").write_text(json.dumps(record, indent=2))
    print(output)


if __name__ == "__main__":
    main()
