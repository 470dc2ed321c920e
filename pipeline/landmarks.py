"""The built-in landmark collection: a deterministic, synthetic photo collection with ground truth.

The demo, the tests and the Structure-from-Motion stage use it as their default data set. Each
landmark is a 3D scene of textured boxes (halls, towers, blocks, facades) with textures of its
own, on a weakly textured ground, photographed from a smooth, wide arc of cameras whose distance
changes about 2x; every photo gets its own exposure, colour cast, haze, blur and noise.
Distractors are landmarks outside the collection, one photo each.

The output is laid out like the revisited Oxford and Paris sets (cnnimageretrieval-pytorch):

    <root>/<name>/jpg/<image>.jpg      lm03_v07 (database), lm03_q1 (query), distractor_012
    <root>/<name>/gnd_<name>.pkl       imlist, qimlist, gnd: per query easy/hard/junk/bbx
    <root>/<name>/cameras.parquet      per image: name, role (db/query/distractor), landmark
                                       (-1: distractor), fx fy cx cy width height, R (9, row-
                                       major, world to camera), t, centre, landmark_centre
    <root>/<name>/config.json          the configuration and its digest
    <root>/<name>/_SUCCESS             written last: the set is complete only when it exists

The retrieval ground truth comes from the geometry. A photo sees those of its landmark's surface
samples that are in frame and not occluded (by the depth buffer). For a query and a database
photo of the same landmark, the covisibility is the share of the samples seen by the one that
sees fewer that the other sees too (so a zoom-in on the same side scores 1): junk below
`junk_covisibility` (different sides, or the landmark barely visible) or when the shared part
covers under `junk_min_area` of the photo; else hard when the directions from the landmark
centre to the two cameras differ by more than `hard_angle_degrees` or their distances by more
than `hard_scale_ratio`; else easy.

Poses follow OpenCV (x = R @ X + t; x right, y down, z forward; world z up, metres) and so do
pixels: the centre of the top-left pixel is (0, 0), so COLMAP's principal point is (cx + 0.5,
cy + 0.5). Each landmark has a world frame of its own.

Run it with `python -m pipeline.landmarks --conf demo --root data`.
"""

from __future__ import annotations

import colorsys
import enum
import hashlib
import itertools
import json
import logging
import math
import os
import pickle
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tyro
from tqdm import tqdm

from pipeline.render import Camera, TexturedQuad, intrinsics, look_at, render, sky

logger = logging.getLogger(__name__)

# Bump when the generator's output changes for the same configuration: it is part of the digest,
# so an old data set on disk is never mistaken for a new one.
GENERATOR_VERSION = 1
MIN_VIEWS_FOR_SFM = 16
SUCCESS_FILE = "_SUCCESS"
CAMERAS_FILE = "cameras.parquet"
CONFIG_FILE = "config.json"
IMAGE_DIR = "jpg"

_UP = (0.0, 0.0, 1.0)
_GOLDEN = 0.6180339887498949
_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_SAMPLES_PER_LANDMARK = 2500
_MAX_TEXTURE_SIZE = 2048
_GROUND_SIZE_M = 800.0
_VISIBILITY_TOLERANCE = 0.02  # relative depth slack of the depth-buffer test

RGB = tuple[float, float, float]


class IncompleteDatasetError(FileNotFoundError):
    """The data set directory lacks `_SUCCESS`: it is missing, partial or still being written."""


class DatasetConflictError(FileExistsError):
    """A complete data set with the same name but another configuration is already there."""


