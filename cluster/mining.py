"""Hard-negative mining over the whole training collection, from a FAISS index in an actor.

The GeM paper's tuples pair each query with the ``nnum`` images nearest to it under the current
network that show another scene: the nearest of other clusters, at most one per cluster (so
five views of one look-alike landmark count once). The reference code finds them with a dot
product of every query against a random pool of a few thousand images and a full sort; here
the pool is the whole collection, described anew each epoch by the training workers (each its
share), held by a :class:`MiningIndex` actor, and searched for the top ``k`` only, ``k``
doubled for the queries whose first ``k`` did not hold ``nnum`` clusters. On a CPU the shares
are searched where they arrived (``cluster.pool_search``: exact BLAS products, or a bfloat16
first pass re-scored exactly on CPUs built for it); on a GPU, and past :data:`FLAT_MAX`, by a
FAISS index. On a GPU it goes there as the search shards go (``cluster.shards.GpuDevice``): an
index FAISS's GPU code cannot hold stays on the CPU with a logged line, and searches of a GPU
index take the lock of its GPU resources.

:func:`hard_negatives` is the functional core (an index, its rows' clusters, queries);
:class:`MiningIndex` is the state that an epoch's workers fill and then ask. The actor is a
plain class that ``ray.remote`` wraps (:func:`mining_actor`), so it is tested and benchmarked
with and without Ray alike; only the bfloat16 search imports PyTorch.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import faiss
import numpy as np
import ray

from cluster.pool_search import Bf16Search, ExactSearch, fast_bf16
from cluster.resources import use_reserved_threads
from cluster.shards import DeviceIndex, GpuDevice, gpu_count

__all__ = [
    "BF16_MIN",
    "FLAT_MAX",
    "MiningIndex",
    "hard_negatives",
    "mining_actor",
    "mining_factory",
]

logger = logging.getLogger(__name__)

FLAT_MAX = 200_000
"""Pools up to this size are searched exactly (a BLAS product, the cheapest exact search on a
CPU); larger ones by PCA-reduced candidates re-scored exactly (see :func:`mining_factory`)."""

BF16_MIN = 20_000
"""From this size, CPUs with bfloat16 hardware take their candidates from a bfloat16 product
(``cluster.pool_search.Bf16Search``); smaller pools take well under a second exactly."""

REFINE_FACTOR = 4
"""Candidates per wanted neighbour that the reduced search hands to the exact re-scoring."""


def mining_factory(n: int, dim: int, bf16: bool | None = None) -> str:
    """The search for a pool of ``n`` descriptors of ``dim`` on a CPU: ``Flat`` (exact) up to
    :data:`FLAT_MAX`, ``bf16`` (a bfloat16 first pass re-scored exactly) from
    :data:`BF16_MIN` on CPUs with bfloat16 hardware (``bf16`` None: this one's); beyond,
    ``PCA{r},Flat,RFlat`` with ``r = min(128, dim/4)``: candidates from the reduced vectors,
    re-scored with the full ones. IVF-Flat is not among them: ``bench/mining.py`` found it
    slower than Flat on CPUs (its scan is not a matrix product) and missing exact negatives."""
    if n > FLAT_MAX:
        return f"PCA{max(1, min(128, dim // 4))},Flat,RFlat"
    if n >= BF16_MIN and (fast_bf16() if bf16 is None else bf16):
        return "bf16"
    return "Flat"


def hard_negatives(
    index: faiss.Index | ExactSearch | DeviceIndex,
    pool_clusters: np.ndarray,
    queries: np.ndarray,
    *,
    query_clusters: np.ndarray,
    nnum: int = 5,
    k: int | None = None,
    allowed: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``nnum`` hardest negatives of each query: ``(rows, sims)``, ``[Q, nnum]``, best first.

    A negative is a row of ``index`` whose cluster differs from the query's (and, given the
    boolean mask ``allowed`` over the rows, one it allows: held-out scenes are never
    negatives); each cluster gives at most one (its most similar row). Rows are the index's
    positions (its ``ntotal`` order);
    -1 and ``-inf`` pad where fewer than ``nnum`` other clusters exist. Search ``k`` starts at
    ``4·nnum + 16`` plus the median size of the queries' own clusters in the index (a query's
    own views come first and are skipped) and doubles, for the queries still short, until
    they are full, ``k`` covers the whole index or the index has no more rows to give (an IVF
    index returns only what its probed lists hold): with an exact index the result is that of
    a full sort.
    ``index`` is a FAISS index or anything with its ``d``, ``ntotal`` and ``search(x, k)``.
    """
    pool_clusters = np.asarray(pool_clusters, dtype=np.int64)
    query_clusters = np.asarray(query_clusters, dtype=np.int64)
    x = np.ascontiguousarray(queries, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != index.d:
        raise ValueError(f"queries must be [Q, {index.d}], not {list(x.shape)}")
    if len(query_clusters) != len(x):
        raise ValueError(f"{len(x)} queries but {len(query_clusters)} query clusters")
    if len(pool_clusters) != index.ntotal:
        raise ValueError(f"the index holds {index.ntotal} rows, the clusters {len(pool_clusters)}")
    if nnum < 1:
        raise ValueError(f"nnum must be at least 1, not {nnum}")
    if allowed is not None:
        allowed = np.asarray(allowed, dtype=bool)
        if allowed.shape != (index.ntotal,):
            raise ValueError(f"allowed must mask the index's {index.ntotal} rows")
    rows = np.full((len(x), nnum), -1, np.int64)
    sims = np.full((len(x), nnum), -np.inf, np.float32)
    todo = np.arange(len(x))
    if k is None:
        k = 4 * nnum + 16 + _median_own_cluster(pool_clusters, query_clusters)
    k = min(k, index.ntotal)
    while len(todo) and k > 0:
        found_sims, found = index.search(x[todo], k)
        slots = first_of_clusters(
            found, pool_clusters, query_clusters[todo], nnum=nnum, allowed=allowed
        )
        taken = slots >= 0
        picked = np.take_along_axis(found, np.maximum(slots, 0), axis=1)
        rows[todo] = np.where(taken, picked, -1)
        picked_sims = np.take_along_axis(found_sims, np.maximum(slots, 0), axis=1)
        sims[todo] = np.where(taken, picked_sims, -np.inf)
        if k >= index.ntotal:
            break
        short = ~taken[:, -1] & (found[:, -1] >= 0)  # -1: nothing more the index can see
        todo = todo[short]
        k = min(2 * k, index.ntotal)
    return rows, sims


def _median_own_cluster(pool_clusters: np.ndarray, query_clusters: np.ndarray) -> int:
    """The median number of rows the queries' own clusters hold in the pool."""
    if not len(pool_clusters) or not len(query_clusters):
        return 0
    names, sizes = np.unique(pool_clusters, return_counts=True)
    at = np.minimum(np.searchsorted(names, query_clusters), len(names) - 1)
    return int(np.median(np.where(names[at] == query_clusters, sizes[at], 0)))


def first_of_clusters(
    found: np.ndarray,
    clusters: np.ndarray,
    own: np.ndarray,
    *,
    nnum: int,
    allowed: np.ndarray | None = None,
) -> np.ndarray:
    """``[Q, nnum]`` columns of ``found`` (rows best first, -1 padding at the end): per query,
    its first ``nnum`` rows of distinct clusters other than its ``own`` (and ``allowed``), -1
    where there are fewer. Sorting each query's clusters marks each one's first allowed row,
    for all queries at once."""
    valid = found >= 0
    row = np.maximum(found, 0)
    cluster = clusters[row]
    ok = valid & (cluster != np.asarray(own)[:, None])
    if allowed is not None:
        ok &= allowed[row]
    key = np.where(ok, cluster, np.iinfo(np.int64).min)  # what is not ok never comes first
    order = np.argsort(key, axis=1, kind="stable")
    ordered = np.take_along_axis(key, order, axis=1)
    first_sorted = np.ones_like(ordered, dtype=bool)
    first_sorted[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    first = np.empty_like(first_sorted)
    np.put_along_axis(first, order, first_sorted, axis=1)
    take = first & ok
    take &= np.cumsum(take, axis=1) <= nnum
    columns = np.argsort(~take, axis=1, kind="stable")[:, :nnum]
    count = take.sum(axis=1)
    width = min(nnum, found.shape[1])
    slots = np.full((len(found), nnum), -1, np.int64)
    slots[:, :width] = np.where(np.arange(width) < count[:, None], columns[:, :width], -1)
    return slots


class MiningIndex:
    """One epoch's negative pool: filled by the workers (:meth:`add`), then searched.

    ``reset(epoch, size)`` starts an epoch's pool of ``size`` rows; each worker adds its share
    as ``(positions, vectors, clusters)``, positions being rows of the training collection in
    ``0 .. size-1``; the first :meth:`mine` after the pool is whole builds the index (trained
    on a seeded sample when it needs training). Mining before the pool is whole is an error,
    not a silent smaller pool. Results are collection positions.
    """

    def __init__(self, factory: str = "auto", gpu: bool = True, seed: int = 0) -> None:
        use_reserved_threads()  # not the one OpenMP thread Ray and the autoscaler leave it
        self.factory = factory
        self.gpu = gpu and gpu_count() > 0
        self.seed = seed
        if not self.gpu and factory in ("auto", "bf16"):
            fast_bf16()  # imports PyTorch once, when the actor starts, not in an epoch's build
        self.epoch: int | None = None
        self.size = 0
        self._parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._index: faiss.Index | ExactSearch | DeviceIndex | None = None
        self._device: GpuDevice | None = None  # made at the first pool built on a GPU
        self._clusters = np.zeros(0, np.int64)
        self.built_factory: str | None = None
        self.build_seconds = 0.0
        self._mined: tuple[Any, tuple[np.ndarray, np.ndarray]] | None = None

    def reset(self, epoch: int, size: int) -> None:
        if size < 1:
            raise ValueError(f"a pool needs at least one row, not {size}")
        self.epoch, self.size = epoch, size
        self._drop_index()
        self._parts, self._mined = [], None
        self._low: list[Any] = []  # the shares in bfloat16, when the pool is searched so

    def add(self, positions: Any, vectors: Any, clusters: Any) -> int:
        """Add a share of the pool; returns the rows held so far."""
        positions = np.asarray(positions, dtype=np.int64)
        vectors = np.asarray(vectors, dtype=np.float32)
        clusters = np.asarray(clusters, dtype=np.int64)
        if self.epoch is None:
            raise ValueError("reset(epoch, size) first")
        if vectors.ndim != 2 or not len(positions) == len(vectors) == len(clusters):
            raise ValueError(
                f"positions {positions.shape}, vectors {vectors.shape} and clusters "
                f"{clusters.shape} must have one row each per image"
            )
        if len(positions) and (positions.min() < 0 or positions.max() >= self.size):
            raise ValueError(f"positions must lie in 0..{self.size - 1}")
        if len(positions):  # a worker may have no share of a tiny pool
            self._parts.append((positions, vectors, clusters))
            if self._factory(vectors.shape[1]) == "bf16":  # converted as it comes, not at build
                self._low.append(Bf16Search.lower(vectors))
        self._drop_index()
        self._mined = None
        return self.held()

    def _drop_index(self) -> None:
        """Forget the built index; a GPU one frees its GPU memory under its lock."""
        if isinstance(self._index, DeviceIndex):
            self._index.release()
        self._index = None

    def _factory(self, dim: int) -> str:
        if self.factory != "auto":
            return self.factory
        return "Flat" if self.gpu else mining_factory(self.size, dim)

    def held(self) -> int:
        return sum(len(p) for p, _, _ in self._parts)

    def _check_whole(self) -> None:
        if self.epoch is None:
            raise ValueError("reset(epoch, size) and add the pool first")
        positions = np.concatenate([np.zeros(0, np.int64)] + [p for p, _, _ in self._parts])
        if len(positions) != self.size or len(np.unique(positions)) != self.size:
            missing = self.size - len(np.unique(positions))
            raise ValueError(
                f"epoch {self.epoch}'s pool is not whole: {len(positions)} rows added for "
                f"{self.size} positions ({missing} missing, or some added twice)"
            )

    def _build(self) -> None:
        self._check_whole()
        self._clusters = np.empty(self.size, np.int64)
        for p, _, c in self._parts:
            self._clusters[p] = c
        dim = self._parts[0][1].shape[1]
        started = time.perf_counter()
        factory = self._factory(dim)
        shares = [(p, v) for p, v, _ in self._parts]
        if factory == "bf16":  # a CPU search, on a GPU machine too (no FAISS factory)
            self._index = Bf16Search(shares, self.size, self._low)
        elif factory == "Flat" and not self.gpu:
            self._index = ExactSearch(shares, self.size)
        else:
            self._index = self._faiss_index(factory)
        self.build_seconds = time.perf_counter() - started
        self.built_factory = factory
        logger.info(
            "mining pool of epoch %s: %d rows in %s in %.1f s",
            self.epoch,
            self.size,
            factory,
            self.build_seconds,
        )

    def _faiss_index(self, factory: str) -> faiss.Index | DeviceIndex:
        """A FAISS index of the pool in position order (GPU, or past :data:`FLAT_MAX`)."""
        vectors = np.empty((self.size, self._parts[0][1].shape[1]), np.float32)
        for p, v, _ in self._parts:
            vectors[p] = v
        index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:  # PCA, IVF, ...: a seeded sample
            rng = np.random.default_rng(self.seed)
            sample = rng.choice(len(vectors), min(len(vectors), 8192), replace=False)
            index.train(np.ascontiguousarray(vectors[np.sort(sample)]))
        index.add(vectors)
        inner = faiss.downcast_index(index)
        if isinstance(inner, faiss.IndexRefine):
            inner.k_factor = REFINE_FACTOR
        self._parts = [(np.arange(self.size), vectors, self._clusters)]
        if self.gpu:
            if self._device is None:
                self._device = GpuDevice()
            return self._device.place(index, name=f"the mining pool of epoch {self.epoch}")
        return index

    def _vectors_at(self, positions: np.ndarray) -> np.ndarray:
        if isinstance(self._index, ExactSearch):
            return self._index.rows(positions)
        return self._parts[0][1][positions]  # _faiss_index left one part in position order

    def mine(
        self, queries: Any, query_clusters: Any, nnum: int = 5
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(positions, sims)`` of each query's hardest negatives (see :func:`hard_negatives`)."""
        if self._index is None:
            self._build()
        assert self._index is not None  # _build made it
        return hard_negatives(
            self._index, self._clusters, queries, query_clusters=query_clusters, nnum=nnum
        )

    def mine_rows(
        self, rows: Any, nnum: int = 5, allowed: Any = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`mine` for queries that are pool rows themselves, by their positions: the
        vectors the pool holds describe them (no second forward pass); ``allowed`` (a boolean
        mask over the positions) names the rows negatives may come from, when not all. Every
        worker of a training run asks the same; the answer is computed once per epoch."""
        rows = np.asarray(rows, dtype=np.int64)
        allowed = None if allowed is None else np.asarray(allowed, dtype=bool)
        key = (self.epoch, nnum, rows.tobytes(), None if allowed is None else allowed.tobytes())
        if self._mined is not None and self._mined[0] == key:
            return self._mined[1]
        if self._index is None:
            self._build()
        assert self._index is not None  # _build made it
        if len(rows) and (rows.min() < 0 or rows.max() >= self.size):
            raise ValueError(f"query rows must lie in 0..{self.size - 1}")
        found = hard_negatives(
            self._index,
            self._clusters,
            self._vectors_at(rows),
            query_clusters=self._clusters[rows],
            nnum=nnum,
            allowed=allowed,
        )
        self._mined = (key, found)
        return found

    def vectors(self) -> np.ndarray:
        """The whole pool, ``[size, D]`` in position order (what validation ranks)."""
        if self._index is not None:
            return self._vectors_at(np.arange(self.size))
        self._check_whole()
        out = np.empty((self.size, self._parts[0][1].shape[1]), np.float32)
        for positions, vectors, _ in self._parts:
            out[positions] = vectors
        return out

    def describe(self) -> dict[str, Any]:
        index = self._index
        return {
            "epoch": self.epoch,
            "size": self.size,
            "held": self.held(),
            "built": index is not None,
            "factory": self.built_factory or self.factory,
            "gpu": self.gpu,
            "on_gpu": isinstance(index, DeviceIndex) and index.on_gpu,
            "build_seconds": self.build_seconds,
        }


def mining_actor(
    num_cpus: float = 1, num_gpus: float = 0, *, memory: int | None = None, **options: Any
) -> Any:
    """A Ray actor of :class:`MiningIndex` reserving ``num_cpus`` (its FAISS threads),
    ``num_gpus`` and ``memory`` bytes; ``options`` go to its constructor."""
    reserved: dict[str, Any] = {"memory": memory} if memory else {}
    cls = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, **reserved)(MiningIndex)
    return cls.remote(**options)
