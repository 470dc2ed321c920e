"""l2_normalize, rank_by_similarity, ranked_positions, alpha_qe: hand-worked cases, bad inputs."""

from __future__ import annotations

import logging

import numpy as np
import pytest

import model.retrieval
from model.retrieval import (
    alpha_qe,
    l2_normalize,
    rank_and_locate,
    rank_by_similarity,
    ranked_positions,
)


def unit(*v: float) -> np.ndarray:
    a = np.asarray(v, dtype=np.float64)
    return a / np.linalg.norm(a)


# q = [1, 0]; database: x0 = [0.6, 0.8] (q.x0 = 0.6), x1 = [0, 1] (0), x2 = [-1, 0] (-1).
Q2 = np.array([[1.0, 0.0]])
X2 = np.array([[0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]])


class TestL2Normalize:
    def test_rows_unit_norm_and_zero_rows_stay_zero(self):
        out = l2_normalize(np.array([[3.0, 4.0], [0.0, 0.0]], dtype=np.float32))
        assert out.dtype == np.float32
        assert np.allclose(out, [[0.6, 0.8], [0.0, 0.0]])


class TestRankBySimilarity:
    def test_decreasing_inner_product_row_per_query(self):
        Q = np.array([[1.0, 0.0], [0.0, 1.0]])
        ranks = rank_by_similarity(Q, X2)
        assert ranks.shape == (2, 3)
        assert ranks.tolist() == [[0, 1, 2], [1, 0, 2]]

    def test_ties_keep_the_lower_index_first_with_and_without_topk(self):
        X = np.array([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.6, 0.8]])
        Q = np.array([[1.0, 0.0]])
        assert rank_by_similarity(Q, X).tolist() == [[1, 3, 4, 0, 2]]
        assert rank_by_similarity(Q, X, topk=1).tolist() == [[1]]
        assert rank_by_similarity(Q, X, topk=4).tolist() == [[1, 3, 4, 0]]

    def test_topk_equals_the_head_of_the_full_ranking(self):
        rng = np.random.default_rng(0)
        # Rounded values make many exact ties.
        Q = np.round(rng.normal(size=(7, 4)), 1)
        X = np.round(rng.normal(size=(50, 4)), 1)
        full = rank_by_similarity(Q, X)
        assert np.array_equal(rank_by_similarity(Q, X, topk=5), full[:, :5])
        assert np.array_equal(rank_by_similarity(Q, X, topk=500), full)

    def test_bad_inputs(self):
        with pytest.raises(ValueError, match="same descriptor dimension"):
            rank_by_similarity(np.ones((1, 3)), np.ones((4, 2)))
        with pytest.raises(ValueError, match="topk"):
            rank_by_similarity(Q2, X2, topk=0)


