"""Resuming an interrupted training run in its own folder (`cxr-train ... resume=true`).

Every epoch end leaves `checkpoints/last.ckpt`, which also records the run's composed configuration; a
resumed run must repeat it (up to settings that do not change what is trained), so one folder never holds
a model trained half under one configuration and half under another.
"""
from __future__ import annotations

import inspect
import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
from omegaconf import DictConfig, OmegaConf

from cxr.checkpoint import CHECKPOINT_KEY, TRAIN_FINGERPRINTS, CheckpointError, read_checkpoint

log = logging.getLogger(__name__)
# Where a training run keeps the state it can be resumed from (every epoch end; removed once the run finishes).
RESUME_CHECKPOINT = Path("checkpoints") / "last.ckpt"
# The key of a checkpoint that holds the composed configuration of the run that wrote it.
RUN_CONFIG_KEY = "cxr_run_config"
# Settings a resumed run may change: they do not change what is trained.
RESUMABLE_CHANGES = ("resume", "num_threads", "paths.cache_dir")


class ResumeError(ValueError):
    """resume=true asked for a run that cannot be resumed; the message says why."""


def run_config(cfg: DictConfig) -> dict:
    """A run's composed configuration as a flat {dotted key: value} dict, unresolved, without Hydra's own
    node or the settings a resumed run may change: what a resumed run must repeat."""
    flat: dict = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = node

    container = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else dict(cfg)
    container.pop("hydra", None)
    walk(container, "")
    return {k: v for k, v in flat.items() if k not in RESUMABLE_CHANGES}


def check_resume(folder: Path, cfg: DictConfig) -> tuple[int, dict]:
    """The number of epochs the interrupted run in `folder` finished and the data summary it recorded (see
    `check_same_data`); ResumeError when `cfg` cannot resume it."""
    if (folder / "results.json").exists():
        raise ResumeError(f"{folder} holds a finished run (results.json): there is nothing to resume")
    last = folder / RESUME_CHECKPOINT
    if not last.is_file():
        raise ResumeError(f"{folder} has no {RESUME_CHECKPOINT} to resume from (a run saves it at the end of each "
                          "epoch)")
    try:  # a checkpoint cut short by the interruption itself
        checkpoint, _ = read_checkpoint(last)
    except CheckpointError as exc:
        raise ResumeError(str(exc)) from exc
    saved = checkpoint.get(RUN_CONFIG_KEY)
    if saved is None:
        raise ResumeError(f"{last} does not record the configuration of the run that wrote it")
    now = run_config(cfg)
    changed = sorted(k for k in saved.keys() | now.keys() if saved.get(k, "<unset>") != now.get(k, "<unset>")
                     and not (k not in saved and added_without_effect(k, now[k])))
    if changed:
        shown = "; ".join(f"{k}: {saved.get(k, '<unset>')!r} -> {now.get(k, '<unset>')!r}" for k in changed[:5])
        more = f" (and {len(changed) - 5} more)" if len(changed) > 5 else ""
        raise ResumeError(f"resume=true needs the interrupted run's configuration; {len(changed)} setting(s) "
                          f"differ: {shown}{more}")
    # saved at the end of that (0-based) epoch
    return int(checkpoint["epoch"]) + 1, checkpoint.get(CHECKPOINT_KEY, {}).get("data_summary") or {}


DATA_SUMMARY_PARTS = {"counts": "the images per split, source and class",
                      "split_sha256": "which file is in which split",
                      TRAIN_FINGERPRINTS: "the training images' pixels", "class_names": "the classes"}


def check_same_data(interrupted: dict, now: dict) -> None:
    """A resumed run must train on the images the interrupted one did, in the same splits: its checkpoints keep
    one data summary, by which evaluation refuses images the model trained on. `interrupted` is empty for a run
    of a version of cxr that recorded none."""
    changed = sorted(DATA_SUMMARY_PARTS.get(k, k) for k in interrupted.keys() | now.keys()
                     if interrupted and interrupted.get(k) != now.get(k))
    if changed:
        raise ResumeError(f"the data changed since the run was interrupted ({'; '.join(changed)}): resume=true needs "
                          "the same images in the same splits; train anew in a new folder (hydra.run.dir=)")


def added_without_effect(key: str, value) -> bool:
    """A setting the interrupted run's version of cxr did not have yet, at a value that changes nothing (empty, or
    Lightning's own default for a Trainer argument): resuming across such an upgrade is allowed."""
    if value is None or value == [] or value == {}:
        return True
    if key.startswith("trainer.") and key.count(".") == 1:
        parameter = inspect.signature(L.Trainer.__init__).parameters.get(key.split(".")[1])
        return parameter is not None and parameter.default == value
    return False


