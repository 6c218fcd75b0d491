"""Image indexes (a folder of class sub-folders, a manifest CSV) and patient-grouped splits.

An index is a DataFrame with columns `path` (absolute), `label` (canonical class name),
`split` (train / val / test, or empty), `patient_id` and `source`; a manifest's other columns follow as
they are (text, empty where missing), for reports by subgroup.
"""
from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from cxr.data.decode import DICOM_MAGIC_OFFSET, is_dicom

log = logging.getLogger(__name__)

CLASS_NAMES = ("normal", "pneumonia", "tuberculosis")
SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "test": "test", "testing": "test"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".bmp", ".tif", ".tiff"}
LABEL_ALIASES = {
    "normal": "normal", "healthy": "normal", "no_finding": "normal", "no finding": "normal",
    "pneumonia": "pneumonia",
    "tuberculosis": "tuberculosis", "tb": "tuberculosis", "turberculosis": "tuberculosis",
}
COLUMNS = ["path", "label", "split", "patient_id", "source"]
TARGET = "target"  # the class index the data module adds; a manifest column of that name is not kept
MAX_SUBGROUP_VALUES = 20
# How R, pandas and databases write a missing value: such a patient_id is no patient, not one named "NA",
# and such a subgroup value is "not given".
MISSING_IDS = {"", "na", "n/a", "nan", "none", "null"}
# Other spellings of the columns every index has, after lower-casing and joining words with "_" (NIH's own
# Data_Entry CSV heads its patient column "Patient ID"): read as another column, it would be no patient id.
COLUMN_ALIASES = {"patientid": "patient_id"}


class LeakageError(ValueError):
    """A patient appears in more than one split."""


class DataConfigError(ValueError):
    """The data given cannot be used as it is (an unknown label, a missing column, no images); the message says
    what to change."""


def absolute(path: str | Path) -> Path:
    """An absolute, normalised path that keeps symlinks as they are: a manifest that is a symlink (git-annex, DVC
    with symlinked caches) lists paths relative to where it is linked, not to the object store it points into."""
    return Path(os.path.abspath(Path(path).expanduser()))


def canonical_label(name: str) -> str | None:
    return LABEL_ALIASES.get(str(name).strip().lower())


def _label_or_raise(name: str, where: str) -> str:
    label = canonical_label(name)
    if label is None:
        raise DataConfigError(f"{where}: unknown label {name!r}; expected one of {sorted(LABEL_ALIASES)}: rename it "
                              "or remove the image")
    return label


def is_mask(file: Path, class_dir: Path) -> bool:
    """Segmentation masks kept beside the images (`x_mask.png`, `masks/x.png`, as in the COVID-19
    Radiography Database's `Normal/images/` + `Normal/masks/`) are not radiographs."""
    folders = [part.lower() for part in file.relative_to(class_dir).parts[:-1]]
    return file.stem.lower().endswith(("_mask", "-mask")) or any(f in ("mask", "masks") for f in folders)


def is_image_file(file: Path) -> bool:
    """By suffix, or for any other name by DICOM's magic bytes: DICOM files are often named `IM0001` or by their
    UID (`1.2.840.113619.2.55.3`)."""
    if file.suffix.lower() in IMAGE_SUFFIXES:
        return True
    try:
        with file.open("rb") as handle:
            return is_dicom(handle.read(DICOM_MAGIC_OFFSET + 4))
    except OSError:
        return False


def is_hidden(name: str) -> bool:
    """Dot files and folders (macOS AppleDouble `._x.png`, `.thumbs/`) and the `__MACOSX/` folders of macOS zip
    archives: never radiographs, and AppleDouble files carry image suffixes without being images."""
    return name.startswith(".") or name == "__MACOSX"


def _subfolders(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not is_hidden(d.name))


def _files_under(folder: Path) -> list[Path]:
    """Every file under `folder` that is not hidden (see `is_hidden`), sorted, also under symlinked sub-folders
    (which Path.rglob does not enter before Python 3.13); each real folder is walked once, so a link to an ancestor
    cannot loop."""
    files, walked = [], set()
    for current, subfolders, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(current)
        if real in walked:
            subfolders.clear()
            continue
        walked.add(real)
        # Sorted: which of two paths to one real folder is kept must not depend on listing order.
        subfolders[:] = sorted(name for name in subfolders if not is_hidden(name))
        files.extend(Path(current, name) for name in names if not is_hidden(name))
    return sorted(files)