class TestAlphaQE:
    def test_k0_returns_the_normalised_queries(self):
        Q = np.array([[3.0, 4.0]])
        out = alpha_qe(Q, X2, k=0)
        assert out.dtype == np.float32
        assert np.allclose(out, [[0.6, 0.8]])

    def test_k1_alpha0_is_the_mean_with_the_nearest_neighbour(self):
        rng = np.random.default_rng(1)
        Q = l2_normalize(rng.normal(size=(4, 5)))
        X = l2_normalize(rng.normal(size=(30, 5)))
        nn = np.argmax(Q @ X.T, axis=1)
        expected = l2_normalize(Q + X[nn])
        assert np.allclose(alpha_qe(Q, X, k=1, alpha=0), expected, atol=1e-6)

    def test_alpha3_hand_computed(self):
        # k=2 nearest of q=[1,0]: x0 (0.6) and x1 (0). Weights 0.6^3 = 0.216 and 0^3 = 0:
        # q' = [1 + 0.216*0.6, 0.216*0.8] = [1.1296, 0.1728], then normalised.
        out = alpha_qe(Q2, X2, k=2, alpha=3.0)
        assert np.allclose(out, [unit(1.1296, 0.1728)], atol=1e-6)

    def test_negative_similarity_gets_weight_zero_for_every_alpha(self):
        # k=3 adds x2 (q.x2 = -1) with weight max(0, -1) ** alpha = 0, whole alpha or not:
        # q' = [1 + 0.6**a * 0.6, 0.6**a * 0.8] for a = 3 and a = 3.0001 alike.
        for a in (3, 3.0, 3.0001):
            w = 0.6**a
            assert np.allclose(alpha_qe(Q2, X2, k=3, alpha=a), [unit(1 + w * 0.6, w * 0.8)])
        assert np.allclose(
            alpha_qe(Q2, X2, k=3, alpha=3), alpha_qe(Q2, X2, k=3, alpha=3.0001), atol=1e-3
        )
        assert np.allclose(alpha_qe(Q2, X2, k=3, alpha=3), alpha_qe(Q2, X2, k=2, alpha=3))

    def test_alpha0_with_a_negative_similarity_is_the_plain_average(self):
        # 0 ** 0 == 1: every neighbour counts once, the negative one too.
        out = alpha_qe(Q2, X2, k=3, alpha=0)
        assert np.allclose(out, [unit(1 + 0.6 + 0 - 1, 0.8 + 1 + 0)], atol=1e-6)

    def test_k_beyond_database_uses_all_rows(self):
        assert np.allclose(alpha_qe(Q2, X2, k=10, alpha=3), alpha_qe(Q2, X2, k=3, alpha=3))

    def test_outputs_unit_norm(self):
        rng = np.random.default_rng(2)
        Q = l2_normalize(rng.normal(size=(20, 16)).astype(np.float32))
        X = l2_normalize(rng.normal(size=(200, 16)).astype(np.float32))
        out = alpha_qe(Q, X, k=5)
        assert out.shape == (20, 16) and out.dtype == np.float32
        assert np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)

    def test_unnormalised_input_warns(self, caplog):
        with caplog.at_level(logging.WARNING, logger="model.retrieval"):
            alpha_qe(Q2 * 2, X2, k=1)
        assert "L2-normalised Q" in caplog.text

    def test_bad_inputs(self):
        with pytest.raises(ValueError, match="NaN"):
            alpha_qe(np.array([[np.nan, 0.0]]), X2, k=1)
        with pytest.raises(ValueError, match="same descriptor dimension"):
            alpha_qe(np.ones((1, 3)), X2, k=1)
        with pytest.raises(ValueError, match="2-D"):
            alpha_qe(np.array([1.0, 0.0]), X2, k=1)
        with pytest.raises(ValueError, match="k must be"):
            alpha_qe(Q2, X2, k=-1)
        with pytest.raises(ValueError, match="alpha"):
            alpha_qe(Q2, X2, k=1, alpha=-1)


def reference_qe(Q, X, k, alpha, query_rows):
    """alpha_qe written out one query at a time: the k best other rows by a stable sort."""
    out = []
    for q, row in zip(Q, query_rows, strict=True):
        scores = X @ q
        order = [i for i in np.argsort(-scores, kind="stable") if i != row][:k]
        acc = q.copy()
        for i in order:
            acc = acc + max(0.0, scores[i]) ** alpha * X[i]
        out.append(acc / np.linalg.norm(acc))
    return np.array(out)


