"""The GPU checks: five measurements, each against its baseline in the same run, in one JSON.

    python -m bench.gpu --device cuda --size full       # on a GPU machine (bench/gpu.sh)
    python -m bench.gpu --device cpu --size tiny --out /tmp/gpu.json   # the dry run (tests)

1. ``extract``: photos per second of the extract stage end to end on Ray Data (JPEG bytes
   decoded in Ray tasks, the stage's ``Describer`` actor: batches, bf16 and channels-last on
   a GPU, Parquet written) against the same ``Describer`` on the same photos decoded
   beforehand (the network alone). The goal is a ratio of at least 0.9.
2. ``search``: exact search of ``n x dim`` unit vectors through the shard pool's search
   (``cluster.shards``: flat shards placed as a serving slot places them, on the GPU where
   FAISS has one, each shard's canonical top k merged) against a raw fp16 matrix product and
   ``topk`` in PyTorch on the device, in batches of the router's size (32 queries).
3. ``mining``: hard negatives from ``cluster.mining.MiningIndex`` (its own choice of search,
   FAISS on a GPU) against the reference code's NumPy product and full sort
   (``bench.mining.reference``), on ``bench.mining``'s look-alike scenes.
4. ``train``: training tuples per second batched by size (bf16 + channels-last on a GPU)
   against fp32 one image at a time (``bench.train_steps``).
5. ``serve``: a serving slot (``cluster.shards.ShardSet``) over index versions built by the
   index stage (full: Flat, and IVF-PQ of 32 bytes, which goes to the GPU with
   float32 lookup tables, with float16 ones, and stay on the CPU; tiny: Flat and IVF-Flat)
   under concurrent single-query calls from 64 threads (as Serve's thread pool calls a
   replica), each also asking for its hits' stored vectors (αQE): the answers against a CPU
   slot's, asked one by one; the figure is the CPU slot's time under the same load over the
   device slot's.

Every section writes ``ratio`` (contender over baseline, larger is better); the serve section
also ``equal``: every index whose arithmetic is the CPU's (all but float16 lookup tables)
answered with the CPU's ids, scores within 1e-4 and the same stored vectors. ``--size tiny``
runs everything on small inputs in about a minute on 2 cores (a check that the script works,
not a measurement); ``full`` is sized for a few minutes on one GPU. FAISS's GPU parts run only
with a FAISS build that sees a GPU (``faiss_gpus`` in the JSON); with faiss-cpu the shard
pool, the mining index and the serving slot run on the CPU, as they would in production.
"""

from __future__ import annotations

import itertools
import os
import platform
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np
import ray
import torch
import tyro

from bench import write_results
from bench.extract import BenchConf as ExtractBenchConf
from bench.extract import _device_name, _photo_files
from bench.index import clustered
from bench.mining import BenchConf as MiningConf
from bench.mining import _collection, reference
from bench.search import NETWORK
from bench.train_steps import StepsConf
from bench.train_steps import _rate as train_rate
from cluster import index_store
from cluster.mining import MiningIndex
from cluster.resources import use_reserved_threads
from cluster.shards import DeviceIndex, GpuDevice, Loaded, ShardSet, gpu_count, gpu_plan
from cluster.shards import search_parts as pool_search
from model.describer import Describer, NetworkSettings, decode_photo
from model.descriptors import write_descriptors
from pipeline.extract import ExtractConf
from pipeline.extract import run as run_extract
from pipeline.index import IndexConf
from pipeline.index import run as build_index
from pipeline.ingest import IngestConf
from pipeline.ingest import run as run_ingest

ROUTER_BATCH = 32
"""Queries per call to a slot: the router's ``max_batch_size`` default."""
SERVE_THREADS = 64
"""Calls a serving replica takes at once: ``pipeline.serve``'s ``max_ongoing_requests``."""
SCORE_TOLERANCE = 1e-4
"""How far a GPU score may lie from the CPU's and still be the same answer."""
EXTRACT_GOAL = 0.9
CHECKS = ("extract", "search", "mining", "train", "serve")
PQ_TRAIN = 39 * 256
"""Training vectors of an IVF-PQ served: FAISS's least for 256 centroids per sub-quantizer."""


