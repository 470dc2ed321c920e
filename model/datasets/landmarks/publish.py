"""Generating a collection: staged locally and published through the storage layer with its
manifest written last, kept when a complete one of the same configuration is already there."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

from model import storage, tables
from model.datasets.landmarks.conf import LandmarksConf
from model.datasets.landmarks.dataset import DatasetConflictError
from model.datasets.landmarks.writer import write_collection

logger = logging.getLogger(__package__)  # "model.datasets.landmarks"


def _existing_digest(out: str) -> str | None:
    """The digest of a complete collection at `out`, None when there is none ("" unreadable)."""
    try:
        manifest = tables.LANDMARKS_OUTPUT.existing(out)
    except ValueError:
        return ""
    return None if manifest is None else str(manifest.details.get("digest", ""))


def _check_existing(conf: LandmarksConf, out: str) -> bool:
    """True when `out` already holds this configuration's complete collection."""
    digest = _existing_digest(out)
    if digest is None:
        return False
    if digest != conf.digest():
        raise DatasetConflictError(
            f"{out} holds a landmark collection of another configuration (digest {digest!r}, "
            f"wanted {conf.digest()!r}); pass overwrite=True or choose another name"
        )
    return True


def generate(
    conf: LandmarksConf, root: str | Path, *, overwrite: bool = False, progress: bool = True
) -> Path | str:
    """Write the collection to `<root>/<conf.name>` and return that location.

    `root` is a local path or an `s3://` URI; the result is a `Path` for a local root and the
    URI string for a remote one. A complete collection of the same configuration there is kept
    as it is (the call returns at once) unless `overwrite`; a complete one of another
    configuration raises `DatasetConflictError` unless `overwrite`. Everything is written to a
    local staging directory and published by `model.storage.publish_directory`: locally renamed
    into place with its manifest inside, on an object store uploaded with the manifest last, so
    a crash never leaves a set that looks whole.
    """
    out = storage.join(root, conf.name)
    location: Path | str = out if storage.is_remote(out) else storage.local_path(out)
    if not overwrite and _check_existing(conf, out):
        logger.info(
            "landmark collection %s is complete (digest %s); skipping", location, conf.digest()
        )
        return location
    try:
        with storage.publish_directory(out, last=tables.MANIFEST) as staging:
            write_collection(conf, staging, progress)
            tables.LANDMARKS_OUTPUT.publish(
                str(staging), settings=asdict(conf), details={"digest": conf.digest()}
            )
    except FileExistsError:
        # Another process published the same local folder meanwhile: the same bytes if it is
        # the same configuration, so its copy is kept.
        if storage.is_remote(out) or _existing_digest(out) != conf.digest():
            raise
        logger.info("another process published %s first; keeping its copy", location)
        return location
    logger.info("wrote landmark collection %s (digest %s)", location, conf.digest())
    return location
