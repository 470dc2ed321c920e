"""Retrieval networks that describe themselves: a trunk, a head and the ``meta`` that rebuilds them.

A checkpoint is one directory (``model.pt``, ``meta.json``); training, batch extraction and
serving all read that layout, so a network never depends on the code path that made it.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.backbones import build_backbone, load_state_dict
from model.heads import CGDHead, GeMHead
from model.pooling import GeM
from model.uri import read_bytes

__all__ = [
    "NetworkMeta",
    "RetrievalNet",
    "build_network",
    "load_network",
    "parameter_groups",
    "save_network",
]


@dataclass(frozen=True)
class NetworkMeta:
    """Everything needed to rebuild a network; saved beside its weights as ``meta.json``."""

    backbone: str = "efficientnet_lite0"
    head: str = "gem"  # "gem" (the GeM paper's network) or "cgd"
    pooling: str = "gem"  # gem head only: gem | mac | spoc
    p: float = 3.0
    per_channel_p: bool = False
    whitening_dim: int | None = None  # gem head: size of the learned FC whitening layer
    descriptors: str = "SG"  # cgd head: letters S, M, G
    dim: int = 1536  # cgd head: output size
    num_classes: int = 0  # cgd head: auxiliary classifier size, 0 for none
    remove_last_stride: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # provenance: git SHA, training run...

    def __post_init__(self) -> None:
        if self.head not in ("gem", "cgd"):
            raise ValueError(f"unknown head {self.head!r}; use 'gem' or 'cgd'")


class RetrievalNet(nn.Module):
    """Normalised images → L2-normalised descriptors, with ``mean``/``std`` for the input."""

    def __init__(self, backbone: nn.Module, head: nn.Module, meta: NetworkMeta) -> None:
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
    backbone = build_backbone(meta.backbone, weights, remove_last_stride=meta.remove_last_stride)
    channels = backbone.out_channels
    if meta.head == "gem":
        head: nn.Module = GeMHead(
            channels,
            pooling=meta.pooling,
            p=meta.p,
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
        )
    return RetrievalNet(backbone, head, meta)


def save_network(net: RetrievalNet, directory: str | Path) -> Path:
    """Write ``model.pt`` and ``meta.json`` (with the git SHA) into a local directory."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    meta = asdict(net.meta)
    meta["extra"] = {**meta["extra"], "git_sha": _git_sha()}
    torch.save(net.state_dict(), out / "model.pt")
    (out / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    return out


def load_network(directory: str) -> RetrievalNet:
    """Rebuild a network from a checkpoint directory, local or ``s3://``."""
    base = directory.rstrip("/")
    try:
        meta = NetworkMeta(**json.loads(read_bytes(f"{base}/meta.json")))
    except FileNotFoundError:
        raise FileNotFoundError(f"{base} is not a checkpoint: it has no meta.json") from None
    net = build_network(meta, weights=None)
    state = load_state_dict(f"{base}/model.pt")
    net.load_state_dict(state, strict=True)
    return net


def parameter_groups(
    net: nn.Module, lr: float, weight_decay: float, p_lr_factor: float = 10.0
) -> list[dict[str, Any]]:
    """Optimizer groups as in the GeM paper: GeM's p at 10× the rate and without decay."""
    p_params = [m.p for m in net.modules() if isinstance(m, GeM) and m.p.requires_grad]
    p_ids = {id(p) for p in p_params}
    rest = [p for p in net.parameters() if p.requires_grad and id(p) not in p_ids]
    groups: list[dict[str, Any]] = [{"params": rest, "lr": lr, "weight_decay": weight_decay}]
    if p_params:
        groups.append({"params": p_params, "lr": lr * p_lr_factor, "weight_decay": 0.0})
    return groups


def _git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()