def _split_folders(root: Path) -> dict[str, Path]:
    """root's split folders by split name; two folders naming one split (val/ and valid/, Train/ and train/) are
    refused, as one of them would be left out."""
    found: dict[str, Path] = {}
    for folder in _subfolders(root):
        split = SPLIT_ALIASES.get(folder.name.lower())
        if split in found:
            raise DataConfigError(f"{found[split]} and {folder} are both the {split!r} split: merge them into one "
                                  "folder, or rename or remove one")
        if split is not None:
            found[split] = folder
    return found


def index_folder(root: str | Path) -> pd.DataFrame:
    """`root/<class>/*` or `root/<split>/<class>/*`; class and split folder names (train/training,
    val/valid/validation, test/testing) are matched case-insensitively. Symlinked sub-folders are followed; masks
    (see `is_mask`), hidden files (see `is_hidden`) and files that are not images (see `is_image_file`) are
    skipped; links to files that do not exist, and split folders inside class folders, are refused."""
    root = absolute(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist")
    split_dirs = _split_folders(root)
    if split_dirs:
        for other in (d for d in _subfolders(root) if d.name.lower() not in SPLIT_ALIASES):
            log.warning("ignoring folder %s: next to the split folders %s, class folders must sit inside them",
                        other, sorted(d.name for d in split_dirs.values()))
    groups = split_dirs.items() if split_dirs else [("", root)]
    rows, masks, others, dangling = [], [], [], []
    for split, base in groups:
        for class_dir in _subfolders(base):
            label = canonical_label(class_dir.name)
            if label is None:
                log.warning("ignoring folder %s: not a known class name", class_dir)
                continue
            inside = [d for d in _subfolders(class_dir) if d.name.lower() in SPLIT_ALIASES]
            if inside:  # read as plain sub-folders, the user's own test images would be split anew, some trained on
                raise DataConfigError(f"{inside[0]} is named for a split but sits inside the class folder "
                                      f"{class_dir.name}/: split folders hold the class folders "
                                      f"({inside[0].name}/{class_dir.name}/...); move them so, or rename the folder")
            for file in _files_under(class_dir):
                if not file.is_file():
                    if file.is_symlink() and not file.exists():
                        dangling.append(file)
                    continue
                if not is_image_file(file):
                    others.append(file)
                elif is_mask(file, class_dir):
                    masks.append(file)
                else:
                    rows.append({"path": str(file), "label": label, "split": split,
                                 "patient_id": "", "source": root.name})
    if dangling:  # e.g. a git-annex or DVC checkout not fetched yet: a whole class could be missing unnoticed
        shown = "\n  ".join(map(str, dangling[:20]))
        raise DataConfigError(f"{len(dangling)} file(s) under {root} are links to files that do not exist (not "
                              f"fetched yet, e.g. by git annex get or dvc pull?); fetch or remove them:\n  {shown}")
    if masks:
        log.warning("skipped %d segmentation masks (e.g. %s): not radiographs", len(masks), masks[0])
    if others:
        log.warning("skipped %d file(s) that are not images by name or content (e.g. %s)", len(others), others[0])
    if not rows:
        raise DataConfigError(f"no images found under {root}: put them in class sub-folders such as NORMAL/, "
                              "PNEUMONIA/, TB/ (optionally inside train/, val/, test/)")
    return one_row_per_image(pd.DataFrame(rows, columns=COLUMNS), root)


def blank_missing(column: pd.Series) -> pd.Series:
    """Text values stripped, every way of writing "no value" (NA, null, ...) as the empty string."""
    values = column.astype(str).str.strip()
    return values.mask(values.str.lower().isin(MISSING_IDS), "")


def extra_columns(columns) -> list[str]:
    """The columns of an index beyond the ones every index has: a manifest's own (view, sex, ...)."""
    return [name for name in columns if name not in COLUMNS and name != TARGET]


def column_name(name: str) -> str:
    """A manifest's column name as the index reads it: stripped and lower case; a spelling of one of the columns
    every index has (`Patient ID`, `PatientID`, `patient-id`) as that column."""
    name = name.strip().lower()
    joined = "_".join(name.replace("-", " ").split())
    return COLUMN_ALIASES.get(joined, joined if joined in COLUMNS else name)


def not_utf8(manifest: Path, exc: UnicodeDecodeError) -> DataConfigError:
    return DataConfigError(f"{manifest} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at position {exc.start}, "
                           "as Excel's plain 'CSV' writes accents on Windows): save it as 'CSV UTF-8', or convert it, "
                           "e.g. iconv -f cp1252 -t utf-8")


def _manifest_separator(manifest: Path) -> str:
    """The field separator of a manifest, from its first line: a comma, or the semicolon (spreadsheets set to a
    locale whose decimal mark is a comma) or tab it uses instead."""
    try:
        with manifest.open(encoding="utf-8-sig") as handle:
            first = handle.readline()
    except UnicodeDecodeError as exc:
        raise not_utf8(manifest, exc) from None
    return max((",", ";", "\t"), key=first.count) if first.count(",") == 0 else ","


def _resolved_path(manifest: Path, value: str) -> str:
    """A manifest's path as an absolute one; written on Windows (`images\\x.png`), its separators are read as
    folders where the path does not exist as written."""
    path = absolute(manifest.parent / value)
    if "\\" in value and os.sep == "/" and not path.exists():
        path = absolute(manifest.parent / value.replace("\\", "/"))
    return str(path)


def _one_spelling(sources: pd.Series) -> pd.Series:
    """Source names that differ only in case (`kermany`, `Kermany`) as one source, spelled as most of its images are:
    apart, one hospital's images would count as two in the per-source report."""
    folded = sources.str.casefold()
    spellings = sources.groupby(folded).agg(lambda names: names.value_counts().index[0])
    merged = folded.map(spellings)
    variants = sorted(set(sources[merged != sources]))
    if variants:
        log.warning("source name(s) %s read as %s: sources differing only in case are one source", variants,
                    sorted(set(merged[merged != sources])))
    return merged


def one_row_per_image(frame: pd.DataFrame, where: Path) -> pd.DataFrame:
    """One row per image file: a file listed twice, or reached a second time through a link (a `TB` folder linked
    to `TUBERCULOSIS`), alike is kept once (it would count twice in every metric); with different labels,
    splits, patients or sources it is refused (keeping either row could hide an image, or a patient, in two
    splits: a `val` folder linked to `test`)."""
    real = frame["path"].map(os.path.realpath)
    repeated = real.duplicated(keep=False)
    if not repeated.any():
        return frame
    differs = frame[repeated].groupby(real[repeated])[["label", "split", "patient_id", "source"]].nunique()
    conflicting = differs.index[differs.max(axis=1) > 1]
    if len(conflicting):
        examples = [frame.loc[real == file, "path"].tolist() for file in conflicting[:3]]
        raise DataConfigError(f"{where}: {len(conflicting)} image(s) are listed more than once with different labels, "
                              f"splits, patients or sources (or reached through a link under two of them), e.g. "
                              f"{examples}: keep one row per image, or remove the link")
    log.warning("%s: %d row(s) repeat an image listed before, or reached through a link (e.g. %s): each image is "
                "used once", where, int(real.duplicated().sum()), frame.loc[repeated, "path"].iloc[0])
    return frame[~real.duplicated()].reset_index(drop=True)


def _read_manifest_rows(manifest: Path, separator: str) -> tuple[list[str], list[list[str]], list[int]]:
    """The column names (see `column_name`), each row's values padded or cut to one per column, and the line
    each row starts on (blank lines are empty rows). A row with more values than there are columns is refused:
    a value with an unquoted separator would shift every value after it. Empty cells past the last column (a
    spreadsheet's trailing separators) are not values."""
    rows, lines, overlong = [], [], []
    with manifest.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle, delimiter=separator, skipinitialspace=True, strict=True)
        try:
            header = [column_name(name) for name in next(reader, [])]
            start = reader.line_num + 1
            for values in reader:
                if any(value.strip() for value in values[len(header):]):
                    overlong.append(start)
                rows.append((values + [""] * len(header))[:len(header)])
                lines.append(start)
                start = reader.line_num + 1
        except UnicodeDecodeError as exc:
            raise not_utf8(manifest, exc) from None
        except csv.Error as exc:  # e.g. a quote left open
            raise DataConfigError(f"{manifest} line {reader.line_num}: not readable as CSV ({exc}): check its "
                                  "quotes") from None
    if overlong:
        raise DataConfigError(f"{manifest}: {len(overlong)} row(s) have more values than the {len(header)} columns, "
                              f"e.g. line(s) {overlong[:5]}: put values that contain {separator!r} in double quotes")
    return header, rows, lines


