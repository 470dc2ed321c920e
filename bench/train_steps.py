"""Training steps per second: images batched by size (bf16 + channels-last on a GPU) against the
reference code's way, fp32 one image at a time with a backward pass per tuple.

``python -m bench.train_steps [--device cuda]``: Lite0 + GeM with its ImageNet weights,
BatchNorm frozen, Adam; each step trains ``--tuples-per-step`` tuples of a query, a positive and
``--nnum`` negatives, 4:3 photos at ``--image-size`` a side (random pixels: the speed does not
depend on them). Both ways run in this one process on the same device, the reference first;
the figure is the ratio of tuples per second after ``--warmup`` steps. No Ray, FAISS or
pycolmap: it runs wherever PyTorch does.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass

import numpy as np
import torch
import tyro

from bench import write_results
from model.losses import ContrastiveLoss
from model.networks import NetworkMeta, build_network
from pipeline.train.images import embed, freeze_batchnorm, mean_std, resolve_precision


@dataclass(frozen=True)
class StepsConf:
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    image_size: int = 362
    tuples_per_step: int = 5
    nnum: int = 5
    steps: int = 6
    warmup: int = 2
    out: str | None = None
    """Default: bench/results/train_steps_<device>.json (and .txt)."""


def _network(device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    net = build_network(NetworkMeta(backbone="efficientnet_lite0"), "imagenet").to(device)
    net.train()
    freeze_batchnorm(net)
    return net


def _rate(conf: StepsConf, device: torch.device, way: str) -> float:
    """Tuples per second of ``way``: ``reference`` or ``batched``."""
    net = _network(device)
    precision = resolve_precision("fp32" if way == "reference" else "auto", device)
    if precision.channels_last:
        net = net.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-7)
    loss_fn = ContrastiveLoss(margin=0.7)
    normalise = mean_std(net, device)
    h, w = conf.image_size * 3 // 4, conf.image_size
    rng = np.random.default_rng(0)
    photos = [
        rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        for _ in range(conf.tuples_per_step * (2 + conf.nnum))
    ]
    size = 2 + conf.nnum
    started = 0.0
    for step in range(conf.warmup + conf.steps):
        if step == conf.warmup:
            _sync(device)
            started = time.perf_counter()
        optimizer.zero_grad()
        if way == "reference":  # one image per forward, a backward per tuple
            for t in range(conf.tuples_per_step):
                out = torch.stack(
                    [
                        embed(net, [p], normalise, precision=precision, device=device)[0]
                        for p in photos[t * size : (t + 1) * size]
                    ]
                )
                loss_fn(out[None]).backward()
        else:
            out = embed(net, photos, normalise, precision=precision, device=device)
            loss_fn(out.view(conf.tuples_per_step, size, -1)).backward()
        optimizer.step()
    _sync(device)
    return conf.steps * conf.tuples_per_step / (time.perf_counter() - started)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(conf: StepsConf) -> dict:
    device = torch.device(conf.device)
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    )
    reference = _rate(conf, device, "reference")
    batched = _rate(conf, device, "batched")
    fast = "bf16 + channels-last" if device.type == "cuda" else "fp32"
    lines = [
        f"device: {name}; Lite0 + GeM, {conf.tuples_per_step} tuples of {2 + conf.nnum} photos "
        f"({conf.image_size} × {conf.image_size * 3 // 4}) a step, {conf.steps} steps timed",
        f"reference (fp32, one image per forward)   {reference:7.2f} tuples/s",
        f"batched by size ({fast:>20})   {batched:7.2f} tuples/s",
        f"ratio  {batched / reference:5.2f}",
    ]
    print("\n".join(lines))
    payload = {
        "device": name,
        "reference_tuples_per_s": reference,
        "batched_tuples_per_s": batched,
        "ratio": batched / reference,
        "lines": lines,
    }
    write_results(conf.out or f"bench/results/train_steps_{device.type}.json", payload, lines)
    return payload


if __name__ == "__main__":
    main(tyro.cli(StepsConf))
