"""Decode-once image cache and the dataset that augments from it."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset

from cxr.data.decode import DECODER_VERSION, ImageDecodeError, decode_image
from cxr.data.preprocess import Preprocessing

log = logging.getLogger(__name__)


class DataCheckError(ValueError):
    """One or more files of the index are missing or cannot be decoded; the message lists them."""


def image_fingerprints(images: np.ndarray) -> list[str]:
    """A short SHA-256 of each standardized image: the same pixels give the same fingerprint, whatever the
    file is called or wherever it lives."""
    return [hashlib.sha256(image.tobytes()).hexdigest()[:16] for image in images]


def _check_files_exist(paths: Sequence[str]) -> None:
    missing = [path for path in paths if not Path(path).is_file()]
    if missing:
        shown = "\n  ".join(missing[:20])
        raise DataCheckError(f"{len(missing)} of {len(paths)} image file(s) do not exist:\n  {shown}")


def _cache_key(paths: Sequence[str], preprocessing: Preprocessing) -> str:
    digest = hashlib.sha1(json.dumps([preprocessing.to_dict(), DECODER_VERSION], sort_keys=True).encode())
    for path in paths:
        stat = Path(path).stat()
        # The inode and ctime tell apart files swapped or replaced under the same name, size and (kept) mtime.
        digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ino}|{stat.st_ctime_ns}\n".encode())
    return digest.hexdigest()[:16]


def load_standardized(paths: Sequence[str], preprocessing: Preprocessing, cache_dir: str | Path | None = None,
                      workers: int = 4) -> np.ndarray:
    """Decode and standardize every image once: an (N, S, S) uint8 stack.

    This is also the data check: every missing or undecodable file is collected and reported together,
    with its path, before any training starts. With `cache_dir` the stack is kept on disk
    (keyed by paths, file sizes/mtimes/inodes/ctimes, preprocessing and the decoder's version) and reused by later runs.
    """
    _check_files_exist(paths)
    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / f"standardized-{_cache_key(paths, preprocessing)}.npy"
        if cache_file.is_file():
            try:
                cached = np.load(cache_file)
            except (ValueError, OSError, EOFError) as exc:  # corrupt (a full disk, say): rebuild it
                log.warning("rebuilding unreadable image cache %s (%s)", cache_file, exc)
            else:
                if cached.shape == (len(paths), preprocessing.image_size, preprocessing.image_size):
                    log.info("reusing image cache %s", cache_file)
                    return cached
                log.warning("rebuilding image cache %s: shape %s does not match", cache_file, cached.shape)
    size = preprocessing.image_size
    stack = np.empty((len(paths), size, size), dtype=np.uint8)
    errors: list[str] = []

    def work(i: int) -> None:
        try:
            stack[i] = preprocessing.standardize(decode_image(paths[i]))
        except ImageDecodeError as exc:
            errors.append(str(exc))
        except Exception as exc:  # a decoder's unforeseen failure still names its file, beside the others
            errors.append(f"{paths[i]}: {type(exc).__name__}: {exc}")

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(work, range(len(paths))))
    if errors:
        shown = "\n  ".join(sorted(errors)[:20])
        raise DataCheckError(f"{len(errors)} of {len(paths)} image(s) cannot be decoded:\n  {shown}")
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f"{cache_file.stem}.{os.getpid()}.tmp.npy")  # one per process: runs may race
        np.save(tmp, stack)
        tmp.replace(cache_file)
    return stack


class StandardizedImageDataset(Dataset):
    """Items are (tensor, class index). Augmentation runs on the cached standardized uint8 image."""

    def __init__(self, images: np.ndarray, targets: Sequence[int], preprocessing: Preprocessing,
                 augment: A.BasicTransform | None = None):
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        self.images = images
        self.targets = torch.as_tensor(np.asarray(targets), dtype=torch.long)
        self.preprocessing = preprocessing
        self.augment = augment

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[i]
        if self.augment is not None:
            image = self.augment(image=image)["image"]
        return self.preprocessing.to_tensor(image), self.targets[i]
