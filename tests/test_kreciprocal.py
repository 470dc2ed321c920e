"""k-reciprocal re-ranking from a neighbour graph equals the paper's dense computation."""

from __future__ import annotations

import numpy as np
import pytest

from model.kreciprocal import (
    KReciprocalOptions,
    KReciprocalSettings,
    kreciprocal_distances,
    neighbour_graph,
    shortlist_order,
)


def _paper(distances: np.ndarray, n_q: int, *, k1: int, k2: int, lam: float) -> np.ndarray:
    """Zhong et al.'s ``re_ranking`` on squared distances ``[n_all, n_all]`` (queries first),
    translated line by line with full matrices, against every photo: ``[n_q, n_all]``."""
    original = np.transpose(distances / np.max(distances, axis=0))
    n = len(original)
    V = np.zeros_like(original)
    initial_rank = np.argsort(original, kind="stable")
    half = int(np.around(k1 / 2.0))
    for i in range(n):
        forward = initial_rank[i, : k1 + 1]
        backward = initial_rank[forward, : k1 + 1]
        reciprocal = forward[np.where(backward == i)[0]]
        expansion = reciprocal
        for candidate in reciprocal:
            c_forward = initial_rank[candidate, : half + 1]
            c_backward = initial_rank[c_forward, : half + 1]
            c_reciprocal = c_forward[np.where(c_backward == candidate)[0]]
            if len(np.intersect1d(c_reciprocal, reciprocal)) > 2.0 / 3 * len(c_reciprocal):
                expansion = np.append(expansion, c_reciprocal)
        expansion = np.unique(expansion)
        weight = np.exp(-original[i, expansion])
        V[i, expansion] = weight / np.sum(weight)
    if k2 != 1:
        V = np.stack([np.mean(V[initial_rank[i, :k2], :], axis=0) for i in range(n)])
    shared = np.stack([np.minimum(V[i], V).sum(axis=1) for i in range(n_q)])
    jaccard = 1 - shared / (2.0 - shared)
    return jaccard * (1 - lam) + original[:n_q] * lam


def _clusters(rng: np.random.Generator, n: int, *, dim: int = 24, scenes: int = 6) -> np.ndarray:
    centres = rng.normal(size=(scenes, dim))
    x = centres[rng.integers(scenes, size=n)] + 0.8 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize(("k1", "k2", "lam"), [(20, 6, 0.3), (5, 2, 0.5), (7, 1, 0.0)])
def test_the_sparse_computation_equals_the_papers_dense_one(k1: int, k2: int, lam: float) -> None:
    rng = np.random.default_rng(k1)
    photos = _clusters(rng, 150)
    queries, db = photos[:12], photos[12:]
    d = np.maximum(2 - 2 * photos.astype(np.float64) @ photos.T.astype(np.float64), 0)
    expected = _paper(d, 12, k1=k1, k2=k2, lam=lam)[:, 12:]
    options = KReciprocalOptions(kreciprocal_k1=k1, kreciprocal_k2=k2, kreciprocal_lambda=lam)
    found = np.stack(list(kreciprocal_distances(queries, db, options)))
    np.testing.assert_allclose(found, expected, atol=2e-5)
    # the queries being the database: the graph holds the database alone
    own = np.stack(list(kreciprocal_distances(db[:5], db, options, queries_are_database=True)))
    np.testing.assert_allclose(own, _paper(d[12:, 12:], 5, k1=k1, k2=k2, lam=lam), atol=2e-5)


def test_it_ranks_a_scenes_photos_higher_than_the_query_alone_does() -> None:
    """On scenes whose photos spread wide, mean AP over every photo as a query goes up, and
    each ranking is a permutation of the database starting with the query."""
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(10, 32))
    scene = rng.integers(10, size=300)
    photos = centres[scene] + 1.2 * rng.normal(size=(300, 32))
    photos = (photos / np.linalg.norm(photos, axis=1, keepdims=True)).astype(np.float32)
    found = kreciprocal_distances(photos, photos, KReciprocalOptions(), queries_are_database=True)
    reranked = [np.argsort(d, kind="stable") for d in found]
    plain = [np.argsort(-(photos @ q), kind="stable") for q in photos]
    assert all(o[0] == j and len(set(o.tolist())) == 300 for j, o in enumerate(reranked))
    gain = _mean_ap(reranked, scene) - _mean_ap(plain, scene)
    assert gain > 0.03, gain


def _mean_ap(orders: list[np.ndarray], scene: np.ndarray) -> float:
    aps = []
    for j, order in enumerate(orders):
        hits = (scene[order] == scene[j])[1:]
        ranks = np.flatnonzero(hits) + 1
        aps.append(np.mean(np.arange(1, len(ranks) + 1) / ranks))
    return float(np.mean(aps))


def test_a_photo_is_its_own_first_neighbour_even_beside_its_copy() -> None:
    rng = np.random.default_rng(0)
    photos = _clusters(rng, 30)
    photos[7] = photos[3]
    graph = neighbour_graph(photos, 4)
    assert graph.ids[:, 0].tolist() == list(range(30))
    assert graph.ids[3, 1] == 7 and graph.ids[7, 1] == 3
    assert graph.distances[:, 0].max() == 0 and (np.diff(graph.distances, axis=1) >= 0).all()


def test_settings_name_every_problem_and_the_size_is_bounded() -> None:
    with pytest.raises(ValueError) as raised:
        KReciprocalOptions(kreciprocal_k1=0, kreciprocal_k2=5, kreciprocal_lambda=2.0)
    lines = str(raised.value).splitlines()
    assert len(lines) == 3 and "--kreciprocal-k1" in lines[0] and "k1 + 1 = 1" in lines[1]
    with pytest.raises(ValueError, match="--kreciprocal-top must be 0"):
        KReciprocalSettings(kreciprocal_top=-1)
    photos = _clusters(np.random.default_rng(1), 60)
    with pytest.raises(ValueError, match=r"60 photos needs 60² products.* --kreciprocal-top K"):
        next(kreciprocal_distances(photos[:5], photos[5:], KReciprocalOptions(), max_photos=50))


def test_a_shortlist_is_reranked_over_the_query_and_its_photos_alone() -> None:
    rng = np.random.default_rng(4)
    photos = _clusters(rng, 120)
    query, candidates = photos[0], photos[1:41]
    options = KReciprocalOptions(kreciprocal_k1=8, kreciprocal_k2=3)
    order = shortlist_order(query, candidates, options)
    d = np.maximum(2 - 2 * photos[:41].astype(np.float64) @ photos[:41].T.astype(np.float64), 0)
    expected = _paper(d, 1, k1=8, k2=3, lam=0.3)[0, 1:]
    assert sorted(order.tolist()) == list(range(40))
    np.testing.assert_allclose(np.sort(expected), expected[order], atol=2e-5)
