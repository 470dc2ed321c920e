"""The group stage: candidate scenes for Structure-from-Motion.

    python -m pipeline.group --images OUT/images.parquet --descriptors OUT/descriptors \\
        --output OUT/groups

SfM reconstructs one group of photos at a time, so a collection must first be split into
groups that each hold one scene, whole. Where ingest gave every usable photo a ``scene``, that
is the grouping. Otherwise the off-the-shelf descriptors decide (``model.clustering``): a
k-nearest-neighbour graph from a FAISS index (exact Flat up to ``--flat-max`` photos, IVF
beyond: never an N×N matrix), components of its mutual edges at cosine similarity
``--threshold`` or more, leaves attached. A component over ``--max-size`` photos is grouped
again inside itself at a threshold raised step by step until every part fits (a dense scene
splits into views before it stops at ``--max-threshold``; what is still too big is cut along
its principal direction). Photos that join nothing stay singletons (``group_id`` -1).

A global descriptor often cannot tell which of two look-alike scenes a leftover photo (a
singleton, or one of a group under ``--attach-below`` photos) belongs to, but geometry can. So
each leftover is also offered to its ``--attach-k`` most similar groups (the mean of its
``--attach-top`` best similarities to a group's photos, at least ``--attach-threshold``): the sfm
stage reconstructs it with each of them and keeps the model that registers it.

Output ``GROUPS/``: the ``tables.GROUPS`` table (``image_id``, ``group_id``), one row per usable
described photo; ``tables.CANDIDATES`` (``image_id``, ``group_id``, ``similarity``), the
leftovers' offers; then the manifest (``tables.GROUPS_OUTPUT``), whose details hold the method,
group sizes, singletons, photos without a descriptor, and purity/recall against the ``scene``
column when there is one. A rerun with the same inputs and settings skips; new photos or new
descriptors upstream group again; other settings stop with a line naming them, unless
``--overwrite``. Torch-free (SfM workers must never import torch).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cluster.resources import use_reserved_threads
from model import tables
from model.cli import location_problems, log_settings, run_cli
from model.clustering import (
    DEFAULT_K,
    DEFAULT_THRESHOLD,
    cluster_scores,
    group_descriptors,
    relabel_by_size,
)
from model.descriptors import Descriptors, read_descriptors
from model.settings import raise_problems

__all__ = [
    "GroupConf",
    "attach_candidates",
    "content_settings",
    "knn_graph",
    "run",
    "split_large",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GroupConf:
    """Settings of one grouping; every field is a command-line flag."""

    images: str
    """The output of pipeline.ingest (a path or s3:// URI)."""
    descriptors: str
    """The output of pipeline.extract."""
    output: str
    """Folder or s3:// prefix for the groups and their manifest."""
    use_scene: bool = True
    """Use the scene column when every usable photo has one (--no-use-scene: group by
    descriptors anyway, and score the result against the scenes)."""
    k: int = DEFAULT_K
    threshold: float = DEFAULT_THRESHOLD
    """Cosine similarity of a mutual kNN edge (0.75 suits ImageNet Lite0 + GeM)."""
    max_size: int = 300
    """Largest group handed to SfM; bigger components are grouped again at higher thresholds."""
    max_threshold: float = 0.95
    threshold_step: float = 0.02
    flat_max: int = 200_000
    """Exact kNN (IndexFlatIP) up to this many photos, IVF beyond."""
    attach_below: int = 3
    """Groups with fewer photos count as leftovers, offered to larger groups (0: none)."""
    attach_k: int = 2
    """Groups each leftover is offered to."""
    attach_top: int = 3
    """A leftover's similarity to a group: the mean of its best this many to the group."""
    attach_threshold: float = 0.6
    attach_neighbours: int = 64
    """Nearest grouped photos searched per leftover (bounds the work at any N)."""
    overwrite: bool = False
    """Replace an output made with other settings (else the run stops, naming them)."""


def knn_graph(
    vectors: np.ndarray, k: int, flat_max: int = 200_000
) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``k`` nearest rows (itself among them) from FAISS: ``(sims, idx)`` ``[N, k+1]``.

    Exact inner product up to ``flat_max`` rows; beyond, IVF-Flat with about 4·√N lists, 32 of
    them probed: memory O(N·k), never N×N.
    """
    return _nearest(vectors, vectors, k + 1, flat_max=flat_max)


def _nearest(
    base: np.ndarray, queries: np.ndarray, k: int, *, flat_max: int
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest rows of ``base`` to each query (see ``knn_graph``), on as many
    threads as this process has CPUs for (``OMP_NUM_THREADS=1`` on autoscaled nodes)."""
    use_reserved_threads()
    x = np.ascontiguousarray(base, dtype=np.float32)
    n, dim = x.shape
    if n <= flat_max:
        index = faiss.IndexFlatIP(dim)
    else:
        nlist = 1 << max(4, round(math.log2(4 * math.sqrt(n))))
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(0)
        index.train(x[rng.choice(n, min(n, 64 * nlist), replace=False)])
        index.nprobe = 32
    index.add(x)
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, n))


