"""Descriptors cached per photo, so trying αQE or whitening variants never extracts again.

A cache folder belongs to one network and its settings (``network.json`` says which: weights,
head, scales, image size, device, bf16 — everything that changes a descriptor). Inside it a
photo's descriptor is keyed by its path relative to its data set's root, its size and its
modification time, and for a query its box: two photos of one name in different folders never
share a vector, and a regenerated data set is described anew.

The cache is written as it goes: every ``chunk_size`` photos extracted become one more part
file (``<role>/part-*.npz``, published whole), so an interrupted run keeps what it extracted
and the next run describes only the rest. Photos that could not be described are not cached.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from model import storage
from model.extraction import Extraction, ImageFiles

__all__ = ["DescriptorCache", "digest", "photo_key"]

logger = logging.getLogger(__name__)


def digest(payload: Any) -> str:
    """A short, stable hash of a JSON-serialisable value."""
    return hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


class DescriptorCache:
    """Descriptors per (photo, box) for one network and its settings (``identity``)."""

    def __init__(self, root: str | Path, identity: Mapping[str, Any], chunk_size: int = 1024):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
        self.folder = Path(root) / digest(dict(identity))
        self.identity = dict(identity)
        self.chunk_size = chunk_size

    def extract(
        self,
        role: str,
        images: ImageFiles,
        root: Path,
        *,
        extract: Callable[[ImageFiles], Extraction],
        progress: bool = True,
    ) -> tuple[Extraction, int]:
        """Descriptors of ``images`` (paths keyed relative to ``root``) and how many were new.

        ``extract`` describes a part of ``images``; only photos not in the cache reach it.
        """
        keys = {
            i: photo_key(images.paths[i], images.boxes[i], root)
            for i in range(len(images))
            if i not in images.failed
        }
        folder = self.folder / role
        where = _index(folder)  # key -> (part file, row)
        todo = [i for i, key in keys.items() if key not in where]
        failed = dict(images.failed)
        if todo:
            logger.info("%s: extracting %d of %d photos", role, len(todo), len(keys))
            self._write_identity()
        bar = tqdm(total=len(todo), desc=f"extract {role}", unit="img", disable=not progress)
        for start in range(0, len(todo), self.chunk_size):
            chunk = todo[start : start + self.chunk_size]
            result = extract(images.subset(chunk))
            failed.update({chunk[j]: reason for j, reason in result.failed.items()})
            done = [chunk[j] for j in result.indices.tolist()]
            if done:
                part = folder / f"part-{time.time_ns()}-{uuid.uuid4().hex[:8]}.npz"
                _write_part(part, [keys[i] for i in done], result.descriptors)
                where.update({keys[i]: (part, row) for row, i in enumerate(done)})
            bar.update(len(chunk))
        bar.close()
        described = np.array([i for i in sorted(keys) if i not in failed], dtype=np.int64)
        vectors = _gather([where[keys[i]] for i in described.tolist()])
        return Extraction(vectors, described, dict(sorted(failed.items()))), len(todo)

    def _write_identity(self) -> None:
        file = self.folder / "network.json"
        if not file.is_file():
            storage.write_text(file, json.dumps(self.identity, indent=2, sort_keys=True))


def photo_key(path: Path, box: Any, root: Path) -> str:
    """Relative path, size and modification time (and the box of a query)."""
    try:
        name = path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        name = str(path.resolve())
    stat = path.stat()
    crop = "" if box is None else json.dumps([float(v) for v in box])
    return f"{name}\t{stat.st_size}\t{stat.st_mtime_ns}\t{crop}"


def _index(folder: Path) -> dict[str, tuple[Path, int]]:
    where: dict[str, tuple[Path, int]] = {}
    if not folder.is_dir():
        return where
    for part in sorted(folder.glob("part-*.npz")):
        try:
            with np.load(part, allow_pickle=False) as data:
                keys = data["keys"].tolist()
        except (OSError, ValueError, KeyError) as err:
            logger.warning("ignoring unreadable cache part %s: %s", part, err)
            continue
        where.update({key: (part, row) for row, key in enumerate(keys)})
    return where


def _write_part(part: Path, keys: list[str], descriptors: Mapping[str, np.ndarray]) -> None:
    buffer = io.BytesIO()
    # numpy's stub lets a ``**dict`` fill ``allow_pickle: bool`` too, so arrays are "not bool".
    np.savez(
        buffer,
        keys=np.array(keys),
        **{f"head:{name}": np.asarray(v, np.float32) for name, v in descriptors.items()},  # type: ignore[arg-type]
    )
    storage.write_bytes(part, buffer.getvalue())


def _gather(locations: list[tuple[Path, int]]) -> dict[str, np.ndarray]:
    """Rows from the part files, in the order given; each part is read once."""
    rows_by_part: dict[Path, list[tuple[int, int]]] = defaultdict(list)
    for out_row, (part, row) in enumerate(locations):
        rows_by_part[part].append((out_row, row))
    out: dict[str, np.ndarray] = {}
    for part, pairs in rows_by_part.items():
        with np.load(part, allow_pickle=False) as data:
            for field in data.files:
                if not field.startswith("head:"):
                    continue
                vectors = data[field]
                name = field.removeprefix("head:")
                if name not in out:
                    out[name] = np.empty((len(locations), vectors.shape[1]), np.float32)
                targets, sources = zip(*pairs, strict=True)
                out[name][list(targets)] = vectors[list(sources)]
    return out
