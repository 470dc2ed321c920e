"""Photo bytes → a query descriptor, with the index's own network and settings.

The index manifest records the network and the extraction settings of its descriptors
(weights or checkpoint, backbone, pooling, longer side, scales, whitening, and the network's
identity); the embedder builds exactly that with the extract stage's own decoder and describer
(``model.describer.decode_photo`` and ``Describer.describe``: a checkpoint loads through
``model.checkpoint.load``, packaged weights by name), so a stored photo sent as a query gets
its stored descriptor back. A network whose identity is not the one the descriptors recorded
(a checkpoint trained again, or replaced, since) is refused: its queries would not match the
index. A version pins its checkpoint into the index (``network["pinned"]``, read from there),
so retraining into the checkpoint's folder changes nothing served. Each request names the
index version its descriptor is for, and is described with that version's network: during a
switch to a version with a new network both are held. Requests are batched
(``@serve.batch``); each photo of a batch is decoded on its own, so one bad photo fails only
its own request.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np
from ray import serve

from cluster import index_store
from cluster.served import served_state
from model.describer import (
    Describer,
    NetworkSettings,
    decode_photo,
    network_identity,
)
from model.images import MIN_SIDE, BadImage
from model.local_features import LocalFeatureOptions, LocalFeatures, read_local_features

__all__ = ["NO_LOCAL_FEATURES", "Embedder", "network_problem"]

NO_LOCAL_FEATURES = (
    "index version v{version} has no local features to re-rank with: run pipeline.features on "
    "its images, then pipeline.index --local-features on that output"
)


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
    """Photos → descriptors with the network of the index version they will be searched in.

    It holds the networks of the last ``keep_networks`` states asked for (the one served and
    the next, during a switch), each loaded from where the version pinned it and checked
    against the identity its descriptors recorded; it starts with the served state's."""

    def __init__(
        self,
        index: str,
        *,
        max_batch_size: int = 8,
        batch_wait_s: float = 0.01,
        keep_networks: int = 2,
    ) -> None:
        self.index, self.keep_networks = index, max(1, keep_networks)
        self._networks: OrderedDict[str, tuple[NetworkSettings, Describer]] = OrderedDict()
        self._of_version: dict[int, str] = {}
        self._local_options: dict[int, LocalFeatureOptions] = {}
        self.conf = self._network(served_state(index).version)[0]
        # serve.batch types the method as a plain callable; the wrapper it returns has these.
        self._embed_batch.set_max_batch_size(max_batch_size)  # type: ignore[attr-defined]
        self._embed_batch.set_batch_wait_timeout_s(batch_wait_s)  # type: ignore[attr-defined]

    def _network(self, version: int) -> tuple[NetworkSettings, Describer]:
        """The network (settings and describer) of index version ``version``."""
        key = self._of_version.get(version)
        if key is None:
            manifest = index_store.read_manifest(self.index, version)
            network, settings = manifest.get("network") or {}, manifest.get("settings", {})
            key = json.dumps(
                [
                    network.get("identity") or network,
                    settings.get("max_size"),
                    settings.get("scales"),
                ],
                sort_keys=True,
                default=str,
            )
            if key not in self._networks:
                conf = _checked_conf(network, settings)
                self._networks[key] = (conf, Describer(conf))
                while len(self._networks) > self.keep_networks:
                    self._networks.popitem(last=False)
            self._of_version[version] = key
        self._networks.move_to_end(key)
        return self._networks[key]

    def pid(self) -> int:
        """The replica's process id (tests kill a replica by the id they were given)."""
        return os.getpid()

    async def local_features(self, photo: bytes, version: int) -> LocalFeatures | str:
        """The photo's local features as version ``version`` pinned them (its features
        output's settings), for spatial re-ranking; or why there are none (a string)."""
        options = self._local_options.get(version)
        if options is None:
            pin = index_store.read_manifest(self.index, version).get("local_features")
            if not pin:
                return NO_LOCAL_FEATURES.format(version=version)
            try:
                options = LocalFeatureOptions.from_identity(pin["settings"])
            except ValueError as err:  # made by another extractor: say so, as a 422
                return str(err)
            self._local_options[version] = options
        # off the event loop: the photo's descriptor is batched meanwhile
        found = await asyncio.to_thread(read_local_features, photo, options, exif_transpose=True)
        return f"not a usable photo: {found.reason}" if isinstance(found, BadImage) else found

    async def embed(self, photo: bytes, version: int | None = None) -> np.ndarray | str:
        """The descriptor of one photo for index version ``version`` (default: the served
        one), or the reason it has none (a string)."""
        if version is None:
            version = served_state(self.index).version
        return await self._embed_batch((photo, int(version)))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _embed_batch(self, asked: list[tuple[bytes, int]]) -> list[np.ndarray | str]:
        out: list[np.ndarray | str] = [""] * len(asked)
        by_version: dict[int, list[int]] = {}
        for i, (_, version) in enumerate(asked):
            by_version.setdefault(version, []).append(i)
        for version, rows in by_version.items():
            conf, describer = self._network(version)
            pixels, kept = [], []
            for i in rows:
                image = decode_photo(asked[i][0], conf.max_size)
                if isinstance(image, BadImage):
                    out[i] = f"not a usable photo: {image.reason}"
                elif min(image.shape[:2]) < MIN_SIDE:
                    out[i] = (
                        f"photo too small: {image.shape[1]}x{image.shape[0]} px, "
                        f"a side under {MIN_SIDE} px"
                    )
                else:
                    pixels.append(image)
                    kept.append(i)
            for i, vector in zip(kept, describer.describe(pixels), strict=True):
                out[i] = vector if vector is not None else "the photo's descriptor is not finite"
        return out
