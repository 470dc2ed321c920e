"""The search service on the session's Ray Serve: sharded search equals one index, αQE, bad
requests, a killed replica, a reload under load. Vectors here are synthetic (24-d, with exact
copies so that ties are real); ``test_serve_real.py`` queries it with real photos."""

from __future__ import annotations

import base64
import io
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import faiss
import numpy as np
import pytest
import requests
import schemathesis
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from PIL import Image
from ray import serve
from schemathesis import GenerationMode

from cluster import index_store
from cluster.client import SearchClient, SearchError
from cluster.router import merge_slots
from cluster.shards import ShardSet, slot_shards
from model.descriptors import read_descriptors, write_descriptors
from model.kreciprocal import KReciprocalOptions, shortlist_order
from model.retrieval import alpha_qe
from pipeline.extract import ExtractConf
from pipeline.extract import run as extract
from pipeline.index import IndexConf
from pipeline.index import run as build_index
from pipeline.ingest import IngestConf
from pipeline.ingest import run as ingest
from pipeline.serve import APP_NAME, DRAIN_CHECK_S, SERVE_ENV, ServeConf, app_builder, build_app
from tests.helpers import written_serve_app

# The ImageNet Lite0 the embedder builds; these vectors never came from it, so only vector
# queries make sense here (photo queries are in test_serve_real.py).
NETWORK = {
    "weights": "imagenet",
    "meta": {"backbone": "efficientnet_lite0", "pooling": "gem", "p": 3.0},
}
DIM, FIRST, ADDED = 24, 1000, 200


def _png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (120, 80, 40)).save(out, format="PNG")
    return out.getvalue()


def _ids(start: int, stop: int) -> list[str]:
    return [f"img-{i:06d}" for i in range(start, stop)]


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    """1,200 unit vectors; among the first 1,000 a quarter are exact copies of others; the last
    200 (added as v2) lie close to the first 200, so v2 answers differ from v1's."""
    rng = np.random.default_rng(11)
    x = _unit(rng.standard_normal((FIRST, DIM)))
    copies = rng.choice(FIRST, 500, replace=False)
    x[copies[:250]] = x[copies[250:]]
    near = _unit(x[:ADDED] + 0.05 * rng.standard_normal((ADDED, DIM)))
    return np.concatenate([x, near])


