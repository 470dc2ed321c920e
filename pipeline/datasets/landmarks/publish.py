"""Generating a collection: staged beside its place and renamed in with `_SUCCESS`, kept when a
complete one of the same configuration is already there."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from pipeline.landmarks.conf import LandmarksConf
from pipeline.landmarks.dataset import CONFIG_FILE, SUCCESS_FILE, DatasetConflictError
from pipeline.landmarks.writer import _write_collection

logger = logging.getLogger(__package__)  # "pipeline.landmarks", as before the package split


def _existing_digest(out: Path) -> str | None:
    """The digest of a complete collection at `out`, None when there is none."""
    if not (out / SUCCESS_FILE).is_file():
        return None
    try:
        return json.loads((out / CONFIG_FILE).read_text())["digest"]
    except (OSError, ValueError, KeyError):
        return ""


def _check_existing(conf: LandmarksConf, out: Path) -> bool:
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


def _publish(staging: Path, out: Path, conf: LandmarksConf) -> None:
    """Move the finished collection into place; an older one at `out` is swapped out first."""
    retired = None
    if out.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, retired / out.name)
    try:
        os.rename(staging, out)
    except OSError:
        if _existing_digest(out) != conf.digest():
            raise
        logger.info("another process published %s first; keeping its copy", out)  # same bytes
        shutil.rmtree(staging, ignore_errors=True)
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)


def generate(
    conf: LandmarksConf, root: str | Path, *, overwrite: bool = False, progress: bool = True
) -> Path:
    """Write the collection to `<root>/<conf.name>` and return that path.

    A complete collection of the same configuration there is kept as it is (the call returns at
    once) unless `overwrite`. Everything is written to a temporary directory beside it and
    renamed into place with `_SUCCESS` inside, so a crash never leaves a set that looks whole.
    """
    root = Path(root)
    out = root / conf.name
    if not overwrite and _check_existing(conf, out):
        logger.info("landmark collection %s is complete (digest %s); skipping", out, conf.digest())
        return out
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{conf.name}.", suffix=".partial", dir=root))
    try:
        _write_collection(conf, staging, progress)
        (staging / SUCCESS_FILE).write_text(conf.digest() + "\n")
        _publish(staging, out, conf)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("wrote landmark collection %s (digest %s)", out, conf.digest())
    return out
