"""cnnimageretrieval-pytorch's training pairs file (``retrieval-SfM-120k.pkl``): read, checked,
and turned into this project's pairs tables; its photos into images table parts.

The pickle is a dict of splits, ``{"train": {...}, "val": {...}}``, each with ``cids`` (image
ids), ``cluster`` (each image's 3D model), ``qidxs`` (query images) and ``pidxs`` (each query's
positive), indices into ``cids``; image ``cid`` lies at ``IMS/cid[-2:]/cid[-4:-2]/cid[-6:-4]/cid``
(cirtorch's ``cid2filename``), a JPEG without an extension. ``pipeline.pairs --export-pkl``
writes the same layout (``train`` only).

``read_published`` checks the file before any photo is read, one line per problem (a missing
split or key, lengths that differ, an index out of range, a query that is its own positive, a
positive of another cluster), and unpickles it with only lists, dicts,
numbers, strings and NumPy arrays allowed, so a pickle from anywhere runs no code;
``missing_photos`` names each image with no file, with its cid and path. ``convert`` makes the
pairs tables (``tables.PAIRS``, ``WHITENING_PAIRS``, ``POOL``) of the usable photos: each pair
is a query with that one positive, each image keeps its split's cluster (negatives come from
other clusters), and the clusters are numbered so that ``split_clusters`` holds out exactly the
``val`` split. ``write_photos`` is the worker side of copying the photos (no torch, no Ray:
``pipeline.train.published`` runs it in Ray tasks).
"""

from __future__ import annotations

import hashlib
import io
import pickle
import threading
from collections import Counter, defaultdict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from model import storage, tables
from model.images import BadImage, image_id, open_image, read_size
from model.settings import raise_problems

__all__ = [
    "KEYS",
    "SPLITS",
    "Converted",
    "PublishedPairs",
    "Split",
    "capped",
    "cid2filename",
    "convert",
    "is_published",
    "missing_photos",
    "pkl_identity",
    "read_published",
    "write_photos",
]

SPLITS = ("train", "val")
KEYS = ("cids", "cluster", "qidxs", "pidxs")
_SHOWN = 10
"""Problems of one kind listed before the rest are counted."""
_THREADS = 16
_DECODES_AT_ONCE = 2
_ROW_GROUP = 8
_NUMPY_MODULES = frozenset(
    {"numpy", "numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric"}
    | {"numpy._core.numeric"}
)
_NUMPY_NAMES = frozenset({"_reconstruct", "ndarray", "dtype", "scalar", "_frombuffer"})
_BUILTINS = frozenset({"set", "frozenset", "list", "dict", "tuple", "int", "float", "str"})


def is_published(pairs: str | None) -> bool:
    """Whether ``--pairs`` names cirtorch's pairs file (a ``.pkl``) rather than a pairs output."""
    return bool(pairs) and str(pairs).rstrip("/").lower().endswith(".pkl")


def cid2filename(cid: str, prefix: str) -> str:
    """Where cirtorch keeps image ``cid`` under its ``ims`` folder or prefix."""
    return storage.join(prefix, cid[-2:], cid[-4:-2], cid[-6:-4], cid)


def pkl_identity(data: bytes) -> str:
    """A pairs file's identity: the hash of its bytes (wherever it lies)."""
    return f"cirtorch-pkl:{hashlib.sha256(data).hexdigest()[:20]}"


# ----------------------------------------------------------------------------- the file


@dataclass(frozen=True)
class Split:
    """One split of the file, checked: ``qidxs`` and ``pidxs`` index ``cids`` and ``cluster``."""

    cids: tuple[str, ...]
    cluster: np.ndarray
    qidxs: np.ndarray
    pidxs: np.ndarray


@dataclass(frozen=True)
class PublishedPairs:
    uri: str
    identity: str
    splits: dict[str, Split]
    """``train``, and ``val`` when the file has it."""

    @property
    def cids(self) -> list[str]:
        """Every image of the file, once, sorted."""
        return sorted({c for split in self.splits.values() for c in split.cids})


def read_published(uri: str) -> PublishedPairs:
    """The pairs file at ``uri`` (a path or ``s3://``), checked: ``ValueError`` with a line
    per problem, ``FileNotFoundError`` when nothing is there."""
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        raise FileNotFoundError(f"--pairs: no file at {uri}") from None
    try:
        loaded = _PlainUnpickler(io.BytesIO(data)).load()
    except Exception as err:  # any unpickling failure is the file's, named in one line
        reason = " ".join(str(err).split()) or type(err).__name__
        raise ValueError(f"--pairs: {uri} is not cirtorch's pairs pickle ({reason})") from None
    splits, problems = _splits(loaded, f"--pairs {uri}")
    raise_problems(problems)
    return PublishedPairs(uri=uri, identity=pkl_identity(data), splits=splits)


