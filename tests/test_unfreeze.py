"""Progressive unfreezing: which parameters train at each epoch, and that the optimizer moves them."""
import lightning as L
import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from functools import partial

from cxr.config import ConfigError
from cxr.data.datamodule import ChestXrayDataModule
from cxr.data.preprocess import Preprocessing
from cxr.models.module import ChestXrayClassifier
from cxr.models.unfreeze import ProgressiveUnfreezing, backbone_stages

PREP = Preprocessing(image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)


class Recorder(L.Callback):
    """Per epoch: trainable parameter names, which parameters changed, and frozen-BN state."""

    def __init__(self):
        self.trainable, self.changed, self.frozen_bn_training, self.frozen_bn_stats_changed = [], [], [], []
        self.unfrozen_bn_training, self.unfrozen_bn_stats_changed = [], []

    def on_train_epoch_start(self, trainer, pl_module):
        self.before = {n: p.detach().clone() for n, p in pl_module.net.named_parameters()}
        self.buffers = {n: b.detach().clone() for n, b in pl_module.net.named_buffers() if "running" in n}
        self.trainable.append({n for n, p in pl_module.net.named_parameters() if p.requires_grad})
        frozen_bn = [m for m in pl_module.net.modules()
                     if isinstance(m, _BatchNorm) and not any(p.requires_grad for p in m.parameters())]
        self.frozen_bn_training.append(any(m.training for m in frozen_bn))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:  # after every callback's epoch-start hook
            unfrozen_bn = [m for m in pl_module.net.modules()
                           if isinstance(m, _BatchNorm) and any(p.requires_grad for p in m.parameters())]
            self.unfrozen_bn_training.append([m.training for m in unfrozen_bn])

    def on_train_epoch_end(self, trainer, pl_module):
        params = dict(pl_module.net.named_parameters())
        self.changed.append({n for n, p in params.items() if not torch.equal(p.detach(), self.before[n])})
        frozen_prefixes = {n.rsplit(".", 1)[0] for n in params if n not in self.trainable[-1]}
        stats_changed = {n.rsplit(".", 1)[0]: not torch.equal(b, self.buffers[n])
                         for n, b in pl_module.net.named_buffers() if n in self.buffers}
        self.frozen_bn_stats_changed.append(any(v for k, v in stats_changed.items() if k in frozen_prefixes))
        self.unfrozen_bn_stats_changed.append([v for k, v in stats_changed.items() if k not in frozen_prefixes])


def fit_progressively(manifest, **unfreeze_options):
    torch.manual_seed(0)
    dm = ChestXrayDataModule.from_manifest(str(manifest), preprocessing=PREP, batch_size=8)
    model = ChestXrayClassifier("test_efficientnet", dm.class_names, PREP, pretrained="none", dropout=0.0,
                                backbone_lr_factor=0.1)
    stages = backbone_stages(model.net)
    recorder = Recorder()
    unfreeze = ProgressiveUnfreezing(unfreeze_at=[1, 2], stages_per_step=[2, -1], **unfreeze_options)
    trainer = L.Trainer(max_epochs=3, limit_train_batches=2, limit_val_batches=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, callbacks=[unfreeze, recorder])
    trainer.fit(model, datamodule=dm)
    return model, stages, recorder, trainer


@pytest.fixture(scope="module")
def trained(synthetic_manifest):
    return fit_progressively(synthetic_manifest)


def names_of(model, modules):
    ids = {id(p) for m in modules for p in m.parameters()}
    return {n for n, p in model.net.named_parameters() if id(p) in ids}


def test_schedule_of_trainable_parameters(trained):
    model, stages, recorder, _ = trained
    head = model.head_names
    assert head and recorder.trainable[0] == head
    assert recorder.trainable[1] == head | names_of(model, stages[:2])
    assert recorder.trainable[2] == {n for n, _ in model.net.named_parameters()}


def test_optimizer_updates_exactly_the_trainable_parameters(trained):
    _, _, recorder, _ = trained
    for trainable, changed in zip(recorder.trainable, recorder.changed):
        assert changed <= trainable
        assert len(changed) >= 0.9 * len(trainable)


def test_backbone_groups_get_the_lower_learning_rate(trained):
    _, _, _, trainer = trained
    groups = trainer.optimizers[0].param_groups
    assert len(groups) == 3
    head_lr = groups[0]["lr"]
    assert all(g["lr"] == pytest.approx(head_lr * 0.1) for g in groups[1:])


def test_frozen_batchnorm_stays_in_eval_and_keeps_its_statistics(trained):
    _, _, recorder, _ = trained
    assert recorder.frozen_bn_training[:2] == [False, False]
    assert recorder.frozen_bn_stats_changed[:2] == [False, False]


