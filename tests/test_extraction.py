"""Batched extraction gives the same descriptors as one image at a time, in input order."""

import io
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from model.backbones import build_backbone
from model.extraction import (
    DEFAULT_SCALES,
    ArrayImages,
    ExtractOptions,
    ImageError,
    ImageFiles,
    describe_batch,
    extract_descriptors,
    extract_multihead,
    resized_size,
    size_grouped_batches,
)
from model.heads import GeMHead
from model.images import BadImage, decode_image
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
    together = extract_multihead(net.backbone, heads, ArrayImages(images), options=CPU)
    for name, head in heads.items():
        alone = RetrievalNet(net.backbone, head, net.meta)
        np.testing.assert_allclose(
            together.descriptors[name],
            extract_descriptors(alone, ArrayImages(images), CPU),
            atol=1e-6,
        )


def test_resize_never_enlarges() -> None:
    assert resized_size(800, 600, 400) == (400, 300)
    assert resized_size(300, 200, 400) == (300, 200)
    assert resized_size(300, 200, None) == (300, 200)


def test_image_files_resize_crop_and_rotate(tmp_path: Path) -> None:
    photo = np.zeros((300, 400, 3), dtype=np.uint8)
    photo[50:250, 100:300] = (255, 0, 0)
    Image.fromarray(photo).save(tmp_path / "a.png")
    files = ImageFiles(
        [tmp_path / "a.png"] * 2,
        max_size=200,
        boxes=[None, (100, 50, 300, 250)],
        exif_transpose=True,
    )
    # The whole photo goes to 200x150; the crop is scaled by the same factor, 0.5.
    assert files.sizes == [(150, 200), (100, 100)]
    index, crop = files[1]
    assert index == 1 and crop.shape == (100, 100, 3)
    assert crop[..., 0].mean() > 250 and crop[..., 1].max() < 5


def test_exif_rotation_is_the_callers_explicit_choice(tmp_path: Path) -> None:
    """Phone photos are turned upright; the revisited protocol reads stored pixels, boxes too."""
    photo = np.zeros((300, 400, 3), dtype=np.uint8)
    photo[:, :200] = 255  # left half white in the stored frame
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to view"
    Image.fromarray(photo).save(tmp_path / "r.jpg", exif=exif, quality=95)
    upright = ImageFiles([tmp_path / "r.jpg"], max_size=200, exif_transpose=True)
    assert upright.sizes == [(200, 150)] and upright[0][1].shape == (200, 150, 3)
    assert upright[0][1][:100].mean() > 200 and upright[0][1][-100:].mean() < 50  # top white
    stored = ImageFiles(
        [tmp_path / "r.jpg"], max_size=None, boxes=[(0, 0, 200, 300)], exif_transpose=False
    )
    assert stored.sizes == [(300, 200)] and stored[0][1].mean() > 240  # the box's white half
    with pytest.raises(TypeError, match="exif_transpose"):
        ImageFiles([tmp_path / "r.jpg"])  # no default: every caller says which frame it wants


