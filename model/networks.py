"""Retrieval networks that describe themselves: a trunk, a head and the ``meta`` that rebuilds them.

A network is saved and loaded as a checkpoint (``model.checkpoint``: weights, whitening, then
the meta last); training, batch extraction and serving all read that layout, so a network never
depends on the code path that made it.

``meta.json`` carries a ``format`` number (``META_FORMAT``). Files written before it existed
have none and are read as format 1: format 1 is exactly their layout, with fields added since
(``learn_p``) taking their defaults when absent. A file from a newer format, or with fields this
code does not know, still loads, with a warning naming what is ignored; if what is ignored
changes the network, loading its weights then fails with a note saying so.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.backbones import Trunk, build_backbone
from model.heads import CGDHead, GeMHead, Head
from model.pooling import GeM, pooling_name
from model.weights import WeightsError

__all__ = [
    "HEAD_DEFAULTS",
    "META_FORMAT",
    "NetworkMeta",
    "RetrievalNet",
    "build_network",
    "fold_whitening",
    "freeze_trunk",
    "parameter_groups",
]

META_FORMAT = 1
"""The ``meta.json`` format this code writes and reads."""

CHECKPOINT_KEYS = frozenset({"identity"})
"""Keys of ``meta.json`` that describe the checkpoint, not the network."""

HEAD_DEFAULTS: dict[str, dict[str, bool]] = {
    # The GeM paper: the trunk keeps its strides, GeM's p is learned (at 10× the rate).
    "gem": {"remove_last_stride": False, "learn_p": True},
    # The CGD paper (Jun et al. 2019): the last stride is removed, GeM's p is fixed at 3.
    "cgd": {"remove_last_stride": True, "learn_p": False},
}
"""What ``None`` means for ``NetworkMeta.remove_last_stride`` and ``learn_p``, per head."""


@dataclass(frozen=True)
class NetworkMeta:
    """Everything needed to rebuild a network; saved beside its weights as ``meta.json``.

    Names are case-insensitive and stored canonical: ``head`` and ``pooling`` lower-case,
    ``descriptors`` upper-case. ``remove_last_stride`` and ``learn_p`` left ``None`` take the
    head's paper default (``HEAD_DEFAULTS``) and are stored resolved, so ``meta.json`` records
    what was built. (``dataclasses.replace(meta, head=...)`` therefore keeps the old head's
    resolved values; pass them again, or ``None``, to get the new head's defaults.)
    """

    backbone: str = "efficientnet_lite0"
    head: str = "gem"  # "gem" (the GeM paper's network) or "cgd"
    pooling: str = "gem"  # gem head only: gem | mac | spoc
    p: float = 3.0  # GeM's exponent (gem head with gem pooling; cgd head's G branch)
    learn_p: bool | None = None  # None: True for gem, False for cgd
    per_channel_p: bool = False  # gem head with gem pooling: one p per channel
    whitening_dim: int | None = None  # gem head: size of the learned FC whitening layer
    descriptors: str = "SG"  # cgd head: letters S, M, G
    dim: int = 1536  # cgd head: output size
    num_classes: int = 0  # cgd head: auxiliary classifier size, 0 for none
    remove_last_stride: bool | None = None  # None: False for gem, True for cgd
    extra: dict[str, Any] = field(default_factory=dict)  # provenance: git SHA, training run...

    def __post_init__(self) -> None:
        head = self.head.strip().lower() if isinstance(self.head, str) else self.head
        if head not in HEAD_DEFAULTS:
            raise ValueError(f"unknown head {self.head!r}; use 'gem' or 'cgd'")
        object.__setattr__(self, "head", head)
        object.__setattr__(self, "pooling", pooling_name(self.pooling))
        if isinstance(self.descriptors, str):
            object.__setattr__(self, "descriptors", self.descriptors.strip().upper())
        for name, default in HEAD_DEFAULTS[head].items():
            value = getattr(self, name)
            if value is None:
                object.__setattr__(self, name, default)
            elif not isinstance(value, bool):
                raise ValueError(f"NetworkMeta.{name} must be true, false or None, got {value!r}")


class RetrievalNet(nn.Module):
    """Normalised images → L2-normalised descriptors, with ``mean``/``std`` for the input."""

    def __init__(self, backbone: Trunk, head: Head, meta: NetworkMeta) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.meta = meta

    @property
    def mean(self) -> tuple[float, float, float]:
        return self.backbone.mean

    @property
    def std(self) -> tuple[float, float, float]:
        return self.backbone.std

    @property
    def out_dim(self) -> int:
        return self.head.out_dim

    def forward(self, images: torch.Tensor, return_logits: bool = False) -> Any:
        fmap = self.backbone(images)
        if return_logits:
            if not isinstance(self.head, CGDHead):
                raise ValueError("only the CGD head has an auxiliary classifier")
            return self.head(fmap, return_logits=True)
        return self.head(fmap)


def build_network(meta: NetworkMeta, weights: str | Path | None = "imagenet") -> RetrievalNet:
    """The network ``meta`` describes, its trunk initialised from ``weights`` (head fresh)."""
    backbone = build_backbone(
        meta.backbone, weights, remove_last_stride=bool(meta.remove_last_stride)
    )
    channels = backbone.out_channels
    if meta.head == "gem":
        head: Head = GeMHead(
            channels,
            pooling=meta.pooling,
            p=meta.p,
            learn_p=bool(meta.learn_p),
            per_channel_p=meta.per_channel_p,
            whitening_dim=meta.whitening_dim,
        )
    else:
        head = CGDHead(
            channels,
            descriptors=meta.descriptors,
            dim=meta.dim,
            num_classes=meta.num_classes,
            p=meta.p,
            learn_p=bool(meta.learn_p),
        )
    return RetrievalNet(backbone, head, meta)


def meta_from_json(data: Any, source: str) -> NetworkMeta:
    """The ``NetworkMeta`` of a checkpoint's parsed ``meta.json`` (its own keys, such as the
    checkpoint's ``identity``, left aside); ``ValueError`` naming ``source`` when it is not one."""
    if isinstance(data, dict):
        data = {k: v for k, v in data.items() if k not in CHECKPOINT_KEYS}
    return _parse_meta(data, source)[0]


def network_from(meta: NetworkMeta, state: dict[str, Any], where: str) -> RetrievalNet:
    """The network ``meta`` describes with the weights ``state`` (``where`` names them)."""
    net = build_network(meta, weights=None)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split())
        raise WeightsError(
            f"{where} does not fit the network its meta.json describes: {detail}"
        ) from err
    return net


