"""The search shard pool and its router: Ray Serve deployments over :mod:`cluster.shards`.

``IndexShard`` is one slot of the index (``cluster.shards.ShardSet``): a deployment per slot,
each with as many replicas as configured (or as Serve's autoscaler starts), on CPU or GPU
FAISS. ``SearchRouter`` owns the served version. It answers photos (described by the embedder with
the network of the version they are searched in), batch requests and the Python handle's
queries: batches (:class:`cluster.batching.Batcher`, up to ``concurrent_batches`` in flight
at once so that a slot's replicas share the work) sent to every slot with one version and
merged (:class:`cluster.fanout.SlotSearch`, αQE included). The HTTP ingress sends descriptor
queries to the slots itself, with the version the router serves.

The served state. ``INDEX/CURRENT`` (:mod:`cluster.served`) names the version served, its
manifest and its network; the index stage writes it when it publishes, ``reload`` when asked.
Every replica starts on it and follows it: a shard replica loads a new version beside the one
served and reports what it holds; the router switches once every running replica of every
slot has reported the new version, so no query is sent to a replica that must load first. A
batch reads the version once and sends it with every call, so each answer comes wholly from
one version; a photo is described with the network of the version it is searched in (the
embedder holds the networks of both). A router that restarts comes back on ``CURRENT``. A
replica that still lacks a version it is asked for loads it first: slow once, never wrong.
With ``watch_s`` the router also promotes each newer complete version as it appears.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
import time
from typing import Any

import numpy as np
from ray import serve

from cluster import index_store
from cluster.batching import Batcher
from cluster.embedder import NO_LOCAL_FEATURES
from cluster.fanout import Hit, SearchQuery, SlotSearch, call_retried, merge_slots
from cluster.resources import use_reserved_threads
from cluster.served import ServedState, promote, read_current, served_state, verified
from cluster.shards import ShardSet, SlotResult
from model.kreciprocal import KReciprocalOptions
from model.local_features import LocalFeatures
from model.retrieval import QueryExpansion
from model.verification import VerifyOptions, rerank_order

__all__ = ["Hit", "IndexShard", "SearchRouter", "merge_slots"]

logger = logging.getLogger(__name__)


@serve.deployment
class IndexShard:
    """One slot of the index: its shards of each version it is asked for.

    It starts on the served state (``INDEX/CURRENT``), follows that record from a thread
    (every ``follow_s``: a new state is loaded beside the one served), and tells the router
    what it holds after each look, so the router switches only once every replica can answer."""

    def __init__(
        self,
        index: str,
        slot: int,
        slots: int,
        *,
        gpu: bool = False,
        threads: int | None = None,
        follow_s: float = 1.0,
    ) -> None:
        use_reserved_threads(threads)
        self.index, self.slot = index, slot
        self.shards = ShardSet(index, slot, slots, gpu=gpu)
        self.shards.load(served_state(index).version)
        self._replica = _replica_id()
        self._router: Any = None
        self._served: int | None = None  # the router's version: never evicted while served
        self._stop = threading.Event()
        self._follower = threading.Thread(
            target=self._follow, args=(follow_s,), name="follow-current", daemon=True
        )
        self._follower.start()

    def _follow(self, every_s: float) -> None:
        while True:
            try:
                current, _ = read_current(self.index)
                if current is not None and current.version not in self.shards.versions:
                    keep = () if self._served is None else (self._served,)
                    self.shards.load(current.version, keep=keep)
                self._report()
            except Exception as err:  # storage or router hiccup: look again next round
                logger.warning("slot %d following %s: %s", self.slot, self.index, err)
            if self._stop.wait(every_s):
                return

    def _report(self) -> None:
        if self._router is None:
            app = serve.get_replica_context().app_name
            self._router = serve.get_deployment_handle("SearchRouter", app_name=app)
        self._served = self._router.report.remote(
            self.slot, self._replica, self.shards.versions
        ).result(timeout_s=30)

    def search(self, queries: np.ndarray, k: int, version: int) -> SlotResult:
        return self.shards.search(queries, k, version)

    def vectors(self, ids: np.ndarray, version: int) -> dict[int, np.ndarray]:
        return self.shards.vectors(ids, version)

    def verify(
        self, query: LocalFeatures, ids: np.ndarray, version: int, *, options: VerifyOptions
    ) -> dict[int, int | None]:
        return self.shards.verify(query, ids, version, options=options)

    def load(self, version: int) -> list[int]:
        self.shards.load(version, keep=() if self._served is None else (self._served,))
        return self.shards.versions

    def pid(self) -> int:
        """The replica's process id (tests kill a replica by the id they were given)."""
        return os.getpid()

    def held(self) -> dict[str, Any]:
        """This replica, the versions it holds and how many a search had to load first."""
        return {
            "replica": self._replica,
            "pid": os.getpid(),
            "versions": self.shards.versions,
            "loaded_on_demand": self.shards.loaded_on_demand,
        }

    def __del__(self) -> None:
        self._stop.set()