@dataclass(frozen=True)
class LandmarksConf:
    """What to generate. Everything that changes the output is here, so the digest names it."""

    name: str = "landmarks"
    num_landmarks: int = 8
    views_per_landmark: int = 16
    queries_per_landmark: int = 2
    num_distractors: int = 20
    image_size: tuple[int, int] = (640, 480)  # (width, height)
    arc_degrees: float = 110.0
    distance_ratio: float = 2.0  # farthest / nearest camera distance along the arc
    horizontal_fov_degrees: float = 60.0
    seed: int = 0
    jpeg_quality: int = 92
    supersample: int = 2
    hard_angle_degrees: float = 45.0
    hard_scale_ratio: float = 1.6
    junk_covisibility: float = 0.25
    junk_min_area: float = 0.01  # share of the photo the covisible part must cover
    allow_few_views: bool = False

    def __post_init__(self) -> None:
        problems = list(_conf_problems(self))
        if problems:
            raise ValueError("; ".join(problems))

    def digest(self) -> str:
        """A short hash of the configuration and the generator version."""
        payload = json.dumps(
            {"config": asdict(self), "generator_version": GENERATOR_VERSION}, sort_keys=True
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


def _conf_problems(conf: LandmarksConf) -> Iterator[str]:
    """Messages naming each invalid field of `conf` and what to do about it."""
    prefix = "LandmarksConf."
    if not _NAME_PATTERN.fullmatch(conf.name):
        yield f"{prefix}name={conf.name!r}: use letters, digits, '.', '_' or '-' (a directory name)"
    if conf.num_landmarks < 1:
        yield f"{prefix}num_landmarks={conf.num_landmarks}: need at least one landmark"
    if conf.views_per_landmark < 2:
        yield f"{prefix}views_per_landmark={conf.views_per_landmark}: need at least 2 views"
    if conf.views_per_landmark < MIN_VIEWS_FOR_SFM and not conf.allow_few_views:
        yield (
            f"{prefix}views_per_landmark={conf.views_per_landmark}: Structure-from-Motion needs "
            f"at least {MIN_VIEWS_FOR_SFM} views per landmark on a smooth arc to register one "
            "model per landmark instead of several fragments; raise it or set allow_few_views=True"
        )
    if conf.queries_per_landmark < 1:
        yield f"{prefix}queries_per_landmark={conf.queries_per_landmark}: need at least 1 query"
    if conf.num_distractors < 0:
        yield f"{prefix}num_distractors={conf.num_distractors}: must be >= 0"
    if len(conf.image_size) != 2 or min(conf.image_size) < 32:
        yield f"{prefix}image_size={conf.image_size}: give (width, height), each >= 32 pixels"
    if not 0 < conf.arc_degrees <= 360:
        yield f"{prefix}arc_degrees={conf.arc_degrees}: must be in (0, 360]"
    if not 1 <= conf.distance_ratio <= 10:
        yield f"{prefix}distance_ratio={conf.distance_ratio}: must be in [1, 10]"
    if not 10 <= conf.horizontal_fov_degrees <= 150:
        yield f"{prefix}horizontal_fov_degrees={conf.horizontal_fov_degrees}: must be in [10, 150]"
    if conf.seed < 0:
        yield f"{prefix}seed={conf.seed}: must be >= 0"
    if not 1 <= conf.jpeg_quality <= 100:
        yield f"{prefix}jpeg_quality={conf.jpeg_quality}: must be in [1, 100]"
    if not 1 <= conf.supersample <= 4:
        yield f"{prefix}supersample={conf.supersample}: must be in [1, 4]"
    if not 0 < conf.hard_angle_degrees < 180:
        yield f"{prefix}hard_angle_degrees={conf.hard_angle_degrees}: must be in (0, 180)"
    if conf.hard_scale_ratio < 1:
        yield f"{prefix}hard_scale_ratio={conf.hard_scale_ratio}: must be >= 1"
    if not 0 <= conf.junk_covisibility <= 1:
        yield f"{prefix}junk_covisibility={conf.junk_covisibility}: must be in [0, 1]"
    if not 0 <= conf.junk_min_area <= 1:
        yield f"{prefix}junk_min_area={conf.junk_min_area}: must be in [0, 1]"


CONFS: dict[str, LandmarksConf] = {
    # For the tests: a few seconds on two cores.
    "tiny": LandmarksConf(
        name="landmarks-tiny",
        num_landmarks=3,
        views_per_landmark=16,
        queries_per_landmark=2,
        num_distractors=4,
        image_size=(320, 240),
    ),
    # The demo's default collection.
    "demo": LandmarksConf(
        name="landmarks-demo",
        num_landmarks=8,
        views_per_landmark=16,
        queries_per_landmark=2,
        num_distractors=20,
        image_size=(512, 384),
    ),
    # For Structure-from-Motion: denser arcs and larger photos.
    "sfm": LandmarksConf(
        name="landmarks-sfm",
        num_landmarks=6,
        views_per_landmark=36,
        queries_per_landmark=3,
        num_distractors=20,
        image_size=(1024, 768),
        arc_degrees=120.0,
    ),
}


# --------------------------------------------------------------------------------------------
# Random streams: every draw comes from a generator seeded by (seed, stream, kind, index, view),
# so one photo's randomness never depends on how many draws another one made.


class _Stream(enum.IntEnum):
    PALETTE = 1
    SCENE = 2
    ARC = 3
    VIEW = 4
    PHOTO = 5
    QUERIES = 6


class _Kind(enum.IntEnum):
    LANDMARK = 0
    DISTRACTOR = 1


def _rng(conf: LandmarksConf, stream: _Stream, *keys: int) -> np.random.Generator:
    return np.random.default_rng([conf.seed, int(stream), *keys])


# --------------------------------------------------------------------------------------------
# Textures


@dataclass(frozen=True)
class _Style:
    """A landmark's look: its palette and the patterns all its facades share."""

    walls: tuple[RGB, ...]
    accent: RGB
    trim: RGB
    glass: RGB
    roof: RGB
    ground: RGB
    window: Literal["rect", "arched", "round", "tall"]
    pattern: Literal["plain", "blocks", "panels", "stripes"]
    ornament: Literal["rosettes", "diamonds", "pilasters", "medallions"]
    mullions: bool
    bay_m: float
    floor_m: float
    window_m: tuple[float, float]


def _hsv(h: float, s: float, v: float) -> RGB:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, float(np.clip(s, 0, 1)), float(np.clip(v, 0, 1)))
    return (255.0 * r, 255.0 * g, 255.0 * b)


def _style(rng: np.random.Generator, hue: float) -> _Style:
    window = str(rng.choice(["rect", "arched", "round", "tall"]))
    window_m = {"rect": (1.3, 1.6), "arched": (1.2, 2.0), "round": (1.3, 1.3), "tall": (0.9, 2.3)}
    w, h = window_m[window]
    scale = rng.uniform(0.85, 1.2)
    return _Style(
        walls=tuple(
            _hsv(
                hue + rng.normal(0, 0.03) + 0.5 * (i == 2),
                rng.uniform(0.15, 0.55),
                rng.uniform(0.55, 0.9),
            )
            for i in range(3)
        ),
        accent=_hsv(
            hue + rng.choice([0.33, 0.5, 0.67]), rng.uniform(0.55, 0.9), rng.uniform(0.45, 0.85)
        ),
        trim=_hsv(hue, 0.08, 0.93) if rng.random() < 0.6 else _hsv(hue + 0.5, 0.3, 0.25),
        glass=_hsv(rng.uniform(0.5, 0.65), rng.uniform(0.2, 0.5), rng.uniform(0.18, 0.38)),
        roof=_hsv(hue + rng.uniform(-0.1, 0.1), rng.uniform(0.1, 0.5), rng.uniform(0.22, 0.42)),
        ground=_hsv(
            rng.choice([0.1, 0.15, 0.25, 0.6]), rng.uniform(0.05, 0.2), rng.uniform(0.42, 0.6)
        ),
        window=window,
        pattern=str(rng.choice(["plain", "blocks", "panels", "stripes"])),
        ornament=str(rng.choice(["rosettes", "diamonds", "pilasters", "medallions"])),
        mullions=bool(rng.random() < 0.6),
        bay_m=rng.uniform(2.4, 3.4),
        floor_m=rng.uniform(3.0, 4.0),
        window_m=(w * scale, h * scale),
    )


def _noise(
    rng: np.random.Generator, height: int, width: int, scale_px: float, octaves: int = 3
) -> np.ndarray:
    """Smooth multi-scale noise [height, width] float32 with unit-ish amplitude."""
    out = np.zeros((height, width), dtype=np.float32)
    total = 0.0
    for octave in range(octaves):
        step = max(scale_px / 2**octave, 1.0)
        grid = rng.standard_normal((int(height / step) + 2, int(width / step) + 2)).astype(
            np.float32
        )
        amplitude = 0.5**octave
        out += amplitude * cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)
        total += amplitude**2
    return out / np.float32(math.sqrt(total))