def test_unfrozen_batchnorm_trains_on_batch_statistics(trained):
    """Each epoch after a stage opens, its BatchNorm layers run in train mode and update their statistics."""
    _, _, recorder, _ = trained
    assert recorder.unfrozen_bn_training[0] == []  # head only: the head has no BatchNorm
    for training, changed in zip(recorder.unfrozen_bn_training[1:], recorder.unfrozen_bn_stats_changed[1:]):
        assert training and all(training)
        assert changed and all(changed)


def test_freeze_bn_stats_keeps_unfrozen_batchnorm_on_imagenet_statistics(synthetic_manifest):
    _, _, recorder, _ = fit_progressively(synthetic_manifest, freeze_bn_stats=True)
    assert len(recorder.unfrozen_bn_training[2]) > 0 and not any(recorder.unfrozen_bn_training[2])
    assert not any(recorder.unfrozen_bn_stats_changed[2])
    assert len(recorder.changed[2]) >= 0.9 * len(recorder.trainable[2])  # the affine weights still train


def test_train_bn_false_keeps_opened_batchnorm_frozen_on_imagenet_statistics(synthetic_manifest):
    """Lightning made an opened stage's BatchNorm weights require gradients while leaving them out of the
    optimizer, so its layers ran on batch statistics: the opposite of what train_bn=False asks."""
    model, _, recorder, trainer = fit_progressively(synthetic_manifest, train_bn=False)
    batchnorm = {n for n, m in model.net.named_modules() if isinstance(m, _BatchNorm)}
    batchnorm_params = {n for n, _ in model.net.named_parameters() if n.rsplit(".", 1)[0] in batchnorm}
    assert batchnorm_params and recorder.trainable[2] == {n for n, _ in model.net.named_parameters()} - batchnorm_params
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert all(p.requires_grad == (id(p) in optimized) for p in model.net.parameters())
    assert recorder.frozen_bn_training == [False] * 3 and recorder.frozen_bn_stats_changed == [False] * 3


@pytest.mark.parametrize("backbone", ["test_vit", "deit_tiny_distilled_patch16_224"])
def test_every_parameter_but_the_heads_is_in_exactly_one_stage(backbone):
    """A ViT's cls_token and pos_embed belong to no child module (they trained from the first epoch while the
    rest stayed frozen); a distilled DeiT names two heads (backbone_stages failed on it)."""
    import timm

    net = timm.create_model(backbone, pretrained=False, num_classes=3)
    in_stages = [id(p) for stage in backbone_stages(net) for p in stage.parameters()]
    outside = {n for n, p in net.named_parameters() if id(p) not in in_stages}
    assert len(in_stages) == len(set(in_stages)) and outside == {n for n, _ in net.named_parameters()
                                                                 if n.startswith(("head.", "head_dist."))}


def test_a_schedule_past_the_last_epoch_is_warned_about(synthetic_manifest, caplog):
    dm = ChestXrayDataModule.from_manifest(str(synthetic_manifest), preprocessing=PREP, batch_size=8)
    model = ChestXrayClassifier("test_efficientnet", dm.class_names, PREP, pretrained="none")
    trainer = L.Trainer(max_epochs=2, limit_train_batches=1, limit_val_batches=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        callbacks=[ProgressiveUnfreezing(unfreeze_at=[1, 3, 5], stages_per_step=[2, 3, -1])])
    with caplog.at_level("WARNING"):
        trainer.fit(model, datamodule=dm)
    assert "at epoch(s) [3, 5], but trainer.max_epochs=2 ends the run before" in caplog.text


@pytest.mark.parametrize("backbone", ["resnet10t", "test_convnext"])  # classifier `fc`; nested `head.fc`
def test_other_backbones_train_their_head_first(synthetic_manifest, backbone):
    torch.manual_seed(0)
    dm = ChestXrayDataModule.from_manifest(str(synthetic_manifest), preprocessing=PREP, batch_size=8)
    model = ChestXrayClassifier(backbone, dm.class_names, PREP, pretrained="none", dropout=0.0)
    recorder = Recorder()
    trainer = L.Trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        callbacks=[ProgressiveUnfreezing(unfreeze_at=[1], stages_per_step=[1]), recorder])
    trainer.fit(model, datamodule=dm)
    assert model.head_names <= recorder.trainable[0]
    assert len(recorder.trainable[0]) < len(recorder.trainable[1]) < len(list(model.net.parameters()))
    assert recorder.changed[0] and recorder.changed[1] <= recorder.trainable[1]


def test_schedule_validation():
    with pytest.raises(ValueError):
        ProgressiveUnfreezing(unfreeze_at=[3, 1], stages_per_step=[1, 1])
    with pytest.raises(ValueError):
        ProgressiveUnfreezing(unfreeze_at=[1], stages_per_step=[1, 2])


