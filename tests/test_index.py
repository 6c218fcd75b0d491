"""Indexes from folders and manifests, and splits that never put one patient in two places."""
import hashlib

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxr.config import user_errors
from cxr.data.index import (DataConfigError, LeakageError, assign_splits, check_patient_leakage, index_folder,
                            index_manifest)


def write_png(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(path)


def test_folder_aliases_and_split_subfolders(tmp_path):
    for split, cls in [("train", "NORMAL"), ("train", "TURBERCULOSIS"), ("test", "Pneumonia"), ("test", "TB")]:
        write_png(tmp_path / split / cls / "a.png")
    write_png(tmp_path / "train" / "OTHER" / "x.png")
    index = index_folder(tmp_path)
    assert sorted(zip(index["split"], index["label"])) == [
        ("test", "pneumonia"), ("test", "tuberculosis"), ("train", "normal"), ("train", "tuberculosis")]


def test_masks_beside_images_are_not_indexed(tmp_path, caplog):
    write_png(tmp_path / "TB" / "a.png")
    write_png(tmp_path / "TB" / "a_mask.png")  # the synthetic generator's layout
    write_png(tmp_path / "Normal" / "images" / "b.png")
    write_png(tmp_path / "Normal" / "masks" / "b.png")  # COVID-19 Radiography Database layout
    write_png(tmp_path / "Normal" / "images" / "masked_lungs.png")  # only the name's start: an image
    with caplog.at_level("WARNING"):
        index = index_folder(tmp_path)
    assert sorted(p.removeprefix(str(tmp_path)) for p in index["path"]) == [
        "/Normal/images/b.png", "/Normal/images/masked_lungs.png", "/TB/a.png"]
    assert "skipped 2 segmentation masks" in caplog.text


def test_folder_without_images_is_an_error(tmp_path):
    (tmp_path / "NORMAL").mkdir()
    with pytest.raises(DataConfigError, match="no images"):
        index_folder(tmp_path)


def test_manifest_paths_relative_to_csv_and_bad_label(tmp_path):
    (tmp_path / "m.csv").write_text("path,label\nimgs/a.png,Normal\nimgs/b.png,TB\n")
    index = index_manifest(tmp_path / "m.csv")
    assert index["path"].tolist() == [str(tmp_path / "imgs/a.png"), str(tmp_path / "imgs/b.png")]
    assert index["label"].tolist() == ["normal", "tuberculosis"]
    (tmp_path / "bad.csv").write_text("path,label\na.png,covid\n")
    with pytest.raises(ValueError, match="line 2.*covid"):
        index_manifest(tmp_path / "bad.csv")


def test_leaking_manifest_is_refused_naming_patient(tmp_path):
    (tmp_path / "m.csv").write_text(
        "path,label,split,patient_id\na.png,normal,train,p1\nb.png,normal,test,p1\nc.png,tb,val,p2\n")
    with pytest.raises(LeakageError, match="p1"):
        check_patient_leakage(index_manifest(tmp_path / "m.csv"))


def test_generated_split_is_patient_grouped_stratified_and_seeded():
    rng = np.random.default_rng(0)
    rows = []
    for p in range(120):
        label = ["normal", "pneumonia", "tuberculosis"][p % 3]
        for k in range(rng.integers(1, 4)):
            rows.append({"path": f"{p}_{k}.png", "label": label, "split": "", "patient_id": f"p{p}", "source": "s"})
    index = pd.DataFrame(rows)
    a = assign_splits(index, 0.15, 0.15, seed=1)
    check_patient_leakage(a)
    assert a.groupby("patient_id")["split"].nunique().max() == 1
    for split, share in (("train", 0.7), ("val", 0.15), ("test", 0.15)):
        part = a[a["split"] == split]
        assert abs(len(part) / len(a) - share) < 0.08
        assert set(part["label"]) == {"normal", "pneumonia", "tuberculosis"}
    assert a["split"].tolist() == assign_splits(index, 0.15, 0.15, seed=1)["split"].tolist()
    assert a["split"].tolist() != assign_splits(index, 0.15, 0.15, seed=2)["split"].tolist()


def test_existing_splits_are_kept():
    index = pd.DataFrame({"path": ["a", "b"], "label": ["normal", "normal"], "split": ["test", "train"],
                          "patient_id": ["p1", "p2"], "source": ["s", "s"]})
    assert assign_splits(index, 0.2, 0.2, 0)["split"].tolist() == ["test", "train"]


def test_split_folder_aliases_and_class_folders_beside_them_are_named(tmp_path, caplog):
    write_png(tmp_path / "Training" / "NORMAL" / "a.png")
    write_png(tmp_path / "validation" / "PNEUMONIA" / "b.png")
    write_png(tmp_path / "TESTING" / "tb" / "c.png")
    write_png(tmp_path / "NORMAL" / "stray.png")  # beside the split folders: not in any split
    with caplog.at_level("WARNING"):
        index = index_folder(tmp_path)
    assert sorted(zip(index["split"], index["label"])) == [
        ("test", "tuberculosis"), ("train", "normal"), ("val", "pneumonia")]
    assert "ignoring folder" in caplog.text and "NORMAL" in caplog.text


def test_manifest_split_aliases_and_padded_patient_ids(tmp_path):
    write_png(tmp_path / "a.png")
    write_png(tmp_path / "b.png")
    (tmp_path / "m.csv").write_text("path,label,split,patient_id\na.png,normal,Validation,p1\nb.png,normal,train, p1 \n")
    index = index_manifest(tmp_path / "m.csv")
    assert index["split"].tolist() == ["val", "train"] and index["patient_id"].tolist() == ["p1", "p1"]
    with pytest.raises(LeakageError, match="p1"):
        check_patient_leakage(index)


@pytest.mark.parametrize("csv, message", [
    ("path,label\na.png,covid\n", "unknown label 'covid'"),
    ("path,label,split\na.png,normal,holdout\n", "unknown split value"),
    ("file,label\na.png,normal\n", r"missing column\(s\) \['path'\]"),
    # Excel's plain "CSV" on Windows writes cp1252: ñ is the byte 0xf1
    ("path,label\nespa\u00f1a.png,normal\n".encode("cp1252"), "not UTF-8 text .*0xf1.*CSV UTF-8"),
    ("path,label\na.png,normal\na.png,pneumonia\n", r"listed more than once with different labels, splits, patients or sources"),
    # one image under two patients: keeping either row could hide P7 in both train and test
    ("path,label,split,patient_id\na.png,normal,train,P1\nb.png,normal,test,P7\na.png,normal,train,P7\n",
     "listed more than once with different labels, splits, patients or sources"),
    ("path,label,note\na.png,normal,ok\nb.png,normal,fine, really\n", r"1 row\(s\) have more values than the 3 columns, "
     r"e.g. line\(s\) \[3\]: put values that contain ',' in double quotes"),
    ("path,label\na.png,normal\n\n\nb.png,covid\n", "line 5: unknown label 'covid'"),  # line numbers count blank lines
    ("path,label\na.png,normal\n,tb\n", r"1 row\(s\) have no path, e.g. line\(s\) \[3\]"),
    ("path,label\na.png,normal\n\"b.png,tb\n", "line 3: not readable as CSV .*check its quotes"),
])
def test_bad_manifest_is_a_data_config_error_printed_without_traceback(tmp_path, capsys, csv, message):
    (tmp_path / "m.csv").write_bytes(csv if isinstance(csv, bytes) else csv.encode())
    with pytest.raises(DataConfigError, match=message):
        index_manifest(tmp_path / "m.csv")
    with pytest.raises(SystemExit) as exit_info:
        user_errors(lambda cfg: index_manifest(tmp_path / "m.csv"))(None)
    assert exit_info.value.code == 1 and capsys.readouterr().err.startswith("error: ")


def test_a_spreadsheet_s_trailing_separators_are_not_values(tmp_path):
    (tmp_path / "m.csv").write_text("path,label\na.png,normal,\n,,\nb.png,TB,,\n")
    index = index_manifest(tmp_path / "m.csv")
    assert index[["path", "label"]].values.tolist() == [[str(tmp_path / "a.png"), "normal"],
                                                        [str(tmp_path / "b.png"), "tuberculosis"]]


def test_manifest_column_names_ignore_case_and_spaces(tmp_path):
    (tmp_path / "m.csv").write_text("Path, Label ,SPLIT, Patient_ID\na.png,normal,train,p1\n")
    index = index_manifest(tmp_path / "m.csv")
    assert index[["label", "split", "patient_id"]].values.tolist() == [["normal", "train", "p1"]]


def test_symlinked_subfolders_are_followed_once(tmp_path):
    write_png(tmp_path / "extra" / "x.png")
    write_png(tmp_path / "data" / "TB" / "a.png")
    (tmp_path / "data" / "TB" / "linked").symlink_to(tmp_path / "extra")
    (tmp_path / "data" / "TB" / "loop").symlink_to(tmp_path / "data" / "TB")  # must not recurse forever
    index = index_folder(tmp_path / "data")
    assert sorted(p.removeprefix(str(tmp_path / "data")) for p in index["path"]) == ["/TB/a.png", "/TB/linked/x.png"]


def test_links_to_files_that_do_not_exist_are_refused_naming_them(tmp_path):
    for name in ("a.png", "b.png"):
        write_png(tmp_path / "NORMAL" / name)
    (tmp_path / "TB").mkdir()
    (tmp_path / "TB" / "c.png").symlink_to(tmp_path / ".git" / "annex" / "objects" / "c")  # not fetched yet
    with pytest.raises(DataConfigError, match=r"(?s)1 file\(s\) under .* are links to files that do not exist .*TB/c\.png"):
        index_folder(tmp_path)


def test_hidden_files_and_macos_folders_are_not_indexed(tmp_path, caplog):
    write_png(tmp_path / "train" / "NORMAL" / "a.png")
    (tmp_path / "train" / "NORMAL" / "._a.png").write_bytes(b"\x00\x05\x16\x07" + bytes(80))  # AppleDouble
    write_png(tmp_path / "train" / "PNEUMONIA" / "b.png")
    write_png(tmp_path / "train" / "PNEUMONIA" / ".thumbs" / "t.png")
    write_png(tmp_path / "train" / "__MACOSX" / "NORMAL" / "c.png")
    write_png(tmp_path / "__MACOSX" / "train" / "NORMAL" / "d.png")
    with caplog.at_level("WARNING"):
        index = index_folder(tmp_path)
    assert sorted(p.removeprefix(str(tmp_path)) for p in index["path"]) == ["/train/NORMAL/a.png",
                                                                          "/train/PNEUMONIA/b.png"]
    assert "__MACOSX" not in caplog.text


def test_dicom_files_without_image_suffix_are_indexed_and_other_files_counted(tmp_path, caplog):
    dicom_bytes = bytes(128) + b"DICM" + bytes(64)
    write_png(tmp_path / "NORMAL" / "a.png")
    (tmp_path / "NORMAL" / "IM0001").write_bytes(dicom_bytes)
    (tmp_path / "NORMAL" / "1.2.840.113619.2.55.3").write_bytes(dicom_bytes)
    (tmp_path / "NORMAL" / "notes.txt").write_text("scanned 2019")
    (tmp_path / "NORMAL" / "IM0002").write_bytes(bytes(200))
    with caplog.at_level("WARNING"):
        index = index_folder(tmp_path)
    assert sorted(p.removeprefix(str(tmp_path)) for p in index["path"]) == [
        "/NORMAL/1.2.840.113619.2.55.3", "/NORMAL/IM0001", "/NORMAL/a.png"]
    assert "skipped 2 file(s) that are not images" in caplog.text and "/NORMAL/IM0002" in caplog.text


@pytest.mark.parametrize("first, second", [("val", "valid"), ("Train", "train")])
def test_two_folders_for_one_split_are_refused_naming_both(tmp_path, first, second):
    for folder in ("train", first, second):
        write_png(tmp_path / folder / "NORMAL" / "a.png")
    with pytest.raises(DataConfigError, match=f"/{first} and .*/{second} are both the"):
        index_folder(tmp_path)


def test_missing_value_markers_in_patient_id_are_no_patient(tmp_path):
    (tmp_path / "m.csv").write_text("path,label,split,patient_id\n"
                                    "a.png,normal,train,NA\nb.png,tb,test,NA\nc.png,tb,val,NaN\nd.png,normal,test,null\n"
                                    "e.png,normal,train,None\nf.png,normal,val,\ng.png,normal,val,p1\n")
    index = index_manifest(tmp_path / "m.csv")
    assert index["patient_id"].tolist() == [""] * 6 + ["p1"]
    check_patient_leakage(index)  # each image without a patient_id is its own patient


def test_unsplit_images_of_a_patient_with_a_given_split_join_it():
    labels = ["normal", "normal"] + ["pneumonia", "tuberculosis", "normal"] * 10
    index = pd.DataFrame({"path": [f"{i}.png" for i in range(len(labels))], "label": labels,
                          "split": ["train"] + [""] * (len(labels) - 1),
                          "patient_id": ["p0", "p0"] + [f"q{i}" for i in range(len(labels) - 2)], "source": "s"})
    for seed in range(20):
        split = assign_splits(index, 0.15, 0.15, seed)
        assert split["split"].tolist()[:2] == ["train", "train"], seed
        check_patient_leakage(split)


def patients_frame(images_per_patient: dict[str, tuple[str, int]]) -> pd.DataFrame:
    rows = [{"path": f"{pid}_{k}.png", "label": label, "split": "", "patient_id": pid, "source": "s"}
            for pid, (label, n) in images_per_patient.items() for k in range(n)]
    return pd.DataFrame(rows)


def test_tiny_data_is_split_by_patient_with_each_class_in_each_split():
    """Two images per patient, three patients per class: fewer images per class than StratifiedGroupKFold's
    folds, which refused such data."""
    classes = ["normal", "pneumonia", "tuberculosis"]
    index = patients_frame({f"{label}{p}": (label, 2) for label in classes for p in range(3)})
    split = assign_splits(index, 0.15, 0.15, seed=3)
    check_patient_leakage(split)
    for name in ("train", "val", "test"):
        assert sorted(split.loc[split["split"] == name, "label"]) == sorted(classes * 2), name
    assert split["split"].tolist() == assign_splits(index, 0.15, 0.15, seed=3)["split"].tolist()
    single = assign_splits(patients_frame({label: (label, 1) for label in classes}), 0.15, 0.15, seed=3)
    assert single["split"].tolist() == ["train"] * 3  # one patient per class: all of them to train


def test_split_of_normal_sized_data_is_unchanged():
    """Recorded experiments name their split by data.split_seed: the draw for a given seed must never change."""
    rng = np.random.default_rng(0)
    labels = ["normal", "pneumonia", "tuberculosis"]
    index = patients_frame({f"p{p}": (labels[p % 3], int(rng.integers(1, 4))) for p in range(120)})
    digests = {seed: hashlib.sha256(",".join(assign_splits(index, 0.15, 0.15, seed)["split"]).encode()).hexdigest()[:16]
               for seed in (1, 42)}
    assert digests == {1: "e2b062ec793464d2", 42: "7e1c076976c9dbdb"}


def test_a_symlinked_manifest_reads_its_paths_from_where_it_is_linked(tmp_path):
    """git-annex and DVC's symlink caches: manifest.csv and the images point into an object store."""
    store = tmp_path / "store"
    write_png(store / "object-1.png")
    (store / "object-2").write_text("path,label,patient_id\nimages/a.png,normal,p1\n")
    (tmp_path / "data" / "images").mkdir(parents=True)
    (tmp_path / "data" / "images" / "a.png").symlink_to(store / "object-1.png")
    (tmp_path / "data" / "manifest.csv").symlink_to(store / "object-2")
    index = index_manifest(tmp_path / "data" / "manifest.csv")
    assert index["path"].tolist() == [str(tmp_path / "data" / "images" / "a.png")]
    assert index["source"].tolist() == ["data"]


def test_a_manifest_keeps_its_other_columns_for_subgroup_reports(tmp_path):
    (tmp_path / "m.csv").write_text("path,label,View , Sex,target\na.png,normal, PA,F,x\nb.png,tb,,M,y\n")
    index = index_manifest(tmp_path / "m.csv")
    assert index["view"].tolist() == ["PA", ""] and index["sex"].tolist() == ["F", "M"]
    assert "target" not in index  # the data module's class index


def test_a_manifest_naming_one_column_twice_is_refused(tmp_path):
    (tmp_path / "m.csv").write_text("path,label,view,VIEW\na.png,normal,PA,AP\n")
    with pytest.raises(DataConfigError, match=r"\['view'\] appear more than once"):
        index_manifest(tmp_path / "m.csv")


def test_a_manifest_repeating_a_column_name_exactly_is_refused(tmp_path):
    (tmp_path / "m.csv").write_text("path,label,view,view\na.png,normal,PA,AP\n")  # pandas would read view, view.1
    with pytest.raises(DataConfigError, match=r"\['view'\] appear more than once"):
        index_manifest(tmp_path / "m.csv")


@pytest.mark.parametrize("text", [
    "path;label;split;patient_id\nimages/a.png;Normal;train;p1\nimages/b.png;TB;test;p2\n",  # a comma-decimal locale
    "path\tlabel\tsplit\tpatient_id\nimages/a.png\tNormal\ttrain\tp1\nimages/b.png\tTB\ttest\tp2\n",
    "path, label, split, patient_id\nimages/a.png, Normal, train, p1\nimages/b.png, TB, test, p2\n,,,\n , , ,\n",
    "path,label,split,patient_id\r\nimages\\a.png,Normal,train,p1\r\nimages\\b.png,TB,test,p2\r\n",  # Windows
])
def test_manifests_as_spreadsheets_write_them_are_read_alike(tmp_path, text):
    (tmp_path / "images").mkdir()
    for name in ("a.png", "b.png"):
        write_png(tmp_path / "images" / name)
    (tmp_path / "m.csv").write_text(text, newline="")
    index = index_manifest(tmp_path / "m.csv")
    assert index["path"].tolist() == [str(tmp_path / "images" / "a.png"), str(tmp_path / "images" / "b.png")]
    assert index[["label", "split", "patient_id"]].values.tolist() == [["normal", "train", "p1"],
                                                                       ["tuberculosis", "test", "p2"]]


def test_a_source_spelled_in_several_cases_is_one_source_and_a_repeated_row_counts_once(tmp_path, caplog):
    (tmp_path / "m.csv").write_text("path,label,source\na.png,normal,kermany\nb.png,normal,Kermany \n"
                                    "c.png,normal,kermany\nd.png,normal,NIH\na.png,normal,kermany\n")
    index = index_manifest(tmp_path / "m.csv")
    assert index["source"].tolist() == ["kermany", "kermany", "kermany", "NIH"]  # the spelling most rows use
    assert index["path"].tolist() == [str(tmp_path / f"{n}.png") for n in "abcd"]
    assert "read as ['kermany']" in caplog.text and "1 row(s) repeat an image" in caplog.text


@pytest.mark.parametrize("header", ["Patient ID", "PatientID", "patient-id", " PATIENT_ID "])
def test_spellings_of_the_patient_id_column_are_read_as_patient_ids(tmp_path, header):
    """NIH's Data_Entry CSV heads it "Patient ID": read as another column, every image was its own patient and
    one patient's films were split between train and test."""
    (tmp_path / "m.csv").write_text(f"path,label,{header},View Position\na.png,normal,7,PA\nb.png,normal,7,AP\n")
    index = index_manifest(tmp_path / "m.csv")
    assert index["patient_id"].tolist() == ["7", "7"] and index["view position"].tolist() == ["PA", "AP"]


def test_a_spreadsheet_s_unnamed_empty_columns_are_dropped_and_unnamed_values_refused(tmp_path):
    (tmp_path / "m.csv").write_text("path,label,,\na.png,normal,,\n")
    assert index_manifest(tmp_path / "m.csv").columns.tolist() == ["path", "label", "split", "patient_id", "source"]
    (tmp_path / "m.csv").write_text("path,label,\na.png,normal,PA\n")
    with pytest.raises(DataConfigError, match=r"column\(s\) \[3\] have values but no name"):
        index_manifest(tmp_path / "m.csv")


def test_an_image_without_a_source_comes_from_the_manifest_s_folder(tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "m.csv").write_text("path,label,source\na.png,normal,HospA\nb.png,normal,\nc.png,TB,NA\n")
    assert index_manifest(tmp_path / "site" / "m.csv")["source"].tolist() == ["HospA", "site", "site"]


def test_split_folders_inside_class_folders_are_refused_not_split_anew(tmp_path):
    for cls in ("NORMAL", "PNEUMONIA"):
        for split in ("train", "test"):
            write_png(tmp_path / cls / split / "a.png")
    with pytest.raises(DataConfigError, match=r"NORMAL/test is named for a split but sits inside the class folder "
                                              r"NORMAL/: split folders hold the class folders \(test/NORMAL/...\)"):
        index_folder(tmp_path)


def test_an_image_reached_twice_through_a_link_counts_once_or_is_refused_across_splits(tmp_path, caplog):
    write_png(tmp_path / "a" / "TUBERCULOSIS" / "x.png")
    write_png(tmp_path / "a" / "NORMAL" / "y.png")
    (tmp_path / "a" / "TB").symlink_to(tmp_path / "a" / "TUBERCULOSIS")  # one class under two names
    with caplog.at_level("WARNING"):
        index = index_folder(tmp_path / "a")
    assert sorted(index["label"]) == ["normal", "tuberculosis"] and "reached through a link" in caplog.text
    for split in ("train", "test"):
        write_png(tmp_path / "b" / split / "NORMAL" / f"{split}.png")
    (tmp_path / "b" / "val").symlink_to(tmp_path / "b" / "test")  # the checkpoint would be chosen on test
    with pytest.raises(DataConfigError, match="listed more than once with different labels, splits"):
        index_folder(tmp_path / "b")


def test_a_rare_class_among_large_ones_reaches_every_split():
    classes = {f"n{p}": ("normal", 1) for p in range(40)} | {f"p{p}": ("pneumonia", 1) for p in range(40)}
    index = patients_frame(classes | {f"t{p}": ("tuberculosis", 1) for p in range(3)})
    split = assign_splits(index, 0.15, 0.15, seed=0)
    assert split.loc[split["label"] == "tuberculosis", "split"].value_counts().to_dict() == {
        "train": 1, "val": 1, "test": 1}
