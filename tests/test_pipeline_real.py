"""The shared real photos as a user would run them, from and into S3: ingest → extract → index
→ plain FAISS search.

Scene-level recall@1: for each photo, the first result other than itself is of its own scene.
"""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pytest

from cluster.index_store import read_manifest, search, version_dir
from model import storage
from model.descriptors import read_descriptors
from model.tables import GROUPS, GROUPS_OUTPUT, IMAGES, INDEX_VERSION
from pipeline.group import GroupConf
from pipeline.group import run as group

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


def test_real_photos_through_s3(real_run: str) -> None:
    run = real_run  # conftest: the photos on S3 → ingest → extract (384 px) → index --shards 2
    manifest = read_manifest(f"{run}/index")
    version = storage.join(run, "index", version_dir(manifest["version"]))
    assert run.startswith("s3://") and INDEX_VERSION.is_complete(version)
    assert len(manifest["shards"]) == 2 and manifest["count"] == 373
    recall = _scene_recall_at_1(run)
    print(f"\nreal photos through S3: scene recall@1 {recall:.4f} over {manifest['count']} photos")
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
