"""Retrieval metrics: revisited Oxford/Paris mAP and mP@k, and recall@k (NumPy only).

``compute_map`` follows the revisited protocol (Radenović et al., CVPR 2018) figure for figure,
including its two peculiarities, so that numbers compare with published tables:

- AP is the trapezoid rule over the ranked list, so a single positive at 0-based position r
  scores ``1 / (2 (r + 1))`` for r > 0 rather than ``1 / (r + 1)``;
- mP@k divides by ``min(k, position of the last positive found)``, not by k.

Rankings for ``compute_map`` are ``[n_db, n_q]`` (a column per query, as the protocol's own code
has them); ``recall_at_k`` takes FAISS's ``[n_q, n]`` rows. Every figure is a fraction in [0, 1].

Exact mAP needs only where each query's ground-truth images (positives and junk) sit in its full
ranking, not the ranking itself: ``compute_map_at_positions`` and
``evaluate_revisited_at_positions`` take those positions (``model.retrieval.ranked_positions``
computes them without ranking a million-image database) and share every line of the AP and
mP@k arithmetic with ``compute_map`` and ``evaluate_revisited``, so both give the same figures.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray

from model.arrays import index_array

__all__ = [
    "cluster_map",
    "compute_map",
    "compute_map_at_positions",
    "evaluate_revisited",
    "evaluate_revisited_at_positions",
    "ground_truth_items",
    "recall_at_k",
]

logger = logging.getLogger(__name__)

_EMPTY = np.empty(0, dtype=np.int64)
# The database size when the caller does not give one (positions do not reveal it).
_NO_LIMIT = int(np.iinfo(np.int64).max)

_GND_KEYS = ("ok", "easy", "hard", "junk")


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


def _index_set(q: int, key: str, value: ArrayLike, *, n_db: int) -> NDArray[np.int64]:
    """One ground-truth list as unique sorted int64, checked against the database size."""
    return np.unique(index_array(value, n_db, f"gnd[{q}][{key!r}]"))


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


def _ap_pr(
    pos: NDArray[np.int64], n_ok: int, kappas: list[int]
) -> tuple[float, NDArray[np.float64]]:
    """AP and precision@kappas of one query from where its positives sit in its ranking.

    ``pos`` holds the ascending 0-based positions of the positives found, counted once the junk
    is removed from the ranking (``_without_junk``); ``n_ok`` is the number of positives, found
    or not (AP's denominator). The one copy of the protocol's arithmetic: every metric here,
    from a ranking or from positions, comes through it.
    """
    n_found = pos.size
    j = np.arange(n_found)
    # Trapezoid between the precision just before and just after each positive is recalled.
    prec_before = np.where(pos == 0, 1.0, j / np.maximum(pos, 1))
    prec_after = (j + 1) / (pos + 1)
    ap = float(((prec_before + prec_after) / 2).sum() / n_ok)

    if n_found == 0:
        return ap, np.zeros(len(kappas))
    pos1 = pos + 1
    kq = np.minimum(pos1[-1], np.asarray(kappas, dtype=np.int64))  # the protocol's min() quirk
    prs = (pos1[None, :] <= kq[:, None]).sum(axis=1) / kq
    return ap, prs.astype(np.float64)


def _without_junk(ok_pos: NDArray[np.int64], junk_pos: NDArray[np.int64]) -> NDArray[np.int64]:
    """Positions of the positives (ascending) once the junk (ascending) leaves the ranking."""
    if junk_pos.size == 0:
        return ok_pos
    return ok_pos - np.searchsorted(junk_pos, ok_pos)  # minus the junk ranked before each one


# (query, ok, junk) -> (positions of ok, positions of junk): ascending, in the full ranking.
_Locate = Callable[[int, NDArray[np.int64], NDArray[np.int64]], tuple[NDArray[np.int64], ...]]


def _map_over_queries(
    gnd: Sequence[Mapping[str, ArrayLike]],
    ks: list[int],
    n_db: int,
    *,
    locate: _Locate,
    caller: str,
) -> tuple[float, NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """``compute_map``'s result, given where each query's ``ok`` and ``junk`` images rank."""
    n_q = len(gnd)
    aps = np.full(n_q, np.nan)
    prs = np.full((n_q, len(ks)), np.nan)
    for q, entry in enumerate(gnd):
        ok = _index_set(q, "ok", entry["ok"], n_db=n_db)
        if ok.size == 0:
            continue
        junk = _index_set(q, "junk", entry.get("junk", _EMPTY), n_db=n_db)
        overlap = np.intersect1d(ok, junk)
        if overlap.size:
            raise ValueError(
                f"gnd[{q}] lists {overlap.size} image(s) as both ok and junk "
                f"(e.g. {int(overlap[0])}); an image is one or the other"
            )
        ok_pos, junk_pos = locate(q, ok, junk)
        aps[q], prs[q] = _ap_pr(_without_junk(ok_pos, junk_pos), ok.size, ks)

    n_valid = int((~np.isnan(aps)).sum())
    if n_valid == 0:
        logger.warning("%s: none of the %d queries has a positive; mAP is NaN", caller, n_q)
        return float("nan"), aps, np.full(len(ks), np.nan), prs
    if n_valid < n_q:
        logger.info("%s: %d of %d queries have no positives, left out", caller, n_q - n_valid, n_q)
    return float(np.nanmean(aps)), aps, np.nanmean(prs, axis=0), prs


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
    are NaN and a warning is logged. ``compute_map_at_positions`` gives the same figures from
    the positions of the ground-truth images alone.
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

    def locate(q: int, ok: NDArray[np.int64], junk: NDArray[np.int64]):
        column = r[:, q]
        ok_pos = np.flatnonzero(np.isin(column, ok))  # 0-based positions, ascending
        junk_pos = np.flatnonzero(np.isin(column, junk)) if junk.size else _EMPTY
        return ok_pos, junk_pos

    return _map_over_queries(gnd, ks, n_db, locate=locate, caller="compute_map")


def _revisited_setups(
    gnd: Sequence[Mapping[str, ArrayLike]], n_db: int
) -> dict[str, list[dict[str, NDArray[np.int64]]]]:
    """The easy, medium and hard ``{"ok", "junk"}`` ground truths of a revisited ``gnd``."""
    parts = [
        tuple(
            _index_set(q, key, entry.get(key, _EMPTY), n_db=n_db)
            for key in ("easy", "hard", "junk")
        )
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
    return {
        "easy": [{"ok": e, "junk": np.concatenate([j, h])} for e, h, j in parts],
        "medium": [{"ok": np.concatenate([e, h]), "junk": j} for e, h, j in parts],
        "hard": [{"ok": h, "junk": np.concatenate([j, e])} for e, h, j in parts],
    }


def _revisited(
    setups: dict[str, list[dict[str, NDArray[np.int64]]]],
    ks: list[int],
    score: Callable[[list[dict[str, NDArray[np.int64]]]], tuple],
) -> dict[str, dict[str, float | dict[int, float]]]:
    results: dict[str, dict[str, float | dict[int, float]]] = {}
    for name, sub_gnd in setups.items():
        m_ap, _, mpr, _ = score(sub_gnd)
        results[name] = {"map": m_ap, "mp@k": {k: float(v) for k, v in zip(ks, mpr, strict=True)}}
    return results


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
    return _revisited(
        _revisited_setups(gnd, size), ks, lambda sub: compute_map(ranks, sub, ks, n_db=n_db)
    )


def ground_truth_items(gnd: Sequence[Mapping[str, ArrayLike]]) -> list[NDArray[np.int64]]:
    """For each query, the sorted database indices its ``gnd`` entry lists (any of ``ok``,
    ``easy``, ``hard``, ``junk``): the images whose positions exact mAP needs, the ``items`` of
    ``model.retrieval.ranked_positions``."""
    _check_gnd(gnd, ())
    out = []
    for q, entry in enumerate(gnd):
        lists = [
            _index_set(q, key, entry[key], n_db=_NO_LIMIT) for key in _GND_KEYS if key in entry
        ]
        out.append(np.unique(np.concatenate(lists)) if lists else _EMPTY)
    return out


_PositionTable = tuple[NDArray[np.int64], NDArray[np.int64]]


def _position_tables(
    positions: Sequence[tuple[ArrayLike, ArrayLike]], n_q: int, n_db: int
) -> list[_PositionTable]:
    """Each ``positions[j]`` as (unique ascending database indices, their positions), checked."""
    if isinstance(positions, Mapping) or not isinstance(positions, Sequence):
        raise TypeError(
            "positions must be a sequence with one (indices, positions) pair per query, "
            f"got {type(positions)!r}"
        )
    if len(positions) != n_q:
        raise ValueError(
            f"positions must have one (indices, positions) pair per query: {len(positions)} "
            f"for {n_q} queries in gnd"
        )
    tables = []
    for q, pair in enumerate(positions):
        if isinstance(pair, Mapping) or not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(
                f"positions[{q}] must be a pair (database indices, their positions) of 1-D "
                f"integer arrays, got {type(pair)!r}"
            )
        idx = index_array(pair[0], n_db, f"positions[{q}]: the database indices")
        pos = index_array(pair[1], n_db, f"positions[{q}]: the positions")
        if idx.shape != pos.shape:
            raise ValueError(
                f"positions[{q}] pairs {idx.size} database indices with {pos.size} positions; "
                "they must be parallel"
            )
        order = np.argsort(idx, kind="stable")
        idx, pos = idx[order], pos[order]
        same = idx[1:] == idx[:-1]
        if (pos[1:][same] != pos[:-1][same]).any():
            raise ValueError(f"positions[{q}] gives one database index two different positions")
        keep = np.ones(idx.size, dtype=bool)
        keep[1:] = ~same
        idx, pos = idx[keep], pos[keep]
        if np.unique(pos).size != pos.size:
            raise ValueError(
                f"positions[{q}] puts two database images at the same position; "
                "positions must come from one ranking"
            )
        tables.append((idx, pos))
    return tables


def _look_up(
    tables: list[_PositionTable], q: int, key: str, *, wanted: NDArray[np.int64]
) -> NDArray[np.int64]:
    """Ascending positions of database images ``wanted`` (gnd[q][key]); an error if one lacks."""
    idx, pos = tables[q]
    loc = np.searchsorted(idx, wanted)
    found = loc < idx.size
    found[found] = idx[loc[found]] == wanted[found]
    if not found.all():
        missing = wanted[~found]
        raise ValueError(
            f"positions[{q}] has no position for {missing.size} database image(s) listed in "
            f"gnd[{q}][{key!r}] (e.g. {int(missing[0])}); every image of a query's ground truth "
            "needs its position (model.evaluation.ground_truth_items lists them)"
        )
    return np.sort(pos[loc])


def _map_at_tables(
    tables: list[_PositionTable],
    gnd: Sequence[Mapping[str, ArrayLike]],
    ks: list[int],
    *,
    n_db: int,
    caller: str,
) -> tuple[float, NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    def locate(q: int, ok: NDArray[np.int64], junk: NDArray[np.int64]):
        return _look_up(tables, q, "ok", wanted=ok), _look_up(tables, q, "junk", wanted=junk)

    return _map_over_queries(gnd, ks, n_db, locate=locate, caller=caller)


def compute_map_at_positions(
    positions: Sequence[tuple[ArrayLike, ArrayLike]],
    gnd: Sequence[Mapping[str, ArrayLike]],
    kappas: Sequence[int] = (),
    *,
    n_db: int | None = None,
) -> tuple[float, NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """``compute_map`` of a full ranking, from the positions of the ground-truth images alone.

    ``positions[j]`` is a pair ``(indices, ranks)`` of parallel 1-D integer arrays: database
    image ``indices[i]`` sits at 0-based position ``ranks[i]`` of query j's full ranking (any
    order; extra images are ignored). Every image that ``gnd[j]`` lists under ``ok`` or
    ``junk`` must be there (a ``ValueError`` otherwise: in a full ranking every image has a
    position). With ``items = ground_truth_items(gnd)`` and
    ``model.retrieval.ranked_positions(Q, X, items)`` as ``pos``, pass
    ``list(zip(items, pos))``. ``n_db``, when given, bounds the indices and positions.

    Returns what ``compute_map`` returns for that full ranking, figure for figure:
    ``(mAP, aps [n_q], mpr [len(kappas)], prs [n_q, len(kappas)])``, queries with no positives
    left out of the means.
    """
    _check_gnd(gnd, ("ok",))
    ks = _positive_ints("kappas", kappas)
    size = _NO_LIMIT if n_db is None else int(n_db)
    tables = _position_tables(positions, len(gnd), size)
    return _map_at_tables(tables, gnd, ks, n_db=size, caller="compute_map_at_positions")


def evaluate_revisited_at_positions(
    positions: Sequence[tuple[ArrayLike, ArrayLike]],
    gnd: Sequence[Mapping[str, ArrayLike]],
    kappas: Sequence[int] = (1, 5, 10),
    *,
    n_db: int | None = None,
) -> dict[str, dict[str, float | dict[int, float]]]:
    """``evaluate_revisited`` of a full ranking, from the positions of the ground-truth images.

    ``positions`` is as for ``compute_map_at_positions``; it must hold every image that
    ``gnd[j]`` lists under ``easy``, ``hard`` or ``junk``. Returns
    ``{"easy"|"medium"|"hard": {"map": float, "mp@k": {k: float}}}``, the figures
    ``evaluate_revisited`` gives for the full ranking.
    """
    _check_gnd(gnd, ("easy", "hard"))
    ks = _positive_ints("kappas", kappas)
    size = _NO_LIMIT if n_db is None else int(n_db)
    tables = _position_tables(positions, len(gnd), size)
    setups = _revisited_setups(gnd, size)
    for q, entry in enumerate(gnd):  # name the list an image is missing from
        for key in ("easy", "hard", "junk"):
            _look_up(tables, q, key, wanted=_index_set(q, key, entry.get(key, _EMPTY), n_db=size))
    return _revisited(
        setups,
        ks,
        lambda sub: _map_at_tables(
            tables, sub, ks, n_db=size, caller="evaluate_revisited_at_positions"
        ),
    )


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


def cluster_map(
    vectors: ArrayLike, clusters: ArrayLike, queries: ArrayLike, *, models: ArrayLike | None = None
) -> float:
    """mAP of each query row against every row (itself left out), its cluster's rows positive.

    The score of held-out scenes in training and of whitening choices: ``vectors`` ``[N, D]``
    (unit rows), ``clusters`` ``[N]``, ``queries`` row indices. Every positive counts (the
    revisited protocol's Medium: no junk beyond the query itself). With ``models`` (each row's
    3D model, ``None`` where it has none) a query's positives are the rows of its own model
    and the rest of its cluster is junk: grouped with it but not shown by geometry to be the
    same place (a cluster may join two scenes), as the revisited protocol treats the unsure.
    """
    x = np.asarray(vectors)
    labels = np.asarray(clusters)
    rows = index_array(queries, len(x), "queries")
    if x.ndim != 2 or len(labels) != len(x):
        raise ValueError(f"vectors {x.shape} and clusters {labels.shape} need one row each")
    model_of = None if models is None else np.asarray(models, dtype=object)
    if model_of is not None and len(model_of) != len(x):
        raise ValueError(f"models {model_of.shape} need one entry per row of vectors {x.shape}")
    ranks = np.argsort(-(x @ x[rows].T), axis=0, kind="stable")
    everyone = np.arange(len(labels))
    gnd = []
    for q in rows.tolist():
        together = labels == labels[q]
        if model_of is None or model_of[q] is None:
            gnd.append({"ok": np.flatnonzero(together & (everyone != q)), "junk": np.array([q])})
            continue
        ok = (model_of == model_of[q]) & together & (everyone != q)
        gnd.append({"ok": np.flatnonzero(ok), "junk": np.flatnonzero(together & ~ok)})
    return float(compute_map(ranks, gnd)[0])
