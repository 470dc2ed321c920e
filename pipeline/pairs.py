"""The pairs stage: positive training pairs from the 3D models, as the GeM paper mines them.

    python -m pipeline.pairs --sfm OUT/sfm --output OUT/pairs

For each registered photo as a query, its positive candidates are the photos of the same model
that observe at least ``--min-overlap`` (t_i, 0.2) of the query's 3D points with a scale change
of at most ``--max-scale-change`` (t_s, 1.5): the paper's relaxed inliers, views of the same
surface at a similar scale, so the pair is visibly the same place and not trivially the same
photo. Training draws one of them at random each epoch (``train``). Each photo keeps its cluster
(its SfM group): negatives are taken from other clusters only.

Output ``PAIRS/``: ``pairs.parquet`` (query_id, positives (list of image_id, best first),
overlaps (the shared fraction of each), cluster_id, model_id); ``whitening_pairs.parquet``
(query_id, positive_id: each query with its most overlapping positive, for learned whitening);
``pool.parquet`` (image_id, cluster_id, model_id: every photo with a cluster, the negative
pool of training, with its 3D model where it is registered); ``manifest.json`` with the
settings and counts; ``_SUCCESS`` last.
``--export-pkl FILE`` writes the same pairs in cnnimageretrieval-pytorch's layout
(``{"train": {"cids", "cluster", "qidxs", "pidxs"}}``, one positive per query, image ids as
``cids``), so its users can train on them.
"""

from __future__ import annotations

import io
import json
import logging
import pickle
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from typing import Any

from model import storage
from model.cli import location_problems, run_cli

__all__ = [
    "PAIRS_FILE",
    "POOL_FILE",
    "WHITENING_PAIRS_FILE",
    "PairsConf",
    "mine_positives",
    "read_pairs",
    "run",
]

logger = logging.getLogger(__name__)

PAIRS_FILE = "pairs.parquet"
WHITENING_PAIRS_FILE = "whitening_pairs.parquet"
POOL_FILE = "pool.parquet"


@dataclass(frozen=True)
class PairsConf:
    """Settings of the pair mining; every field is a command-line flag."""

    sfm: str
    """The folder written by pipeline.sfm."""
    output: str
    min_overlap: float = 0.2
    """t_i: the share of the query's 3D points a positive must also observe."""
    max_scale_change: float = 1.5
    """t_s: the largest ratio of the two photos' observation scales."""
    max_positives: int = 100
    """Keep this many positive candidates per query (the most overlapping)."""
    export_pkl: str | None = None
    """Also write cnnimageretrieval-pytorch's .pkl layout here."""


def mine_positives(
    rows: list[dict[str, Any]], min_overlap: float, max_scale_change: float, max_positives: int
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
    if problems:
        raise ValueError("\n".join(problems))


def run(conf: PairsConf) -> str:
    """Mine the pairs of ``conf.sfm``; returns the URI of pairs.parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.sfm import read_sfm_images

    _check(conf)
    out = conf.output.rstrip("/")
    target = storage.join(out, PAIRS_FILE)
    if storage.is_complete(out):
        logger.info("%s is complete; skipping", out)
        return target
    table = read_sfm_images(conf.sfm)
    rows = table.to_pylist()
    info = {r["image_id"]: r for r in rows}
    positives = mine_positives(
        [r for r in rows if r["registered"]],
        conf.min_overlap,
        conf.max_scale_change,
        conf.max_positives,
    )
    queries = sorted(positives)
    pairs = pa.table(
        {
            "query_id": pa.array(queries, pa.string()),
            "positives": pa.array([[p for p, _ in positives[q]] for q in queries],
                                  pa.list_(pa.string())),
            "overlaps": pa.array([[o for _, o in positives[q]] for q in queries],
                                 pa.list_(pa.float32())),
            "cluster_id": pa.array([info[q]["cluster_id"] for q in queries], pa.int64()),
            "model_id": pa.array([info[q]["model_id"] for q in queries], pa.string()),
        }
    )  # fmt: skip
    whitening = pa.table(
        {
            "query_id": pa.array(queries, pa.string()),
            "positive_id": pa.array([positives[q][0][0] for q in queries], pa.string()),
        }
    )
    pooled = sorted((r["image_id"], r["cluster_id"], r["model_id"] if r["registered"] else None)
                    for r in rows if r["cluster_id"] is not None)  # fmt: skip
    pool = pa.table(
        {
            "image_id": pa.array([i for i, _, _ in pooled], pa.string()),
            "cluster_id": pa.array([c for _, c, _ in pooled], pa.int64()),
            "model_id": pa.array([m for _, _, m in pooled], pa.string()),
        }
    )
    for name, data in (
        (PAIRS_FILE, pairs),
        (WHITENING_PAIRS_FILE, whitening),
        (POOL_FILE, pool),
    ):
        sink = io.BytesIO()
        pq.write_table(data, sink)
        storage.write_bytes(storage.join(out, name), sink.getvalue())
    if conf.export_pkl:
        storage.write_bytes(conf.export_pkl, cirtorch_pickle(rows, positives))
    registered = sum(bool(r["registered"]) for r in rows)
    manifest = {
        "format": 1,
        "settings": asdict(conf),
        "photos": len(rows),
        "registered": registered,
        "queries": len(queries),
        "registered_without_positive": registered - len(queries),
        "clusters": len({info[q]["cluster_id"] for q in queries}),
        "mean_positives": float(sum(len(v) for v in positives.values()) / max(1, len(queries))),
    }
    storage.write_text(storage.join(out, "manifest.json"), json.dumps(manifest, indent=2))
    storage.write_text(storage.join(out, storage.SUCCESS), "")
    logger.info(
        "pairs: %d queries with positives (of %d registered photos), %.1f positives each, "
        "%d clusters",
        len(queries),
        registered,
        manifest["mean_positives"],
        manifest["clusters"],
    )
    return target


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


def read_pairs(uri: str) -> Any:
    """``pairs.parquet`` of a complete pairs output as a pyarrow Table."""
    import pyarrow.parquet as pq

    folder = uri.rstrip("/").removesuffix(f"/{PAIRS_FILE}")
    if not storage.is_complete(folder):
        raise ValueError(f"{folder} is not a complete pairs output (no {storage.SUCCESS})")
    return pq.read_table(io.BytesIO(storage.read_bytes(storage.join(folder, PAIRS_FILE))))


if __name__ == "__main__":
    run_cli(run, PairsConf)
