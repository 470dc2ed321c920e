"""The tables the stages hand each other: one spec each, and one completion marker for all.

Every stage writes an *output*: a folder (local or ``s3://``) holding its tables and, written
last, ``manifest.json``. The manifest is the only completion marker: a folder without it is
unfinished, whatever else it holds. It records

- ``stage`` and ``format``: what kind of output this is (the table specs it holds);
- ``fingerprint``: a hash of what went in (the ``inputs``' identities) and of the settings that
  change the content; a rerun whose fingerprint matches has nothing to do;
- ``identity``: the fingerprint and the stored files, hashed; the next stage's input identity,
  so a change anywhere upstream reaches every stage after it;
- ``sources``: where each input was read, resolved (absolute paths, and the path relative to
  this output so that a run folder that moved still finds its inputs);
- ``code``: the version of this code that wrote it; ``details``: the stage's own counts.

A :class:`Table` names one table, its schema and where its rows lie in an output (one file, or
part files directly in the output folder); ``read`` takes the output folder or the table's file,
checks the marker and reads through a pyarrow dataset on the storage layer's filesystem, in
parallel and with projection. Nothing else in the project names these files.

pyarrow and NumPy only, no torch and no Ray: ``cluster/`` and the SfM workers read tables too.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import posixpath
import subprocess
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from model import storage
from model.settings import raise_problems

__all__ = [
    "CAMERAS",
    "CANDIDATES",
    "DESCRIPTORS",
    "DESCRIPTORS_OUTPUT",
    "GROUPS",
    "GROUPS_OUTPUT",
    "IMAGES",
    "IMAGES_OUTPUT",
    "INDEX_VERSION",
    "LANDMARKS_OUTPUT",
    "LOCAL_FEATURES",
    "LOCAL_FEATURES_OUTPUT",
    "MANIFEST",
    "OUTPUTS",
    "PAIRS",
    "PAIRS_OUTPUT",
    "POOL",
    "SFM_GROUPS",
    "SFM_IMAGES",
    "SFM_MODELS",
    "SFM_OUTPUT",
    "TRAIN_OUTPUT",
    "WHITENING_PAIRS",
    "WHITEN_OUTPUT",
    "Manifest",
    "Output",
    "OutputChanged",
    "Table",
    "code_version",
    "fingerprint",
    "identities",
    "resolve",
    "upstream",
]

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
"""Every output's completion marker, written last."""

MANIFEST_FORMAT = "cirray.output/1"
_HASH_CHARS = 20
_READ_THREADS = 16
BATCH_BYTES = 4 * 2**20
"""Decoded bytes of a batch ``Table.read_rows`` yields (its memory is a few times that)."""
STREAM_BUFFER = 8 * 2**20
"""Bytes per request of a streamed read (``Table.read_rows``)."""


# ----------------------------------------------------------------------------- identities


def _digest(payload: Any) -> str:
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:_HASH_CHARS]


def fingerprint(stage: str, version: int, inputs: Mapping[str, str], *, settings: Mapping) -> str:
    """What an output is made from: the stage and its format, its inputs' identities and the
    settings that change its content. Equal fingerprints mean equal outputs."""
    return _digest({"stage": stage, "format": version, "inputs": inputs, "settings": settings})


@functools.cache
def code_version() -> str:
    """This code's version: the package version, and the git commit where there is one."""
    try:
        version = importlib.metadata.version("cirray")
    except importlib.metadata.PackageNotFoundError:
        version = "0+unknown"
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return version
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return version
    return f"{version}+g{sha}" if sha else version


def resolve(uri: str) -> str:
    """A location as it is stored: a local path absolute and without links, a URI as given."""
    text = str(uri).rstrip("/") or "/"
    if storage.is_remote(text):
        return text
    return str(storage.local_path(text).resolve())


def _relative(uri: str, base: str) -> str | None:
    """``uri`` relative to the folder ``base`` when both are local or in one bucket."""
    if storage.is_remote(uri) != storage.is_remote(base):
        return None
    if storage.is_remote(uri):
        a_scheme, _, a = uri.partition("://")
        b_scheme, _, b = base.partition("://")
        if a_scheme != b_scheme or a.split("/", 1)[0] != b.split("/", 1)[0]:
            return None
        return _posix_relpath(a, b)
    return _posix_relpath(uri, base)


def _posix_relpath(path: str, start: str) -> str:
    return posixpath.relpath(path, start)


# ----------------------------------------------------------------------------- the manifest


class OutputChanged(ValueError):
    """An output exists, made from other settings; the stage stops rather than replace it."""


