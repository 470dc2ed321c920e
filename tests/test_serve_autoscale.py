"""Autoscaling of the search service: the flags reach Serve's ``autoscaling_config`` (in the
bound app and in a written Serve config file), bad values are refused one line each, and the
shard and embedder deployments under load (descriptors and photos) gain replicas and, once the
load stops, give them back."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from ray import serve

from cluster import index_store
from model.descriptors import write_descriptors
from pipeline.index import IndexConf
from pipeline.index import run as build_index
from pipeline.serve import APP_NAME, ServeConf, app_builder, build_app, serve_config
from tests.helpers import written_serve_app

# The ImageNet Lite0 the embedder builds (the photos' answers are checked for their shape only).
NETWORK = {
    "weights": "imagenet",
    "meta": {"backbone": "efficientnet_lite0", "pooling": "gem", "p": 3.0},
}
DIM, COUNT = 1280, 1000  # Lite0's dimension: the embedder's photo descriptors are searched


def _index(tmp: Path, shards: int) -> tuple[str, np.ndarray]:
    """An index of ``COUNT`` random unit vectors in ``tmp/idx``; returns its root and them."""
    x = np.random.default_rng(7).standard_normal((COUNT, DIM))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    ids = [f"img-{i:06d}" for i in range(COUNT)]
    desc = write_descriptors(str(tmp / "d"), ids, x, network=NETWORK)
    build_index(IndexConf(descriptors=desc, output=str(tmp / "idx"), shards=shards))
    return str(tmp / "idx"), x


# --- Configuration ----------------------------------------------------------------------------


def test_autoscaling_flags_reach_the_serve_config_file(ray_session, tmp_path):
    root, _ = _index(tmp_path, 2)
    path = tmp_path / "serve.yaml"
    conf = ServeConf(
        index=root,
        replicas=2,
        max_replicas=5,
        embedder_max_replicas=3,
        target_ongoing_requests=1.5,
        upscale_delay_s=5,
        downscale_delay_s=120,
        write_config=str(path),
    )
    app = written_serve_app(conf)  # Serve's own validation of the file included
    deployments = {d["name"]: d for d in app["deployments"]}
    shard = {
        "min_replicas": 2,
        "max_replicas": 5,
        "target_ongoing_requests": 1.5,
        "upscale_delay_s": 5,
        "downscale_delay_s": 120,
        "look_back_period_s": 30.0,  # Serve's defaults; its metrics interval is left out
    }
    for name in ("IndexShard0", "IndexShard1"):
        assert deployments[name]["autoscaling_config"] == shard, name
        assert "num_replicas" not in deployments[name]  # Serve takes one or the other
        assert deployments[name]["ray_actor_options"]["memory"] > 0  # still per replica
    assert deployments["Embedder"]["autoscaling_config"] == {
        **shard,
        "min_replicas": 1,
        "max_replicas": 3,
    }
    assert "num_replicas" not in deployments["Embedder"]
    # The router keeps ceil(5 × 1.5) batches in flight, enough for 5 replicas at the target,
    # and takes requests for those and one more filling.
    assert deployments["SearchRouter"]["max_ongoing_requests"] == (8 + 1) * 32
    assert deployments["SearchApp"]["num_replicas"] == 1
    assert type(app_builder(app["args"])).__name__ == "Application"  # what serve deploy calls

    fixed = serve_config(ServeConf(index=root, replicas=2, max_replicas=2))
    (app,) = fixed["applications"]
    for deployment in app["deployments"]:  # max not above min: fixed counts, as before
        assert "autoscaling_config" not in deployment and deployment["num_replicas"] >= 1


def test_bad_autoscaling_flags_are_refused_one_line_each(tmp_path):
    conf = ServeConf.from_flags(
        index=str(tmp_path / "none"),
        replicas=3,
        max_replicas=2,
        embedder_replicas=2,
        embedder_max_replicas=1,
        target_ongoing_requests=0,
        upscale_delay_s=-1,
        downscale_delay_s=-0.5,
        look_back_period_s=5,
        metrics_interval_s=5,
    )
    with pytest.raises(ValueError) as caught:
        build_app(conf)
    lines = str(caught.value).splitlines()
    print("\n" + "\n".join(lines))
    expected = [
        "--max-replicas 2 is below --replicas 3",
        "--embedder-max-replicas 1 is below --embedder-replicas 2",
        "--target-ongoing-requests must be above 0",
        "--upscale-delay-s must be 0 or more seconds",
        "--downscale-delay-s must be 0 or more seconds",
        "--look-back-period-s 5 must be longer than --metrics-interval-s 5",
    ]
    for want in expected:
        assert sum(want in line for line in lines) == 1, (want, lines)
    assert len(lines) == len(expected) + 1  # and the index that is not there
    assert "no complete index version" in lines[-1]


# --- Under load -------------------------------------------------------------------------------


def _running(deployment: str) -> dict[str, int]:
    """The deployment's replicas by state, as Serve reports them."""
    status = serve.status().applications[APP_NAME].deployments[deployment]
    return dict(status.replica_states)