@dataclass(frozen=True)
class Sizes:
    """How big each measurement is."""

    photos: int
    max_size: int
    search_n: int
    search_dim: int
    search_queries: int
    search_shards: int
    mining: MiningConf
    steps: StepsConf
    serve_n: int
    serve_dim: int
    serve_factories: tuple[str, ...]
    serve_queries: int
    warm: bool = True
    """Run the extract stage once untimed first (workers started, files in the page cache)."""
    threads: int | None = None
    """Torch and FAISS threads of this process and of the extract stage's actor; None: their
    defaults (every core). The dry run takes 1: on 2 shared cores torch's OpenMP threads wait
    for each other at every layer, and a training step took 5 to 20 times its 1-thread CPU."""


SIZES = {
    "tiny": Sizes(
        photos=4,
        max_size=128,
        search_n=5_000,
        search_dim=64,
        search_queries=64,
        search_shards=2,
        mining=MiningConf(pool=2_000, dim=64, queries=100, out=None),
        steps=StepsConf(image_size=32, tuples_per_step=1, nnum=1, steps=1, warmup=1),
        serve_n=2_000,
        serve_dim=64,
        serve_factories=("Flat", "IVF16,Flat"),  # PQ training takes minutes on 2 cores
        serve_queries=128,
        warm=False,
        threads=1,
    ),
    "full": Sizes(
        photos=512,
        max_size=1024,
        search_n=1_000_000,
        search_dim=2048,
        search_queries=512,
        search_shards=4,
        mining=MiningConf(out=None),
        steps=StepsConf(),
        serve_n=50_000,
        serve_dim=128,
        serve_factories=("Flat", "IVF256,PQ32"),
        serve_queries=2_000,
    ),
}


@dataclass(frozen=True)
class GpuBenchConf:
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    size: Literal["tiny", "full"] | None = None
    """Default: full on cuda, tiny (the dry run) on a CPU."""
    out: str | None = None
    """Default: bench/results/gpu_<device>_<size>.json (and .txt beside it)."""
    k: int = 10
    seed: int = 0
    work_dir: str | None = None
    """Where photos, descriptors and indexes are written; default: a temporary folder."""
    photos: str = field(default_factory=lambda: ExtractBenchConf().photos)
    """Real photos for the extraction (synthetic JPEGs where absent, as on a GPU machine)."""
    address: str = "local"
    """The Ray to run on: ``local`` starts one of its own with every core of this machine; a
    running cluster's address (``host:port``) joins it and leaves it running."""


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / torch.linalg.vector_norm(x, dim=1, keepdim=True)


