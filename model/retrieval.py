"""Ranking and α-weighted query expansion on L2-normalised descriptors (NumPy only).

Descriptors are rows (``[N, D]``), as FAISS and the Parquet tables hold them, and rankings come
back a row per query, as ``faiss.Index.search`` returns them. ``model.evaluation.compute_map``
wants the protocol's column-per-query layout, so pass it ``ranks.T``.

Scores are computed in float32 for float32 input (float64 for float64 input) and in blocks of
queries, so a large database never needs a full ``n_q × N`` score matrix at once.
"""

from __future__ import annotations

import logging

import numpy as np
from numpy.typing import ArrayLike, NDArray

from model.arrays import descriptor_matrix

__all__ = ["alpha_qe", "l2_normalize", "rank_by_similarity"]

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


def _check_pair(Q: ArrayLike, X: ArrayLike) -> tuple[NDArray[np.floating], NDArray[np.floating]]:
    q, x = descriptor_matrix(Q, "Q"), descriptor_matrix(X, "X")
    if q.shape[1] != x.shape[1]:
        raise ValueError(
            f"Q and X must have the same descriptor dimension: Q is {q.shape}, X is {x.shape}"
        )
    dtype = np.result_type(q.dtype, x.dtype)
    return q.astype(dtype, copy=False), x.astype(dtype, copy=False)


def _query_blocks(n_q: int, n_db: int) -> range:
    step = max(1, _SCORE_BLOCK_ELEMS // max(n_db, 1))
    return range(0, n_q, step)


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
    lower database index first. ``topk`` larger than ``N`` returns all ``N``.
    """
    q, x = _check_pair(Q, X)
    n_db = x.shape[0]
    if topk is None:
        topk = n_db
    elif isinstance(topk, bool) or int(topk) != topk or topk < 1:
        raise ValueError(f"topk must be a positive integer or None, got {topk!r}")
    k = min(int(topk), n_db)
    ranks = np.empty((q.shape[0], k), dtype=np.int64)
    blocks = _query_blocks(q.shape[0], n_db)
    for start in blocks:
        block = slice(start, start + blocks.step)
        ranks[block] = _topk_rows(q[block] @ x.T, k)
    return ranks


def alpha_qe(Q: ArrayLike, X: ArrayLike, k: int, alpha: float = 3.0) -> NDArray[np.float32]:
    """α-weighted query expansion (αQE, Radenović et al.): ``[n_q, D]`` float32, unit rows.

    Each query ``q`` becomes ``normalise(q + Σ_i w_i x_i)`` over its ``k`` nearest database rows
    ``x_i`` (by inner product), with ``w_i = (q · x_i) ** alpha``. ``alpha=0`` is average query
    expansion; ``k=0`` returns the normalised queries; ``k > N`` uses all ``N`` rows.

    For a non-integer ``alpha`` a negative similarity has no real power, so it is clamped at 0
    first (that neighbour gets weight 0). An integer ``alpha`` keeps the formula exact: an odd
    power of a negative similarity is a negative weight. Negative similarities only reach the
    top ``k`` when ``k`` is a large share of the database.

    Both inputs should be L2-normalised; rows that are not trigger one warning, not an error.
    """
    q, x = _check_pair(Q, X)
    if isinstance(k, bool) or int(k) != k or k < 0:
        raise ValueError(f"k must be a non-negative integer, got {k!r}")
    alpha = float(alpha)
    if not np.isfinite(alpha) or alpha < 0:
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
    for name, arr in (("Q", q), ("X", x)):
        norms = np.linalg.norm(arr, axis=1)
        if arr.size and not np.allclose(norms, 1.0, atol=1e-3):
            logger.warning(
                "alpha_qe expects L2-normalised %s; %d row(s) have norm off 1 by more than 1e-3",
                name,
                int((np.abs(norms - 1.0) > 1e-3).sum()),
            )
    k = min(int(k), x.shape[0])
    if k == 0:
        return l2_normalize(q).astype(np.float32, copy=False)

    integer_alpha = alpha.is_integer()
    out = np.empty(q.shape, dtype=q.dtype)
    blocks = _query_blocks(q.shape[0], x.shape[0])
    for start in blocks:
        qb = q[start : start + blocks.step]
        S = qb @ x.T
        nn = _topk_rows(S, k)  # [b, k]
        sims = np.take_along_axis(S, nn, axis=1)
        if not integer_alpha:
            sims = np.maximum(sims, 0.0)
        weights = sims**alpha  # 0 ** 0 == 1: average QE keeps every neighbour
        out[start : start + blocks.step] = qb + np.einsum("bk,bkd->bd", weights, x[nn])
    return l2_normalize(out).astype(np.float32, copy=False)
