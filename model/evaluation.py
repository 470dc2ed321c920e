"""Retrieval metrics: revisited Oxford/Paris mAP and mP@k, and recall@k (NumPy only).

``compute_map`` follows the revisited protocol (Radenović et al., CVPR 2018) figure for figure,
including its two peculiarities, so that numbers compare with published tables:

- AP is the trapezoid rule over the ranked list, so a single positive at 0-based position r
  scores ``1 / (2 (r + 1))`` for r > 0 rather than ``1 / (r + 1)``;
- mP@k divides by ``min(k, position of the last positive found)``, not by k.

Rankings for ``compute_map`` are ``[n_db, n_q]`` (a column per query, as the protocol's own code
has them); ``recall_at_k`` takes FAISS's ``[n_q, n]`` rows. Every figure is a fraction in [0, 1].
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["compute_map", "evaluate_revisited", "recall_at_k"]

logger = logging.getLogger(__name__)

_EMPTY = np.empty(0, dtype=np.int64)


def _int_matrix(name: str, ranks: ArrayLike) -> NDArray[np.int64]:
    arr = np.asarray(ranks)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D integer array, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(
            f"{name} must hold integer database indices, got dtype {arr.dtype} "
            "(pass the argsort output, not the scores)"
        )
    return arr.astype(np.int64, copy=False)


def _positive_ints(name: str, values: Iterable[int]) -> list[int]:
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be positive integers, got {v!r}")
        out.append(int(v))
    return out


def _index_set(q: int, key: str, value: ArrayLike, n_db: int) -> NDArray[np.int64]:
    """One ground-truth list as unique sorted int64, checked against the database size."""
    arr = np.asarray(value)
    if arr.size == 0:
        return _EMPTY
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(
            f"gnd[{q}][{key!r}] must be a 1-D list of integer database indices, "
            f"got shape {arr.shape}, dtype {arr.dtype}"
        )
    if arr.min() < 0 or arr.max() >= n_db:
        raise ValueError(
            f"gnd[{q}][{key!r}] has database indices outside [0, {n_db}): "
            f"min {arr.min()}, max {arr.max()}"
        )
    return np.unique(arr.astype(np.int64, copy=False))


def _check_gnd(gnd: Sequence[Mapping[str, ArrayLike]], required: tuple[str, ...]) -> None:
    if isinstance(gnd, Mapping) or not isinstance(gnd, Sequence):
        raise TypeError(f"gnd must be a sequence of dicts, one per query, got {type(gnd)!r}")
    for q, entry in enumerate(gnd):
        if not isinstance(entry, Mapping):
            raise TypeError(f"gnd[{q}] must be a dict, got {type(entry)!r}")
        missing = [key for key in required if key not in entry]
        if missing:
            raise ValueError(
                f"gnd[{q}] is missing key(s) {missing}; it has {sorted(map(str, entry))}"
            )


def _query_ap_pr(
    column: NDArray[np.int64], ok: NDArray[np.int64], junk: NDArray[np.int64], kappas: list[int]
) -> tuple[float, NDArray[np.float64]]:
    """AP and precision@kappas of one query whose ranked database indices are ``column``."""
    pos = np.flatnonzero(np.isin(column, ok))  # 0-based positions, ascending
    if junk.size:
        junk_pos = np.flatnonzero(np.isin(column, junk))
        pos = pos - np.searchsorted(junk_pos, pos)  # minus the junk ranked before each one
    n_found = pos.size
    j = np.arange(n_found)
    # Trapezoid between the precision just before and just after each positive is recalled.
    prec_before = np.where(pos == 0, 1.0, j / np.maximum(pos, 1))
    prec_after = (j + 1) / (pos + 1)
    ap = float(((prec_before + prec_after) / 2).sum() / ok.size)

    if n_found == 0:
        return ap, np.zeros(len(kappas))
    pos1 = pos + 1
    kq = np.minimum(pos1[-1], np.asarray(kappas, dtype=np.int64))  # the protocol's min() quirk
    prs = (pos1[None, :] <= kq[:, None]).sum(axis=1) / kq
    return ap, prs.astype(np.float64)


def compute_map(
    ranks: ArrayLike,
    gnd: Sequence[Mapping[str, ArrayLike]],
    kappas: Sequence[int] = (),
    *,
    n_db: int | None = None,
) -> tuple[float, NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """mAP and mP@k of a ranking under the revisited Oxford/Paris protocol.

    ``ranks`` is ``[n_db, n_q]``: column j lists database indices for query j, best first (pass
    ``ranks.T`` for a FAISS-style result). ``gnd[j]`` holds ``ok`` (positives) and optionally
    ``junk`` (ignored images: dropped from the ranking before scoring, so they neither help
    nor hurt). Positives missing from the ranking add nothing to AP but still count in its
    denominator.

    ``n_db`` is the database size when ``ranks`` is only a top-k (fewer rows than images);
    by default the ranking is taken to be complete, ``n_db = ranks.shape[0]``.

    Returns ``(mAP, aps [n_q], mpr [len(kappas)], prs [n_q, len(kappas)])``. Queries with no
    positives get NaN rows and are left out of the means; if no query has positives the means
    are NaN and a warning is logged.
    """
    r = _int_matrix("ranks", ranks)
    _check_gnd(gnd, ("ok",))
    n_q = len(gnd)
    if r.shape[1] != n_q:
        hint = ""
        if r.shape[0] == n_q:
            hint = (
                "; its rows match the number of queries, so it looks like a row-per-query "
                "(FAISS) ranking: transpose it (ranks.T)"
            )
        raise ValueError(
            f"ranks must be [n_db, n_q] with a column per query, got shape {r.shape} "
            f"for {n_q} queries in gnd{hint}"
        )
    ks = _positive_ints("kappas", kappas)
    if n_db is None:
        n_db = r.shape[0]
    elif n_db < r.shape[0]:
        raise ValueError(f"n_db={n_db} is smaller than the ranking length {r.shape[0]}")
    if r.size and (r.min() < 0 or r.max() >= n_db):
        raise ValueError(
            f"ranks has database indices outside [0, {n_db}): min {r.min()}, max {r.max()} "
            "(pad a short FAISS result by truncating, not with -1; pass n_db= for a top-k)"
        )
    if r.shape[0] > 1:
        sorted_cols = np.sort(r, axis=0)
        dup_cols = np.flatnonzero((sorted_cols[1:] == sorted_cols[:-1]).any(axis=0))
        if dup_cols.size:
            raise ValueError(
                f"ranks lists a database index twice for {dup_cols.size} query(ies) "
                f"(first: query {int(dup_cols[0])}); each column must be a ranking"
            )

    aps = np.full(n_q, np.nan)
    prs = np.full((n_q, len(ks)), np.nan)
    for q, entry in enumerate(gnd):
        ok = _index_set(q, "ok", entry["ok"], n_db)
        if ok.size == 0:
            continue
        junk = _index_set(q, "junk", entry.get("junk", _EMPTY), n_db)
        overlap = np.intersect1d(ok, junk)
        if overlap.size:
            raise ValueError(
                f"gnd[{q}] lists {overlap.size} image(s) as both ok and junk "
                f"(e.g. {int(overlap[0])}); an image is one or the other"
            )
        aps[q], prs[q] = _query_ap_pr(r[:, q], ok, junk, ks)

    n_valid = int((~np.isnan(aps)).sum())
    if n_valid == 0:
        logger.warning("compute_map: none of the %d queries has a positive; mAP is NaN", n_q)
        return float("nan"), aps, np.full(len(ks), np.nan), prs
    if n_valid < n_q:
        logger.info("compute_map: %d of %d queries have no positives, left out", n_q - n_valid, n_q)
    return float(np.nanmean(aps)), aps, np.nanmean(prs, axis=0), prs


def evaluate_revisited(
    ranks: ArrayLike,
    gnd: Sequence[Mapping[str, ArrayLike]],
    kappas: Sequence[int] = (1, 5, 10),
    *,
    n_db: int | None = None,
) -> dict[str, dict[str, float | dict[int, float]]]:
    """Easy, medium and hard mAP and mP@k of the revisited protocol (ROxford, RParis).

    ``gnd[j]`` holds ``easy``, ``hard`` and ``junk``. Easy counts easy images as positives and
    ignores hard ones; medium counts both; hard counts only hard images and ignores easy ones.
    Returns ``{"easy"|"medium"|"hard": {"map": float, "mp@k": {k: float}}}``.
    """
    _check_gnd(gnd, ("easy", "hard"))
    ks = _positive_ints("kappas", kappas)
    size = _int_matrix("ranks", ranks).shape[0] if n_db is None else n_db
    parts = [
        tuple(_index_set(q, key, entry.get(key, _EMPTY), size) for key in ("easy", "hard", "junk"))
        for q, entry in enumerate(gnd)
    ]
    for q, (e, h, j) in enumerate(parts):
        for (a, a_name), (b, b_name) in (
            ((e, "easy"), (h, "hard")),
            ((e, "easy"), (j, "junk")),
            ((h, "hard"), (j, "junk")),
        ):
            both = np.intersect1d(a, b)
            if both.size:
                raise ValueError(
                    f"gnd[{q}] lists {both.size} image(s) as both {a_name} and {b_name} "
                    f"(e.g. {int(both[0])}); the three lists must be disjoint"
                )
    setups = {
        "easy": [{"ok": e, "junk": np.concatenate([j, h])} for e, h, j in parts],
        "medium": [{"ok": np.concatenate([e, h]), "junk": j} for e, h, j in parts],
        "hard": [{"ok": h, "junk": np.concatenate([j, e])} for e, h, j in parts],
    }
    results: dict[str, dict[str, float | dict[int, float]]] = {}
    for name, sub_gnd in setups.items():
        m_ap, _, mpr, _ = compute_map(ranks, sub_gnd, ks, n_db=n_db)
        results[name] = {"map": m_ap, "mp@k": {k: float(v) for k, v in zip(ks, mpr, strict=True)}}
    return results


def recall_at_k(
    ranks: ArrayLike, query_labels: ArrayLike, db_labels: ArrayLike, ks: Iterable[int]
) -> dict[int, float]:
    """Share of queries with a same-label result among their first k, for each k in ``ks``.

    ``ranks`` is ``[n_q, n]``, a row per query as FAISS returns it; ``-1`` entries (FAISS's "no
    result") never match. A k beyond ``n`` counts all ``n`` results.
    """
    r = _int_matrix("ranks", ranks)
    q_labels = np.asarray(query_labels).ravel()
    d_labels = np.asarray(db_labels).ravel()
    k_list = _positive_ints("ks", ks)
    n_q = q_labels.size
    if r.shape[0] != n_q:
        hint = ""
        if r.shape[1] == n_q:
            hint = (
                "; its columns match the number of queries, so it looks like a "
                "column-per-query ranking: transpose it (ranks.T)"
            )
        raise ValueError(
            f"ranks must be [n_q, n] with a row per query, got shape {r.shape} for "
            f"{n_q} query labels{hint}"
        )
    if r.size and (r.min() < -1 or r.max() >= d_labels.size):
        raise ValueError(
            f"ranks has indices outside [0, {d_labels.size}) (the length of db_labels) other "
            f"than -1: min {r.min()}, max {r.max()}"
        )
    if n_q == 0:
        logger.warning("recall_at_k: no queries; recall is NaN")
        return {k: float("nan") for k in k_list}

    valid = r >= 0
    hits = valid & (d_labels[np.where(valid, r, 0)] == q_labels[:, None])
    first_hit = np.where(hits.any(axis=1), hits.argmax(axis=1), np.iinfo(np.int64).max)
    return {k: float((first_hit < k).mean()) for k in k_list}
