"""Re-ranking a query's global top-k by spatial verification, with αQE over verified neighbours.

One query at a time, the same for evaluation and the service:

1. The global top ``rerank`` candidates are verified against the query (``model.verification``).
2. With ``rerank_qe_k``, the query vector is expanded (αQE) with its best *verified* neighbours
   only, so a look-alike of another building never enters the expanded query, and the
   database is searched again with it. Candidates new to that top ``rerank`` are verified too:
   positives that only the expanded query reaches get their chance to move up.
3. The answer is every verified candidate (``inliers >= rerank_min_inliers``), most inliers
   first, followed by the rest of the database in the order of the (expanded) query.

The final ranking is "promoted images, then a base ranking without them", so the position of
any image follows from its base position (``promoted_positions``): exact metrics need no
full ranking, as in ``model.scoring``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from model.local_features import LocalFeatures
from model.settings import raise_problems
from model.verification import VerifyOptions, rerank_order, verify_candidates

__all__ = [
    "FeaturesOf",
    "QueryRerank",
    "RerankSettings",
    "promoted_first",
    "promoted_positions",
    "rerank_query",
]

FeaturesOf = Callable[[Sequence[int]], Sequence[LocalFeatures | None]]
"""Local features of database rows (``None`` where a row has none)."""


@dataclass(frozen=True)
class RerankSettings:
    """Spatial re-ranking as a settings part: evaluate and the service take the same flags."""

    rerank: int = 0
    """Re-rank the global top RERANK by spatial verification of local features; 0 is off."""
    rerank_qe_k: int = 0
    """αQE over the best RERANK_QE_K verified neighbours, then a second search and
    verification; 0 is off."""
    rerank_qe_alpha: float = 3.0
    verify: VerifyOptions = field(default_factory=VerifyOptions)

    def __post_init__(self) -> None:
        problems = []
        if isinstance(self.rerank, bool) or self.rerank < 0:
            problems.append(f"--rerank must be 0 (off) or more, not {self.rerank}")
        if isinstance(self.rerank_qe_k, bool) or self.rerank_qe_k < 0:
            problems.append(f"--rerank-qe-k must be 0 (off) or more, not {self.rerank_qe_k}")
        if not np.isfinite(self.rerank_qe_alpha) or self.rerank_qe_alpha < 0:
            problems.append(f"--rerank-qe-alpha must be >= 0, not {self.rerank_qe_alpha}")
        raise_problems(problems)

    @property
    def label(self) -> str:
        """How a table names it; empty when off."""
        if not self.rerank:
            return ""
        qe = f" + verified αQE(k={self.rerank_qe_k})" if self.rerank_qe_k else ""
        return f"SV@{self.rerank}{qe}"


@dataclass(frozen=True)
class QueryRerank:
    """One query's re-ranking: the verified database rows in their new order (``promoted``),
    the inliers of every row that was verified, and the vector whose ranking follows them
    (after the ``order`` an earlier re-ranking made, if any)."""

    promoted: np.ndarray
    inliers: dict[int, int]
    query: np.ndarray
    pairs_verified: int
    order: np.ndarray | None = None
    """The first rows of the ranking the promoted rows are taken out of (all of the database,
    or a head the rest follows by similarity to ``query``); ``None``: the database by
    similarity to ``query``."""


def rerank_query(
    query: np.ndarray,
    db: np.ndarray,
    candidates: np.ndarray,
    *,
    query_features: LocalFeatures,
    features_of: FeaturesOf,
    settings: RerankSettings,
) -> QueryRerank:
    """Re-rank one query (``query`` ``[D]`` and ``db`` ``[N, D]``: unit rows) whose global
    ranking starts with ``candidates``; only the first ``settings.rerank`` are verified."""
    k = min(settings.rerank, len(db))
    inliers = _verify(
        query_features, candidates[:k], features_of, options=settings.verify, known={}
    )
    vector = np.asarray(query, np.float32)
    if settings.rerank_qe_k:
        best = _promoted(inliers, db, vector, min_inliers=settings.verify.rerank_min_inliers)
        chosen = best[: settings.rerank_qe_k]
        if len(chosen):
            weights = np.clip(db[chosen] @ vector, 0, None) ** settings.rerank_qe_alpha
            expanded = vector + weights @ db[chosen]
            vector = (expanded / max(np.linalg.norm(expanded), 1e-12)).astype(np.float32)
            again = _top(db @ vector, k)
            inliers = _verify(
                query_features, again, features_of, options=settings.verify, known=inliers
            )
    promoted = _promoted(inliers, db, vector, min_inliers=settings.verify.rerank_min_inliers)
    return QueryRerank(promoted, inliers, vector, pairs_verified=len(inliers))


def promoted_first(promoted: np.ndarray, base: np.ndarray, length: int) -> np.ndarray:
    """The first ``length`` rows of the ranking "``promoted``, then ``base`` without them"."""
    return np.concatenate([promoted, base[~np.isin(base, promoted)]])[:length]


def promoted_positions(
    items: np.ndarray,
    item_positions: np.ndarray,
    *,
    promoted: np.ndarray,
    promoted_at: np.ndarray,
) -> np.ndarray:
    """Positions of ``items`` in the ranking "``promoted``, then the base ranking without them",
    from their base positions (``item_positions``; ``promoted_at`` those of the promoted
    rows)."""
    items = np.asarray(items, np.int64)
    base = np.asarray(item_positions, np.int64)
    promoted = np.asarray(promoted, np.int64)
    place = {int(row): i for i, row in enumerate(promoted)}
    ahead = np.searchsorted(np.sort(np.asarray(promoted_at, np.int64)), base)
    moved = np.array([place.get(int(row), -1) for row in items], np.int64)
    return np.where(moved >= 0, moved, len(promoted) + base - ahead)


def _verify(
    query_features: LocalFeatures,
    rows: np.ndarray,
    features_of: FeaturesOf,
    *,
    options: VerifyOptions,
    known: dict[int, int],
) -> dict[int, int]:
    """``known`` with the inliers of the ``rows`` it lacks."""
    todo = [int(row) for row in rows if int(row) not in known]
    found = verify_candidates(query_features, features_of(todo), options) if todo else []
    return {**known, **{row: v.inliers for row, v in zip(todo, found, strict=True)}}


def _promoted(
    inliers: dict[int, int], db: np.ndarray, vector: np.ndarray, *, min_inliers: int
) -> np.ndarray:
    """The verified rows, most inliers first, then by similarity to ``vector`` (only the
    rows verified are scored: no product with the whole database)."""
    rows = np.array(list(inliers), np.int64)
    counts = np.array([inliers[int(r)] for r in rows], np.int64)
    order = rerank_order(db[rows] @ vector, counts, min_inliers) if len(rows) else rows
    verified = counts[order] >= min_inliers if len(rows) else np.zeros(0, bool)
    return rows[order][verified]


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    return top[np.argsort(-scores[top], kind="stable")]
