"""Batched, multi-scale descriptor extraction, with bad photos reported and never fatal.

Two layers:

- ``describe_batch`` is the per-batch core: a ``uint8 [B, H, W, 3]`` batch of one size in,
  L2-normalised descriptors per head out (normalise, scales, trunk, heads, power mean, L2). It
  is all a Ray Data actor needs, given batches decoded elsewhere (``model.images``).
- ``extract_multihead`` runs it over a data set: images of one size batched together (padding
  would change what GeM pools), decoding in DataLoader workers off the GPU's critical path,
  the network channels-last and, on a GPU, under bf16 autocast. A photo that cannot be
  described (unreadable, truncated, too small for the network, a non-finite descriptor) is
  named in the log when it is found and returned in ``Extraction.failed`` with its reason.

Scales are combined as in the GeM paper: the power mean, with the head's exponent, of the
per-scale descriptors, then L2. One trunk pass can feed several heads, so comparing poolings
costs one pass over the images.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from model.images import DEFAULT_MAX_PIXELS, BadImage, decode_image, read_size

if TYPE_CHECKING:
    from model.heads import Head
    from model.networks import RetrievalNet

__all__ = [
    "DEFAULT_SCALES",
    "ArrayImages",
    "ExtractOptions",
    "Extraction",
    "ImageError",
    "ImageFiles",
    "describe_batch",
    "extract_descriptors",
    "extract_multihead",
    "resized_size",
    "scaled_size",
    "size_grouped_batches",
    "too_small",
]

logger = logging.getLogger(__name__)

DEFAULT_SCALES = (1.0, 1.0 / math.sqrt(2.0), 0.5)


class ImageError(ValueError):
    """Photos that could not be described, each with its reason (``failed``: index → reason)."""

    def __init__(self, failed: Mapping[int, str]) -> None:
        self.failed = dict(failed)
        first = next(iter(self.failed.items()), (None, ""))
        super().__init__(
            f"{len(self.failed)} image(s) could not be described; first, #{first[0]}: {first[1]}"
        )


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

    def resolved_device(self) -> torch.device:
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def resolved_bf16(self) -> bool:
        return self.resolved_device().type == "cuda" if self.bf16 is None else self.bf16

    def batch_size_for(self, device: torch.device) -> int:
        if self.batch_size is not None:
            return self.batch_size
        return 64 if device.type == "cuda" else 1

    def identity(self) -> dict[str, object]:
        """What changes the descriptors (not only the speed): for cache keys and manifests."""
        return {
            "scales": list(self.scales),
            "device": self.resolved_device().type,
            "bf16": self.resolved_bf16(),
        }


@dataclass(frozen=True)
class Extraction:
    """Descriptors of the images that could be described, and why the others could not.

    ``descriptors[head]`` is ``[len(indices), D]`` float32, L2-normalised, a row per entry of
    ``indices`` (ascending input indices); ``failed`` maps every other input index to its reason.
    """

    descriptors: dict[str, np.ndarray]
    indices: np.ndarray
    failed: dict[int, str] = field(default_factory=dict)


def resized_size(width: int, height: int, max_size: int | None) -> tuple[int, int]:
    """Scale so the longer side is ``max_size``, never enlarging; returns ``(width, height)``."""
    if max_size is None or max(width, height) <= max_size:
        return width, height
    factor = max_size / max(width, height)
    return max(1, round(width * factor)), max(1, round(height * factor))


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """``(height, width)`` of an image resized by ``scale``, as multi-scale extraction sees it:
    rounded down as ``F.interpolate`` does, but never below one pixel."""
    return max(1, math.floor(height * scale)), max(1, math.floor(width * scale))


class ImageFiles(Dataset):
    """Photos on disk, decoded on demand, longer side at most ``max_size``.

    ``exif_transpose`` is the caller's explicit choice (see ``model.images``). ``boxes`` (one
    ``(x1, y1, x2, y2)`` or ``None`` per photo, in that same frame) crop queries as the
    revisited protocol does: the crop is scaled by the factor that would bring the *whole*
    photo to ``max_size``, so a query is seen at the scale of the database.

    Sizes come from the headers alone, so batches are grouped by size before decoding. A photo
    whose header cannot be read, or whose box lies outside it, is in ``failed`` (index →
    reason) from the start; one that fails to decode later is reported by the extractor.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        max_size: int | None = None,
        boxes: Sequence[Sequence[float] | None] | None = None,
        *,
        exif_transpose: bool,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.paths = [Path(p) for p in paths]
        if boxes is not None and len(boxes) != len(self.paths):
            raise ValueError(f"{len(boxes)} boxes for {len(self.paths)} images")
        self.boxes = list(boxes) if boxes is not None else [None] * len(self.paths)
        self.max_size = max_size
        self.exif_transpose = exif_transpose
        self.max_pixels = max_pixels
        self.failed: dict[int, str] = {}
        self._crops: list[tuple[int, int, int, int] | None] = []
        self.sizes: list[tuple[int, int]] = []
        for index, (path, box) in enumerate(zip(self.paths, self.boxes, strict=True)):
            plan = self._plan(path, box)
            if isinstance(plan, BadImage):
                self.failed[index] = f"{path}: {plan.reason}"
                logger.warning("skipping %s", self.failed[index])
                plan = (None, (0, 0))
            self._crops.append(plan[0])
            self.sizes.append(plan[1])

    def _plan(
        self, path: Path, box: Sequence[float] | None
    ) -> tuple[tuple[int, int, int, int] | None, tuple[int, int]] | BadImage:
        """The integer crop in photo pixels and the ``(height, width)`` the network sees."""
        size = read_size(path, exif_transpose=self.exif_transpose, max_pixels=self.max_pixels)
        if isinstance(size, BadImage):
            return size
        width, height = size
        new_w, _ = resized_size(width, height, self.max_size)
        factor = new_w / width
        if box is None:
            return None, (max(1, round(height * factor)), new_w)
        x1, y1, x2, y2 = (float(v) for v in box)
        if not (0 <= x1 < x2 <= width + 0.5 and 0 <= y1 < y2 <= height + 0.5):
            return BadImage(
                f"box {list(box)} lies outside the photo ({width}x{height}) or is empty"
            )
        crop = (int(x1), int(y1), min(width, math.ceil(x2)), min(height, math.ceil(y2)))
        crop_w, crop_h = crop[2] - crop[0], crop[3] - crop[1]
        return crop, (max(1, round(crop_h * factor)), max(1, round(crop_w * factor)))

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices: Sequence[int]) -> ImageFiles:
        """The photos at ``indices``, in that order, without reading their headers again."""
        part = ImageFiles.__new__(ImageFiles)
        part.paths = [self.paths[i] for i in indices]
        part.boxes = [self.boxes[i] for i in indices]
        part.max_size, part.exif_transpose = self.max_size, self.exif_transpose
        part.max_pixels = self.max_pixels
        part._crops = [self._crops[i] for i in indices]
        part.sizes = [self.sizes[i] for i in indices]
        part.failed = {j: self.failed[i] for j, i in enumerate(indices) if i in self.failed}
        return part

    def __getitem__(self, index: int) -> tuple[int, np.ndarray | BadImage]:
        if index in self.failed:
            return index, BadImage(self.failed[index])
        h, w = self.sizes[index]
        image = decode_image(
            self.paths[index],
            exif_transpose=self.exif_transpose,
            crop=self._crops[index],
            size=(w, h),
            max_pixels=self.max_pixels,
        )
        if isinstance(image, BadImage):
            return index, BadImage(f"{self.paths[index]}: {image.reason}")
        return index, image


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
        self.failed: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[int, np.ndarray]:
        return index, self.images[index]


