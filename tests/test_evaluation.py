"""compute_map, evaluate_revisited (from rankings and from positions) and recall_at_k."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from model.evaluation import (
    cluster_map,
    compute_map,
    compute_map_at_positions,
    evaluate_revisited,
    evaluate_revisited_at_positions,
    ground_truth_items,
    recall_at_k,
)
from model.retrieval import rank_by_similarity, ranked_positions


def col(*indices: int) -> np.ndarray:
    """A single-query ranking in the protocol's [n_db, 1] layout."""
    return np.array(indices, dtype=np.int64)[:, None]


def reference_map(ranks, gnd, kappas):
    """The protocol written out literally, one loop step at a time (checks the vectorised one)."""
    aps, prs = [], []
    for q, g in enumerate(gnd):
        ok, junk = list(g["ok"]), list(g.get("junk", []))
        if not ok:
            continue
        positions, n_junk_seen = [], 0
        for i, idx in enumerate(ranks[:, q]):
            if idx in junk:
                n_junk_seen += 1
            elif idx in ok:
                positions.append(i - n_junk_seen)
        ap = 0.0
        for j, r in enumerate(positions):
            p0 = 1.0 if r == 0 else j / r
            p1 = (j + 1) / (r + 1)
            ap += (p0 + p1) / 2 / len(ok)
        aps.append(ap)
        row = []
        for k in kappas:
            if not positions:
                row.append(0.0)
                continue
            kq = min(max(positions) + 1, k)
            row.append(sum(p + 1 <= kq for p in positions) / kq)
        prs.append(row)
    return np.mean(aps), np.mean(prs, axis=0) if kappas else np.zeros(0)


