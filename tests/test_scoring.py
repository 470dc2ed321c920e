"""Scoring a set: exact metrics from a top-k, and αQE that never expands a query with itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from model.datasets.sets import RetrievalSet
from model.evaluation import compute_map, evaluate_revisited
from model.retrieval import QueryExpansion, alpha_qe, l2_normalize, rank_by_similarity
from model.scoring import PostProcess, score


def _scenes(n_scenes: int = 5, per_scene: int = 6, dim: int = 16, seed: int = 0):
    """A scene-folder set of random clustered vectors: every photo a query of its scene."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_scenes, dim))
    labels = np.repeat(np.arange(n_scenes), per_scene)
    X = l2_normalize(centres[labels] + 0.9 * rng.normal(size=(len(labels), dim)))
    paths = [Path(f"/photos/s{label}/{i}.jpg") for i, label in enumerate(labels)]
    gnd = []
    for j, label in enumerate(labels):
        same = np.flatnonzero(labels == label)
        gnd.append({"ok": same[same != j], "junk": np.array([j])})
    rset = RetrievalSet(
        "scenes", paths, paths, "scenes", exif_transpose=True, gnd=gnd, db_labels=labels
    )
    return X.astype(np.float32), rset


def test_alpha_qe_on_folders_never_uses_the_query_itself() -> None:
    X, rset = _scenes()
    post = PostProcess(qe=QueryExpansion(qe_k=2, qe_alpha=3.0))
    got = score(X, X, rset, post=post).metrics["map"]
    expanded = alpha_qe(X, X, k=2, alpha=3.0, query_rows=np.arange(len(X)))
    expected, *_ = compute_map(rank_by_similarity(expanded, X).T, rset.gnd)
    assert got == pytest.approx(expected, abs=1e-12)
    # What the old code did: the query counted as its own first neighbour.
    S = X @ X.T
    nn = np.argsort(-S, axis=1, kind="stable")[:, :2]  # itself and one other
    w = np.maximum(np.take_along_axis(S, nn, axis=1), 0) ** 3
    with_self = l2_normalize(X + np.einsum("bk,bkd->bd", w, X[nn]))
    old, *_ = compute_map(rank_by_similarity(with_self, X).T, rset.gnd)
    assert abs(got - old) > 1e-4


def test_metrics_are_exact_beyond_the_top_k_kept() -> None:
    """Positives ranked far below the top k kept for the report still count, exactly."""
    rng = np.random.default_rng(1)
    n_db, n_q = 400, 6
    X = l2_normalize(rng.normal(size=(n_db, 8))).astype(np.float32)
    Q = l2_normalize(rng.normal(size=(n_q, 8))).astype(np.float32)
    gnd = [
        {
            "easy": rng.choice(n_db, 30, replace=False),
            "hard": rng.choice(n_db, 10, replace=False),
            "junk": rng.choice(n_db, 5, replace=False),
        }
        for _ in range(n_q)
    ]
    for g in gnd:  # the three lists must not overlap
        g["hard"] = np.setdiff1d(g["hard"], g["easy"])
        g["junk"] = np.setdiff1d(g["junk"], np.union1d(g["easy"], g["hard"]))
    paths = [Path(f"/db/{i}.jpg") for i in range(n_db)]
    rset = RetrievalSet(
        "r",
        paths,
        [Path(f"/q/{j}.jpg") for j in range(n_q)],
        "revisited",
        exif_transpose=False,
        gnd=gnd,
    )
    scored = score(X, Q, rset, top_k=10)
    assert scored.ranks.shape == (n_q, 11)  # top_k, and one more for recall without self
    expected = evaluate_revisited(rank_by_similarity(Q, X).T, gnd)
    for part in ("easy", "medium", "hard"):
        assert scored.metrics[part]["map"] == pytest.approx(expected[part]["map"], abs=1e-12)
    medium = [{"ok": np.concatenate([g["easy"], g["hard"]]), "junk": g["junk"]} for g in gnd]
    _, aps, _, _ = compute_map(rank_by_similarity(Q, X).T, medium)
    np.testing.assert_allclose(scored.aps, aps, atol=1e-12)
