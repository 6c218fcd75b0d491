"""Procedurally generated chest-radiograph-like images, deterministic by seed.

Each image has a thorax, two lung fields, a mediastinum, ribs and a diaphragm. Pneumonia adds
diffuse opacities in the lower/middle zones; tuberculosis adds upper-lobe consolidation with
cavities. Every image is written with its lesion mask (empty for normal) and a manifest, so the
synthetic set goes through the same decode / index / split path as real data.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np

from cxr.config import is_whole_number
from cxr.data.index import CLASS_NAMES, DataConfigError

GENERATOR_VERSION = 2
# Below this many pixels a side the lungs, ribs and lesions are a few pixels wide: lesion masks come out empty.
MIN_SIZE = 32
VISIBLE_OPACITY = 0.05  # twice the noise's standard deviation: a pneumonia mask covers what shows above it


def _blur(field: np.ndarray, sigma: float) -> np.ndarray:
    return cv2.GaussianBlur(field, (0, 0), sigmaX=sigma)


def _lung_masks(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    cy = 0.52 + rng.uniform(-0.03, 0.03)
    half_h = 0.30 + rng.uniform(-0.03, 0.03)
    half_w = 0.17 + rng.uniform(-0.02, 0.02)
    gap = 0.09 + rng.uniform(-0.01, 0.02)
    lungs = []
    for side in (-1, 1):
        cx = 0.5 + side * (gap + half_w)
        lungs.append(((xx - cx) / half_w) ** 2 + ((yy - cy) / half_h) ** 2 <= 1.0)
    geometry = {"cy": cy, "half_h": half_h, "half_w": half_w, "gap": gap}
    return lungs[0], lungs[1], geometry


def _base_radiograph(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """The image and the lung fields left visible above the diaphragm, where lesions may be drawn."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    thorax = ((xx - 0.5) / 0.42) ** 2 + ((yy - 0.55) / 0.47) ** 2 <= 1.0
    image = np.where(thorax, 0.72, 0.08).astype(np.float32)
    left, right, geo = _lung_masks(size, rng)
    lungs = left | right
    image[lungs] = 0.22
    mediastinum = (np.abs(xx - 0.5) < geo["gap"] * 0.9) & (yy > geo["cy"] - geo["half_h"]) & thorax
    image[mediastinum] = 0.85
    for k in range(9):  # posterior ribs: bright arcs over the lung fields
        y0 = geo["cy"] - geo["half_h"] + 0.07 * k + rng.uniform(-0.01, 0.01)
        arc = np.abs(yy - (y0 + 0.12 * (xx - 0.5) ** 2 * 4)) < 0.008
        image[arc & lungs] += 0.16
    diaphragm = yy > geo["cy"] + geo["half_h"] * 0.92 - 0.05 * np.cos((xx - 0.5) * 6)
    image[diaphragm & thorax] = 0.8
    image = _blur(image, size / 128)
    image += rng.normal(0, 0.025, image.shape).astype(np.float32)
    return image, left & ~diaphragm, right & ~diaphragm, geo


def _pneumonia(image: np.ndarray, left: np.ndarray, right: np.ndarray, geo: dict, rng: np.random.Generator):
    size = image.shape[0]
    yy = np.mgrid[0:size, 0:size][0].astype(np.float32) / size
    zone = yy > geo["cy"] - geo["half_h"] * 0.2  # lower and middle zones
    sides = [left, right] if rng.random() < 0.6 else [[left, right][rng.integers(2)]]
    region = np.zeros_like(left)
    for lung in sides:
        region |= lung & zone
    texture = _blur(rng.random(image.shape).astype(np.float32), size / 40)
    texture = (texture - texture.min()) / (np.ptp(texture) + 1e-6)
    # Diffuse, so blurred past the zone's edge, but only over lung; the mask is wherever it shows (above the
    # noise), not only inside the zone.
    opacity = _blur(region.astype(np.float32), size / 30) * (0.25 + 0.35 * texture) * (left | right)
    mask = opacity > VISIBLE_OPACITY
    return image + opacity, mask


