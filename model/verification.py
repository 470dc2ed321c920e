"""Spatial verification of a ranking: do two photos show the same structure?

The global top-k is re-scored by matching local features (``model.local_features``) between
the query and each candidate: mutual nearest neighbours that pass Lowe's ratio test, then a
geometric model fitted by pycolmap's LO-RANSAC (a homography by default, or an affine map).
A candidate's *inliers* are the matches that model explains, counted once per query location
(SIFT may give one location two orientations, which must not count twice). Candidates with at
least ``min_inliers`` go first, most inliers first; the rest keep their global order.

Matching is one matrix product per pair on unit RootSIFT vectors (torch), so a pair costs a
few milliseconds; RANSAC is seeded, so the same query gives the same ranking everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from model.local_features import LocalFeatures, unit_descriptors
from model.settings import raise_problems

__all__ = [
    "MODELS",
    "Verification",
    "VerifyOptions",
    "mutual_matches",
    "rerank_order",
    "verify_candidates",
    "verify_pair",
]

MODELS = ("homography", "affine")
COUNTS = ("places", "matches")
_MIN_MATCHES = {"homography": 4, "affine": 3}
_SEED = 0  # RANSAC is seeded: evaluate and the service rank a query alike


@dataclass(frozen=True)
class VerifyOptions:
    """How a pair is verified and when a candidate counts as verified."""

    rerank_ratio: float = 0.9
    """Lowe's ratio test on descriptor distances (1 turns it off)."""
    rerank_model: str = "homography"
    """The geometric model RANSAC fits: homography or affine."""
    rerank_max_error: float = 6.0
    """RANSAC's inlier threshold in pixels of the candidate's feature frame."""
    rerank_min_inliers: int = 12
    """A candidate with at least this many inliers is verified and moves up."""
    rerank_max_trials: int = 2000
    """RANSAC's most iterations a pair."""
    rerank_count: str = "places"
    """What an inlier is: places (matches counted once per query location: SIFT may give one
    location two orientations) or matches (every inlying match)."""

    def __post_init__(self) -> None:
        problems = []
        if not 0 < self.rerank_ratio <= 1:
            problems.append(f"--rerank-ratio must be in (0, 1], not {self.rerank_ratio}")
        if self.rerank_model not in MODELS:
            problems.append(
                f"--rerank-model must be one of {', '.join(MODELS)}, not {self.rerank_model}"
            )
        elif self.rerank_min_inliers < _MIN_MATCHES[self.rerank_model]:
            problems.append(
                f"--rerank-min-inliers must be at least {_MIN_MATCHES[self.rerank_model]} for "
                f"a {self.rerank_model}, not {self.rerank_min_inliers}"
            )
        if not self.rerank_max_error > 0:
            problems.append(f"--rerank-max-error must be positive, not {self.rerank_max_error}")
        if self.rerank_count not in COUNTS:
            problems.append(
                f"--rerank-count must be one of {', '.join(COUNTS)}, not {self.rerank_count}"
            )
        if self.rerank_max_trials < 1:
            problems.append(f"--rerank-max-trials must be at least 1, not {self.rerank_max_trials}")
        raise_problems(problems)

    def identity(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class Verification:
    """How many matches the fitted model explains, and which (query row, candidate row)."""

    inliers: int
    matches: np.ndarray

    @classmethod
    def none(cls) -> Verification:
        return cls(0, np.zeros((0, 2), np.int64))


def mutual_matches(a: np.ndarray, b: np.ndarray, ratio: float) -> np.ndarray:
    """Rows ``(i, j)`` where ``a[i]`` and ``b[j]`` (unit rows) are each other's nearest
    neighbour and ``a[i]``'s nearest is closer than ``ratio`` times its second nearest."""
    import torch  # here: its top-2 is twice NumPy's speed; the router never loads it

    if len(a) == 0 or len(b) < 2:
        return np.zeros((0, 2), np.int64)
    sim = torch.from_numpy(a) @ torch.from_numpy(b).T
    best, nearest = sim.topk(2, dim=1)
    back = sim.argmax(dim=0)
    rows = torch.arange(len(a))
    distance = (2 - 2 * best).clamp_min(0).sqrt()
    keep = (back[nearest[:, 0]] == rows) & (distance[:, 0] < ratio * distance[:, 1])
    return torch.stack([rows[keep], nearest[keep, 0]], dim=1).numpy().astype(np.int64)


def verify_pair(
    query: LocalFeatures,
    candidate: LocalFeatures,
    options: VerifyOptions,
    *,
    query_unit: np.ndarray | None = None,
) -> Verification:
    """Verify one pair; ``query_unit`` spares converting the query's descriptors again."""
    if query_unit is None:
        query_unit = _unit(query)
    matches = mutual_matches(query_unit, _unit(candidate), options.rerank_ratio)
    count = _unique_locations if options.rerank_count == "places" else _matches
    if len(matches) < max(_MIN_MATCHES[options.rerank_model], 1):
        return Verification(count(query, matches), matches)
    src = query.keypoints[matches[:, 0], :2].astype(np.float64)
    tgt = candidate.keypoints[matches[:, 1], :2].astype(np.float64)
    mask = _ransac(src, tgt, options)
    if mask is None:
        return Verification.none()
    inlier_matches = matches[mask]
    return Verification(count(query, inlier_matches), inlier_matches)


def verify_candidates(
    query: LocalFeatures,
    candidates: Sequence[LocalFeatures | None],
    options: VerifyOptions,
) -> list[Verification]:
    """Verify the query against each candidate; a missing candidate (``None``) has 0 inliers."""
    query_unit = _unit(query)
    return [
        Verification.none()
        if candidate is None
        else verify_pair(query, candidate, options, query_unit=query_unit)
        for candidate in candidates
    ]


def rerank_order(scores: np.ndarray, inliers: np.ndarray, min_inliers: int) -> np.ndarray:
    """Positions of the candidates in their new order: verified ones (``inliers >=
    min_inliers``) by inliers, then global score; then the rest in the order given (the
    global ranking, or the one an earlier re-ranking made).

    ``scores`` are the candidates' global similarities (larger is better)."""
    scores = np.asarray(scores, dtype=np.float64)
    inliers = np.asarray(inliers, dtype=np.int64)
    if scores.shape != inliers.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and inliers {inliers.shape} must be 1-D and alike")
    verified = inliers >= min_inliers
    key_inliers = np.where(verified, inliers, 0)
    key_scores = np.where(verified, -scores, 0)
    # lexsort: the last key is the primary one; stable, so ties keep the order given
    return np.lexsort((key_scores, -key_inliers, ~verified))


def _unit(features: LocalFeatures) -> np.ndarray:
    return unit_descriptors(features.descriptors)


def _matches(features: LocalFeatures, matches: np.ndarray) -> int:
    return len(matches)


def _unique_locations(features: LocalFeatures, matches: np.ndarray) -> int:
    """Matches counted once per query location (to a tenth of a pixel)."""
    if len(matches) == 0:
        return 0
    points = np.round(features.keypoints[matches[:, 0], :2] * 10).astype(np.int64)
    return len(np.unique(points, axis=0))


def _ransac(src: np.ndarray, tgt: np.ndarray, options: VerifyOptions) -> np.ndarray | None:
    """The inlier mask of the model LO-RANSAC fits to ``src -> tgt``, or ``None``."""
    import pycolmap  # here: only processes that verify load it

    conf = pycolmap.RANSACOptions()
    conf.max_error = options.rerank_max_error
    conf.confidence = 0.999
    conf.min_num_trials = 50
    conf.max_num_trials = options.rerank_max_trials
    conf.random_seed = _SEED
    conf.num_threads = 1
    if options.rerank_model == "homography":
        found = pycolmap.estimate_homography_matrix(src, tgt, conf)
    else:
        found = pycolmap.estimate_affine2d_robust(src, tgt, conf)
    if not found:
        return None
    return np.asarray(found["inlier_mask"], dtype=bool)
