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
from cxr.data.index import LeakageError
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
    spec = read_spec(ckpt)
    datamodule = instantiate_checkpoint_datamodule(cfg, spec)
    trained_on = spec.get("data_summary") or {}
    if datamodule.split == "test" and datamodule.summary()["split_sha256"] == trained_on.get("split_sha256"):
        raise LeakageError("data.split=test is the test split of the data this checkpoint trained on, where its test "
                           "numbers come from: an operating point fitted there would make them in-sample; fit it on "
                           "data.split=val or, for a checkpoint that also trained on val (a refit), on labelled images "
                           "of your own (data=manifest)")
    datamodule.warn_if_split_was_drawn(datamodule.split)
    try:
        record = recalibrate_checkpoint(ckpt, datamodule, datamodule.split, cfg.method, output)
        Path(cfg.paths.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.paths.output_dir) / "calibration.json").write_text(json.dumps(record, indent=2))
    except BaseException:  # Ctrl-C or SIGTERM too: no checkpoint without its record (a rerun is refused as "exists")
        output.unlink(missing_ok=True)
        raise
    print(output)


if __name__ == "__main__":
    main()
