"""Spatial re-ranking of a whole described retrieval set, with its cost and its pictures.

The evaluation's side of ``model.reranking``: local features of the queries (from their
boxes) and of every database photo in some query's top-k are extracted once, in parallel,
through the per-photo cache; each query is re-ranked; the metrics are those of the re-ranked
rankings, exact (``model.scoring.score_reranked``). What it cost is measured apart from the
extraction: a query's verification, a pair's.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from model.datasets.sets import RetrievalSet
from model.images import BadImage
from model.local_feature_cache import LocalFeatureCache
from model.local_features import LocalFeatures, empty_features, read_local_image
from model.match_figure import draw_matches
from model.reranking import QueryRerank, RerankSettings, promoted_first, rerank_query
from model.retrieval import rank_by_similarity
from model.scoring import Scored, score_reranked
from model.verification import verify_pair

__all__ = ["RerankedSet", "rerank_set"]

MAX_FIGURES = 200
"""Queries whose best verified pair is drawn in the report (the worst ones are shown first)."""


@dataclass
class RerankedSet:
    """The re-ranked figures, each query's re-ranking, and what it cost."""

    scored: Scored
    queries: list[QueryRerank]
    cost: dict[str, Any]
    figures: dict[int, bytes]


def rerank_set(
    db: np.ndarray,
    queries: np.ndarray,
    rset: RetrievalSet,
    *,
    db_paths: Sequence[Path],
    cache: LocalFeatureCache,
    settings: RerankSettings,
    kappas: tuple[int, ...] = (1, 5, 10),
    num_workers: int = 2,
    before: Sequence[QueryRerank] | None = None,
) -> RerankedSet:
    """Re-rank every query of ``rset`` (``db`` and ``queries`` post-processed already; a row of
    ``db`` per ``db_paths``). ``before``: each query's ranking by an earlier re-ranking
    (``QueryRerank.order``, then the rest by similarity), whose top k is verified and whose
    order the unverified rows keep."""
    features = _Features(cache, db_paths, rset, num_workers=num_workers)
    k = min(settings.rerank, len(db))
    base = rank_by_similarity(queries, db, topk=k)
    if before is not None:
        base = np.stack(
            [promoted_first(_order_of(r), row, k) for r, row in zip(before, base, strict=True)]
        )
    features.prefetch(np.unique(base).tolist())
    query_features = features.queries(len(queries))
    started, extracted_before = time.perf_counter(), features.seconds
    reranked = [
        rerank_query(
            queries[j],
            db,
            base[j],
            query_features=query_features[j],
            features_of=features.of,
            settings=settings,
        )
        for j in tqdm(range(len(queries)), desc="re-rank", unit="query")
    ]
    seconds = time.perf_counter() - started - (features.seconds - extracted_before)
    if before is not None:
        orders = [_order_of(r) for r in before]
        reranked = [replace(r, order=o) for r, o in zip(reranked, orders, strict=True)]
    pairs = sum(r.pairs_verified for r in reranked)
    n_q = max(len(queries), 1)
    cost = {
        "seconds_per_query": seconds / n_q,
        "pairs_per_query": pairs / n_q,
        "ms_per_pair": 1000 * seconds / max(pairs, 1),
        "photos_extracted": cache.extracted,
        "extract_seconds": features.seconds,
        "local_features_failed": cache.failed,
    }
    scored = score_reranked(db, queries, rset, reranked=reranked, kappas=kappas)
    figures = _figures(reranked, query_features, features=features, settings=settings)
    return RerankedSet(scored, reranked, cost, figures)


def _order_of(earlier: QueryRerank) -> np.ndarray:
    if earlier.order is None or len(earlier.promoted):
        raise ValueError("an earlier re-ranking must give an order and promote none")
    return earlier.order


class _Features:
    """Local features of database rows and queries, extracted on first use and kept."""

    def __init__(
        self,
        cache: LocalFeatureCache,
        db_paths: Sequence[Path],
        rset: RetrievalSet,
        *,
        num_workers: int,
    ) -> None:
        self.cache, self.db_paths, self.rset = cache, db_paths, rset
        self.num_workers = num_workers
        self.known: dict[int, LocalFeatures] = {}
        self.seconds = 0.0
        self.root = Path("/")  # keyed by absolute path: the cache may hold several sets

    def prefetch(self, rows: Sequence[int]) -> None:
        self.of(rows, workers=self.num_workers)

    def of(self, rows: Sequence[int], workers: int = 0) -> list[LocalFeatures]:
        missing = [r for r in dict.fromkeys(rows) if r not in self.known]
        if missing:
            found = self._extract([self.db_paths[r] for r in missing], None, workers)
            self.known.update(zip(missing, found, strict=True))
        return [self.known[r] for r in rows]

    def queries(self, n_q: int) -> list[LocalFeatures]:
        if self.rset.queries_are_database:
            return list(self.of(range(n_q), workers=self.num_workers))
        return self._extract(self.rset.query_paths, self.rset.query_boxes, self.num_workers)

    def query_image(self, j: int) -> np.ndarray | None:
        """Query j decoded in its features' frame (for drawing)."""
        if self.rset.queries_are_database:
            return self.db_image(j)
        return self._image(self.rset.query_paths[j], self.rset.query_boxes[j])

    def db_image(self, row: int) -> np.ndarray | None:
        """Database row ``row`` decoded in its features' frame (for drawing)."""
        return self._image(self.db_paths[row], None)

    def _image(self, path: Path, box: Sequence[float] | None) -> np.ndarray | None:
        image = read_local_image(
            path, self.cache.options, exif_transpose=self.rset.exif_transpose, box=box
        )
        return None if isinstance(image, BadImage) else image

    def _extract(
        self, paths: Sequence[Path], boxes: Sequence | None, workers: int
    ) -> list[LocalFeatures]:
        started = time.perf_counter()
        found = self.cache.features(
            paths,
            boxes,
            root=self.root,
            exif_transpose=self.rset.exif_transpose,
            num_workers=workers,
            progress=workers > 0,
        )
        self.seconds += time.perf_counter() - started
        return [f if f is not None else empty_features() for f in found]


def _figures(
    reranked: Sequence[QueryRerank],
    query_features: Sequence[LocalFeatures],
    *,
    features: _Features,
    settings: RerankSettings,
) -> dict[int, bytes]:
    """Each query's inliers to its best verified result, drawn (the first ``MAX_FIGURES``)."""
    figures: dict[int, bytes] = {}
    for j, r in enumerate(reranked):
        if not len(r.promoted) or len(figures) >= MAX_FIGURES:
            continue
        best = int(r.promoted[0])
        result_features = features.of([best])[0]
        found = verify_pair(query_features[j], result_features, settings.verify)
        query_image, result_image = features.query_image(j), features.db_image(best)
        if query_image is None or result_image is None:
            continue
        figures[j] = draw_matches(
            (query_image, query_features[j]), (result_image, result_features), found.matches
        )
    return figures
