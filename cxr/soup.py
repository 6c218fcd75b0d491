"""cxr-soup: combine several fine-tuned checkpoints into one, by averaging their weights (a model soup)
or their predictions (method=ensemble), fit its operating point on the validation split and evaluate it
like cxr-train does.

    cxr-train -m experiment=lite0_finetune trainer.max_epochs=3 seed=1,2,3 hydra.sweep.dir=logs/members
    cxr-soup data=shared 'members=logs/members/*/checkpoints/best.ckpt' paths.output_dir=logs/soup
    cxr-soup data=shared 'members=logs/members/*/checkpoints/best.ckpt' method=ensemble paths.output_dir=logs/ens
"""
from __future__ import annotations

import glob
import json
import logging
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, ListConfig

from cxr.calibration import Calibration
from cxr.checkpoint import CHECKPOINT_KEY, TRAIN_FINGERPRINTS, read_checkpoint, save_checkpoint
from cxr.config import (CONFIG_DIR, ConfigError, configure_threads, instantiate_checkpoint_datamodule, log_config,
                        user_errors)
from cxr.evaluation.evaluate import evaluate, predict_logits
from cxr.evaluation.fit_feature_distance import check_feature_distance_config, fit_feature_distance_checkpoint
from cxr.evaluation.metrics import compute_metrics
from cxr.evaluation.recalibrate import check_calibration_plan, recalibrate_checkpoint
from cxr.inference import NET_PREFIX, Classifier, load_classifier
from cxr.models.ensemble import PredictionEnsemble
from cxr.models.feature_distance import SPEC_KEY as FEATURE_DISTANCE_SPEC
from cxr.models.feature_distance import TENSORS_KEY as FEATURE_DISTANCE_TENSORS
from cxr.models.soup import average_weights, check_soup_members, greedy_soup
from cxr.tracking import code_version

log = logging.getLogger("cxr.soup")
# Lightning's training state belongs to one member's run, not to the average: a soup is not resumable.
TRAINING_STATE_KEYS = ("optimizer_states", "lr_schedulers", "callbacks", "loops", "current_model_state")


def member_paths(members) -> list[Path]:
    """The checkpoints of `members` (a path or glob pattern, or a list of them) in the order given, each pattern's
    files sorted. A pattern adds only files not listed before it; a path written out is always taken (written
    twice, it weighs twice in a uniform soup)."""
    paths = []
    for member in members if isinstance(members, (list, tuple, ListConfig)) else [members]:
        pattern = str(Path(str(member)).expanduser())
        if glob.escape(pattern) == pattern:  # no wildcard
            paths.append(Path(pattern))
            continue
        matches = sorted(glob.glob(pattern))
        if not matches:
            raise FileNotFoundError(f"members: {member} matched no file")
        paths += [Path(m) for m in matches if Path(m) not in paths]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoints not found: {', '.join(missing)}")
    return paths


def run_fit_seconds(ckpt_paths: list[Path]) -> dict[str, float | None]:
    """Each training run's fit time, as cxr-train recorded it in `<run>/results.json`, once per run: the
    members may be the best checkpoints of several runs or the snapshots (`<run>/checkpoints/snapshots/`)
    of one."""
    fits = {}
    for path in ckpt_paths:
        results = next((d / "results.json" for d in path.parents[1:3] if (d / "results.json").is_file()), None)
        if results is None:
            fits[str(path)] = None
        elif str(results.parent) not in fits:
            fits[str(results.parent)] = json.loads(results.read_text()).get("fit_seconds")
    return fits


def write_soup_checkpoint(template: Path, net: torch.nn.Module, out_path: Path, soup_record: dict) -> Path:
    """`template`'s checkpoint with `net`'s weights, no calibration and no training state."""
    checkpoint, spec = read_checkpoint(template)
    for key in TRAINING_STATE_KEYS:
        checkpoint.pop(key, None)
    state = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(NET_PREFIX)}
    state.update({NET_PREFIX + k: v for k, v in net.state_dict().items()})
    checkpoint["state_dict"] = state
    checkpoint.pop(FEATURE_DISTANCE_TENSORS, None)  # fitted to the template's features, not the soup's
    spec = {k: v for k, v in spec.items() if k not in ("calibration_fit", FEATURE_DISTANCE_SPEC)}
    if isinstance(net, PredictionEnsemble):
        spec["ensemble_size"] = len(net.members)
    checkpoint[CHECKPOINT_KEY] = {**spec, **Calibration().to_spec(spec["class_names"]), "soup": soup_record}
    return save_checkpoint(checkpoint, out_path)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="soup")
