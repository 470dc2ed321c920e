"""Batched extraction gives the same descriptors as one image at a time, in input order."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from model.extraction import (
    DEFAULT_SCALES,
    ArrayImages,
    ExtractOptions,
    ImageFiles,
    extract_descriptors,
    extract_multihead,
    resized_size,
    size_grouped_batches,
)
from model.heads import GeMHead
from model.networks import NetworkMeta, RetrievalNet
from model.pooling import gem, l2n

CPU = ExtractOptions(device="cpu", progress=False)


class TinyTrunk(nn.Module):
    """Two convolutions and a ReLU: enough to make descriptors depend on content and size."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.ReLU()
        )
        self.out_channels, self.mean, self.std = 16, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.fixture(scope="module")
def net() -> RetrievalNet:
    trunk = TinyTrunk()
    return RetrievalNet(trunk, GeMHead(16, p=3.0), NetworkMeta(backbone="tiny")).eval()


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    sizes = [(40, 60), (32, 32), (40, 60), (50, 30), (32, 32), (40, 60), (33, 47)]
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def _reference(net: RetrievalNet, img: np.ndarray, scales=(1.0,)) -> np.ndarray:
    """One image, fp32, written out from the definition (the GeM paper's multi-scale rule)."""
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    x = (x - torch.tensor(net.mean).view(1, 3, 1, 1)) / torch.tensor(net.std).view(1, 3, 1, 1)
    p = 3.0
    acc = 0
    with torch.no_grad():
        for s in scales:
            xs = x if s == 1 else F.interpolate(x, scale_factor=s, mode="bilinear")
            acc = acc + l2n(gem(net.backbone(xs), p=p)).pow(p)
    return l2n((acc / len(scales)).pow(1 / p))[0].numpy()


def test_size_groups_cover_every_image_once() -> None:
    sizes = [(4, 4), (2, 2), (4, 4), (4, 4), (2, 2), (3, 5)]
    batches = size_grouped_batches(sizes, batch_size=2)
    assert sorted(i for b in batches for i in b) == list(range(len(sizes)))
    for batch in batches:
        assert len(batch) <= 2 and len({sizes[i] for i in batch}) == 1
    with pytest.raises(ValueError, match="batch_size"):
        size_grouped_batches(sizes, 0)


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_batched_equals_one_at_a_time(net, images, batch_size: int) -> None:
    options = ExtractOptions(batch_size=batch_size, device="cpu", progress=False)
    got = extract_descriptors(net, ArrayImages(images), options)
    expected = np.stack([_reference(net, img) for img in images])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert got.dtype == np.float32


def test_multiscale_is_the_power_mean_over_scales(net, images) -> None:
    options = ExtractOptions(scales=DEFAULT_SCALES, batch_size=4, device="cpu", progress=False)
    got = extract_descriptors(net, ArrayImages(images), options)
    expected = np.stack([_reference(net, img, DEFAULT_SCALES) for img in images])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    single = extract_descriptors(net, ArrayImages(images), CPU)
    assert not np.allclose(got, single, atol=1e-3)  # the scales really contribute
    assert (1.0, 1 / math.sqrt(2), 0.5) == DEFAULT_SCALES


def test_heads_share_one_pass_and_match_separate_runs(net, images) -> None:
    heads = {"gem": net.head, "mac": GeMHead(16, pooling="mac")}
    together = extract_multihead(net.backbone, heads, ArrayImages(images), CPU)
    for name, head in heads.items():
        alone = RetrievalNet(net.backbone, head, net.meta)
        np.testing.assert_allclose(
            together[name], extract_descriptors(alone, ArrayImages(images), CPU), atol=1e-6
        )


def test_resize_never_enlarges() -> None:
    assert resized_size(800, 600, 400) == (400, 300)
    assert resized_size(300, 200, 400) == (300, 200)
    assert resized_size(300, 200, None) == (300, 200)


def test_image_files_resize_crop_and_rotate(tmp_path: Path) -> None:
    photo = np.zeros((300, 400, 3), dtype=np.uint8)
    photo[50:250, 100:300] = (255, 0, 0)
    Image.fromarray(photo).save(tmp_path / "a.png")
    files = ImageFiles([tmp_path / "a.png"] * 2, max_size=200, boxes=[None, (100, 50, 300, 250)])
    # The whole photo goes to 200x150; the crop is scaled by the same factor, 0.5.
    assert files.sizes == [(150, 200), (100, 100)]
    crop = files[1]
    assert crop.shape == (3, 100, 100) and crop[0].float().mean() > 250 and crop[1].max() < 5
    # A photo stored landscape with EXIF orientation 6 (rotate 90°) is portrait.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(photo).save(tmp_path / "r.jpg", exif=exif)
    rotated = ImageFiles([tmp_path / "r.jpg"], max_size=200)
    assert rotated.sizes == [(200, 150)] and rotated[0].shape == (3, 200, 150)


def test_bad_images_and_boxes_are_named(tmp_path: Path) -> None:
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=r"broken\.jpg"):
        ImageFiles([tmp_path / "broken.jpg"])
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(tmp_path / "ok.png")
    with pytest.raises(ValueError, match="outside"):
        ImageFiles([tmp_path / "ok.png"], boxes=[(0, 0, 20, 5)])
    with pytest.raises(ValueError, match="uint8"):
        ArrayImages([np.zeros((4, 4), np.float32)])
    with pytest.raises(ValueError, match="scales"):
        extract_descriptors(
            RetrievalNet(TinyTrunk(), GeMHead(16), NetworkMeta()),
            ArrayImages([np.zeros((8, 8, 3), np.uint8)]),
            ExtractOptions(scales=()),
        )


def test_bf16_autocast_path_agrees_with_fp32(images) -> None:
    """The GPU's bf16 path, run on the CPU: same descriptors to bf16 precision, same order."""
    from model.backbones import build_backbone

    torch.manual_seed(0)
    net = RetrievalNet(build_backbone("efficientnet_lite0"), GeMHead(1280), NetworkMeta()).eval()
    fp32 = extract_descriptors(net, ArrayImages(images), CPU)
    bf16 = extract_descriptors(
        net, ArrayImages(images), ExtractOptions(device="cpu", bf16=True, progress=False)
    )
    assert bf16.dtype == np.float32 and np.isfinite(bf16).all()
    cosines = (fp32 * bf16).sum(axis=1)
    assert cosines.min() > 0.99, cosines
    assert not np.array_equal(fp32, bf16)  # the autocast really ran
