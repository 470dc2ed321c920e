"""The pairs stage: positive training pairs from the 3D models, as the GeM paper mines them.

    python -m pipeline.pairs --sfm OUT/sfm --output OUT/pairs

For each registered photo as a query, its positive candidates are the photos of the same model
that observe at least ``--min-overlap`` (t_i, 0.2) of the query's 3D points with a scale change
of at most ``--max-scale-change`` (t_s, 1.5): the paper's relaxed inliers, views of the same
surface at a similar scale, so the pair is visibly the same place and not trivially the same
photo. Training draws one of them at random each epoch (``train``). Each photo keeps its cluster
(its SfM group): negatives are taken from other clusters only.

Output ``PAIRS/``: ``tables.PAIRS`` (query_id, positives (list of image_id, best first),
overlaps (the shared fraction of each), cluster_id, model_id); ``tables.WHITENING_PAIRS``
(query_id, positive_id: each query with its most overlapping positive, for learned whitening);
``tables.POOL`` (image_id, cluster_id, model_id: every photo with a cluster, the negative pool of
training, with its 3D model where it is registered); then the manifest (``tables.PAIRS_OUTPUT``)
with the counts. A rerun with the same 3D models and settings skips; other models upstream mine
again; other settings stop with a line naming them, unless ``--overwrite``.
``--export-pkl FILE`` writes the same pairs in cnnimageretrieval-pytorch's layout
(``{"train": {"cids", "cluster", "qidxs", "pidxs"}}``, one positive per query, image ids as
``cids``), so its users can train on them.

The 3D point ids stay NumPy arrays from the table to the count of shared points (a photo sees
thousands of points; a million photos' ids as Python ints would not fit a driver): the counts
come from the points' tracks, a block of queries at a time, with ``np.bincount``.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from model import storage, tables
from model.cli import location_problems, log_settings, run_cli
from model.settings import raise_problems

__all__ = [
    "PairsConf",
    "cirtorch_pickle",
    "content_settings",
    "mine_positives",
    "run",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PairsConf:
    """Settings of the pair mining; every field is a command-line flag."""

    sfm: str
    """The output of pipeline.sfm."""
    output: str
    min_overlap: float = 0.2
    """t_i: the share of the query's 3D points a positive must also observe."""
    max_scale_change: float = 1.5
    """t_s: the largest ratio of the two photos' observation scales."""
    max_positives: int = 100
    """Keep this many positive candidates per query (the most overlapping)."""
    export_pkl: str | None = None
    """Also write cnnimageretrieval-pytorch's .pkl layout here."""
    overwrite: bool = False
    """Replace an output made with other settings (else the run stops, naming them)."""


def mine_positives(
    rows: list[dict[str, Any]], *, min_overlap: float, max_scale_change: float, max_positives: int
) -> dict[str, list[tuple[str, float]]]:
    """Query image_id → ``[(positive image_id, shared fraction)]``, best first.

    ``rows`` are registered photos of sfm_images (``image_id``, ``model_id``, ``point3d_ids``
    (an int64 array or a list), ``scale``). Shared points are counted through each point's
    track (the photos that see it), so the cost is the sum of the tracks' lengths squared,
    not photos squared (``_mine``).
    """
    kept = [
        r
        for r in rows
        if r.get("model_id") is not None
        and r.get("point3d_ids") is not None
        and len(r["point3d_ids"])
    ]
    points = [np.asarray(r["point3d_ids"], dtype=np.int64) for r in kept]
    lengths = np.fromiter((len(p) for p in points), dtype=np.int64, count=len(points))
    photos = _Registered(
        image_ids=[r["image_id"] for r in kept],
        model_ids=[r["model_id"] for r in kept],
        scales=np.array([np.nan if r.get("scale") is None else r["scale"] for r in kept]),
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        points=np.concatenate(points) if points else np.empty(0, dtype=np.int64),
    )
    return _mine(
        photos,
        min_overlap=min_overlap,
        max_scale_change=max_scale_change,
        max_positives=max_positives,
    )


