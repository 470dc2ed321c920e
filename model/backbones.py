"""Fully convolutional trunks: normalised images ``[B, 3, H, W]`` → feature maps ``[B, C, h, w]``.

Every trunk carries ``out_channels`` and the ``mean``/``std`` its weights were trained with, so
whoever feeds it images normalises them the right way. Weights are never downloaded: they come
from the EfficientNet-Lite weight packages (``"imagenet"``), torchvision's local cache (a weights
name such as ``"IMAGENET1K_V2"``), a local file or an ``s3://`` URI.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Mapping
from pathlib import Path

import torch
import torchvision
from torch import nn

from model import efficientnet_lite
from model.uri import read_bytes

__all__ = [
    "BACKBONES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ResNetTrunk",
    "VGGTrunk",
    "WeightsError",
    "build_backbone",
    "load_state_dict",
]

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_TORCHVISION = {
    "resnet50": "ResNet50_Weights",
    "resnet101": "ResNet101_Weights",
    "resnet152": "ResNet152_Weights",
    "vgg16": "VGG16_Weights",
}
BACKBONES: tuple[str, ...] = (*_TORCHVISION, *efficientnet_lite.VARIANTS)

# Keys of the ImageNet classifier, which a trunk drops when it loads a whole-network state dict.
_CLASSIFIER_PREFIXES = ("fc.", "classifier.")
_WEIGHTS_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")  # torchvision style: IMAGENET1K_V2, DEFAULT


class WeightsError(ValueError):
    """Weights that cannot be found, read or matched to the network."""


class ResNetTrunk(nn.Module):
    """A torchvision ResNet without its pooling and classifier; parameter names are kept."""

    def __init__(self, resnet: torchvision.models.ResNet) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = (
            resnet.conv1,
            resnet.bn1,
            resnet.relu,
            resnet.maxpool,
        )
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            resnet.layer1,
            resnet.layer2,
            resnet.layer3,
            resnet.layer4,
        )
        self.out_channels: int = resnet.fc.in_features
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def remove_last_stride(self) -> None:
        """Keep layer4 at layer3's resolution (CGD's change): 2× larger maps, same weights."""
        block = self.layer4[0]
        block.conv2.stride = (1, 1)
        if block.downsample is not None:
            block.downsample[0].stride = (1, 1)


class VGGTrunk(nn.Module):
    """VGG's convolutional part without the final max pooling, as in the GeM paper."""

    def __init__(self, vgg: torchvision.models.VGG) -> None:
        super().__init__()
        self.features = vgg.features[:-1]
        self.out_channels: int = 512
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def remove_last_stride(self) -> None:
        """Drop the pooling before the last convolutional block (the last stride left)."""
        pools = [i for i, m in enumerate(self.features) if isinstance(m, nn.MaxPool2d)]
        self.features[pools[-1]] = nn.Identity()


def build_backbone(
    name: str,
    weights: str | Path | None = None,
    *,
    remove_last_stride: bool = False,
) -> nn.Module:
    """A trunk by name with weights from ``None`` (random), ``"imagenet"``, a path or a URI.

    ``weights`` may also be a torchvision weights name (``"IMAGENET1K_V2"``), found in torch's
    local hub cache. ``remove_last_stride`` halves the output stride of the last stage.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    state = None if weights is None else _resolve_weights(name, weights)
    if name in efficientnet_lite.VARIANTS:
        trunk = efficientnet_lite.build_efficientnet_lite(name, state)
    else:
        trunk = _torchvision_trunk(name)
        if state is not None:
            _load_into(trunk, state, source=str(weights))
    if remove_last_stride:
        trunk.remove_last_stride()
    trunk.name = name
    trunk.weights = None if weights is None else str(weights)
    return trunk


def load_state_dict(uri: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a path or URI, loaded with ``weights_only=True`` (no code runs).

    Accepts a bare state dict or one wrapped as ``{"state_dict": ...}`` / ``{"model": ...}``,
    and strips the ``module.`` prefix that DDP adds.
    """
    try:
        obj = torch.load(io.BytesIO(read_bytes(uri)), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WeightsError(f"weights file not found: {uri}") from None
    except Exception as err:  # torch raises many types for a bad file
        raise WeightsError(f"weights file {uri} is not a readable PyTorch file: {err}") from err
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"weights file {uri} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _torchvision_trunk(name: str) -> nn.Module:
    net = getattr(torchvision.models, name)(weights=None)
    return VGGTrunk(net) if name == "vgg16" else ResNetTrunk(net)


def _resolve_weights(name: str, weights: str | Path) -> dict[str, torch.Tensor]:
    text = str(weights)
    if name in efficientnet_lite.VARIANTS and text == "imagenet":
        return load_state_dict(efficientnet_lite.imagenet_checkpoint_path(name))
    if text == "imagenet":
        text = "DEFAULT"
    if name in _TORCHVISION and _WEIGHTS_NAME.match(text) and not Path(text).exists():
        return load_state_dict(_torchvision_cache_file(name, text))
    return load_state_dict(text)


def _torchvision_cache_file(name: str, weights_name: str) -> Path:
    """The file torchvision would have downloaded, if it is already in the local cache."""
    try:
        enum = torchvision.models.get_weight(f"{_TORCHVISION[name]}.{weights_name}")
    except (KeyError, ValueError):
        raise WeightsError(f"{name} has no torchvision weights named {weights_name!r}") from None
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(enum.url).name
    if not path.is_file():
        raise WeightsError(
            f"ImageNet weights for {name} are not installed: {path} is missing and nothing is "
            "downloaded at run time. Copy that file there, pass weights=<path or s3:// URI>, "
            "or use efficientnet_lite0, whose ImageNet weights install with the project."
        )
    return path


def _load_into(trunk: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load strictly, except for the ImageNet classifier a whole-network file carries."""
    state = {k: v for k, v in state.items() if not k.startswith(_CLASSIFIER_PREFIXES)}
    try:
        result = trunk.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shapes that do not match
        raise WeightsError(f"{source} does not fit the trunk: {err}") from err
    if result.missing_keys:
        raise WeightsError(
            f"{source} leaves {len(result.missing_keys)} tensors of the trunk unset, "
            f"e.g. {result.missing_keys[:3]}; is it for another architecture?"
        )
    if result.unexpected_keys:
        raise WeightsError(
            f"{source} has {len(result.unexpected_keys)} tensors the trunk does not use, "
            f"e.g. {result.unexpected_keys[:3]}; is it for another architecture?"
        )
    logger.info("loaded %d tensors from %s", len(state), source)
