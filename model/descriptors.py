"""The descriptor table that the extract stage writes and the index stage (and others) read.

The table is ``model.tables.DESCRIPTORS`` (``image_id``, ``vector``: float32, L2-normalised,
null for a photo the extraction could not describe, ``error``: null or why), in the output of
``model.tables.DESCRIPTORS_OUTPUT``, whose manifest is published last: a folder without it is
unfinished. Its ``details`` say what made the vectors (``network``, ``settings``, ``dim``) and
the counts. Reading is vectorised and imports no torch, so an index build over a million rows
stays quick and light.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from model import tables
from model.tables import DESCRIPTORS, DESCRIPTORS_OUTPUT, Manifest

__all__ = [
    "Descriptors",
    "problem_text",
    "read_descriptors",
    "read_descriptors_checked",
    "write_descriptors",
]

logger = logging.getLogger(__name__)

_NORM_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Descriptors:
    """The described rows of a descriptors output (failed photos left out and counted)."""

    uri: str
    """The output folder."""
    image_ids: np.ndarray
    """object ``[N]`` of str."""
    vectors: np.ndarray
    """float32 ``[N, dim]``."""
    manifest: dict[str, Any]
    """The manifest's ``details``: ``network``, ``settings``, ``dim``, ``count``, ``failed``."""
    failed: int = 0
    """Rows without a vector (photos the extraction could not describe)."""
    files: list[str] = field(default_factory=list)
    output: Manifest | None = None
    """The output's manifest: what a later stage passes as its input."""

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def identity(self) -> str:
        """The output's identity (what a later stage fingerprints)."""
        return self.output.identity if self.output is not None else ""


def write_descriptors(
    uri: str,
    image_ids: Sequence[str],
    vectors: np.ndarray,
    *,
    network: dict[str, Any] | None = None,
    settings: dict[str, Any] | None = None,
    rows_per_file: int = 250_000,
) -> str:
    """Write vectors computed anywhere as a descriptors output this stage (and others) read.

    Rows are written as given (normalise them first), then the manifest is published with
    ``network`` and ``settings`` in its details (and the network, digested, as its input).
    Returns the output folder.
    """
    X = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
    ids = [str(i) for i in image_ids]
    if X.ndim != 2 or len(ids) != X.shape[0]:
        raise ValueError(f"need [n, dim] vectors for n image_ids, got {list(X.shape)}, {len(ids)}")
    base = tables.resolve(uri)
    DESCRIPTORS_OUTPUT.clear(base)  # a reader sees it incomplete meanwhile
    for part, start in enumerate(range(0, max(len(ids), 1), rows_per_file)):
        stop = min(start + rows_per_file, len(ids))
        table = pa.table(
            {
                "image_id": pa.array(ids[start:stop], type=pa.string()),
                "vector": pa.FixedSizeListArray.from_arrays(
                    pa.array(X[start:stop].reshape(-1)), X.shape[1]
                ),
                "error": pa.nulls(stop - start, type=pa.string()),
            }
        )
        DESCRIPTORS.write(base, table, part=f"part-{part:05d}")
    described_by = network if network is not None else {"name": "external"}
    DESCRIPTORS_OUTPUT.publish(
        base,
        inputs={"network": json.dumps(described_by, sort_keys=True, default=str)},
        settings=settings or {},
        details={
            "dim": int(X.shape[1]),
            "count": len(ids),
            "failed": [],
            "network": described_by,
            "settings": settings or {},
        },
    )
    return base


def read_descriptors(uri: str) -> Descriptors:
    """The described rows of a complete descriptors output; ``ValueError`` listing every
    problem."""
    problems: list[str] = []
    descriptors = read_descriptors_checked(uri, problems)
    if problems or descriptors is None:
        raise ValueError(problem_text(f"cannot read descriptors at {uri}", problems))
    return descriptors


def read_descriptors_checked(uri: str, problems: list[str]) -> Descriptors | None:
    """The descriptors at ``uri``, every problem found appended to ``problems``."""
    manifest = _manifest(uri, problems)
    if manifest is None:
        return None
    folder = manifest.uri.rsplit("/", 1)[0]
    try:
        table = DESCRIPTORS.read_from(manifest)
    except ValueError as err:
        problems.append(str(err))
        return None
    good = table.filter(pc.and_(pc.is_valid(table["vector"]), pc.is_null(table["error"])))
    vectors = _vector_matrix(good["vector"], folder, problems)
    if vectors is None:
        return None
    image_ids = np.asarray(good["image_id"].to_pylist(), dtype=object)
    found = len(problems)
    _check_dim(vectors, manifest.details, problems)
    _check_count(len(image_ids), manifest.details, problems)
    _check_ids(image_ids, folder, problems)
    _check_finite(image_ids, vectors, problems)
    if len(problems) > found:
        return None
    _warn_unnormalised(vectors)
    return Descriptors(
        uri=folder,
        image_ids=image_ids,
        vectors=vectors,
        manifest=manifest.details,
        failed=table.num_rows - good.num_rows,
        files=DESCRIPTORS.files(manifest),
        output=manifest,
    )


