"""The shards of an index version that one serving slot holds, searched as one.

A slot is what one Ray Serve shard deployment serves (``cluster.deployments.IndexShard``): of
a version's shards ``0 .. S-1``, slot ``i`` of ``n`` holds those with ``number % n == i``, so a
version that grows by new shards spreads them over the slots it already has. A slot answers
with its canonical top k over its shards (:func:`cluster.index_store.merge_topk` of each
shard's :func:`~cluster.index_store.shard_topk`), global ids and image_ids, and the router
merges the slots the same way: the result is that of one unsharded index, ties included.

Versions. A slot may hold two versions at once (the one being served and the next, during a
reload), so that a query is answered wholly by the version it was sent to. Shard files that a
newer version shares with an older one (``v2`` lists ``v1``'s shards) are loaded once. A query
for a version the slot does not hold loads it first (a restarted replica, a replica that missed
the reload's warm-up call): slow once, never wrong.

Ray-free and torch-free: NumPy, FAISS and the storage layer. ``gpu=True`` moves each shard to
the GPU with FAISS's own ``index_cpu_to_gpu`` when this FAISS build sees one.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from cluster import index_store

__all__ = ["Loaded", "ShardSet", "SlotResult", "gpu_count", "slot_shards"]

logger = logging.getLogger(__name__)


def gpu_count() -> int:
    """GPUs this FAISS build can use (0 for faiss-cpu)."""
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


def slot_shards(shard_count: int, slot: int, slots: int) -> list[int]:
    """The shard numbers slot ``slot`` of ``slots`` serves: ``number % slots == slot``."""
    if not 0 <= slot < slots:
        raise ValueError(f"slot {slot} of {slots}")
    return [number for number in range(shard_count) if number % slots == slot]


@dataclass(frozen=True)
class SlotResult:
    """A slot's top k, best first: the same shapes for every slot, padding where empty."""

    scores: np.ndarray
    """float32 ``[nq, k]``; ``-inf`` where empty."""
    ids: np.ndarray
    """int64 ``[nq, k]`` global ids; -1 where empty."""
    image_ids: np.ndarray
    """object ``[nq, k]``; ``None`` where empty."""
    version: int


@dataclass
class Loaded:
    """One loaded shard: its FAISS index and its id map."""

    index: faiss.Index
    id_map: index_store.IdMap

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, labels = index_store.shard_topk(self.index, queries, k)
        return scores, self.id_map.global_ids(labels)

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """Stored vectors of global ids held here (exact for Flat; decoded codes for PQ)."""
        labels = np.searchsorted(self.id_map.ids, ids).astype(np.int64)
        return self.index.reconstruct_batch(labels)