def _tuberculosis(image: np.ndarray, left: np.ndarray, right: np.ndarray, geo: dict, rng: np.random.Generator):
    size = image.shape[0]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    mask = np.zeros_like(left)
    lesion = np.zeros(image.shape, np.float32)
    for lung in ([left, right] if rng.random() < 0.4 else [[left, right][rng.integers(2)]]):
        cy = geo["cy"] - geo["half_h"] * rng.uniform(0.55, 0.75)  # apical / upper zone
        cols = np.where(lung[int(cy * size)])[0] / size  # the lung's width at that height, narrower than lower down
        cx = rng.uniform(cols.min(), cols.max())
        r = rng.uniform(0.06, 0.09)
        blob = (((xx - cx) / r) ** 2 + ((yy - cy) / (r * 0.8)) ** 2 <= 1.0) & lung
        lesion += blob * 0.45
        mask |= blob
        for _ in range(rng.integers(1, 3)):  # cavities: lucent rings inside the consolidation
            ccx, ccy = cx + rng.uniform(-0.4, 0.4) * r, cy + rng.uniform(-0.3, 0.3) * r
            cr = r * rng.uniform(0.25, 0.4)
            dist = np.sqrt((xx - ccx) ** 2 + (yy - ccy) ** 2)
            lesion[(dist < cr) & blob] -= 0.5
            lesion[(dist >= cr) & (dist < cr * 1.35) & blob] += 0.15
    return image + _blur(lesion, size / 150), mask


def make_image(label: str, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic radiograph (uint8) and its lesion mask (bool) for `label`."""
    image, left, right, geo = _base_radiograph(size, rng)
    mask = np.zeros((size, size), dtype=bool)
    if label == "pneumonia":
        image, mask = _pneumonia(image, left, right, geo, rng)
    elif label == "tuberculosis":
        image, mask = _tuberculosis(image, left, right, geo, rng)
    elif label != "normal":
        raise ValueError(f"unknown label {label!r}")
    gain, offset = rng.uniform(0.85, 1.15), rng.uniform(-0.05, 0.05)
    image = np.clip((image * gain + offset) * 255.0, 0, 255).astype(np.uint8)
    return image, mask


def generate(root: str | Path, n_per_class: int = 60, size: int = 128, seed: int = 0,
             patients_per_image: float = 0.5) -> Path:
    """Write images, masks and `manifest.csv` under root (reused if already generated with these settings)."""
    if not is_whole_number(n_per_class) or n_per_class < 1:
        raise DataConfigError(f"data.n_per_class={n_per_class!r}: give a whole number of images per class, 1 or more")
    if not is_whole_number(size) or size < MIN_SIZE:
        raise DataConfigError(f"data.size={size!r}: give a whole number of pixels, {MIN_SIZE} or more (smaller images "
                              "are too coarse to hold the lesions)")
    root = Path(root)
    settings = {"n_per_class": n_per_class, "size": size, "seed": seed,
                "patients_per_image": patients_per_image, "version": GENERATOR_VERSION}
    manifest = root / "manifest.csv"
    stamp = root / "settings.json"
    if manifest.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == settings:
        return manifest
    rng = np.random.default_rng(seed)
    rows = []
    for label in CLASS_NAMES:
        (root / label).mkdir(parents=True, exist_ok=True)
        n_patients = max(1, int(n_per_class * patients_per_image))
        for i in range(n_per_class):
            image, mask = make_image(label, size, rng)
            name = f"{label}/{label}_{i:04d}"
            cv2.imwrite(str(root / f"{name}.png"), image)
            cv2.imwrite(str(root / f"{name}_mask.png"), mask.astype(np.uint8) * 255)
            rows.append({"path": f"{name}.png", "label": label, "patient_id": f"{label}-p{i % n_patients:04d}",
                         "source": "synthetic", "mask_path": f"{name}_mask.png"})
    with manifest.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    stamp.write_text(json.dumps(settings))
    return manifest


def synthetic_index(root: str | Path, n_per_class: int = 60, size: int = 128, seed: int = 0):
    """Generate (or reuse) the synthetic set under root and return its index."""
    from cxr.data.index import index_manifest

    return index_manifest(generate(root, n_per_class=n_per_class, size=size, seed=seed))
