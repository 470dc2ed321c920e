"""The ingest stage: a photo collection becomes one table of checked photos with their bytes.

``python -m pipeline.ingest --source SRC --output OUT`` writes ``OUT/images.parquet``.

Why: every later stage needs the same thing from a collection, whatever it came as (a folder,
an ``s3://`` prefix, a manifest of local, ``s3://`` and web URIs): each photo once, keyed by
the hash of its bytes, its upright size, its scene and label where known, and the bytes
themselves, so that no later stage ever fetches a URL again or meets a photo it cannot decode.
A photo that cannot be had (a 404, a timeout, too big, not an image, truncated, a
decompression bomb, too small) is a row with its reason, never a stop.

How:

1. Everything that can be wrong with the input is checked first and reported at once (nothing
   at the source, a manifest without a ``uri`` column or that cannot be read, a bucket that
   does not exist, an output of another schema, bad settings), before any photo is fetched.
2. The source becomes a list of unique URIs with their ``scene`` and ``label``. A folder or
   prefix is searched recursively for ``.jpg``/``.jpeg``/``.png`` files; the scene is the
   sub-folder relative to the source (null for photos directly in it). Relative paths in a
   manifest are relative to the manifest's folder; local paths are made absolute.
3. Resume: the URIs already in complete part files are taken away (an anti-join on ``uri``),
   so an interrupted ingest of a million URLs fetches only what is missing. Rows that failed
   transiently (5xx, 408, 429, timeouts, dropped connections, I/O errors) are taken out of
   their parts first and fetched again, unless ``--no-retry-transient``; final failures (404,
   not an image, ...) stay as they are. An output whose marker covers exactly this source
   and holds no transient failure is skipped at once.
4. On Ray Data, the missing URIs are split into blocks of ``batch_size``; each block is one
   task (``map_batches`` with a function: nothing is held between batches) that fetches its
   URIs on a thread pool (``pipeline.ingest.fetch``: the web policy), checks each photo by a full
   decode (``model.images``, EXIF rotation applied), and writes its rows as one part file.
   Only a small summary per row (uri, image_id, error) comes back to the driver, never the
   photo bytes. A Ray task that is retried writes the same part name again.
5. Once every URI of the source has its row, the marker is written last.

Layout: ``OUT/images.parquet/`` is a folder of ``part-<run>-<batch>.parquet`` files and a
``_SUCCESS`` marker (JSON: the settings, the source's URI count and digest, the counts). Each
part is written whole or not at all (a temporary name, then a rename; one PUT on S3), so after
a kill every part there is complete and the anti-join can trust it. Ray Data
(``read_parquet``), pyarrow and pandas read the folder as one dataset. One row per source URI:
byte-identical photos at two URIs are two rows sharing an ``image_id`` (later stages key by
``image_id`` and keep one). ``IMAGES_SCHEMA`` gives the columns; ``read_images`` and
``read_images_dataset`` read a complete output without knowing its layout, and
``check_images_schema`` names what is wrong with a table of another schema.

Nothing here imports torch (pycolmap in later stages crashes when torch came first).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pprint
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from model import storage
from model.datasets.sets import IMAGE_SUFFIXES
from model.images import DEFAULT_MAX_PIXELS, MIN_SIDE, BadImage, open_image, read_size
from pipeline.ingest.fetch import FetchPolicy, failure_kind, fetch, http_session, is_transient

if TYPE_CHECKING:
    import ray.data
    import requests

# What PIL and requests import on first use is imported now, while a worker loads this module in
# one thread: those first imports, made by sixteen fetching threads at once, deadlocked in
# importlib's module locks (CPython 3.11; Ray workers run a garbage-collection thread) and left
# an ingest task waiting forever.
import encodings.idna  # noqa: F401  (requests, for host names)

import pandas  # noqa: F401  (Ray Data checks a task's output with it, imported lazily)

Image.init()  # every image plugin

__all__ = [
    "IMAGES_FILE",
    "IMAGES_SCHEMA",
    "IMAGE_ID_CHARS",
    "IngestConf",
    "check_images_schema",
    "image_id",
    "images_uri",
    "read_images",
    "read_images_dataset",
    "run",
]

logger = logging.getLogger(__name__)

IMAGES_FILE = "images.parquet"
"""The name of ingest's output folder inside ``OUT``."""

