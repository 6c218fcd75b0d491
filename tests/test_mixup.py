"""Mixup of training batches (`model.mixup`): the loss it trains on, when it steps aside, and its config."""
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from timm.data import Mixup

from cxr.data.preprocess import Preprocessing
from cxr.models.module import ChestXrayClassifier
from tests import test_losses
from tests.test_configs import compose_train

CLASSES = test_losses.CLASSES


def classifier(**kwargs) -> ChestXrayClassifier:
    torch.manual_seed(0)  # the same tiny net in every run
    return test_losses.classifier(**kwargs)


def decisive(model: ChestXrayClassifier) -> ChestXrayClassifier:
    """In eval mode (no dropout: the same images give the same logits), with a head scaled up so that the
    logits depend on the image: a random tiny net alone is near-uniform, and every loss would be log 3."""
    model.eval()
    with torch.no_grad():
        model.net.get_classifier().weight.mul_(50.0)
    return model


def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(n)
    return torch.randn(n, 3, 32, 32, generator=generator), torch.arange(n) % len(CLASSES)


def test_training_loss_is_cross_entropy_on_timm_mixed_images_and_soft_targets():
    model = decisive(classifier(label_smoothing=0.1, mixup=partial(Mixup, mixup_alpha=1.0, cutmix_alpha=0.0)))
    x, y = batch(8)
    np.random.seed(3)
    trained_on = float(model.training_step((x.clone(), y), 0))

    np.random.seed(3)
    mixed, soft_targets = Mixup(mixup_alpha=1.0, cutmix_alpha=0.0, label_smoothing=0.1, num_classes=3)(x.clone(), y)
    assert not torch.allclose(mixed, x)  # the draw really mixed the batch
    assert torch.allclose(soft_targets.sum(dim=1), torch.ones(8))
    expected = F.cross_entropy(model(mixed), soft_targets)
    unmixed = model.loss(model(x), y)
    assert trained_on == pytest.approx(float(expected), rel=1e-5)
    assert trained_on != pytest.approx(float(unmixed), rel=1e-3)


def test_an_odd_batch_trains_unmixed():
    model = decisive(classifier(mixup=partial(Mixup, mixup_alpha=1.0)))
    x, y = batch(5)
    assert float(model.training_step((x, y), 0)) == pytest.approx(float(model.loss(model(x), y)))


def test_mixup_with_the_auroc_surrogate_is_refused():
    with pytest.raises(ValueError, match="mixup and auc_loss_weight"):
        classifier(mixup=partial(Mixup), auc_loss_weight=1.0)


def test_the_mixup_experiment_builds_timm_mixup_for_the_model_classes_and_smoothing():
    cfg = compose_train("experiment=lite0_member_mixup")
    model = instantiate(cfg.model, backbone="test_efficientnet", pretrained="none", class_names=CLASSES,
                        preprocessing=Preprocessing(image_size=32))
    assert isinstance(model.mixup, Mixup)
    assert model.mixup.num_classes == 3 and model.mixup.label_smoothing == cfg.model.label_smoothing
    assert model.mixup.mixup_alpha > 0 and model.mixup.cutmix_alpha == 0
    assert classifier().mixup is None  # off unless asked for


def test_with_class_weights_each_mixed_image_is_weighted_by_its_soft_target():
    weights = torch.tensor([1.0, 2.0, 4.0])
    model = decisive(classifier(label_smoothing=0.1, class_weights=weights.tolist(), mixup=partial(Mixup, mixup_alpha=1.0)))
    x, y = batch(8)
    np.random.seed(5)
    trained_on = float(model.training_step((x.clone(), y), 0))

    np.random.seed(5)
    mixed, soft_targets = Mixup(mixup_alpha=1.0, label_smoothing=0.1, num_classes=3)(x.clone(), y)
    log_probabilities = F.log_softmax(model(mixed), dim=1)
    expected = -(soft_targets * weights * log_probabilities).sum(dim=1).mean()
    unweighted = -(soft_targets * log_probabilities).sum(dim=1).mean()
    assert trained_on == pytest.approx(float(expected), rel=1e-5)
    assert trained_on != pytest.approx(float(unweighted), rel=1e-3)
