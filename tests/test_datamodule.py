"""Balanced sampling, class weights, cross-source hold-out and the up-front data check."""
import os
from collections import Counter
from pathlib import Path

import albumentations as A
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, WeightedRandomSampler

from cxr.data.datamodule import (ChestXrayDataModule, balanced_class_weights, balanced_sampler, seed_worker,
                                 split_fingerprint)
from cxr.checkpoint import TRAIN_FINGERPRINTS
from cxr.data import dataset as dataset_module
from cxr.data.dataset import DataCheckError, StandardizedImageDataset, load_standardized
from cxr.data.index import CLASS_NAMES, DataConfigError, LeakageError
from cxr.data.preprocess import Preprocessing

PREP = Preprocessing(image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)


def test_class_weights_balanced_and_absent_class_zero():
    weights = balanced_class_weights([0] * 60 + [1] * 30 + [2] * 10, 3)
    assert torch.allclose(weights, torch.tensor([100 / 180, 100 / 90, 100 / 30]))
    assert balanced_class_weights([0, 0, 1], 3)[2] == 0


def test_weighted_sampler_balances_classes():
    targets = np.array([0] * 800 + [1] * 150 + [2] * 50)
    drawn = Counter(targets[i] for i in balanced_sampler(targets, 3, seed=0))
    assert sum(drawn.values()) == len(targets)
    for c in range(3):
        assert abs(drawn[c] / len(targets) - 1 / 3) < 0.05


def test_sampler_can_balance_sources_within_each_class():
    targets = np.array([0] * 600 + [0] * 200 + [1] * 300 + [1] * 100 + [2] * 300)
    sources = ["big"] * 600 + ["small"] * 200 + ["big"] * 300 + ["small"] * 100 + ["tb_only"] * 300
    sampler = balanced_sampler(targets, 3, seed=0, sources=sources)
    sampler.num_samples = 30000
    drawn = Counter((targets[i], sources[i]) for i in sampler)
    for group in [(0, "big"), (0, "small"), (1, "big"), (1, "small")]:
        assert abs(drawn[group] / 30000 - 1 / 6) < 0.02, group
    assert abs(drawn[(2, "tb_only")] / 30000 - 1 / 3) < 0.02
    by_class_only = Counter(sources[i] for i in balanced_sampler(targets, 3, seed=0) if targets[i] == 0)
    assert by_class_only["big"] > 2 * by_class_only["small"]  # without it, a source's share follows its size


def test_split_fingerprint_follows_the_assignment_not_the_folder():
    frame = pd.DataFrame({"path": ["/data/a/n1.png", "/data/a/p1.png", "/data/b/t1.png"], "split": ["train", "val", "test"]})
    moved = frame.assign(path=frame["path"].str.replace("/data/", "/mnt/copy/", regex=False))
    assert split_fingerprint(frame) == split_fingerprint(moved) == split_fingerprint(frame.iloc[::-1])
    swapped = frame.assign(split=["val", "train", "test"])  # the same counts per split, other images in them
    assert split_fingerprint(swapped) != split_fingerprint(frame)


def test_the_datamodule_balances_an_imbalanced_train_split_and_weights_classes_by_it(synthetic_manifest, tmp_path):
    index = pd.read_csv(synthetic_manifest)
    layout = {"normal": ["train"] * 8 + ["val"] * 2 + ["test"] * 2,  # train 8 : 4 : 2
              "pneumonia": ["train"] * 4 + ["val"] * 2 + ["test"] * 2,
              "tuberculosis": ["train"] * 2 + ["val"] * 2 + ["test"] * 2}
    kept = pd.concat([index[index["label"] == label].head(len(splits)).assign(split=splits)
                      for label, splits in layout.items()])
    kept["path"] = [str(synthetic_manifest.parent / path) for path in kept["path"]]
    kept = kept.drop(columns="patient_id")  # the synthetic patients have several images: one split each here
    kept.to_csv(tmp_path / "imbalanced.csv", index=False)

    def datamodule(**kwargs):
        dm = ChestXrayDataModule.from_manifest(str(tmp_path / "imbalanced.csv"), preprocessing=PREP, seed=0, **kwargs)
        dm.setup("fit")
        return dm

    dm = datamodule(batch_size=8, use_class_weights=True)
    assert torch.allclose(dm.class_weights(), torch.tensor([14 / (3 * 8), 14 / (3 * 4), 14 / (3 * 2)]))
    sampler = dm.train_dataloader().sampler
    assert isinstance(sampler, WeightedRandomSampler)
    sampler.num_samples = 6000
    drawn = Counter(dm.dataset("train").targets[i].item() for i in sampler)
    for c in range(3):
        assert abs(drawn[c] / 6000 - 1 / 3) < 0.03, drawn

    unweighted = datamodule(batch_size=16, weighted_sampling=False)
    labels = torch.cat([y for _, y in unweighted.train_dataloader()])
    assert Counter(labels.tolist()) == {0: 8, 1: 4, 2: 2}  # one epoch: each training image once
    assert unweighted.class_weights() is None


