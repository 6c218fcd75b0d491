"""Hydra helpers shared by the entry points."""
from __future__ import annotations

import functools
import logging
import signal
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = str(PROJECT_ROOT / "configs")

if not OmegaConf.has_resolver("project_root"):
    OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT))


class ConfigError(ValueError):
    """Settings that contradict each other or would make a reported number dishonest; the message says which."""


def is_whole_number(value) -> bool:
    """An int as YAML or a command line gives it; bool is an int to Python but `true` is no count."""
    return isinstance(value, int) and not isinstance(value, bool)


def instantiate_optional(node):
    """instantiate() for a group that may be switched off (`augment=none` composes to an empty node)."""
    from hydra.utils import instantiate

    return instantiate(node) if node else None


def instantiate_datamodule(cfg, preprocessing):
    """The training data module of a composed train config, with its augmentation (or none)."""
    from hydra.utils import instantiate

    # Runtime objects go to partials: instantiate() would turn them into OmegaConf nodes.
    require_values(cfg.data)
    augment = instantiate_optional(cfg.get("augment"))
    return instantiate(cfg.data, _partial_=True)(preprocessing=preprocessing, augment=augment)


def instantiate_model(cfg, datamodule, preprocessing):
    """The LightningModule of a composed train config, for the data module's classes, with the class weights of its
    training split (None unless data.use_class_weights)."""
    from hydra.utils import instantiate

    weights = datamodule.class_weights()
    return instantiate(cfg.model, _partial_=True)(class_names=datamodule.class_names, preprocessing=preprocessing,
                                                  class_weights=None if weights is None else weights.tolist())


def instantiate_checkpoint_datamodule(cfg, spec: dict):
    """The data module of cfg.data for a saved checkpoint: its preprocessing and class order come from the
    checkpoint's spec, never from the data config; no augmentation."""
    from hydra.utils import instantiate

    from cxr.data.preprocess import Preprocessing

    require_values(cfg.data)
    return instantiate(cfg.data, _partial_=True)(preprocessing=Preprocessing.from_dict(spec["preprocessing"]),
                                                 class_names=list(spec["class_names"]), augment=None,
                                                 for_training=False)


def require_values(node: DictConfig) -> None:
    """A required override left out (`data=folder` without `data.root`) named as such: instantiate() with
    _partial_ would drop the `???` and fail later with a TypeError about a missing argument."""
    from omegaconf.errors import MissingMandatoryValue

    missing = sorted(OmegaConf.missing_keys(node))  # full keys from the config's root: data.root
    if missing:
        raise MissingMandatoryValue(f"{', '.join(missing)} must be set, e.g. {missing[0]}=...")


def configure_threads(cfg: DictConfig) -> None:
    import torch

    threads = cfg.get("num_threads")
    if threads:
        torch.set_num_threads(int(threads))


def log_to_run_files(log: logging.Logger, level: int, message: str, exc_info=None) -> None:
    """Write to the run's log file (Hydra's file handler) only, not to the console."""
    record = log.makeRecord(log.name, level, __file__, 0, message, None, exc_info)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def log_config(cfg: DictConfig, log: logging.Logger) -> None:
    """The resolved configuration, in the run's log file: on the console it would bury each job of a sweep."""
    log_to_run_files(log, logging.INFO, "config:\n" + OmegaConf.to_yaml(cfg, resolve=True))


class Terminated(BaseException):
    """SIGTERM outside a Lightning fit or test: raised like KeyboardInterrupt, so `finally` blocks clean up staged
    files (Python's default action ends the process on the spot) and no `except Exception` swallows it."""


def _raise_terminated(signum, frame) -> None:
    # During a fit or test Lightning has put its own handler first and calls this one after it: Lightning stops
    # at the end of the running batch by itself (SIGTERMException), which keeps its checkpoints whole.
    if signal.getsignal(signal.SIGTERM) is _raise_terminated:
        raise Terminated


