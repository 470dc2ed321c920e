"""What only a GPU can show: the CUDA paths give the descriptors the CPU gives.

Run by ``device/gpu-checks`` on a lent GPU machine; on a machine without CUDA every test skips,
naming why. The photos are made here (smooth random scenes): the real ones do not travel.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.describer import Describer, NetworkSettings
from model.extraction import ArrayImages, ExtractOptions, extract_descriptors
from model.networks import NetworkMeta, build_network

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA GPU here; device/gpu-checks runs these on one"
)


def _scenes(count: int) -> list[np.ndarray]:
    """Photos of smooth random scenes, of two sizes (the GPU batches by size)."""
    rng = np.random.default_rng(0)
    photos = []
    for i in range(count):
        h, w = (240, 320) if i % 2 else (320, 240)
        coarse = rng.uniform(0, 255, size=(h // 16, w // 16, 3)).astype(np.float32)
        photo = np.kron(coarse, np.ones((16, 16, 1), np.float32))
        photos.append(np.clip(photo + rng.normal(0, 8, photo.shape), 0, 255).astype(np.uint8))
    return photos


def test_descriptors_under_bf16_on_the_gpu_match_the_cpus():
    net = build_network(NetworkMeta(), "imagenet").eval()
    photos = ArrayImages(_scenes(8))
    cpu = extract_descriptors(net, photos, ExtractOptions(device="cpu", progress=False))
    gpu = extract_descriptors(net, photos, ExtractOptions(device="cuda", progress=False))
    assert ExtractOptions(device="cuda").resolved_bf16()  # the GPU path is the bf16 one
    cosine = np.sum(cpu * gpu, axis=1)
    assert cosine.min() > 0.99, cosine


def test_the_extract_stages_actor_describes_on_the_gpu_as_on_the_cpu():
    describer = Describer(NetworkSettings(max_size=320))
    assert describer.device.type == "cuda"
    photos = _scenes(6)
    vectors = np.stack(describer.describe(photos))
    net = build_network(NetworkMeta(), "imagenet").eval()
    on_cpu = ExtractOptions(device="cpu", progress=False)
    cpu = extract_descriptors(net, ArrayImages(photos), on_cpu)
    assert np.sum(vectors * cpu, axis=1).min() > 0.99