def _manifest(uri: str, problems: list[str]) -> Manifest | None:
    """The output's manifest, checked to say what made the vectors."""
    try:
        manifest = DESCRIPTORS_OUTPUT.manifest(uri)
    except (FileNotFoundError, ValueError) as err:
        problems.append(str(err))
        return None
    lacking = [key for key in ("dim", "network") if key not in manifest.details]
    if lacking:
        problems.append(f"the descriptors manifest {manifest.uri} lacks {', '.join(lacking)}")
        return None
    return manifest


def _vector_matrix(column: pa.ChunkedArray, where: str, problems: list[str]) -> np.ndarray | None:
    """The vectors as float32 ``[rows, dim]``; a problem when their lengths differ."""
    array = column.combine_chunks()
    lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False)
    dims = np.unique(lengths)
    if len(dims) > 1:
        counts = ", ".join(f"{int(d)} ({int((lengths == d).sum())} rows)" for d in dims[:5])
        problems.append(f"mixed dimensions in the descriptors at {where}: {counts}")
        return None
    dim = int(dims[0]) if len(array) else 0
    values = pc.list_flatten(array).to_numpy(zero_copy_only=False)
    return values.astype(np.float32, copy=False).reshape(len(array), dim)


def _check_dim(vectors: np.ndarray, details: dict[str, Any], problems: list[str]) -> None:
    expected = int(details["dim"])
    if len(vectors) and vectors.shape[1] != expected:
        problems.append(
            f"mixed dimensions: the manifest says {expected}, the parts hold {vectors.shape[1]}"
        )


def _check_count(found: int, details: dict[str, Any], problems: list[str]) -> None:
    count = details.get("count")
    if count is not None and int(count) != found:
        problems.append(
            f"the descriptors manifest counts {int(count)} vectors but the part files hold "
            f"{found}: the folder changed after extraction; extract again"
        )
    if found == 0:
        problems.append("the descriptors hold no vectors")


def _check_ids(image_ids: np.ndarray, where: str, problems: list[str]) -> None:
    nameless = np.array([i is None or i == "" for i in image_ids], dtype=bool)
    if nameless.any():
        problems.append(f"{int(nameless.sum())} descriptor rows at {where} have no image_id")
        return
    unique, counts = np.unique(image_ids.astype(str), return_counts=True)
    repeated = unique[counts > 1]
    if len(repeated):
        problems.append(
            f"{len(repeated)} image_id(s) appear more than once in the descriptors, "
            f"e.g. {_examples(repeated)}"
        )


def _check_finite(image_ids: np.ndarray, vectors: np.ndarray, problems: list[str]) -> None:
    bad = ~np.isfinite(vectors).all(axis=1)
    if bad.any():
        problems.append(
            f"{int(bad.sum())} descriptor rows have non-finite values (NaN or inf), "
            f"e.g. {_examples(image_ids[bad])}"
        )


def _warn_unnormalised(vectors: np.ndarray) -> None:
    """Inner-product search ranks vectors by length too: say so when they are not unit."""
    if not len(vectors):
        return
    norms = np.linalg.norm(vectors, axis=1)
    off = np.abs(norms - 1) > _NORM_TOLERANCE
    if off.any():
        logger.warning(
            "%d descriptor rows are not L2-normalised (norms %.3g..%.3g); inner product "
            "ranks them by length too",
            int(off.sum()),
            float(norms.min()),
            float(norms.max()),
        )


def _examples(values: Sequence[Any], limit: int = 3) -> str:
    shown = ", ".join(repr(str(v)) for v in list(values)[:limit])
    return shown + (", ..." if len(values) > limit else "")


def problem_text(head: str, problems: list[str]) -> str:
    """One problem on one line; several as a heading line and one line each (the command line
    prints each as its own ``error:`` line)."""
    if len(problems) == 1:
        return f"{head}: {problems[0]}"
    listed = "\n".join(f"({i}) {p}" for i, p in enumerate(problems, 1))
    return f"{head}: {len(problems)} problems:\n{listed}"
