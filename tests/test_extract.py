"""The extract stage on a local Ray: its actor pool gives the in-process descriptors."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import ray

from model import checkpoint as checkpoints
from model import storage, tables
from model.descriptors import read_descriptors
from model.extraction import ExtractOptions, ImageFiles, extract_descriptors
from model.images import image_id
from model.networks import NetworkMeta, build_network
from model.tables import DESCRIPTORS, DESCRIPTORS_OUTPUT, IMAGES, IMAGES_OUTPUT, OutputChanged
from model.whitening import apply_whitening
from pipeline.extract import ExtractConf, decode_memory, describer_pool, run
from tests.helpers import run_stage, write_images

MAX_SIZE = 128


def _part_ids(out: str) -> dict[str, list[str]]:
    """image_ids of each descriptor part file now in ``out``."""
    return {
        part: DESCRIPTORS.read_file(part, ["image_id"])["image_id"].to_pylist()
        for part in DESCRIPTORS.parts(out)
    }


@pytest.fixture(scope="module")
def photos(photos_dir: Path) -> list[Path]:
    return sorted(photos_dir.glob("*/*.jpg"))[::25][:12]  # a dozen real photos of several scenes


def test_actor_pool_equals_in_process_extraction(ray_session, photos, tmp_path: Path) -> None:
    truncated = photos[0].read_bytes()[:4000]  # its header passes ingest's check; say so
    images = write_images(
        tmp_path,
        photos,
        extra=[
            ("http://x/broken.jpg", truncated, None),  # decodes badly: a row with its reason
            ("http://x/404.jpg", None, "http 404: Not Found"),  # failed at ingest, reported there
            ("http://x/copy.jpg", photos[1].read_bytes(), None),  # same bytes, another uri
        ],
    )
    out = run(
        ExtractConf.from_flags(images=str(images), output=str(tmp_path / "desc"), max_size=MAX_SIZE)
    )
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
    assert DESCRIPTORS_OUTPUT.manifest(out).details["count"] == len(photos)
    assert desc.output.source("images") == str(images) and desc.identity


def test_a_rerun_skips_describes_new_photos_alone_and_drops_gone_ones(
    ray_session, photos, tmp_path: Path, caplog
) -> None:
    """The same inputs and settings: nothing runs. Photos ingested since into the same images
    output: a rerun describes those only, keeps the rows it has, and the output's identity
    changes (a later stage sees the change). Photos gone from the images lose their rows."""
    images = write_images(tmp_path, photos[:4])
    conf = ExtractConf.from_flags(images=str(images), output=str(tmp_path / "desc"), max_size=64)
    out = run(conf)
    written = {p: p.stat().st_mtime_ns for p in Path(out).iterdir()}
    with caplog.at_level(logging.INFO, logger="pipeline.extract"):
        assert run(conf) == out
    assert "is complete; skipping" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in Path(out).iterdir()} == written

    before, identity = _part_ids(out), read_descriptors(out).identity
    write_images(tmp_path, photos[:6])  # two more photos since
    run(conf)
    after = _part_ids(out)
    assert all(after[part] == ids for part, ids in before.items())  # kept as they were
    new = sorted(i for part, ids in after.items() if part not in before for i in ids)
    assert new == sorted(image_id(p.read_bytes()) for p in photos[4:6])
    desc = read_descriptors(out)
    assert desc.manifest["count"] == 6 and len(set(desc.image_ids)) == 6
    assert desc.identity != identity

    write_images(tmp_path, photos[1:3])
    desc = read_descriptors(run(conf))
    assert sorted(desc.image_ids) == sorted(image_id(p.read_bytes()) for p in photos[1:3])


def test_an_interrupted_run_resumes(ray_session, photos, tmp_path: Path) -> None:
    images = write_images(tmp_path, photos[:3])
    conf = ExtractConf.from_flags(images=str(images), output=str(tmp_path / "desc"), max_size=64)
    out = run(conf)
    first = _part_ids(out)
    DESCRIPTORS_OUTPUT.unpublish(out)  # killed before its manifest
    run(conf)
    assert all(part in _part_ids(out) for part in first)
    assert read_descriptors(out).manifest["count"] == 3


def test_another_setting_stops_naming_it_and_overwrite_replaces(
    ray_session, photos, tmp_path: Path
) -> None:
    images = write_images(tmp_path, photos[:2])
    conf = ExtractConf.from_flags(images=str(images), output=str(tmp_path / "desc"), max_size=64)
    out = run(conf)
    with pytest.raises(OutputChanged) as err:
        run(ExtractConf.from_flags(images=str(images), output=out, max_size=32))
    message = str(err.value)
    assert len(message.splitlines()) == 1
    assert "max_size: 64 → 32" in message and "--overwrite" in message
    assert read_descriptors(out).manifest["settings"]["max_size"] == 64  # untouched

    replaced = run(
        ExtractConf.from_flags(images=str(images), output=out, max_size=32, overwrite=True)
    )
    desc = read_descriptors(replaced)
    assert desc.manifest["settings"]["max_size"] == 32 and desc.manifest["count"] == 2
    assert desc.output.settings["max_size"] == 32


def test_another_network_stops_naming_it(ray_session, photos, tmp_path: Path) -> None:
    images = write_images(tmp_path, photos[:1])
    out = run(
        ExtractConf.from_flags(images=str(images), output=str(tmp_path / "desc"), max_size=32)
    )
    with pytest.raises(OutputChanged, match="another network") as err:
        run(ExtractConf.from_flags(images=str(images), output=out, max_size=32, p=4.0))
    assert "imagenet/efficientnet_lite0/gem/p3 → imagenet/efficientnet_lite0/gem/p4" in str(
        err.value
    )
    assert "--overwrite" in str(err.value)


def test_bad_input_is_named_before_any_work(photos, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"run pipeline\.ingest first"):
        run(
            ExtractConf.from_flags(
                images=str(tmp_path / "none.parquet"), output=str(tmp_path / "d")
            )
        )
    images = write_images(tmp_path, photos[:1], publish=False)
    with pytest.raises(ValueError, match="not a complete ingest output"):
        run(ExtractConf.from_flags(images=str(images), output=str(tmp_path / "d")))
    storage.write_bytes(
        str(images / "part-0.parquet"),
        tables.parquet_bytes(pa.table({"uri": ["x"], "pixels": [b""]})),
    )
    IMAGES_OUTPUT.publish(str(images))
    with pytest.raises(ValueError, match="image_id"):
        run(ExtractConf.from_flags(images=str(images), output=str(tmp_path / "d")))
    with pytest.raises(ValueError, match="--max-size must be at least 1"):
        run(ExtractConf.from_flags(images=str(images), output=str(tmp_path / "d"), max_size=0))


def test_actors_no_node_can_hold_stop_before_any_work(ray_session, photos, tmp_path) -> None:
    images = write_images(tmp_path, photos[:1])
    conf = ExtractConf.from_flags(images=str(images), output=str(tmp_path / "d"), gpus_per_actor=1)
    with pytest.raises(
        ValueError, match=r"^--cpus-per-actor, --gpus-per-actor, --actor-res.*GPU: 1"
    ):
        run(conf)
    assert not storage.exists(str(tmp_path / "d"))


def test_images_and_descriptors_on_s3(ray_session, photos, s3_bucket: str, tmp_path) -> None:
    local = write_images(tmp_path, photos[:3])
    remote = IMAGES_OUTPUT.locate(f"s3://{s3_bucket}/run")
    for path in local.iterdir():
        storage.write_bytes(f"{remote}/{path.name}", path.read_bytes())
    out = run(
        ExtractConf.from_flags(
            images=remote,
            output=f"s3://{s3_bucket}/run/descriptors",
            max_size=64,
        )
    )
    assert out == f"s3://{s3_bucket}/run/descriptors" and DESCRIPTORS_OUTPUT.is_complete(out)
    desc = read_descriptors(out)
    assert len(desc.image_ids) == 3 and desc.vectors.shape == (3, 1280)
    assert desc.manifest["count"] == 3
    np.testing.assert_allclose(np.linalg.norm(desc.vectors, axis=1), 1.0, atol=1e-5)


def test_a_checkpoint_brings_its_whitening(ray_session, photos, tmp_path: Path) -> None:
    """A checkpoint directory with whitening.npz gives whitened descriptors, as evaluate would."""

    net = build_network(NetworkMeta(), "imagenet").eval()
    checkpoint = str(tmp_path / "ckpt")
    rng = np.random.default_rng(0)
    m, P = rng.normal(size=1280) * 0.01, rng.normal(size=(64, 1280))
    checkpoints.save(checkpoint, net, whitening=(m, P))
    images = write_images(tmp_path, photos[:3])
    conf = ExtractConf.from_flags(
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
    images = write_images(tmp_path, photos[:1])
    with pytest.raises(ValueError, match=r"--output: bucket 'no-such-bucket-9c1' does not exist"):
        run(ExtractConf.from_flags(images=str(images), output="s3://no-such-bucket-9c1/desc"))


def test_cli_mistake_is_one_line(tmp_path: Path) -> None:
    done = run_stage("extract", "--images", str(tmp_path / "none"), "--output", str(tmp_path / "d"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    (line,) = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
    assert "run pipeline.ingest first" in line


def test_describer_pool_is_sized_from_what_the_cluster_can_reach() -> None:
    """A cluster scaled to zero (head without CPUs, GPU nodes not started yet) still gets GPU
    actors, up to the GPUs its autoscaler can start; a laptop keeps a CPU for decoding."""
    conf = ExtractConf.from_flags(images="in", output="out")
    scaled_to_zero = {"CPU": 1024.0, "GPU": 8.0}  # what get_max_resources_… reports
    pool = describer_pool(conf, scaled_to_zero, photos=10_000)
    assert (pool.gpus, pool.cpus, pool.max_actors) == (1.0, 1.0, 8)
    assert describer_pool(conf, scaled_to_zero, photos=40).max_actors == 2  # 2 blocks of 32
    laptop = describer_pool(conf, {"CPU": 2.0}, photos=10_000)
    assert (laptop.gpus, laptop.cpus, laptop.max_actors) == (0.0, 1.0, 1)
    cpu_cluster = describer_pool(conf, {"CPU": 64.0}, photos=10_000)
    assert (cpu_cluster.gpus, cpu_cluster.cpus, cpu_cluster.max_actors) == (0.0, 2.0, 31)
    fixed = ExtractConf.from_flags(images="in", output="out", actors=3, gpus_per_actor=0.5)
    assert describer_pool(fixed, scaled_to_zero, photos=10_000).max_actors == 3
    assert decode_memory(16, 1024) > 16 * 1024 * 1024 * 3


def test_a_read_of_few_parts_starts_one_footer_reader(ray_session, photos, tmp_path) -> None:
    images = write_images(tmp_path, photos[:2])

    def footer_readers() -> int:  # every actor Ray's GCS knows, dead or alive
        actors = ray._private.state.actors().values()  # the state API needs the dashboard
        return sum(a["ActorClassName"] == "FooterReader" for a in actors)

    before = footer_readers()
    assert len(IMAGES.ray_dataset(str(images), ["image_id"]).take_all()) == 2
    assert footer_readers() - before == 1  # Ray Data's own default starts 32
    assert tables.FOOTER_READERS_SETTING not in os.environ
