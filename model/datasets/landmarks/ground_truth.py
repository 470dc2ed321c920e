"""The retrieval ground truth from the geometry: visibility, covisibility, easy/hard/junk, bbx."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from model.datasets.landmarks.cameras import Shot
from model.datasets.landmarks.conf import LandmarksConf
from model.datasets.landmarks.render import Camera

_VISIBILITY_TOLERANCE = 0.02  # relative depth slack of the depth-buffer test


def visible_points(
    points: np.ndarray, camera: Camera, depth: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(visible [N] bool, pixels [N, 2]): points in frame, in front and not occluded in `depth`."""
    uv, z = camera.project(points)
    inside = (z > 0) & np.all(np.isfinite(uv), axis=1)
    inside &= (
        (uv[:, 0] >= 0)
        & (uv[:, 0] <= camera.width - 1)
        & (uv[:, 1] >= 0)
        & (uv[:, 1] <= camera.height - 1)
    )
    visible = np.zeros(len(points), dtype=bool)
    cols = np.rint(uv[inside, 0]).astype(int)
    rows = np.rint(uv[inside, 1]).astype(int)
    visible[inside] = z[inside] <= depth[rows, cols] * (1 + _VISIBILITY_TOLERANCE)
    return visible, uv


@dataclass(frozen=True, eq=False)
class Seen:
    """What one photo of a landmark sees of its surface samples."""

    shot: Shot
    visible: np.ndarray
    uv: np.ndarray


def _bounding_box(uv: np.ndarray) -> list[float]:
    """(x1, y1, x2, y2) of pixels [N, 2]."""
    (x1, y1), (x2, y2) = uv.min(axis=0), uv.max(axis=0)
    return [float(x1), float(y1), float(x2), float(y2)]


def covisibility(visible_a: np.ndarray, visible_b: np.ndarray) -> float:
    """The share of the surface samples seen by the photo that sees fewer of them that the other
    photo sees too: 1 for a zoom-in on the same side, near 0 for opposite sides."""
    fewer = min(int(visible_a.sum()), int(visible_b.sum()))
    return float((visible_a & visible_b).sum() / fewer) if fewer else 0.0


def viewpoint_change(
    centre: np.ndarray, camera_a: np.ndarray, camera_b: np.ndarray
) -> tuple[float, float]:
    """(angle in degrees between the directions from `centre` to the two camera centres,
    ratio >= 1 of their distances to it)."""
    to_a, to_b = np.asarray(camera_a) - centre, np.asarray(camera_b) - centre
    near, far = sorted([float(np.linalg.norm(to_a)), float(np.linalg.norm(to_b))])
    cosine = float(np.dot(to_a, to_b)) / (near * far)
    return math.degrees(math.acos(min(max(cosine, -1.0), 1.0))), far / near


def _classify(
    conf: LandmarksConf, centre: np.ndarray, query: Seen, *, image: Seen
) -> Literal["easy", "hard", "junk"]:
    """The revisited label of a database photo of the query's landmark, from the geometry."""
    if covisibility(query.visible, image.visible) < conf.junk_covisibility:
        return "junk"  # they show different sides, or the photo barely shows the landmark
    x0, y0, x1, y1 = _bounding_box(image.uv[query.visible & image.visible])
    camera = image.shot.camera
    if (x1 - x0) * (y1 - y0) < conf.junk_min_area * camera.width * camera.height:
        return "junk"  # what they share is tiny in the photo
    angle, ratio = viewpoint_change(centre, query.shot.camera.centre, camera.centre)
    if angle > conf.hard_angle_degrees or ratio > conf.hard_scale_ratio:
        return "hard"
    return "easy"


def query_ground_truth(
    conf: LandmarksConf, centre: np.ndarray, query: Seen, *, database: Sequence[tuple[int, Seen]]
) -> dict[str, Any]:
    """easy/hard/junk indices into imlist and the query's box, for one query."""
    labels: dict[str, list[int]] = {"easy": [], "hard": [], "junk": []}
    for position, seen in database:
        labels[_classify(conf, centre, query, image=seen)].append(position)
    visible = query.uv[query.visible]
    if len(visible) == 0:
        raise RuntimeError(f"query {query.shot.name} sees none of its landmark; the arc misses it")
    entry: dict[str, Any] = {key: np.array(value, dtype=np.int64) for key, value in labels.items()}
    entry["bbx"] = _bounding_box(visible)
    return entry
