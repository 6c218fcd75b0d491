"""The command-line round trip: cxr-train (fast_dev_run) -> best.ckpt -> cxr-eval gives the same numbers."""
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import PROJECT_ROOT

TINY = ["model=tiny", "preprocess.image_size=64", "data.n_per_class=20", "data.size=96", "trainer.enable_progress_bar=false"]


def command(module: str, overrides: tuple[str, ...], cache_dir) -> list[str]:
    """`python -m module overrides`, with Hydra's own run folder (.hydra/, the log) under `cache_dir` unless given:
    tests must not leave folders in the repository's logs/."""
    own_folder = any(o.startswith(("hydra.run.dir=", "hydra.sweep.dir=")) for o in overrides) or "-m" in overrides
    hydra_dir = [] if own_folder else [f"hydra.run.dir={Path(cache_dir) / 'hydra' / uuid.uuid4().hex}"]
    return [sys.executable, "-m", module, *overrides, *hydra_dir, f"paths.cache_dir={cache_dir}"]


def run(module: str, *overrides: str, cache_dir) -> str:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(command(module, overrides, cache_dir), cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cache = tmp_path_factory.mktemp("cache")
    stdout = run("cxr.train", "debug=fast_dev_run", *TINY, f"hydra.run.dir={out}", cache_dir=cache)
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


def test_train_fits_the_feature_distance_and_the_report_uses_it(trained_run):
    out, _, _ = trained_run
    fit = json.loads((out / "results.json").read_text())["feature_distance"]
    assert fit["split"] == "val" and fit["pass_rate"] == 0.95 and fit["fit_images"] > 0 and fit["threshold"] > 0
    spec = torch.load(out / "checkpoints" / "best.ckpt", weights_only=False, map_location="cpu")["cxr"]
    assert len(spec["feature_distance"].pop("split_percentiles")) == 101 and spec["feature_distance"] == fit
    unlike = json.loads((out / "eval" / "metrics.json").read_text())["unlike_training"]
    assert unlike["threshold"] == fit["threshold"] and unlike["n"] > 0 and 0 <= unlike["flagged"] <= 1
    assert "## Unlike the training data" in (out / "eval" / "report.md").read_text()


def test_results_name_the_commit_the_run_trained_at(trained_run):
    out, _, _ = trained_run
    code = json.loads((out / "results.json").read_text())["code"]
    if not (PROJECT_ROOT / ".git").exists():
        assert code is None
        return
    head = subprocess.run(["git", "-C", str(PROJECT_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert code["commit"] == head and isinstance(code["modified"], bool)


def test_eval_of_saved_checkpoint_matches_training_test_metrics(trained_run, tmp_path):
    out, cache, _ = trained_run
    results = json.loads((out / "results.json").read_text())
    run("cxr.eval", f"ckpt_path={out}/checkpoints/best.ckpt", "data.n_per_class=20", "data.size=96",
        "data.split=test", f"paths.output_dir={tmp_path}", cache_dir=cache)
    evaluated = json.loads((tmp_path / "metrics.json").read_text())
    trained = json.loads((out / "eval" / "metrics.json").read_text())
    assert evaluated["n"] == trained["n"] > 0
    # fast_dev_run tests one batch: Lightning's test/* cover the whole split only while it fits in one
    assert trained["n"] <= OmegaConf.load(out / ".hydra" / "config.yaml").data.eval_batch_size
    assert evaluated["accuracy"] == pytest.approx(results["test"]["test/acc"], abs=1e-6)
    assert evaluated["macro_auroc"] == pytest.approx(results["test"]["test/auroc_macro"], abs=1e-5)
    assert evaluated["confusion_matrix"] == trained["confusion_matrix"]
    assert evaluated["unlike_training"] == trained["unlike_training"]
    for name in evaluated["classes"]:
        assert evaluated["per_class"][name]["recall"] == pytest.approx(results["test"][f"test/recall_{name}"], abs=1e-6)


def failing_run(module: str, *overrides: str, cache_dir) -> str:
    proc = subprocess.run(command(module, overrides, cache_dir), cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode != 0, proc.stdout[-2000:]
    return proc.stderr


def test_eval_refuses_another_split_of_the_training_data(trained_run, tmp_path):
    """The synthetic data is split by `data.split_seed`: with another, its test split holds training images."""
    out, cache, _ = trained_run
    stderr = failing_run("cxr.eval", f"ckpt_path={out}/checkpoints/best.ckpt", "data.n_per_class=20", "data.size=96",
                         "data.split_seed=7", f"paths.output_dir={tmp_path}", cache_dir=cache)
    assert "same pixels as images the checkpoint trained on" in stderr and "split_seed" in stderr, stderr[-2000:]
    assert not (tmp_path / "metrics.json").exists()


@pytest.mark.parametrize("module, overrides, message", [
    ("cxr.eval", [], "Missing mandatory value: ckpt_path"),
    ("cxr.eval", ["ckpt_path=/nonexistent/best.ckpt"], "/nonexistent/best.ckpt"),
    ("cxr.eval", ["ckpt_path=" + str(PROJECT_ROOT / "pyproject.toml")], "not a readable PyTorch checkpoint"),
    ("cxr.eval", ["ckpt_path=" + str(PROJECT_ROOT)], "is a folder, not a checkpoint file"),
    ("cxr.train", ["data=folder", "debug=fast_dev_run"], "error: data.root must be set, e.g. data.root=..."),
    ("cxr.train", [*TINY, "debug=fast_dev_run", "calibration.split=test"],
     "calibration.split=test is the split the run is evaluated on"),
    ("cxr.train", ["model=efficientnet_b0", "model.pretrained=/nonexistent/weights.pth", "debug=fast_dev_run"],
     "/nonexistent/weights.pth"),
])
def test_expected_errors_are_one_message_not_a_traceback(module, overrides, message, tmp_path):
    stderr = failing_run(module, *overrides, f"paths.output_dir={tmp_path}", cache_dir=tmp_path / "cache")
    assert "\nerror: " in "\n" + stderr and message in stderr and "Traceback" not in stderr, stderr[-2000:]


@pytest.mark.parametrize("module, overrides, earlier_output, reason", [
    ("cxr.eval", ["ckpt_path=/other/best.ckpt"], "metrics.json", "holds an evaluation (metrics.json)"),
    ("cxr.calibrate", ["ckpt_path=/other/best.ckpt"], "calibration.json", "holds a calibration (calibration.json)"),
    ("cxr.soup", ["members=[/other/best.ckpt]"], "results.json", "holds a finished run (results.json)"),
])
@pytest.mark.parametrize("folder_setting", ["hydra.run.dir", "paths.output_dir"])
def test_eval_calibrate_and_soup_refuse_a_folder_holding_earlier_outputs_before_writing_there(
        module, overrides, earlier_output, reason, folder_setting, tmp_path):
    used = tmp_path / "used"
    used.mkdir()
    (used / earlier_output).write_text("the earlier run's")
    stderr = failing_run(module, *overrides, f"{folder_setting}={used}", cache_dir=tmp_path / "cache")
    assert f"error: {used} {reason}; choose a new {folder_setting}=" in stderr and "Traceback" not in stderr, stderr
    assert [p.name for p in used.iterdir()] == [earlier_output]  # no .hydra/, no log
    assert (used / earlier_output).read_text() == "the earlier run's"


def test_train_stops_before_fitting_on_a_used_folder_or_a_missing_test_image(trained_run, tmp_path,
                                                                           synthetic_manifest):
    out, cache, _ = trained_run
    before = {p: p.read_bytes() for p in [out / "checkpoints" / "best.ckpt", *(out / ".hydra").iterdir()]}
    stderr = failing_run("cxr.train", "debug=fast_dev_run", *TINY, "seed=7", f"hydra.run.dir={out}", cache_dir=cache)
    assert "holds a finished run" in stderr, stderr[-2000:]
    assert all(p.read_bytes() == content for p, content in before.items())  # nothing of the old run rewritten
    interrupted = tmp_path / "interrupted"
    (interrupted / "checkpoints").mkdir(parents=True)
    (interrupted / "checkpoints" / "best.ckpt").write_bytes(b"epoch 3 of 8")
    stderr = failing_run("cxr.train", "debug=fast_dev_run", *TINY, f"hydra.run.dir={interrupted}", cache_dir=cache)
    assert "holds an interrupted run" in stderr and not (interrupted / ".hydra").exists(), stderr[-2000:]
    table = pd.read_csv(synthetic_manifest)
    table["path"] = [str(synthetic_manifest.parent / p) for p in table["path"]]
    table["patient_id"] = table["path"]
    table["split"] = [("test", "val", "train", "train", "train")[i % 5] for i in range(len(table))]
    table.loc[table.index[table["split"] == "test"][0], "path"] += "-deleted.png"
    manifest = tmp_path / "manifest.csv"
    table.to_csv(manifest, index=False)
    stderr = failing_run("cxr.train", "debug=fast_dev_run", "model=tiny", "preprocess.image_size=64", "data=manifest",
                         f"data.manifest={manifest}", f"paths.output_dir={tmp_path / 'run'}", cache_dir=cache)
    assert "do not exist" in stderr and "-deleted.png" in stderr, stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_an_interrupted_run_resumes_where_it_stopped_and_only_with_its_own_configuration(tmp_path):
    out, cache = tmp_path / "run", tmp_path / "cache"
    overrides = ["debug=smoke", *TINY, "trainer.max_epochs=3", f"hydra.run.dir={out}",
                 "+callbacks.interrupt._target_=tests.interrupt.InterruptOnce", "+callbacks.interrupt.at_epoch=2",
                 f"+callbacks.interrupt.marker={tmp_path / 'interrupted'}"]
    failing_run("cxr.train", *overrides, cache_dir=cache)  # Ctrl-C at the start of epoch 2
    assert (out / "train.log").read_text().rstrip().endswith("interrupted (exit status 1)")
    last = out / "checkpoints" / "last.ckpt"
    assert last.is_file() and not (out / "results.json").exists()

    stderr = failing_run("cxr.train", *overrides, cache_dir=cache)
    assert "holds an interrupted run" in stderr and "resume=true" in stderr, stderr[-2000:]
    saved = {p: p.read_bytes() for p in [last, *(out / ".hydra").iterdir()]}
    stderr = failing_run("cxr.train", "-m", *overrides, "resume=true", cache_dir=cache)
    assert "resume=true continues one run" in stderr, stderr[-2000:]
    stderr = failing_run("cxr.train", *overrides, "resume=true", "seed=7", cache_dir=cache)
    assert "1 setting(s) differ: seed: 42 -> 7" in stderr and "Traceback" not in stderr, stderr[-2000:]
    assert all(p.read_bytes() == content for p, content in saved.items())  # nothing of the run rewritten
    data_manifest = next((cache / "synthetic").glob("*/manifest.csv"))
    rows = data_manifest.read_text()
    data_manifest.write_text(rows[:rows.rstrip("\n").rfind("\n") + 1])  # an image fewer since the interruption
    stderr = failing_run("cxr.train", *overrides, "resume=true", cache_dir=cache)
    assert "the data changed since the run was interrupted (the images per split" in stderr, stderr[-2000:]
    assert "Traceback" not in stderr and last.read_bytes() == saved[last]
    data_manifest.write_text(rows)

    run("cxr.train", *overrides, "resume=true", cache_dir=cache)
    results = json.loads((out / "results.json").read_text())
    assert results["epochs"] == 3 and results["resumed_after_epochs"] == 2
    assert (out / "eval" / "metrics.json").is_file() and not last.exists()
    curves = pd.read_csv(out / "csv" / "metrics.csv"), pd.read_csv(out / "csv" / "metrics.epochs-0-1.csv")
    assert set(curves[1]["epoch"].dropna()) == {0, 1} and set(curves[0]["epoch"].dropna()) >= {2}
    stderr = failing_run("cxr.train", *overrides, "resume=true", cache_dir=cache)
    assert "holds a finished run" in stderr and "nothing to resume" in stderr, stderr[-2000:]


def test_a_run_stopped_by_sigterm_exits_with_its_status_and_says_so(tmp_path):
    out = tmp_path / "run"
    overrides = ("debug=smoke", *TINY, "trainer.max_epochs=3", f"hydra.run.dir={out}",
                 "+callbacks.interrupt._target_=tests.interrupt.InterruptOnce", "+callbacks.interrupt.at_epoch=1",
                 "+callbacks.interrupt.by_sigterm=true", f"+callbacks.interrupt.marker={tmp_path / 'interrupted'}")
    proc = subprocess.run(command("cxr.train", overrides, tmp_path / "cache"), cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]  # Lightning alone exits 0, as a success
    assert (out / "train.log").read_text().rstrip().endswith("interrupted by SIGTERM")
    assert (out / "checkpoints" / "last.ckpt").is_file() and not (out / "results.json").exists()


def test_a_checkpoint_that_validation_cannot_choose_is_refused_before_the_fit(tmp_path, synthetic_manifest):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from cxr.config import ConfigError
    from cxr.data.datamodule import ChestXrayDataModule
    from cxr.data.preprocess import Preprocessing
    from cxr.run_checks import check_model_selection

    table = pd.read_csv(synthetic_manifest)
    table["path"] = [str(synthetic_manifest.parent / p) for p in table["path"]]
    table["split"] = ["val" if label == "normal" and i % 3 == 0 else ("test" if i % 3 == 0 else "train")
                      for i, label in enumerate(table["label"])]
    table["patient_id"] = table["path"]
    table.to_csv(tmp_path / "normal_val.csv", index=False)
    datamodule = ChestXrayDataModule.from_manifest(str(tmp_path / "normal_val.csv"), preprocessing=Preprocessing())
    watching = [ModelCheckpoint(dirpath=tmp_path, filename="best", monitor="val/auroc_macro", mode="max")]
    with pytest.raises(ConfigError, match=r"val split holds images of \['normal'\] only"):
        check_model_selection(watching, datamodule, "best")
    check_model_selection([ModelCheckpoint(dirpath=tmp_path, filename="best", monitor=None)], datamodule, "best")
    renamed = [ModelCheckpoint(dirpath=tmp_path, filename="top", monitor="val/auroc_macro", mode="max")]
    with pytest.raises(ConfigError, match="writes best.ckpt"):
        check_model_selection(renamed, datamodule, "best")
    plain = ChestXrayDataModule.from_manifest(str(synthetic_manifest), preprocessing=Preprocessing())
    choosing = [ModelCheckpoint(dirpath=tmp_path, filename="best", monitor="val/auroc_macro", mode="max")]
    check_model_selection(choosing, plain, "best", evaluated_split="test")
    with pytest.raises(ConfigError, match="data.split=val: the run would be tested on the images that chose"):
        check_model_selection(choosing, plain, "best", evaluated_split="val")


def test_wandb_run_gets_the_test_figures_and_the_dashboard_the_selection_score(tmp_path):
    run("cxr.train", "debug=smoke", *TINY, "data.batch_size=8", "logger=wandb", f"paths.output_dir={tmp_path}",
        cache_dir=tmp_path / "cache")
    for name in ("confusion_matrix", "roc_curves", "feature_distance"):  # one key each: W&B shows one size per key
        images = list(tmp_path.glob(f"wandb/offline-run-*/files/media/images/eval/{name}_*.png"))
        assert len(images) == 1, sorted(str(p) for p in tmp_path.glob("wandb/offline-run-*/files/**/*"))
    results = json.loads((tmp_path / "results.json").read_text())
    logged = pd.read_csv(tmp_path / "csv" / "metrics.csv")  # what every logger got, W&B included
    summary = {key: logged[key].dropna().iloc[-1] for key in logged.columns if key.startswith("summary/")}
    assert summary["summary/selected_val_auroc_macro"] == pytest.approx(results["selection"]["best"])
    assert summary["summary/test_macro_auroc"] == pytest.approx(results["eval"]["macro_auroc"])
    assert all(key.startswith(("summary/selected_", "summary/test_")) for key in summary), summary
    import yaml

    hparams = yaml.safe_load((tmp_path / "csv" / "hparams.yaml").read_text())  # the config, once, as composed
    assert hparams["model"]["dropout"] == 0.3 and "dropout" not in hparams


def test_logged_learning_rates_are_the_ones_each_epoch_uses(tmp_path):
    from cxr.models.schedule import cosine_factor

    run("cxr.train", "debug=smoke", *TINY, "data.batch_size=8", "callbacks=cosine", f"paths.output_dir={tmp_path}",
        cache_dir=tmp_path / "cache")
    curves = pd.read_csv(tmp_path / "csv" / "metrics.csv")
    assert {"lr-AdamW/head", "lr-AdamW/backbone"} <= set(curves.columns)  # the names runs without unfreezing have
    head = "lr-AdamW/head"
    by_epoch = curves[head].dropna().tolist()  # one row per epoch, logged at its first step
    assert len(by_epoch) == 2
    assert by_epoch[1] / by_epoch[0] == pytest.approx(cosine_factor(1, 2, 0, 0.05) / cosine_factor(0, 2, 0, 0.05))


def test_train_without_a_logger(tmp_path):
    run("cxr.train", "debug=smoke", *TINY, "data.batch_size=8", "logger=none", f"paths.output_dir={tmp_path}",
        cache_dir=tmp_path / "cache")
    assert (tmp_path / "checkpoints" / "best.ckpt").is_file() and not (tmp_path / "csv").exists()


def test_a_sweep_runs_past_a_failed_job_with_one_wandb_run_per_job(tmp_path):
    """Jobs 0 and 1 fail (weights that cannot be had); 2 and 3 train, each logging to its own W&B run; the
    sweep folder, once used, is refused as a whole before anything in it is rewritten."""
    sweep = tmp_path / "sweep"
    stderr = failing_run("cxr.train", "-m", "model.pretrained=/nonexistent/weights.pth,none", "seed=1,2", "debug=smoke",
                         *TINY, "data.batch_size=8", "logger=wandb", f"hydra.sweep.dir={sweep}",
                         cache_dir=tmp_path / "cache")
    assert "error: " in stderr and "/nonexistent/weights.pth" in stderr, stderr[-2000:]
    assert [(sweep / str(job) / "results.json").exists() for job in range(4)] == [False, False, True, True]
    for job in (0, 1):  # the failed job's folder says why
        assert "error: model.pretrained='/nonexistent/weights.pth'" in (sweep / str(job) / "train.log").read_text()
    summary = pd.read_csv(sweep / "summary.csv")  # one row per job, failures included
    assert summary["status"].tolist() == ["failed", "failed", "completed", "completed"]
    assert summary["error"][0].startswith("PretrainedWeightsError: model.pretrained='/nonexistent/weights.pth'")
    assert "model.pretrained=none" in summary["overrides"][2] and "seed=1" in summary["overrides"][2]
    for job in (2, 3):
        results = json.loads((sweep / str(job) / "results.json").read_text())
        assert summary["selected_score"][job] == pytest.approx(results["selection"]["best"])
        assert summary["eval_macro_auroc"][job] == pytest.approx(results["eval"]["macro_auroc"])
    for job in (2, 3):  # before, job 3 logged into job 2's still open run and had no run of its own
        runs = list((sweep / str(job) / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, runs
        figures = {p.name.rsplit("_", 2)[0] for p in runs[0].glob("files/media/images/eval/*.png")}
        assert figures == {"confusion_matrix", "roc_curves", "feature_distance"}, figures  # its own, once each
    before = (sweep / "2" / ".hydra" / "overrides.yaml").read_text()
    stderr = failing_run("cxr.train", "-m", "seed=3,4", "debug=smoke", *TINY, f"hydra.sweep.dir={sweep}",
                         cache_dir=tmp_path / "cache")
    assert "holds a finished run" in stderr and "choose a new hydra.sweep.dir=" in stderr, stderr[-2000:]
    assert (sweep / "2" / ".hydra" / "overrides.yaml").read_text() == before
    # One fixed output folder for every job: the second and later would fail, each after its whole setup.
    stderr = failing_run("cxr.train", "-m", "seed=3,4", "debug=smoke", *TINY, f"hydra.sweep.dir={tmp_path / 'other'}",
                         f"paths.output_dir={tmp_path / 'one'}", cache_dir=tmp_path / "cache")
    assert "would be every job's folder" in stderr and not (tmp_path / "one").exists(), stderr[-2000:]


def test_a_run_interrupted_after_early_stopping_resumes_without_training_another_epoch(tmp_path):
    out, cache = tmp_path / "run", tmp_path / "cache"
    overrides = ["debug=smoke", *TINY, "trainer.max_epochs=3", "+callbacks.early_stopping.stopping_threshold=0.0",
                 f"hydra.run.dir={out}", "+callbacks.interrupt._target_=tests.interrupt.InterruptOnce",
                 "+callbacks.interrupt.at_test=true", f"+callbacks.interrupt.marker={tmp_path / 'interrupted'}"]
    failing_run("cxr.train", *overrides, cache_dir=cache)  # stopped after epoch 0, then Ctrl-C while testing
    assert (out / "checkpoints" / "last.ckpt").is_file() and not (out / "results.json").exists()

    run("cxr.train", *overrides, "resume=true", cache_dir=cache)
    results = json.loads((out / "results.json").read_text())
    assert results["epochs"] == 1 and results["resumed_after_epochs"] == 1
    resumed_curves = pd.read_csv(out / "csv" / "metrics.csv")
    assert resumed_curves.get("train/loss_step", pd.Series(dtype=float)).dropna().empty  # not one training step


def test_a_sweep_job_resumed_on_its_own_adds_its_row_to_the_sweep_summary(tmp_path):
    sweep, cache = tmp_path / "sweep", tmp_path / "cache"
    job = ["seed=1", "debug=smoke", *TINY, "trainer.max_epochs=2",
           "+callbacks.interrupt._target_=tests.interrupt.InterruptOnce", "+callbacks.interrupt.at_epoch=1",
           f"+callbacks.interrupt.marker={tmp_path / 'interrupted'}"]
    failing_run("cxr.train", "-m", *job, f"hydra.sweep.dir={sweep}", cache_dir=cache)  # Ctrl-C in epoch 1
    assert (sweep / "0" / "checkpoints" / "last.ckpt").is_file() and not (sweep / "0" / "results.json").exists()

    run("cxr.train", *job, f"hydra.run.dir={sweep / '0'}", "resume=true", cache_dir=cache)
    summary = pd.read_csv(sweep / "summary.csv")
    resumed = summary.iloc[-1]
    results = json.loads((sweep / "0" / "results.json").read_text())
    assert (resumed["job"], resumed["status"], resumed["folder"]) == (0, "completed", str(sweep / "0"))
    assert "seed=1" in resumed["overrides"] and "resume=true" in resumed["overrides"]
    assert resumed["selected_score"] == pytest.approx(results["selection"]["best"])


@pytest.mark.parametrize("setting", ["feature_distance.split=all", "calibration.split=all"])
def test_a_split_holding_the_training_images_is_refused_before_training(tmp_path, setting):
    stderr = failing_run("cxr.train", "debug=fast_dev_run", *TINY, setting, f"paths.output_dir={tmp_path / 'run'}",
                         cache_dir=tmp_path / "cache")
    assert "the 'all' split holds the images the model trained on" in stderr, stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before the fit, not after


def test_a_refit_may_not_choose_on_val(tmp_path):
    """Training on val too, a checkpoint chosen (or a run stopped) by val scores would be chosen in-sample."""
    stderr = failing_run("cxr.train", "debug=fast_dev_run", *TINY, "data.train_splits=[train,val]",
                         "calibration.method=none", "feature_distance=null", f"paths.output_dir={tmp_path}",
                         cache_dir=tmp_path / "cache")
    assert "would choose on images the model trains on" in stderr and "ModelCheckpoint" in stderr, stderr[-2000:]
    # Nor may the feature distance's threshold be set on val.
    stderr = failing_run("cxr.train", "debug=fast_dev_run", *TINY, "data.train_splits=[train,val]",
                         "calibration.method=none", f"paths.output_dir={tmp_path / 'fd'}", cache_dir=tmp_path / "cache")
    assert "feature_distance.split=val is trained on" in stderr, stderr[-2000:]


def test_train_fits_the_operating_point_on_val_and_evaluation_applies_it(trained_run):
    from cxr.calibration import Calibration
    from cxr.checkpoint import read_spec

    out, _, _ = trained_run
    results = json.loads((out / "results.json").read_text())
    spec = read_spec(out / "checkpoints" / "best.ckpt")
    fit = spec["calibration_fit"]
    assert fit["method"] == "temperature_bias" and fit["split"] == "val"
    assert fit["n"] == sum(spec["data_summary"]["counts"]["val"]["synthetic"].values())
    assert fit["nll_calibrated"] <= fit["nll_uncalibrated"] + 1e-9  # the fit minimises exactly this
    calibration = Calibration.from_spec(spec)
    assert calibration.logit_bias is not None and calibration.logit_bias[0] == 0.0
    assert results["calibration"]["temperature"] == pytest.approx(calibration.temperature)
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert len(fit.pop("image_sha256")) == fit["n"]  # kept in the checkpoint only
    assert metrics["logit_bias"] == spec["logit_bias"]
    assert metrics["calibration_fit"] == {**fit, "evaluated_images_in_fit": 0}
    assert set(metrics["uncalibrated"]) == {"accuracy", "macro_auroc", "recall", "calibration"}


def test_calibrate_writes_a_new_checkpoint_and_never_overwrites(trained_run, tmp_path):
    from cxr.checkpoint import file_sha256, read_spec

    out, cache, _ = trained_run
    best = out / "checkpoints" / "best.ckpt"
    before = file_sha256(best)
    target = tmp_path / "site.ckpt"
    overrides = [f"ckpt_path={best}", "method=temperature", "data.n_per_class=20", "data.size=96",
                 f"output={target}", f"paths.output_dir={tmp_path / 'run'}"]
    assert run("cxr.calibrate", *overrides, cache_dir=cache).strip().splitlines()[-1] == str(target)
    spec = read_spec(target)
    assert spec["calibration_fit"]["method"] == "temperature" and spec["logit_bias"] is None
    assert json.loads((tmp_path / "run" / "calibration.json").read_text())["temperature"] == spec["temperature"]
    assert file_sha256(best) == before
    overrides[-1] = f"paths.output_dir={tmp_path / 'again'}"
    again = subprocess.run(command("cxr.calibrate", tuple(overrides), cache), cwd=PROJECT_ROOT, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode != 0 and "exists; choose another output=" in again.stderr
    for split, refusal in (("test", "data.split=test is the test split of the data this checkpoint trained on"),
                           ("train", "a model is not measured or calibrated on images it trains on")):
        overrides[-2:] = [f"output={tmp_path / split}.ckpt", f"data.split={split}"]
        refused = subprocess.run(command("cxr.calibrate", tuple(overrides), cache), cwd=PROJECT_ROOT,
                                 capture_output=True, text=True, timeout=600)
        assert refused.returncode != 0 and refusal in refused.stderr and "Traceback" not in refused.stderr, \
            refused.stderr[-2000:]
        assert not (tmp_path / f"{split}.ckpt").exists()


def test_calibrate_stopped_by_sigterm_leaves_no_checkpoint_without_its_record(trained_run, tmp_path, monkeypatch):
    """Stopped after the calibrated checkpoint was written but before calibration.json: a rerun was refused as
    "exists" for a checkpoint whose record was never written."""
    from hydra import compose, initialize_config_dir

    from cxr import calibrate
    from cxr.config import CONFIG_DIR
    from tests.interrupt import sigterm_fails_unless_handled

    out, cache, _ = trained_run
    target = tmp_path / "site.ckpt"
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("calibrate", overrides=[f"ckpt_path={out / 'checkpoints' / 'best.ckpt'}", "data.n_per_class=20",
                                              "data.size=96", f"output={target}", f"paths.output_dir={tmp_path / 'run'}",
                                              f"paths.cache_dir={cache}"])
    fit = calibrate.recalibrate_checkpoint

    def fit_then_sigterm(*args, **kwargs):
        record = fit(*args, **kwargs)
        assert target.is_file()
        os.kill(os.getpid(), signal.SIGTERM)
        return record

    monkeypatch.setattr(calibrate, "recalibrate_checkpoint", fit_then_sigterm)
    with sigterm_fails_unless_handled(), pytest.raises(SystemExit) as stopped:
        calibrate.main.__wrapped__(cfg)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert not target.exists() and not (tmp_path / "run" / "calibration.json").exists()


def test_weight_averaging_checkpoint_is_what_testing_and_evaluation_see(tmp_path_factory):
    """With callbacks=cosine_ema, best.ckpt holds the averaged weights, and trainer.test measures those
    (Lightning's own callback would put the raw weights back when testing loads the checkpoint)."""
    import torch

    out, cache = tmp_path_factory.mktemp("ema_run"), tmp_path_factory.mktemp("ema_cache")
    run("cxr.train", "debug=smoke", "callbacks=cosine_ema", "callbacks.ema.decay=0.5", *TINY, "data.batch_size=8",
        f"paths.output_dir={out}", cache_dir=cache)
    checkpoint = torch.load(out / "checkpoints" / "best.ckpt", weights_only=False)
    averaged, raw = checkpoint["state_dict"], checkpoint["current_model_state"]
    assert any(not torch.equal(averaged[k], raw[k]) for k in averaged if averaged[k].is_floating_point())
    results = json.loads((out / "results.json").read_text())
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["macro_auroc"] == pytest.approx(results["test"]["test/auroc_macro"], abs=1e-5)
    assert metrics["accuracy"] == pytest.approx(results["test"]["test/acc"], abs=1e-6)


def test_refit_on_train_and_val_keeps_val_out_of_every_later_choice(tmp_path_factory):
    """experiment=lite0_member_refit trains on val too: no calibration is fitted there, and neither cxr-train
    (calibrating) nor cxr-eval (evaluating) will use val afterwards."""
    from cxr.inference import load_classifier

    out, cache = tmp_path_factory.mktemp("refit_run"), tmp_path_factory.mktemp("refit_cache")
    refit = ["experiment=lite0_member_refit", "data=synthetic", *TINY, "data.batch_size=8", "trainer.max_epochs=1",
             "trainer.limit_train_batches=2"]
    run("cxr.train", *refit, f"paths.output_dir={out}", cache_dir=cache)
    spec = load_classifier(out / "checkpoints" / "best.ckpt").spec
    assert spec["data_summary"]["train_splits"] == ["train", "val"]
    assert spec.get("calibration_fit") is None and spec["temperature"] == 1.0
    results = json.loads((out / "results.json").read_text())
    assert results["train_images_per_second"] * results["fit_seconds"] == pytest.approx(2 * 8, rel=1e-6)
    for module, overrides in (("cxr.train", [*refit, "calibration.method=temperature", f"paths.output_dir={out}/again"]),
                              ("cxr.eval", [f"ckpt_path={out}/checkpoints/best.ckpt", "data=synthetic", "data.split=val",
                                            "data.n_per_class=20", "data.size=96", f"paths.output_dir={out}/val"])):
        proc = subprocess.run(command(module, tuple(overrides), cache), cwd=PROJECT_ROOT, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode != 0 and "trained on the 'val' split" in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr  # a user's error, said in one line
    assert not (out / "again" / "checkpoints").exists()  # refused before any fitting
    ckpt = out / "checkpoints" / "best.ckpt"
    for i, overrides in enumerate((["calibration.method=none"], ["feature_distance=null"])):  # the other fit remains
        proc = subprocess.run(command("cxr.soup", (f"members=[{ckpt},{ckpt}]", "method=uniform", "data=synthetic",
                                                   "data.n_per_class=20", "data.size=96", *overrides,
                                                   f"paths.output_dir={out}/soup{i}"), cache),
                              cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode != 0 and "trained on the 'val' split" in proc.stderr, proc.stderr[-2000:]
        assert not (out / f"soup{i}" / "checkpoints").exists()  # refused before the soup was made


def test_an_experiment_of_ones_own_outside_the_repository_needs_the_global_package_line(tmp_path):
    (tmp_path / "experiment").mkdir()
    settings = "model:\n  dropout: 0.05\ntrainer:\n  max_epochs: 1\n"
    (tmp_path / "experiment" / "mine.yaml").write_text("# @package _global_\n" + settings)
    (tmp_path / "experiment" / "mine_unpackaged.yaml").write_text(settings)
    searchpath = f"hydra.searchpath=[file://{tmp_path}]"
    composed = run("cxr.train", "--cfg", "job", searchpath, "experiment=mine", cache_dir=tmp_path / "cache")
    assert "dropout: 0.05" in composed and "max_epochs: 1\n" in composed
    stderr = failing_run("cxr.train", searchpath, "experiment=mine_unpackaged", f"hydra.run.dir={tmp_path / 'run'}",
                         cache_dir=tmp_path / "cache")
    assert "must begin with the line `# @package _global_`" in stderr, stderr[-2000:]


def test_eval_puts_its_numbers_and_figures_on_the_dashboard(trained_run, tmp_path):
    out, cache, _ = trained_run
    run("cxr.eval", f"ckpt_path={out}/checkpoints/best.ckpt", "data.n_per_class=20", "data.size=96", "logger=wandb",
        f"hydra.run.dir={tmp_path}", cache_dir=cache)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    logged = pd.read_csv(tmp_path / "csv" / "metrics.csv")  # what every logger got, W&B included
    assert logged["summary/test_macro_auroc"].dropna().iloc[-1] == pytest.approx(metrics["macro_auroc"])
    assert logged["summary/test_n"].dropna().iloc[-1] == metrics["n"]
    for name in ("confusion_matrix", "roc_curves"):
        assert len(list(tmp_path.glob(f"wandb/offline-run-*/files/media/images/eval/{name}_*.png"))) == 1


def test_a_run_interrupted_before_an_upgrade_resumes_past_settings_that_change_nothing():
    from cxr.resume import added_without_effect

    assert added_without_effect("trainer.limit_train_batches", None) and added_without_effect("trainer.max_steps", -1)
    assert added_without_effect("data.subgroups", []) and added_without_effect("logger.wandb.group", None)
    assert not added_without_effect("trainer.max_steps", 100)  # a real change, refused as before
    assert not added_without_effect("model.dropout", 0.3)


def test_a_sweep_summary_keeps_the_row_of_a_job_that_failed_without_a_message(tmp_path):
    from hydra.core.utils import JobReturn, JobStatus
    from omegaconf import OmegaConf

    from cxr.sweep import summary_row

    from hydra.types import RunMode

    config = OmegaConf.create({"hydra": {"job": {"num": 3}, "mode": RunMode.MULTIRUN},
                               "paths": {"output_dir": str(tmp_path)}, "data": {"split": "test"}})
    failed = JobReturn(overrides=["seed=1"], status=JobStatus.FAILED, _return_value=MemoryError())
    row = summary_row(config, failed)
    assert (row["job"], row["status"], row["error"]) == (3, "failed", "MemoryError")
    failed = JobReturn(overrides=["seed=1"], status=JobStatus.FAILED, _return_value=KeyError("model"))
    assert summary_row(config, failed)["error"] == "KeyError: 'model'"


def test_a_seed_makes_a_cpu_run_reproducible_and_another_seed_changes_it(tmp_path):
    sweep = tmp_path / "sweep"
    run("cxr.train", "-m", "seed=5,5,6", "debug=smoke", *TINY, "data.batch_size=8", "logger=none",
        f"hydra.sweep.dir={sweep}", cache_dir=tmp_path / "cache")

    def weights(job):
        return torch.load(sweep / str(job) / "checkpoints" / "best.ckpt", map_location="cpu",
                          weights_only=False)["state_dict"]

    def metrics_on_test(job):
        return json.loads((sweep / str(job) / "results.json").read_text())["test"]

    first, again, other = weights(0), weights(1), weights(2)
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    assert metrics_on_test(0) == metrics_on_test(1)
    assert any(not torch.equal(first[k], other[k]) for k in first if first[k].is_floating_point())


@pytest.mark.parametrize("kept_bytes", [100, 5000, 8192, 20000])
def test_a_checkpoint_cut_short_anywhere_is_a_checkpoint_error(kept_bytes, tmp_path):
    """torch.load with mmap raises OSError for some cut lengths and RuntimeError or EOFError for others."""
    from conftest import make_tiny_checkpoint

    from cxr.checkpoint import CheckpointError, read_checkpoint

    whole = make_tiny_checkpoint(tmp_path / "whole.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(whole[:kept_bytes])
    with pytest.raises(CheckpointError, match="is not a readable PyTorch checkpoint"):
        read_checkpoint(tmp_path / "cut.ckpt")


def test_a_checkpoint_that_cannot_be_saved_leaves_no_file(tmp_path):
    import pickle

    from cxr.checkpoint import save_checkpoint

    with pytest.raises((pickle.PicklingError, AttributeError)):
        save_checkpoint({"not_picklable": lambda x: x}, tmp_path / "best.ckpt")
    assert list(tmp_path.iterdir()) == []
    assert save_checkpoint({"weights": torch.ones(2)}, tmp_path / "best.ckpt").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["best.ckpt"]
