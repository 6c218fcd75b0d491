"""Sharpness-aware minimisation (SAM; Foret et al., ICLR 2021) around whatever optimizer the run uses.

Each step takes the gradient g at the weights w, moves to w + e with e = rho * g / ||g|| (the norm over every
parameter the optimizer trains; to first order the worst point within distance rho), takes the gradient there,
steps back to w and lets the optimizer apply that second gradient. The optimizer itself is untouched: its state,
its parameter groups (the ones progressive unfreezing adds), learning-rate schedules and checkpoints work as without
SAM, at the cost of a second forward and backward pass per step.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch.nn.modules.batchnorm import _BatchNorm


def trained_parameters(param_groups: Iterable[dict]) -> list[torch.nn.Parameter]:
    """The parameters an optimizer step would change: in its groups and given a gradient by the backward pass."""
    return [p for group in param_groups for p in group["params"] if p.grad is not None]


@contextmanager
def ascended(parameters: list[torch.nn.Parameter], rho: float) -> Iterator[None]:
    """Weights moved by rho along their normalised gradient for the block's duration, and put back exactly after
    it."""
    if not parameters:
        yield
        return
    with torch.no_grad():
        start = [p.detach().clone() for p in parameters]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in parameters]))
        scale = rho / (norm + 1e-12)
        for p in parameters:
            p.add_(p.grad * scale)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, weights in zip(parameters, start):
                p.copy_(weights)


@contextmanager
def batchnorm_statistics_kept(module: torch.nn.Module) -> Iterator[None]:
    """BatchNorm layers in training mode normalise with their batch's statistics but do not fold them into their
    running statistics: the batch was already counted once, at the unperturbed weights."""
    layers = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]
    kept = [(m.momentum, m.num_batches_tracked.clone()) for m in layers]
    for layer in layers:
        layer.momentum = 0.0
    try:
        yield
    finally:
        for layer, (momentum, batches) in zip(layers, kept):
            layer.momentum = momentum
            layer.num_batches_tracked.copy_(batches)
