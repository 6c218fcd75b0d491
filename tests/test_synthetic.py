"""Synthetic radiographs: deterministic, with findings where they sit clinically."""
import numpy as np
import pandas as pd
import pytest

from cxr.data.index import DataConfigError
from cxr.data.synthetic import _base_radiograph, _pneumonia, _tuberculosis, generate, make_image


def test_deterministic_by_seed():
    a, ma = make_image("tuberculosis", 96, np.random.default_rng(3))
    b, mb = make_image("tuberculosis", 96, np.random.default_rng(3))
    c, _ = make_image("tuberculosis", 96, np.random.default_rng(4))
    assert np.array_equal(a, b) and np.array_equal(ma, mb) and not np.array_equal(a, c)


def test_lesions_sit_in_their_zones():
    rng = np.random.default_rng(0)
    for _ in range(10):
        _, normal_mask = make_image("normal", 128, rng)
        _, pn = make_image("pneumonia", 128, rng)
        _, tb = make_image("tuberculosis", 128, rng)
        assert not normal_mask.any()
        rows_pn, rows_tb = np.nonzero(pn)[0], np.nonzero(tb)[0]
        assert pn.sum() > 50 and tb.sum() > 20
        assert np.median(rows_tb) < 0.45 * 128 < np.median(rows_pn)  # TB apical, pneumonia lower/middle


def test_generate_writes_images_masks_and_manifest(tmp_path):
    manifest = generate(tmp_path, n_per_class=4, size=64, seed=1)
    table = pd.read_csv(manifest)
    assert len(table) == 12 and set(table["label"]) == {"normal", "pneumonia", "tuberculosis"}
    assert all((tmp_path / p).is_file() and (tmp_path / m).is_file() for p, m in zip(table["path"], table["mask_path"]))
    mtime = manifest.stat().st_mtime_ns
    assert generate(tmp_path, n_per_class=4, size=64, seed=1) == manifest and manifest.stat().st_mtime_ns == mtime


@pytest.mark.parametrize("label", ["pneumonia", "tuberculosis"])
def test_a_lesion_changes_lung_pixels_only_and_its_mask_covers_what_it_changed(label):
    """Pneumonia's opacity spread over the mediastinum and chest wall, a third of it outside its mask;
    tuberculosis cavities punched holes in the chest wall."""
    draw = {"pneumonia": _pneumonia, "tuberculosis": _tuberculosis}[label]
    for seed in range(20):
        rng = np.random.default_rng(seed)
        base, left, right, geo = _base_radiograph(128, rng)
        lesioned, mask = draw(base.copy(), left, right, geo, rng)
        lungs = left | right
        changed = np.abs(lesioned - base) > 0.1
        assert mask.any() and not (mask & ~lungs).any(), seed
        assert not (changed & ~_grown(lungs)).any(), (seed, int((changed & ~_grown(lungs)).sum()))
        assert not (changed & ~_grown(mask)).any(), (seed, int((changed & ~_grown(mask)).sum()))


def _grown(region: np.ndarray, pixels: int = 2) -> np.ndarray:
    """`region` and the pixels within `pixels` of it: the blur of the image softens every edge by about that."""
    import cv2

    return cv2.dilate(region.astype(np.uint8), np.ones((2 * pixels + 1,) * 2, np.uint8)).astype(bool)


@pytest.mark.parametrize("settings, message", [
    ({"n_per_class": 0}, "data.n_per_class=0: give a whole number of images per class"),
    ({"n_per_class": 2.5}, "data.n_per_class=2.5"),
    ({"size": 8}, "data.size=8: give a whole number of pixels, 32 or more"),
])
def test_settings_that_cannot_make_a_data_set_are_refused(tmp_path, settings, message):
    with pytest.raises(DataConfigError, match=message):
        generate(tmp_path, **settings)
    assert not any(tmp_path.iterdir())