def index_manifest(manifest: str | Path) -> pd.DataFrame:
    """A CSV with `path` (relative to the CSV) and `label`; optional `split`, `patient_id`, `source`; any other
    columns (view, sex, age band, site, ...) are kept as they are. Read as spreadsheets write them: UTF-8 with or
    without a byte-order mark, comma, semicolon or tab separated, spaces after separators, empty rows."""
    manifest = absolute(manifest)
    if not manifest.is_file():
        raise FileNotFoundError(f"manifest {manifest} does not exist")
    separator = _manifest_separator(manifest)
    header, values, lines = _read_manifest_rows(manifest, separator)
    unnamed = [i for i, name in enumerate(header) if not name]
    if any(row[i].strip() for row in values for i in unnamed):
        raise DataConfigError(f"{manifest}: column(s) {[i + 1 for i in unnamed]} have values but no name in the first "
                              "line; name them")
    if unnamed:  # a spreadsheet's trailing separators after columns once used
        keep = [i for i in range(len(header)) if i not in unnamed]
        header, values = [header[i] for i in keep], [[row[i] for i in keep] for row in values]
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise DataConfigError(f"{manifest}: column name(s) {repeated} appear more than once (case, spaces and "
                              "spellings such as 'Patient ID' are ignored); rename them")
    table = pd.DataFrame(values, columns=header, dtype=str)
    missing = {"path", "label"} - set(table.columns)
    if missing:
        raise DataConfigError(f"{manifest}: missing column(s) {sorted(missing)} (found {list(table.columns)}); the "
                              "first line must name the columns, e.g. path,label,split,patient_id")
    table = table.apply(lambda column: column.str.strip())
    empty = (table == "").all(axis=1)
    if empty.any():  # the rows a spreadsheet leaves below its data (",,,")
        log.info("%s: skipped %d empty row(s)", manifest, int(empty.sum()))
    rows = [lines[i] for i in np.flatnonzero(~empty.to_numpy())]  # the file's line numbers, for messages
    table = table[~empty].reset_index(drop=True)
    if (pathless := [row for row, value in zip(rows, table["path"]) if not value]):
        raise DataConfigError(f"{manifest}: {len(pathless)} row(s) have no path, e.g. line(s) {pathless[:5]}: give "
                              "each image's path, or remove the row")
    frame = pd.DataFrame({
        "path": [_resolved_path(manifest, p) for p in table["path"]],
        "label": [_label_or_raise(v, f"{manifest} line {row}") for row, v in zip(rows, table["label"])],
        "split": table["split"].str.lower().replace(SPLIT_ALIASES) if "split" in table else "",
        "patient_id": blank_missing(table["patient_id"]) if "patient_id" in table else "",
        # An image with no source given comes from the manifest's folder, as every image does without the column.
        "source": (_one_spelling(blank_missing(table["source"]).replace("", manifest.parent.name)) if "source" in table
                   else manifest.parent.name),
    })
    frame = pd.concat([frame, table[extra_columns(table.columns)]], axis=1)
    bad_splits = set(frame["split"]) - set(SPLITS) - {""}
    if bad_splits:
        raise DataConfigError(f"{manifest}: unknown split value(s) {sorted(bad_splits)}; use {SPLITS}, or leave it "
                              "empty to have the split drawn")
    return one_row_per_image(frame, manifest)


