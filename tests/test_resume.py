"""Resuming's bookkeeping, where a stop between two writes leaves files of different epochs: the earlier
training curves, the order of the checkpoint writes, and the best checkpoint of an epoch cut short."""
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from cxr.checkpoint import CHECKPOINT_KEY
from cxr.resume import ResumeCheckpoint, adopt_best_of_unfinished_epoch, keep_earlier_curves, resume_point_last


def write_curves(logger: CSVLogger, rows: list[tuple[int, int, float]]) -> None:
    pd.DataFrame(rows, columns=["epoch", "step", "train/loss"]).to_csv(f"{logger.log_dir}/metrics.csv", index=False)


def test_earlier_curves_keep_every_finished_epoch_once_across_interruptions(tmp_path):
    logger = CSVLogger(save_dir=str(tmp_path), name="csv", version="")
    (tmp_path / "csv").mkdir()
    write_curves(logger, [(0, 0, 1.0), (1, 1, 0.9), (2, 2, 0.8)])  # stopped in epoch 2
    keep_earlier_curves([logger], completed=2)
    write_curves(logger, [(2, 2, 0.7)])  # the resumed run stopped in epoch 2 again
    keep_earlier_curves([logger], completed=2)
    kept = pd.read_csv(tmp_path / "csv" / "metrics.epochs-0-1.csv")
    assert kept["train/loss"].tolist() == [1.0, 0.9] and not (tmp_path / "csv" / "metrics.csv").exists()

    write_curves(logger, [(2, 2, 0.6), (3, 3, 0.5), (4, 4, 0.4)])  # then in epoch 4
    keep_earlier_curves([logger], completed=4)
    assert sorted(p.name for p in (tmp_path / "csv").iterdir()) == ["metrics.epochs-0-3.csv"]
    kept = pd.read_csv(tmp_path / "csv" / "metrics.epochs-0-3.csv")
    assert kept["epoch"].tolist() == [0, 1, 2, 3] and kept["train/loss"].tolist() == [1.0, 0.9, 0.6, 0.5]


def test_earlier_curves_keep_the_learning_rates_of_finished_epochs(tmp_path):
    """LearningRateMonitor writes its rows without an epoch, at the first step of each epoch: the rates of the
    finished epochs were dropped with the cut-short epoch's rows."""
    logger = CSVLogger(save_dir=str(tmp_path), name="csv", version="")
    (tmp_path / "csv").mkdir()
    rows = [(None, 0, 1e-3, None), (0, 0, None, 1.1), (0, 1, None, 1.0),
            (None, 2, 8e-4, None), (1, 2, None, 0.9), (1, 3, None, 0.8),
            (None, 4, 5e-4, None), (2, 4, None, 0.7)]  # stopped in epoch 2
    pd.DataFrame(rows, columns=["epoch", "step", "lr-AdamW/head", "train/loss"]).to_csv(
        tmp_path / "csv" / "metrics.csv", index=False)
    keep_earlier_curves([logger], completed=2)
    kept = pd.read_csv(tmp_path / "csv" / "metrics.epochs-0-1.csv")
    assert kept["lr-AdamW/head"].dropna().tolist() == [1e-3, 8e-4]
    assert kept["train/loss"].dropna().tolist() == [1.1, 1.0, 0.9, 0.8]


def test_last_ckpt_is_written_after_every_other_checkpoint_of_an_epoch(tmp_path):
    best = ModelCheckpoint(dirpath=tmp_path, filename="best", monitor="val/auroc_macro", mode="max")
    resume = ResumeCheckpoint(dirpath=str(tmp_path))
    snapshot = ModelCheckpoint(dirpath=tmp_path / "snapshots", filename="epoch{epoch}", monitor=None, save_top_k=-1)
    trainer = Trainer(callbacks=resume_point_last([best, resume, snapshot]), logger=False,
                      enable_progress_bar=False, enable_model_summary=False)
    assert trainer.checkpoint_callbacks == [best, snapshot, resume]


@pytest.mark.parametrize("written_by_epoch, adopted", [(2, True), (1, False)])
def test_a_best_checkpoint_written_by_an_epoch_cut_short_keeps_its_own_score(tmp_path, written_by_epoch, adopted):
    """last.ckpt says epochs 0-1 are done and the best is 0.80; best.ckpt was written by epoch 2 (scoring 0.90)
    just before the stop: its weights are the best kept, so 0.90 is the score to report and to beat."""
    best = ModelCheckpoint(dirpath=tmp_path, filename="best", monitor="val/auroc_macro", mode="max")
    path = str(tmp_path / "best.ckpt")
    best.best_model_score, best.best_model_path, best.best_k_models = torch.tensor(0.80), path, {path: torch.tensor(0.80)}
    state = {**best.state_dict(), "best_model_score": torch.tensor(0.90), "best_k_models": {path: torch.tensor(0.90)}}
    torch.save({"epoch": written_by_epoch, CHECKPOINT_KEY: {"class_names": ["normal"]},
                "callbacks": {best.state_key: state}}, path)
    resumed = SimpleNamespace(checkpoint_callbacks=[best, ResumeCheckpoint(dirpath=str(tmp_path))], current_epoch=2)
    adopt_best_of_unfinished_epoch(resumed)
    assert float(best.best_model_score) == pytest.approx(0.90 if adopted else 0.80)
    assert best.best_model_path == path
