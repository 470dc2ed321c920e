"""Taking a photo of a shot: sky, sun shading, then haze, exposure, colour cast, blur, noise."""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from model.datasets.landmarks.cameras import Shot
from model.datasets.landmarks.conf import LandmarksConf
from model.datasets.landmarks.render import render, sky
from model.datasets.landmarks.scene import Scene
from model.datasets.landmarks.streams import Stream, stream_rng
from model.datasets.landmarks.style import RGB, hsv_colour, scaled_colour


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


def _triple(values: np.ndarray) -> tuple[float, float, float]:
    a, b, c = (float(v) for v in values)
    return (a, b, c)


def _look(rng: np.random.Generator, scene: Scene) -> _Look:
    overcast = rng.random() < 0.25
    zenith = hsv_colour(
        rng.uniform(0.55, 0.62),
        rng.uniform(0.05, 0.15) if overcast else rng.uniform(0.3, 0.6),
        rng.uniform(0.7, 0.95),
    )
    horizon = scaled_colour(0.45 * np.array(zenith) + 0.55 * np.array([232.0, 234.0, 238.0]))
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
        cast=_triple(rng.normal(1.0, 0.035, size=3)),
        vignette=rng.uniform(0.0, 0.25),
        blur=rng.uniform(0.3, 0.8) if rng.random() < 0.5 else 0.0,
        noise=rng.uniform(0.5, 2.5),
    )


def _shading(scene: Scene, sun: np.ndarray) -> list[float]:
    """A Lambertian gain per quad under the sun plus sky light, so box faces differ in tone."""
    return [0.62 + 0.5 * max(float(np.dot(q.normal, sun)), 0.0) for q in scene.quads]


def _develop(
    image: np.ndarray, depth: np.ndarray, look: _Look, *, rng: np.random.Generator
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


def take_photo(conf: LandmarksConf, scene: Scene, shot: Shot) -> tuple[np.ndarray, np.ndarray]:
    """(photo [H, W, 3] uint8 RGB, clean depth [H, W]) of `scene` for `shot`."""
    rng = stream_rng(conf, Stream.PHOTO, *shot.keys)
    look = _look(rng, scene)
    background = sky(shot.camera, look.zenith, look.horizon)
    image, depth = render(
        scene.quads,
        shot.camera,
        background,
        supersample=conf.supersample,
        shading=_shading(scene, look.sun),
    )
    return _develop(image, depth, look, rng=rng), depth


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    """The JPEG bytes of an RGB uint8 image at `quality` (1 to 100)."""
    ok, buffer = cv2.imencode(
        ".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality]
    )
    if not ok:
        raise RuntimeError("OpenCV could not encode a JPEG; check the opencv-python installation")
    return buffer.tobytes()
