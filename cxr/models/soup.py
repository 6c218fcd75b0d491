"""Model soups (Wortsman et al., ICML 2022): average the weights of several fine-tunes of the same
pretrained network into one network that costs no more to run than any of them.

`greedy_soup` follows the paper's greedy recipe: members in order of their own validation score, each
kept only if the soup's validation score does not drop, so a member that left the common basin is
left out instead of spoiling the average.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from cxr.config import ConfigError

# What must agree for an average of weights to be one model that sees the same pixels and classes, and
# (data_summary) for the selection split to be one that no member trained on.
SHARED_SPEC_FIELDS = ("class_names", "backbone", "backbone_kwargs", "preprocessing", "data_summary")


def check_soup_members(specs: Sequence[dict], names: Sequence[str]) -> None:
    if len(specs) < 2:
        raise ConfigError(f"a soup needs at least two checkpoints, got {len(specs)}")
    for spec, name in zip(specs, names):
        if spec.get("ensemble_size"):
            raise ConfigError(f"{name} is already an ensemble of {spec['ensemble_size']} networks; pass its members")
    for spec, name in zip(specs[1:], names[1:]):
        for field in SHARED_SPEC_FIELDS:
            if spec.get(field) != specs[0].get(field):
                raise ConfigError(f"{name} differs from {names[0]} in {field} ({spec.get(field)!r} vs "
                                  f"{specs[0].get(field)!r}): a soup averages fine-tunes of one architecture, "
                                  "with one preprocessing and class order, trained on the same split")


def average_weights(nets: Sequence[nn.Module]) -> nn.Module:
    """A new network whose parameters and buffers (BatchNorm statistics too) are the members' mean."""
    averaged = AveragedModel(nets[0], use_buffers=True)
    for net in nets:
        averaged.update_parameters(net)
    members = [dict(net.named_buffers()) for net in nets]
    for name, buffer in averaged.module.named_buffers():
        if not buffer.is_floating_point():  # BatchNorm's num_batches_tracked: the running mean truncated each step
            buffer.copy_(torch.stack([m[name] for m in members]).double().mean(dim=0).round().to(buffer.dtype))
    return averaged.module


def greedy_soup(nets: Sequence[nn.Module], score: Callable[[nn.Module], float]) -> dict:
    """Indices of the members to average (`kept`), each member's own score and the soup's score."""
    individual = [score(net) for net in nets]
    order = sorted(range(len(nets)), key=lambda i: individual[i], reverse=True)
    kept, best = [order[0]], individual[order[0]]
    tried = []
    for i in order[1:]:
        candidate = score(average_weights([nets[j] for j in kept + [i]]))
        tried.append({"added": i, "score": candidate, "kept": candidate >= best})
        if candidate >= best:
            kept, best = kept + [i], candidate
    return {"kept": sorted(kept), "member_scores": individual, "steps": tried, "score": best}