def _colour(rgb: RGB | np.ndarray, gain: float = 1.0) -> tuple[float, float, float]:
    r, g, b = np.clip(np.asarray(rgb, dtype=np.float64) * gain, 0, 255)
    return (float(r), float(g), float(b))


@dataclass
class _Canvas:
    """A texture being painted: an RGB uint8 image and its scale in pixels per metre."""

    image: np.ndarray
    ppm: float

    @property
    def height_m(self) -> float:
        return self.image.shape[0] / self.ppm

    @property
    def width_m(self) -> float:
        return self.image.shape[1] / self.ppm

    def px(self, x_m: float, z_m: float) -> tuple[int, int]:
        """The pixel of a point x metres from the left and z metres above the bottom."""
        return round(x_m * self.ppm), round((self.height_m - z_m) * self.ppm)

    def rect(
        self, x0: float, z0: float, x1: float, z1: float, rgb: RGB, thickness: int = -1
    ) -> None:
        cv2.rectangle(
            self.image, self.px(x0, z1), self.px(x1, z0), _colour(rgb), thickness, cv2.LINE_AA
        )


def _canvas(
    rng: np.random.Generator, width_m: float, height_m: float, ppm: float, base: RGB
) -> _Canvas:
    """A wall-coloured canvas with weathering noise at several scales."""
    ppm = min(ppm, _MAX_TEXTURE_SIZE / max(width_m, height_m))
    w, h = max(round(width_m * ppm), 4), max(round(height_m * ppm), 4)
    shade = 1 + 0.07 * _noise(rng, h, w, 2.5 * ppm) + 0.04 * _noise(rng, h, w, 0.3 * ppm, 2)
    image = np.asarray(base, dtype=np.float32) * shade[..., None]
    return _Canvas(np.clip(image, 0, 255).astype(np.uint8), ppm)


def _paint_pattern(canvas: _Canvas, rng: np.random.Generator, style: _Style, base: RGB) -> None:
    """The wall's surface pattern: stone blocks, panels or bands, each element its own shade."""
    h, w = canvas.image.shape[:2]
    if style.pattern == "plain":
        return
    if style.pattern == "stripes":
        rows = np.arange(h) / canvas.ppm
        band = np.floor(rows / rng.uniform(0.4, 0.9)).astype(int)
        tone = rng.uniform(0.82, 1.12, size=band.max() + 1)[band]
        canvas.image[:] = np.clip(canvas.image * tone[:, None, None], 0, 255).astype(np.uint8)
        return
    block_w, block_h = (0.9, 0.45) if style.pattern == "blocks" else (1.6, 1.6)
    rows = np.arange(h) / (block_h * canvas.ppm)
    row = np.floor(rows).astype(int)
    cols = np.arange(w)[None, :] / (block_w * canvas.ppm) + 0.5 * (row[:, None] % 2)
    col = np.floor(cols).astype(int)
    ids = row[:, None] * (col.max() + 2) + col
    tone = rng.normal(1.0, 0.06, size=ids.max() + 1).astype(np.float32)[ids]
    joint = 0.06 / block_h
    mortar = ((rows - row) < joint)[:, None] | ((cols - col) < joint * block_h / block_w)
    tone = np.where(mortar, np.float32(0.7), tone)
    canvas.image[:] = np.clip(canvas.image * tone[..., None], 0, 255).astype(np.uint8)
    if style.pattern == "panels":  # rivets at panel corners
        radius = max(int(0.05 * canvas.ppm), 1)
        for y in np.arange(0, h, block_h * canvas.ppm):
            for x in np.arange(0, w, block_w * canvas.ppm):
                cv2.circle(
                    canvas.image,
                    (int(x) + 3 * radius, int(y) + 3 * radius),
                    radius,
                    _colour(base, 0.6),
                    -1,
                )


def _paint_window(
    canvas: _Canvas,
    rng: np.random.Generator,
    style: _Style,
    x: float,
    z: float,
    size: tuple[float, float],
) -> None:
    """One window centred at x, bottom at z, each with its own glass, curtain and reflection."""
    w, h = size
    frame = 0.09
    glass = _colour(style.glass, rng.uniform(0.7, 1.35))
    if rng.random() < 0.12:  # lit
        glass = _colour((235, 205, 130), rng.uniform(0.75, 1.0))
    canvas.rect(x - w / 2 - 0.12, z - 0.14, x + w / 2 + 0.12, z, style.trim)  # sill
    if style.window == "round":
        centre, radius = canvas.px(x, z + h / 2), round(w / 2 * canvas.ppm)
        cv2.circle(
            canvas.image,
            centre,
            radius + int(frame * canvas.ppm) + 1,
            _colour(style.trim),
            -1,
            cv2.LINE_AA,
        )
        cv2.circle(canvas.image, centre, radius, glass, -1, cv2.LINE_AA)
    else:
        canvas.rect(x - w / 2 - frame, z, x + w / 2 + frame, z + h + frame, style.trim)
        canvas.rect(x - w / 2, z + frame, x + w / 2, z + h, glass)
        if style.window == "arched":
            axes = (
                round((w / 2 + frame) * canvas.ppm),
                round((w / 2 + frame) * canvas.ppm),
            )
            cv2.ellipse(
                canvas.image,
                canvas.px(x, z + h),
                axes,
                0,
                180,
                360,
                _colour(style.trim),
                -1,
                cv2.LINE_AA,
            )
            inner = (round(w / 2 * canvas.ppm),) * 2
            cv2.ellipse(
                canvas.image, canvas.px(x, z + h), inner, 0, 180, 360, glass, -1, cv2.LINE_AA
            )
    if rng.random() < 0.35:  # curtain or blind
        drop = rng.uniform(0.2, 0.8) * h
        shade = _colour(
            np.array(style.walls[rng.integers(len(style.walls))]), rng.uniform(0.5, 1.2)
        )
        canvas.rect(x - w / 2 + 0.05, z + h - drop, x + w / 2 - 0.05, z + h - 0.05, shade)
    if rng.random() < 0.4:  # sky reflection across the pane
        x0, z0 = x - w / 2 + rng.uniform(0, w / 2), z + rng.uniform(0.2, 0.6) * h
        corners = [(x0, z0), (x0 + w / 3, z0 + h / 3), (x0 + w / 3, z0 + h / 2)]
        pts = np.array([canvas.px(cx, cz) for cx, cz in corners], dtype=np.int32)
        cv2.fillConvexPoly(canvas.image, pts, _colour(glass, 1.6), cv2.LINE_AA)
    if style.mullions and style.window != "round":
        thick = max(int(0.05 * canvas.ppm), 1)
        cv2.line(canvas.image, canvas.px(x, z), canvas.px(x, z + h), _colour(style.trim), thick)
        cv2.line(
            canvas.image,
            canvas.px(x - w / 2, z + 0.6 * h),
            canvas.px(x + w / 2, z + 0.6 * h),
            _colour(style.trim),
            thick,
        )