class _PlainUnpickler(pickle.Unpickler):
    """Plain data only: no class of the pickle's choosing is ever called."""

    def find_class(self, module: str, name: str) -> Any:
        numpy = module in _NUMPY_MODULES and name in _NUMPY_NAMES
        if numpy or (module == "builtins" and name in _BUILTINS):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"it holds a {module}.{name} object; only lists, dicts, numbers, strings and "
            "NumPy arrays are read"
        )


def _splits(loaded: Any, where: str) -> tuple[dict[str, Split], list[str]]:
    if not isinstance(loaded, dict):
        kind = type(loaded).__name__
        return {}, [f"{where} holds a {kind}, not cirtorch's dict of splits ('train', 'val')"]
    problems: list[str] = []
    if "train" not in loaded:
        keys = ", ".join(repr(k) for k in list(loaded)[:5]) or "none"
        problems.append(f"{where} has no 'train' split (its keys: {keys})")
    splits: dict[str, Split] = {}
    for name in SPLITS:
        if name in loaded:
            split, found = _split(loaded[name], f"{where} [{name!r}]")
            problems += found
            if split is not None:
                splits[name] = split
    return splits, problems


def _split(value: Any, where: str) -> tuple[Split | None, list[str]]:
    if not isinstance(value, dict):
        kind = type(value).__name__
        return None, [f"{where} is a {kind}, not a dict of {', '.join(KEYS)}"]
    problems = [f"{where} has no {key!r}" for key in KEYS if key not in value]
    if problems:
        return None, problems
    try:
        cids = list(value["cids"])
    except TypeError:
        return None, [f"{where}['cids'] is not a list of image ids"]
    problems += capped(
        [
            f"{where}['cids'][{i}] = {c!r} is not a cirtorch image id (a name of at least "
            "6 characters, no '/')"
            for i, c in enumerate(cids)
            if not isinstance(c, str) or len(c) < 6 or "/" in c
        ],
        "bad cids",
    )
    arrays = {key: _integers(value[key], f"{where}[{key!r}]", problems) for key in KEYS[1:]}
    cluster, qidxs, pidxs = (arrays[key] for key in KEYS[1:])
    if cluster is not None and len(cluster) != len(cids):
        problems.append(
            f"{where}: {len(cluster)} 'cluster' entries for {len(cids)} 'cids' (one per image)"
        )
    if qidxs is not None and pidxs is not None and len(qidxs) != len(pidxs):
        problems.append(
            f"{where}: {len(qidxs)} 'qidxs' but {len(pidxs)} 'pidxs' (one positive per query)"
        )
    for key, indices in (("qidxs", qidxs), ("pidxs", pidxs)):
        if indices is not None:
            bad = np.flatnonzero((indices < 0) | (indices >= len(cids)))
            problems += capped(
                [
                    f"{where}[{key!r}][{i}] = {indices[i]} is out of range "
                    f"({len(cids)} cids: 0 to {len(cids) - 1})"
                    for i in bad.tolist()
                ],
                f"{key} out of range",
            )
    if problems or cluster is None or qidxs is None or pidxs is None:
        return None, problems
    split = Split(tuple(str(c) for c in cids), cluster, qidxs, pidxs)
    return split, _pair_problems(split, where)


def _integers(values: Any, where: str, problems: list[str]) -> np.ndarray | None:
    """``values`` as int64 ``[N]``, or ``None`` with the problem added."""
    try:
        array = np.asarray(values)
    except (TypeError, ValueError) as err:
        problems.append(f"{where} is not a list of integers ({err})")
        return None
    if array.ndim != 1:
        problems.append(f"{where} is not a flat list of integers (shape {list(array.shape)})")
        return None
    if len(array) and not np.issubdtype(array.dtype, np.integer):
        problems.append(f"{where} is not a list of integers (it holds {array.dtype})")
        return None
    return array.astype(np.int64)


def _pair_problems(split: Split, where: str) -> list[str]:
    """Pairs the trainer cannot take: a query that is its own positive, a positive of another
    cluster (negatives are whatever lies in other clusters)."""
    own: list[str] = []
    apart: list[str] = []
    for i, (q, p) in enumerate(zip(split.qidxs.tolist(), split.pidxs.tolist(), strict=True)):
        if q == p:
            own.append(f"{where}: pair {i}: query {split.cids[q]} is its own positive")
        elif split.cluster[q] != split.cluster[p]:
            apart.append(
                f"{where}: pair {i}: query {split.cids[q]} (cluster {split.cluster[q]}) and its "
                f"positive {split.cids[p]} (cluster {split.cluster[p]}) are in different clusters"
            )
    return capped(own, "self-pairs") + capped(apart, "pairs across clusters")


