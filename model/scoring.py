"""Scoring descriptors of a retrieval set: whitening, αQE, then the metrics its protocol defines.

The one place where post-processing is applied before ranking and where a ``RetrievalSet``'s
protocol picks the figures: Easy/Medium/Hard mAP and mP@k (revisited), mAP and mP@k (original
Oxford5k/Paris6k), mAP, mP@k and recall@k (scene folders). Metrics are exact without a full
ranking: the positions of each query's ground-truth images come from the scores, with each
query's top ``top_k`` for the report, in one pass (``model.retrieval.rank_and_locate``), so a
million-image database needs one block of scores at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from model.datasets.sets import RetrievalSet
from model.evaluation import (
    compute_map_at_positions,
    evaluate_revisited_at_positions,
    ground_truth_items,
    recall_at_k,
)
from model.reranking import QueryRerank, promoted_first, promoted_positions
from model.retrieval import QueryExpansion, rank_and_locate, rank_by_similarity
from model.whitening import apply_whitening

__all__ = [
    "PostProcess",
    "Scored",
    "format_metrics",
    "post_process",
    "score",
    "score_reranked",
    "summary_map",
]


@dataclass(frozen=True)
class PostProcess:
    """What happens to descriptors between extraction and ranking."""

    whitening: tuple[np.ndarray, np.ndarray] | None = None
    """``(m, P)`` of a learned whitening."""
    whitening_dim: int | None = None
    qe: QueryExpansion = field(default_factory=QueryExpansion)

    @property
    def label(self) -> str:
        parts = ["Lw" if self.whitening is not None else "", self.qe.label]
        return " + ".join(p for p in parts if p) or "plain"


class Scored(NamedTuple):
    """Metrics, each query's top ``top_k`` database indices (best first), each query's AP."""

    metrics: dict[str, Any]
    ranks: np.ndarray
    aps: np.ndarray


def score(
    db: np.ndarray,
    queries: np.ndarray,
    rset: RetrievalSet,
    *,
    post: PostProcess = PostProcess(),
    kappas: tuple[int, ...] = (1, 5, 10),
    top_k: int = 100,
) -> Scored:
    """Score ``queries`` against ``db`` (the set's database, then any distractors).

    Query APs are those of the medium protocol for revisited sets (NaN without positives).
    """
    db, queries = post_process(db, queries, rset, post=post)
    depth = min(max(top_k, max(kappas, default=1) + 1), len(db))
    if rset.gnd is None or rset.protocol == "none":
        n_q = len(queries)
        return Scored({}, rank_by_similarity(queries, db, topk=depth), np.full(n_q, np.nan))
    items = ground_truth_items(rset.gnd)
    ranks, located = rank_and_locate(queries, db, items, topk=depth)
    positions = list(zip(items, located, strict=True))
    return _scored(positions, ranks, rset, kappas=kappas, n_db=len(db))


def post_process(
    db: np.ndarray, queries: np.ndarray, rset: RetrievalSet, *, post: PostProcess
) -> tuple[np.ndarray, np.ndarray]:
    """``db`` and ``queries`` whitened and expanded as ``post`` says, ready to rank."""
    if post.whitening is not None:
        m, P = post.whitening
        db = apply_whitening(db, m, P, post.whitening_dim)
        queries = apply_whitening(queries, m, P, post.whitening_dim)
    self_rows = np.arange(len(queries)) if rset.queries_are_database else None
    return db, post.qe.expand(queries, db, query_rows=self_rows)


def score_reranked(
    db: np.ndarray,
    queries: np.ndarray,
    rset: RetrievalSet,
    *,
    reranked: Sequence[QueryRerank],
    kappas: tuple[int, ...] = (1, 5, 10),
    top_k: int = 100,
) -> Scored:
    """``score`` of the rankings that re-ranking made (``model.reranking``): each query's
    promoted rows first, then the database in its ``order`` or, without one, in the order of
    its re-ranking vector. ``db`` is post-processed already (``post_process``)."""
    depth = min(max(top_k, max(kappas, default=1) + 1), len(db))
    promoted = [r.promoted for r in reranked]
    items = (
        ground_truth_items(rset.gnd) if rset.gnd is not None and rset.protocol != "none" else None
    )
    none = [np.zeros(0, np.int64)] * len(promoted)
    wanted = [np.concatenate([p, i]) for p, i in zip(promoted, items or none, strict=True)]
    base_ranks, located = _base_rankings(db, reranked, wanted, depth=depth)
    ranks = np.stack(
        [promoted_first(p, row, depth) for p, row in zip(promoted, base_ranks, strict=True)]
    )
    if items is None:
        return Scored({}, ranks, np.full(len(reranked), np.nan))
    positions = []
    for p, item, found in zip(promoted, items, located, strict=True):
        at = promoted_positions(item, found[len(p) :], promoted=p, promoted_at=found[: len(p)])
        positions.append((item, at))
    return _scored(positions, ranks, rset, kappas=kappas, n_db=len(db))


def _base_rankings(
    db: np.ndarray, reranked: Sequence[QueryRerank], wanted: list[np.ndarray], *, depth: int
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Each query's base ranking (its ``order``, then the rest of the database by similarity
    to its vector), its first ``depth + len(promoted)`` rows, and the positions of its
    ``wanted`` rows in it; one pass of scores serves every query whose order is not the whole
    database."""
    n_db = len(db)
    head = min(depth + max((len(r.promoted) for r in reranked), default=0), n_db)
    orders = [np.zeros(0, np.int64) if r.order is None else r.order for r in reranked]
    ranks = np.empty((len(reranked), head), np.int64)
    located: list[np.ndarray] = [np.zeros(0, np.int64)] * len(reranked)
    partial = [j for j, order in enumerate(orders) if len(order) < n_db]
    if partial:
        vectors = np.stack([reranked[j].query for j in partial]).astype(np.float32)
        lists = [np.concatenate([wanted[j], orders[j]]) for j in partial]
        longest = max(len(orders[j]) for j in partial)
        found, where = rank_and_locate(vectors, db, lists, topk=min(head + longest, n_db))
        for j, row, at in zip(partial, found, where, strict=True):
            first = orders[j]
            n_wanted = len(wanted[j])
            ranks[j] = promoted_first(first, row, head)
            located[j] = promoted_positions(
                wanted[j], at[:n_wanted], promoted=first, promoted_at=at[n_wanted:]
            )
    for j, order in enumerate(orders):
        if len(order) == n_db:
            position = np.empty(n_db, np.int64)
            position[order] = np.arange(n_db)
            ranks[j], located[j] = order[:head], position[wanted[j]]
    return ranks, located


def _scored(
    positions: list[tuple[np.ndarray, np.ndarray]],
    ranks: np.ndarray,
    rset: RetrievalSet,
    *,
    kappas: tuple[int, ...],
    n_db: int,
) -> Scored:
    """The metrics of ``rset``'s protocol from the positions of its ground-truth images."""
    assert rset.gnd is not None
    metrics: dict[str, Any]
    if rset.protocol == "revisited":
        metrics = evaluate_revisited_at_positions(positions, rset.gnd, kappas, n_db=n_db)
        medium = [{"ok": rset.positives(j), "junk": g["junk"]} for j, g in enumerate(rset.gnd)]
        _, aps, _, _ = compute_map_at_positions(positions, medium, n_db=n_db)
        return Scored(metrics, ranks, aps)
    m_ap, aps, mpr, _ = compute_map_at_positions(positions, rset.gnd, kappas, n_db=n_db)
    metrics = {"map": m_ap, "mp@k": dict(zip(kappas, map(float, mpr), strict=True))}
    if rset.protocol == "scenes":
        # Recall@k must not count the query itself, which ranks first among its own photos.
        others = np.stack([row[row != j][: max(kappas)] for j, row in enumerate(ranks)])
        labels = rset.db_labels
        if labels is None:
            raise ValueError(f"{rset.name}: recall@k of a scenes set needs its db_labels")
        metrics["recall@k"] = recall_at_k(others, labels, labels, kappas)
    return Scored(metrics, ranks, aps)


def summary_map(metrics: dict[str, Any]) -> dict[str, float]:
    """The mAP figures of a metrics dict: ``{"E","M","H"}`` or ``{"mAP"}``."""
    if "medium" in metrics:
        return {k[0].upper(): metrics[k]["map"] for k in ("easy", "medium", "hard")}
    return {"mAP": metrics["map"]} if "map" in metrics else {}


def format_metrics(dataset: str, metrics: dict[str, Any], kappas: tuple[int, ...]) -> str:
    """The papers' lines, in percent with one decimal: mAP (E/M/H or one) and mP@k."""
    if "medium" not in metrics:
        prs = [round(100 * metrics["mp@k"][k], 1) for k in kappas]
        return (
            f">> {dataset}: mAP {100 * metrics['map']:.1f}\n>> {dataset}: mP@k{list(kappas)} {prs}"
        )
    parts = ("easy", "medium", "hard")
    maps = ", ".join(f"{p[0].upper()}: {100 * metrics[p]['map']:.1f}" for p in parts)
    prs_text = ", ".join(
        f"{p[0].upper()}: {[round(100 * metrics[p]['mp@k'][k], 1) for k in kappas]}" for p in parts
    )
    return f">> {dataset}: mAP {maps}\n>> {dataset}: mP@k{list(kappas)} {prs_text}"
