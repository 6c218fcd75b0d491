"""Do earlier, more generic features carry a disease signal that survives a change of hospital?

Frozen ImageNet Lite0 features (packaged weights, 224 px, 6% border crop: `lite0_member`'s pixels) of every
image of ../shared/data/cxr, taken after each block of the network (timm `forward_intermediates`,
mean- and max-pooled over space) and after the head (the features `preprocessing_probe.py` uses). For each
depth, a standardised logistic-regression head (`preprocessing_probe.probe`) is scored
- in distribution: train split -> test split, macro AUROC;
- NIH held out: trained on the other sources' train + val images, tested on all NIH images:
  pneumonia-vs-normal AUROC and the share called tuberculosis;
- Kermany held out: the same on all Kermany images.

    python experiments/feature_depth_probe.py [--out experiments/feature_depth_probe.md]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from cxr.data.dataset import load_standardized
from cxr.data.index import CLASS_NAMES, index_manifest
from cxr.data.preprocess import Preprocessing
from cxr.models.backbone import create_backbone
from preprocessing_probe import holdout_scores, probe  # the same heads and protocol (this script's folder)

ROOT = Path(__file__).resolve().parents[1]


@torch.inference_mode()
def features_by_depth(net, images: np.ndarray, prep: Preprocessing) -> dict[str, np.ndarray]:
    out: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(images), 64):
        batch = torch.stack([prep.to_tensor(im) for im in images[start:start + 64]])
        final, blocks = net.forward_intermediates(batch, extra_blocks=True)
        for depth, x in enumerate(blocks):
            name = "stem" if depth == 0 else f"block {depth}"
            out.setdefault(f"{name} ({x.shape[1]} ch, {x.shape[-1]} px)", []).append(
                torch.cat([x.mean((2, 3)), x.amax((2, 3))], 1).numpy())
        out.setdefault("head (pre-logits)", []).append(net.forward_head(final, pre_logits=True).numpy())
    return {name: np.concatenate(parts) for name, parts in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--manifest", default=str(ROOT.parent / "shared/data/cxr/manifest.csv"))
    parser.add_argument("--cache-dir", default=str(ROOT / ".cache/images"))
    parser.add_argument("--out", default=str(ROOT / "experiments/feature_depth_probe.md"))
    args = parser.parse_args()
    start = time.perf_counter()
    index = index_manifest(args.manifest)
    y = np.array([CLASS_NAMES.index(label) for label in index["label"]])
    source, split = index["source"].to_numpy(), index["split"].to_numpy()
    prep = Preprocessing(image_size=224, mean=(0.5,) * 3, std=(0.5,) * 3, crop_border=0.06)
    net = create_backbone("tf_efficientnet_lite0", 3, pretrained="packaged").eval()
    by_depth = features_by_depth(net, load_standardized(index["path"].tolist(), prep, args.cache_dir), prep)
    rows = []
    for name, x in by_depth.items():
        x = StandardScaler().fit(x[split == "train"]).transform(x)
        p = probe(x[split == "train"], y[split == "train"], x[split == "test"])
        cells = [f"{roc_auc_score(y[split == 'test'], p, multi_class='ovr'):.3f}"]
        for auroc, called_tb in holdout_scores(x, y, source, split).values():
            cells += [f"{auroc:.3f}", f"{100 * called_tb:.0f}%"]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    lines = ["# Feature depth vs change of hospital: linear probes on each block of frozen Lite0", "",
             "Frozen ImageNet `tf_efficientnet_lite0` (packaged weights), 224 px, 6% border crop, features after each "
             "block (mean + max pooled) and after the head; standardised logistic-regression head. "
             f"Command: `python experiments/feature_depth_probe.py` ({(time.perf_counter() - start) / 60:.1f} min on 2 CPU cores).", "",
             "| Features | in-distribution macro AUROC (test) | NIH held out: pneumonia-vs-normal AUROC | NIH held out: called TB | "
             "Kermany held out: pneumonia-vs-normal AUROC | Kermany held out: called TB |",
             "|---|---|---|---|---|---|", *rows]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(args.out)


if __name__ == "__main__":
    main()
