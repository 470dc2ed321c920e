"""The whole chain on an autoscaling multi-node Ray cluster started on this machine.

The cluster is shaped like ``ray-cluster.yaml``: a head that takes no work (``CPU: 0``) and two
worker types that start at zero nodes, a "cpu" type and a "gpu" type carrying a custom
resource, ``accelerator``, that stands for the GPU this machine does not have (the describing
actors ask for it, and describe on the CPU). Ray's ``fake_multinode`` autoscaler launches
worker nodes, each a raylet of its own on this machine, when the chain's tasks and actors ask
for them.

The chain runs as users run it there, one ``ray job submit`` of ``pipeline.run --serve`` into
the loopback S3 server: ingest → extract → group → sfm → pairs → train (2 workers) → extract
with the checkpoint → index → the run report, then the search service, queried over HTTP. The
test asserts that the autoscaler launched both worker types for the chain's demand, that none
of the chain's tasks, actors or replicas ran on the head, that the descriptors equal those the
test's own process makes of the same photos with the run's network, and that the index finds
what an exact search of them finds.
"""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import numpy as np
import pytest
import yaml

from cluster.client import SearchClient
from cluster.index_store import read_manifest, search
from model import storage
from model.datasets.landmarks import load_cameras
from model.describer import Describer, NetworkSettings
from model.descriptors import read_descriptors
from model.tables import PAIRS, SFM_OUTPUT
from pipeline.extract import decode_batch
from pipeline.run import STAGES
from tests.helpers import usable_images
from tests.multinode import AutoscalingHead, free_port, submit

pytestmark = pytest.mark.slow

WORKER_TYPES = {
    "cpu": {"resources": {"CPU": 2}, "max_workers": 2},
    "gpu": {"resources": {"CPU": 1, "accelerator": 1}, "max_workers": 1},
}
DESCRIBE_ON_GPU_NODES = {
    "gpus_per_actor": 0,
    "cpus_per_actor": 1,
    "actor_resources": ["accelerator=1"],
}
"""The describing actors ask for the resource that stands for a GPU (and describe on the CPU)."""

RAY_OWN_ACTORS = frozenset(
    {
        "JobSupervisor",  # jobs
        "ServeController",  # Serve's control plane
        "ProxyActor",
        "ActorLocationTracker",  # Ray Data's coordinators
        "DatasetManager",
        "_AutoscalingCoordinatorActor",
        "AutoscalingRequester",
        "_StatsActor",
        "SplitCoordinator",
        "TrainController",  # Ray Train's controller
        "TrainStateActor",
        "SynchronizationActor",
        "PlacementGroupCleaner",
        "PreemptionWatcher",
    }
)
"""Ray's own actors, which reserve no CPU and stay beside the driver on the head by design."""


@pytest.fixture(scope="module")
def autoscaling_head(s3_server: str, tmp_path_factory) -> AutoscalingHead:
    head = AutoscalingHead(tmp_path_factory.mktemp("multinode"), WORKER_TYPES)
    try:
        yield head
    finally:
        head.stop()


def _upload_scenes(collection: Path, bucket: str, per_scene: int) -> list[str]:
    """The collection's landmark photos into ``s3://bucket/photos/<scene>/`` (a folder per
    scene, as ingest reads scenes), ``per_scene`` of each; their keys."""
    s3 = boto3.client("s3")
    keys: list[str] = []
    taken: dict[str, int] = {}
    for camera in load_cameras(collection).to_pylist():
        scene = f"lm{camera['landmark']}"
        if camera["landmark"] < 0 or taken.get(scene, 0) >= per_scene:
            continue
        taken[scene] = taken.get(scene, 0) + 1
        key = f"photos/{scene}/{camera['name']}.jpg"
        s3.upload_file(str(collection / "jpg" / f"{camera['name']}.jpg"), bucket, key)
        keys.append(key)
    return keys