def _replica_id() -> str:
    try:
        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:  # outside Serve (a plain actor): the process is the replica
        return f"pid-{os.getpid()}"


@serve.deployment
class SearchRouter:
    """Fans batches of queries out to every slot and merges; follows the served state.

    It starts on ``INDEX/CURRENT`` and looks at it every ``follow_s``; a new state is served
    once every shard replica has reported holding its version (replicas report after each of
    their own looks, and their count is checked against Serve's running replicas). A photo
    is described with the network of the version it will be searched in, both read once."""

    def __init__(
        self,
        index: str,
        slots: list[Any],
        embedder: Any = None,
        *,
        qe: QueryExpansion,
        verify: VerifyOptions | None = None,
        kreciprocal: KReciprocalOptions | None = None,
        max_batch_size: int = 32,
        concurrent_batches: int = 1,
        retry_s: float = 60.0,
        watch_s: float = 0.0,
        follow_s: float = 1.0,
        switch_timeout_s: float = 300.0,
    ) -> None:
        self.index, self.slots, self.embedder = index, slots, embedder
        self.state = served_state(index)
        self.manifest = index_store.read_manifest(index, self.state.version)
        self.retry_s = retry_s
        self.verify = verify if verify is not None else VerifyOptions()
        self._slots = SlotSearch(slots, qe, kreciprocal=kreciprocal, retry_s=retry_s)
        self.follow_s, self.watch_s, self.switch_timeout_s = follow_s, watch_s, switch_timeout_s
        # Batches in flight at once: with one, a slot's replicas would take turns.
        self._search_batch = Batcher(
            self._answer_batch, max_batch_size=max_batch_size, concurrent=concurrent_batches
        )
        self._reload_lock = asyncio.Lock()
        self._switch_lock = asyncio.Lock()
        self._replicas: dict[str, tuple[int, tuple[int, ...], float]] = {}
        self._follower = asyncio.get_event_loop().create_task(self._follow())

    # --- the served state ---------------------------------------------------------------------

    @property
    def version(self) -> int:
        return self.state.version

    def served(self) -> tuple[int, int]:
        """The version answered from now and ``CURRENT``'s serial when it became so (the
        ingress asks, to search the slots itself; the serial orders the answers it gets)."""
        return self.version, self.state.serial

    def report(self, slot: int, replica: str, held: list[int]) -> int:
        """A shard replica's versions; answers the version served (which it must keep)."""
        self._replicas[replica] = (int(slot), tuple(int(v) for v in held), time.monotonic())
        return self.version

    async def _follow(self) -> None:
        """Serve ``CURRENT`` once every replica holds it; with ``watch_s``, promote each new
        complete version as it appears."""
        watched = time.monotonic()
        while True:
            await asyncio.sleep(self.follow_s)
            try:
                if self.watch_s and time.monotonic() - watched >= self.watch_s:
                    watched = time.monotonic()
                    latest = await asyncio.to_thread(index_store.latest_version, self.index)
                    if latest is not None and latest > self.version:
                        await asyncio.to_thread(promote, self.index, latest)
                current, _ = await asyncio.to_thread(read_current, self.index)
                changed = current is not None and not current.same_as(self.state)
                if changed and current is not None and await self._all_hold(current.version):
                    await self._switch(current)
            except Exception as err:  # a storage hiccup: keep serving, look again later
                logger.warning("following %s: %s", self.index, err)

    async def _all_hold(self, version: int) -> bool:
        """Whether every live shard replica of every slot reported holding ``version``."""
        stale = max(10 * self.follow_s, 10.0)
        now = time.monotonic()
        live = [(s, held) for s, held, seen in self._replicas.values() if now - seen < stale]
        running = await self._running()
        for slot in range(len(self.slots)):
            mine = [held for s, held in live if s == slot]
            if not mine or any(version not in held for held in mine):
                return False
            if running is not None and len(mine) < running.get(slot, 0):
                return False  # a running replica that has not reported yet
        return True

    async def _running(self) -> dict[int, int] | None:
        """Running replicas of each slot's deployment, as Serve's controller counts them."""
        try:
            app = serve.get_replica_context().app_name
            status = await asyncio.to_thread(serve.status)
            deployments = status.applications[app].deployments
            running = {}
            for slot in range(len(self.slots)):
                states: dict[Any, int] = dict(deployments[f"IndexShard{slot}"].replica_states)
                running[slot] = int(states.get("RUNNING", 0))  # ReplicaState is a str enum
            return running
        except Exception:  # outside Serve, or names of one's own: the reports alone decide
            return None

    async def _switch(self, state: ServedState) -> None:
        async with self._switch_lock:
            if state.same_as(self.state):
                return
            await asyncio.to_thread(verified, self.index, state)
            manifest = await asyncio.to_thread(index_store.read_manifest, self.index, state.version)
            if int(manifest["dim"]) != int(self.manifest["dim"]):
                raise ValueError(
                    f"v{state.version} has dimension {manifest['dim']}, the served "
                    f"v{self.version} has {self.manifest['dim']}: serve it as another app"
                )
            previous = self.version
            self.manifest, self.state = manifest, state
            logger.info(
                "now serving v%d (was v%d), CURRENT serial %d",
                state.version,
                previous,
                state.serial,
            )

    def pid(self) -> int:
        """The replica's process id (tests kill a replica by the id they were given)."""
        return os.getpid()

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
            "serial": self.state.serial,
        }

    async def search(
        self, vector: np.ndarray, k: int, qe: bool = False, *, kreciprocal: int = 0
    ) -> dict[str, Any]:
        """One query: ``{"version": v, "hits": [Hit, ...]}``, batched with others."""
        return await self._search_batch(
            SearchQuery(np.asarray(vector, np.float32), int(k), bool(qe), None, int(kreciprocal))
        )

    async def search_photo(
        self, photo: bytes, k: int, qe: bool = False, *, rerank: int = 0, kreciprocal: int = 0
    ) -> dict[str, Any] | str:
        """One photo, as ``search_photos`` answers it alone: ``{"version": v, "hits": [Hit,
        ...], "reranked": counts or None}``, or why it has no answer (a string)."""
        answer = await self.search_photos([photo], k, qe, rerank=rerank, kreciprocal=kreciprocal)
        if isinstance(answer, str):
            return answer
        (hits,), (reranked,) = answer["hits"], answer["reranked"]
        if isinstance(hits, str):
            return hits
        return {"version": answer["version"], "hits": hits, "reranked": reranked}

    async def _reranked(
        self, hits: list[Hit], features: LocalFeatures, rerank: int, *, version: int
    ) -> dict[str, Any]:
        """The top ``rerank`` hits verified by the slots holding them and re-ordered
        (``model.verification.rerank_order``), and what the re-ranking counted."""
        top, rest = hits[:rerank], hits[rerank:]
        ids = np.array([hit.id for hit in top], np.int64)
        found: dict[int, int | None] = {}
        for part in await self._slots.fan_out(
            "verify", features, ids, version, options=self.verify
        ):
            found.update(part)
        inliers = np.array([found.get(hit.id) or 0 for hit in top], np.int64)
        scores = np.array([hit.score for hit in top], np.float64)
        order = rerank_order(scores, inliers, self.verify.rerank_min_inliers)
        ranked = [dataclasses.replace(top[i], inliers=found.get(top[i].id)) for i in order]
        return {
            "hits": ranked + rest,
            "reranked": {
                "candidates": len(top),
                "verified": int((inliers >= self.verify.rerank_min_inliers).sum()),
                "without_features": sum(found.get(hit.id) is None for hit in top),
                "query_features": len(features),
            },
        }

    async def search_many(
        self,
        vectors: np.ndarray,
        k: int,
        *,
        qe: bool = False,
        kreciprocal: int = 0,
        version: int | None = None,
    ) -> dict[str, Any]:
        """A whole matrix of queries at once, wholly from one version: the ingress's batches of
        requests, ``POST /search/batch`` and the Python handle's bulk path."""
        manifest = (
            self.manifest if version is None else index_store.read_manifest(self.index, version)
        )
        queries = [
            SearchQuery(v, int(k), bool(qe), None, int(kreciprocal))
            for v in np.asarray(vectors, np.float32)
        ]
        hits = await self._slots.answer(queries, int(manifest["version"]))
        return {"version": int(manifest["version"]), "hits": hits}

    async def search_photos(
        self,
        photos: list[bytes],
        k: int,
        qe: bool = False,
        *,
        rerank: int = 0,
        kreciprocal: int = 0,
    ) -> dict[str, Any] | str:
        """Photos, each described with the network of the version served now, then searched in
        that very version (batched with other requests'): ``{"version": v, "hits": [[Hit, ...]
        or "why not", ...], "reranked": [counts or None, ...]}``; or why the request cannot be
        answered (a string). With ``kreciprocal``, a photo's top ``kreciprocal`` are re-ordered
        by k-reciprocal encoding (``SlotSearch``); with ``rerank``, then its top ``rerank`` are
        re-ranked by spatial verification (``model.reranking``, as ``pipeline.evaluate
        --rerank`` does), each slot verifying the candidates it holds."""
        version, manifest = self.version, self.manifest  # read once: one state
        if rerank and not manifest.get("local_features"):
            return NO_LOCAL_FEATURES.format(version=version)
        embedded, features = await asyncio.gather(
            asyncio.gather(*(self._embed(photo, version) for photo in photos)),
            asyncio.gather(*(self._local_features(p, version, rerank=rerank) for p in photos)),
        )
        out: list[Any] = [self._fits(vector) for vector in embedded]
        for i, found in enumerate(features):
            if isinstance(found, str) and not isinstance(out[i], str):
                out[i] = found
        reranked: list[dict[str, int] | None] = [None] * len(photos)
        depth = max(int(k), int(rerank))

        async def answer(i: int) -> None:
            query = SearchQuery(out[i], depth, bool(qe), version, int(kreciprocal))
            hits = (await self._search_batch(query))["hits"]
            found = features[i]
            if rerank:
                assert found is not None and not isinstance(found, str)
                done = await self._reranked(hits, found, rerank, version=version)
                hits, reranked[i] = done["hits"], done["reranked"]
            out[i] = hits[: int(k)]

        await asyncio.gather(*(answer(i) for i, v in enumerate(out) if not isinstance(v, str)))
        return {"version": version, "hits": out, "reranked": reranked}

    async def _local_features(
        self, photo: bytes, version: int, *, rerank: int
    ) -> LocalFeatures | str | None:
        """The photo's local features for re-ranking, extracted as the version's pin says
        (``None`` without ``rerank``), or why they cannot be (a string)."""
        if not rerank:
            return None
        return await call_retried(
            self.embedder, "local_features", photo, version, retry_s=self.retry_s
        )

    def _fits(self, vector: np.ndarray | str) -> np.ndarray | str:
        """A photo's descriptor, or why it cannot be searched here: a network that describes
        with another dimension than the index's vectors (a reload never changes that)."""
        dim = int(self.manifest["dim"])
        if isinstance(vector, str) or vector.shape[-1] == dim:
            return vector
        return (
            f"the index's network describes a photo with {vector.shape[-1]} values; "
            f"the index holds vectors of dimension {dim}"
        )

    async def _embed(self, photo: bytes, version: int) -> np.ndarray | str:
        return await call_retried(self.embedder, "embed", photo, version, retry_s=self.retry_s)

    async def _answer_batch(self, queries: list[SearchQuery]) -> list[dict[str, Any]]:
        """A batch of queries (``self._search_batch`` gathers them): each answered by one
        version, its own (a photo's) or the one served, read once for the batch."""
        served = self.version
        by_version: dict[int, list[int]] = {}
        for i, query in enumerate(queries):
            by_version.setdefault(query.version or served, []).append(i)
        out: list[dict[str, Any]] = [{} for _ in queries]
        for version, rows in by_version.items():
            hits = await self._slots.answer([queries[i] for i in rows], version)
            for i, h in zip(rows, hits, strict=True):
                out[i] = {"version": version, "hits": h}
        return out

    async def reload(self, version: int | None = None) -> dict[str, Any]:
        """Serve ``version`` (default: the newest complete one): written to ``CURRENT``, then
        served once every shard replica holds it. ``TimeoutError`` when they do not within
        ``switch_timeout_s`` (the service answers from the old version until they do)."""
        async with self._reload_lock:
            manifest = await asyncio.to_thread(index_store.read_manifest, self.index, version)
            new, old = int(manifest["version"]), self.version
            if int(manifest["dim"]) != int(self.manifest["dim"]):
                raise ValueError(
                    f"v{new} has dimension {manifest['dim']}, the served v{old} has "
                    f"{self.manifest['dim']}: serve it as another app"
                )
            state = await asyncio.to_thread(promote, self.index, new)
            if not state.same_as(self.state):
                await self._slots.fan_out("load", new)  # one replica a slot now; the rest follow
                deadline = time.monotonic() + self.switch_timeout_s
                while not state.same_as(self.state):
                    if await self._all_hold(new):
                        await self._switch(state)
                        break
                    if time.monotonic() > deadline:
                        raise TimeoutError(
                            f"not every shard replica holds v{new} after "
                            f"{self.switch_timeout_s:.0f} s; v{old} is still served, and v{new} "
                            "will be once they do"
                        )
                    await asyncio.sleep(0.05)
            return {"version": new, "previous": old}