def _send(router, queries: np.ndarray, want: list[list[str]], *, stop, counts, failures) -> None:
    """The whole matrix of queries, call after call, until ``stop``; a wrong or failed answer
    is kept."""
    while not stop.is_set():
        try:
            answer = router.search_many.remote(queries, 5).result(timeout_s=60)
            got = [[hit.image_id for hit in row] for row in answer["hits"]]
            if got != want:
                failures.append(f"v{answer['version']}: {got[:2]}... != {want[:2]}...")
        except Exception as err:  # any failure of the call is what this test looks for
            failures.append(repr(err))
        counts.append(len(queries))


def _send_photos(router, photos: list[bytes], *, stop, counts, failures) -> None:
    """The photos, call after call, until ``stop``: each described by the embedder, then
    searched; an answer without 5 hits for every photo, or a failed call, is kept."""
    while not stop.is_set():
        try:
            answer = router.search_photos.remote(photos, 5).result(timeout_s=60)
            if [len(hits) for hits in answer["hits"]] != [5] * len(photos):
                failures.append(f"photos: {answer['hits']!r:.200}")
        except Exception as err:  # any failure of the call is what this test looks for
            failures.append(str(err))
        counts.append(len(photos))


def _photos(count: int) -> list[bytes]:
    rng = np.random.default_rng(3)
    out = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(buffer, "JPEG")
        out.append(buffer.getvalue())
    return out


def test_shard_and_embedder_replicas_are_added_under_load_and_removed_after(serve_url, tmp_path):
    root, x = _index(tmp_path, 1)
    conf = ServeConf.from_flags(
        index=root,
        max_replicas=3,  # one slot, 1 to 3 replicas
        embedder_max_replicas=2,  # 1 to 2 embedder replicas, loaded by the photo senders
        target_ongoing_requests=1.0,
        upscale_delay_s=0.5,
        downscale_delay_s=1.5,
        look_back_period_s=1.0,
        metrics_interval_s=0.25,
    )
    began = time.monotonic()
    serve.run(build_app(conf), name=APP_NAME, route_prefix="/")
    deployed_s = time.monotonic() - began
    try:
        # Bulk calls through the router's handle: each sender always has one call out, so the
        # slot holds close to 2 at a time, whatever else the 2 cores are doing (HTTP clients'
        # requests spend most of their time in the proxy and the ingress on 2 cores).
        router = serve.get_deployment_handle("SearchRouter", app_name=APP_NAME)
        queries = x[::40]
        want = index_store.search(root, queries, 5).image_ids.tolist()  # one unsharded index
        deployments = ("IndexShard0", "Embedder")
        seen = {name: [(0.0, _running(name))] for name in deployments}
        stop, counts, photo_counts, failures = threading.Event(), [], [], []
        senders = [
            threading.Thread(
                target=_send,
                args=(router, queries, want),
                kwargs={"stop": stop, "counts": counts, "failures": failures},
            )
            for _ in range(2)
        ]
        senders += [
            threading.Thread(
                target=_send_photos,
                args=(router, _photos(2)),
                kwargs={"stop": stop, "counts": photo_counts, "failures": failures},
            )
            for _ in range(2)
        ]
        start = time.monotonic()

        def watch(until, deadline_s: float, what: str) -> None:
            deadline = time.monotonic() + deadline_s
            while not all(until(states[-1][1]) for states in seen.values()):
                assert time.monotonic() < deadline, f"{what} in {deadline_s} s: {seen}"
                time.sleep(0.2)
                for name, states in seen.items():
                    now = _running(name)
                    if now != states[-1][1]:
                        states.append((round(time.monotonic() - start, 1), now))

        for sender in senders:
            sender.start()
        try:
            watch(lambda s: s.get("RUNNING", 0) > 1, 90, "no replica added to each")
        finally:
            stop.set()
            for sender in senders:
                sender.join(timeout=60)
        watch(lambda s: s == {"RUNNING": 1}, 30, "the added replicas not removed")
        print(f"\napp deployed in {deployed_s:.1f} s")
        for name, states in seen.items():
            print(f"{name} replicas by state, s after the load began: {states}")
        print(
            f"{sum(counts)} descriptor and {sum(photo_counts)} photo queries under load, "
            f"{len(failures)} failed or wrong"
        )
        assert not failures, failures[:3]
    finally:
        serve.delete(APP_NAME)
