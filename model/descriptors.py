"""The descriptor table that the extract stage writes and the index stage (and others) read.

The table is ``model.tables.DESCRIPTORS`` (``image_id``, ``vector``: float32, L2-normalised,
null for a photo the extraction could not describe, ``error``: null or why), in the output of
``model.tables.DESCRIPTORS_OUTPUT``, whose manifest is published last: a folder without it is
unfinished. Its ``details`` say what made the vectors (``network``, ``settings``, ``dim``) and
the counts. Reading is vectorised and imports no torch, so an index build over a million rows
stays quick and light.

Two ways to read it: ``read_descriptors`` holds every vector in memory (a group of photos, a
test set); ``scan_descriptors_checked`` checks every row as ``read_descriptors`` does but keeps
only each described row's image_id and where it lies (``DescriptorRows``), streaming the vectors
a batch at a time, and ``read_vectors``/``iter_vectors`` read the vectors of chosen
rows back from the stored parts (what the index stage's driver and its tasks do: no process
holds every vector of a million photos).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from model import tables
from model.tables import DESCRIPTORS, DESCRIPTORS_OUTPUT, Manifest

__all__ = [
    "DescriptorRows",
    "Descriptors",
    "iter_vectors",
    "problem_text",
    "read_descriptors",
    "read_descriptors_checked",
    "read_vectors",
    "scan_descriptors_checked",
    "write_descriptors",
]

logger = logging.getLogger(__name__)

_NORM_TOLERANCE = 1e-3
_SCAN_THREADS = 2
"""Part files a scan reads at once (each a batch at a time: ``tables.BATCH_BYTES``)."""


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


@dataclass(frozen=True)
class DescriptorRows:
    """The described rows of a descriptors output without their vectors: each one's image_id
    and where it lies (its part file and row there), for readers that fetch the vectors of
    the rows they need from the parts (``read_vectors``, ``iter_vectors``)."""

    uri: str
    """The output folder."""
    image_ids: pa.Array
    """string ``[N]``, in the parts' order."""
    file: np.ndarray
    """int32 ``[N]``: the row's part, an index into ``files``."""
    row: np.ndarray
    """int64 ``[N]``: the row's number in its part."""
    dim: int
    manifest: dict[str, Any]
    """The manifest's ``details``: ``network``, ``settings``, ``dim``, ``count``, ``failed``."""
    failed: int = 0
    """Rows without a vector (photos the extraction could not describe)."""
    files: list[str] = field(default_factory=list)
    output: Manifest | None = None
    """The output's manifest: what a later stage passes as its input."""

    def __len__(self) -> int:
        return len(self.image_ids)

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


@dataclass
class _PartScan:
    """What the scan of one part found: its described rows, and what the checks need."""

    image_ids: list[pa.Array] = field(default_factory=list)
    rows: list[np.ndarray] = field(default_factory=list)
    total: int = 0
    lengths: Counter[int] = field(default_factory=Counter)
    non_finite: int = 0
    non_finite_ids: list[str] = field(default_factory=list)
    unnormalised: int = 0
    norm_min: float = np.inf
    norm_max: float = -np.inf