def test_the_chain_scales_from_zero_and_never_runs_on_the_head(
    autoscaling_head: AutoscalingHead, ray_session, s3_bucket: str, tiny_collection: Path, tmp_path
) -> None:
    head = autoscaling_head
    assert [n for n in head.nodes() if n["alive"] and not n["head"]] == []  # scaled to zero
    photos = _upload_scenes(tiny_collection, s3_bucket, per_scene=10)
    run = f"s3://{s3_bucket}/run"
    images, trained = f"{run}/images.parquet", f"{run}/descriptors-trained"
    port = free_port()
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "extract": {"max_size": 128, **DESCRIBE_ON_GPU_NODES},
                "sfm": {"mapper": "incremental"},
                "train": {
                    "workers": 2,
                    "mining_cpus": 1,
                    "epochs": 1,
                    "image_size": 128,
                    "val_size": 128,
                    "queries": 12,
                    "nnum": 1,
                    "held_out": 0.3,
                    "lr": 1e-5,
                    "tuples_per_step": 2,
                    "whiten": False,
                    "whiten_shrinkage": 0.0,
                    "whiten_dim": 1280,
                },
                "index": {"shards": 2},
                "serve": {"host": "127.0.0.1", "port": port, "detach": True},
            }
        )
    )
    # the whole chain and the search service as users run it there: one job, one command
    submit(
        head.address,
        head.env,
        tmp_path,
        f"pipeline.run --source s3://{s3_bucket}/photos --output {run} --config {config} --serve",
    )
    assert SFM_OUTPUT.manifest(f"{run}/sfm").details["groups"]["ok"] == 3
    assert PAIRS.read(f"{run}/pairs").num_rows > 0
    summary = json.loads(storage.read_text(f"{run}/run.json"))
    assert tuple(summary["stages"]) == STAGES and summary["report"] == f"{run}/report.html"
    assert storage.exists(f"{run}/report.html")
    client = SearchClient(f"http://127.0.0.1:{port}", retries=10, backoff=0.5)
    assert client.health()["count"] == len(photos)
    key = photos[4]
    tmp_photo = tmp_path / Path(key).name
    boto3.client("s3").download_file(s3_bucket, key, str(tmp_photo))
    answer = client.search(tmp_photo, k=3)
    assert answer.results[0].uri.endswith(Path(key).name) and answer.results[0].score > 0.999

    # The autoscaler started both worker types, for the chain's tasks and actors.
    launched = head.autoscaler_log()
    assert "Launching 1 nodes, type cpu" in launched and "Launching 1 nodes, type gpu" in launched
    nodes = head.nodes()
    (head_id,) = [n["node_id"] for n in nodes if n["head"]]
    assert any(n["resources"].get("accelerator") for n in nodes)

    # Nothing of the chain's ran on the head: no task, and no actor but Ray's own (an actor's
    # method calls run where it lives).
    on_head = {
        t["name"]
        for t in head.state("tasks")
        if t.get("node_id") == head_id and t.get("type") in ("NORMAL_TASK", "ACTOR_CREATION_TASK")
    }
    on_head |= {a["class_name"] for a in head.state("actors") if a.get("node_id") == head_id}
    assert not on_head - RAY_OWN_ACTORS - {f"{name}.__init__" for name in RAY_OWN_ACTORS}, (
        ", ".join(sorted(on_head))
    )

    # This process, describing the same photos with the run's network, gives the same
    # descriptors, and the cluster's index finds what an exact search of them finds.
    local_ids, local_vectors = _described_here(images, f"{run}/train", max_size=128)
    cluster_desc = read_descriptors(trained)
    order = np.argsort(cluster_desc.image_ids)
    assert np.array_equal(cluster_desc.image_ids[order], local_ids)
    np.testing.assert_allclose(cluster_desc.vectors[order], local_vectors, atol=1e-5)
    manifest = read_manifest(f"{run}/index")
    assert manifest["count"] == len(photos) and len(manifest["shards"]) == 2
    queries = local_vectors[:8]
    found = search(f"{run}/index", queries, k=5)
    exact = np.argsort(-(queries @ local_vectors.T), axis=1, kind="stable")[:, :5]
    assert np.array_equal(found.image_ids, local_ids[exact])


def _described_here(images: str, weights: str, *, max_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, vectors)`` of the usable photos of an images output (sorted by id), decoded and
    described in this process by the extract stage's own functions, with no Ray."""
    table = usable_images(images, ["image_id", "uri", "bytes", "error"])
    decoded = decode_batch(table, max_size=max_size)
    describer = Describer(NetworkSettings(weights=weights, max_size=max_size))
    described = describer(decoded)
    ids = np.asarray(described["image_id"].to_pylist())
    vectors = described["vector"].combine_chunks().flatten().to_numpy().reshape(len(ids), -1)
    order = np.argsort(ids)
    return ids[order], vectors[order]
