"""A picture of a verified pair: the two photos side by side, each inlier a line between them.

Seeing where the inliers fall says at once whether a verification is right (lines between the
same windows of one facade) or wrong (lines all on a repeated pattern, or on a watermark).
"""

from __future__ import annotations

import colorsys
import io

import numpy as np
from PIL import Image, ImageDraw

from model.local_features import LocalFeatures

__all__ = ["draw_matches"]

_GAP = 8
_MAX_LINES = 150  # more hide the photos


def draw_matches(
    query: tuple[np.ndarray, LocalFeatures],
    result: tuple[np.ndarray, LocalFeatures],
    matches: np.ndarray,
    *,
    height: int = 200,
) -> bytes:
    """JPEG bytes: ``query`` and ``result`` (each an RGB image in its features' frame, and
    those features) at ``height`` pixels, joined by a line per row of ``matches``."""
    sides = [_scaled(image, features, height) for image, features in (query, result)]
    width = sides[0][0].width + _GAP + sides[1][0].width
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    canvas.paste(sides[0][0], (0, 0))
    canvas.paste(sides[1][0], (sides[0][0].width + _GAP, 0))
    draw = ImageDraw.Draw(canvas)
    shown = matches[np.linspace(0, len(matches) - 1, min(len(matches), _MAX_LINES)).astype(int)]
    offset = np.array([sides[0][0].width + _GAP, 0.0])
    for n, (i, j) in enumerate(shown.tolist()):
        a = query[1].keypoints[i, :2] * sides[0][1]
        b = result[1].keypoints[j, :2] * sides[1][1] + offset
        hue = n / max(len(shown), 1)
        colour = tuple(round(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.9, 1.0))
        draw.line([tuple(a), tuple(b)], fill=colour, width=1)
        for x, y in (a, b):
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], outline=colour)
    buffer = io.BytesIO()
    canvas.save(buffer, format="JPEG", quality=82)
    return buffer.getvalue()


def _scaled(image: np.ndarray, features: LocalFeatures, height: int) -> tuple[Image.Image, float]:
    """The image at ``height`` and the factor from its features' frame to it."""
    picture = Image.fromarray(image).convert("RGB")
    factor = height / picture.height
    resized = picture.resize((max(1, round(picture.width * factor)), height))
    frame_width = features.size[0] or picture.width
    return resized, resized.width / frame_width
