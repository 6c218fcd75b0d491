"""LightningDataModule: index -> patient-safe splits -> decode-once cache -> balanced loaders."""
from __future__ import annotations

import hashlib
import logging
import os
from functools import partial
from typing import Callable, Sequence

import albumentations as A
import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.fabric.utilities.seed import pl_worker_init_function
from torch.utils.data import DataLoader, WeightedRandomSampler, get_worker_info

from cxr.checkpoint import TRAIN_FINGERPRINTS
from cxr.config import is_whole_number
from cxr.data.dataset import StandardizedImageDataset, image_fingerprints, load_standardized
from cxr.data.index import (CLASS_NAMES, TARGET, DataConfigError, LeakageError, assign_splits, canonical_label,
                            check_patient_leakage, check_subgroup_columns, index_folder, index_manifest)
from cxr.data.preprocess import Preprocessing
from cxr.data.synthetic import synthetic_index

log = logging.getLogger(__name__)


def balanced_class_weights(targets: Sequence[int], num_classes: int) -> torch.Tensor:
    """n / (k * n_c) per class (scikit-learn's "balanced"); 0 for a class absent from training."""
    counts = np.bincount(np.asarray(targets, dtype=int), minlength=num_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(num_classes)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return torch.tensor(weights, dtype=torch.float32)


def split_fingerprint(frame: pd.DataFrame) -> str:
    """SHA-256 of the sorted (path relative to the data's common folder, split) pairs: equal for the same
    assignment of the same files wherever the data folder lives; counts alone can agree for different splits."""
    paths = frame["path"].astype(str).tolist()
    root = os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0])
    pairs = sorted(f"{os.path.relpath(p, root)}\t{split}" for p, split in zip(paths, frame["split"]))
    return hashlib.sha256("\n".join(pairs).encode()).hexdigest()


def balanced_sampler(targets: Sequence[int], num_classes: int, seed: int,
                     sources: Sequence[str] | None = None) -> WeightedRandomSampler:
    """Draw each class equally often in expectation; with `sources`, also each source equally often within
    a class (a source's share no longer follows its size). An epoch keeps the split's length."""
    targets = np.asarray(targets, dtype=int)
    if sources is None:
        per_sample = 1.0 / np.bincount(targets, minlength=num_classes)[targets]
    else:
        frame = pd.DataFrame({"target": targets, "source": np.asarray(sources)})
        group_size = frame.groupby(["target", "source"])["source"].transform("size")
        sources_in_class = frame.groupby("target")["source"].transform("nunique")
        per_sample = 1.0 / (group_size * sources_in_class).to_numpy()
    generator = torch.Generator().manual_seed(seed)
    return WeightedRandomSampler(torch.as_tensor(per_sample, dtype=torch.double), num_samples=len(targets),
                                 replacement=True, generator=generator)


# data.split=all: every image of the data, whatever split it has or was drawn into.
ALL_IMAGES = "all"


def checked_class_names(names: Sequence[str]) -> list[str]:
    """`data.class_names` as labels are read (any case, the usual aliases: NORMAL, TB), each once."""
    canonical = [canonical_label(name) for name in names]
    unknown = [name for name, label in zip(names, canonical) if label is None]
    if unknown or len(set(canonical)) != len(canonical) or len(canonical) < 2:
        raise DataConfigError(f"data.class_names={list(names)}: give two or more of {list(CLASS_NAMES)} (any case; TB "
                              "for tuberculosis), each once")
    return canonical


def classes_of(index: pd.DataFrame, candidates: Sequence[str]) -> list[str]:
    """The `candidates` the data has images of: a folder of NORMAL/ and PNEUMONIA/ trains a two-class model, not a
    three-class one whose tuberculosis output never saw an image."""
    labels = set(index["label"])
    present = [name for name in candidates if name in labels]
    if len(present) < 2:
        raise DataConfigError(f"the data has images of {present} only: a classifier needs two classes or more")
    if len(present) < len(candidates):
        log.warning("the data has no images of %s: the model's classes are %s (pass +data.class_names=[...] to "
                    "choose them)", [name for name in candidates if name not in present], present)
    return present


