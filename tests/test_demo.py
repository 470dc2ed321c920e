"""``make demo``, as a newcomer runs it — photos to a served, self-trained index, queried over
HTTP, with the run report — and then the same run folder as a user keeps using it: the same
command again finishes in seconds, and photos added are described and indexed alone."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from cluster.index_store import read_manifest
from model import tables
from model.datasets.landmarks import load_cameras
from pipeline.run import LAYOUT, STAGES, RunConf, run
from tests.helpers import REPO, SMALL_RUN, check_page, chromium


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_demo_then_again_in_seconds_and_with_photos_added(
    ray_session, tmp_path: Path, caplog
) -> None:
    # make demo, in a process of its own (its own local Ray and Serve, as make demo has), on
    # the tiny preset with the tests' small settings
    port = _free_port()
    config = tmp_path / "demo.yaml"
    config.write_text(yaml.safe_dump({**SMALL_RUN, "serve": {"port": port, "detach": True}}))
    command = [sys.executable, "-m", "pipeline.demo", "--collection", "tiny", "--no-stay"]
    command += ["--output", str(tmp_path / "demo"), "--config", str(config)]
    # RAY_ADDRESS=local: a Ray of its own even while another test's `ray start` cluster is up
    # (ray.init() would join the newest such cluster)
    env = {**os.environ, "RAY_ADDRESS": "local"}
    try:
        done = subprocess.run(
            command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600
        )
    except subprocess.TimeoutExpired as err:
        printed = (err.stdout or b"")[-3000:], (err.stderr or b"")[-3000:]
        pytest.fail(f"make demo still running after 600 s; its output: {printed}")
    assert done.returncode == 0, done.stderr[-3000:]
    correct = re.search(r"^(\d+) of (\d+) results show the query's landmark", done.stdout, re.M)
    assert correct, done.stdout[-2000:]
    assert int(correct[2]) == 6 * 5 and int(correct[1]) >= 24  # 6 unseen queries, top 5
    out = tmp_path / "demo" / "run"
    assert f"run report:  {(out / 'report.html').as_uri()}" in done.stdout
    assert f"search page: http://127.0.0.1:{port}/" in done.stdout
    assert {p.name for p in out.iterdir()} == {
        *LAYOUT.values(),
        "run.json",
        "report.html",
        "report",
    }
    summary = json.loads((out / "run.json").read_text())
    assert tuple(summary["stages"]) == STAGES  # every stage, in the chain's order
    assert summary["search"] == f"http://127.0.0.1:{port}"
    assert summary["report"] == str(out / "report.html")
    first = summary["stages"]["ingest"]["ingested"]
    assert read_manifest(str(out / "index"))["count"] == first
    assert summary["stages"]["sfm"]["groups"]["ok"] == 3  # one per landmark
    trained = tables.DESCRIPTORS_OUTPUT.manifest(str(out / "descriptors-trained"))
    assert trained.inputs["network"]  # described with the run's own fine-tuned network

    # the same command again: every stage finds its output complete and skips
    conf = RunConf(source=summary["source"], output=str(out), config=str(config))
    caplog.set_level(logging.INFO)
    caplog.clear()
    run(conf)
    skipped = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(skipped) >= len(LAYOUT), skipped
    again = json.loads((out / "run.json").read_text())["stages"]
    assert all(done["reused"] for done in again.values())  # each as the run that made it
    assert [d["seconds"] for d in again.values()] == [
        d["seconds"] for d in summary["stages"].values()
    ]

    # photos added (the collection's query photos): the network is kept, and only the new
    # photos are described and indexed, into a new index version
    added = _append_query_photos(Path(summary["source"]), tmp_path / "demo" / "collection")
    run(conf)
    after = json.loads((out / "run.json").read_text())["stages"]
    assert after["train"]["skipped"].startswith("photos changed since the network")
    assert after["ingest"]["ingested"] == first + added
    assert after["extract-trained"]["described"] == added
    assert after["extract-trained"]["count"] == first + added
    latest = read_manifest(str(out / "index"))
    assert (latest["version"], latest["added"], latest["count"]) == (2, added, first + added)
    kept = tables.DESCRIPTORS_OUTPUT.manifest(str(out / "descriptors-trained"))
    assert kept.inputs["network"] == trained.inputs["network"]

    # a part of the chain: the index alone, from the descriptors the run left
    assert run(RunConf(source=summary["source"], output=str(out), from_stage="index")) == str(
        out / "index"
    )
    _check_report(out, models=summary["stages"]["sfm"]["models"])


def _append_query_photos(manifest: Path, collection: Path) -> int:
    """Add the collection's query photos to the ingest manifest; returns how many."""
    (dataset,) = collection.iterdir()
    rows = [
        [str(dataset / "jpg" / f"{cam['name']}.jpg"), f"lm{cam['landmark']}"]
        for cam in load_cameras(dataset).to_pylist()
        if cam["role"] == "query"
    ]
    with manifest.open("a") as f:
        f.writelines(",".join(row) + "\n" for row in rows)
    return len(rows)


def _check_report(out: Path, *, models: int) -> None:
    """The run report as a person sees it: every section, every picture loaded, no errors."""
    page = (out / "report.html").read_text()
    for heading in ("Stages", "Photos", "Groups", "3D models", "Training pairs", "Training"):
        assert f"<h2>{heading}</h2>" in page
    pictured = sorted((out / "report").glob("model-*.png"))
    assert len(pictured) == min(models, 12)
    assert all(Image.open(p).size == (256, 256) for p in pictured)  # 3.2 in at 80 dpi
    if chromium() is None:
        pytest.skip("Debian chromium not installed (.ci/run installs it): page not rendered")
    seen = check_page((out / "report.html").as_uri())
    assert not seen.errors and not seen.broken_images, (seen.errors, seen.broken_images)
    assert seen.images > 30 and "Example queries" in seen.text