def _scan_part(file: str) -> _PartScan:
    """Every row of one part, a batch at a time; only the described rows' image_ids
    and row numbers are kept."""
    found = _PartScan()
    for start, table in DESCRIPTORS.read_rows(file, ["image_id", "vector", "error"]):
        found.total += table.num_rows
        good = pc.and_(pc.is_valid(table["vector"]), pc.is_null(table["error"]))
        mask = good.to_numpy(zero_copy_only=False)
        if not mask.any():
            continue
        ids = table["image_id"].filter(good).combine_chunks()
        found.image_ids.append(ids)
        found.rows.append(start + np.flatnonzero(mask).astype(np.int64))
        vectors = table["vector"].filter(good).combine_chunks()
        lengths = pc.list_value_length(vectors).to_numpy(zero_copy_only=False)
        dims, counts = np.unique(lengths, return_counts=True)
        found.lengths.update(dict(zip(dims.tolist(), counts.tolist(), strict=True)))
        if len(dims) != 1:
            continue  # mixed dimensions: reported, and nothing else is checked
        X = pc.list_flatten(vectors).to_numpy(zero_copy_only=False)
        X = X.astype(np.float32, copy=False).reshape(len(vectors), int(dims[0]))
        bad = ~np.isfinite(X).all(axis=1)
        if bad.any():
            found.non_finite += int(bad.sum())
            room = 4 - len(found.non_finite_ids)
            if room > 0:
                shown = ids.filter(pa.array(bad)).slice(0, room)
                found.non_finite_ids += [str(i) for i in shown.to_pylist()]
        if len(X):
            norms = np.sqrt(np.einsum("ij,ij->i", X, X))
            found.unnormalised += int((np.abs(norms - 1) > _NORM_TOLERANCE).sum())
            found.norm_min = min(found.norm_min, float(norms.min()))
            found.norm_max = max(found.norm_max, float(norms.max()))
    return found


def scan_descriptors_checked(uri: str, problems: list[str]) -> DescriptorRows | None:
    """The described rows of the descriptors at ``uri`` without their vectors, every problem
    found appended to ``problems``: the checks of ``read_descriptors_checked`` (one dimension,
    the manifest's dimension and count, unique image_ids, finite values), made while the parts
    stream past a batch at a time (``_SCAN_THREADS`` parts at once). Memory: the
    image_ids and locations, and the batches being read, whatever the number of rows."""
    manifest = _manifest(uri, problems)
    if manifest is None:
        return None
    folder = manifest.uri.rsplit("/", 1)[0]
    try:
        files = DESCRIPTORS.files(manifest)
        with ThreadPoolExecutor(_SCAN_THREADS) as pool:
            parts = list(pool.map(_scan_part, files))
    except (OSError, ValueError) as err:
        problems.append(str(err) if isinstance(err, ValueError) else f"cannot read {folder}: {err}")
        return None
    lengths: Counter[int] = Counter()
    for part in parts:
        lengths.update(part.lengths)
    if len(lengths) > 1:
        counts = ", ".join(f"{d} ({lengths[d]} rows)" for d in sorted(lengths)[:5])
        problems.append(f"mixed dimensions in the descriptors at {folder}: {counts}")
        return None
    image_ids = _concat_ids([a for part in parts for a in part.image_ids])
    described = len(image_ids)
    dim = next(iter(lengths)) if lengths else 0
    found = len(problems)
    expected = int(manifest.details["dim"])
    if described and dim != expected:
        problems.append(f"mixed dimensions: the manifest says {expected}, the parts hold {dim}")
    _check_count(described, manifest.details, problems)
    _check_id_column(image_ids, folder, problems)
    non_finite = sum(part.non_finite for part in parts)
    if non_finite:
        shown = [i for part in parts for i in part.non_finite_ids]
        problems.append(
            f"{non_finite} descriptor rows have non-finite values (NaN or inf), "
            f"e.g. {_examples_of(shown, non_finite)}"
        )
    if len(problems) > found:
        return None
    unnormalised = sum(part.unnormalised for part in parts)
    if unnormalised:
        logger.warning(
            "%d descriptor rows are not L2-normalised (norms %.3g..%.3g); inner product "
            "ranks them by length too",
            unnormalised,
            min(part.norm_min for part in parts),
            max(part.norm_max for part in parts),
        )
    file = np.concatenate(
        [np.full(sum(len(r) for r in part.rows), i, np.int32) for i, part in enumerate(parts)]
        or [np.empty(0, np.int32)]
    )
    rows = np.concatenate([r for part in parts for r in part.rows] or [np.empty(0, np.int64)])
    return DescriptorRows(
        uri=folder,
        image_ids=image_ids,
        file=file,
        row=rows,
        dim=dim,
        manifest=manifest.details,
        failed=sum(part.total for part in parts) - described,
        files=files,
        output=manifest,
    )