class TestComputeMapHandWorked:
    def test_positives_at_positions_0_and_2(self):
        # 2 positives at 0-based positions 0 and 2 of 4:
        #   j=0, r=0: p0 = 1,   p1 = 1/1 -> (1 + 1)/2 * 1/2     = 1/2
        #   j=1, r=2: p0 = 1/2, p1 = 2/3 -> (1/2 + 2/3)/2 * 1/2 = 7/24
        # AP = 12/24 + 7/24 = 19/24
        m_ap, aps, _, _ = compute_map(col(0, 1, 2, 3), [{"ok": [0, 2]}])
        assert m_ap == pytest.approx(19 / 24)
        assert aps == pytest.approx([19 / 24])

    def test_perfect_ranking_scores_one(self):
        m_ap, _, mpr, _ = compute_map(col(4, 2, 0, 1, 3), [{"ok": [4, 2, 0]}], kappas=(1, 3, 5))
        assert m_ap == pytest.approx(1.0)
        assert mpr == pytest.approx([1.0, 1.0, 1.0])

    def test_reversed_ranking_uses_the_trapezoid(self):
        # The one positive comes last, at r=3: p0 = 0/3, p1 = 1/4 -> AP = 1/8 (not 1/4).
        m_ap, _, _, _ = compute_map(col(3, 2, 1, 0), [{"ok": [0]}])
        assert m_ap == pytest.approx(1 / 8)

    def test_junk_is_removed_before_scoring(self):
        # Positive 2 at r=2: p0 = 0, p1 = 1/3 -> AP = 1/6.
        assert compute_map(col(0, 1, 2, 3), [{"ok": [2]}])[0] == pytest.approx(1 / 6)
        # Junk 0 ranked above it moves it to r=1: p1 = 1/2 -> AP = 1/4.
        assert compute_map(col(0, 1, 2, 3), [{"ok": [2], "junk": [0]}])[0] == pytest.approx(1 / 4)
        # Both images above it junk: r=0 -> AP = 1.
        assert compute_map(col(0, 1, 2, 3), [{"ok": [2], "junk": [1, 0]}])[0] == pytest.approx(1)
        # Junk ranked below the positive changes nothing.
        assert compute_map(col(0, 1, 2, 3), [{"ok": [2], "junk": [3]}])[0] == pytest.approx(1 / 6)

    def test_positive_missing_from_a_top_k_ranking_counts_in_the_denominator(self):
        # Top-2 of a 10-image database; positive 1 at r=1 (p0 = 0, p1 = 1/2), positive 5 never
        # retrieved: AP = (0 + 1/2)/2 * 1/2 = 1/8.
        m_ap, _, _, _ = compute_map(col(0, 1), [{"ok": [1, 5]}], n_db=10)
        assert m_ap == pytest.approx(1 / 8)

    def test_mp_at_k_divides_by_min_of_k_and_last_positive(self):
        # Positives at 1-based positions 1 and 3.
        #   k=1: kq = 1, one positive within -> 1
        #   k=2: kq = 2, one within -> 1/2
        #   k=5: kq = min(3, 5) = 3 (the quirk; not 5), two within -> 2/3
        _, _, mpr, prs = compute_map(col(0, 1, 2, 3, 4), [{"ok": [0, 2]}], kappas=(1, 2, 5))
        assert mpr == pytest.approx([1.0, 0.5, 2 / 3])
        assert prs.shape == (1, 3)

    def test_mp_at_k_is_zero_when_no_positive_was_retrieved(self):
        _, aps, mpr, _ = compute_map(col(0, 1), [{"ok": [7]}], kappas=(1, 5), n_db=10)
        assert aps == pytest.approx([0.0])
        assert mpr == pytest.approx([0.0, 0.0])

    def test_query_without_positives_is_left_out(self):
        ranks = np.array([[0, 0], [1, 1], [2, 2], [3, 3]])
        m_ap, aps, mpr, prs = compute_map(ranks, [{"ok": [0, 2]}, {"ok": []}], kappas=(5,))
        assert np.isnan(aps[1]) and np.isnan(prs[1]).all()
        assert m_ap == pytest.approx(19 / 24)  # the mean over the one non-empty query
        assert mpr == pytest.approx([2 / 3])

    def test_all_queries_empty_gives_nan_and_a_warning(self, caplog):
        with caplog.at_level(logging.WARNING, logger="model.evaluation"):
            m_ap, aps, mpr, _ = compute_map(col(0, 1), [{"ok": [], "junk": [1]}], kappas=(1,))
        assert np.isnan(m_ap) and np.isnan(aps).all() and np.isnan(mpr).all()
        assert "NaN" in caplog.text

    def test_matches_a_literal_loop_on_random_rankings(self):
        rng = np.random.default_rng(0)
        n_db, n_q, kappas = 40, 12, (1, 5, 10)
        ranks = np.stack([rng.permutation(n_db) for _ in range(n_q)], axis=1)
        gnd = []
        for _ in range(n_q):
            chosen = rng.permutation(n_db)[: rng.integers(1, 15)]
            split = rng.integers(1, chosen.size + 1)
            gnd.append({"ok": chosen[:split].tolist(), "junk": chosen[split:].tolist()})
        m_ap, aps, mpr, _ = compute_map(ranks, gnd, kappas)
        ref_map, ref_mpr = reference_map(ranks, gnd, kappas)
        assert m_ap == pytest.approx(ref_map)
        assert mpr == pytest.approx(ref_mpr)
        assert ((aps >= 0) & (aps <= 1)).all()