def check_subgroup_columns(index: pd.DataFrame, columns: Sequence[str], reserved: Sequence[str] = ()) -> None:
    """Refuse report subgroups that are not extra columns of a manifest, that have too many values to be groups, or
    whose names the report's predictions.csv uses itself (`reserved`)."""
    taken = [name for name in columns if name in reserved]
    if taken:
        raise DataConfigError(f"data.subgroups {taken} are names predictions.csv uses for the model's output; rename "
                              "those manifest columns")
    available = extra_columns(index.columns)
    unknown = [name for name in columns if name not in available]
    if unknown:
        raise DataConfigError(f"data.subgroups {unknown} are not extra columns of the data (available: {available}; "
                              "every report is per class and per source already): add them to the manifest, one value "
                              "per image, empty where unknown")
    for name in columns:
        values = index[name].nunique()
        if values > MAX_SUBGROUP_VALUES:
            raise DataConfigError(f"data.subgroups column {name!r} has {values} distinct values, more than "
                                  f"{MAX_SUBGROUP_VALUES}: bin it into a new column (e.g. age 0-17, 18-39, 40-64, 65+)")


def check_patient_leakage(index: pd.DataFrame) -> None:
    """Raise LeakageError naming the first patients whose images sit in more than one split."""
    known = index[(index["patient_id"] != "") & (index["split"] != "")]
    splits_per_patient = known.groupby("patient_id")["split"].nunique()
    leaking = splits_per_patient[splits_per_patient > 1].index.tolist()
    if leaking:
        detail = "; ".join(
            f"{pid} in {sorted(set(known.loc[known['patient_id'] == pid, 'split']))}" for pid in leaking[:5]
        )
        raise LeakageError(f"{len(leaking)} patient(s) appear in more than one split: {detail}")


