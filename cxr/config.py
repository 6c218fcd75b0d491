"""Hydra helpers shared by the entry points."""
from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = str(PROJECT_ROOT / "configs")

if not OmegaConf.has_resolver("project_root"):
    OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT))


def instantiate_optional(node):
    """instantiate() for a group that may be switched off (`augment=none` composes to an empty node)."""
    from hydra.utils import instantiate

    return instantiate(node) if node else None


def instantiate_datamodule(cfg, preprocessing):
    """The training data module of a composed train config, with its augmentation (or none)."""
    from hydra.utils import instantiate

    # Runtime objects go to partials: instantiate() would turn them into OmegaConf nodes.
    augment = instantiate_optional(cfg.get("augment"))
    return instantiate(cfg.data, _partial_=True)(preprocessing=preprocessing, augment=augment)


def instantiate_checkpoint_datamodule(cfg, spec: dict):
    """The data module of cfg.data for a saved checkpoint: its preprocessing and class order come from the
    checkpoint's spec, never from the data config; no augmentation."""
    from hydra.utils import instantiate

    from cxr.data.preprocess import Preprocessing

    return instantiate(cfg.data, _partial_=True)(preprocessing=Preprocessing.from_dict(spec["preprocessing"]),
                                                 class_names=list(spec["class_names"]), augment=None)


def configure_threads(cfg: DictConfig) -> None:
    import torch

    threads = cfg.get("num_threads")
    if threads:
        torch.set_num_threads(int(threads))


def log_config(cfg: DictConfig, log: logging.Logger) -> None:
    log.info("config:\n%s", OmegaConf.to_yaml(cfg, resolve=True))


def user_errors(main):
    """Wrap an entry point: an expected error (unreadable or leaking data, a missing file, weights that cannot
    be had, a required override left out) is printed as its message on stderr with exit status 1, not as a
    traceback; any other exception keeps its traceback."""
    @functools.wraps(main)
    def wrapper(cfg: DictConfig):
        from omegaconf.errors import MissingMandatoryValue

        from cxr.data.dataset import DataCheckError
        from cxr.data.index import LeakageError
        from cxr.models.backbone import PretrainedWeightsError

        try:
            return main(cfg)
        except (DataCheckError, LeakageError, PretrainedWeightsError, FileNotFoundError, FileExistsError,
                MissingMandatoryValue) as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(1) from None

    return wrapper
