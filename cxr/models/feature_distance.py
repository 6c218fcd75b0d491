"""How unlike its training images an image looks to the network: the Mahalanobis detector of Lee et al. (2018).

The squared Mahalanobis distance of an image's pooled features (the input of the classifier layer) to the
nearest training-class mean, under one covariance shared by the classes (Ledoit-Wolf shrinkage, so it is
well conditioned with fewer images than feature dimensions). The softmax is no warning of a new hospital:
models here call a held-out source's images tuberculosis with high confidence. The features are one:
experiments/ood_probe.md measured 70-85% of a held-out hospital's images beyond the distance that 95% of
validation images stay under, against 5-9% of in-distribution test images.

The fit is stored as a whitening matrix W (W^T W = covariance^-1) and the whitened class means, so the
distance is min_c |W f - W mean_c|^2: one matrix product per image, in float32 without the cancellation of
expanding the quadratic form, and the same operations in PyTorch and in the exported ONNX graph.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

TENSORS_KEY = "cxr_feature_distance"  # the checkpoint's top-level key for the fitted tensors (not JSON: not in the spec)
SPEC_KEY = "feature_distance"  # the spec's record of the fit: threshold and what it was fitted on


class FeatureDistance(nn.Module):
    def __init__(self, whitening: torch.Tensor, whitened_means: torch.Tensor):
        super().__init__()
        self.register_buffer("whitening", whitening.float())
        self.register_buffer("whitened_means", whitened_means.float())

    @classmethod
    def fit(cls, features: np.ndarray, targets: np.ndarray) -> "FeatureDistance":
        """Class means and the shrunk covariance of `features` (N, D) around them; every class in `targets` needs
        an image."""
        from sklearn.covariance import LedoitWolf

        features = np.asarray(features, dtype=np.float64)
        classes, rows_class = np.unique(targets, return_inverse=True)
        if len(features) < 2:
            raise ValueError(f"fitting a feature distance needs at least 2 images, got {len(features)}")
        means = np.stack([features[rows_class == c].mean(axis=0) for c in range(len(classes))])
        covariance = LedoitWolf().fit(features - means[rows_class]).covariance_
        eigenvalues, eigenvectors = np.linalg.eigh(covariance)
        if not (np.isfinite(eigenvalues).all() and eigenvalues.max() > 0):
            raise ValueError(f"the {len(features)} training images' features do not vary around their class means "
                             "(one image per class, or identical images): no feature distance can be fitted")
        floor = eigenvalues.max() * 1e-9  # shrinkage keeps them positive; the floor guards rounding only
        whitening = (eigenvectors / np.sqrt(np.maximum(eigenvalues, floor))).T
        return cls(torch.from_numpy(whitening), torch.from_numpy(means @ whitening.T))

    @classmethod
    def from_state(cls, state: dict) -> "FeatureDistance":
        return cls(state["whitening"], state["whitened_means"])

    def state(self) -> dict:
        return {"whitening": self.whitening.clone(), "whitened_means": self.whitened_means.clone()}

    @property
    def feature_dim(self) -> int:
        return self.whitening.shape[1]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(N, D) pooled features -> (N,) squared distance to the nearest class mean."""
        whitened = features.float() @ self.whitening.T
        return (whitened[:, None, :] - self.whitened_means[None]).square().sum(dim=-1).min(dim=1).values


def pooled_features_and_logits(net: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A timm network's pooled features (the classifier layer's input) and its logits, from one forward pass."""
    pooled = net.forward_head(net.forward_features(batch), pre_logits=True)
    return pooled, net.get_classifier()(pooled)


def supports_feature_distance(net: nn.Module) -> bool:
    """A single timm network with one classifier layer (ensembles average members whose features differ; a
    distilled DeiT averages two heads, each on its own token)."""
    return all(hasattr(net, name) for name in ("forward_features", "forward_head", "get_classifier")) \
        and isinstance(net.get_classifier(), nn.Module)


class ScoredNetwork(nn.Module):
    """The network with the distance as a second output: what the classifier runs and what cxr-export writes."""

    def __init__(self, net: nn.Module, feature_distance: FeatureDistance):
        super().__init__()
        self.net, self.feature_distance = net, feature_distance

    def forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, logits = pooled_features_and_logits(self.net, batch)
        return logits, self.feature_distance(pooled)
