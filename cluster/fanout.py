"""A batch of queries sent to every slot of the index and merged: the search itself.

Both the router (photos, the Python handle, batch requests) and the HTTP ingress (descriptor
queries, without a hop through the router) answer this way. Each slot (``IndexShard``) returns
its canonical top k of one named version; the merge keeps the largest inner products, lower
id first on ties, so the answer equals that of the one unsharded index. With ``qe`` a query is
expanded by αQE: the vectors of its ``qe_k`` nearest neighbours are fetched from the slots and
:func:`model.retrieval.alpha_qe` combines them exactly as it does over a whole matrix, then
the expanded query is searched again. With ``kreciprocal=K`` a query's top K are re-ordered by
k-reciprocal encoding over the query and their stored vectors alone
(:func:`model.kreciprocal.shortlist_order`, what ``pipeline.evaluate --kreciprocal-top K``
runs).

A call to a slot whose replica died is retried until ``retry_s`` has passed: Serve starts a
new replica, which loads its shards; the query is answered late rather than failed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from ray.exceptions import ActorUnavailableError, RayActorError

from cluster import index_store
from cluster.shards import SlotResult
from model.kreciprocal import KReciprocalOptions, shortlist_order
from model.retrieval import QueryExpansion, alpha_qe

__all__ = ["Hit", "SearchQuery", "SlotSearch", "call_retried", "merge_slots"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hit:
    image_id: str
    id: int
    score: float
    inliers: int | None = None
    """Spatially verified matches with the query, when it was re-ranked (``None``: not
    verified, or a photo without local features)."""


@dataclass(frozen=True)
class SearchQuery:
    vector: np.ndarray
    k: int
    qe: bool
    version: int | None = None
    """The version to answer from (a photo described with its network); ``None``: served."""
    kreciprocal: int = 0
    """Re-order the top ``kreciprocal`` by k-reciprocal encoding; 0: off."""


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


async def call_retried(
    deployment: Any, method: str, *args: Any, retry_s: float, **kwargs: Any
) -> Any:
    """``deployment.method(*args, **kwargs)``, retried while Serve replaces a replica that died."""
    deadline = time.monotonic() + retry_s
    delay = 0.1
    while True:
        try:
            return await getattr(deployment, method).remote(*args, **kwargs)
        except (RayActorError, ActorUnavailableError) as err:
            if time.monotonic() > deadline:
                raise
            logger.warning("call %s failed (%s); retrying in %.1f s", method, err, delay)
            await asyncio.sleep(delay)
            delay = min(2 * delay, 2.0)


class SlotSearch:
    """Queries of one version → every slot (``IndexShard`` handles) → the merged top k."""

    def __init__(
        self,
        slots: Sequence[Any],
        qe: QueryExpansion,
        *,
        kreciprocal: KReciprocalOptions | None = None,
        retry_s: float = 60.0,
    ) -> None:
        self.slots, self.qe, self.retry_s = list(slots), qe, retry_s
        self.kreciprocal = kreciprocal if kreciprocal is not None else KReciprocalOptions()

    async def answer(self, queries: Sequence[SearchQuery], version: int) -> list[list[Hit]]:
        """Each query's hits in ``version``, αQE and k-reciprocal re-ranking for those that
        ask, in one fan-out (and one more for the stored vectors each needs)."""
        q = np.stack([query.vector for query in queries])
        k = max(max(query.k, query.kreciprocal) for query in queries)
        expand = [i for i, query in enumerate(queries) if query.qe]
        if expand:
            q = q.copy()
            q[expand] = await self._expanded(q[expand], version)
        hits = merge_slots(await self.fan_out("search", q, k, version), k)
        asked = [i for i, query in enumerate(queries) if query.kreciprocal]
        if asked:
            heads = [hits[i][: queries[i].kreciprocal] for i in asked]
            for i, head in zip(
                asked, await self._kreciprocal(q[asked], heads, version), strict=True
            ):
                hits[i] = head + hits[i][len(head) :]
        return [row[: query.k] for row, query in zip(hits, queries, strict=True)]

    async def _kreciprocal(
        self, q: np.ndarray, heads: list[list[Hit]], version: int
    ) -> list[list[Hit]]:
        """Each query's ``heads`` re-ordered by k-reciprocal encoding over the query (as it was
        searched) and the heads' stored vectors."""
        stored = await self._stored(heads, version)

        def reorder() -> list[list[Hit]]:
            out = []
            for query, head in zip(q, heads, strict=True):
                if len(head) < 2:
                    out.append(head)
                    continue
                x = np.stack([stored[hit.id] for hit in head]).astype(np.float32)
                out.append([head[i] for i in shortlist_order(query, x, self.kreciprocal)])
            return out

        return await asyncio.to_thread(reorder)

    async def _expanded(self, q: np.ndarray, version: int) -> np.ndarray:
        """αQE of each query over its ``qe_k`` nearest stored vectors."""
        k = self.qe.qe_k
        neighbours = merge_slots(await self.fan_out("search", q, k, version), k)
        stored = await self._stored(neighbours, version)
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

    async def _stored(self, rows: Sequence[Sequence[Hit]], version: int) -> dict[int, np.ndarray]:
        """The stored vectors of every hit in ``rows``, by id, from the slots holding them."""
        ids = np.array(sorted({hit.id for row in rows for hit in row}), np.int64)
        stored: dict[int, np.ndarray] = {}
        for part in await self.fan_out("vectors", ids, version):
            stored.update(part)
        return stored

    async def fan_out(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """``method(*args, **kwargs)`` on every slot at once, their answers in slot order."""
        return list(
            await asyncio.gather(
                *(
                    call_retried(slot, method, *args, retry_s=self.retry_s, **kwargs)
                    for slot in self.slots
                )
            )
        )
