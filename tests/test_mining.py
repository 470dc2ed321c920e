"""Hard-negative mining: the FAISS search against a full-sort NumPy reference, and the actor."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import ray

from cluster import pool_search
from cluster.mining import (
    BF16_MIN,
    FLAT_MAX,
    MiningIndex,
    hard_negatives,
    mining_actor,
    mining_factory,
)


def _pool(n: int, dim: int, clusters: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Clustered unit vectors; cluster 0 is large and tight (its members' nearest rows are all
    of it, so the search must widen past them)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(1, clusters, n)
    labels[: n // 5] = 0
    centres = rng.standard_normal((clusters, dim))
    noise = np.where(labels[:, None] == 0, 0.05, 0.7)
    x = centres[labels] + noise * rng.standard_normal((n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), labels.astype(np.int64)


def _reference(pool, clusters, queries, query_clusters, nnum):
    """The reference code's way: every similarity, a full sort, the walk."""
    ranks = np.argsort(-(pool @ queries.T), axis=0, kind="stable")
    out = np.full((len(queries), nnum), -1, np.int64)
    for q in range(len(queries)):
        seen, taken = {int(query_clusters[q])}, []
        for row in ranks[:, q]:
            if int(clusters[row]) not in seen:
                seen.add(int(clusters[row]))
                taken.append(row)
                if len(taken) == nnum:
                    break
        out[q, : len(taken)] = taken
    return out


def _filled(factory: str, x: np.ndarray, clusters: np.ndarray, workers: int) -> MiningIndex:
    """A CPU mining pool filled as ``workers`` training workers fill it: interleaved shares."""
    mining = MiningIndex(factory=factory, gpu=False)
    mining.reset(0, len(x))
    for rank in range(workers):
        share = np.arange(rank, len(x), workers)
        mining.add(share, x[share], clusters[share])
    return mining


def _flat(x: np.ndarray) -> faiss.Index:
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    return index


def test_mined_negatives_equal_a_full_sort_reference():
    x, clusters = _pool(600, 32, 40)
    queries = np.arange(0, 600, 7)  # among them members of the big tight cluster
    rows, sims = hard_negatives(
        _flat(x), clusters, x[queries], query_clusters=clusters[queries], nnum=5
    )
    assert (rows == _reference(x, clusters, x[queries], clusters[queries], 5)).all()
    for q, found in zip(queries, rows, strict=True):
        assert (found >= 0).all() and clusters[q] not in clusters[found]  # other clusters only
        assert len(set(clusters[found].tolist())) == 5  # each cluster once
    assert (np.diff(sims, axis=1) <= 1e-6).all()  # hardest first
    assert np.allclose(sims, np.einsum("qd,qnd->qn", x[queries], x[rows]), atol=1e-5)


def test_fewer_other_clusters_than_asked_pads_and_bad_input_is_named():
    x, clusters = _pool(50, 8, 3)
    rows, sims = hard_negatives(_flat(x), clusters, x[:4], query_clusters=clusters[:4], nnum=5)
    assert (rows[:, 2:] == -1).all() and np.isinf(sims[:, 2:]).all()  # 2 other clusters only
    assert (rows[:, :2] >= 0).all()
    with pytest.raises(ValueError, match=r"\[Q, 8\]"):
        hard_negatives(_flat(x), clusters, x[:4, :4], query_clusters=clusters[:4])
    with pytest.raises(ValueError, match="clusters 49"):
        hard_negatives(_flat(x), clusters[:-1], x[:4], query_clusters=clusters[:4])


def test_a_reduced_search_with_exact_rescoring_keeps_the_rules():
    """Past FLAT_MAX, auto searches PCA-reduced candidates and re-scores them exactly: the rules
    hold at any reduction, and with no reduction (a rotation) the result is the exact one."""
    assert mining_factory(FLAT_MAX, 1280, bf16=False) == "Flat"
    assert mining_factory(FLAT_MAX, 1280, bf16=True) == "bf16"
    assert mining_factory(BF16_MIN - 1, 1280, bf16=True) == "Flat"
    assert mining_factory(FLAT_MAX + 1, 1280) == "PCA128,Flat,RFlat"
    assert mining_factory(FLAT_MAX + 1, 32) == "PCA8,Flat,RFlat"
    x, clusters = _pool(6000, 32, 300, seed=1)
    queries = np.arange(0, len(x), 37)
    exact = _reference(x, clusters, x[queries], clusters[queries], 5)
    pool = MiningIndex(factory="PCA16,Flat,RFlat")
    pool.reset(epoch=0, size=len(x))
    pool.add(np.arange(len(x)), x, clusters)
    rows, sims = pool.mine(x[queries], clusters[queries], nnum=5)
    assert pool.describe()["factory"] == "PCA16,Flat,RFlat"
    for q, found in zip(queries, rows, strict=True):
        assert clusters[q] not in clusters[found] and len(set(clusters[found].tolist())) == 5
    assert np.allclose(sims, np.einsum("qd,qnd->qn", x[queries], x[rows]), atol=1e-5)  # exact
    overlap = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(rows, exact, strict=True)])
    print(f"\nPCA16 + exact re-scoring: {overlap:.3f} of the exact hardest negatives")
    assert overlap > 0.7  # isotropic clusters: the worst case for a reduction
    rotated = MiningIndex(factory="PCA32,Flat,RFlat")
    rotated.reset(epoch=0, size=len(x))
    rotated.add(np.arange(len(x)), x, clusters)
    assert (rotated.mine(x[queries], clusters[queries], nnum=5)[0] == exact).all()


