"""Random streams: every draw comes from a generator seeded by (seed, stream, kind, index, view),
so one photo's randomness never depends on how many draws another one made."""

from __future__ import annotations

import enum

import numpy as np

from pipeline.landmarks.conf import LandmarksConf


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
