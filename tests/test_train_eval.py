"""The command-line round trip: cxr-train (fast_dev_run) -> best.ckpt -> cxr-eval gives the same numbers."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import PROJECT_ROOT

TINY = ["model=tiny", "preprocess.image_size=64", "data.n_per_class=12", "data.size=96", "trainer.enable_progress_bar=false"]


def run(module: str, *overrides: str, cache_dir) -> str:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", module, *overrides, f"paths.cache_dir={cache_dir}"],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cache = tmp_path_factory.mktemp("cache")
    stdout = run("cxr.train", "debug=fast_dev_run", *TINY, f"paths.output_dir={out}", cache_dir=cache)
    return out, cache, stdout


def test_train_prints_best_checkpoint_last(trained_run):
    out, _, stdout = trained_run
    assert stdout.strip().splitlines()[-1] == str(out / "checkpoints" / "best.ckpt")
    assert (out / "checkpoints" / "best.ckpt").is_file()


def test_train_writes_the_test_report(trained_run):
    out, _, _ = trained_run
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    for key in ("classes", "n", "accuracy", "macro_auroc", "per_class", "confusion_matrix", "per_source"):
        assert key in metrics
    assert metrics["classes"] == ["normal", "pneumonia", "tuberculosis"]
    for stats in metrics["per_class"].values():
        assert set(stats) >= {"precision", "recall", "f1", "auroc", "support"}
    matrix = metrics["confusion_matrix"]
    assert sum(map(sum, matrix)) == metrics["n"] == sum(s["support"] for s in metrics["per_class"].values())
    for name in ("report.md", "confusion_matrix.png", "roc_curves.png", "predictions.csv"):
        assert (out / "eval" / name).stat().st_size > 0
    assert "| **Macro avg** |" in (out / "eval" / "report.md").read_text()


def test_eval_of_saved_checkpoint_matches_training_test_metrics(trained_run, tmp_path):
    out, cache, _ = trained_run
    results = json.loads((out / "results.json").read_text())
    run("cxr.eval", f"ckpt_path={out}/checkpoints/best.ckpt", "data.n_per_class=12", "data.size=96",
        "data.split=test", f"paths.output_dir={tmp_path}", cache_dir=cache)
    evaluated = json.loads((tmp_path / "metrics.json").read_text())
    trained = json.loads((out / "eval" / "metrics.json").read_text())
    assert evaluated["n"] == trained["n"] > 0
    assert evaluated["accuracy"] == pytest.approx(results["test"]["test/acc"], abs=1e-6)
    assert evaluated["macro_auroc"] == pytest.approx(results["test"]["test/auroc_macro"], abs=1e-5)
    assert evaluated["confusion_matrix"] == trained["confusion_matrix"]
    for name in evaluated["classes"]:
        assert evaluated["per_class"][name]["recall"] == pytest.approx(results["test"][f"test/recall_{name}"], abs=1e-6)
