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
"""

from __future__ import annotations

import logging
import pickle
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

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

    ``rows`` are registered photos of sfm_images (``image_id``, ``model_id``, ``point3d_ids``,
    ``scale``). Counting shared points goes through an inverted index (point → photos) per
    model, so its cost is the sum of the points' track lengths squared, not photos squared.
    """
    by_model: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row.get("model_id") is not None and row.get("point3d_ids"):
            by_model[row["model_id"]].append(row)
    positives: dict[str, list[tuple[str, float]]] = {}
    for members in by_model.values():
        seen_by: dict[int, list[int]] = defaultdict(list)
        for i, row in enumerate(members):
            for point in set(row["point3d_ids"]):
                seen_by[point].append(i)
        for i, query in enumerate(members):
            points = set(query["point3d_ids"])
            shared: Counter[int] = Counter()
            for point in points:
                shared.update(j for j in seen_by[point] if j != i)
            found = []
            for j, count in shared.items():
                overlap = count / len(points)
                if overlap < min_overlap:
                    continue
                a, b = query.get("scale"), members[j].get("scale")
                if not a or not b or max(a / b, b / a) > max_scale_change:
                    continue
                found.append((members[j]["image_id"], overlap))
            found.sort(key=lambda item: (-item[1], item[0]))
            if found:
                positives[query["image_id"]] = found[:max_positives]
    return positives


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


def _mined(
    conf: PairsConf, sfm: tables.Manifest
) -> tuple[list[dict[str, Any]], dict[str, list[tuple[str, float]]]]:
    """The sfm output's photo rows and the positives mined among its registered photos."""
    rows = tables.SFM_IMAGES.read_from(sfm).to_pylist()
    registered = [r for r in rows if r["registered"]]
    positives = mine_positives(
        registered,
        min_overlap=conf.min_overlap,
        max_scale_change=conf.max_scale_change,
        max_positives=conf.max_positives,
    )
    return rows, positives


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