IMAGE_ID_CHARS = 20
"""Hex characters of the SHA-256 of a photo's bytes kept as its ``image_id`` (80 bits)."""

IMAGES_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string()),  # null when the photo failed
        pa.field("uri", pa.string(), nullable=False),
        pa.field("width", pa.int32()),  # upright (EXIF rotation applied)
        pa.field("height", pa.int32()),
        pa.field("scene", pa.string()),
        pa.field("label", pa.string()),
        pa.field("error", pa.string()),  # null when fine, else "<kind>: <detail>"
        pa.field("format", pa.string()),  # as PIL names it: JPEG, PNG, ...
        pa.field("size_bytes", pa.int64()),
        pa.field("bytes", pa.binary()),  # the encoded photo, null when it failed
    ]
)
"""The columns of ``images.parquet``; a row is usable exactly when ``error`` is null, and then
``image_id``, ``width``, ``height``, ``format``, ``size_bytes`` and ``bytes`` are set."""

_RESULT_SCHEMA = pa.schema(
    [("uri", pa.string()), ("image_id", pa.string()), ("error", pa.string()), ("part", pa.string())]
)
_MARKER_FORMAT = "cirray.images/1"
_DECODES_AT_ONCE = 2  # full decodes per task at a time: bounds its memory and CPU
_READ_THREADS = 16
_SOURCE_HINT = "expected a folder of photos, an s3:// prefix, or a .csv/.parquet manifest"


@dataclass(frozen=True)
class IngestConf:
    """Ingest a photo collection into ``OUTPUT/images.parquet``."""

    source: str
    """A folder of photos (a sub-folder per scene), an ``s3://`` prefix, or a ``.csv`` /
    ``.parquet`` manifest with a ``uri`` column (local paths, ``s3://``, ``http(s)://``) and
    optional ``scene`` and ``label`` columns."""
    output: str
    """Folder or ``s3://`` prefix to write ``images.parquet`` under."""
    batch_size: int = 64
    """Photos per Ray task and per part file (keep a part's bytes to tens of MB)."""
    workers: int = 0
    """Ray tasks running at once; 0: as many as the cluster's CPUs allow."""
    cpus_per_task: float = 1.0
    """CPUs Ray reserves for each task (fetching waits on the network; decoding uses CPU)."""
    threads: int = 16
    """Web requests in flight at once per task."""
    timeout_s: float = FetchPolicy.timeout_s
    """Seconds to wait for a connection or for the next bytes of an answer."""
    total_timeout_s: float = FetchPolicy.total_timeout_s
    """Seconds one attempt at a web photo may take in all."""
    retries: int = FetchPolicy.retries
    """Further attempts after a 5xx, 408, 429, timeout or dropped connection (never for 4xx)."""
    backoff_s: float = FetchPolicy.backoff_s
    """Delay before the first retry, doubling for each further one."""
    max_bytes: int = FetchPolicy.max_bytes
    """Largest photo accepted, in bytes; longer ones fail as ``too big``."""
    min_side: int = MIN_SIDE
    """Photos with a side shorter than this many pixels fail as ``too small``."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Photos with more pixels fail as a ``decompression bomb``."""
    retry_transient: bool = True
    """On a re-run, fetch again the photos that failed transiently (5xx, timeouts, ...)."""

    def policy(self) -> FetchPolicy:
        return FetchPolicy(
            timeout_s=self.timeout_s,
            total_timeout_s=self.total_timeout_s,
            retries=self.retries,
            backoff_s=self.backoff_s,
            max_bytes=self.max_bytes,
        )

    def problems(self) -> list[str]:
        """What is wrong with the settings, one message each."""
        out = self.policy().problems()
        for name in ("batch_size", "threads", "min_side", "max_pixels"):
            if getattr(self, name) < 1:
                out.append(
                    f"{name.replace('_', ' ')} must be at least 1, not {getattr(self, name)}"
                )
        if self.workers < 0:
            out.append(f"workers must be 0 (as many as fit) or more, not {self.workers}")
        if self.cpus_per_task <= 0:
            out.append(f"cpus per task must be positive, not {self.cpus_per_task}")
        return out


