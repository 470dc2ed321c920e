"""The descriptor table that the extract stage writes and the index stage (and others) read.

``DESC/`` holds Parquet part files with ``image_id`` (string), ``vector`` (fixed-size list of
float32, L2-normalised; null for a photo the extraction could not describe) and ``error``
(null, or why), then ``DESC/manifest.json`` (network, settings, dimension, counts) and
``_SUCCESS``, written last: a folder without the marker is unfinished. Reading is vectorised
and imports no torch, so an index build over a million rows stays quick and light.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from model import storage

__all__ = [
    "DESCRIPTOR_MANIFEST",
    "Descriptors",
    "problem_text",
    "read_descriptors",
    "read_descriptors_checked",
    "write_descriptors",
]

logger = logging.getLogger(__name__)

DESCRIPTOR_MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Descriptors:
    """The described rows of a descriptors folder (failed photos left out and counted)."""

    uri: str
    image_ids: np.ndarray
    """object ``[N]`` of str."""
    vectors: np.ndarray
    """float32 ``[N, dim]``."""
    manifest: dict[str, Any]
    failed: int = 0
    """Rows without a vector (photos the extraction could not describe)."""
    files: list[str] = field(default_factory=list)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])


def write_descriptors(
    uri: str,
    image_ids: Sequence[str],
    vectors: np.ndarray,
    network: dict[str, Any] | None = None,
    settings: dict[str, Any] | None = None,
    rows_per_file: int = 250_000,
) -> str:
    """Write vectors computed anywhere as a descriptors folder this stage (and others) read.

    The format ``pipeline.extract`` writes: Parquet parts with ``image_id``, ``vector``
    (fixed-size float32 list) and ``error`` (null), then ``manifest.json`` and ``_SUCCESS``
    last. Rows are written as given (normalise them first). Returns ``uri``.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    X = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
    ids = [str(i) for i in image_ids]
    if X.ndim != 2 or len(ids) != X.shape[0]:
        raise ValueError(f"need [n, dim] vectors for n image_ids, got {list(X.shape)}, {len(ids)}")
    base = uri.rstrip("/")
    for marker in (storage.SUCCESS, DESCRIPTOR_MANIFEST):  # a reader sees it incomplete meanwhile
        storage.remove(storage.join(base, marker))
    files = []
    for part, start in enumerate(range(0, max(len(ids), 1), rows_per_file)):
        stop = min(start + rows_per_file, len(ids))
        column = pa.FixedSizeListArray.from_arrays(pa.array(X[start:stop].reshape(-1)), X.shape[1])
        table = pa.table(
            {
                "image_id": pa.array(ids[start:stop], type=pa.string()),
                "vector": column,
                "error": pa.nulls(stop - start, type=pa.string()),
            }
        )
        sink = io.BytesIO()
        pq.write_table(table, sink)
        name = f"part-{part:05d}.parquet"
        storage.write_bytes(storage.join(base, name), sink.getvalue())
        files.append(name)
    manifest = {
        "format": 1,
        "dim": int(X.shape[1]),
        "count": len(ids),
        "failed": [],
        "network": network if network is not None else {"name": "external"},
        "settings": settings or {},
        "files": files,
    }
    storage.write_text(storage.join(base, DESCRIPTOR_MANIFEST), json.dumps(manifest, indent=2))
    storage.write_text(storage.join(base, storage.SUCCESS), "")
    return base


def _vector_rows(column: Any, name: str, problems: list[str]) -> tuple[np.ndarray, int] | None:
    """``(values [rows, dim], dim)`` of a list column without nulls; problems when it is not."""
    import pyarrow as pa
    import pyarrow.compute as pc

    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    kind = array.type
    if not (pa.types.is_fixed_size_list(kind) or pa.types.is_list(kind)):
        problems.append(f"{name}: column vector is {kind}, not a list of float32")
        return None
    if not pa.types.is_floating(kind.value_type):
        problems.append(f"{name}: column vector holds {kind.value_type}, not float32")
        return None
    rows = len(array)
    if pa.types.is_fixed_size_list(kind):
        dim = kind.list_size
    else:
        lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False)
        dims = np.unique(lengths)
        if len(dims) > 1:
            counts = ", ".join(f"{int(d)} ({int((lengths == d).sum())} rows)" for d in dims[:5])
            problems.append(f"mixed dimensions inside {name}: {counts}")
            return None
        dim = int(dims[0]) if rows else 0
    values = array.flatten().to_numpy(zero_copy_only=False)
    return values.astype(np.float32, copy=False).reshape(rows, dim), dim


def _examples(values: Sequence[Any], limit: int = 3) -> str:
    shown = ", ".join(repr(str(v)) for v in list(values)[:limit])
    return shown + (", ..." if len(values) > limit else "")


