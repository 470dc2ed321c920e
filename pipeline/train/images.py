"""Training photos: decoded once per worker, then run through the network many at a time.

The reference code feeds one image at a time in fp32. Here the images of a step are grouped by
size (``model.extraction.size_grouped_batches``: photos kept at their aspect ratio share few
sizes) and each group is one batch, in bf16 autocast and channels-last on GPUs. With BatchNorm
frozen every image is computed on its own either way, so batching changes the speed, not the
descriptors (up to float rounding).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from PIL import Image

from model import tables
from model.describer import decode_photo
from model.extraction import size_grouped_batches

__all__ = [
    "PRECISIONS",
    "Precision",
    "TrainingPhotos",
    "decode_photos",
    "embed",
    "freeze_batchnorm",
    "photo_bytes",
    "resolve_precision",
]

PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class Precision:
    bf16: bool
    channels_last: bool
    batch_size: int
    """Images per forward pass."""


def resolve_precision(name: str, device: Any, batch_size: int | None = None) -> Precision:
    """``auto``: bf16 and channels-last on a GPU, fp32 on a CPU; ``fp32`` or ``bf16`` forced."""
    if name not in PRECISIONS:
        raise ValueError(f"precision {name!r}: use one of {', '.join(PRECISIONS)}")
    gpu = getattr(device, "type", str(device)) == "cuda"
    fast = name == "bf16" or (name == "auto" and gpu)
    return Precision(bf16=fast, channels_last=fast, batch_size=batch_size or (64 if gpu else 16))


class TrainingPhotos(Sequence[np.ndarray]):
    """A worker's photos at training size, held encoded and decoded when used.

    Every worker needs the whole pool (any photo can be a negative), so decoded pixels would
    cost ``N × H × W × 3`` bytes per worker (about 29 GB for 100,000 photos at 362 px); JPEG at
    quality 95 takes a tenth of that, and decoding one is a millisecond beside its forward and
    backward pass. Validation photos are held as PNG instead (lossless, about half the pixels'
    bytes), so that validation scores the very pixels extract describes.
    """

    def __init__(self, encoded: list[bytes], shapes: list[tuple[int, int]]) -> None:
        self._encoded = encoded
        self.shapes = shapes
        """``(height, width)`` of each photo, known without decoding it."""

    def __len__(self) -> int:
        return len(self._encoded)

    def subset(self, rows: Sequence[int]) -> TrainingPhotos:
        """The photos of ``rows``, in that order (the bytes shared, not copied)."""
        return TrainingPhotos([self._encoded[r] for r in rows], [self.shapes[r] for r in rows])

    def __getitem__(self, i: int) -> np.ndarray:  # type: ignore[override]
        with Image.open(io.BytesIO(self._encoded[i])) as img:
            return np.asarray(img.convert("RGB"))

    @property
    def nbytes(self) -> int:
        return sum(len(b) for b in self._encoded)


def decode_photos(
    images: str,
    image_ids: Sequence[str],
    max_size: int,
    *,
    square: bool = False,
    lossless: bool = False,
) -> TrainingPhotos:
    """The photos of ``images.parquet`` named by ``image_ids``, upright RGB, in that order: at
    most ``max_size`` a side (aspect kept; extract's decoding), or ``max_size`` × ``max_size``
    when ``square`` (CGD's fixed training size). ``lossless`` keeps them as PNG rather than
    JPEG: the pixels extract's ``decode_photo`` gives, exactly."""
    found: dict[str, bytes] = {}
    for image_id, raw in photo_bytes(images, image_ids):
        if image_id in found:
            continue
        photo = decode_photo(raw, 1 << 16 if square else max_size)
        if not isinstance(photo, np.ndarray):
            raise ValueError(f"photo {image_id} cannot be decoded: {photo}")
        found[image_id] = _encoded(photo, max_size, square=square, lossless=lossless)
    missing = [i for i in image_ids if i not in found]
    if missing:
        raise ValueError(f"{images} has no usable photo {missing[0]} ({len(missing)} missing)")
    encoded = [found[i] for i in image_ids]
    return TrainingPhotos(encoded, [_shape(b) for b in encoded])


def photo_bytes(images: str, image_ids: Sequence[str]) -> Iterator[tuple[str, bytes]]:
    """``(image_id, stored bytes)`` of the usable photos of the images output ``images`` among
    ``image_ids``, streamed a batch of rows at a time (never the whole collection at once)."""
    wanted = pa.array(sorted(set(image_ids)), pa.string())
    usable = pc.field("image_id").isin(wanted) & pc.field("error").is_null()
    dataset = tables.IMAGES.dataset(images)
    for batch in dataset.to_batches(columns=["image_id", "bytes"], filter=usable, batch_size=64):
        yield from zip(batch.column(0).to_pylist(), batch.column(1).to_pylist(), strict=True)


def _encoded(photo: np.ndarray, max_size: int, *, square: bool, lossless: bool) -> bytes:
    img = Image.fromarray(photo)
    if square:
        img = img.resize((max_size, max_size), Image.BILINEAR)
    buffer = io.BytesIO()
    if lossless:  # level 1: PNG's fast setting; size is nearly level 6's on photos
        img.save(buffer, format="PNG", compress_level=1)
    else:
        img.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _shape(encoded: bytes) -> tuple[int, int]:
    """``(height, width)`` of an encoded photo (its header only)."""
    with Image.open(io.BytesIO(encoded)) as img:
        return img.height, img.width


def freeze_batchnorm(net: Any) -> None:
    """BatchNorm layers to eval mode (running statistics kept), as the GeM reference trains."""
    for module in net.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()


def augment(x: Any, generator: Any) -> Any:
    """Random crop (60–100 % of the side, resized back), horizontal flip and brightness /
    contrast jitter (±20 %) of float images ``[B, 3, H, W]`` in 0..255, each image its own draw."""
    b, _, h, w = x.shape
    out = []
    for image in x:
        r = torch.rand(6, generator=generator).tolist()
        side = 0.6 + 0.4 * r[0]
        ch, cw = max(1, round(h * side)), max(1, round(w * side))
        top, left = int(r[1] * (h - ch + 1)), int(r[2] * (w - cw + 1))
        crop = image[:, top : top + ch, left : left + cw][None]
        crop = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)[0]
        if r[3] < 0.5:
            crop = crop.flip(-1)
        contrast, brightness = 0.8 + 0.4 * r[4], 0.8 + 0.4 * r[5]
        mean = crop.mean()
        out.append((((crop - mean) * contrast + mean) * brightness).clamp(0, 255))
    return torch.stack(out) if b else x


def embed(
    forward: Callable[[Any], Any],
    photos: Sequence[np.ndarray],
    mean_std: tuple[Any, Any],
    *,
    precision: Precision,
    device: Any,
    generator: Any = None,
) -> Any:
    """``forward`` (the network, or a wrapper returning a tuple) over ``photos`` (arrays, or
    ``TrainingPhotos`` decoded a batch at a time), batched by size; returns its output(s) for
    every photo in input order, float32, with gradients when they are enabled. ``generator``
    (a ``torch.Generator``) turns augmentation on."""
    if not len(photos):
        raise ValueError("embed needs at least one photo")
    mean, std = mean_std
    sizes = photos.shapes if isinstance(photos, TrainingPhotos) else [p.shape[:2] for p in photos]
    groups = size_grouped_batches(sizes, precision.batch_size)
    pieces: list[tuple[Any, ...]] = []
    for rows in groups:
        x = torch.from_numpy(np.stack([photos[r] for r in rows])).to(device)
        x = x.permute(0, 3, 1, 2).float()
        if generator is not None:
            x = augment(x, generator)
        x = (x - mean) / std
        if precision.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision.bf16):
            out = forward(x)
        pieces.append(tuple(o.float() for o in out) if isinstance(out, tuple) else (out.float(),))
    order = torch.as_tensor([r for rows in groups for r in rows], device=device)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order), device=device)
    outputs = tuple(torch.cat(parts)[inverse] for parts in zip(*pieces, strict=True))
    return outputs if len(outputs) > 1 else outputs[0]


def mean_std(net: Any, device: Any) -> tuple[Any, Any]:
    """The network's input normalisation on 0..255 pixels, as ``[1, 3, 1, 1]`` tensors."""
    mean = torch.tensor(net.mean, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(net.std, device=device).view(1, 3, 1, 1) * 255
    return mean, std
