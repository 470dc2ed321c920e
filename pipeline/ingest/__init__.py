"""The ingest stage: a photo collection becomes one table of checked photos with their bytes.

``python -m pipeline.ingest --source SRC --output OUT`` writes the images output
(``model.tables.IMAGES_OUTPUT``, a folder inside ``OUT``) and returns its location.

Why: every later stage needs the same thing from a collection, whatever it came as (a folder,
an ``s3://`` prefix, a manifest of local, ``s3://`` and web URIs): each photo once, keyed by
the hash of its bytes (``model.images.image_id``), its upright size, its scene and label where
known, and the bytes themselves, so that no later stage ever fetches a URL again or meets a
photo it cannot decode. A photo that cannot be had (a 404, a timeout, too big, not an image,
truncated, a decompression bomb, too small) is a row with its reason, never a stop.

How:

1. Everything that can be wrong with the input is checked first and reported at once (nothing
   at the source, a manifest without a ``uri`` column or that cannot be read, a bucket that
   does not exist, an output of another schema, bad settings), before any photo is fetched.
2. The source becomes a list of unique URIs with their ``scene`` and ``label``. A folder or
   prefix is searched recursively for ``.jpg``/``.jpeg``/``.png`` files; the scene is the
   sub-folder relative to the source (null for photos directly in it). Relative paths in a
   manifest are relative to the manifest's folder; local paths are stored resolved.
3. Resume by fingerprint (the source's rows, digested, and the settings that decide which
   photos pass): an output with this fingerprint and no transient failure is skipped at once;
   one made from another source (photos added) fetches only the URIs not in its parts (an
   anti-join on ``uri``), as does an interrupted run. Rows that failed transiently (5xx, 408,
   429, timeouts, dropped connections, I/O errors) are taken out of their parts and fetched
   again, unless ``--no-retry-transient``. An output made with other settings stops the run
   with one line naming them, unless ``--overwrite``.
4. On Ray Data, the missing URIs are split into blocks of ``batch_size``; each block is one
   task (``map_batches`` with a function: nothing is held between batches) that fetches its
   URIs on a thread pool (``pipeline.ingest.fetch``: the web policy), checks each photo by a full
   decode (``model.images``, EXIF rotation applied), and writes its rows as one part file
   (``IMAGES.write``: photo bytes stored as they are, small row groups so that the service
   reads one thumbnail cheaply). Only a small summary per row (uri, image_id, error) comes back
   to the driver, never the photo bytes. A Ray task that is retried writes the same part again.
5. Once every URI of the source has its row, the manifest is published last (its ``details``:
   the source and the counts).

One row per source URI: byte-identical photos at two URIs are two rows sharing an
``image_id`` (later stages key by ``image_id`` and keep one). Readers use
``model.tables.IMAGES`` (``read``, ``ray_dataset``).

Nothing here imports torch (pycolmap in later stages crashes when torch came first).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from cluster.resources import node_local_problems
from model import storage, tables
from model.cli import log_settings
from model.datasets.sets import IMAGE_SUFFIXES
from model.images import (
    DEFAULT_MAX_PIXELS,
    MIN_SIDE,
    BadImage,
    image_id,
    open_image,
    read_size,
)
from model.tables import IMAGES, IMAGES_OUTPUT, Manifest
from pipeline.ingest.fetch import FetchPolicy, failure_kind, fetch, http_session, is_transient

if TYPE_CHECKING:
    import requests

# What PIL and requests import on first use is imported now, while a worker loads this module in
# one thread: those first imports, made by sixteen fetching threads at once, deadlocked in
# importlib's module locks (CPython 3.11; Ray workers run a garbage-collection thread) and left
# an ingest task waiting forever.
import encodings.idna  # noqa: F401  (requests, for host names)

import pandas  # noqa: F401  (Ray Data checks a task's output with it, imported lazily)
import ray.data
from pyarrow import csv

from model.settings import raise_problems

Image.init()  # every image plugin

__all__ = ["IngestConf", "run"]

logger = logging.getLogger(__name__)

_RESULT_SCHEMA = pa.schema(
    [("uri", pa.string()), ("image_id", pa.string()), ("error", pa.string())]
)
_RESUME_COLUMNS = ["uri", "image_id", "error", "width", "height"]
"""Read from the parts already there: the anti-join's, and enough to tell another schema."""
_DECODES_AT_ONCE = 2  # full decodes per task at a time: bounds its memory and CPU
_SOURCE_HINT = "expected a folder of photos, an s3:// prefix, or a .csv/.parquet manifest"