class TestComputeMapValidation:
    def test_row_per_query_layout_suggests_transposing(self):
        ranks = np.tile(np.arange(5), (2, 1))  # [n_q=2, n_db=5], FAISS's layout
        with pytest.raises(ValueError, match=r"transpose"):
            compute_map(ranks, [{"ok": [0]}, {"ok": [1]}])

    def test_wrong_number_of_queries(self):
        with pytest.raises(ValueError, match=r"\[n_db, n_q\].*3 queries"):
            compute_map(np.zeros((5, 2), dtype=int), [{"ok": [0]}] * 3)

    def test_scores_instead_of_indices(self):
        with pytest.raises(TypeError, match="integer"):
            compute_map(np.random.rand(4, 1), [{"ok": [0]}])

    def test_one_dimensional_ranking(self):
        with pytest.raises(ValueError, match="2-D"):
            compute_map(np.arange(4), [{"ok": [0]}])

    def test_indices_out_of_range(self):
        with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
            compute_map(col(0, 1, 5), [{"ok": [0]}])
        with pytest.raises(ValueError, match="outside"):
            compute_map(col(0, -1, 2), [{"ok": [0]}])
        with pytest.raises(ValueError, match=r"gnd\[0\]\['ok'\].*outside"):
            compute_map(col(0, 1, 2), [{"ok": [3]}])

    def test_duplicate_index_in_a_column(self):
        with pytest.raises(ValueError, match="twice"):
            compute_map(col(0, 1, 1), [{"ok": [1]}])

    def test_missing_ok_key(self):
        with pytest.raises(ValueError, match=r"gnd\[1\] is missing key\(s\) \['ok'\]"):
            compute_map(np.zeros((1, 2), dtype=int), [{"ok": [0]}, {"easy": [0]}])

    def test_ok_and_junk_overlap(self):
        with pytest.raises(ValueError, match="both ok and junk"):
            compute_map(col(0, 1), [{"ok": [0], "junk": [0]}])

    @pytest.mark.parametrize("kappas", [(-1,), (0,), (1.5,)])
    def test_bad_kappas(self, kappas):
        with pytest.raises(ValueError, match="kappas"):
            compute_map(col(0, 1), [{"ok": [0]}], kappas=kappas)


class TestEvaluateRevisited:
    def test_easy_medium_hard_assembly(self):
        # Ranking of 6 images: 3, 5, 2, 0, 4, 1 (0-based positions 0..5); 3 and 4 are negatives.
        # easy=[0, 5], hard=[2], junk=[1]. Each setup ranks an ignored image above a positive.
        #   easy:   ok {5, 0} at 1 and 3; junk {1, 2}: 2 sits before 0 -> r = 1, 2
        #           -> (0 + 1/2)/2 * 1/2 + (1/2 + 2/3)/2 * 1/2 = 3/24 + 7/24 = 5/12
        #   medium: ok {5, 2, 0} at r = 1, 2, 3; junk {1} last
        #           -> [(0 + 1/2) + (1/2 + 2/3) + (2/3 + 3/4)] / 2 / 3 = 37/72
        #   hard:   ok {2} at 2; junk {1, 0, 5}: 5 sits before it -> r = 1
        #           -> (0 + 1/2)/2 = 1/4
        # mP@5 on 1-based positions: easy [2, 3] -> kq=3 -> 2/3; medium [2, 3, 4] -> kq=4 ->
        # 3/4; hard [2] -> kq=2 -> 1/2. mP@1: a negative comes first everywhere -> 0.
        out = evaluate_revisited(
            col(3, 5, 2, 0, 4, 1), [{"easy": [0, 5], "hard": [2], "junk": [1]}], kappas=(1, 5)
        )
        assert set(out) == {"easy", "medium", "hard"}
        assert out["easy"]["map"] == pytest.approx(5 / 12)
        assert out["medium"]["map"] == pytest.approx(37 / 72)
        assert out["hard"]["map"] == pytest.approx(1 / 4)
        assert out["easy"]["mp@k"] == pytest.approx({1: 0.0, 5: 2 / 3})
        assert out["medium"]["mp@k"] == pytest.approx({1: 0.0, 5: 3 / 4})
        assert out["hard"]["mp@k"] == pytest.approx({1: 0.0, 5: 1 / 2})
        assert all(isinstance(v["map"], float) for v in out.values())

    def test_query_with_only_easy_positives_is_left_out_of_hard(self):
        ranks = np.array([[0, 0], [1, 1], [2, 2]])
        gnd = [{"easy": [0], "hard": [], "junk": []}, {"easy": [], "hard": [1], "junk": [2]}]
        out = evaluate_revisited(ranks, gnd, kappas=(1,))
        assert out["hard"]["map"] == pytest.approx(1 / 4)  # only query 1: r=1 -> (0 + 1/2)/2
        assert out["easy"]["map"] == pytest.approx(1.0)  # only query 0

    def test_missing_hard_key(self):
        with pytest.raises(ValueError, match=r"missing key\(s\) \['hard'\]"):
            evaluate_revisited(col(0, 1), [{"easy": [0], "junk": []}])

    def test_lists_must_be_disjoint(self):
        with pytest.raises(ValueError, match="both easy and hard"):
            evaluate_revisited(col(0, 1), [{"easy": [0], "hard": [0], "junk": []}])