class ShardSet:
    """Slot ``slot`` of ``slots`` over the versions of the index at ``index`` (path or URI)."""

    def __init__(
        self,
        index: str,
        slot: int = 0,
        slots: int = 1,
        *,
        gpu: bool = False,
        keep_versions: int = 2,
        search_params: Mapping[str, Any] | None = None,
    ) -> None:
        if slots < 1 or not 0 <= slot < slots:
            raise ValueError(f"slot {slot} of {slots}")
        self.index, self.slot, self.slots = index, slot, slots
        self.gpu = gpu and gpu_count() > 0
        self.keep_versions = max(1, keep_versions)
        self.search_params = dict(search_params) if search_params is not None else None
        self._versions: OrderedDict[int, dict[str, Any]] = OrderedDict()  # version → its parts
        self._files: dict[str, Loaded] = {}  # shard file → loaded, shared between versions
        self._lock = threading.Lock()

    @property
    def versions(self) -> list[int]:
        """The versions held now, oldest first."""
        return list(self._versions)

    def load(self, version: int | None = None) -> int:
        """Hold ``version`` (default: the newest complete one); returns its number."""
        with self._lock:
            manifest = index_store.read_manifest(self.index, version)
            number = int(manifest["version"])
            if number in self._versions:
                self._versions.move_to_end(number)
                return number
            numbers = slot_shards(len(manifest["shards"]), self.slot, self.slots)
            parts = []
            for i in numbers:
                entry = manifest["shards"][i]
                loaded = self._files.get(entry["file"])
                if loaded is None:
                    loaded = self._load(manifest, i)
                    self._files[entry["file"]] = loaded
                if loaded.index.ntotal:
                    parts.append(loaded)
            self._versions[number] = {"manifest": manifest, "parts": parts}
            while len(self._versions) > self.keep_versions:
                self._versions.popitem(last=False)
            used = {
                entry["file"]
                for held in self._versions.values()
                for entry in held["manifest"]["shards"]
            }
            for name in [name for name in self._files if name not in used]:
                del self._files[name]
            logger.info(
                "slot %d/%d holds v%d: shards %s (%d vectors)",
                self.slot,
                self.slots,
                number,
                numbers,
                sum(int(p.index.ntotal) for p in parts),
            )
            return number

    def _load(self, manifest: Mapping[str, Any], i: int) -> Loaded:
        faiss_index, id_map = index_store.load_shard(
            self.index, manifest, i, search_params=self.search_params
        )
        ivf = faiss.try_extract_index_ivf(faiss_index)
        if ivf is not None:  # reconstruct() of an IVF index needs its direct map
            ivf.make_direct_map()
        if self.gpu:
            faiss_index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, faiss_index)
        return Loaded(faiss_index, id_map)

    def manifest(self, version: int | None = None) -> dict[str, Any]:
        """The manifest of a held version (default: the newest held)."""
        return self._held(version)["manifest"]

    def _held(self, version: int | None) -> dict[str, Any]:
        if version is None:
            if not self._versions:
                self.load()
            version = next(reversed(self._versions))
        if version not in self._versions:
            self.load(version)
        return self._versions[version]

    def search(self, queries: np.ndarray, k: int, version: int | None = None) -> SlotResult:
        """This slot's canonical top ``k`` of each query in ``version``."""
        held = self._held(version)
        manifest, parts = held["manifest"], held["parts"]
        q = np.ascontiguousarray(np.asarray(queries, dtype=np.float32))
        n = len(q)
        if not parts:  # a slot with no vectors (more slots than non-empty shards)
            return SlotResult(
                scores=np.full((n, k), -np.inf, np.float32),
                ids=np.full((n, k), -1, np.int64),
                image_ids=np.full((n, k), None, dtype=object),
                version=int(manifest["version"]),
            )
        found = [part.search(q, k) for part in parts]
        scores, ids = index_store.merge_topk([f[0] for f in found], [f[1] for f in found], k)
        return SlotResult(
            scores=scores,
            ids=ids,
            image_ids=self._image_ids(parts, ids),
            version=int(manifest["version"]),
        )

    def vectors(self, ids: np.ndarray, version: int | None = None) -> dict[int, np.ndarray]:
        """The stored vectors of those global ``ids`` this slot holds, by id."""
        held = self._held(version)
        wanted = np.unique(np.asarray(ids, dtype=np.int64).reshape(-1))
        wanted = wanted[wanted >= 0]
        out: dict[int, np.ndarray] = {}
        for part in held["parts"]:
            first, last = part.id_map.ids[0], part.id_map.ids[-1]
            mine = wanted[(wanted >= first) & (wanted <= last)]
            if len(mine):
                out.update(zip(mine.tolist(), part.vectors(mine), strict=True))
        return out

    @staticmethod
    def _image_ids(parts: list[Loaded], ids: np.ndarray) -> np.ndarray:
        out = np.full(ids.shape, None, dtype=object)
        for part in parts:
            first, last = part.id_map.ids[0], part.id_map.ids[-1]
            mine = (ids >= first) & (ids <= last)
            if mine.any():
                out[mine] = part.id_map.image_ids[np.searchsorted(part.id_map.ids, ids[mine])]
        return out