@pytest.mark.parametrize("factory", ["Flat", "bf16"])
def test_shares_searched_where_they_arrived_equal_the_reference(factory):
    """Three interleaved shares, searched without being gathered: exactly, and by a bfloat16
    first pass re-scored in float32 (the same negatives, exact similarities)."""
    x, clusters = _pool(3000, 64, 150, seed=4)
    mining = _filled(factory, x, clusters, workers=3)
    assert mining.add(np.zeros(0, np.int64), x[:0], clusters[:0]) == len(x)  # an empty share
    queries = np.arange(0, len(x), 11)
    rows, sims = mining.mine(x[queries], clusters[queries], nnum=5)
    assert mining.describe()["factory"] == factory
    assert (rows == _reference(x, clusters, x[queries], clusters[queries], 5)).all()
    assert np.allclose(sims, np.einsum("qd,qnd->qn", x[queries], x[rows]), atol=1e-5)
    again, _ = mining.mine_rows(queries, 5)  # the held vectors of pool rows, from the shares
    assert (again == rows).all()


def test_bf16_search_in_small_blocks_equals_one_block(monkeypatch):
    """Query blocks and re-scoring parts that do not divide the queries: the same answer."""
    x, _ = _pool(3000, 64, 150, seed=6)
    shares = [(s, x[s]) for s in (np.arange(r, len(x), 3) for r in range(3))]
    queries = x[::7]
    whole = pool_search.Bf16Search(shares, len(x)).search(queries, 30)
    monkeypatch.setattr(pool_search, "SCORE_BYTES", 2 * 1000 * 50)  # 50 queries a block
    monkeypatch.setattr(pool_search, "CANDIDATE_BYTES", 4 * 38 * 64 * 7)  # 7 re-scored at once
    sims, rows = pool_search.Bf16Search(shares, len(x)).search(queries, 30)
    assert (rows == whole[1]).all() and np.allclose(sims, whole[0], atol=1e-6)


def test_the_actor_takes_shares_in_any_order_and_refuses_a_partial_pool(ray_session):
    x, clusters = _pool(400, 16, 30, seed=2)
    actor = mining_actor(num_cpus=0, factory="Flat")
    ray.get(actor.reset.remote(3, len(x)))
    order = np.random.default_rng(0).permutation(len(x))
    first, second = order[:150], order[150:]
    assert ray.get(actor.add.remote(first, x[first], clusters[first])) == 150
    with pytest.raises(ray.exceptions.RayTaskError, match="not whole: 150 rows added for 400"):
        ray.get(actor.mine.remote(x[:2], clusters[:2]))
    ray.get(actor.add.remote(second, x[second], clusters[second]))
    rows, _ = ray.get(actor.mine.remote(x[:20], clusters[:20], 5))
    assert (rows == _reference(x, clusters, x[:20], clusters[:20], 5)).all()
    assert ray.get(actor.describe.remote())["epoch"] == 3
    ray.get(actor.add.remote(first[:1], x[first[:1]], clusters[first[:1]]))  # a row twice
    with pytest.raises(ray.exceptions.RayTaskError, match="added twice"):
        ray.get(actor.mine.remote(x[:2], clusters[:2]))
    with pytest.raises(ray.exceptions.RayTaskError, match=r"lie in 0\.\.399"):
        ray.get(actor.add.remote([400], x[:1], clusters[:1]))
    ray.kill(actor)


def test_mining_by_pool_rows_uses_the_held_vectors_and_answers_once_per_epoch():
    x, clusters = _pool(300, 16, 20, seed=3)
    mining = MiningIndex(factory="Flat", gpu=False)
    mining.reset(1, len(x))
    order = np.random.default_rng(1).permutation(len(x))
    mining.add(order, x[order], clusters[order])  # shares arrive in any order
    rows = np.array([5, 17, 250, 5])
    found, _ = mining.mine_rows(rows, 4)
    assert (found == _reference(x, clusters, x[rows], clusters[rows], 4)).all()
    assert mining.mine_rows(rows, 4)[0] is found  # every worker asks: computed once
    assert (clusters[found] != clusters[rows][:, None]).all()
    with pytest.raises(ValueError, match=r"lie in 0\.\.299"):
        mining.mine_rows([300], 4)
    mining.reset(2, len(x))
    with pytest.raises(ValueError, match="not whole"):
        mining.mine_rows(rows, 4)  # a new epoch's pool, not last epoch's answer


@pytest.mark.parametrize("factory", ["Flat", "bf16"])
def test_negatives_only_from_allowed_rows_and_the_pool_handed_back_whole(factory):
    """The pool holds held-out photos too (validation ranks them): mining never takes one,
    and equals the reference over the allowed rows alone."""
    x, clusters = _pool(900, 16, 60, seed=5)
    mining = _filled(factory, x, clusters, workers=2)
    assert np.array_equal(mining.vectors(), x)  # position order, before any search
    held_out = np.isin(clusters, [3, 7, 11])
    allowed_rows = np.flatnonzero(~held_out)
    queries = allowed_rows[::9]
    found, _ = mining.mine_rows(queries, 5, allowed=~held_out)
    expected = _reference(x[allowed_rows], clusters[allowed_rows], x[queries], clusters[queries], 5)
    assert (found == allowed_rows[expected]).all()
    assert not held_out[found].any()
    assert np.array_equal(mining.vectors(), x)  # after the search too
    with pytest.raises(ValueError, match="mask the index's 900 rows"):
        mining.mine_rows(queries, 5, allowed=~held_out[:-1])
