"""Random streams: every draw comes from a generator seeded by (seed, stream, kind, index, view),
so one photo's randomness never depends on how many draws another one made."""

from __future__ import annotations

import enum

import numpy as np

from model.datasets.landmarks.conf import LandmarksConf


class Stream(enum.IntEnum):
    """What a random stream draws: its number is part of the seed."""

    PALETTE = 1
    SCENE = 2
    ARC = 3
    VIEW = 4
    PHOTO = 5
    QUERIES = 6


class SceneKind(enum.IntEnum):
    """Whether a scene is a landmark of the collection or a distractor (a seed key)."""

    LANDMARK = 0
    DISTRACTOR = 1


def stream_rng(conf: LandmarksConf, stream: Stream, *keys: int) -> np.random.Generator:
    """The generator of `stream` for `keys` (kind, index, view...) under `conf.seed`."""
    return np.random.default_rng([conf.seed, int(stream), *keys])