def _concat_ids(arrays: list[pa.Array]) -> pa.Array:
    if not arrays:
        return pa.array([], type=pa.string())
    return pa.concat_arrays([a.cast(pa.string()) for a in arrays])


def _check_id_column(image_ids: pa.Array, where: str, problems: list[str]) -> None:
    """``_check_ids`` of an Arrow column (no Python string per row)."""
    nameless = pc.or_kleene(pc.is_null(image_ids), pc.equal(image_ids, ""))
    missing = int(pc.sum(pc.cast(nameless, pa.int64())).as_py() or 0)
    if missing:
        problems.append(f"{missing} descriptor rows at {where} have no image_id")
        return
    counted = pc.value_counts(image_ids)
    repeated = counted.field("values").filter(pc.greater(counted.field("counts"), 1))
    if len(repeated):
        first = repeated.take(pc.sort_indices(repeated)).slice(0, 4).to_pylist()
        problems.append(
            f"{len(repeated)} image_id(s) appear more than once in the descriptors, "
            f"e.g. {_examples_of(first, len(repeated))}"
        )


def _examples_of(first: Sequence[Any], count: int, limit: int = 3) -> str:
    """``_examples`` of a list known by its first items and its length."""
    shown = ", ".join(repr(str(v)) for v in list(first)[:limit])
    return shown + (", ..." if count > limit else "")


def iter_vectors(
    files: Sequence[str], file: np.ndarray, row: np.ndarray, *, dim: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The vectors of the distinct rows at ``(files[file[i]], row[i])``, read from the stored
    parts a batch at a time (only the row groups that hold some of them, the
    ``vector`` column only). Yields ``(i, vectors)``: which of the asked rows (indices into
    ``file`` and ``row``), and their float32 ``[len(i), dim]`` vectors."""
    file = np.asarray(file)
    row = np.asarray(row, dtype=np.int64)
    order = np.lexsort((row, file))
    cuts = np.flatnonzero(np.diff(file[order])) + 1
    for asked in np.split(order, cuts):
        if not len(asked):
            continue
        part = files[int(file[asked[0]])]
        for start, table in DESCRIPTORS.read_rows(part, ["vector"], row[asked]):
            yield asked[start : start + table.num_rows], _matrix(table["vector"], dim, part)


def read_vectors(
    files: Sequence[str], file: np.ndarray, row: np.ndarray, *, dim: int
) -> np.ndarray:
    """float32 ``[len(row), dim]``: the vectors of the rows at ``(files[file[i]], row[i])``,
    in the order asked (a row asked twice is read once)."""
    file = np.asarray(file, dtype=np.int64)
    row = np.asarray(row, dtype=np.int64)
    codes = (file << 40) | row
    unique, inverse = np.unique(codes, return_inverse=True)
    if len(unique) < len(codes):
        once = read_vectors(files, unique >> 40, unique & ((1 << 40) - 1), dim=dim)
        return once[inverse]
    out = np.empty((len(row), dim), dtype=np.float32)
    for which, vectors in iter_vectors(files, file, row, dim=dim):
        out[which] = vectors
    return out


def _matrix(column: pa.ChunkedArray, dim: int, where: str) -> np.ndarray:
    array = column.combine_chunks()
    values = pc.list_flatten(array).to_numpy(zero_copy_only=False)
    if len(values) != len(array) * dim:
        raise ValueError(f"{where}: vectors of another length than {dim}; extract again")
    return values.astype(np.float32, copy=False).reshape(len(array), dim)


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


def _examples(values: Sequence[Any] | np.ndarray, limit: int = 3) -> str:
    shown = ", ".join(repr(str(v)) for v in list(values)[:limit])
    return shown + (", ..." if len(values) > limit else "")


def problem_text(head: str, problems: list[str]) -> str:
    """One problem on one line; several as a heading line and one line each (the command line
    prints each as its own ``error:`` line)."""
    if len(problems) == 1:
        return f"{head}: {problems[0]}"
    listed = "\n".join(f"({i}) {p}" for i, p in enumerate(problems, 1))
    return f"{head}: {len(problems)} problems:\n{listed}"
