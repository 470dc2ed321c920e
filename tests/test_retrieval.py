"""l2_normalize, rank_by_similarity and alpha_qe on hand-computed cases and bad inputs."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from model.retrieval import alpha_qe, l2_normalize, rank_by_similarity


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

    def test_negative_similarity_with_integer_alpha_keeps_its_sign(self):
        # k=3 adds x2 with weight (-1)^3 = -1: q' = [1.1296 + 1, 0.1728].
        out = alpha_qe(Q2, X2, k=3, alpha=3)
        assert np.allclose(out, [unit(2.1296, 0.1728)], atol=1e-6)

    def test_negative_similarity_with_fractional_alpha_is_clamped(self):
        # (-1) ** 2.5 has no real value: clamped to 0, so x2 adds nothing.
        out = alpha_qe(Q2, X2, k=3, alpha=2.5)
        w = 0.6**2.5
        assert np.isfinite(out).all()
        assert np.allclose(out, [unit(1 + w * 0.6, w * 0.8)], atol=1e-6)

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
