"""The checkpoint's inference record: where it lives and how to read it without building a model.

Importing this module costs only torch (no Lightning, no timm), so light processes such as the
server's main process can read a checkpoint's spec cheaply.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

CHECKPOINT_KEY = "cxr"
# The data_summary key under which a checkpoint keeps the pixel fingerprints of its training images.
TRAIN_FINGERPRINTS = "train_image_sha256"
FIT_FINGERPRINTS = "image_sha256"  # in calibration_fit: the pixel fingerprints of the images it was fitted on


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class CheckpointError(ValueError):
    """A file given as a checkpoint that is not a cxr checkpoint."""


def read_checkpoint(ckpt_path: str | Path) -> tuple[dict, dict]:
    """(checkpoint, spec); raises FileNotFoundError for a missing file, CheckpointError for anything else."""
    import pickle

    import torch

    path = Path(ckpt_path).expanduser()
    if path.is_dir():
        hint = path / "checkpoints" / "best.ckpt"
        raise CheckpointError(f"{path} is a folder, not a checkpoint file"
                              + (f": did you mean {hint}?" if hint.is_file() else ""))
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, OSError) as exc:  # OSError: mmap of a cut file
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(exc).__name__})") from exc
    spec = checkpoint.get(CHECKPOINT_KEY) if isinstance(checkpoint, dict) else None
    if not spec:
        raise CheckpointError(f"{path} is not a cxr checkpoint (no '{CHECKPOINT_KEY}' record)")
    from cxr.models.feature_distance import SPEC_KEY, TENSORS_KEY

    has_record = bool(spec.get(SPEC_KEY))
    if has_record != (checkpoint.get(TENSORS_KEY) is not None):
        # Half a fit would serve no distances while /model/info and the referral rule advertise its threshold.
        present, missing = ("record", "tensors") if has_record else ("tensors", "record")
        raise CheckpointError(f"{path} has the feature distance's {present} without its {missing} ('{TENSORS_KEY}' "
                              f"and the spec's '{SPEC_KEY}' go together): was it edited by hand? Remove both, or retrain")
    return checkpoint, spec


def read_spec(ckpt_path: str | Path) -> dict:
    return read_checkpoint(ckpt_path)[1]


def public_data_summary(spec: dict) -> dict:
    """The training-data summary to publish with a model (/model/info, ONNX metadata), without the training
    images' fingerprints: with them, anyone holding an X-ray could tell whether it was trained on."""
    return {k: v for k, v in (spec.get("data_summary") or {}).items() if k != TRAIN_FINGERPRINTS}


def public_calibration_fit(spec: dict) -> dict | None:
    """Where the operating point was fitted, to publish or report, without the fit images' fingerprints."""
    fit = spec.get("calibration_fit")
    return None if fit is None else {k: v for k, v in fit.items() if k != FIT_FINGERPRINTS}


def write_checkpoint_with_spec(ckpt_path: str | Path, out_path: str | Path, entries: dict | None = None,
                               **spec_updates) -> Path:
    """Write `ckpt_path` to `out_path` with its spec updated (and top-level `entries` set: tensors, which the JSON
    spec cannot hold). The file appears whole or not at all, so updating a checkpoint in place never leaves a
    truncated one behind."""
    checkpoint, spec = read_checkpoint(ckpt_path)
    checkpoint.update(entries or {})
    checkpoint[CHECKPOINT_KEY] = {**spec, **spec_updates}
    return save_checkpoint(checkpoint, out_path)


def save_checkpoint(checkpoint: dict, out_path: str | Path) -> Path:
    """torch.save that leaves either the whole file or none (never a truncated checkpoint)."""
    import torch

    out = Path(out_path).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    try:
        torch.save(checkpoint, partial)
        os.replace(partial, out)
    except BaseException as exc:  # a pickling error or Ctrl-C too: no .partial left behind
        could_not_open = not partial.exists()  # torch.save's RuntimeError "open file failed": an unwritable folder
        partial.unlink(missing_ok=True)
        if isinstance(exc, OSError) or isinstance(exc, RuntimeError) and could_not_open:
            raise PermissionError(f"cannot write {out}: {exc}") from exc
        raise
    return out