@dataclass(frozen=True)
class Manifest:
    """What ``manifest.json`` holds (see the module's docstring)."""

    stage: str
    version: int
    fingerprint: str
    identity: str
    inputs: dict[str, str] = field(default_factory=dict)
    sources: dict[str, dict[str, str | None]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    files: dict[str, list[str]] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    code: str = ""
    created: str = ""
    uri: str = ""
    """Where it was read (not stored)."""

    def to_json(self) -> str:
        data = {
            "format": MANIFEST_FORMAT,
            "stage": self.stage,
            "version": self.version,
            "fingerprint": self.fingerprint,
            "identity": self.identity,
            "inputs": self.inputs,
            "sources": self.sources,
            "settings": self.settings,
            "files": self.files,
            "rows": self.rows,
            "details": self.details,
            "code": self.code,
            "created": self.created,
        }
        return json.dumps(data, indent=2, default=_json_default)

    @classmethod
    def from_json(cls, text: str, uri: str) -> Manifest:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{uri} is not JSON: {err}") from err
        if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
            raise ValueError(
                f"{uri} is not a manifest of this version of cirray ({MANIFEST_FORMAT}); "
                "run the stage again with --overwrite"
            )
        keys = {
            "stage",
            "version",
            "fingerprint",
            "identities",
            "identity",
            "inputs",
            "sources",
            "settings",
            "files",
            "rows",
            "details",
            "code",
            "created",
        }
        return cls(**{k: v for k, v in data.items() if k in keys}, uri=uri)

    def source(self, name: str) -> str:
        """Where input ``name`` lies now: relative to this output when that is still there
        (a run folder moved whole), else where it was read."""
        entry = self.sources[name]
        folder = self.uri.rsplit("/", 1)[0] if self.uri else ""
        relative = entry.get("relative")
        if relative and folder:
            moved = _join_relative(folder, relative)
            if moved != entry["uri"] and storage.exists(moved):
                return moved
        return str(entry["uri"])

    def changed_settings(self, settings: Mapping[str, Any]) -> list[str]:
        """``"name: old → new"`` for each setting that differs from ``settings``."""
        old, new = _plain(self.settings), _plain(dict(settings))
        return [
            f"{name}: {_shown(old.get(name))} → {_shown(new.get(name))}"
            for name in sorted(set(old) | set(new))
            if old.get(name) != new.get(name)
        ]


def _join_relative(folder: str, relative: str) -> str:
    if storage.is_remote(folder):
        scheme, _, path = folder.partition("://")
        return f"{scheme}://{posixpath.normpath(posixpath.join(path, relative))}"
    return posixpath.normpath(posixpath.join(folder, relative))


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, set | frozenset):
        return sorted(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=_json_default))


