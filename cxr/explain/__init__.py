"""Explanations (Grad-CAM) for trained classifiers."""
from cxr.explain.gradcam import Explanation, GradCamExplainer, default_target_layer

__all__ = ["Explanation", "GradCamExplainer", "default_target_layer"]
