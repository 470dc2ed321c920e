"""Batched, multi-scale descriptor extraction.

Images of one size are batched together (padding would change what GeM pools), decoding runs in
DataLoader workers off the GPU's critical path, the network runs channels-last, and on a GPU
under bf16 autocast. Scales are combined as in the GeM paper: the power mean, with the head's
exponent, of the per-scale descriptors, then L2. One forward of the trunk can feed several
heads at once, so comparing poolings costs one pass over the images.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

__all__ = [
    "DEFAULT_SCALES",
    "ArrayImages",
    "ExtractOptions",
    "ImageFiles",
    "extract_descriptors",
    "extract_multihead",
    "resized_size",
    "size_grouped_batches",
]

logger = logging.getLogger(__name__)

DEFAULT_SCALES = (1.0, 1.0 / math.sqrt(2.0), 0.5)
_EXIF_ORIENTATION = 0x0112
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}


@dataclass(frozen=True)
class ExtractOptions:
    """How to run the network; ``None`` means the best choice for the device."""

    scales: tuple[float, ...] = (1.0,)
    batch_size: int | None = None  # 64 on CUDA; 1 on a CPU, where big batches spill the caches
    num_workers: int = 0
    device: str | None = None  # "cuda" when available, else "cpu"
    bf16: bool | None = None  # autocast to bf16: default on CUDA only
    channels_last: bool = True  # faster on CUDA tensor cores and on CPU oneDNN kernels alike
    progress: bool = True

    def batch_size_for(self, device: torch.device) -> int:
        if self.batch_size is not None:
            return self.batch_size
        return 64 if device.type == "cuda" else 1


def resized_size(width: int, height: int, max_size: int | None) -> tuple[int, int]:
    """Scale so the longer side is ``max_size``, never enlarging; returns ``(width, height)``."""
    if max_size is None or max(width, height) <= max_size:
        return width, height
    factor = max_size / max(width, height)
    return max(1, round(width * factor)), max(1, round(height * factor))


class ImageFiles(Dataset):
    """Photos decoded on demand: EXIF-rotated RGB, longer side at most ``max_size``.

    ``boxes`` (one ``(x1, y1, x2, y2)`` or ``None`` per photo, in the photo's own pixels) crop
    queries as the revisited protocol does: the crop is scaled by the factor that would bring
    the *whole* photo to ``max_size``, so a query is seen at the scale of the database.
    Sizes come from the headers alone, so batches are grouped by size before decoding.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        max_size: int | None = None,
        boxes: Sequence[Sequence[float] | None] | None = None,
    ) -> None:
        self.paths = [Path(p) for p in paths]
        if boxes is not None and len(boxes) != len(self.paths):
            raise ValueError(f"{len(boxes)} boxes for {len(self.paths)} images")
        self.boxes = list(boxes) if boxes is not None else [None] * len(self.paths)
        self.max_size = max_size
        self._crops = [
            self._crop_and_size(p, b) for p, b in zip(self.paths, self.boxes, strict=True)
        ]
        self.sizes = [size for _, size in self._crops]

    def _crop_and_size(
        self, path: Path, box: Sequence[float] | None
    ) -> tuple[tuple[int, int, int, int] | None, tuple[int, int]]:
        """The integer crop in photo pixels and the ``(height, width)`` the network sees."""
        try:
            with Image.open(path) as img:
                width, height = img.size
                if img.getexif().get(_EXIF_ORIENTATION) in _TRANSPOSING_ORIENTATIONS:
                    width, height = height, width
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read image {path}: {err}") from err
        new_w, _ = resized_size(width, height, self.max_size)
        factor = new_w / width
        if box is None:
            return None, (max(1, round(height * factor)), new_w)
        x1, y1, x2, y2 = (float(v) for v in box)
        if not (0 <= x1 < x2 <= width + 0.5 and 0 <= y1 < y2 <= height + 0.5):
            raise ValueError(
                f"box {list(box)} lies outside {path} ({width}x{height} pixels) or is empty"
            )
        crop = (int(x1), int(y1), min(width, int(np.ceil(x2))), min(height, int(np.ceil(y2))))
        crop_w, crop_h = crop[2] - crop[0], crop[3] - crop[1]
        return crop, (max(1, round(crop_h * factor)), max(1, round(crop_w * factor)))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        path = self.paths[index]
        try:
            with Image.open(path) as img:
                img = ImageOps.exif_transpose(img).convert("RGB")
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot decode image {path}: {err}") from err
        crop, (h, w) = self._crops[index]
        if crop is not None:
            img = img.crop(crop)
        if img.size != (w, h):
            img = img.resize((w, h), Image.Resampling.BILINEAR, reducing_gap=3.0)
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


