"""The train stage (GeM mode) on Ray Train: the built-in landmarks' SfM pairs, CPU workers."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from pipeline.datasets.landmarks import write_scene_manifest
from pipeline.train import TrainConf
from pipeline.train import run as train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pairs(ray_session, tiny_collection: Path, tmp_path_factory) -> dict[str, str]:
    """ingest → group (scene column) → sfm → pairs of the tiny collection's 3 landmarks."""
    from pipeline.descriptors import write_descriptors
    from pipeline.group import GroupConf
    from pipeline.group import run as group
    from pipeline.ingest import IngestConf, read_images
    from pipeline.ingest import run as ingest
    from pipeline.pairs import PairsConf
    from pipeline.pairs import run as mine_pairs
    from pipeline.sfm import SfmConf
    from pipeline.sfm import run as sfm

    tmp = tmp_path_factory.mktemp("train")
    manifest = write_scene_manifest(tiny_collection, tmp / "photos.csv")
    run = str(tmp / "run")
    images = ingest(IngestConf(source=str(manifest), output=run))
    ids = read_images(images, ["image_id"], ok_only=True).column(0).to_pylist()
    write_descriptors(f"{run}/d", ids, np.eye(len(ids), dtype=np.float32),
                      network={"weights": "test"})  # fmt: skip
    group(GroupConf(images=images, descriptors=f"{run}/d", output=f"{run}/groups"))
    sfm(SfmConf(images=images, groups=f"{run}/groups", output=f"{run}/sfm",
                mapper="incremental"))  # fmt: skip
    mine_pairs(PairsConf(sfm=f"{run}/sfm", output=f"{run}/pairs"))
    return {"pairs": f"{run}/pairs", "images": images, "tmp": str(tmp)}


def _conf(pairs: dict[str, str], out: Path, **changes) -> TrainConf:
    base = TrainConf(pairs=pairs["pairs"], images=pairs["images"], output=str(out), epochs=2,
                     image_size=128, queries=12, nnum=1, held_out=0.3, lr=1e-5,
                     tuples_per_step=3, name="t")  # fmt: skip
    return replace(base, **changes)


def _epochs(best: str) -> list[dict]:
    return json.loads(Path(best, "metrics.json").read_text())["epochs"]


def test_training_checkpoints_the_best_epoch_and_resumes(pairs, tmp_path) -> None:
    from model.networks import load_network

    best = train(_conf(pairs, tmp_path))
    assert {p.name for p in Path(best).iterdir()} >= {"model.pt", "meta.json", "metrics.json",
                                                       "curves.png"}  # fmt: skip
    epochs = _epochs(best)
    assert [e["epoch"] for e in epochs] == [0, 1, 2]
    assert epochs[0]["val_map"] is not None and epochs[0]["loss"] is None  # off-the-shelf
    assert all(np.isfinite(e["loss"]) and e["loss"] > 0 for e in epochs[1:])
    per_epoch = epochs[1]["steps"]
    assert per_epoch > 0 and epochs[2]["steps"] == 2 * per_epoch
    assert sum(e["best"] for e in epochs) == 1
    marked = max(epochs, key=lambda e: (e["val_map"], -e["epoch"]))
    assert next(e for e in epochs if e["best"]) == marked
    assert load_network(best).meta.backbone == "efficientnet_lite0"  # extract/evaluate take it
    # the same name and storage: resumes after epoch 2 instead of starting again
    again = _epochs(train(_conf(pairs, tmp_path, epochs=3)))
    assert again[:3] == [{**e, "best": again[i]["best"]} for i, e in enumerate(epochs)]
    assert again[3]["steps"] == 3 * per_epoch


def test_a_killed_worker_resumes_from_the_last_checkpoint(pairs, tmp_path) -> None:
    """SIGKILL to rank 1 (its pid from its own log line) once the first checkpoint exists: the
    run restarts its workers from that checkpoint and still ends with every epoch's steps."""
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    conf = _conf(pairs, tmp_path, workers=2, epochs=2, name="killed", max_failures=2)
    storage_dir = tmp_path / "ray" / "killed"
    killed: list[int] = []

    def kill_rank_one() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not killed:
            if list(storage_dir.glob("checkpoint_*")):
                for log in logs.glob("worker-*.out"):
                    text = log.read_text(errors="replace")
                    for pid in re.findall(r"cirray-train killed rank 1 of 2 pid (\d+)", text):
                        try:
                            os.kill(int(pid), signal.SIGKILL)
                        except ProcessLookupError:
                            continue
                        killed.append(int(pid))
                        return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_rank_one, daemon=True)
    killer.start()
    epochs = _epochs(train(conf))
    killer.join(timeout=5)
    assert killed, "rank 1 was never seen running"
    started = set()
    for log in logs.glob("worker-*.out"):
        started |= set(
            re.findall(
                r"cirray-train killed rank 1 of 2 pid (\d+)", log.read_text(errors="replace")
            )
        )
    assert len(started) >= 2, f"no new rank 1 after the kill: {started}"  # the group restarted
    assert [e["epoch"] for e in epochs] == [0, 1, 2]
    per_epoch = epochs[1]["steps"]
    assert per_epoch > 0 and epochs[2]["steps"] == 2 * per_epoch
