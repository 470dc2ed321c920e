"""Networks rebuild from their own checkpoint directory, locally and from S3."""

import json
from pathlib import Path

import boto3
import pytest
import torch

from model.networks import NetworkMeta, build_network, load_network, parameter_groups, save_network
from model.pooling import GeM


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _perturbed(meta: NetworkMeta) -> torch.nn.Module:
    torch.manual_seed(0)
    net = build_network(meta, weights=None).eval()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, GeM):
                module.p.fill_(2.5)  # a trained p, not the default, must survive the round trip
    return net


@pytest.mark.parametrize(
    "meta",
    [
        NetworkMeta(backbone="efficientnet_lite0", whitening_dim=64),
        NetworkMeta(backbone="resnet50", head="cgd", descriptors="SMG", dim=96, num_classes=7),
    ],
    ids=["gem-lite0", "cgd-resnet50"],
)
def test_checkpoint_round_trip(meta: NetworkMeta, tmp_path: Path, images: torch.Tensor) -> None:
    net = _perturbed(meta)
    save_network(net, tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / "meta.json").read_text())
    assert saved["backbone"] == meta.backbone and "git_sha" in saved["extra"]
    loaded = load_network(str(tmp_path / "ckpt")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), net(images))
    assert loaded(images).shape == (2, net.out_dim)


def test_checkpoint_from_s3(s3_bucket: str, tmp_path: Path, images: torch.Tensor) -> None:
    net = _perturbed(NetworkMeta(backbone="efficientnet_lite0"))
    local = save_network(net, tmp_path / "ckpt")
    s3 = boto3.client("s3")
    for name in ("model.pt", "meta.json"):
        s3.upload_file(str(local / name), s3_bucket, f"runs/1/{name}")
    loaded = load_network(f"s3://{s3_bucket}/runs/1/").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), net(images))
    with pytest.raises(FileNotFoundError, match=r"no meta\.json"):
        load_network(f"s3://{s3_bucket}/runs/2")


def test_gem_p_trains_faster_and_without_decay() -> None:
    net = build_network(NetworkMeta(backbone="efficientnet_lite0"), weights=None)
    groups = parameter_groups(net, lr=1e-3, weight_decay=1e-4)
    assert [g["lr"] for g in groups] == [1e-3, 1e-2]
    assert groups[1]["weight_decay"] == 0.0 and groups[1]["params"] == [net.head.pool.p]
    counted = sum(p.numel() for g in groups for p in g["params"])
    assert counted == sum(p.numel() for p in net.parameters())


def test_default_network_is_pretrained_lite0() -> None:
    net = build_network(NetworkMeta())
    assert net.meta.backbone == "efficientnet_lite0" and net.backbone.weights == "imagenet"


def test_logits_only_from_the_cgd_head(images: torch.Tensor) -> None:
    net = build_network(NetworkMeta(backbone="efficientnet_lite0"), weights=None)
    with pytest.raises(ValueError, match="CGD"):
        net(images, return_logits=True)
    with pytest.raises(ValueError, match="unknown head"):
        NetworkMeta(head="netvlad")