def _exact(x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """One unsharded IndexFlatIP, every vector ranked, canonical order (score ↓, id ↑), cut."""
    flat = faiss.IndexFlatIP(x.shape[1])
    flat.add(x)
    scores, ids = flat.search(q, len(x))
    order = np.lexsort((ids, -scores), axis=-1)
    return np.take_along_axis(scores, order, 1)[:, :k], np.take_along_axis(ids, order, 1)[:, :k]


def _index(tmp: Path, x: np.ndarray, shards: int) -> str:
    desc = write_descriptors(str(tmp / "d"), _ids(0, len(x)), x, network=NETWORK)
    return build_index(IndexConf(descriptors=desc, output=str(tmp / "idx"), shards=shards))


# --- Shard slots merged, without Serve --------------------------------------------------------


@pytest.mark.parametrize(("shards", "slots"), [(1, 1), (2, 2), (4, 4), (4, 2), (4, 3)])
def test_slots_merge_to_one_unsharded_index(ray_session, vectors, tmp_path, shards, slots):
    x = vectors[:FIRST]
    _index(tmp_path, x, shards)
    root = str(tmp_path / "idx")
    assert len(index_store.read_manifest(root)["shards"]) == shards
    sets = [ShardSet(root, slot, slots) for slot in range(slots)]
    queries = x[::70][:15]  # database rows with copies among them: ties at the top
    for k in (1, 10, 37):
        hits = merge_slots([s.search(queries, k, 1) for s in sets], k)
        scores, ids = _exact(x, queries, k)
        assert [[h.id for h in row] for row in hits] == ids.tolist()
        assert [[h.image_id for h in row] for row in hits] == [
            [f"img-{i:06d}" for i in row] for row in ids
        ]
        np.testing.assert_array_equal([[h.score for h in row] for row in hits], scores)


def test_slot_assignment_and_padding_dropped(ray_session, vectors, tmp_path):
    assert slot_shards(5, 1, 2) == [1, 3] and slot_shards(3, 3, 4) == []
    _index(tmp_path, vectors[:30], 4)
    root = str(tmp_path / "idx")
    sets = [ShardSet(root, slot, 6) for slot in range(6)]  # two slots hold nothing
    hits = merge_slots([s.search(vectors[:3], 50, 1) for s in sets], 50)
    assert [len(row) for row in hits] == [30, 30, 30]  # 30 vectors: no -1 / -inf padding


def test_a_newer_version_shares_loaded_shards(ray_session, vectors, tmp_path):
    desc = write_descriptors(str(tmp_path / "d1"), _ids(0, FIRST), vectors[:FIRST], network=NETWORK)
    root = str(tmp_path / "idx")
    build_index(IndexConf(descriptors=desc, output=root, shards=2))
    every = write_descriptors(str(tmp_path / "d2"), _ids(0, len(vectors)), vectors, network=NETWORK)
    build_index(IndexConf(descriptors=every, output=root, shards=1))
    shards = ShardSet(root)
    shards.load(1)
    first = dict(shards._files)
    shards.load(2)
    assert shards.versions == [1, 2] and len(shards._files) == 3  # v1's two + v2's new one
    assert all(shards._files[name] is loaded for name, loaded in first.items())
    q = vectors[FIRST : FIRST + 5]
    for version, x in ((1, vectors[:FIRST]), (2, vectors)):
        hits = merge_slots([shards.search(q, 5, version)], 5)
        assert [[h.id for h in row] for row in hits] == _exact(x, q, 5)[1].tolist()


# --- The service ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def service(serve_url, vectors, tmp_path_factory):
    """v1 (the first 1,000 vectors, 4 shards) served on 2 slots of 2 shards each; yields
    (client, index)."""
    tmp = tmp_path_factory.mktemp("serve")
    desc = write_descriptors(str(tmp / "d1"), _ids(0, FIRST), vectors[:FIRST], network=NETWORK)
    root = str(tmp / "idx")
    build_index(IndexConf(descriptors=desc, output=root, shards=4))
    conf = ServeConf.from_flags(index=root, qe_k=5, slots=2)
    serve.run(build_app(conf), name=APP_NAME, route_prefix="/")
    client = SearchClient(serve_url, retries=8)
    assert client.health()["version"] == 1
    try:
        yield client, root, tmp
    finally:
        serve.delete(APP_NAME)


def test_health_describes_the_index(service):
    client, _, _ = service
    health = client.health()
    assert health["status"] == "ok"
    assert (health["dim"], health["count"], health["shards"], health["slots"]) == (DIM, FIRST, 4, 2)


def test_http_and_handle_equal_one_unsharded_index(service, vectors):
    client, _, _ = service
    x = vectors[:FIRST]
    queries = x[::70][:15]
    scores, ids = _exact(x, queries, 10)
    for j, q in enumerate(queries):
        answer = client.search_vector(q, k=10)
        assert answer.image_ids == [f"img-{i:06d}" for i in ids[j]]
        np.testing.assert_allclose([r.score for r in answer.results], scores[j], rtol=0, atol=2e-7)
    router = serve.get_deployment_handle("SearchRouter", app_name=APP_NAME)
    bulk = router.search_many.remote(queries, 10).result()
    assert [[h.id for h in row] for row in bulk["hits"]] == ids.tolist()
    np.testing.assert_array_equal([[h.score for h in row] for row in bulk["hits"]], scores)


def test_a_batch_request_equals_its_queries_one_by_one(service, vectors, serve_url):
    client, root, _ = service
    queries = vectors[:FIRST][::40]
    answers = client.search_batch(vectors=queries, k=7)
    want = index_store.search(root, queries, 7)
    assert [a.image_ids for a in answers] == want.image_ids.tolist()
    assert {a.version for a in answers} == {want.version}
    assert client.search_batch(vectors=queries[:3], k=7, qe=True)[0].image_ids == (
        client.search_vector(queries[0], k=7, qe=True).image_ids
    )
    for body, says in (
        ({"vectors": [[1.0] * DIM], "photos": ["AA=="]}, "either vectors or photos"),
        ({"k": 3}, "either vectors or photos"),
        ({"vectors": [[1.0] * (DIM + 1)]}, f"dimension {DIM}"),
        ({"vectors": [[1.0] * DIM] * 1001}, "at most 1000"),
        ({"photos": ["not base64!"]}, "photos.0: not base64"),
        ({"vectors": [[1.0] * DIM], "rerank": 5}, "needs a photo"),
        ({"photos": [base64.b64encode(_png(96, 96)).decode()], "rerank": 5}, "--local-features"),
        ({"photos": ["AA=="], "rerank": 1001}, "rerank"),
    ):
        response = requests.post(f"{serve_url}/search/batch", json=body, timeout=30)
        assert response.status_code == 422 and says in response.json()["detail"], (
            body.keys(),
            response.text[:300],
        )


def test_alpha_qe_through_the_service_equals_alpha_qe_on_the_matrix(service, vectors):
    client, _, _ = service
    x = vectors[:FIRST]
    rng = np.random.default_rng(5)
    queries = _unit(rng.standard_normal((12, DIM)))  # not database rows
    expanded = alpha_qe(queries, x, 5, 3.0)
    scores, ids = _exact(x, expanded, 10)
    router = serve.get_deployment_handle("SearchRouter", app_name=APP_NAME)
    bulk = router.search_many.remote(queries, 10, qe=True).result()
    assert [[h.id for h in row] for row in bulk["hits"]] == ids.tolist()
    np.testing.assert_allclose([[h.score for h in r] for r in bulk["hits"]], scores, atol=1e-6)
    over_http = client.search_vector(queries[0], k=10, qe=True)
    assert over_http.image_ids == [f"img-{i:06d}" for i in ids[0]]
    plain = client.search_vector(queries[0], k=10)
    assert plain.image_ids != over_http.image_ids or plain.results != over_http.results


def test_kreciprocal_reorders_the_top_k_as_evaluate_does(service, vectors):
    """kreciprocal=K: the top K re-ordered by ``model.kreciprocal.shortlist_order`` over the
    query and their stored vectors, as ``pipeline.evaluate --kreciprocal-top K`` does; the
    same by HTTP, in a batch request and through the router's handle."""
    client, _, _ = service
    x = vectors[:FIRST]
    rng = np.random.default_rng(8)
    queries = _unit(x[::97][:6] + 0.5 * rng.standard_normal((6, DIM)))
    _, ids = _exact(x, queries, 30)
    expected = [
        ids[j][shortlist_order(q, x[ids[j]], KReciprocalOptions())] for j, q in enumerate(queries)
    ]
    answers = [client.search_vector(q, k=12, kreciprocal=30) for q in queries]
    assert [a.image_ids for a in answers] == [_names(e[:12]) for e in expected]
    assert any(e[:12].tolist() != i[:12].tolist() for e, i in zip(expected, ids, strict=True))
    batch = client.search_batch(vectors=queries, k=12, kreciprocal=30)
    assert [a.image_ids for a in batch] == [a.image_ids for a in answers]
    router = serve.get_deployment_handle("SearchRouter", app_name=APP_NAME)
    bulk = router.search_many.remote(queries, 12, kreciprocal=30).result()
    assert [[h.id for h in row] for row in bulk["hits"]] == [e[:12].tolist() for e in expected]
    # a K past the index: every photo re-ordered
    assert len(client.search_vector(queries[0], k=5, kreciprocal=1000).results) == 5


def _names(rows: np.ndarray) -> list[str]:
    return [f"img-{i:06d}" for i in rows]


@pytest.mark.parametrize(
    ("kwargs", "status", "says"),
    [
        ({"data": b"no photo", "headers": {"Content-Type": "image/jpeg"}}, 422, "not a usable"),
        ({"data": _png(1, 1), "headers": {"Content-Type": "image/png"}}, 422, "too small"),
        # the index's network (Lite0, 1280 values) does not describe in this index's dimension
        ({"data": _png(96, 96), "headers": {"Content-Type": "image/png"}}, 422, "1280 values"),
        ({"data": b"{not json", "headers": {"Content-Type": "application/json"}}, 400, "JSON"),
        ({"json": {"vector": [0.1] * (DIM - 1)}}, 422, f"dimension {DIM}"),
        ({"json": {"vector": [0.0] * DIM}}, 422, "norm is zero"),
        ({"json": {"vector": [1.0] * DIM, "k": 0}}, 422, "k"),
        ({"json": {"vector": [1.0] * DIM, "k": 1001}}, 422, "k"),
        ({"json": {"vector": "a"}}, 422, "vector"),
        ({"json": {"k": 3}}, 422, "vector"),
        ({"data": b"x", "headers": {"Content-Type": "text/plain"}}, 415, "neither"),
        ({"data": b"", "headers": {"Content-Type": "image/png"}}, 400, "empty body"),
        # an index built without local features cannot re-rank: say how to add them
        (
            {
                "data": _png(96, 96),
                "headers": {"Content-Type": "image/png"},
                "params": {"rerank": 9},
            },
            422,
            "pipeline.index --local-features",
        ),
        ({"json": {"vector": [1.0] * DIM}, "params": {"rerank": 9}}, 422, "needs a photo"),
        ({"json": {"vector": [1.0] * DIM, "kreciprocal": 1001}}, 422, "kreciprocal"),
        ({"json": {"vector": [1.0] * DIM, "kreciprocal": -1}}, 422, "kreciprocal"),
    ],
)
def test_bad_requests_get_4xx_and_a_reason(service, serve_url, kwargs, status, says):
    answer = requests.post(f"{serve_url}/search", timeout=60, **kwargs)
    assert answer.status_code == status, answer.text
    detail = answer.json()["detail"]
    assert isinstance(detail, str) and says in detail
    assert service[0].health()["status"] == "ok"


def test_nan_over_the_limit_k_and_unknown_ids(service, serve_url):
    nan = b'{"vector": [NaN' + b", 0.5" * (DIM - 1) + b"]}"
    answer = requests.post(
        f"{serve_url}/search", data=nan, headers={"Content-Type": "application/json"}, timeout=60
    )
    assert answer.status_code == 422 and "NaN" in answer.json()["detail"]
    answer = requests.post(
        f"{serve_url}/search?k=5000", data=b"x", timeout=60, headers={"Content-Type": "image/jpeg"}
    )
    assert answer.status_code == 422 and "k" in answer.json()["detail"]
    big = b"\xff" * (20 * 2**20 + 1)
    answer = requests.post(
        f"{serve_url}/search", data=big, timeout=60, headers={"Content-Type": "image/jpeg"}
    )
    assert answer.status_code == 413 and "limit" in answer.json()["detail"]
    answer = requests.get(f"{serve_url}/images/no-such-photo", timeout=60)
    assert answer.status_code == 404 and "no-such-photo" in answer.json()["detail"]
    with pytest.raises(SearchError, match="404"):
        service[0].reload(version=9)
    assert service[0].health()["version"] == 1


def _fuzz(op, mode, base_url: str, calls: dict[str, int], failures: list[str]) -> None:
    """Up to 20 generated requests to one operation; 5xx answers land in ``failures``."""
    label = f"{op.method.upper()} {op.path} {mode.value}"

    @settings(
        max_examples=20, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(case=op.as_strategy(generation_mode=mode))
    def check(case) -> None:
        response = case.call(base_url=base_url, timeout=60)
        kind = f"{label} {case.media_type}" if case.media_type else label
        calls[kind] = calls.get(kind, 0) + 1
        if response.status_code >= 500:
            failures.append(f"{label}: {response.status_code} {response.text[:200]}")

    check()


def test_schemathesis_finds_no_server_error(service, serve_url):
    schema = schemathesis.openapi.from_url(f"{serve_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/search", "/health", "/images/{image_id}"}
    failures: list[str] = []
    calls: dict[str, int] = {}
    for op in operations:
        if op.path == "/reload":  # switching versions is exercised below, not fuzzed
            continue
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                _fuzz(op, mode, serve_url, calls, failures)
            except Unsatisfiable:  # nothing to make invalid (GET /health has no parameters)
                assert mode is GenerationMode.NEGATIVE, op.path
    assert not failures, failures
    searched = {kind.split()[-1] for kind in calls if kind.startswith("POST /search")}
    assert searched >= {"application/json", "image/jpeg", "image/png"}, calls
    print(f"\nschemathesis: {sum(calls.values())} requests, none answered 5xx: {calls}")
    assert service[0].health()["status"] == "ok"


def _send(client, queries, k, answers, errors, stop) -> None:
    """Query after query, round the list, until ``stop``: ``(j, answer)`` or the error."""
    i = 0
    while not stop.is_set():
        j = i % len(queries)
        try:
            answers.append((j, client.search_vector(queries[j], k=k)))
        except SearchError as err:
            errors.append(str(err))
        i += 1


def test_a_killed_shard_replica_is_replaced_and_no_query_fails(service, vectors):
    client, _, _ = service
    shard = serve.get_deployment_handle("IndexShard1", app_name=APP_NAME)
    pid = shard.pid.remote().result()
    queries = vectors[:FIRST][::50]
    expected = _exact(vectors[:FIRST], queries, 5)[1]
    answers, errors, stop = [], [], threading.Event()
    sender = threading.Thread(target=_send, args=(client, queries, 5, answers, errors, stop))
    sender.start()
    try:
        time.sleep(0.5)
        os.kill(pid, signal.SIGKILL)  # the replica the handle named, nothing else
        deadline = time.monotonic() + 90
        new_pid = pid
        while new_pid == pid:
            assert time.monotonic() < deadline, "no replacement replica in 90 s"
            time.sleep(0.5)
            try:
                new_pid = shard.pid.remote().result(timeout_s=10)
            except Exception:  # the dead replica may still be asked once
                continue
        after = len(answers)
        while len(answers) < after + 10:
            assert time.monotonic() < deadline, "queries stopped after the replacement"
            time.sleep(0.1)
    finally:
        stop.set()
        sender.join(timeout=120)
    assert not errors, errors[:3]
    assert all(a.image_ids == [f"img-{i:06d}" for i in expected[j]] for j, a in answers)
    print(
        f"\nkilled replica {pid}, replaced by {new_pid}: {len(answers)} queries answered, "
        f"{client.retried} client retries, 0 failed"
    )


def test_reload_under_load_answers_wholly_from_one_version(service, vectors):
    client, root, tmp = service
    every = write_descriptors(str(tmp / "d2"), _ids(0, len(vectors)), vectors, network=NETWORK)
    queries = vectors[:ADDED:10]  # each has a new v2 vector right beside it
    k = 5
    want = {1: index_store.search(root, queries, k, version=1).image_ids.tolist()}
    staged = IndexConf(descriptors=every, output=root, shards=2, promote=False)
    assert build_index(staged).endswith("v2")
    want[2] = index_store.search(root, queries, k, version=2).image_ids.tolist()
    assert all(a != b for a, b in zip(want[1], want[2], strict=True))
    assert client.health()["version"] == 1  # published with --no-promote: not served yet

    answers, errors, stop = [], [], threading.Event()
    args = (client, queries, k, answers, errors, stop)
    senders = [threading.Thread(target=_send, args=args) for _ in range(3)]
    for sender in senders:
        sender.start()
    try:
        time.sleep(1.0)
        switched = client.reload()
        time.sleep(1.0)
    finally:
        stop.set()
        for sender in senders:
            sender.join(timeout=120)
    assert switched == {"version": 2, "previous": 1}
    assert not errors, errors[:3]
    versions = [a.version for _, a in answers]
    assert set(versions) == {1, 2}, "the load should straddle the switch"
    for j, answer in answers:
        assert answer.image_ids == want[answer.version][j]  # wholly that version's answer
    first_v2 = versions.index(2)
    print(
        f"\nreload under load: {len(answers)} answers, {versions.count(1)} from v1 then "
        f"{versions.count(2)} from v2, 0 failed"
    )
    assert client.health()["version"] == 2 and first_v2 > 0


def test_the_ingress_follows_a_reload_made_through_the_router(service, vectors):
    """The ingress searches the slots itself with the router's version: a reload it did not
    make reaches its answers within its ``version_ttl_s`` (0.2 s), and they never go back."""
    client, root, tmp = service
    router = serve.get_deployment_handle("SearchRouter", app_name=APP_NAME)
    if index_store.latest_version(root) == 1:  # run alone: the v2 the reload test publishes
        every = write_descriptors(str(tmp / "d2"), _ids(0, len(vectors)), vectors, network=NETWORK)
        build_index(IndexConf(descriptors=every, output=root, shards=2, promote=False))
        router.reload.remote().result()
    newest = router.served.remote().result()[0]
    query = vectors[:ADDED:10][:1]
    want = {
        v: index_store.search(root, query, 5, version=v).image_ids.tolist()[0]
        for v in (newest - 1, newest)
    }
    for version in (newest - 1, newest):  # back one version, then forward again
        router.reload.remote(version).result()
        switched = time.monotonic()
        seen = [client.search_vector(query[0], k=5)]
        while seen[-1].version != version:
            assert time.monotonic() - switched < 5, f"the ingress still answers v{seen[-1].version}"
            seen.append(client.search_vector(query[0], k=5))
        lag = time.monotonic() - switched
        seen += [client.search_vector(query[0], k=5) for _ in range(5)]
        first = next(i for i, a in enumerate(seen) if a.version == version)
        assert {a.version for a in seen[first:]} == {version}  # never back
        assert all(a.image_ids == want[a.version] for a in seen)
        print(f"\nreload to v{version} through the router: HTTP answers followed in {lag:.2f} s")


# --- Configuration ----------------------------------------------------------------------------


def test_a_serve_config_file_holds_every_setting(ray_session, vectors, tmp_path):
    root = _index(tmp_path, vectors[:FIRST], 4)
    path = tmp_path / "serve.yaml"
    conf = ServeConf(
        index=root.rsplit("/", 1)[0],
        slots=2,
        replicas=3,
        cpus_per_shard=1.5,
        max_ongoing_requests=16,
        watch_s=5,
        write_config=str(path),
    )
    app = written_serve_app(conf)  # Serve's own validation of the file included
    # the proxies hand requests to the ingress over gRPC, as when pipeline.serve starts Serve
    written = yaml.safe_load(path.read_text())
    assert written["controller_options"] == {"runtime_env": {"env_vars": SERVE_ENV}}
    assert app["import_path"] == "pipeline.serve:app_builder"
    assert app["args"] == {
        "index": conf.index,
        "slots": 2,
        "replicas": 3,
        "cpus_per_shard": 1.5,
        "max_ongoing_requests": 16,
        "watch_s": 5,
    }
    deployments = {d["name"]: d for d in app["deployments"]}
    assert set(deployments) == {
        "IndexShard0",
        "IndexShard1",
        "SearchRouter",
        "Embedder",
        "SearchApp",
    }
    assert deployments["IndexShard1"]["num_replicas"] == 3
    assert deployments["IndexShard1"]["ray_actor_options"]["num_cpus"] == 1.5
    # A config file is for a cluster: nothing reserves no CPU (none lands on a head that takes
    # no work), and a shard replica reserves memory for two versions of its shards.
    for name, deployment in deployments.items():
        assert deployment["ray_actor_options"]["num_cpus"] > 0, name
        assert deployment["graceful_shutdown_wait_loop_s"] == DRAIN_CHECK_S, name  # quick stops
    shard_bytes = sum(s["bytes"] for s in index_store.read_manifest(conf.index)["shards"][1::2])
    assert deployments["IndexShard1"]["ray_actor_options"]["memory"] == 2 * shard_bytes + 2**29
    built = app_builder(app["args"])  # what serve deploy calls on the cluster
    assert type(built).__name__ == "Application"
    with pytest.raises(ValueError, match="unknown serve args"):
        app_builder({"index": conf.index, "shardz": 2})


def test_the_command_reports_every_problem_in_one_line_each(tmp_path):
    flags = ["--index", str(tmp_path / "none"), "--replicas", "0", "--port", "70000"]
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.serve", *flags],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 3, done.stderr
    assert "Traceback" not in done.stderr
    assert any("--replicas" in e for e in errors) and any("70000" in e for e in errors)
    assert any("no complete index version" in e for e in errors)


def test_a_network_other_than_the_descriptors_is_refused(ray_session, vectors, tmp_path):
    same = {**NETWORK, "identity": "imagenet/efficientnet_lite0/gem/p3"}
    desc = write_descriptors(str(tmp_path / "d"), _ids(0, 50), vectors[:50], network=same)
    build_index(IndexConf(descriptors=desc, output=str(tmp_path / "idx"), shards=1))
    build_app(ServeConf(index=str(tmp_path / "idx")))  # the packaged network it names: served

    other = {**NETWORK, "identity": "a-checkpoint-since-replaced"}
    desc = write_descriptors(str(tmp_path / "d2"), _ids(0, 50), vectors[:50], network=other)
    build_index(IndexConf(descriptors=desc, output=str(tmp_path / "idx2"), shards=1))
    with pytest.raises(ValueError) as caught:
        build_app(ServeConf(index=str(tmp_path / "idx2")))
    text = str(caught.value)
    assert len(text.splitlines()) == 1, text
    assert "not the one the index's descriptors were made with" in text
    assert "a-checkpoint-since-replaced" in text


# --- A run folder moved -----------------------------------------------------------------------


def _photos(folder: Path, count: int) -> None:
    """``count`` small JPEGs of noise (each its own photo) under one scene folder."""
    rng = np.random.default_rng(0)
    scene = folder / "scene"
    scene.mkdir(parents=True)
    for i in range(count):
        pixels = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(scene / f"photo-{i}.jpg", quality=90)


def test_a_moved_run_folder_serves_its_photos_and_a_new_version_by_itself(
    serve_url, tmp_path, monkeypatch
):
    """ingest → extract → index into a run folder named relative to one working directory;
    the folder moved whole and served, by a relative path, from another: the photos' thumbnails
    still come back (the manifests store resolved paths and find their inputs beside them).
    Served with ``--watch-s``: a version published later is served by itself."""
    _photos(tmp_path / "photos", 3)
    (tmp_path / "first").mkdir()
    monkeypatch.chdir(tmp_path / "first")
    ingest(IngestConf(source=str(tmp_path / "photos"), output="run"))
    extract(ExtractConf.from_flags(images="run", output="run/descriptors", max_size=64))
    build_index(IndexConf(descriptors="run/descriptors", output="run/index", shards=1))
    (tmp_path / "moved").mkdir()
    shutil.move(tmp_path / "first" / "run", tmp_path / "moved" / "run")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")

    app = build_app(ServeConf(index="../moved/run/index", watch_s=0.5))
    serve.run(app, name="moved", route_prefix="/moved")
    try:
        client = SearchClient(f"{serve_url}/moved", retries=8)
        assert client.health()["photos"] == 3
        photo = (tmp_path / "photos" / "scene" / "photo-1.jpg").read_bytes()
        answer = client.search(photo, k=3)
        first = answer.results[0]
        assert first.score > 0.999 and first.uri and first.uri.endswith("photo-1.jpg")
        with Image.open(io.BytesIO(client.image(first.image_id))) as thumb:
            assert thumb.format == "JPEG" and thumb.size == (64, 48)

        # a version published without promoting it: the watching router serves it by itself
        network = read_descriptors("../moved/run/descriptors").manifest["network"]
        more = _unit(np.random.default_rng(3).standard_normal((10, 1280)))
        desc = write_descriptors("more", _ids(0, 10), more, network=network)
        index = IndexConf(descriptors=desc, output="../moved/run/index", shards=1, promote=False)
        assert build_index(index).endswith("v2")
        deadline = time.monotonic() + 60
        while client.health()["version"] != 2:
            assert time.monotonic() < deadline, "the new version was not picked up in 60 s"
            time.sleep(0.5)
        answer = client.search_vector(more[0], k=1)
        assert answer.image_ids == [_ids(0, 1)[0]] and answer.version == 2
    finally:
        serve.delete("moved")
