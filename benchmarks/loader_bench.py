"""Does the data loader keep up with training on CPU?

Times N train steps fed by the real loader (cached standardized images + albumentations
augmentation + normalisation + weighted sampler) against N train steps on one in-memory batch,
same model, batch size and settings. Ratio = in-memory time / real-loader time (1.0 = free loader).

    python benchmarks/loader_bench.py experiment=lite0_harmonized [+steps=20]
"""
from __future__ import annotations

import itertools
import json
import platform
import time

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from cxr.config import CONFIG_DIR, configure_threads, instantiate_datamodule


def endless(loader):
    """Re-iterate the loader (itertools.cycle would replay cached, un-augmented batches)."""
    while True:
        yield from loader


def timed_steps(model, optimizer, batches, steps: int) -> float:
    model.train()
    start = time.perf_counter()
    for x, y in itertools.islice(batches, steps):
        loss = model.loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    configure_threads(cfg)
    steps = int(cfg.get("steps", 20))
    torch.manual_seed(cfg.seed)
    preprocessing = instantiate(cfg.preprocess)
    datamodule = instantiate_datamodule(cfg, preprocessing)  # the training loader, exactly as cxr-train builds it
    t0 = time.perf_counter()
    datamodule.setup("fit")
    setup_seconds = time.perf_counter() - t0
    model = instantiate(cfg.model, _partial_=True)(class_names=datamodule.class_names, preprocessing=preprocessing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)  # the whole net trains: the slowest step
    loader = datamodule.train_dataloader()
    fixed = next(iter(loader))
    timed_steps(model, optimizer, itertools.repeat(fixed), 2)  # warm-up
    in_memory = timed_steps(model, optimizer, itertools.repeat(fixed), steps)
    real = timed_steps(model, optimizer, endless(loader), steps)
    t0 = time.perf_counter()
    n_loaded = sum(len(y) for _, y in itertools.islice(endless(loader), steps))
    loader_only = time.perf_counter() - t0
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "backbone": cfg.model.backbone, "image_size": preprocessing.image_size, "batch_size": datamodule.batch_size,
        "steps": steps, "cache_build_seconds": round(setup_seconds, 1),
        "in_memory_images_per_second": round(steps * datamodule.batch_size / in_memory, 2),
        "real_loader_images_per_second": round(steps * datamodule.batch_size / real, 2),
        "loader_alone_images_per_second": round(n_loaded / loader_only, 1),
        "ratio": round(in_memory / real, 3),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
