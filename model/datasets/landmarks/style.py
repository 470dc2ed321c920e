"""Colours and a landmark's style: the palette and the patterns all its facades share."""

from __future__ import annotations

import colorsys
from dataclasses import dataclass
from typing import Literal, cast

import numpy as np

RGB = tuple[float, float, float]
Window = Literal["rect", "arched", "round", "tall"]
Pattern = Literal["plain", "blocks", "panels", "stripes"]
Ornament = Literal["rosettes", "diamonds", "pilasters", "medallions"]


@dataclass(frozen=True)
class Style:
    """A landmark's look: its palette and the patterns all its facades share."""

    walls: tuple[RGB, ...]
    accent: RGB
    trim: RGB
    glass: RGB
    roof: RGB
    ground: RGB
    window: Window
    pattern: Pattern
    ornament: Ornament
    mullions: bool
    bay_m: float
    floor_m: float
    window_m: tuple[float, float]


def hsv_colour(h: float, s: float, v: float) -> RGB:
    """The RGB (0 to 255) colour of hue `h` (wrapped), saturation `s` and value `v` (clipped)."""
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, float(np.clip(s, 0, 1)), float(np.clip(v, 0, 1)))
    return (255.0 * r, 255.0 * g, 255.0 * b)


def random_style(rng: np.random.Generator, hue: float) -> Style:
    """A landmark's style drawn from `rng`, its palette around `hue`."""
    window = cast(Window, str(rng.choice(["rect", "arched", "round", "tall"])))
    window_m = {"rect": (1.3, 1.6), "arched": (1.2, 2.0), "round": (1.3, 1.3), "tall": (0.9, 2.3)}
    w, h = window_m[window]
    scale = rng.uniform(0.85, 1.2)
    return Style(
        walls=tuple(
            hsv_colour(
                hue + rng.normal(0, 0.03) + 0.5 * (i == 2),
                rng.uniform(0.15, 0.55),
                rng.uniform(0.55, 0.9),
            )
            for i in range(3)
        ),
        accent=hsv_colour(
            hue + rng.choice([0.33, 0.5, 0.67]), rng.uniform(0.55, 0.9), rng.uniform(0.45, 0.85)
        ),
        trim=hsv_colour(hue, 0.08, 0.93)
        if rng.random() < 0.6
        else hsv_colour(hue + 0.5, 0.3, 0.25),
        glass=hsv_colour(rng.uniform(0.5, 0.65), rng.uniform(0.2, 0.5), rng.uniform(0.18, 0.38)),
        roof=hsv_colour(
            hue + rng.uniform(-0.1, 0.1), rng.uniform(0.1, 0.5), rng.uniform(0.22, 0.42)
        ),
        ground=hsv_colour(
            rng.choice([0.1, 0.15, 0.25, 0.6]), rng.uniform(0.05, 0.2), rng.uniform(0.42, 0.6)
        ),
        window=window,
        pattern=cast(Pattern, str(rng.choice(["plain", "blocks", "panels", "stripes"]))),
        ornament=cast(
            Ornament, str(rng.choice(["rosettes", "diamonds", "pilasters", "medallions"]))
        ),
        mullions=bool(rng.random() < 0.6),
        bay_m=rng.uniform(2.4, 3.4),
        floor_m=rng.uniform(3.0, 4.0),
        window_m=(w * scale, h * scale),
    )


def scaled_colour(rgb: RGB | np.ndarray, gain: float = 1.0) -> tuple[float, float, float]:
    """`rgb` times `gain`, clipped to 0 to 255, as the float triple OpenCV draws with."""
    r, g, b = np.clip(np.asarray(rgb, dtype=np.float64) * gain, 0, 255)
    return (float(r), float(g), float(b))
