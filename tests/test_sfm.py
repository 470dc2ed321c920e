"""SfM on Ray with pycolmap, then pairs, on the built-in collection (geometry known exactly).

The tiny preset: 3 landmarks × 18 photos (16 views + 2 queries), 4 distractors. The groups are
the landmarks, with the distractors mixed into them (as a grouping that went wrong would): SfM
must keep them out of the landmark models.
"""

from __future__ import annotations

import csv
import os
import pickle
import re
import shutil
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import ray
from PIL import Image
from ray.autoscaler.v2.sdk import get_cluster_status

from cluster.index_store import read_manifest, search
from cluster.mining import MiningIndex
from model import checkpoint, storage, tables
from model.datasets.landmarks import load_cameras
from model.descriptors import read_descriptors, write_descriptors
from model.training_set import read_training_set, split_clusters
from model.whitening import apply_whitening
from pipeline.extract import ExtractConf
from pipeline.extract import run as extract
from pipeline.group import GroupConf
from pipeline.group import run as group
from pipeline.index import IndexConf
from pipeline.index import run as index
from pipeline.ingest import IngestConf
from pipeline.ingest import run as ingest
from pipeline.pairs import PairsConf
from pipeline.pairs import run as mine_pairs
from pipeline.sfm import SfmConf
from pipeline.sfm import run as sfm
from pipeline.train.tuples import epoch_tuples, worker_share
from pipeline.whiten import WhitenConf
from pipeline.whiten import run as whiten
from tests.helpers import usable_images

pytestmark = pytest.mark.slow


