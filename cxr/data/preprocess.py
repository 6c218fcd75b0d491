"""The one preprocessing definition shared by training, evaluation and serving.

`Preprocessing` is stored in every checkpoint (`to_dict`) and rebuilt from it (`from_dict`), so a
served model sees exactly the pixels it was evaluated on. It has two stages:

- `standardize`: greyscale uint8 of any size -> greyscale uint8 at `image_size` (border crop, a
  common effective resolution for every source, optional contrast equalisation). Its output is
  what the training cache stores, and what augmentation runs on.
- `to_tensor`: standardized uint8 -> normalised float tensor with `in_chans` channels.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import cached_property

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2

EQUALIZE_CHOICES = ("none", "clahe", "histogram")
# 8-bit pixels are divided by this before mean/std normalisation (training, serving, and what /model/info and the
# ONNX metadata tell other code to do).
MAX_PIXEL_VALUE = 255.0


@dataclass(frozen=True)
class Preprocessing:
    image_size: int = 224
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    in_chans: int = 3
    # Fraction of each side cropped away: burned-in markers and collimation edges sit there.
    crop_border: float = 0.0
    # Downsample every image to this size first, so no source keeps more detail than the others.
    effective_size: int | None = None
    equalize: str = "none"
    clahe_clip_limit: float = 2.0
    clahe_tile_grid: int = 8
    version: int = field(default=1)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if self.equalize not in EQUALIZE_CHOICES:
            raise ValueError(f"equalize must be one of {EQUALIZE_CHOICES}, got {self.equalize!r}")
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise ValueError(f"mean/std need {self.in_chans} values (in_chans), got {self.mean} / {self.std}")
        if not 0.0 <= self.crop_border < 0.5:
            raise ValueError(f"crop_border must be in [0, 0.5), got {self.crop_border}")

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict) -> "Preprocessing":
        return cls(**dict(values))

    @cached_property
    def _standardize(self) -> A.Compose:
        steps: list[A.BasicTransform] = []
        if self.crop_border > 0:
            steps.append(A.CropAndPad(percent=-self.crop_border, keep_size=False, p=1.0))
        if self.effective_size:
            steps.append(A.Resize(self.effective_size, self.effective_size, interpolation=cv2.INTER_AREA))
        steps.append(A.Resize(self.image_size, self.image_size, interpolation=cv2.INTER_AREA))
        if self.equalize == "clahe":
            steps.append(A.CLAHE(clip_limit=(self.clahe_clip_limit, self.clahe_clip_limit),
                                 tile_grid_size=(self.clahe_tile_grid, self.clahe_tile_grid), p=1.0))
        elif self.equalize == "histogram":
            steps.append(A.Equalize(p=1.0))
        return A.Compose(steps)

    @cached_property
    def _normalize(self) -> A.Compose:
        # Grey input is normalised per output channel after replication, so mean/std stay per channel.
        return A.Compose([A.Normalize(mean=self.mean, std=self.std, max_pixel_value=MAX_PIXEL_VALUE), ToTensorV2()])

    def steps(self) -> list[str]:
        """The pipeline `__call__` runs, in words, for code outside Python that feeds an exported model (ONNX
        metadata, /model/info): its input is the 8-bit greyscale image cxr.data.decode makes."""
        steps = [f"crop int({self.crop_border} * side) pixels off each side"] if self.crop_border > 0 else []
        for size in ([self.effective_size] if self.effective_size else []) + [self.image_size]:
            steps.append(f"resize to {size} x {size} by area averaging (OpenCV INTER_AREA)")
        if self.equalize == "clahe":
            steps.append(f"CLAHE (OpenCV createCLAHE, clip limit {self.clahe_clip_limit}, "
                         f"{self.clahe_tile_grid} x {self.clahe_tile_grid} tiles)")
        elif self.equalize == "histogram":
            steps.append("histogram equalisation (OpenCV equalizeHist)")
        steps.append(f"repeat the grey channel {self.in_chans} times; channel c becomes "
                     f"(value / {MAX_PIXEL_VALUE:g} - mean[c]) / std[c] with mean {list(self.mean)} and std "
                     f"{list(self.std)}; float32, channels first")
        return steps

    def input_region(self, height: int, width: int) -> dict:
        """The box of a `height` x `width` image that the model's square input shows (after the border crop,
        stretched to `image_size`), in that image's pixels: where a heatmap at the input size lies on the original.
        The crop is A.CropAndPad's with a negative percent: int(crop_border * side) pixels off each side."""
        top, left = int(self.crop_border * height), int(self.crop_border * width)
        return {"x": left, "y": top, "width": width - 2 * left, "height": height - 2 * top}

    def standardize(self, gray: np.ndarray) -> np.ndarray:
        if gray.dtype != np.uint8 or gray.ndim != 2:
            raise ValueError(f"standardize expects an HxW uint8 array, got {gray.dtype} {gray.shape}")
        return self._standardize(image=gray)["image"]

    def to_tensor(self, standardized: np.ndarray) -> torch.Tensor:
        channels = np.repeat(standardized[..., None], self.in_chans, axis=-1)
        return self._normalize(image=channels)["image"]

    def __call__(self, gray: np.ndarray) -> torch.Tensor:
        return self.to_tensor(self.standardize(gray))
