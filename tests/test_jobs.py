"""The stages as users run them on a cluster: `ray job submit` to a head started on 127.0.0.1.

The head is a real `ray start --head` (token authentication on, as Ray recommends), a process
of this test's own, stopped by its own process group; the session's local Ray is untouched.
Ingest, extract and index run as jobs against the loopback S3 server, then group, sfm and pairs,
then the search service (detached: it returns once the app is up) that answers over HTTP.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from cluster.client import SearchClient
from cluster.index_store import read_manifest
from model.tables import PAIRS, SFM_OUTPUT
from tests.conftest import REPO

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(s3_server: str, tmp_path_factory) -> Iterator[tuple[str, dict[str, str]]]:
    """A Ray head on 127.0.0.1 with its job API; yields its address and the client's env.

    Every port is its own (the session's local Ray holds the default agent ports).
    """
    port, dashboard = _free_port(), _free_port()
    own_ports = [
        f"--{name}={_free_port()}"
        for name in (
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "metrics-export-port",
            "runtime-env-agent-port",
            "ray-client-server-port",
            "node-manager-port",
            "object-manager-port",
        )
    ]
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",  # jobs run this python
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
    }
    temp_dir = tmp_path_factory.mktemp("ray-head")
    head = subprocess.Popen(
        [
            f"{bin_dir}/ray",
            "start",
            "--head",
            "--block",
            "--disable-usage-stats",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            "--num-cpus=2",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--temp-dir={temp_dir}",
            *own_ports,
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    request = urllib.request.Request(
        f"{address}/api/version", headers={"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"}
    )
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(request, timeout=2).read()
            break
        except OSError:
            if head.poll() is not None or time.monotonic() > deadline:
                os.killpg(head.pid, signal.SIGKILL)
                pytest.fail("the Ray head did not start")
            time.sleep(1)
    try:
        yield address, env
    finally:
        # Everything the head started is in its process group, and its temp dir is the test's
        # own: a short grace for a clean stop, then the group is killed outright.
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)


def _submit(address: str, env: dict[str, str], *commands: str) -> str:
    """Submit one job that runs each ``python -m <command>`` in turn (a command is one string
    of space-separated words) and wait for it; the head's job agent may still be starting just
    after the head answers, so that one refusal is retried (bounded)."""
    entrypoint = " && ".join(f"python -m {shlex.join(c.split())}" for c in commands)
    args = [
        f"{Path(sys.executable).parent}/ray",
        "job",
        "submit",
        "--address",
        address,
        "--working-dir",
        str(REPO),
        "--runtime-env-json",
        json.dumps({"excludes": [".venv", ".git", "outputs", "data"]}),
        "--",
        "bash",
        "-c",
        entrypoint,
    ]
    deadline = time.monotonic() + 120
    while True:
        done = subprocess.run(
            args, env=env, capture_output=True, text=True, timeout=600, check=False
        )
        output = done.stdout + done.stderr
        if done.returncode == 0 or "No available agent" not in output:
            break
        if time.monotonic() > deadline:
            break
        time.sleep(3)
    assert done.returncode == 0, output[-3000:]
    return done.stdout


def test_ingest_extract_index_as_jobs(ray_head, s3_bucket: str, tiny_collection: Path) -> None:
    address, env = ray_head
    s3 = boto3.client("s3")
    photos = sorted((tiny_collection / "jpg").glob("lm0*_v0*.jpg"))[:8]
    for path in photos:
        s3.upload_file(str(path), s3_bucket, f"photos/{path.parent.name}/{path.name}")
    run = f"s3://{s3_bucket}/run"
    images, descriptors = f"{run}/images.parquet", f"{run}/descriptors"
    _submit(
        address,
        env,
        f"pipeline.ingest --source s3://{s3_bucket}/photos --output {run}",
        f"pipeline.extract --images {images} --output {descriptors} --max-size 128",
        f"pipeline.index --descriptors {descriptors} --output {run}/index --shards 2",
    )
    manifest = read_manifest(f"{run}/index")
    assert sum(shard["count"] for shard in manifest["shards"]) == len(photos)
    assert manifest["version"] == 1 and len(manifest["shards"]) == 2
    # Training labels as a job: the photos' folder is their scene, one group reconstructed.
    _submit(
        address,
        env,
        f"pipeline.group --images {images} --descriptors {descriptors} --output {run}/groups",
        f"pipeline.sfm --images {images} --groups {run}/groups --output {run}/sfm",
        f"pipeline.pairs --sfm {run}/sfm --output {run}/pairs",
    )
    summary = SFM_OUTPUT.manifest(f"{run}/sfm").details
    assert summary["groups"]["ok"] == 1 and summary["registered"] >= 6
    assert PAIRS.read(f"{run}/pairs").num_rows > 0
    # The service as a job: it returns once the app is up (--detach) and goes on serving.
    port = _free_port()
    _submit(
        address, env, f"pipeline.serve --index {run}/index --detach --host 127.0.0.1 --port {port}"
    )
    client = SearchClient(f"http://127.0.0.1:{port}", retries=10, backoff=0.5)
    health = client.health()
    assert (health["version"], health["count"], health["slots"]) == (1, len(photos), 2)
    for path in photos[:3]:
        answer = client.search(path, k=3)
        assert answer.results[0].uri.endswith(path.name) and answer.results[0].score > 0.999
