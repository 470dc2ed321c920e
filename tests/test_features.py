"""The features stage on a local Ray: local features of ingested photos in Parquet parts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from model.images import image_id
from model.local_feature_store import LocalFeatureStore
from model.local_features import LocalFeatureOptions, features_from_row, read_local_features
from model.tables import LOCAL_FEATURES, LOCAL_FEATURES_OUTPUT, OutputChanged
from pipeline.features import FeaturesConf, run
from tests.helpers import write_images

OPTIONS = {"local_max_size": 320, "local_max_features": 256}


@pytest.fixture(scope="module")
def photos(photos_dir: Path) -> list[Path]:
    return sorted(photos_dir.glob("*/*.jpg"))[::40][:6]  # real photos of several scenes


def _rows(out: str) -> dict[str, dict]:
    table = LOCAL_FEATURES.read(out)
    return {row["image_id"]: row for row in table.to_pylist()}


def test_features_equal_the_readers_and_each_photo_is_a_row_group(
    ray_session, photos, tmp_path: Path
) -> None:
    truncated = photos[0].read_bytes()[:3000]
    images = write_images(
        tmp_path,
        photos,
        extra=[
            ("http://x/broken.jpg", truncated, None),
            ("http://x/copy.jpg", photos[1].read_bytes(), None),
        ],
    )
    conf = FeaturesConf.from_flags(images=str(images), output=str(tmp_path / "local"), **OPTIONS)
    out = run(conf)
    rows = _rows(out)
    details = LOCAL_FEATURES_OUTPUT.manifest(out).details
    assert details["count"] == len(photos) and len(details["failed"]) == 1
    assert "broken.jpg" in details["failed"][0] and len(rows) == len(photos) + 1
    options = LocalFeatureOptions(**OPTIONS)
    for path in photos:
        row = rows[image_id(path.read_bytes())]
        stored = features_from_row(
            row["keypoints"], row["descriptors"], (row["width"], row["height"])
        )
        expected = read_local_features(path.read_bytes(), options, exif_transpose=True)
        assert np.array_equal(stored.keypoints, expected.keypoints)
        assert np.array_equal(stored.descriptors, expected.descriptors)
        assert stored.size == expected.size and max(stored.size) <= 320 and len(stored) <= 256
    assert 0 < details["features_per_photo"] <= 256
    assert details["bytes_per_photo"] == pytest.approx(details["features_per_photo"] * (16 + 128))
    for part in LOCAL_FEATURES.parts(out):
        meta = pq.ParquetFile(part).metadata
        assert meta.num_row_groups == meta.num_rows  # a candidate is read alone


def test_a_rerun_skips_resumes_and_other_settings_stop(ray_session, photos, tmp_path: Path) -> None:
    images = write_images(tmp_path, photos[:2])
    conf = FeaturesConf.from_flags(images=str(images), output=str(tmp_path / "local"), **OPTIONS)
    out = run(conf)
    written = {p: p.stat().st_mtime_ns for p in Path(out).iterdir()}
    assert run(conf) == out
    assert {p: p.stat().st_mtime_ns for p in Path(out).iterdir()} == written
    write_images(tmp_path, photos[1:4])  # one photo gone, two new
    run(conf)
    assert sorted(_rows(out)) == sorted(image_id(p.read_bytes()) for p in photos[1:4])
    assert LOCAL_FEATURES_OUTPUT.manifest(out).details["extracted"] == 2
    with pytest.raises(OutputChanged, match="local_max_features"):
        run(conf.replaced(local_max_features=100))
    run(conf.replaced(local_max_features=100, overwrite=True))
    assert all(len(r["descriptors"]) <= 100 * 128 for r in _rows(out).values())


def test_the_store_reads_a_photo_alone_and_never_a_rewritten_row(
    ray_session, photos, tmp_path: Path
) -> None:
    """The service's reader: each photo's features from its own row group; a photo without
    any is None; features rewritten since a version pinned them are refused, and a store
    that looked them up before the rewrite answers None rather than another photo's."""
    images = write_images(tmp_path, photos[:3])
    conf = FeaturesConf.from_flags(images=str(images), output=str(tmp_path / "local"), **OPTIONS)
    out = run(conf)
    rows = _rows(out)
    ids = [image_id(p.read_bytes()) for p in photos[:3]]
    pinned = LOCAL_FEATURES_OUTPUT.manifest(out).identity
    store = LocalFeatureStore(out, identity=pinned)
    found = store.features([ids[2], "not-a-photo", ids[0]])
    assert found[1] is None and "not-a-photo" not in store
    for image, features in ((ids[2], found[0]), (ids[0], found[2])):
        assert features is not None and features.descriptors.tobytes() == rows[image]["descriptors"]
    stale = LocalFeatureStore(out, identity=pinned)
    assert ids[1] in stale  # its places read now, before the rewrite
    write_images(tmp_path, [photos[0], photos[2]])  # a photo gone: its part is rewritten
    run(conf)
    with pytest.raises(ValueError, match="changed since the index pinned them"):
        LocalFeatureStore(out, identity=pinned)
    assert stale.features([ids[1]]) == [None]  # gone: never another photo's row
    again = stale.features(ids)
    assert again[1] is None
    assert all(
        f is None or f.descriptors.tobytes() == rows[i]["descriptors"]
        for i, f in zip(ids, again, strict=True)
    )
