"""One group of photos → COLMAP models, with pycolmap's Python API (no colmap binary).

The per-group core of the sfm stage (``pipeline.sfm`` runs it as a Ray task per group): SIFT
at a maximum size, matching (all pairs for a small group, given pairs — from global-descriptor
retrieval — for a large one), geometric verification, then incremental or global mapping.
Everything happens in a scratch folder; pycolmap's log goes to a file there, not the console.

What comes back is plain data (:class:`GroupResult`): per photo, whether it was registered, in
which model, its camera centre, the ids of the 3D points it observes (an int64 NumPy array,
never a list of Python ints: a photo sees thousands) and the mean scale at which it sees them
(``focal length / depth`` averaged over its observations: the size, in pixels, of one metre at
the points' distance, so the ratio of two photos' scales is their scale change); per model, a
summary; and the models themselves as COLMAP binary files. ``dumps_result`` and
``loads_result`` store a group's result as JSON with those arrays kept as arrays.

Never import torch here or before it in the same process: pycolmap's feature extraction
crashes when torch came first (colmap issue #3477). This module imports NumPy, Pillow and
pycolmap only.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

__all__ = [
    "GroupResult",
    "ImageRow",
    "ModelRow",
    "ReconstructOptions",
    "dumps_result",
    "loads_result",
    "reconstruct_group",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReconstructOptions:
    mapper: str = "global"
    """global (GLOMAP's, in pycolmap 4) or incremental (COLMAP's)."""
    cameras: str = "exif"
    """exif: photos of one size, make, model and focal length share intrinsics; per_image: every
    photo its own (what COLMAP does without EXIF)."""
    max_image_size: int = 1024
    max_features: int = 8192
    exhaustive_max: int = 150
    """Groups up to this many photos match every pair; larger ones match ``pairs``."""
    threads: int = 1
    min_model_size: int = 3
    dsp_sift: bool = False
    """Domain-size pooling and affine shapes (DSP-SIFT): more robust matches, slower."""
    guided_matching: bool = False
    """Match again under each verified pair's geometry: more inliers per pair, at several times
    the matching time and memory on full-size photos."""
    seed: int = 0


@dataclass(frozen=True)
class ImageRow:
    image_id: str
    registered: bool
    model: int | None = None
    """Index of the model inside its group, or None."""
    centre: tuple[float, float, float] | None = None
    point_ids: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    """int64: the ids of the 3D points it observes, one per observation."""
    scale: float | None = None
    observations: int = 0


@dataclass(frozen=True)
class ModelRow:
    model: int
    images: int
    points: int
    mean_reprojection_error: float
    mean_track_length: float


@dataclass
class GroupResult:
    images: list[ImageRow]
    models: list[ModelRow]
    files: dict[str, bytes]
    """``<model>/<cameras|images|points3D|...>.bin`` → bytes: the COLMAP models."""
    seconds: dict[str, float]
    log: str = ""


def _camera_key(image: Any) -> tuple:
    """What makes two photos share intrinsics: size, camera make and model, focal length."""
    exif = image.getexif()
    focal = exif.get_ifd(0x8769).get(37386)  # FocalLength, in the Exif sub-IFD
    return (image.size, exif.get(271), exif.get(272), float(focal) if focal else None)


def _write_photos(
    folder: Path, photos: list[tuple[str, bytes]], shared: bool = True
) -> dict[str, str]:
    """Photos as files named by image_id, a folder per camera (same size, make, model and focal
    length: one set of intrinsics, as COLMAP's per-folder camera mode then estimates them),
    upright (EXIF rotation applied, as every stage sees them); returns file name → image_id."""

    cameras: dict[tuple, str] = {}
    names = {}
    for image_id, data in photos:
        with Image.open(io.BytesIO(data)) as image:
            upright = ImageOps.exif_transpose(image)
            key = (_camera_key(image), upright.size) if shared else image_id
            camera = cameras.setdefault(key, f"camera{len(cameras):03d}")
            (folder / camera).mkdir(exist_ok=True)
            name = f"{camera}/{image_id}.jpg"
            if upright is image and image.format == "JPEG":
                (folder / name).write_bytes(data)  # already upright: keep the bytes as they are
            else:
                upright.convert("RGB").save(folder / name, quality=95)
        names[name] = image_id
    return names


@contextmanager
def _timed(seconds: dict[str, float], phase: str) -> Iterator[None]:
    """Adds the time spent inside to ``seconds[phase]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[phase] = seconds.get(phase, 0.0) + time.perf_counter() - start


def reconstruct_group(
    photos: list[tuple[str, bytes]],
    options: ReconstructOptions = ReconstructOptions(),
    pairs: list[tuple[str, str]] | None = None,
    *,
    scratch: str | None = None,
) -> GroupResult:
    """Reconstruct ``photos`` (``(image_id, bytes)``); raises on a failure of pycolmap."""
    _check_process(options)
    import pycolmap  # here, not at the top: the check above must come first

    pycolmap.set_random_seed(options.seed)  # the same photos give the same models
    seconds: dict[str, float] = {}
    with (
        _timed(seconds, "total"),
        tempfile.TemporaryDirectory(prefix="cirray-sfm-", dir=scratch) as tmp,
    ):
        root = Path(tmp)
        _log_to_file(pycolmap, root / "colmap.log")
        names = _write_photos(_folder(root, "images"), photos, shared=options.cameras == "exif")
        database = root / "database.db"
        with _timed(seconds, "features"):
            _extract_features(pycolmap, database, root / "images", options=options)
        use_pairs = pairs is not None and len(photos) > options.exhaustive_max
        pair_file = _pair_file(root, names, pairs) if use_pairs else None
        with _timed(seconds, "matching"):
            _match(pycolmap, database, options, pair_file=pair_file)
        with _timed(seconds, "mapping"):
            models = _map(
                pycolmap, database, root / "images", out=_folder(root, "models"), options=options
            )
        images, model_rows, files = _collect(models, names, root / "written")
        # glog names its files <prefix><date>-<time>.<pid>: read whatever it wrote.
        log = "".join(p.read_text(errors="replace") for p in sorted(root.glob("colmap.log*")))
    return GroupResult(images=images, models=model_rows, files=files, seconds=seconds, log=log)


def _check_process(options: ReconstructOptions) -> None:
    """Refuse a process that imported torch, and options pycolmap would not know."""
    if "torch" in sys.modules:
        raise RuntimeError(
            "torch is imported in this process; pycolmap's feature extraction crashes after it "
            "(colmap #3477): run SfM in a process that never imports torch"
        )
    if options.cameras not in ("exif", "per_image"):
        raise ValueError(f"unknown cameras {options.cameras!r}; use exif or per_image")
    if options.mapper not in ("global", "incremental"):
        raise ValueError(f"unknown mapper {options.mapper!r}; use incremental or global")


def _folder(root: Path, name: str) -> Path:
    path = root / name
    path.mkdir()
    return path


def _log_to_file(pycolmap: Any, log_file: Path) -> None:
    """pycolmap's log to a file in the scratch folder, not the console."""
    pycolmap.logging.logtostderr = False
    pycolmap.logging.set_log_destination(pycolmap.logging.INFO, str(log_file))


def _extract_features(
    pycolmap: Any, database: Path, images: Path, *, options: ReconstructOptions
) -> None:
    """SIFT (or DSP-SIFT) at ``max_image_size`` on the CPU, one camera per folder."""
    extraction = pycolmap.FeatureExtractionOptions()
    extraction.max_image_size = options.max_image_size
    extraction.num_threads = options.threads
    extraction.sift.max_num_features = options.max_features
    extraction.use_gpu = False
    if options.dsp_sift:
        extraction.sift.estimate_affine_shape = True
        extraction.sift.domain_size_pooling = True
    pycolmap.extract_features(
        database,
        images,
        camera_mode=pycolmap.CameraMode.PER_FOLDER,
        extraction_options=extraction,
        device=pycolmap.Device.cpu,
    )


def _pair_file(root: Path, names: dict[str, str], pairs: list[tuple[str, str]] | None) -> Path:
    """The pairs to match, as COLMAP's list of file names."""
    path = root / "pairs.txt"
    name_of = {image_id: name for name, image_id in names.items()}
    path.write_text("".join(f"{name_of[a]} {name_of[b]}\n" for a, b in pairs or []))
    return path


def _match(
    pycolmap: Any, database: Path, options: ReconstructOptions, *, pair_file: Path | None
) -> None:
    """Match every pair (no ``pair_file``) or the listed ones, then verify them geometrically
    (seeded: an unseeded RANSAC makes reruns differ)."""
    matching = pycolmap.FeatureMatchingOptions()
    matching.num_threads = options.threads
    matching.use_gpu = False
    matching.guided_matching = options.guided_matching
    verification = pycolmap.TwoViewGeometryOptions()
    verification.ransac.random_seed = options.seed
    common = {
        "matching_options": matching,
        "verification_options": verification,
        "device": pycolmap.Device.cpu,
    }
    if pair_file is None:
        pycolmap.match_exhaustive(database, **common)
        return
    pairing = pycolmap.ImportedPairingOptions()
    pairing.match_list_path = str(pair_file)
    pycolmap.match_image_pairs(database, pairing_options=pairing, **common)


def _map(
    pycolmap: Any, database: Path, images: Path, *, out: Path, options: ReconstructOptions
) -> dict[int, Any]:
    """Incremental or global mapping; pycolmap's reconstructions by number."""
    mappers = {
        "global": (pycolmap.GlobalPipelineOptions, pycolmap.global_mapping),
        "incremental": (pycolmap.IncrementalPipelineOptions, pycolmap.incremental_mapping),
    }
    make_options, mapping = mappers[options.mapper]
    pipeline = make_options()
    pipeline.num_threads = options.threads
    pipeline.min_model_size = options.min_model_size
    pipeline.random_seed = options.seed
    return mapping(database, images, out, pipeline)


def _collect(
    models: dict[int, Any], names: dict[str, str], written: Path
) -> tuple[list[ImageRow], list[ModelRow], dict[str, bytes]]:
    """The models, largest first, as plain rows and COLMAP binary files; a photo in two models
    keeps the larger model's row."""
    rows: dict[str, ImageRow] = {}
    model_rows, files = [], {}
    ordered = sorted(models.values(), key=lambda r: -r.num_reg_images())
    for number, rec in enumerate(ordered):
        model_rows.append(_model_row(number, rec))
        points = _Points(rec)
        for image in rec.images.values():
            image_id = names[image.name]
            if image.has_pose and image_id not in rows:
                rows[image_id] = _image_row(image_id, number, rec, image=image, points=points)
        files.update(_model_files(rec, number, written))
    images = [rows.get(i) or ImageRow(image_id=i, registered=False) for i in names.values()]
    return images, model_rows, files


def _model_row(number: int, rec: Any) -> ModelRow:
    return ModelRow(
        model=number,
        images=rec.num_reg_images(),
        points=rec.num_points3D(),
        mean_reprojection_error=float(rec.compute_mean_reprojection_error()),
        mean_track_length=float(rec.compute_mean_track_length()),
    )


def _model_files(rec: Any, number: int, written: Path) -> dict[str, bytes]:
    """``<number>/<file>.bin`` → bytes of one model written in COLMAP's binary format."""
    folder = written / str(number)
    folder.mkdir(parents=True)
    rec.write_binary(str(folder))
    return {f"{number}/{path.name}": path.read_bytes() for path in folder.iterdir()}


class _Points:
    """A model's 3D points as arrays: ids ascending, and their positions."""

    def __init__(self, rec: Any) -> None:
        ids = np.fromiter(rec.points3D.keys(), dtype=np.int64, count=rec.num_points3D())
        order = np.argsort(ids)
        self.ids = ids[order]
        xyz = np.empty((len(ids), 3), dtype=np.float64)
        for i, point_id in enumerate(self.ids.tolist()):
            xyz[i] = rec.points3D[point_id].xyz
        self.xyz = xyz

    def positions(self, point_ids: np.ndarray) -> np.ndarray:
        return self.xyz[np.searchsorted(self.ids, point_ids)]


def _image_row(image_id: str, model: int, rec: Any, *, image: Any, points: _Points) -> ImageRow:
    centre = tuple(float(v) for v in image.projection_center())
    observed = image.get_observation_points2D()
    point_ids = np.fromiter((p.point3D_id for p in observed), dtype=np.int64, count=len(observed))
    focal = float(rec.cameras[image.camera_id].mean_focal_length())
    pose = np.asarray(image.cam_from_world().matrix(), dtype=np.float64)  # 3 x 4
    depth = points.positions(point_ids) @ pose[2, :3] + pose[2, 3]
    scales = focal / depth[depth > 0]
    return ImageRow(
        image_id=image_id,
        registered=True,
        model=model,
        centre=centre,
        point_ids=point_ids,
        scale=float(scales.mean()) if len(scales) else None,
        observations=len(point_ids),
    )


_ARRAY = "__int64_base64__"


def dumps_result(result: dict[str, Any]) -> str:
    """A group's result (``ImageRow`` dicts among plain data) as JSON, each int64 array as
    its bytes in base64: stored and read back (``loads_result``) as arrays, never a list of
    Python ints per point."""
    return json.dumps(result, default=_encode)


def loads_result(text: str) -> dict[str, Any]:
    """``dumps_result`` read back: the arrays as int64 arrays (a result stored as lists by an
    earlier version reads as it was)."""
    return json.loads(text, object_hook=_decode)


def _encode(value: Any) -> Any:
    if isinstance(value, np.ndarray) and value.dtype.kind in "iu":
        data = np.ascontiguousarray(value, dtype="<i8")
        return {_ARRAY: base64.b64encode(data.tobytes()).decode("ascii")}
    if isinstance(value, np.integer | np.floating):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def _decode(value: dict[str, Any]) -> Any:
    if len(value) == 1 and _ARRAY in value:
        return np.frombuffer(base64.b64decode(value[_ARRAY]), dtype="<i8").astype(np.int64)
    return value
