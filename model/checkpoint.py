"""The checkpoint: one folder, local or ``s3://``, that every stage and the service load alike.

Layout: ``model.pt`` (the weights), ``whitening.npz`` (learned whitening, when there is one),
then ``meta.json`` last: the network's ``NetworkMeta``, the format, and the checkpoint's
``identity``, a content hash of the weights and the whitening. A folder is a checkpoint once its
``meta.json`` exists; saving over a checkpoint removes that file first, so a reader never pairs
an old meta with new weights. Loading checks the identity against the bytes it read, so what a
manifest names by identity is exactly what runs.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from model import storage
from model.networks import META_FORMAT, NetworkMeta, RetrievalNet, meta_from_json, network_from
from model.tables import code_version
from model.whitening import WhiteningParams, load_whitening, whitening_bytes

__all__ = [
    "META_FILE",
    "MODEL_FILE",
    "WHITENING_FILE",
    "Checkpoint",
    "copy",
    "identity",
    "is_checkpoint",
    "load",
    "save",
]

MODEL_FILE = "model.pt"
META_FILE = "meta.json"
WHITENING_FILE = "whitening.npz"

_NAMED_WEIGHTS = frozenset({"imagenet", "random"})
_HASH_CHARS = 20


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: the network (eval mode), its whitening and its identity."""

    uri: str
    network: RetrievalNet
    whitening: WhiteningParams | None
    identity: str
    meta: dict[str, Any]
    """``meta.json`` as stored."""


def is_checkpoint(uri: str) -> bool:
    """Whether ``uri`` is a complete checkpoint folder (``imagenet``/``random`` never are)."""
    if str(uri) in _NAMED_WEIGHTS or str(uri).isupper():
        return False
    try:
        return storage.is_file(storage.join(uri, META_FILE))
    except (OSError, ValueError):
        return False


def _content_identity(weights: bytes, whitening: bytes | None) -> str:
    digest = hashlib.sha256(weights)
    if whitening is not None:
        digest.update(hashlib.sha256(whitening).digest())
    return digest.hexdigest()[:_HASH_CHARS]


def read_meta(uri: str) -> dict[str, Any]:
    """``meta.json`` of the checkpoint at ``uri``; ``FileNotFoundError`` naming it when absent."""
    try:
        raw = storage.read_text(storage.join(uri, META_FILE))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{str(uri).rstrip('/')} is not a checkpoint: no {META_FILE}"
        ) from None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"{storage.join(uri, META_FILE)} is not JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{storage.join(uri, META_FILE)} is not a JSON object")
    return data


def identity(uri: str) -> str:
    """The content hash of the checkpoint at ``uri`` (as its ``meta.json`` records it; hashed
    from its files for a checkpoint written before it recorded one)."""
    meta = read_meta(uri)
    recorded = meta.get("identity")
    if isinstance(recorded, str) and recorded:
        return recorded
    weights = storage.read_bytes(storage.join(uri, MODEL_FILE))
    lw_uri = storage.join(uri, WHITENING_FILE)
    return _content_identity(
        weights, storage.read_bytes(lw_uri) if storage.is_file(lw_uri) else None
    )


def load(uri: str, *, device: str = "cpu") -> Checkpoint:
    """The checkpoint at ``uri``: network in eval mode, whitening, identity.

    ``FileNotFoundError`` when it is not a checkpoint, ``ValueError`` when its files do not
    match the identity its ``meta.json`` records (changed after it was written).
    """
    base = str(uri).rstrip("/")
    meta = read_meta(base)
    weights = storage.read_bytes(storage.join(base, MODEL_FILE))
    lw_uri = storage.join(base, WHITENING_FILE)
    lw_bytes = storage.read_bytes(lw_uri) if storage.is_file(lw_uri) else None
    found = _content_identity(weights, lw_bytes)
    recorded = meta.get("identity")
    if recorded and recorded != found:
        raise ValueError(
            f"{base} changed after it was written: its files hash to {found}, its {META_FILE} "
            f"records {recorded}; save the checkpoint again"
        )
    network_meta = meta_from_json(meta, storage.join(base, META_FILE))
    state = torch.load(io.BytesIO(weights), map_location=device, weights_only=True)
    net = network_from(network_meta, state, where=storage.join(base, MODEL_FILE))
    whitening = load_whitening(io.BytesIO(lw_bytes)) if lw_bytes is not None else None
    return Checkpoint(base, net.eval().to(device), whitening, found, meta)


def save(
    uri: str,
    network: RetrievalNet,
    whitening: tuple[np.ndarray, np.ndarray] | WhiteningParams | None = None,
    *,
    whitening_meta: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """Write the checkpoint folder ``uri``: weights, whitening, then ``meta.json`` last.

    ``whitening`` is ``(m, P)`` (with ``whitening_meta`` saying how it was learned) or what
    ``load`` returned. ``extra`` goes into ``meta.json`` beside the network's meta. Returns the
    checkpoint's identity.
    """
    base = str(uri).rstrip("/")
    meta_uri = storage.join(base, META_FILE)
    if storage.is_file(meta_uri):
        storage.remove(meta_uri)
    buffer = io.BytesIO()
    torch.save(network.state_dict(), buffer)
    weights = buffer.getvalue()
    storage.write_bytes(storage.join(base, MODEL_FILE), weights)
    lw_uri = storage.join(base, WHITENING_FILE)
    lw_bytes = None
    if whitening is not None:
        m, P = whitening[0], whitening[1]
        how = dict(whitening_meta or (whitening[2] if len(whitening) > 2 else {}))
        lw_bytes = whitening_bytes(m, P, **how)
        storage.write_bytes(lw_uri, lw_bytes)
    elif storage.is_file(lw_uri):
        storage.remove(lw_uri)
    found = _content_identity(weights, lw_bytes)
    meta = {
        "format": META_FORMAT,
        **network_meta_json(network.meta),
        "identity": found,
        "extra": {**network.meta.extra, **dict(extra or {}), "code": code_version()},
    }
    storage.write_text(meta_uri, json.dumps(meta, indent=2, sort_keys=True, default=str))
    return found


def copy(source: str, dest: str, *, identity: str) -> None:
    """Copy the checkpoint at ``source`` to ``dest`` (``meta.json`` last), byte for byte, if its
    files are the checkpoint ``identity`` names; ``ValueError`` when they are not (it was trained
    again or replaced since)."""
    base = str(source).rstrip("/")
    meta = storage.read_bytes(storage.join(base, META_FILE))
    weights = storage.read_bytes(storage.join(base, MODEL_FILE))
    lw_uri = storage.join(base, WHITENING_FILE)
    lw_bytes = storage.read_bytes(lw_uri) if storage.is_file(lw_uri) else None
    found = _content_identity(weights, lw_bytes)
    if found != identity:
        raise ValueError(
            f"the checkpoint at {base} is no longer the network {identity} (its files hash to "
            f"{found}): it was trained again or replaced since; describe the photos again"
        )
    storage.write_bytes(storage.join(dest, MODEL_FILE), weights)
    if lw_bytes is not None:
        storage.write_bytes(storage.join(dest, WHITENING_FILE), lw_bytes)
    storage.write_bytes(storage.join(dest, META_FILE), meta)


def network_meta_json(meta: NetworkMeta) -> dict[str, Any]:
    return asdict(meta)
