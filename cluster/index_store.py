"""The on-storage layout of a sharded, versioned FAISS index, and how to read it.

The index stage (``pipeline.index``) writes it; the serving shard actors read one shard each
with :func:`load_shard`; :func:`search` runs a whole version in one process (tests, result
checks). Everything goes through :mod:`model.storage`, so ``INDEX`` is a local folder or an
``s3://bucket/prefix`` alike. This module imports only NumPy, FAISS, pyarrow, the storage
layer and the table specs: no Ray, no torch.

Each version's manifest is the one every output has (``model.tables.INDEX_VERSION``, written
last): its fingerprint covers the descriptors it indexed and the index's content settings, its
``details`` what this module reads (dimension, factory, shards, ...). :func:`read_manifest`
hands those details on as a dict, with the manifest's identity and fingerprint.

Layout::

    INDEX/
      v1/
        trained.faiss               the trained, empty index every shard starts from
        shard-00000.faiss           faiss.serialize_index of one shard
        shard-00000.ids.parquet     its id map: columns id (int64), image_id (string)
        shard-00001.faiss ...
        manifest.json               written last: the version exists once this file does
        _build/                     plan and shard receipts of an unfinished build (resume)
      v2/
        shard-00000.faiss ...       only the shards built for v2; its manifest lists v1's too
        manifest.json

A version without its manifest does not exist for a reader (a build that was killed, or
one still running); :func:`latest_version` is the newest version that has one. Every path in a
manifest is relative to ``INDEX`` (``v1/shard-00000.faiss``), so a later version references the
files of an earlier one instead of copying them, and the whole folder can be moved or synced.

Ids. Every vector of a version has a global int64 id: ids ``0 .. count-1`` in the order the
versions added them (each build gives its new rows consecutive ids after its parent's count).
A shard holds a contiguous run of ids, ``id_start .. id_start + count - 1``; inside the FAISS
index its vectors carry local labels ``0 .. count-1`` (added in id order, no ``IDMap``), and its
id map turns a local label into the global id and the image_id (:class:`IdMap`).

Merging shards (what any router must do). FAISS does not settle ties: which of several
equally scored vectors fill its last places depends on the order it meets them (a better vector
arriving later can evict the lower of two tied ids), and it lists tied results higher id first.
So each shard answers with :func:`shard_topk`, its top k in the canonical order (score
descending, then id ascending; where a tie straddles the k-th place it asks FAISS for more
until the tie is whole), and :func:`merge_topk` concatenates the shards' (score, global id)
pairs, drops FAISS's empty slots (label -1) and sorts them in the same order, keeping k. Shards
hold disjoint, ordered id runs, so the result is the canonical top k of the whole version: the
same as one unsharded index searched for all its vectors and cut after the same sort. The
metric is inner product, so larger is better: ``faiss.ResultHeap`` keeps the smallest by
default (L2) and must not be used as is.

Scores. IVF and PQ scores are computed one vector at a time and do not depend on where a
vector sits. A Flat index searched with 20 or more queries at once goes through BLAS, whose
rounding can differ by an ulp with a vector's position in its block, so two identical vectors
in different shards can then score an ulp apart; below 20 queries per call they never do.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np
import pyarrow as pa

from model import storage, tables

if TYPE_CHECKING:
    from cluster.shards import DeviceIndex

__all__ = [
    "METRIC",
    "TRAINED",
    "IdMap",
    "SearchResult",
    "deserialize_index",
    "faiss_search",
    "id_map_bytes",
    "latest_version",
    "list_versions",
    "load_id_map",
    "load_shard",
    "load_trained",
    "merge_topk",
    "read_manifest",
    "search",
    "search_parameters",
    "serialize_index",
    "set_search_params",
    "sha256",
    "shard_names",
    "shard_topk",
    "version_dir",
    "version_manifest",
]

logger = logging.getLogger(__name__)

TRAINED = "trained.faiss"
METRIC = "inner_product"
"""Descriptors are L2-normalised, so the index ranks by inner product (cosine similarity)."""

_VERSION_DIR = re.compile(r"^v([1-9][0-9]*)$")


def version_dir(version: int) -> str:
    """``v<N>``: the folder of version ``version`` under ``INDEX``."""
    if version < 1:
        raise ValueError(f"index versions count from 1, not {version}")
    return f"v{version}"


def shard_names(version: int, number: int) -> tuple[str, str]:
    """Relative paths of shard ``number`` built for ``version``: its index file and id map."""
    base = f"{version_dir(version)}/shard-{number:05d}"
    return f"{base}.faiss", f"{base}.ids.parquet"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def serialize_index(index: faiss.Index) -> bytes:
    return faiss.serialize_index(index).tobytes()


def deserialize_index(data: bytes) -> faiss.Index:
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))


def list_versions(index: str) -> list[int]:
    """The complete versions under ``index`` (those with a manifest), oldest first."""
    root = str(index).rstrip("/")
    marker = f"/{tables.MANIFEST}"
    try:
        names = storage.list_files(root, suffixes=(marker,))
    except FileNotFoundError:
        return []
    listed_root = root if storage.is_remote(root) else str(storage.local_path(root))
    versions = []
    for name in names:
        head, _, _ = name.rpartition(marker)
        parent, _, folder = head.rpartition("/")
        match = _VERSION_DIR.match(folder)
        if match and parent.rstrip("/") == listed_root.rstrip("/"):
            versions.append(int(match.group(1)))
    return sorted(versions)


def latest_version(index: str) -> int | None:
    """The newest complete version under ``index``; ``None`` when there is none yet."""
    versions = list_versions(index)
    return versions[-1] if versions else None


def version_manifest(index: str, version: int | None = None) -> tables.Manifest:
    """The common manifest of ``version`` (default: the latest complete one).

    ``FileNotFoundError`` when ``index`` holds no complete version (or not that one),
    ``ValueError`` (one line) when it is not an index manifest this code reads.
    """
    if version is None:
        version = latest_version(index)
        if version is None:
            raise FileNotFoundError(
                f"no complete index version under {index} (no v*/{tables.MANIFEST})"
            )
    folder = storage.join(index, version_dir(version))
    try:
        return tables.INDEX_VERSION.manifest(folder)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"index version {version} under {index} is not complete: "
            f"no {tables.INDEX_VERSION.manifest_uri(folder)}"
        ) from None
    except ValueError as err:
        if not storage.is_file(tables.INDEX_VERSION.manifest_uri(folder)):
            raise FileNotFoundError(
                f"index version {version} under {index} is not complete: {err}"
            ) from None
        raise


def read_manifest(index: str, version: int | None = None) -> dict[str, Any]:
    """What the readers of a version need: its manifest's ``details`` (version, dim, factory,
    shards, network, ...) as a dict, plus ``identity`` and ``fingerprint`` of the manifest.

    The descriptors each version indexed (``descriptors["uri"]`` and every ``history`` entry's
    ``descriptors``) are where they lie now: found from the version's manifest, so an index
    whose run folder moved still leads to its descriptors (and their photos). A network the
    version pinned (copied into the index) is read from there: ``network["checkpoint"]`` is
    the pinned copy, wherever the checkpoint it came from went since.
    ``FileNotFoundError`` / ``ValueError`` as :func:`version_manifest`.
    """
    manifest = version_manifest(index, version)
    details = dict(manifest.details)
    network = details.get("network")
    if isinstance(network, dict) and network.get("pinned"):
        details["network"] = {**network, "checkpoint": storage.join(index, network["pinned"])}
    details["identity"] = manifest.identity
    details["fingerprint"] = manifest.fingerprint
    here = _descriptors_source(manifest)
    if here is not None and details.get("descriptors"):
        details["descriptors"] = {**details["descriptors"], "uri": here}
    details["history"] = [
        {**entry, "descriptors": _history_source(index, entry, manifest)}
        for entry in details.get("history") or []
    ]
    return details


def _descriptors_source(manifest: tables.Manifest) -> str | None:
    """Where the descriptors a version indexed lie now (``None`` when it names none)."""
    return manifest.source("descriptors") if "descriptors" in manifest.sources else None


def _history_source(index: str, entry: dict[str, Any], current: tables.Manifest) -> str:
    """Where the descriptors of one ``history`` entry lie now: read from the manifest of the
    version that added them (the entry's stored path when that cannot be read)."""
    stored = str(entry.get("descriptors"))
    version: Any = entry.get("version")  # as stored; int() of anything else fails below
    try:
        manifest = (
            current
            if version == current.details.get("version")
            else version_manifest(index, int(version))
        )
    except (OSError, ValueError, TypeError):
        return stored
    return _descriptors_source(manifest) or stored


def _read_checked(index: str, relative: str, expected: str | None, *, what: str) -> bytes:
    data = storage.read_bytes(storage.join(index, relative))
    if expected is not None and sha256(data) != expected:
        raise ValueError(
            f"{what} {storage.join(index, relative)} does not match the sha256 in its manifest "
            "(changed or damaged since it was published); rebuild that version"
        )
    return data


@dataclass(frozen=True)
class IdMap:
    """Local FAISS labels of one shard to global ids and image_ids (row ``i`` is label ``i``)."""

    ids: np.ndarray
    """int64 ``[count]``: the global id of each local label, ascending."""
    image_ids: np.ndarray
    """object ``[count]``: the image_id of each local label."""

    def __len__(self) -> int:
        return len(self.ids)

    def global_ids(self, labels: np.ndarray) -> np.ndarray:
        """Global ids of FAISS labels; -1 (FAISS's empty slot) stays -1."""
        labels = np.asarray(labels)
        out = np.full(labels.shape, -1, dtype=np.int64)
        valid = labels >= 0
        out[valid] = self.ids[labels[valid]]
        return out


def id_map_bytes(ids: np.ndarray, image_ids: Sequence[str]) -> bytes:
    """The Parquet file of an id map (``model.tables.INDEX_IDS``: ``id`` int64, ``image_id``)."""
    table = pa.table(
        {
            "id": pa.array(np.asarray(ids, dtype=np.int64)),
            "image_id": pa.array(list(image_ids), type=pa.string()),
        }
    )
    return tables.parquet_bytes(tables.INDEX_IDS.conform(table))


def load_id_map(index: str, shard: Mapping[str, Any], verify: bool = True) -> IdMap:
    """The id map of one shard entry of a manifest."""
    if verify:
        _read_checked(index, shard["id_map"], shard.get("id_map_sha256"), what="id map")
    table = tables.INDEX_IDS.read_file(storage.join(index, shard["id_map"]))
    ids = table.column("id").to_numpy().astype(np.int64, copy=False)
    image_ids = np.asarray(table.column("image_id").to_pylist(), dtype=object)
    if len(ids) != int(shard["count"]):
        raise ValueError(
            f"id map {shard['id_map']} holds {len(ids)} rows, its manifest says {shard['count']}"
        )
    return IdMap(ids=ids, image_ids=image_ids)


def set_search_params(index: faiss.Index, params: Mapping[str, Any]) -> None:
    """Apply search-time parameters (``{"nprobe": 32}``, ``{"efSearch": 64}``) to ``index``.

    ``faiss.ParameterSpace`` reaches through pre-transforms (OPQ) to the IVF or HNSW part.
    """
    space = faiss.ParameterSpace()
    for name, value in params.items():
        space.set_index_parameter(index, str(name), float(value))


def search_parameters(index: faiss.Index, params: Mapping[str, Any]) -> Any:
    """FAISS ``SearchParameters`` of ``params`` (``nprobe`` for IVF, ``efSearch`` for HNSW) for
    one call on ``index``, or ``None`` when there are none: unlike :func:`set_search_params` they
    change nothing in the index, so one loaded shard can answer several versions, each with
    its own settings."""
    if not params:
        return None
    lib: Any = faiss  # its SWIG classes take their fields as keywords (and keep what they hold)
    inner: Any = faiss.downcast_index(index)
    wrapped = isinstance(inner, faiss.IndexPreTransform)
    if wrapped:
        inner = faiss.downcast_index(inner.index)
    found: Any = None
    if faiss.try_extract_index_ivf(inner) is not None and "nprobe" in params:
        found = lib.SearchParametersIVF(nprobe=int(params["nprobe"]))
    elif isinstance(inner, faiss.IndexHNSW) and "efSearch" in params:
        found = lib.SearchParametersHNSW(efSearch=int(params["efSearch"]))
    if found is not None and wrapped:
        found = lib.SearchParametersPreTransform(index_params=found)
    return found


def load_trained(index: str, manifest: Mapping[str, Any], verify: bool = True) -> faiss.Index:
    """The trained, empty index of a version (what a new shard is built from)."""
    trained = manifest["trained"]
    data = _read_checked(
        index, trained["file"], trained.get("sha256") if verify else None, what="trained index"
    )
    return deserialize_index(data)


def load_shard(
    index: str,
    manifest: Mapping[str, Any],
    i: int,
    *,
    verify: bool = True,
    search_params: Mapping[str, Any] | None = None,
) -> tuple[faiss.Index, IdMap]:
    """Shard ``i`` of a version on its own: its FAISS index and its id map.

    The manifest's search parameters (e.g. the tuned ``nprobe``) are applied unless
    ``search_params`` replaces them. With ``verify`` (default) the files' sha256 must match
    the manifest. FAISS labels of the returned index are local: turn them into global ids
    with ``id_map.global_ids(labels)``.
    """
    shards = manifest["shards"]
    if not 0 <= i < len(shards):
        raise IndexError(f"shard {i} of a version with {len(shards)} shards")
    shard = shards[i]
    data = _read_checked(
        index, shard["file"], shard.get("sha256") if verify else None, what="shard"
    )
    faiss_index = deserialize_index(data)
    if faiss_index.ntotal != int(shard["count"]):
        raise ValueError(
            f"shard {shard['file']} holds {faiss_index.ntotal} vectors, "
            f"its manifest says {shard['count']}"
        )
    params = manifest.get("search_params", {}) if search_params is None else search_params
    set_search_params(faiss_index, params)
    return faiss_index, load_id_map(index, shard, verify=verify)


def merge_topk(
    scores: Sequence[np.ndarray], ids: Sequence[np.ndarray], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard results ``[nq, k_i]`` (global ids, -1 = empty) into the top ``k``.

    Each shard's part must be its canonical top k (:func:`shard_topk`, labels turned into
    global ids). Largest inner product first; on equal scores the lower global id first.
    Empty places (fewer than ``k`` results in all) are id -1 with score ``-inf``.
    """
    if not scores:
        raise ValueError("merge_topk needs the results of at least one shard")
    all_scores = np.concatenate([np.asarray(s, np.float32) for s in scores], axis=1)
    all_ids = np.concatenate([np.asarray(i, np.int64) for i in ids], axis=1)
    empty = all_ids < 0
    all_scores = np.where(empty, -np.inf, all_scores)
    sort_ids = np.where(empty, np.iinfo(np.int64).max, all_ids)
    order = np.lexsort((sort_ids, -all_scores), axis=-1)[:, :k]
    top_scores = np.take_along_axis(all_scores, order, axis=1)
    top_ids = np.take_along_axis(all_ids, order, axis=1)
    top_ids = np.where(np.isneginf(top_scores), -1, top_ids)
    if top_scores.shape[1] < k:  # fewer candidates than k in all shards together
        pad = k - top_scores.shape[1]
        top_scores = np.pad(top_scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        top_ids = np.pad(top_ids, ((0, 0), (0, pad)), constant_values=-1)
    return top_scores.astype(np.float32), top_ids


def _canonical(scores: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    empty = labels < 0
    keys = np.where(empty, np.iinfo(np.int64).max, labels)
    order = np.lexsort((keys, -np.where(empty, -np.inf, scores)), axis=-1)[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(labels, order, 1)


def faiss_search(
    index: Any, x: np.ndarray, k: int, *, params: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """``index.search(x, k)`` with FAISS search parameters when given, also after
    ``faiss.contrib.torch_utils`` replaced ``search`` by a torch one that takes none (it keeps
    FAISS's NumPy search as ``search_numpy``)."""
    if params is None:
        return index.search(x, k)
    search = getattr(index, "search_numpy", None) or index.search
    return search(x, k, params=params)


def shard_topk(
    index: faiss.Index | DeviceIndex, queries: np.ndarray, k: int, *, params: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """``index.search`` in the canonical order: score descending, then label ascending.

    Returns ``(scores [nq, k'], labels [nq, k'])`` with ``k' = min(k, ntotal)``; -1 labels where
    the probed lists hold fewer results. FAISS is asked for one more than ``k``; a query whose
    extra result ties with its k-th is asked again with twice as many, until the tie is whole,
    so the k kept are the lowest labels among equal scores. ``params``: FAISS search
    parameters of this call (:func:`search_parameters`).
    """
    q = np.ascontiguousarray(queries, dtype=np.float32)
    total = int(index.ntotal)
    k = min(k, total)
    scores = np.empty((len(q), k), np.float32)
    labels = np.empty((len(q), k), np.int64)
    rows = np.arange(len(q))
    asked = min(total, k + 1)
    while len(rows):
        found_scores, found_labels = faiss_search(index, q[rows], asked, params=params)
        if asked < total:
            more = (found_labels[:, -1] >= 0) & (found_scores[:, -1] == found_scores[:, k - 1])
        else:
            more = np.zeros(len(rows), dtype=bool)
        done = rows[~more]
        scores[done], labels[done] = _canonical(found_scores[~more], found_labels[~more], k)
        rows = rows[more]
        asked = min(total, 2 * asked)
    return scores, labels


@dataclass(frozen=True)
class SearchResult:
    """Top-k of each query over a whole version, best first."""

    scores: np.ndarray
    """float32 ``[nq, k]``; ``-inf`` where the version has fewer than k results."""
    ids: np.ndarray
    """int64 ``[nq, k]`` global ids; -1 where empty."""
    image_ids: np.ndarray
    """object ``[nq, k]``; ``None`` where empty."""
    version: int


def search(
    index: str,
    queries: np.ndarray,
    k: int,
    *,
    version: int | None = None,
    search_params: Mapping[str, Any] | None = None,
) -> SearchResult:
    """Search every shard of a version (default: the latest) in this process and merge.

    ``queries`` is ``[nq, dim]`` (L2-normalised like the descriptors). Shards are loaded one
    at a time, so memory holds one shard plus the results. For serving, build on
    :func:`load_shard` and :func:`merge_topk` instead.
    """
    manifest = read_manifest(index, version)
    dim = int(manifest["dim"])
    q = np.ascontiguousarray(np.asarray(queries, dtype=np.float32))
    if q.ndim != 2 or q.shape[1] != dim:
        raise ValueError(f"queries must be [n, {dim}] for this index, not {list(q.shape)}")
    if k < 1:
        raise ValueError(f"k must be at least 1, not {k}")
    all_scores, all_ids, id_maps = [], [], []
    for i in range(len(manifest["shards"])):
        faiss_index, id_map = load_shard(index, manifest, i, search_params=search_params)
        if faiss_index.ntotal == 0:
            continue
        scores, labels = shard_topk(faiss_index, q, k)
        all_scores.append(scores)
        all_ids.append(id_map.global_ids(labels))
        id_maps.append(id_map)
        del faiss_index
    if not all_scores:
        raise ValueError(f"index version {manifest['version']} under {index} holds no vectors")
    top_scores, top_ids = merge_topk(all_scores, all_ids, k)
    image_ids = np.full(top_ids.shape, None, dtype=object)
    if id_maps:
        ids = np.concatenate([m.ids for m in id_maps])
        names = np.concatenate([m.image_ids for m in id_maps])
        order = np.argsort(ids, kind="stable")
        ids, names = ids[order], names[order]
        valid = top_ids >= 0
        image_ids[valid] = names[np.searchsorted(ids, top_ids[valid])]
    return SearchResult(
        scores=top_scores, ids=top_ids, image_ids=image_ids, version=int(manifest["version"])
    )
