"""The GPU paths' decisions and locking, on this machine's CPU with real FAISS indexes.

Where a shard goes (``cluster.shards.gpu_plan``) is decided from the CPU index's structure
alone (its type, code size, quantizer and nprobe, which training does not change), so it is
asserted on indexes made by FAISS's factory as the index stage makes them, untrained (a PQ of
128 sub-quantizers takes minutes to train on 2 cores). The lock that makes a GPU index's
searches one at a time, and the CPU index that answers ``reconstruct`` (αQE) and searches for
more than the GPU selects, are asserted with a second real CPU index standing where the GPU
clone stands on a GPU machine. ``tests/test_gpu.py`` runs the same paths on a GPU.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import faiss
import numpy as np
import pytest

from cluster import index_store
from cluster.shards import GPU_MAX_K, DeviceIndex, Loaded, ShardSet, gpu_plan, search_parts
from model.descriptors import write_descriptors
from pipeline.index import IndexConf, choose_factory, train_index
from pipeline.index import run as build_index

DIM = 256
NETWORK = {"weights": "imagenet", "meta": {"backbone": "efficientnet_lite0"}}


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    return _unit(np.random.default_rng(3).standard_normal((10_000, DIM)))


def _index(factory: str, dim: int = DIM) -> faiss.Index:
    return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)


def _trained(factory: str, x: np.ndarray) -> faiss.Index:
    """``factory`` trained and filled by the index stage's own training, as a shard is."""
    index, _ = train_index(factory, x, seed=0)
    index.add(x)
    return index


# --- Where an index goes -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("m", "gpu", "float16"),
    [(128, False, False), (96, True, True), (64, True, True), (48, True, False), (32, True, False)],
)
def test_ivf_pq_goes_to_the_gpu_by_its_code_size(m, gpu, float16):
    plan = gpu_plan(_index(f"IVF16,PQ{m}", dim=384))
    assert (plan.gpu, plan.float16_lookup) == (gpu, float16), plan
    assert str(m) in plan.reason


def test_autos_large_codes_stay_on_the_cpu_and_its_small_ones_take_float16_behind_opq():
    big = choose_factory(5_000_000, 1280, "16G")  # what --factory auto builds at that size
    assert big.startswith("OPQ") and ",PQ256" in big
    plan = gpu_plan(_index(big, dim=1280))
    assert not plan.gpu and "256" in plan.reason
    plan = gpu_plan(_index("OPQ64_256,IVF64,PQ64"))
    assert plan.gpu and plan.float16_lookup  # the rotation stays in front, the PQ decides


@pytest.mark.parametrize(
    ("factory", "gpu"),
    [
        ("Flat", True),
        ("IVF16,Flat", True),
        ("IVF16,SQ8", True),
        ("IVF16,PQ36", False),  # 36 bytes: no GPU kernel for that code length
        ("IVF16,PQ32x4", False),  # 4-bit sub-quantizers: the classic GPU layout takes 8
        ("HNSW32", False),
        ("PCA64,Flat,RFlat", False),  # the mining actor's large-pool factory
        ("IVF16_HNSW32,Flat", False),  # a coarse quantizer the GPU cannot clone
        ("PQ32", False),
    ],
)
def test_what_the_gpu_cloner_cannot_hold_stays_on_the_cpu(factory, gpu):
    plan = gpu_plan(_index(factory, dim=288 if "PQ36" in factory else DIM))
    assert plan.gpu is gpu, plan
    assert plan.reason


def test_an_nprobe_past_the_gpus_selection_stays_on_the_cpu():
    index = _index("IVF4096,Flat")
    faiss.extract_index_ivf(index).nprobe = GPU_MAX_K
    assert gpu_plan(index).gpu
    faiss.extract_index_ivf(index).nprobe = GPU_MAX_K + 1
    assert not gpu_plan(index).gpu


# --- The lock and the CPU index -----------------------------------------------------------------


def _pair(x: np.ndarray) -> tuple[faiss.Index, faiss.Index]:
    """A flat index, and a second one standing where its GPU clone stands."""
    cpu = faiss.IndexFlatIP(x.shape[1])
    cpu.add(x)
    return cpu, faiss.clone_index(cpu)


def test_a_device_search_waits_for_the_lock_and_a_search_past_its_k_does_not(vectors):
    cpu, clone = _pair(vectors[:2000])
    lock = threading.Lock()
    index = DeviceIndex(cpu, clone, lock=lock)
    assert index.on_gpu and (index.d, index.ntotal) == (DIM, 2000)
    q = vectors[:3]
    expected = cpu.search(q, 10)
    found: list = []
    with lock:  # another call is using the GPU resources
        waiting = threading.Thread(target=lambda: found.append(index.search(q, 10)))
        waiting.start()
        waiting.join(0.5)
        assert waiting.is_alive() and not found  # it waits for the lock
        wide = index.search(q, GPU_MAX_K + 1)  # past the GPU's selection: the CPU index, now
        assert wide[1].shape == (3, GPU_MAX_K + 1)
    waiting.join(10)
    np.testing.assert_array_equal(found[0][1], expected[1])
    np.testing.assert_array_equal(found[0][0], expected[0])


