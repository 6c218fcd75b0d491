"""Cosine decay reaches every parameter group, including the ones unfreezing adds later."""
from functools import partial

import lightning as L
import pytest
import torch

from cxr.data.datamodule import ChestXrayDataModule
from cxr.data.preprocess import Preprocessing
from cxr.models.module import ChestXrayClassifier
from cxr.models.schedule import EpochCosineDecay, cosine_factor
from cxr.models.unfreeze import ProgressiveUnfreezing


def test_cosine_factor_shape():
    assert cosine_factor(0, 5) == pytest.approx(1.0)
    assert cosine_factor(4, 5, min_factor=0.1) == pytest.approx(0.1)
    values = [cosine_factor(e, 5) for e in range(5)]
    assert values == sorted(values, reverse=True)
    assert cosine_factor(0, 5, warmup_epochs=1) == pytest.approx(0.5)


def test_a_decay_without_an_end_is_refused():
    """With max_epochs=-1 (no limit) the cosine spanned -1 epochs: the rate fell to its floor after the first."""
    from types import SimpleNamespace

    with pytest.raises(ValueError, match="give total_epochs"):
        EpochCosineDecay().setup(SimpleNamespace(max_epochs=-1), None, "fit")
    for decay in (EpochCosineDecay(total_epochs=5), EpochCosineDecay(cycle_epochs=3)):
        decay.setup(SimpleNamespace(max_epochs=-1), None, "fit")


def test_cycles_restart_the_decay():
    from types import SimpleNamespace

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    decay = EpochCosineDecay(min_factor=0.1, cycle_epochs=3)
    lrs = []
    for epoch in range(7):
        decay.on_train_epoch_start(SimpleNamespace(current_epoch=epoch, max_epochs=7, global_step=epoch,
                                                    optimizers=[optimizer]), None)
        lrs.append(optimizer.param_groups[0]["lr"])
    one_cycle = [cosine_factor(e, 3, min_factor=0.1) for e in range(3)]
    assert lrs == pytest.approx(one_cycle * 2 + one_cycle[:1])
    assert lrs[2] == pytest.approx(0.1) and lrs[3] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="cycle_epochs"):
        EpochCosineDecay(cycle_epochs=0)


class LrRecorder(L.Callback):
    """Every parameter group's rate at the start of each epoch, or of each batch with `per_batch`."""

    def __init__(self, per_batch: bool = False):
        self.per_batch = per_batch
        self.lrs = []

    def record(self, trainer):
        self.lrs.append([g["lr"] for g in trainer.optimizers[0].param_groups])

    def on_train_epoch_start(self, trainer, pl_module):
        if not self.per_batch:
            self.record(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.per_batch:
            self.record(trainer)


def fit_recording_rates(manifest, decay: EpochCosineDecay, unfreeze_at: int, backbone_lr_factor: float,
                        max_epochs: int, train_batches: int, per_batch: bool = False) -> tuple[float, list]:
    """Fit a tiny model whose whole backbone opens at `unfreeze_at`; (the head's base rate, the recorded rates)."""
    prep = Preprocessing(image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    dm = ChestXrayDataModule.from_manifest(str(manifest), preprocessing=prep, batch_size=8)
    model = ChestXrayClassifier("test_efficientnet", dm.class_names, prep, pretrained="none",
                                optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2),
                                backbone_lr_factor=backbone_lr_factor)
    recorder = LrRecorder(per_batch)
    trainer = L.Trainer(max_epochs=max_epochs, limit_train_batches=train_batches, limit_val_batches=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        callbacks=[ProgressiveUnfreezing([unfreeze_at], [-1]), decay, recorder])
    trainer.fit(model, datamodule=dm)
    return trainer.optimizers[0].param_groups[0]["base_lr"], recorder.lrs


def test_decay_covers_groups_added_by_unfreezing(synthetic_manifest):
    head, recorded = fit_recording_rates(synthetic_manifest, EpochCosineDecay(min_factor=0.1), unfreeze_at=2,
                                    backbone_lr_factor=0.1, max_epochs=4, train_batches=1)
    expected_head = [head * cosine_factor(e, 4, min_factor=0.1) for e in range(4)]
    assert [lrs[0] for lrs in recorded] == pytest.approx(expected_head)
    assert len(recorded[1]) == 1 and len(recorded[2]) == 2
    # The backbone group starts at base * factor(epoch 2) and keeps decaying with the head.
    for epoch in (2, 3):
        assert recorded[epoch][1] == pytest.approx(head * 0.1 * cosine_factor(epoch, 4, min_factor=0.1))


def test_plateau_scheduler_must_watch_auroc_as_higher_is_better():
    def module(**plateau):
        return ChestXrayClassifier("test_efficientnet", ["normal", "pneumonia", "tuberculosis"],
                                   Preprocessing(image_size=32), pretrained="none",
                                   scheduler=partial(torch.optim.lr_scheduler.ReduceLROnPlateau, **plateau))

    with pytest.raises(ValueError, match="mode=max"):
        module().configure_optimizers()
    config = module(mode="max").configure_optimizers()
    assert config["lr_scheduler"]["monitor"] == "val/auroc_macro" and config["lr_scheduler"]["scheduler"].mode == "max"


def test_groups_added_by_unfreezing_ramp_up_over_their_warmup(synthetic_manifest):
    decay = EpochCosineDecay(min_factor=0.1, added_group_warmup_epochs=1)
    head, recorded = fit_recording_rates(synthetic_manifest, decay, unfreeze_at=1, backbone_lr_factor=0.5,
                                         max_epochs=3, train_batches=3, per_batch=True)
    factors = [cosine_factor(e, 3, min_factor=0.1) for e in range(3)]
    assert [lrs[0] for lrs in recorded] == pytest.approx([head * factors[step // 3] for step in range(9)])
    # The backbone group, unfrozen at epoch 1, ramps up over its first epoch (3 steps), then decays.
    backbone = head * 0.5
    assert [lrs[1] for lrs in recorded[3:]] == pytest.approx(
        [backbone * factors[1] * ramp for ramp in (1 / 3, 2 / 3, 1)] + [backbone * factors[2]] * 3)
    with pytest.raises(ValueError, match="added_group_warmup_epochs"):
        EpochCosineDecay(added_group_warmup_epochs=-1)
