"""A worker node dies during extract and during sfm: the stage completes, nothing lost or twice.

Each run is ``tests/node_loss.py`` in a process of its own, on Ray's ``Cluster`` (a head without
CPUs, two 1-CPU worker nodes, a third joining after the loss). Its inputs lie on this machine,
which every node of that cluster shares (``CIRRAY_SHARED_STORAGE`` says so).
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

pytestmark = pytest.mark.slow


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


def _run_losing_a_node(stage: str, work: Path) -> dict:
    env = local_cluster_env(CIRRAY_SHARED_STORAGE=str(work))
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, "-m", "tests.node_loss", stage, str(work)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    report = json.loads((work / f"{stage}-report.json").read_text())
    assert report["killed"], "no node was killed while the stage ran:\n" + done.stderr[-3000:]
    return report


def test_extract_completes_when_a_node_dies(inputs: Path) -> None:
    report = _run_losing_a_node("extract", inputs)
    usable = IMAGES.read(str(inputs / "run"), ["image_id"], filter=pc.field("error").is_null())
    described = read_descriptors(report["output"])
    ids = described.image_ids.tolist()
    assert len(ids) == len(set(ids)) == len(set(usable["image_id"].to_pylist()))  # once each
    assert np.isfinite(described.vectors).all()


def test_sfm_completes_when_a_node_dies(inputs: Path) -> None:
    report = _run_losing_a_node("sfm", inputs)
    details = SFM_OUTPUT.manifest(report["output"]).details
    assert details["groups"]["ok"] == 3 and details["groups"]["failed"] == 0
    rows = tables.SFM_IMAGES.read(report["output"], ["image_id", "registered"])
    ids = rows["image_id"].to_pylist()
    assert len(ids) == len(set(ids))  # nothing twice
    assert sum(rows["registered"].to_pylist()) >= 0.8 * len(ids)  # nothing lost
