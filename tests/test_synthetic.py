"""Synthetic radiographs: deterministic, with findings where they sit clinically."""
import numpy as np
import pandas as pd

from cxr.data.synthetic import generate, make_image


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
