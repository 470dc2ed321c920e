"""Backbones: shapes, strides, the smallest input, and weights from a path, S3, the local cache,
or nowhere."""

from pathlib import Path

import boto3
import pytest
import torch
import torchvision

from model.backbones import BACKBONES, build_backbone
from model.weights import WeightsError


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.randn(1, 3, 96, 128, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    ("name", "channels"), [("resnet50", 2048), ("vgg16", 512), ("efficientnet_lite0", 1280)]
)
def test_trunks_are_fully_convolutional(name: str, channels: int, image: torch.Tensor) -> None:
    trunk = build_backbone(name).eval()
    with torch.no_grad():
        fmap = trunk(image)
    stride = 16 if name == "vgg16" else 32  # VGG drops its last pooling, as in the GeM paper
    assert fmap.shape == (1, channels, 96 // stride, 128 // stride)
    assert trunk.out_channels == channels
    assert len(trunk.mean) == len(trunk.std) == 3


@pytest.mark.parametrize("name", ["resnet50", "vgg16", "efficientnet_lite0"])
def test_remove_last_stride_doubles_the_map(name: str, image: torch.Tensor) -> None:
    plain = build_backbone(name).eval()
    dense = build_backbone(name, remove_last_stride=True).eval()
    dense.load_state_dict(plain.state_dict())  # same weights, only the stride differs
    with torch.no_grad():
        a, b = plain(image), dense(image)
    assert b.shape[-2:] == (a.shape[-2] * 2, a.shape[-1] * 2)


def _assert_min_input_size_is_tight(trunk: torch.nn.Module) -> None:
    m = trunk.min_input_size
    with torch.no_grad():
        fmap = trunk(torch.randn(1, 3, m, m))
        assert fmap.shape[:2] == (1, trunk.out_channels)
        assert min(fmap.shape[-2:]) >= 1
        assert trunk(torch.randn(1, 3, m, 3 * m + 1)).shape[-2] >= 1  # one side at the minimum
        if m > 1:  # one pixel less leaves a pooling with nothing to pool
            with pytest.raises(RuntimeError):
                trunk(torch.randn(1, 3, m - 1, m - 1))
            with pytest.raises(RuntimeError):
                trunk(torch.randn(1, 3, m - 1, 4 * m))


@pytest.mark.parametrize(
    ("name", "plain", "dense"), [("resnet50", 1, 1), ("vgg16", 16, 8), ("efficientnet_lite0", 1, 1)]
)
def test_min_input_size_is_the_smallest_input_that_runs(name: str, plain: int, dense: int) -> None:
    """``dense``: after ``remove_last_stride()``, which must update ``min_input_size``."""
    trunk = build_backbone(name, None).eval()
    assert isinstance(trunk.min_input_size, int)
    assert trunk.min_input_size == plain
    _assert_min_input_size_is_tight(trunk)
    trunk.remove_last_stride()
    assert trunk.min_input_size == dense
    _assert_min_input_size_is_tight(trunk)


def test_weights_round_trip_through_a_file(tmp_path: Path, image: torch.Tensor) -> None:
    torch.manual_seed(3)
    trained = build_backbone("resnet50").eval()
    path = tmp_path / "resnet50.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in trained.state_dict().items()}}, path)
    loaded = build_backbone("resnet50", weights=path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(image), trained(image))


def test_whole_torchvision_network_file_loads_without_its_classifier(tmp_path: Path) -> None:
    net = torchvision.models.resnet50()
    torch.save(net.state_dict(), tmp_path / "full.pth")
    trunk = build_backbone("resnet50", weights=tmp_path / "full.pth")
    torch.testing.assert_close(trunk.layer4[2].conv3.weight, net.layer4[2].conv3.weight)


def test_weights_from_s3(s3_bucket: str, image: torch.Tensor, tmp_path: Path) -> None:
    torch.manual_seed(4)
    trained = build_backbone("efficientnet_lite0").eval()
    torch.save(trained.state_dict(), tmp_path / "w.pt")
    boto3.client("s3").upload_file(str(tmp_path / "w.pt"), s3_bucket, "nets/lite0.pt")
    loaded = build_backbone("efficientnet_lite0", weights=f"s3://{s3_bucket}/nets/lite0.pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(image), trained(image))
    with pytest.raises(WeightsError, match="not found"):
        build_backbone("resnet50", weights=f"s3://{s3_bucket}/nets/missing.pt")


def test_unreadable_weights_file_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(WeightsError, match=r"garbage\.pt"):
        build_backbone("resnet50", weights=bad)
    with pytest.raises(WeightsError, match="not found"):
        build_backbone("resnet50", weights=tmp_path / "nothing-here.pt")


def test_weights_of_another_architecture_are_refused(tmp_path: Path) -> None:
    torch.save(build_backbone("vgg16").state_dict(), tmp_path / "vgg.pt")
    with pytest.raises(WeightsError, match="another architecture"):
        build_backbone("resnet50", weights=tmp_path / "vgg.pt")
    with pytest.raises(WeightsError, match=r"vgg\.pt do not fit efficientnet_lite0.*missing keys"):
        build_backbone("efficientnet_lite0", weights=tmp_path / "vgg.pt")
    torch.save(build_backbone("resnet101").state_dict(), tmp_path / "r101.pt")
    with pytest.raises(WeightsError, match="another architecture"):
        build_backbone("resnet50", weights=tmp_path / "r101.pt")


def test_torchvision_weights_are_never_downloaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache
    with pytest.raises(WeightsError, match=r"not installed.*efficientnet_lite0"):
        build_backbone("resnet50", weights="imagenet")
    with pytest.raises(WeightsError, match="no torchvision weights named 'IMAGENET9K_V9'"):
        build_backbone("resnet50", weights="IMAGENET9K_V9")


def test_torchvision_weights_from_the_local_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    net = torchvision.models.resnet50()
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(net.state_dict(), cache / "resnet50-11ad3fa6.pth")  # IMAGENET1K_V2's file name
    trunk = build_backbone("resnet50", weights="IMAGENET1K_V2")
    torch.testing.assert_close(trunk.conv1.weight, net.conv1.weight)


def test_unknown_backbone_lists_the_choices() -> None:
    with pytest.raises(ValueError, match=r"resnet50.*efficientnet_lite2"):
        build_backbone("alexnet")
    assert set(BACKBONES) >= {"resnet101", "resnet152", "efficientnet_lite1"}