def _parse_meta(data: Any, source: str) -> tuple[NetworkMeta, str | None]:
    """The ``NetworkMeta`` of a parsed ``meta.json``, and what of it was ignored (or ``None``)."""
    if not isinstance(data, dict):
        raise ValueError(f"{source} does not hold a JSON object")
    data = dict(data)
    version = data.pop("format", 1)  # files from before the format number are format 1
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"{source}: format {version!r} is not a format number (an integer ≥ 1)")
    caveats = []
    if version > META_FORMAT:
        caveats.append(
            f"it is format {version}, newer than the format {META_FORMAT} this code reads"
        )
    known = {f.name for f in fields(NetworkMeta)}
    unknown = sorted(set(data) - known)
    if unknown:
        caveats.append(f"its field(s) {', '.join(unknown)} are unknown here and were ignored")
    caveat = "; ".join(caveats) or None
    if caveat:
        warnings.warn(
            f"{source}: {caveat} (written by a newer version?); loading the fields this code knows",
            stacklevel=3,
        )
    return NetworkMeta(**{k: v for k, v in data.items() if k in known}), caveat


def fold_whitening(net: RetrievalNet, m: Any, P: Any) -> RetrievalNet:
    """``net`` with the learned whitening ``(m, P)`` as its head's FC layer: ``W = P``,
    ``b = −P m``, so it describes exactly as ``apply_whitening`` of its plain descriptors did.
    The GeM paper's start for a round of fine-tuning that trains the whitening end to end."""
    if not isinstance(net.head, GeMHead) or net.head.whiten is not None:
        raise ValueError("only a GeM head without a whitening layer can take Lw in")
    proj = torch.as_tensor(P, dtype=torch.float32)
    mean = torch.as_tensor(m, dtype=torch.float32).reshape(-1)
    if proj.dim() != 2 or proj.shape[1] != net.out_dim or mean.numel() != net.out_dim:
        raise ValueError(
            f"Lw of shape m {tuple(mean.shape)}, P {tuple(proj.shape)} does not fit descriptors "
            f"of {net.out_dim} dimensions"
        )
    folded = build_network(replace(net.meta, whitening_dim=proj.shape[0]), weights=None)
    missing, unexpected = folded.load_state_dict(net.state_dict(), strict=False)
    if unexpected or sorted(missing) != ["head.whiten.bias", "head.whiten.weight"]:
        raise ValueError(f"folding Lw: unexpected keys {unexpected}, missing {missing}")
    assert isinstance(folded.head, GeMHead) and folded.head.whiten is not None  # as loaded above
    with torch.no_grad():
        folded.head.whiten.weight.copy_(proj)
        folded.head.whiten.bias.copy_(-proj @ mean)
    return folded.to(next(net.parameters()).device).train(net.training)


def parameter_groups(
    net: nn.Module, lr: float, weight_decay: float, *, p_lr_factor: float = 10.0
) -> list[dict[str, Any]]:
    """Optimizer groups as in the GeM paper: GeM's p at 10× the rate and without decay."""
    p_params = [m.p for m in net.modules() if isinstance(m, GeM) and m.p.requires_grad]
    p_ids = {id(p) for p in p_params}
    rest = [p for p in net.parameters() if p.requires_grad and id(p) not in p_ids]
    groups: list[dict[str, Any]] = [{"params": rest, "lr": lr, "weight_decay": weight_decay}]
    if p_params:
        groups.append({"params": p_params, "lr": lr * p_lr_factor, "weight_decay": 0.0})
    return groups


def freeze_trunk(net: RetrievalNet, trainable_stages: int) -> int:
    """Keep all but the trunk's last ``trainable_stages`` stages (``backbone.stages()``) at the
    weights they have: few photos fit fewer weights, and no backward pass runs through a
    frozen prefix. The head always trains. Returns how many parameters were frozen."""
    stages = net.backbone.stages()
    if not 0 <= trainable_stages <= len(stages):
        raise ValueError(
            f"{net.meta.backbone} has {len(stages)} stages; train 0 to {len(stages)} of them, "
            f"not {trainable_stages}"
        )
    frozen = 0
    for stage in stages[: len(stages) - trainable_stages]:
        for param in stage.parameters():
            frozen += param.numel() if param.requires_grad else 0
            param.requires_grad_(False)
    return frozen
