"""Grad-CAM heatmaps for any cxr classifier (timm backbone), reusable outside the server.

    explainer = GradCamExplainer(classifier)          # a cxr.inference.Classifier
    result = explainer.explain(gray_uint8)            # predicted class
    result = explainer.explain(gray_uint8, "pneumonia")
    result.overlay_png  # PNG bytes: the heatmap over the image the model saw
    result.region       # {x, y, width, height}: the box of gray_uint8 that the heatmap covers
"""
from __future__ import annotations

import io
import numbers
import re
from contextlib import contextmanager
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from cxr.data.index import canonical_label
from cxr.models.ensemble import PredictionEnsemble


def default_target_layer(net: nn.Module, input_size: int | None = None) -> nn.Module:
    """The outermost module giving the last spatial feature map (H, W > 1) of a forward pass (timm models:
    of `forward_features`) at `input_size` (default: the model's own).

    Found by running a dummy image through the network, so it follows the real data flow rather than
    attribute names: `bn2` for timm EfficientNets, `layer4` for ResNets, `blocks` for timm's MobileNetV3
    (whose `conv_head` runs after global pooling, on a 1x1 map). Token-based backbones (ViT) end in a
    (B, N, C) sequence and need an explicit layer and a reshape transform, so they raise.
    """
    channels, size = _input_shape(net)
    dummy = torch.zeros(1, channels, input_size or size, input_size or size)
    spatial: list[nn.Module] = []

    def record(module: nn.Module, _inputs, output) -> None:
        if isinstance(output, torch.Tensor) and output.ndim == 4 and min(output.shape[-2:]) > 1:
            spatial.append(module)

    hooks = [m.register_forward_hook(record) for m in net.modules() if m is not net and not isinstance(m, nn.Identity)]
    try:  # timm models: only the features, so nothing after pooling is traced
        with _eval_mode(net), torch.no_grad():
            output = net.forward_features(dummy) if hasattr(net, "forward_features") else net(dummy)
    finally:
        for hook in hooks:
            hook.remove()
    if hasattr(net, "forward_features") and output.ndim != 4:
        raise ValueError(f"{type(net).__name__} ends in {output.ndim}-D features, not a spatial map: "
                         "pass target_layer (and a reshape transform) for Grad-CAM")
    if not spatial:
        raise ValueError(f"no spatial feature map found in {type(net).__name__} for Grad-CAM")
    return spatial[-1]  # hooks fire inner module first, so the last is the outermost of the last map


def _input_shape(net: nn.Module) -> tuple[int, int]:
    """(channels, side) of a dummy input: the first convolution's channels, the model's own input size."""
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"no convolutional layer found in {type(net).__name__} for Grad-CAM")
    input_size = getattr(net, "pretrained_cfg", {}).get("input_size", (0, 224, 224))
    return convs[0].in_channels, int(input_size[-1])


@contextmanager
def _eval_mode(net: nn.Module):
    was_training = net.training
    net.eval()
    try:
        yield
    finally:
        net.train(was_training)


def default_target_layers(net: nn.Module, input_size: int | None = None) -> list[nn.Module]:
    """One layer per network: for an ensemble, each member's, so the heatmap is the members' mean."""
    members = net.members if isinstance(net, PredictionEnsemble) else [net]
    return [default_target_layer(member, input_size) for member in members]


class MemberWeightedGradCAM(GradCAM):
    """Grad-CAM whose target layers' maps are averaged before the one scaling to [0, 1].

    pytorch-grad-cam scales each layer's map to [0, 1] before averaging, so with one layer per ensemble member a
    member that barely moves the ensemble's output would still draw its share of the heatmap at full strength. Left
    unscaled, each member's map counts by its gradients: by how much it moves the ensemble's score. With one layer
    (a single network) the result is pytorch-grad-cam's.
    """

    def compute_cam_per_layer(self, input_tensor, targets, eigen_smooth):
        width, height = self.get_target_width_height(input_tensor)
        layers = zip(self.target_layers, self.activations_and_grads.activations, self.activations_and_grads.gradients)
        cams = []
        for layer, activations, gradients in layers:
            cam = np.maximum(self.get_cam_image(input_tensor, layer, targets, activations.numpy(), gradients.numpy(),
                                                eigen_smooth), 0)
            cams.append(np.float32([cv2.resize(np.float32(image), (width, height)) for image in cam])[:, None])
        return cams


@dataclass
class Explanation:
    target_index: int
    target_class: str
    probabilities: np.ndarray  # (C,) calibrated, from the same forward pass family as predict
    feature_distance: float | None  # the image's, for a classifier with a feature distance fitted
    heatmap: np.ndarray  # (H, W) float in [0, 1] at the model's input size
    overlay_png: bytes
    region: dict  # the box of the explained image that the heatmap covers (Preprocessing.input_region)


class GradCamExplainer:
    def __init__(self, classifier, target_layer: nn.Module | None = None, alpha: float = 0.4):
        self.classifier = classifier
        self.alpha = alpha
        self.target_layers = [target_layer] if target_layer is not None else default_target_layers(
            classifier.net, classifier.preprocessing.image_size)

    def class_index(self, target: str | int | None, probabilities: np.ndarray) -> int:
        names = self.classifier.class_names
        if target is None:
            return int(np.argmax(probabilities))
        integral = isinstance(target, numbers.Integral) and not isinstance(target, bool)  # np.argmax's too
        # ASCII digits only ("²".isdigit() is true, yet int("²") fails); a sign too: "-1" is an index out of range.
        written = isinstance(target, str) and re.fullmatch(r"[+-]?[0-9]+", target.strip()) is not None
        if integral or written:
            # Past 4300 digits int() raises: no index needs more than a few.
            index = int(target) if integral or len(target.strip()) <= 10 else len(names)
            if not 0 <= index < len(names):
                raise KeyError(f"class index {str(target).strip()[:20]} out of range 0..{len(names) - 1}")
            return index
        label = canonical_label(target)  # as data labels are read: any case, spaces around, aliases (TB)
        if label not in names:
            raise KeyError(f"unknown class {target!r}; classes are {names}")
        return names.index(label)

    def explain(self, gray: np.ndarray, target: str | int | None = None) -> Explanation:
        standardized = self.classifier.preprocessing.standardize(gray)
        tensor = self.classifier.preprocessing.to_tensor(standardized)[None]
        logits, distance = self.classifier.logits_and_distance(tensor)
        probabilities = self.classifier.calibration.probabilities(logits)[0].numpy()
        index = self.class_index(target, probabilities)
        # Hooks only for this call: left on the network, they would keep a copy of every later forward pass's
        # activations (the classifier's own predictions too). Gradients go with them.
        try:
            with MemberWeightedGradCAM(model=self.classifier.net, target_layers=self.target_layers) as cam, \
                    torch.enable_grad():
                heatmap = cam(input_tensor=tensor, targets=[ClassifierOutputTarget(index)])[0]
        finally:
            self.classifier.net.zero_grad(set_to_none=True)
        heatmap = np.nan_to_num(heatmap.astype(np.float32), nan=0.0).clip(0.0, 1.0)
        rgb = np.repeat(standardized[..., None], 3, axis=-1).astype(np.float32) / 255.0
        overlay = show_cam_on_image(rgb, heatmap, use_rgb=True, image_weight=1.0 - self.alpha)
        buffer = io.BytesIO()
        Image.fromarray(overlay).save(buffer, format="PNG")
        return Explanation(index, self.classifier.class_names[index], probabilities,
                           None if distance is None else float(distance[0]), heatmap, buffer.getvalue(),
                           self.classifier.preprocessing.input_region(*gray.shape))
