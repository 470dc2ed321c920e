"""Peak memory and seconds of the evaluate stage's ranking step at R1M scale (NumPy, CPU).

The baseline is what the evaluate stage did before: the full ranking of the database for every
query (``rank_by_similarity(Q, X)``, ``[n_q, n_db]`` int64, one stable argsort per query) and
``evaluate_revisited`` on it. The contender ranks nothing in full: ``rank_and_locate`` finds
where each query's ground-truth images land (a sort of its score values and binary searches)
and the top 10 a report shows, in one pass over the scores; ``evaluate_revisited_at_positions``
scores those positions. Same descriptors, same ground truth, same process; both must
give the same mAP, and the figures that matter are the ratios.

Peak memory is measured with ``tracemalloc`` (NumPy reports its array allocations to it): the
peak during the step minus what was allocated before it, so the input matrices do not count.
Seconds are measured on a separate run without tracing.

    python -m bench.rank                                     # 1,000,000 x 1280, 70 queries
    python -m bench.rank --n-db 100000 --out bench/results/x.json
"""

from __future__ import annotations

import gc
import os
import platform
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import tyro

from bench import write_results
from model.evaluation import evaluate_revisited, evaluate_revisited_at_positions, ground_truth_items
from model.retrieval import rank_and_locate, rank_by_similarity


@dataclass(frozen=True)
class BenchConf:
    n_db: int = 1_000_000
    """Database images (R1M: ROxford's 4,993 plus a million distractors)."""
    n_q: int = 70
    dim: int = 1280
    positives: int = 300
    """Positives per query (half easy, half hard), placed near their query."""
    junk: int = 100
    """Junk images per query, drawn at random."""
    topk: int = 10
    """Top-k list the new path computes for the report."""
    seed: int = 0
    out: str | None = None
    """Write the figures as JSON here, and the printed table next to it as .txt."""


