"""The pairwise AUROC surrogate: what it measures, its gradient, and how the module adds it."""
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from cxr.data.preprocess import Preprocessing
from cxr.models.losses import pairwise_auc_loss
from cxr.models.module import ChestXrayClassifier

CLASSES = ["normal", "pneumonia", "tuberculosis"]


def one_vs_rest_aurocs(logits: torch.Tensor, targets: torch.Tensor) -> list[float]:
    scores = torch.softmax(logits, dim=1).numpy()
    return [roc_auc_score(targets.numpy() == c, scores[:, c]) for c in range(scores.shape[1])]


def test_matches_the_pairwise_definition_written_out():
    torch.manual_seed(0)
    logits, targets = torch.randn(9, 3), torch.tensor([0, 0, 1, 1, 1, 2, 2, 0, 1])
    scores = torch.softmax(logits, dim=1)
    per_class = []
    for c in range(3):
        pairs = [(i, j) for i, j in itertools.product(range(9), range(9)) if targets[i] == c and targets[j] != c]
        per_class.append(np.mean([max(0.0, 0.7 - float(scores[i, c] - scores[j, c])) ** 2 for i, j in pairs]))
    assert float(pairwise_auc_loss(logits, targets, margin=0.7)) == pytest.approx(np.mean(per_class), rel=1e-5)


@pytest.mark.parametrize("seed", range(5))
def test_zero_margin_loss_vanishes_exactly_when_every_class_is_perfectly_ranked(seed):
    generator = torch.Generator().manual_seed(seed)
    targets = torch.arange(12) % 3
    random_logits = torch.randn(12, 3, generator=generator)
    separable = F.one_hot(targets, 3).float() * 6 + 0.1 * random_logits
    for logits in (random_logits, separable):
        perfect = all(auc == 1.0 for auc in one_vs_rest_aurocs(logits, targets))
        assert (float(pairwise_auc_loss(logits, targets, margin=0.0)) == 0.0) == perfect
    assert all(auc == 1.0 for auc in one_vs_rest_aurocs(separable, targets))


def test_descending_the_loss_improves_the_ranking():
    torch.manual_seed(1)
    targets = torch.arange(30) % 3
    logits = torch.randn(30, 3).requires_grad_()
    before = np.mean(one_vs_rest_aurocs(logits.detach(), targets))
    optimizer = torch.optim.SGD([logits], lr=5.0)
    for _ in range(50):
        optimizer.zero_grad()
        pairwise_auc_loss(logits, targets).backward()
        optimizer.step()
    assert before < 0.8
    assert np.mean(one_vs_rest_aurocs(logits.detach(), targets)) > 0.95


def test_a_batch_of_one_class_has_no_pairs_and_zero_loss():
    logits = torch.randn(4, 3, requires_grad=True)
    loss = pairwise_auc_loss(logits, torch.zeros(4, dtype=torch.long))
    loss.backward()
    assert float(loss) == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


def classifier(**kwargs) -> ChestXrayClassifier:
    return ChestXrayClassifier("test_efficientnet", CLASSES, Preprocessing(image_size=32), pretrained="none", **kwargs)


def test_module_loss_is_the_class_weighted_label_smoothed_cross_entropy():
    torch.manual_seed(3)
    logits, targets = torch.randn(8, 3), torch.tensor([0, 1, 2, 0, 1, 2, 0, 0])
    weights = [0.5, 1.0, 3.0]
    expected = F.cross_entropy(logits, targets, weight=torch.tensor(weights), label_smoothing=0.1)
    loss = classifier(label_smoothing=0.1, class_weights=weights).loss(logits, targets)
    assert float(loss) == pytest.approx(float(expected))
    assert float(loss) != pytest.approx(float(F.cross_entropy(logits, targets, label_smoothing=0.1)))


def test_module_adds_the_weighted_term_to_the_cross_entropy():
    torch.manual_seed(2)
    logits, targets = torch.randn(8, 3), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    cross_entropy = F.cross_entropy(logits, targets, label_smoothing=0.1)
    assert float(classifier(label_smoothing=0.1).loss(logits, targets)) == pytest.approx(float(cross_entropy))
    weighted = classifier(label_smoothing=0.1, auc_loss_weight=0.5, auc_margin=0.8).loss(logits, targets)
    expected = cross_entropy + 0.5 * pairwise_auc_loss(logits, targets, margin=0.8)
    assert float(weighted) == pytest.approx(float(expected)) and float(weighted) > float(cross_entropy)


def test_a_negative_weight_is_refused():
    with pytest.raises(ValueError, match="auc_loss_weight"):
        classifier(auc_loss_weight=-0.1)
