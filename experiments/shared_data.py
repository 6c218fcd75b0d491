"""The probes' common start: a saved checkpoint, and the shared X-rays prepared as that checkpoint expects
(its preprocessing, the manifest's split), exactly as `cxr-eval data=shared` builds them."""
from __future__ import annotations

from hydra import compose, initialize_config_dir

from cxr.config import CONFIG_DIR, instantiate_checkpoint_datamodule
from cxr.data.datamodule import ChestXrayDataModule
from cxr.inference import Classifier, load_classifier


def checkpoint_on_shared_data(ckpt_path: str, *overrides: str) -> tuple[Classifier, ChestXrayDataModule]:
    """`overrides`: further cxr-eval data settings, e.g. data.holdout_sources=[kermany]."""
    classifier = load_classifier(ckpt_path)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("eval", overrides=["data=shared", *overrides, f"ckpt_path={ckpt_path}"])
    return classifier, instantiate_checkpoint_datamodule(cfg, classifier.spec)