def _umeyama(src: np.ndarray, dst: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """The similarity (s, R, t) that best maps ``src`` onto ``dst`` (least squares)."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    a, b = src - mu_s, dst - mu_d
    u, d, vt = np.linalg.svd(b.T @ a / len(src))
    sign = np.eye(3)
    sign[2, 2] = np.sign(np.linalg.det(u @ vt))
    rotation = u @ sign @ vt
    scale = np.trace(np.diag(d) @ sign) / a.var(0).sum()
    return scale, rotation, mu_d - scale * rotation @ mu_s


@pytest.fixture(scope="module")
def landmarks(ray_session, tiny_collection: Path, tmp_path_factory) -> dict:
    root = tiny_collection
    cameras = load_cameras(root).to_pylist()
    tmp = tmp_path_factory.mktemp("sfm")
    manifest = tmp / "photos.csv"
    with manifest.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["uri", "scene"])
        for i, cam in enumerate(c for c in cameras if c["landmark"] < 0):  # distractors mixed in
            writer.writerow([str(root / "jpg" / f"{cam['name']}.jpg"), f"lm{i % 3}"])
        for cam in cameras:
            if cam["landmark"] >= 0:
                writer.writerow([str(root / "jpg" / f"{cam['name']}.jpg"), f"lm{cam['landmark']}"])
    run = str(tmp / "run")
    images = ingest(IngestConf(source=str(manifest), output=run))
    # Descriptors are not needed to group by the scene column; group reads them for the
    # manifest only, so a tiny synthetic table of the right ids stands in.
    table = usable_images(images, ["image_id", "uri"])
    ids = table.column("image_id").to_pylist()
    descriptors = write_descriptors(
        f"{run}/descriptors", ids, np.eye(len(ids), dtype=np.float32), network={"weights": "test"}
    )
    groups = group(GroupConf(images=images, descriptors=descriptors, output=f"{run}/groups"))
    out = sfm(SfmConf(images=images, groups=groups, output=f"{run}/sfm", mapper="incremental"))
    # Global mapping on these 320x240 px photos wants the extra inliers of guided matching.
    global_conf = SfmConf(
        images=images,
        groups=f"{run}/groups",
        output=f"{run}/sfm-global",
        mapper="global",
        guided_matching=True,
    )
    sfm(global_conf)
    name_of = {i: Path(u).stem for i, u in zip(ids, table.column("uri").to_pylist(), strict=True)}
    return {
        "run": run,
        "images": images,
        "sfm": out,
        "global_conf": global_conf,
        "cameras": {c["name"]: c for c in cameras},
        "name": name_of,
    }


def test_landmark_photos_register_and_models_stay_pure(landmarks) -> None:
    rows = tables.SFM_IMAGES.read(landmarks["sfm"]).to_pylist()
    cams, name = landmarks["cameras"], landmarks["name"]
    landmark = {r["image_id"]: cams[name[r["image_id"]]]["landmark"] for r in rows}
    ours = [r for r in rows if landmark[r["image_id"]] >= 0]
    registered = np.mean([r["registered"] for r in ours])
    by_model: dict[str, set[int]] = {}
    for r in rows:
        if r["registered"]:
            by_model.setdefault(r["model_id"], set()).add(landmark[r["image_id"]])
    distractors_in = [
        r["image_id"] for r in rows if landmark[r["image_id"]] < 0 and r["registered"]
    ]
    print(
        f"\nbuilt-in: {registered:.3f} of {len(ours)} landmark photos registered in "
        f"{len(by_model)} models; distractors registered: {len(distractors_in)}"
    )
    assert registered >= 0.95
    for model, members in by_model.items():
        assert len(members) == 1, f"model {model} mixes {members}"  # one landmark, or distractors
    summary = tables.SFM_OUTPUT.manifest(landmarks["sfm"]).details
    assert summary["groups"]["ok"] == 3
    logs = storage.list_files(f"{landmarks['sfm']}/logs", (".log",))
    assert len(logs) == 3 and ".cc:" in storage.read_text(logs[0])  # pycolmap's glog lines


@pytest.mark.parametrize("mapper", ["incremental", "global"])
def test_camera_centres_match_the_generator_after_a_similarity(landmarks, mapper) -> None:
    out = landmarks["sfm"] + ("-global" if mapper == "global" else "")
    rows = tables.SFM_IMAGES.read(out).to_pylist()
    cams, name = landmarks["cameras"], landmarks["name"]
    errors, per_model = [], {}
    for model in sorted({r["model_id"] for r in rows if r["registered"]}):
        members = [r for r in rows if r["model_id"] == model]
        truth = [cams[name[r["image_id"]]] for r in members]
        if truth[0]["landmark"] < 0 or len(members) < 4:
            continue
        est = np.array([[r["centre_x"], r["centre_y"], r["centre_z"]] for r in members])
        gt = np.array([t["centre"] for t in truth], dtype=np.float64)
        s, rot, t = _umeyama(est, gt)
        aligned = (s * (rot @ est.T)).T + t
        distance = np.linalg.norm(gt - np.asarray(truth[0]["landmark_centre"]), axis=1)
        relative = np.linalg.norm(aligned - gt, axis=1) / np.median(distance)
        per_model[model] = round(float(np.median(relative)), 4)
        errors += list(relative)
    median = float(np.median(errors))
    print(
        f"\n{mapper} mapping, camera centres after a similarity: median error {median:.4f} "
        f"of the camera distance to the landmark (per model: {per_model})"
    )
    assert len(per_model) == 3 and median < 0.05 and max(per_model.values()) < 0.05


def test_pairs_come_from_one_landmark_and_export_to_cirtorch(landmarks, tmp_path) -> None:
    cams, name = landmarks["cameras"], landmarks["name"]
    pkl = tmp_path / "train.pkl"
    uri = mine_pairs(
        PairsConf(sfm=landmarks["sfm"], output=str(tmp_path / "pairs"), export_pkl=str(pkl))
    )
    pairs = tables.PAIRS.read(uri).to_pylist()
    assert len(pairs) >= 40
    for row in pairs:
        lm = cams[name[row["query_id"]]]["landmark"]
        assert lm >= 0 and row["positives"] and row["query_id"] not in row["positives"]
        assert {cams[name[p]]["landmark"] for p in row["positives"]} == {lm}
        assert row["overlaps"] == sorted(row["overlaps"], reverse=True)
        assert min(row["overlaps"]) >= 0.2
    layout = pickle.loads(pkl.read_bytes())["train"]
    assert set(layout) == {"cids", "cluster", "qidxs", "pidxs"}
    assert len(layout["qidxs"]) == len(pairs) == len(layout["pidxs"])
    for q, p in zip(layout["qidxs"], layout["pidxs"], strict=True):
        assert layout["cluster"][q] == layout["cluster"][p]


def test_a_rerun_reconstructs_only_what_is_missing(landmarks, tmp_path) -> None:
    sfm_dir = Path(landmarks["sfm"])
    copy = tmp_path / "sfm"
    shutil.copytree(sfm_dir, copy)
    tables.SFM_OUTPUT.unpublish(str(copy))
    group_files = sorted((copy / "groups").glob("*.json"))
    kept = {p.name: p.read_text() for p in group_files[1:]}
    group_files[0].unlink()  # that group is reconstructed again, the others are not
    run = landmarks["run"]
    sfm(
        SfmConf(
            images=f"{run}/images.parquet",
            groups=f"{run}/groups",
            output=str(copy),
            mapper="incremental",
        )
    )
    assert tables.SFM_OUTPUT.is_complete(str(copy))
    assert (copy / "groups" / group_files[0].name).exists()
    assert {p.name: p.read_text() for p in sorted((copy / "groups").glob("*.json"))[1:]} == kept


def test_bad_photos_a_lone_photo_and_a_blank_scene_are_each_reported(
    ray_session, tiny_collection, tmp_path
) -> None:
    photos = tmp_path / "photos"
    source = sorted((tiny_collection / "jpg").glob("lm00_v*.jpg"))
    (photos / "lm0").mkdir(parents=True)
    for path in source:
        (photos / "lm0" / path.name).write_bytes(path.read_bytes())
    (photos / "lm0" / "corrupt.jpg").write_bytes(source[0].read_bytes()[:300])
    (photos / "lm0" / "notes.jpg").write_text("not a photo")
    (photos / "lone").mkdir()
    lone = sorted((tiny_collection / "jpg").glob("lm01_v*.jpg"))[0]  # no copy of an lm0 photo
    (photos / "lone" / "only.jpg").write_bytes(lone.read_bytes())
    (photos / "blank").mkdir()
    for i in range(6):  # an untextured object: nothing for SIFT to find
        Image.new("RGB", (320, 240), (120 + 20 * i, 160, 200)).save(photos / "blank" / f"{i}.jpg")
    run = str(tmp_path / "run")
    images = ingest(IngestConf(source=str(photos), output=run))
    everything = tables.IMAGES.read(images, ["uri", "error"]).to_pylist()
    failed = {Path(r["uri"]).name: r["error"] for r in everything if r["error"]}
    assert set(failed) == {"corrupt.jpg", "notes.jpg"}
    ids = usable_images(images, ["image_id"]).column(0).to_pylist()
    write_descriptors(
        f"{run}/d", ids, np.eye(len(ids), dtype=np.float32), network={"weights": "test"}
    )
    group(GroupConf(images=images, descriptors=f"{run}/d", output=f"{run}/g"))
    out = sfm(SfmConf(images=images, groups=f"{run}/g", output=f"{run}/sfm"))
    groups = tables.SFM_GROUPS.read(out).to_pylist()
    status = {g["photos"]: (g["status"], g["reason"]) for g in groups}
    assert status[16][0] == "ok"
    assert status[6][0] == "failed" and status[6][1]  # the blank scene, with its reason
    summary = tables.SFM_OUTPUT.manifest(out).details
    assert summary["groups"] == {"ok": 1, "failed": 1, "skipped": 1}  # the lone photo: skipped


@ray.remote(num_cpus=2)
class _Holder:
    """Holds every CPU of the test's Ray, as a cluster waiting for the autoscaler's node."""

    def ready(self) -> bool:
        return True


def _waiting_tasks() -> int:
    """Tasks and actors Ray holds back for want of resources (as the autoscaler sees them)."""
    status = get_cluster_status(ray.get_runtime_context().gcs_address)
    demands = status.resource_demands.ray_task_actor_demand
    return sum(request.count for demand in demands for request in demand.bundles_by_count)


def test_a_group_past_its_time_limit_fails_and_the_run_goes_on(landmarks, tmp_path) -> None:
    """The limit counts from when a worker starts the group: while every CPU is held, the
    submitted groups wait past it unharmed; once they run, each is stopped at it."""
    out = tmp_path / "sfm"
    holder = _Holder.remote()
    ray.get(holder.ready.remote())
    # the fixture's global run (every group reconstructed) with a time limit
    control = landmarks["global_conf"]
    conf = replace(control, output=str(out), timeout_s=0.5)
    result: list[str] = []
    runner = threading.Thread(target=lambda: result.append(sfm(conf)), daemon=True)
    runner.start()
    deadline = time.monotonic() + 120
    while not _waiting_tasks() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _waiting_tasks(), "the groups never reached Ray"
    waited_past_the_limit = time.monotonic() + 4 * conf.timeout_s
    while time.monotonic() < waited_past_the_limit:
        assert not list(out.glob("groups/*.json")), "a group was timed while it waited"
        time.sleep(0.1)
    ray.kill(holder)
    runner.join(timeout=300)
    groups = tables.SFM_GROUPS.read(result[0]).to_pylist()
    assert [g["status"] for g in groups] == ["failed"] * 3
    assert all("--timeout-s" in g["reason"] for g in groups)
    assert not tables.SFM_IMAGES.read(out, ["registered"])[0].to_pylist().count(True)
    # the same run without the limit (the fixture's, which ran before): every group is whole
    assert control.timeout_s > 600
    assert tables.SFM_OUTPUT.manifest(control.output).details["groups"]["ok"] == 3


def test_sfm_and_pairs_into_s3(landmarks, s3_bucket) -> None:
    run = landmarks["run"]
    out = sfm(
        SfmConf(
            images=f"{run}/images.parquet",
            groups=f"{run}/groups",
            output=f"s3://{s3_bucket}/sfm",
            mapper="incremental",
        )
    )
    assert tables.SFM_OUTPUT.is_complete(out) and storage.list_files(f"{out}/models", (".bin",))
    local = tables.SFM_IMAGES.read(landmarks["sfm"], ["registered"])[0].to_pylist()
    found = tables.SFM_IMAGES.read(out, ["registered"])[0].to_pylist()
    assert found.count(True) == local.count(True)
    pairs = mine_pairs(PairsConf(sfm=out, output=f"s3://{s3_bucket}/pairs"))
    assert len(tables.PAIRS.read(pairs)) >= 40


def _regroup(
    landmarks: dict, folder: Path, moved: int, *, offer: bool = True
) -> tuple[list[str], dict[str, int]]:
    """The fixture's groups with ``moved`` views of the first landmark made singletons and
    (``offer``) offered, as the group stage offers leftovers, to their landmark's group and to
    another's, published as a group output; returns the moved ids and every photo's original
    group."""
    source = tables.GROUPS_OUTPUT.manifest(f"{landmarks['run']}/groups")
    table = tables.GROUPS.read_from(source)
    ids, groups = table["image_id"].to_pylist(), table["group_id"].to_pylist()
    original = dict(zip(ids, groups, strict=True))
    cams, name = landmarks["cameras"], landmarks["name"]
    first = [i for i in ids if cams[name[i]]["landmark"] == 0 and "_v" in name[i]]
    home = original[first[0]]
    other = next(g for g in set(original.values()) if g != home)
    moved_ids = sorted(first)[:moved]
    labels = [-1 if i in moved_ids else original[i] for i in ids]
    tables.GROUPS.write(str(folder), pa.table({"image_id": ids, "group_id": labels}))
    offers = [(i, g) for i in moved_ids for g in (other, home)] if offer else []
    candidates = {
        "image_id": [i for i, _ in offers],
        "group_id": [g for _, g in offers],
        "similarity": [0.7] * len(offers),
    }
    tables.CANDIDATES.write(str(folder), pa.table(candidates, schema=tables.CANDIDATES.schema))
    tables.GROUPS_OUTPUT.publish(str(folder), inputs=source.inputs, settings=source.settings)
    return moved_ids, original


def test_a_rerun_after_one_groups_photos_changed_reconstructs_only_that_group(
    landmarks, tmp_path
) -> None:
    """Same settings, another grouping upstream: the groups made of the same photos keep their
    stored models; the group that lost a photo is reconstructed again."""
    moved, original = _regroup(landmarks, tmp_path / "groups", moved=1, offer=False)
    copy = tmp_path / "sfm"
    shutil.copytree(landmarks["sfm"], copy)
    run = landmarks["run"]
    out = sfm(
        SfmConf(
            images=f"{run}/images.parquet",
            groups=str(tmp_path / "groups"),
            output=str(copy),
            mapper="incremental",
        )
    )
    details = tables.SFM_OUTPUT.manifest(out).details
    changed = original[moved[0]]
    assert details["reconstructed"] == [changed]
    assert details["reused"] == sorted(set(original.values()) - {changed})
    rows = {r["image_id"]: r for r in tables.SFM_IMAGES.read(out).to_pylist()}
    assert rows[moved[0]]["group_id"] == -1 and not rows[moved[0]]["registered"]


def test_leftovers_offered_to_groups_register_where_geometry_agrees(landmarks, tmp_path) -> None:
    moved, original = _regroup(landmarks, tmp_path / "groups", moved=3)
    run = landmarks["run"]
    out = sfm(
        SfmConf(
            images=f"{run}/images.parquet",
            groups=str(tmp_path / "groups"),
            output=str(tmp_path / "sfm"),
            mapper="incremental",
        )
    )
    rows = tables.SFM_IMAGES.read(out).to_pylist()
    assert sorted(r["image_id"] for r in rows) == sorted(original)  # one row per photo
    row = {r["image_id"]: r for r in rows}
    for image_id in moved:  # registered in its landmark's group, not in the other it was offered
        r = row[image_id]
        assert r["registered"] and r["attached"], r
        assert r["group_id"] == r["cluster_id"] == original[image_id]
        assert r["model_id"].startswith(f"{original[image_id]}-") and r["point3d_ids"]
    assert not any(r["attached"] for r in rows if r["image_id"] not in moved)
    offered = {g["group_id"]: g["offered"] for g in tables.SFM_GROUPS.read(out).to_pylist()}
    assert sorted(offered.values()) == [0, 0, 3, 3]  # singletons (-1), one untouched group
    assert tables.SFM_OUTPUT.manifest(out).details["attached"] == 3
    pairs = mine_pairs(PairsConf(sfm=out, output=str(tmp_path / "pairs")))
    pairs = tables.PAIRS.read(pairs).to_pylist()
    positives_of = {p["query_id"]: p["positives"] for p in pairs}
    assert all(positives_of.get(i) for i in moved)  # attached photos are training queries too


def test_a_segfault_in_one_group_fails_that_group_and_the_run_goes_on(landmarks, tmp_path) -> None:
    """SIGSEGV to the worker running pycolmap (its pid is in the name of pycolmap's log file,
    so the test kills only the worker it saw start); the other groups finish, the crashed one
    is reported, and --retry-failed reconstructs it."""
    run, scratch = landmarks["run"], tmp_path / "scratch"
    killed: list[int] = []

    def kill_the_first_worker() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            for log in scratch.rglob("cirray-sfm-*/colmap.log*"):
                match = re.search(r"\.(\d+)$", log.name)
                if match:
                    killed.append(int(match.group(1)))
                    os.kill(killed[0], signal.SIGSEGV)
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_the_first_worker, daemon=True)
    killer.start()
    conf = SfmConf(
        images=f"{run}/images.parquet",
        groups=f"{run}/groups",
        output=str(tmp_path / "sfm"),
        mapper="incremental",
        scratch=str(scratch),
        cpus_per_task=2,
    )  # one group at a time, so one is hit
    out = sfm(conf)
    killer.join(timeout=5)
    assert killed, "no pycolmap log appeared in the scratch folder"
    groups = tables.SFM_GROUPS.read(out).to_pylist()
    failed = [g for g in groups if g["status"] == "failed"]
    assert len(failed) == 1 and "crashed the worker" in failed[0]["reason"], groups
    assert sum(g["status"] == "ok" for g in groups) == 2
    again = sfm(replace(conf, retry_failed=True))
    details = tables.SFM_OUTPUT.manifest(again).details
    assert details["groups"]["ok"] == 3 and details["reconstructed"] == [failed[0]["group_id"]]


def test_the_chain_composes_from_return_values_to_a_whitened_index(landmarks, tmp_path) -> None:
    """Photos → ingest → group → sfm (the fixture) → pairs → whiten → extract → index, each
    stage given the one before's return value: pipeline.whiten's Lw, learned from the mined
    whitening pairs over ImageNet Lite0 descriptors, is a checkpoint; extracting with it gives
    the plain descriptors whitened, and the index built from them finds each photo first."""
    images = landmarks["images"]
    pairs = mine_pairs(PairsConf(sfm=landmarks["sfm"], output=str(tmp_path / "pairs")))
    plain = extract(
        ExtractConf.from_flags(
            images=images, output=str(tmp_path / "d"), max_size=240, threads_per_actor=2
        )
    )
    ckpt = whiten(WhitenConf(descriptors=plain, pairs=pairs, output=str(tmp_path / "lw")))
    params = checkpoint.load(ckpt).whitening
    assert params.meta["pairs"] >= 40 and params.P.shape == (params.meta["dim"], 1280)
    assert params.meta["cross_validation"]["folds"] >= 2 and 0 <= params.meta["shrinkage"] <= 1
    paper = whiten(
        WhitenConf.from_flags(
            descriptors=plain,
            pairs=pairs,
            output=str(tmp_path / "lw0"),
            whiten_shrinkage=0.0,
            whiten_dim=1280,
        )
    )
    fixed = checkpoint.load(paper).whitening  # the paper's Lw, as asked
    assert fixed.P.shape == (1280, 1280) and fixed.meta["shrinkage"] == 0.0
    assert "cross_validation" not in fixed.meta
    whitened = extract(
        ExtractConf.from_flags(
            images=images,
            output=str(tmp_path / "w"),
            weights=ckpt,
            max_size=240,
            threads_per_actor=2,
        )
    )
    a, b = read_descriptors(plain), read_descriptors(whitened)
    order = np.argsort(a.image_ids)
    assert (a.image_ids[order] == np.sort(b.image_ids)).all()
    expected = apply_whitening(a.vectors[order], params.m, params.P)
    got = b.vectors[np.argsort(b.image_ids)]
    assert np.allclose(got, expected, atol=2e-3), np.abs(got - expected).max()
    version = index(IndexConf(descriptors=whitened, output=str(tmp_path / "index"), shards=2))
    found = search(version.rsplit("/", 1)[0], b.vectors, k=1)
    assert (found.image_ids[:, 0] == b.image_ids).mean() > 0.95
    assert read_manifest(version.rsplit("/", 1)[0])["network"]["identity"] == checkpoint.identity(
        ckpt
    )


def test_training_tuples_from_the_pairs_and_mined_negatives(landmarks, tmp_path) -> None:
    """pairs → pool and queries → negatives from the mining index → one epoch's tuples; whole
    landmarks held out for validation; worker shares partition the rows."""
    mine_pairs(PairsConf(sfm=landmarks["sfm"], output=str(tmp_path / "pairs")))
    data = read_training_set(str(tmp_path / "pairs"))
    cams, name = landmarks["cameras"], landmarks["name"]
    landmark_of = np.array([cams[name[i]]["landmark"] for i in data.image_ids])
    assert len(data.image_ids) == len(landmarks["name"])  # every grouped photo is in the pool
    assert len(data.queries) >= 40 and len(set(data.clusters.tolist())) == 3
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((len(data.image_ids), 16)).astype(np.float32)
    pool = MiningIndex(factory="Flat")
    pool.reset(epoch=0, size=len(vectors))
    for rank in range(2):  # two workers' shares
        rows = worker_share(len(vectors), rank, 2)
        pool.add(rows, vectors[rows], data.clusters[rows])
    negatives, _ = pool.mine(vectors[data.queries], data.clusters[data.queries], nnum=2)
    tuples = epoch_tuples(data, negatives, rng)
    assert len(tuples) == len(data.queries)  # 3 clusters: 2 negatives for every query
    for q, p, *negs in tuples.tolist():
        assert landmark_of[p] == landmark_of[q] >= 0 and p != q
        assert data.clusters[p] == data.clusters[q]
        assert data.models[p] == data.models[q] is not None  # positives from the query's model
        assert data.clusters[q] not in data.clusters[negs] and len(set(data.clusters[negs])) == 2
    again = epoch_tuples(data, negatives, np.random.default_rng(1))
    assert (again[:, 0] == tuples[:, 0]).all()  # same queries, positives drawn anew

    train, val = split_clusters(data, held_out=0.3, seed=0)
    assert set(train.clusters.tolist()).isdisjoint(val.clusters.tolist())
    assert len(train.queries) + len(val.queries) == len(data.queries) and len(val.queries)
    assert set(val.image_ids[val.queries]) <= set(data.image_ids[data.queries])
    shares = [worker_share(10, r, 3) for r in range(3)]
    assert sorted(np.concatenate(shares).tolist()) == list(range(10))
    with pytest.raises(ValueError, match="negatives must be"):
        epoch_tuples(data, negatives[:3], rng)
