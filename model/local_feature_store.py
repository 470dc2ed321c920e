"""Local features of a features output read a photo at a time, for the search service.

A search shard re-ranks a few candidates per query out of millions of photos, so it never
loads the output whole: it reads each part's ``image_id`` column once (where every photo
lies: its file and row group, the stage writing a row group per photo), then each candidate's
row group alone, through the storage layer (local or S3 range reads), and keeps the most
recently used photos' features.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence

import numpy as np

from model.local_features import LocalFeatures, features_from_row
from model.tables import LOCAL_FEATURES, LOCAL_FEATURES_OUTPUT

__all__ = ["LocalFeatureStore"]

logger = logging.getLogger(__name__)

_COLUMNS = ["image_id", "keypoints", "descriptors", "width", "height"]


class LocalFeatureStore:
    """The features output at ``uri``; only ``image_ids`` (when given) are looked up. With
    ``identity`` (an index version's pin), features rewritten since are refused."""

    def __init__(
        self,
        uri: str,
        image_ids: Iterable[str] | None = None,
        *,
        identity: str | None = None,
        cache_size: int = 2048,
    ) -> None:
        manifest = LOCAL_FEATURES_OUTPUT.manifest(uri)
        if identity is not None and manifest.identity != identity:
            raise ValueError(
                f"the local features at {uri} changed since the index pinned them "
                f"({identity} → {manifest.identity}); pin them again with pipeline.index "
                "--local-features"
            )
        self.files = LOCAL_FEATURES.files(manifest)
        self.cache_size = cache_size
        self._wanted = None if image_ids is None else set(image_ids)
        self._where: dict[str, tuple[str, int, int]] | None = None
        self._cache: OrderedDict[str, LocalFeatures] = OrderedDict()
        self._lock = threading.Lock()

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._places()

    def features(self, image_ids: Sequence[str]) -> list[LocalFeatures | None]:
        """Each photo's features; ``None`` for a photo the output has no features of."""
        places = self._places()
        with self._lock:
            out: dict[str, LocalFeatures | None] = {}
            for image_id in image_ids:
                if image_id in self._cache:
                    self._cache.move_to_end(image_id)
                    out[image_id] = self._cache[image_id]
        todo: dict[str, list[tuple[int, int, str]]] = {}
        for image_id in dict.fromkeys(image_ids):
            if image_id in out:
                continue
            place = places.get(image_id)
            if place is None:
                out[image_id] = None
                continue
            file, group, row = place
            todo.setdefault(file, []).append((group, row, image_id))
        for file, wanted in todo.items():
            try:
                tables = LOCAL_FEATURES.read_row_groups(file, [g for g, _, _ in wanted], _COLUMNS)
            except (OSError, ValueError, IndexError) as err:  # a part rewritten or gone since
                logger.warning("local features of %d photos unreadable: %s", len(wanted), err)
                out.update({image_id: None for _, _, image_id in wanted})
                continue
            for (_, row, image_id), table in zip(wanted, tables, strict=True):
                if row >= len(table) or table["image_id"][row].as_py() != image_id:
                    out[image_id] = None  # its part was rewritten since it was looked up
                    continue
                out[image_id] = features_from_row(
                    table["keypoints"][row].as_py(),
                    table["descriptors"][row].as_py(),
                    (int(table["width"][row].as_py()), int(table["height"][row].as_py())),
                )
        with self._lock:
            for image_id in image_ids:
                found = out[image_id]
                if found is not None and image_id not in self._cache:
                    self._cache[image_id] = found
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return [out[image_id] for image_id in image_ids]

    def _places(self) -> dict[str, tuple[str, int, int]]:
        """image_id → (part file, row group, row in it) of every photo with features."""
        if self._where is not None:
            return self._where
        where: dict[str, tuple[str, int, int]] = {}
        for part in self.files:
            table, sizes = LOCAL_FEATURES.read_file_groups(part, ["image_id", "error"])
            starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
            ids, errors = table["image_id"].to_pylist(), table["error"].to_pylist()
            for i, (image_id, error) in enumerate(zip(ids, errors, strict=True)):
                if error is not None or (self._wanted is not None and image_id not in self._wanted):
                    continue
                group = int(np.searchsorted(starts, i, side="right")) - 1
                where[image_id] = (part, group, i - int(starts[group]))
        with self._lock:
            if self._where is None:
                self._where = where
        return self._where
