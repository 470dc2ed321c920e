"""Describing a retrieval set: inspect every photo first, describe the usable ones, report the rest.

The evaluate stage and the demo share this one path. Every check that needs no decoding runs
before the long work: missing files, unreadable headers, decompression bombs, boxes outside
their photo, photos too small for the network at the smallest scale. All of them are reported
together; then the database, the queries and the distractors are described, and photos that
fail only at decoding (a truncated JPEG) or give a non-finite descriptor join the report. The
set comes back restricted to the photos described, its ground truth renumbered to match.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import nn

from model.datasets.sets import Availability, RetrievalSet, subset
from model.descriptor_cache import DescriptorCache
from model.extraction import Extraction, ExtractOptions, ImageFiles, extract_multihead, too_small

if TYPE_CHECKING:
    from model.heads import Head

__all__ = ["DescribedSet", "describe_set", "inspect_images"]

logger = logging.getLogger(__name__)


@dataclass
class DescribedSet:
    """A set restricted to what could be described, with descriptors per head.

    ``db[head]`` has a row per ``rset.db_paths`` followed by a row per ``distractor_paths``;
    ``queries[head]`` a row per ``rset.query_paths``.
    """

    rset: RetrievalSet
    db: dict[str, np.ndarray]
    queries: dict[str, np.ndarray]
    availability: Availability
    distractor_paths: list[Path] = field(default_factory=list)
    extracted: dict[str, int] = field(default_factory=dict)

    @property
    def db_paths(self) -> list[Path]:
        return [*self.rset.db_paths, *self.distractor_paths]


def inspect_images(
    paths: Sequence[Path],
    boxes: Sequence | None,
    *,
    max_size: int | None,
    exif_transpose: bool,
    backbone: nn.Module,
    scales: Sequence[float],
) -> ImageFiles:
    """The photos' headers read and checked; ``failed`` holds every problem found so far."""
    images = ImageFiles(paths, max_size, boxes, exif_transpose=exif_transpose)
    images.failed.update(too_small(images, backbone, scales))
    return images


def describe_set(
    rset: RetrievalSet,
    backbone: nn.Module,
    heads: Mapping[str, Head],
    *,
    max_size: int | None,
    options: ExtractOptions,
    cache: DescriptorCache | None = None,
    root: Path | None = None,
    distractors: Sequence[Path] = (),
    distractor_root: Path | None = None,
) -> DescribedSet:
    """Inspect, then describe, the set's photos (through ``cache`` when given).

    ``root`` and ``distractor_root`` are the folders that cache keys are relative to.
    """
    inspect: dict[str, Any] = {
        "max_size": max_size,
        "exif_transpose": rset.exif_transpose,
        "backbone": backbone,
        "scales": options.scales,
    }
    db_files = inspect_images(rset.db_paths, None, **inspect)
    q_files = (
        db_files
        if rset.queries_are_database
        else inspect_images(rset.query_paths, rset.query_boxes, **inspect)
    )
    d_files = inspect_images(list(distractors), None, **inspect) if distractors else None

    availability = Availability(
        db_total=len(rset.db_paths),
        queries_total=len(rset.query_paths),
        distractors_total=len(distractors),
    )
    _record(availability, "db", db_files, failed=db_files.failed)
    _record(availability, "query", q_files, failed=q_files.failed)
    if d_files is not None:
        _record(availability, "distractor", d_files, failed=d_files.failed)
    if availability.problems() or availability.db_missing or availability.queries_missing:
        logger.warning("before describing: %s", availability.summary())

    def describe_chunk(part: ImageFiles) -> Extraction:  # the cache shows its own progress
        return extract_multihead(
            backbone, heads, part, options=dataclasses.replace(options, progress=False)
        )

    def run(role: str, images: ImageFiles, folder: Path | None) -> tuple[Extraction, int]:
        if cache is None:
            result = extract_multihead(backbone, heads, images, options=options)
            return result, len(result.indices)
        return cache.extract(
            role, images, folder or Path("/"), extract=describe_chunk, progress=options.progress
        )

    db_ext, n_db = run("db", db_files, root)
    _record(availability, "db", db_files, failed=_new(db_ext.failed, db_files.failed))
    if rset.queries_are_database:
        q_ext, n_q = db_ext, 0
        _record(availability, "query", q_files, failed=_new(db_ext.failed, db_files.failed))
    else:
        q_ext, n_q = run("query", q_files, root)
        _record(availability, "query", q_files, failed=_new(q_ext.failed, q_files.failed))
    extracted = {"db": n_db, "queries": n_q, "distractors": 0}

    db_keep = np.zeros(len(rset.db_paths), dtype=bool)
    db_keep[db_ext.indices] = True
    used = subset(rset, db_keep, q_ext.indices.tolist())
    keep_db = np.flatnonzero(db_keep)
    if rset.queries_are_database:  # a photo left both roles when either failed
        keep_db = np.intersect1d(keep_db, q_ext.indices)
    db = {h: _rows(db_ext, h, keep_db, heads=heads) for h in heads}
    queries = (
        db
        if rset.queries_are_database
        else {h: _rows(q_ext, h, q_ext.indices, heads=heads) for h in heads}
    )

    distractor_paths: list[Path] = []
    if d_files is not None:
        d_ext, extracted["distractors"] = run("distractors", d_files, distractor_root)
        _record(availability, "distractor", d_files, failed=_new(d_ext.failed, d_files.failed))
        distractor_paths = [d_files.paths[i] for i in d_ext.indices.tolist()]
        db = {
            h: np.concatenate([db[h], _rows(d_ext, h, d_ext.indices, heads=heads)]) for h in heads
        }
    return DescribedSet(used, db, queries, availability, distractor_paths, extracted)


def _new(failed: Mapping[int, str], known: Mapping[int, str]) -> dict[int, str]:
    return {i: reason for i, reason in failed.items() if i not in known}


def _rows(
    result: Extraction, head: str, wanted: np.ndarray, *, heads: Mapping[str, Head]
) -> np.ndarray:
    """The rows of ``result`` for input indices ``wanted`` (all of them described)."""
    vectors = result.descriptors.get(head)
    if vectors is None:
        return np.empty((0, heads[head].out_dim), np.float32)
    position = np.searchsorted(result.indices, wanted)
    return vectors[position]


def _record(
    availability: Availability, role: str, images: ImageFiles, *, failed: Mapping[int, str]
) -> None:
    missing = {"db": availability.db_missing, "query": availability.queries_missing}.get(role)
    unusable = {
        "db": availability.db_unusable,
        "query": availability.queries_unusable,
        "distractor": availability.distractors_unusable,
    }[role]
    for index, reason in failed.items():
        path = images.paths[index]
        if missing is not None and not path.is_file():
            missing.append(path.name)
        else:
            unusable[str(path)] = reason
