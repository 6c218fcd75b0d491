"""Grad-CAM heatmaps for any cxr classifier (timm backbone), reusable outside the server.

    explainer = GradCamExplainer(classifier)          # a cxr.inference.Classifier
    result = explainer.explain(gray_uint8)            # predicted class
    result = explainer.explain(gray_uint8, "pneumonia")
    result.overlay_png  # PNG bytes: the heatmap over the image the model saw
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from cxr.models.ensemble import PredictionEnsemble


def default_target_layer(net: nn.Module) -> nn.Module:
    """The last spatial feature map before pooling.

    EfficientNet style timm models: `bn2` (conv_head + BN + activation) or `conv_head`. ResNet / ConvNeXt
    style: the last stage (`layer4`, `stages[-1]`). Anything else: the last Conv2d. Not right for timm's
    MobileNetV3, whose `conv_head` runs after global pooling (a 1x1 map): pass its last block instead.
    """
    for name in ("bn2", "conv_head"):
        layer = getattr(net, name, None)
        if isinstance(layer, nn.Module) and not isinstance(layer, nn.Identity):
            return layer
    for name in ("layer4", "stages", "features", "blocks"):
        layer = getattr(net, name, None)
        if isinstance(layer, nn.Sequential) and len(layer) > 0:
            return layer[-1]
        if isinstance(layer, nn.Module) and not isinstance(layer, nn.Identity):
            return layer
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"no convolutional layer found in {type(net).__name__} for Grad-CAM")
    return convs[-1]


def default_target_layers(net: nn.Module) -> list[nn.Module]:
    """One layer per network: for an ensemble, each member's, so the heatmap is the members' mean."""
    members = net.members if isinstance(net, PredictionEnsemble) else [net]
    return [default_target_layer(member) for member in members]


@dataclass
class Explanation:
    target_index: int
    target_class: str
    probabilities: np.ndarray  # (C,) calibrated, from the same forward pass family as predict
    heatmap: np.ndarray  # (H, W) float in [0, 1] at the model's input size
    overlay_png: bytes


class GradCamExplainer:
    def __init__(self, classifier, target_layer: nn.Module | None = None, alpha: float = 0.4):
        self.classifier = classifier
        self.alpha = alpha
        self.target_layers = [target_layer] if target_layer is not None else default_target_layers(classifier.net)
        self.cam = GradCAM(model=classifier.net, target_layers=self.target_layers)

    def class_index(self, target: str | int | None, probabilities: np.ndarray) -> int:
        names = self.classifier.class_names
        if target is None:
            return int(np.argmax(probabilities))
        if isinstance(target, int) or (isinstance(target, str) and target.isdigit()):
            index = int(target)
            if not 0 <= index < len(names):
                raise KeyError(f"class index {index} out of range 0..{len(names) - 1}")
            return index
        if target not in names:
            raise KeyError(f"unknown class {target!r}; classes are {names}")
        return names.index(target)

    def explain(self, gray: np.ndarray, target: str | int | None = None) -> Explanation:
        standardized = self.classifier.preprocessing.standardize(gray)
        tensor = self.classifier.preprocessing.to_tensor(standardized)[None]
        probabilities = self.classifier.probabilities(tensor)[0].numpy()
        index = self.class_index(target, probabilities)
        with torch.enable_grad():
            heatmap = self.cam(input_tensor=tensor, targets=[ClassifierOutputTarget(index)])[0]
        heatmap = np.nan_to_num(heatmap.astype(np.float32), nan=0.0).clip(0.0, 1.0)
        rgb = np.repeat(standardized[..., None], 3, axis=-1).astype(np.float32) / 255.0
        overlay = show_cam_on_image(rgb, heatmap, use_rgb=True, image_weight=1.0 - self.alpha)
        buffer = io.BytesIO()
        Image.fromarray(overlay).save(buffer, format="PNG")
        return Explanation(index, self.classifier.class_names[index], probabilities, heatmap, buffer.getvalue())
