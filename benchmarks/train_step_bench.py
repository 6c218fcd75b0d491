"""Would a lower precision or a compiled model make CPU training faster? Times the whole network's train step
(forward, loss, backward, AdamW) on one in-memory batch as the project trains it (float32, channels_last),
then the same under bfloat16 autocast, then compiled with torch.compile (inductor), and inference under each
precision. Same model, batch size and inputs throughout.

    python benchmarks/train_step_bench.py experiment=lite0_finetune [+steps=6]
"""
from __future__ import annotations

import json
import platform
import time

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from cxr.config import CONFIG_DIR, configure_threads


def images_per_second(step, batch_size: int, steps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return batch_size * steps / (time.perf_counter() - start)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    configure_threads(cfg)
    torch.manual_seed(cfg.seed)
    steps, batch_size, size = int(cfg.get("steps", 6)), int(cfg.data.batch_size), int(cfg.preprocess.image_size)
    model = instantiate(cfg.model, _partial_=True)(class_names=["normal", "pneumonia", "tuberculosis"],
                                                   preprocessing=instantiate(cfg.preprocess))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = torch.randn(batch_size, 3, size, size), torch.randint(0, 3, (batch_size,))

    def train_step(forward, bf16: bool):
        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model.loss(forward(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return step

    model.train()
    results = {"float32": images_per_second(train_step(model, False), batch_size, steps),
               "bfloat16 autocast": images_per_second(train_step(model, True), batch_size, steps)}
    compiled = torch.compile(model)
    start = time.perf_counter()
    train_step(compiled, False)()
    compile_seconds = time.perf_counter() - start
    results["torch.compile (float32)"] = images_per_second(train_step(compiled, False), batch_size, steps)
    model.eval()
    for name, bf16 in (("inference float32", False), ("inference bfloat16 autocast", True)):
        def infer():
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                model(x)
        results[name] = images_per_second(infer, batch_size, steps)
    print(json.dumps({"backbone": cfg.model.backbone, "image_size": size, "batch_size": batch_size,
                      "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
                      "torch": torch.__version__, "compile_seconds": round(compile_seconds, 1),
                      "images_per_second": {k: round(v, 2) for k, v in results.items()}}, indent=2))


if __name__ == "__main__":
    main()
