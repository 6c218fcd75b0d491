"""A prediction ensemble: several fine-tuned networks whose predicted probabilities are averaged.

Unlike a weight soup it costs one forward pass per member, but it needs no common basin: independent
fine-tunes that cannot be averaged weight by weight still average well as predictors. The output is
log of the mean probability, so softmax of it is that mean and a fitted temperature or logit bias
applies to it as to any classifier's logits.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn


class PredictionEnsemble(nn.Module):
    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least two networks, got {len(members)}")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        log_probabilities = torch.stack([torch.log_softmax(member(x), dim=1) for member in self.members])
        return torch.logsumexp(log_probabilities, dim=0) - math.log(len(self.members))
