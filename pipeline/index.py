"""The index stage: a sharded, versioned FAISS index of the descriptors, built on Ray.

    python -m pipeline.index --descriptors OUT/descriptors --output OUT/index [--shards 4]

1. **Validate** everything before the long work, and report every problem at once: the
   descriptors output is complete (``model.descriptors``: its manifest, one dimension, finite
   vectors, unique image_ids; the parts stream past a batch at a time and only each
   row's image_id and place are kept); its network and dimension are the index's; the factory
   string is one FAISS accepts; the flags make sense; the output's S3 bucket exists.
2. **Plan** by fingerprint (``model.tables.INDEX_VERSION``): the descriptors' identity and the
   content settings (:func:`content_settings`: the factory in use, the metric, the network)
   against the latest version's. The same: nothing to do. The same settings, other
   descriptors: a next version of the rows the index lacks. Other settings (``--factory``,
   another network): the run stops with one line naming them, unless ``--overwrite``, which
   removes the index's versions and builds it again from v1.
3. **Choose** the index (``--factory auto``: the rule of :func:`choose_factory`) or take the
   factory string given. The metric is inner product (descriptors are L2-normalised).
4. **Train once** on a seeded sample of the descriptors (:func:`train_index`; the size from the
   factory's needs, :func:`train_size_for`) in a Ray task (``--train-cpus`` CPUs, as many FAISS
   threads, and the memory the sample needs) that reads the sample's rows from the stored parts;
   the trained, empty index is stored.
5. **Add in parallel**: the new rows, in image_id order with consecutive global ids, are split
   into ``--shards`` contiguous runs; one Ray task per run reads its rows' vectors straight from
   the stored parts, deserialises the trained index, adds them, and writes the shard file and
   its id map through the storage layer.
6. **Tune** ``nprobe`` for IVF indexes (:func:`tune_nprobe`): the smallest number of lists that
   holds ``--target-recall`` of the exact top-10 neighbours of sampled descriptors, in a Ray task
   that streams the new rows past the sampled queries.
7. **Publish**: the version's manifest is written last; before it the version does not exist.

Versions. A next version indexes only the image_ids the latest version lacks, as version N+1:
its manifest lists the earlier shard files (by their relative paths, unchanged) plus new shards
built from the same trained index (the same IVF quantizer and PQ codebooks; nothing is
retrained). When nothing is new the run changes nothing and returns the latest version.
Versions only grow: an image_id missing from the descriptors stays in the index.

Resuming. A killed build leaves ``vN/`` without a manifest, invisible to readers; the previous
version stays the latest. The next run with the same inputs finds ``vN/_build/plan.json`` (a
digest of the factory, the shard split, the new rows' ids and places and the descriptors'
identity): it reuses the trained index and every shard whose receipt and files' checksums
match, and builds the rest. Other inputs discard the unfinished folder and build from the
start. Two builds must not write the same index at once.

Memory. The driver never holds the vectors: it keeps each new row's image_id and where it lies
(its part file and row), while the tasks fetch the vectors they need from the stored parts (a
task holds its own rows, the training sample or a batch). ``bench/driver_memory.py`` measures
its peak: about 340 MB plus 130 bytes a row, 459 MB for a million 1280-d rows (4.9 GB of
vectors; ``bench/results/driver_memory_1m_cpu.txt``).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from cluster import index_store, served
from cluster.resources import check_schedulable, node_local_problems, use_reserved_threads
from model import storage, tables
from model.cli import MEMORY_UNITS, log_settings, parse_memory, run_cli
from model.descriptors import (
    DescriptorRows,
    iter_vectors,
    problem_text,
    read_vectors,
    scan_descriptors_checked,
)
from model.records import Lease

__all__ = [
    "FLAT_MAX",
    "PQ_CODE_SIZES",
    "IndexConf",
    "choose_factory",
    "choose_nlist",
    "content_settings",
    "estimate_index_bytes",
    "parse_memory",
    "run",
    "train_index",
    "train_size_for",
    "tune_nprobe",
]

logger = logging.getLogger(__name__)

BUILDING = "BUILDING"
"""The lease of the build under way (:class:`model.records.Lease`), under the index."""
NETWORKS = "networks"
"""Where the checkpoints the index's versions were described with are pinned."""

FLAT_MAX = 100_000
"""``auto`` uses exact (Flat) search up to this many vectors: a query costs N x dim
multiply-adds, about 0.1 GFLOP at 10^5 1280-d vectors; above it an IVF scan of a few percent of
the lists answers 10-50 times faster at recall >= 0.95."""
POINTS_PER_CENTROID = 50
"""Training vectors per k-means centroid (FAISS warns below 39 and subsamples above 256)."""
MIN_POINTS_PER_LIST = 39
"""``choose_nlist`` never makes more lists than N / 39 (FAISS's minimum for k-means)."""
MAX_NLIST = 65_536
PQ_CODE_SIZES = (256, 192, 128, 96, 64, 48, 32, 24, 16, 12, 8, 4)
"""Bytes per vector (8-bit sub-quantizers) ``auto`` tries for IVF-PQ, largest first."""
PQ_BITS = 8
ID_BYTES = 8
"""An IVF list stores an int64 id beside each code."""
ADD_BATCH = 65_536
TUNE_K = 10
TASK_OVERHEAD = 512 * 2**20
"""Memory a task asks for beyond its data: the interpreter, FAISS, pyarrow and the row groups
it decodes at a time (``model.tables.BATCH_BYTES``)."""


@dataclass(frozen=True)
class IndexConf:
    """Settings of one index build; every field is a command-line flag."""

    descriptors: str
    """Descriptor folder written by pipeline.extract (a path or s3:// URI)."""
    output: str
    """Index folder or s3:// prefix; versions are written as OUTPUT/v1, OUTPUT/v2, ..."""
    factory: str = "auto"
    """A FAISS index_factory string ("Flat", "IVF1024,Flat", "OPQ32_128,IVF4096,PQ32", ...) or
    auto (Flat, then IVF-Flat, then IVF-PQ as the budget requires). Versions after the first
    keep the first one's (auto); another one needs --overwrite."""
    shards: int = 2
    """Shards the new rows are split into, each built by its own Ray task."""
    max_memory: str = "16G"
    """Memory the whole index may take (all shards), e.g. 512M, 16G: what auto must fit."""
    flat_max: int = FLAT_MAX
    """auto uses exact Flat search only up to this many vectors."""
    nprobe: int | None = None
    """IVF lists searched per query; default: tuned to reach target-recall."""
    target_recall: float = 0.95
    """Share of the exact top-10 neighbours the tuned nprobe must reach."""
    tune_queries: int = 200
    """Descriptors sampled as queries to tune nprobe."""
    train_size: int | None = None
    """Training sample size; default: 50 per IVF list (and 50 per PQ centroid)."""
    seed: int = 0
    """Seed of the training and tuning samples."""
    cpus_per_shard: float = 1.0
    """CPUs each shard task asks Ray for (and FAISS threads it uses)."""
    train_cpus: int = 2
    """CPUs the training task (k-means, OPQ) and the nprobe tuning task ask Ray for, and the
    FAISS threads they use."""
    overwrite: bool = False
    """Index every descriptor again as the next version when the factory or the network
    changed (a full re-index, trained anew; else the run stops and says what changed). The
    earlier versions stay, so a service switches to the new one whole."""
    promote: bool = True
    """Make the new version the one the search service answers from (INDEX/CURRENT);
    --no-promote publishes it for a later POST /reload."""
    lock_wait_s: float = 0.0
    """How long to wait for another build of the same index to finish (0: stop at once,
    naming it)."""
    local_features: str | None = None
    """Local features of the same photos (pipeline.features): pinned into the version, so that
    the search service re-ranks by spatial verification (POST /search?rerank=K). Without it a
    version keeps the latest one's; given to a complete index, it makes a next version that
    differs only in them."""