def _paint_ornament(
    canvas: _Canvas, rng: np.random.Generator, style: _Style, x: float, z: float
) -> None:
    """A decoration between windows; its details vary so no two look the same."""
    ppm = canvas.ppm
    centre = canvas.px(x, z)
    colour = _colour(style.accent, rng.uniform(0.8, 1.2))
    if style.ornament == "rosettes":
        radius = max(int(rng.uniform(0.2, 0.35) * ppm), 2)
        cv2.circle(canvas.image, centre, radius, colour, -1, cv2.LINE_AA)
        cv2.circle(canvas.image, centre, max(radius // 2, 1), _colour(style.trim), -1, cv2.LINE_AA)
        for angle in np.linspace(0, 2 * np.pi, int(rng.integers(4, 9)), endpoint=False):
            tip = (
                int(centre[0] + 1.6 * radius * np.cos(angle)),
                int(centre[1] + 1.6 * radius * np.sin(angle)),
            )
            cv2.line(canvas.image, centre, tip, colour, max(radius // 3, 1), cv2.LINE_AA)
    elif style.ornament == "diamonds":
        r = max(rng.uniform(0.2, 0.4) * ppm, 2.0)
        pts = np.array([[0, -r], [r, 0], [0, r], [-r, 0]]) * [rng.uniform(0.6, 1.0), 1.0] + centre
        cv2.fillConvexPoly(canvas.image, pts.astype(np.int32), colour, cv2.LINE_AA)
        cv2.circle(canvas.image, centre, max(int(r / 3), 1), _colour(style.trim), -1, cv2.LINE_AA)
    elif style.ornament == "medallions":
        radius = max(int(rng.uniform(0.25, 0.4) * ppm), 2)
        cv2.circle(canvas.image, centre, radius, _colour(style.trim), -1, cv2.LINE_AA)
        cv2.circle(canvas.image, centre, radius, colour, max(radius // 4, 1), cv2.LINE_AA)
        angle = rng.uniform(0, np.pi)
        tip = (int(centre[0] + radius * np.cos(angle)), int(centre[1] + radius * np.sin(angle)))
        cv2.line(canvas.image, centre, tip, colour, max(radius // 5, 1), cv2.LINE_AA)
    else:  # pilasters: a capital on a shaft down to the ground
        half = rng.uniform(0.18, 0.3)
        canvas.rect(x - half, 0, x + half, z, _colour(style.trim, rng.uniform(0.85, 1.0)))
        canvas.rect(x - half - 0.12, z - 0.3, x + half + 0.12, z, colour)


def _random_word(rng: np.random.Generator) -> str:
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    return "".join(letters[i] for i in rng.integers(0, len(letters), size=int(rng.integers(3, 9))))


def _paint_sign(
    canvas: _Canvas, rng: np.random.Generator, style: _Style, x: float, z: float
) -> None:
    """A shop sign with random lettering: strong, unique corners for feature matching."""
    text = _random_word(rng)
    scale = rng.uniform(0.35, 0.55) * canvas.ppm / 22.0  # Hershey letters are 22 units tall
    thickness = max(round(scale * 2), 1)
    (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    fit = min(1.0, (style.bay_m - 0.6) * canvas.ppm / tw)  # no wider than a bay
    scale, tw, th = scale * fit, int(tw * fit), int(th * fit)
    width_m, height_m = tw / canvas.ppm + 0.4, th / canvas.ppm + 0.3
    board = _colour(style.accent, rng.uniform(0.6, 1.1))
    canvas.rect(x - width_m / 2, z, x + width_m / 2, z + height_m, board)
    ink = (245.0, 245.0, 240.0) if sum(board) < 380 else (25.0, 25.0, 30.0)
    origin = canvas.px(x - width_m / 2 + 0.2, z + 0.15)
    cv2.putText(
        canvas.image, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, ink, thickness, cv2.LINE_AA
    )


def _paint_grime(canvas: _Canvas, rng: np.random.Generator) -> None:
    """Stains and streaks: they break the repetition of windows that confuses matching."""
    h, w = canvas.image.shape[:2]
    blotches = np.clip(_noise(rng, h, w, 1.5 * canvas.ppm, 2), 0, None)
    columns = max(int(w / (0.25 * canvas.ppm)), 2)  # rain streaks about 25 cm apart
    streaks = rng.standard_normal((3, columns)).astype(np.float32)
    streaks = np.clip(cv2.resize(streaks, (w, h), interpolation=cv2.INTER_LINEAR), 0, None)
    gain = 1 - 0.12 * blotches - 0.08 * streaks
    for _ in range(int(rng.integers(1, 4))):  # posters and patches
        x0, y0 = rng.uniform(0, w), rng.uniform(0.5 * h, h)
        axes = (
            max(int(rng.uniform(0.2, 0.8) * canvas.ppm), 1),
            max(int(rng.uniform(0.2, 0.6) * canvas.ppm), 1),
        )
        cv2.ellipse(
            gain,
            (int(x0), int(y0)),
            axes,
            rng.uniform(0, 180),
            0,
            360,
            float(rng.uniform(0.75, 1.15)),
            -1,
            cv2.LINE_AA,
        )
    canvas.image[:] = np.clip(canvas.image * gain[..., None], 0, 255).astype(np.uint8)


def _wall_texture(
    rng: np.random.Generator,
    style: _Style,
    base: RGB,
    width_m: float,
    height_m: float,
    ppm: float,
    ground_floor: bool,
) -> np.ndarray:
    """A facade: pattern, cornices, a grid of windows, ornaments, a door and signs, grime."""
    canvas = _canvas(rng, width_m, height_m, ppm, base)
    _paint_pattern(canvas, rng, style, base)
    bays = int((width_m - 0.6) // style.bay_m)
    floors = int((height_m - 0.8) // style.floor_m)
    margin = (width_m - bays * style.bay_m) / 2
    xs = [margin + (i + 0.5) * style.bay_m for i in range(bays)]
    for floor in range(1, floors + 1):  # cornice under each upper floor
        z = floor * style.floor_m - 0.05
        if z < height_m - 0.5 and (floor == 1 or rng.random() < 0.5):
            canvas.rect(0, z - 0.12, width_m, z + 0.12, _colour(style.trim, rng.uniform(0.8, 1.0)))
    door = int(rng.integers(len(xs))) if ground_floor and xs else -1
    for floor in range(floors):
        z = floor * style.floor_m + 0.9
        for bay, x in enumerate(xs):
            if floor == 0 and bay == door:
                canvas.rect(x - 0.85, 0, x + 0.85, 2.7, style.trim)
                canvas.rect(x - 0.7, 0, x + 0.7, 2.55, _colour(style.accent, 0.45))
            elif floor == 0 and ground_floor and rng.random() < 0.35:
                _paint_sign(canvas, rng, style, x, 1.2)
            elif rng.random() > 0.06:  # else a bricked-up window
                _paint_window(canvas, rng, style, x, z, style.window_m)
        for left, right in itertools.pairwise(xs):
            if rng.random() < 0.7:
                _paint_ornament(canvas, rng, style, (left + right) / 2, z + style.window_m[1] * 0.7)
    top = max(height_m - 0.6, 0)  # crowning cornice with dentils
    canvas.rect(0, top, width_m, height_m, _colour(style.trim, 0.9))
    for x in np.arange(0.1, width_m, 0.45):
        canvas.rect(x, top - 0.18, x + 0.2, top, _colour(style.trim, 0.75))
    _paint_grime(canvas, rng)
    return canvas.image


def _plain_texture(
    rng: np.random.Generator, base: RGB, width_m: float, height_m: float, ppm: float
) -> np.ndarray:
    """A narrow side wall: just the weathered wall colour and grime."""
    canvas = _canvas(rng, width_m, height_m, ppm, base)
    _paint_grime(canvas, rng)
    return canvas.image


def _roof_texture(
    rng: np.random.Generator, style: _Style, width_m: float, depth_m: float, ppm: float
) -> np.ndarray:
    """A flat roof: tar with vents and skylights."""
    canvas = _canvas(rng, width_m, depth_m, ppm, style.roof)
    for _ in range(int(rng.integers(2, 6))):
        x, z = rng.uniform(0, width_m), rng.uniform(0, depth_m)
        size = rng.uniform(0.6, 2.0)
        canvas.rect(
            x,
            z,
            x + size,
            z + size * rng.uniform(0.5, 1.5),
            _colour(style.roof, rng.uniform(1.3, 2.0)),
        )
    return canvas.image


def _ground_texture(rng: np.random.Generator, colour: RGB) -> np.ndarray:
    """A weakly textured ground: low-contrast, smooth. A textured ground makes image pairs
    homography-dominated and splits Structure-from-Motion models."""
    size = 256
    shade = 1 + 0.035 * _noise(rng, size, size, 24.0, 3)
    image = np.asarray(colour, dtype=np.float32) * shade[..., None]
    return cv2.GaussianBlur(np.clip(image, 0, 255).astype(np.uint8), (0, 0), 1.5)


# --------------------------------------------------------------------------------------------
# Scenes


@dataclass(frozen=True, eq=False)
class Scene:
    """A landmark's geometry: the quads to draw (ground first) and what the ground truth needs."""

    quads: tuple[TexturedQuad, ...]
    centre: np.ndarray  # the point the cameras look at and angles are measured around
    points: np.ndarray  # [N, 3] samples of the landmark's surfaces (walls and roofs)
    radius: float  # of the footprint around the centre, metres
    height: float  # of the tallest building, metres
    sun: np.ndarray  # unit vector toward the sun


@dataclass(frozen=True)
class _Box:
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


def _buildings(rng: np.random.Generator) -> list[tuple[str, _Box]]:
    """A cluster of buildings around the origin: a main one near the centre, others about it."""
    base_yaw = rng.uniform(0, np.pi / 2)
    kinds = [str(rng.choice(["hall", "tower"]))]
    kinds += [
        str(k)
        for k in rng.choice(
            ["hall", "tower", "block", "block", "facade"], size=int(rng.integers(2, 5))
        )
    ]
    placed: list[tuple[str, _Box]] = []
    for i, kind in enumerate(kinds):
        (w0, w1), (d0, d1), (h0, h1) = _BUILDING_SIZES[kind]
        width, depth, height = rng.uniform(w0, w1), rng.uniform(d0, d1), rng.uniform(h0, h1)
        yaw = base_yaw + (np.pi / 2) * rng.integers(0, 2) + rng.normal(0, 0.05)
        if rng.random() < 0.25:
            yaw = rng.uniform(0, np.pi)
        for _ in range(40):  # tries to place it without overlapping much
            radius = rng.uniform(0, 2) if i == 0 else rng.uniform(7, 14)
            angle = rng.uniform(0, 2 * np.pi)
            box = _Box(radius * np.cos(angle), radius * np.sin(angle), yaw, width, depth, height)
            if all(
                math.hypot(box.x - other.x, box.y - other.y)
                > 0.75 * (box.footprint_radius + other.footprint_radius)
                for _, other in placed
            ):
                placed.append((kind, box))
                break
    return placed


def _tiers(rng: np.random.Generator, kind: str, box: _Box) -> list[_Box]:
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


def _box_faces(box: _Box) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, float, float, bool]]:
    """The walls and roof of a box as (origin, u, v, width_m, height_m, is_wall), outward facing."""
    ex = np.array([np.cos(box.yaw), np.sin(box.yaw), 0.0])
    ey = np.array([-np.sin(box.yaw), np.cos(box.yaw), 0.0])
    centre = np.array([box.x, box.y, box.z0])
    up = np.array(_UP)
    top = box.height * up
    faces = []
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


def _hue(conf: LandmarksConf, kind: _Kind, index: int, rng: np.random.Generator) -> float:
    """Collection landmarks get hues spread by the golden ratio, so neighbours look different."""
    if kind is _Kind.DISTRACTOR:
        return float(rng.random())
    start = float(_rng(conf, _Stream.PALETTE).random())
    return (start + index * _GOLDEN) % 1.0


def build_scene(conf: LandmarksConf, index: int, *, distractor: bool = False) -> Scene:
    """Landmark `index` of the collection (or distractor `index`), the same for the same conf."""
    kind = _Kind.DISTRACTOR if distractor else _Kind.LANDMARK
    rng = _rng(conf, _Stream.SCENE, kind, index)
    style = _style(rng, _hue(conf, kind, index, rng))
    ppm = texture_density(conf)
    quads: list[TexturedQuad] = []
    top = 0.0
    for kind_name, building in _buildings(rng):
        base = style.walls[int(rng.integers(len(style.walls)))]
        for tier, box in enumerate(_tiers(rng, kind_name, building)):
            top = max(top, box.z0 + box.height)
            for origin, u, v, width_m, height_m, is_wall in _box_faces(box):
                if not is_wall:
                    texture = _roof_texture(rng, style, width_m, height_m, ppm)
                elif width_m < 3.0:
                    texture = _plain_texture(rng, base, width_m, height_m, ppm)
                else:
                    texture = _wall_texture(
                        rng, style, base, width_m, height_m, ppm, ground_floor=tier == 0
                    )
                quads.append(TexturedQuad(origin, u, v, texture, double_sided=False))
    corners = np.concatenate([q.corners for q in quads])[:, :2]
    middle = (corners.min(axis=0) + corners.max(axis=0)) / 2  # of the cluster's bounding box
    radius = float(np.max(np.linalg.norm(corners - middle, axis=1)))
    points = _surface_samples(rng, quads, _SAMPLES_PER_LANDMARK)
    half = _GROUND_SIZE_M / 2
    ground = TexturedQuad(
        (-half, half, 0.0),
        (_GROUND_SIZE_M, 0.0, 0.0),
        (0.0, -_GROUND_SIZE_M, 0.0),
        _ground_texture(rng, style.ground),
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


# --------------------------------------------------------------------------------------------
# Cameras


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
    conf: LandmarksConf, scene: Scene, arc: _Arc, f: float, rng: np.random.Generator
) -> Camera:
    """A hand-held photo from the arc at f: small jitter of position, aim, roll and zoom."""
    eye = arc.position(f, scene.centre) + rng.normal(0, [0.15, 0.15, 0.1])
    target = scene.centre + rng.normal(0, [0.6, 0.6, 0.4])
    focal = arc.focal * (1 + float(np.clip(rng.normal(0, 0.04), -0.1, 0.1)))
    width, height = conf.image_size
    roll = math.radians(float(np.clip(rng.normal(0, 1.2), -3, 3)))
    return look_at(eye, target, _UP, intrinsics(focal, width, height), (width, height), roll=roll)


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
    arc = _arc(conf, scene, _rng(conf, _Stream.ARC, _Kind.LANDMARK, index))
    prefix = f"lm{index:0{_digits(conf.num_landmarks)}d}"
    views = conf.views_per_landmark
    shots = []
    for view in range(views):
        rng = _rng(conf, _Stream.VIEW, _Kind.LANDMARK, index, view)
        camera = _arc_camera(conf, scene, arc, view / (views - 1), rng)
        name = f"{prefix}_v{view:0{_digits(views)}d}"
        shots.append(Shot(name, "db", index, camera, (_Kind.LANDMARK, index, view)))
    fractions = _query_fractions(
        conf.queries_per_landmark, _rng(conf, _Stream.QUERIES, _Kind.LANDMARK, index)
    )
    for query, f in enumerate(fractions):
        view = views + query
        rng = _rng(conf, _Stream.VIEW, _Kind.LANDMARK, index, view)
        camera = _arc_camera(conf, scene, arc, f, rng)
        shots.append(
            Shot(f"{prefix}_q{query}", "query", index, camera, (_Kind.LANDMARK, index, view))
        )
    return shots


def distractor_shot(conf: LandmarksConf, index: int, scene: Scene) -> Shot:
    """The one photo of distractor `index`, from a random point of its arc."""
    rng = _rng(conf, _Stream.ARC, _Kind.DISTRACTOR, index)
    arc = _arc(conf, scene, rng)
    camera = _arc_camera(
        conf, scene, arc, float(rng.random()), _rng(conf, _Stream.VIEW, _Kind.DISTRACTOR, index)
    )
    name = f"distractor_{index:0{max(_digits(conf.num_distractors), 3)}d}"
    return Shot(name, "distractor", -1, camera, (_Kind.DISTRACTOR, index, 0))


# --------------------------------------------------------------------------------------------
# Photos


@dataclass(frozen=True)
class _Look:
    """One photo's conditions: sky, sun, haze and the camera's rendering of colour."""

    zenith: RGB
    horizon: RGB
    sun: np.ndarray
    haze_m: float
    exposure: float
    contrast: float
    gamma: float
    cast: tuple[float, float, float]
    vignette: float
    blur: float
    noise: float


def _look(rng: np.random.Generator, scene: Scene) -> _Look:
    overcast = rng.random() < 0.25
    zenith = _hsv(
        rng.uniform(0.55, 0.62),
        rng.uniform(0.05, 0.15) if overcast else rng.uniform(0.3, 0.6),
        rng.uniform(0.7, 0.95),
    )
    horizon = _colour(0.45 * np.array(zenith) + 0.55 * np.array([232.0, 234.0, 238.0]))
    turn = math.radians(rng.normal(0, 12))
    c, s = math.cos(turn), math.sin(turn)
    sun = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ scene.sun
    return _Look(
        zenith=zenith,
        horizon=horizon,
        sun=sun,
        haze_m=rng.uniform(500, 1500),
        exposure=rng.uniform(0.8, 1.2),
        contrast=rng.uniform(0.85, 1.15),
        gamma=rng.uniform(0.85, 1.2),
        cast=tuple(float(g) for g in rng.normal(1.0, 0.035, size=3)),
        vignette=rng.uniform(0.0, 0.25),
        blur=rng.uniform(0.3, 0.8) if rng.random() < 0.5 else 0.0,
        noise=rng.uniform(0.5, 2.5),
    )


def _shading(scene: Scene, sun: np.ndarray) -> list[float]:
    """A Lambertian gain per quad under the sun plus sky light, so box faces differ in tone."""
    return [0.62 + 0.5 * max(float(np.dot(q.normal, sun)), 0.0) for q in scene.quads]


def _develop(
    image: np.ndarray, depth: np.ndarray, look: _Look, rng: np.random.Generator
) -> np.ndarray:
    """Haze, exposure, contrast, gamma, colour cast, vignetting, blur and noise."""
    x = image.astype(np.float32) / 255.0
    haze = np.asarray(look.horizon, dtype=np.float32) / 255.0
    distance = np.where(np.isfinite(depth), depth, 0.0)  # the sky is already the haze colour
    clear = np.exp(-distance / look.haze_m).astype(np.float32)[..., None]
    x = x * clear + haze * (1 - clear)
    x = (x * look.exposure - 0.5) * look.contrast + 0.5
    x = np.clip(x, 0, 1) ** look.gamma * np.asarray(look.cast, dtype=np.float32)
    h, w = depth.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    radius2 = ((xx - w / 2) ** 2 + (yy - h / 2) ** 2) / ((w / 2) ** 2 + (h / 2) ** 2)
    x = x * (1 - look.vignette * radius2)[..., None]
    if look.blur > 0:
        x = cv2.GaussianBlur(x, (0, 0), look.blur)
    x = x + rng.standard_normal(x.shape, dtype=np.float32) * np.float32(look.noise / 255.0)
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


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


def take_photo(conf: LandmarksConf, scene: Scene, shot: Shot) -> tuple[np.ndarray, np.ndarray]:
    """(photo [H, W, 3] uint8 RGB, clean depth [H, W]) of `scene` for `shot`."""
    rng = _rng(conf, _Stream.PHOTO, *shot.keys)
    look = _look(rng, scene)
    background = sky(shot.camera, look.zenith, look.horizon)
    image, depth = render(
        scene.quads, shot.camera, background, conf.supersample, shading=_shading(scene, look.sun)
    )
    return _develop(image, depth, look, rng), depth


def _encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    ok, buffer = cv2.imencode(
        ".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality]
    )
    if not ok:
        raise RuntimeError("OpenCV could not encode a JPEG; check the opencv-python installation")
    return buffer.tobytes()


# --------------------------------------------------------------------------------------------
# Ground truth


@dataclass(frozen=True, eq=False)
class _Seen:
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
    conf: LandmarksConf, centre: np.ndarray, query: _Seen, image: _Seen
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


def _query_ground_truth(
    conf: LandmarksConf, centre: np.ndarray, query: _Seen, database: Sequence[tuple[int, _Seen]]
) -> dict[str, Any]:
    """easy/hard/junk indices into imlist and the query's box, for one query."""
    labels: dict[str, list[int]] = {"easy": [], "hard": [], "junk": []}
    for position, seen in database:
        labels[_classify(conf, centre, query, seen)].append(position)
    visible = query.uv[query.visible]
    if len(visible) == 0:
        raise RuntimeError(f"query {query.shot.name} sees none of its landmark; the arc misses it")
    entry: dict[str, Any] = {key: np.array(value, dtype=np.int64) for key, value in labels.items()}
    entry["bbx"] = _bounding_box(visible)
    return entry


# --------------------------------------------------------------------------------------------
# Output


def _camera_record(shot: Shot, scene: Scene) -> dict[str, Any]:
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


_CAMERA_SCHEMA = pa.schema(
    [
        ("name", pa.string()),
        ("role", pa.string()),
        ("landmark", pa.int32()),
        ("fx", pa.float64()),
        ("fy", pa.float64()),
        ("cx", pa.float64()),
        ("cy", pa.float64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("R", pa.list_(pa.float64(), 9)),
        ("t", pa.list_(pa.float64(), 3)),
        ("centre", pa.list_(pa.float64(), 3)),
        ("landmark_centre", pa.list_(pa.float64(), 3)),
    ]
)


def camera_from_record(record: Mapping[str, Any]) -> Camera:
    """The Camera of a cameras.parquet row (as a dict)."""
    K = np.array(
        [[record["fx"], 0.0, record["cx"]], [0.0, record["fy"], record["cy"]], [0.0, 0.0, 1.0]]
    )
    R = np.asarray(record["R"], dtype=np.float64).reshape(3, 3)
    return Camera(
        K, R, np.asarray(record["t"], dtype=np.float64), int(record["width"]), int(record["height"])
    )


def _require_complete(dataset_dir: Path) -> None:
    if not (dataset_dir / SUCCESS_FILE).is_file():
        raise IncompleteDatasetError(
            f"{dataset_dir} has no {SUCCESS_FILE}: the landmark collection there is missing or "
            "incomplete; generate it with generate(conf, root) or "
            "`python -m pipeline.landmarks --conf <preset> --root <dir>`"
        )


def load_ground_truth(dataset_dir: str | Path) -> dict[str, Any]:
    """The revisited-format ground truth (imlist, qimlist, gnd) of a complete collection."""
    path = Path(dataset_dir)
    _require_complete(path)
    with open(path / f"gnd_{path.name}.pkl", "rb") as file:
        return pickle.load(file)


def load_cameras(dataset_dir: str | Path) -> pa.Table:
    """The camera table (one row per image) of a complete collection."""
    path = Path(dataset_dir)
    _require_complete(path)
    return pq.read_table(path / CAMERAS_FILE)


@dataclass
class _Collection:
    """What generation accumulates before the tables are written."""

    records: list[dict[str, Any]] = field(default_factory=list)
    database: list[str] = field(default_factory=list)
    queries: list[str] = field(default_factory=list)
    gnd: list[dict[str, Any]] = field(default_factory=list)


def _photograph(conf: LandmarksConf, scene: Scene, shot: Shot, jpg_dir: Path) -> _Seen:
    """Take and save the photo of `shot`; return what it sees of the landmark."""
    photo, depth = take_photo(conf, scene, shot)
    (jpg_dir / f"{shot.name}.jpg").write_bytes(_encode_jpeg(photo, conf.jpeg_quality))
    visible, uv = visible_points(scene.points, shot.camera, depth)
    return _Seen(shot, visible, uv)


def _add_landmark(
    conf: LandmarksConf, index: int, jpg_dir: Path, collection: _Collection, bar: tqdm
) -> None:
    """Photograph landmark `index` and label its views for each of its queries."""
    scene = build_scene(conf, index)
    database: list[tuple[int, _Seen]] = []  # (position in imlist, what it sees)
    queries: list[_Seen] = []
    for shot in landmark_shots(conf, index, scene):
        seen = _photograph(conf, scene, shot, jpg_dir)
        collection.records.append(_camera_record(shot, scene))
        if shot.role == "db":
            database.append((len(collection.database), seen))
            collection.database.append(shot.name)
        else:
            queries.append(seen)
            collection.queries.append(shot.name)
        bar.update()
    collection.gnd += [_query_ground_truth(conf, scene.centre, q, database) for q in queries]


def _add_distractor(
    conf: LandmarksConf, index: int, jpg_dir: Path, collection: _Collection, bar: tqdm
) -> None:
    """Photograph distractor `index`: a database image that is a negative for every query."""
    scene = build_scene(conf, index, distractor=True)
    shot = distractor_shot(conf, index, scene)
    _photograph(conf, scene, shot, jpg_dir)
    collection.records.append(_camera_record(shot, scene))
    collection.database.append(shot.name)
    bar.update()


def _write_collection(conf: LandmarksConf, out: Path, progress: bool) -> None:
    """Everything but `_SUCCESS` into `out`: photos, then the tables."""
    jpg_dir = out / IMAGE_DIR
    jpg_dir.mkdir()
    per_landmark = conf.views_per_landmark + conf.queries_per_landmark
    total = conf.num_landmarks * per_landmark + conf.num_distractors
    collection = _Collection()
    with tqdm(total=total, desc=f"render {conf.name}", unit="img", disable=not progress) as bar:
        for index in range(conf.num_landmarks):
            _add_landmark(conf, index, jpg_dir, collection, bar)
        for index in range(conf.num_distractors):
            _add_distractor(conf, index, jpg_dir, collection, bar)
    _write_tables(conf, out, collection)


def _write_tables(conf: LandmarksConf, out: Path, collection: _Collection) -> None:
    pq.write_table(
        pa.Table.from_pylist(collection.records, schema=_CAMERA_SCHEMA), out / CAMERAS_FILE
    )
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


def _existing_digest(out: Path) -> str | None:
    """The digest of a complete collection at `out`, None when there is none."""
    if not (out / SUCCESS_FILE).is_file():
        return None
    try:
        return json.loads((out / CONFIG_FILE).read_text())["digest"]
    except (OSError, ValueError, KeyError):
        return ""


def _check_existing(conf: LandmarksConf, out: Path) -> bool:
    """True when `out` already holds this configuration's complete collection."""
    digest = _existing_digest(out)
    if digest is None:
        return False
    if digest != conf.digest():
        raise DatasetConflictError(
            f"{out} holds a landmark collection of another configuration (digest {digest!r}, "
            f"wanted {conf.digest()!r}); pass overwrite=True or choose another name"
        )
    return True


def _publish(staging: Path, out: Path, conf: LandmarksConf) -> None:
    """Move the finished collection into place; an older one at `out` is swapped out first."""
    retired = None
    if out.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, retired / out.name)
    try:
        os.rename(staging, out)
    except OSError:
        if _existing_digest(out) != conf.digest():
            raise
        logger.info("another process published %s first; keeping its copy", out)  # same bytes
        shutil.rmtree(staging, ignore_errors=True)
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)


def generate(
    conf: LandmarksConf, root: str | Path, *, overwrite: bool = False, progress: bool = True
) -> Path:
    """Write the collection to `<root>/<conf.name>` and return that path.

    A complete collection of the same configuration there is kept as it is (the call returns at
    once) unless `overwrite`. Everything is written to a temporary directory beside it and
    renamed into place with `_SUCCESS` inside, so a crash never leaves a set that looks whole.
    """
    root = Path(root)
    out = root / conf.name
    if not overwrite and _check_existing(conf, out):
        logger.info("landmark collection %s is complete (digest %s); skipping", out, conf.digest())
        return out
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{conf.name}.", suffix=".partial", dir=root))
    try:
        _write_collection(conf, staging, progress)
        (staging / SUCCESS_FILE).write_text(conf.digest() + "\n")
        _publish(staging, out, conf)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("wrote landmark collection %s (digest %s)", out, conf.digest())
    return out


# --------------------------------------------------------------------------------------------
# Command line


@dataclass(frozen=True)
class Args:
    """Generate the built-in landmark collection."""

    conf: Literal["tiny", "demo", "sfm"] = "demo"
    """Named preset of pipeline.landmarks.CONFS."""
    root: Path = Path("data")
    """Directory to write <root>/<name>/ into."""
    seed: int | None = None
    """Another seed than the preset's; the name gets a -s<seed> suffix."""
    overwrite: bool = False
    """Regenerate even when a complete collection is there."""


def main(argv: Sequence[str] | None = None) -> Path:
    """The command line: generate a preset, print where it is and what it holds."""
    args = tyro.cli(Args, args=argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    conf = CONFS[args.conf]
    if args.seed is not None:
        conf = replace(conf, seed=args.seed, name=f"{conf.name}-s{args.seed}")
    path = generate(conf, args.root, overwrite=args.overwrite, progress=sys.stderr.isatty())
    ground_truth = load_ground_truth(path)
    positives = sum(len(g["easy"]) + len(g["hard"]) for g in ground_truth["gnd"])
    print(path)
    print(
        f"{len(ground_truth['imlist'])} database images ({conf.num_distractors} distractors), "
        f"{len(ground_truth['qimlist'])} queries, {conf.num_landmarks} landmarks, "
        f"{positives} positive pairs"
    )
    return path


if __name__ == "__main__":
    main()
