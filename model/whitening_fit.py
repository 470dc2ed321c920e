"""Lw fitted to pairs of described photos: its cross-validated choice and held-out scoring.

The GeM paper's discriminative whitening (``model.whitening``) learned from matching pairs
(the SfM pairs' ``tables.WHITENING_PAIRS``: each query with its most overlapping positive) over
the descriptors of a collection; shrinkage and output size chosen by cross-validation over the
pairs' clusters unless fixed. The whiten stage (``pipeline.whiten``) writes it as a checkpoint;
the train stage learns its Lw the same way (:func:`held_out_whitening`) from its own network's
descriptors, scored on held-out clusters.
"""

from __future__ import annotations

import numpy as np

from model import tables
from model.training_set import TrainingSet, read_training_set, split_clusters
from model.whitening import SHRINKAGES

__all__ = [
    "LW_META",
    "held_out_whitening",
    "pool_clusters",
    "read_whitening_pairs",
    "whitening_from_pairs",
    "whitening_on_held_out",
]

LW_META = ("pairs", "shrinkage", "dim", "cross_validation")
"""What a checkpoint's whitening records of how its Lw was learned (``whitening_from_pairs``'
how)."""


def read_whitening_pairs(pairs: str) -> list[tuple[str, str]]:
    """``(query_id, positive_id)`` of a complete pairs output (its folder or any of its files)."""
    table = tables.WHITENING_PAIRS.read(pairs)
    return list(zip(table["query_id"].to_pylist(), table["positive_id"].to_pylist(), strict=True))


def whitening_from_pairs(
    image_ids: np.ndarray,
    vectors: np.ndarray,
    pairs: list[tuple[str, str]],
    *,
    min_pairs: int = 10,
    clusters: np.ndarray | None = None,
    shrinkage: float | None = None,
    dim: int | None = None,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """``(m, P, how)``: Lw learned over ``vectors`` from the pairs whose two photos both have a
    row (``image_ids`` names the rows), ``P`` cut to its output size.

    ``shrinkage`` and ``dim`` left ``None`` are chosen by cross-validation over the rows'
    ``clusters`` (``model.whitening.select_whitening``; no clusters: the paper's Lw). ``how``
    says what was used: pairs, shrinkage, dim and the cross-validation's figures.
    """
    from model.whitening import learn_whitening, select_whitening

    row = {image_id: i for i, image_id in enumerate(np.asarray(image_ids).tolist())}
    usable = [(row[q], row[p]) for q, p in pairs if q in row and p in row]
    if len(usable) < min_pairs:
        raise ValueError(
            f"{len(usable)} of {len(pairs)} whitening pairs have both photos described "
            f"(at least {min_pairs} needed)"
        )
    q, p = np.array(usable, dtype=np.int64).T
    how: dict = {"pairs": len(usable)}
    if (shrinkage is None or dim is None) and clusters is not None:
        shrinkages = (shrinkage,) if shrinkage is not None else SHRINKAGES
        dims = (dim,) if dim is not None else None
        choice = select_whitening(vectors, clusters, q, p, shrinkages=shrinkages, dims=dims)
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
    pairs: list[tuple[str, str]],
    held_out: float,
    seed: int = 0,
    shrinkage: float | None = None,
    dim: int | None = None,
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
        ids, x, pool.clusters[present], trained, queries, pairs, shrinkage, dim, models
    )


def whitening_on_held_out(
    image_ids: np.ndarray,
    vectors: np.ndarray,
    clusters: np.ndarray,
    trained: np.ndarray,
    queries: np.ndarray | None,
    pairs: list[tuple[str, str]],
    shrinkage: float | None = None,
    dim: int | None = None,
    models: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """``(m, P, how)``: Lw from the rows of the mask ``trained`` only (the pairs among them,
    their scatter; shrinkage and dim by cross-validation over their ``clusters`` unless
    given), and in ``how`` the held-out ``queries``' (row indices) mAP against every row,
    their cluster's rows positive (their 3D model's, the rest of the cluster junk, given
    ``models``), without (``val_map``) and with it (``val_map_lw``). ``queries`` None: Lw
    alone."""
    from model.evaluation import cluster_map
    from model.whitening import apply_whitening

    ids = np.asarray(image_ids)
    trained = np.asarray(trained, dtype=bool)
    inside = set(ids[trained].tolist())
    m, P, how = whitening_from_pairs(
        ids[trained],
        vectors[trained],
        [(q, p) for q, p in pairs if q in inside and p in inside],
        clusters=np.asarray(clusters)[trained],
        shrinkage=shrinkage,
        dim=dim,
    )
    if queries is not None:
        how["val_map"] = cluster_map(vectors, clusters, queries, models)
        how["val_map_lw"] = cluster_map(apply_whitening(vectors, m, P), clusters, queries, models)
    return m, P, how


def pool_clusters(pairs: str, image_ids: np.ndarray) -> np.ndarray:
    """The SfM cluster of each of ``image_ids`` from a pairs output's pool; photos outside
    the pool get a cluster of their own (never anyone's positive)."""
    pool = read_training_set(pairs)
    cluster_of = dict(zip(pool.image_ids.tolist(), pool.clusters.tolist(), strict=True))
    ids = np.asarray(image_ids).tolist()
    return np.array([cluster_of.get(i, -1 - k) for k, i in enumerate(ids)], np.int64)