def capped(lines: list[str], what: str) -> list[str]:
    """The first ``_SHOWN`` lines, the rest counted in one more."""
    if len(lines) <= _SHOWN:
        return lines
    return [*lines[:_SHOWN], f"... and {len(lines) - _SHOWN} more {what}"]


def missing_photos(published: PublishedPairs, ims: str) -> list[str]:
    """A line per image of the file with no file under ``ims`` at cirtorch's layout (one
    listing of an ``s3://`` prefix; a look at each local path)."""
    cids = published.cids
    paths = {c: cid2filename(c, ims) for c in cids}
    try:
        if storage.is_remote(ims):
            present = set(storage.list_files(ims))
            missing = [c for c in cids if paths[c] not in present]
        else:
            if not storage.local_path(ims).is_dir():
                raise FileNotFoundError(ims)
            missing = [c for c in cids if not storage.local_path(paths[c]).is_file()]
    except FileNotFoundError:
        return [f"--images: no folder at {ims} (give the folder of cirtorch's ims)"]
    if missing and len(missing) == len(cids):
        return [
            f"--images: none of the {len(cids)} images of {published.uri} is under {ims} "
            f"(image {cids[0]} would be at {paths[cids[0]]}); give the folder of cirtorch's ims"
        ]
    return capped(
        [f"--images: image {c} is missing: no file at {paths[c]}" for c in missing],
        "missing images",
    )


# ----------------------------------------------------------------------------- the tables


@dataclass(frozen=True)
class Converted:
    """The file as this trainer's pairs output: its three tables, and how validation splits."""

    pairs: pa.Table
    whitening: pa.Table
    pool: pa.Table
    held_out: float | None
    """The share of the queries that holds out exactly the ``val`` clusters; None: the file
    has no ``val`` (``--held-out`` applies)."""
    val_ids: frozenset[str]
    """The photos of the ``val`` clusters (the held-out set ``split_clusters`` must give)."""
    details: dict[str, Any] = field(default_factory=dict)


def convert(
    published: PublishedPairs, photo_ids: Mapping[str, str | None], *, seed: int
) -> Converted:
    """The pairs tables of ``published``'s usable photos (``photo_ids``: cid → image_id, None
    where the photo could not be used).

    Pairs whose query or positive is unusable, or is one photo in two clusters (byte-identical
    photos, or a cid in both splits: it would be its own negative), are left out (counted), as
    is a pair of byte-identical photos; ``val`` clusters left without a pair are
    left out whole (never a negative). The clusters with queries are numbered so that
    ``split_clusters(…, held_out, seed)`` holds out exactly the ``val`` ones."""
    keys: dict[str, set[tuple[str, int]]] = defaultdict(set)
    for name, split in published.splits.items():
        for cid, cluster in zip(split.cids, split.cluster.tolist(), strict=True):
            photo = photo_ids.get(cid)
            if photo is not None:
                keys[photo].add((name, cluster))
    ambiguous = {i for i, k in keys.items() if len(k) > 1}
    member = {i: next(iter(k)) for i, k in keys.items() if len(k) == 1}
    pairs, dropped = _usable_pairs(published, photo_ids, member)
    with_queries = {key for _, _, key in pairs}
    val_keys = sorted(k for k in with_queries if k[0] == "val")
    train_keys = sorted(k for k in with_queries if k[0] == "train")
    held_out = None
    if "val" in published.splits:
        problems: list[str] = []
        if not val_keys:
            problems.append(f"{published.uri}: no usable pair in 'val' to validate on")
        if len(train_keys) < 2:
            problems.append(
                f"{published.uri}: {len(train_keys)} cluster(s) of 'train' with a usable "
                "pair; training needs at least 2 (a query needs a negative cluster)"
            )
        raise_problems(problems)
        order = np.random.default_rng(seed).permutation(len(val_keys) + len(train_keys))
        number = dict(zip(val_keys + train_keys, order.tolist(), strict=True))
        val_queries = sum(key[0] == "val" for _, _, key in pairs)
        held_out = (val_queries - 0.5) / len(pairs)
    else:
        number = {key: i for i, key in enumerate(train_keys)}
    rest = sorted({k for k in member.values() if k not in number and k[0] == "train"})
    number.update({key: len(number) + i for i, key in enumerate(rest)})
    pooled = sorted((i, key) for i, key in member.items() if key in number)

    def label(key: tuple[str, int]) -> str:
        return f"{key[0]}/{key[1]}"

    pairs_table = pa.table(
        {
            "query_id": [q for q, _, _ in pairs],
            "positives": [[p] for _, p, _ in pairs],
            "overlaps": pa.nulls(len(pairs), tables.PAIRS.schema.field("overlaps").type),
            "cluster_id": [number[key] for _, _, key in pairs],
            "model_id": [label(key) for _, _, key in pairs],
        },
        schema=tables.PAIRS.schema,
    )
    whitening = pa.table(
        {"query_id": [q for q, _, _ in pairs], "positive_id": [p for _, p, _ in pairs]},
        schema=tables.WHITENING_PAIRS.schema,
    )
    pool = pa.table(
        {
            "image_id": [i for i, _ in pooled],
            "cluster_id": [number[key] for _, key in pooled],
            "model_id": [label(key) for _, key in pooled],
        },
        schema=tables.POOL.schema,
    )
    details = {
        "pkl": published.uri,
        "identity": published.identity,
        "pairs": {s: sum(key[0] == s for _, _, key in pairs) for s in published.splits},
        "clusters": {s: sum(key[0] == s for key in number) for s in published.splits},
        "photos": len(pooled),
        "dropped_pairs": dict(dropped),
        "photos_in_two_clusters": len(ambiguous),
        "photos_left_out": len(member) - len(pooled),
        "held_out": held_out if held_out is not None else "--held-out of 'train'",
    }
    val_ids = frozenset(i for i, key in pooled if key[0] == "val")
    return Converted(pairs_table, whitening, pool, held_out, val_ids, details)


