"""Spatial re-ranking in evaluation: ours against a naive version, in the same run.

The naive version is the one the field's first try builds: pycolmap's SIFT as it comes (the
first octave doubles the image), at most 1024 features, mutual nearest neighbours with Lowe's
0.8 ratio, pycolmap's LO-RANSAC homography at its 4 px threshold, every inlying match counted,
the top 100 re-ordered by inliers >= 12. Ours differs in the features' first octave (0), the
ratio (0.9), the threshold (6 px) and what counts (each query location once). Both run through
``pipeline.evaluate --rerank`` on the same descriptors (cached once), so the figures differ by
the re-ranking alone; ``ours + verified αQE`` adds αQE over the 5 best verified neighbours and
a second verification round.

Data: the built-in collection (``--collection``, generated here) and, with ``--photos``, a
folder of scene folders (every photo a query). Time per pair and per photo extracted are
printed against the naive version's in this run.

    python -m bench.rerank --photos ../shared/data/photos --out bench/results/rerank_cpu.json
"""

from __future__ import annotations

import os
import platform
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import tyro

from bench import write_results
from model.datasets.landmarks import CONFS, generate
from pipeline.evaluate import EvaluateConf, run

CONFIGS: dict[str, dict[str, Any]] = {
    "naive": {
        "local_first_octave": -1,
        "rerank_ratio": 0.8,
        "rerank_max_error": 4.0,
        "rerank_count": "matches",
    },
    "ours": {},
    "ours + verified αQE": {"rerank_qe_k": 5},
}


@dataclass(frozen=True)
class BenchConf:
    collection: str = "demo"
    """Preset of the built-in collection (model.datasets.landmarks.CONFS)."""
    photos: str | None = None
    """A folder of scene folders to measure too (every photo a query)."""
    rerank: int = 100
    max_size: int = 768
    """Longer side the network sees (the global descriptors)."""
    num_workers: int = 2
    work: str | None = None
    """Where the collection, caches and outputs go (default: a new temporary folder)."""
    out: str | None = "bench/results/rerank_cpu.json"


def main(conf: BenchConf) -> dict[str, Any]:
    work = Path(conf.work or tempfile.mkdtemp(prefix="cirray-bench-rerank-"))
    sets = [(CONFS[conf.collection].name, str(generate(CONFS[conf.collection], work / "data")))]
    if conf.photos:
        sets.append((Path(conf.photos).name, str(Path(conf.photos).resolve())))
    rows = []
    for dataset, folder in sets:
        for name, flags in CONFIGS.items():
            result = run(
                EvaluateConf.from_flags(
                    dataset=dataset,
                    data_root=str(Path(folder).parent),
                    max_size=conf.max_size,
                    rerank=conf.rerank,
                    output=str(work / "out" / name.replace(" ", "_")),
                    cache_dir=str(work / "cache"),
                    num_workers=conf.num_workers,
                    **flags,
                )
            )
            rows.append(_row(dataset, name, result))
    lines = _table(rows, conf)
    print("\n".join(lines))
    outcome = {"conf": asdict(conf), "rows": rows, "lines": lines}
    write_results(conf.out, outcome, lines)
    return outcome


def _row(dataset: str, config: str, result: dict[str, Any]) -> dict[str, Any]:
    def figures(metrics: dict[str, Any]) -> dict[str, float]:
        if "medium" in metrics:
            return {p[0].upper(): metrics[p]["map"] for p in ("easy", "medium", "hard")}
        return {"mAP": metrics["map"]}

    extracted = max(result["photos_extracted"], 1)
    own = result["photos_extracted"] >= len(result["verified_per_query"])  # not from the cache
    return {
        "dataset": dataset,
        "config": config,
        "without": figures(result["metrics_without_rerank"]),
        "with": figures(result["metrics"]),
        "ms_per_pair": result["ms_per_pair"],
        "seconds_per_query": result["seconds_per_query"],
        "extract_s_per_photo": result["extract_seconds"] / extracted if own else None,
        "verified_per_query": sum(result["verified_per_query"]) / len(result["verified_per_query"]),
    }


def _table(rows: list[dict[str, Any]], conf: BenchConf) -> list[str]:
    lines = [
        f"device: {platform.machine()} CPU, {os.cpu_count()} cores; ImageNet Lite0 + GeM at "
        f"{conf.max_size} px; the top {conf.rerank} re-ranked; mAP in percent",
        f"{'data set':<16}{'re-ranking':<22}{'mAP without':<26}{'mAP with':<26}"
        f"{'verified/q':>11}{'ms/pair':>9}{'vs naive':>9}{'s/photo':>9}{'vs naive':>9}",
    ]
    naive = {r["dataset"]: r for r in rows if r["config"] == "naive"}
    for r in rows:
        base = naive[r["dataset"]]
        pair_ratio = r["ms_per_pair"] / base["ms_per_pair"]
        extract = r["extract_s_per_photo"]
        extract_text = f"{extract:>9.3f}" if extract is not None else f"{'cached':>9}"
        extract_ratio = (
            f"{extract / base['extract_s_per_photo']:>8.2f}x"
            if extract is not None and base["extract_s_per_photo"]
            else f"{'':>9}"
        )
        lines.append(
            f"{r['dataset']:<16}{r['config']:<22}{_maps(r['without']):<26}{_maps(r['with']):<26}"
            f"{r['verified_per_query']:>11.1f}{r['ms_per_pair']:>9.2f}{pair_ratio:>8.2f}x"
            f"{extract_text}{extract_ratio}"
        )
    return lines


def _maps(figures: dict[str, float]) -> str:
    return " / ".join(f"{k} {100 * v:.1f}" for k, v in figures.items())


if __name__ == "__main__":
    main(tyro.cli(BenchConf))