@dataclass(frozen=True)
class _Settings:
    """What a task needs to fetch and check photos (sent to every task)."""

    policy: FetchPolicy
    threads: int
    min_side: int
    max_pixels: int


@dataclass(frozen=True)
class _Photo:
    error: str | None = None
    data: bytes | None = None
    image_id: str | None = None
    width: int | None = None
    height: int | None = None
    format: str | None = None


# ----------------------------------------------------------------------------- public API


def image_id(data: bytes) -> str:
    """A photo's key: the first ``IMAGE_ID_CHARS`` hex characters of the SHA-256 of its bytes."""
    return hashlib.sha256(data).hexdigest()[:IMAGE_ID_CHARS]


def images_uri(uri: str) -> str:
    """``OUT/images.parquet`` for ``OUT`` or for ``OUT/images.parquet`` itself."""
    text = str(uri).rstrip("/")
    return text if text.rsplit("/", 1)[-1] == IMAGES_FILE else storage.join(text, IMAGES_FILE)


def check_images_schema(
    schema: pa.Schema, where: str = IMAGES_FILE, columns: Sequence[str] | None = None
) -> None:
    """Raise ``ValueError`` naming every missing or mistyped column of ``IMAGES_SCHEMA`` (only
    ``columns`` of it when given) in ``schema``; extra columns are allowed."""
    wanted = list(columns) if columns is not None else IMAGES_SCHEMA.names
    unknown = [c for c in wanted if c not in IMAGES_SCHEMA.names]
    if unknown:
        raise ValueError(f"no such images.parquet columns: {', '.join(unknown)}")
    missing = [c for c in wanted if c not in schema.names]
    mistyped = [
        f"{c} is {schema.field(c).type}, expected {IMAGES_SCHEMA.field(c).type}"
        for c in wanted
        if c in schema.names and not schema.field(c).type.equals(IMAGES_SCHEMA.field(c).type)
    ]
    if missing or mistyped:
        what = ([f"missing column(s) {', '.join(missing)}"] if missing else []) + mistyped
        raise ValueError(
            f"{where} is not an images table written by pipeline.ingest: {'; '.join(what)}"
        )


def read_images(
    uri: str, columns: Sequence[str] | None = None, *, ok_only: bool = False
) -> pa.Table:
    """The rows of a complete ingest output (``OUT`` or ``OUT/images.parquet``) as one table.

    ``columns`` picks columns (all of ``IMAGES_SCHEMA`` by default), ``ok_only`` keeps the
    usable rows (``error`` null). ``FileNotFoundError`` when there is no output there,
    ``ValueError`` when it is unfinished or of another schema.
    """
    parts = _complete_parts(images_uri(uri))
    cols = list(columns) if columns is not None else IMAGES_SCHEMA.names
    check_images_schema(IMAGES_SCHEMA, columns=cols)  # unknown column names
    read = [*cols, "error"] if ok_only and "error" not in cols else cols
    with ThreadPoolExecutor(_READ_THREADS) as pool:
        tables = list(pool.map(partial(_read_part, columns=read), parts))
    problems = [t for t in tables if isinstance(t, str)]
    if problems:
        raise ValueError("\n".join(problems))
    schema = pa.schema([IMAGES_SCHEMA.field(c) for c in read])
    table = pa.concat_tables([t.cast(schema) for t in tables]) if tables else schema.empty_table()
    if ok_only:
        table = table.filter(pc.is_null(table["error"])).select(cols)
    return table


def read_images_dataset(uri: str, columns: Sequence[str] | None = None) -> ray.data.Dataset:
    """A complete ingest output as a Ray dataset (one block per part file, lazily read)."""
    import ray.data

    images = images_uri(uri)
    parts = _complete_parts(images)
    if not parts:
        raise ValueError(f"{images} holds no part files")
    if columns is not None:
        check_images_schema(IMAGES_SCHEMA, columns=columns)
    first = _read_part(parts[0], columns=[])
    if isinstance(first, str):
        raise ValueError(first)
    dataset = ray.data.read_parquet(parts)
    return dataset.select_columns(list(columns)) if columns is not None else dataset