def _usable_pairs(
    published: PublishedPairs,
    photo_ids: Mapping[str, str | None],
    member: Mapping[str, tuple[str, int]],
) -> tuple[list[tuple[str, str, tuple[str, int]]], Counter[str]]:
    """``(query image_id, positive image_id, cluster key)`` of every pair the trainer can take,
    in the file's order, and the count of the others by reason."""
    pairs: list[tuple[str, str, tuple[str, int]]] = []
    dropped: Counter[str] = Counter()
    for split in published.splits.values():
        for q, p in zip(split.qidxs.tolist(), split.pidxs.tolist(), strict=True):
            query, positive = photo_ids.get(split.cids[q]), photo_ids.get(split.cids[p])
            if query is None or positive is None:
                dropped["photo unusable"] += 1
            elif query not in member or positive not in member:
                dropped["photo in two clusters"] += 1
            elif query == positive:
                dropped["byte-identical query and positive"] += 1
            else:
                pairs.append((query, positive, member[query]))
    return pairs, dropped


# ----------------------------------------------------------------------------- the photos


def write_photos(uris: list[str], images: str) -> list[tuple[str, str]]:
    """A block of photos read (threads: the store's latency), each decoded once to check it,
    and written into the images output folder ``images`` as one part of the images table
    (photo bytes as they are, small row groups, as ingest writes them; its name is the
    block's, so a retried block rewrites it); returns ``(uri, reason)`` of the photos that
    could not be read, which are not written."""
    decoding = threading.BoundedSemaphore(_DECODES_AT_ONCE)

    def one(uri: str) -> dict[str, Any] | str:
        try:
            data = storage.read_bytes(uri)
        except OSError as err:
            return " ".join(str(err).split()) or type(err).__name__
        with decoding:
            return _photo_row(uri, data)

    with ThreadPoolExecutor(max(1, min(_THREADS, len(uris)))) as pool:
        found = list(pool.map(one, uris))
    rows = [r for r in found if isinstance(r, dict)]
    if rows:
        name = f"part-{hashlib.sha1(chr(10).join(uris).encode()).hexdigest()[:12]}"
        small = [n for n in tables.IMAGES.schema.names if n != "bytes"]
        tables.IMAGES.write(
            images,
            tables.IMAGES.from_rows(rows),
            part=name,
            row_group_size=_ROW_GROUP,
            compression={n: "none" if n == "bytes" else "zstd" for n in tables.IMAGES.schema.names},
            use_dictionary=small,
            write_statistics=small,
        )
    return [(u, r) for u, r in zip(uris, found, strict=True) if isinstance(r, str)]


def _photo_row(uri: str, data: bytes) -> dict[str, Any]:
    """A row of the images table: the photo checked by a full decode (EXIF rotation applied,
    as ingest does), or why it cannot be used."""
    size = read_size(data, exif_transpose=True)
    if isinstance(size, BadImage):
        return {"uri": uri, "error": f"not an image: {size.reason}"}
    image = open_image(data, exif_transpose=True)
    if isinstance(image, BadImage):
        return {"uri": uri, "error": f"corrupt: {image.reason}"}
    with Image.open(io.BytesIO(data)) as header:
        image_format = header.format
    return {
        "image_id": image_id(data),
        "uri": uri,
        "width": image.width,
        "height": image.height,
        "format": image_format,
        "size_bytes": len(data),
        "bytes": data,
    }
