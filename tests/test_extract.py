"""The extract stage on a local Ray: its actor pool gives the in-process descriptors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from model.descriptors import read_descriptors
from model.extraction import ExtractOptions, ImageFiles, extract_descriptors
from model.networks import NetworkMeta, build_network
from pipeline.extract import ExtractConf, run
from pipeline.ingest import IMAGES_SCHEMA, image_id

MAX_SIZE = 128


def _write_images(folder: Path, paths: list[Path], extra=()) -> Path:
    """An ingest output as pipeline.ingest writes it: parts of IMAGES_SCHEMA, then _SUCCESS.

    ``extra`` rows are ``(uri, bytes or None, error or None)``; ids are content hashes.
    """
    rows = [(str(p), p.read_bytes(), None) for p in paths] + list(extra)
    table = pa.table(
        {
            "image_id": [image_id(b) if e is None else None for _, b, e in rows],
            "uri": [u for u, _, _ in rows],
            "error": pa.array([e for _, _, e in rows], type=pa.string()),
            "bytes": pa.array([b if e is None else None for _, b, e in rows], type=pa.binary()),
        }
    )
    full = pa.table(
        {
            f.name: table[f.name] if f.name in table.column_names else pa.nulls(len(rows), f.type)
            for f in IMAGES_SCHEMA
        },
        schema=IMAGES_SCHEMA,
    )
    images = folder / "images.parquet"
    images.mkdir(parents=True, exist_ok=True)
    for old in images.glob("*"):
        old.unlink()
    pq.write_table(full, images / "part-0.parquet")
    (images / "_SUCCESS").write_text("{}")
    return images


@pytest.fixture(scope="module")
def photos(photos_dir: Path) -> list[Path]:
    return sorted(photos_dir.glob("*/*.jpg"))[::25][:12]  # a dozen real photos of several scenes


def test_actor_pool_equals_in_process_extraction(ray_session, photos, tmp_path: Path) -> None:
    truncated = photos[0].read_bytes()[:4000]  # its header passes ingest's check; say so
    images = _write_images(
        tmp_path,
        photos,
        extra=[
            ("http://x/broken.jpg", truncated, None),  # decodes badly: a row with its reason
            ("http://x/404.jpg", None, "http 404: Not Found"),  # failed at ingest, reported there
            ("http://x/copy.jpg", photos[1].read_bytes(), None),  # same bytes, another uri
        ],
    )
    out = run(ExtractConf(images=str(images), output=str(tmp_path / "desc"), max_size=MAX_SIZE))
    desc = read_descriptors(out)
    ids, vectors, manifest = list(desc.image_ids), desc.vectors, desc.manifest
    assert manifest["count"] == len(photos) and len(manifest["failed"]) == 1 == desc.failed
    assert "broken.jpg" in manifest["failed"][0] and manifest["not_ingested"] == 1
    assert len(set(ids)) == len(ids) == len(photos)  # the copy is described once

    net = build_network(NetworkMeta(), "imagenet").eval()
    files = ImageFiles(photos, MAX_SIZE, exif_transpose=True)
    expected = extract_descriptors(net, files, ExtractOptions(device="cpu", progress=False))
    by_id = dict(zip((image_id(p.read_bytes()) for p in photos), expected, strict=True))
    got = np.stack([vectors[ids.index(i)] for i in by_id])
    np.testing.assert_allclose(got, np.stack(list(by_id.values())), atol=1e-5)
    assert (
        manifest["dim"] == 1280 and manifest["network"]["meta"]["backbone"] == "efficientnet_lite0"
    )
    assert json.loads((tmp_path / "desc" / "manifest.json").read_text())["count"] == len(photos)


def test_rerun_skips_and_resumes(ray_session, photos, tmp_path: Path) -> None:
    images = _write_images(tmp_path, photos[:4])
    conf = ExtractConf(images=str(images), output=str(tmp_path / "desc"), max_size=64)
    out = run(conf)
    first = sorted(Path(out).glob("*.parquet"))
    run(conf)  # complete: skipped, nothing rewritten
    assert sorted(Path(out).glob("*.parquet")) == first
    # An interrupted run: its parts are there, the marker and manifest are not.
    (Path(out) / "_SUCCESS").unlink()
    (Path(out) / "manifest.json").unlink()
    _write_images(tmp_path, photos[:6])  # two more photos since
    run(conf)
    desc = read_descriptors(out)
    assert desc.manifest["count"] == 6 and len(set(desc.image_ids)) == 6
    assert len(list(Path(out).glob("*.parquet"))) > len(first)  # only the new ones written


def test_bad_input_is_named_before_any_work(photos, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"run pipeline\.ingest first"):
        run(ExtractConf(images=str(tmp_path / "none.parquet"), output=str(tmp_path / "d")))
    images = _write_images(tmp_path, photos[:1])
    (images / "_SUCCESS").unlink()
    with pytest.raises(ValueError, match="unfinished"):
        run(ExtractConf(images=str(images), output=str(tmp_path / "d")))
    pq.write_table(pa.table({"uri": ["x"], "pixels": [b""]}), images / "part-0.parquet")
    (images / "_SUCCESS").write_text("{}")
    with pytest.raises(ValueError, match="image_id"):
        run(ExtractConf(images=str(images), output=str(tmp_path / "d")))
    with pytest.raises(ValueError, match="--max-size must be at least 1"):
        run(ExtractConf(images=str(images), output=str(tmp_path / "d"), max_size=0))


def test_images_and_descriptors_on_s3(ray_session, photos, s3_bucket: str, tmp_path) -> None:
    from model import storage

    local = _write_images(tmp_path, photos[:3])
    for path in local.iterdir():
        storage.write_bytes(f"s3://{s3_bucket}/run/images.parquet/{path.name}", path.read_bytes())
    out = run(
        ExtractConf(
            images=f"s3://{s3_bucket}/run/images.parquet",
            output=f"s3://{s3_bucket}/run/descriptors",
            max_size=64,
        )
    )
    assert out == f"s3://{s3_bucket}/run/descriptors" and storage.is_complete(out)
    desc = read_descriptors(out)
    assert len(desc.image_ids) == 3 and desc.vectors.shape == (3, 1280)
    assert desc.manifest["count"] == 3
    np.testing.assert_allclose(np.linalg.norm(desc.vectors, axis=1), 1.0, atol=1e-5)


def test_a_checkpoint_brings_its_whitening(ray_session, photos, tmp_path: Path) -> None:
    """A checkpoint directory with whitening.npz gives whitened descriptors, as evaluate would."""
    from model.networks import save_network
    from model.whitening import apply_whitening, save_whitening

    net = build_network(NetworkMeta(), "imagenet").eval()
    checkpoint = save_network(net, tmp_path / "ckpt")
    rng = np.random.default_rng(0)
    m, P = rng.normal(size=1280) * 0.01, rng.normal(size=(64, 1280))
    save_whitening(f"{checkpoint}/whitening.npz", m, P)
    images = _write_images(tmp_path, photos[:3])
    conf = ExtractConf(
        images=str(images), output=str(tmp_path / "desc"), weights=checkpoint, max_size=64
    )
    desc = read_descriptors(run(conf))
    assert desc.vectors.shape == (3, 64) and desc.manifest["settings"]["whitening"] is True
    files = ImageFiles(photos[:3], 64, exif_transpose=True)
    plain = extract_descriptors(net, files, ExtractOptions(device="cpu", progress=False))
    expected = dict(
        zip(
            (image_id(p.read_bytes()) for p in photos[:3]),
            apply_whitening(plain, m, P),
            strict=True,
        )
    )
    got = np.stack([expected[i] for i in desc.image_ids])
    np.testing.assert_allclose(desc.vectors, got, atol=1e-4)


def test_a_bucket_that_does_not_exist_is_named_first(photos, tmp_path: Path, s3_server) -> None:
    images = _write_images(tmp_path, photos[:1])
    with pytest.raises(ValueError, match=r"--output: bucket 'no-such-bucket-9c1' does not exist"):
        run(ExtractConf(images=str(images), output="s3://no-such-bucket-9c1/desc"))


def test_cli_mistake_is_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "pipeline.extract", "--images", str(tmp_path / "none"),
         "--output", str(tmp_path / "d")],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    (line,) = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
    assert "run pipeline.ingest first" in line