class TestAlphaQESelfExclusion:
    @pytest.mark.parametrize("seed", [0, 1, 2])
    @pytest.mark.parametrize(("k", "alpha"), [(1, 3.0), (2, 3.0), (5, 0.0), (4, 2.5)])
    def test_queries_that_are_the_database_skip_themselves(self, seed, k, alpha):
        rng = np.random.default_rng(seed)
        X = l2_normalize(rng.normal(size=(25, 6)))
        expected = reference_qe(X, X, k, alpha, query_rows=range(25))
        assert np.allclose(alpha_qe(X, X, k, alpha), expected, atol=1e-6)
        # A copy that is element-wise equal is detected as well, and explicit rows agree.
        assert np.allclose(alpha_qe(X.copy(), X, k, alpha), expected, atol=1e-6)
        assert np.allclose(alpha_qe(X, X, k, alpha, query_rows=np.arange(25)), expected, atol=1e-6)

    def test_k2_is_two_other_rows_not_one_plus_the_query(self):
        X = l2_normalize(np.array([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0]]))
        # Query 0's two nearest other rows: x1 (0.8) and x2 (0.6).
        w1, w2 = 0.8**3, 0.6**3
        expected = unit(1 + w1 * 0.8 + w2 * 0.6, w1 * 0.6 + w2 * 0.8)
        assert np.allclose(alpha_qe(X, X, k=2)[0], expected, atol=1e-6)

    def test_explicit_query_rows_mixing_database_and_outside_queries(self):
        rng = np.random.default_rng(3)
        X = l2_normalize(rng.normal(size=(30, 5)))
        outside = l2_normalize(rng.normal(size=(1, 5)))
        Q = np.concatenate([X[[7]], outside, X[[12]], X[[3]]])
        # The last query is X[3] but declared -1: it may be its own neighbour.
        rows = [7, -1, 12, -1]
        expected = reference_qe(Q, X, 3, 3.0, rows)
        out = alpha_qe(Q, X, 3, query_rows=rows)
        assert np.allclose(out, expected, atol=1e-6)
        assert np.allclose(out[3], reference_qe(Q[3:], X, 3, 3.0, [-1])[0], atol=1e-6)
        assert not np.allclose(out[3], reference_qe(Q[3:], X, 3, 3.0, [3])[0], atol=1e-3)

    def test_self_is_excluded_even_when_its_score_ties_another_row(self):
        # Rows 0 and 1 are the same image: query 0 ties them at 1; the stable order would put
        # row 0 (itself) first. Excluded, its k=2 neighbours are row 1 and row 2.
        X = l2_normalize(np.array([[1.0, 0.0], [1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]))
        expected = unit(1 + 1.0 + 0.6**3 * 0.6, 0.6**3 * 0.8)
        out = alpha_qe(X[:1], X, k=2, query_rows=[0])
        assert np.allclose(out, [expected], atol=1e-6)
        assert np.allclose(alpha_qe(X, X, k=2)[0], expected, atol=1e-6)

    def test_k_at_least_n_uses_all_other_rows(self):
        X = l2_normalize(np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]))
        # alpha=0: weight 1 for each of the N - 1 others, never for the query itself.
        for k in (2, 3, 10):
            out = alpha_qe(X, X, k=k, alpha=0)
            assert np.allclose(out[0], unit(1 + 0.6 + 0.0, 0.8 + 1.0), atol=1e-6)

    def test_blocked_over_queries(self, monkeypatch):
        rng = np.random.default_rng(4)
        X = l2_normalize(rng.normal(size=(40, 4)))
        expected = alpha_qe(X, X, k=3)
        monkeypatch.setattr(model.retrieval, "_SCORE_BLOCK_ELEMS", 100)  # 2 queries a block
        assert np.allclose(alpha_qe(X, X, k=3), expected, atol=1e-6)
        assert np.allclose(expected, reference_qe(X, X, 3, 3.0, range(40)), atol=1e-6)

    def test_bad_query_rows(self):
        X = l2_normalize(np.eye(3))
        with pytest.raises(ValueError, match="one entry per query"):
            alpha_qe(X, X, k=1, query_rows=[0, 1])
        with pytest.raises(ValueError, match="one entry per query"):
            alpha_qe(X, X, k=1, query_rows=[[0, 1, 2]])
        with pytest.raises(ValueError, match="integer"):
            alpha_qe(X, X, k=1, query_rows=[0.0, 1.0, 2.0])
        with pytest.raises(ValueError, match="integer"):
            alpha_qe(X, X, k=1, query_rows=[True, False, True])
        with pytest.raises(ValueError, match=r"\[0, 3\) or -1"):
            alpha_qe(X, X, k=1, query_rows=[0, 1, 3])
        with pytest.raises(ValueError, match=r"\[0, 3\) or -1"):
            alpha_qe(X, X, k=0, query_rows=[-2, 1, 2])


