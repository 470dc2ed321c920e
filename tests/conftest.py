"""Shared fixtures: a loopback S3 server, the shared real photos and their descriptors."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
import ray
from ray import serve

from model.datasets.folders import load_folder
from model.datasets.landmarks import CONFS, generate
from model.descriptors import read_descriptors
from model.tables import IMAGES
from pipeline.extract import ExtractConf
from pipeline.extract import run as extract
from pipeline.features import FeaturesConf
from pipeline.features import run as features
from pipeline.index import IndexConf
from pipeline.index import run as index
from pipeline.ingest import IngestConf
from pipeline.ingest import run as ingest

REPO = Path(__file__).resolve().parent.parent
REAL_MAX_SIZE = 384
REAL_LOCAL = {"local_max_size": 512, "local_max_features": 512}
"""The real run's local features: small, so that they cost seconds."""
"""The real run's photos' longer side: the real-photo tests' figures hold there as at 512 px."""

# Ray Train's controller looks at its workers every 2 s by default: each training run then
# waits up to that long to see its workers finish or one of them die. The tests' runs last
# seconds, so it looks every 0.2 s. Set before any Ray starts: the session's Ray, the clusters
# tests start themselves and the jobs submitted to them all inherit it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
# Each Ray's log monitor lists its log folder ten times a second while it holds fewer than
# 1,000 files; the tests' clusters start hundreds of short-lived workers, and that listing
# alone took about 5 % of a core each. Listed every 0.5 s instead (Ray's own setting for
# folders of many files); a new worker's output reaches a driver that much later.
os.environ.setdefault("RAY_LOG_MONITOR_MANY_FILES_THRESHOLD", "0")
# Ray Train starts a preemption watcher (an actor, a process of its own) with every worker
# group, for the node drains of spot clusters; the tests' nodes are never drained, and each
# watcher cost about 2 CPU-seconds to start.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """moto's standalone S3 server on 127.0.0.1, with the AWS settings pointing at it.

    Yields the endpoint URL. The server is a separate process, as a real one would be, so
    Ray workers and subprocesses reach it too.
    """
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail("moto's S3 server did not start")
            time.sleep(0.2)
    settings = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
    }
    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    try:
        yield endpoint
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        proc.terminate()
        proc.wait(timeout=10)


def new_bucket(s3_server: str) -> str:
    """A fresh, empty bucket on the loopback S3 server; its name."""
    name = f"cirray-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


@pytest.fixture()
def s3_bucket(s3_server: str) -> str:
    """A fresh, empty bucket on the loopback S3 server; yields its name."""
    return new_bucket(s3_server)


@pytest.fixture(scope="session")
def photos_dir() -> Path:
    """The shared real photos (a folder per scene); the test is skipped where they are absent."""
    root = Path(os.environ.get("CIRRAY_PHOTOS", REPO.parent / "shared" / "data" / "photos"))
    if not root.is_dir() or not any(root.glob("*/*.jpg")):
        pytest.skip(f"real photos not found at {root}; set CIRRAY_PHOTOS to a folder per scene")
    return root


@pytest.fixture(scope="session")
def real_photo_set(photos_dir: Path):
    """The shared photos as a retrieval set: every photo a query, its scene's others positive."""
    return load_folder(photos_dir)


@pytest.fixture(scope="session")
def lite0_real_descriptors(real_photo_set, real_run: str):
    """ImageNet EfficientNet-Lite0 + GeM (p = 3) descriptors of the shared photos at 384 px, in
    the photo set's order: the real run's own extract output (described once per session)."""
    images = IMAGES.read(f"{real_run}/images.parquet", ["uri", "image_id"])
    photo = {  # by scene/name: the run read the photos from their copy on S3
        "/".join(uri.split("/")[-2:]): image
        for uri, image in zip(
            images["uri"].to_pylist(), images["image_id"].to_pylist(), strict=True
        )
    }
    desc = read_descriptors(f"{real_run}/descriptors")
    row = {image: k for k, image in enumerate(desc.image_ids.tolist())}
    return desc.vectors[[row[photo[f"{p.parent.name}/{p.name}"]] for p in real_photo_set.db_paths]]


@pytest.fixture(scope="session")
def tiny_collection(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in landmark collection's ``tiny`` preset, generated once per session.

    It is in the revisited layout: ``<root>/landmarks-tiny/{jpg/, gnd_landmarks-tiny.pkl}``.
    Tests that change it copy it first.
    """
    return generate(CONFS["tiny"], tmp_path_factory.mktemp("collections"))


@pytest.fixture(scope="session")
def ray_session(s3_server: str) -> Iterator[None]:
    """One local Ray for the whole test session: 2 CPUs, no dashboard, a bounded object store.

    It starts after the loopback S3 server, so its workers inherit the AWS settings that point
    at it. Tests that need Ray take this fixture; none starts or stops Ray itself.
    """
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=256 * 2**20,
        configure_logging=False,
        log_to_driver=False,
        # idle workers are kept (Ray keeps num_cpus of them and kills the rest after a second):
        # the next stage's tasks then find torch and the stages' modules already imported
        _system_config={
            "num_workers_soft_limit": 6,
            "idle_worker_killing_time_threshold_ms": 600_000,
        },
    )
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def real_run(ray_session, s3_server: str, real_photo_set) -> str:
    """The shared photos as a user runs them on a cluster: copied to a bucket of the loopback
    S3 server, then ingest → extract (Lite0 + GeM, 384 px) and features (SIFT) → index (2
    shards, the features pinned) into that bucket, each stage given the one before's return
    value; once per session. Returns the run folder's URI (images.parquet, descriptors, local,
    index)."""
    bucket = new_bucket(s3_server)
    s3 = boto3.client("s3", endpoint_url=s3_server)
    for path in map(Path, real_photo_set.db_paths):
        s3.upload_file(str(path), bucket, f"photos/{path.parent.name}/{path.name}")
    run = f"s3://{bucket}/run"
    images = ingest(IngestConf(source=f"s3://{bucket}/photos", output=run))
    descriptors = extract(
        ExtractConf.from_flags(images=images, output=f"{run}/descriptors", max_size=REAL_MAX_SIZE)
    )
    local = features(FeaturesConf.from_flags(images=images, output=f"{run}/local", **REAL_LOCAL))
    index(IndexConf(descriptors=descriptors, output=f"{run}/index", shards=2, local_features=local))
    return run


@pytest.fixture(scope="session")
def serve_url(ray_session) -> Iterator[str]:
    """Ray Serve on the session's Ray, its HTTP proxy on a free loopback port; yields the URL.

    Tests deploy their app under ``pipeline.serve.APP_NAME`` and delete it when done; the
    replicas reserve no CPU, so the Ray Data tests after them still get both cores.
    """
    port = _free_port()
    from pipeline.serve import start_serve  # Serve's proxy settings as the service has them

    start_serve("127.0.0.1", port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