@pytest.mark.parametrize("scheduler, refused", [
    (partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=lambda epoch: 0.9 ** epoch), True),
    (partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=1), True),  # failed once past T_max
    (partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5), False),
])
def test_a_scheduler_that_cannot_follow_added_groups_is_refused_before_training(synthetic_manifest, scheduler, refused):
    """LambdaLR keeps one lambda per group from construction: it failed with a zip() error at the first step after
    unfreezing added a group, an epoch into the run."""
    dm = ChestXrayDataModule.from_manifest(str(synthetic_manifest), preprocessing=PREP, batch_size=8)
    model = ChestXrayClassifier("test_efficientnet", dm.class_names, PREP, pretrained="none", scheduler=scheduler)
    trainer = L.Trainer(max_epochs=2, limit_train_batches=1, limit_val_batches=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        callbacks=[ProgressiveUnfreezing(unfreeze_at=[1], stages_per_step=[-1])])
    if refused:
        with pytest.raises(ConfigError, match=f"{scheduler.func.__name__} cannot schedule"):
            trainer.fit(model, datamodule=dm)
        assert trainer.current_epoch == 0
    else:
        trainer.fit(model, datamodule=dm)
        head, backbone = (group["lr"] for group in trainer.optimizers[0].param_groups)
        assert head == pytest.approx(1e-3 * 0.5 ** 2)  # AdamW's default rate, halved after each of two epochs
        assert backbone == pytest.approx(head * model.backbone_lr_factor)  # and the group added at epoch 1 with it


def test_unfreezing_everything_at_epoch_zero_trains_the_whole_net_from_the_first_step(synthetic_manifest):
    """The schedule of experiment=lite0_full_finetune: no head-only epoch, one learning rate."""
    torch.manual_seed(0)
    dm = ChestXrayDataModule.from_manifest(str(synthetic_manifest), preprocessing=PREP, batch_size=8)
    model = ChestXrayClassifier("test_efficientnet", dm.class_names, PREP, pretrained="none", dropout=0.0,
                                backbone_lr_factor=1.0)
    recorder = Recorder()
    trainer = L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        callbacks=[ProgressiveUnfreezing(unfreeze_at=[0], stages_per_step=[-1]), recorder])
    trainer.fit(model, datamodule=dm)
    everything = {n for n, _ in model.net.named_parameters()}
    assert recorder.trainable[0] == everything
    assert len(recorder.changed[0]) >= 0.9 * len(everything)
    assert len({g["lr"] for g in trainer.optimizers[0].param_groups}) == 1


def test_a_resumed_run_keeps_training_the_stages_opened_before_the_interruption(synthetic_manifest, tmp_path):
    """Resuming after epoch 1 (two stages open): epoch 2 trains head and those stages at the rates they had,
    then opens the rest on schedule, exactly as an uninterrupted run does."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def trainer_for(max_epochs, *callbacks):
        return L.Trainer(max_epochs=max_epochs, limit_train_batches=2, limit_val_batches=1, logger=False,
                         enable_progress_bar=False, callbacks=[
                             ProgressiveUnfreezing(unfreeze_at=[1, 3], stages_per_step=[2, -1]),
                             ModelCheckpoint(dirpath=tmp_path, save_last=True), *callbacks])

    def fresh_model():
        return ChestXrayClassifier("test_efficientnet", dm.class_names, PREP, pretrained="none", dropout=0.0,
                                   backbone_lr_factor=0.1)

    torch.manual_seed(0)
    dm = ChestXrayDataModule.from_manifest(str(synthetic_manifest), preprocessing=PREP, batch_size=8)
    first = trainer_for(2)
    first.fit(fresh_model(), datamodule=dm)
    rates = [g["lr"] for g in first.optimizers[0].param_groups]
    assert len(rates) == 2

    model, recorder = fresh_model(), Recorder()
    resumed = trainer_for(4, recorder)
    resumed.fit(model, datamodule=dm, ckpt_path=str(tmp_path / "last.ckpt"), weights_only=False)
    stages = backbone_stages(model.net)
    opened = model.head_names | names_of(model, stages[:2])
    assert recorder.trainable[0] == opened  # epoch 2
    assert recorder.changed[0] <= opened and len(recorder.changed[0]) >= 0.9 * len(opened)
    assert recorder.trainable[1] == {n for n, _ in model.net.named_parameters()}  # epoch 3 opens the rest
    assert [g["lr"] for g in resumed.optimizers[0].param_groups][:2] == pytest.approx(rates)
    assert len(resumed.optimizers[0].param_groups) == 3