def test_concurrent_device_searches_equal_sequential_ones(vectors):
    cpu, clone = _pair(vectors)
    index = DeviceIndex(cpu, clone, lock=threading.Lock())
    queries = vectors[::25][:320]
    sequential = [cpu.search(q[None], 10) for q in queries]
    with ThreadPoolExecutor(max_workers=64) as pool:
        concurrent = list(pool.map(lambda q: index.search(q[None], 10), queries))
    for (s1, i1), (s2, i2) in zip(concurrent, sequential, strict=True):
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_array_equal(s1, s2)


def test_reconstruct_reads_the_cpu_index(vectors):
    """A GPU IVF index has no ``reconstruct_batch``; neither has an IVF index without its
    direct map, which stands for it here: the vectors still come, from the CPU index."""
    cpu = _trained("IVF16,Flat", vectors)
    device = faiss.clone_index(cpu)
    cpu.make_direct_map()
    labels = np.array([5, 17, 9_999], np.int64)
    with pytest.raises(RuntimeError):
        device.reconstruct_batch(labels)
    index = DeviceIndex(cpu, device, lock=threading.Lock())
    np.testing.assert_array_equal(index.reconstruct_batch(labels), cpu.reconstruct_batch(labels))


def test_a_released_gpu_index_answers_from_the_cpu(vectors):
    cpu, clone = _pair(vectors[:500])
    lock = threading.Lock()
    index = DeviceIndex(cpu, clone, lock=lock)
    q = vectors[:4]
    before = index.search(q, 5)
    index.release()
    assert not index.on_gpu
    with lock:  # no lock is taken once the clone is gone
        after = index.search(q, 5)
    np.testing.assert_array_equal(after[1], before[1])
    with pytest.raises(ValueError, match="lock"):
        DeviceIndex(cpu, clone)


def test_the_shard_pool_merges_placed_shards_as_one_index(vectors):
    """``search_parts`` (what a slot and the benchmark search) over shards in DeviceIndexes,
    one with its lock-guarded stand-in, equals one flat index of every vector."""
    x = vectors[:3000]
    parts = []
    for a, b in ((0, 1000), (1000, 3000)):
        cpu, clone = _pair(x[a:b])
        index = DeviceIndex(cpu, clone, lock=threading.Lock()) if a else DeviceIndex(cpu)
        ids = index_store.IdMap(np.arange(a, b), np.array([f"i{i}" for i in range(a, b)], object))
        parts.append(Loaded(index, ids))
    q = vectors[5000:5040]
    scores, ids = search_parts(parts, q, 10)
    whole = faiss.IndexFlatIP(DIM)
    whole.add(x)
    truth_scores, truth = whole.search(q, 10)
    np.testing.assert_array_equal(ids, truth)
    np.testing.assert_allclose(scores, truth_scores, atol=1e-6)


# --- A serving slot under Serve's load ------------------------------------


def test_a_slot_under_64_concurrent_calls_answers_as_one_call_at_a_time(
    ray_session, vectors, tmp_path
):
    """Serve calls a replica's search and vectors from up to 64 threads at once: each call's
    answer (ids, scores, the stored vectors αQE reads from the IVF shards) equals the one it
    gets alone."""
    ids = [f"img-{i:06d}" for i in range(len(vectors))]
    desc = write_descriptors(str(tmp_path / "d"), ids, vectors, network=NETWORK)
    root = str(tmp_path / "idx")
    build_index(IndexConf(descriptors=desc, output=root, factory="IVF16,Flat", shards=3, nprobe=4))
    slot = ShardSet(root, gpu=True)  # faiss-cpu here: every shard on the CPU, as gpu_count says
    assert slot.on_gpu() == [False, False, False]

    def ask(q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        found = slot.search(q[None], 10, 1)
        stored = slot.vectors(found.ids[0], 1)
        return found.ids[0], found.scores[0], np.stack([stored[int(i)] for i in found.ids[0]])

    queries = _unit(np.random.default_rng(4).standard_normal((256, DIM)))
    alone = [ask(q) for q in queries]
    with ThreadPoolExecutor(max_workers=64) as pool:
        together = list(pool.map(ask, queries))
    for got, want in zip(together, alone, strict=True):
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)
    exact = faiss.IndexFlatIP(DIM)
    exact.add(vectors)
    _, truth = exact.search(queries, 10)
    hits = np.stack([a[0] for a in alone])
    assert np.mean([len(set(h) & set(t)) / 10 for h, t in zip(hits, truth, strict=True)]) > 0.3