# ----------------------------------------------------------------------------- the stage


def run(conf: IngestConf) -> str:
    """Ingest ``conf.source`` into ``conf.output``; returns the URI of ``images.parquet``."""
    start = time.monotonic()
    logger.info("ingest:\n%s", pprint.pformat(asdict(conf)))
    images = images_uri(conf.output)
    source, problems = _read_source(conf.source)
    problems = conf.problems() + problems + _output_problems(conf.output, images)
    if problems or source is None:
        raise ValueError("\n".join(problems))
    digest = _uri_digest(source["uri"])
    marker = _read_marker(images)
    if (
        marker is not None
        and marker.get("uri_digest") == digest
        and not (conf.retry_transient and marker.get("transient", 0))
    ):
        logger.info("%s is complete for this source; skipping", images)
        logger.info("%s", _summary_line(conf, images, marker, fetched=0, seconds=0.0))
        return images

    existing, problems = _read_existing(images)
    if problems:
        raise ValueError("\n".join(problems))
    retry = _transient_rows(existing, source["uri"]) if conf.retry_transient else None
    done = pc.is_in(source["uri"], existing["uri"])
    if retry is not None:
        done = pc.and_(done, pc.invert(pc.is_in(source["uri"], retry)))
    todo = source.filter(pc.invert(done))
    logger.info(
        "%d photos in the source: %d already ingested, %d to fetch (%d again after a "
        "transient failure)",
        source.num_rows,
        source.num_rows - todo.num_rows,
        todo.num_rows,
        0 if retry is None else len(retry),
    )

    new = _RESULT_SCHEMA.empty_table()
    fetch_start = time.monotonic()
    if todo.num_rows or marker is None or marker.get("uri_digest") != digest:
        storage.remove(storage.join(images, storage.SUCCESS))  # no longer complete
    if retry is not None and len(retry):
        existing = _forget_rows(images, existing, retry)
    if todo.num_rows:
        new = _fetch_missing(todo, conf, images)
    fetch_seconds = time.monotonic() - fetch_start

    rows = pa.concat_tables([existing.select(_RESULT_SCHEMA.names).cast(_RESULT_SCHEMA), new])
    rows = rows.filter(pc.is_in(rows["uri"], source["uri"]))
    distinct = pc.count_distinct(rows["uri"]).as_py()
    if distinct < rows.num_rows:
        logger.warning("%d uris have more than one row in %s", rows.num_rows - distinct, images)
    uncovered = source.num_rows - distinct
    if uncovered:
        raise RuntimeError(f"{uncovered} photos of the source have no row; run ingest again")
    counts = _counts(rows)
    marker = {
        "format": _MARKER_FORMAT,
        "source": conf.source,
        "uris": source.num_rows,
        "uri_digest": digest,
        **counts,
        "conf": asdict(conf),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    storage.write_text(storage.join(images, storage.SUCCESS), json.dumps(marker, indent=1))
    extra = existing.filter(pc.invert(pc.is_in(existing["uri"], source["uri"]))).num_rows
    if extra:
        logger.info("%d rows of uris not in this source stay in %s", extra, images)
    _log_examples(rows)
    logger.info("%s", _summary_line(conf, images, marker, new.num_rows, fetch_seconds))
    logger.info("ingest finished in %.1f s", time.monotonic() - start)
    return images


def _summary_line(
    conf: IngestConf, images: str, marker: dict[str, Any], fetched: int, seconds: float
) -> str:
    failed = marker.get("failed", {})
    by_kind = ", ".join(f"{kind}: {n}" for kind, n in sorted(failed.items(), key=lambda kv: -kv[1]))
    line = (
        f"ingest summary: {marker.get('uris', 0)} photos from {conf.source}: "
        f"{marker.get('ingested', 0)} ingested ({marker.get('duplicates', 0)} byte-identical to "
        f"another), {sum(failed.values())} failed" + (f" ({by_kind})" if by_kind else "")
    )
    if fetched:
        line += f"; {fetched} fetched in this run in {seconds:.1f} s ({fetched / seconds:.1f}/s)"
    else:
        line += "; nothing fetched in this run"
    transient = marker.get("transient", 0)
    if transient:
        line += f"; {transient} failed transiently and are fetched again by a re-run"
    return f"{line}; written to {images}"


def _counts(rows: pa.Table) -> dict[str, Any]:
    errors = rows["error"].to_pylist()
    ok = rows.filter(pc.is_null(rows["error"]))
    return {
        "rows": rows.num_rows,
        "ingested": ok.num_rows,
        "duplicates": ok.num_rows - pc.count_distinct(ok["image_id"]).as_py(),
        "failed": dict(Counter(failure_kind(e) for e in errors if e is not None)),
        "transient": sum(_retried(e) for e in errors),
    }


def _log_examples(rows: pa.Table, per_kind: int = 3) -> None:
    """A few failed rows of each kind, so the summary's counts can be looked into."""
    failed = rows.filter(pc.is_valid(rows["error"]))
    shown: Counter[str] = Counter()
    for uri, error in zip(failed["uri"].to_pylist(), failed["error"].to_pylist(), strict=True):
        kind = failure_kind(error)
        shown[kind] += 1
        if shown[kind] <= per_kind:
            logger.info("failed: %s: %s", uri, error)


def _retried(error: str | None) -> bool:
    """Whether a failed row is fetched again by a re-run (when ``retry_transient``)."""
    return error is not None and (is_transient(error) or failure_kind(error) == "unexpected")


def _uri_digest(uris: pa.ChunkedArray) -> str:
    h = hashlib.sha256()
    for uri in sorted(uris.to_pylist()):
        h.update(uri.encode())
        h.update(b"\n")
    return h.hexdigest()


# ----------------------------------------------------------------------------- input checks


def _read_source(source: str) -> tuple[pa.Table | None, list[str]]:
    """``uri``, ``scene``, ``label`` (strings), one row per unique uri, or the problems."""
    problems = _bucket_problems(source)
    if problems:
        return None, problems
    name = source.rstrip("/").lower()
    try:
        if storage.is_file(source):
            if not name.endswith((".csv", ".parquet")):
                return None, [f"{source} is a file but not a manifest; {_SOURCE_HINT}"]
            table, problems = _read_manifest(source, [source])
        elif not storage.exists(source):
            return None, [f"nothing at {source}; {_SOURCE_HINT}"]
        elif name.endswith(".parquet"):  # a Parquet dataset folder as the manifest
            table, problems = _read_manifest(source, storage.list_files(source, (".parquet",)))
        else:
            table, problems = _list_folder(source)
    except (OSError, ValueError) as err:
        return None, [f"cannot read the source {source}: {' '.join(str(err).split())}"]
    if table is None:
        return None, problems
    uris = table["uri"].to_pylist()
    first: dict[str, int] = {}
    for i, uri in enumerate(uris):
        first.setdefault(uri, i)
    if len(first) < len(uris):
        logger.warning(
            "%d uris are listed more than once in %s; each is ingested once (first listing's "
            "scene and label)",
            len(uris) - len(first),
            source,
        )
        table = table.take(pa.array(sorted(first.values())))
    return table, []


def _bucket_problems(uri: str) -> list[str]:
    problem = storage.bucket_problem(uri)
    return [problem] if problem else []


def _read_manifest(source: str, files: list[str]) -> tuple[pa.Table | None, list[str]]:
    tables, problems = [], []
    for uri in files:
        try:
            tables.append(_manifest_table(uri))
        except (OSError, ValueError, pa.ArrowException) as err:
            problems.append(f"{uri} is not a readable manifest: {' '.join(str(err).split())}")
    if problems:
        return None, problems
    if not tables:
        return None, [f"{source} holds no .parquet files"]
    for uri, table in zip(files, tables, strict=True):
        if "uri" not in table.column_names:
            cols = ", ".join(table.column_names) or "none"
            problems.append(
                f"{uri} has no uri column (its columns: {cols}); a manifest needs a uri column "
                "of local paths, s3:// or http(s):// URIs, and may have scene and label columns"
            )
    if problems:
        return None, problems
    base = _parent(source)  # relative paths are relative to the manifest's folder
    out = []
    for uri, table in zip(files, tables, strict=True):
        columns = {}
        for name in ("uri", "scene", "label"):
            column = table[name] if name in table.column_names else pa.nulls(table.num_rows)
            try:
                columns[name] = pc.cast(column, pa.string())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                problems.append(f"{uri}: the {name} column is {column.type}, expected text")
        if problems:
            continue
        values = columns["uri"].to_pylist()
        empty = [i for i, v in enumerate(values) if v is None or not v.strip()]
        if empty:
            rows = ", ".join(str(i + 1) for i in empty[:5]) + (", ..." if len(empty) > 5 else "")
            rows_word = "row" if len(empty) == 1 else "rows"
            problems.append(
                f"{uri}: {len(empty)} {rows_word} with an empty uri (data {rows_word} {rows})"
            )
            continue
        columns["uri"] = pa.array([_resolve(v.strip(), base) for v in values], pa.string())
        out.append(pa.table(columns))
    if problems:
        return None, problems
    table = pa.concat_tables(out)
    if not table.num_rows:
        return None, [f"{source} lists no photos"]
    return table, []


def _manifest_table(uri: str) -> pa.Table:
    data = storage.read_bytes(uri)
    if uri.lower().endswith(".csv"):
        from pyarrow import csv

        text_columns = {name: pa.string() for name in ("uri", "scene", "label")}
        return csv.read_csv(
            io.BytesIO(data),
            convert_options=csv.ConvertOptions(column_types=text_columns, strings_can_be_null=True),
        )
    return pq.read_table(io.BytesIO(data))


def _parent(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[0] if "/" in uri.rstrip("/") else "."


def _resolve(uri: str, base: str) -> str:
    """A manifest's uri: remote as is, a local path absolute (relative to the manifest)."""
    if storage.is_remote(uri):
        return uri
    path = uri.removeprefix("file://")
    if os.path.isabs(os.path.expanduser(path)):
        return os.path.abspath(os.path.expanduser(path))
    if storage.is_remote(base):
        return storage.join(base, path)
    return os.path.abspath(os.path.join(storage.local_path(base), path))


def _list_folder(source: str) -> tuple[pa.Table | None, list[str]]:
    root = source.rstrip("/") if storage.is_remote(source) else os.path.abspath(source)
    files = storage.list_files(root, IMAGE_SUFFIXES)
    if not files:
        return None, [f"no photos ({', '.join(IMAGE_SUFFIXES)}) under {source}"]
    scenes = [f[len(root) + 1 :].rpartition("/")[0] or None for f in files]
    return pa.table(
        {
            "uri": files,
            "scene": pa.array(scenes, pa.string()),
            "label": pa.nulls(len(files), pa.string()),
        }
    ), []


def _output_problems(output: str, images: str) -> list[str]:
    problems = _bucket_problems(output)
    if problems:
        return problems
    try:
        if storage.is_file(output):
            return [f"the output {output} is a file; give a folder or an s3:// prefix"]
        if storage.is_file(images):
            return [
                f"{images} is a single file, not an ingest output folder; choose another output"
            ]
    except (OSError, ValueError) as err:
        return [f"cannot reach the output {output}: {' '.join(str(err).split())}"]
    return []


# ----------------------------------------------------------------------------- what is there


def _read_part(uri: str, columns: Sequence[str]) -> pa.Table | str:
    """The ``columns`` of one part file (only those bytes are read), or what is wrong with it."""
    try:
        filesystem, path = storage.arrow_filesystem(uri)
        with filesystem.open_input_file(path) as handle:
            parquet = pq.ParquetFile(handle)
            check_images_schema(parquet.schema_arrow, where=uri)
            return parquet.read(columns=list(columns))
    except ValueError as err:
        return str(err)
    except (OSError, pa.ArrowException) as err:
        return f"{uri} is not a readable Parquet file ({err}); delete it and run ingest again"


def _complete_parts(images: str) -> list[str]:
    if not storage.exists(images):
        raise FileNotFoundError(f"no {IMAGES_FILE} at {images}; run pipeline.ingest first")
    if not storage.is_complete(images):
        raise ValueError(
            f"{images} is unfinished (no {storage.SUCCESS} marker); run pipeline.ingest again "
            "to complete it"
        )
    return storage.list_files(images, (".parquet",), recursive=False)


def _read_marker(images: str) -> dict[str, Any] | None:
    try:
        marker = json.loads(storage.read_text(storage.join(images, storage.SUCCESS)))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("format") == _MARKER_FORMAT else None


def _read_existing(images: str) -> tuple[pa.Table, list[str]]:
    """uri, image_id, error and part name of every row already written, or the problems."""
    empty = _RESULT_SCHEMA.empty_table()
    if not storage.exists(images):
        return empty, []
    parts = storage.list_files(images, (".parquet",), recursive=False)
    with ThreadPoolExecutor(_READ_THREADS) as pool:
        tables = list(pool.map(partial(_read_part, columns=["uri", "image_id", "error"]), parts))
    problems = [t for t in tables if isinstance(t, str)]
    if problems:
        return empty, problems
    named = [
        t.append_column("part", pa.array([p.rsplit("/", 1)[-1]] * t.num_rows, pa.string()))
        for p, t in zip(parts, tables, strict=True)
    ]
    return (pa.concat_tables(named).cast(_RESULT_SCHEMA) if named else empty), []


def _transient_rows(existing: pa.Table, source_uris: pa.ChunkedArray) -> pa.Array:
    """The uris of the source whose rows failed transiently (rows of other uris stay)."""
    rows = existing.filter(pc.is_in(existing["uri"], source_uris))
    errors = rows["error"].to_pylist()
    uris = rows["uri"].to_pylist()
    return pa.array([u for u, e in zip(uris, errors, strict=True) if _retried(e)], pa.string())


def _forget_rows(images: str, existing: pa.Table, uris: pa.Array) -> pa.Table:
    """Take the rows of ``uris`` out of their parts (rewritten whole, or removed when empty)."""
    drop = pc.is_in(existing["uri"], uris)
    for part in sorted(set(existing.filter(drop)["part"].to_pylist())):
        uri = storage.join(images, part)
        table = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
        kept = table.filter(pc.invert(pc.is_in(table["uri"], uris)))
        if kept.num_rows:
            storage.write_bytes(uri, _parquet_bytes(kept.cast(IMAGES_SCHEMA)))
        else:
            storage.remove(uri)
    return existing.filter(pc.invert(drop))


# ----------------------------------------------------------------------------- the Ray part


def _fetch_missing(todo: pa.Table, conf: IngestConf, images: str) -> pa.Table:
    """Fetch and check ``todo`` on Ray Data, a part file per block; the rows' summaries."""
    import ray.data

    run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.urandom(2).hex()}"
    blocks = [
        todo.take(pa.array(range(i, min(i + conf.batch_size, todo.num_rows))))
        for i in range(0, todo.num_rows, conf.batch_size)
    ]
    settings = _Settings(conf.policy(), conf.threads, conf.min_side, conf.max_pixels)
    compute = ray.data.TaskPoolStrategy(size=conf.workers) if conf.workers else None
    results = ray.data.from_arrow(blocks).map_batches(
        _ingest_batch,
        batch_size=None,  # a block is a batch is a part file
        batch_format="pyarrow",
        fn_kwargs={"images": images, "run_id": run_id, "settings": settings},
        compute=compute,
        num_cpus=conf.cpus_per_task,
        # Workers of their own (as for SfM): never one that ran another stage's tasks and its
        # imports; a reused worker's fetching threads were seen to fail mid-import.
        runtime_env={"env_vars": {"CIRRAY_INGEST_WORKER": "1"}},
    )
    tables = list(results.iter_batches(batch_size=None, batch_format="pyarrow"))
    return (
        pa.concat_tables([t.cast(_RESULT_SCHEMA) for t in tables])
        if tables
        else (_RESULT_SCHEMA.empty_table())
    )


def _ingest_batch(batch: pa.Table, *, images: str, run_id: str, settings: _Settings) -> pa.Table:
    """One task: fetch and check a block of photos, write them as one part file."""
    uris = batch["uri"].to_pylist()
    decoding = threading.BoundedSemaphore(_DECODES_AT_ONCE)
    with (
        http_session(settings.threads) as session,
        ThreadPoolExecutor(max(1, min(settings.threads, len(uris)))) as pool,
    ):
        one = partial(_ingest_one, settings=settings, session=session, decoding=decoding)
        photos = list(pool.map(one, uris))
    table = pa.table(
        {
            "image_id": [p.image_id for p in photos],
            "uri": uris,
            "width": [p.width for p in photos],
            "height": [p.height for p in photos],
            "scene": batch["scene"],
            "label": batch["label"],
            "error": [p.error for p in photos],
            "format": [p.format for p in photos],
            "size_bytes": [None if p.data is None else len(p.data) for p in photos],
            "bytes": [p.data for p in photos],
        },
        schema=IMAGES_SCHEMA,
    )
    name = f"part-{run_id}-{hashlib.sha1(chr(10).join(uris).encode()).hexdigest()[:12]}.parquet"
    storage.write_bytes(storage.join(images, name), _parquet_bytes(table))
    return pa.table(
        {
            "uri": uris,
            "image_id": table["image_id"],
            "error": table["error"],
            "part": [name] * len(uris),
        },
        schema=_RESULT_SCHEMA,
    )


def _ingest_one(
    uri: str, *, settings: _Settings, session: requests.Session, decoding: threading.Semaphore
) -> _Photo:
    try:
        got = fetch(uri, settings.policy, session)
        if got.error is not None or got.data is None:
            return _Photo(error=got.error or "missing: no bytes")
        with decoding:
            return _check(got.data, settings)
    except Exception as err:  # one photo's surprise must not stop a million: a row, retried
        return _Photo(error=f"unexpected: {type(err).__name__}: {' '.join(str(err).split())}")


def _check(data: bytes, settings: _Settings) -> _Photo:
    """The photo in ``data`` fully decoded (EXIF rotation applied), or why it is unusable."""
    size = read_size(data, exif_transpose=True, max_pixels=settings.max_pixels)
    if isinstance(size, BadImage):
        reason = size.reason
        if reason.startswith("decompression bomb"):
            return _Photo(error=reason)
        if "decompression bomb" in reason.lower():  # PIL's own limit, met before ours
            return _Photo(error=f"decompression bomb: {reason}")
        return _Photo(error=f"not an image: {len(data):,} bytes starting {data[:16]!r} ({reason})")
    image = open_image(data, exif_transpose=True, max_pixels=settings.max_pixels)
    if isinstance(image, BadImage):
        reason = image.reason
        kind = "truncated" if "truncated" in reason.lower() else "corrupt"
        return _Photo(error=f"{kind}: {reason}")
    width, height = image.size
    if min(width, height) < settings.min_side:
        return _Photo(error=f"too small: {width}x{height} px, a side under {settings.min_side} px")
    with Image.open(io.BytesIO(data)) as header:
        image_format = header.format
    return _Photo(
        data=data, image_id=image_id(data), width=width, height=height, format=image_format
    )


_ROW_GROUP = 8
"""Photos per Parquet row group: the search service reads one row group for one thumbnail."""


def _parquet_bytes(table: pa.Table) -> bytes:
    """A part file: the photo bytes stored as they are (already compressed), the rest zstd."""
    small = [n for n in table.column_names if n != "bytes"]
    sink = pa.BufferOutputStream()
    pq.write_table(
        table,
        sink,
        compression={n: ("none" if n == "bytes" else "zstd") for n in table.column_names},
        row_group_size=_ROW_GROUP,
        use_dictionary=small,
        write_statistics=small,
    )
    return sink.getvalue().to_pybytes()
