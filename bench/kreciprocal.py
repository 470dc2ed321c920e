"""Do k-reciprocal re-ranking and diffusion earn a place beside spatial verification? Measured here.

k-reciprocal re-ranking (Zhong et al., CVPR 2017; ``model.kreciprocal``, which
``pipeline.evaluate --kreciprocal`` runs) re-scores a ranking by how far the query's and each
photo's k-reciprocal neighbourhoods overlap, mixed with the original distance. Diffusion
(Iscen et al., CVPR 2017, on global descriptors) spreads the query's similarities over the
database's mutual-kNN graph, ``(I - αS) f = y``; it is computed here only, densely, for these
small sets. The bench prints mAP of the global ranking and of each re-ranked one, in the same
run: the built-in collection and, with ``--photos``, a folder of scene folders.

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
from model.kreciprocal import KReciprocalOptions, kreciprocal_distances
from model.networks import NetworkMeta, build_network

SETTINGS = ((20, 6, 0.3), (10, 3, 0.3), (5, 2, 0.5))
"""(k1, k2, λ): the paper's default, then two for sets whose scenes hold few photos."""
DIFFUSION = ((50, 3.0, 0.99, 10), (20, 3.0, 0.9, 5))
"""(k, γ, α, query k): Iscen et al.'s global-descriptor setting, then one for small scenes."""


@dataclass(frozen=True)
class BenchConf:
    collection: str = "demo"
    photos: str | None = None
    max_size: int = 768
    work: str | None = None
    out: str | None = "bench/results/kreciprocal_cpu.json"


def diffusion(
    queries: np.ndarray, db: np.ndarray, *, k: int, gamma: float, alpha: float, k_query: int
) -> np.ndarray:
    """Each query's diffusion scores over ``db`` ``[n_q, N]``: affinities ``s^γ`` between
    mutual ``k`` nearest neighbours, symmetrically normalised; the query's ``k_query`` nearest
    photos seed ``y``; ``f = (I - αS)⁻¹ y`` solved exactly."""
    n = len(db)
    sims = np.clip(db @ db.T, 0, None)
    np.fill_diagonal(sims, 0)
    near = np.argsort(-sims, axis=1)[:, :k]
    is_near = np.zeros((n, n), bool)
    is_near[np.arange(n)[:, None], near] = True
    affinity = np.where(is_near & is_near.T, sims**gamma, 0)
    degree = np.maximum(affinity.sum(axis=1), 1e-12)
    normalised = affinity / np.sqrt(degree[:, None] * degree[None, :])
    system = np.eye(n) - alpha * normalised
    q_sims = np.clip(queries @ db.T, 0, None)
    seeds = np.zeros_like(q_sims)
    top = np.argsort(-q_sims, axis=1)[:, :k_query]
    np.put_along_axis(seeds, top, np.take_along_axis(q_sims, top, axis=1) ** gamma, axis=1)
    return np.linalg.solve(system, seeds.T).T


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
        plain = np.argsort(-(queries @ db.T), axis=1, kind="stable")
        rows.append({"set": used.name, "method": "global", **_scores(used, plain)})
        for k1, k2, lam in SETTINGS:
            options = KReciprocalOptions(
                kreciprocal_k1=k1, kreciprocal_k2=k2, kreciprocal_lambda=lam
            )
            found = kreciprocal_distances(queries, db, options, queries_are_database=own)
            order = np.argsort(np.stack(list(found)), axis=1, kind="stable")
            method = f"k-reciprocal k1={k1} k2={k2} λ={lam}"
            rows.append({"set": used.name, "method": method, **_scores(used, order)})
        for k, gamma, alpha, k_query in DIFFUSION:
            scores = diffusion(queries, db, k=k, gamma=gamma, alpha=alpha, k_query=k_query)
            order = np.lexsort((-(queries @ db.T), -scores), axis=1)  # unreached: global order
            method = f"diffusion k={k} γ={gamma:g} α={alpha} k_q={k_query}"
            rows.append({"set": used.name, "method": method, **_scores(used, order)})
    lines = [
        f"device: {platform.machine()} CPU; ImageNet Lite0 + GeM at {conf.max_size} px; mAP in %",
        f"{'set':<16}{'ranking':<40}{'mAP':>28}",
        *(f"{r['set']:<16}{r['method']:<40}{r['text']:>28}" for r in rows),
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