EARLIER_CURVES = "metrics.epochs-0-{last}.csv"


def keep_earlier_curves(loggers: list, completed: int) -> None:
    """Lightning's CSVLogger starts metrics.csv afresh: the rows of the `completed` epochs from before this
    interruption and any earlier one go into one file beside it, metrics.epochs-0-<completed - 1>.csv. Rows of an
    epoch cut short are left out: it is trained again."""
    import pandas as pd
    from lightning.pytorch.loggers import CSVLogger

    for logger in loggers:
        if not isinstance(logger, CSVLogger):
            continue
        folder = Path(logger.log_dir)
        earlier = sorted(folder.glob(EARLIER_CURVES.format(last="*")), key=lambda p: int(p.stem.rsplit("-", 1)[1]))
        parts = [p for p in [*earlier, folder / "metrics.csv"] if p.is_file() and p.stat().st_size]
        if not parts:
            continue
        curves = pd.concat([pd.read_csv(p) for p in parts], ignore_index=True)
        # drop_duplicates: a merge cut short by a kill may have left its rows in both the new file and the old ones
        finished = curves["epoch"] < completed
        # LearningRateMonitor's rows have a step but no epoch: those up to the last step of a finished epoch stay
        between_epochs = curves["epoch"].isna() & (curves["step"] <= curves.loc[finished, "step"].max())
        curves = curves[finished | between_epochs].drop_duplicates()
        kept = folder / EARLIER_CURVES.format(last=completed - 1)
        partial = kept.with_suffix(".csv.partial")
        curves.to_csv(partial, index=False)
        partial.replace(kept)
        for part in parts:
            if part != kept:
                part.unlink()


class RecordRunConfig(L.Callback):
    """Writes the run's configuration into every checkpoint, for check_resume to compare."""

    def __init__(self, cfg: DictConfig):
        self.config = run_config(cfg)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[RUN_CONFIG_KEY] = self.config


def resume_point_last(callbacks: list) -> list:
    """`callbacks` with ResumeCheckpoint moved behind every other: Lightning runs checkpoint callbacks in list order,
    and last.ckpt marks an epoch done, so every other checkpoint of that epoch (best.ckpt, a snapshot) must be on
    disk before it. A run stopped between the two writes trains that epoch again and writes them again."""
    return sorted(callbacks, key=lambda callback: isinstance(callback, ResumeCheckpoint))


class ResumeCheckpoint(ModelCheckpoint):
    """Writes `checkpoints/last.ckpt` at every epoch end (ModelCheckpoint's save_last only follows improvements
    of the monitored score); its state is kept apart from every other ModelCheckpoint's, such as the
    snapshots' that also save each epoch. Place it last (resume_point_last)."""

    def __init__(self, dirpath: str):
        super().__init__(dirpath=dirpath, filename=RESUME_CHECKPOINT.stem, monitor=None, save_top_k=1,
                         enable_version_counter=False)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(purpose="resume")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        # A run interrupted after early stopping had ended its fit (while testing or calibrating) resumes from
        # the stopping epoch, whose restored EarlyStopping state says it stopped; Lightning would only check it
        # again after training one more epoch.
        if any(c.stopping_reason != EarlyStoppingReason.NOT_STOPPED for c in trainer.early_stopping_callbacks):
            trainer.should_stop = True
        if trainer.ckpt_path:
            adopt_best_of_unfinished_epoch(trainer)


def adopt_best_of_unfinished_epoch(trainer: L.Trainer) -> None:
    """A run stopped after an epoch wrote best.ckpt but before it wrote last.ckpt resumes with the monitoring
    checkpoint's state of the epoch before, while best.ckpt holds the later epoch's weights (the earlier best is
    overwritten): take the state best.ckpt was written with, so the score reported and the weights kept belong
    together. The epoch is trained again and replaces them only if it scores higher."""
    for callback in trainer.checkpoint_callbacks:
        templated = not callback.filename or "{" in callback.filename  # a new file each time: nothing overwritten
        if isinstance(callback, ResumeCheckpoint) or callback.monitor is None or templated:
            continue
        path = Path(callback.dirpath) / f"{callback.filename}{callback.FILE_EXTENSION}"
        if not path.is_file():
            continue
        written, _ = read_checkpoint(path)
        state = (written.get("callbacks") or {}).get(callback.state_key)
        if written.get("epoch", -1) >= trainer.current_epoch and state:
            callback.load_state_dict(state)
            log.warning(
                f"{path.name} was written by epoch {written['epoch']}, which the interruption cut short before "
                f"{RESUME_CHECKPOINT.name}: it stays the best so far ({callback.monitor} = "
                f"{float(callback.best_model_score):.4f})")
