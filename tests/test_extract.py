"""The extract stage on a local Ray: its actor pool gives the in-process descriptors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from model.extraction import ExtractOptions, ImageFiles, extract_descriptors
from model.networks import NetworkMeta, build_network
from pipeline.extract import ExtractConf, read_descriptors, run

MAX_SIZE = 128


def _images_table(paths: list[Path], extra: list[tuple[str, bytes | None, str | None]] = ()):
    """An images.parquet as ingest writes it: one row per uri, the photo bytes kept."""
    rows = [(str(p), p.read_bytes(), None) for p in paths] + list(extra)
    return pa.table(
        {
            "image_id": [hashlib.sha256(b or u.encode()).hexdigest()[:16] for u, b, _ in rows],
            "uri": [u for u, _, _ in rows],
            "bytes": pa.array([b for _, b, _ in rows], type=pa.binary()),
            "error": pa.array([e for _, _, e in rows], type=pa.string()),
        }
    )


@pytest.fixture(scope="module")
def photos(photos_dir: Path) -> list[Path]:
    return sorted(photos_dir.glob("*/*.jpg"))[::25][:12]  # a dozen real photos of several scenes


def test_actor_pool_equals_in_process_extraction(ray_session, photos, tmp_path: Path) -> None:
    truncated = photos[0].read_bytes()[:4000]
    table = _images_table(
        photos,
        extra=[
            ("http://x/broken.jpg", truncated, None),  # decodes badly: a row with its reason
            ("http://x/404.jpg", None, "HTTP 404"),  # failed at ingest: stays failed
            ("http://x/copy.jpg", photos[1].read_bytes(), None),  # same bytes, another uri
        ],
    )
    images = tmp_path / "images.parquet"
    pq.write_table(table, images)
    out = run(ExtractConf(images=str(images), output=str(tmp_path / "desc"), max_size=MAX_SIZE))
    ids, vectors, manifest = read_descriptors(out)
    assert manifest["count"] == len(photos) and len(manifest["failed"]) == 2
    assert any("broken.jpg" in f for f in manifest["failed"])
    assert any("HTTP 404" in f for f in manifest["failed"])
    assert len(set(ids)) == len(ids) == len(photos)  # the copy is described once

    net = build_network(NetworkMeta(), "imagenet").eval()
    files = ImageFiles(photos, MAX_SIZE, exif_transpose=True)
    expected = extract_descriptors(net, files, ExtractOptions(device="cpu", progress=False))
    by_id = dict(zip(table.column("image_id").to_pylist()[: len(photos)], expected, strict=True))
    got = np.stack([vectors[ids.index(i)] for i in by_id])
    np.testing.assert_allclose(got, np.stack(list(by_id.values())), atol=1e-5)
    assert (
        manifest["dim"] == 1280 and manifest["network"]["meta"]["backbone"] == "efficientnet_lite0"
    )
    assert json.loads((tmp_path / "desc" / "manifest.json").read_text())["count"] == len(photos)


def test_rerun_skips_and_resumes(ray_session, photos, tmp_path: Path) -> None:
    images = tmp_path / "images.parquet"
    pq.write_table(_images_table(photos[:4]), images)
    conf = ExtractConf(images=str(images), output=str(tmp_path / "desc"), max_size=64)
    out = run(conf)
    first = sorted(Path(out).glob("*.parquet"))
    run(conf)  # complete: skipped, nothing rewritten
    assert sorted(Path(out).glob("*.parquet")) == first
    # An interrupted run: its parts are there, the marker and manifest are not.
    (Path(out) / "_SUCCESS").unlink()
    (Path(out) / "manifest.json").unlink()
    pq.write_table(_images_table(photos[:6]), images)  # two more photos since
    run(conf)
    ids, _, manifest = read_descriptors(out)
    assert manifest["count"] == 6 and len(set(ids)) == 6
    assert len(list(Path(out).glob("*.parquet"))) > len(first)  # only the new ones written


def test_bad_input_is_named_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no images table at .*run pipeline\.ingest first"):
        run(ExtractConf(images=str(tmp_path / "none.parquet"), output=str(tmp_path / "d")))


def test_images_and_descriptors_on_s3(ray_session, photos, s3_bucket: str, tmp_path) -> None:
    from model import storage

    local = tmp_path / "images.parquet"
    pq.write_table(_images_table(photos[:3]), local)
    storage.write_bytes(f"s3://{s3_bucket}/run/images.parquet", local.read_bytes())
    out = run(
        ExtractConf(
            images=f"s3://{s3_bucket}/run/images.parquet",
            output=f"s3://{s3_bucket}/run/descriptors",
            max_size=64,
        )
    )
    assert out == f"s3://{s3_bucket}/run/descriptors" and storage.is_complete(out)
    ids, vectors, manifest = read_descriptors(out)
    assert len(ids) == 3 and vectors.shape == (3, 1280) and manifest["count"] == 3
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