# ---------------------------------------------------------------------------------------------
# The auto rule


def _memory_text(size: float) -> str:
    for unit in ("T", "G", "M", "K"):
        if size >= MEMORY_UNITS[unit]:
            return f"{size / MEMORY_UNITS[unit]:.1f}{unit}"
    return f"{int(size)}B"


def choose_nlist(n: int) -> int:
    """Number of IVF lists for ``n`` vectors: the power of two nearest 4·√n.

    Clipped to at most n / 39 lists (k-means needs about 39 points per centroid) and 65,536
    (beyond that a flat coarse quantizer is too slow to train and search); at least 1.
    1,000 → 8 (clip), 100,000 → 1,024, 1,000,000 → 4,096, 10,000,000 → 16,384.
    """
    if n < MIN_POINTS_PER_LIST:
        return 1
    nlist = 2 ** round(math.log2(4 * math.sqrt(n)))
    cap = 1 << ((n // MIN_POINTS_PER_LIST).bit_length() - 1)  # largest power of two <= n/39
    return int(max(1, min(nlist, cap, MAX_NLIST)))


def _pq_key(m: int, nlist: int, dim: int) -> str:
    """IVF-PQ with ``m`` bytes per vector, with an OPQ rotation where it helps.

    OPQ is used when each sub-quantizer would see 4 or more dimensions (the learned rotation
    spreads the variance over the sub-vectors, and projects to 4·m dimensions, FAISS's
    advice), or when ``dim`` is not a multiple of ``m`` (the projection makes it one). With 2-3
    dimensions per sub-quantizer there is little to rotate and PQ goes without it.
    """
    per_sub = dim // m
    if per_sub >= 4 or dim % m:
        return f"OPQ{m}_{m * min(per_sub, 4)},IVF{nlist},PQ{m}"
    return f"IVF{nlist},PQ{m}"


def estimate_index_bytes(factory: str, n: int, dim: int) -> int | None:
    """Memory of ``n`` vectors in an index of ``factory`` (codes, ids, centroids, rotation).

    Known forms: ``Flat``, ``IVF{k},Flat`` and ``[OPQ{m}_{d},]IVF{k},PQ{m}[x{bits}]``;
    ``None`` for others.
    """
    if factory == "Flat":
        return 4 * n * dim
    match = re.fullmatch(r"IVF(\d+),Flat", factory)
    if match:
        nlist = int(match.group(1))
        return n * (4 * dim + ID_BYTES) + 4 * nlist * dim
    match = re.fullmatch(r"(?:OPQ(\d+)_(\d+),)?IVF(\d+),PQ(\d+)(?:x(\d+))?", factory)
    if match:
        out_dim = int(match.group(2)) if match.group(1) else dim
        nlist, m = int(match.group(3)), int(match.group(4))
        bits = int(match.group(5) or PQ_BITS)
        rotation = 4 * dim * out_dim if match.group(1) else 0
        codebooks = 4 * (2**bits) * out_dim
        return n * (math.ceil(m * bits / 8) + ID_BYTES) + 4 * nlist * out_dim + rotation + codebooks
    return None


def choose_factory(
    n: int, dim: int, max_memory: str | int = "16G", *, flat_max: int = FLAT_MAX
) -> str:
    """The ``auto`` index for ``n`` vectors of ``dim`` in a memory budget.

    1. ``Flat`` (exact) while ``n <= flat_max`` and ``4·n·dim`` bytes fit the budget.
    2. ``IVF{nlist},Flat`` (exact scores, a share of the lists scanned) when it fits:
       ``n·(4·dim + 8) + 4·nlist·dim`` bytes; ``nlist`` from :func:`choose_nlist`.
    3. IVF-PQ (:func:`_pq_key`) with the largest code of ``PQ_CODE_SIZES`` (at most ``dim/2``
       bytes, 8 bits per sub-quantizer) that fits: ``n·(m + 8)`` bytes plus centroids,
       codebooks and rotation.

    ``ValueError`` when nothing fits (or IVF-PQ would have fewer than 9,984 vectors to train
    its 256-centroid sub-quantizers). Unlike autofaiss, no HNSW: an HNSW graph cannot be
    split into shards that share one training, and sharded versioning needs that.
    """
    budget = parse_memory(max_memory)
    if n <= flat_max and 4 * n * dim <= budget:
        return "Flat"
    nlist = choose_nlist(n)
    ivf_flat = f"IVF{nlist},Flat"
    if (estimate_index_bytes(ivf_flat, n, dim) or 0) <= budget:
        return ivf_flat
    smallest = None
    for m in PQ_CODE_SIZES:
        if m > dim // 2:
            continue
        key = _pq_key(m, nlist, dim)
        smallest = key
        if (estimate_index_bytes(key, n, dim) or 0) <= budget:
            if n < MIN_POINTS_PER_LIST * 2**PQ_BITS:
                raise ValueError(
                    f"--max-memory {_memory_text(budget)} cannot hold {n:,} Flat vectors of "
                    f"dim {dim}, and PQ needs at least {MIN_POINTS_PER_LIST * 2**PQ_BITS:,} "
                    "vectors to train: raise --max-memory"
                )
            return key
    need = estimate_index_bytes(smallest, n, dim) if smallest else 4 * n * dim
    raise ValueError(
        f"--max-memory {_memory_text(budget)} cannot hold {n:,} vectors of dim {dim}: the "
        f"smallest index auto considers ({smallest or 'Flat'}) needs about "
        f"{_memory_text(need or 0)}; raise --max-memory"
    )


# ---------------------------------------------------------------------------------------------
# Validation


def _factory_problems(factory: str, dim: int | None, n: int | None) -> list[str]:
    if "IDMap" in factory:
        return [f"factory {factory!r}: leave IDMap out, the id maps of the shards hold the ids"]
    if dim is None:
        return []
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        reason = str(err).strip().splitlines()[-1]
        reason = re.sub(r"^Error in .* at \S+:\d+: ", "", reason)
        return [f"FAISS rejects factory {factory!r} for dimension {dim}: {reason}"]
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        return [f"factory {factory!r} cannot rank by inner product"]
    nlist = _nlist(index)
    if n is not None and nlist and nlist > n:
        return [
            f"factory {factory!r} needs at least {nlist} vectors to train, the descriptors hold {n}"
        ]
    return []


def _conf_problems(conf: IndexConf) -> list[str]:
    problems = []
    if conf.shards < 1:
        problems.append(f"--shards must be at least 1, not {conf.shards}")
    try:
        parse_memory(conf.max_memory)
    except ValueError as err:
        problems.append(str(err))
    if not 0 < conf.target_recall <= 1:
        problems.append(f"--target-recall must be in (0, 1], not {conf.target_recall}")
    if conf.nprobe is not None and conf.nprobe < 1:
        problems.append(f"--nprobe must be at least 1, not {conf.nprobe}")
    if conf.tune_queries < 1:
        problems.append(f"--tune-queries must be at least 1, not {conf.tune_queries}")
    if conf.train_size is not None and conf.train_size < 1:
        problems.append(f"--train-size must be at least 1, not {conf.train_size}")
    if conf.cpus_per_shard <= 0:
        problems.append(f"--cpus-per-shard must be positive, not {conf.cpus_per_shard}")
    if conf.train_cpus < 1:
        problems.append(f"--train-cpus must be at least 1, not {conf.train_cpus}")
    if conf.flat_max < 0:
        problems.append(f"--flat-max must be 0 or more, not {conf.flat_max}")
    return problems


def _output_problems(output: str) -> list[str]:
    problem = storage.bucket_problem(output)
    return [f"--output: {problem}"] if problem else node_local_problems(output=output)


# ---------------------------------------------------------------------------------------------
# Training, shards, tuning


def _nlist(index: faiss.Index) -> int | None:
    try:
        return int(faiss.extract_index_ivf(index).nlist)
    except RuntimeError:
        return None


def train_size_for(index: faiss.Index, n: int) -> int:
    """Vectors to train ``index`` on: 50 per IVF list and per PQ centroid, at most ``n``.

    0 when the index needs no training (Flat, HNSW).
    """
    if index.is_trained:
        return 0
    need = 0
    nlist = _nlist(index)
    if nlist:
        need = POINTS_PER_CENTROID * nlist
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        if isinstance(ivf, faiss.IndexIVFPQ):
            need = max(need, POINTS_PER_CENTROID * ivf.pq.ksub)
    if need == 0:  # another trainable index (PQ, SQ, PCA, ...): a generous sample
        need = 100_000
    return int(min(n, need))


def train_index(
    factory: str, vectors: np.ndarray, train_size: int | None = None, *, seed: int = 0
) -> tuple[faiss.Index, int]:
    """The empty index of ``factory`` trained on a seeded sample; ``(index, sample size)``."""
    dim = vectors.shape[1]
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    if index.is_trained:
        return index, 0
    size = min(len(vectors), train_size or train_size_for(index, len(vectors)))
    rows = _sample_rows(len(vectors), size, seed)
    _fit(index, np.ascontiguousarray(vectors[rows]), factory=factory, of=len(vectors))
    return index, size


def _sample_rows(n: int, size: int, seed: int) -> np.ndarray:
    """The training sample: ``size`` of ``n`` rows, seeded, in row order."""
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


def _fit(index: faiss.Index, sample: np.ndarray, *, factory: str, of: int) -> None:
    started = time.perf_counter()
    index.train(sample)
    logger.info(
        "trained %s on %d of %d vectors in %.1f s",
        factory,
        len(sample),
        of,
        time.perf_counter() - started,
    )


@dataclass(frozen=True)
class _Rows:
    """Where some descriptor rows lie, in the order a task wants them: each one's part (an
    index into ``files``) and its row there. What a task reads its vectors by, from the
    stored parts (``model.descriptors.read_vectors``), instead of receiving them."""

    files: tuple[str, ...]
    file: np.ndarray
    row: np.ndarray
    dim: int

    def __len__(self) -> int:
        return len(self.row)

    @property
    def nbytes(self) -> int:
        """The bytes of these rows' vectors."""
        return 4 * len(self.row) * self.dim

    def take(self, which: np.ndarray) -> _Rows:
        return _Rows(self.files, self.file[which], self.row[which], self.dim)

    def read(self) -> np.ndarray:
        """float32 ``[len, dim]``: the vectors, in this order."""
        return read_vectors(self.files, self.file, self.row, dim=self.dim)

    def chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(positions, vectors)`` a batch at a time, in storage order."""
        return iter_vectors(self.files, self.file, self.row, dim=self.dim)


def _train_task(factory: str, sample: _Rows, *, of: int) -> bytes:
    """Runs in a Ray task: the sample's vectors read from the parts, the index trained on them
    with as many FAISS threads as the task reserved CPUs; the trained index's bytes."""
    use_reserved_threads()
    index = faiss.index_factory(sample.dim, factory, faiss.METRIC_INNER_PRODUCT)
    _fit(index, sample.read(), factory=factory, of=of)
    return index_store.serialize_index(index)


def _receipt_uri(output: str, version: int, number: int) -> str:
    return storage.join(
        output, index_store.version_dir(version), "_build", f"shard-{number:05d}.json"
    )


def _filled(trained: bytes, vectors: np.ndarray) -> faiss.Index:
    index = index_store.deserialize_index(trained)
    for start in range(0, len(vectors), ADD_BATCH):
        index.add(np.ascontiguousarray(vectors[start : start + ADD_BATCH], dtype=np.float32))
    return index


def _write_shard(
    index: faiss.Index,
    image_ids: Sequence[str],
    *,
    id_start: int,
    output: str,
    version: int,
    number: int,
) -> dict[str, Any]:
    count = int(index.ntotal)
    data = index_store.serialize_index(index)
    file, id_map = index_store.shard_names(version, number)
    ids = np.arange(id_start, id_start + count, dtype=np.int64)
    id_data = index_store.id_map_bytes(ids, image_ids)
    storage.write_bytes(storage.join(output, file), data)
    storage.write_bytes(storage.join(output, id_map), id_data)
    entry = {
        "file": file,
        "sha256": index_store.sha256(data),
        "bytes": len(data),
        "count": count,
        "id_start": int(id_start),
        "id_map": id_map,
        "id_map_sha256": index_store.sha256(id_data),
        "version": version,
    }
    storage.write_text(_receipt_uri(output, version, number), json.dumps(entry))
    return entry


def _shard_task(
    trained: bytes,
    rows: _Rows,
    image_ids: pa.Array,
    *,
    id_start: int,
    output: str,
    version: int,
    number: int,
) -> dict[str, Any]:
    """Runs in a Ray task: the shard's vectors read from the stored parts (in id order), added
    to the trained index with the task's reserved CPUs, the shard and its id map written; its
    manifest entry."""
    use_reserved_threads()
    vectors = rows.read()
    index = _filled(trained, vectors)
    del vectors  # the index holds them now (or their codes)
    return _write_shard(
        index,
        image_ids.to_pylist(),
        id_start=id_start,
        output=output,
        version=version,
        number=number,
    )


def _shard_finished(entry: dict[str, Any], done: int, total: int) -> None:
    """Called in the driver as each shard is written (progress; a seam for crash tests)."""
    logger.info("shard %s written: %d vectors (%d/%d)", entry["file"], entry["count"], done, total)


def _transform(index: faiss.Index, x: np.ndarray) -> np.ndarray:
    """``x`` through the pre-transforms (OPQ, PCA) in front of the IVF part of ``index``."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            x = faiss.downcast_VectorTransform(index.chain.at(i)).apply(x)
    return np.ascontiguousarray(x, dtype=np.float32)


def tune_nprobe(
    trained: faiss.Index,
    vectors: np.ndarray,
    target: float = 0.95,
    *,
    queries: int = 200,
    k: int = TUNE_K,
    seed: int = 0,
) -> tuple[int, dict[str, Any]]:
    """The smallest ``nprobe`` whose lists hold ``target`` of the queries' exact top-k.

    ``queries`` rows of ``vectors`` are drawn (seeded); their exact top-k neighbours among
    ``vectors`` (themselves excluded) come from brute force. A neighbour is found at
    ``nprobe = p`` when its list (where the quantizer assigns it) is among the p lists nearest
    the query; the share found at every p follows from the quantizer alone, without searching
    the shards. For IVF-Flat (exact scores) that share is recall@k; for PQ codes it bounds it
    from above. Returns ``(nprobe, figures for the manifest)``. The stage runs the same in a
    task that streams the rows from the stored parts (``_tune_task``).
    """
    nlist = int(faiss.extract_index_ivf(trained).nlist)
    n = len(vectors)
    if nlist == 1 or n <= k:
        return nlist, _untuned(nlist)
    rows = _query_rows(n, queries, seed)
    Q = np.ascontiguousarray(vectors[rows])
    _, neighbours = faiss.knn(Q, vectors, k + 1, metric=faiss.METRIC_INNER_PRODUCT)
    keep = _without_self(neighbours, rows, k)
    found = np.ascontiguousarray(vectors[keep.ravel()])
    return _nprobe_for(trained, Q, found, target=target, k=k)


def _untuned(nlist: int) -> dict[str, Any]:
    return {"nprobe": nlist, "reason": "too few vectors or lists to tune"}


def _query_rows(n: int, queries: int, seed: int) -> np.ndarray:
    return np.sort(np.random.default_rng(seed + 1).choice(n, min(queries, n), replace=False))


def _without_self(neighbours: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """Each query's first ``k`` neighbours other than itself."""
    return np.array(
        [[j for j in row if j != me][:k] for row, me in zip(neighbours, rows, strict=True)]
    )


def _nprobe_for(
    trained: faiss.Index, Q: np.ndarray, found: np.ndarray, *, target: float, k: int
) -> tuple[int, dict[str, Any]]:
    """``tune_nprobe``'s answer from the queries and their exact top-k neighbours' vectors
    (``found``: ``k`` rows per query, query by query)."""
    ivf = faiss.extract_index_ivf(trained)
    nlist = int(ivf.nlist)
    quantizer = ivf.quantizer
    _, order = quantizer.search(_transform(trained, Q), nlist)  # lists by closeness, per query
    _, lists = quantizer.search(_transform(trained, found), 1)
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(nlist)[None, :].repeat(len(Q), 0), axis=1)
    found_at = np.take_along_axis(rank, lists.reshape(len(Q), k), axis=1)  # 0-based
    coverage = np.bincount(found_at.ravel(), minlength=nlist).cumsum() / found_at.size
    nprobe = int(np.searchsorted(coverage, target - 1e-12) + 1)
    nprobe = min(nprobe, nlist)
    figures = {
        "nprobe": nprobe,
        "target_recall": target,
        "recall_at_k": round(float(coverage[nprobe - 1]), 4),
        "k": k,
        "queries": len(Q),
        "measure": "share of exact top-k neighbours in the probed lists "
        "(recall@k for Flat codes, an upper bound for PQ)",
    }
    return nprobe, figures


def _tune_task(
    trained: bytes, rows: _Rows, queries: np.ndarray, *, target: float, k: int
) -> tuple[int, dict[str, Any]]:
    """Runs in a Ray task: ``tune_nprobe`` over ``rows`` (the new rows, in id order) with the
    query rows ``queries``, the exact top-k found by streaming every row from the stored parts
    past the queries (a batch at a time), never holding them all."""
    use_reserved_threads()
    index = index_store.deserialize_index(trained)
    Q = rows.take(queries).read()
    best = np.full((len(Q), k + 1), -np.inf, dtype=np.float32)
    labels = np.full((len(Q), k + 1), -1, dtype=np.int64)
    for positions, vectors in rows.chunks():
        scores = np.concatenate([best, Q @ vectors.T], axis=1)
        ids = np.concatenate([labels, np.broadcast_to(positions, (len(Q), len(positions)))], 1)
        top = np.argsort(-scores, axis=1, kind="stable")[:, : k + 1]
        best = np.take_along_axis(scores, top, 1)
        labels = np.take_along_axis(ids, top, 1)
    keep = _without_self(labels, queries, k)
    found = rows.take(keep.ravel()).read()
    return _nprobe_for(index, Q, found, target=target, k=k)


# ---------------------------------------------------------------------------------------------
# The stage


def _digest(*parts: Any) -> str:
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, np.ndarray):
            h.update(np.ascontiguousarray(part).tobytes())
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\x00")
    return h.hexdigest()


