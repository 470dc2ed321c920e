"""The details painted on a facade: windows, ornaments between them and shop signs."""

from __future__ import annotations

import cv2
import numpy as np

from model.datasets.landmarks.canvas import Canvas
from model.datasets.landmarks.style import Style, scaled_colour


def paint_window(
    canvas: Canvas,
    rng: np.random.Generator,
    style: Style,
    *,
    x: float,
    z: float,
    size: tuple[float, float],
) -> None:
    """One window centred at x, bottom at z, each with its own glass, curtain and reflection."""
    w, h = size
    frame = 0.09
    glass = scaled_colour(style.glass, rng.uniform(0.7, 1.35))
    if rng.random() < 0.12:  # lit
        glass = scaled_colour((235, 205, 130), rng.uniform(0.75, 1.0))
    canvas.rect(x0=x - w / 2 - 0.12, z0=z - 0.14, x1=x + w / 2 + 0.12, z1=z, rgb=style.trim)  # sill
    if style.window == "round":
        centre, radius = canvas.px(x, z + h / 2), round(w / 2 * canvas.ppm)
        cv2.circle(
            canvas.image,
            centre,
            radius + int(frame * canvas.ppm) + 1,
            scaled_colour(style.trim),
            -1,
            cv2.LINE_AA,
        )
        cv2.circle(canvas.image, centre, radius, glass, -1, cv2.LINE_AA)
    else:
        canvas.rect(
            x0=x - w / 2 - frame, z0=z, x1=x + w / 2 + frame, z1=z + h + frame, rgb=style.trim
        )
        canvas.rect(x0=x - w / 2, z0=z + frame, x1=x + w / 2, z1=z + h, rgb=glass)
        if style.window == "arched":
            axes = (
                round((w / 2 + frame) * canvas.ppm),
                round((w / 2 + frame) * canvas.ppm),
            )
            cv2.ellipse(
                canvas.image,
                canvas.px(x, z + h),
                axes,
                0,
                180,
                360,
                scaled_colour(style.trim),
                -1,
                cv2.LINE_AA,
            )
            inner = (round(w / 2 * canvas.ppm),) * 2
            cv2.ellipse(
                canvas.image, canvas.px(x, z + h), inner, 0, 180, 360, glass, -1, cv2.LINE_AA
            )
    if rng.random() < 0.35:  # curtain or blind
        drop = rng.uniform(0.2, 0.8) * h
        shade = scaled_colour(
            np.array(style.walls[rng.integers(len(style.walls))]), rng.uniform(0.5, 1.2)
        )
        canvas.rect(
            x0=x - w / 2 + 0.05, z0=z + h - drop, x1=x + w / 2 - 0.05, z1=z + h - 0.05, rgb=shade
        )
    if rng.random() < 0.4:  # sky reflection across the pane
        x0, z0 = x - w / 2 + rng.uniform(0, w / 2), z + rng.uniform(0.2, 0.6) * h
        corners = [(x0, z0), (x0 + w / 3, z0 + h / 3), (x0 + w / 3, z0 + h / 2)]
        pts = np.array([canvas.px(cx, cz) for cx, cz in corners], dtype=np.int32)
        cv2.fillConvexPoly(canvas.image, pts, scaled_colour(glass, 1.6), cv2.LINE_AA)
    if style.mullions and style.window != "round":
        thick = max(int(0.05 * canvas.ppm), 1)
        cv2.line(
            canvas.image, canvas.px(x, z), canvas.px(x, z + h), scaled_colour(style.trim), thick
        )
        cv2.line(
            canvas.image,
            canvas.px(x - w / 2, z + 0.6 * h),
            canvas.px(x + w / 2, z + 0.6 * h),
            scaled_colour(style.trim),
            thick,
        )