class ArrayImages(Dataset):
    """Images already in memory: ``uint8`` arrays ``[H, W, 3]`` (RGB)."""

    def __init__(self, images: Sequence[np.ndarray]) -> None:
        for i, img in enumerate(images):
            if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
                raise ValueError(
                    f"image {i} must be a uint8 [H, W, 3] array, got {img.dtype} {img.shape}"
                )
        self.images = images
        self.sizes = [img.shape[:2] for img in images]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        # np.require copies only arrays torch cannot share (read-only or strided).
        image = np.require(self.images[index], requirements=["C_CONTIGUOUS", "WRITEABLE"])
        return torch.from_numpy(image).permute(2, 0, 1)


def size_grouped_batches(sizes: Sequence[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of one image size each, largest sizes first."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for index, size in enumerate(sizes):
        groups[tuple(size)].append(index)
    batches = []
    for size in sorted(groups, key=lambda s: (-s[0] * s[1], s)):
        members = groups[size]
        batches.extend(members[i : i + batch_size] for i in range(0, len(members), batch_size))
    return batches


@torch.no_grad()
def extract_multihead(
    backbone: nn.Module,
    heads: Mapping[str, nn.Module],
    images: ImageFiles | ArrayImages,
    options: ExtractOptions = ExtractOptions(),
) -> dict[str, np.ndarray]:
    """Descriptors ``[N, D]`` (float32, L2-normalised, input order) for each head.

    The trunk runs once per batch and scale; each head pools the same feature maps.
    """
    if not heads:
        raise ValueError("extract_multihead needs at least one head")
    _check_scales(options.scales)
    device = torch.device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_cuda = device.type == "cuda"
    bf16 = on_cuda if options.bf16 is None else options.bf16
    memory_format = torch.channels_last if options.channels_last else torch.contiguous_format

    modules = nn.ModuleDict({"backbone": backbone, **heads}).to(device, memory_format=memory_format)
    modules.eval()
    mean = torch.tensor(backbone.mean, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(backbone.std, device=device).view(1, 3, 1, 1) * 255
    exponents = {name: head.scale_exponent for name, head in heads.items()}

    loader = DataLoader(
        images,
        batch_sampler=size_grouped_batches(images.sizes, options.batch_size_for(device)),
        num_workers=options.num_workers,
        pin_memory=on_cuda,
        collate_fn=torch.stack,
    )
    out: dict[str, np.ndarray] = {}
    order = [i for batch in loader.batch_sampler for i in batch]
    done = 0
    bar = tqdm(total=len(images), desc="extract", unit="img", disable=not options.progress)
    for batch in loader:
        x = batch.to(device, non_blocking=True).float().sub_(mean).div_(std)
        x = x.contiguous(memory_format=memory_format)
        summed = {name: 0.0 for name in heads}
        for scale in options.scales:
            xs = x if scale == 1.0 else F.interpolate(x, scale_factor=scale, mode="bilinear")
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                fmap = backbone(xs)
                for name, head in heads.items():
                    summed[name] = summed[name] + _power(head(fmap).float(), exponents[name])
        for name, total in summed.items():
            combined = _power_mean(total / len(options.scales), exponents[name])
            rows = F.normalize(combined, dim=1).cpu().numpy().astype(np.float32)
            if name not in out:
                out[name] = np.empty((len(images), rows.shape[1]), dtype=np.float32)
            out[name][order[done : done + len(rows)]] = rows
        done += len(batch)
        bar.update(len(batch))
    bar.close()
    for name, rows in out.items():
        if not np.isfinite(rows).all():
            raise FloatingPointError(f"head {name!r} produced non-finite descriptors")
    return out


def extract_descriptors(
    net: nn.Module,
    images: ImageFiles | ArrayImages,
    options: ExtractOptions = ExtractOptions(),
) -> np.ndarray:
    """Descriptors of one ``RetrievalNet`` (a ``backbone`` and a ``head``), ``[N, D]`` float32."""
    return extract_multihead(net.backbone, {"descriptor": net.head}, images, options)["descriptor"]


def _power(x: torch.Tensor, exponent: float) -> torch.Tensor:
    """``x ** exponent``; GeM descriptors are non-negative, the clamp guards rounding."""
    return x if exponent == 1.0 else x.clamp(min=0).pow(exponent)


def _power_mean(mean_of_powers: torch.Tensor, exponent: float) -> torch.Tensor:
    return mean_of_powers if exponent == 1.0 else mean_of_powers.pow(1.0 / exponent)


def _check_scales(scales: Sequence[float]) -> None:
    if not scales or any(not (0 < s <= 4) for s in scales):
        raise ValueError(f"scales must be a non-empty list of factors in (0, 4], got {scales}")
