"""Ranking, exact ranked positions and α-weighted query expansion on L2-normalised descriptors.

NumPy only. Descriptors are rows (``[N, D]``), as FAISS and the Parquet tables hold them, and
rankings come back a row per query, as ``faiss.Index.search`` returns them.
``model.evaluation.compute_map`` wants the protocol's column-per-query layout, so pass it
``ranks.T``.

Scores are computed in float32 for float32 input (float64 for float64 input) and in blocks of
queries, so a large database never needs a full ``n_q × N`` score matrix at once: at most
``_SCORE_BLOCK_ELEMS`` scores are held. Every function here scores the same blocks the same way,
so their orders agree exactly, ties included (equal scores: the lower database index first).

At R1M scale (a million database rows) a full ranking is ``n_q × N`` int64 and its argsort is
the slow part; exact mAP needs only where each query's ground-truth images land, which
``ranked_positions`` computes without ranking the whole database.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from model.arrays import descriptor_matrix, index_array
from model.settings import raise_problems

__all__ = [
    "QueryExpansion",
    "alpha_qe",
    "l2_normalize",
    "rank_and_locate",
    "rank_by_similarity",
    "ranked_positions",
]

logger = logging.getLogger(__name__)

# Upper bound on the number of scores held at once (queries × database rows): 16 Mi floats.
_SCORE_BLOCK_ELEMS = 1 << 24


def l2_normalize(X: ArrayLike, eps: float = 1e-6, axis: int = -1) -> NDArray[np.floating]:
    """Divide each vector along ``axis`` by its L2 norm, clamped below at ``eps``.

    The clamp (the same as ``torch.nn.functional.normalize`` and ``model.pooling.l2n``) keeps an
    all-zero descriptor at zero instead of turning it into NaNs. Floating input keeps its dtype;
    integer input becomes float64.
    """
    arr = np.asarray(X)
    arr = arr.astype(np.result_type(arr.dtype, np.float32), copy=False)
    norms = np.linalg.norm(arr, axis=axis, keepdims=True)
    return arr / np.maximum(norms, eps)


def _row_chunks(arr: NDArray) -> Iterator[slice]:
    """Slices of whole rows holding about ``_SCORE_BLOCK_ELEMS`` entries each."""
    step = max(1, _SCORE_BLOCK_ELEMS // max(arr.shape[1], 1))
    for start in range(0, arr.shape[0], step):
        yield slice(start, start + step)


def _descriptors(X: ArrayLike, name: str) -> NDArray[np.floating]:
    """``model.arrays.descriptor_matrix`` with the finiteness check done a chunk of rows at a time.

    A whole-matrix ``isfinite`` would hold a boolean copy of the database (1.3 GB at R1M);
    on failure the full check runs, for its standard error message.
    """
    arr = np.asarray(X)
    if arr.ndim != 2:
        return descriptor_matrix(arr, name)  # raises, with the standard message
    dtype = descriptor_matrix(arr[:0], name).dtype  # shape and dtype checks, on no rows
    arr = arr.astype(dtype, copy=False)
    for rows in _row_chunks(arr):
        if not np.isfinite(arr[rows]).all():
            return descriptor_matrix(arr, name)  # raises, naming the bad rows
    return arr


def _check_pair(Q: ArrayLike, X: ArrayLike) -> tuple[NDArray[np.floating], NDArray[np.floating]]:
    q, x = _descriptors(Q, "Q"), _descriptors(X, "X")
    if q.shape[1] != x.shape[1]:
        raise ValueError(
            f"Q and X must have the same descriptor dimension: Q is {q.shape}, X is {x.shape}"
        )
    dtype = np.result_type(q.dtype, x.dtype)
    return q.astype(dtype, copy=False), x.astype(dtype, copy=False)


def _query_blocks(n_q: int, n_db: int) -> range:
    step = max(1, _SCORE_BLOCK_ELEMS // max(n_db, 1))
    return range(0, n_q, step)


def _score_blocks(
    q: NDArray[np.floating], x: NDArray[np.floating]
) -> Iterator[tuple[slice, NDArray[np.floating]]]:
    """``(queries, scores)`` per block of queries: ``scores = q[queries] @ x.T``.

    Every function of this module scores through here, so the same query always gets the same
    score row (BLAS rounding can depend on the block shape), whichever function asks.
    """
    blocks = _query_blocks(q.shape[0], x.shape[0])
    for start in blocks:
        block = slice(start, start + blocks.step)
        yield block, q[block] @ x.T


def _topk_rows(S: NDArray[np.floating], k: int) -> NDArray[np.int64]:
    """Column indices of the ``k`` largest entries of each row, by decreasing value.

    Ties keep the lower index first, so results do not depend on the sort algorithm: a full
    stable sort when ``k`` covers the row, else a partition to find each row's k-th value and a
    stable sort of the (tie-inclusive) candidates above it.
    """
    n_rows, n_cols = S.shape
    if k >= n_cols:
        return np.argsort(-S, axis=1, kind="stable")
    kth = np.partition(S, n_cols - k, axis=1)[:, n_cols - k]  # k-th largest per row
    out = np.empty((n_rows, k), dtype=np.int64)
    for i in range(n_rows):
        cand = np.flatnonzero(S[i] >= kth[i])  # ascending indices, ties included
        order = np.argsort(-S[i, cand], kind="stable")
        out[i] = cand[order[:k]]
    return out


def rank_by_similarity(Q: ArrayLike, X: ArrayLike, topk: int | None = None) -> NDArray[np.int64]:
    """Database indices for each query by decreasing inner product: ``[n_q, N]`` or ``[n_q, topk]``.

    The row-per-query layout is FAISS's; transpose for ``compute_map``. Equal scores keep the
    lower database index first. ``topk`` larger than ``N`` returns all ``N``. The full ranking
    (``topk=None``) is ``n_q × N`` int64; for exact mAP on a large database use
    ``ranked_positions`` instead, and a small ``topk`` for the lists a report shows.
    """
    q, x = _check_pair(Q, X)
    n_db = x.shape[0]
    if topk is None:
        topk = n_db
    elif isinstance(topk, bool) or int(topk) != topk or topk < 1:
        raise ValueError(f"topk must be a positive integer or None, got {topk!r}")
    k = min(int(topk), n_db)
    ranks = np.empty((q.shape[0], k), dtype=np.int64)
    for block, S in _score_blocks(q, x):
        ranks[block] = _topk_rows(S, k)
    return ranks


def _index_list(j: int, value: ArrayLike, n_db: int) -> NDArray[np.int64]:
    return index_array(value, n_db, f"items[{j}]")


def _positions_in_row(s: NDArray[np.floating], g: NDArray[np.int64]) -> NDArray[np.int64]:
    """0-based positions of rows ``g`` in the stable ranking of score row ``s`` by decreasing score.

    position(g) = #{i: s_i > s_g} + #{i < g: s_i == s_g}. The first term comes from a sort of the
    row's values (not of its indices) and a binary search; the second only from the rows whose
    score equals that of an item tied with some other row.
    """
    n = s.size
    v = s[g]
    sorted_s = np.sort(s)
    lo = np.searchsorted(sorted_s, v, side="left")
    hi = np.searchsorted(sorted_s, v, side="right")
    pos = (n - hi).astype(np.int64)  # rows scoring strictly higher
    tied = hi - lo > 1  # another row has the same score: the lower indices among them go first
    if tied.any():
        tie_vals = np.unique(v[tied])
        slot = np.minimum(np.searchsorted(tie_vals, s), tie_vals.size - 1)
        rows = np.flatnonzero(tie_vals[slot] == s)  # every row scoring one of tie_vals
        keys = np.sort(slot[rows].astype(np.int64) * n + rows)  # by (value, row index)
        kg = np.searchsorted(tie_vals, v[tied]).astype(np.int64)
        before = np.searchsorted(keys, kg * n + g[tied]) - np.searchsorted(keys, kg * n)
        pos[tied] += before
    return pos


def ranked_positions(
    Q: ArrayLike, X: ArrayLike, items: Sequence[ArrayLike]
) -> list[NDArray[np.int64]]:
    """Where database rows ``items[j]`` land in query j's full ranking, without ranking it all.

    Returns, for each query j, the 0-based positions (int64, in the order of ``items[j]``) that
    the rows ``items[j]`` take in its ranking by decreasing inner product with equal scores
    keeping the lower database index first: exactly their positions in
    ``rank_by_similarity(Q, X)[j]``. ``items[j]`` may be in any order, repeat an index or be
    empty. Cost per query: a sort of its N scores (values only) and binary searches, so the
    memory is that of one block of scores, never the ``n_q × N`` ranking; typically ``items[j]``
    is every image query j's ground truth lists (``model.evaluation.ground_truth_items``), for
    ``model.evaluation.compute_map_at_positions`` / ``evaluate_revisited_at_positions``.
    """
    return rank_and_locate(Q, X, items, topk=0)[1]


def rank_and_locate(
    Q: ArrayLike, X: ArrayLike, items: Sequence[ArrayLike], *, topk: int
) -> tuple[NDArray[np.int64], list[NDArray[np.int64]]]:
    """``rank_by_similarity(Q, X, topk)`` and ``ranked_positions(Q, X, items)`` from one pass
    over the scores: at a million database rows the matrix products are most of the time.

    ``topk=0`` computes no ranking (the first result is ``[n_q, 0]``).
    """
    q, x = _check_pair(Q, X)
    n_q, n_db = q.shape[0], x.shape[0]
    if isinstance(topk, bool) or int(topk) != topk or topk < 0:
        raise ValueError(f"topk must be a non-negative integer, got {topk!r}")
    if isinstance(items, np.ndarray):
        items = list(items)
    if not isinstance(items, Sequence) or isinstance(items, (str, bytes)):
        raise TypeError(
            f"items must be a sequence of index lists, one per query, got {type(items)!r}"
        )
    if len(items) != n_q:
        raise ValueError(
            f"items must have one index list per query: {len(items)} for {n_q} queries"
        )
    lists = [_index_list(j, value, n_db) for j, value in enumerate(items)]
    k = min(int(topk), n_db)
    ranks = np.empty((n_q, k), dtype=np.int64)
    out = [np.empty(0, dtype=np.int64) for _ in range(n_q)]
    for block, S in _score_blocks(q, x):
        if k:
            ranks[block] = _topk_rows(S, k)
        for i, j in enumerate(range(block.start, min(block.stop, n_q))):
            if lists[j].size:
                out[j] = _positions_in_row(S[i], lists[j])
    return ranks, out


def _same_rows(q: NDArray[np.floating], x: NDArray[np.floating]) -> bool:
    """Whether ``q`` and ``x`` hold the same matrix, compared a chunk of rows at a time."""
    if q.shape != x.shape:
        return False
    if q is x:
        return True
    return all(np.array_equal(q[rows], x[rows]) for rows in _row_chunks(x))


def _query_rows(query_rows: ArrayLike, n_q: int, n_db: int) -> NDArray[np.int64]:
    arr = np.asarray(query_rows)
    if arr.ndim != 1 or arr.shape[0] != n_q:
        raise ValueError(
            f"query_rows must be 1-D with one entry per query ({n_q}), got shape {arr.shape}"
        )
    if arr.size and (arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(
            f"query_rows must hold integer database rows (-1 for none), got dtype {arr.dtype}"
        )
    arr = arr.astype(np.int64, copy=False)
    if arr.size and (arr.min() < -1 or arr.max() >= n_db):
        raise ValueError(
            f"query_rows must be database rows in [0, {n_db}) or -1 (not a database image), "
            f"got min {arr.min()}, max {arr.max()}"
        )
    return arr


def _warn_unnormalised(name: str, arr: NDArray[np.floating]) -> None:
    n_off = 0
    for rows in _row_chunks(arr):  # row norms without a full-size temporary
        chunk = arr[rows]
        norms = np.sqrt(np.einsum("ij,ij->i", chunk, chunk))
        n_off += int((np.abs(norms - 1.0) > 1e-3).sum())
    if n_off:
        logger.warning(
            "alpha_qe expects L2-normalised %s; %d row(s) have norm off 1 by more than 1e-3",
            name,
            n_off,
        )


@dataclass(frozen=True)
class QueryExpansion:
    """αQE as a settings part: evaluate, demo and the search service take the same flags."""

    qe_k: int = 0
    """αQE: database neighbours added to each query; 0 switches query expansion off."""
    qe_alpha: float = 3.0
    """αQE: a neighbour's weight is its similarity to the query to this power."""

    def __post_init__(self) -> None:
        problems = []
        if isinstance(self.qe_k, bool) or self.qe_k < 0:
            problems.append(f"--qe-k must be 0 (off) or more, not {self.qe_k}")
        if not np.isfinite(self.qe_alpha) or self.qe_alpha < 0:
            problems.append(f"--qe-alpha must be a finite number >= 0, not {self.qe_alpha}")
        raise_problems(problems)

    @property
    def label(self) -> str:
        """How a table names it; empty when off."""
        return f"αQE(k={self.qe_k}, α={self.qe_alpha:g})" if self.qe_k else ""

    def expand(
        self, queries: ArrayLike, db: ArrayLike, *, query_rows: ArrayLike | None = None
    ) -> NDArray[np.float32]:
        """``alpha_qe`` of ``queries`` over ``db`` with these settings (unchanged when off)."""
        if not self.qe_k:
            return np.asarray(queries)
        return alpha_qe(queries, db, self.qe_k, self.qe_alpha, query_rows=query_rows)


