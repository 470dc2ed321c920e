"""image_id → where the photo came from, and a thumbnail of it, for the search service.

An index version knows its photos by image_id only. Its manifest names the descriptor tables
that made each version (``history``), each descriptor manifest names the ``images.parquet``
that ingest wrote, and that table holds every photo's ``uri`` and bytes. The catalog reads the
small columns (``image_id``, ``uri``) of those tables once and remembers, for each image_id,
the part file, row group and row that hold its bytes, so a thumbnail reads one row group's
``bytes`` column (a few photos: ingest writes small row groups), never the whole table. Recent
thumbnails are kept in memory.

It reads DESIGN.md's ``images.parquet`` layout directly (a folder of Parquet parts with a
``_SUCCESS`` marker): the service must not depend on the pipeline's code. Torch-free.
"""

from __future__ import annotations

import io
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from model import storage

__all__ = ["ImageCatalog", "Photo", "images_of_manifest", "read_photo_bytes", "thumbnail_jpeg"]

logger = logging.getLogger(__name__)

THUMBNAIL_SIDE = 256
"""Longer side of a thumbnail, in pixels."""


def images_of_manifest(manifest: Mapping[str, Any]) -> list[str]:
    """The ``images.parquet`` tables behind every version up to this one, oldest first.

    Each entry of the index manifest's ``history`` names the descriptor table a build added;
    each descriptor manifest names the images table it described. Tables that cannot be read
    are logged and left out (their photos then have no uri or thumbnail, and search still works).
    """
    descriptors = [entry["descriptors"] for entry in manifest.get("history") or []]
    if not descriptors and manifest.get("descriptors"):
        descriptors = [manifest["descriptors"]["uri"]]
    images: list[str] = []
    for uri in descriptors:
        try:
            described = json.loads(storage.read_text(storage.join(uri, "manifest.json")))
        except (OSError, ValueError) as err:
            logger.warning("no photos for descriptors %s: %s", uri, err)
            continue
        source = described.get("images")
        if source and source not in images:
            images.append(str(source))
    return images


@dataclass(frozen=True)
class Photo:
    image_id: str
    uri: str
    part: str
    row_group: int
    row: int


def _table_folder(uri: str) -> str:
    """``OUT`` or ``OUT/images.parquet`` → the folder of parts."""
    uri = uri.rstrip("/")
    return uri if uri.endswith("images.parquet") else storage.join(uri, "images.parquet")


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
        """Read one images table (``OUT`` or ``OUT/images.parquet``); raises when it is not a
        complete, readable one (``add`` logs that and goes on)."""
        folder = _table_folder(images)
        if not storage.is_complete(folder):
            raise ValueError(f"{folder} is not a complete images table (no {storage.SUCCESS})")
        for part in storage.list_files(folder, (".parquet",), recursive=False):
            fs, path = storage.arrow_filesystem(part)
            with fs.open_input_file(path) as handle:
                reader = pq.ParquetFile(handle)
                for group in range(reader.num_row_groups):
                    table = reader.read_row_group(group, columns=["image_id", "uri", "error"])
                    ids = table.column("image_id").to_pylist()
                    uris = table.column("uri").to_pylist()
                    errors = table.column("error").to_pylist()
                    for row, (image_id, uri, error) in enumerate(
                        zip(ids, uris, errors, strict=True)
                    ):
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
        fs, path = storage.arrow_filesystem(part)
        with fs.open_input_file(path) as handle:
            column = pq.ParquetFile(handle).read_row_group(row_group, columns=["bytes"])
        data = column.column("bytes")
        for photo in wanted:
            out[photo.image_id] = data[photo.row].as_py()
    return out


def thumbnail_jpeg(data: bytes, side: int = THUMBNAIL_SIDE) -> bytes:
    """Photo bytes → an upright JPEG thumbnail with its longer side at most ``side``."""
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB", (side, side))  # JPEG: decode at a fraction of the size
        image = ImageOps.exif_transpose(image).convert("RGB")
        image.thumbnail((side, side))
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=85)
    return out.getvalue()