class TestRecallAtK:
    def test_faiss_style_minus_one_entries_never_match(self):
        db_labels = np.array([0, 1, 2])
        query_labels = np.array([2, 0, 5, 2])
        ranks = np.array(
            [
                [2, -1, -1],  # label 2 first -> hit at 1
                [-1, 0, 1],  # no result, then label 0 -> hit at 2
                [1, 2, 0],  # label 5 is nowhere -> never
                [-1, -1, -1],  # db_labels[-1] is 2, but -1 means "no result" -> never
            ]
        )
        out = recall_at_k(ranks, query_labels, db_labels, ks=(1, 2, 3, 10))
        assert out == pytest.approx({1: 1 / 4, 2: 2 / 4, 3: 2 / 4, 10: 2 / 4})
        assert all(isinstance(v, float) for v in out.values())

    def test_string_labels(self):
        out = recall_at_k([[1, 0]], ["cat"], ["cat", "dog"], ks=[1, 2])
        assert out == {1: 0.0, 2: 1.0}

    def test_column_layout_suggests_transposing(self):
        ranks = np.zeros((5, 2), dtype=int)  # [n, n_q]
        with pytest.raises(ValueError, match="transpose"):
            recall_at_k(ranks, [0, 1], [0] * 5, ks=[1])

    def test_index_beyond_db_labels(self):
        with pytest.raises(ValueError, match="db_labels"):
            recall_at_k([[0, 3]], [0], [0, 1, 2], ks=[1])

    def test_negative_k(self):
        with pytest.raises(ValueError, match="ks"):
            recall_at_k([[0]], [0], [0], ks=[-1])


def positions_of(ranks, items):
    """(items, their positions) per query, read off a full [n_db, n_q] ranking."""
    out = []
    for j, g in enumerate(items):
        inverse = np.empty(ranks.shape[0], dtype=np.int64)
        inverse[ranks[:, j]] = np.arange(ranks.shape[0])
        g = np.asarray(g, dtype=np.int64)
        out.append((g, inverse[g]))
    return out


def random_revisited(rng, n_q, n_db):
    """Revisited ground truth with empty lists, junk, and queries without easy or hard images."""
    gnd = []
    for q in range(n_q):
        chosen = rng.permutation(n_db)[: rng.integers(0, 25)]
        a, b = sorted(rng.integers(0, chosen.size + 1, size=2))
        gnd.append({"easy": chosen[:a], "hard": chosen[a:b], "junk": chosen[b:]})
        if q == 0:
            gnd[0] = {"easy": [], "hard": [], "junk": []}
        elif q == 1:
            gnd[1] = {"easy": [], "hard": chosen[:3], "junk": chosen[3:]}
    return gnd


def assert_same_revisited(got, expected):
    assert got.keys() == expected.keys()
    for name in expected:
        assert isinstance(got[name]["map"], float)
        assert got[name]["map"] == pytest.approx(expected[name]["map"], abs=1e-12, nan_ok=True)
        assert got[name]["mp@k"].keys() == expected[name]["mp@k"].keys()
        for k, v in expected[name]["mp@k"].items():
            assert got[name]["mp@k"][k] == pytest.approx(v, abs=1e-12, nan_ok=True)