def alpha_qe(
    Q: ArrayLike,
    X: ArrayLike,
    k: int,
    alpha: float = 3.0,
    *,
    query_rows: ArrayLike | None = None,
) -> NDArray[np.float32]:
    """α-weighted query expansion (αQE, Radenović et al.): ``[n_q, D]`` float32, unit rows.

    Each query ``q`` becomes ``normalise(q + Σ_i w_i x_i)`` over its ``k`` nearest database rows
    ``x_i`` (by inner product, equal scores: lower row first), with one rule for every ``alpha``:
    ``w_i = max(0, q · x_i) ** alpha``. A neighbour with a negative similarity gets weight 0
    (``alpha > 0``), so nearby values of ``alpha`` give nearby results, whole or not;
    ``alpha=0`` gives every neighbour weight 1 (``0 ** 0 == 1``): average query expansion.
    ``k=0`` returns the normalised queries; ``k > N`` uses all the rows it may.

    A query is never its own neighbour. ``query_rows[j]`` is query j's row in ``X``, or -1 when
    it is not a database image; that row is left out of its neighbours, so it still gets ``k``
    others when ``N > k``. By default (``None``) every entry is -1, unless ``Q`` equals ``X``
    element for element (the queries are the database, ``alpha_qe(X, X, k)``): then query j is
    row j.

    Both inputs should be L2-normalised; rows that are not trigger one warning, not an error.
    """
    q, x = _check_pair(Q, X)
    if isinstance(k, bool) or int(k) != k or k < 0:
        raise ValueError(f"k must be a non-negative integer, got {k!r}")
    alpha = float(alpha)
    if not np.isfinite(alpha) or alpha < 0:
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
    n_q, n_db = q.shape[0], x.shape[0]
    if query_rows is not None:
        self_rows = _query_rows(query_rows, n_q, n_db)
    elif _same_rows(q, x):
        self_rows = np.arange(n_db, dtype=np.int64)
    else:
        self_rows = np.full(n_q, -1, dtype=np.int64)
    for name, arr in (("Q", q), ("X", x)):
        _warn_unnormalised(name, arr)
    k = min(int(k), n_db)
    if k == 0:
        return l2_normalize(q).astype(np.float32, copy=False)

    out = np.empty(q.shape, dtype=q.dtype)
    for block, S in _score_blocks(q, x):
        rows = self_rows[block]
        is_db = np.flatnonzero(rows >= 0)
        S[is_db, rows[is_db]] = -np.inf  # below every finite score: never among the k first
        nn = _topk_rows(S, k)  # [b, k]
        # Clamp first: a negative similarity has no real fractional power, and one rule for all
        # alpha. 0 ** 0 == 1: average QE keeps every neighbour.
        weights = np.maximum(np.take_along_axis(S, nn, axis=1), 0.0) ** alpha
        # With k >= N a database query's own row comes last in nn: weight 0, even for alpha=0.
        weights[nn == rows[:, None]] = 0.0
        out[block] = q[block] + np.einsum("bk,bkd->bd", weights, x[nn])
    return l2_normalize(out).astype(np.float32, copy=False)
