"""Global pooling of CNN feature maps into one vector per image.

The functions are the maths (GeM, MAC, SPoC); the modules wrap them with their parameters.
GeM generalises the other two: p = 1 is SPoC (average pooling), p → ∞ approaches MAC (max).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MAC",
    "POOLINGS",
    "GeM",
    "PoolingName",
    "SPoC",
    "build_pooling",
    "gem",
    "l2n",
    "mac",
    "pooling_name",
    "spoc",
]


def _check_feature_map(x: torch.Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"pooling expects a [B, C, H, W] feature map, got shape {tuple(x.shape)}")


def mac(x: torch.Tensor) -> torch.Tensor:
    """Maximum activation of convolutions: the spatial max of each channel, ``[B, C]``."""
    _check_feature_map(x)
    return torch.amax(x, dim=(-2, -1))


def spoc(x: torch.Tensor) -> torch.Tensor:
    """Sum-pooled convolutional features (as a mean, so image size does not scale it)."""
    _check_feature_map(x)
    return x.mean(dim=(-2, -1))


def gem(x: torch.Tensor, p: float | torch.Tensor = 3.0, eps: float = 1e-6) -> torch.Tensor:
    """Generalised mean: ``mean_{H,W}(clamp(x, min=eps) ** p) ** (1 / p)``, shape ``[B, C]``.

    ``p`` is a number, a one-element tensor, or a ``[C]`` tensor for a per-channel exponent.
    The clamp keeps the power of ReLU outputs well defined and its gradient finite.
    """
    _check_feature_map(x)
    if isinstance(p, torch.Tensor) and p.numel() > 1:
        if p.numel() != x.shape[1]:
            raise ValueError(f"per-channel GeM p has {p.numel()} values for {x.shape[1]} channels")
        p = p.view(1, -1, 1, 1)
        return x.clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p.view(1, -1))
    return x.clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


def l2n(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """L2-normalise the rows of ``x`` (the last dimension)."""
    return F.normalize(x, p=2.0, dim=-1, eps=eps)


class MAC(nn.Module):
    """Max pooling over space, as a module."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mac(x)


class SPoC(nn.Module):
    """Average pooling over space, as a module."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return spoc(x)


class GeM(nn.Module):
    """GeM pooling with a learnable exponent.

    ``channels`` gives one exponent per channel (the per-channel variant); by default one
    exponent is shared. The GeM paper trains ``p`` with ten times the network's learning rate
    and no weight decay: ``model.training`` builds those parameter groups.
    """

    def __init__(
        self,
        p: float = 3.0,
        *,
        eps: float = 1e-6,
        learn_p: bool = True,
        channels: int | None = None,
    ) -> None:
        super().__init__()
        if p <= 0:
            raise ValueError(f"GeM p must be positive, got {p}")
        shape = (channels,) if channels else (1,)
        self.p = nn.Parameter(torch.full(shape, float(p)), requires_grad=learn_p)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gem(x, p=self.p if self.p.numel() > 1 else self.p.squeeze(), eps=self.eps)

    @property
    def exponent(self) -> float:
        """The mean exponent, the power used to combine scales in multi-scale extraction."""
        return float(self.p.detach().mean())

    def extra_repr(self) -> str:
        p = f"{self.exponent:.4f}" if self.p.numel() == 1 else f"[{self.p.numel()} channels]"
        return f"p={p}, eps={self.eps}"


POOLINGS: dict[str, type[nn.Module]] = {"gem": GeM, "mac": MAC, "spoc": SPoC}
if TYPE_CHECKING:  # a checker cannot read the names out of POOLINGS: the same names, spelled out
    PoolingName = Literal["gem", "mac", "spoc"]
else:
    PoolingName = Literal[tuple(POOLINGS)]
"""A pooling's name as a type: command lines list the choices and reject others."""


def pooling_name(name: str) -> str:
    """The canonical (lower-case) name of a pooling: ``"GeM"`` → ``"gem"``.

    ``ValueError`` listing the choices for a name that is not one of ``POOLINGS``, in any case.
    """
    canonical = name.strip().lower() if isinstance(name, str) else None
    if canonical not in POOLINGS:
        raise ValueError(f"unknown pooling {name!r}; choose one of {sorted(POOLINGS)}")
    return canonical


def build_pooling(name: str, **kwargs: Any) -> nn.Module:
    """A pooling by name, in any case: ``gem`` (with ``p``, ``learn_p``, ``channels``), ``mac``
    or ``spoc``. MAC and SPoC have no exponent, so keyword arguments given for them are ignored.
    """
    cls = POOLINGS[pooling_name(name)]
    return cls(**kwargs) if cls is GeM else cls()
