"""The GeM mode's training data: the pairs stage's queries, positives and pool, as rows.

Training works on rows of one pool (every photo with a cluster, ``tables.POOL``): a query is a
row, its positive candidates are rows of its cluster's 3D model (``tables.PAIRS``), and its
negatives are rows of other clusters that the mining index (``cluster.mining``) returns each
epoch (the epoch's tuples: ``pipeline.train.tuples``). Validation holds out whole clusters
(scenes the network never trains on), as the issue's "held-out scenes" ask; the whiten stage
and training's Lw (``model.whitening_fit``) split them the same way. Torch-free: the training
loop turns rows into images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model import tables

__all__ = ["TrainingSet", "read_training_set", "split_clusters"]


@dataclass(frozen=True)
class TrainingSet:
    image_ids: np.ndarray
    """object ``[N]``: the pool's photos."""
    clusters: np.ndarray
    """int64 ``[N]``: each pool photo's cluster (its SfM group)."""
    queries: np.ndarray
    """int64 ``[Q]``: pool rows of the queries."""
    positives: tuple[np.ndarray, ...]
    """Per query, the pool rows of its positive candidates (best first)."""
    models: np.ndarray | None = None
    """object ``[N]``: each pool photo's 3D model (None where unregistered), when known."""

    def __post_init__(self) -> None:
        if len(self.queries) != len(self.positives):
            raise ValueError(f"{len(self.queries)} queries, {len(self.positives)} positive lists")
        for q, rows in zip(self.queries.tolist(), self.positives, strict=True):
            if not len(rows):
                raise ValueError(f"query {self.image_ids[q]} has no positive")
            if (self.clusters[rows] != self.clusters[q]).any():
                raise ValueError(f"query {self.image_ids[q]} has a positive of another cluster")

    def with_clusters(self, keep: np.ndarray) -> TrainingSet:
        """The pool photos and queries of the clusters in ``keep`` only (rows renumbered)."""
        inside = np.isin(self.clusters, keep)
        new_row = np.full(len(self.image_ids), -1, np.int64)
        new_row[inside] = np.arange(int(inside.sum()))
        chosen = [i for i, q in enumerate(self.queries.tolist()) if inside[q]]
        return TrainingSet(
            image_ids=self.image_ids[inside],
            clusters=self.clusters[inside],
            queries=new_row[self.queries[chosen]],
            positives=tuple(new_row[self.positives[i]] for i in chosen),
            models=None if self.models is None else self.models[inside],
        )


def read_training_set(pairs: str) -> TrainingSet:
    """The training set of a complete pairs output (its folder or any of its files): the pool,
    and each query with its positives in the pool."""
    manifest = tables.PAIRS_OUTPUT.manifest(pairs)
    pool = tables.POOL.read_from(manifest)
    table = tables.PAIRS.read_from(manifest, ["query_id", "positives"])
    image_ids = np.array(pool["image_id"].to_pylist(), dtype=object)
    row = {image_id: i for i, image_id in enumerate(image_ids.tolist())}
    queries, positives = [], []
    for query, candidates in zip(
        table["query_id"].to_pylist(), table["positives"].to_pylist(), strict=True
    ):
        rows = [row[p] for p in candidates if p in row]
        if query in row and rows:
            queries.append(row[query])
            positives.append(np.array(rows, np.int64))
    return TrainingSet(
        image_ids=image_ids,
        clusters=pool["cluster_id"].to_numpy().astype(np.int64),
        queries=np.array(queries, np.int64),
        positives=tuple(positives),
        models=np.array(pool["model_id"].to_pylist(), dtype=object),
    )


def split_clusters(
    data: TrainingSet, held_out: float, seed: int = 0
) -> tuple[TrainingSet, TrainingSet]:
    """``(train, validation)``: whole clusters held out, about ``held_out`` of the queries.

    Clusters with queries are shuffled (seeded) and taken for validation until they hold the
    share asked for, leaving training at least two (a query needs a negative cluster);
    clusters without queries stay in training's negative pool.
    """
    if not 0 < held_out < 1:
        raise ValueError(f"held_out is a share in (0, 1), not {held_out}")
    counts: dict[int, int] = {}
    for q in data.queries.tolist():
        counts[int(data.clusters[q])] = counts.get(int(data.clusters[q]), 0) + 1
    if len(counts) < 3:
        raise ValueError(
            f"{len(counts)} clusters with queries: holding one out needs at least 3 "
            "(one to validate on, two to train on)"
        )
    order = np.random.default_rng(seed).permutation(sorted(counts))
    chosen: list[int] = []
    taken = 0
    for cluster in order.tolist():
        if taken >= held_out * len(data.queries) or len(counts) - len(chosen) <= 2:
            break
        chosen.append(cluster)
        taken += counts[cluster]
    validation = np.array(chosen, np.int64)
    rest = np.setdiff1d(np.unique(data.clusters), validation)
    return data.with_clusters(rest), data.with_clusters(validation)
