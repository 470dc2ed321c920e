"""``make demo``'s job on an autoscaling multi-node Ray cluster started on this machine, then
the same run folder as a user keeps using it.

The cluster is shaped like ``ray-cluster.yaml``: a head that takes no work (``CPU: 0``) and two
worker types that start at zero nodes, a "cpu" type and a "gpu" type carrying a custom
resource, ``accelerator``, that stands for the GPU this machine does not have (the describing
actors ask for it, and describe on the CPU). Ray's ``fake_multinode`` autoscaler launches
worker nodes, each a raylet of its own on this machine, when the chain's tasks and actors ask
for them.

The demo runs as users run it there, one ``ray job submit`` of ``pipeline.demo`` into the
loopback S3 server: the built-in collection written there, then ingest → extract → group → sfm
→ pairs → train (2 workers) → extract with the checkpoint → index → the run report, the search
service, and the collection's unseen query photos sent to it over HTTP. The test asserts what
the demo printed and wrote, that the autoscaler launched both worker types for the chain's
demand, that none of the chain's tasks, actors or replicas ran on the head, that the
descriptors equal those the test's own process makes of the same photos with the run's
network, and that the index finds what an exact search of them finds. Then, from this process:
the same run again finishes at once, photos added are described and indexed alone, and the run
report renders in Chromium.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from cluster.client import SearchClient
from cluster.index_store import read_manifest, search
from model import storage, tables
from model.datasets.landmarks import load_cameras
from model.describer import Describer, NetworkSettings
from model.descriptors import read_descriptors
from model.tables import PAIRS, SFM_OUTPUT
from pipeline.extract import decode_batch
from pipeline.run import LAYOUT, STAGES, RunConf, run
from tests.helpers import SMALL_RUN, check_page, chromium, usable_images
from tests.multinode import AutoscalingHead, free_port, submit

pytestmark = [pytest.mark.slow, pytest.mark.side_lane]

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


CLUSTER_RUN = {
    **SMALL_RUN,
    "train": {**SMALL_RUN["train"], "workers": 2, "mining_cpus": 1, "lr": 1e-5},
}
"""The run's settings (as the tests' ``SMALL_RUN``, with two training workers)."""


def test_the_demo_scales_from_zero_never_runs_on_the_head_and_grows(
    autoscaling_head: AutoscalingHead, ray_session, s3_bucket: str, tmp_path, caplog
) -> None:
    head = autoscaling_head
    assert [n for n in head.nodes() if n["alive"] and not n["head"]] == []  # scaled to zero
    demo, port = f"s3://{s3_bucket}/demo", free_port()
    run_folder = f"{demo}/run"
    images, trained = f"{run_folder}/images.parquet", f"{run_folder}/descriptors-trained"
    here = tmp_path / "run.yaml"  # this process's runs: on its own Ray, no "accelerator"
    here.write_text(yaml.safe_dump(CLUSTER_RUN))
    config = tmp_path / "cluster.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                **CLUSTER_RUN,
                "extract": {**CLUSTER_RUN["extract"], **DESCRIBE_ON_GPU_NODES},
                "serve": {"host": "127.0.0.1", "port": port, "detach": True},
            }
        )
    )
    # make demo's job as users run it there: one job, one command
    printed = submit(
        head.address,
        head.env,
        tmp_path,
        f"pipeline.demo --collection tiny --no-stay --output {demo} --config {config}",
    )
    correct = re.search(r"^(\d+) of (\d+) results show the query's landmark", printed, re.M)
    assert correct, printed[-2000:]
    assert int(correct[2]) == 6 * 5 and int(correct[1]) >= 24  # 6 unseen queries, top 5
    verified = re.search(r"re-ranked by spatial verification \(rerank=100\): (\d+) of 30", printed)
    assert verified and int(verified[1]) >= 24, printed[-2000:]
    assert f"run report:  {run_folder}/report.html" in printed
    assert f"search page: http://127.0.0.1:{port}/" in printed
    names = {f.removeprefix(f"{run_folder}/").split("/")[0] for f in storage.list_files(run_folder)}
    assert names == {*LAYOUT.values(), tables.RUN_SUMMARY, "report.html", "report"}
    summary = json.loads(storage.read_text(f"{run_folder}/{tables.RUN_SUMMARY}"))
    assert tuple(summary["stages"]) == STAGES  # every stage, in the chain's order
    assert summary["search"] == f"http://127.0.0.1:{port}"
    assert summary["report"] == f"{run_folder}/report.html"
    first = summary["stages"]["ingest"]["ingested"]
    assert SFM_OUTPUT.manifest(f"{run_folder}/sfm").details["groups"]["ok"] == 3  # a landmark each
    assert PAIRS.read(f"{run_folder}/pairs").num_rows > 0
    network = tables.DESCRIPTORS_OUTPUT.manifest(trained).inputs["network"]
    assert network  # described with the run's own fine-tuned network

    # the service the job left running answers over HTTP
    client = SearchClient(f"http://127.0.0.1:{port}", retries=10, backoff=0.5)
    assert client.health()["count"] == first
    photo = csv_rows(summary["source"])[4][0]
    answer = client.search(storage.read_bytes(photo), k=3)
    assert answer.results[0].uri == photo and answer.results[0].score > 0.999

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
    local_ids, local_vectors = _described_here(images, f"{run_folder}/train", max_size=128)
    cluster_desc = read_descriptors(trained)
    order = np.argsort(cluster_desc.image_ids)
    assert np.array_equal(cluster_desc.image_ids[order], local_ids)
    np.testing.assert_allclose(cluster_desc.vectors[order], local_vectors, atol=1e-5)
    manifest = read_manifest(f"{run_folder}/index")
    assert manifest["count"] == first and len(manifest["shards"]) == 2
    queries = local_vectors[:8]
    found = search(f"{run_folder}/index", queries, k=5)
    exact = np.argsort(-(queries @ local_vectors.T), axis=1, kind="stable")[:, :5]
    assert np.array_equal(found.image_ids, local_ids[exact])

    # the same run again, from here: every stage finds its output complete and skips
    conf = RunConf(
        source=summary["source"], output=run_folder, config=str(here), local_features=True
    )
    caplog.set_level(logging.INFO)
    caplog.clear()
    run(conf)
    skipped = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(skipped) >= len(LAYOUT), skipped
    again = json.loads(storage.read_text(f"{run_folder}/{tables.RUN_SUMMARY}"))["stages"]
    assert all(done["reused"] for done in again.values())  # each as the run that made it
    assert [d["seconds"] for d in again.values()] == [
        d["seconds"] for d in summary["stages"].values()
    ]

    # photos added (the collection's query photos): the network is kept, and only the new
    # photos are described and indexed, into a new index version
    added = _append_query_photos(summary["source"], f"{demo}/collection/landmarks-tiny")
    run(conf)
    after = json.loads(storage.read_text(f"{run_folder}/{tables.RUN_SUMMARY}"))["stages"]
    assert after["train"]["skipped"].startswith("photos changed since the network")
    assert after["ingest"]["ingested"] == first + added
    assert after["extract-trained"]["described"] == added
    assert after["extract-trained"]["count"] == first + added
    latest = read_manifest(f"{run_folder}/index")
    assert (latest["version"], latest["added"], latest["count"]) == (2, added, first + added)
    assert tables.DESCRIPTORS_OUTPUT.manifest(trained).inputs["network"] == network

    # a part of the chain: the index alone, from the descriptors the run left
    index_only = RunConf(source=summary["source"], output=run_folder, from_stage="index")
    assert run(index_only) == f"{run_folder}/index"
    _check_report(run_folder, tmp_path / "report", models=summary["stages"]["sfm"]["models"])


def csv_rows(uri: str) -> list[list[str]]:
    """An ingest manifest's rows, its header left out."""
    return list(csv.reader(io.StringIO(storage.read_text(uri))))[1:]


