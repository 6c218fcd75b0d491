"""Every experiment and config group composes and builds the objects it names; runs say what they are (W&B name
and group, the code version)."""
import copy
import inspect
import subprocess
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import open_dict

from cxr.config import CONFIG_DIR
from cxr.tracking import code_version
from cxr.run_checks import check_run_settings

EXPERIMENTS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))


def compose_train(*overrides):
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=["paths.output_dir=/tmp/cxr-test", *overrides])


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_instantiates(experiment):
    cfg = compose_train(f"experiment={experiment}")
    prep = instantiate(cfg.preprocess)
    assert prep.image_size >= 64
    augment = instantiate(cfg.augment)
    assert augment is None or len(augment.transforms) > 0
    callbacks = {name: instantiate(c) for name, c in cfg.callbacks.items() if c is not None}
    if "val" in cfg.data.train_splits:  # a refit: nothing may be chosen or fitted on val
        assert callbacks["model_checkpoint"].monitor is None and "early_stopping" not in callbacks
        assert cfg.calibration.method == "none"
    else:
        assert callbacks["model_checkpoint"].monitor == "val/auroc_macro"
    assert instantiate(cfg.data, _partial_=True).func.__name__.startswith("from_")
    assert cfg.model.backbone
    # A misspelt model argument or trainer setting fails here, not minutes into a run (building the network
    # itself would fetch weights, so its arguments are only bound).
    model = instantiate(cfg.model, _partial_=True)
    inspect.signature(model.func).bind(*model.args, **model.keywords, class_names=["normal"], preprocessing=prep)
    assert instantiate(cfg.trainer, logger=False).max_epochs == cfg.trainer.max_epochs
    check_run_settings(cfg)


def test_default_balances_classes_one_way():
    """The sampler alone: with class weights as well, the imbalance would be counted twice."""
    default = compose_train()
    assert default.data.weighted_sampling and not default.data.use_class_weights


@pytest.mark.parametrize("use_class_weights", [True, False])
def test_the_model_gets_the_class_weights_of_the_training_split_when_asked(tmp_path, use_class_weights):
    from cxr.config import instantiate_datamodule, instantiate_model

    cfg = compose_train("model=tiny", "preprocess.image_size=64", "data.n_per_class=12", "data.size=64",
                        f"data.use_class_weights={use_class_weights}", f"paths.cache_dir={tmp_path}")
    preprocessing = instantiate(cfg.preprocess)
    datamodule = instantiate_datamodule(cfg, preprocessing)
    datamodule.setup("fit")
    model = instantiate_model(cfg, datamodule, preprocessing)
    if use_class_weights:
        assert torch.allclose(model.class_weights, datamodule.class_weights())
    else:
        assert model.class_weights is None and datamodule.class_weights() is None


def test_seed_report_is_the_reference_recipe():
    cfg = compose_train("experiment=seed_report")
    assert cfg.model.backbone == "efficientnet_b0"
    assert cfg.model.label_smoothing == 0.1 and cfg.model.dropout == 0.3
    assert cfg.data.weighted_sampling and cfg.data.use_class_weights
    assert cfg.callbacks.early_stopping.patience == 10
    assert "unfreeze" in cfg.callbacks
    names = [t._target_.rsplit(".", 1)[1] for t in cfg.augment.transforms]
    assert names == ["HorizontalFlip", "Affine", "RandomBrightnessContrast"]
    assert list(cfg.augment.transforms[1].rotate) == [-15, 15]


def test_packaged_weights_are_paired_with_their_normalisation():
    for experiment in EXPERIMENTS:
        cfg = compose_train(f"experiment={experiment}")
        if cfg.model.pretrained == "packaged":
            assert list(cfg.preprocess.mean) == [0.5] * 3 and list(cfg.preprocess.std) == [0.5] * 3, experiment


def test_switched_off_groups_build_nothing():
    from cxr.config import instantiate_optional

    cfg = compose_train("augment=none", "logger=none")
    assert instantiate_optional(cfg.get("augment")) is None
    assert not cfg.logger
    assert instantiate_optional(compose_train().augment) is not None


