"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) from a neighbour graph, never an N × N matrix.

A database photo is re-scored by how much its k-reciprocal neighbourhood overlaps the query's:
the Jaccard distance of soft neighbourhood vectors (each photo's k-reciprocal neighbours,
expanded by those of its neighbours that mostly agree, weighted by ``exp(-d)``, then averaged
over its ``k2`` nearest photos), mixed with the original distance, ``d* = (1 - λ) d_J + λ d``.
Distances are squared Euclidean (``2 - 2 cos`` on unit rows) divided by each photo's largest
distance to any photo, as the paper's code computes them.

What the paper holds as full matrices is kept sparse here: each photo's ``k1 + 1`` nearest
photos and its largest distance come from one blocked pass of products (``neighbour_graph``),
the neighbourhood vectors have tens of non-zero entries, and the Jaccard distances of a query
come from an inverted index over them. Memory grows with ``N × k1``; time with ``N²`` products,
which is why ``KReciprocalSettings.kreciprocal_max_photos`` bounds it. A service re-ranks
each query's top K alone instead (``shortlist_order``): the query and K photos make the graph.

As in the paper, the queries join the graph beside the database photos; where the queries are
database photos (``queries_are_database``), the graph holds the database alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from tqdm.auto import tqdm

from model.settings import raise_problems

__all__ = [
    "KReciprocalOptions",
    "KReciprocalSettings",
    "NeighbourGraph",
    "kreciprocal_distances",
    "neighbour_graph",
    "neighbourhood_vectors",
    "shortlist_order",
]

_BLOCK_ELEMS = 1 << 25
"""Products held at once by the graph's pass (32 Mi floats)."""


@dataclass(frozen=True)
class KReciprocalOptions:
    """How k-reciprocal encoding weighs neighbourhoods (flags ``--kreciprocal-k1/-k2/-lambda``):
    evaluate and the service take the same."""

    kreciprocal_k1: int = 20
    kreciprocal_k2: int = 6
    kreciprocal_lambda: float = 0.3
    """Weight of the original distance against the Jaccard distance."""

    def __post_init__(self) -> None:
        problems = []
        if isinstance(self.kreciprocal_k1, bool) or self.kreciprocal_k1 < 1:
            problems.append(f"--kreciprocal-k1 must be 1 or more, not {self.kreciprocal_k1}")
        k2 = self.kreciprocal_k2
        if isinstance(k2, bool) or not 1 <= k2 <= self.kreciprocal_k1 + 1:
            problems.append(
                f"--kreciprocal-k2 must be between 1 and k1 + 1 = {self.kreciprocal_k1 + 1}, "
                f"not {k2}"
            )
        if not 0 <= self.kreciprocal_lambda <= 1:
            problems.append(
                f"--kreciprocal-lambda must be between 0 and 1, not {self.kreciprocal_lambda}"
            )
        raise_problems(problems)

    def label(self, top: int = 0) -> str:
        """How a table names a re-ranking of the top ``top`` (0: of the whole database)."""
        k1, k2, lam = self.kreciprocal_k1, self.kreciprocal_k2, self.kreciprocal_lambda
        return f"k-reciprocal{f'@{top}' if top else ''}(k1={k1}, k2={k2}, λ={lam:g})"


@dataclass(frozen=True)
class KReciprocalSettings:
    """k-reciprocal re-ranking in evaluate (flags ``--kreciprocal*``)."""

    kreciprocal: bool = False
    """Re-rank by k-reciprocal encoding; off by default."""
    kreciprocal_top: int = 0
    """0: the whole database, the queries joining its neighbour graph (the paper's); K: each
    query's global top K, over the query and those K photos alone (what the service does)."""
    kreciprocal_max_photos: int = 100_000
    """Refuse a whole-database graph of more photos (queries and database) than this: it
    costs N² products."""
    options: KReciprocalOptions = field(default_factory=KReciprocalOptions)

    def __post_init__(self) -> None:
        problems = []
        if isinstance(self.kreciprocal_top, bool) or self.kreciprocal_top < 0:
            problems.append(
                f"--kreciprocal-top must be 0 (the whole database) or more, "
                f"not {self.kreciprocal_top}"
            )
        if self.kreciprocal_max_photos < 1:
            problems.append(
                f"--kreciprocal-max-photos must be 1 or more, not {self.kreciprocal_max_photos}"
            )
        raise_problems(problems)

    @property
    def label(self) -> str:
        """How a table names it; empty when off."""
        return self.options.label(self.kreciprocal_top) if self.kreciprocal else ""