def size_grouped_batches(sizes: Sequence[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of one image size each, largest sizes first."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for index, size in enumerate(sizes):
        groups[tuple(size)].append(index)
    batches: list[list[int]] = []
    for key in sorted(groups, key=lambda s: (-s[0] * s[1], s)):
        members = groups[key]
        batches.extend(members[i : i + batch_size] for i in range(0, len(members), batch_size))
    return batches


@torch.no_grad()
def describe_batch(
    backbone: nn.Module,
    heads: Mapping[str, Head],
    images: np.ndarray | torch.Tensor,
    *,
    scales: Sequence[float] = (1.0,),
    bf16: bool = False,
    channels_last: bool = True,
    device: torch.device | None = None,
) -> dict[str, np.ndarray]:
    """Descriptors ``{head: float32 [B, D]}`` of one batch of RGB ``uint8 [B, H, W, 3]`` images.

    The modules must already be on ``device`` (default: the backbone's) and in eval mode.
    Rows are L2-normalised; a row that came out non-finite stays so, for the caller to report
    with the image's name (``np.isfinite(rows).all(axis=1)``).
    """
    batch = torch.as_tensor(images)
    if batch.dim() != 4 or batch.shape[-1] != 3 or batch.dtype != torch.uint8:
        raise ValueError(
            f"describe_batch takes uint8 [B, H, W, 3] images, got {batch.dtype} "
            f"{tuple(batch.shape)}"
        )
    _check_scales(scales)
    device = device or next(backbone.parameters()).device
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    mean = torch.tensor(backbone.mean, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(backbone.std, device=device).view(1, 3, 1, 1) * 255
    x = batch.to(device, non_blocking=True).permute(0, 3, 1, 2).float().sub_(mean).div_(std)
    x = x.contiguous(memory_format=memory_format)
    exponents = {name: head.scale_exponent for name, head in heads.items()}
    summed: dict[str, torch.Tensor | float] = {name: 0.0 for name in heads}
    for scale in scales:
        xs = _rescale(x, scale)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            fmap = backbone(xs)
            for name, head in heads.items():
                summed[name] = summed[name] + _power(head(fmap).float(), exponents[name])
    out = {}
    for name, total in summed.items():
        total = cast(torch.Tensor, total)  # a tensor: there is at least one scale (checked)
        combined = _power_mean(total / len(scales), exponents[name])
        out[name] = F.normalize(combined, dim=1).cpu().numpy().astype(np.float32)
    return out


def extract_multihead(
    backbone: nn.Module,
    heads: Mapping[str, Head],
    images: ImageFiles | ArrayImages,
    *,
    options: ExtractOptions = ExtractOptions(),
) -> Extraction:
    """Descriptors of every image that can be described, for each head, and the failures.

    The trunk runs once per batch and scale; each head pools the same feature maps. Photos
    too small for the trunk at the smallest scale (``backbone.min_input_size``) are failures
    found before any work, like unreadable headers and bad boxes.
    """
    if not heads:
        raise ValueError("extract_multihead needs at least one head")
    _check_scales(options.scales)
    device = options.resolved_device()
    memory_format = torch.channels_last if options.channels_last else torch.contiguous_format
    modules = nn.ModuleDict({"backbone": backbone, **heads})
    # torch's overloads of Module.to lack (device, memory_format=...), which it takes.
    modules = modules.to(device, memory_format=memory_format)  # type: ignore[call-overload]
    modules.eval()

    failed = dict(images.failed)
    failed.update(too_small(images, backbone, options.scales))
    todo = [i for i in range(len(images)) if i not in failed]
    batches = size_grouped_batches([images.sizes[i] for i in todo], options.batch_size_for(device))
    loader = DataLoader(
        images,
        batch_sampler=[[todo[i] for i in batch] for batch in batches],
        num_workers=options.num_workers,
        pin_memory=device.type == "cuda",
        collate_fn=_collate,
    )
    rows = {name: np.zeros((len(images), head.out_dim), np.float32) for name, head in heads.items()}
    bar = tqdm(total=len(todo), desc="extract", unit="img", disable=not options.progress)
    for indices, batch, bad in loader:
        for index, reason in bad.items():
            failed[index] = reason
            logger.warning("skipping %s", reason)
        if batch is not None:
            out = describe_batch(
                backbone,
                heads,
                batch,
                scales=options.scales,
                bf16=options.resolved_bf16(),
                channels_last=options.channels_last,
                device=device,
            )
            finite = np.logical_and.reduce([np.isfinite(v).all(axis=1) for v in out.values()])
            for row, index in enumerate(indices):
                if not finite[row]:
                    failed[index] = f"{_image_name(images, index)}: non-finite descriptor"
                    logger.warning("skipping %s", failed[index])
                    continue
                for name, vectors in out.items():
                    rows[name][index] = vectors[row]
        bar.update(len(indices) + len(bad))
    bar.close()
    described = np.array(sorted(set(range(len(images))) - set(failed)), dtype=np.int64)
    descriptors = {name: vectors[described] for name, vectors in rows.items()}
    return Extraction(descriptors, described, dict(sorted(failed.items())))


def extract_descriptors(
    net: RetrievalNet,
    images: ImageFiles | ArrayImages,
    options: ExtractOptions = ExtractOptions(),
) -> np.ndarray:
    """Descriptors ``[N, D]`` float32 of one ``RetrievalNet``, a row per image in input order.

    Strict: raises ``ImageError`` naming the images that could not be described. Use
    ``extract_multihead`` to describe the others and report those.
    """
    result = extract_multihead(net.backbone, {"descriptor": net.head}, images, options=options)
    if result.failed:
        raise ImageError(result.failed)
    return result.descriptors["descriptor"]


def _collate(
    items: list[tuple[int, np.ndarray | BadImage]],
) -> tuple[list[int], torch.Tensor | None, dict[int, str]]:
    """A batch of one size: the indices described, their stacked pixels, the failures."""
    good = [(i, img) for i, img in items if not isinstance(img, BadImage)]
    bad = {i: img.reason for i, img in items if isinstance(img, BadImage)}
    sizes = {img.shape for _, img in good}
    if len(sizes) > 1:  # a decoder disagreeing with the header: keep the majority size
        keep = max(sizes, key=lambda s: sum(img.shape == s for _, img in good))
        bad.update(
            {
                i: f"#{i}: decoded size {img.shape} differs from its header's"
                for i, img in good
                if img.shape != keep
            }
        )
        good = [(i, img) for i, img in good if img.shape == keep]
    if not good:
        return [], None, bad
    pixels = torch.from_numpy(np.stack([np.asarray(img) for _, img in good]))
    return [i for i, _ in good], pixels, bad


def too_small(
    images: ImageFiles | ArrayImages, backbone: nn.Module, scales: Sequence[float]
) -> dict[int, str]:
    """Photos (index → reason) that the trunk cannot take at the smallest scale: a check of
    the headers' sizes against ``backbone.min_input_size``, made before any photo is decoded."""
    need = int(getattr(backbone, "min_input_size", 1))
    smallest = min(scales)
    out = {}
    for index, (h, w) in enumerate(images.sizes):
        if index in images.failed:
            continue
        sh, sw = scaled_size(h, w, smallest)
        if min(sh, sw) < need:
            name = getattr(backbone, "name", type(backbone).__name__)
            out[index] = (
                f"{_image_name(images, index)}: too small for {name}: {w}x{h} pixels is "
                f"{sw}x{sh} at scale {smallest:g}, and the network needs {need} a side"
            )
            logger.warning("skipping %s", out[index])
    return out


def _image_name(images: ImageFiles | ArrayImages, index: int) -> str:
    return str(images.paths[index]) if isinstance(images, ImageFiles) else f"image #{index}"


def _rescale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` resized by ``scale`` (the reference code's ``scale_factor`` interpolation), with
    an explicit size where a side would round down to nothing."""
    if scale == 1.0:
        return x
    h, w = x.shape[-2:]
    if math.floor(h * scale) >= 1 and math.floor(w * scale) >= 1:
        return F.interpolate(x, scale_factor=scale, mode="bilinear")
    return F.interpolate(x, size=scaled_size(h, w, scale), mode="bilinear")


def _power(x: torch.Tensor, exponent: float) -> torch.Tensor:
    """``x ** exponent``; GeM descriptors are non-negative, the clamp guards rounding."""
    return x if exponent == 1.0 else x.clamp(min=0).pow(exponent)


def _power_mean(mean_of_powers: torch.Tensor, exponent: float) -> torch.Tensor:
    return mean_of_powers if exponent == 1.0 else mean_of_powers.pow(1.0 / exponent)


def _check_scales(scales: Sequence[float]) -> None:
    if not scales or any(not (0 < s <= 4) for s in scales):
        raise ValueError(f"scales must be a non-empty list of factors in (0, 4], got {scales}")
