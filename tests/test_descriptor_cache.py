"""The descriptor cache: written as it goes, so an interrupted run keeps what it extracted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.backbones import build_backbone
from model.descriptor_cache import DescriptorCache
from model.extraction import ExtractOptions, ImageFiles, extract_multihead
from model.heads import GeMHead


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(10):
        path = folder / f"p{i}.png"
        Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def network():
    torch.manual_seed(0)
    backbone = build_backbone("efficientnet_lite0")
    return backbone, {"descriptor": GeMHead(backbone.out_channels)}


OPTIONS = ExtractOptions(device="cpu", progress=False)


def test_an_interrupted_run_keeps_its_finished_chunks(photos, network, tmp_path) -> None:
    backbone, heads = network
    images = ImageFiles(photos, 64, exif_transpose=True)
    root = photos[0].parent
    cache = DescriptorCache(tmp_path / "cache", {"net": "lite0"}, chunk_size=3)
    calls = []

    def crashing(part: ImageFiles):
        calls.append(len(part))
        if len(calls) == 3:
            raise KeyboardInterrupt  # the user stops the run during the third chunk
        return extract_multihead(backbone, heads, part, options=OPTIONS)

    with pytest.raises(KeyboardInterrupt):
        cache.extract("db", images, root, extract=crashing, progress=False)
    assert len(list((cache.folder / "db").glob("part-*.npz"))) == 2  # 6 photos kept

    def describe(part: ImageFiles):
        calls.append(len(part))
        return extract_multihead(backbone, heads, part, options=OPTIONS)

    calls.clear()
    result, n_new = cache.extract("db", images, root, extract=describe, progress=False)
    assert n_new == 4 and calls == [3, 1]
    assert result.indices.tolist() == list(range(10))
    direct = extract_multihead(backbone, heads, images, options=OPTIONS).descriptors["descriptor"]
    np.testing.assert_allclose(result.descriptors["descriptor"], direct, atol=1e-6)
    again, n_new = cache.extract("db", images, root, extract=describe, progress=False)
    assert n_new == 0 and np.array_equal(
        again.descriptors["descriptor"], result.descriptors["descriptor"]
    )


def test_device_and_bf16_are_part_of_the_key(tmp_path) -> None:
    fp32 = ExtractOptions(device="cpu").identity()
    bf16 = ExtractOptions(device="cpu", bf16=True).identity()
    assert fp32["device"] == "cpu" and fp32["bf16"] is False and bf16["bf16"] is True
    folders = {DescriptorCache(tmp_path, {"net": "x", **o}).folder for o in (fp32, bf16)}
    assert len(folders) == 2
