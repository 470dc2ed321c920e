"""The served state stays one thing while the index, the network and the replicas change.

Records changed only by compare-and-swap (locally and on the loopback S3 server), the build
lease, one loaded shard file answering two versions with their own ``nprobe``, two builds of
one index started together; then one service of photos (2 slots of 2 replicas, networks that
are real checkpoints): a reload reaches every replica before it returns, the network travels
with the index (retraining into the checkpoint's folder changes nothing served), and under a
steady stream of photo queries (a) a full re-index with a new network, (b) a killed router,
(c) a killed embedder and (d) a killed shard replica fail no query, every answer being one
state's whole answer; a restarted router comes back on ``CURRENT``.
"""

from __future__ import annotations

import io
import itertools
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from ray import serve

from cluster import index_store, served
from cluster.client import SearchClient, SearchError
from cluster.shards import ShardSet
from model import checkpoint
from model.describer import Describer, NetworkSettings, decode_photo
from model.descriptors import write_descriptors
from model.networks import NetworkMeta, build_network
from model.records import Lease, LeaseHeld, LeaseLost, RecordChanged, read_record, write_record
from pipeline.index import IndexConf
from pipeline.index import run as build_index
from pipeline.serve import APP_NAME, ServeConf, build_app

NETWORK = {
    "weights": "imagenet",
    "meta": {"backbone": "efficientnet_lite0", "pooling": "gem", "p": 3.0},
}
DIM = 24


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _ids(start: int, stop: int) -> list[str]:
    return [f"img-{i:06d}" for i in range(start, stop)]


