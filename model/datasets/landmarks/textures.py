"""The procedural textures of a scene's quads: facades, side walls, roofs and the ground."""

from __future__ import annotations

import itertools

import cv2
import numpy as np

from model.datasets.landmarks.canvas import Canvas, smooth_noise, weathered_canvas
from model.datasets.landmarks.details import paint_ornament, paint_sign, paint_window
from model.datasets.landmarks.style import RGB, Style, scaled_colour


def _paint_pattern(canvas: Canvas, rng: np.random.Generator, style: Style, *, base: RGB) -> None:
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
                    scaled_colour(base, 0.6),
                    -1,
                )


def _paint_grime(canvas: Canvas, rng: np.random.Generator) -> None:
    """Stains and streaks: they break the repetition of windows that confuses matching."""
    h, w = canvas.image.shape[:2]
    blotches = np.clip(smooth_noise(rng, h, w, scale_px=1.5 * canvas.ppm, octaves=2), 0, None)
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


def wall_texture(
    rng: np.random.Generator,
    style: Style,
    base: RGB,
    *,
    width_m: float,
    height_m: float,
    ppm: float,
    ground_floor: bool,
) -> np.ndarray:
    """A facade: pattern, cornices, a grid of windows, ornaments, a door and signs, grime."""
    canvas = weathered_canvas(rng, width_m, height_m, ppm=ppm, base=base)
    _paint_pattern(canvas, rng, style, base=base)
    bays = int((width_m - 0.6) // style.bay_m)
    floors = int((height_m - 0.8) // style.floor_m)
    margin = (width_m - bays * style.bay_m) / 2
    xs = [margin + (i + 0.5) * style.bay_m for i in range(bays)]
    for floor in range(1, floors + 1):  # cornice under each upper floor
        z = floor * style.floor_m - 0.05
        if z < height_m - 0.5 and (floor == 1 or rng.random() < 0.5):
            canvas.rect(
                x0=0,
                z0=z - 0.12,
                x1=width_m,
                z1=z + 0.12,
                rgb=scaled_colour(style.trim, rng.uniform(0.8, 1.0)),
            )
    door = int(rng.integers(len(xs))) if ground_floor and xs else -1
    for floor in range(floors):
        z = floor * style.floor_m + 0.9
        for bay, x in enumerate(xs):
            if floor == 0 and bay == door:
                canvas.rect(x0=x - 0.85, z0=0, x1=x + 0.85, z1=2.7, rgb=style.trim)
                canvas.rect(
                    x0=x - 0.7, z0=0, x1=x + 0.7, z1=2.55, rgb=scaled_colour(style.accent, 0.45)
                )
            elif floor == 0 and ground_floor and rng.random() < 0.35:
                paint_sign(canvas, rng, style, x=x, z=1.2)
            elif rng.random() > 0.06:  # else a bricked-up window
                paint_window(canvas, rng, style, x=x, z=z, size=style.window_m)
        for left, right in itertools.pairwise(xs):
            if rng.random() < 0.7:
                paint_ornament(
                    canvas, rng, style, x=(left + right) / 2, z=z + style.window_m[1] * 0.7
                )
    top = max(height_m - 0.6, 0)  # crowning cornice with dentils
    canvas.rect(x0=0, z0=top, x1=width_m, z1=height_m, rgb=scaled_colour(style.trim, 0.9))
    for x in np.arange(0.1, width_m, 0.45):
        canvas.rect(x0=x, z0=top - 0.18, x1=x + 0.2, z1=top, rgb=scaled_colour(style.trim, 0.75))
    _paint_grime(canvas, rng)
    return canvas.image


def plain_texture(
    rng: np.random.Generator, base: RGB, width_m: float, *, height_m: float, ppm: float
) -> np.ndarray:
    """A narrow side wall: just the weathered wall colour and grime."""
    canvas = weathered_canvas(rng, width_m, height_m, ppm=ppm, base=base)
    _paint_grime(canvas, rng)
    return canvas.image


def roof_texture(
    rng: np.random.Generator, style: Style, width_m: float, *, depth_m: float, ppm: float
) -> np.ndarray:
    """A flat roof: tar with vents and skylights."""
    canvas = weathered_canvas(rng, width_m, depth_m, ppm=ppm, base=style.roof)
    for _ in range(int(rng.integers(2, 6))):
        x, z = rng.uniform(0, width_m), rng.uniform(0, depth_m)
        size = rng.uniform(0.6, 2.0)
        canvas.rect(
            x0=x,
            z0=z,
            x1=x + size,
            z1=z + size * rng.uniform(0.5, 1.5),
            rgb=scaled_colour(style.roof, rng.uniform(1.3, 2.0)),
        )
    return canvas.image


def ground_texture(rng: np.random.Generator, colour: RGB) -> np.ndarray:
    """A weakly textured ground: low-contrast, smooth. A textured ground makes image pairs
    homography-dominated and splits Structure-from-Motion models."""
    size = 256
    shade = 1 + 0.035 * smooth_noise(rng, size, size, scale_px=24.0, octaves=3)
    image = np.asarray(colour, dtype=np.float32) * shade[..., None]
    return cv2.GaussianBlur(np.clip(image, 0, 255).astype(np.uint8), (0, 0), 1.5)
