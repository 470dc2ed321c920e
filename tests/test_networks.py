"""Networks rebuild from their checkpoint (``model.checkpoint``), locally and from S3."""

import dataclasses
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import model.networks as networks
from model import checkpoint
from model.networks import NetworkMeta, build_network, fold_whitening, parameter_groups
from model.pooling import GeM
from model.storage import read_bytes, write_bytes
from model.weights import WeightsError
from model.whitening import apply_whitening


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
    identity = checkpoint.save(str(tmp_path / "ckpt"), net)
    assert identity == checkpoint.identity(str(tmp_path / "ckpt"))
    saved = json.loads((tmp_path / "ckpt" / "meta.json").read_text())
    assert saved["backbone"] == meta.backbone and "code" in saved["extra"]
    assert saved["format"] == networks.META_FORMAT == 1
    loaded = checkpoint.load(str(tmp_path / "ckpt")).network
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), net(images))
    assert loaded(images).shape == (2, net.out_dim)
    _assert_same_meta(loaded.meta, net.meta)


def _assert_same_meta(loaded: NetworkMeta, saved: NetworkMeta) -> None:
    """Every field survives; ``extra`` gains the code version."""
    assert dataclasses.replace(loaded, extra={}) == dataclasses.replace(saved, extra={})
    assert loaded.extra.items() >= saved.extra.items() and "code" in loaded.extra


def test_checkpoint_to_and_from_s3(s3_bucket: str, images: torch.Tensor) -> None:
    uri = f"s3://{s3_bucket}/ckpt"
    meta = NetworkMeta(
        backbone="efficientnet_lite0",
        head="cgd",
        descriptors="MG",
        dim=64,
        num_classes=3,
        learn_p=True,
        remove_last_stride=False,
        extra={"run": "s3-test"},
    )
    net = _perturbed(meta)
    checkpoint.save(uri, net)
    assert json.loads(read_bytes(f"{uri}/meta.json"))["format"] == 1
    loaded = checkpoint.load(uri + "/").network
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), net(images))
    _assert_same_meta(loaded.meta, meta)
    # Overwriting replaces both files: the new meta is paired with the new weights.
    other = _perturbed(NetworkMeta(backbone="efficientnet_lite0", whitening_dim=32))
    checkpoint.save(uri, other)
    reloaded = checkpoint.load(uri).network
    assert reloaded.meta.head == "gem" and reloaded.out_dim == 32
    with torch.no_grad():
        torch.testing.assert_close(reloaded(images), other(images))
    with pytest.raises(FileNotFoundError, match=r"no meta\.json"):
        checkpoint.load(f"s3://{s3_bucket}/runs/2")


def test_save_writes_meta_last_and_drops_the_old_one_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """meta.json marks a checkpoint complete: gone before new weights, written after them."""
    net = build_network(NetworkMeta(backbone="efficientnet_lite0"), weights=None)
    target = tmp_path / "ckpt"
    checkpoint.save(str(target), net)
    calls: list[tuple[str, str]] = []

    def recording(name, real):
        def call(uri, *args):
            calls.append((name, Path(str(uri)).name))
            return real(uri, *args)

        return call

    store = checkpoint.storage
    monkeypatch.setattr(store, "write_bytes", recording("write", store.write_bytes))
    monkeypatch.setattr(store, "remove", recording("remove", store.remove))
    checkpoint.save(str(target), net)
    assert calls == [("remove", "meta.json"), ("write", "model.pt"), ("write", "meta.json")]


def test_meta_json_from_a_newer_version_loads_with_a_warning(
    tmp_path: Path, images: torch.Tensor
) -> None:
    net = _perturbed(NetworkMeta(backbone="efficientnet_lite0", whitening_dim=16))
    ckpt = str(tmp_path / "ckpt")
    checkpoint.save(ckpt, net)
    meta_path = tmp_path / "ckpt" / "meta.json"
    saved = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**saved, "colour": "blue", "zoom": 2}))
    with pytest.warns(UserWarning, match=r"field\(s\) colour, zoom are unknown"):
        loaded = checkpoint.load(ckpt).network
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), net(images))
    meta_path.write_text(json.dumps({**saved, "format": 2}))
    with pytest.warns(UserWarning, match="format 2, newer than the format 1"):
        checkpoint.load(ckpt)
    # The warning names what was ignored; the weights then do not fit the network.
    meta_path.write_text(json.dumps({**saved, "whitening_dim": None, "whitening": 16}))
    with pytest.warns(UserWarning, match="whitening"), pytest.raises(WeightsError) as err:
        checkpoint.load(ckpt)
    assert "does not fit" in str(err.value)
    for bad in ("1", 0, True):
        meta_path.write_text(json.dumps({**saved, "format": bad}))
        with pytest.raises(ValueError, match="not a format number"):
            checkpoint.load(ckpt)


