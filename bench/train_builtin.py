"""Fine-tuning on the built-in collection, judged on landmarks it never saw.

``python -m bench.train_builtin``: the ``tiny`` collection's SfM pairs (``bench.train``'s
``scene_pairs``: ingest, SfM, pairs; no label used for training), ``pipeline.train`` from
ImageNet Lite0 with fixed seeds (one landmark held out for its validation), then
``pipeline.evaluate`` on ``landmarks-demo``, other generated landmarks, three ways: the
network it started from (the baseline, evaluated in the same command), the kept fine-tuned
network, and that network with the Lw the run learned. Prints mAP Easy / Medium / Hard.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import ray
import tyro

from bench import write_results
from bench.train import scene_pairs
from model.datasets.landmarks import CONFS, generate
from pipeline.evaluate import EvaluateConf
from pipeline.evaluate import run as evaluate
from pipeline.train import TrainConf
from pipeline.train import run as train


@dataclass(frozen=True)
class BenchConf:
    work: str = "outputs/bench_train_builtin"
    """Collections, pairs, the training output and the evaluations (rerun: training skipped)."""
    epochs: int = 5
    nnum: int = 1
    held_out: float = 0.3
    lr: float = 1e-6
    workers: int = 1
    seed: int = 0
    out: str | None = "bench/results/train_builtin_cpu.json"


def main(conf: BenchConf) -> dict:
    work = Path(conf.work)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    collections = work / "collections"
    pairs, images = scene_pairs(generate(CONFS["tiny"], collections), work)
    generate(CONFS["demo"], collections)
    started = time.perf_counter()
    output = train(
        TrainConf.from_flags(
            pairs=pairs,
            images=images,
            output=str(work / "train"),
            epochs=conf.epochs,
            nnum=conf.nnum,
            held_out=conf.held_out,
            lr=conf.lr,
            workers=conf.workers,
            seed=conf.seed,
        )
    )
    seconds = time.perf_counter() - started
    ray.shutdown()
    metrics = json.loads((Path(output) / "metrics.json").read_text())
    ways = {
        "off the shelf": ("imagenet", True),
        "fine-tuned": (output, False),
        "fine-tuned + Lw": (output, True),
    }
    maps = {}
    for name, (weights, whitening) in ways.items():
        result = evaluate(
            EvaluateConf.from_flags(
                dataset="landmarks-demo",
                data_root=str(collections),
                weights=weights,
                checkpoint_whitening=whitening,
                output=str(work / "evaluate"),
                cache_dir=str(work / "cache"),
            )
        )
        maps[name] = {p: result["metrics"][p]["map"] for p in ("easy", "medium", "hard")}
    best = next(e for e in metrics["epochs"] if e["best"])
    gain = maps["fine-tuned"]["medium"] / maps["off the shelf"]["medium"]
    lines = [
        f"device: {platform.machine()} CPU, {os.cpu_count()} cores; {conf.workers} CPU worker(s); "
        f"tiny collection's SfM pairs, {conf.epochs} epochs, lr {conf.lr:g}, nnum {conf.nnum}",
        f"training {seconds:.0f} s; held-out validation mAP (1024 px) epoch 0 "
        f"{metrics['epochs'][0]['val_map']:.4f} -> best epoch {best['epoch']} "
        f"{best['val_map']:.4f}",
        f"landmarks-demo (never seen)  {'E':>6}{'M':>6}{'H':>6}",
    ]
    for name, m in maps.items():
        lines.append(f"{name:<29}" + "".join(f"{100 * v:>6.1f}" for v in m.values()))
    lines.append(f"medium, fine-tuned / off the shelf: {gain:.3f}")
    print("\n".join(lines))
    payload = {
        "maps": maps,
        "epochs": metrics["epochs"],
        "whitening": metrics.get("whitening"),
        "training_seconds": seconds,
    }
    write_results(conf.out, payload, lines)
    return payload


if __name__ == "__main__":
    main(tyro.cli(BenchConf))
