"""The GeM mode's tuples: each epoch a query draws one positive at random; a tuple is
``(query, positive, negative_1 .. negative_nnum)`` in rows of the pool
(``model.training_set.TrainingSet``), and each worker takes its share of them. Torch-free.
"""

from __future__ import annotations

import numpy as np

from model.training_set import TrainingSet

__all__ = ["epoch_tuples", "worker_share"]


def epoch_tuples(data: TrainingSet, negatives: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``[Q', 2 + nnum]`` pool rows ``(query, positive, negatives...)`` for one epoch.

    ``negatives`` ``[Q, nnum]`` are the mined rows of each query (-1 padding where too few
    other clusters exist: such queries are left out of the epoch). Each query draws one of its
    positives uniformly.
    """
    negatives = np.asarray(negatives, dtype=np.int64)
    if negatives.ndim != 2 or len(negatives) != len(data.queries):
        raise ValueError(
            f"negatives must be [{len(data.queries)}, nnum], not {list(negatives.shape)}"
        )
    drawn = np.array([rows[rng.integers(len(rows))] for rows in data.positives], np.int64)
    tuples = np.column_stack([data.queries, drawn, negatives])
    return tuples[(negatives >= 0).all(axis=1)]


def worker_share(n: int, rank: int, world_size: int) -> np.ndarray:
    """Rows ``0..n-1`` that worker ``rank`` of ``world_size`` takes: every ``world_size``-th."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} of {world_size}")
    return np.arange(rank, n, world_size, dtype=np.int64)
