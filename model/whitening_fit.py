"""Lw fitted to pairs of described photos: its cross-validated choice and held-out scoring.

The GeM paper's discriminative whitening (``model.whitening``) learned from matching pairs
(the SfM pairs' ``tables.WHITENING_PAIRS``: each query with its most overlapping positive) over
the descriptors of a collection; shrinkage and output size chosen by cross-validation over the
pairs' clusters unless fixed. The whiten stage (``pipeline.whiten``) writes it as a checkpoint;
the train stage learns its Lw the same way (:func:`held_out_whitening`) from its own network's
descriptors, scored on held-out clusters. ``LwFit`` is how both fit it: one settings part,
the same flags in both stages.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model import tables
from model.evaluation import cluster_map
from model.settings import raise_problems
from model.training_set import TrainingSet, read_training_set, split_clusters
from model.whitening import SHRINKAGES, apply_whitening, learn_whitening, select_whitening

__all__ = [
    "LW_META",
    "LwFit",
    "held_out_whitening",
    "pool_clusters",
    "read_whitening_pairs",
    "whitening_from_pairs",
    "whitening_on_held_out",
]

LW_META = ("pairs", "shrinkage", "dim", "cross_validation")
"""What a checkpoint's whitening records of how its Lw was learned (``whitening_from_pairs``'
how)."""


@dataclass(frozen=True)
class LwFit:
    """How Lw is fitted to pairs: the settings part of ``pipeline.whiten`` and of
    ``pipeline.train``'s Lw (the same flags in both)."""

    whiten_shrinkage: float | None = None
    """Lw's shrinkage of the pairs' covariance toward the identity, in [0, 1] (0: the paper's
    Lw); unset: chosen by cross-validation over the pairs' clusters."""
    whiten_dim: int | None = None
    """Lw's output size (its leading rows); unset: chosen by the same cross-validation."""
    min_pairs: int = 10
    """Fewer usable pairs than this learn no Lw: from a handful of pairs it only overfits."""

    def __post_init__(self) -> None:
        problems = []
        if self.whiten_shrinkage is not None and not 0 <= self.whiten_shrinkage <= 1:
            problems.append(f"--whiten-shrinkage is a share in [0, 1], not {self.whiten_shrinkage}")
        if self.whiten_dim is not None and self.whiten_dim < 1:
            problems.append(f"--whiten-dim must be at least 1, not {self.whiten_dim}")
        if self.min_pairs < 1:
            problems.append(f"--min-pairs must be at least 1, not {self.min_pairs}")
        raise_problems(problems)


def read_whitening_pairs(pairs: str) -> list[tuple[str, str]]:
    """``(query_id, positive_id)`` of a complete pairs output (its folder or any of its files)."""
    table = tables.WHITENING_PAIRS.read(pairs)
    return list(zip(table["query_id"].to_pylist(), table["positive_id"].to_pylist(), strict=True))


