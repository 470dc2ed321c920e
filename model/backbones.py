"""Fully convolutional trunks: normalised images ``[B, 3, H, W]`` → feature maps ``[B, C, h, w]``.

Every trunk carries ``out_channels`` and the ``mean``/``std`` its weights were trained with, so
whoever feeds it images normalises them the right way, and ``min_input_size``: the smallest height
and width, in pixels, its forward pass accepts (smaller images make a pooling's output empty and
crash it, so extraction reports them as too small for the network instead). ResNet and
EfficientNet-Lite pad every convolution and pooling, so they take 1 pixel; VGG16's four unpadded
2x2 max poolings need 16 pixels, and 8 after :meth:`VGGTrunk.remove_last_stride`.

Weights are never downloaded: they come from the EfficientNet-Lite weight packages
(``"imagenet"``), torchvision's local cache (a weights name such as ``"IMAGENET1K_V2"``), a local
file or an ``s3://`` URI, all read by :func:`model.weights.load_state_dict`; every failure raises
:class:`model.weights.WeightsError`.
"""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from model import efficientnet_lite
from model.weights import WeightsError, load_state_dict

if TYPE_CHECKING:
    import torchvision

__all__ = [
    "BACKBONES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BackboneName",
    "ResNetTrunk",
    "Trunk",
    "VGGTrunk",
    "build_backbone",
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
BackboneName = Literal[BACKBONES]  # type: ignore[valid-type]
"""A backbone's name as a type: command lines list the choices and reject others."""

# Keys of the ImageNet classifier, which a trunk drops when it loads a whole-network state dict.
_CLASSIFIER_PREFIXES = ("fc.", "classifier.")
_WEIGHTS_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")  # torchvision style: IMAGENET1K_V2, DEFAULT


def _min_input_size(layers: Iterable[nn.Module]) -> int:
    """The smallest height/width a chain of layers maps to an output of at least one pixel.

    Walks the chain backwards from a 1-pixel output: a convolution or pooling with kernel ``k``,
    stride ``s``, padding ``p`` and dilation ``d`` gives ``m`` output pixels from at least
    ``(m - 1) * s + d * (k - 1) + 1 - 2 * p`` input pixels (floor mode; ``ceil_mode`` poolings
    need at most as many; ``padding="same"`` keeps the size). Other layers keep the size. Both
    dimensions are checked; the larger requirement is returned.
    """
    layers = list(layers)
    need = 1
    for axis in (0, 1):
        size = 1
        for layer in reversed(layers):
            if not isinstance(layer, nn.Conv2d | nn.MaxPool2d | nn.AvgPool2d):
                continue
            if layer.padding == "same":  # a Conv2d that keeps the size (stride 1)
                continue
            padding = 0 if isinstance(layer.padding, str) else layer.padding  # "valid"
            k, s, p = (_pair(v)[axis] for v in (layer.kernel_size, layer.stride, padding))
            d = _pair(getattr(layer, "dilation", 1))[axis]
            size = max(1, (size - 1) * s + d * (k - 1) + 1 - 2 * p)
        need = max(need, size)
    return need


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (value[0], value[-1])


class ResNetTrunk(nn.Module):
    """A torchvision ResNet without its pooling and classifier; parameter names are kept.

    ``min_input_size`` is 1: every convolution and the stem's max pooling are padded, so even a
    1x1 image gives a 1x1 map, with or without :meth:`remove_last_stride`. (In training mode
    BatchNorm also needs more than one value per channel, so a single 1x1 image runs only in
    eval mode.)
    """

    min_input_size: int = 1
    name: str  # these two set by build_backbone
    weights: str | None

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

    def stages(self) -> list[nn.Module]:
        """The trunk in forward order, a stage each: the stem, layer1 .. layer4."""
        stem = nn.ModuleList([self.conv1, self.bn1])
        return [stem, self.layer1, self.layer2, self.layer3, self.layer4]

    def remove_last_stride(self) -> None:
        """Keep layer4 at layer3's resolution (CGD's change): 2× larger maps, same weights."""
        block = self.layer4[0]
        block.conv2.stride = (1, 1)
        if block.downsample is not None:
            block.downsample[0].stride = (1, 1)


class VGGTrunk(nn.Module):
    """VGG's convolutional part without the final max pooling, as in the GeM paper.

    ``min_input_size`` is computed from :attr:`features`: VGG16 keeps four unpadded 2x2 max
    poolings of stride 2 (its 3x3 convolutions are padded), so it needs 2**4 = 16 pixels, and 8
    once :meth:`remove_last_stride` has dropped one of them. A smaller image leaves a pooling
    with an empty output, which raises.
    """

    name: str  # these two set by build_backbone
    weights: str | None

    def __init__(self, vgg: torchvision.models.VGG) -> None:
        super().__init__()
        self.features = vgg.features[:-1]
        self.out_channels: int = 512
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        self.min_input_size: int = _min_input_size(self.features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def stages(self) -> list[nn.Module]:
        """The trunk in forward order, a stage each: the 5 convolution blocks (each up to and
        with its max pooling; the last has none)."""
        cuts = [i + 1 for i, m in enumerate(self.features) if isinstance(m, nn.MaxPool2d)]
        bounds = [0, *cuts, len(self.features)]
        return [self.features[a:b] for a, b in itertools.pairwise(bounds) if b > a]

    def remove_last_stride(self) -> None:
        """Drop the pooling before the last convolutional block (the last stride left)."""
        pools = [i for i, m in enumerate(self.features) if isinstance(m, nn.MaxPool2d)]
        self.features[pools[-1]] = nn.Identity()
        self.min_input_size = _min_input_size(self.features)


Trunk = ResNetTrunk | VGGTrunk | efficientnet_lite.EfficientNetLiteTrunk
"""Any trunk: its input normalisation ``mean`` and ``std``, ``out_channels``,
``min_input_size``, ``stages()`` and ``remove_last_stride()``."""


def build_backbone(
    name: str,
    weights: str | Path | None = None,
    *,
    remove_last_stride: bool = False,
) -> Trunk:
    """A trunk by name with weights from ``None`` (random), ``"imagenet"``, a path or a URI.

    ``weights`` may also be a torchvision weights name (``"IMAGENET1K_V2"``), found in torch's
    local hub cache. ``remove_last_stride`` halves the output stride of the last stage.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    state = None if weights is None else _resolve_weights(name, weights)
    trunk: Trunk
    if name in efficientnet_lite.VARIANTS:
        try:
            trunk = efficientnet_lite.build_efficientnet_lite(name, state)
        except WeightsError as err:
            raise WeightsError(f"weights {weights} do not fit {name}: {err}") from err
    else:
        trunk = _torchvision_trunk(name)
        if state is not None:
            _load_into(trunk, state, source=str(weights))
    if remove_last_stride:
        trunk.remove_last_stride()
    trunk.name = name
    trunk.weights = None if weights is None else str(weights)
    return trunk


def _torchvision_trunk(name: str) -> ResNetTrunk | VGGTrunk:
    import torchvision  # lazily: a second of start-up (torch._dynamo), wasted on Lite trunks

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
    import torchvision  # lazily: a second of start-up (torch._dynamo), wasted on Lite trunks

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
