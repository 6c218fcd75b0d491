"""Fit a finished run's feature distance again with the current code, from the run's own data config, into a
new checkpoint: for runs trained before cxr-train fitted one, or before the fit recorded what reports draw.

    python experiments/refit_feature_distance.py RUN_DIR OUT.ckpt
    cxr-eval ckpt_path=OUT.ckpt data=shared ["data.holdout_sources=[...]"]

RUN_DIR is a cxr-train run folder (its .hydra/config.yaml and checkpoints/best.ckpt); the fit uses that config's
training images and `feature_distance` settings (val and 95% when it has none), exactly as cxr-train does.
"""
import sys

from omegaconf import OmegaConf

from cxr.checkpoint import read_spec
from cxr.config import instantiate_checkpoint_datamodule
from cxr.evaluation.fit_feature_distance import check_feature_distance_config, fit_feature_distance_checkpoint


def main(run_dir: str, out_path: str) -> None:
    cfg = OmegaConf.load(f"{run_dir}/.hydra/config.yaml")
    ckpt = f"{run_dir}/checkpoints/best.ckpt"
    spec = read_spec(ckpt)
    settings = cfg.get("feature_distance") or {"split": "val", "pass_rate": 0.95}
    datamodule = instantiate_checkpoint_datamodule(cfg, spec)
    check_feature_distance_config(datamodule, settings["split"], float(settings["pass_rate"]), datamodule.split)
    before = spec.get("feature_distance") or {}
    after = fit_feature_distance_checkpoint(ckpt, datamodule, settings["split"], float(settings["pass_rate"]),
                                            out_path)
    print(f"threshold {before.get('threshold')} before, {after and after['threshold']} now -> {out_path}")


if __name__ == "__main__":
    main(*sys.argv[1:])