@user_errors
def main(cfg: DictConfig) -> str:
    log_config(cfg, log)
    configure_threads(cfg)
    out_dir = Path(cfg.paths.output_dir)
    best = out_dir / "checkpoints" / "best.ckpt"
    paths = member_paths(cfg.members)
    members = [load_classifier(p) for p in paths]
    check_soup_members([m.spec for m in members], [str(p) for p in paths])
    spec = members[0].spec
    datamodule = instantiate_checkpoint_datamodule(cfg, spec)
    summary = datamodule.summary()
    # Which splits and images trained the members is theirs to say (checked below), not the data config's.
    theirs = ("train_splits", TRAIN_FINGERPRINTS)
    if any(summary.get(key) != value for key, value in spec["data_summary"].items() if key not in theirs):
        raise ConfigError("data= is not the data the members were trained on (its splits, held-out sources or classes "
                          "differ), so the selection split could hold their training images; pass the members' data "
                          "config")
    select_split = cfg.select_split
    if select_split == datamodule.split:
        raise ConfigError(f"select_split={select_split} is the evaluation split: choose the members on another one")
    feature_distance = cfg.get("feature_distance")
    if feature_distance:
        check_feature_distance_config(datamodule, feature_distance.split, float(feature_distance.pass_rate),
                                      datamodule.split)
    calibration = cfg.get("calibration") or {"method": "none"}
    check_calibration_plan(calibration, datamodule, datamodule.split, "soup")
    # Every split something is chosen or fitted on, each checked once, before the soup is made: members refitted
    # on train + val must not be selected, calibrated or given a threshold there (an ensemble gets no distance).
    chosen_on = [select_split] if cfg.method == "greedy" else []
    if calibration["method"] != "none":
        chosen_on.append(calibration["split"])
    if feature_distance and cfg.method != "ensemble":
        chosen_on.append(feature_distance.split)
    for split in dict.fromkeys(chosen_on):
        datamodule.check_unseen(split, spec["data_summary"], whose="the members")
    targets = datamodule.split_frame(select_split)["target"].to_numpy()

    def score(net: torch.nn.Module) -> float:
        logits = predict_logits(Classifier(net=net, spec=spec), datamodule, select_split)
        return compute_metrics(Calibration().probabilities(logits).numpy(), targets, spec["class_names"])["macro_auroc"]

    code = code_version()  # before the work: files may change while it runs
    start = time.perf_counter()
    nets = [m.net for m in members]
    if cfg.method == "greedy":
        selection = greedy_soup(nets, score)
    elif cfg.method in ("uniform", "ensemble"):
        selection = {"kept": list(range(len(nets)))}
    else:
        raise ConfigError(f"method must be 'greedy', 'uniform' or 'ensemble', got {cfg.method!r}")
    kept = [nets[i] for i in selection["kept"]]
    soup = PredictionEnsemble(kept) if cfg.method == "ensemble" else average_weights(kept)
    scores = selection.get("member_scores", [None] * len(paths))
    record = {"method": cfg.method, "select_split": select_split, "kept": selection["kept"],
              "members": [{"path": str(p), "sha256": m.sha256, "select_macro_auroc": score}
                          for p, m, score in zip(paths, members, scores)],
              "steps": selection.get("steps", []), "select_macro_auroc": selection.get("score")}
    # Calibrated and given its distance under another name: a run that fails on the way leaves no best.ckpt that
    # lacks them.
    unfinished = best.with_name(f"{best.stem}.unfinished.ckpt")
    write_soup_checkpoint(paths[0], soup, unfinished, record)

    results = {"best_checkpoint": str(best), "soup": record, "soup_seconds": time.perf_counter() - start,
               "code": code}
    fits = run_fit_seconds(paths)
    results["run_fit_seconds"] = fits
    results["fit_seconds"] = sum(fits.values()) if all(f is not None for f in fits.values()) else None
    try:
        if calibration["method"] != "none":
            results["calibration"] = recalibrate_checkpoint(unfinished, datamodule, calibration["split"],
                                                            calibration["method"], out_path=unfinished, warn_few=False)
        if feature_distance:  # the template's was fitted to its own features (write_soup_checkpoint drops it)
            results["feature_distance"] = fit_feature_distance_checkpoint(
                unfinished, datamodule, feature_distance.split, float(feature_distance.pass_rate), out_path=unfinished)
        unfinished.replace(best)
    finally:
        unfinished.unlink(missing_ok=True)
    log.info("soup of %s (of %d) -> %s", [paths[i].as_posix() for i in selection["kept"]], len(paths), best)
    metrics = evaluate(load_classifier(best), datamodule, datamodule.split, out_dir / "eval",
                       title=f"{cfg.task_name}: {datamodule.describe_split(datamodule.split)}")
    results["eval"] = {k: metrics[k] for k in ("n", "accuracy", "macro_auroc", "pneumonia_vs_normal_auroc")}
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    log.info("results: %s", results)
    print(best)
    return str(best)


if __name__ == "__main__":
    main()