def prediction_columns(class_names: Sequence[str]) -> list[str]:
    """The columns an evaluation's predictions.csv adds beside the images' own."""
    return [*(f"p_{name}" for name in class_names), "predicted", "feature_distance", "unlike_training"]


def names(value) -> list[str]:
    """A setting that lists names, given as a list or as one name (data.holdout_sources=kermany): list() would
    split a lone name into its letters."""
    return [value] if isinstance(value, str) else list(value)


def warn_classes_missing_from_evaluation(index: pd.DataFrame, splits: Sequence[str]) -> None:
    """Name the classes of the data that a non-empty one of `splits` lacks: their metrics there are undefined."""
    for split in splits:
        present = set(index.loc[index["split"] == split, "label"])
        absent = sorted(set(index["label"]) - present)
        if present and absent:
            log.warning("class(es) %s have no %s images: %s metrics of those classes cannot be measured", absent,
                        split, split)


def seed_worker(worker_id: int) -> None:
    """Lightning's worker seeding, plus albumentations' own generator, which every worker would otherwise
    inherit unchanged from the main process: N workers would repeat the same augmentations N times."""
    pl_worker_init_function(worker_id)
    augment = getattr(get_worker_info().dataset, "augment", None)
    if augment is not None and hasattr(augment, "set_random_seed"):
        augment.set_random_seed(torch.initial_seed() % 2**32)