@pytest.mark.parametrize("data", ["synthetic", "manifest", "folder", "shared"])
def test_data_configs_compose(data):
    cfg = compose_train(f"data={data}")
    assert cfg.data._target_.startswith("cxr.data.datamodule.ChestXrayDataModule.from_")


def test_eval_config_requires_checkpoint():
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose("eval", overrides=["ckpt_path=x.ckpt", "data=shared", "data.split=val"])
    assert cfg.ckpt_path == "x.ckpt" and cfg.data.split == "val"


def test_wandb_logger_runs_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = compose_train("logger=wandb", f"paths.output_dir={tmp_path}")
    assert cfg.logger.wandb.offline is True
    logger = instantiate(cfg.logger.wandb)
    logger.log_metrics({"val/auroc_macro": 0.5}, step=0)
    logger.finalize("success")
    logger.experiment.finish()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


@pytest.mark.parametrize("mode, group", [(RunMode.RUN, "lite0_finetune/run-1"), (RunMode.MULTIRUN, "multirun/sweep-7")])
def test_a_wandb_run_is_named_by_its_overrides_and_grouped_by_its_run_or_sweep_folder(mode, group, tmp_path):
    from cxr.tracking import wandb_identity

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["experiment=lite0_finetune", "data.holdout_sources=[kermany]", "seed=1",
                                          "logger=wandb", "hydra.run.dir=/x/run-1", "hydra.sweep.dir=/x/sweep-7",
                                          "paths.cache_dir=/c"], return_hydra_config=True)
    resumed_job = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.hydra.mode, cfg.hydra.runtime.output_dir = mode, "/x/run-1" if mode == RunMode.RUN else "/x/sweep-7/0"
    HydraConfig.instance().set_config(cfg)
    try:
        identity = wandb_identity(cfg.logger.wandb, cfg)
        assert identity == {"name": "experiment=lite0_finetune data.holdout_sources=[kermany] seed=1",
                            "group": group}
        with open_dict(cfg):
            cfg.logger.wandb.name = "mine"
        assert "name" not in wandb_identity(cfg.logger.wandb, cfg)  # a name given in the config is kept
        if mode == RunMode.RUN:  # one job of a sweep resumed on its own (hydra.run.dir=<sweep>/3) stays in its group
            (tmp_path / "sweep-7" / "3").mkdir(parents=True)
            (tmp_path / "sweep-7" / "multirun.yaml").write_text("")
            with open_dict(resumed_job):
                resumed_job.hydra.mode, resumed_job.hydra.runtime.output_dir = mode, str(tmp_path / "sweep-7" / "3")
            HydraConfig.instance().set_config(resumed_job)
            assert wandb_identity(resumed_job.logger.wandb, resumed_job)["group"] == "multirun/sweep-7"
        assert wandb_identity(cfg.logger.csv, cfg) == {}
    finally:
        HydraConfig.instance().cfg = None


def test_common_trainer_settings_are_overridden_as_typed_with_or_without_a_debug_config():
    for debug in ([], ["debug=smoke"]):
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose("train", overrides=[*debug, "trainer.limit_train_batches=5", "trainer.gradient_clip_val=1.0",
                                              "trainer.accumulate_grad_batches=2", "paths.output_dir=/tmp/unused"])
        assert (cfg.trainer.limit_train_batches, cfg.trainer.gradient_clip_val) == (5, 1.0)
    trainer = instantiate(cfg.trainer)
    assert trainer.accumulate_grad_batches == 2 and trainer.gradient_clip_val == 1.0


def test_code_version_names_the_commit_and_whether_tracked_files_differ(tmp_path):
    def git(*args):
        return subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@example.org",
                               *args], capture_output=True, text=True, check=True).stdout.strip()

    assert code_version(tmp_path) is None  # not a checkout (an installed package): nothing is claimed
    git("init", "-q")
    (tmp_path / "recipe.py").write_text("seed = 1\n")
    git("add", "recipe.py")
    git("commit", "-q", "-m", "first")
    (tmp_path / "notes.txt").write_text("untracked files do not change the code that ran\n")
    assert code_version(tmp_path) == {"commit": git("rev-parse", "HEAD"), "modified": False}
    (tmp_path / "recipe.py").write_text("seed = 2\n")
    assert code_version(tmp_path)["modified"] is True


