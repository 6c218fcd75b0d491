"""Can domain-adversarial training (DANN) on a new hospital's unlabelled images undo the source shortcut?
A cheap probe on frozen features, before any such option goes into the trainer.

Frozen ImageNet Lite0 features (packaged weights, 224 px, 6% border crop: `lite0_member`'s pixels) of every
image of ../shared/data/cxr. With one source held out:
- labelled training images: the other sources' train split;
- the held-out hospital's train split as unlabelled images (pixels only) for the adversary;
- scored on the held-out hospital's val + test images, which the adaptation never sees.
Heads: a logistic regression; a small MLP; the same MLP with a gradient-reversal domain discriminator
on its hidden layer (Ganin et al. 2016), which pushes the hidden features of the two domains together.

    python experiments/domain_adversarial_probe.py [--seeds 5] [--out experiments/domain_adversarial_probe.md]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from cxr.data.dataset import load_standardized
from cxr.data.index import CLASS_NAMES, index_manifest
from cxr.data.preprocess import Preprocessing
from cxr.evaluation.metrics import pneumonia_vs_normal_auroc
from cxr.models.backbone import create_backbone
from preprocessing_probe import features, probe  # the same features and logistic head (this script's folder)

ROOT = Path(__file__).resolve().parents[1]


class GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, strength):
        ctx.strength = strength
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.strength * grad, None


def train_head(x_lab, y_lab, x_target, adversary: float, seed: int, steps: int) -> nn.Module:
    torch.manual_seed(seed)
    hidden = nn.Sequential(nn.Linear(x_lab.shape[1], 256), nn.ReLU(), nn.Dropout(0.3))
    classifier, discriminator = nn.Linear(256, len(CLASS_NAMES)), nn.Sequential(nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 1))
    params = [*hidden.parameters(), *classifier.parameters(), *discriminator.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-3)
    counts = np.bincount(y_lab, minlength=len(CLASS_NAMES))
    sample_weight = torch.as_tensor(1.0 / counts[y_lab], dtype=torch.float64)  # class-balanced draws
    xl, yl, xt = (torch.as_tensor(a) for a in (x_lab, y_lab, x_target))
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        li = torch.multinomial(sample_weight, 128, replacement=True, generator=generator)
        ti = torch.randint(len(xt), (128,), generator=generator)
        h_lab, h_target = hidden(xl[li]), hidden(xt[ti])
        loss = F.cross_entropy(classifier(h_lab), yl[li], label_smoothing=0.1)
        if adversary:
            progress = step / steps
            strength = adversary * (2 / (1 + np.exp(-10 * progress)) - 1)  # DANN's ramp from 0
            domain_logits = discriminator(GradientReversal.apply(torch.cat([h_lab, h_target]), strength)).squeeze(1)
            domain = torch.cat([torch.zeros(128), torch.ones(128)])
            loss = loss + F.binary_cross_entropy_with_logits(domain_logits, domain)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return nn.Sequential(hidden, classifier).eval()


def table_cells(results: list[tuple[float, float, float]]) -> str:
    """Mean ± sd over seeds of (held-out pneumonia-vs-normal AUROC, share called TB, in-distribution AUROC)."""
    a = np.array(results)
    (auc, tb, ind), (auc_sd, tb_sd, ind_sd) = a.mean(0), a.std(0)
    return f"{auc:.3f} ± {auc_sd:.3f} | {100 * tb:.1f}% ± {100 * tb_sd:.1f} | {ind:.3f} ± {ind_sd:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--manifest", default=str(ROOT.parent / "shared/data/cxr/manifest.csv"))
    parser.add_argument("--cache-dir", default=str(ROOT / ".cache/images"))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--adversary", type=float, nargs="+", default=[0.3, 1.0])
    parser.add_argument("--out", default=str(ROOT / "experiments/domain_adversarial_probe.md"))
    args = parser.parse_args()
    index = index_manifest(args.manifest)
    y = np.array([CLASS_NAMES.index(label) for label in index["label"]])
    source, split = index["source"].to_numpy(), index["split"].to_numpy()
    prep = Preprocessing(image_size=224, mean=(0.5,) * 3, std=(0.5,) * 3, crop_border=0.06)
    net = create_backbone("tf_efficientnet_lite0", 3, pretrained="packaged").eval().to(memory_format=torch.channels_last)
    x = features(net, load_standardized(index["path"].tolist(), prep, args.cache_dir), prep).astype(np.float32)
    lines = ["# Domain-adversarial heads on frozen features: a probe", "",
             "Command: `python experiments/domain_adversarial_probe.py`. Protocol in the script's docstring. "
             f"Mean ± sd over {args.seeds} head seeds (the logistic regression has none).", ""]
    for held in ("nih-cxr8", "kermany"):
        lab = (source != held) & (split == "train")
        target = (source == held) & (split == "train")
        scored = (source == held) & (split != "train")
        in_dist = (source != held) & (split == "test")
        mu, sigma = x[lab | target].mean(0), x[lab | target].std(0) + 1e-6
        z = (x - mu) / sigma

        def evaluate(probs: np.ndarray) -> tuple[float, float, float]:
            """`probs`: a head's class probabilities for every image."""
            p_held, p_in = probs[scored], probs[in_dist]
            in_auc = roc_auc_score(y[in_dist], p_in, multi_class="ovr")  # both held-out cases leave all three classes
            return (pneumonia_vs_normal_auroc(p_held, y[scored], list(CLASS_NAMES)), float((p_held.argmax(1) == 2).mean()),
                    in_auc)

        rows = {"logistic regression": [evaluate(probe(z[lab], y[lab], z))]}
        for adversary in [0.0, *args.adversary]:
            name = "MLP" if adversary == 0 else f"MLP + DANN (strength {adversary:g})"
            rows[name] = []
            for seed in range(args.seeds):
                head = train_head(z[lab], y[lab], z[target], adversary, seed, args.steps)
                with torch.no_grad():
                    rows[name].append(evaluate(torch.softmax(head(torch.as_tensor(z)), 1).numpy()))
        lines += [f"## `{held}` held out: {int(lab.sum())} labelled training images, {int(target.sum())} unlabelled "
                  f"`{held}` train images, scored on its {int(scored.sum())} val + test images", "",
                  f"| Head | {held} pneumonia-vs-normal AUROC | {held} called tuberculosis | in-distribution macro AUROC (other sources' test) |",
                  "|---|---|---|---|"]
        for name, results in rows.items():
            lines.append(f"| {name} | {table_cells(results)} |")
        lines.append("")
        print("\n".join(lines[-len(rows) - 3:]), flush=True)
    Path(args.out).write_text("\n".join(lines))
    print(args.out)


if __name__ == "__main__":
    main()
