"""The group stage: scenes from the scene column, or from descriptors (FAISS kNN graph)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model import tables
from model.descriptors import write_descriptors
from pipeline.group import GroupConf, attach_candidates, knn_graph, run
from pipeline.ingest import IngestConf
from pipeline.ingest import run as ingest
from tests.helpers import run_stage, usable_images

REPO = Path(__file__).resolve().parent.parent
SCENES = {"arch": 12, "bridge": 9, "tower": 40}


@pytest.fixture(scope="module")
def ingested(ray_session, tmp_path_factory) -> str:
    """61 small photos in three scene folders, plus one loner, ingested."""
    root = tmp_path_factory.mktemp("group")
    rng = np.random.default_rng(0)
    for scene, count in {**SCENES, "loner": 1}.items():
        (root / "photos" / scene).mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "photos" / scene / f"{i:02d}.jpg")
    ingest(IngestConf(source=str(root / "photos"), output=str(root / "run")))
    return str(root / "run")


def _descriptors(run: str, out: str, drop: int = 0) -> dict[str, str]:
    """Well-separated synthetic descriptors per scene (the loner far from all); returns the
    scene of each image_id. The last ``drop`` photos get no descriptor."""
    rows = usable_images(run, ["image_id", "scene"])
    scene = dict(zip(rows["image_id"].to_pylist(), rows["scene"].to_pylist(), strict=True))
    rng = np.random.default_rng(1)
    centres = {s: rng.standard_normal(64) for s in sorted(set(scene.values()))}
    ids = sorted(scene)[: len(scene) - drop]
    x = np.stack([centres[scene[i]] + 0.15 * rng.standard_normal(64) for i in ids])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    write_descriptors(out, ids, x.astype(np.float32), network={"weights": "test"})
    return scene


def _groups(out: str) -> tuple[list[str], np.ndarray]:
    table = tables.GROUPS.read(out)
    return table["image_id"].to_pylist(), table["group_id"].to_numpy()


def test_the_scene_column_is_the_grouping(ingested, tmp_path):
    scene = _descriptors(ingested, str(tmp_path / "d"))
    uri = run(
        GroupConf(
            images=f"{ingested}/images.parquet",
            descriptors=str(tmp_path / "d"),
            output=str(tmp_path / "g"),
        )
    )
    ids, groups = _groups(uri)
    manifest = tables.GROUPS_OUTPUT.manifest(uri).details
    assert manifest["method"] == "scene column" and "scores" not in manifest
    by_group: dict[int, set[str]] = {}
    for image_id, group in zip(ids, groups.tolist(), strict=True):
        by_group.setdefault(group, set()).add(scene[image_id])
    assert by_group[-1] == {"loner"}  # a one-photo scene is a singleton, not a group
    assert sorted(len(s) for g, s in by_group.items() if g >= 0) == [1, 1, 1]
    assert sorted(manifest["group_sizes"]) == sorted(SCENES.values())


def test_descriptors_group_without_scenes_and_split_big_ones(ingested, tmp_path):
    scene = _descriptors(ingested, str(tmp_path / "d"), drop=2)
    conf = GroupConf(
        images=f"{ingested}/images.parquet",
        descriptors=str(tmp_path / "d"),
        output=str(tmp_path / "g"),
        use_scene=False,
        max_size=15,
    )
    ids, groups = _groups(run(conf))
    manifest = tables.GROUPS_OUTPUT.manifest(conf.output).details
    assert manifest["method"].startswith("descriptors")
    assert len(manifest["undescribed"]) == 2 and len(ids) == sum(SCENES.values()) + 1 - 2
    assert max(manifest["group_sizes"]) <= 15  # the 40-photo tower was split
    for group in set(groups.tolist()) - {-1}:  # no group mixes scenes
        assert len({scene[i] for i, g in zip(ids, groups, strict=True) if g == group}) == 1
    (loner,) = [i for i in scene if scene[i] == "loner"]
    if loner in manifest["undescribed"]:  # one of the two photos given no descriptor
        assert loner not in ids
    else:  # far from every other photo: a singleton, not a group
        assert groups[ids.index(loner)] == -1 and loner in manifest["singletons"]
    assert manifest["scores"]["purity"] == 1.0
    assert manifest["singletons"] == [i for i, g in zip(ids, groups, strict=True) if g < 0]
    first = tables.GROUPS_OUTPUT.manifest(conf.output)
    again = run(conf)  # complete: skipped
    assert tables.GROUPS_OUTPUT.manifest(again) == first and _groups(again)[0] == ids


def test_knn_graph_lists_each_row_with_its_nearest(ray_session):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((300, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sims, idx = knn_graph(x, 5)
    exact = np.argsort(-(x @ x.T), axis=1)[:, :6]
    assert sims.shape == (300, 6) and (idx[:, 0] == np.arange(300)).all()
    assert (np.sort(idx, axis=1) == np.sort(exact, axis=1)).mean() > 0.99
    _, idx_ivf = knn_graph(x, 5, flat_max=100)  # IVF past flat_max
    assert (idx_ivf[:, 0] == np.arange(300)).mean() > 0.95


def test_leftovers_are_offered_to_their_most_similar_groups(ray_session):
    """Against a brute-force NumPy reference: each leftover (a singleton, or a photo of a group
    under attach_below) is offered to its attach_k best groups by the mean of its attach_top
    best similarities, at the threshold or above; groups under attach_below receive nothing."""
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((5, 32))
    labels = np.repeat([0, 1, 2, 3, 4], [30, 20, 12, 2, 1]).astype(np.int64)  # 3: a pair
    labels[-1] = -1
    x = centres[np.maximum(labels, 0)] + 0.6 * rng.standard_normal((len(labels), 32))
    for row, mix in ((62, (0, 1)), (63, (1, 2)), (64, (2, 0))):  # leftovers between scenes
        x[row] = centres[mix[0]] + 0.8 * centres[mix[1]] + 0.6 * rng.standard_normal(32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x = x.astype(np.float32)
    conf = GroupConf(images="i", descriptors="d", output="o", attach_threshold=0.3)
    offers = attach_candidates(x, labels, conf)

    sizes = np.bincount(labels[labels >= 0])
    targets = [g for g in range(len(sizes)) if sizes[g] >= conf.attach_below]
    expected = []
    for row in np.flatnonzero((labels < 0) | (sizes[np.maximum(labels, 0)] < conf.attach_below)):
        scores = {g: np.sort(x[labels == g] @ x[row])[-conf.attach_top :].mean() for g in targets}
        best = sorted(scores, key=scores.get, reverse=True)[: conf.attach_k]
        expected += [(int(row), g) for g in best if scores[g] >= conf.attach_threshold]
    assert [(r, g) for r, g, _ in offers] == expected and len(expected) >= 4
    assert {r for r, _, _ in offers} <= {62, 63, 64}  # each leftover, and only leftovers
    assert all(g in targets for _, g, _ in offers)
    assert attach_candidates(x, labels, GroupConf("i", "d", "o", attach_below=0)) == []


def test_the_group_stage_writes_its_offers(ingested, tmp_path):
    scene = _descriptors(ingested, str(tmp_path / "d"))
    conf = GroupConf(
        images=f"{ingested}/images.parquet",
        descriptors=str(tmp_path / "d"),
        output=str(tmp_path / "g"),
        use_scene=False,
        attach_threshold=-1.0,
    )  # the far loner is offered anyway
    uri = run(conf)
    _, groups = _groups(uri)
    table = tables.CANDIDATES.read(uri)
    offers = list(zip(table["image_id"].to_pylist(), table["group_id"].to_pylist(), strict=True))
    (loner,) = [i for i in scene if scene[i] == "loner"]
    assert [i for i, _ in offers] == [loner, loner]  # to the attach_k = 2 best groups
    assert len({g for _, g in offers}) == 2 and all(g in set(groups.tolist()) for _, g in offers)
    manifest = tables.GROUPS_OUTPUT.manifest(uri).details
    assert manifest["candidates"] == 2 and manifest["leftovers_offered"] == 1


def test_into_s3(ingested, s3_bucket, tmp_path):
    _descriptors(ingested, str(tmp_path / "d"))
    out = f"s3://{s3_bucket}/groups"
    uri = run(
        GroupConf(images=f"{ingested}/images.parquet", descriptors=str(tmp_path / "d"), output=out)
    )
    assert tables.GROUPS_OUTPUT.is_complete(out) and _groups(uri)[1].max() == 2


def test_another_threshold_stops_naming_it_and_overwrite_replaces(ingested, tmp_path):
    _descriptors(ingested, str(tmp_path / "d"))
    conf = GroupConf(
        images=ingested,
        descriptors=str(tmp_path / "d"),
        output=str(tmp_path / "g"),
        use_scene=False,
    )
    out = run(conf)
    with pytest.raises(tables.OutputChanged, match=r"threshold: 0.75 → 0.9.*--overwrite"):
        run(replace(conf, threshold=0.9))
    assert tables.GROUPS_OUTPUT.manifest(out).settings["threshold"] == 0.75
    run(replace(conf, threshold=0.9, overwrite=True))
    assert tables.GROUPS_OUTPUT.manifest(out).settings["threshold"] == 0.9


def test_new_descriptors_upstream_group_again(ingested, tmp_path):
    _descriptors(ingested, str(tmp_path / "d"), drop=5)
    conf = GroupConf(images=ingested, descriptors=str(tmp_path / "d"), output=str(tmp_path / "g"))
    out = run(conf)
    assert len(tables.GROUPS_OUTPUT.manifest(out).details["undescribed"]) == 5
    _descriptors(ingested, str(tmp_path / "d"))  # every photo described now
    run(conf)
    assert tables.GROUPS_OUTPUT.manifest(out).details["undescribed"] == []
    assert len(_groups(out)[0]) == sum(SCENES.values()) + 1


def test_the_command_reports_every_problem_at_once(tmp_path):
    flags = ["--images", str(tmp_path / "none"), "--descriptors", str(tmp_path / "nothing")]
    done = run_stage("group", *flags, "--output", str(tmp_path / "g"), "--k", "0")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--k" in errors[0], done.stderr
    done = run_stage("group", *flags, "--output", str(tmp_path / "g"))
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and len(errors) >= 2, done.stderr
    assert any("--images" in e for e in errors) and any("--descriptors" in e for e in errors)