def attach_candidates(
    x: np.ndarray, labels: np.ndarray, conf: GroupConf
) -> list[tuple[int, int, float]]:
    """``(row, group, similarity)``: each leftover row's offers to groups (see the docstring).

    Leftovers are rows of label -1 or of groups under ``conf.attach_below`` photos; a
    leftover's similarity to a group is the mean of its ``attach_top`` best similarities among
    its ``attach_neighbours`` nearest grouped photos.
    """
    if conf.attach_below <= 0 or not (labels >= 0).any():
        return []
    sizes = np.bincount(labels[labels >= 0])
    targets = (labels >= 0) & (sizes[np.maximum(labels, 0)] >= conf.attach_below)
    leftovers = np.flatnonzero(~targets)
    base = np.flatnonzero(targets)
    if not len(leftovers) or not len(base):
        return []
    sims, idx = _nearest(x[base], x[leftovers], conf.attach_neighbours, flat_max=conf.flat_max)
    offers = []
    for row, row_sims, row_idx in zip(leftovers.tolist(), sims, idx, strict=True):
        best: dict[int, list[float]] = {}
        for sim, j in zip(row_sims.tolist(), row_idx.tolist(), strict=True):
            if j >= 0:  # sorted by similarity, so the first attach_top of a group are its best
                group_sims = best.setdefault(int(labels[base[j]]), [])
                if len(group_sims) < conf.attach_top:
                    group_sims.append(sim)
        scored = sorted(((float(np.mean(v)), g) for g, v in best.items()), reverse=True)
        offers += [
            (row, g, sim) for sim, g in scored[: conf.attach_k] if sim >= conf.attach_threshold
        ]
    return offers


def _regroup(x: np.ndarray, conf: GroupConf, threshold: float) -> np.ndarray:
    sims, idx = knn_graph(x, conf.k, conf.flat_max)
    return group_descriptors(neighbours=(sims, idx), k=conf.k, threshold=threshold)


def split_large(x: np.ndarray, labels: np.ndarray, conf: GroupConf) -> np.ndarray:
    """Labels where no group has more than ``conf.max_size`` members (see the docstring)."""
    out = labels.copy()
    next_id = int(out.max()) + 1 if out.size else 0
    queue = [(g, conf.threshold) for g in np.unique(out[out >= 0])]
    while queue:
        group, threshold = queue.pop()
        rows = np.flatnonzero(out == group)
        if len(rows) <= conf.max_size:
            continue
        higher = threshold + conf.threshold_step
        if higher <= conf.max_threshold + 1e-9:
            inner = _regroup(x[rows], conf, higher)
        else:  # still too big at the highest threshold: cut along its principal direction
            centred = x[rows] - x[rows].mean(axis=0)
            direction = np.linalg.svd(centred, full_matrices=False)[2][0]
            order = np.argsort(centred @ direction, kind="stable")
            inner = np.empty(len(rows), np.int64)
            inner[order] = np.arange(len(rows)) // conf.max_size
        for part in np.unique(inner):
            members = rows[inner == part]
            if part < 0 or len(members) == 1:
                out[members] = -1  # left alone at the higher threshold
                continue
            out[members] = next_id
            queue.append((next_id, higher))
            next_id += 1
    return _singletons_apart(out)


def _singletons_apart(labels: np.ndarray) -> np.ndarray:
    """Group ids 0..G-1 by size (largest first); groups of one become -1 (singletons)."""
    return relabel_by_size(labels, min_size=2)


def _check(conf: GroupConf) -> None:
    problems = []
    if conf.k < 1:
        problems.append(f"--k must be at least 1, not {conf.k}")
    if not -1 <= conf.threshold <= 1:
        problems.append(f"--threshold is a cosine similarity in [-1, 1], not {conf.threshold}")
    if conf.max_size < 2:
        problems.append(f"--max-size must be at least 2, not {conf.max_size}")
    if conf.threshold_step <= 0:
        problems.append("--threshold-step must be positive")
    if conf.attach_k < 1 or conf.attach_top < 1 or conf.attach_neighbours < 1:
        problems.append("--attach-k, --attach-top and --attach-neighbours must be at least 1")
    problems += location_problems(
        images=conf.images, descriptors=conf.descriptors, output=conf.output
    )
    raise_problems(problems)


def content_settings(conf: GroupConf) -> dict[str, Any]:
    """The settings that change the grouping (not where things lie, nor --overwrite)."""
    where = {"images", "descriptors", "output", "overwrite"}
    return {k: v for k, v in asdict(conf).items() if k not in where}


def _read_inputs(
    conf: GroupConf, images: tables.Manifest
) -> tuple[dict[str, str | None], Descriptors]:
    """The usable photos' scenes (first row of each image_id) and the descriptors."""
    problems = []
    try:
        rows = tables.IMAGES.read_from(
            images, ["image_id", "scene"], filter=pc.field("error").is_null()
        )
    except (OSError, ValueError) as err:
        problems.append(f"--images: {err}")
    try:
        descriptors = read_descriptors(conf.descriptors)
    except (OSError, ValueError) as err:
        problems.append(f"--descriptors: {err}")
    raise_problems(problems)
    scene_of: dict[str, str | None] = {}
    for image_id, scene in zip(
        rows.column("image_id").to_pylist(), rows.column("scene").to_pylist(), strict=True
    ):
        scene_of.setdefault(image_id, scene)
    return scene_of, descriptors