@dataclass(frozen=True)
class IngestConf:
    """Ingest a photo collection into the images output under ``OUTPUT``."""

    source: str
    """A folder of photos (a sub-folder per scene), an ``s3://`` prefix, or a ``.csv`` /
    ``.parquet`` manifest with a ``uri`` column (local paths, ``s3://``, ``http(s)://``) and
    optional ``scene`` and ``label`` columns."""
    output: str
    """Folder or ``s3://`` prefix to write the images output under."""
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
    overwrite: bool = False
    """Replace an output made with other settings (else the run stops and names them)."""

    def policy(self) -> FetchPolicy:
        return FetchPolicy(
            timeout_s=self.timeout_s,
            total_timeout_s=self.total_timeout_s,
            retries=self.retries,
            backoff_s=self.backoff_s,
            max_bytes=self.max_bytes,
        )

    def content_settings(self) -> dict[str, int]:
        """The settings that decide which photos pass (a final ``too big``, ``too small`` or
        ``decompression bomb``); timeouts and retries only delay a photo (a transient failure
        is fetched again), so they are not part of the output's fingerprint."""
        return {
            "min_side": self.min_side,
            "max_pixels": self.max_pixels,
            "max_bytes": self.max_bytes,
        }

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


# ----------------------------------------------------------------------------- the stage


def run(conf: IngestConf) -> str:
    """Ingest ``conf.source`` into ``conf.output``; returns the images output's folder."""
    start = time.monotonic()
    log_settings(logger, "ingest", conf)
    images = tables.resolve(IMAGES_OUTPUT.locate(conf.output))
    source = _checked_source(conf, images)
    inputs = {"source": _source_digest(source)}
    settings = conf.content_settings()
    action, manifest = IMAGES_OUTPUT.plan(images, inputs, settings, overwrite=conf.overwrite)
    if action == "skip" and manifest is not None and not _retries_due(conf, manifest):
        logger.info("%s is complete for this source; skipping", images)
        logger.info("%s", _summary_line(conf, images, manifest.details, fetched=0, seconds=0.0))
        return images
    if action == "new" and conf.overwrite and storage.exists(IMAGES_OUTPUT.manifest_uri(images)):
        logger.info("replacing %s (--overwrite)", images)
        IMAGES_OUTPUT.clear(images)

    existing = _read_existing(images)
    todo, retry = _missing_rows(conf, source, existing)
    IMAGES_OUTPUT.unpublish(images)  # from now the output is unfinished
    if len(retry):
        _forget_rows(images, retry)
        existing = existing.filter(pc.invert(pc.is_in(existing["uri"], retry)))
    fetch_start = time.monotonic()
    new = _fetch_missing(todo, conf, images) if todo.num_rows else _RESULT_SCHEMA.empty_table()
    fetch_seconds = time.monotonic() - fetch_start

    rows = _source_rows(images, source, existing, new=new)
    details = {"source": _stored_source(conf.source), "uris": source.num_rows, **_counts(rows)}
    IMAGES_OUTPUT.publish(images, inputs=inputs, settings=settings, details=details)
    extra = existing.filter(pc.invert(pc.is_in(existing["uri"], source["uri"]))).num_rows
    if extra:
        logger.info("%d rows of uris not in this source stay in %s", extra, images)
    _log_examples(rows)
    logger.info(
        "%s", _summary_line(conf, images, details, fetched=new.num_rows, seconds=fetch_seconds)
    )
    logger.info("ingest finished in %.1f s", time.monotonic() - start)
    return images


def _checked_source(conf: IngestConf, images: str) -> pa.Table:
    """The source's rows, or ``ValueError`` listing every problem of the input at once."""
    source, problems = _read_source(conf.source)
    problems = conf.problems() + problems + _output_problems(conf.output, images)
    problems += node_local_problems(source=conf.source, output=conf.output)
    if problems or source is None:
        raise ValueError("\n".join(problems))
    return source


def _retries_due(conf: IngestConf, manifest: Manifest) -> bool:
    """Whether a complete output still has transient failures this run fetches again."""
    return conf.retry_transient and bool(manifest.details.get("transient", 0))


def _missing_rows(
    conf: IngestConf, source: pa.Table, existing: pa.Table
) -> tuple[pa.Table, pa.Array]:
    """The source rows to fetch (no row yet, or a transient failure to retry) and the uris
    whose rows are retried."""
    retry = (
        _transient_rows(existing, source["uri"])
        if conf.retry_transient
        else pa.array([], pa.string())
    )
    done = pc.and_(
        pc.is_in(source["uri"], existing["uri"]), pc.invert(pc.is_in(source["uri"], retry))
    )
    todo = source.filter(pc.invert(done))
    logger.info(
        "%d photos in the source: %d already ingested, %d to fetch (%d again after a "
        "transient failure)",
        source.num_rows,
        source.num_rows - todo.num_rows,
        todo.num_rows,
        len(retry),
    )
    return todo, retry


def _source_rows(images: str, source: pa.Table, existing: pa.Table, *, new: pa.Table) -> pa.Table:
    """The summaries of the source's rows, checked to cover every source URI."""
    rows = pa.concat_tables([existing.select(_RESULT_SCHEMA.names).cast(_RESULT_SCHEMA), new])
    rows = rows.filter(pc.is_in(rows["uri"], source["uri"]))
    distinct = pc.count_distinct(rows["uri"]).as_py()
    if distinct < rows.num_rows:
        logger.warning("%d uris have more than one row in %s", rows.num_rows - distinct, images)
    uncovered = source.num_rows - distinct
    if uncovered:
        raise RuntimeError(f"{uncovered} photos of the source have no row; run ingest again")
    return rows


