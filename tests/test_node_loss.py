"""A worker node dies during extract and during sfm: the stage completes, nothing lost or twice.

Both run in ``tests/node_loss.py``, a process of its own, on one Ray ``Cluster`` (a head
without CPUs, three 1-CPU worker nodes, one lost in each stage). Their inputs lie on this
machine, which every node of that cluster shares (``CIRRAY_SHARED_STORAGE`` says so).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest

from model import tables
from model.datasets.landmarks import write_scene_manifest
from model.descriptors import read_descriptors, write_descriptors
from model.tables import IMAGES, SFM_OUTPUT
from pipeline.group import GroupConf
from pipeline.group import run as group
from pipeline.ingest import IngestConf
from pipeline.ingest import run as ingest
from tests.helpers import REPO
from tests.multinode import local_cluster_env

pytestmark = [pytest.mark.slow, pytest.mark.side_lane]


@pytest.fixture(scope="module")
def inputs(ray_session, tiny_collection: Path, tmp_path_factory) -> Path:
    """The tiny collection's landmark photos ingested, grouped by their scene column."""
    work = tmp_path_factory.mktemp("node-loss")
    manifest = write_scene_manifest(tiny_collection, work / "photos.csv")
    images = ingest(IngestConf(source=str(manifest), output=str(work / "run")))
    ids = IMAGES.read(images, ["image_id"], filter=pc.field("error").is_null())["image_id"]
    ids = ids.to_pylist()
    descriptors = write_descriptors(
        str(work / "d"), ids, np.eye(len(ids), dtype=np.float32), network={"weights": "scene"}
    )
    group(GroupConf(images=images, descriptors=descriptors, output=str(work / "groups")))
    return work


@pytest.fixture(scope="module")
def losses(inputs: Path) -> dict[str, dict]:
    """Each stage's report: the node killed while it ran, and its output."""
    env = local_cluster_env(CIRRAY_SHARED_STORAGE=str(inputs))
    env.pop("RAY_ADDRESS", None)
    stages = ["extract", "sfm"]
    done = subprocess.run(
        [sys.executable, "-m", "tests.node_loss", str(inputs), *stages],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    reports = {s: json.loads((inputs / f"{s}-report.json").read_text()) for s in stages}
    for stage, report in reports.items():
        assert report["killed"], f"no node was killed while {stage} ran:\n" + done.stderr[-3000:]
    return reports


def test_extract_completes_when_a_node_dies(inputs: Path, losses: dict[str, dict]) -> None:
    report = losses["extract"]
    usable = IMAGES.read(str(inputs / "run"), ["image_id"], filter=pc.field("error").is_null())
    described = read_descriptors(report["output"])
    ids = described.image_ids.tolist()
    assert len(ids) == len(set(ids)) == len(set(usable["image_id"].to_pylist()))  # once each
    assert np.isfinite(described.vectors).all()


def test_sfm_completes_when_a_node_dies(losses: dict[str, dict]) -> None:
    report = losses["sfm"]
    details = SFM_OUTPUT.manifest(report["output"]).details
    assert details["groups"]["ok"] == 3 and details["groups"]["failed"] == 0
    rows = tables.SFM_IMAGES.read(report["output"], ["image_id", "registered"])
    ids = rows["image_id"].to_pylist()
    assert len(ids) == len(set(ids))  # nothing twice
    assert sum(rows["registered"].to_pylist()) >= 0.8 * len(ids)  # nothing lost