def paint_ornament(
    canvas: Canvas, rng: np.random.Generator, style: Style, *, x: float, z: float
) -> None:
    """A decoration between windows; its details vary so no two look the same."""
    ppm = canvas.ppm
    centre = canvas.px(x, z)
    colour = scaled_colour(style.accent, rng.uniform(0.8, 1.2))
    if style.ornament == "rosettes":
        radius = max(int(rng.uniform(0.2, 0.35) * ppm), 2)
        cv2.circle(canvas.image, centre, radius, colour, -1, cv2.LINE_AA)
        cv2.circle(
            canvas.image, centre, max(radius // 2, 1), scaled_colour(style.trim), -1, cv2.LINE_AA
        )
        for angle in np.linspace(0, 2 * np.pi, int(rng.integers(4, 9)), endpoint=False):
            tip = (
                int(centre[0] + 1.6 * radius * np.cos(angle)),
                int(centre[1] + 1.6 * radius * np.sin(angle)),
            )
            cv2.line(canvas.image, centre, tip, colour, max(radius // 3, 1), cv2.LINE_AA)
    elif style.ornament == "diamonds":
        r = max(rng.uniform(0.2, 0.4) * ppm, 2.0)
        pts = np.array([[0, -r], [r, 0], [0, r], [-r, 0]]) * [rng.uniform(0.6, 1.0), 1.0] + centre
        cv2.fillConvexPoly(canvas.image, pts.astype(np.int32), colour, cv2.LINE_AA)
        cv2.circle(
            canvas.image, centre, max(int(r / 3), 1), scaled_colour(style.trim), -1, cv2.LINE_AA
        )
    elif style.ornament == "medallions":
        radius = max(int(rng.uniform(0.25, 0.4) * ppm), 2)
        cv2.circle(canvas.image, centre, radius, scaled_colour(style.trim), -1, cv2.LINE_AA)
        cv2.circle(canvas.image, centre, radius, colour, max(radius // 4, 1), cv2.LINE_AA)
        angle = rng.uniform(0, np.pi)
        tip = (int(centre[0] + radius * np.cos(angle)), int(centre[1] + radius * np.sin(angle)))
        cv2.line(canvas.image, centre, tip, colour, max(radius // 5, 1), cv2.LINE_AA)
    else:  # pilasters: a capital on a shaft down to the ground
        half = rng.uniform(0.18, 0.3)
        canvas.rect(
            x0=x - half,
            z0=0,
            x1=x + half,
            z1=z,
            rgb=scaled_colour(style.trim, rng.uniform(0.85, 1.0)),
        )
        canvas.rect(x0=x - half - 0.12, z0=z - 0.3, x1=x + half + 0.12, z1=z, rgb=colour)


def _random_word(rng: np.random.Generator) -> str:
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    return "".join(letters[i] for i in rng.integers(0, len(letters), size=int(rng.integers(3, 9))))


def paint_sign(
    canvas: Canvas, rng: np.random.Generator, style: Style, *, x: float, z: float
) -> None:
    """A shop sign with random lettering: strong, unique corners for feature matching."""
    text = _random_word(rng)
    scale = rng.uniform(0.35, 0.55) * canvas.ppm / 22.0  # Hershey letters are 22 units tall
    thickness = max(round(scale * 2), 1)
    (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    fit = min(1.0, (style.bay_m - 0.6) * canvas.ppm / tw)  # no wider than a bay
    scale, tw, th = scale * fit, int(tw * fit), int(th * fit)
    width_m, height_m = tw / canvas.ppm + 0.4, th / canvas.ppm + 0.3
    board = scaled_colour(style.accent, rng.uniform(0.6, 1.1))
    canvas.rect(x0=x - width_m / 2, z0=z, x1=x + width_m / 2, z1=z + height_m, rgb=board)
    ink = (245.0, 245.0, 240.0) if sum(board) < 380 else (25.0, 25.0, 30.0)
    origin = canvas.px(x - width_m / 2 + 0.2, z + 0.15)
    cv2.putText(
        canvas.image, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, ink, thickness, cv2.LINE_AA
    )