def _stored_source(source: str) -> str:
    """The source as the manifest keeps it: a local path resolved."""
    return tables.resolve(source)


def _summary_line(
    conf: IngestConf, images: str, counts: dict[str, Any], *, fetched: int, seconds: float
) -> str:
    failed = counts.get("failed", {})
    by_kind = ", ".join(f"{kind}: {n}" for kind, n in sorted(failed.items(), key=lambda kv: -kv[1]))
    line = (
        f"ingest summary: {counts.get('uris', 0)} photos from {conf.source}: "
        f"{counts.get('ingested', 0)} ingested ({counts.get('duplicates', 0)} byte-identical to "
        f"another), {sum(failed.values())} failed" + (f" ({by_kind})" if by_kind else "")
    )
    if fetched:
        line += f"; {fetched} fetched in this run in {seconds:.1f} s ({fetched / seconds:.1f}/s)"
    else:
        line += "; nothing fetched in this run"
    transient = counts.get("transient", 0)
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


def _source_digest(source: pa.Table) -> str:
    """The source's identity: its rows (uri, scene, label), in any order."""
    h = hashlib.sha256()
    rows = zip(*(source[c].to_pylist() for c in ("uri", "scene", "label")), strict=True)
    for uri, scene, label in sorted(rows, key=lambda r: r[0]):
        h.update(f"{uri}\t{scene or ''}\t{label or ''}\n".encode())
    return h.hexdigest()[:20]


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
    if uri.lower().endswith(".csv"):
        text_columns = {name: pa.string() for name in ("uri", "scene", "label")}
        return csv.read_csv(
            io.BytesIO(storage.read_bytes(uri)),
            convert_options=csv.ConvertOptions(column_types=text_columns, strings_can_be_null=True),
        )
    return tables.read_parquet_file(uri)


def _parent(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[0] if "/" in uri.rstrip("/") else "."


def _resolve(uri: str, base: str) -> str:
    """A manifest's uri: remote as is, a local path resolved (relative to the manifest)."""
    if storage.is_remote(uri):
        return uri
    path = uri.removeprefix("file://")
    if os.path.isabs(os.path.expanduser(path)):
        return tables.resolve(os.path.expanduser(path))
    if storage.is_remote(base):
        return storage.join(base, path)
    return tables.resolve(os.path.join(storage.local_path(base), path))


def _list_folder(source: str) -> tuple[pa.Table | None, list[str]]:
    root = tables.resolve(source)
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


def _read_existing(images: str) -> pa.Table:
    """uri, image_id and error of every row already written (a finished or an interrupted
    output); ``ValueError`` naming every part that cannot be read or is of another schema."""
    existing, problems = IMAGES.read_unpublished(images, _RESUME_COLUMNS)
    raise_problems(problems)
    return existing.select(_RESULT_SCHEMA.names)


def _transient_rows(existing: pa.Table, source_uris: pa.ChunkedArray) -> pa.Array:
    """The uris of the source whose rows failed transiently (rows of other uris stay)."""
    rows = existing.filter(pc.is_in(existing["uri"], source_uris))
    errors = rows["error"].to_pylist()
    uris = rows["uri"].to_pylist()
    return pa.array([u for u, e in zip(uris, errors, strict=True) if _retried(e)], pa.string())


def _forget_rows(images: str, uris: pa.Array) -> None:
    """Take the rows of ``uris`` out of their parts (rewritten whole, or removed when empty)."""
    for part in IMAGES.parts(images):
        if not pc.any(pc.is_in(IMAGES.read_file(part, ["uri"])["uri"], uris)).as_py():
            continue
        table = IMAGES.read_file(part)
        kept = table.filter(pc.invert(pc.is_in(table["uri"], uris)))
        if kept.num_rows:
            _write_part(images, kept, part.rsplit("/", 1)[-1])
        else:
            storage.remove(part)


# ----------------------------------------------------------------------------- the Ray part


def _fetch_missing(todo: pa.Table, conf: IngestConf, images: str) -> pa.Table:
    """Fetch and check ``todo`` on Ray Data, a part file per block; the rows' summaries."""

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
        schema=IMAGES.schema,
    )
    name = f"part-{run_id}-{hashlib.sha1(chr(10).join(uris).encode()).hexdigest()[:12]}"
    _write_part(images, table, name)
    return pa.table(
        {"uri": uris, "image_id": table["image_id"], "error": table["error"]},
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


def _write_part(images: str, table: pa.Table, name: str) -> None:
    """One part file, whole or never: the photo bytes stored as they are (already
    compressed), the rest zstd, in small row groups."""
    small = [n for n in IMAGES.schema.names if n != "bytes"]
    IMAGES.write(
        images,
        table,
        part=name,
        row_group_size=_ROW_GROUP,
        compression={n: ("none" if n == "bytes" else "zstd") for n in IMAGES.schema.names},
        use_dictionary=small,
        write_statistics=small,
    )