def read_descriptors_checked(uri: str, problems: list[str]) -> Descriptors | None:
    """The descriptors at ``uri``, every problem found appended to ``problems``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    base = uri.rstrip("/")
    try:
        there = storage.exists(base)
    except ValueError as err:
        problems.append(str(err))
        return None
    if not there:
        problems.append(f"no descriptors at {base} (nothing there)")
        return None
    missing = [
        m
        for m in (DESCRIPTOR_MANIFEST, storage.SUCCESS)
        if not storage.is_file(storage.join(base, m))
    ]
    if missing:
        problems.append(
            f"descriptors at {base} are incomplete (no {' or '.join(missing)}): "
            "run pipeline.extract to its end first"
        )
        return None
    try:
        manifest = json.loads(storage.read_text(storage.join(base, DESCRIPTOR_MANIFEST)))
    except json.JSONDecodeError as err:
        problems.append(f"{storage.join(base, DESCRIPTOR_MANIFEST)} is not JSON: {err}")
        return None
    lacking = [key for key in ("dim", "network") if key not in manifest]
    if lacking:
        problems.append(f"descriptors manifest at {base} lacks {', '.join(lacking)}")
        return None
    expected_dim = int(manifest["dim"])
    listed = manifest.get("files")
    if listed:
        files = [name if "://" in name else storage.join(base, name) for name in listed]
        absent = [f for f in files if not storage.is_file(f)]
        if absent:
            problems.append(
                f"{len(absent)} part file(s) the descriptors manifest lists are missing: "
                f"{_examples(absent)}"
            )
            return None
    else:
        files = storage.list_files(base, suffixes=(".parquet",))
    if not files:
        problems.append(f"no descriptor part files (*.parquet) at {base}")
        return None

    ids_parts, vector_parts, dims, failed = [], [], {}, 0
    for part in files:
        name = part.rsplit("/", 1)[-1]
        try:
            table = pq.read_table(pa.BufferReader(storage.read_bytes(part)))
        except (OSError, pa.ArrowException) as err:
            problems.append(f"{name} is not a readable Parquet file: {err}")
            continue
        absent = [c for c in ("image_id", "vector") if c not in table.column_names]
        if absent:
            problems.append(f"{name} lacks column(s) {', '.join(absent)}")
            continue
        valid = table.column("vector").is_valid()
        if "error" in table.column_names:
            import pyarrow.compute as pc

            valid = pc.and_(valid, pc.is_null(table.column("error")))
        good = table.filter(valid)
        failed += table.num_rows - good.num_rows
        rows = _vector_rows(good.column("vector"), name, problems)
        if rows is None:
            continue
        values, dim = rows
        if good.num_rows:
            dims.setdefault(dim, []).append((name, good.num_rows))
        ids_parts.append(np.asarray(good.column("image_id").to_pylist(), dtype=object))
        vector_parts.append(values)
    image_ids = np.concatenate(ids_parts) if ids_parts else np.empty(0, dtype=object)
    bad = np.concatenate([~np.isfinite(v).all(axis=1) for v in vector_parts] or [[]]).astype(bool)
    count = manifest.get("count")
    if count is not None and int(count) != len(image_ids) and len(ids_parts) == len(files):
        problems.append(
            f"the descriptors manifest counts {int(count)} vectors but the part files hold "
            f"{len(image_ids)}: the folder changed after extraction; extract again"
        )
    if len(image_ids) == 0 and len(ids_parts) == len(files):
        problems.append(f"descriptors at {base} hold no vectors")
    nameless = np.array([i is None or i == "" for i in image_ids], dtype=bool)
    if nameless.any():
        problems.append(f"{int(nameless.sum())} descriptor rows have no image_id")
    if bad.any():
        problems.append(
            f"{int(bad.sum())} descriptor rows have non-finite values (NaN or inf), "
            f"e.g. {_examples(image_ids[bad])}"
        )
    if not nameless.any() and len(image_ids):
        unique, counts = np.unique(image_ids.astype(str), return_counts=True)
        dup = unique[counts > 1]
        if len(dup):
            problems.append(
                f"{len(dup)} image_id(s) appear more than once in the descriptors, "
                f"e.g. {_examples(dup)}"
            )
    found = sorted(dims)
    if found and (len(found) > 1 or found[0] != expected_dim):
        where = "; ".join(
            f"{d} in {_examples([n for n, _ in dims[d]], 2)} ({sum(r for _, r in dims[d])} rows)"
            for d in found
        )
        problems.append(
            f"mixed dimensions: the manifest says {expected_dim}, the parts hold {where}"
        )
        return None
    if len(ids_parts) != len(files):
        return None
    vectors = (
        np.concatenate([v.reshape(-1, expected_dim) for v in vector_parts])
        if vector_parts
        else np.empty((0, expected_dim), np.float32)
    )
    if len(vectors) and not bad.any():
        norms = np.linalg.norm(vectors, axis=1)
        off = np.abs(norms - 1) > 1e-3
        if off.any():
            logger.warning(
                "%d descriptor rows are not L2-normalised (norms %.3g..%.3g); inner product "
                "ranks them by length too",
                int(off.sum()),
                float(norms.min()),
                float(norms.max()),
            )
    return Descriptors(
        uri=base,
        image_ids=image_ids,
        vectors=vectors,
        manifest=manifest,
        failed=failed,
        files=files,
    )


def read_descriptors(uri: str) -> Descriptors:
    """The described rows of a complete descriptors folder; ``ValueError`` listing every problem."""
    problems: list[str] = []
    descriptors = read_descriptors_checked(uri, problems)
    if problems or descriptors is None:
        raise ValueError(problem_text(f"cannot read descriptors at {uri}", problems))
    return descriptors


def problem_text(head: str, problems: list[str]) -> str:
    """One problem on one line; several as a heading line and one line each (the command line
    prints each as its own ``error:`` line)."""
    if len(problems) == 1:
        return f"{head}: {problems[0]}"
    listed = "\n".join(f"({i}) {p}" for i, p in enumerate(problems, 1))
    return f"{head}: {len(problems)} problems:\n{listed}"