def _with_patients_splits(index: pd.DataFrame) -> pd.Series:
    """The split column, where a row without a split takes the split given to its patient's other rows: drawn
    apart from them, it could put the patient in two splits."""
    named = index["patient_id"] != ""
    split_of = index[named & (index["split"] != "")].groupby("patient_id")["split"].first()
    inherits = named & (index["split"] == "")
    return index["split"].mask(inherits, split_of.reindex(index["patient_id"], fill_value="").to_numpy())


def per_class_group_holdout(labels: np.ndarray, groups: np.ndarray, share: float, seed: int) -> np.ndarray:
    """Positions of a seeded hold-out of about `share` of each class's patients (a patient counts for its most
    frequent label), at least one where the class has two, never all of them. For data too small for
    StratifiedGroupKFold, which needs a class with at least as many images as folds."""
    frame = pd.DataFrame({"label": labels, "group": groups})
    label_of_group = frame.groupby("group")["label"].agg(lambda group_labels: group_labels.mode().iloc[0])
    rng = np.random.default_rng(seed)
    held = []
    for label in sorted(set(label_of_group)):
        patients = label_of_group.index[label_of_group == label].to_numpy()
        n_held = min(len(patients) - 1, max(1, round(share * len(patients))))
        held.extend(rng.permutation(patients)[:n_held])
    return np.flatnonzero(np.isin(groups, held))


def assign_splits(index: pd.DataFrame, val_fraction: float, test_fraction: float, seed: int) -> pd.DataFrame:
    """Patient-grouped, label-stratified, seeded split of the rows that have no split yet; those of a patient with
    a split already given take that split."""
    index = index.assign(split=_with_patients_splits(index))
    todo = index["split"] == ""
    if not todo.any():
        return index
    part = index[todo]
    groups = part["patient_id"].where(part["patient_id"] != "", part["path"]).to_numpy()
    if (part["patient_id"] == "").any():
        log.warning("%d image(s) have no patient_id: each is treated as its own patient", int((part["patient_id"] == "").sum()))
    labels = part["label"].to_numpy()
    splits = np.full(len(part), "train", dtype=object)
    remaining = np.arange(len(part))
    too_small = False
    for name, fraction in (("test", test_fraction), ("val", val_fraction)):
        share = fraction / max(1e-9, len(remaining) / len(part))
        if fraction <= 0 or len(remaining) < 2:
            continue
        n_folds = int(min(max(2, round(1 / share)), len(np.unique(groups[remaining]))))
        if n_folds < 2:
            continue
        # StratifiedGroupKFold refuses when every class has fewer images than folds, and when one class has, it can
        # leave that class out of the held-out fold; val is then drawn the same way as test was.
        too_small = too_small or np.unique(labels[remaining], return_counts=True)[1].min() < n_folds
        if too_small:
            held = per_class_group_holdout(labels[remaining], groups[remaining], share, seed)
        else:
            folds = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
            _, held = next(folds.split(remaining, labels[remaining], groups[remaining]))
        splits[remaining[held]] = name
        remaining = np.setdiff1d(remaining, remaining[held])
    index.loc[todo, "split"] = splits
    return index
