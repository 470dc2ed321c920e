"""The shots of a landmark: hand-held cameras along a smooth, wide arc, and their names."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from model.datasets.landmarks.conf import LandmarksConf
from model.datasets.landmarks.render import Camera, intrinsics, look_at
from model.datasets.landmarks.scene import WORLD_UP, Scene
from model.datasets.landmarks.streams import SceneKind, Stream, stream_rng


@dataclass(frozen=True)
class _Arc:
    """A landmark's arc of camera positions, parameterised by f in [0, 1]."""

    azimuth: float  # of the arc's middle, radians
    span: float  # radians
    near: float  # camera distance at the near end, metres
    ratio: float  # far / near
    far_first: bool
    heights: tuple[float, float]  # metres above the ground
    wave: tuple[float, float]  # frequency and phase of the height's variation along the arc
    focal: float  # pixels

    def position(self, f: float, centre: np.ndarray) -> np.ndarray:
        azimuth = self.azimuth + (f - 0.5) * self.span
        progress = (1 - math.cos(math.pi * f)) / 2  # smooth, flat at both ends
        distance = self.near * self.ratio ** (1 - progress if self.far_first else progress)
        low, high = self.heights
        height = low + (high - low) * (
            0.5 - 0.5 * math.cos(2 * math.pi * (self.wave[0] * f + self.wave[1]))
        )
        return np.array(
            [
                centre[0] + distance * math.cos(azimuth),
                centre[1] + distance * math.sin(azimuth),
                height,
            ]
        )


def _arc(conf: LandmarksConf, scene: Scene, rng: np.random.Generator) -> _Arc:
    width = conf.image_size[0]
    return _Arc(
        azimuth=rng.uniform(0, 2 * np.pi),
        span=math.radians(conf.arc_degrees),
        near=max(22.0, 1.5 * scene.radius),  # outside every building
        ratio=conf.distance_ratio,
        far_first=bool(rng.random() < 0.5),
        heights=(rng.uniform(1.4, 2.0), rng.uniform(4.0, 8.0)),
        wave=(rng.uniform(0.5, 1.0), rng.uniform(0, 1)),
        focal=width / 2 / math.tan(math.radians(conf.horizontal_fov_degrees) / 2),
    )


def _arc_camera(
    conf: LandmarksConf, scene: Scene, arc: _Arc, *, f: float, rng: np.random.Generator
) -> Camera:
    """A hand-held photo from the arc at f: small jitter of position, aim, roll and zoom."""
    eye = arc.position(f, scene.centre) + rng.normal(0, [0.15, 0.15, 0.1])
    target = scene.centre + rng.normal(0, [0.6, 0.6, 0.4])
    focal = arc.focal * (1 + float(np.clip(rng.normal(0, 0.04), -0.1, 0.1)))
    width, height = conf.image_size
    roll = math.radians(float(np.clip(rng.normal(0, 1.2), -3, 3)))
    return look_at(
        eye, target, WORLD_UP, K=intrinsics(focal, width, height), size=(width, height), roll=roll
    )


@dataclass(frozen=True, eq=False)
class Shot:
    """One photo to take: its name, role, landmark (-1 for distractors) and camera."""

    name: str
    role: Literal["db", "query", "distractor"]
    landmark: int
    camera: Camera
    keys: tuple[int, ...]  # random-stream keys of its photometric variation


def _query_fractions(count: int, rng: np.random.Generator) -> list[float]:
    """Queries spread along the arc, between the database views."""
    return [
        float(np.clip((k + 0.5 + rng.uniform(-0.2, 0.2)) / count, 0.05, 0.95)) for k in range(count)
    ]


def _digits(count: int) -> int:
    return max(2, len(str(max(count - 1, 0))))


def landmark_shots(conf: LandmarksConf, index: int, scene: Scene) -> list[Shot]:
    """The database views (evenly along the arc) and the queries of landmark `index`."""
    arc = _arc(conf, scene, stream_rng(conf, Stream.ARC, SceneKind.LANDMARK, index))
    prefix = f"lm{index:0{_digits(conf.num_landmarks)}d}"
    views = conf.views_per_landmark
    shots = []
    for view in range(views):
        rng = stream_rng(conf, Stream.VIEW, SceneKind.LANDMARK, index, view)
        camera = _arc_camera(conf, scene, arc, f=view / (views - 1), rng=rng)
        name = f"{prefix}_v{view:0{_digits(views)}d}"
        shots.append(Shot(name, "db", index, camera, (SceneKind.LANDMARK, index, view)))
    fractions = _query_fractions(
        conf.queries_per_landmark, stream_rng(conf, Stream.QUERIES, SceneKind.LANDMARK, index)
    )
    for query, f in enumerate(fractions):
        view = views + query
        rng = stream_rng(conf, Stream.VIEW, SceneKind.LANDMARK, index, view)
        camera = _arc_camera(conf, scene, arc, f=f, rng=rng)
        shots.append(
            Shot(f"{prefix}_q{query}", "query", index, camera, (SceneKind.LANDMARK, index, view))
        )
    return shots


def distractor_shot(conf: LandmarksConf, index: int, scene: Scene) -> Shot:
    """The one photo of distractor `index`, from a random point of its arc."""
    rng = stream_rng(conf, Stream.ARC, SceneKind.DISTRACTOR, index)
    arc = _arc(conf, scene, rng)
    camera = _arc_camera(
        conf,
        scene,
        arc,
        f=float(rng.random()),
        rng=stream_rng(conf, Stream.VIEW, SceneKind.DISTRACTOR, index),
    )
    name = f"distractor_{index:0{max(_digits(conf.num_distractors), 3)}d}"
    return Shot(name, "distractor", -1, camera, (SceneKind.DISTRACTOR, index, 0))
