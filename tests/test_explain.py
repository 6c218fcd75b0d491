"""Grad-CAM explainer, outside the server."""
from __future__ import annotations

import io

import numpy as np
import pytest
import timm
from PIL import Image
from torch import nn

from conftest import CLASS_NAMES
from cxr.explain import GradCamExplainer, default_target_layer
from cxr.inference import load_classifier


@pytest.fixture(scope="module")
def explainer(tiny_checkpoint):
    return GradCamExplainer(load_classifier(tiny_checkpoint))


def image(seed=0):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:90, 0:110]
    return (100 + 80 * np.sin(x / 8) * np.cos(y / 11) + rng.normal(0, 10, x.shape)).clip(0, 255).astype(np.uint8)


def test_predicted_class_heatmap(explainer):
    result = explainer.explain(image())
    probabilities = explainer.classifier.predict([image()])[0]
    np.testing.assert_allclose(result.probabilities, probabilities, atol=1e-6)
    assert result.target_index == int(np.argmax(probabilities))
    assert result.target_class == CLASS_NAMES[result.target_index]
    assert result.heatmap.shape == (64, 64)
    assert result.heatmap.min() >= 0.0 and result.heatmap.max() <= 1.0
    overlay = Image.open(io.BytesIO(result.overlay_png))
    assert overlay.format == "PNG" and overlay.size == (64, 64) and overlay.mode == "RGB"


@pytest.mark.parametrize("target, index", [("tuberculosis", 2), (1, 1), ("0", 0)])
def test_requested_class(explainer, target, index):
    result = explainer.explain(image(1), target)
    assert result.target_index == index and result.target_class == CLASS_NAMES[index]


def test_different_targets_give_different_maps(explainer):
    a = explainer.explain(image(2), "normal").heatmap
    b = explainer.explain(image(2), "pneumonia").heatmap
    assert not np.allclose(a, b)


@pytest.mark.parametrize("target", ["fracture", 3, "-1"])
def test_unknown_class_raises(explainer, target):
    with pytest.raises(KeyError):
        explainer.explain(image(), target)


def test_target_layer_choice():
    efficientnet = timm.create_model("test_efficientnet", num_classes=3)
    assert default_target_layer(efficientnet) is efficientnet.bn2
    resnet = timm.create_model("resnet10t", num_classes=3)
    assert default_target_layer(resnet) is resnet.layer4[-1]  # the usual Grad-CAM layer for ResNets
    plain = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 8, 3), nn.AdaptiveAvgPool2d(1))
    assert default_target_layer(plain) is plain[2]
    with pytest.raises(ValueError):
        default_target_layer(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)))