def _append_query_photos(manifest: str, dataset: str) -> int:
    """Add the collection's query photos to the ingest manifest; returns how many."""
    rows = [
        f"{storage.join(dataset, 'jpg', cam['name'] + '.jpg')},lm{cam['landmark']}\n"
        for cam in load_cameras(dataset).to_pylist()
        if cam["role"] == "query"
    ]
    storage.write_text(manifest, storage.read_text(manifest) + "".join(rows))
    return len(rows)


def _check_report(run_folder: str, local: Path, *, models: int) -> None:
    """The run report as a person sees it, from a copy of its files: every section, every
    picture loaded, no errors."""
    for uri in [f"{run_folder}/report.html", *storage.list_files(f"{run_folder}/report")]:
        copy = local / uri.removeprefix(f"{run_folder}/")
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_bytes(storage.read_bytes(uri))
    page = (local / "report.html").read_text()
    for heading in ("Stages", "Photos", "Groups", "3D models", "Training pairs", "Training"):
        assert f"<h2>{heading}</h2>" in page
    pictured = sorted((local / "report").glob("model-*.png"))
    assert len(pictured) == min(models, 12)
    assert all(Image.open(p).size == (256, 256) for p in pictured)  # 3.2 in at 80 dpi
    if chromium() is None:
        pytest.skip("Debian chromium not installed (.ci/run installs it): page not rendered")
    seen = check_page((local / "report.html").as_uri())
    assert not seen.errors and not seen.broken_images, (seen.errors, seen.broken_images)
    assert seen.images > 30 and "Example queries" in seen.text


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