class ChestXrayDataModule(L.LightningDataModule):
    def __init__(
        self,
        index: Callable[[], pd.DataFrame] | pd.DataFrame,
        preprocessing: Preprocessing,
        class_names: Sequence[str] | None = None,
        augment: A.BaseCompose | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        weighted_sampling: bool = True,
        balance_sources: bool = False,
        use_class_weights: bool = False,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        holdout_sources: Sequence[str] = (),
        train_splits: Sequence[str] = ("train",),
        split: str = "test",
        subgroups: Sequence[str] = (),
        cache_dir: str | None = None,
        seed: int = 0,
        split_seed: int = 0,
        for_training: bool = True,
    ):
        super().__init__()
        # False for a saved checkpoint's data (evaluation, calibration, soups): nothing trains on it.
        self.for_training = for_training
        self._index_factory = index
        self.preprocessing = preprocessing
        # None: the classes the data has images of, of the three; given: exactly those, checked against the data
        self.classes_from_data = class_names is None
        self.class_names = list(CLASS_NAMES) if class_names is None else checked_class_names(class_names)
        self.augment = augment
        for name, size in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size or batch_size)):
            if not is_whole_number(size) or size < 1:
                raise DataConfigError(f"data.{name}={size!r}: give a whole number of images, 1 or more")
        if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
            raise DataConfigError(f"data.val_fraction={val_fraction} and data.test_fraction={test_fraction}: each "
                                  "is a share of the images from 0 to below 1, and together below 1 (train keeps the "
                                  "rest)")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.weighted_sampling = weighted_sampling
        self.balance_sources = balance_sources
        self.use_class_weights = use_class_weights
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.holdout_sources = names(holdout_sources)
        self.train_splits = names(train_splits)
        if "train" not in self.train_splits or split in self.train_splits:
            raise DataConfigError(f"data.train_splits={self.train_splits} must include 'train', and "
                                  f"data.split={split!r} must not be one of them: a model is not measured or "
                                  "calibrated on images it trains on")
        self.split = split
        self.subgroups = [str(name).strip().lower() for name in names(subgroups)]  # as manifest column names are
        self.cache_dir = cache_dir
        self.seed = seed
        self.split_seed = split_seed
        self.index: pd.DataFrame | None = None
        self._drawn_paths: set[str] = set()  # images the data gave no split, split here by split_seed
        self._datasets: dict[str, StandardizedImageDataset] = {}

    @classmethod
    def from_manifest(cls, manifest: str, **kwargs) -> "ChestXrayDataModule":
        return cls(index=partial(index_manifest, manifest), **kwargs)

    @classmethod
    def from_folder(cls, root: str, **kwargs) -> "ChestXrayDataModule":
        return cls(index=partial(index_folder, root), **kwargs)

    @classmethod
    def from_synthetic(cls, root: str, n_per_class: int = 80, size: int = 128, synthetic_seed: int = 0,
                       **kwargs) -> "ChestXrayDataModule":
        return cls(index=partial(synthetic_index, root, n_per_class=n_per_class, size=size, seed=synthetic_seed),
                   **kwargs)

    # ---- index and splits -------------------------------------------------------------------
    def build_index(self) -> pd.DataFrame:
        if self.index is not None:
            return self.index
        index = self._index_factory() if callable(self._index_factory) else self._index_factory.copy()
        unknown = set(index["label"]) - set(self.class_names)
        if unknown:
            advice = ("remove those images, or train with them listed in +data.class_names=[...]" if self.for_training
                      else "it cannot score them: remove those images from the data")
            raise DataConfigError(f"labels {sorted(unknown)} are not among the model's classes {self.class_names}: "
                                  f"{advice}")
        if self.classes_from_data:
            self.class_names = classes_of(index, self.class_names)
        check_patient_leakage(index)
        check_subgroup_columns(index, self.subgroups, reserved=prediction_columns(self.class_names))
        unsplit = (index["split"] == "").to_numpy()
        n_unsplit = int(unsplit.sum())
        self._drawn_paths = set(index.loc[unsplit, "path"])
        given = set(index["split"]) - {""}
        if self.split != ALL_IMAGES:  # scoring every image as one set needs no split drawn
            if "train" in given and "val" not in given:
                # train/ and test/ only, a common layout: val is drawn from train (and from any images without a
                # split, which the given test split then does not grow by), patient-grouped and seeded.
                log.warning("no val split given: drawing %.0f%% of the train images%s as val", 100 * self.val_fraction,
                            f" and of the {n_unsplit} without a split" if n_unsplit else "")
                index = assign_splits(index.assign(split=index["split"].replace("train", "")), self.val_fraction, 0.0,
                                      self.split_seed)
            index = assign_splits(index, self.val_fraction, self.test_fraction, self.split_seed)
            if 0 < n_unsplit < len(index):  # the splits given grow: say by how much
                placed = index.loc[unsplit, "split"].value_counts().to_dict()
                log.warning("%d image(s) have no split in the data and were placed: %s (with their patient's given "
                            "split where it has one, else drawn with data.split_seed)", n_unsplit, placed)
        check_patient_leakage(index)
        if self.holdout_sources:
            # Sources are one source whatever their case (index._one_spelling): so are the names held out.
            spelled = {source.casefold(): source for source in set(index["source"])}
            self.holdout_sources = [spelled.get(name.casefold(), name) for name in self.holdout_sources]
            missing = set(self.holdout_sources) - set(index["source"])
            if missing:
                raise DataConfigError(f"holdout_sources {sorted(missing)} not in the data (sources: "
                                      f"{sorted(set(index['source']))})")
            held = index["source"].isin(self.holdout_sources)
            # A patient imaged at a held-out source and at a kept one (a hospital network's shared ids) is tested
            # there, so none of their images may train or validate.
            held_patients = set(index.loc[held & (index["patient_id"] != ""), "patient_id"])
            also_held = ~held & index["patient_id"].isin(held_patients)
            if also_held.any():
                log.warning("%d image(s) of %d patient(s) also imaged at a held-out source are left out of train and "
                            "val", int(also_held.sum()), index.loc[also_held, "patient_id"].nunique())
            # Held-out sources never reach train/val; all of their images form the test set.
            index = index.copy()
            index.loc[held, "split"] = "test"
            index.loc[~held & ((index["split"] == "test") | also_held), "split"] = "unused"
        index = index.reset_index(drop=True)
        untrained = sorted(set(self.class_names) - set(index.loc[index["split"].isin(self.train_splits), "label"]))
        if untrained and self.for_training and self.split != ALL_IMAGES:  # data scored whole is not trained on
            log.warning("class(es) %s have no training images: the model cannot learn them; if the data holds only "
                        "some classes, pass +data.class_names=[...]", untrained)
        # A checkpoint's data is measured on its one split (none of them when scored whole).
        warn_classes_missing_from_evaluation(index, ("val", "test") if self.for_training else
                                             () if self.split == ALL_IMAGES else (self.split,))
        index[TARGET] = [self.class_names.index(label) for label in index["label"]]
        self.index = index
        return index

    def split_frame(self, split: str) -> pd.DataFrame:
        """The images of `split`; "train" means every split the model trains on (`train_splits`), "all" every
        image of the data (an external set scored as a whole)."""
        frame = self.build_index()
        if split == ALL_IMAGES:
            part = frame
        else:
            part = frame[frame["split"].isin(self.train_splits) if split == "train" else frame["split"] == split]
        if part.empty:
            counts = frame["split"].value_counts().to_dict()
            drawn = f", or data.{split}_fraction above 0 for images without one" if split in ("val", "test") else ""
            raise DataConfigError(f"split {split!r} has no images (images per split: {counts}); give it images "
                                  f"({split}/ folder or split column{drawn}), or choose a split that has them")
        return part

    def describe_split(self, split: str) -> str:
        """The images of `split` as a report's title names them."""
        if split == ALL_IMAGES:
            return "all images"
        if split == "test" and self.holdout_sources:
            return f"held-out {', '.join(self.holdout_sources)} (all of its images)"
        return f"{split} split"

    def warn_if_split_was_drawn(self, split: str) -> None:
        """Scoring or calibrating on data that gives no split uses only the part drawn for `split`: say so, and
        how to take every image."""
        self.build_index()
        chosen_whole = split == ALL_IMAGES or (split == "test" and self.holdout_sources)  # held-out sources: all
        if chosen_whole:
            return
        paths = self.split_frame(split)["path"]
        if drawn := int(paths.isin(self._drawn_paths).sum()):
            log.warning("%d images have no split in the data: %d of the %d images of the %r split used here are among "
                        "them, drawn with data.split_seed; to use every image (an external set), pass data.split=%s",
                        len(self._drawn_paths), drawn, len(paths), split, ALL_IMAGES)

    def summary(self) -> dict:
        """Counts per split, source and label, and a fingerprint of which image is in which split: stored in
        the checkpoint as the training-data summary."""
        frame = self.build_index()
        counts = frame.groupby(["split", "source", "label"]).size()
        out: dict = {}
        for (split, source, label), n in counts.items():
            out.setdefault(split, {}).setdefault(source, {})[label] = int(n)
        return {"counts": out, "holdout_sources": self.holdout_sources, "class_names": self.class_names,
                "split_sha256": split_fingerprint(frame), "train_splits": self.train_splits}

    def check_unseen(self, split: str, data_summary: dict, whose: str = "the checkpoint",
                     before_training: bool = False) -> None:
        """Refuse to calibrate, select or evaluate a checkpoint on images it trained on: `split` of this data
        when the checkpoint's `data_summary` says it trained on that split of the same split assignment, or
        when images of `split` have the pixels of its training images (`before_training`: this data's own train
        split, which the refusal then names)."""
        trained_on = data_summary.get("train_splits", ["train"])
        if ((split in trained_on or split == "all")
                and data_summary.get("split_sha256") == split_fingerprint(self.build_index())):
            where = (f"the 'all' split holds the images {whose} trained on" if split == "all"
                     else f"{whose} trained on the {split!r} split")
            raise LeakageError(f"{where} (data.train_splits={trained_on}): numbers computed there would be in-sample; "
                               "use a split it does not train on")
        self.check_not_trained_on(split, data_summary.get(TRAIN_FINGERPRINTS, []), whose, before_training)

    def fingerprints(self, split: str) -> list[str]:
        """Pixel fingerprints of `split`'s standardized images (see `image_fingerprints`)."""
        return image_fingerprints(self.dataset(split).images)

    def check_not_trained_on(self, split: str, trained: Sequence[str], whose: str,
                             before_training: bool = False) -> None:
        """Refuse when images of `split` have the pixels of images in `trained` (fingerprints of what `whose`
        trained on): copies under other names, or another split assignment of the same data. `before_training`:
        `trained` is this data's own train split, whose copies the refusal names beside each image."""
        trained = set(trained)
        if not trained:
            return
        frame = self.split_frame(split)
        seen = [(path, label, fingerprint) for path, label, fingerprint
                in zip(frame["path"], frame["label"], self.fingerprints(split)) if fingerprint in trained]
        if not seen:
            return
        if before_training:
            train = self.split_frame("train")
            copy_of = dict(zip(self.fingerprints("train"), zip(train["path"], train["label"])))
            pairs = "; ".join(f"{path} ({label}) = {copy_of[fingerprint][0]} ({copy_of[fingerprint][1]}, train)"
                              for path, label, fingerprint in seen[:3])
            raise LeakageError(f"{len(seen)} of the {len(frame)} images of the {split!r} split have the same pixels as "
                               f"training images: {pairs}. Numbers there would be in-sample: keep one copy of each "
                               "image, under its right label")
        raise LeakageError(
            f"{len(seen)} of the {len(frame)} images of the {split!r} split have the same pixels as images {whose} "
            f"trained on, e.g. {[path for path, _, _ in seen[:3]]}: numbers there would be in-sample. Remove the "
            "copies, or, for data split automatically, use the data.split_seed, data.val_fraction and "
            "data.test_fraction of the training run")

    # ---- datasets ---------------------------------------------------------------------------
    def dataset(self, split: str) -> StandardizedImageDataset:
        if split not in self._datasets:
            part = self.split_frame(split)
            images = load_standardized(part["path"].tolist(), self.preprocessing, self.cache_dir)
            augment = self.augment if split == "train" else None
            if augment is not None and hasattr(augment, "set_random_seed"):
                augment.set_random_seed(self.seed)
            self._datasets[split] = StandardizedImageDataset(images, part["target"].tolist(), self.preprocessing, augment)
        return self._datasets[split]

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            self.dataset("train")
            self.dataset("val")
        if stage in (None, "test", "predict"):
            self.dataset(self.split)

    def class_weights(self) -> torch.Tensor | None:
        if not self.use_class_weights:
            return None
        return balanced_class_weights(self.split_frame("train")["target"], len(self.class_names))

    # ---- loaders ----------------------------------------------------------------------------
    def _loader(self, dataset, batch_size: int, **kwargs) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, worker_init_fn=seed_worker, **kwargs)

    def train_dataloader(self) -> DataLoader:
        dataset = self.dataset("train")
        if self.weighted_sampling:
            sources = self.split_frame("train")["source"].tolist() if self.balance_sources else None
            sampler = balanced_sampler(dataset.targets.numpy(), len(self.class_names), self.seed, sources)
            return self._loader(dataset, self.batch_size, sampler=sampler, drop_last=len(dataset) > self.batch_size)
        generator = torch.Generator().manual_seed(self.seed)
        return self._loader(dataset, self.batch_size, shuffle=True, generator=generator,
                            drop_last=len(dataset) > self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("val"), self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.dataset(self.split), self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
