"""The shared real photos as a user would run them: ingest → extract → index → plain FAISS search.

Scene-level recall@1: for each photo, the first result other than itself is of its own scene.
"""

from __future__ import annotations

from pathlib import Path

import boto3
import numpy as np
import pyarrow.compute as pc
import pytest

from cluster.index_store import read_manifest, search
from model.descriptors import read_descriptors
from model.tables import GROUPS, GROUPS_OUTPUT, IMAGES, INDEX_VERSION
from pipeline.extract import ExtractConf
from pipeline.extract import run as extract
from pipeline.group import GroupConf
from pipeline.group import run as group
from pipeline.index import IndexConf
from pipeline.index import run as index
from pipeline.ingest import IngestConf
from pipeline.ingest import run as ingest

pytestmark = pytest.mark.slow


def _scene_recall_at_1(run: str) -> float:
    rows = IMAGES.read(
        f"{run}/images.parquet", ["image_id", "scene"], filter=pc.field("error").is_null()
    )
    scene = dict(zip(rows["image_id"].to_pylist(), rows["scene"].to_pylist(), strict=True))
    desc = read_descriptors(f"{run}/descriptors")
    found = search(f"{run}/index", desc.vectors, k=2)
    hits = []
    for query, results in zip(desc.image_ids, found.image_ids, strict=True):
        first = next(r for r in results if r != query)  # the photo itself is not an answer
        hits.append(scene[first] == scene[query])
    return float(np.mean(hits))


def _pipeline(source: str, run: str, max_size: int) -> str:
    """ingest → extract → index, each stage given the one before's return value."""
    images = ingest(IngestConf(source=source, output=run))
    descriptors = extract(
        ExtractConf.from_flags(images=images, output=f"{run}/descriptors", max_size=max_size)
    )
    return index(IndexConf(descriptors=descriptors, output=f"{run}/index", shards=2))


def test_real_photos_locally(real_run: str) -> None:
    run = real_run  # conftest: ingest → extract (512 px) → index --shards 2, as _pipeline does
    manifest = read_manifest(f"{run}/index")
    assert len(manifest["shards"]) == 2 and manifest["count"] == 373
    recall = _scene_recall_at_1(run)
    print(f"\nreal photos, local: scene recall@1 {recall:.4f} over {manifest['count']} photos")
    assert recall >= 0.95


def test_real_photos_into_s3(ray_session, photos_dir: Path, s3_bucket: str) -> None:
    s3 = boto3.client("s3")
    photos = sorted(photos_dir.glob("*/*.jpg"))[::3]  # a third of them, every scene
    for path in photos:
        s3.upload_file(str(path), s3_bucket, f"photos/{path.parent.name}/{path.name}")
    run = f"s3://{s3_bucket}/run"
    version = _pipeline(f"s3://{s3_bucket}/photos", run, max_size=384)
    assert version.startswith(f"{run}/index/v") and INDEX_VERSION.is_complete(version)
    recall = _scene_recall_at_1(run)
    print(f"\nreal photos, S3: scene recall@1 {recall:.4f} over {len(photos)} photos")
    assert recall >= 0.95


def test_real_photos_group_into_their_scenes(real_run, tmp_path):
    conf = GroupConf(
        images=f"{real_run}/images.parquet",
        descriptors=f"{real_run}/descriptors",
        output=str(tmp_path / "g"),
        use_scene=False,
    )
    uri = group(conf)
    details = GROUPS_OUTPUT.manifest(uri).details
    scores = details["scores"]
    print(
        f"\nreal photos grouped: {details['groups']} groups, "
        f"{len(details['singletons'])} singletons, purity {scores['purity']:.3f}, "
        f"recall {scores['recall']:.3f}"
    )
    assert GROUPS.read(uri).num_rows == 373
    assert scores["purity"] >= 0.9 and scores["recall"] >= 0.9