def _seconds(run: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    out = run()
    return time.perf_counter() - started, out


def _overlap(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each row of ``truth`` (ids, -1 padding ignored) that ``found`` holds."""
    shares = [
        len(set(f[f >= 0].tolist()) & set(t[t >= 0].tolist())) / max(1, int((t >= 0).sum()))
        for f, t in zip(found, truth, strict=True)
    ]
    return float(np.mean(shares))


# --- 1. extraction ------------------------------------------------------------------------------


def measure_extract(sizes: Sizes, work: Path, photos: str) -> dict[str, Any]:
    """The extract stage end to end on Ray Data against its own network on decoded photos."""
    paths = _photo_files(Path(photos), sizes.photos)
    folder = work / "photos"
    folder.mkdir()
    for i, path in enumerate(paths):
        (folder / f"{i:04d}{path.suffix}").symlink_to(path.resolve())
    images = run_ingest(IngestConf(source=str(folder), output=str(work / "ingest")))
    if sizes.warm:  # workers started, the network's files in the page cache
        run_extract(ExtractConf.from_flags(images=images, output=str(work / "warm"), max_size=64))
    stage = ExtractConf.from_flags(
        images=images,
        output=str(work / "descriptors"),
        max_size=sizes.max_size,
        threads_per_actor=sizes.threads,
    )
    stage_s, _ = _seconds(lambda: run_extract(stage))

    describer = Describer(NetworkSettings(max_size=sizes.max_size), threads_per_actor=sizes.threads)
    decoded = [decode_photo(path.read_bytes(), sizes.max_size) for path in paths]
    decoded = [photo for photo in decoded if isinstance(photo, np.ndarray)]
    describer.describe(decoded[:2])  # cuDNN autotuning, the allocator
    network_s, _ = _seconds(lambda: describer.describe(decoded))
    stage_rate, network_rate = len(paths) / stage_s, len(decoded) / network_s
    return {
        "what": "pipeline.extract on Ray Data (bytes -> Parquet) / its Describer on decoded "
        f"photos; {len(paths)} photos, longer side {sizes.max_size}",
        "device": describer.device.type,
        "bf16": describer.options.resolved_bf16(),
        "channels_last": describer.options.channels_last,
        "baseline_per_s": network_rate,
        "contender_per_s": stage_rate,
        "ratio": stage_rate / network_rate,
        "goal": EXTRACT_GOAL,
    }


# --- 2. exact search through the shard pool -----------------------------------------------------


def _fp16_topk(
    x16: torch.Tensor, q16: torch.Tensor, batches: list[slice], *, k: int
) -> tuple[float, np.ndarray]:
    """Seconds and ids of the raw baseline: an fp16 product and ``topk`` per batch of queries
    (after one untimed batch: kernels chosen, memory pooled); results copied to the host."""

    def run() -> np.ndarray:
        found = [torch.topk(q16[b] @ x16.T, k, dim=1).indices.cpu() for b in batches]
        return torch.cat(found).numpy()

    torch.topk(q16[batches[0]] @ x16.T, k, dim=1).indices.cpu()
    return _seconds(run)


def measure_search(sizes: Sizes, device: torch.device, *, k: int, seed: int) -> dict[str, Any]:
    """The shard pool's exact search against a raw fp16 product on ``device``."""
    n, dim = sizes.search_n, sizes.search_dim
    generator = torch.Generator(device=device).manual_seed(seed)
    x = _unit(torch.randn(n, dim, generator=generator, device=device))
    q = _unit(torch.randn(sizes.search_queries, dim, generator=generator, device=device))
    batches = [slice(a, a + ROUTER_BATCH) for a in range(0, len(q), ROUTER_BATCH)]

    raw_s, raw_ids = _fp16_topk(x.half(), q.half(), batches, k=k)

    gpu = GpuDevice() if device.type == "cuda" and gpu_count() else None
    rows = x.cpu().numpy()
    queries = q.cpu().numpy()
    del x
    bounds = np.linspace(0, n, sizes.search_shards + 1).round().astype(int)
    parts = []
    for number, (a, b) in enumerate(itertools.pairwise(bounds)):
        flat = faiss.IndexFlatIP(dim)
        flat.add(rows[a:b])
        placed = DeviceIndex(flat) if gpu is None else gpu.place(flat, name=f"shard {number}")
        # image_ids are not read by a search; the id map gives the global ids
        parts.append(Loaded(placed, index_store.IdMap(np.arange(a, b), np.empty(b - a, object))))
    del rows

    def pool() -> np.ndarray:
        return np.concatenate([pool_search(parts, queries[b], k)[1] for b in batches])

    pool_search(parts, queries[batches[0]], k)
    pool_s, pool_ids = _seconds(pool)
    return {
        "what": f"exact top {k} of {n:,} x {dim} through the shard pool "
        f"({sizes.search_shards} flat shards) / a raw fp16 product + topk, "
        f"{len(queries)} queries in batches of {ROUTER_BATCH}",
        "device": device.type,
        "shards_on_gpu": sum(part.index.on_gpu for part in parts),
        "baseline_queries_per_s": len(queries) / raw_s,
        "contender_queries_per_s": len(queries) / pool_s,
        "ratio": raw_s / pool_s,
        "fp16_recall": _overlap(raw_ids, pool_ids),
    }


# --- 3. mining ----------------------------------------------------------------------------------


def measure_mining(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    """The mining index (two workers' shares, built, mined) against NumPy's product and sort."""
    conf = sizes.mining
    x, clusters = _collection(conf)
    picks = np.random.default_rng(conf.seed + 1).choice(conf.pool, conf.queries, replace=False)
    queries, own = x[picks], clusters[picks]
    numpy_s, exact = _seconds(lambda: reference(x, clusters, queries, own, conf.nnum))

    mining = MiningIndex(factory="auto", gpu=device.type == "cuda", seed=conf.seed)

    def mine(size: int) -> np.ndarray:
        mining.reset(0, size)
        for rows in (np.arange(r, size, 2) for r in (0, 1)):  # two workers' shares
            mining.add(rows, x[rows], clusters[rows])
        return mining.mine(queries, own, conf.nnum)[0]

    mine(min(len(x), 1000))  # an actor's first epoch: its GPU resources made, kernels loaded
    index_s, rows = _seconds(lambda: mine(len(x)))
    info = mining.describe()
    return {
        "what": f"{conf.nnum} hard negatives of {conf.queries:,} queries in {conf.pool:,} x "
        f"{conf.dim}: MiningIndex / NumPy product + full sort",
        "factory": info["factory"],
        "on_gpu": info["on_gpu"],
        "baseline_s": numpy_s,
        "contender_s": index_s,
        "ratio": numpy_s / index_s,
        "exact_found": _overlap(rows, exact),
    }


# --- 4. training steps --------------------------------------------------------------------------


def measure_train(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    """Tuples per second batched (bf16 + channels-last on a GPU) against one image at a time."""
    conf = StepsConf(**{**asdict(sizes.steps), "device": device.type, "out": None})
    one_by_one = train_rate(conf, device, "reference")
    batched = train_rate(conf, device, "batched")
    return {
        "what": f"Lite0 + GeM training, {conf.tuples_per_step} tuples of {2 + conf.nnum} photos "
        f"at {conf.image_size} px a step: batched by size / fp32 one image at a time",
        "precision": "bf16 + channels-last" if device.type == "cuda" else "fp32",
        "baseline_tuples_per_s": one_by_one,
        "contender_tuples_per_s": batched,
        "ratio": batched / one_by_one,
    }


# --- 5. a serving slot under concurrent queries -------------------------------------------------


def _answers(
    slot: ShardSet, queries: np.ndarray, *, k: int, threads: int
) -> tuple[float, list[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """Each query as one call (its top k, then its hits' stored vectors), ``threads`` at once
    (1: one after another); ``(seconds, [(ids, scores, vectors), ...])``."""

    def ask(q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        found = slot.search(q[None], k, 1)
        ids = found.ids[0][found.ids[0] >= 0]
        stored = slot.vectors(ids, 1)
        return found.ids[0], found.scores[0], np.stack([stored[int(i)] for i in ids])

    if threads == 1:
        return _seconds(lambda: [ask(q) for q in queries])
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return _seconds(lambda: list(pool.map(ask, queries)))


def _compare(found: list, truth: list) -> dict[str, Any]:
    ids = np.stack([f[0] for f in found])
    truth_ids = np.stack([t[0] for t in truth])
    scores_apart = max(
        float(np.max(np.abs(f[1] - t[1]), initial=0.0)) if np.array_equal(f[0], t[0]) else np.inf
        for f, t in zip(found, truth, strict=True)
    )
    vectors = all(
        np.array_equal(f[2], t[2]) for f, t in zip(found, truth, strict=True) if len(f[2])
    )
    return {
        "ids_equal": bool(np.array_equal(ids, truth_ids)),
        "max_score_difference": scores_apart,
        "vectors_equal": bool(vectors),
        "overlap": _overlap(ids, truth_ids),
    }


def measure_serve(sizes: Sizes, device: torch.device, work: Path, *, k: int) -> dict[str, Any]:
    """Index versions served by a slot on ``device`` under concurrent calls, against a CPU slot."""
    rng = np.random.default_rng(1)
    dim = sizes.serve_dim
    centres = rng.standard_normal((256, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = clustered(rng, centres, sizes.serve_n, 1.4)
    queries = clustered(rng, centres, sizes.serve_queries, 1.4)
    ids = [f"v{i:07d}" for i in range(len(x))]
    desc = write_descriptors(str(work / "serve-descriptors"), ids, x, network=NETWORK)
    rows, cpu_total, device_total = [], 0.0, 0.0
    for factory in sizes.serve_factories:
        root = str(work / f"serve-{factory.replace(',', '-')}")
        nlist = int(factory[3:].split(",")[0]) if factory.startswith("IVF") else None
        conf = IndexConf(
            descriptors=desc,
            output=root,
            factory=factory,
            shards=2,
            nprobe=nlist // 4 if nlist else None,
            train_size=PQ_TRAIN if ",PQ" in factory else None,
        )
        build_index(conf)
        shard, _ = index_store.load_shard(root, index_store.read_manifest(root), 0)
        plan = gpu_plan(shard)
        cpu = ShardSet(root)
        cpu.load(1)
        _, truth = _answers(cpu, queries, k=k, threads=1)  # and the CPU slot warmed
        cpu_s, on_cpu = _answers(cpu, queries, k=k, threads=SERVE_THREADS)
        slot = ShardSet(root, gpu=device.type == "cuda")
        on_gpu = any(slot.on_gpu(1))  # loaded, the GPU's shards cloned
        _answers(slot, queries[:SERVE_THREADS], k=k, threads=SERVE_THREADS)  # warmed
        device_s, on_device = _answers(slot, queries, k=k, threads=SERVE_THREADS)
        row = {
            "factory": factory,
            "planned": "gpu" if plan.gpu else "cpu",
            "plan": plan.reason,
            "on_gpu": on_gpu,
            "float16_lookup": on_gpu and plan.float16_lookup,
            "cpu_concurrent": _compare(on_cpu, truth),
            **_compare(on_device, truth),
            "baseline_queries_per_s": len(queries) / cpu_s,
            "contender_queries_per_s": len(queries) / device_s,
        }
        exact = row["cpu_concurrent"]
        row["equal"] = (
            exact["ids_equal"]
            and exact["max_score_difference"] == 0
            and exact["vectors_equal"]
            and (
                row["float16_lookup"]
                or (
                    row["ids_equal"]
                    and row["max_score_difference"] <= SCORE_TOLERANCE
                    and row["vectors_equal"]
                )
            )
        )
        rows.append(row)
        cpu_total += cpu_s
        device_total += device_s
    return {
        "what": f"a serving slot ({SERVE_THREADS} threads, one query a call + its stored "
        f"vectors) over {sizes.serve_n:,} x {dim}, {len(queries)} queries: CPU slot's time / "
        "device slot's",
        "device": device.type,
        "indexes": rows,
        "equal": all(row["equal"] for row in rows),
        "ratio": cpu_total / device_total,
    }


# --- the run ------------------------------------------------------------------------------------


def _lines(result: dict[str, Any]) -> list[str]:
    lines = [
        f"device: {result['device']}; torch {result['torch']}; faiss {result['faiss']} "
        f"({result['faiss_gpus']} GPUs); size {result['size']}; {result['seconds']:.0f} s",
        f"{'check':<9}{'ratio':>8}  what",
    ]
    for name in CHECKS:
        if name in result:
            section = result[name]
            lines.append(f"{name:<9}{section['ratio']:>8.3f}  {section['what']}")
        else:
            lines.append(f"{name:<9}{'-':>8}  not measured (stopped before it)")
    for row in result.get("serve", {}).get("indexes", []):
        place = "GPU" if row["on_gpu"] else "CPU"
        lines.append(
            f"  serve {row['factory']:<16} on {place}: equal {row['equal']}, ids equal "
            f"{row['ids_equal']}, overlap {row['overlap']:.3f} ({row['plan']})"
        )
    return lines


def main(conf: GpuBenchConf) -> dict[str, Any]:
    """Every check in turn; the JSON is written after each one, so a run cut short keeps
    what it measured."""
    device = torch.device(conf.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but PyTorch sees no CUDA GPU here")
    size = conf.size or ("full" if device.type == "cuda" else "tiny")
    sizes = SIZES[size]
    out = conf.out or f"bench/results/gpu_{device.type}_{size}.json"
    started = time.perf_counter()
    result: dict[str, Any] = {
        "device": _device_name(device.type),
        "size": size,
        "torch": torch.__version__,
        "faiss": faiss.__version__,
        "faiss_gpus": gpu_count(),
        "cores": os.cpu_count(),
        "machine": platform.machine(),
    }

    def measured(name: str, run: Callable[[], dict[str, Any]]) -> None:
        if sizes.threads:  # again before each: the mining check gives OpenMP every core
            torch.set_num_threads(sizes.threads)
            use_reserved_threads(sizes.threads)
        section_started = time.perf_counter()
        result[name] = {**run(), "seconds": time.perf_counter() - section_started}
        result["seconds"] = time.perf_counter() - started
        lines = _lines(result)
        write_results(out, {**result, "lines": lines}, lines)

    with tempfile.TemporaryDirectory(prefix="cirray-bench-gpu-", dir=conf.work_dir) as tmp:
        work = Path(tmp)
        own_ray = conf.address == "local"
        ray.init(
            address=conf.address,
            configure_logging=False,
            log_to_driver=False,
            **({"num_cpus": os.cpu_count(), "include_dashboard": False} if own_ray else {}),
        )
        try:  # the serving check last: its IVF-PQ training takes the longest to foresee
            measured("extract", lambda: measure_extract(sizes, work, conf.photos))
            measured("search", lambda: measure_search(sizes, device, k=conf.k, seed=conf.seed))
            measured("mining", lambda: measure_mining(sizes, device))
            measured("train", lambda: measure_train(sizes, device))
            measured("serve", lambda: measure_serve(sizes, device, work, k=conf.k))
        finally:
            ray.shutdown()
    print("\n".join(_lines(result)))
    return result


if __name__ == "__main__":
    main(tyro.cli(GpuBenchConf))
