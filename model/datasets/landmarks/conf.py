"""What to generate: the configuration of the collection, its checks, digest and presets."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass

# Bump when the generator's output changes for the same configuration: it is part of the digest,
# so an old data set on disk is never mistaken for a new one.
GENERATOR_VERSION = 1
MIN_VIEWS_FOR_SFM = 16
_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


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