def test_meta_json_of_old_versions_loads_as_before(tmp_path: Path, images: torch.Tensor) -> None:
    """Files from before ``format`` and ``learn_p``: no warning, same network, same keys.

    Old files always wrote ``remove_last_stride`` (false); the one change is that a cgd meta
    without ``learn_p`` now keeps its (trained, loaded) p fixed.
    """
    for meta in (
        NetworkMeta(backbone="efficientnet_lite0", head="cgd", dim=32, remove_last_stride=False),
        NetworkMeta(backbone="efficientnet_lite0", pooling="gem"),
    ):
        net = _perturbed(dataclasses.replace(meta, learn_p=True))  # old code learned p
        ckpt = str(tmp_path / meta.head)
        checkpoint.save(ckpt, net)
        old = json.loads(read_bytes(f"{ckpt}/meta.json"))
        del old["format"], old["learn_p"]
        write_bytes(f"{ckpt}/meta.json", json.dumps(old).encode())
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            loaded = checkpoint.load(ckpt).network
        assert loaded.meta.remove_last_stride is False
        assert loaded.state_dict().keys() == net.state_dict().keys()
        with torch.no_grad():
            torch.testing.assert_close(loaded(images), net(images))
        (gem_pool,) = (m for m in loaded.modules() if isinstance(m, GeM))
        assert isinstance(gem_pool.p, torch.nn.Parameter) and gem_pool.exponent == 2.5
        assert gem_pool.p.requires_grad is (meta.head == "gem")
        assert loaded.meta.learn_p is (meta.head == "gem")


def test_gem_p_trains_faster_and_without_decay() -> None:
    net = build_network(NetworkMeta(backbone="efficientnet_lite0"), weights=None)
    groups = parameter_groups(net, lr=1e-3, weight_decay=1e-4)
    assert [g["lr"] for g in groups] == [1e-3, 1e-2]
    assert groups[1]["weight_decay"] == 0.0 and groups[1]["params"] == [net.head.pool.p]
    counted = sum(p.numel() for g in groups for p in g["params"])
    assert counted == sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("backbone, stages", [("efficientnet_lite0", 9), ("vgg16", 5)])
def test_a_frozen_trunk_prefix_gets_no_gradient(
    backbone: str, stages: int, images: torch.Tensor
) -> None:
    """Only the last stages and the head train; the trunk's stages cover it in forward order."""
    net = build_network(NetworkMeta(backbone=backbone), weights=None).train()
    parts = net.backbone.stages()
    assert len(parts) == stages
    assert sum(p.numel() for s in parts for p in s.parameters()) == sum(
        p.numel() for p in net.backbone.parameters()
    )
    x = images
    for stage in parts:  # the stages in order are the trunk
        x = stage(x) if not isinstance(stage, torch.nn.ModuleList) else stage[1](stage[0](x))
    torch.testing.assert_close(x, net.backbone(images))
    frozen = networks.freeze_trunk(net, 2)
    assert frozen == sum(p.numel() for s in parts[:-2] for p in s.parameters())
    net(images).sum().backward()
    for i, stage in enumerate(parts):
        grads = [p.grad for p in stage.parameters()]
        assert (
            all(g is None for g in grads)
            if i < stages - 2
            else any(g is not None and g.abs().sum() > 0 for g in grads)
        )
    assert net.head.pool.p.grad is not None
    trained = sum(p.numel() for g in parameter_groups(net, 1e-3, 0.0) for p in g["params"])
    assert trained == sum(p.numel() for p in net.parameters()) - frozen
    with pytest.raises(ValueError, match=f"has {stages} stages; train 0 to {stages}"):
        networks.freeze_trunk(net, stages + 1)


