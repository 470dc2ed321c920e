"""The files of a collection on disk, its camera table, and reading a complete one back."""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from model import storage, tables
from model.datasets.landmarks.cameras import Shot
from model.datasets.landmarks.render import Camera
from model.datasets.landmarks.scene import Scene
from model.datasets.revisited import load_ground_truth_pickle

CONFIG_FILE = "config.json"
IMAGE_DIR = "jpg"


class IncompleteDatasetError(FileNotFoundError):
    """The data set directory has no manifest: it is missing, partial or still being written."""


class DatasetConflictError(FileExistsError):
    """A complete data set with the same name but another configuration is already there."""


def camera_record(shot: Shot, scene: Scene) -> dict[str, Any]:
    """The cameras.parquet row (as a dict, see CAMERA_SCHEMA) of `shot`."""
    camera = shot.camera
    return {
        "name": shot.name,
        "role": shot.role,
        "landmark": shot.landmark,
        "fx": float(camera.K[0, 0]),
        "fy": float(camera.K[1, 1]),
        "cx": float(camera.K[0, 2]),
        "cy": float(camera.K[1, 2]),
        "width": camera.width,
        "height": camera.height,
        "R": camera.R.reshape(-1).tolist(),
        "t": camera.t.tolist(),
        "centre": camera.centre.tolist(),
        "landmark_centre": scene.centre.tolist(),
    }


CAMERA_SCHEMA = tables.CAMERAS.schema


def camera_from_record(record: Mapping[str, Any]) -> Camera:
    """The Camera of a cameras.parquet row (as a dict)."""
    K = np.array(
        [[record["fx"], 0.0, record["cx"]], [0.0, record["fy"], record["cy"]], [0.0, 0.0, 1.0]]
    )
    R = np.asarray(record["R"], dtype=np.float64).reshape(3, 3)
    return Camera(
        K, R, np.asarray(record["t"], dtype=np.float64), int(record["width"]), int(record["height"])
    )


def _require_complete(dataset_dir: str | Path) -> tables.Manifest:
    try:
        return tables.LANDMARKS_OUTPUT.manifest(str(dataset_dir))
    except (OSError, ValueError) as err:
        raise IncompleteDatasetError(
            f"{dataset_dir} is no complete landmark collection ({err}); generate it with "
            "generate(conf, root) or `python -m pipeline.landmarks --conf <preset> --root <dir>`"
        ) from None


def _dataset_name(dataset_dir: str | Path) -> str:
    if storage.is_remote(dataset_dir):
        return str(dataset_dir).rstrip("/").rsplit("/", 1)[-1]
    return storage.local_path(dataset_dir).name


def load_ground_truth(dataset_dir: str | Path) -> dict[str, Any]:
    """The revisited-format ground truth (imlist, qimlist, gnd) of a complete collection.

    `dataset_dir` is a local path or an `s3://` URI.
    """
    _require_complete(dataset_dir)
    name = _dataset_name(dataset_dir)
    data = storage.read_bytes(storage.join(dataset_dir, f"gnd_{name}.pkl"))
    return load_ground_truth_pickle(data)  # data only: it may come from S3


def load_cameras(dataset_dir: str | Path) -> pa.Table:
    """The camera table (one row per image) of a complete collection (local path or URI)."""
    return tables.CAMERAS.read_from(_require_complete(dataset_dir))


def write_scene_manifest(dataset_dir: str | Path, path: str | Path) -> Path:
    """An ingest manifest (CSV: ``uri``, ``scene`` = ``lm<landmark>``) of a local collection's
    landmark photos, distractors left out: the input of the SfM and training stages' checks."""
    root, out = Path(dataset_dir).resolve(), Path(path)  # ingest reads relative to the CSV
    with out.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["uri", "scene"])
        for cam in load_cameras(root).to_pylist():
            if cam["landmark"] >= 0:
                writer.writerow([str(root / "jpg" / f"{cam['name']}.jpg"), f"lm{cam['landmark']}"])
    return out
