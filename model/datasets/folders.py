"""Reading a folder of photos: a sub-folder per scene gives ground truth, a flat folder none.

With scenes, every photo is a query and the other photos of its scene are its positives (the
photo itself is junk). Photos from phones are stored sideways with an EXIF orientation tag, so
folders are read with EXIF rotation on.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from model.datasets.sets import IMAGE_SUFFIXES, RetrievalSet, list_images

__all__ = ["load_folder"]

logger = logging.getLogger(__name__)


def load_folder(root: str | Path) -> RetrievalSet:
    """A folder of photos: one sub-folder per scene gives ground truth; a flat folder has none."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"no photo folder at {root}")
    scenes = sorted(d for d in root.iterdir() if d.is_dir() and list_images(d))
    if not scenes:
        paths = list_images(root)
        if not paths:
            raise ValueError(f"{root} holds no photos ({', '.join(IMAGE_SUFFIXES)})")
        return RetrievalSet(root.name, paths, paths, protocol="none", exif_transpose=True)
    loose = list_images(root)
    if loose:
        logger.warning("ignoring %d photos beside the scene folders in %s", len(loose), root)
    paths, labels = [], []
    for label, scene in enumerate(scenes):
        images = list_images(scene)
        paths += images
        labels += [label] * len(images)
    labels_arr = np.asarray(labels)
    gnd = []
    for j, label in enumerate(labels_arr):
        same = np.flatnonzero(labels_arr == label)
        gnd.append({"ok": same[same != j], "junk": np.array([j])})
    return RetrievalSet(
        root.name,
        paths,
        paths,
        protocol="scenes",
        exif_transpose=True,
        gnd=gnd,
        db_labels=labels_arr,
        label_names=[s.name for s in scenes],
    )
