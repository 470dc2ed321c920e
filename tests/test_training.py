"""The training workers' parts that need no Ray: batching by size, CGD's splits and Recall@K."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.describer import decode_photo
from model.images import image_id
from model.networks import NetworkMeta, build_network
from pipeline.train import TrainConf, handed_over
from pipeline.train.cgd import held_out_recall, split_classes
from pipeline.train.images import (
    decode_photos,
    embed,
    freeze_batchnorm,
    mean_std,
    resolve_precision,
)
from tests.helpers import write_images


def test_batched_by_size_equals_one_image_at_a_time() -> None:
    """Photos of two sizes in one call: grouped into batches, answered in input order, equal
    to the network run on each photo alone (BatchNorm frozen), gradients flowing."""

    torch.manual_seed(0)
    net = build_network(NetworkMeta(backbone="efficientnet_lite0"), "imagenet")
    net.train()
    freeze_batchnorm(net)
    rng = np.random.default_rng(0)
    photos = [
        rng.integers(0, 256, (64, 96, 3) if i % 3 else (80, 64, 3), dtype=np.uint8)
        for i in range(7)
    ]
    device = torch.device("cpu")
    precision = resolve_precision("fp32", device, batch_size=2)
    out = embed(net, photos, mean_std(net, device), precision=precision, device=device)
    assert out.shape == (7, net.out_dim) and out.requires_grad
    alone = torch.cat(
        [embed(net, [p], mean_std(net, device), precision=precision, device=device) for p in photos]
    )
    torch.testing.assert_close(out, alone, atol=1e-5, rtol=1e-4)
    out.sum().backward()
    assert net.backbone.parameters().__next__().grad is not None
    augmented = embed(
        net,
        photos,
        mean_std(net, device),
        precision=precision,
        device=device,
        generator=torch.Generator().manual_seed(1),
    )
    assert augmented.shape == out.shape and not torch.allclose(augmented, out)


def test_precision_follows_the_device() -> None:
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert not resolve_precision("auto", cpu).bf16 and resolve_precision("auto", gpu).bf16
    assert resolve_precision("auto", gpu).channels_last
    assert not resolve_precision("fp32", gpu).bf16 and resolve_precision("bf16", cpu).bf16
    with pytest.raises(ValueError, match="precision 'fp16'"):
        resolve_precision("fp16", cpu)


def test_classes_are_held_out_whole() -> None:
    labels = np.array(["a"] * 5 + ["b"] * 4 + ["c"] * 3 + ["d"] * 3 + ["e"] * 2 + ["f"])
    train, val = split_classes(labels, held_out=0.34, seed=0)
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(len(labels)))
    assert not set(labels[train]) & set(labels[val])
    assert len(set(labels[val])) == 2 and "f" in set(labels[train])  # one photo: train only
    with pytest.raises(ValueError, match="3 classes with 2 or more photos"):
        split_classes(np.array(list("aabbccd")), held_out=0.5)


def test_held_out_recall_equals_a_brute_force_count() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 30)
    x = rng.standard_normal((30, 8)) + 1.5 * np.eye(8)[labels]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    found = held_out_recall(x, labels)
    for k in (1, 2, 4, 8):
        hits = 0
        for q in range(30):
            others = [i for i in np.argsort(-(x @ x[q])) if i != q][:k]
            hits += any(labels[i] == labels[q] for i in others)
        assert found[f"val_recall@{k}"] == pytest.approx(hits / 30)


def test_validation_photos_are_extracts_pixels_and_training_photos_near_them(
    photos_dir, tmp_path
) -> None:
    """Real photos at 1024 px: held losslessly (validation's) they are, to the byte, the pixels
    extract's decoding gives; held as JPEG (training's) they differ by re-encoding only."""
    paths = sorted(photos_dir.glob("*/*.jpg"))[::60][:5]
    images = write_images(tmp_path, paths)
    ids = [image_id(p.read_bytes()) for p in paths]
    lossless = decode_photos(str(images), ids, 1024, lossless=True)
    lossy = decode_photos(str(images), ids, 1024)
    for i, path in enumerate(paths):
        expected = decode_photo(path.read_bytes(), 1024)
        assert lossless.shapes[i] == expected.shape[:2] and max(expected.shape) == 1024
        np.testing.assert_array_equal(lossless[i], expected)
        error = np.abs(lossy[i].astype(np.int16) - expected).mean()
        assert 0 < error < 3, f"{path.name}: JPEG moved pixels {error:.2f} on average"
    assert lossy.nbytes < lossless.nbytes


def test_an_epoch_is_scored_as_the_run_hands_it_over() -> None:
    """With Lw kept if better, an epoch's figure is the higher of plain and with its Lw; with
    Lw always kept, the Lw figure; without Lw, or in CGD mode, the plain one."""

    gem = TrainConf(pairs="p", images="i", output="o")
    epoch = {"val_map": 0.99, "val_map_lw": 0.97}
    assert handed_over(gem, epoch, "val_map") == 0.99
    assert handed_over(gem, {**epoch, "val_map_lw": 0.995}, "val_map") == 0.995
    assert (
        handed_over(
            TrainConf.from_flags(pairs="p", images="i", output="o", keep_whitening="always"),
            epoch,
            "val_map",
        )
        == 0.97
    )
    assert (
        handed_over(
            TrainConf.from_flags(pairs="p", images="i", output="o", whiten=False), epoch, "val_map"
        )
        == 0.99
    )
