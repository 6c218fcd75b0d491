"""Sharpness-aware steps (`model.sam_rho`): the update a Lightning step applies, what it leaves untouched, and
the settings it refuses."""
import copy
from functools import partial

import lightning as L
import pytest
import torch
from timm.data import Mixup
from torch.utils.data import DataLoader, TensorDataset

from cxr.config import ConfigError
from cxr.models.sharpness import ascended, batchnorm_statistics_kept, trained_parameters
from cxr.run_checks import check_run_settings
from tests import test_losses
from tests.test_configs import compose_train

RHO, LR = 0.5, 0.1


def classifier(**kwargs):
    torch.manual_seed(0)
    return test_losses.classifier(dropout=0.0, label_smoothing=0.0, optimizer=partial(torch.optim.SGD, lr=LR),
                                   backbone_lr_factor=1.0, **kwargs)


def one_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(6, 3, 32, 32, generator=generator), torch.tensor([0, 1, 2, 0, 1, 2])


def gradients(model, x, y) -> tuple[float, list[torch.Tensor]]:
    model.zero_grad()
    loss = model.loss(model(x), y)
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters()]


def fit_one_step(model) -> L.Trainer:
    x, y = one_batch()
    trainer = L.Trainer(max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=len(y)))
    return trainer


def batchnorm_statistics(model) -> list[torch.Tensor]:
    return [b.clone() for name, b in model.named_buffers() if "running_" in name]


def test_a_lightning_step_applies_the_gradient_taken_at_the_ascended_weights():
    model = classifier(sam_rho=RHO)
    reference = copy.deepcopy(model).train()
    x, y = one_batch()
    start = [p.detach().clone() for p in reference.parameters()]
    clean_loss, at_w = gradients(reference, x, y)
    statistics_after_one_pass = batchnorm_statistics(reference)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in at_w]))
    with torch.no_grad():
        for p, g in zip(reference.parameters(), at_w):
            p.add_(RHO * g / norm)
    _, at_ascended = gradients(reference, x, y)

    trainer = fit_one_step(model)

    trained = list(model.parameters())
    sharpness_aware = [w - LR * g for w, g in zip(start, at_ascended)]
    plain = [w - LR * g for w, g in zip(start, at_w)]
    assert all(torch.allclose(p, e, atol=1e-6) for p, e in zip(trained, sharpness_aware))
    assert not all(torch.allclose(p, e, atol=1e-4) for p, e in zip(trained, plain))  # the ascent changed the step
    # BatchNorm counted the batch once, at w; the logged loss is the one at w, not at the ascended weights.
    assert all(torch.equal(a, b) for a, b in zip(batchnorm_statistics(model), statistics_after_one_pass))
    assert float(trainer.callback_metrics["train/loss_epoch"]) == pytest.approx(clean_loss, rel=1e-6)


def test_without_rho_the_step_is_the_plain_one():
    model = classifier()
    reference = copy.deepcopy(model).train()
    start = [p.detach().clone() for p in reference.parameters()]
    _, at_w = gradients(reference, *one_batch())
    fit_one_step(model)
    assert all(torch.allclose(p, w - LR * g, atol=1e-6) for p, w, g in zip(model.parameters(), start, at_w))


def test_the_ascent_moves_trained_weights_by_rho_and_puts_them_back():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    net[0].requires_grad_(False)  # a frozen stage: no gradient, so not moved
    net(torch.randn(5, 4)).square().sum().backward()
    parameters = trained_parameters([{"params": list(net.parameters())}])
    assert parameters == list(net[1].parameters())
    before = [p.detach().clone() for p in net.parameters()]
    with ascended(parameters, 0.3):
        moved = [p.detach() - b for p, b in zip(net.parameters(), before)]
        assert float(torch.linalg.vector_norm(torch.cat([m.flatten() for m in moved]))) == pytest.approx(0.3, rel=1e-5)
        assert all(torch.equal(m, torch.zeros_like(m)) for m in moved[:2])
        assert torch.allclose(moved[2], 0.3 * net[1].weight.grad / torch.linalg.vector_norm(
            torch.cat([p.grad.flatten() for p in parameters])))
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))
    with ascended([], 0.3):  # nothing trained in this step: nothing moves
        assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))


def test_batchnorm_in_training_mode_uses_the_batch_but_keeps_its_running_statistics():
    norm = torch.nn.BatchNorm1d(3).train()
    norm(torch.randn(8, 3) + 5)
    kept = batchnorm_statistics(norm) + [norm.num_batches_tracked.clone()]
    with batchnorm_statistics_kept(norm):
        out = norm(torch.randn(8, 3) - 5)
    assert torch.allclose(out.mean(dim=0), torch.zeros(3), atol=1e-5)  # normalised with the batch's own mean
    assert all(torch.equal(a, b) for a, b in zip(batchnorm_statistics(norm) + [norm.num_batches_tracked], kept))
    assert norm.momentum == 0.1
    norm(torch.randn(8, 3) - 5)
    assert not torch.equal(norm.running_mean, kept[0])  # outside the block it counts batches again


@pytest.mark.parametrize("rho", [-0.1, True, "0.05"])
def test_a_rho_that_is_not_a_radius_is_refused(rho):
    with pytest.raises(ValueError, match="sam_rho"):
        classifier(sam_rho=rho)


def test_sharpness_aware_steps_with_mixup_are_refused():
    with pytest.raises(ValueError, match="sam_rho and mixup"):
        classifier(sam_rho=0.05, mixup=partial(Mixup, mixup_alpha=1.0))


def test_sharpness_aware_steps_with_accumulated_gradients_are_refused_before_any_image_is_decoded():
    check_run_settings(compose_train("model=tiny", "model.sam_rho=0.05"))
    with pytest.raises(ConfigError, match="accumulate_grad_batches"):
        check_run_settings(compose_train("model=tiny", "model.sam_rho=0.05", "trainer.accumulate_grad_batches=2"))


def test_the_sam_experiment_is_lite0_long_warmup_with_an_ascent_and_the_lowest_stages_frozen():
    cfg, warmup = compose_train("experiment=lite0_long_sam"), compose_train("experiment=lite0_long_warmup")
    assert cfg.model.sam_rho == 0.05 and warmup.model.sam_rho == 0
    assert list(cfg.callbacks.unfreeze.stages_per_step) == [6]
    assert cfg.callbacks.lr_decay.added_group_warmup_epochs == warmup.callbacks.lr_decay.added_group_warmup_epochs == 1
    assert cfg.trainer.max_epochs == warmup.trainer.max_epochs
