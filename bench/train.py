"""Training throughput: tuples per second per worker, and the scaling from 1 to 2 workers.

``python -m bench.train``: the built-in ``tiny`` collection is reconstructed (ingest, the scene
column as groups, incremental SfM, pairs), then ``pipeline.train`` runs 2 epochs with 1 and
with 2 CPU workers on the same pairs, same seeds (``--image-size`` 362, 1 negative: the
collection has 3 landmarks, one held out). The figure is the second epoch's (the first pays
for the workers' start-up): the run's tuples per second (one global batch a step, shared by
the workers), per worker, and its share of linear scaling. Tuples per second count the whole
epoch (describing the pool, mining, training, and validation at the training size, which
shares the pool's description); the steps-only figure counts the optimizer steps alone (DDP's
own scaling). Same command, one after the other.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import ray
import tyro

from bench import write_results
from model.datasets.landmarks import CONFS, generate, write_scene_manifest
from model.descriptors import write_descriptors
from model.tables import IMAGES
from pipeline.group import GroupConf
from pipeline.group import run as group
from pipeline.ingest import IngestConf
from pipeline.ingest import run as ingest
from pipeline.pairs import PairsConf
from pipeline.pairs import run as mine_pairs
from pipeline.sfm import SfmConf
from pipeline.sfm import run as sfm
from pipeline.train import TrainConf
from pipeline.train import run as train


@dataclass(frozen=True)
class BenchConf:
    image_size: int = 362
    queries: int = 40
    epochs: int = 2
    out: str | None = "bench/results/train_cpu.json"


def scene_pairs(collection: Path, work: Path) -> tuple[str, str]:
    """``(pairs, images)`` of a local built-in collection's landmark photos under ``work``:
    ingest, the scene column as groups, incremental SfM, pairs (what the train tests and this
    benchmark train on)."""
    manifest = write_scene_manifest(collection, work / "photos.csv")
    run = str(work / "run")
    images = ingest(IngestConf(source=str(manifest), output=run))
    ids = IMAGES.read(images, ["image_id"], filter=pc.field("error").is_null())["image_id"]
    ids = ids.to_pylist()
    if not ids:
        first = IMAGES.read(images, ["uri", "error"]).slice(0, 1).to_pylist()
        raise ValueError(f"no photo of {manifest} could be ingested; the first: {first}")
    descriptors = write_descriptors(
        f"{run}/d", ids, np.eye(len(ids), dtype=np.float32), network={"weights": "scene column"}
    )
    groups = group(GroupConf(images=images, descriptors=descriptors, output=f"{run}/groups"))
    reconstructed = sfm(
        SfmConf(images=images, groups=groups, output=f"{run}/sfm", mapper="incremental")
    )
    return mine_pairs(PairsConf(sfm=reconstructed, output=f"{run}/pairs")), images


def main(conf: BenchConf) -> dict:
    work = Path(tempfile.mkdtemp(prefix="cirray-bench-train-"))
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    pairs, images = scene_pairs(generate(CONFS["tiny"], work / "collections"), work)
    per_worker, steps_per_worker = {}, {}
    for workers in (1, 2):
        best = train(
            TrainConf.from_flags(
                pairs=pairs,
                images=images,
                output=str(work / f"train{workers}"),
                workers=workers,
                epochs=conf.epochs,
                image_size=conf.image_size,
                queries=conf.queries,
                nnum=1,
                held_out=0.3,
                val_size=conf.image_size,
                whiten=False,
                name=f"bench-{workers}",
            )
        )
        epochs = json.loads(Path(best, "metrics.json").read_text())["epochs"]
        last = epochs[-1]
        per_worker[workers] = last["tuples_per_s"] / workers  # the run's: all workers
        tuples = last["tuples_per_s"] * last["seconds"]
        steps_per_worker[workers] = tuples / last["steps_seconds"] / workers
    ray.shutdown()
    share = per_worker[2] / per_worker[1]  # 2 workers' total over twice one worker's
    steps_share = steps_per_worker[2] / steps_per_worker[1]
    lines = [
        f"device: {platform.machine()} CPU, {os.cpu_count()} cores; built-in tiny collection's SfM "
        f"pairs, {conf.image_size} px, 1 negative, epoch {conf.epochs} of {conf.epochs}",
        "tuples/s per worker    whole epoch   optimizer steps only",
        f"1 worker               {per_worker[1]:11.2f}   {steps_per_worker[1]:20.2f}",
        f"2 workers              {per_worker[2]:11.2f}   {steps_per_worker[2]:20.2f}",
        f"share of linear        {share:11.2f}   {steps_share:20.2f}",
    ]
    print("\n".join(lines))
    payload = {
        "tuples_per_s_per_worker": per_worker,
        "share_of_linear": share,
        "steps_tuples_per_s_per_worker": steps_per_worker,
        "steps_share_of_linear": steps_share,
        "lines": lines,
    }
    write_results(conf.out, payload, lines)
    return payload


if __name__ == "__main__":
    main(tyro.cli(BenchConf))
