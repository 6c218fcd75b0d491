"""Write a copy of `../shared/data/cxr/manifest.csv` with subgroup columns, for `data.subgroups` reports.

From NIH's own metadata table (`Data_Entry_2017_v2020.csv.gz`, shipped for example in the PyPI package
torchxrayvision under torchxrayvision/data/), for the NIH images: `view` (PA / AP), `sex`, `age_band`
and `nih_labels` (NIH's report-mined labels: "No Finding", "Pneumonia" alone, or pneumonia with other
findings); from the data folder's `tbx11k_tb_annotations.csv`, for the TBX11K images: `tb_type`
(active, latent, active+latent, from TBX11K's boxes). Kermany ships no per-image metadata, so its
images leave these columns empty ("(not given)" in the report). Image paths are written absolute, so
the copy may live anywhere; no image is copied.

    python experiments/subgroup_manifest.py --nih-table DIR/Data_Entry_2017_v2020.csv.gz --out /tmp/subgroups.csv
    cxr-eval ckpt_path=RUN/checkpoints/best.ckpt data=manifest data.manifest=/tmp/subgroups.csv \\
        'data.subgroups=[view,sex,age_band,nih_labels,tb_type]' paths.output_dir=RUN/eval_subgroups
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
AGE_BANDS = [(0, 17, "0-17"), (18, 39, "18-39"), (40, 64, "40-64"), (65, 200, "65+")]


def age_band(age: int) -> str:
    return next(name for low, high, name in AGE_BANDS if low <= age <= high)


def nih_labels(findings: str) -> str:
    labels = set(findings.split("|"))
    if labels == {"No Finding"}:
        return "No Finding"
    return "Pneumonia alone" if labels == {"Pneumonia"} else "Pneumonia + other findings" if "Pneumonia" in labels else "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/cxr"))
    parser.add_argument("--nih-table", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    data = Path(args.data).resolve()
    manifest = pd.read_csv(data / "manifest.csv", dtype=str, keep_default_na=False)
    nih = pd.read_csv(args.nih_table).set_index("Image Index")
    nih_rows = manifest["source"] == "nih-cxr8"
    names = [Path(p).stem + ".png" for p in manifest.loc[nih_rows, "path"]]  # NIH's names are .png; here .jpg
    unknown = sorted(set(names) - set(nih.index))
    if unknown:
        raise SystemExit(f"{len(unknown)} NIH images are not in {args.nih_table}, e.g. {unknown[:3]}")
    entries = nih.loc[names]
    for column in ("view", "sex", "age_band", "nih_labels", "tb_type"):
        manifest[column] = ""
    manifest.loc[nih_rows, "view"] = entries["View Position"].to_numpy()
    manifest.loc[nih_rows, "sex"] = entries["Patient Gender"].to_numpy()
    manifest.loc[nih_rows, "age_band"] = [age_band(int(a)) for a in entries["Patient Age"]]
    manifest.loc[nih_rows, "nih_labels"] = [nih_labels(f) for f in entries["Finding Labels"]]
    tb_type = pd.read_csv(data / "tbx11k_tb_annotations.csv", dtype=str).set_index("path")["tb_type"]
    tb_rows = manifest["path"].isin(tb_type.index)
    manifest.loc[tb_rows, "tb_type"] = tb_type.loc[manifest.loc[tb_rows, "path"]].to_numpy()
    manifest["path"] = [str(data / p) for p in manifest["path"]]
    manifest.to_csv(args.out, index=False)
    print(args.out)


if __name__ == "__main__":
    main()
