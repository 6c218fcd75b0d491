"""Grad-CAM explainer, outside the server."""
from __future__ import annotations

import io

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch import nn

from conftest import CLASS_NAMES, TINY_PREPROCESSING
from cxr.explain import GradCamExplainer, default_target_layer
from cxr.inference import Classifier, load_classifier
from cxr.models.module import ChestXrayClassifier


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


@pytest.mark.parametrize("target, index", [("tuberculosis", 2), (1, 1), (np.int64(2), 2), ("0", 0), (" Pneumonia ", 1),
                                           ("TB", 2)])  # np.int64: what np.argmax gives
def test_requested_class(explainer, target, index):
    result = explainer.explain(image(1), target)
    assert result.target_index == index and result.target_class == CLASS_NAMES[index]


def test_different_targets_give_different_maps(explainer):
    a = explainer.explain(image(2), "normal").heatmap
    b = explainer.explain(image(2), "pneumonia").heatmap
    assert not np.allclose(a, b)


@pytest.mark.parametrize("target", ["fracture", 3, "-1", "1" * 5000])  # int() refuses over 4300 digits
def test_unknown_class_raises(explainer, target):
    with pytest.raises(KeyError):
        explainer.explain(image(), target)


def spatial_output(net: nn.Module, layer: nn.Module, size: int = 64) -> torch.Tensor:
    captured = []
    handle = layer.register_forward_hook(lambda _m, _i, out: captured.append(out))
    with torch.no_grad():
        net.eval()(torch.zeros(1, 3, size, size))
    handle.remove()
    return captured[0]


@pytest.mark.parametrize("backbone", ["test_efficientnet", "resnet10t", "mobilenetv3_small_050", "test_convnext"])
def test_target_layer_is_the_last_spatial_map(backbone):
    net = timm.create_model(backbone, num_classes=3)
    layer = default_target_layer(net, 64)
    with torch.no_grad():
        features = net.eval().forward_features(torch.zeros(1, 3, 64, 64))
    torch.testing.assert_close(spatial_output(net, layer), features)
    assert min(features.shape[-2:]) > 1


def test_target_layer_choice_by_name():
    efficientnet = timm.create_model("test_efficientnet", num_classes=3)
    assert default_target_layer(efficientnet) is efficientnet.bn2
    mobilenet = timm.create_model("mobilenetv3_small_050", num_classes=3)
    assert default_target_layer(mobilenet) is mobilenet.blocks  # not conv_head, which runs after pooling
    plain = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 8, 3), nn.AdaptiveAvgPool2d(1))
    assert default_target_layer(plain) is plain[2]
    with pytest.raises(ValueError, match="no convolutional layer"):
        default_target_layer(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)))
    with pytest.raises(ValueError, match="reshape transform"):
        default_target_layer(timm.create_model("test_vit", num_classes=3))


def test_mobilenet_heatmap_is_spatial():
    torch.manual_seed(0)
    module = ChestXrayClassifier("mobilenetv3_small_050", CLASS_NAMES, TINY_PREPROCESSING, pretrained="none")
    explainer = GradCamExplainer(Classifier(net=module.net, spec=module.inference_spec()))
    assert explainer.target_layers == [module.net.blocks]
    heatmap = explainer.explain(image(3), "pneumonia").heatmap
    assert heatmap.shape == (64, 64) and heatmap.std() > 0.01  # a 1x1 map would upsample to a constant


@pytest.mark.parametrize("target", [-1, "-1", " 3 ", "12345678901234567890"])
def test_an_index_out_of_range_is_named_as_such_whatever_its_sign(explainer, target):
    with pytest.raises(KeyError, match=r"class index \S+ out of range 0\.\.2"):
        explainer.class_index(target, np.zeros(3))
    assert explainer.class_index("+1", np.zeros(3)) == 1


def test_explaining_leaves_no_hooks_or_gradients_on_the_classifier(tiny_checkpoint):
    classifier = load_classifier(tiny_checkpoint)
    explainer = GradCamExplainer(classifier)
    explainer.explain(image(4))
    # A hook left behind would keep a copy of every later prediction's activations.
    assert not any(module._forward_hooks for module in classifier.net.modules())
    assert all(param.grad is None for param in classifier.net.parameters())
    assert explainer.explain(image(4)).heatmap.max() > 0  # and the next explanation still works
