"""Build seconds, memory and recall@10 of the ``auto`` index over a million clustered vectors.

Data: 1,000 cluster centres drawn uniformly on the unit sphere of R^128; each of the 1,000,000
database vectors is a random centre plus Gaussian noise N(0, sigma²/dim · I) with sigma = 1.4
(noise about 1.4 times as long as the centre), unit-normalised; the 300 queries are fresh
draws from the same mixture (not database rows). Ground truth is exact inner-product search
(brute force over all vectors).

The contender is the index stage end to end (``pipeline.index.run``, ``--factory auto``): it
reads the descriptors folder, picks the factory, trains once, adds the shards in parallel Ray
tasks (one CPU and one FAISS thread each), tunes ``nprobe`` for recall@10 >= 0.95 and
publishes the version. The baseline is the same factory built in one process, as autofaiss
does without a cluster: a training sample of the same size and seed, then every vector added
to one index with FAISS's threads on all cores, serialised. Ray is started and its workers
warmed (the stage imported in each) before either build, as on a running cluster. Both indexes
are searched with the nprobe the stage chose; the stage's through its sharded search
(``cluster.index_store.search``; timed with the shards already loaded, then merged).

    python -m bench.index                                     # 1,000,000 x 128, 2 shards
    python -m bench.index --n 200000 --out bench/results/x.json
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np
import ray
import tyro

from bench import write_results
from cluster import index_store
from model.descriptors import write_descriptors
from pipeline import index as stage


@dataclass(frozen=True)
class BenchConf:
    n: int = 1_000_000
    """Database vectors."""
    dim: int = 128
    clusters: int = 1_000
    sigma: float = 1.4
    """Noise length relative to the (unit) centre."""
    queries: int = 300
    k: int = 10
    shards: int = 2
    max_memory: str = "16G"
    seed: int = 0
    work_dir: str | None = None
    """Where the descriptors and the index are written; default: a temporary folder."""
    out: str | None = "bench/results/index_cpu.json"
    """Write the figures as JSON here, and the printed table next to it as .txt."""


def _device_name() -> str:
    return (
        f"{platform.processor() or platform.machine()} CPU, {faiss.omp_get_max_threads()} threads"
    )


def clustered(
    rng: np.random.Generator, centres: np.ndarray, n: int, sigma: float, chunk: int = 1 << 16
) -> np.ndarray:
    """``n`` unit rows: a random centre each plus N(0, sigma²/dim) noise, normalised."""
    dim = centres.shape[1]
    X = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        block = X[start : start + chunk]
        rng.standard_normal(block.shape, dtype=np.float32, out=block)
        block *= sigma / np.sqrt(dim)
        block += centres[rng.integers(0, len(centres), len(block))]
        block /= np.linalg.norm(block, axis=1, keepdims=True)
    return X


def _warm() -> None:
    import pipeline.index  # noqa: F401  (runs in each Ray worker: the stage imported there)


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found, truth, strict=True)]))


def main(conf: BenchConf) -> dict:
    rng = np.random.default_rng(conf.seed)
    centres = rng.standard_normal((conf.clusters, conf.dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    t0 = time.perf_counter()
    X = clustered(rng, centres, conf.n, conf.sigma)
    Q = clustered(rng, centres, conf.queries, conf.sigma)
    generated = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, truth = faiss.knn(Q, X, conf.k, metric=faiss.METRIC_INNER_PRODUCT)
    exact_seconds = time.perf_counter() - t0

    work = Path(conf.work_dir or tempfile.mkdtemp(prefix="cirray-bench-index-"))
    shutil.rmtree(work / "index", ignore_errors=True)
    # image_ids sort like their row numbers, so a global id is the row of X.
    ids = [f"v{i:07d}" for i in range(conf.n)]
    desc = write_descriptors(str(work / "desc"), ids, X, network={"name": "synthetic"})
    del ids

    cpus = os.cpu_count() or 1
    ray.init(
        num_cpus=cpus,
        include_dashboard=False,
        object_store_memory=max(2 * X.nbytes, 256 * 2**20),
        configure_logging=False,
        log_to_driver=False,
    )
    try:
        # Workers started and the stage imported in each, as on a running cluster.
        ray.get([ray.remote(_warm).remote() for _ in range(cpus)])

        # The baseline: the stage's factory and training-sample size, in one process.
        factory = stage.choose_factory(conf.n, conf.dim, conf.max_memory)
        probe = faiss.index_factory(conf.dim, factory, faiss.METRIC_INNER_PRODUCT)
        train_size = stage.train_size_for(probe, conf.n)
        t0 = time.perf_counter()
        single, _ = stage.train_index(factory, X, train_size, seed=conf.seed)
        train_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        for start in range(0, conf.n, stage.ADD_BATCH):
            single.add(X[start : start + stage.ADD_BATCH])
        single_bytes = len(index_store.serialize_index(single))
        add_seconds = time.perf_counter() - t0

        # The contender: the stage end to end.
        t0 = time.perf_counter()
        version = stage.run(
            stage.IndexConf(
                descriptors=desc,
                output=str(work / "index"),
                shards=conf.shards,
                max_memory=conf.max_memory,
                seed=conf.seed,
            )
        )
        stage_seconds = time.perf_counter() - t0
    finally:
        ray.shutdown()
    manifest = index_store.read_manifest(str(work / "index"))
    assert manifest["factory"] == factory and manifest["trained"]["train_size"] == train_size
    params = manifest["search_params"]
    phases = manifest["build"]["seconds"]
    sharded = index_store.search(str(work / "index"), Q, conf.k)  # loads every shard
    stage_recall = _recall(sharded.ids, truth)
    loaded = [index_store.load_shard(str(work / "index"), manifest, i) for i in range(conf.shards)]
    t0 = time.perf_counter()  # shards in memory, as serving holds them
    parts = [index_store.shard_topk(index, Q, conf.k) for index, _ in loaded]
    _, merged_ids = index_store.merge_topk(
        [s for s, _ in parts],
        [m.global_ids(labels) for (_, labels), (_, m) in zip(parts, loaded, strict=True)],
        conf.k,
    )
    sharded_search = time.perf_counter() - t0
    assert (merged_ids == sharded.ids).all()
    del loaded

    index_store.set_search_params(single, params)
    t0 = time.perf_counter()
    _, single_ids = index_store.shard_topk(single, Q, conf.k)
    single_search = time.perf_counter() - t0
    single_recall = _recall(single_ids, truth)
    if not conf.work_dir:
        shutil.rmtree(work, ignore_errors=True)

    single_total = train_seconds + add_seconds
    estimate = (manifest["tuning"] or {}).get("recall_at_k", "exact")
    stage_build = phases["train"] + phases["add"]
    ms = 1000 / conf.queries
    lines = [
        f"device: {_device_name()}; faiss {faiss.__version__}; ray {ray.__version__}; "
        f"{conf.n:,} x {conf.dim} float32 ({conf.clusters:,} Gaussian clusters, "
        f"sigma {conf.sigma}, unit-normalised; generated in {generated:.0f} s), "
        f"{conf.queries} fresh queries",
        f"auto -> {factory} (budget {conf.max_memory}), {params or 'exact'} tuned for "
        f"recall@{conf.k} >= 0.95 (the stage's estimate: {estimate})",
    ]
    header = (
        f"{'build':<38}{'train s':>9}{'add s':>8}{'train+add':>11}{'run s':>8}"
        f"{'index MB':>10}{'recall@10':>11}{'ms/query':>10}"
    )
    lines += [header, "-" * len(header)]
    lines.append(
        f"{'single process (FAISS, ' + str(faiss.omp_get_max_threads()) + ' threads)':<38}"
        f"{train_seconds:>9.1f}{add_seconds:>8.1f}{single_total:>11.1f}{'':>8}"
        f"{single_bytes / 1e6:>10.1f}{single_recall:>11.4f}{single_search * ms:>10.2f}"
    )
    lines.append(
        f"{f'Ray stage ({conf.shards} shard tasks x 1 CPU)':<38}"
        f"{phases['train']:>9.1f}{phases['add']:>8.1f}{stage_build:>11.1f}{stage_seconds:>8.1f}"
        f"{manifest['stored_bytes'] / 1e6:>10.1f}{stage_recall:>11.4f}{sharded_search * ms:>10.2f}"
    )
    lines.append(
        f"{'ratio (single / Ray)':<38}{train_seconds / phases['train']:>8.2f}x"
        f"{add_seconds / phases['add']:>7.2f}x{single_total / stage_build:>10.2f}x{'':>8}"
        f"{single_bytes / manifest['stored_bytes']:>9.2f}x"
    )
    lines.append(
        f"{'exact search (brute force, BLAS)':<38}{'':>9}{'':>8}{'':>11}{'':>8}"
        f"{X.nbytes / 1e6:>10.1f}{1.0:>11.4f}{exact_seconds * ms:>10.2f}"
    )
    lines.append(
        f"Ray run s = the whole stage: reading {conf.n:,} descriptors ({phases['read']:.1f} s), "
        f"validating, training, adding, writing, tuning ({phases['tune']:.1f} s); "
        f"ms/query: {conf.queries} queries in one call (the stage's shards in memory, merged)"
    )
    print("\n".join(lines))
    payload = {
        "device": _device_name(),
        "conf": asdict(conf),
        "factory": factory,
        "search_params": params,
        "tuning": manifest["tuning"],
        "single_process": {
            "train_s": train_seconds,
            "add_s": add_seconds,
            "bytes": single_bytes,
            "recall_at_10": single_recall,
            "search_s": single_search,
        },
        "ray_stage": {
            "phases_s": phases,
            "run_s": stage_seconds,
            "bytes": manifest["stored_bytes"],
            "estimated_bytes": manifest["estimated_bytes"],
            "recall_at_10": stage_recall,
            "search_s": sharded_search,
            "version": version,
        },
        "exact": {"bytes": X.nbytes, "search_s": exact_seconds},
        "ratios": {
            "train": train_seconds / phases["train"],
            "add": add_seconds / phases["add"],
            "train_plus_add": single_total / stage_build,
        },
    }
    write_results(conf.out, payload, lines)
    return payload


if __name__ == "__main__":
    main(tyro.cli(BenchConf))
