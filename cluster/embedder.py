"""Photo bytes → a query descriptor, with the index's own network and settings.

The index manifest records the network and the extraction settings of its descriptors
(weights or checkpoint, backbone, pooling, longer side, scales, whitening); the embedder builds
exactly that with the extract stage's own decoder and describer
(``model.describer.decode_photo`` and ``Describer.describe``), so a stored photo sent as a
query gets its stored descriptor back. Requests are batched (``@serve.batch``); each photo of
a batch is decoded on its own, so one bad photo fails only its own request.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from ray import serve

__all__ = ["Embedder"]


@serve.deployment
class Embedder:
    def __init__(
        self,
        network: dict[str, Any],
        settings: dict[str, Any],
        *,
        max_batch_size: int = 8,
        batch_wait_s: float = 0.01,
    ) -> None:
        from model.describer import Describer, conf_for_network

        self.conf = conf_for_network(network, settings)
        self.describer = Describer(self.conf)
        self._embed_batch.set_max_batch_size(max_batch_size)
        self._embed_batch.set_batch_wait_timeout_s(batch_wait_s)

    async def embed(self, photo: bytes) -> np.ndarray | str:
        """The descriptor of one photo, or the reason it has none (a string)."""
        return await self._embed_batch(photo)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _embed_batch(self, photos: list[bytes]) -> list[np.ndarray | str]:
        from model.describer import decode_photo
        from model.images import MIN_SIDE, BadImage

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
