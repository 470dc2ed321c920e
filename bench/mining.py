"""Hard-negative mining through the mining-index actor against the reference code's way.

``python -m bench.mining``: a pool of 100,000 unit descriptors of 1,280 dimensions in clusters
of 10 (views of one scene around a centre; the centres lie near a 64-dimensional subspace, so
scenes have look-alikes, as landmarks do), 2,000 of them as queries, 5 negatives each. The
reference (cnnimageretrieval-pytorch's ``TuplesDataset.create_epoch_tuples``): a dot product
of every query with the pool, a full sort of each query's scores, the walk to the first five
other clusters. The actor: the pool sent in two shares (as two training workers would), the
index built, the queries mined, all timed from the first share sent to the last answer: exact
(``Flat``: BLAS products over the shares where they arrived), from a bfloat16 first pass
re-scored exactly (``bf16``, what ``auto`` picks from 20,000 to 200,000 rows on CPUs with
bfloat16 hardware; measured only there), and with PCA-reduced candidates re-scored exactly
(``PCA128,Flat,RFlat``, its choice beyond). The synthetic scenes lie near a
64-dimensional subspace, which suits the PCA: on real descriptors its share of the exact
negatives is to be measured, not assumed. Printed: seconds,
the ratio to the reference, and the share of the reference's negatives found. Same process,
same data, the reference first.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass

import numpy as np
import ray
import tyro

from bench import write_results
from cluster.mining import mining_actor
from cluster.pool_search import fast_bf16


@dataclass(frozen=True)
class BenchConf:
    pool: int = 100_000
    dim: int = 1280
    queries: int = 2000
    nnum: int = 5
    views: int = 10
    seed: int = 0
    out: str | None = "bench/results/mining_cpu.json"


def _collection(conf: BenchConf) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(conf.seed)
    scenes = conf.pool // conf.views
    basis = rng.standard_normal((64, conf.dim)).astype(np.float32) / 8.0
    shared = rng.standard_normal((scenes, 64)).astype(np.float32) @ basis  # look-alikes
    centres = shared + 0.5 * rng.standard_normal((scenes, conf.dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    clusters = np.repeat(np.arange(scenes), conf.views)[: conf.pool]
    x = centres[clusters] + 0.014 * rng.standard_normal((conf.pool, conf.dim), np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, clusters.astype(np.int64)


def reference(
    pool: np.ndarray, clusters: np.ndarray, queries: np.ndarray, own: np.ndarray, nnum: int
) -> np.ndarray:
    """The reference code's way: all scores, a full sort per query, the walk."""
    ranks = np.argsort(-(pool @ queries.T), axis=0)
    out = np.full((len(queries), nnum), -1, np.int64)
    for q in range(len(queries)):
        seen, taken = {int(own[q])}, []
        for row in ranks[:, q]:
            if int(clusters[row]) not in seen:
                seen.add(int(clusters[row]))
                taken.append(int(row))
                if len(taken) == nnum:
                    break
        out[q, : len(taken)] = taken
    return out


def through_actor(
    factory: str,
    pool: np.ndarray,
    clusters: np.ndarray,
    queries: np.ndarray,
    own: np.ndarray,
    nnum: int,
) -> tuple[np.ndarray, float, dict]:
    actor = mining_actor(num_cpus=os.cpu_count() or 1, factory=factory)
    ray.get(actor.describe.remote())  # started before the clock
    # two workers' shares, every other row each (pipeline.train.tuples.worker_share), as they
    # hold them
    shares = [(h, pool[h], clusters[h]) for h in (np.arange(r, len(pool), 2) for r in (0, 1))]
    started = time.perf_counter()
    ray.get(actor.reset.remote(0, len(pool)))
    ray.get([actor.add.remote(*share) for share in shares])
    rows, _ = ray.get(actor.mine.remote(queries, own, nnum))
    seconds = time.perf_counter() - started
    info = ray.get(actor.describe.remote())
    ray.kill(actor)
    return rows, seconds, info


def main(conf: BenchConf) -> dict:
    x, clusters = _collection(conf)
    picks = np.random.default_rng(conf.seed + 1).choice(conf.pool, conf.queries, replace=False)
    queries, own = x[picks], clusters[picks]
    started = time.perf_counter()
    exact = reference(x, clusters, queries, own, conf.nnum)
    ref_seconds = time.perf_counter() - started

    ray.init(
        num_cpus=os.cpu_count(),
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=3 * x.nbytes,
    )
    lines = [
        f"device: {platform.machine()} CPU, {os.cpu_count()} cores; pool {conf.pool:,} x "
        f"{conf.dim}, {conf.queries:,} queries, {conf.nnum} negatives each",
        f"{'method':<34}{'seconds':>9}{'speed-up':>10}{'exact found':>13}",
        f"{'reference: NumPy dot + full sort':<34}{ref_seconds:>9.2f}{1.0:>10.1f}{1.0:>13.3f}",
    ]
    results = {"reference_seconds": ref_seconds}
    factories = ["Flat", *(["bf16"] if fast_bf16() else []), "PCA128,Flat,RFlat"]
    for factory in factories:
        rows, seconds, info = through_actor(factory, x, clusters, queries, own, conf.nnum)
        pairs = zip(rows, exact, strict=True)
        found = float(np.mean([len(set(a) & set(b)) / conf.nnum for a, b in pairs]))
        ok = all(
            c not in clusters[r] and len(set(clusters[r].tolist())) == conf.nnum
            for c, r in zip(own, rows, strict=True)
        )
        name = f"actor, {factory}"
        lines.append(f"{name:<34}{seconds:>9.2f}{ref_seconds / seconds:>10.1f}{found:>13.3f}")
        results[factory] = {
            "seconds": seconds,
            "speedup": ref_seconds / seconds,
            "exact_found": found,
            "rules_hold": ok,
            "build_seconds": info["build_seconds"],
        }
    ray.shutdown()
    print("\n".join(lines))
    write_results(conf.out, {**results, "lines": lines}, lines)
    return results


if __name__ == "__main__":
    main(tyro.cli(BenchConf))
