"""The network that describes photos, and describing them: the extract stage's core.

``NetworkSettings`` names a network and how it sees a photo (weights or checkpoint, backbone,
pooling, longer side, scales); ``load_extract_network`` loads it with its learned whitening
when a checkpoint has one (``model.checkpoint``), ``network_identity`` names it for a
fingerprint; ``decode_photo`` turns a
photo's bytes into the pixels it sees; ``Describer`` holds the network once and describes
batches of decoded photos (``model.extraction.describe_batch``: batched by size, channels-last,
bf16 autocast on a GPU). The extract stage (``pipeline.extract``) runs ``Describer`` as a Ray
Data actor; the serving embedder (``cluster.embedder``) builds the same one from an index's
manifest (``NetworkSettings.from_manifest``), so a stored photo sent as a query gets its
stored descriptor back; training and whitening load their networks the same way.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from model import checkpoint, storage
from model.backbones import BackboneName
from model.extraction import ExtractOptions, describe_batch, resized_size, size_grouped_batches
from model.images import BadImage, decode_image, read_size
from model.networks import NetworkMeta, build_network
from model.pooling import PoolingName
from model.settings import raise_problems
from model.whitening import apply_whitening

__all__ = [
    "Describer",
    "NetworkSettings",
    "decode_photo",
    "load_extract_network",
    "network_identity",
]

logger = logging.getLogger(__name__)

PACKAGED_WEIGHTS = frozenset({"imagenet"})
"""Weights named rather than stored: the backbone's packaged ImageNet ones."""


@dataclass(frozen=True)
class NetworkSettings:
    """A network and how it sees a photo: what made a set of descriptors."""

    weights: str = "imagenet"
    """imagenet (the backbone's packaged ImageNet weights), a weights file, or a training
    checkpoint directory (model.pt + meta.json, and whitening.npz when it has one)."""
    backbone: BackboneName = "efficientnet_lite0"
    pooling: PoolingName = "gem"
    p: float = 3.0
    max_size: int = 1024
    """Longer side the network sees (never enlarged)."""
    scales: tuple[float, ...] = (1.0,)
    """1 0.7071 0.5 for the GeM paper's multi-scale descriptors."""

    def __post_init__(self) -> None:
        problems = []
        if self.max_size < 1:
            problems.append(f"--max-size must be at least 1, not {self.max_size}")
        if not self.scales or any(not 0 < s <= 4 for s in self.scales):
            problems.append(f"--scales must be factors in (0, 4], not {list(self.scales)}")
        if not self.p > 0:
            problems.append(f"--p must be positive, not {self.p}")
        raise_problems(problems)

    @classmethod
    def from_manifest(cls, network: dict[str, Any], settings: dict[str, Any]) -> NetworkSettings:
        """The settings that made descriptors, from their manifest's ``network`` and
        ``settings`` (what the serving embedder needs to describe a query the same way)."""
        meta = network.get("meta") or {}
        weights = network.get("checkpoint") or network.get("weights")
        if not weights:
            raise ValueError(f"the manifest names no network weights: {network}")
        return cls(
            weights=str(weights),
            backbone=meta.get("backbone", "efficientnet_lite0"),
            pooling=meta.get("pooling", "gem"),
            p=float(meta.get("p", 3.0)),
            max_size=int(settings.get("max_size", 1024)),
            scales=tuple(float(s) for s in settings.get("scales", (1.0,))),
        )


def decode_photo(raw: bytes, max_size: int) -> np.ndarray | BadImage:
    """One photo's bytes → upright RGB ``uint8`` at most ``max_size`` a side, or why not."""
    size = read_size(raw, exif_transpose=True)
    if isinstance(size, BadImage):
        return size
    return decode_image(raw, exif_transpose=True, size=resized_size(*size, max_size))