class TestAtPositions:
    def test_hand_worked_19_over_24(self):
        # Positives 0 and 2 at positions 0 and 2 (see the compute_map case); 1 and 3 listed too.
        positions = [(np.array([2, 0, 3]), np.array([2, 0, 3]))]
        m_ap, aps, mpr, _ = compute_map_at_positions(positions, [{"ok": [0, 2]}], kappas=(1, 5))
        assert m_ap == pytest.approx(19 / 24)
        assert aps == pytest.approx([19 / 24])
        assert mpr == pytest.approx([1.0, 2 / 3])
        # Positive 2 at position 2 with junk 0 above it: r=1 -> AP = (0 + 1/2)/2 = 1/4.
        positions = [(np.array([0, 2, 3]), np.array([0, 2, 3]))]
        gnd = [{"ok": [2], "junk": [0, 3]}]
        assert compute_map_at_positions(positions, gnd)[0] == pytest.approx(1 / 4)

    @pytest.mark.parametrize("seed", [0, 1, 2, 3])
    @pytest.mark.parametrize("levels", [None, 2])
    def test_equal_to_the_full_ranking_metrics(self, seed, levels):
        rng = np.random.default_rng(seed)
        n_q, n_db, dim, kappas = 11, 150, 6, (1, 5, 10)
        Q, X = rng.normal(size=(n_q, dim)), rng.normal(size=(n_db, dim))
        if levels is not None:  # quantised: many tied scores
            Q, X = np.round(Q * levels / 2) / levels, np.round(X * levels / 2) / levels
        gnd = random_revisited(rng, n_q, n_db)
        ranks = rank_by_similarity(Q, X).T  # the full ranking, [n_db, n_q]
        items = ground_truth_items(gnd)
        positions = list(zip(items, ranked_positions(Q, X, items), strict=True))
        for (_, p), (_, e) in zip(positions, positions_of(ranks, items), strict=True):
            assert np.array_equal(p, e)

        assert_same_revisited(
            evaluate_revisited_at_positions(positions, gnd, kappas),
            evaluate_revisited(ranks, gnd, kappas),
        )

        ok_gnd = [
            {"ok": np.concatenate([g["easy"], g["hard"]]).astype(int), "junk": g["junk"]}
            for g in gnd
        ]
        ref = compute_map(ranks, ok_gnd, kappas)
        out = compute_map_at_positions(positions, ok_gnd, kappas)
        assert out[0] == pytest.approx(ref[0], abs=1e-12)
        for a, b in zip(out[1:], ref[1:], strict=True):
            assert np.allclose(a, b, atol=1e-12, rtol=0, equal_nan=True)
        assert np.isnan(out[1][0])  # query 0 has no positives

    def test_same_figures_when_positions_come_shuffled_with_extras(self):
        rng = np.random.default_rng(5)
        n_db, n_q = 60, 4
        ranks = np.stack([rng.permutation(n_db) for _ in range(n_q)], axis=1)
        gnd = random_revisited(rng, n_q, n_db)
        every = [rng.permutation(n_db) for _ in range(n_q)]  # all images, in no order
        assert_same_revisited(
            evaluate_revisited_at_positions(positions_of(ranks, every), gnd, (1, 3)),
            evaluate_revisited(ranks, gnd, (1, 3)),
        )

    def test_all_queries_without_positives(self, caplog):
        with caplog.at_level(logging.WARNING, logger="model.evaluation"):
            m_ap, aps, mpr, _ = compute_map_at_positions([([], [])], [{"ok": []}], kappas=(1,))
        assert np.isnan(m_ap) and np.isnan(aps).all() and np.isnan(mpr).all()
        assert "NaN" in caplog.text

    def test_ground_truth_items(self):
        gnd = [{"easy": [4, 1], "hard": [], "junk": [1, 9]}, {"ok": [3], "junk": []}, {}]
        items = ground_truth_items(gnd)
        assert [i.tolist() for i in items] == [[1, 4, 9], [3], []]
        assert all(i.dtype == np.int64 for i in items)


