"""Writing a collection into a directory: every photo, then the camera table, the ground truth
and the configuration."""

from __future__ import annotations

import json
import pickle
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
from tqdm import tqdm

from model import tables
from model.datasets.landmarks.cameras import Shot, distractor_shot, landmark_shots
from model.datasets.landmarks.conf import GENERATOR_VERSION, LandmarksConf
from model.datasets.landmarks.dataset import (
    CAMERA_SCHEMA,
    CONFIG_FILE,
    IMAGE_DIR,
    camera_record,
)
from model.datasets.landmarks.ground_truth import Seen, query_ground_truth, visible_points
from model.datasets.landmarks.photos import encode_jpeg, take_photo
from model.datasets.landmarks.scene import Scene, build_scene


@dataclass
class _Collection:
    """What generation accumulates before the tables are written."""

    records: list[dict[str, Any]] = field(default_factory=list)
    database: list[str] = field(default_factory=list)
    queries: list[str] = field(default_factory=list)
    gnd: list[dict[str, Any]] = field(default_factory=list)


def _photograph(conf: LandmarksConf, scene: Scene, shot: Shot, *, jpg_dir: Path) -> Seen:
    """Take and save the photo of `shot`; return what it sees of the landmark."""
    photo, depth = take_photo(conf, scene, shot)
    (jpg_dir / f"{shot.name}.jpg").write_bytes(encode_jpeg(photo, conf.jpeg_quality))
    visible, uv = visible_points(scene.points, shot.camera, depth)
    return Seen(shot, visible, uv)


def _add_landmark(
    conf: LandmarksConf, index: int, jpg_dir: Path, *, collection: _Collection, bar: tqdm
) -> None:
    """Photograph landmark `index` and label its views for each of its queries."""
    scene = build_scene(conf, index)
    database: list[tuple[int, Seen]] = []  # (position in imlist, what it sees)
    queries: list[Seen] = []
    for shot in landmark_shots(conf, index, scene):
        seen = _photograph(conf, scene, shot, jpg_dir=jpg_dir)
        collection.records.append(camera_record(shot, scene))
        if shot.role == "db":
            database.append((len(collection.database), seen))
            collection.database.append(shot.name)
        else:
            queries.append(seen)
            collection.queries.append(shot.name)
        bar.update()
    collection.gnd += [
        query_ground_truth(conf, scene.centre, q, database=database) for q in queries
    ]


def _add_distractor(
    conf: LandmarksConf, index: int, jpg_dir: Path, *, collection: _Collection, bar: tqdm
) -> None:
    """Photograph distractor `index`: a database image that is a negative for every query."""
    scene = build_scene(conf, index, distractor=True)
    shot = distractor_shot(conf, index, scene)
    _photograph(conf, scene, shot, jpg_dir=jpg_dir)
    collection.records.append(camera_record(shot, scene))
    collection.database.append(shot.name)
    bar.update()


def write_collection(conf: LandmarksConf, out: Path, progress: bool) -> None:
    """Everything but `_SUCCESS` into `out`: photos, then the tables."""
    jpg_dir = out / IMAGE_DIR
    jpg_dir.mkdir()
    per_landmark = conf.views_per_landmark + conf.queries_per_landmark
    total = conf.num_landmarks * per_landmark + conf.num_distractors
    collection = _Collection()
    with tqdm(total=total, desc=f"render {conf.name}", unit="img", disable=not progress) as bar:
        for index in range(conf.num_landmarks):
            _add_landmark(conf, index, jpg_dir, collection=collection, bar=bar)
        for index in range(conf.num_distractors):
            _add_distractor(conf, index, jpg_dir, collection=collection, bar=bar)
    _write_tables(conf, out, collection)


def _write_tables(conf: LandmarksConf, out: Path, collection: _Collection) -> None:
    tables.CAMERAS.write(str(out), pa.Table.from_pylist(collection.records, schema=CAMERA_SCHEMA))
    ground_truth = {
        "imlist": collection.database,
        "qimlist": collection.queries,
        "gnd": collection.gnd,
    }
    with open(out / f"gnd_{conf.name}.pkl", "wb") as file:
        pickle.dump(ground_truth, file, protocol=4)
    config = {
        "config": asdict(conf),
        "digest": conf.digest(),
        "generator_version": GENERATOR_VERSION,
    }
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