def test_split_follows_split_seed_not_training_seed(synthetic_manifest):
    def split_of(**seeds):
        dm = ChestXrayDataModule.from_manifest(str(synthetic_manifest), preprocessing=PREP, **seeds)
        return dm.build_index()["split"].tolist()

    assert "split" not in pd.read_csv(synthetic_manifest)  # the split is drawn by the data module
    assert split_of(seed=1, split_seed=7) == split_of(seed=2, split_seed=7)
    assert split_of(seed=1, split_seed=7) != split_of(seed=1, split_seed=8)


def test_loader_workers_draw_different_augmentations_reproducibly():
    """The same image at every index: each worker must augment it differently, and again so on a rerun."""
    image = (np.add.outer(np.arange(32), 3 * np.arange(32)) % 256).astype(np.uint8)
    augment = A.Compose([A.Affine(rotate=(-15, 15), translate_percent=(-0.1, 0.1), p=1.0)])
    augment.set_random_seed(0)  # as the data module does before workers start
    dataset = StandardizedImageDataset(np.stack([image] * 8), [0] * 8, PREP, augment)

    def batches():
        torch.manual_seed(0)
        return [x for x, _ in DataLoader(dataset, batch_size=4, num_workers=2, worker_init_fn=seed_worker)]

    first, second = batches()  # one batch from each worker
    assert not torch.equal(first, second)
    assert all(torch.equal(a, b) for a, b in zip(batches(), (first, second)))


def test_switches_turn_off_sampler_and_weights(synthetic_manifest):
    dm = ChestXrayDataModule.from_manifest(str(synthetic_manifest), preprocessing=PREP, weighted_sampling=False,
                                           use_class_weights=False)
    assert dm.class_weights() is None
    assert not isinstance(dm.train_dataloader().sampler, torch.utils.data.WeightedRandomSampler)


def test_balance_sources_reaches_the_train_sampler(tmp_path, synthetic_manifest):
    table = pd.read_csv(synthetic_manifest)
    table["source"] = np.where(np.arange(len(table)) % 3 == 0, "small", "big")
    table["patient_id"] = table["path"]
    table["path"] = [str(synthetic_manifest.parent / p) for p in table["path"]]
    manifest = tmp_path / "two_sources.csv"
    table.to_csv(manifest, index=False)
    dm = ChestXrayDataModule.from_manifest(str(manifest), preprocessing=PREP, balance_sources=True)
    train = dm.split_frame("train").assign(weight=dm.train_dataloader().sampler.weights.numpy())
    share = train.groupby(["label", "source"])["weight"].sum()
    assert np.allclose(share, 0.5)  # each class sums to 1, split evenly between its two sources


