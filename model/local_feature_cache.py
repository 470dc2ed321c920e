"""Local features of evaluation photos, extracted in parallel once and cached per photo.

Re-ranking needs the features of each query and of the database photos that reach some
query's top-k, not of the whole database; those are extracted on first use, in DataLoader
worker processes (SIFT is CPU work), and kept one file per photo under a folder named by the
extraction settings, keyed like the descriptor cache (relative path, size, mtime, box). A
query is read as the protocol reads it: its box cropped, scaled by its whole photo's factor.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from model import storage
from model.descriptor_cache import digest, photo_key
from model.images import BadImage
from model.local_features import LocalFeatureOptions, LocalFeatures, read_local_features

__all__ = ["LocalFeatureCache"]

logger = logging.getLogger(__name__)


class LocalFeatureCache:
    """Per-photo local features for one set of extraction settings."""

    def __init__(self, root: str | Path, options: LocalFeatureOptions) -> None:
        self.options = options
        self.folder = Path(root) / digest(options.identity())
        self.extracted = 0
        self.failed: dict[str, str] = {}

    def features(
        self,
        paths: Sequence[Path],
        boxes: Sequence[Sequence[float] | None] | None = None,
        *,
        root: Path,
        exif_transpose: bool,
        num_workers: int = 2,
        progress: bool = True,
    ) -> list[LocalFeatures | None]:
        """Features of each photo (``None`` where it cannot be read; counted in ``failed``)."""
        boxes = list(boxes) if boxes is not None else [None] * len(paths)
        files = [self._file(photo_key(p, b, root)) for p, b in zip(paths, boxes, strict=True)]
        out: list[LocalFeatures | None] = [_read(f) for f in files]
        todo = [i for i, found in enumerate(out) if found is None]
        if not todo:
            return out
        loader = DataLoader(
            _Extract(
                [paths[i] for i in todo],
                [boxes[i] for i in todo],
                self.options,
                exif_transpose=exif_transpose,
            ),
            batch_size=None,
            num_workers=min(num_workers, len(todo)) if len(todo) > 4 else 0,
        )
        bar = tqdm(total=len(todo), desc="local features", unit="img", disable=not progress)
        for j, result in loader:
            i = todo[j]
            if isinstance(result, BadImage):
                self.failed[str(paths[i])] = result.reason
            else:
                _write(files[i], result)
                out[i] = result
                self.extracted += 1
            bar.update(1)
        bar.close()
        return out

    def _file(self, key: str) -> Path:
        name = hashlib.sha1(key.encode()).hexdigest()
        return self.folder / name[:2] / f"{name}.npz"


class _Extract(Dataset):
    """Decode and extract in a worker: ``(index, LocalFeatures | BadImage)``."""

    def __init__(
        self,
        paths: Sequence[Path],
        boxes: Sequence[Sequence[float] | None],
        options: LocalFeatureOptions,
        *,
        exif_transpose: bool,
    ) -> None:
        self.paths, self.boxes, self.options = paths, boxes, options
        self.exif_transpose = exif_transpose

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, LocalFeatures | BadImage]:
        found = read_local_features(
            self.paths[index],
            self.options,
            exif_transpose=self.exif_transpose,
            box=self.boxes[index],
        )
        if isinstance(found, BadImage):
            return index, BadImage(f"{self.paths[index]}: {found.reason}")
        return index, found


def _read(file: Path) -> LocalFeatures | None:
    if not file.is_file():
        return None
    try:
        with np.load(file, allow_pickle=False) as data:
            width, height = (int(v) for v in data["size"])
            return LocalFeatures(data["keypoints"], data["descriptors"], (width, height))
    except (OSError, ValueError, KeyError) as err:
        logger.warning("extracting again: unreadable cached features %s: %s", file, err)
        return None


def _write(file: Path, features: LocalFeatures) -> None:
    buffer = io.BytesIO()
    np.savez(
        buffer,
        keypoints=features.keypoints,
        descriptors=features.descriptors,
        size=np.asarray(features.size, np.int64),
    )
    storage.write_bytes(file, buffer.getvalue())