def test_head_defaults_follow_each_paper(images: torch.Tensor) -> None:
    """GeM: strides kept, p learned. CGD: last stride removed, p fixed at 3 (no 10× group)."""
    gem_meta, cgd_meta = NetworkMeta(), NetworkMeta(head="cgd")
    assert (gem_meta.remove_last_stride, gem_meta.learn_p) == (False, True)
    assert (cgd_meta.remove_last_stride, cgd_meta.learn_p) == (True, False)
    explicit = NetworkMeta(head="cgd", remove_last_stride=False, learn_p=True)
    assert (explicit.remove_last_stride, explicit.learn_p) == (False, True)
    lite0 = dataclasses.replace(cgd_meta, backbone="efficientnet_lite0", dim=32)
    cgd = build_network(lite0, weights=None)
    kept = build_network(dataclasses.replace(lite0, remove_last_stride=False), weights=None)
    assert cgd.backbone(images).shape[-2:] == (4, 4) and kept.backbone(images).shape[-2:] == (2, 2)
    (pool,) = (m for m in cgd.modules() if isinstance(m, GeM))
    assert pool.p.requires_grad is False and pool.exponent == 3.0
    groups = parameter_groups(cgd, lr=1e-3, weight_decay=1e-4)
    assert [g["lr"] for g in groups] == [1e-3]
    assert all(p is not pool.p for p in groups[0]["params"])
    learned = build_network(dataclasses.replace(lite0, learn_p=True), weights=None)
    assert [g["lr"] for g in parameter_groups(learned, lr=1e-3, weight_decay=0.0)] == [1e-3, 1e-2]
    with pytest.raises(ValueError, match="learn_p"):
        NetworkMeta(learn_p="yes")


def test_meta_stores_canonical_names() -> None:
    """Names in any case build the same network and are recorded as built (meta.json, caches)."""
    meta = NetworkMeta(backbone="efficientnet_lite0", pooling="GeM", p=4.0, per_channel_p=True)
    assert meta.pooling == "gem"
    net = build_network(meta, weights=None)
    assert net.head.pool.p.shape == (1280,) and net.head.pool.p.tolist() == [4.0] * 1280
    assert NetworkMeta(pooling="MAC").pooling == "mac"
    cgd = NetworkMeta(head="CGD", descriptors="smg")
    assert (cgd.head, cgd.descriptors) == ("cgd", "SMG")
    with pytest.raises(ValueError, match=r"unknown pooling 'rmac'; choose one of \['gem', 'mac'"):
        NetworkMeta(pooling="rmac")


def test_default_network_is_pretrained_lite0() -> None:
    net = build_network(NetworkMeta())
    assert net.meta.backbone == "efficientnet_lite0" and net.backbone.weights == "imagenet"


def test_logits_only_from_the_cgd_head(images: torch.Tensor) -> None:
    net = build_network(NetworkMeta(backbone="efficientnet_lite0"), weights=None)
    with pytest.raises(ValueError, match="CGD"):
        net(images, return_logits=True)
    with pytest.raises(ValueError, match="unknown head"):
        NetworkMeta(head="netvlad")


def test_folded_whitening_describes_as_applying_it(images: torch.Tensor) -> None:
    """Lw folded into the head's FC layer (W = P, b = −P m) gives apply_whitening's output."""
    net = _perturbed(NetworkMeta(backbone="efficientnet_lite0"))
    rng = np.random.default_rng(0)
    m = rng.standard_normal(net.out_dim) * 0.01
    P = rng.standard_normal((32, net.out_dim))
    folded = fold_whitening(net, m, P).eval()
    assert folded.meta.whitening_dim == 32 and folded.out_dim == 32
    with torch.no_grad():
        plain, whitened = net(images).numpy(), folded(images).numpy()
    np.testing.assert_allclose(whitened, apply_whitening(plain, m, P), atol=1e-5)
    with pytest.raises(ValueError, match="without a whitening layer"):
        fold_whitening(folded, m[:32], P[:, :32])
    with pytest.raises(ValueError, match="does not fit descriptors of 1280"):
        fold_whitening(net, m[:10], P[:, :10])
