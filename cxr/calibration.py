"""The operating point stored with a checkpoint: probabilities = softmax(logits / temperature + logit_bias).

`temperature` rescales confidence without changing any decision. `logit_bias` (one value per class, the
first class at 0) is a class-prior correction: it moves the decision boundary, e.g. when a balanced
sampler trained the model for equal class priors that the deployment does not have. Both are fitted by
minimising the negative log-likelihood on held-out labelled images (bias-corrected temperature scaling,
Alexandari et al., ICML 2020), never on the test split. Training, evaluation, export and serving all
turn logits into probabilities through `Calibration.probabilities`.

Importing this module costs only torch, like cxr.checkpoint.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from cxr.config import ConfigError

log = logging.getLogger(__name__)

METHODS = ("none", "temperature", "temperature_bias")
# Below this many images of some class, a fitted bias mostly fits noise: say so.
FEW_PER_CLASS = 30


@dataclass(frozen=True)
class Calibration:
    temperature: float = 1.0
    logit_bias: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")

    @classmethod
    def from_spec(cls, spec: dict) -> "Calibration":
        """Read a checkpoint spec; `logit_bias` is stored as {class name: value}, so the order cannot drift."""
        bias = spec.get("logit_bias")
        if bias:
            names = list(spec["class_names"])
            if set(bias) != set(names):
                raise ValueError(f"logit_bias classes {sorted(bias)} differ from the checkpoint's classes {names}")
            bias = tuple(float(bias[name]) for name in names)
        return cls(float(spec.get("temperature", 1.0)), bias or None)

    def to_spec(self, class_names: Sequence[str]) -> dict:
        bias = None if self.logit_bias is None else dict(zip(class_names, self.logit_bias))
        return {"temperature": float(self.temperature), "logit_bias": bias}

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        # float64: in float32 a probability within 6e-8 of 1 rounds to 1.0, so confident images of two classes
        # would tie and AUROC count them half right (logit gaps over about 17 after the temperature).
        scaled = logits.double() / self.temperature
        if self.logit_bias is not None:
            scaled = scaled + torch.tensor(self.logit_bias, dtype=scaled.dtype, device=scaled.device)
        return torch.softmax(scaled, dim=1)


# How to ask for a calibration without the per-class bias, in each tool that fits one.
TEMPERATURE_ONLY = ("the temperature method (method=temperature in cxr-calibrate, calibration.method=temperature in "
                    "cxr-train and cxr-soup)")


def check_calibration_targets(targets: Sequence[int], class_names: Sequence[str], method: str,
                              warn_few: bool = True) -> None:
    """Refuse data on which `method` cannot be fitted, and warn (`warn_few`) when a logit bias would rest on
    few images of some class; called before training as well as at fitting time."""
    if method not in METHODS:
        raise ConfigError(f"unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "none":
        return
    counts = torch.bincount(torch.as_tensor(list(targets), dtype=torch.long), minlength=len(class_names))
    if int(counts.sum()) == 0:
        raise ConfigError("no labelled images to fit the calibration on")
    missing = [name for name, n in zip(class_names, counts.tolist()) if n == 0]
    if method == "temperature_bias" and missing:
        raise ConfigError(f"cannot fit a logit bias without images of {missing}: use {TEMPERATURE_ONLY}, a split "
                          "that has every class, or a model without those classes (+data.class_names=[...])")
    if warn_few and method == "temperature_bias" and int(counts.min()) < FEW_PER_CLASS:
        log.warning("fitting a logit bias on only %s images per class (%s): it will be noisy; prefer %s or more "
                    "labelled images", int(counts.min()), dict(zip(class_names, counts.tolist())), TEMPERATURE_ONLY)


def fit_calibration(logits: torch.Tensor, targets: torch.Tensor, class_names: Sequence[str],
                    method: str = "temperature_bias", warn_few: bool = True) -> Calibration:
    """Minimise the mean negative log-likelihood of `targets` over log-temperature (and the bias).

    A standard-normal prior on log-temperature and on each bias, worth one image, keeps the fit finite
    when the split is perfectly classified (the NLL alone then drives the temperature to zero). On a few
    hundred images with informative logits it moves the fit little (a bias of -1.90 instead of -2.00 on
    301 images); on under ~100 images of uninformative logits it holds the temperature well below the
    pure-NLL optimum.
    """
    check_calibration_targets(targets.tolist(), class_names, method, warn_few)
    if method == "none":
        return Calibration()
    logits, targets = logits.detach().double(), targets.long()
    log_temperature = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(logits.shape[1], dtype=torch.float64, requires_grad=method == "temperature_bias")
    params = [log_temperature] + ([bias] if bias.requires_grad else [])
    optimizer = torch.optim.LBFGS(params, lr=1.0, max_iter=200, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        prior = 0.5 * (log_temperature.square().sum() + bias.square().sum()) / len(targets)
        loss = F.cross_entropy(logits / log_temperature.exp() + bias, targets) + prior
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = float(log_temperature.detach().exp())
    if not bias.requires_grad:
        return Calibration(temperature)
    centred = (bias - bias[0]).detach()
    return Calibration(temperature, tuple(float(b) for b in centred))


def negative_log_likelihood(probabilities: torch.Tensor, targets: torch.Tensor) -> float:
    picked = probabilities[torch.arange(len(targets)), targets.long()]
    return float(-torch.log(picked.clamp_min(1e-12)).mean())
