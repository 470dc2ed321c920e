"""image_id → where the photo came from, and a thumbnail of it, for the search service.

An index version knows its photos by image_id only. Its manifest names the descriptor outputs
that made each version (``history``), each descriptors manifest names the images output it
described (its ``images`` source), and that table holds every photo's ``uri`` and bytes. The
catalog reads the small columns (``image_id``, ``uri``, ``error``) of those tables once, a
projected read of each part whole (its row groups' chunks of those columns requested together,
never the photo bytes), parts in parallel, and remembers for each image_id the part file, row
group and row that hold its bytes; a thumbnail reads that row group's ``bytes`` column only (a
few photos: ingest writes small row groups), never the whole table. Recent thumbnails are kept
in memory.

The number of requests to index a table is set by its layout: a part's small columns lie in
one stretch per row group, between the row groups' photo bytes, so a part of ``g`` row groups
costs its footer and ``g`` ranged reads (issued together), whatever the reader does.

It reads the images table through its spec (``model.tables.IMAGES``: the parts its manifest
lists): the service must not depend on the pipeline's code. Torch-free.
"""

from __future__ import annotations

import io
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageOps

from model.tables import DESCRIPTORS_OUTPUT, IMAGES, IMAGES_OUTPUT

__all__ = ["ImageCatalog", "Photo", "images_of_manifest", "read_photo_bytes", "thumbnail_jpeg"]

logger = logging.getLogger(__name__)

THUMBNAIL_SIDE = 256
"""Longer side of a thumbnail, in pixels."""
READ_THREADS = 16
"""Parts read at once (each one projected read: its requests are issued together)."""
_LOCATED = ["image_id", "uri", "error"]


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
    """The photos of some images tables, by image_id (the first table that has one wins).

    Each photo's place is a row of a few arrays (part, row group, row, uri), not an object:
    a million photos cost their image_ids and uris and a few bytes more."""

    def __init__(self, images: Iterable[str] = (), cache_size: int = 2048) -> None:
        self._at: dict[str, int] = {}
        self._parts: list[str] = []
        self._part = np.empty(0, dtype=np.int32)
        self._group = np.empty(0, dtype=np.int32)
        self._row = np.empty(0, dtype=np.int32)
        self._uris: pa.Array = pa.array([], type=pa.string())
        self._tables: list[str] = []
        self._thumbs: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self.add(images)

    def __len__(self) -> int:
        return len(self._at)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._at

    def add(self, images: Iterable[str]) -> int:
        """Read the tables not read yet; returns how many photos are new."""
        before = len(self._at)
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
        return len(self._at) - before

    def read_table(self, images: str) -> None:
        """Read one images output (``OUT`` or its folder): the small columns of each part in
        one projected read, ``READ_THREADS`` parts at once. Raises when it is not a complete,
        readable one (``add`` logs that and goes on); nothing of it is added then."""
        manifest = IMAGES_OUTPUT.manifest(images)
        parts = IMAGES.files(manifest)
        found = _Found(self._at, len(self._parts))
        with ThreadPoolExecutor(READ_THREADS) as pool:
            read = pool.map(lambda part: IMAGES.read_file_groups(part, _LOCATED), parts)
            for part, (table, sizes) in zip(parts, read, strict=True):
                found.add_part(part, table, sizes)
        self._take(found)

    def _take(self, found: _Found) -> None:
        """The arrays first, the image_ids last: a reader in another thread never finds an
        image_id whose place is not there yet."""
        if not found.part:
            return
        self._parts = self._parts + found.parts
        self._part = np.concatenate([self._part, *found.part])
        self._group = np.concatenate([self._group, *found.group])
        self._row = np.concatenate([self._row, *found.row])
        self._uris = pa.concat_arrays([self._uris, *found.uris])
        self._at.update(found.new)

    def uri(self, image_id: str) -> str | None:
        at = self._at.get(image_id)
        return None if at is None else self._uris[at].as_py()

    def uris(self, image_ids: np.ndarray) -> list[str | None]:
        return [self.uri(i) if i is not None else None for i in image_ids]

    def photo(self, image_id: str) -> Photo:
        """Where a photo's bytes lie. ``KeyError`` for an image_id not in the catalog."""
        at = self._at[image_id]
        return Photo(
            image_id=image_id,
            uri=self._uris[at].as_py(),
            part=self._parts[int(self._part[at])],
            row_group=int(self._group[at]),
            row=int(self._row[at]),
        )

    def photo_bytes(self, image_id: str) -> bytes:
        """The stored bytes of a photo. ``KeyError`` for an image_id not in the catalog."""
        return read_photo_bytes([self.photo(image_id)])[image_id]

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


