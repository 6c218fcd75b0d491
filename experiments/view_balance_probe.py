"""Is the projection confound in NIH's labels why an NIH-trained pneumonia-vs-normal direction fails on
Kermany's children?

In this NIH subset 69% of normals are AP films against 44% of pneumonias (feature_depth_probe.md). If the
probe learnt "PA vs AP" instead of pneumonia, taking the projection out of NIH's training images should
lift Kermany-held-out ranking. Frozen ImageNet Lite0 features (packaged weights, 224 px, 6% border crop:
feature_depth_probe's head features), the Kermany-held-out protocol of `preprocessing_probe.holdout_scores`
(trained on the other sources' train + val images, tested on all Kermany images), with NIH's training images
- as they are;
- weighted so every (class, view) cell of NIH weighs the same;
- PA films only; AP films only.

View positions come from NIH's `Data_Entry_2017_v2020.csv`, as shipped in the torchxrayvision wheel:

    pip download --no-deps torchxrayvision -d /tmp/xrv
    unzip -o /tmp/xrv/torchxrayvision-*.whl 'torchxrayvision/data/*' -d /tmp/xrv
    python experiments/view_balance_probe.py --nih-table /tmp/xrv/torchxrayvision/data/Data_Entry_2017_v2020.csv.gz
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.preprocessing import StandardScaler

from cxr.data.dataset import load_standardized
from cxr.data.index import CLASS_NAMES, index_manifest
from cxr.data.preprocess import Preprocessing
from cxr.evaluation.metrics import pneumonia_vs_normal_auroc
from cxr.models.backbone import create_backbone
from preprocessing_probe import features, probe  # the same features and head (this script's folder)

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nih-table", required=True, help="NIH's Data_Entry_2017_v2020.csv(.gz)")
    parser.add_argument("--manifest", default=str(ROOT.parent / "shared/data/cxr/manifest.csv"))
    parser.add_argument("--cache-dir", default=str(ROOT / ".cache/images"))
    parser.add_argument("--out", default=str(ROOT / "experiments/view_balance_probe.md"))
    args = parser.parse_args()
    index = index_manifest(args.manifest)
    table = pd.read_csv(args.nih_table)
    view_of = dict(zip(table["Image Index"], table["View Position"]))  # NIH's names are .png; here .jpg
    view = np.array([view_of.get(Path(p).stem + ".png", "") if s == "nih-cxr8" else ""
                     for p, s in zip(index["path"], index["source"])])
    y = np.array([CLASS_NAMES.index(label) for label in index["label"]])
    source, split = index["source"].to_numpy(), index["split"].to_numpy()
    nih = source == "nih-cxr8"
    if (view[nih] == "").any():
        raise SystemExit(f"{(view[nih] == '').sum()} NIH images have no view position in {args.nih_table}")

    prep = Preprocessing(image_size=224, mean=(0.5,) * 3, std=(0.5,) * 3, crop_border=0.06)
    net = create_backbone("tf_efficientnet_lite0", 3, pretrained="packaged").eval().to(memory_format=torch.channels_last)
    x = features(net, load_standardized(index["path"].tolist(), prep, args.cache_dir), prep)
    x = StandardScaler().fit(x[split == "train"]).transform(x)
    held = source == "kermany"
    train = ~held & (split != "test")
    cell = pd.Series([f"{c}|{v}" for c, v in zip(y, view)])[train & nih]
    balanced = np.ones(len(y))
    balanced[train & nih] = (cell.map(len(cell) / (cell.nunique() * cell.value_counts()))).to_numpy()

    rows = []
    for name, keep, weight in [
        ("NIH as it is", train, None),
        ("NIH weighted: every (class, view) cell equal", train, balanced[train]),
        ("NIH PA films only", train & (~nih | (view == "PA")), None),
        ("NIH AP films only", train & (~nih | (view == "AP")), None),
    ]:
        probs = probe(x[keep], y[keep], x[held], sample_weight=weight)
        auroc = pneumonia_vs_normal_auroc(probs, y[held], list(CLASS_NAMES))
        rows.append(f"| {name} | {(keep & nih).sum()} | {auroc:.3f} |")
        print(rows[-1], flush=True)
    counts = pd.crosstab(pd.Series(index["label"].to_numpy()[nih], name="label"), pd.Series(view[nih], name="view"))
    lines = ["# Projection (PA / AP) in NIH's labels vs transfer to Kermany: linear probes", "",
             "Frozen ImageNet `tf_efficientnet_lite0` (packaged weights), 224 px, 6% border crop, standardised "
             "logistic-regression head; trained on the train + val images of NIH and TBX11K, tested on all 1,739 "
             "Kermany images. Command: see the script's docstring.", "",
             "NIH images of `../shared/data/cxr` by view: "
             + "; ".join(f"{label}: " + ", ".join(f"{v} {n}" for v, n in row.items()) for label, row in counts.iterrows()),
             "", "| NIH training images | n NIH | Kermany held out: pneumonia-vs-normal AUROC |", "|---|---|---|", *rows]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(args.out)


if __name__ == "__main__":
    main()
