"""Fine-tuning on real photos, judged on scenes it never saw: off the shelf, fine-tuned, + Lw.

``python -m bench.train_real --pairs REAL/pairs --images REAL/images.parquet --work REAL/train``:
for each seed, ``pipeline.train`` holds out the clusters of a fifth of the queries (whole
scenes, found by SfM; no label is used) and trains on the others with ``--lr``, ``--epochs``,
``--queries`` and ``--workers``; validation describes the photos at extract's size (1024 px)
each epoch. Printed per split: the held-out scenes' mAP (positives: the query's 3D model) of
the network it started from (epoch 0), of the best fine-tuned epoch, the epoch the run keeps
(0 when no epoch beat the start) and that network with the Lw learned from the training
clusters, and what the run hands over. The baseline of each row is its
own epoch 0, measured in the same run. A split whose output is complete is read, not run again.
"""

from __future__ import annotations

import json
import os
import platform
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import ray
import tyro

from bench import write_results
from model.tables import IMAGES
from model.training_set import read_training_set, split_clusters
from pipeline.train import TrainConf
from pipeline.train import run as train


@dataclass(frozen=True)
class BenchConf:
    pairs: str
    """pipeline.pairs' output for the real photos (no label used)."""
    images: str
    """pipeline.ingest's images.parquet of the same photos."""
    work: str
    """A folder for each split's training output (split_<seed>)."""
    seeds: tuple[int, ...] = field(default=(0, 1, 2, 3))
    lr: float = 1e-5
    epochs: int = 3
    queries: int = 150
    workers: int = 2
    held_out: float = 0.2
    out: str | None = "bench/results/train_real_cpu.json"


def _held_out(conf: BenchConf, seed: int) -> tuple[list[str], int]:
    """The held-out clusters' scene names (from the photos' folders: for reading only) and
    their number of queries."""
    _, val = split_clusters(read_training_set(conf.pairs), conf.held_out, seed)
    table = IMAGES.read(conf.images, ["image_id", "scene"])
    scene = dict(zip(table["image_id"].to_pylist(), table["scene"].to_pylist(), strict=True))
    found = Counter(scene.get(i) or "?" for i in val.image_ids.tolist())
    return [name for name, _ in found.most_common()], len(val.queries)


def main(conf: BenchConf) -> dict:
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    rows = []
    for seed in conf.seeds:
        out = Path(conf.work) / f"split_{seed}"
        train(
            TrainConf.from_flags(
                pairs=conf.pairs,
                images=conf.images,
                output=str(out),
                lr=conf.lr,
                epochs=conf.epochs,
                queries=conf.queries,
                workers=conf.workers,
                held_out=conf.held_out,
                seed=seed,
                name=f"split_{seed}",
            )
        )
        metrics = json.loads((out / "metrics.json").read_text())
        epochs, lw = metrics["epochs"], metrics["whitening"]
        best = next(e for e in epochs if e["best"])
        trained = max(epochs[1:], key=lambda e: e["val_map"])  # fine-tuning's best, kept or not
        scenes, queries = _held_out(conf, seed)
        rows.append(
            {
                "seed": seed,
                "scenes": scenes,
                "queries": queries,
                "epochs": epochs,
                "best_epoch": best["epoch"],
                "off_the_shelf": epochs[0]["val_map"],
                "fine_tuned": trained["val_map"],
                "fine_tuned_epoch": trained["epoch"],
                "lw": lw.get("val_map_lw"),
                "lw_kept": lw.get("kept", False),
            }
        )
    ray.shutdown()
    lines = [
        f"device: {platform.machine()} CPU, {os.cpu_count()} cores; {conf.workers} CPU workers; "
        f"lr {conf.lr:g}, {conf.epochs} epochs of {conf.queries} queries",
        "held-out mAP at 1024 px (positives: the query's 3D model; rest of its cluster junk)",
        f"{'split':<6}{'off the shelf':>14}{'fine-tuned':>11}{'kept epoch':>11}{'+ Lw':>8}  kept",
    ]
    for r in rows:
        epochs = r["epochs"]
        kept = ("fine-tuned" if r["best_epoch"] else "off the shelf") + (
            " + Lw" if r["lw_kept"] else ""
        )
        lines += [
            f"{r['seed']:<6}{r['off_the_shelf']:>14.4f}{r['fine_tuned']:>11.4f}"
            f"{r['best_epoch']:>11}{r['lw'] or float('nan'):>8.4f}  {kept}",
            f"      held out: {', '.join(r['scenes'])} ({r['queries']} queries)",
            "      by epoch: " + "  ".join(f"{e['epoch']}: {e['val_map']:.4f}" for e in epochs),
        ]
    print("\n".join(lines))
    write_results(conf.out, {"splits": rows, "lines": lines}, lines)
    return {"splits": rows}


if __name__ == "__main__":
    main(tyro.cli(BenchConf))
