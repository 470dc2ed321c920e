"""The features stage: local features (SIFT) of every ingested photo, for spatial re-ranking.

    python -m pipeline.features --images OUT/images.parquet --output OUT/local_features

Ray Data reads the photo bytes that ingest kept and extracts pycolmap's SIFT in 1-CPU tasks
(``model.local_features``: the photo decoded in the one frame every caller uses, at most
``--local-max-features`` features at the largest scales); a bad photo is a row with its reason.
The features go into Parquet parts (``model.tables.LOCAL_FEATURES``), a row group per photo
so that the search service reads one candidate's features alone, then the manifest, published
last: its settings are everything that changes a feature, its details the counts, failures
and the bytes a photo costs. ``pipeline.index --local-features`` pins the output into an
index version, and ``POST /search?rerank=K`` uses it.

Resume by fingerprint: the same images with the same settings are skipped; new photos in the
images output extract only what has no row yet and drop the rows of photos gone; other
settings stop with one line unless ``--overwrite``. An interrupted run extracts only the
photos not in its part files.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from model import storage, tables
from model.cli import FlatFlags, location_problems, log_settings, run_cli
from model.images import BadImage
from model.local_features import LocalFeatureOptions, read_local_features
from model.settings import raise_problems
from model.tables import IMAGES, IMAGES_OUTPUT, LOCAL_FEATURES, LOCAL_FEATURES_OUTPUT

__all__ = ["FeaturesConf", "extract_batch", "run"]

logger = logging.getLogger(__name__)

MOST_BLOCKS = 64
"""An images output of fewer parts is split into up to this many blocks, a task each."""


@dataclass(frozen=True)
class FeaturesConf(FlatFlags):
    """Settings of one extraction of local features; every field is a command-line flag."""

    images: str
    """The images output written by pipeline.ingest (its folder, a path or s3:// URI)."""
    output: str
    """Folder or s3:// prefix for the feature parts and their manifest."""
    local: LocalFeatureOptions = field(default_factory=LocalFeatureOptions)
    """What changes a feature (flags --local-max-features, --local-max-size,
    --local-peak-threshold)."""
    batch_size: int = 16
    """Photos per task."""
    overwrite: bool = False
    """Replace an output made with other settings (else the run stops)."""

    def __post_init__(self) -> None:
        problems = []
        if self.batch_size < 1:
            problems.append(f"--batch-size must be at least 1, not {self.batch_size}")
        raise_problems(problems)


def run(conf: FeaturesConf) -> str:
    """Extract the local features of every usable photo of ``conf.images``; returns the output."""
    started = time.perf_counter()
    raise_problems(location_problems(images=conf.images, output=conf.output))
    log_settings(logger, "features", conf)
    out = tables.resolve(conf.output)
    images = IMAGES_OUTPUT.manifest(conf.images)
    inputs = {"images": images}
    settings = conf.local.identity()
    action, _ = LOCAL_FEATURES_OUTPUT.plan(out, inputs, settings, overwrite=conf.overwrite)
    if action == "skip":
        logger.info("%s is complete; skipping", out)
        return out
    if action == "new" and storage.exists(LOCAL_FEATURES_OUTPUT.manifest_uri(out)):
        logger.info("replacing %s (--overwrite)", out)
        LOCAL_FEATURES_OUTPUT.clear(out)
    usable = _usable(images)
    done = LOCAL_FEATURES.resume_ids(out, usable, row_group_size=1)
    LOCAL_FEATURES_OUTPUT.unpublish(out)
    if done:
        logger.info("resuming: %d photos already have features in %s", len(done), out)
    _extract(conf, out, usable - done)
    manifest = LOCAL_FEATURES_OUTPUT.publish(
        out,
        inputs=inputs,
        settings=settings,
        details=_details(out, reused=len(done), seconds=time.perf_counter() - started),
    )
    details = manifest.details
    logger.info(
        "local features of %d photos (%d failed, %.0f KiB a photo) in %s in %.1f s",
        details["count"],
        len(details["failed"]),
        details["bytes_per_photo"] / 1024,
        out,
        details["seconds"],
    )
    return out


def _extract(conf: FeaturesConf, out: str, todo: set[str]) -> None:
    """Extract the photos of ``todo`` in Ray Data tasks, written as parts into ``out``."""
    import ray  # the driver's cluster, joined only when there is work

    if not todo:
        return
    if not ray.is_initialized():
        ray.init()
    dataset = IMAGES.ray_dataset(conf.images, ["image_id", "uri", "bytes", "error"])
    files = len(IMAGES.files(IMAGES_OUTPUT.manifest(conf.images)))
    blocks = min(-(-len(todo) // conf.batch_size), MOST_BLOCKS)
    if files < blocks:  # a few large parts (a small collection): split them, or one task works
        dataset = dataset.repartition(blocks)
    extracted = dataset.map_batches(
        extract_batch,
        fn_kwargs={"options": conf.local, "todo": frozenset(todo)},
        batch_size=conf.batch_size,
        batch_format="pyarrow",
        num_cpus=1,
        memory=256 * 2**20 + conf.batch_size * 32 * 2**20,  # the worker, the photos, a decode
    )
    extracted.write_parquet(out, row_group_size=1)


def extract_batch(batch: Any, *, options: LocalFeatureOptions, todo: frozenset[str]) -> pa.Table:
    """Ingested rows → a ``LOCAL_FEATURES`` row per photo of ``todo`` (each photo once; a
    photo that cannot be read is a row with its reason)."""
    rows = []
    seen: set[str] = set()
    columns = (batch.column(c).to_pylist() for c in ("image_id", "uri", "bytes", "error"))
    for image_id, uri, raw, error in zip(*columns, strict=True):
        if error is not None or image_id not in todo or image_id in seen:
            continue
        seen.add(image_id)
        found = (
            BadImage("no photo bytes")
            if raw is None
            else read_local_features(raw, options, exif_transpose=True)
        )
        if isinstance(found, BadImage):
            rows.append({"image_id": image_id, "error": f"{uri}: {found.reason}"})
            continue
        rows.append(
            {
                "image_id": image_id,
                "keypoints": found.keypoints.tobytes(),
                "descriptors": found.descriptors.tobytes(),
                "width": found.size[0],
                "height": found.size[1],
            }
        )
    return LOCAL_FEATURES.from_rows(rows)


def _usable(images: tables.Manifest) -> set[str]:
    table = IMAGES.read_from(images, ["image_id", "error"])
    ids, errors = table["image_id"].to_pylist(), table["error"].to_pylist()
    return {i for i, e in zip(ids, errors, strict=True) if e is None}


def _details(out: str, *, reused: int, seconds: float) -> dict[str, Any]:
    """Counts (``extracted``: by this run), failures, features and the bytes of features a
    photo (keypoints and descriptors, which Parquet's compression hardly shrinks)."""
    columns = ["image_id", "keypoints", "descriptors", "error"]
    table = LOCAL_FEATURES.read_unpublished(out, columns)[0]
    errors = table["error"].to_pylist()
    good = table.filter(pc.is_null(table["error"]))
    lengths = pc.binary_length(good["descriptors"]).to_numpy(zero_copy_only=False) // 128
    stored = int(pc.sum(pc.binary_length(good["keypoints"])).as_py() or 0) + int(
        pc.sum(pc.binary_length(good["descriptors"])).as_py() or 0
    )
    return {
        "count": good.num_rows,
        "extracted": len(errors) - reused,
        "failed": [e for e in errors if e is not None],
        "features_per_photo": float(np.mean(lengths)) if len(lengths) else 0.0,
        "photos_without_features": int((lengths == 0).sum()),
        "bytes_per_photo": stored / max(good.num_rows, 1),
        "seconds": round(seconds, 2),
    }


if __name__ == "__main__":
    run_cli(run, FeaturesConf)
