"""The search shard pool and its router: Ray Serve deployments over :mod:`cluster.shards`.

``IndexShard`` is one slot of the index (``cluster.shards.ShardSet``): a deployment per slot,
each with as many replicas as configured (or as Serve's autoscaler starts), on CPU or GPU
FAISS. ``SearchRouter`` takes batches of query vectors (``@serve.batch``, up to
``concurrent_batches`` in flight at once so that a slot's replicas share the work), sends each
batch to every slot with the version it is serving, merges the slots' canonical top k (largest
inner product first, lower id first on ties: the result of one unsharded index) and drops the
empty places. With ``qe`` it expands a query by αQE: the vectors of its ``qe_k`` nearest
neighbours are fetched from the slots and :func:`model.retrieval.alpha_qe` combines them
exactly as it does over a whole matrix, then the expanded query is searched again.

Reload. The router alone decides which version is served. ``reload`` first has every slot load
the new version beside the old one, then switches; a batch reads the version once and sends
it with every call, so each answer comes wholly from one version, and no query waits for or
fails on the switch. A slot replica that restarts (or missed the warm-up) loads a version the
first time it is asked for it. With ``watch_s`` the router also looks for a newer complete
version every ``watch_s`` seconds and reloads by itself.

A call to a slot whose replica died is retried until ``retry_s`` has passed: Serve starts a
new replica, which loads its shards; the query is answered late rather than failed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError

from cluster import index_store
from cluster.resources import use_reserved_threads
from cluster.shards import ShardSet, SlotResult
from model.retrieval import QueryExpansion, alpha_qe

__all__ = ["Hit", "IndexShard", "SearchRouter", "merge_slots"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hit:
    image_id: str
    id: int
    score: float


def merge_slots(results: Sequence[SlotResult], k: int) -> list[list[Hit]]:
    """The slots' answers → each query's top ``k``, best first, empty places dropped."""
    scores, ids = index_store.merge_topk([r.scores for r in results], [r.ids for r in results], k)
    names: dict[int, str] = {}
    for result in results:
        valid = result.ids >= 0
        names.update(zip(result.ids[valid].tolist(), result.image_ids[valid].tolist(), strict=True))
    return [
        [
            Hit(image_id=names[i], id=i, score=float(s))
            for s, i in zip(row_scores, row_ids.tolist(), strict=True)
            if i >= 0
        ]
        for row_scores, row_ids in zip(scores, ids, strict=True)
    ]


@serve.deployment
class IndexShard:
    """One slot of the index: its shards of each version it is asked for."""

    def __init__(
        self,
        index: str,
        slot: int,
        slots: int,
        *,
        version: int,
        gpu: bool = False,
        threads: int | None = None,
    ) -> None:

        use_reserved_threads(threads)
        self.shards = ShardSet(index, slot, slots, gpu=gpu)
        self.shards.load(version)

    def search(self, queries: np.ndarray, k: int, version: int) -> SlotResult:
        return self.shards.search(queries, k, version)

    def vectors(self, ids: np.ndarray, version: int) -> dict[int, np.ndarray]:
        return self.shards.vectors(ids, version)

    def load(self, version: int) -> list[int]:
        self.shards.load(version)
        return self.shards.versions

    def pid(self) -> int:
        """The replica's process id (tests kill a replica by the id they were given)."""
        return os.getpid()


@dataclass(frozen=True)
class _Query:
    vector: np.ndarray
    k: int
    qe: bool


