"""Heads that turn a feature map ``[B, C, h, w]`` into an L2-normalised descriptor ``[B, D]``.

``GeMHead`` is the GeM paper's: pool, L2, an optional learned whitening layer (FC with bias), L2.
``CGDHead`` is CGD's: several global descriptors, each pooled, projected without bias to
``dim / n`` and L2-normalised, then concatenated and L2-normalised again, plus an auxiliary
classifier (BatchNorm, FC) on the first descriptor's pooled features for labelled data.
Every head says which power combines its descriptors over scales (``scale_exponent``).

Defaults follow each paper: GeM's head learns its exponent ``p`` (Radenović et al.), CGD's GeM
branch keeps ``p = 3`` fixed (Jun et al. 2019).
"""

from __future__ import annotations

import torch
from torch import nn

from model.pooling import MAC, GeM, SPoC, build_pooling, l2n, pooling_name

__all__ = ["CGD_LETTERS", "CGDHead", "GeMHead", "Head"]

CGD_LETTERS = {"S": "spoc", "M": "mac", "G": "gem"}


class GeMHead(nn.Module):
    """Pooling → L2 → optional FC whitening → L2.

    ``pooling`` is ``gem``, ``mac`` or ``spoc`` in any case (``self.pooling`` keeps the
    lower-case name); anything else is a ``ValueError``. ``p``, ``learn_p`` and
    ``per_channel_p`` configure GeM; MAC and SPoC have no exponent, so for them they are ignored.
    """

    def __init__(
        self,
        in_channels: int,
        pooling: str = "gem",
        *,
        p: float = 3.0,
        learn_p: bool = True,
        per_channel_p: bool = False,
        whitening_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.pooling = pooling_name(pooling)
        channels = in_channels if per_channel_p else None
        self.pool = build_pooling(self.pooling, p=p, learn_p=learn_p, channels=channels)
        self.whiten = nn.Linear(in_channels, whitening_dim, bias=True) if whitening_dim else None
        self.out_dim = whitening_dim or in_channels

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        x = l2n(self.pool(fmap))
        return x if self.whiten is None else l2n(self.whiten(x))

    @property
    def scale_exponent(self) -> float:
        """GeM's p while descriptors stay non-negative; 1 once a whitening layer mixes signs."""
        if isinstance(self.pool, GeM) and self.whiten is None:
            return self.pool.exponent
        return 1.0


class CGDHead(nn.Module):
    """Combination of global descriptors, e.g. ``"SMG"`` = SPoC + MAC + GeM (letters in any case).

    The GeM branch's exponent ``p`` is fixed by default, as in the CGD paper (``p = 3``, not
    trained); ``learn_p=True`` makes it a trained parameter. Either way it is the parameter
    ``pools.<i>.p``, so state dicts have the same keys.
    """

    def __init__(
        self,
        in_channels: int,
        descriptors: str = "SG",
        *,
        dim: int = 1536,
        num_classes: int = 0,
        p: float = 3.0,
        learn_p: bool = False,
    ) -> None:
        super().__init__()
        letters = descriptors.upper()
        unknown = sorted(set(letters) - set(CGD_LETTERS))
        if not letters or unknown:
            raise ValueError(
                f"CGD descriptors {descriptors!r}: unknown letter(s) {unknown or 'none given'}; "
                f"use a string of {', '.join(f'{k} ({v})' for k, v in CGD_LETTERS.items())}"
            )
        if len(set(letters)) != len(letters):
            raise ValueError(f"CGD descriptors {descriptors!r} repeat a letter")
        if dim % len(letters):
            raise ValueError(f"CGD dim {dim} is not divisible by {len(letters)} descriptors")
        self.descriptors = letters
        self.pools = nn.ModuleList(_cgd_pool(letter, p, learn_p) for letter in letters)
        self.projections = nn.ModuleList(
            nn.Linear(in_channels, dim // len(letters), bias=False) for _ in letters
        )
        self.classifier = (
            nn.Sequential(nn.BatchNorm1d(in_channels), nn.Linear(in_channels, num_classes))
            if num_classes
            else None
        )
        self.out_dim = dim

    def forward(
        self, fmap: torch.Tensor, return_logits: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        pooled = [pool(fmap) for pool in self.pools]
        parts = [l2n(fc(x)) for fc, x in zip(self.projections, pooled, strict=True)]
        descriptor = l2n(torch.cat(parts, dim=1))
        if not return_logits:
            return descriptor
        logits = self.classifier(pooled[0]) if self.classifier is not None else None
        return descriptor, logits

    @property
    def scale_exponent(self) -> float:
        """Projections mix signs, so scales are averaged (power 1)."""
        return 1.0


Head = GeMHead | CGDHead
"""A descriptor head: ``out_dim`` wide, combined over scales with ``scale_exponent``."""


def _cgd_pool(letter: str, p: float, learn_p: bool) -> nn.Module:
    return {"S": SPoC, "M": MAC}[letter]() if letter != "G" else GeM(p=p, learn_p=learn_p)
