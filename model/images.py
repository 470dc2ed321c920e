"""Reading photos, from a path or from bytes, where every failure is a value and not an exception.

One bad photo in a million must never stop a run: a missing file, a truncated JPEG (its header
reads fine, the decode fails), a decompression bomb, a file that is no image at all each come
back as a ``BadImage`` with its reason, which the caller counts and reports.

EXIF rotation is an explicit choice of every caller, never a default: photos from phones are
stored sideways with an orientation tag and must be turned upright (photo folders, ingest),
while the revisited Oxford/Paris protocol defines its query boxes in the stored pixel frame
and never rotates (cnnimageretrieval-pytorch and revisitop read pixels as stored).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_ID_CHARS",
    "MIN_SIDE",
    "BadImage",
    "ImageSource",
    "decode_image",
    "image_id",
    "open_image",
    "read_size",
]

MIN_SIDE = 16
"""Photos with a side under this many pixels are refused as too small (ingest, queries)."""
DEFAULT_MAX_PIXELS = 2 * 89_478_485
"""Photos with more pixels are refused as decompression bombs: PIL's own hard limit, above any
camera's resolution (a 200-megapixel phone photo passes)."""

IMAGE_ID_CHARS = 20
"""Hex characters of the SHA-256 of a photo's bytes kept as its ``image_id`` (80 bits)."""

_EXIF_ORIENTATION = 0x0112
_TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})

ImageSource = str | os.PathLike[str] | bytes
"""A local path or the encoded bytes of a photo."""


@dataclass(frozen=True)
class BadImage:
    """Why a photo cannot be used (a value, so that one bad photo never stops a run)."""

    reason: str


def image_id(data: bytes) -> str:
    """A photo's key: the first ``IMAGE_ID_CHARS`` hex characters of the SHA-256 of its bytes,
    so byte-identical photos at two URIs share it and every stage keys by it."""
    return hashlib.sha256(data).hexdigest()[:IMAGE_ID_CHARS]


_STREAM_REPR = re.compile(r" ?<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


def _name(source: ImageSource) -> str:
    return f"{len(source)} bytes" if isinstance(source, bytes) else str(source)


def _reason(err: BaseException) -> str:
    """PIL's message without the repr of our in-memory stream, which names nothing."""
    return _STREAM_REPR.sub("", str(err))


def _open(source: ImageSource) -> Image.Image:
    if isinstance(source, bytes):
        return Image.open(io.BytesIO(source))
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"no file at {path}")
    return Image.open(path)


def _oriented_size(img: Image.Image, exif_transpose: bool) -> tuple[int, int]:
    width, height = img.size
    if exif_transpose and img.getexif().get(_EXIF_ORIENTATION) in _TRANSPOSING_ORIENTATIONS:
        return height, width
    return width, height


def _bomb(width: int, height: int, max_pixels: int) -> BadImage | None:
    if width * height > max_pixels:
        return BadImage(
            f"decompression bomb: {width}x{height} = {width * height:,} pixels, more than "
            f"the limit of {max_pixels:,}"
        )
    return None


def read_size(
    source: ImageSource, *, exif_transpose: bool, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[int, int] | BadImage:
    """``(width, height)`` from the header alone (as rotated when ``exif_transpose``)."""
    try:
        with _open(source) as img:
            width, height = _oriented_size(img, exif_transpose)
    except FileNotFoundError as err:
        return BadImage(f"missing: {err}")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        return BadImage(f"not a readable image: {_reason(err)}")
    return _bomb(width, height, max_pixels) or (width, height)


def open_image(
    source: ImageSource,
    *,
    exif_transpose: bool,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft: tuple[int, int] | None = None,
) -> Image.Image | BadImage:
    """The decoded RGB photo, fully loaded, or why it cannot be had.

    ``draft`` lets a JPEG decode at a reduced scale of at least that size (thumbnails).
    """
    try:
        with _open(source) as img:
            bad = _bomb(*img.size, max_pixels)
            if bad is not None:
                return bad
            if draft is not None:
                img.draft("RGB", draft)
            img.load()  # a truncated file fails here, after its header read fine
            if exif_transpose:
                img = ImageOps.exif_transpose(img)
            return img.convert("RGB")
    except FileNotFoundError as err:
        return BadImage(f"missing: {err}")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        return BadImage(f"cannot decode {_name(source)}: {_reason(err)}")


def decode_image(
    source: ImageSource,
    *,
    exif_transpose: bool,
    crop: tuple[int, int, int, int] | None = None,
    size: tuple[int, int] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray | BadImage:
    """RGB ``uint8 [H, W, 3]``: decoded, optionally cropped (``(x1, y1, x2, y2)`` in the frame
    chosen by ``exif_transpose``) and resized bilinearly to ``size = (width, height)``."""
    img = open_image(source, exif_transpose=exif_transpose, max_pixels=max_pixels)
    if isinstance(img, BadImage):
        return img
    if crop is not None:
        img = img.crop(crop)
    if size is not None and img.size != tuple(size):
        img = img.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)
    return np.asarray(img)