def _until(condition, what: str, timeout_s: float = 60.0, every_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while True:
        found = condition()
        if found:
            return found
        assert time.monotonic() < deadline, f"{what} within {timeout_s:.0f} s"
        time.sleep(every_s)


# --- Records and the lease --------------------------------------------------------------------


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_record_changes_only_for_the_writer_that_read_it_last(where, tmp_path, s3_bucket):
    uri = str(tmp_path / "CURRENT") if where == "local" else f"s3://{s3_bucket}/idx/CURRENT"
    assert read_record(uri) == (None, None)
    tag = write_record(uri, {"version": 1}, expected=None)
    with pytest.raises(RecordChanged):
        write_record(uri, {"version": 9}, expected=None)  # created meanwhile by another
    content, read_tag = read_record(uri)
    assert content == {"version": 1} and read_tag == tag
    newer = write_record(uri, {"version": 2}, expected=tag)
    with pytest.raises(RecordChanged):  # a second writer that read the same tag loses
        write_record(uri, {"version": 3}, expected=tag)
    assert read_record(uri) == ({"version": 2}, newer)


def test_the_lease_excludes_expires_and_is_taken_over(tmp_path):
    uri = str(tmp_path / "BUILDING")
    first = Lease(uri, ttl_s=60, what="a build of idx")
    first.acquire()
    second = Lease(uri, ttl_s=60)
    with pytest.raises(LeaseHeld) as held:
        second.acquire(wait_s=0.2, poll_s=0.05)
    text = str(held.value)
    assert len(text.splitlines()) == 1 and "a build of idx is under way by" in text
    assert first.owner in text
    first.release()
    second.acquire()  # let go: taken at once
    second.release()

    dead = Lease(uri, ttl_s=0.3, renew=False)  # a holder that stops renewing (killed)
    dead.acquire()
    taker = Lease(uri, ttl_s=60)
    taker.acquire(wait_s=5, poll_s=0.05)  # waits out the dead holder's lease, then takes it
    with pytest.raises(LeaseLost):
        dead.renew()  # the old holder, back: its renewal is refused, its work must stop
    with pytest.raises(LeaseLost):
        dead.check()
    taker.release()


# --- One shard file, two versions, each with its own nprobe -----------------------------------


def test_a_shared_shard_answers_each_version_with_its_own_nprobe(ray_session, tmp_path):
    rng = np.random.default_rng(7)
    x = _unit(rng.standard_normal((3000, DIM)))
    root = str(tmp_path / "idx")
    first = write_descriptors(str(tmp_path / "d1"), _ids(0, 2500), x[:2500], network=NETWORK)
    conf = IndexConf(descriptors=first, output=root, factory="IVF32,Flat", shards=2, nprobe=1)
    build_index(conf)
    every = write_descriptors(str(tmp_path / "d2"), _ids(0, 3000), x, network=NETWORK)
    build_index(
        IndexConf(descriptors=every, output=root, factory="IVF32,Flat", shards=1, nprobe=32)
    )
    v2 = index_store.read_manifest(root, 2)
    assert v2["search_params"] == {"nprobe": 32}
    assert v2["shards"][0]["file"].startswith("v1/")  # v1's shard files, shared

    queries = _unit(rng.standard_normal((40, DIM)))
    want = {v: index_store.search(root, queries, 10, version=v).image_ids for v in (1, 2)}
    slot = ShardSet(root)
    slot.load(1)  # the shared files are loaded under v1's nprobe 1
    slot.load(2)
    for version in (1, 2):
        got = slot.search(queries, 10, version)
        names = slot._image_ids(slot._held(version)["parts"], got.ids)
        assert names.tolist() == want[version].tolist(), f"v{version}"
    # v1's nprobe 1 misses neighbours v2's nprobe 32 finds among the very same rows
    assert (want[1] != want[2]).any()


# --- Two builds of one index ------------------------------------------------------------------


def test_two_builds_started_together_one_wins_nothing_is_lost(ray_session, tmp_path):
    rng = np.random.default_rng(3)
    x = _unit(rng.standard_normal((600, DIM)))
    root = str(tmp_path / "idx")
    desc = write_descriptors(str(tmp_path / "d1"), _ids(0, 400), x[:400], network=NETWORK)

    def together(confs: list[IndexConf]) -> list[str | BaseException]:
        out: list[str | BaseException] = [""] * len(confs)
        start = threading.Barrier(len(confs))

        def build(i: int) -> None:
            start.wait()
            try:
                out[i] = build_index(confs[i])
            except BaseException as err:  # the loser's error is the result
                out[i] = err

        threads = [threading.Thread(target=build, args=(i,)) for i in range(len(confs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return out

    conf = IndexConf(descriptors=desc, output=root, shards=2)
    results = together([conf, conf])
    won = [r for r in results if isinstance(r, str)]
    lost = [r for r in results if isinstance(r, LeaseHeld)]
    assert len(won) == 1 and len(lost) == 1, results
    assert won[0].endswith("v1")
    text = str(lost[0])
    assert len(text.splitlines()) == 1 and f"a build of the index at {root}" in text

    more = write_descriptors(str(tmp_path / "d2"), _ids(0, 600), x, network=NETWORK)
    waiting = IndexConf(descriptors=more, output=root, shards=2, lock_wait_s=120)
    results = together([waiting, waiting])
    assert all(isinstance(r, str) and r.endswith("v2") for r in results), results
    assert index_store.list_versions(root) == [1, 2]  # one built v2, the other found it whole
    got = index_store.search(root, x[:5], 1, version=2)
    assert got.image_ids[:, 0].tolist() == _ids(0, 5)
    assert served.read_current(root)[0].version == 2


# --- One service of photos, through changes and faults ----------------------------------------

K = 5


def _photos(count: int) -> list[bytes]:
    rng = np.random.default_rng(11)
    out = []
    for _ in range(count):
        small = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((160, 120), Image.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def _checkpoint(uri: str, seed: int) -> str:
    torch.manual_seed(seed)
    net = build_network(NetworkMeta(backbone="efficientnet_lite0"), weights=None).eval()
    return checkpoint.save(uri, net)


def _described(ck: str, photos: list[bytes], tmp: Path, name: str) -> tuple[str, np.ndarray]:
    """The photos described with the checkpoint at ``ck``, written as the extract stage would."""
    settings = NetworkSettings(weights=ck, max_size=128)
    vectors = np.stack(Describer(settings).describe([decode_photo(p, 128) for p in photos]))
    network = {
        "checkpoint": ck,
        "identity": checkpoint.read_meta(ck)["identity"],
        "meta": {"backbone": "efficientnet_lite0", "pooling": "gem", "p": 3.0},
    }
    content = {"max_size": 128, "scales": [1.0], "whitening": False, "exif_transpose": True}
    ids = [f"photo-{i:02d}" for i in range(len(photos))]
    out = write_descriptors(
        str(tmp / name), ids, vectors, network=network, settings={**content, "dim": 1280}
    )
    return out, vectors


def _pid_changed(handle, pid: int) -> bool:
    try:
        return handle.pid.remote().result(timeout_s=10) != pid
    except Exception:  # the dead replica may still be asked once
        return False


def _replicas(slot: int, count: int = 2) -> dict[str, dict]:
    """What each replica of a slot holds: asked until ``count`` replicas answered."""
    shard = serve.get_deployment_handle(f"IndexShard{slot}", app_name=APP_NAME)
    seen: dict[str, dict] = {}
    deadline = time.monotonic() + 90
    while len(seen) < count:
        assert time.monotonic() < deadline, f"only {len(seen)} of {count} replicas answered"
        answer = shard.held.remote().result(timeout_s=30)
        seen[answer["replica"]] = answer
    return seen


@pytest.fixture(scope="module")
def photo_service(serve_url, tmp_path_factory):
    """v1: 8 photos described with checkpoint C1 (pinned), served by 2 slots of 2 replicas
    following CURRENT every 0.2 s."""
    tmp = tmp_path_factory.mktemp("photo-service")
    photos = _photos(12)
    ck = str(tmp / "train" / "checkpoint")
    _checkpoint(ck, seed=0)
    desc, _ = _described(ck, photos[:8], tmp, "d1")
    root = str(tmp / "idx")
    build_index(IndexConf(descriptors=desc, output=root, shards=2))
    conf = ServeConf.from_flags(index=root, slots=2, replicas=2, follow_s=0.2)
    serve.run(build_app(conf), name=APP_NAME, route_prefix="/")
    try:
        yield {
            "client": SearchClient(serve_url, retries=8),
            "root": root,
            "tmp": tmp,
            "photos": photos,
            "checkpoint": ck,
        }
    finally:
        serve.delete(APP_NAME)


def test_a_reload_reaches_every_replica_before_it_returns(photo_service):
    s = photo_service
    client, root, photos = s["client"], s["root"], s["photos"]
    desc, _ = _described(s["checkpoint"], photos, s["tmp"], "d2")  # 4 photos more, same network
    build_index(IndexConf(descriptors=desc, output=root, shards=2, promote=False))
    assert client.health()["version"] == 1  # published with --no-promote: not served yet
    assert client.reload() == {"version": 2, "previous": 1}
    held = {slot: _replicas(slot) for slot in (0, 1)}
    assert all(2 in h["versions"] for by in held.values() for h in by.values()), held
    for i in range(8, 12):  # new in v2
        assert client.search(photos[i], k=1, content_type="image/png").image_ids == [
            f"photo-{i:02d}"
        ]
    held = {slot: _replicas(slot) for slot in (0, 1)}
    assert all(h["loaded_on_demand"] == 0 for by in held.values() for h in by.values()), held
    # many photos in one request, one of them not a photo: that one alone gets its reason
    batch = client.search_batch(photos=[*photos[8:12], b"not a photo"], k=1)
    assert [a.image_ids for a in batch[:4]] == [[f"photo-{i:02d}"] for i in range(8, 12)]
    assert {a.version for a in batch[:4]} == {2} and "not a usable photo" in batch[4]
    print(f"\nreload returned with v2 on all {sum(len(b) for b in held.values())} shard replicas")


def _stream(client, photos, answers, errors, stop) -> None:
    """Photo after photo, round the list, until ``stop``: (time sent, photo, version,
    image_ids). A query is answered by the state it met when it arrived, however long it then
    takes, so it is placed by when it was sent."""
    i = 0
    while not stop.is_set():
        j = i % len(photos)
        try:
            sent = time.monotonic()
            answer = client.search(photos[j], k=K, content_type="image/png")
            answers.append((sent, j, answer.version, answer.image_ids))
        except SearchError as err:
            errors.append(str(err))
        i += 1


def test_faults_and_a_new_network_under_load_fail_no_query(photo_service):
    s = photo_service
    client, root, photos = s["client"], s["root"], s["photos"]
    before = client.health()["version"]
    answers: list[tuple[float, int, int, list[str]]] = []
    errors: list[str] = []
    stop = threading.Event()
    senders = [
        threading.Thread(target=_stream, args=(client, photos, answers, errors, stop))
        for _ in range(3)
    ]
    for sender in senders:
        sender.start()
    marks: dict[str, float] = {}

    def more_answers(count: int = 5) -> None:
        seen = len(answers)
        _until(lambda: len(answers) >= seen + count, f"{count} answers more", 90)

    try:
        more_answers()
        # trained again into the checkpoint's folder, then (c) the embedder killed: it restarts
        # on the network v2 pinned, not on what the folder holds now
        _checkpoint(s["checkpoint"], seed=1)
        embedder = serve.get_deployment_handle("Embedder", app_name=APP_NAME)
        pid = embedder.pid.remote().result()
        os.kill(pid, signal.SIGKILL)
        _until(lambda: _pid_changed(embedder, pid), "a new embedder replica", 90, 0.5)
        marks["c"] = time.monotonic()
        more_answers()
        # (a) a full re-index with the retrained network, promoted: network and index switch
        desc, _ = _described(s["checkpoint"], photos, s["tmp"], "d3")
        published = build_index(IndexConf(descriptors=desc, output=root, overwrite=True))
        new = int(published.rsplit("v", 1)[-1])
        pinned = index_store.read_manifest(root, new)["network"]
        assert pinned["checkpoint"].startswith(root) and pinned["pinned"].startswith("networks/")
        _until(lambda: client.health()["version"] == new, f"v{new} served", 90)
        marks["a"] = time.monotonic()
        more_answers()
        # (b) the router killed
        router = serve.get_deployment_handle("SearchRouter", app_name=APP_NAME)
        pid = router.pid.remote().result()
        os.kill(pid, signal.SIGKILL)
        _until(lambda: _pid_changed(router, pid), "a new router replica", 90, 0.5)
        marks["b"] = time.monotonic()
        assert client.health()["version"] == new  # still the newest state
        more_answers()
        # (d) one of slot 0's two replicas killed
        victim = next(iter(_replicas(0).values()))
        os.kill(victim["pid"], signal.SIGKILL)
        _until(
            lambda: victim["replica"] not in _replicas(0), "a replacement shard replica", 120, 0.5
        )
        marks["d"] = time.monotonic()
        more_answers()
    finally:
        stop.set()
        for sender in senders:
            sender.join(timeout=120)

    vectors = {v: _vectors_of(root, v, photos) for v in {a[2] for a in answers}}
    want = {
        v: index_store.search(root, q, K, version=v).image_ids.tolist() for v, q in vectors.items()
    }
    wrong = [a for a in answers if a[3] != want[a[2]][a[1]]]
    edges = [0.0, marks["c"], marks["a"], marks["b"], marks["d"], float("inf")]
    phases = ["(c) retrained, embedder killed", "(a) re-index with the new network"]
    phases += ["(b) router killed", "(d) shard replica killed", "after"]
    counts = [sum(1 for a in answers if lo < a[0] <= hi) for lo, hi in itertools.pairwise(edges)]
    print(
        f"\nunder load: {len(answers)} photo queries answered, {len(errors)} failed after "
        f"{client.retried} client retries; v{before} -> v{new}; answered during "
        + ", ".join(f"{name}: {n}" for name, n in zip(phases, counts, strict=True))
        + f"; versions seen {sorted({a[2] for a in answers})}; "
        f"{len(wrong)} not their state's answer"
    )
    assert not errors, errors[:3]
    assert not wrong, wrong[:3]
    assert {a[2] for a in answers} == {before, new}
    after_a = [a[2] for a in answers if a[0] > marks["a"] + 1.0]
    assert after_a and set(after_a) == {new}  # never back to the old state


def _vectors_of(root: str, version: int, photos: list[bytes]) -> np.ndarray:
    """The photos described with the network version ``version`` pinned."""
    network = index_store.read_manifest(root, version)["network"]
    settings = NetworkSettings(weights=network["checkpoint"], max_size=128)
    return np.stack(Describer(settings).describe([decode_photo(p, 128) for p in photos]))


def test_a_restarted_router_comes_back_on_the_current_state(photo_service):
    client, root = photo_service["client"], photo_service["root"]
    newest = client.health()["version"]
    client.reload(newest - 1)  # back to the version before, by hand
    router = serve.get_deployment_handle("SearchRouter", app_name=APP_NAME)
    pid = router.pid.remote().result()
    os.kill(pid, signal.SIGKILL)
    _until(lambda: _pid_changed(router, pid), "a new router replica", 90, 0.5)
    assert client.health()["version"] == newest - 1  # CURRENT's, not the version deployed
    assert served.read_current(root)[0].version == newest - 1