class NeighbourGraph(NamedTuple):
    """Each photo's nearest photos, itself first (``ids`` ``[N, k]``), their distances divided
    by the photo's largest distance (``distances``), and that largest distance (``scale``)."""

    ids: np.ndarray
    distances: np.ndarray
    scale: np.ndarray


def neighbour_graph(x: np.ndarray, k: int, *, progress: bool = False) -> NeighbourGraph:
    """The ``k`` nearest rows of every row of ``x`` (unit rows ``[N, D]``), in one blocked pass
    of products; a row is its own first neighbour even where another row equals it."""
    x = np.ascontiguousarray(x, np.float32)
    n = len(x)
    k = min(k, n)
    ids = np.empty((n, k), np.int64)
    sims = np.empty((n, k), np.float32)
    lowest = np.empty(n, np.float32)
    step = max(1, _BLOCK_ELEMS // max(n, 1))
    starts = range(0, n, step)
    for start in tqdm(starts, desc="neighbour graph", unit="block", disable=not progress):
        rows = np.arange(start, min(start + step, n))
        block = x[rows] @ x.T
        block[np.arange(len(rows)), rows] = np.inf
        if k < n:
            top = np.argpartition(-block, k - 1, axis=1)[:, :k]
        else:
            top = np.tile(np.arange(n), (len(rows), 1))
        top_sims = np.take_along_axis(block, top, axis=1)
        order = np.lexsort((top, -top_sims), axis=1)
        ids[rows] = np.take_along_axis(top, order, axis=1)
        sims[rows] = np.take_along_axis(top_sims, order, axis=1)
        block[np.arange(len(rows)), rows] = 1.0
        lowest[rows] = block.min(axis=1)
    sims[:, 0] = 1.0
    scale = np.maximum(2 - 2 * lowest, 1e-12)
    distances = np.maximum(2 - 2 * sims, 0) / scale[:, None]
    return NeighbourGraph(ids, distances.astype(np.float32), scale.astype(np.float32))


def neighbourhood_vectors(
    x: np.ndarray, graph: NeighbourGraph, *, k1: int, k2: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each row's sparse neighbourhood vector, ``(columns, weights)`` with weights summing to 1:
    its k-reciprocal neighbours expanded by the k1/2-reciprocal sets of those neighbours that
    share more than 2/3 of theirs, weighted by ``exp(-distance)``, then averaged over the
    row's ``k2`` nearest rows (local query expansion)."""
    n = len(x)
    mutual = _reciprocal_sets(graph.ids, k1)
    half = _reciprocal_sets(graph.ids, int(np.around(k1 / 2)))
    half_sets = [frozenset(h.tolist()) for h in half]
    vectors = []
    for i in range(n):
        own = set(mutual[i].tolist())
        expanded = set(own)
        for j in mutual[i].tolist():
            theirs = half_sets[j]
            if len(theirs & own) > 2 / 3 * len(theirs):
                expanded |= theirs
        columns = np.array(sorted(expanded), np.int64)
        distance = np.maximum(2 - 2 * (x[columns] @ x[i]), 0) / graph.scale[i]
        weights = np.exp(-(distance - distance.min()))
        vectors.append((columns, (weights / weights.sum()).astype(np.float64)))
    if k2 <= 1:
        return vectors
    averaged = []
    for i in range(n):
        near = graph.ids[i, :k2]
        columns = np.concatenate([vectors[j][0] for j in near])
        weights = np.concatenate([vectors[j][1] for j in near])
        unique, at = np.unique(columns, return_inverse=True)
        averaged.append((unique, np.bincount(at, weights, minlength=len(unique)) / len(near)))
    return averaged


def kreciprocal_distances(
    queries: np.ndarray,
    db: np.ndarray,
    options: KReciprocalOptions,
    *,
    queries_are_database: bool = False,
    max_photos: int | None = None,
    progress: bool = False,
) -> Iterator[np.ndarray]:
    """Each query's k-reciprocal distance ``d*`` to every database row, one query at a time
    (its ranking: ``np.argsort(d, kind="stable")``, equal distances the lower row first).

    ``queries`` ``[n_q, D]`` and ``db`` ``[N, D]`` are unit rows. ``queries_are_database``: the
    queries are the database's first ``n_q`` rows and the graph holds the database alone.
    More photos than ``max_photos`` is an error that says so.
    """
    everything = db if queries_are_database else np.concatenate([queries, db])
    if max_photos is not None and len(everything) > max_photos:
        raise ValueError(
            f"k-reciprocal re-ranking of {len(everything)} photos needs {len(everything)}² "
            f"products; --kreciprocal-max-photos is {max_photos} (or re-rank each query's "
            f"top K alone: --kreciprocal-top K)"
        )
    k1, k2 = options.kreciprocal_k1, options.kreciprocal_k2
    graph = neighbour_graph(everything, k1 + 1, progress=progress)
    vectors = neighbourhood_vectors(everything, graph, k1=k1, k2=k2)
    offset = 0 if queries_are_database else len(queries)
    inverted = _inverted_index(vectors[offset:], n_columns=len(everything))
    lam = options.kreciprocal_lambda
    for j in range(len(queries)):
        shared = inverted.shared(*vectors[j], n_rows=len(db))
        jaccard = 1 - shared / (2 - shared)
        original = np.maximum(2 - 2 * (db @ queries[j]), 0) / graph.scale[j]
        yield (1 - lam) * jaccard + lam * original


def shortlist_order(
    query: np.ndarray, candidates: np.ndarray, options: KReciprocalOptions
) -> np.ndarray:
    """The positions of ``candidates`` (a query's global top K, ``[K, D]``) in k-reciprocal
    order, over the query and those K photos alone: what the service can afford per query,
    with no graph of the whole database."""
    (distances,) = kreciprocal_distances(query[None], candidates, options)
    return np.argsort(distances, kind="stable")


def _reciprocal_sets(ids: np.ndarray, k: int) -> list[np.ndarray]:
    """Each row's ``k``-reciprocal neighbours: those of its ``k + 1`` nearest (itself included)
    that hold it among their own ``k + 1`` nearest."""
    near = ids[:, : k + 1]
    rows = np.arange(len(ids))
    found: list[np.ndarray] = []
    step = max(1, _BLOCK_ELEMS // max(near.shape[1] ** 2, 1))
    for start in range(0, len(ids), step):
        block = near[start : start + step]
        back = near[block]
        held = (back == rows[start : start + step, None, None]).any(axis=2)
        found.extend(row[mask] for row, mask in zip(block, held, strict=True))
    return found


class _InvertedIndex(NamedTuple):
    """The database's neighbourhood vectors by column: for column ``c``, the entries
    ``start[c]:start[c + 1]`` of ``rows`` and ``weights``."""

    start: np.ndarray
    rows: np.ndarray
    weights: np.ndarray

    def shared(self, columns: np.ndarray, weights: np.ndarray, *, n_rows: int) -> np.ndarray:
        """``Σ_c min(v[c], w_r[c])`` for every database row ``r``, against ``v`` given as its
        non-zero ``columns`` and ``weights``."""
        begin, end = self.start[columns], self.start[columns + 1]
        counts = end - begin
        at = np.repeat(begin - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
        mins = np.minimum(np.repeat(weights, counts), self.weights[at])
        return np.bincount(self.rows[at], mins, minlength=n_rows)


def _inverted_index(
    vectors: list[tuple[np.ndarray, np.ndarray]], *, n_columns: int
) -> _InvertedIndex:
    rows = np.concatenate([np.full(len(c), r, np.int64) for r, (c, _) in enumerate(vectors)])
    columns = np.concatenate([c for c, _ in vectors])
    weights = np.concatenate([w for _, w in vectors])
    order = np.argsort(columns, kind="stable")
    start = np.zeros(n_columns + 1, np.int64)
    np.cumsum(np.bincount(columns, minlength=n_columns), out=start[1:])
    return _InvertedIndex(start, rows[order], weights[order])