def test_holdout_sources_train_without_and_test_on_all_of_them(tmp_path, synthetic_manifest):
    table = pd.read_csv(synthetic_manifest)
    table["source"] = np.where(np.arange(len(table)) % 2 == 0, "hospital_a", "hospital_b")
    table["patient_id"] = table["path"]  # one image per patient: no patient spans both sources
    table["path"] = [str(synthetic_manifest.parent / p) for p in table["path"]]
    manifest = tmp_path / "two_sources.csv"
    table.to_csv(manifest, index=False)
    dm = ChestXrayDataModule.from_manifest(str(manifest), preprocessing=PREP, holdout_sources=["hospital_b"])
    index = dm.build_index()
    assert set(index.loc[index["split"].isin(["train", "val"]), "source"]) == {"hospital_a"}
    assert set(index.loc[index["split"] == "test", "source"]) == {"hospital_b"}
    assert (index["source"] == "hospital_b").sum() == len(dm.split_frame("test"))
    # reports name what they cover: not "test split" but every image of the held-out source
    assert (dm.describe_split("test"), dm.describe_split("val")) == ("held-out hospital_b (all of its images)",
                                                                     "val split")
    with pytest.raises(ValueError, match="hospital_c"):
        ChestXrayDataModule.from_manifest(str(manifest), preprocessing=PREP, holdout_sources=["hospital_c"]).build_index()
    # a source is one source whatever its case, in the data and in the names held out
    spelled = ChestXrayDataModule.from_manifest(str(manifest), preprocessing=PREP, holdout_sources=["Hospital_B"])
    assert spelled.build_index()["split"].tolist() == index["split"].tolist()
    assert spelled.holdout_sources == ["hospital_b"]
    # one name given alone (data.holdout_sources=hospital_b) is that name, not its letters
    alone = ChestXrayDataModule.from_manifest(str(manifest), preprocessing=PREP, holdout_sources="hospital_b")
    assert alone.build_index()["split"].tolist() == index["split"].tolist()


@pytest.mark.parametrize("kwargs, message", [
    ({"batch_size": 0}, "data.batch_size=0: give a whole number"),
    ({"batch_size": 2.5}, "data.batch_size=2.5"),
    ({"val_fraction": 1.5}, "data.val_fraction=1.5 and data.test_fraction=0.15"),
    ({"val_fraction": 0.5, "test_fraction": 0.5}, "together below 1"),
])
def test_batch_sizes_and_split_shares_out_of_range_are_refused(synthetic_manifest, kwargs, message):
    with pytest.raises(DataConfigError) as refused:
        ChestXrayDataModule.from_manifest(str(synthetic_manifest), preprocessing=PREP, **kwargs)
    assert message in str(refused.value)


def test_an_empty_val_split_names_the_setting_that_emptied_it(synthetic_manifest):
    without_val = ChestXrayDataModule.from_manifest(str(synthetic_manifest), preprocessing=PREP, val_fraction=0.0)
    with pytest.raises(DataConfigError, match="or data.val_fraction above 0 for images without one"):
        without_val.split_frame("val")


