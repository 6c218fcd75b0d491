"""How much does each preprocessing step against source cues help? A cheap, measured ablation.

For each preprocessing variant: frozen ImageNet Lite0 features (packaged weights) on every image of
../shared/data/cxr, then logistic-regression heads for
- in-distribution: train split -> test split, macro AUROC;
- source identifiability: Kermany vs NIH normals+pneumonias (AUROC; 0.5 = sources indistinguishable);
- NIH held out: trained on everything but NIH, tested on all NIH images: pneumonia-vs-normal AUROC
  and the share of NIH images called tuberculosis;
- Kermany held out: pneumonia-vs-normal AUROC on all Kermany images.

    python experiments/preprocessing_probe.py [--size 160] [--out experiments/preprocessing_probe.md]
    python experiments/preprocessing_probe.py --crops 0.06,0.12,0.18,0.24 --out /tmp/crops.md   # border crop depths
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import cross_val_predict

from cxr.data.dataset import load_standardized
from cxr.data.index import CLASS_NAMES, index_manifest
from cxr.data.preprocess import Preprocessing
from cxr.evaluation.metrics import pneumonia_vs_normal_auroc
from cxr.models.backbone import create_backbone

ROOT = Path(__file__).resolve().parents[1]


def variants(size: int, crops: list[float] | None = None) -> dict[str, Preprocessing]:
    base = dict(image_size=size, mean=(0.5,) * 3, std=(0.5,) * 3)
    if crops:
        return {f"+ border crop {100 * crop:.0f}%": Preprocessing(**base, crop_border=crop) for crop in crops}
    return {
        "plain resize": Preprocessing(**base),
        "+ CLAHE": Preprocessing(**base, equalize="clahe"),
        "+ effective resolution 128": Preprocessing(**base, effective_size=128),
        "+ border crop 6%": Preprocessing(**base, crop_border=0.06),
        "harmonized (all three)": Preprocessing(**base, crop_border=0.06, effective_size=128, equalize="clahe"),
    }


@torch.inference_mode()
def features(net, images: np.ndarray, prep: Preprocessing) -> np.ndarray:
    out = []
    for start in range(0, len(images), 64):
        batch = torch.stack([prep.to_tensor(im) for im in images[start:start + 64]])
        batch = batch.contiguous(memory_format=torch.channels_last)
        out.append(net.forward_head(net.forward_features(batch), pre_logits=True).numpy())
    return np.concatenate(out)


def probe(x_train, y_train, x_test, sample_weight=None) -> np.ndarray:
    head = LogisticRegression(max_iter=3000, C=0.5).fit(x_train, y_train, sample_weight=sample_weight)
    probs = np.zeros((len(x_test), len(CLASS_NAMES)))
    probs[:, head.classes_] = head.predict_proba(x_test)
    return probs


def holdout_scores(x, y, source, split) -> dict[str, tuple[float, float]]:
    """Per held-out source: a probe trained on the other sources' train + val images, tested on all of the
    held-out source's images: (pneumonia-vs-normal AUROC, share called tuberculosis)."""
    out = {}
    for held in ("nih-cxr8", "kermany"):
        keep = source != held
        ph = probe(x[keep & (split != "test")], y[keep & (split != "test")], x[~keep])
        out[held] = (pneumonia_vs_normal_auroc(ph, y[~keep], list(CLASS_NAMES)),
                     float((ph.argmax(1) == CLASS_NAMES.index("tuberculosis")).mean()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--manifest", default=str(ROOT.parent / "shared/data/cxr/manifest.csv"))
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--cache-dir", default=str(ROOT / ".cache/images"))
    parser.add_argument("--out", default=str(ROOT / "experiments/preprocessing_probe.md"))
    parser.add_argument("--crops", type=lambda text: [float(c) for c in text.split(",")],
                        help="instead of the ablation, the border crop alone at these depths")
    args = parser.parse_args()
    index = index_manifest(args.manifest)
    y = np.array([CLASS_NAMES.index(label) for label in index["label"]])
    source, split = index["source"].to_numpy(), index["split"].to_numpy()
    net = create_backbone("tf_efficientnet_lite0", 3, pretrained="packaged").eval().to(memory_format=torch.channels_last)
    rows = []
    for name, prep in variants(args.size, args.crops).items():
        start = time.perf_counter()
        x = features(net, load_standardized(index["path"].tolist(), prep, args.cache_dir), prep)
        train, test = split == "train", split == "test"
        p = probe(x[train], y[train], x[test])
        in_dist = roc_auc_score(y[test], p, multi_class="ovr")
        np_mask = np.isin(source, ["kermany", "nih-cxr8"])
        src_pred = cross_val_predict(LogisticRegression(max_iter=3000, C=0.5), x[np_mask], source[np_mask] == "nih-cxr8",
                                     cv=5, method="predict_proba")[:, 1]
        src_auc = roc_auc_score(source[np_mask] == "nih-cxr8", src_pred)
        out = holdout_scores(x, y, source, split)
        rows.append((name, in_dist, src_auc, *out["nih-cxr8"], out["kermany"][0], time.perf_counter() - start))
        print(rows[-1], flush=True)
    lines = ["# Preprocessing against source cues: linear-probe ablation", "",
             f"Frozen ImageNet `tf_efficientnet_lite0` features (packaged weights), {args.size} px, logistic-regression head, "
             "on `../shared/data/cxr`. Command: `python experiments/preprocessing_probe.py`.", "",
             "| Preprocessing | in-distribution macro AUROC (test) | Kermany-vs-NIH source AUROC (lower is better) | "
             "NIH held out: pneumonia-vs-normal AUROC | NIH held out: % called TB | Kermany held out: pneumonia-vs-normal AUROC |",
             "|---|---|---|---|---|---|"]
    for name, ind, src, nih_auc, nih_tb, ker_auc, _ in rows:
        lines.append(f"| {name} | {ind:.3f} | {src:.3f} | {nih_auc:.3f} | {100 * nih_tb:.1f}% | {ker_auc:.3f} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(args.out)


if __name__ == "__main__":
    main()
