"""A landmark's 3D scene: textured boxes on a ground, with surface samples and a sun."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from model.datasets.landmarks.buildings import Box, building_tiers, place_buildings
from model.datasets.landmarks.conf import LandmarksConf
from model.datasets.landmarks.render import TexturedQuad
from model.datasets.landmarks.streams import SceneKind, Stream, stream_rng
from model.datasets.landmarks.style import random_style
from model.datasets.landmarks.textures import (
    ground_texture,
    plain_texture,
    roof_texture,
    wall_texture,
)

WORLD_UP = (0.0, 0.0, 1.0)
_GOLDEN = 0.6180339887498949
_SAMPLES_PER_LANDMARK = 2500
_GROUND_SIZE_M = 800.0


@dataclass(frozen=True, eq=False)
class Scene:
    """A landmark's geometry: the quads to draw (ground first) and what the ground truth needs."""

    quads: tuple[TexturedQuad, ...]
    centre: np.ndarray  # the point the cameras look at and angles are measured around
    points: np.ndarray  # [N, 3] samples of the landmark's surfaces (walls and roofs)
    radius: float  # of the footprint around the centre, metres
    height: float  # of the tallest building, metres
    sun: np.ndarray  # unit vector toward the sun


def _box_faces(box: Box) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, float, float, bool]]:
    """The walls and roof of a box as (origin, u, v, width_m, height_m, is_wall), outward facing."""
    ex = np.array([np.cos(box.yaw), np.sin(box.yaw), 0.0])
    ey = np.array([-np.sin(box.yaw), np.cos(box.yaw), 0.0])
    centre = np.array([box.x, box.y, box.z0])
    up = np.array(WORLD_UP)
    top = box.height * up
    faces = []
    sides: tuple[tuple[np.ndarray, float, float], ...]
    sides = ((-ey, box.depth, box.width), (ex, box.width, box.depth))
    sides += ((ey, box.depth, box.width), (-ex, box.width, box.depth))
    for normal, thickness, span in sides:  # thickness: the box's extent along the normal
        right = np.cross(up, normal)  # left to right as seen from outside
        origin = centre + normal * thickness / 2 - right * span / 2 + top
        faces.append((origin, right * span, -top, span, box.height, True))
    roof_origin = centre - ex * box.width / 2 + ey * box.depth / 2 + top
    faces.append((roof_origin, ex * box.width, -ey * box.depth, box.width, box.depth, False))
    return faces


def _surface_samples(
    rng: np.random.Generator, quads: Sequence[TexturedQuad], count: int
) -> np.ndarray:
    """Points spread over the quads in proportion to their area."""
    areas = np.array([q.area for q in quads])
    per_quad = np.maximum(np.round(count * areas / areas.sum()).astype(int), 3)
    return np.concatenate(
        [q.point(rng.random(n), rng.random(n)) for q, n in zip(quads, per_quad, strict=True)]
    )


def texture_density(conf: LandmarksConf) -> float:
    """Texture pixels per metre: about one texel per rendered pixel at 25 m."""
    width = conf.image_size[0] * conf.supersample
    focal = width / 2 / math.tan(math.radians(conf.horizontal_fov_degrees) / 2)
    return float(np.clip(focal / 25.0, 12.0, 64.0))


def _hue(conf: LandmarksConf, kind: SceneKind, index: int, *, rng: np.random.Generator) -> float:
    """Collection landmarks get hues spread by the golden ratio, so neighbours look different."""
    if kind is SceneKind.DISTRACTOR:
        return float(rng.random())
    start = float(stream_rng(conf, Stream.PALETTE).random())
    return (start + index * _GOLDEN) % 1.0


def build_scene(conf: LandmarksConf, index: int, *, distractor: bool = False) -> Scene:
    """Landmark `index` of the collection (or distractor `index`), the same for the same conf."""
    kind = SceneKind.DISTRACTOR if distractor else SceneKind.LANDMARK
    rng = stream_rng(conf, Stream.SCENE, kind, index)
    style = random_style(rng, _hue(conf, kind, index, rng=rng))
    ppm = texture_density(conf)
    quads: list[TexturedQuad] = []
    top = 0.0
    for kind_name, building in place_buildings(rng):
        base = style.walls[int(rng.integers(len(style.walls)))]
        for tier, box in enumerate(building_tiers(rng, kind_name, building)):
            top = max(top, box.z0 + box.height)
            for origin, u, v, width_m, height_m, is_wall in _box_faces(box):
                if not is_wall:
                    texture = roof_texture(rng, style, width_m, depth_m=height_m, ppm=ppm)
                elif width_m < 3.0:
                    texture = plain_texture(rng, base, width_m, height_m=height_m, ppm=ppm)
                else:
                    texture = wall_texture(
                        rng,
                        style,
                        base,
                        width_m=width_m,
                        height_m=height_m,
                        ppm=ppm,
                        ground_floor=tier == 0,
                    )
                quads.append(TexturedQuad(origin, u, v, texture, double_sided=False))
    corners = np.concatenate([q.corners for q in quads])[:, :2]
    middle = (corners.min(axis=0) + corners.max(axis=0)) / 2  # of the cluster's bounding box
    radius = float(np.max(np.linalg.norm(corners - middle, axis=1)))
    points = _surface_samples(rng, quads, _SAMPLES_PER_LANDMARK)
    half = _GROUND_SIZE_M / 2
    ground = TexturedQuad(
        np.array((-half, half, 0.0)),
        np.array((_GROUND_SIZE_M, 0.0, 0.0)),
        np.array((0.0, -_GROUND_SIZE_M, 0.0)),
        ground_texture(rng, style.ground),
        double_sided=False,
    )
    azimuth, elevation = rng.uniform(0, 2 * np.pi), rng.uniform(np.radians(25), np.radians(60))
    sun = np.array(
        [
            np.cos(azimuth) * np.cos(elevation),
            np.sin(azimuth) * np.cos(elevation),
            np.sin(elevation),
        ]
    )
    return Scene(
        quads=(ground, *quads),
        centre=np.array([middle[0], middle[1], float(np.clip(0.35 * top, 4.0, 9.0))]),
        points=points,
        radius=radius,
        height=top,
        sun=sun,
    )
