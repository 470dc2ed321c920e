"""What only a GPU can show: the CUDA paths give the descriptors the CPU gives, and FAISS on
the GPU (where the FAISS build has one) serves and mines as the CPU does.

Run by ``device/gpu-checks`` on a lent GPU machine; on a machine without CUDA every test skips,
naming why, and the FAISS ones skip with faiss-cpu. The photos are made here (smooth random
scenes): the real ones do not travel. ``tests/test_gpu_paths.py`` asserts the same paths'
decisions and locking on a CPU.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import faiss
import numpy as np
import pytest
import torch

from cluster import index_store
from cluster.mining import MiningIndex
from cluster.shards import GPU_MAX_K, GpuDevice, ShardSet, gpu_count, gpu_plan
from model.describer import Describer, NetworkSettings
from model.descriptors import write_descriptors
from model.extraction import ArrayImages, ExtractOptions, extract_descriptors
from model.networks import NetworkMeta, build_network
from pipeline.index import IndexConf
from pipeline.index import run as build_index

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


# --- FAISS on the GPU: the serving slot, the mining index ------------------------------------

faiss_gpu = pytest.mark.skipif(
    gpu_count() == 0,
    reason="this FAISS build sees no GPU (faiss-cpu); bench/gpu.sh says what faiss-gpu needs",
)
NETWORK = {"weights": "imagenet", "meta": {"backbone": "efficientnet_lite0"}}


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@faiss_gpu
def test_slots_place_shards_as_planned_and_answer_as_the_cpu_under_64_threads(
    ray_session, tmp_path
):
    """Flat and IVF-PQ of 32 bytes on the GPU (float32 tables), 64 bytes (float16 tables),
    128 bytes kept on the CPU: each GPU slot, called from 64 threads at once, answers as a CPU
    slot asked one query at a time, and gives the stored vectors αQE asks for."""
    rng = np.random.default_rng(2)
    x = _unit(rng.standard_normal((20_000, 128)))
    ids = [f"img-{i:06d}" for i in range(len(x))]
    desc = write_descriptors(str(tmp_path / "d"), ids, x, network=NETWORK)
    queries = _unit(rng.standard_normal((256, 128)))
    expected = {"Flat": (True, False), "IVF64,PQ32": (True, False)}
    expected |= {"IVF64,PQ64": (True, True), "IVF64,PQ128": (False, False)}
    for factory, (on_gpu, float16) in expected.items():
        root = str(tmp_path / factory.replace(",", "-"))
        train = 10 * 256 if "PQ" in factory else None  # codes only compared, not judged
        build_index(
            IndexConf(descriptors=desc, output=root, factory=factory, nprobe=16, train_size=train)
        )
        shard, _ = index_store.load_shard(root, index_store.read_manifest(root), 0)
        assert (gpu_plan(shard).gpu, gpu_plan(shard).float16_lookup) == (on_gpu, float16)
        cpu, slot = ShardSet(root), ShardSet(root, gpu=True)
        assert slot.on_gpu(1) == [on_gpu, on_gpu]

        def ask(q: np.ndarray, slot: ShardSet = slot) -> tuple[np.ndarray, ...]:
            found = slot.search(q[None], 10, 1)
            stored = slot.vectors(found.ids[0], 1)
            return found.ids[0], found.scores[0], np.stack([stored[int(i)] for i in found.ids[0]])

        with ThreadPoolExecutor(max_workers=64) as pool:
            together = list(pool.map(ask, queries))
        alone = [ask(q, cpu) for q in queries]
        got, want = np.stack([t[0] for t in together]), np.stack([a[0] for a in alone])
        overlap = np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got, want, strict=True)])
        if float16:  # float16 lookup tables: the same neighbours, nearly
            assert overlap > 0.9, (factory, overlap)
            continue
        assert overlap > 0.99, (factory, overlap)
        for (g_ids, g_scores, g_vectors), (w_ids, w_scores, w_vectors) in zip(
            together, alone, strict=True
        ):
            if np.array_equal(g_ids, w_ids):
                np.testing.assert_allclose(g_scores, w_scores, atol=1e-4)
                np.testing.assert_array_equal(g_vectors, w_vectors)  # from the CPU index
        if factory == "Flat":
            np.testing.assert_array_equal(got, want)


@faiss_gpu
def test_a_gpu_flat_index_answers_as_the_cpu_and_past_its_k_from_the_cpu():
    x = _unit(np.random.default_rng(3).standard_normal((5_000, 64)))
    flat = faiss.IndexFlatIP(64)
    flat.add(x)
    placed = GpuDevice().place(flat)
    assert placed.on_gpu
    _, want = flat.search(x[:32], 10)
    np.testing.assert_array_equal(placed.search(x[:32], 10)[1], want)
    assert placed.search(x[:4], GPU_MAX_K + 1)[1].shape == (4, GPU_MAX_K + 1)
    placed.release()
    assert not placed.on_gpu
    np.testing.assert_array_equal(placed.search(x[:32], 10)[1], want)


@faiss_gpu
def test_the_mining_index_on_the_gpu_finds_the_cpus_negatives():
    rng = np.random.default_rng(4)
    clusters = np.repeat(np.arange(500), 6)
    centres = _unit(rng.standard_normal((500, 96)))
    x = _unit(centres[clusters] + 0.1 * rng.standard_normal((len(clusters), 96)))
    found = {}
    for gpu in (False, True):
        mining = MiningIndex(factory="Flat", gpu=gpu)
        mining.reset(0, len(x))
        mining.add(np.arange(len(x)), x, clusters)
        found[gpu] = mining.mine(x[:200], clusters[:200], nnum=5)[0]
        assert mining.describe()["on_gpu"] is gpu
    np.testing.assert_array_equal(found[True], found[False])