class Describer:
    """A Ray Data actor: the network loaded once, batches of decoded photos in, descriptors out."""

    def __init__(
        self,
        settings: NetworkSettings,
        device_batch_size: int | None = None,
        threads_per_actor: int | None = None,
    ) -> None:
        """``device_batch_size``: images per forward pass (default 64 on a GPU, 1 on a CPU);
        ``threads_per_actor``: torch threads on a CPU (default every core of the machine)."""

        self.settings = settings
        self.net, self.whitening = load_extract_network(settings)
        self.options = ExtractOptions(
            scales=tuple(settings.scales), batch_size=device_batch_size, progress=False
        )
        self.device = self.options.resolved_device()
        if self.device.type == "cpu":  # Ray gives an actor one thread; the network wants more
            torch.set_num_threads(threads_per_actor or os.cpu_count() or 1)
        self.dim = self.whitening[1].shape[0] if self.whitening is not None else self.net.out_dim
        memory_format = torch.channels_last if self.options.channels_last else None
        self.net.to(self.device, memory_format=memory_format).eval()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        ids, pixels = [str(i) for i in batch["image_id"]], list(batch["pixels"])
        # An all-None column may reach us as floats (NaN): only strings are reasons.
        errors = [e if isinstance(e, str) else None for e in batch["error"]]
        good = [i for i, error in enumerate(errors) if error is None]
        vectors: list[np.ndarray | None] = [None] * len(ids)
        for row, vector in zip(good, self.describe([pixels[i] for i in good]), strict=True):
            if vector is None:
                errors[row] = f"{ids[row]}: non-finite descriptor"
                logger.warning("skipping %s", errors[row])
            vectors[row] = vector
        return _descriptor_table(ids, vectors, errors, dim=self.dim)

    def describe(self, pixels: list[np.ndarray]) -> list[np.ndarray | None]:
        """Descriptors (float32 ``[dim]``, whitened when the network has it) of decoded photos;
        ``None`` for one whose descriptor is not finite."""

        vectors: list[np.ndarray | None] = [None] * len(pixels)
        sizes = [image.shape[:2] for image in pixels]
        for rows in size_grouped_batches(sizes, self.options.batch_size_for(self.device)):
            out = describe_batch(
                self.net.backbone,
                {"descriptor": self.net.head},
                np.stack([pixels[i] for i in rows]),
                scales=self.options.scales,
                bf16=self.options.resolved_bf16(),
                channels_last=self.options.channels_last,
                device=self.device,
            )["descriptor"]
            if self.whitening is not None:
                out = apply_whitening(out, *self.whitening)
            for row, vector in zip(rows, out, strict=True):
                if np.isfinite(vector).all():
                    vectors[row] = vector.astype(np.float32)
        return vectors


def _descriptor_table(
    ids: list[str], vectors: list[np.ndarray | None], errors: list[str | None], *, dim: int
) -> Any:
    """``image_id``, ``vector`` (fixed-size float32 list, null where it failed) and ``error``."""

    flat = np.zeros((len(ids), dim), np.float32)
    for row, vector in enumerate(vectors):
        if vector is not None:
            flat[row] = vector
    missing = pa.array([v is None for v in vectors], type=pa.bool_())
    column = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), dim, mask=missing)
    return pa.table(
        {
            "image_id": pa.array(ids, type=pa.string()),
            "vector": column,
            "error": pa.array(errors, type=pa.string()),
        }
    )


def load_extract_network(
    settings: NetworkSettings,
) -> tuple[Any, tuple[np.ndarray, np.ndarray] | None]:
    """The network of ``settings.weights`` in eval mode, and its ``(m, P)`` whitening if it has
    one (a checkpoint's, through ``model.checkpoint``)."""
    if checkpoint.is_checkpoint(settings.weights):
        loaded = checkpoint.load(settings.weights)
        lw = loaded.whitening
        return loaded.network, (None if lw is None else (lw.m, lw.P))
    meta = NetworkMeta(backbone=settings.backbone, pooling=settings.pooling, p=settings.p)
    return build_network(meta, settings.weights).eval(), None


def network_identity(settings: NetworkSettings) -> str:
    """What the descriptors' network is, for a fingerprint: a checkpoint's content identity,
    a weights file's content hash, or the packaged weights' name with the head's settings."""
    head = f"{settings.backbone}/{settings.pooling}/p{settings.p:g}"
    if checkpoint.is_checkpoint(settings.weights):
        return checkpoint.identity(settings.weights)
    if settings.weights in PACKAGED_WEIGHTS:
        return f"{settings.weights}/{head}"
    digest = hashlib.sha256(storage.read_bytes(settings.weights)).hexdigest()[:20]
    return f"file:{digest}/{head}"