@dataclass(frozen=True)
class _Registered:
    """Registered photos with 3D points, as columns: photo ``i`` sees the points
    ``points[offsets[i]:offsets[i + 1]]`` (int64) of model ``model_ids[i]``."""

    image_ids: Sequence[str]
    model_ids: Sequence[str]
    scales: np.ndarray
    """float64; NaN where unknown."""
    offsets: np.ndarray
    points: np.ndarray


_PAIRS_PER_BLOCK = 1 << 23
"""Shared-point pairs counted at once (memory: a few arrays of this many int64)."""
_CELLS_PER_BLOCK = 1 << 22
"""Query x photo counts held at once."""


def _mine(
    photos: _Registered, *, min_overlap: float, max_scale_change: float, max_positives: int
) -> dict[str, list[tuple[str, float]]]:
    """``mine_positives`` of photos held as columns, model by model."""
    positives: dict[str, list[tuple[str, float]]] = {}
    if not len(photos.image_ids):
        return positives
    models, model_of = np.unique(np.asarray(photos.model_ids, dtype=object), return_inverse=True)
    for model in range(len(models)):
        members = np.flatnonzero(model_of == model)
        _mine_model(
            photos,
            members,
            positives,
            min_overlap=min_overlap,
            max_scale_change=max_scale_change,
            max_positives=max_positives,
        )
    return positives


def _mine_model(
    photos: _Registered,
    members: np.ndarray,
    positives: dict[str, list[tuple[str, float]]],
    *,
    min_overlap: float,
    max_scale_change: float,
    max_positives: int,
) -> None:
    """The positives of one model's photos (``members``: their rows in ``photos``)."""
    m = len(members)
    ids = [photos.image_ids[i] for i in members]
    id_rank = np.argsort(np.argsort(np.asarray(ids, dtype=str), kind="stable"), kind="stable")
    scales = photos.scales[members]
    # Each member's distinct points, member by member (CSR: ``start[i]:start[i + 1]``).
    lengths = photos.offsets[members + 1] - photos.offsets[members]
    owner = np.repeat(np.arange(m, dtype=np.int64), lengths)
    points = np.concatenate(
        [photos.points[photos.offsets[i] : photos.offsets[i + 1]] for i in members]
    )
    order = np.lexsort((points, owner))
    owner, points = owner[order], points[order]
    distinct = np.ones(len(points), dtype=bool)
    distinct[1:] = (owner[1:] != owner[:-1]) | (points[1:] != points[:-1])
    owner, points = owner[distinct], points[distinct]
    seen = np.bincount(owner, minlength=m)
    start = np.concatenate([[0], np.cumsum(seen)])
    # Each point's track: the members that see it.
    by_point = np.argsort(points, kind="stable")
    track_owner = owner[by_point]
    uniq, first, track = np.unique(points[by_point], return_index=True, return_counts=True)
    point_of = np.searchsorted(uniq, points)  # per observation, in member order
    work = np.add.reduceat(track[point_of], start[:-1]) if len(points) else np.zeros(m, int)
    for q0, q1 in _blocks(work, m):
        span = slice(int(start[q0]), int(start[q1]))
        sizes = track[point_of[span]]
        left = np.repeat(owner[span], sizes)
        within = np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        right = track_owner[np.repeat(first[point_of[span]], sizes) + within]
        other = left != right
        cells = (left[other] - q0) * m + right[other]
        shared = np.bincount(cells, minlength=(q1 - q0) * m).reshape(q1 - q0, m)
        for q in range(q0, q1):
            found = _ranked(
                shared[q - q0],
                seen[q],
                scales[q],
                scales=scales,
                id_rank=id_rank,
                min_overlap=min_overlap,
                max_scale_change=max_scale_change,
            )
            if len(found):
                keep = found[:max_positives]
                shares = shared[q - q0, keep] / seen[q]
                positives[ids[q]] = [
                    (ids[j], float(o)) for j, o in zip(keep.tolist(), shares.tolist(), strict=True)
                ]