@dataclass(frozen=True)
class _Grouping:
    """Each described photo's group, the leftovers' offers (rows of ``ids``), how, and the
    photos' scenes (to score the grouping against)."""

    ids: list[str]
    labels: np.ndarray
    offers: list[tuple[int, int, float]]
    method: str
    scenes: list[str | None]


def _group(
    conf: GroupConf, scene_of: dict[str, str | None], descriptors: Descriptors
) -> tuple[_Grouping, list[str]]:
    """The grouping of the described photos, and the photos without a descriptor."""
    row_of = {image_id: i for i, image_id in enumerate(descriptors.image_ids.tolist())}
    ids = [i for i in scene_of if i in row_of]
    undescribed = sorted(i for i in scene_of if i not in row_of)
    if not ids:
        raise ValueError(f"no photo of {conf.images} has a descriptor in {conf.descriptors}")
    scenes = [scene_of[i] for i in ids]
    if conf.use_scene and all(s is not None for s in scenes):
        names = sorted(set(scenes))
        labels = _singletons_apart(np.array([names.index(s) for s in scenes], np.int64))
        return _Grouping(ids, labels, [], "scene column", scenes), undescribed
    x = descriptors.vectors[[row_of[i] for i in ids]]
    sims, idx = knn_graph(x, conf.k, conf.flat_max)
    labels = group_descriptors(neighbours=(sims, idx), k=conf.k, threshold=conf.threshold)
    labels = split_large(x, labels, conf)
    offers = attach_candidates(x, labels, conf)
    return _Grouping(ids, labels, offers, "descriptors: mutual kNN components", scenes), undescribed


def _details(grouping: _Grouping, undescribed: list[str]) -> dict[str, Any]:
    """What the manifest says of the grouping: sizes, singletons, offers, scores."""
    labels = grouping.labels
    sizes = np.bincount(labels[labels >= 0]) if (labels >= 0).any() else np.zeros(0, np.int64)
    details: dict[str, Any] = {
        "method": grouping.method,
        "photos": len(grouping.ids),
        "groups": len(sizes),
        "group_sizes": sizes.tolist(),
        "singletons": [i for i, g in zip(grouping.ids, labels.tolist(), strict=True) if g < 0],
        "undescribed": undescribed,
        "candidates": len(grouping.offers),
        "leftovers_offered": len({row for row, _, _ in grouping.offers}),
    }
    if grouping.method != "scene column" and all(s is not None for s in grouping.scenes):
        details["scores"] = cluster_scores(labels, np.array(grouping.scenes, dtype=object))
    return details


def _write(out: str, grouping: _Grouping) -> None:
    """groups and candidates, through their specs (the manifest comes after)."""
    ids, offers = grouping.ids, grouping.offers
    groups = {"image_id": ids, "group_id": grouping.labels}
    candidates = {
        "image_id": [ids[row] for row, _, _ in offers],
        "group_id": [g for _, g, _ in offers],
        "similarity": [s for _, _, s in offers],
    }
    tables.GROUPS.write(out, pa.table(groups, schema=tables.GROUPS.schema))
    tables.CANDIDATES.write(out, pa.table(candidates, schema=tables.CANDIDATES.schema))


def _log(details: dict[str, Any]) -> None:
    scores = details.get("scores")
    logger.info(
        "%d photos into %d groups by %s (%d singletons, %d without a descriptor, "
        "%d leftovers offered to other groups)%s",
        details["photos"],
        details["groups"],
        details["method"],
        len(details["singletons"]),
        len(details["undescribed"]),
        details["leftovers_offered"],
        f"; purity {scores['purity']:.3f}, recall {scores['recall']:.3f}" if scores else "",
    )


def run(conf: GroupConf) -> str:
    """Group the photos of ``conf.images``; returns the output folder."""
    _check(conf)
    log_settings(logger, "group", conf)
    out = tables.resolve(conf.output)
    inputs = tables.upstream(
        images=(tables.IMAGES_OUTPUT, conf.images),
        descriptors=(tables.DESCRIPTORS_OUTPUT, conf.descriptors),
    )
    images = inputs["images"]
    settings = content_settings(conf)
    plan, _ = tables.GROUPS_OUTPUT.plan(out, inputs, settings, overwrite=conf.overwrite)
    if plan == "skip":
        logger.info("%s is complete; skipping", out)
        return out
    scene_of, vectors = _read_inputs(conf, images)
    grouping, undescribed = _group(conf, scene_of, vectors)
    details = _details(grouping, undescribed)
    tables.GROUPS_OUTPUT.unpublish(out)
    _write(out, grouping)
    tables.GROUPS_OUTPUT.publish(out, inputs=inputs, settings=settings, details=details)
    _log(details)
    return out


if __name__ == "__main__":
    run_cli(run, GroupConf)