@pytest.mark.parametrize("overrides, message", [
    (["seed=abc"], "seed='abc': give a whole number"),
    (["trainer.max_epochs=abc"], "trainer.max_epochs='abc': give a whole number of epochs"),
    (["trainer.max_epochs=0"], "trainer.max_epochs=0"),
    (["trainer.limit_train_batches=0"], "trains nothing"),
    (["model.dropout=1.5"], "model.dropout=1.5: give the share"),
    (["model.pretrained=null"], "model.pretrained=null: say which weights to start from"),
    (["data.split=all"], "data.split=all scores every image of a saved checkpoint's data"),
    (["callbacks=cosine", "trainer.max_epochs=-1"], "give callbacks.lr_decay.total_epochs=N"),
    # the experiment sets early stopping's patience; the snapshots group has no early stopping
    (["experiment=lite0_finetune", "callbacks=snapshots"],
     "callbacks.early_stopping has settings (patience) but no _target_"),
])
def test_settings_that_would_fail_deep_in_a_library_are_refused_up_front(overrides, message):
    from cxr.config import ConfigError

    with pytest.raises(ConfigError) as refused:
        check_run_settings(compose_train(*overrides))
    assert message in str(refused.value)
    check_run_settings(compose_train())  # the defaults pass
    check_run_settings(compose_train("experiment=lite0_finetune", "callbacks=snapshots", "callbacks.early_stopping=null"))
    check_run_settings(compose_train("callbacks=cosine", "trainer.max_epochs=-1", "+callbacks.lr_decay.total_epochs=20"))


def test_a_reused_sweep_folder_starts_its_own_summary_and_keeps_the_earlier_one(tmp_path, capsys):
    """A sweep folder whose jobs all failed may be used again; their rows are not the new sweep's."""
    from omegaconf import OmegaConf

    from cxr.sweep import SUMMARY_FILE, SweepSummary

    (tmp_path / SUMMARY_FILE).write_text("job,status\n0,failed\n")
    SweepSummary().on_multirun_start(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    assert not (tmp_path / SUMMARY_FILE).exists()
    [earlier] = tmp_path.glob("summary.before-*.csv")
    assert earlier.read_text() == "job,status\n0,failed\n" and earlier.name in capsys.readouterr().err


def test_a_wandb_run_that_cannot_start_stops_with_what_to_do():
    """Online without an API key, W&B raised its own traceback; other errors keep theirs."""
    import wandb.errors

    from cxr.config import ConfigError
    from cxr.tracking import log_config_to

    class Refused:
        def __init__(self, error):
            self.error = error

        def log_hyperparams(self, params):
            raise self.error

    with pytest.raises(ConfigError, match=r"No API key configured.*`wandb login` or set WANDB_API_KEY"):
        log_config_to([Refused(wandb.errors.UsageError("No API key configured."))], compose_train())
    with pytest.raises(KeyError):
        log_config_to([Refused(KeyError("lr"))], compose_train())


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a CUDA GPU")
def test_the_gpu_trainer_without_a_gpu_is_refused_before_the_data_is_read():
    from cxr.config import ConfigError

    with pytest.raises(ConfigError, match="trainer=gpu.*torch sees no CUDA GPU here"):
        check_run_settings(compose_train("trainer=gpu"))


def test_the_dashboard_summary_holds_one_number_per_key():
    from cxr.tracking import run_summary

    calibration = {"ece": 0.1, "brier": 0.2, "nll": 0.3}
    results = {"selection": {"monitor": "val/auroc_macro", "best": 0.9},
               "eval": {"n": 10, "accuracy": 0.8, "calibration": calibration,
                        "uncalibrated": {"accuracy": 0.7, "recall": {"normal": 1.0}, "calibration": calibration}}}
    summary = run_summary(results, "test")
    assert summary["summary/test_calibration_ece"] == 0.1 and summary["summary/test_uncalibrated_calibration_nll"] == 0.3
    assert summary["summary/selected_val_auroc_macro"] == 0.9 and summary["summary/test_uncalibrated_accuracy"] == 0.7
    assert all(isinstance(value, (int, float)) for value in summary.values()), summary
