"""Does k-reciprocal re-ranking earn a place beside spatial verification? Measured here.

k-reciprocal re-ranking (Zhong et al., CVPR 2017) re-scores a ranking by how far the query's
and each photo's k-reciprocal neighbour sets overlap (a Jaccard distance, with local query
expansion), mixed with the original distance. It needs the distances between database photos,
so this bench computes it on the whole (small) set: the built-in collection and, with
``--photos``, a folder of scene folders. It prints mAP of the global ranking and of the
re-ranked one, in the same run, for a few ``(k1, k2, λ)``.

    python -m bench.kreciprocal --photos ../shared/data/photos
"""

from __future__ import annotations

import os
import platform
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import tyro

from bench import write_results
from model.datasets.folders import load_folder
from model.datasets.landmarks import CONFS, generate
from model.datasets.revisited import load_revisited
from model.datasets.sets import RetrievalSet
from model.describe import describe_set
from model.evaluation import compute_map, evaluate_revisited
from model.extraction import ExtractOptions
from model.networks import NetworkMeta, build_network

SETTINGS = ((20, 6, 0.3), (10, 3, 0.3), (5, 2, 0.5))
"""(k1, k2, λ): the paper's default, then two for sets whose scenes hold few photos."""


@dataclass(frozen=True)
class BenchConf:
    collection: str = "demo"
    photos: str | None = None
    max_size: int = 768
    work: str | None = None
    out: str | None = "bench/results/kreciprocal_cpu.json"


def k_reciprocal(distances: np.ndarray, n_q: int, *, k1: int, k2: int, lam: float) -> np.ndarray:
    """The re-ranked distances ``[n_q, n_all - n_q]`` from ``distances`` ``[n_all, n_all]``
    over queries then database (rows ``:n_q`` are the queries; ``n_q = 0``: the queries are
    the database photos themselves, and the answer is ``[n_all, n_all]``)."""
    n = len(distances)
    dist = distances / np.maximum(distances.max(axis=0, keepdims=True), 1e-12)
    rank = np.argsort(dist, axis=1, kind="stable")
    weights = np.zeros((n, n), np.float32)
    for i in range(n):
        forward = rank[i, : k1 + 1]
        mutual = forward[np.any(rank[forward, : k1 + 1] == i, axis=1)]
        expanded = mutual
        for j in mutual:
            half = int(np.around(k1 / 2))
            near = rank[j, : half + 1]
            theirs = near[np.any(rank[near, : half + 1] == j, axis=1)]
            if len(np.intersect1d(theirs, mutual)) > 2 / 3 * len(theirs):
                expanded = np.union1d(expanded, theirs)
        w = np.exp(-dist[i, expanded])
        weights[i, expanded] = w / w.sum()
    if k2 > 1:
        weights = np.stack([weights[rank[i, :k2]].mean(axis=0) for i in range(n)])
    q, g = (weights, weights) if n_q == 0 else (weights[:n_q], weights[n_q:])
    shared = np.stack([np.minimum(row[None], g).sum(axis=1) for row in q])
    union = np.stack([np.maximum(row[None], g).sum(axis=1) for row in q])
    jaccard = 1 - shared / np.maximum(union, 1e-12)
    original = dist if n_q == 0 else dist[:n_q, n_q:]
    return (1 - lam) * jaccard + lam * original


def main(conf: BenchConf) -> dict[str, Any]:
    work = Path(conf.work or tempfile.mkdtemp(prefix="cirray-bench-kr-"))
    sets = [load_revisited(generate(CONFS[conf.collection], work / "data"))]
    if conf.photos:
        sets.append(load_folder(conf.photos))
    net = build_network(NetworkMeta(backbone="efficientnet_lite0"), "imagenet").eval()
    torch.set_num_threads(os.cpu_count() or 1)
    rows = []
    for rset in sets:
        described = describe_set(
            rset,
            net.backbone,
            {"descriptor": net.head},
            max_size=conf.max_size,
            options=ExtractOptions(device="cpu", progress=False),
        )
        used = described.rset
        db, queries = described.db["descriptor"], described.queries["descriptor"]
        own = used.queries_are_database
        everything = db if own else np.concatenate([queries, db])
        distances = np.maximum(2 - 2 * everything @ everything.T, 0)
        n_q = 0 if own else len(queries)
        plain = np.argsort(-(queries @ db.T), axis=1, kind="stable")
        rows.append({"set": used.name, "method": "global", **_scores(used, plain)})
        for k1, k2, lam in SETTINGS:
            reranked = k_reciprocal(distances, n_q, k1=k1, k2=k2, lam=lam)
            order = np.argsort(reranked, axis=1, kind="stable")
            method = f"k-reciprocal k1={k1} k2={k2} λ={lam}"
            rows.append({"set": used.name, "method": method, **_scores(used, order)})
    lines = [
        f"device: {platform.machine()} CPU; ImageNet Lite0 + GeM at {conf.max_size} px; mAP in %",
        f"{'set':<16}{'ranking':<36}{'mAP':>28}",
        *(f"{r['set']:<16}{r['method']:<36}{r['text']:>28}" for r in rows),
    ]
    print("\n".join(lines))
    result = {"conf": asdict(conf), "rows": rows, "lines": lines}
    write_results(conf.out, result, lines)
    return result


def _scores(rset: RetrievalSet, order: np.ndarray) -> dict[str, Any]:
    """mAP of a full ranking ``[n_q, n_db]`` under the set's protocol."""
    assert rset.gnd is not None
    if rset.protocol == "revisited":
        found = evaluate_revisited(order.T, rset.gnd, kappas=(1,))
        maps = {p[0].upper(): found[p]["map"] for p in ("easy", "medium", "hard")}
    else:
        maps = {"mAP": compute_map(order.T, rset.gnd)[0]}
    return {"map": maps, "text": " / ".join(f"{k} {100 * v:.1f}" for k, v in maps.items())}


if __name__ == "__main__":
    main(tyro.cli(BenchConf))
