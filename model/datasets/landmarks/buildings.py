"""Where a landmark's buildings stand and how big they are: boxes, towers split into tiers."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np


@dataclass(frozen=True)
class Box:
    """A building block: footprint centre (x, y), yaw, size and base height, metres."""

    x: float
    y: float
    yaw: float
    width: float
    depth: float
    height: float
    z0: float = 0.0

    @property
    def footprint_radius(self) -> float:
        return 0.5 * math.hypot(self.width, self.depth)


_BUILDING_SIZES: dict[str, tuple[tuple[float, float], tuple[float, float], tuple[float, float]]] = {
    # kind: (width range, depth range, height range) in metres
    "hall": ((14.0, 22.0), (8.0, 13.0), (9.0, 15.0)),
    "tower": ((5.0, 8.0), (5.0, 8.0), (18.0, 30.0)),
    "block": ((6.0, 12.0), (6.0, 11.0), (5.0, 10.0)),
    "facade": ((10.0, 18.0), (1.0, 1.6), (7.0, 12.0)),
}


def place_buildings(rng: np.random.Generator) -> list[tuple[str, Box]]:
    """A cluster of buildings around the origin: a main one near the centre, others about it."""
    base_yaw = rng.uniform(0, np.pi / 2)
    kinds = [str(rng.choice(["hall", "tower"]))]
    kinds += [
        str(k)
        for k in rng.choice(
            ["hall", "tower", "block", "block", "facade"], size=int(rng.integers(2, 5))
        )
    ]
    placed: list[tuple[str, Box]] = []
    for i, kind in enumerate(kinds):
        (w0, w1), (d0, d1), (h0, h1) = _BUILDING_SIZES[kind]
        width, depth, height = rng.uniform(w0, w1), rng.uniform(d0, d1), rng.uniform(h0, h1)
        yaw: float = base_yaw + (np.pi / 2) * rng.integers(0, 2) + rng.normal(0, 0.05)
        if rng.random() < 0.25:
            yaw = rng.uniform(0, np.pi)
        for _ in range(40):  # tries to place it without overlapping much
            radius = rng.uniform(0, 2) if i == 0 else rng.uniform(7, 14)
            angle = rng.uniform(0, 2 * np.pi)
            box = Box(radius * np.cos(angle), radius * np.sin(angle), yaw, width, depth, height)
            if all(
                math.hypot(box.x - other.x, box.y - other.y)
                > 0.75 * (box.footprint_radius + other.footprint_radius)
                for _, other in placed
            ):
                placed.append((kind, box))
                break
    return placed


def building_tiers(rng: np.random.Generator, kind: str, box: Box) -> list[Box]:
    """A tower becomes a stack of shrinking tiers; other buildings stay one box."""
    if kind != "tower":
        return [box]
    count = int(rng.integers(1, 4))
    shares = rng.dirichlet(np.full(count, 3.0)) if count > 1 else np.ones(1)
    boxes, z0, shrink = [], 0.0, 1.0
    for share in sorted(shares, reverse=True):
        height = box.height * share
        boxes.append(
            replace(box, width=box.width * shrink, depth=box.depth * shrink, height=height, z0=z0)
        )
        z0 += height
        shrink *= rng.uniform(0.6, 0.85)
    return boxes
