"""Photo bytes → a query descriptor, with the index's own network and settings.

The index manifest records the network and the extraction settings of its descriptors
(weights or checkpoint, backbone, pooling, longer side, scales, whitening, and the network's
identity); the embedder builds exactly that with the extract stage's own decoder and describer
(``model.describer.decode_photo`` and ``Describer.describe``: a checkpoint loads through
``model.checkpoint.load``, packaged weights by name), so a stored photo sent as a query gets
its stored descriptor back. A network whose identity is not the one the descriptors recorded
(a checkpoint trained again, or replaced, since) is refused: its queries would not match the
index. Requests are batched (``@serve.batch``); each photo of a batch is decoded on its own,
so one bad photo fails only its own request.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from ray import serve

from model.describer import (
    Describer,
    NetworkSettings,
    decode_photo,
    network_identity,
)
from model.images import MIN_SIDE, BadImage

__all__ = ["Embedder", "network_problem"]


def network_problem(network: Mapping[str, Any], settings: Mapping[str, Any]) -> str | None:
    """Why the network an index names cannot describe its queries (one line), or ``None``.

    Its identity must be the one the descriptors recorded (``network["identity"]``; no check
    for descriptors that recorded none).
    """
    try:
        conf = NetworkSettings.from_manifest(dict(network), dict(settings))
    except ValueError as err:
        return str(err)
    recorded = network.get("identity")
    if not recorded:
        return None
    try:
        found = network_identity(conf)
    except (OSError, ValueError) as err:
        return f"the network {conf.weights} the index names cannot be read: {err}"
    if found != recorded:
        return (
            f"the network at {conf.weights} is not the one the index's descriptors were made "
            f"with (its identity is {found}, the descriptors record {recorded}); restore that "
            "network, or extract and index again with this one"
        )
    return None


def _checked_conf(network: Mapping[str, Any], settings: Mapping[str, Any]) -> NetworkSettings:
    problem = network_problem(network, settings)
    if problem:
        raise ValueError(problem)
    return NetworkSettings.from_manifest(dict(network), dict(settings))


@serve.deployment
class Embedder:
    def __init__(
        self,
        network: Mapping[str, Any],
        settings: Mapping[str, Any],
        *,
        max_batch_size: int = 8,
        batch_wait_s: float = 0.01,
    ) -> None:
        self.conf = _checked_conf(network, settings)
        self.describer = Describer(self.conf)
        # serve.batch types the method as a plain callable; the wrapper it returns has these.
        self._embed_batch.set_max_batch_size(max_batch_size)  # type: ignore[attr-defined]
        self._embed_batch.set_batch_wait_timeout_s(batch_wait_s)  # type: ignore[attr-defined]

    async def embed(self, photo: bytes) -> np.ndarray | str:
        """The descriptor of one photo, or the reason it has none (a string)."""
        return await self._embed_batch(photo)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _embed_batch(self, photos: list[bytes]) -> list[np.ndarray | str]:
        out: list[np.ndarray | str] = []
        pixels, rows = [], []
        for i, photo in enumerate(photos):
            image = decode_photo(photo, self.conf.max_size)
            if isinstance(image, BadImage):
                out.append(f"not a usable photo: {image.reason}")
                continue
            if min(image.shape[:2]) < MIN_SIDE:
                out.append(
                    f"photo too small: {image.shape[1]}x{image.shape[0]} px, "
                    f"a side under {MIN_SIDE} px"
                )
                continue
            out.append("")
            pixels.append(image)
            rows.append(i)
        for i, vector in zip(rows, self.describer.describe(pixels), strict=True):
            out[i] = vector if vector is not None else "the photo's descriptor is not finite"
        return out