def _blas_threads() -> int:
    try:
        from threadpoolctl import threadpool_info  # optional: no dependency of the project

        counts = [info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"]
        if counts:
            return int(counts[0])
    except ImportError:
        pass
    return os.cpu_count() or 1


def _device_name() -> str:
    return f"{platform.processor() or platform.machine()} CPU, {_blas_threads()} threads"


def _unit_rows(rng: np.random.Generator, n: int, dim: int, chunk: int = 1 << 16) -> np.ndarray:
    """``n`` random L2-normalised float32 rows, generated and normalised a chunk at a time."""
    X = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        block = X[start : start + chunk]
        rng.standard_normal(block.shape, dtype=np.float32, out=block)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
    return X


def _data(conf: BenchConf) -> tuple[np.ndarray, np.ndarray, list[dict[str, np.ndarray]]]:
    rng = np.random.default_rng(conf.seed)
    X = _unit_rows(rng, conf.n_db, conf.dim)
    Q = _unit_rows(rng, conf.n_q, conf.dim)
    per_query = conf.positives + conf.junk
    if conf.n_q * per_query > conf.n_db:
        raise ValueError(f"{conf.n_q} queries x {per_query} images do not fit in {conf.n_db}")
    chosen = rng.permutation(conf.n_db)[: conf.n_q * per_query].reshape(conf.n_q, per_query)
    gnd = []
    for j in range(conf.n_q):
        pos, junk = chosen[j, : conf.positives], chosen[j, conf.positives :]
        # A positive is its query plus noise: q . x spreads from chance (~0) up to ~0.3, so the
        # positives land all over the ranking, from the top down.
        c = rng.uniform(0.0, 0.3, size=(pos.size, 1)).astype(np.float32)
        noise = _unit_rows(rng, pos.size, conf.dim)
        rows = c * Q[j] + noise
        X[pos] = rows / np.linalg.norm(rows, axis=1, keepdims=True)
        half = pos.size // 2
        gnd.append({"easy": np.sort(pos[:half]), "hard": np.sort(pos[half:]), "junk": junk})
    return Q, X, gnd


def _baseline(Q: np.ndarray, X: np.ndarray, gnd: list, topk: int) -> tuple[dict, np.ndarray]:
    ranks = rank_by_similarity(Q, X)  # [n_q, n_db] int64
    return evaluate_revisited(ranks.T, gnd), ranks[:, :topk].copy()


def _new(Q: np.ndarray, X: np.ndarray, gnd: list, topk: int) -> tuple[dict, np.ndarray]:
    items = ground_truth_items(gnd)
    top, positions = rank_and_locate(Q, X, items, topk=topk)  # one pass over the scores
    result = evaluate_revisited_at_positions(
        list(zip(items, positions, strict=True)), gnd, n_db=X.shape[0]
    )
    return result, top


def _seconds(step: Callable[[], Any]) -> float:
    gc.collect()
    started = time.perf_counter()
    step()
    return time.perf_counter() - started


def _peak_bytes(step: Callable[[], Any]) -> tuple[int, Any]:
    """Peak traced allocation during ``step`` above what was allocated before it."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        result = step()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return peak - before, result


def main(conf: BenchConf) -> dict:
    started = time.perf_counter()
    Q, X, gnd = _data(conf)
    generated = time.perf_counter() - started
    lines = [
        f"device: {_device_name()}; numpy {np.__version__}; database {conf.n_db:,} x {conf.dim} "
        f"float32 ({X.nbytes / 1e9:.2f} GB), {conf.n_q} queries, {conf.positives} positives + "
        f"{conf.junk} junk each; data generated in {generated:.0f} s"
    ]
    print(lines[0], flush=True)
    paths = {
        "full ranking + evaluate_revisited": lambda: _baseline(Q, X, gnd, conf.topk),
        f"rank_and_locate (top-{conf.topk}) + at_positions": lambda: _new(Q, X, gnd, conf.topk),
    }
    rows, outputs = [], []
    for name, step in paths.items():
        seconds = _seconds(step)
        peak, output = _peak_bytes(step)
        outputs.append(output)
        rows.append({"path": name, "peak_mb": peak / 1e6, "seconds": seconds})
        print(f"  measured {name}: {peak / 1e6:.0f} MB, {seconds:.1f} s", flush=True)
    (base_res, base_top), (new_res, new_top) = outputs
    diff = max(
        max(abs(base_res[s]["map"] - new_res[s]["map"]) for s in base_res),
        max(
            abs(base_res[s]["mp@k"][k] - new_res[s]["mp@k"][k])
            for s in base_res
            for k in base_res[s]["mp@k"]
        ),
    )
    same_top = bool(np.array_equal(base_top, new_top))
    peak_ratio = rows[0]["peak_mb"] / rows[1]["peak_mb"]
    time_ratio = rows[0]["seconds"] / rows[1]["seconds"]

    header = f"{'path':<46}{'peak MB':>10}{'seconds':>10}"
    lines += [header, "-" * len(header)]
    lines += [f"{r['path']:<46}{r['peak_mb']:>10.0f}{r['seconds']:>10.1f}" for r in rows]
    lines.append(f"{'ratio (baseline / new)':<46}{peak_ratio:>9.1f}x{time_ratio:>9.2f}x")
    maps = "  ".join(f"{s} {base_res[s]['map']:.6f} / {new_res[s]['map']:.6f}" for s in base_res)
    lines.append(f"mAP baseline / new: {maps}")
    lines.append(
        f"same mAP and mP@k: {diff <= 1e-12} (max |difference| {diff:.1e}); "
        f"same top-{conf.topk}: {same_top}"
    )
    print("\n".join(lines[1:]))
    payload = {
        "device": _device_name(),
        "conf": asdict(conf),
        "rows": rows,
        "peak_ratio": peak_ratio,
        "seconds_ratio": time_ratio,
        "generate_seconds": generated,
        "baseline": base_res,
        "new": new_res,
        "max_abs_difference": diff,
        "same_top": same_top,
    }
    write_results(conf.out, payload, lines)
    return payload


if __name__ == "__main__":
    main(tyro.cli(BenchConf))