@serve.deployment
class SearchRouter:
    """Fans batches of queries out to every slot and merges; owns the served version."""

    def __init__(
        self,
        index: str,
        slots: list[Any],
        version: int,
        *,
        qe: QueryExpansion,
        max_batch_size: int = 32,
        batch_wait_s: float = 0.005,
        concurrent_batches: int = 1,
        retry_s: float = 60.0,
        watch_s: float = 0.0,
    ) -> None:
        self.index, self.slots = index, slots
        self.manifest = index_store.read_manifest(index, version)
        self.qe, self.retry_s = qe, retry_s
        # Batches in flight at once: with one, a slot's replicas would take turns.
        self._search_batch = serve.batch(
            max_batch_size=max_batch_size,
            batch_wait_timeout_s=batch_wait_s,
            max_concurrent_batches=concurrent_batches,
        )(self._answer_batch)
        self._reload_lock = asyncio.Lock()
        self._watcher = (
            asyncio.get_event_loop().create_task(self._watch(watch_s)) if watch_s else None
        )

    async def _watch(self, every_s: float) -> None:
        """Serve each new complete version within ``every_s`` seconds of its publication."""
        while True:
            await asyncio.sleep(every_s)
            try:
                latest = await asyncio.to_thread(index_store.latest_version, self.index)
                if latest is not None and latest > self.version:
                    await self.reload(latest)
            except Exception as err:  # a storage hiccup: keep serving, try again later
                logger.warning("watching %s for new versions: %s", self.index, err)

    @property
    def version(self) -> int:
        return int(self.manifest["version"])

    def info(self) -> dict[str, Any]:
        """What is served: version, dimension, vector count, shards and slots."""
        m = self.manifest
        return {
            "version": self.version,
            "dim": int(m["dim"]),
            "count": int(m["count"]),
            "shards": len(m["shards"]),
            "slots": len(self.slots),
            "factory": m["factory"],
            "network": m.get("network"),
            "settings": m.get("settings", {}),
        }

    async def search(self, vector: np.ndarray, k: int, qe: bool = False) -> dict[str, Any]:
        """One query: ``{"version": v, "hits": [Hit, ...]}``, batched with others."""
        return await self._search_batch(_Query(np.asarray(vector, np.float32), int(k), bool(qe)))

    async def search_many(
        self, vectors: np.ndarray, k: int, *, qe: bool = False, version: int | None = None
    ) -> dict[str, Any]:
        """A whole matrix of queries at once (the Python handle's bulk path, benchmarks)."""
        manifest = (
            self.manifest if version is None else index_store.read_manifest(self.index, version)
        )
        queries = [_Query(v, int(k), bool(qe)) for v in np.asarray(vectors, np.float32)]
        hits = await self._answer(queries, int(manifest["version"]))
        return {"version": int(manifest["version"]), "hits": hits}

    async def _answer_batch(self, queries: list[_Query]) -> list[dict[str, Any]]:
        """A batch of queries (``self._search_batch`` gathers them), answered by one version."""
        version = self.version  # read once: the whole batch is answered by one version
        hits = await self._answer(queries, version)
        return [{"version": version, "hits": h} for h in hits]

    async def _answer(self, queries: list[_Query], version: int) -> list[list[Hit]]:
        q = np.stack([query.vector for query in queries])
        k = max(query.k for query in queries)
        expand = [i for i, query in enumerate(queries) if query.qe]
        if expand:
            q = q.copy()
            q[expand] = await self._expanded(q[expand], version)
        hits = merge_slots(await self._fan_out("search", q, k, version), k)
        return [row[: query.k] for row, query in zip(hits, queries, strict=True)]

    async def _expanded(self, q: np.ndarray, version: int) -> np.ndarray:
        """αQE of each query over its ``qe_k`` nearest stored vectors."""
        k = self.qe.qe_k
        neighbours = merge_slots(await self._fan_out("search", q, k, version), k)
        ids = np.array(sorted({hit.id for row in neighbours for hit in row}), np.int64)
        stored: dict[int, np.ndarray] = {}
        for part in await self._fan_out("vectors", ids, version):
            stored.update(part)
        out = np.empty_like(q)
        for j, row in enumerate(neighbours):
            if not row:
                out[j] = q[j]
                continue
            x = np.stack([stored[hit.id] for hit in row])
            # Its neighbours are already the k nearest: alpha_qe weighs and adds them as it
            # does over the whole matrix (the query is no database row here: query_rows -1).
            out[j] = alpha_qe(q[j : j + 1], x, len(row), self.qe.qe_alpha, query_rows=[-1])[0]
        return out

    async def _fan_out(self, method: str, *args: Any) -> list[Any]:
        return list(await asyncio.gather(*(self._call(slot, method, *args) for slot in self.slots)))

    async def _call(self, slot: Any, method: str, *args: Any) -> Any:
        deadline = time.monotonic() + self.retry_s
        delay = 0.1
        while True:
            try:
                return await getattr(slot, method).remote(*args)
            except (RayActorError, ActorUnavailableError) as err:
                if time.monotonic() > deadline:
                    raise
                logger.warning("slot call %s failed (%s); retrying in %.1f s", method, err, delay)
                await asyncio.sleep(delay)
                delay = min(2 * delay, 2.0)

    async def reload(self, version: int | None = None) -> dict[str, Any]:
        """Serve ``version`` (default: the newest complete one) once every slot holds it."""
        async with self._reload_lock:
            manifest = index_store.read_manifest(self.index, version)
            new, old = int(manifest["version"]), self.version
            if int(manifest["dim"]) != int(self.manifest["dim"]):
                raise ValueError(
                    f"v{new} has dimension {manifest['dim']}, the served v{old} has "
                    f"{self.manifest['dim']}: serve it as another app"
                )
            if new != old:
                await self._fan_out("load", new)
                self.manifest = manifest
                logger.info("now serving v%d (was v%d)", new, old)
            return {"version": new, "previous": old}