def _read_json(uri: str) -> dict[str, Any] | None:
    try:
        return json.loads(storage.read_text(uri))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _reusable(output: str, entry: dict[str, Any] | None, *, count: int, id_start: int) -> bool:
    if not entry or entry.get("count") != count or entry.get("id_start") != id_start:
        return False
    try:
        for key, sha in (("file", "sha256"), ("id_map", "id_map_sha256")):
            if (
                index_store.sha256(storage.read_bytes(storage.join(output, entry[key])))
                != entry[sha]
            ):
                return False
    except FileNotFoundError:
        return False
    return True


def _init_ray() -> Any:

    if not ray.is_initialized():
        ray.init()
    return ray


def _existing_ids(output: str, manifest: dict[str, Any]) -> pa.Array:
    """The image_ids a version indexes (string array)."""
    found = [
        pa.array(index_store.load_id_map(output, shard).image_ids, type=pa.string())
        for shard in manifest["shards"]
    ]
    return pa.concat_arrays(found) if found else pa.array([], type=pa.string())


@dataclass(frozen=True)
class _Inputs:
    """What a run indexes and the index it would join, once validated."""

    desc: DescriptorRows
    """Each described row's image_id and place in the parts (the vectors stay there)."""
    descriptors: tables.Manifest
    """The descriptors' manifest: this version's input."""
    parent: dict[str, Any] | None
    """The latest version's details (``index_store.read_manifest``); ``None``: no index yet,
    or a full re-index."""
    factory: str
    """The factory in use: the given one, or auto's (the index's own once it has a version)."""
    follows: int = 0
    """The newest version before this build (the new one is numbered after it)."""
    local_features: dict[str, Any] | None = None
    """The local features the version pins (``--local-features``, else the latest version's)."""

    @property
    def network(self) -> dict[str, Any]:
        return dict(self.desc.manifest.get("network") or {})