def user_errors(main):
    """Wrap an entry point: an expected error (unreadable or leaking data, a missing file or checkpoint, weights
    that cannot be had, a required override left out) is printed as its message on stderr with exit status 1,
    not as a traceback; any other exception keeps its traceback. Either way the run's log file ends with it. A run
    stopped by Ctrl-C or SIGTERM ends its log with "interrupted" and exits non-zero (SIGTERM: 128 + 15), having
    removed what it had half written. In a sweep (-m) the error is re-raised instead, so Hydra marks that job
    failed and still runs the others."""
    @functools.wraps(main)
    def wrapper(cfg: DictConfig):
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
        from lightning.pytorch.utilities.exceptions import SIGTERMException
        from omegaconf.errors import MissingMandatoryValue

        from cxr.checkpoint import CheckpointError
        from cxr.data.dataset import DataCheckError
        from cxr.data.index import DataConfigError, LeakageError
        from cxr.export import ExportError
        from cxr.models.backbone import PretrainedWeightsError
        from cxr.resume import ResumeError

        log = logging.getLogger("cxr")
        previous_sigterm = signal.signal(signal.SIGTERM, _raise_terminated)
        try:
            return main(cfg)
        except (DataCheckError, DataConfigError, LeakageError, PretrainedWeightsError, CheckpointError, ResumeError,
                ConfigError, ExportError, FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
                NotADirectoryError, MissingMandatoryValue) as exc:
            print(f"error: {exc}", file=sys.stderr)
            log_to_run_files(log, logging.ERROR, f"error: {exc}")  # the run's folder says why it stopped
            if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
                raise
            raise SystemExit(1) from None
        except KeyboardInterrupt:
            log_to_run_files(log, logging.ERROR, "interrupted")
            raise
        except (SIGTERMException, Terminated):
            # Lightning's own exit for SIGTERM carries no status, so the process would end with 0, a success
            log_to_run_files(log, logging.ERROR, "interrupted by SIGTERM")
            raise SystemExit(128 + signal.SIGTERM) from None
        except SystemExit as exc:  # Lightning ends a fit or test stopped by Ctrl-C with exit status 1
            if exc.code not in (0, None):
                log_to_run_files(log, logging.ERROR, f"interrupted (exit status {exc.code})")
            raise
        except Exception:
            log_to_run_files(log, logging.ERROR, "failed", exc_info=sys.exc_info())
            raise
        finally:
            signal.signal(signal.SIGTERM, previous_sigterm)

    return wrapper


def used_run_folder(folder: Path) -> str | None:
    """Why `folder` may not receive a new run (of cxr-train, cxr-soup, cxr-eval or cxr-calibrate), or None: it
    holds the outputs of one, which the new run would overwrite."""
    if (folder / "results.json").exists():
        return f"{folder} holds a finished run (results.json)"
    from cxr.resume import RESUME_CHECKPOINT

    resumable = (folder / RESUME_CHECKPOINT).exists()
    if resumable or (folder / "checkpoints" / "best.ckpt").exists():
        hint = " (continue it with resume=true and the same overrides)" if resumable else ""
        return f"{folder} holds an interrupted run (checkpoints without results.json){hint}"
    if (folder / "metrics.json").exists():
        return f"{folder} holds an evaluation (metrics.json)"
    if (folder / "calibration.json").exists():
        return f"{folder} holds a calibration (calibration.json)"
    return None


class RefuseUsedRunFolder(Callback):
    """The Hydra callback of cxr-train, cxr-eval, cxr-calibrate and cxr-soup: refuse a run folder (or a sweep
    folder) that already holds a run before Hydra saves the new run's .hydra/ config over the old one's."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        raw = OmegaConf.to_container(config.paths, resolve=False)["output_dir"]
        # paths.output_dir follows Hydra's run folder unless set: resolved here, before Hydra sets it.
        follows_run_dir = "hydra:runtime.output_dir" in str(raw)
        folder = Path(config.hydra.run.dir if follows_run_dir else config.paths.output_dir)
        if config.get("resume"):
            from cxr.resume import ResumeError, check_resume

            try:
                check_resume(folder, config)
            except ResumeError as exc:
                self._refuse([str(exc)], "")
        else:
            self._refuse([reason] if (reason := used_run_folder(folder)) else [],
                         f"; choose a new {'hydra.run.dir' if follows_run_dir else 'paths.output_dir'}=")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        if config.get("resume"):
            self._refuse(["resume=true continues one run: resume each interrupted job of a sweep on its own, "
                          "with its folder (hydra.run.dir=) and overrides"], "")
        raw = OmegaConf.to_container(config.paths, resolve=False)["output_dir"]
        if "hydra:runtime.output_dir" not in str(raw):
            self._refuse([f"paths.output_dir={raw} would be every job's folder: after the first, each would find "
                          "it taken"], "; leave paths.output_dir out, and each job writes under hydra.sweep.dir=")
        sweep = Path(config.hydra.sweep.dir)
        jobs = sorted(p for p in sweep.iterdir() if p.is_dir()) if sweep.is_dir() else []
        self._refuse([reason for job in jobs if (reason := used_run_folder(job))], "; choose a new hydra.sweep.dir=")

    @staticmethod
    def _refuse(reasons: list[str], advice: str) -> None:
        if reasons:
            print(f"error: {reasons[0]}" + (f" (and {len(reasons) - 1} more)" if len(reasons) > 1 else "") + advice,
                  file=sys.stderr)
            raise SystemExit(1)