def full_positions(Q, X, items):
    """Positions of items in the full stable ranking, read off rank_by_similarity."""
    ranks = rank_by_similarity(Q, X)
    inverse = np.empty_like(ranks)
    rows = np.arange(ranks.shape[1])
    for j in range(ranks.shape[0]):
        inverse[j, ranks[j]] = rows
    return [inverse[j, np.asarray(g, dtype=np.int64)] for j, g in enumerate(items)]


class TestRankedPositions:
    def test_hand_worked_ties(self):
        # Scores for q=[1,0]: 0, 1, 0, 1, 0.6 -> ranking 1, 3, 4, 0, 2.
        X = np.array([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.6, 0.8]])
        out = ranked_positions([[1.0, 0.0]], X, [[2, 0, 3, 1, 4, 2]])
        assert out[0].dtype == np.int64
        assert out[0].tolist() == [4, 3, 1, 0, 2, 4]

    @pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
    @pytest.mark.parametrize("levels", [None, 2, 3])
    def test_equals_the_full_stable_ranking(self, seed, levels, monkeypatch):
        rng = np.random.default_rng(seed)
        n_q, n_db, dim = 9, 120, 5
        Q, X = rng.normal(size=(n_q, dim)), rng.normal(size=(n_db, dim))
        if levels is not None:  # a few levels per coordinate: many exact ties of scores
            Q, X = np.round(Q * levels / 2) / levels, np.round(X * levels / 2) / levels
        Q, X = Q.astype(np.float32), X.astype(np.float32)
        items = [rng.integers(0, n_db, size=rng.integers(0, 40)) for _ in range(n_q)]
        items[0] = np.array([], dtype=np.int64)
        items[1] = np.arange(n_db)[::-1]  # every row, in reverse
        expected = full_positions(Q, X, items)
        got = ranked_positions(Q, X, items)
        assert len(got) == n_q
        for g, e in zip(got, expected, strict=True):
            assert np.array_equal(g, e)
        monkeypatch.setattr(model.retrieval, "_SCORE_BLOCK_ELEMS", 3 * n_db)  # 3 queries a block
        for g, e in zip(ranked_positions(Q, X, items), expected, strict=True):
            assert np.array_equal(g, e)

    def test_no_queries_and_list_inputs(self):
        assert ranked_positions(np.zeros((0, 2)), X2, []) == []
        assert ranked_positions(Q2, X2, [[2, 0]])[0].tolist() == [2, 0]

    def test_bad_items(self):
        with pytest.raises(ValueError, match="one index list per query"):
            ranked_positions(Q2, X2, [[0], [1]])
        with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
            ranked_positions(Q2, X2, [[3]])
        with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
            ranked_positions(Q2, X2, [[-1]])
        with pytest.raises(ValueError, match="integer"):
            ranked_positions(Q2, X2, [[0.5]])
        with pytest.raises(TypeError, match="sequence"):
            ranked_positions(Q2, X2, {0: [1]})


def test_rank_and_locate_is_both_in_one_pass() -> None:
    rng = np.random.default_rng(3)
    X = np.round(rng.normal(size=(300, 6)), 1).astype(np.float32)  # ties included
    Q = rng.normal(size=(7, 6)).astype(np.float32)
    items = [rng.choice(300, 20, replace=False) for _ in range(7)]
    ranks, located = rank_and_locate(Q, X, items, topk=15)
    np.testing.assert_array_equal(ranks, rank_by_similarity(Q, X, 15))
    for got, want in zip(located, ranked_positions(Q, X, items), strict=True):
        np.testing.assert_array_equal(got, want)
    assert rank_and_locate(Q, X, items, topk=0)[0].shape == (7, 0)
    with pytest.raises(ValueError, match="topk"):
        rank_and_locate(Q, X, items, topk=-1)