def whitening_from_pairs(
    image_ids: np.ndarray,
    vectors: np.ndarray,
    pairs: list[tuple[str, str]],
    *,
    fit: LwFit = LwFit(),
    clusters: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """``(m, P, how)``: Lw learned over ``vectors`` from the pairs whose two photos both have a
    row (``image_ids`` names the rows), ``P`` cut to its output size.

    The shrinkage and dim that ``fit`` leaves unset are chosen by cross-validation over the
    rows' ``clusters`` (``model.whitening.select_whitening``; no clusters: the paper's Lw).
    ``how`` says what was used: pairs, shrinkage, dim and the cross-validation's figures.
    """
    row = {image_id: i for i, image_id in enumerate(np.asarray(image_ids).tolist())}
    usable = [(row[q], row[p]) for q, p in pairs if q in row and p in row]
    if len(usable) < fit.min_pairs:
        raise ValueError(
            f"{len(usable)} of {len(pairs)} whitening pairs have both photos described "
            f"(at least {fit.min_pairs} needed)"
        )
    shrinkage, dim = fit.whiten_shrinkage, fit.whiten_dim
    q, p = np.array(usable, dtype=np.int64).T
    how: dict = {"pairs": len(usable)}
    if (shrinkage is None or dim is None) and clusters is not None:
        shrinkages = (shrinkage,) if shrinkage is not None else SHRINKAGES
        dims = (dim,) if dim is not None else None
        choice = select_whitening(vectors, clusters, q, pidxs=p, shrinkages=shrinkages, dims=dims)
        shrinkage, dim = choice.shrinkage, choice.dim
        how["cross_validation"] = {
            "folds": choice.folds,
            "map": choice.score,
            "map_plain": choice.plain,
            "candidates": choice.table,
        }
    shrinkage = 0.0 if shrinkage is None else shrinkage
    m, P = learn_whitening(vectors, q, p, shrinkage=shrinkage)
    dim = P.shape[0] if dim is None else dim
    if not 1 <= dim <= P.shape[0]:
        raise ValueError(f"the whitening dim must lie in [1, {P.shape[0]}], not {dim}")
    return m, P[:dim], {**how, "shrinkage": shrinkage, "dim": dim}


def held_out_whitening(
    image_ids: np.ndarray,
    vectors: np.ndarray,
    pool: TrainingSet,
    *,
    pairs: list[tuple[str, str]],
    held_out: float,
    seed: int = 0,
    fit: LwFit = LwFit(),
) -> tuple[np.ndarray, np.ndarray, dict]:
    """``(m, P, how)``: :func:`whitening_on_held_out` over the pool's photos, split by
    ``split_clusters(pool, held_out, seed)``.

    ``vectors`` are rows named by ``image_ids`` (the collection's descriptors); the figures are
    left out when some pool photo has no row, rather than skewed."""
    train, val = split_clusters(pool, held_out, seed)
    row = {image_id: i for i, image_id in enumerate(np.asarray(image_ids).tolist())}
    present = np.array([i in row for i in pool.image_ids.tolist()], dtype=bool)
    ids = pool.image_ids[present]
    x = vectors[[row[i] for i in ids.tolist()]]
    queries = None
    if present.all():
        pool_row = {image_id: i for i, image_id in enumerate(ids.tolist())}
        queries = np.array([pool_row[i] for i in val.image_ids[val.queries].tolist()], np.int64)
    models = None if pool.models is None else pool.models[present]
    trained = np.isin(ids, train.image_ids)
    return whitening_on_held_out(
        ids,
        x,
        pool.clusters[present],
        trained=trained,
        queries=queries,
        pairs=pairs,
        fit=fit,
        models=models,
    )


def whitening_on_held_out(
    image_ids: np.ndarray,
    vectors: np.ndarray,
    clusters: np.ndarray,
    *,
    trained: np.ndarray,
    queries: np.ndarray | None,
    pairs: list[tuple[str, str]],
    fit: LwFit = LwFit(),
    models: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """``(m, P, how)``: Lw from the rows of the mask ``trained`` only (the pairs among them,
    their scatter; shrinkage and dim by cross-validation over their ``clusters`` unless
    ``fit`` sets them), and in ``how`` the held-out ``queries``' (row indices) mAP against
    every row, their cluster's rows positive (their 3D model's, the rest of the cluster junk, given
    ``models``), without (``val_map``) and with it (``val_map_lw``). ``queries`` None: Lw
    alone."""
    ids = np.asarray(image_ids)
    trained = np.asarray(trained, dtype=bool)
    inside = set(ids[trained].tolist())
    m, P, how = whitening_from_pairs(
        ids[trained],
        vectors[trained],
        [(q, p) for q, p in pairs if q in inside and p in inside],
        fit=fit,
        clusters=np.asarray(clusters)[trained],
    )
    if queries is not None:
        how["val_map"] = cluster_map(vectors, clusters, queries, models=models)
        how["val_map_lw"] = cluster_map(
            apply_whitening(vectors, m, P), clusters, queries, models=models
        )
    return m, P, how


def pool_clusters(pairs: str, image_ids: np.ndarray) -> np.ndarray:
    """The SfM cluster of each of ``image_ids`` from a pairs output's pool; photos outside
    the pool get a cluster of their own (never anyone's positive)."""
    pool = read_training_set(pairs)
    cluster_of = dict(zip(pool.image_ids.tolist(), pool.clusters.tolist(), strict=True))
    ids = np.asarray(image_ids).tolist()
    return np.array([cluster_of.get(i, -1 - k) for k, i in enumerate(ids)], np.int64)