def test_holdout_sources_keep_a_patient_of_both_sources_out_of_training(tmp_path, synthetic_manifest, caplog):
    table = pd.read_csv(synthetic_manifest)
    table["source"] = np.where(np.arange(len(table)) % 2 == 0, "hospital_a", "hospital_b")
    table["patient_id"] = [f"p{i // 2}" for i in range(len(table))]  # each patient imaged at both hospitals
    table["patient_id"] = table["patient_id"].where(np.arange(len(table)) < len(table) // 2, table["path"])
    table["path"] = [str(synthetic_manifest.parent / p) for p in table["path"]]
    manifest = tmp_path / "shared_patients.csv"
    table.to_csv(manifest, index=False)
    dm = ChestXrayDataModule.from_manifest(str(manifest), preprocessing=PREP, holdout_sources=["hospital_b"])
    with caplog.at_level("WARNING"):
        index = dm.build_index()
    tested = set(index.loc[index["split"] == "test", "patient_id"])
    trained = set(index.loc[index["split"].isin(["train", "val"]), "patient_id"])
    assert trained and not tested & trained
    crossing = len(table) // 4  # patients p0.. of the first half: one image at each hospital
    assert (index.loc[index["patient_id"].isin(tested) & (index["source"] == "hospital_a"), "split"] == "unused").sum() \
        == crossing
    assert f"{crossing} image(s) of {crossing} patient(s) also imaged at a held-out source" in caplog.text


def test_corrupt_files_reported_before_training(tmp_path, synthetic_manifest):
    table = pd.read_csv(synthetic_manifest)
    table["path"] = [str(synthetic_manifest.parent / p) for p in table["path"]]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    table.loc[len(table)] = {**table.iloc[0].to_dict(), "path": str(broken), "patient_id": "broken-patient"}
    manifest = tmp_path / "with_broken.csv"
    table.to_csv(manifest, index=False)
    dm = ChestXrayDataModule.from_manifest(str(manifest), preprocessing=PREP, val_fraction=0.0, test_fraction=0.0)
    with pytest.raises(DataCheckError, match="broken.png"):
        dm.setup("fit")


def test_missing_files_all_listed_before_training(tmp_path, synthetic_manifest):
    table = pd.read_csv(synthetic_manifest)
    table["path"] = [str(synthetic_manifest.parent / p) for p in table["path"]]
    for i, name in enumerate(("gone-a.png", "gone-b.png")):
        table.loc[len(table)] = {**table.iloc[i].to_dict(), "path": str(tmp_path / name), "patient_id": f"gone-{i}"}
    manifest = tmp_path / "with_missing.csv"
    table.to_csv(manifest, index=False)
    dm = ChestXrayDataModule.from_manifest(str(manifest), preprocessing=PREP, val_fraction=0.0, test_fraction=0.0,
                                           cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataCheckError, match=r"2 of \d+ image file\(s\) do not exist:\n.*gone-a.png\n.*gone-b.png"):
        dm.setup("fit")


def test_copies_of_training_images_are_refused_whatever_their_name(tmp_path, synthetic_manifest):
    """A test image with a training image's pixels (a copy under another name, another split assignment of the
    same data) would be scored in-sample."""
    dm = ChestXrayDataModule.from_manifest(str(synthetic_manifest), preprocessing=PREP)
    trained = dm.fingerprints("train")
    assert len(set(trained)) == len(trained) == len(dm.split_frame("train"))
    dm.check_not_trained_on("test", trained, "the training split")  # disjoint: passes
    table = pd.read_csv(synthetic_manifest)
    table["path"] = [str(synthetic_manifest.parent / p) for p in table["path"]]
    table["split"] = ""  # drawn by the data module, as for dm
    source = table[table["path"] == dm.split_frame("train")["path"].iloc[0]].iloc[0]
    copy = tmp_path / "renamed-copy.png"
    copy.write_bytes(Path(source["path"]).read_bytes())
    table.loc[len(table)] = {**source.to_dict(), "path": str(copy), "split": "test", "patient_id": "someone-else"}
    table.to_csv(tmp_path / "with_copy.csv", index=False)
    with_copy = ChestXrayDataModule.from_manifest(str(tmp_path / "with_copy.csv"), preprocessing=PREP)
    with pytest.raises(LeakageError, match=r"1 of the \d+ images of the 'test' split .*renamed-copy.png"):
        with_copy.check_not_trained_on("test", trained, "the checkpoint")
    # before training on this very data, both copies are named, with their labels
    with pytest.raises(LeakageError, match=rf"renamed-copy.png \({source['label']}\) = {source['path']} "
                                           rf"\({source['label']}, train\)\. .*keep one copy of each image"):
        with_copy.check_unseen("test", {TRAIN_FINGERPRINTS: with_copy.fingerprints("train")}, before_training=True)


def test_disk_cache_is_reused(tmp_path, synthetic_manifest):
    kwargs = dict(preprocessing=PREP, cache_dir=str(tmp_path / "cache"))
    first = ChestXrayDataModule.from_manifest(str(synthetic_manifest), **kwargs).dataset("val").images
    cached = list((tmp_path / "cache").glob("*.npy"))
    assert len(cached) == 1
    second = ChestXrayDataModule.from_manifest(str(synthetic_manifest), **kwargs).dataset("val").images
    assert np.array_equal(first, second)
    cached[0].write_bytes(cached[0].read_bytes()[:100])  # corrupted on disk
    third = ChestXrayDataModule.from_manifest(str(synthetic_manifest), **kwargs).dataset("val").images
    assert np.array_equal(first, third) and np.array_equal(np.load(cached[0]), first)


def test_refit_trains_on_val_too_and_refuses_in_sample_use_of_it(synthetic_manifest):
    plain = ChestXrayDataModule.from_manifest(str(synthetic_manifest), preprocessing=PREP)
    refit = ChestXrayDataModule.from_manifest(str(synthetic_manifest), preprocessing=PREP, train_splits=["train", "val"],
                                              use_class_weights=True)
    n_train, n_val = len(plain.split_frame("train")), len(plain.split_frame("val"))
    assert len(refit.split_frame("train")) == len(refit.dataset("train")) == n_train + n_val
    assert torch.allclose(refit.class_weights(), balanced_class_weights(
        pd.concat([plain.split_frame("train"), plain.split_frame("val")])["target"], 3))
    assert len(refit.split_frame("test")) == len(plain.split_frame("test"))
    summary = refit.summary()
    assert summary["train_splits"] == ["train", "val"] and summary["split_sha256"] == plain.summary()["split_sha256"]
    with pytest.raises(ValueError, match="trained on the 'val' split"):
        plain.check_unseen("val", summary)  # the same split assignment, read through another data module
    plain.check_unseen("test", summary)
    plain.check_unseen("val", plain.summary())
    plain.check_unseen("val", {**summary, "split_sha256": "another assignment of other images"})


def test_train_splits_must_hold_train_and_not_the_evaluation_split(synthetic_manifest):
    with pytest.raises(DataConfigError, match="must include 'train', and data.split='test' must not be one of them"):
        ChestXrayDataModule.from_manifest(str(synthetic_manifest), preprocessing=PREP, train_splits=["train", "test"])
    with pytest.raises(ValueError, match="must include 'train'"):
        ChestXrayDataModule.from_manifest(str(synthetic_manifest), preprocessing=PREP, train_splits=["val"])


@pytest.mark.parametrize("unsplit", [0, 6], ids=["every-image-split", "some-images-without-a-split"])
def test_train_and_test_folders_only_draw_val_from_train_by_patient(tmp_path, synthetic_manifest, caplog, unsplit):
    table = pd.read_csv(synthetic_manifest)
    table["path"] = [str(synthetic_manifest.parent / p) for p in table["path"]]
    table["split"] = ["test" if i % 4 == 0 else "train" for i in range(len(table))]
    table.loc[table.index[table["split"] == "train"][:unsplit], "split"] = ""  # e.g. images added since
    table["patient_id"] = table["path"]
    table.to_csv(tmp_path / "train_test.csv", index=False)
    with caplog.at_level("WARNING"):
        index = ChestXrayDataModule.from_manifest(str(tmp_path / "train_test.csv"), preprocessing=PREP,
                                                  val_fraction=0.25).build_index()
    assert "no val split given" in caplog.text
    given_test = set(table.loc[table["split"] == "test", "path"])
    assert set(index.loc[index["split"] == "test", "path"]) == given_test
    val = index[index["split"] == "val"]
    assert not given_test & set(val["path"]) and set(val["label"]) == set(CLASS_NAMES)
    assert len(val) == pytest.approx(0.25 * (table["split"] != "test").sum(), abs=3)


def test_a_class_without_training_images_is_warned_about(tmp_path, synthetic_manifest, caplog):
    table = pd.read_csv(synthetic_manifest)
    table["path"] = [str(synthetic_manifest.parent / p) for p in table["path"]]
    table["split"] = ["train" if label != "tuberculosis" else "test" for label in table["label"]]
    table.loc[table.index[:3], "split"] = "val"
    table["patient_id"] = table["path"]
    table.to_csv(tmp_path / "no_tb_in_train.csv", index=False)
    with caplog.at_level("WARNING"):
        ChestXrayDataModule.from_manifest(str(tmp_path / "no_tb_in_train.csv"), preprocessing=PREP).build_index()
    assert "['tuberculosis'] have no training images" in caplog.text
    caplog.clear()  # a saved checkpoint's data (a site's set to calibrate on) trains nothing: no such warning
    with caplog.at_level("WARNING"):
        ChestXrayDataModule.from_manifest(str(tmp_path / "no_tb_in_train.csv"), preprocessing=PREP,
                                          class_names=CLASS_NAMES, for_training=False).build_index()
    assert "no training images" not in caplog.text


def test_labels_outside_the_classes_and_empty_splits_are_data_config_errors(synthetic_manifest):
    two_classes = ChestXrayDataModule.from_manifest(str(synthetic_manifest), preprocessing=PREP,
                                                    class_names=["normal", "pneumonia"])
    with pytest.raises(DataConfigError, match=r"\['tuberculosis'\] are not among the model's classes.*class_names"):
        two_classes.build_index()
    scored = ChestXrayDataModule.from_manifest(str(synthetic_manifest), preprocessing=PREP, for_training=False,
                                               class_names=["normal", "pneumonia"])
    with pytest.raises(DataConfigError, match=r"classes \['normal', 'pneumonia'\]: it cannot score them: remove"):
        scored.build_index()
    no_test = ChestXrayDataModule.from_manifest(str(synthetic_manifest), preprocessing=PREP, test_fraction=0.0)
    with pytest.raises(DataConfigError, match="split 'test' has no images"):
        no_test.split_frame("test")


def test_a_class_missing_from_val_or_test_is_warned_about(tmp_path, synthetic_manifest, caplog):
    table = pd.read_csv(synthetic_manifest)
    table["path"] = [str(synthetic_manifest.parent / p) for p in table["path"]]
    table["patient_id"] = table["path"]
    table["split"] = "train"
    for label in CLASS_NAMES:
        table.loc[table.index[table["label"] == label][:2], "split"] = "test"
        if label != "tuberculosis":
            table.loc[table.index[table["label"] == label][2:4], "split"] = "val"
    table.to_csv(tmp_path / "no_tb_in_val.csv", index=False)
    with caplog.at_level("WARNING"):
        ChestXrayDataModule.from_manifest(str(tmp_path / "no_tb_in_val.csv"), preprocessing=PREP).build_index()
    assert "['tuberculosis'] have no val images" in caplog.text and "no test images" not in caplog.text
    caplog.clear()  # a checkpoint's data scored on test, or whole, is measured on no val images
    for split in ("test", "all"):
        with caplog.at_level("WARNING"):
            ChestXrayDataModule.from_manifest(str(tmp_path / "no_tb_in_val.csv"), preprocessing=PREP, split=split,
                                              for_training=False).build_index()
    assert "have no val images" not in caplog.text


def flat_but_one_pixel(value: int) -> np.ndarray:
    """An image of `value` (at its top-left corner too): one pixel differs, as an image of one value is refused."""
    pixels = np.full((32, 32), value, np.uint8)
    pixels[-1, -1] = value + 1
    return pixels


def test_disk_cache_sees_files_swapped_with_their_size_and_mtime(tmp_path):
    a, b = tmp_path / "a.bmp", tmp_path / "b.bmp"
    Image.fromarray(flat_but_one_pixel(10)).save(a)
    Image.fromarray(flat_but_one_pixel(200)).save(b)
    for path in (a, b):
        os.utime(path, (1_700_000_000, 1_700_000_000))  # as both unpacked from one archive
    paths, prep = [str(a), str(b)], Preprocessing(image_size=8)
    assert load_standardized(paths, prep, tmp_path / "cache")[:, 0, 0].tolist() == [10, 200]
    a.rename(tmp_path / "t.bmp")
    b.rename(a)
    (tmp_path / "t.bmp").rename(b)
    assert load_standardized(paths, prep, tmp_path / "cache")[:, 0, 0].tolist() == [200, 10]


def test_disk_cache_is_not_reused_by_a_decoder_that_decodes_differently(tmp_path, monkeypatch):
    path = tmp_path / "a.bmp"
    Image.fromarray(flat_but_one_pixel(10)).save(path)
    prep = Preprocessing(image_size=8)
    assert load_standardized([str(path)], prep, tmp_path / "cache")[0, 0, 0] == 10
    monkeypatch.setattr(dataset_module, "decode_image", lambda p: np.full((32, 32), 99, np.uint8))
    assert load_standardized([str(path)], prep, tmp_path / "cache")[0, 0, 0] == 10  # the same decoder: cached
    monkeypatch.setattr(dataset_module, "DECODER_VERSION", dataset_module.DECODER_VERSION + 1)
    assert load_standardized([str(path)], prep, tmp_path / "cache")[0, 0, 0] == 99


def test_an_unforeseen_decoder_failure_still_names_its_file_beside_the_others(tmp_path, monkeypatch):
    paths = []
    for name in ("fine", "odd", "broken"):
        paths.append(str(tmp_path / f"{name}.png"))
        Image.fromarray(flat_but_one_pixel(50)).save(paths[-1])
    Path(paths[2]).write_bytes(b"not an image")
    real_decode = dataset_module.decode_image

    def decode(path):
        if path.endswith("odd.png"):
            raise NotImplementedError("a case no decoder foresaw")
        return real_decode(path)

    monkeypatch.setattr(dataset_module, "decode_image", decode)
    with pytest.raises(DataCheckError, match=r"(?s)2 of 3 image\(s\).*broken\.png: .*odd\.png: NotImplementedError: a case"):
        load_standardized(paths, Preprocessing(image_size=8))


def test_data_without_a_split_is_scored_whole_with_split_all_and_warned_about_otherwise(tmp_path, synthetic_manifest,
                                                                                        caplog):
    """An external set without a split column: cxr-eval's default split would score only the part drawn as test."""
    table = pd.read_csv(synthetic_manifest)
    assert "split" not in table
    datamodule = ChestXrayDataModule.from_manifest(str(synthetic_manifest), preprocessing=PREP)
    assert len(datamodule.split_frame("all")) == len(table) > len(datamodule.split_frame("test"))
    with caplog.at_level("WARNING"):
        datamodule.warn_if_split_was_drawn("all")
        assert "have no split" not in caplog.text
        datamodule.warn_if_split_was_drawn("test")
    assert f"{len(table)} images have no split" in caplog.text and "data.split=all" in caplog.text
    table.assign(split="test").to_csv(tmp_path / "external.csv", index=False)
    caplog.clear()
    with caplog.at_level("WARNING"):
        ChestXrayDataModule.from_manifest(str(tmp_path / "external.csv"), preprocessing=PREP,
                                          val_fraction=0).warn_if_split_was_drawn("test")
    assert "have no split" not in caplog.text


def test_report_subgroups_must_be_columns_of_the_data_with_few_values(tmp_path, synthetic_manifest):
    table = pd.read_csv(synthetic_manifest)
    table["path"] = [str(synthetic_manifest.parent / p) for p in table["path"]]
    table["age"] = range(len(table))
    table["view"] = ["PA", "AP"] * (len(table) // 2) + ["PA"] * (len(table) % 2)
    manifest = tmp_path / "with_columns.csv"
    table.to_csv(manifest, index=False)
    assert ChestXrayDataModule.from_manifest(str(manifest), preprocessing=PREP, subgroups=["view"]).build_index()["view"].nunique() == 2
    # column names ignore case, in the manifest and in data.subgroups alike
    assert ChestXrayDataModule.from_manifest(str(manifest), preprocessing=PREP, subgroups=[" View"]).subgroups == ["view"]
    with pytest.raises(DataConfigError, match=r"\['sex'\] are not extra columns of the data \(available: .*'view'"):
        ChestXrayDataModule.from_manifest(str(manifest), preprocessing=PREP, subgroups=["sex"]).build_index()
    with pytest.raises(DataConfigError, match="'age' has .* distinct values, more than 20: bin it"):
        ChestXrayDataModule.from_manifest(str(manifest), preprocessing=PREP, subgroups=["age"]).build_index()
    with pytest.raises(DataConfigError, match=r"\['source'\] are not extra columns .* per source already"):
        ChestXrayDataModule.from_manifest(str(manifest), preprocessing=PREP, subgroups=["source"]).build_index()
    table.rename(columns={"view": "predicted"}).to_csv(manifest, index=False)
    with pytest.raises(DataConfigError, match=r"\['predicted'\] are names predictions.csv uses"):
        ChestXrayDataModule.from_manifest(str(manifest), preprocessing=PREP, subgroups=["predicted"]).build_index()


def test_scoring_every_image_draws_no_split(synthetic_manifest, monkeypatch):
    import cxr.data.datamodule as datamodule_module

    def no_draw(*args, **kwargs):
        raise AssertionError("a split was drawn for data.split=all")

    monkeypatch.setattr(datamodule_module, "assign_splits", no_draw)
    datamodule = ChestXrayDataModule.from_manifest(str(synthetic_manifest), preprocessing=PREP, split="all")
    assert len(datamodule.split_frame("all")) == len(pd.read_csv(synthetic_manifest))


def test_data_of_two_classes_trains_a_two_class_model_unless_told_otherwise(tmp_path, synthetic_manifest, caplog):
    # The Kaggle chest_xray layout: NORMAL/ and PNEUMONIA/ only. A third output no image ever trained would be served.
    table = pd.read_csv(synthetic_manifest)
    table = table[table["label"] != "tuberculosis"].assign(path=lambda t: [str(synthetic_manifest.parent / p)
                                                                          for p in t["path"]])
    table.to_csv(tmp_path / "kaggle.csv", index=False)
    with caplog.at_level("WARNING"):
        found = ChestXrayDataModule.from_manifest(str(tmp_path / "kaggle.csv"), preprocessing=PREP)
        found.build_index()
    assert found.class_names == ["normal", "pneumonia"] and "no images of ['tuberculosis']" in caplog.text
    assert set(found.build_index()["target"]) == {0, 1}
    given = ChestXrayDataModule.from_manifest(str(tmp_path / "kaggle.csv"), preprocessing=PREP,
                                              class_names=["NORMAL", "Pneumonia", "TB"])  # as folders name them
    given.build_index()
    assert given.class_names == ["normal", "pneumonia", "tuberculosis"]
    for bad in (["normal", "covid"], ["normal", "NORMAL"], ["normal"]):
        with pytest.raises(DataConfigError, match="give two or more of"):
            ChestXrayDataModule.from_manifest(str(tmp_path / "kaggle.csv"), preprocessing=PREP, class_names=bad)
    table[table["label"] == "normal"].to_csv(tmp_path / "one_class.csv", index=False)
    with pytest.raises(DataConfigError, match="images of \\['normal'\\] only"):
        ChestXrayDataModule.from_manifest(str(tmp_path / "one_class.csv"), preprocessing=PREP).build_index()


def test_images_without_a_split_beside_given_splits_are_placed_and_said_so(tmp_path, synthetic_manifest, caplog):
    table = pd.read_csv(synthetic_manifest)
    table["path"] = [str(synthetic_manifest.parent / p) for p in table["path"]]
    table["patient_id"] = table["path"]
    table["split"] = [("train", "train", "train", "val", "test")[i % 5] for i in range(len(table))]
    table.loc[table.index[:6], "split"] = ""  # six images left blank, each its own patient
    table.to_csv(tmp_path / "partly_split.csv", index=False)
    with caplog.at_level("WARNING"):
        index = ChestXrayDataModule.from_manifest(str(tmp_path / "partly_split.csv"), preprocessing=PREP).build_index()
    assert "6 image(s) have no split in the data and were placed" in caplog.text
    assert (index["split"] != "").all()
    scored = ChestXrayDataModule.from_manifest(str(tmp_path / "partly_split.csv"), preprocessing=PREP)
    caplog.clear()
    with caplog.at_level("WARNING"):
        scored.warn_if_split_was_drawn("val")
    drawn = int(scored.split_frame("val")["path"].isin(table.loc[table.index[:6], "path"]).sum())
    assert f"6 images have no split in the data: {drawn} of the {len(scored.split_frame('val'))} images of the " \
           "'val' split used here are among them" in caplog.text