class TestAtPositionsValidation:
    def test_a_positive_without_position_is_an_error(self):
        with pytest.raises(ValueError, match=r"no position .* gnd\[0\]\['ok'\] \(e.g. 5\)"):
            compute_map_at_positions([([0, 1], [0, 1])], [{"ok": [1, 5]}])

    def test_a_junk_image_without_position_is_an_error(self):
        with pytest.raises(ValueError, match=r"gnd\[0\]\['junk'\]"):
            compute_map_at_positions([([1], [0])], [{"ok": [1], "junk": [2]}])
        with pytest.raises(ValueError, match=r"gnd\[0\]\['hard'\]"):
            gnd = [{"easy": [1], "hard": [2], "junk": []}]
            evaluate_revisited_at_positions([([1], [0])], gnd)

    def test_one_pair_per_query(self):
        with pytest.raises(ValueError, match=r"one .* pair per query"):
            compute_map_at_positions([([0], [0])], [{"ok": [0]}, {"ok": [0]}])
        with pytest.raises(TypeError, match="pair"):
            compute_map_at_positions([{0: 0}], [{"ok": [0]}])
        with pytest.raises(TypeError, match="sequence"):
            compute_map_at_positions({0: ([0], [0])}, [{"ok": [0]}])

    def test_arrays_must_be_parallel_integers_in_range(self):
        with pytest.raises(ValueError, match="parallel"):
            compute_map_at_positions([([0, 1], [0])], [{"ok": [0]}])
        with pytest.raises(ValueError, match="integer"):
            compute_map_at_positions([([0], [0.5])], [{"ok": [0]}])
        with pytest.raises(ValueError, match=r"the positions has indices outside"):
            compute_map_at_positions([([0], [-1])], [{"ok": [0]}])
        with pytest.raises(ValueError, match=r"\[0, 4\)"):
            compute_map_at_positions([([0], [4])], [{"ok": [0]}], n_db=4)
        with pytest.raises(ValueError, match=r"gnd\[0\]\['ok'\].*outside \[0, 4\)"):
            compute_map_at_positions([([0], [0])], [{"ok": [4]}], n_db=4)

    def test_positions_must_come_from_one_ranking(self):
        with pytest.raises(ValueError, match="same position"):
            compute_map_at_positions([([0, 1], [3, 3])], [{"ok": [0, 1]}])
        with pytest.raises(ValueError, match="two different positions"):
            compute_map_at_positions([([0, 0], [1, 2])], [{"ok": [0]}])
        # The same index twice at one position is a repeat, not a conflict.
        assert compute_map_at_positions([([0, 0], [0, 0])], [{"ok": [0]}])[0] == 1.0

    def test_lists_must_be_disjoint(self):
        with pytest.raises(ValueError, match="both easy and junk"):
            evaluate_revisited_at_positions(
                [([0, 1], [0, 1])], [{"easy": [0], "hard": [], "junk": [0]}]
            )
        with pytest.raises(ValueError, match="both ok and junk"):
            compute_map_at_positions([([0], [0])], [{"ok": [0], "junk": [0]}])


class TestClusterMap:
    """Held-out scenes scored by their SfM clusters, or by their 3D models within them."""

    # rows: 0 query (cluster 0, model A), 1 model A, 2 model B of the same cluster (a group
    # that joined two scenes), 3 unregistered in cluster 0, 4 another cluster
    x = np.array([[1.0, 0.0], [0.6, 0.8], [0.99, 0.141], [0.0, 1.0], [0.9, 0.436]])
    clusters = np.array([0, 0, 0, 0, 1])
    models = np.array(["A", "A", "B", None, "C"], dtype=object)

    def test_clusters_count_every_photo_of_the_cluster(self):
        ranks = np.argsort(-(self.x @ self.x[[0]].T), axis=0, kind="stable")  # 0, 2, 4, 1, 3
        expected = compute_map(ranks, [{"ok": [1, 2, 3], "junk": [0]}])[0]
        assert cluster_map(self.x, self.clusters, [0]) == pytest.approx(expected)

    def test_models_count_the_query_model_and_make_the_rest_of_the_cluster_junk(self):
        ranks = np.argsort(-(self.x @ self.x[[0]].T), axis=0, kind="stable")
        expected = compute_map(ranks, [{"ok": [1], "junk": [0, 2, 3]}])[0]
        found = cluster_map(self.x, self.clusters, [0], models=self.models)
        assert found == pytest.approx(expected) == 0.25  # junk out: 4, then 1 (trapezoid AP)
        assert cluster_map(self.x, self.clusters, [3], models=self.models) == pytest.approx(
            cluster_map(self.x, self.clusters, [3])
        )  # a query with no model is scored by its cluster
        with pytest.raises(ValueError, match="one entry per row"):
            cluster_map(self.x, self.clusters, [0], models=self.models[:-1])