def _truncated_jpeg(path: Path) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _bomb_png(path: Path, width: int = 20_000, height: int = 20_000) -> None:
    """A PNG whose header claims 400 megapixels: a few hundred bytes on disk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (3 * width + 1))  # one row; the rest is missing
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def test_bad_photos_are_reported_and_the_rest_described(net, tmp_path: Path) -> None:
    """Every kind of bad photo is named with its reason; the good ones are still described."""
    good = np.random.default_rng(1).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(good).save(tmp_path / "good.png")
    (tmp_path / "noise.jpg").write_bytes(b"not a jpeg")
    _truncated_jpeg(tmp_path / "truncated.jpg")
    _bomb_png(tmp_path / "bomb.png")
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(tmp_path / "small.png")
    names = ["good.png", "noise.jpg", "truncated.jpg", "bomb.png", "missing.jpg", "small.png"]
    boxes = [None, None, None, None, None, (0, 0, 20, 5)]
    files = ImageFiles([tmp_path / n for n in names], boxes=boxes, exif_transpose=True)
    # Header problems are known before anything is decoded; the truncated file is not.
    assert sorted(files.failed) == [1, 3, 4, 5]
    result = extract_multihead(net.backbone, {"gem": net.head}, files, options=CPU)
    assert result.indices.tolist() == [0]
    assert sorted(result.failed) == [1, 2, 3, 4, 5]
    reasons = result.failed
    assert "noise.jpg" in reasons[1] and "not a readable image" in reasons[1]
    assert "truncated.jpg" in reasons[2] and "truncated" in reasons[2]
    assert "bomb.png" in reasons[3] and "decompression bomb" in reasons[3]
    assert "missing.jpg" in reasons[4] and "missing" in reasons[4]
    assert "small.png" in reasons[5] and "outside" in reasons[5]
    expected = extract_descriptors(net, ArrayImages([good]), CPU)
    np.testing.assert_allclose(result.descriptors["gem"], expected, atol=1e-6)
    with pytest.raises(ImageError, match=r"5 image\(s\).*noise\.jpg"):
        extract_descriptors(net, files, CPU)  # the strict form names them


def test_decoding_bytes_returns_the_failure() -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.full((5, 7, 3), 9, np.uint8)).save(buffer, format="PNG")
    decoded = decode_image(buffer.getvalue(), exif_transpose=True)
    assert isinstance(decoded, np.ndarray) and decoded.shape == (5, 7, 3)
    assert decoded.dtype == np.uint8 and (decoded == 9).all()
    bad = decode_image(buffer.getvalue()[:40], exif_transpose=True)
    assert isinstance(bad, BadImage) and bad.reason


@pytest.mark.parametrize("shape", [(1, 300), (300, 1), (2, 2), (1, 1)])
def test_photos_of_one_or_two_pixels_at_every_scale(net, shape) -> None:
    """F.interpolate used to fail at 1/√2 on a 1×300 photo; now every scale has a pixel."""
    image = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    options = ExtractOptions(scales=DEFAULT_SCALES, device="cpu", progress=False)
    lite = RetrievalNet(build_backbone("efficientnet_lite0"), GeMHead(1280), NetworkMeta()).eval()
    out = extract_descriptors(lite, ArrayImages([image]), options)
    assert out.shape == (1, 1280) and np.isfinite(out).all()


def test_photo_below_the_trunks_receptive_field_is_reported() -> None:
    vgg = build_backbone("vgg16")
    head = GeMHead(vgg.out_channels)
    images = [np.zeros((12, 40, 3), np.uint8), np.full((40, 40, 3), 128, np.uint8)]
    options = ExtractOptions(scales=(1.0, 0.5), device="cpu", progress=False)
    result = extract_multihead(vgg, {"gem": head}, ArrayImages(images), options=options)
    assert result.indices.tolist() == [1]
    assert "too small for vgg16" in result.failed[0] and "needs 16" in result.failed[0]


class NaNHead(nn.Module):
    """A head whose second batch comes out NaN, as a diverged network's would."""

    out_dim, scale_exponent = 4, 1.0

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.full((fmap.shape[0], 4), float("nan") if self.calls == 2 else 1.0)


def test_non_finite_descriptor_names_its_image(net, caplog) -> None:
    images = [np.zeros((8, 8, 3), np.uint8), np.full((8, 8, 3), 255, np.uint8)]
    with caplog.at_level("WARNING", logger="model.extraction"):
        result = extract_multihead(
            net.backbone,
            {"odd": NaNHead()},
            ArrayImages(images),
            options=ExtractOptions(device="cpu", progress=False),
        )
    assert result.indices.tolist() == [0] and "non-finite" in result.failed[1]
    assert "image #1: non-finite descriptor" in caplog.text  # named when found


def test_describe_batch_is_the_per_batch_core(net, images) -> None:
    same_size = np.stack([img for img in images if img.shape[:2] == (40, 60)])
    out = describe_batch(net.backbone, {"gem": net.head}, same_size, scales=DEFAULT_SCALES)
    expected = np.stack([_reference(net, img, DEFAULT_SCALES) for img in same_size])
    np.testing.assert_allclose(out["gem"], expected, atol=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        describe_batch(net.backbone, {"gem": net.head}, same_size.astype(np.float32))


def test_bad_arguments_are_named() -> None:
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
