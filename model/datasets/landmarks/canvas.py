"""Texture painting primitives: smooth multi-scale noise and a canvas measured in metres."""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from model.datasets.landmarks.style import RGB, scaled_colour

_MAX_TEXTURE_SIZE = 2048


def smooth_noise(
    rng: np.random.Generator, height: int, width: int, *, scale_px: float, octaves: int = 3
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


@dataclass
class Canvas:
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
        self, *, x0: float, z0: float, x1: float, z1: float, rgb: RGB, thickness: int = -1
    ) -> None:
        cv2.rectangle(
            self.image, self.px(x0, z1), self.px(x1, z0), scaled_colour(rgb), thickness, cv2.LINE_AA
        )


def weathered_canvas(
    rng: np.random.Generator, width_m: float, height_m: float, *, ppm: float, base: RGB
) -> Canvas:
    """A wall-coloured canvas with weathering noise at several scales."""
    ppm = min(ppm, _MAX_TEXTURE_SIZE / max(width_m, height_m))
    w, h = max(round(width_m * ppm), 4), max(round(height_m * ppm), 4)
    shade = (
        1
        + 0.07 * smooth_noise(rng, h, w, scale_px=2.5 * ppm)
        + 0.04 * smooth_noise(rng, h, w, scale_px=0.3 * ppm, octaves=2)
    )
    image = np.asarray(base, dtype=np.float32) * shade[..., None]
    return Canvas(np.clip(image, 0, 255).astype(np.uint8), ppm)
