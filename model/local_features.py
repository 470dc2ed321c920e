"""Local features of a photo (SIFT from pycolmap) for the spatial verification of a ranking.

A global descriptor says which photos look alike; local features let a re-ranker check that
two photos show the same structure (``model.verification``). SIFT is pycolmap's, the same
extractor as the SfM stage, with RootSIFT normalisation. Descriptors are stored as COLMAP
stores them, one unsigned byte per dimension (the unit vector times 512, clipped), so a photo
with 1024 features costs 128 KiB of descriptors and 16 KiB of keypoints.

Keypoints are in the pixel frame the extractor saw: the photo (or a query's box) scaled so its
longer side is at most ``--local-max-size``; ``size`` records that frame, so a drawing can map them
onto any other size of the same photo.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
from PIL import Image

from model.images import BadImage, ImageSource, decode_image, read_size
from model.settings import raise_problems

__all__ = [
    "DESCRIPTOR_DIM",
    "LocalFeatureOptions",
    "LocalFeatures",
    "empty_features",
    "extract_local_features",
    "features_from_row",
    "read_local_features",
    "read_local_image",
    "unit_descriptors",
]

DESCRIPTOR_DIM = 128
_BYTE_SCALE = 512.0  # COLMAP's FeatureDescriptorsToUnsignedByte


@dataclass(frozen=True)
class LocalFeatureOptions:
    """How local features are extracted; everything that changes them is here."""

    local_max_features: int = 1024
    """At most this many SIFT features per photo (pycolmap keeps the largest scales)."""
    local_max_size: int = 1024
    """Longer side of the image SIFT sees (never enlarged)."""
    local_peak_threshold: float = 0.0066667
    """SIFT's contrast threshold (pycolmap's default); lower finds more features in flat photos."""
    local_first_octave: int | None = None
    """SIFT's first octave: -1 doubles the image first (pycolmap's default), 0 starts at its
    own size. Default: -1 for a photo under 3/4 of --local-max-size a side, whose features
    would fall short of the cap without its finest octave; 0 for the others, where the cap
    keeps the largest scales anyway and doubling costs 4.5 times the time."""

    def __post_init__(self) -> None:
        problems = []
        if self.local_max_features < 1:
            problems.append(
                f"--local-max-features must be at least 1, not {self.local_max_features}"
            )
        if self.local_max_size < 64:
            problems.append(f"--local-max-size must be at least 64, not {self.local_max_size}")
        if self.local_first_octave not in (None, -1, 0, 1):
            problems.append(
                f"--local-first-octave must be -1, 0 or 1, not {self.local_first_octave}"
            )
        if not 0 < self.local_peak_threshold < 1:
            problems.append(
                f"--local-peak-threshold must be in (0, 1), not {self.local_peak_threshold}"
            )
        raise_problems(problems)

    def identity(self) -> dict[str, object]:
        return {"extractor": "sift-pycolmap", **asdict(self)}

    @classmethod
    def from_identity(cls, identity: Mapping[str, Any]) -> LocalFeatureOptions:
        """The options that made features of ``identity`` (a features output's settings); a
        ``ValueError`` when this code extracts them otherwise (a query would not match)."""
        mine = {"extractor": "sift-pycolmap"}
        other = {k: identity.get(k) for k in mine if identity.get(k) != mine[k]}
        if other:
            raise ValueError(
                f"the local features were made by {other}, this code extracts {mine}: run "
                "pipeline.features again and pin its output with pipeline.index --local-features"
            )
        return cls(**{f.name: identity[f.name] for f in fields(cls) if f.name in identity})


@dataclass(frozen=True)
class LocalFeatures:
    """A photo's keypoints ``[n, 4]`` (x, y, scale, orientation; float32) and descriptors
    ``[n, 128]`` (uint8), in the frame of ``size`` (width, height)."""

    keypoints: np.ndarray
    descriptors: np.ndarray
    size: tuple[int, int]

    def __post_init__(self) -> None:
        n = len(self.keypoints)
        if self.keypoints.shape != (n, 4) or self.descriptors.shape != (n, DESCRIPTOR_DIM):
            raise ValueError(
                f"keypoints {self.keypoints.shape} and descriptors {self.descriptors.shape} "
                f"do not describe the same {n} features"
            )

    def __len__(self) -> int:
        return len(self.keypoints)

    @property
    def nbytes(self) -> int:
        return self.keypoints.nbytes + self.descriptors.nbytes


def features_from_row(keypoints: bytes, descriptors: bytes, size: tuple[int, int]) -> LocalFeatures:
    """Features from their stored bytes (``LOCAL_FEATURES``'s columns; ``LocalFeatures.
    keypoints.tobytes()`` and ``descriptors.tobytes()`` write them)."""
    points = np.frombuffer(keypoints, np.float32).reshape(-1, 4)
    return LocalFeatures(points, np.frombuffer(descriptors, np.uint8).reshape(-1, 128), size)


def empty_features(size: tuple[int, int] = (0, 0)) -> LocalFeatures:
    """No features: a blank or tiny photo, answered with zero inliers rather than an error."""
    return LocalFeatures(
        np.zeros((0, 4), np.float32), np.zeros((0, DESCRIPTOR_DIM), np.uint8), size
    )


_local = threading.local()


def _extractor(options: LocalFeatureOptions, first_octave: int):
    """One pycolmap SIFT extractor per thread and settings (building one costs milliseconds)."""
    import pycolmap  # here: only processes that extract load it (array API: safe after torch)

    made = getattr(_local, "sift", None)
    if made is None:
        made = _local.sift = {}
    key = (options, first_octave)
    if key in made:
        return made[key]
    conf = pycolmap.FeatureExtractionOptions()
    conf.max_image_size = options.local_max_size
    conf.num_threads = 1
    conf.sift.max_num_features = options.local_max_features
    conf.sift.peak_threshold = options.local_peak_threshold
    conf.sift.first_octave = first_octave
    with warnings.catch_warnings():  # its successor returns keypoints as Python objects
        warnings.simplefilter("ignore", DeprecationWarning)
        made[key] = pycolmap.Sift(conf, device=pycolmap.Device.cpu)
    return made[key]


def extract_local_features(image: np.ndarray, options: LocalFeatureOptions) -> LocalFeatures:
    """SIFT features of ``image`` (``[H, W, 3]`` RGB or ``[H, W]`` grey, uint8), longer side
    first brought to at most ``options.local_max_size``."""
    grey = _grey(image)
    height, width = grey.shape
    if min(height, width) < 16:
        return empty_features((width, height))
    grey, size = _fit(grey, options.local_max_size)
    octave = options.local_first_octave
    if octave is None:
        octave = -1 if 4 * max(size) < 3 * options.local_max_size else 0
    keypoints, descriptors = _extractor(options, octave).extract(np.ascontiguousarray(grey))
    keypoints = np.asarray(keypoints, np.float32)
    # pycolmap caps locations, and a location may have two orientations: keep the largest scales
    keep = np.sort(np.argsort(-keypoints[:, 2], kind="stable")[: options.local_max_features])
    keypoints = keypoints[keep]
    descriptors = np.asarray(descriptors, np.float32)[keep]
    as_bytes = np.clip(np.round(descriptors * _BYTE_SCALE), 0, 255).astype(np.uint8)
    return LocalFeatures(np.ascontiguousarray(keypoints), as_bytes, size)


def read_local_image(
    source: ImageSource,
    options: LocalFeatureOptions,
    *,
    exif_transpose: bool,
    box: Sequence[float] | None = None,
) -> np.ndarray | BadImage:
    """A photo (a path or its bytes) decoded in the frame its local features use: the whole
    photo scaled to at most ``--local-max-size``, or its ``box`` scaled by that same factor (a
    query seen at the scale of the database, as the revisited protocol crops it). Evaluation,
    the features stage and the service all read photos here, so one photo gives one set of
    features everywhere."""
    size = read_size(source, exif_transpose=exif_transpose)
    if isinstance(size, BadImage):
        return size
    width, height = size
    factor = min(1.0, options.local_max_size / max(width, height))
    crop = None
    if box is not None:
        x1, y1, x2, y2 = (float(v) for v in box)
        if not (0 <= x1 < x2 <= width + 0.5 and 0 <= y1 < y2 <= height + 0.5):
            return BadImage(f"box {list(box)} lies outside the photo ({width}x{height})")
        crop = (int(x1), int(y1), min(width, math.ceil(x2)), min(height, math.ceil(y2)))
        width, height = crop[2] - crop[0], crop[3] - crop[1]
    target = (max(1, round(width * factor)), max(1, round(height * factor)))
    return decode_image(source, exif_transpose=exif_transpose, crop=crop, size=target)


def read_local_features(
    source: ImageSource,
    options: LocalFeatureOptions,
    *,
    exif_transpose: bool,
    box: Sequence[float] | None = None,
) -> LocalFeatures | BadImage:
    """``extract_local_features`` of ``read_local_image``."""
    image = read_local_image(source, options, exif_transpose=exif_transpose, box=box)
    return image if isinstance(image, BadImage) else extract_local_features(image, options)


def unit_descriptors(descriptors: np.ndarray) -> np.ndarray:
    """Stored bytes back to L2-normalised float32 rows (zero rows stay zero)."""
    x = descriptors.astype(np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def _grey(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        return image.astype(np.uint8, copy=False)
    if image.ndim == 3 and image.shape[2] in (3, 4):
        rgb = image[..., :3].astype(np.float32)
        grey = rgb @ np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601, as PIL's "L"
        return np.clip(np.round(grey), 0, 255).astype(np.uint8)
    raise ValueError(f"expected an [H, W] or [H, W, 3] image, got shape {image.shape}")


def _fit(grey: np.ndarray, max_size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """``grey`` with its longer side at most ``max_size``, and its (width, height)."""
    height, width = grey.shape
    longer = max(height, width)
    if longer > max_size:
        factor = max_size / longer
        size = (max(1, round(width * factor)), max(1, round(height * factor)))
        grey = np.asarray(Image.fromarray(grey).resize(size, Image.Resampling.BILINEAR))
    return grey, (grey.shape[1], grey.shape[0])