class _Found:
    """The photos one table adds to a catalog, gathered part by part (the first met wins)."""

    def __init__(self, known: dict[str, int], parts_before: int) -> None:
        self.new: dict[str, int] = {}
        self._known = known
        self._next = len(known)
        self._parts_before = parts_before
        self.parts: list[str] = []
        self.part: list[np.ndarray] = []
        self.group: list[np.ndarray] = []
        self.row: list[np.ndarray] = []
        self.uris: list[pa.Array] = []

    def add_part(self, part: str, table: pa.Table, sizes: list[int]) -> None:
        starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        group = np.repeat(np.arange(len(sizes), dtype=np.int32), sizes)
        row = (np.arange(table.num_rows) - starts[group]).astype(np.int32)
        usable = pc.and_(pc.is_valid(table["image_id"]), pc.is_null(table["error"]))
        ids = table["image_id"].to_pylist()
        taken = []
        for i in np.flatnonzero(usable.to_numpy(zero_copy_only=False)).tolist():
            image_id = ids[i]
            if image_id in self._known or image_id in self.new:
                continue
            self.new[image_id] = self._next
            self._next += 1
            taken.append(i)
        if not taken:
            return
        index = np.asarray(taken, dtype=np.int64)
        self.part.append(np.full(len(taken), self._parts_before + len(self.parts), dtype=np.int32))
        self.parts.append(part)
        self.group.append(group[index])
        self.row.append(row[index])
        self.uris.append(table["uri"].take(pa.array(index)).combine_chunks())


def read_photo_bytes(photos: Iterable[Photo]) -> dict[str, bytes]:
    """image_id → stored bytes: per part, one projected read of the ``bytes`` of the row
    groups that hold some of them (their requests issued together), ``READ_THREADS`` parts
    at once.

    What lets a worker fetch its own share of a large collection (an SfM group) with nothing
    but these small locations passed to it.
    """
    by_part: dict[str, list[Photo]] = {}
    for photo in photos:
        by_part.setdefault(photo.part, []).append(photo)

    def read(part: str) -> dict[str, bytes]:
        wanted = by_part[part]
        groups = sorted({photo.row_group for photo in wanted})
        tables = dict(zip(groups, IMAGES.read_row_groups(part, groups, ["bytes"]), strict=True))
        return {
            photo.image_id: tables[photo.row_group].column("bytes")[photo.row].as_py()
            for photo in wanted
        }

    out: dict[str, bytes] = {}
    if len(by_part) <= 1:
        for part in by_part:
            out.update(read(part))
        return out
    with ThreadPoolExecutor(min(READ_THREADS, len(by_part))) as pool:
        for found in pool.map(read, list(by_part)):
            out.update(found)
    return out


def thumbnail_jpeg(data: bytes, side: int = THUMBNAIL_SIDE) -> bytes:
    """Photo bytes → an upright JPEG thumbnail with its longer side at most ``side``."""
    with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB", (side, side))  # JPEG: decode at a fraction of the size
        upright = ImageOps.exif_transpose(image).convert("RGB")
        upright.thumbnail((side, side))
        out = io.BytesIO()
        upright.save(out, format="JPEG", quality=85)
    return out.getvalue()
