"""image_id → where the photo came from, and a thumbnail of it, for the search service.

An index version knows its photos by image_id only. Its manifest names the descriptor outputs
that made each version (``history``), each descriptors manifest names the images output it
described (its ``images`` source), and that table holds every photo's ``uri`` and bytes. The
catalog reads the small columns (``image_id``, ``uri``) of those tables once and remembers,
for each image_id, the part file, row group and row that hold its bytes, so a thumbnail reads
one row group's ``bytes`` column (a few photos: ingest writes small row groups), never the
whole table. Recent thumbnails are kept in memory.

It reads the images table through its spec (``model.tables.IMAGES``: the parts its manifest
lists, row group by row group): the service must not depend on the pipeline's code.
Torch-free.
"""

from __future__ import annotations

import io
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from model.tables import DESCRIPTORS_OUTPUT, IMAGES, IMAGES_OUTPUT

__all__ = ["ImageCatalog", "Photo", "images_of_manifest", "read_photo_bytes", "thumbnail_jpeg"]

logger = logging.getLogger(__name__)

THUMBNAIL_SIDE = 256
"""Longer side of a thumbnail, in pixels."""


def images_of_manifest(manifest: Mapping[str, Any]) -> list[str]:
    """The images outputs behind every version up to this one, oldest first.

    Each entry of the index manifest's ``history`` names the descriptors output a build added;
    each descriptors manifest names the images output it described. Outputs that cannot be read
    are logged and left out (their photos then have no uri or thumbnail, and search still works).
    """
    descriptors = [entry["descriptors"] for entry in manifest.get("history") or []]
    if not descriptors and manifest.get("descriptors"):
        descriptors = [manifest["descriptors"]["uri"]]
    images: list[str] = []
    for uri in descriptors:
        source = _images_of_descriptors(uri)
        if source and source not in images:
            images.append(source)
    return images


def _images_of_descriptors(uri: str) -> str | None:
    """The images output a descriptors output described (``None``, logged, when unknown)."""
    try:
        described = DESCRIPTORS_OUTPUT.manifest(uri)
    except (OSError, ValueError) as err:
        logger.warning("no photos for descriptors %s: %s", uri, err)
        return None
    if "images" in described.sources:
        return described.source("images")
    source = described.details.get("images")
    return str(source) if source else None


@dataclass(frozen=True)
class Photo:
    image_id: str
    uri: str
    part: str
    row_group: int
    row: int


def _table_folder(uri: str) -> str:
    """``OUT`` or the images output itself → the images output's folder."""
    return IMAGES_OUTPUT.locate(uri)


class ImageCatalog:
    """The photos of some images tables, by image_id (the first table that has one wins)."""

    def __init__(self, images: Iterable[str] = (), cache_size: int = 2048) -> None:
        self._photos: dict[str, Photo] = {}
        self._tables: list[str] = []
        self._thumbs: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self.add(images)

    def __len__(self) -> int:
        return len(self._photos)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._photos

    def add(self, images: Iterable[str]) -> int:
        """Read the tables not read yet; returns how many photos are new."""
        before = len(self._photos)
        for uri in images:
            folder = _table_folder(uri)
            if folder in self._tables:
                continue
            try:
                self.read_table(folder)
            except (OSError, ValueError) as err:
                logger.warning("photos of %s are not available: %s", folder, err)
                continue
            self._tables.append(folder)
        return len(self._photos) - before

    def read_table(self, images: str) -> None:
        """Read one images output (``OUT`` or its folder); raises when it is not a complete,
        readable one (``add`` logs that and goes on)."""
        manifest = IMAGES_OUTPUT.manifest(images)
        for part in IMAGES.files(manifest):
            groups = IMAGES.row_groups(part, ["image_id", "uri", "error"])
            for group, table in enumerate(groups):
                self._add_row_group(table, part, group)

    def _add_row_group(self, table: Any, part: str, group: int) -> None:
        """Remember where each usable photo of one row group lies (the first one met wins)."""
        columns = (table.column(c).to_pylist() for c in ("image_id", "uri", "error"))
        for row, (image_id, uri, error) in enumerate(zip(*columns, strict=True)):
            if image_id is None or error is not None or image_id in self._photos:
                continue
            self._photos[image_id] = Photo(image_id, uri, part, group, row)

    def uri(self, image_id: str) -> str | None:
        photo = self._photos.get(image_id)
        return photo.uri if photo else None

    def uris(self, image_ids: np.ndarray) -> list[str | None]:
        return [self.uri(i) if i is not None else None for i in image_ids]

    def photo(self, image_id: str) -> Photo:
        """Where a photo's bytes lie. ``KeyError`` for an image_id not in the catalog."""
        return self._photos[image_id]

    def photo_bytes(self, image_id: str) -> bytes:
        """The stored bytes of a photo. ``KeyError`` for an image_id not in the catalog."""
        return read_photo_bytes([self._photos[image_id]])[image_id]

    def thumbnail(self, image_id: str, side: int = THUMBNAIL_SIDE) -> bytes:
        """A JPEG of the photo, upright, its longer side at most ``side`` (cached)."""
        key = (image_id, side)
        with self._lock:
            if key in self._thumbs:
                self._thumbs.move_to_end(key)
                return self._thumbs[key]
        data = thumbnail_jpeg(self.photo_bytes(image_id), side)
        with self._lock:
            self._thumbs[key] = data
            while len(self._thumbs) > self._cache_size:
                self._thumbs.popitem(last=False)
        return data


def read_photo_bytes(photos: Iterable[Photo]) -> dict[str, bytes]:
    """image_id → stored bytes, reading each row group that holds some of them once.

    What lets a worker fetch its own share of a large collection (an SfM group) with nothing
    but these small locations passed to it.
    """
    by_group: dict[tuple[str, int], list[Photo]] = {}
    for photo in photos:
        by_group.setdefault((photo.part, photo.row_group), []).append(photo)
    out: dict[str, bytes] = {}
    for (part, row_group), wanted in by_group.items():
        data = IMAGES.read_row_group(part, row_group, ["bytes"]).column("bytes")
        for photo in wanted:
            out[photo.image_id] = data[photo.row].as_py()
    return out


def thumbnail_jpeg(data: bytes, side: int = THUMBNAIL_SIDE) -> bytes:
    """Photo bytes → an upright JPEG thumbnail with its longer side at most ``side``."""
    with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB", (side, side))  # JPEG: decode at a fraction of the size
        image = ImageOps.exif_transpose(image).convert("RGB")
        image.thumbnail((side, side))
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=85)
    return out.getvalue()
