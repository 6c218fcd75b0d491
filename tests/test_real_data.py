"""Integration on the real chest X-rays in ../shared/data/cxr (skipped when that folder is absent)."""
import json

import pandas as pd
import pytest
from sklearn.metrics import (accuracy_score, confusion_matrix, precision_recall_fscore_support,
                             roc_auc_score)

from tests.test_train_eval import run


@pytest.mark.real_data
def test_short_training_and_evaluation_on_real_images(shared_data, tmp_path):
    manifest = pd.read_csv(shared_data / "manifest.csv")
    out = tmp_path / "run"
    run("cxr.train", "data=shared", "debug=smoke", "trainer.max_epochs=1", "model=tiny", "preprocess.image_size=64",
        "data.subgroups=[license]", f"paths.shared_data_dir={shared_data}", f"paths.output_dir={out}", cache_dir=tmp_path / "cache")
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    test = manifest[manifest["split"] == "test"]
    assert metrics["n"] == len(test)
    for label, count in test["label"].value_counts().items():
        assert metrics["per_class"][label]["support"] == count
    for source, count in test["source"].value_counts().items():
        assert metrics["per_source"][source]["n"] == count
    for license_, count in test["license"].value_counts().items():  # any extra manifest column, here license
        assert metrics["per_subgroup"]["license"][license_]["n"] == count
    assert 0.0 <= metrics["accuracy"] <= 1.0 and 0.0 <= metrics["macro_auroc"] <= 1.0
    assert sum(map(sum, metrics["confusion_matrix"])) == len(test)
    intervals = metrics["confidence_intervals"]
    assert intervals["patients"] == test["patient_id"].nunique() < len(test)  # resampled by patient, not image
    assert intervals["accuracy"][0] <= metrics["accuracy"] <= intervals["accuracy"][1]
    predictions = pd.read_csv(out / "eval" / "predictions.csv")
    assert sorted(predictions["path"]) == sorted(str((shared_data / p).resolve()) for p in test["path"])
    # every headline number again, independently, from the written predictions (scikit-learn)
    classes = metrics["classes"]
    truth, called = predictions["label"], predictions["predicted"]
    assert metrics["accuracy"] == pytest.approx(accuracy_score(truth, called), abs=1e-9)
    assert metrics["confusion_matrix"] == confusion_matrix(truth, called, labels=classes).tolist()
    precision, recall, f1, _ = precision_recall_fscore_support(truth, called, labels=classes, zero_division=0)
    for c, name in enumerate(classes):
        auroc = roc_auc_score(truth == name, predictions[f"p_{name}"])
        assert metrics["per_class"][name]["auroc"] == pytest.approx(auroc, abs=1e-4)  # the CSV rounds probabilities
        assert [metrics["per_class"][name][k] for k in ("precision", "recall", "f1")] == \
            pytest.approx([precision[c], recall[c], f1[c]], abs=1e-9)
    assert metrics["macro_auroc"] == pytest.approx(sum(metrics["per_class"][n]["auroc"] for n in classes) / 3, abs=1e-9)
    summary = json.loads((out / "results.json").read_text())
    assert summary["eval"]["n"] == len(test)


@pytest.mark.real_data
def test_source_holdout_on_real_data(shared_data):
    from cxr.data.datamodule import ChestXrayDataModule
    from cxr.data.preprocess import Preprocessing

    dm = ChestXrayDataModule.from_manifest(str(shared_data / "manifest.csv"), preprocessing=Preprocessing(image_size=32),
                                           holdout_sources=["nih-cxr8"])
    index = dm.build_index()
    manifest = pd.read_csv(shared_data / "manifest.csv")
    assert (index["split"] == "test").sum() == (manifest["source"] == "nih-cxr8").sum()
    assert "nih-cxr8" not in set(index.loc[index["split"].isin(["train", "val"]), "source"])