def content_settings(factory: str, network: dict[str, Any]) -> dict[str, Any]:
    """The settings that change an index's content, fingerprinted with its descriptors: the
    factory in use, the metric and the descriptors' network (its identity where recorded).
    Not the shard split, the memory budget or nprobe: a next version may change those."""
    return {"factory": factory, "metric": index_store.METRIC, "network": _network_key(network)}


def _network_key(network: dict[str, Any] | None) -> Any:
    """What names a network: its identity when the descriptors recorded one (a checkpoint's
    content hash stays the same when its folder moves), else its whole description."""
    network = network or {}
    return network.get("identity") or network


def _descriptor_dim(uri: str) -> int | None:
    """The dimension a descriptors manifest states, when it can be read at all."""
    try:
        return int(tables.DESCRIPTORS_OUTPUT.manifest(uri).details["dim"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _read_parent(output: str, problems: list[str]) -> dict[str, Any] | None:
    """The latest complete version's details, or ``None`` (an unreadable one is a problem)."""
    try:
        if index_store.latest_version(output) is not None:
            return index_store.read_manifest(output)
    except (OSError, ValueError) as err:
        problems.append(f"cannot read the index at {output}: {err} (--overwrite starts it anew)")
    return None


def _parent_problems(parent: dict[str, Any], desc: DescriptorRows, output: str) -> list[str]:
    """Descriptors that cannot join the index at ``output``: another dimension or network."""
    where = f"the index at {output} (v{parent['version']})"
    if int(parent["dim"]) != desc.dim:
        return [
            f"mixed dimensions: the descriptors have {desc.dim}, {where} has {parent['dim']}; "
            "index them into another --output, or start the index anew with --overwrite"
        ]
    ours, theirs = desc.manifest.get("network"), parent.get("network")
    if _network_key(ours) != _network_key(theirs):
        return [
            f"mixed networks: the descriptors come from {json.dumps(ours, sort_keys=True)}, "
            f"{where} from {json.dumps(theirs, sort_keys=True)}; index them into another "
            "--output, or start the index anew from them with --overwrite"
        ]
    return []


def _factory_in_use(
    conf: IndexConf,
    desc: DescriptorRows | None,
    parent: dict[str, Any] | None,
    *,
    problems: list[str],
) -> str:
    """The factory a build uses: the given one (checked), the index's own for ``auto`` once it
    has a version, else auto's choice for the descriptors."""
    if conf.factory != "auto":
        if parent is None or conf.factory != parent["factory"]:
            dim = desc.dim if desc is not None else _descriptor_dim(conf.descriptors)
            n = len(desc.image_ids) if desc is not None else None
            problems += _factory_problems(conf.factory, dim, n)
        return conf.factory
    if parent is not None:
        return str(parent["factory"])
    if desc is None or problems:
        return conf.factory
    try:
        return choose_factory(
            len(desc.image_ids), desc.dim, conf.max_memory, flat_max=conf.flat_max
        )
    except ValueError as err:
        problems.append(str(err))
        return conf.factory


def _validate(conf: IndexConf, output: str) -> _Inputs:
    """The descriptors, the index they would join and the factory; one ``ValueError`` listing
    every problem with the flags, the descriptors and that index."""
    problems = _conf_problems(conf)
    problems += _output_problems(output)
    desc = scan_descriptors_checked(conf.descriptors, problems)
    parent = _read_parent(output, problems) if not problems or desc is not None else None
    if parent is not None and desc is not None and not conf.overwrite:
        problems += _parent_problems(parent, desc, output)
    factory = _factory_in_use(conf, desc, parent, problems=problems)
    features = _local_features_pin(conf, desc, parent, problems=problems)
    if problems or desc is None or desc.output is None:
        raise ValueError(problem_text(f"cannot index {conf.descriptors} into {output}", problems))
    return _Inputs(desc, desc.output, parent, factory, local_features=features)


def _local_features_pin(
    conf: IndexConf,
    desc: DescriptorRows | None,
    parent: dict[str, Any] | None,
    *,
    problems: list[str],
) -> dict[str, Any] | None:
    """What the version pins of ``--local-features`` (its place, identity and settings, and
    how many of the descriptors' photos it lacks), else the latest version's pin."""
    if conf.local_features is None:
        return (parent or {}).get("local_features")
    try:
        manifest = tables.LOCAL_FEATURES_OUTPUT.manifest(conf.local_features)
    except (OSError, ValueError) as err:
        problems.append(f"--local-features: {err}")
        return None
    ids = tables.LOCAL_FEATURES.read(conf.local_features, ["image_id", "error"])
    have = pc.filter(ids["image_id"], pc.is_null(ids["error"]))
    missing = 0
    if desc is not None:
        missing = int(pc.sum(pc.invert(pc.is_in(desc.image_ids, have))).as_py() or 0)
        if missing:
            logger.warning(
                "--local-features: %d of %d photos have no local features; their results are "
                "not re-ranked (run pipeline.features on their images)",
                missing,
                len(desc.image_ids),
            )
    return {
        "uri": manifest.uri.rsplit("/", 1)[0],
        "identity": manifest.identity,
        "settings": manifest.settings,
        "count": len(have),
        "missing": missing,
    }


def _plan(conf: IndexConf, output: str, inputs: _Inputs, *, settings: dict[str, Any]) -> str:
    """``skip`` (the latest version indexed these descriptors with these settings), ``update``
    (a next version of the new rows) or ``new`` (no index yet, or ``--overwrite`` of one made
    with other settings). Other settings without ``--overwrite`` stop with one line naming
    them (``tables.OutputChanged``)."""
    if inputs.parent is None:
        return "new"
    latest = storage.join(output, index_store.version_dir(int(inputs.parent["version"])))
    action, _ = tables.INDEX_VERSION.plan(
        latest, {"descriptors": inputs.descriptors.identity}, settings, overwrite=conf.overwrite
    )
    return action


def _start_anew(conf: IndexConf, output: str, inputs: _Inputs) -> _Inputs:
    """``--overwrite`` of an index made with other settings: every descriptor is indexed
    again, trained anew, as the next version (sharing nothing with the earlier ones, which stay
    for the service that reads them), with auto's choice for these descriptors."""
    assert inputs.parent is not None
    follows = int(inputs.parent["version"])
    logger.info(
        "re-indexing everything at %s as v%d (--overwrite: other settings than v%d)",
        output,
        follows + 1,
        follows,
    )
    desc = inputs.desc
    factory = conf.factory
    if factory == "auto":
        factory = choose_factory(
            len(desc.image_ids), desc.dim, conf.max_memory, flat_max=conf.flat_max
        )
    return _Inputs(desc, inputs.descriptors, None, factory, follows=follows)


@dataclass
class _Build:
    """What one run builds: the new rows in id order (their image_ids and where their vectors
    lie), and where they go."""

    conf: IndexConf
    output: str
    inputs: _Inputs
    image_ids: pa.Array
    """string ``[n]``: the new rows' image_ids, ascending (global ids in this order)."""
    file: np.ndarray
    """int32 ``[n]``: each new row's part (an index into the descriptors' files)."""
    row: np.ndarray
    """int64 ``[n]``: its row in that part."""
    id_start: int
    version: int
    bounds: np.ndarray
    """Row bounds of the new shards: shard i holds rows ``bounds[i]:bounds[i + 1]``."""

    @property
    def parent(self) -> dict[str, Any] | None:
        return self.inputs.parent

    @property
    def factory(self) -> str:
        return self.inputs.factory

    @property
    def dim(self) -> int:
        return self.inputs.desc.dim

    @property
    def vdir(self) -> str:
        return index_store.version_dir(self.version)

    @property
    def uri(self) -> str:
        return storage.join(self.output, self.vdir)

    @property
    def plan_uri(self) -> str:
        return storage.join(self.uri, "_build", "plan.json")

    def rows(self, which: np.ndarray | slice = slice(None)) -> _Rows:
        """Where the new rows ``which`` (positions in id order) lie, for a task to read."""
        files = tuple(self.inputs.desc.files)
        return _Rows(files, self.file[which], self.row[which], self.dim)

    def key(self) -> str:
        """Digest of everything a shard's content depends on (the resume check): the new rows'
        image_ids and the descriptors' identity (their files) stand for the vectors."""
        return _digest(
            tables.INDEX_VERSION.version,
            self.factory,
            self.dim,
            self.parent and self.parent["version"],
            self.parent and self.parent["trained"]["sha256"],
            self.bounds.tolist(),
            self.conf.seed,
            self.conf.train_size,
            _ids_digest(self.image_ids),
            self.inputs.descriptors.identity,
            self.file,
            self.row,
        )


def _ids_digest(image_ids: pa.Array, chunk: int = 65_536) -> str:
    h = hashlib.sha256()
    for start in range(0, len(image_ids), chunk):
        h.update("\n".join(image_ids.slice(start, chunk).to_pylist()).encode())
        h.update(b"\n")
    return h.hexdigest()


def _new_rows(conf: IndexConf, output: str, inputs: _Inputs) -> _Build | None:
    """The rows the latest version lacks, in image_id order; ``None`` when there are none."""
    desc, parent = inputs.desc, inputs.parent
    if parent is not None:
        known = pc.is_in(desc.image_ids, value_set=_existing_ids(output, parent))
        new = ~known.to_numpy(zero_copy_only=False)
        if (~new).any():
            logger.info(
                "%d descriptors are indexed already (v%s)", int((~new).sum()), parent["version"]
            )
    else:
        new = np.ones(len(desc.image_ids), dtype=bool)
    if not new.any():
        return None
    picked = np.flatnonzero(new)
    ids = desc.image_ids.take(pa.array(picked))
    by_id = pc.sort_indices(ids).to_numpy()
    order = picked[by_id]
    shards = min(conf.shards, len(order))
    return _Build(
        conf=conf,
        output=output,
        inputs=inputs,
        image_ids=ids.take(pa.array(by_id)),
        file=desc.file[order],
        row=desc.row[order],
        id_start=int(parent["count"]) if parent else 0,
        version=int(parent["version"]) + 1 if parent else inputs.follows + 1,
        bounds=np.linspace(0, len(order), shards + 1).round().astype(int),
    )


def _trained(build: _Build, plan: dict[str, Any] | None) -> tuple[faiss.Index, bytes, dict]:
    """The trained index: the parent's, the interrupted build's, or trained now."""
    output = build.output
    if build.parent is not None or plan is not None:
        entry = dict(build.parent["trained"] if build.parent is not None else plan["trained"])
        try:
            data = storage.read_bytes(storage.join(output, entry["file"]))
        except FileNotFoundError:
            data = b""
        if index_store.sha256(data) == entry["sha256"]:
            if build.parent is None:
                logger.info("reusing the trained index of the interrupted build")
            return index_store.deserialize_index(data), data, entry
        if build.parent is not None:
            raise ValueError(f"{entry['file']} does not match its checksum; rebuild the index")
    data, size = _train(build)
    entry = {
        "file": f"{build.vdir}/{index_store.TRAINED}",
        "sha256": index_store.sha256(data),
        "bytes": len(data),
        "train_size": size,
        "seed": build.conf.seed,
        "version": build.version,
    }
    storage.write_bytes(storage.join(output, entry["file"]), data)
    return index_store.deserialize_index(data), data, entry


def _train(build: _Build) -> tuple[bytes, int]:
    """The trained, empty index of the build's factory and its sample size: the sample drawn
    here (``train_index``'s rows), read and trained on in a Ray task."""
    index = faiss.index_factory(build.dim, build.factory, faiss.METRIC_INNER_PRODUCT)
    if index.is_trained:
        return index_store.serialize_index(index), 0
    n = len(build.image_ids)
    size = min(n, build.conf.train_size or train_size_for(index, n))
    sample = build.rows(_sample_rows(n, size, build.conf.seed))
    trained_bytes = estimate_index_bytes(build.factory, 0, build.dim) or 0
    # The sample, FAISS's copies of it (OPQ's rotated copy, IVF-PQ's residuals), the index.
    memory = 3 * sample.nbytes + 2 * trained_bytes + TASK_OVERHEAD
    cpus = build.conf.train_cpus
    _init_ray()
    check_schedulable(
        "training the index (--train-cpus, --train-size)", {"CPU": cpus, "memory": memory}
    )
    task = ray.remote(_train_task).options(num_cpus=cpus, memory=memory, max_retries=2)
    logger.info(
        "training %s on %d of %d vectors in a task (%d CPUs, %s)",
        build.factory,
        size,
        n,
        cpus,
        _memory_text(memory),
    )
    ref = task.remote(build.factory, sample, of=n)
    return _result(ref, "training the index"), size


def _result(ref: Any, what: str) -> Any:
    """A task's result; its OSError as one (storage trouble), any other failure as it is; an
    interrupted driver cancels the task."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        if isinstance(err.cause, OSError):
            raise OSError(f"{what} failed: {err.cause}") from err
        raise
    except BaseException:
        ray.cancel(ref)
        raise


def _search_params(build: _Build, trained: faiss.Index) -> tuple[dict[str, Any], dict | None]:
    nlist = _nlist(trained)
    if not nlist:
        return {}, None
    conf = build.conf
    if conf.nprobe is not None:
        nprobe = min(conf.nprobe, nlist)
        return {"nprobe": nprobe}, {"nprobe": nprobe, "reason": "given"}
    nprobe, tuning = _tune(build, trained, nlist)
    parent_nprobe = int((build.parent or {}).get("search_params", {}).get("nprobe", 0))
    if parent_nprobe > nprobe:  # never less recall on the rows indexed before
        tuning["parent_nprobe"] = parent_nprobe
        nprobe = parent_nprobe
    return {"nprobe": nprobe}, tuning


def _tune(build: _Build, trained: faiss.Index, nlist: int) -> tuple[int, dict[str, Any]]:
    """``tune_nprobe`` over the new rows, in a Ray task that streams them from the parts."""
    conf, n = build.conf, len(build.image_ids)
    if nlist == 1 or n <= TUNE_K:
        return nlist, _untuned(nlist)
    queries = _query_rows(n, conf.tune_queries, conf.seed)
    data = index_store.serialize_index(trained)
    # The trained index twice (bytes, deserialised), the queries and the row groups read.
    memory = 2 * len(data) + 4 * len(queries) * (TUNE_K + 1) * build.dim + TASK_OVERHEAD
    task = ray.remote(_tune_task).options(num_cpus=conf.train_cpus, memory=memory, max_retries=2)
    _init_ray()
    ref = task.remote(
        data,
        build.rows(),
        queries,
        target=conf.target_recall,
        k=TUNE_K,
    )
    return _result(ref, "tuning nprobe")


@dataclass
class _Made:
    """What the build steps made, for the manifest."""

    trained: dict[str, Any]
    shards: dict[int, dict[str, Any]]
    """This version's new shards by number."""
    built: list[int]
    reused: list[int]
    resumed: bool
    search_params: dict[str, Any]
    tuning: dict[str, Any] | None
    seconds: dict[str, float]


@contextlib.contextmanager
def _timed(seconds: dict[str, float], step: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    seconds[step] = time.perf_counter() - started


def run(conf: IndexConf) -> str:
    """Index the descriptors at ``conf.output``; returns the URI of the version that holds them.

    The latest version as it is when it already indexed these descriptors with these settings,
    or when they hold nothing new; else the next version (v1 of a new index). One build of an
    index runs at a time (a lease at ``OUTPUT/BUILDING``): another one waits up to
    ``--lock-wait-s``, then stops naming the build under way.
    """
    started = time.perf_counter()
    output = tables.resolve(conf.output)
    inputs = _validate(conf, output)  # nothing is written before it passes
    lease = Lease(storage.join(output, BUILDING), what=f"a build of the index at {output}")
    lease.acquire(wait_s=conf.lock_wait_s)
    try:
        if _latest(output) != (inputs.parent or {}).get("version"):
            inputs = _validate(conf, output)  # another build published while this one waited
        uri = _run_alone(conf, output, inputs, started=started, lease=lease)
    finally:
        lease.release()
    if conf.promote:
        state = served.promote(output, _version_of(uri))
        logger.info("served state: v%d (CURRENT serial %d)", state.version, state.serial)
    return uri


def _version_of(uri: str) -> int:
    """The number of the version at ``uri`` (``.../v3`` → 3)."""
    return int(uri.rstrip("/").rsplit("/", 1)[-1].removeprefix("v"))


def _latest(output: str) -> int | None:
    try:
        return index_store.latest_version(output)
    except (OSError, ValueError):
        return None


def _run_alone(
    conf: IndexConf, output: str, inputs: _Inputs, *, started: float, lease: Lease
) -> str:
    """:func:`run` while holding the index's lease."""
    log_settings(logger, "index", conf)
    _log_read(inputs.desc, time.perf_counter() - started)
    settings = content_settings(inputs.factory, inputs.network)
    action = _plan(conf, output, inputs, settings=settings)
    if action == "skip":
        uri = _latest_uri(output, inputs.parent)
        if _features_changed(inputs):
            return _repin(output, inputs)
        logger.info("%s is complete (these descriptors, these settings); skipping", uri)
        return uri
    if action == "new" and inputs.parent is not None:
        inputs = _start_anew(conf, output, inputs)
        settings = content_settings(inputs.factory, inputs.network)
    build = _new_rows(conf, output, inputs)
    if build is None and _features_changed(inputs):
        return _repin(output, inputs)
    if build is None:
        uri = _latest_uri(output, inputs.parent)
        logger.info(
            "nothing new to index: %s holds all %d descriptors", uri, len(inputs.desc.image_ids)
        )
        return uri
    made = _make(build, seconds={"read": time.perf_counter() - started})
    made.seconds["total"] = time.perf_counter() - started
    lease.check()
    return _publish(build, made, settings)


def _log_read(desc: DescriptorRows, seconds: float) -> None:
    logger.info(
        "read %d descriptors of dim %d from %s (%d rows without a vector left out) in %.1f s",
        len(desc.image_ids),
        desc.dim,
        desc.uri,
        desc.failed,
        seconds,
    )


def _latest_uri(output: str, parent: dict[str, Any] | None) -> str:
    assert parent is not None
    return storage.join(output, index_store.version_dir(int(parent["version"])))


def _make(build: _Build, *, seconds: dict[str, float]) -> _Made:
    """Train (or reuse the trained index), add the shards not finished yet, tune nprobe."""
    resumed, plan = _resume_plan(build)
    with _timed(seconds, "train"):
        trained, trained_bytes, trained_entry = _trained(build, plan if resumed else None)
    if resumed and trained_entry["sha256"] != plan["trained"]["sha256"]:
        resumed = False  # trained again: the interrupted build's shards do not belong to it
    storage.write_text(build.plan_uri, json.dumps({"key": build.key(), "trained": trained_entry}))
    with _timed(seconds, "add"):
        shards, todo = _finished_shards(build, resumed)
        if todo:
            _add_shards(build, trained_bytes, todo, entries=shards)
    with _timed(seconds, "tune"):
        search_params, tuning = _search_params(build, trained)
    reused = sorted(set(shards) - {number for number, _, _ in todo})
    return _Made(
        trained=trained_entry,
        shards=shards,
        built=[number for number, _, _ in todo],
        reused=reused,
        resumed=resumed,
        search_params=search_params,
        tuning=tuning,
        seconds=seconds,
    )


def _resume_plan(build: _Build) -> tuple[bool, dict[str, Any] | None]:
    """Whether an interrupted build of these very rows left work to reuse (its plan); the
    unfinished folder of another build is discarded."""
    plan = _read_json(build.plan_uri)
    resumed = plan is not None and plan.get("key") == build.key()
    if not resumed and storage.exists(build.uri):
        logger.info("discarding the unfinished %s of another build", build.uri)
        storage.remove(build.uri)
    return resumed, plan


def _finished_shards(
    build: _Build, resumed: bool
) -> tuple[dict[int, dict[str, Any]], list[tuple[int, int, int]]]:
    """The shards an interrupted build finished (their entries by number), and the
    ``(number, first row, end row)`` still to build."""
    entries: dict[int, dict[str, Any]] = {}
    todo = []
    for number in range(len(build.bounds) - 1):
        a, b = int(build.bounds[number]), int(build.bounds[number + 1])
        receipt = _read_json(_receipt_uri(build.output, build.version, number)) if resumed else None
        if _reusable(build.output, receipt, count=b - a, id_start=build.id_start + a):
            entries[number] = receipt
        else:
            todo.append((number, a, b))
    if entries:
        found = sorted(entries)
        logger.info("reusing %d shard(s) the interrupted build finished: %s", len(found), found)
    return entries, todo


def _details(build: _Build, made: _Made) -> dict[str, Any]:
    """The version's manifest details: what readers of the index need, and how it was built."""
    parent, desc = build.parent, build.inputs.desc
    all_shards = [
        *(parent["shards"] if parent else []),
        *(made.shards[i] for i in sorted(made.shards)),
    ]
    total = build.id_start + len(build.image_ids)
    descriptors = {
        "uri": desc.uri,
        "identity": build.inputs.descriptors.identity,
        "count": len(desc.image_ids),
        "failed": desc.failed,
    }
    return {
        "version": build.version,
        "parent": parent["version"] if parent else None,
        "dim": desc.dim,
        "metric": index_store.METRIC,
        "factory": build.factory,
        "factory_requested": build.conf.factory,
        "count": total,
        "added": len(build.image_ids),
        "search_params": made.search_params,
        "tuning": made.tuning,
        "estimated_bytes": estimate_index_bytes(build.factory, total, desc.dim),
        "stored_bytes": sum(int(s["bytes"]) for s in all_shards),
        "trained": made.trained,
        "shards": all_shards,
        "network": _pinned_network(build.output, desc.manifest.get("network")),
        "settings": desc.manifest.get("settings", {}),
        "descriptors": descriptors,
        "local_features": build.inputs.local_features,
        "history": [*((parent or {}).get("history") or []), _history_entry(build, descriptors)],
        "build": {
            "seconds": {name: round(value, 3) for name, value in made.seconds.items()},
            "shards_built": made.built,
            "shards_reused": made.reused,
            "resumed": made.resumed,
            "cpus_per_shard": build.conf.cpus_per_shard,
        },
        "config": asdict(build.conf),
    }


def _features_changed(inputs: _Inputs) -> bool:
    """Whether ``--local-features`` names other features than the latest version pins."""
    pinned = (inputs.parent or {}).get("local_features") or {}
    given = inputs.local_features or {}
    return bool(given) and given.get("identity") != pinned.get("identity")


def _repin(output: str, inputs: _Inputs) -> str:
    """A next version that is the latest one with other local features: the same shards,
    nothing built, so the service switches to the features with the index they belong to."""
    assert inputs.parent is not None
    parent = inputs.parent
    version = int(parent["version"]) + 1
    uri = storage.join(output, index_store.version_dir(version))
    latest = index_store.version_manifest(output, int(parent["version"]))
    details = {
        **latest.details,  # as stored: shard paths relative to the index, the pinned network
        "version": version,
        "parent": parent["version"],
        "added": 0,
        "local_features": inputs.local_features,
    }
    tables.INDEX_VERSION.publish(
        uri,
        inputs={"descriptors": inputs.descriptors},
        settings=latest.settings,
        details=details,
        files={},
        rows={},
    )
    logger.info("index %s: v%d with the local features %s", uri, version - 1, inputs.local_features)
    return uri


def _pinned_network(output: str, network: dict[str, Any] | None) -> dict[str, Any] | None:
    """The descriptors' network, pinned: a checkpoint is copied into the index
    (``NETWORKS/<identity>``, shared by the versions that use it) and named there by
    ``pinned``, so the service describes queries with exactly the network of the vectors it
    searches, whatever happens to the checkpoint later. Packaged weights are named already."""
    if not network or not network.get("checkpoint") or not network.get("identity"):
        return network
    from model import checkpoint  # torch: only for indexes of a trained network

    identity = str(network["identity"])
    pinned = f"{NETWORKS}/{identity}"
    target = storage.join(output, pinned)
    if not checkpoint.is_checkpoint(target):
        checkpoint.copy(str(network["checkpoint"]), target, identity=identity)
        logger.info("pinned the network %s into %s", identity, target)
    return {**network, "pinned": pinned}


def _history_entry(build: _Build, descriptors: dict[str, Any]) -> dict[str, Any]:
    return {
        "version": build.version,
        "descriptors": descriptors["uri"],
        "identity": descriptors["identity"],
        "added": len(build.image_ids),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def _publish(build: _Build, made: _Made, settings: dict[str, Any]) -> str:
    """Write the version's manifest last (from then on it exists); returns the version's URI."""
    if storage.is_file(tables.INDEX_VERSION.manifest_uri(build.uri)):
        raise FileExistsError(f"{build.uri} was published by another build meanwhile")
    details = _details(build, made)
    tables.INDEX_VERSION.publish(
        build.uri,
        inputs={"descriptors": build.inputs.descriptors},
        settings=settings,
        details=details,
        files={},
        rows={},
    )
    try:
        storage.remove(storage.join(build.uri, "_build"))
    except OSError as err:  # bookkeeping only; readers ignore it
        logger.warning("could not remove %s: %s", storage.join(build.uri, "_build"), err)
    logger.info(
        "index %s: %s, %d shards (%d built, %d reused), %d vectors (+%d), %s, %.1f s",
        build.uri,
        build.factory,
        len(details["shards"]),
        len(made.built),
        len(made.reused),
        details["count"],
        details["added"],
        f"nprobe {made.search_params['nprobe']}" if made.search_params else "exact search",
        made.seconds["total"],
    )
    return build.uri


def _add_shards(
    build: _Build,
    trained_bytes: bytes,
    todo: list[tuple[int, int, int]],
    *,
    entries: dict[int, dict[str, Any]],
) -> None:
    """One Ray task per ``(shard, first row, end row)`` in ``todo``, reading its rows from the
    parts; entries land in ``entries``."""
    ray = _init_ray()
    cpus = build.conf.cpus_per_shard
    trained_ref = ray.put(trained_bytes)
    shard_task = ray.remote(_shard_task)
    pending = {}
    for number, a, b in todo:
        rows = build.rows(slice(a, b))
        memory = _shard_memory(build, rows)
        if not pending:
            check_schedulable(
                "a shard (--cpus-per-shard, --shards)", {"CPU": cpus, "memory": memory}
            )
        task = shard_task.options(num_cpus=cpus, memory=memory, max_retries=2)
        ref = task.remote(
            trained_ref,
            rows,
            pa.concat_arrays([build.image_ids.slice(a, b - a)]),  # its own ids, not all
            id_start=build.id_start + a,
            output=build.output,
            version=build.version,
            number=number,
        )
        pending[ref] = number
    total = len(entries) + len(todo)
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                number = pending.pop(ref)
                try:
                    entries[number] = ray.get(ref)
                except ray.exceptions.RayTaskError as err:
                    if isinstance(err.cause, OSError):
                        raise OSError(f"building shard {number} failed: {err.cause}") from err
                    raise
                _shard_finished(entries[number], len(entries), total)
    except BaseException:
        for ref in pending:  # a failed or interrupted build leaves no task writing behind it
            ray.cancel(ref)
        raise


def _shard_memory(build: _Build, rows: _Rows) -> int:
    """What a shard task holds at its peak: its vectors and the index they fill, or the index
    with its serialised copies (FAISS's and the bytes written)."""
    index = estimate_index_bytes(build.factory, len(rows), build.dim) or rows.nbytes
    return max(rows.nbytes + index, 3 * index) + TASK_OVERHEAD


if __name__ == "__main__":
    run_cli(run, IndexConf)
