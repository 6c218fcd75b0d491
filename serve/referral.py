"""The referral rule: when a prediction must be reviewed by a clinician.

A prediction needs review when
  1. its confidence (the top calibrated probability) is below `review_confidence`, or
  2. per-class thresholds are known (checkpoint spec key "thresholds": {class: t}) and the threshold
     decision disagrees with the argmax: the argmax class has a threshold it does not reach, or
     another class reaches its own threshold, or
  3. the checkpoint has a feature distance fitted (spec key "feature_distance") and the image lies beyond
     its threshold: it is unlike the training images, whatever the probabilities say.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Referral:
    class_names: list[str]
    review_confidence: float
    thresholds: dict[str, float] = field(default_factory=dict)
    feature_distance: dict | None = None  # spec["feature_distance"]: threshold, pass_rate, split

    def __post_init__(self) -> None:
        unknown = set(self.thresholds) - set(self.class_names)
        if unknown:
            raise ValueError(f"thresholds for unknown classes {sorted(unknown)}; classes are {self.class_names}")

    @classmethod
    def from_spec(cls, spec: dict, review_confidence: float) -> "Referral":
        thresholds = {str(k): float(v) for k, v in (spec.get("thresholds") or {}).items()}
        return cls(list(spec["class_names"]), float(review_confidence), thresholds, spec.get("feature_distance"))

    def describe(self) -> str:
        rule = f"needs_review when confidence < {self.review_confidence}"
        if self.thresholds:
            rule += " or when the per-class threshold decision (p >= threshold) disagrees with the argmax"
        if self.feature_distance:
            fit = self.feature_distance
            rule += (f" or when the image's feature distance to the training images exceeds {fit['threshold']:.1f}, "
                     f"which {fit['pass_rate']:.0%} of the {fit['split']} split stays under (unlike_training_data)")
        return rule

    def decide(self, probabilities: np.ndarray, feature_distance: float | None = None
               ) -> tuple[str, float, bool, str | None]:
        """-> (label, confidence, needs_review, review_reason); `feature_distance` is the image's, when the model
        computes one."""
        index = int(np.argmax(probabilities))
        label, confidence = self.class_names[index], float(probabilities[index])
        reasons = []
        if confidence < self.review_confidence:
            reasons.append(f"low_confidence: {confidence:.3f} < {self.review_confidence}")
        if self.thresholds:
            p = dict(zip(self.class_names, (float(x) for x in probabilities)))
            if label in self.thresholds and p[label] < self.thresholds[label]:
                reasons.append(f"threshold_disagreement: {label} {p[label]:.3f} < threshold {self.thresholds[label]}")
            others = [c for c, t in self.thresholds.items() if c != label and p[c] >= t]
            if others:
                reasons.append("threshold_disagreement: " + ", ".join(
                    f"{c} {p[c]:.3f} >= threshold {self.thresholds[c]}" for c in others))
        if self.feature_distance and feature_distance is not None and feature_distance > self.feature_distance["threshold"]:
            # 9 significant digits tell any two float32 values apart
            reasons.append(f"unlike_training_data: feature distance {feature_distance:.9g} > "
                           f"{self.feature_distance['threshold']:.9g}")
        return label, confidence, bool(reasons), "; ".join(reasons) or None