def _shown(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


# ----------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class Table:
    """One table of an output: its name, schema and where its rows lie in the output folder."""

    name: str
    stage: str
    schema: pa.Schema
    file: str | None
    """The table's file in the output folder; ``None``: Parquet parts in the folder itself."""
    optional: bool = False
    """Outputs may lack it (read gives an empty table)."""

    @property
    def output(self) -> Output:
        return OUTPUTS[self.stage]

    def read(
        self,
        uri: str,
        columns: Sequence[str] | None = None,
        filter: pads.Expression | None = None,
    ) -> pa.Table:
        """The rows of a complete output (its folder, or this table's file), ``columns`` only.

        ``FileNotFoundError`` when nothing is there, ``ValueError`` naming the problem when it
        is unfinished, of another stage, or of another schema.
        """
        manifest = self.output.manifest(uri)
        return self.read_from(manifest, columns, filter)

    def read_from(
        self,
        manifest: Manifest,
        columns: Sequence[str] | None = None,
        filter: pads.Expression | None = None,
    ) -> pa.Table:
        """Like ``read``, for an output whose manifest was read already."""
        wanted = list(columns) if columns is not None else self.schema.names
        self.check_columns(wanted)
        schema = pa.schema([self.schema.field(c) for c in wanted])
        files = self.files(manifest)
        if not files:
            return schema.empty_table()
        dataset = self._dataset(files, manifest.uri)
        self.check_schema(dataset.schema, where=files[0], columns=wanted)
        table = dataset.to_table(columns=wanted, filter=filter, use_threads=True)
        return table.cast(schema)

    def read_file(self, uri: str, columns: Sequence[str] | None = None) -> pa.Table:
        """One file of this table read directly (a shard's id map, a part being resumed);
        ``ValueError`` naming it when it is unreadable or of another schema."""
        wanted = list(columns) if columns is not None else self.schema.names
        self.check_columns(wanted)
        try:
            filesystem, path = storage.arrow_filesystem(uri)
            with filesystem.open_input_file(path) as handle:
                parquet = pq.ParquetFile(handle)
                self.check_schema(parquet.schema_arrow, where=uri, columns=wanted)
                table = parquet.read(columns=wanted)
        except FileNotFoundError:
            raise
        except (OSError, pa.ArrowException) as err:
            raise ValueError(f"{uri} is not a readable Parquet file ({err})") from err
        return table.cast(pa.schema([self.schema.field(c) for c in wanted]))

    def read_unpublished(
        self, uri: str, columns: Sequence[str] | None = None
    ) -> tuple[pa.Table, list[str]]:
        """The rows of every readable part in an output folder that may be unfinished (what
        an interrupted run already wrote), and the parts that could not be read, each with
        its reason. For resuming; readers of finished outputs use ``read``."""
        if self.file is not None:
            raise ValueError(f"{self.name} is one file, not parts")
        folder = self.output.locate(uri)
        wanted = list(columns) if columns is not None else self.schema.names
        schema = pa.schema([self.schema.field(c) for c in wanted])
        if not storage.exists(folder):
            return schema.empty_table(), []
        parts = [storage.join(folder, n) for n in sorted(_sizes(folder)) if n.endswith(".parquet")]

        def read(part: str) -> pa.Table | str:
            try:
                return self.read_file(part, wanted)
            except ValueError as err:
                return str(err)

        with ThreadPoolExecutor(_READ_THREADS) as pool:
            found = list(pool.map(read, parts))
        tables = [t for t in found if not isinstance(t, str)]
        bad = [t for t in found if isinstance(t, str)]
        return (pa.concat_tables(tables) if tables else schema.empty_table()), bad

    def row_groups(self, file: str, columns: Sequence[str]) -> Iterable[pa.Table]:
        """Each row group of one of this table's files in turn, ``columns`` only: where each
        row lies, for a reader that later fetches one row group (``read_row_group``)."""
        self.check_columns(columns)
        filesystem, path = storage.arrow_filesystem(file)
        with filesystem.open_input_file(path) as handle:
            parquet = pq.ParquetFile(handle)
            self.check_schema(parquet.schema_arrow, where=file, columns=columns)
            for group in range(parquet.num_row_groups):
                yield parquet.read_row_group(group, columns=list(columns))

    def read_row_group(self, file: str, group: int, columns: Sequence[str]) -> pa.Table:
        """One row group of one of this table's files (a thumbnail's photo bytes)."""
        self.check_columns(columns)
        filesystem, path = storage.arrow_filesystem(file)
        with filesystem.open_input_file(path) as handle:
            return pq.ParquetFile(handle).read_row_group(group, columns=list(columns))

    def read_file_groups(self, file: str, columns: Sequence[str]) -> tuple[pa.Table, list[int]]:
        """``columns`` of one of this table's files, whole, in one projected read (the column
        chunks of all its row groups requested together, adjacent ones as one range), and the
        rows of each row group: where each row lies, for a reader that later fetches a few rows
        (``read_row_groups``). Nothing of the other columns is read."""
        wanted = list(columns)
        self.check_columns(wanted)
        with self._parquet(file, wanted) as parquet:
            sizes = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
            table = parquet.read(columns=wanted, use_threads=True)
        return self._cast(table, wanted), sizes

    def read_row_groups(
        self, file: str, groups: Sequence[int], columns: Sequence[str]
    ) -> list[pa.Table]:
        """Some row groups of one of this table's files, ``columns`` only, in one projected
        read (their column chunks requested together); a table per group, in the order asked."""
        wanted = list(columns)
        self.check_columns(wanted)
        asked = [int(g) for g in groups]
        unique = sorted(set(asked))
        if not unique:
            return []
        with self._parquet(file, wanted) as parquet:
            sizes = [parquet.metadata.row_group(g).num_rows for g in unique]
            table = self._cast(
                parquet.read_row_groups(unique, columns=wanted, use_threads=True), wanted
            )
        starts = np.concatenate([[0], np.cumsum(sizes)])
        by_group = {g: table.slice(int(starts[i]), sizes[i]) for i, g in enumerate(unique)}
        return [by_group[g] for g in asked]

    def read_rows(
        self,
        file: str,
        columns: Sequence[str],
        rows: np.ndarray | None = None,
        *,
        batch_bytes: int = BATCH_BYTES,
    ) -> Iterator[tuple[int, pa.Table]]:
        """Rows of one of this table's files, ``columns`` only, a batch at a time.

        ``rows``: ascending row numbers in the file (every row when ``None``). Yields
        ``(start, table)``: ``table`` holds the rows ``rows[start : start + len(table)]`` (with
        ``rows=None``: the file's rows from ``start``). Only the row groups that hold some of
        ``rows`` are read, streamed (``STREAM_BUFFER`` bytes per request, about
        ``batch_bytes`` of decoded columns per batch): memory stays bounded however large the
        file or its row groups.
        """
        wanted = list(columns)
        self.check_columns(wanted)
        with self._parquet(file, wanted, stream=True) as parquet:
            meta = parquet.metadata
            sizes = np.array(
                [meta.row_group(g).num_rows for g in range(meta.num_row_groups)], dtype=np.int64
            )
            starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
            if rows is None:
                groups = np.flatnonzero(sizes)
                position = None
            else:
                picked = np.asarray(rows, dtype=np.int64)
                if len(picked) and (
                    picked[0] < 0 or picked[-1] >= starts[-1] or (np.diff(picked) <= 0).any()
                ):
                    raise ValueError(f"rows of {file} must be ascending and below {starts[-1]}")
                group_of = np.searchsorted(starts, picked, side="right") - 1
                groups = np.unique(group_of)
                # Each picked row's place among the rows of the groups read, in order.
                offsets = np.concatenate([[0], np.cumsum(sizes[groups])])
                position = offsets[np.searchsorted(groups, group_of)] + picked - starts[group_of]
            if not len(groups):
                return
            decoded = sum(_column_bytes(meta.row_group(int(g)), wanted) for g in groups)
            per_row = max(1, decoded // max(1, int(sizes[groups].sum())))
            batches = parquet.iter_batches(
                batch_size=max(64, batch_bytes // per_row),
                row_groups=[int(g) for g in groups],
                columns=wanted,
                use_threads=True,
            )
            seen = done = 0
            for batch in batches:
                table = self._cast(pa.Table.from_batches([batch]), wanted)
                first, seen = seen, seen + batch.num_rows
                if position is None:
                    yield first, table  # every non-empty group: the place is the row
                    continue
                stop = int(np.searchsorted(position, seen, side="left"))
                if stop > done:
                    yield done, table.take(pa.array(position[done:stop] - first))
                    done = stop

    @contextlib.contextmanager
    def _parquet(
        self, file: str, columns: Sequence[str], *, stream: bool = False
    ) -> Iterator[pq.ParquetFile]:
        """One of this table's files opened for projected reads (schema checked): the column
        chunks of one read requested together (pre-buffered; adjacent ones as one range), or,
        ``stream``, each column read ``STREAM_BUFFER`` bytes at a time while batches decode."""
        filesystem, path = storage.arrow_filesystem(file)
        with filesystem.open_input_file(path) as handle:
            try:
                if stream:
                    parquet = pq.ParquetFile(handle, pre_buffer=False, buffer_size=STREAM_BUFFER)
                else:
                    parquet = pq.ParquetFile(handle, pre_buffer=True)
            except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
                raise ValueError(f"{file} is not a readable Parquet file ({err})") from err
            self.check_schema(parquet.schema_arrow, where=file, columns=columns)
            yield parquet

    def _cast(self, table: pa.Table, columns: Sequence[str]) -> pa.Table:
        return table.cast(pa.schema([self.schema.field(c) for c in columns]))

    def parts(self, uri: str) -> list[str]:
        """The part files now in an output folder that may be unfinished (a resume that
        rewrites or removes some of them); readers of finished outputs use ``read``."""
        if self.file is not None:
            raise ValueError(f"{self.name} is one file, not parts")
        folder = self.output.locate(uri)
        if not storage.exists(folder):
            return []
        return [storage.join(folder, n) for n in sorted(_sizes(folder)) if n.endswith(".parquet")]

    def resume_ids(self, uri: str, keep: Iterable[str], **options: Any) -> set[str]:
        """The image_ids in the parts of an output being resumed or updated that stay: a part
        that cannot be read (cut short by a crash) is removed, and rows whose image_id is not
        in ``keep`` (photos gone from the images output) are dropped from their part, which
        is rewritten with ``options`` (or removed when nothing is left)."""
        done: set[str] = set()
        still = pa.array(sorted(keep), pa.string())
        for part in self.parts(uri):
            try:
                ids = self.read_file(part, ["image_id"])["image_id"]
            except ValueError as err:
                logger.warning("removing unreadable part %s: %s", part, err)
                storage.remove(part)
                continue
            kept = pc.is_in(ids, still)
            if not pc.all(kept).as_py():
                table = self.read_file(part).filter(kept)
                logger.info("dropping %d rows of photos gone from %s", len(ids) - len(table), part)
                if table.num_rows:
                    self.write(
                        self.output.locate(uri), table, part=part.rsplit("/", 1)[-1], **options
                    )
                else:
                    storage.remove(part)
            done.update(ids.filter(kept).to_pylist())
        return done

    def dataset(self, uri: str) -> pads.Dataset:
        """The table of a complete output as a pyarrow dataset (lazily read, by part)."""
        manifest = self.output.manifest(uri)
        files = self.files(manifest)
        if not files:
            raise ValueError(f"{manifest.uri} holds no {self.name} rows")
        return self._dataset(files, manifest.uri)

    def ray_dataset(self, uri: str, columns: Sequence[str] | None = None) -> Any:
        """The table of a complete output as a Ray dataset: its listed files, read by Ray Data's
        tasks where the work runs (one block per file), ``columns`` only."""
        import ray.data  # Ray only where a stage runs on it: cluster/ and SfM workers read too

        manifest = self.output.manifest(uri)
        files = self.files(manifest)
        if not files:
            raise ValueError(f"{manifest.uri.rsplit('/', 1)[0]} holds no {self.name} rows")
        wanted = list(columns) if columns is not None else self.schema.names
        self.check_columns(wanted)
        filesystem, _ = storage.arrow_filesystem(files[0])
        paths = [storage.arrow_filesystem(f)[1] for f in files]
        with footer_readers_for(len(paths)):
            dataset = ray.data.read_parquet(paths, filesystem=filesystem)
        return dataset.select_columns(wanted)

    def files(self, manifest: Manifest) -> list[str]:
        """URIs of this table's files in an output, as its manifest lists them."""
        folder = manifest.uri.rsplit("/", 1)[0]
        names = manifest.files.get(self.name)
        if names is None:
            if self.optional:
                return []
            raise ValueError(f"{folder} has no {self.name} table; run {self.stage} again")
        return [storage.join(folder, name) for name in names]

    def _dataset(self, files: list[str], where: str) -> pads.Dataset:
        filesystem, _ = storage.arrow_filesystem(files[0])
        paths = [storage.arrow_filesystem(f)[1] for f in files]
        try:
            return pads.dataset(paths, filesystem=filesystem, format="parquet")
        except (OSError, pa.ArrowException) as err:
            raise ValueError(
                f"{self.name} of {where.rsplit('/', 1)[0]} cannot be read ({err}); "
                f"run {self.stage} again"
            ) from err

    def check_columns(self, columns: Iterable[str]) -> None:
        unknown = [c for c in columns if c not in self.schema.names]
        if unknown:
            raise ValueError(f"{self.name} has no column(s) {', '.join(unknown)}")

    def check_schema(
        self, schema: pa.Schema, where: str = "", columns: Sequence[str] | None = None
    ) -> None:
        """``ValueError`` naming every missing or mistyped column of ``schema`` (extra columns
        are allowed); only ``columns`` when given."""
        wanted = list(columns) if columns is not None else self.schema.names
        missing = [c for c in wanted if c not in schema.names]
        mistyped = [
            f"{c} is {schema.field(c).type}, expected {self.schema.field(c).type}"
            for c in wanted
            if c in schema.names
            and not _compatible(schema.field(c).type, self.schema.field(c).type)
        ]
        if missing or mistyped:
            what = ([f"missing column(s) {', '.join(missing)}"] if missing else []) + mistyped
            raise ValueError(
                f"{where or self.name} is not a {self.name} table of pipeline.{self.stage}: "
                f"{'; '.join(what)}"
            )

    def conform(self, table: pa.Table) -> pa.Table:
        """``table`` with exactly this schema's columns, in order and cast (``ValueError``
        naming what does not fit)."""
        self.check_schema(table.schema)
        return table.select(self.schema.names).cast(self.schema)

    def from_rows(self, rows: Sequence[Mapping[str, Any]]) -> pa.Table:
        """Rows (dicts; a missing key is null) as a table of this schema. A list column whose
        values are all NumPy arrays (an SfM photo's 3D point ids) is built from them whole:
        their lengths as offsets and one concatenated array, never a Python object per item."""
        columns = {}
        for spec in self.schema:
            values = [row.get(spec.name) for row in rows]
            if (
                pa.types.is_list(spec.type)
                and values
                and all(isinstance(v, np.ndarray) for v in values)
            ):
                columns[spec.name] = _list_column(cast(list[np.ndarray], values), spec.type)
            else:
                columns[spec.name] = pa.array(values, type=spec.type)
        return pa.table(columns, schema=self.schema)

    def write(self, folder: str, table: pa.Table, part: str | None = None, **options: Any) -> str:
        """Write ``table`` into the output ``folder`` (whole, or never); returns its name there.

        A table stored as parts needs ``part`` (its file name: ``part-<…>.parquet``). The
        output is complete only once its ``Output.publish`` writes the manifest.
        """
        if self.file is None:
            if not part:
                raise ValueError(f"{self.name} is stored in parts: name the part")
            name = part if part.endswith(".parquet") else f"{part}.parquet"
        else:
            name = self.file
        storage.write_bytes(
            storage.join(folder, name), parquet_bytes(self.conform(table), **options)
        )
        return name


_LIST_CHUNK = 2**30
"""Items per chunk of a list column built from arrays (a list array's offsets are int32)."""


def _list_column(values: Sequence[np.ndarray], type: pa.ListType) -> pa.ChunkedArray:
    """A list column of NumPy arrays: offsets and one concatenated array per chunk."""
    chunks, start, items = [], 0, 0
    for end, value in enumerate(values, 1):
        items += len(value)
        if items >= _LIST_CHUNK or end == len(values):
            part = values[start:end]
            lengths = np.fromiter((len(v) for v in part), dtype=np.int32, count=len(part))
            offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int32)
            items_array = pa.array(np.concatenate(part))  # zero-copy from the one array
            if items_array.type != type.value_type:
                items_array = items_array.cast(type.value_type)
            chunks.append(pa.ListArray.from_arrays(pa.array(offsets), items_array, type=type))
            start, items = end, 0
    return pa.chunked_array(chunks, type=type)


def _compatible(found: pa.DataType, expected: pa.DataType) -> bool:
    if found.equals(expected):
        return True
    lists = (pa.types.is_list, pa.types.is_large_list, pa.types.is_fixed_size_list)
    if any(f(found) for f in lists) and any(f(expected) for f in lists):
        return _compatible(found.value_type, expected.value_type)
    if pa.types.is_floating(found) and pa.types.is_floating(expected):
        return True
    if pa.types.is_integer(found) and pa.types.is_integer(expected):
        return True
    return (pa.types.is_string(found) or pa.types.is_large_string(found)) and (
        pa.types.is_string(expected) or pa.types.is_large_string(expected)
    )


def _column_bytes(group: pq.RowGroupMetaData, columns: Sequence[str]) -> int:
    """Decoded (uncompressed) bytes of ``columns`` in one row group."""
    wanted = set(columns)
    return sum(
        group.column(i).total_uncompressed_size
        for i in range(group.num_columns)
        if group.column(i).path_in_schema.split(".", 1)[0] in wanted
    )


def parquet_bytes(table: pa.Table, **options: Any) -> bytes:
    """A Parquet file's bytes (zstd unless ``options`` say otherwise)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **{"compression": "zstd", **options})
    return sink.getvalue().to_pybytes()


FOOTER_READERS_SETTING = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"
"""Ray Data's own setting: how many footer-reading actors each ``read_parquet`` starts."""
MOST_FOOTER_READERS = 32  # Ray Data's default
FILES_PER_FOOTER_READ = 10  # Ray Data's default RAY_DATA_PARQUET_FOOTER_BATCH_SIZE


@contextlib.contextmanager
def footer_readers_for(files: int) -> Iterator[None]:
    """Ray Data's Parquet reader starts its full pool of footer-reading actors, each a new
    process, on every read, however few files it reads; one per batch of files it hands them
    reads as fast. Sized while the read is planned (the pool's size is taken then); a size the
    user set is kept."""
    if FOOTER_READERS_SETTING in os.environ:
        yield
        return
    with contextlib.suppress(ImportError):  # its default is read at import: not from this size
        import ray.data._internal.datasource_v2.formats.parquet.footer_file_indexer  # noqa: F401
    needed = min(MOST_FOOTER_READERS, max(1, math.ceil(files / FILES_PER_FOOTER_READ)))
    os.environ[FOOTER_READERS_SETTING] = str(needed)
    try:
        yield
    finally:
        os.environ.pop(FOOTER_READERS_SETTING, None)


def read_parquet_file(uri: str) -> pa.Table:
    """A Parquet file that is no stage's table (a photo manifest a user gives ingest)."""
    filesystem, path = storage.arrow_filesystem(uri)
    with filesystem.open_input_file(path) as handle:
        return pq.ParquetFile(handle).read()


@dataclass(frozen=True)
class Output:
    """What one stage writes: its tables and the manifest that completes them."""

    stage: str
    tables: tuple[str, ...]
    version: int = 1
    folder: str | None = None
    """A fixed folder name the output takes inside the given location (ingest's
    ``images.parquet``); ``None``: the given location is the output."""

    def locate(self, uri: str) -> str:
        """The output folder for ``uri``: the folder, or one of its tables' files."""
        text = str(uri).rstrip("/")
        last = text.rsplit("/", 1)[-1]
        files = {t.file for t in self.table_specs() if t.file}
        if last in files or last == MANIFEST:
            return text.rsplit("/", 1)[0]
        if self.folder and last != self.folder:
            return storage.join(text, self.folder)
        return text

    def table_specs(self) -> list[Table]:
        return [TABLES[name] for name in self.tables]

    def manifest_uri(self, uri: str) -> str:
        return storage.join(self.locate(uri), MANIFEST)

    def is_complete(self, uri: str) -> bool:
        """Whether a complete output of this stage is at ``uri``."""
        try:
            self.manifest(uri)
        except (OSError, ValueError):
            return False
        return True

    def existing(self, uri: str) -> Manifest | None:
        """The manifest of a complete output of this stage at ``uri``; ``None`` when there is
        none or only an unfinished one; ``ValueError`` for another stage's or format's."""
        try:
            return self.manifest(uri)
        except FileNotFoundError:
            return None
        except ValueError:
            if storage.is_file(self.manifest_uri(uri)):
                raise
            return None

    def manifest(self, uri: str) -> Manifest:
        """The manifest of the complete output at ``uri``; ``FileNotFoundError`` when nothing is
        there, ``ValueError`` (one line) when it is unfinished or another stage's output."""
        folder = self.locate(uri)
        marker = storage.join(folder, MANIFEST)
        try:
            text = storage.read_text(marker)
        except FileNotFoundError:
            if storage.exists(folder):
                raise ValueError(
                    f"{folder} is not a complete {self.stage} output (no {MANIFEST}); "
                    f"run pipeline.{self.stage} again to complete it"
                ) from None
            raise FileNotFoundError(
                f"no {self.stage} output at {folder}; run pipeline.{self.stage} first"
            ) from None
        manifest = Manifest.from_json(text, storage.join(resolve(folder), MANIFEST))
        if manifest.stage != self.stage:
            raise ValueError(f"{folder} is a {manifest.stage} output, not a {self.stage} output")
        if manifest.version != self.version:
            raise ValueError(
                f"{folder} is a {self.stage} output of format {manifest.version}, this code "
                f"reads {self.version}; run pipeline.{self.stage} again with --overwrite"
            )
        return manifest

    def fingerprint(self, inputs: Mapping[str, str], settings: Mapping[str, Any]) -> str:
        return fingerprint(self.stage, self.version, inputs, settings=_plain(dict(settings)))

    def plan(
        self,
        uri: str,
        inputs: Mapping[str, Manifest | str],
        settings: Mapping[str, Any],
        *,
        overwrite: bool = False,
        fixed: Sequence[str] = (),
    ) -> tuple[str, Manifest | None]:
        """What a run must do at ``uri``: ``("skip", manifest)`` when a complete output has this
        fingerprint; ``("update", manifest)`` when one was made with these settings from other
        inputs (the stage redoes what the new inputs touch); ``("new", None)`` when there is
        none, or it is replaced (``overwrite``). An output made with other settings, or from
        another of the ``fixed`` inputs (extract's network: no update mixes two), is an
        ``OutputChanged`` naming each change, unless ``overwrite``.
        """
        try:
            manifest = self.manifest(uri)
        except FileNotFoundError:
            return "new", None
        except ValueError:
            if overwrite or not storage.exists(self.manifest_uri(uri)):
                return "new", None  # unfinished: the stage completes or redoes it
            raise
        ids = identities(inputs)
        if manifest.fingerprint == self.fingerprint(ids, settings):
            return "skip", manifest
        swapped = [n for n in fixed if manifest.inputs.get(n) != ids[n]]
        changes = manifest.changed_settings(settings)
        if (swapped or changes) and not overwrite:
            named = "; ".join(f"{n}: {manifest.inputs.get(n)} → {ids[n]}" for n in swapped)
            what = (
                f"another {' and '.join(swapped)} ({named})"
                if swapped
                else f"other settings ({'; '.join(changes)})"
            )
            raise OutputChanged(
                f"{self.locate(uri)} was made with {what}; "
                "run with --overwrite to replace it, or choose another --output"
            )
        if swapped or changes:
            return "new", None
        return "update", manifest

    def publish(
        self,
        uri: str,
        *,
        inputs: Mapping[str, Manifest | str] | None = None,
        settings: Mapping[str, Any] | None = None,
        details: Mapping[str, Any] | None = None,
        files: Mapping[str, Sequence[str]] | None = None,
        rows: Mapping[str, int] | None = None,
    ) -> Manifest:
        """Write the manifest of the output at ``uri`` last: the output is complete from now.

        ``inputs`` maps each input's name to its manifest (or, for an input that is no stage
        output — a photo folder, a checkpoint — an identity string). ``files`` lists each
        table's files in the folder: by default a table's own file, or every ``part-*`` file
        for a table in parts. Row counts are read from the files' footers unless given.
        """
        folder = resolve(self.locate(uri))
        plain_settings: dict[str, Any] = _plain(dict(settings or {}))
        sources = {}
        for name, value in (inputs or {}).items():
            if isinstance(value, Manifest):
                where = value.uri.rsplit("/", 1)[0]
                sources[name] = {"uri": where, "relative": _relative(where, folder)}
        listed = dict(files) if files is not None else self._listed(folder)
        sizes = _sizes(folder)
        missing = [n for names in listed.values() for n in names if n not in sizes]
        if missing:
            raise FileNotFoundError(f"{folder} lacks {', '.join(missing[:3])}; cannot publish")
        counts = dict(rows) if rows is not None else {}
        for name, names in listed.items():
            if name not in counts:
                counts[name] = _count_rows([storage.join(folder, n) for n in names])
        ids = identities(inputs or {})
        fp = self.fingerprint(ids, plain_settings)
        stored = {t: sorted((n, sizes[n]) for n in names) for t, names in listed.items()}
        manifest = Manifest(
            stage=self.stage,
            version=self.version,
            fingerprint=fp,
            identity=_digest({"fingerprint": fp, "files": stored}),
            inputs=ids,
            sources=sources,
            settings=plain_settings,
            files={t: sorted(names) for t, names in listed.items()},
            rows=counts,
            details=_plain(dict(details or {})),
            code=code_version(),
            created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            uri=storage.join(folder, MANIFEST),
        )
        storage.write_text(manifest.uri, manifest.to_json())
        return manifest

    def unpublish(self, uri: str) -> None:
        """Remove the marker first: from now a reader sees the output as unfinished."""
        storage.remove(self.manifest_uri(uri))

    def clear(self, uri: str) -> None:
        """Remove the whole output (marker first)."""
        self.unpublish(uri)
        storage.remove(self.locate(uri))

    def _listed(self, folder: str) -> dict[str, list[str]]:
        names = sorted(_sizes(folder))
        listed: dict[str, list[str]] = {}
        for table in self.table_specs():
            if table.file is None:
                listed[table.name] = [n for n in names if n.endswith(".parquet")]
            elif table.file in names:
                listed[table.name] = [table.file]
            elif not table.optional:
                raise FileNotFoundError(f"{folder} lacks {table.file}; cannot publish")
        return listed


def _sizes(folder: str) -> dict[str, int]:
    """Name → size of every file directly in ``folder`` (one listing, also on S3)."""
    filesystem, path = storage.arrow_filesystem(folder)
    selector = pafs.FileSelector(path, recursive=False, allow_not_found=True)
    return {
        info.base_name: int(info.size or 0)
        for info in filesystem.get_file_info(selector)
        if info.type == pafs.FileType.File and not info.base_name.startswith(".")
    }


def _count_rows(files: list[str]) -> int:
    if not files:
        return 0
    filesystem, _ = storage.arrow_filesystem(files[0])
    paths = [storage.arrow_filesystem(f)[1] for f in files]
    return int(pads.dataset(paths, filesystem=filesystem, format="parquet").count_rows())


def identities(inputs: Mapping[str, Manifest | str]) -> dict[str, str]:
    """Each input's identity: an upstream output's (its manifest's), or the string given for
    what is no stage output (a network's content hash, a digest of a photo source)."""
    return {k: v.identity if isinstance(v, Manifest) else str(v) for k, v in inputs.items()}


def upstream(**inputs: tuple[Output, str]) -> dict[str, Manifest]:
    """The manifests of a stage's inputs, keyed by flag name (``images=(IMAGES_OUTPUT, uri)``);
    every input that is missing, unfinished or of another stage is named at once, one line each
    (``--images: …``)."""
    found, problems = {}, []
    for name, (output, uri) in inputs.items():
        try:
            found[name] = output.manifest(uri)
        except (OSError, ValueError) as err:
            problems.append(f"--{name.replace('_', '-')}: {err}")
    raise_problems(problems)
    return found


# ----------------------------------------------------------------------------- the tables

_VECTOR = pa.list_(pa.float32())

TABLES: dict[str, Table] = {}
OUTPUTS: dict[str, Output] = {}


def _table(
    name: str,
    stage: str,
    fields: list[tuple[str, pa.DataType]],
    *,
    file: str | None,
    optional: bool = False,
) -> Table:
    spec = Table(name, stage, pa.schema(fields), file, optional)
    TABLES[name] = spec
    return spec


def _output(stage: str, tables: Sequence[Table], folder: str | None = None) -> Output:
    spec = Output(stage, tuple(t.name for t in tables), folder=folder)
    OUTPUTS[stage] = spec
    return spec


IMAGES = _table(
    "images",
    "ingest",
    [
        ("image_id", pa.string()),  # null when the photo failed
        ("uri", pa.string()),
        ("width", pa.int32()),  # upright (EXIF rotation applied)
        ("height", pa.int32()),
        ("scene", pa.string()),
        ("label", pa.string()),
        ("error", pa.string()),  # null when fine, else "<kind>: <detail>"
        ("format", pa.string()),  # as PIL names it
        ("size_bytes", pa.int64()),
        ("bytes", pa.binary()),  # the encoded photo, null when it failed
    ],
    file=None,
)
"""ingest: one row per source URI; usable exactly when ``error`` is null."""

DESCRIPTORS = _table(
    "descriptors",
    "extract",
    [
        ("image_id", pa.string()),
        ("vector", _VECTOR),  # L2-normalised; null when the photo could not be described
        ("error", pa.string()),
    ],
    file=None,
)
"""extract: one row per usable photo (vectors of one dimension)."""

GROUPS = _table(
    "groups",
    "group",
    [
        ("image_id", pa.string()),
        ("group_id", pa.int64()),
    ],
    file="groups.parquet",
)
"""group: each usable, described photo's candidate scene (-1: a singleton)."""

CANDIDATES = _table(
    "candidates",
    "group",
    [
        ("image_id", pa.string()),
        ("group_id", pa.int64()),
        ("similarity", pa.float32()),
    ],
    file="candidates.parquet",
    optional=True,
)
"""group: leftover photos offered to other groups for SfM."""

SFM_IMAGES = _table(
    "sfm_images",
    "sfm",
    [
        ("image_id", pa.string()),
        ("group_id", pa.int64()),
        ("attached", pa.bool_()),
        ("model_id", pa.string()),
        ("registered", pa.bool_()),
        ("cluster_id", pa.int64()),
        ("centre_x", pa.float64()),
        ("centre_y", pa.float64()),
        ("centre_z", pa.float64()),
        ("point3d_ids", pa.list_(pa.int64())),
        ("scale", pa.float64()),
        ("observations", pa.int64()),
    ],
    file="sfm_images.parquet",
)
"""sfm: one row per grouped photo, its model and 3D points where registered."""

SFM_MODELS = _table(
    "sfm_models",
    "sfm",
    [
        ("model_id", pa.string()),
        ("group_id", pa.int64()),
        ("images", pa.int64()),
        ("points", pa.int64()),
        ("mean_reprojection_error", pa.float64()),
        ("mean_track_length", pa.float64()),
        ("mapper", pa.string()),
        ("seconds", pa.float64()),
    ],
    file="sfm_models.parquet",
)

SFM_GROUPS = _table(
    "sfm_groups",
    "sfm",
    [
        ("group_id", pa.int64()),
        ("photos", pa.int64()),
        ("offered", pa.int64()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("seconds", pa.float64()),
    ],
    file="sfm_groups.parquet",
)

PAIRS = _table(
    "pairs",
    "pairs",
    [
        ("query_id", pa.string()),
        ("positives", pa.list_(pa.string())),
        ("overlaps", pa.list_(pa.float32())),
        ("cluster_id", pa.int64()),
        ("model_id", pa.string()),
    ],
    file="pairs.parquet",
)
"""pairs: each query's positive candidates, best first."""

WHITENING_PAIRS = _table(
    "whitening_pairs",
    "pairs",
    [
        ("query_id", pa.string()),
        ("positive_id", pa.string()),
    ],
    file="whitening_pairs.parquet",
)
"""pairs: each query with its most overlapping positive (learned whitening)."""

POOL = _table(
    "pool",
    "pairs",
    [
        ("image_id", pa.string()),
        ("cluster_id", pa.int64()),
        ("model_id", pa.string()),
    ],
    file="pool.parquet",
)
"""pairs: every photo with a cluster (training's negative pool), its 3D model if registered."""

INDEX_IDS = _table(
    "index_ids",
    "index",
    [
        ("id", pa.int64()),
        ("image_id", pa.string()),
    ],
    file=None,
)
"""index: a shard's id map (global id, image_id), beside the shard's FAISS file."""

LOCAL_FEATURES = _table(
    "local_features",
    "features",
    [
        ("image_id", pa.string()),
        ("keypoints", pa.binary()),  # float32 [n, 4]: x, y, scale, orientation (row-major)
        ("descriptors", pa.binary()),  # uint8 [n, 128]: RootSIFT times 512, as COLMAP keeps it
        ("width", pa.int32()),  # the frame the keypoints are in
        ("height", pa.int32()),
        ("error", pa.string()),
    ],
    file=None,
)
"""features: one row per usable photo, its local features for spatial re-ranking; a row group
per photo, so a service reads one candidate's features without its neighbours'."""

IMAGES_OUTPUT = _output("ingest", [IMAGES], folder="images.parquet")
DESCRIPTORS_OUTPUT = _output("extract", [DESCRIPTORS])
GROUPS_OUTPUT = _output("group", [GROUPS, CANDIDATES])
SFM_OUTPUT = _output("sfm", [SFM_IMAGES, SFM_MODELS, SFM_GROUPS])
PAIRS_OUTPUT = _output("pairs", [PAIRS, WHITENING_PAIRS, POOL])
LOCAL_FEATURES_OUTPUT = _output("features", [LOCAL_FEATURES])
CAMERAS = _table(
    "cameras",
    "landmarks",
    [
        ("name", pa.string()),
        ("role", pa.string()),
        ("landmark", pa.int32()),
        ("fx", pa.float64()),
        ("fy", pa.float64()),
        ("cx", pa.float64()),
        ("cy", pa.float64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("R", pa.list_(pa.float64(), 9)),
        ("t", pa.list_(pa.float64(), 3)),
        ("centre", pa.list_(pa.float64(), 3)),
        ("landmark_centre", pa.list_(pa.float64(), 3)),
    ],
    file="cameras.parquet",
)
"""landmarks: the built-in collection's cameras, a row per photo (``model.datasets.landmarks``)."""

LANDMARKS_OUTPUT = _output("landmarks", [CAMERAS])
TRAIN_OUTPUT = _output("train", [])
"""train: a checkpoint (``model.checkpoint``) with its metrics; the manifest completes the run."""
WHITEN_OUTPUT = _output("whiten", [])
"""whiten: a checkpoint with its learned whitening."""
INDEX_VERSION = _output("index", [])
"""index: a version folder ``INDEX/vN`` (FAISS shards and id maps listed in ``details``)."""

RUN_LAYOUT: dict[str, str] = {
    "ingest": IMAGES_OUTPUT.folder or "images.parquet",
    "extract": "descriptors",
    "group": "groups",
    "sfm": "sfm",
    "pairs": "pairs",
    "train": "train",
    "extract-trained": "descriptors-trained",
    "features": "local_features",
    "index": "index",
}
"""A run folder (``pipeline.run``): where each stage of the chain writes under it (both
extracts write descriptors: off the shelf, then with the run's fine-tuned network)."""
RUN_SUMMARY = "run.json"
"""A run folder's summary: the source, and what each stage did in how many seconds."""