def _blocks(work: np.ndarray, m: int) -> list[tuple[int, int]]:
    """Queries ``0..m`` cut into runs whose pairs (``work``) and counts fit a block."""
    per_block = max(1, _CELLS_PER_BLOCK // max(1, m))
    blocks, q0, pairs = [], 0, 0
    for q in range(m):
        if q > q0 and (pairs + int(work[q]) > _PAIRS_PER_BLOCK or q - q0 >= per_block):
            blocks.append((q0, q))
            q0, pairs = q, 0
        pairs += int(work[q])
    if m:
        blocks.append((q0, m))
    return blocks


def _ranked(
    shared: np.ndarray,
    seen: int,
    scale: float,
    *,
    scales: np.ndarray,
    id_rank: np.ndarray,
    min_overlap: float,
    max_scale_change: float,
) -> np.ndarray:
    """The members that pass for a query (enough shared points, a scale change within the
    limit), best first (the larger share, then the lower image_id)."""
    if not np.isfinite(scale) or scale == 0:
        return np.empty(0, dtype=np.int64)
    js = np.flatnonzero(shared)
    overlap = shared[js] / seen
    other = scales[js]
    with np.errstate(divide="ignore", invalid="ignore"):
        change = np.maximum(scale / other, other / scale)
    good = (
        (overlap >= min_overlap) & np.isfinite(other) & (other != 0) & (change <= max_scale_change)
    )
    js, overlap = js[good], overlap[good]
    return js[np.lexsort((id_rank[js], -overlap))]


def _check(conf: PairsConf) -> None:
    problems = []
    if not 0 < conf.min_overlap <= 1:
        problems.append(f"--min-overlap is a fraction in (0, 1], not {conf.min_overlap}")
    if conf.max_scale_change < 1:
        problems.append(f"--max-scale-change is a ratio >= 1, not {conf.max_scale_change}")
    if conf.max_positives < 1:
        problems.append("--max-positives must be at least 1")
    problems += location_problems(sfm=conf.sfm, output=conf.output)
    raise_problems(problems)


def content_settings(conf: PairsConf) -> dict[str, Any]:
    """The settings that change the pairs (not where things lie, the export, --overwrite)."""
    return {
        "min_overlap": conf.min_overlap,
        "max_scale_change": conf.max_scale_change,
        "max_positives": conf.max_positives,
    }


def run(conf: PairsConf) -> str:
    """Mine the pairs of ``conf.sfm``; returns the output folder."""
    _check(conf)
    log_settings(logger, "pairs", conf)
    out = tables.resolve(conf.output)
    try:
        sfm = tables.SFM_OUTPUT.manifest(conf.sfm)
    except (OSError, ValueError) as err:
        raise ValueError(f"--sfm: {err}") from err
    settings = content_settings(conf)
    plan, _ = tables.PAIRS_OUTPUT.plan(out, {"sfm": sfm}, settings, overwrite=conf.overwrite)
    if plan == "skip":
        logger.info("%s is complete; skipping", out)
        if conf.export_pkl:  # asked for now: the same mining gives the same pairs
            storage.write_bytes(conf.export_pkl, cirtorch_pickle(*_mined(conf, sfm)))
        return out
    rows, positives = _mined(conf, sfm)
    tables.PAIRS_OUTPUT.unpublish(out)
    _write(out, rows, positives)
    if conf.export_pkl:
        storage.write_bytes(conf.export_pkl, cirtorch_pickle(rows, positives))
    details = _details(rows, positives)
    tables.PAIRS_OUTPUT.publish(out, inputs={"sfm": sfm}, settings=settings, details=details)
    logger.info(
        "pairs: %d queries with positives (of %d registered photos), %.1f positives each, "
        "%d clusters",
        details["queries"],
        details["registered"],
        details["mean_positives"],
        details["clusters"],
    )
    return out


_ROW_COLUMNS = ["image_id", "registered", "cluster_id", "model_id"]


def _mined(
    conf: PairsConf, sfm: tables.Manifest
) -> tuple[list[dict[str, Any]], dict[str, list[tuple[str, float]]]]:
    """The sfm output's photo rows (without their points) and the positives mined among its
    registered photos, their point ids read as one int64 array."""
    rows = tables.SFM_IMAGES.read_from(sfm, _ROW_COLUMNS).to_pylist()
    positives = _mine(
        _registered(sfm),
        min_overlap=conf.min_overlap,
        max_scale_change=conf.max_scale_change,
        max_positives=conf.max_positives,
    )
    return rows, positives


def _registered(sfm: tables.Manifest) -> _Registered:
    """The registered photos with 3D points of an sfm output, as columns (``_Registered``)."""
    table = tables.SFM_IMAGES.read_from(
        sfm, ["image_id", "model_id", "registered", "point3d_ids", "scale"]
    )
    lengths = pc.fill_null(pc.list_value_length(table["point3d_ids"]), 0)
    keep = pc.and_(
        pc.and_(pc.fill_null(table["registered"], False), pc.is_valid(table["model_id"])),
        pc.greater(lengths, 0),
    )
    table = table.filter(keep)
    lengths = pc.list_value_length(table["point3d_ids"]).to_numpy(zero_copy_only=False)
    points = pc.list_flatten(table["point3d_ids"]).to_numpy(zero_copy_only=False)
    return _Registered(
        image_ids=table["image_id"].to_pylist(),
        model_ids=table["model_id"].to_pylist(),
        scales=pc.fill_null(table["scale"], np.nan).to_numpy(zero_copy_only=False),
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        points=points.astype(np.int64, copy=False),
    )


def _write(
    out: str, rows: list[dict[str, Any]], positives: dict[str, list[tuple[str, float]]]
) -> None:
    """The pairs, the whitening pairs and the pool, through their specs."""
    info = {r["image_id"]: r for r in rows}
    queries = sorted(positives)
    pairs = {
        "query_id": queries,
        "positives": [[p for p, _ in positives[q]] for q in queries],
        "overlaps": [[o for _, o in positives[q]] for q in queries],
        "cluster_id": [info[q]["cluster_id"] for q in queries],
        "model_id": [info[q]["model_id"] for q in queries],
    }
    whitening = {"query_id": queries, "positive_id": [positives[q][0][0] for q in queries]}
    pooled = sorted(
        (r["image_id"], r["cluster_id"], r["model_id"] if r["registered"] else None)
        for r in rows
        if r["cluster_id"] is not None
    )
    pool = {
        "image_id": [i for i, _, _ in pooled],
        "cluster_id": [c for _, c, _ in pooled],
        "model_id": [m for _, _, m in pooled],
    }
    for spec, columns in (
        (tables.PAIRS, pairs),
        (tables.WHITENING_PAIRS, whitening),
        (tables.POOL, pool),
    ):
        spec.write(out, pa.table(columns, schema=spec.schema))


def _details(
    rows: list[dict[str, Any]], positives: dict[str, list[tuple[str, float]]]
) -> dict[str, Any]:
    """What the manifest says of the mining: photos, queries, clusters, positives each."""
    cluster_of = {r["image_id"]: r["cluster_id"] for r in rows}
    registered = sum(bool(r["registered"]) for r in rows)
    return {
        "photos": len(rows),
        "registered": registered,
        "queries": len(positives),
        "registered_without_positive": registered - len(positives),
        "clusters": len({cluster_of[q] for q in positives}),
        "mean_positives": float(sum(len(v) for v in positives.values()) / max(1, len(positives))),
    }


def cirtorch_pickle(rows: list[dict[str, Any]], positives: dict[str, list]) -> bytes:
    """cnnimageretrieval-pytorch's training pickle: every photo with a cluster as ``cids``,
    each query's best positive as ``pidxs``."""
    photos = sorted(r["image_id"] for r in rows if r["cluster_id"] is not None)
    index = {image_id: i for i, image_id in enumerate(photos)}
    cluster = {r["image_id"]: int(r["cluster_id"]) for r in rows if r["cluster_id"] is not None}
    queries = sorted(q for q in positives if q in index)
    layout = {
        "train": {
            "cids": photos,
            "cluster": [cluster[p] for p in photos],
            "qidxs": [index[q] for q in queries],
            "pidxs": [index[positives[q][0][0]] for q in queries],
        }
    }
    return pickle.dumps(layout, protocol=4)


if __name__ == "__main__":
    run_cli(run, PairsConf)
