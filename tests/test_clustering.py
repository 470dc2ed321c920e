"""Grouping descriptors into candidate scenes (model.clustering): synthetic and real photos."""

from __future__ import annotations

import numpy as np
import pytest

from model.clustering import (
    DEFAULT_K,
    DEFAULT_THRESHOLD,
    cluster_scores,
    connected_components,
    group_descriptors,
    knn_neighbours,
)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _sphere_clusters(
    sizes: list[int], dim: int = 32, spread: float = 0.07, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian blobs around random unit centres, projected on the sphere (within cos ≈ 0.86)."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.standard_normal((len(sizes), dim)))
    labels = np.repeat(np.arange(len(sizes)), sizes)
    X = _unit(centres[labels] + spread * rng.standard_normal((labels.size, dim)))
    return X, labels


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    scores = cluster_scores(a, b)
    return scores["purity"] == 1.0 and scores["recall"] == 1.0


# --- synthetic descriptors -------------------------------------------------------------------


def test_separated_sphere_clusters_are_recovered_exactly():
    sizes = [40, 31, 25, 20, 12, 5, 2]
    X, truth = _sphere_clusters(sizes)
    labels = group_descriptors(X)
    assert labels.dtype == np.int64 and labels.shape == truth.shape
    scores = cluster_scores(labels, truth)
    assert scores["purity"] == scores["recall"] == 1.0, scores
    assert scores["pair_precision"] == scores["pair_recall"] == 1.0
    assert scores["n_groups"] == len(sizes)
    # Ids by size, largest first: here the truth's own order.
    np.testing.assert_array_equal(labels, truth)


def _chain_between_two_scenes(n_each: int = 30, n_chain: int = 5, seed: int = 1):
    """Two tight scenes 1.2 rad apart and a sparse trail of images along the arc between them.

    Neighbouring trail images are 0.2 rad apart (cosine 0.98, far above the threshold), so
    single linkage walks from one scene to the other; inside a scene images are ~0.03 rad apart.
    """
    rng = np.random.default_rng(seed)
    dim = 16
    a = np.zeros(dim)
    a[0] = 1.0
    b = np.zeros(dim)
    b[0], b[1] = np.cos(1.2), np.sin(1.2)
    scene_a = _unit(a + 0.01 * rng.standard_normal((n_each, dim)))
    scene_b = _unit(b + 0.01 * rng.standard_normal((n_each, dim)))
    angles = 1.2 * np.arange(1, n_chain + 1) / (n_chain + 1)
    trail = np.zeros((n_chain, dim), np.float32)
    trail[:, 0], trail[:, 1] = np.cos(angles), np.sin(angles)
    X = np.concatenate([scene_a, trail, scene_b]).astype(np.float32)
    truth = np.repeat([0, 2, 1], [n_each, n_chain, n_each])
    return X, truth


def test_a_trail_of_images_does_not_chain_two_scenes_together():
    X, truth = _chain_between_two_scenes()
    labels = group_descriptors(X)
    in_a, in_b = set(labels[truth == 0]), set(labels[truth == 1])
    assert len(in_a) == 1 and len(in_b) == 1 and in_a != in_b, (in_a, in_b)
    # Single linkage over the same kNN graph does merge them: the test has teeth.
    single = group_descriptors(X, mutual=False)
    assert single[truth == 0][0] == single[truth == 1][0]


def test_an_image_between_two_groups_joins_one_side_only():
    """A lone image whose neighbours are all in two groups joins its nearer group as a leaf."""
    rng = np.random.default_rng(2)
    dim = 16
    a, b = np.zeros(dim), np.zeros(dim)
    a[0] = 1.0
    b[0], b[1] = np.cos(0.6), np.sin(0.6)
    middle = np.zeros((1, dim))
    middle[0, 0], middle[0, 1] = np.cos(0.29), np.sin(0.29)  # a shade nearer a
    X = np.concatenate(
        [
            _unit(a + 0.01 * rng.standard_normal((12, dim))),
            _unit(middle),
            _unit(b + 0.01 * rng.standard_normal((12, dim))),
        ]
    )
    labels = group_descriptors(X)
    assert len(set(labels[:12])) == 1 and len(set(labels[13:])) == 1
    assert labels[0] != labels[13]
    assert labels[12] == labels[0]
    assert group_descriptors(X, mutual=False).max() == 0  # single linkage bridges them


def test_grouping_is_deterministic_and_independent_of_row_order():
    X, _ = _sphere_clusters([30, 20, 20, 9, 4], spread=0.12, seed=3)
    first = group_descriptors(X)
    np.testing.assert_array_equal(first, group_descriptors(X.copy()))
    perm = np.random.default_rng(0).permutation(len(X))
    permuted = group_descriptors(X[perm])
    assert _same_partition(permuted, first[perm])
    # Equal-size groups are numbered by their first row: 20 and 20 here.
    assert first[30] == 1 and first[50] == 2


def test_precomputed_neighbours_faiss_layout_match_the_built_in_search():
    X, _ = _sphere_clusters([25, 15, 10, 3], spread=0.1, seed=4)
    expected = group_descriptors(X)
    # FAISS searching X in itself: self in column 0, k + 1 columns.
    S = X @ X.T
    order = np.argsort(-S, axis=1, kind="stable")[:, : DEFAULT_K + 1]
    sims = np.take_along_axis(S, order, axis=1)
    np.testing.assert_array_equal(group_descriptors(neighbours=(sims, order)), expected)
    np.testing.assert_array_equal(group_descriptors(X, neighbours=(sims, order)), expected)
    # Columns out of order, plus -1 padding ("no neighbour") and a repeated neighbour.
    shuffled = np.random.default_rng(1).permutation(order.shape[1])
    pad_idx = np.concatenate([order[:, shuffled], -np.ones((len(X), 2), np.int64)], axis=1)
    pad_sims = np.concatenate([sims[:, shuffled], np.full((len(X), 2), -3.4e38)], axis=1)
    pad_idx = np.concatenate([pad_idx, order[:, 1:2]], axis=1)
    pad_sims = np.concatenate([pad_sims, sims[:, 1:2]], axis=1)
    np.testing.assert_array_equal(group_descriptors(neighbours=(pad_sims, pad_idx)), expected)


def test_knn_neighbours_excludes_self_and_orders_by_similarity():
    X, _ = _sphere_clusters([6, 4], seed=5)
    X = np.concatenate([X, X[:1]])  # an exact duplicate of row 0
    sims, idx = knn_neighbours(X, k=3)
    assert sims.shape == idx.shape == (11, 3)
    assert not (idx == np.arange(11)[:, None]).any()
    assert idx[0, 0] == 10 and idx[10, 0] == 0
    assert (np.diff(sims, axis=1) <= 1e-6).all()
    np.testing.assert_allclose(sims, np.einsum("nd,nkd->nk", X, X[idx]), atol=1e-6)
    assert knn_neighbours(X, k=50)[1].shape == (11, 10)  # at most N - 1


def test_min_size_marks_small_groups_unassigned():
    X, truth = _sphere_clusters([20, 10, 3, 1], seed=6)
    labels = group_descriptors(X, min_size=4)
    np.testing.assert_array_equal(labels, np.where(truth >= 2, -1, truth))
    scores = cluster_scores(labels, truth)
    assert scores["n_unassigned"] == 4 and scores["n_groups"] == 6
    assert scores["purity"] == 1.0 and scores["recall"] == pytest.approx(32 / 34)


def test_threshold_splits_and_joins_as_documented():
    X, _ = _sphere_clusters([15, 15], seed=7)
    assert (group_descriptors(X, threshold=1.0) == np.arange(30)).all()  # nothing that strong
    assert group_descriptors(X, threshold=-1.0, k=29, mutual=False).max() == 0  # all joined


def test_tiny_inputs():
    assert group_descriptors(np.zeros((0, 4), np.float32)).shape == (0,)
    np.testing.assert_array_equal(group_descriptors(_unit(np.ones((1, 4)))), [0])
    np.testing.assert_array_equal(group_descriptors(_unit(np.eye(3))), [0, 1, 2])


def test_connected_components_finds_roots():
    root = connected_components(7, [5, 1, 3, 2], [4, 2, 4, 0])
    np.testing.assert_array_equal(root, [0, 0, 0, 3, 3, 3, 6])
    long_path = np.random.default_rng(0).permutation(2000)
    root = connected_components(2000, long_path[:-1], long_path[1:])
    assert (root == 0).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"X": np.array([[1.0, 0.0], [np.nan, 1.0]])}, "NaN"),
        ({"X": np.ones(4)}, "2-D"),
        ({"X": np.ones((2, 2, 2))}, "2-D"),
        ({"X": np.array([["a", "b"]])}, "real numbers"),
        ({"X": np.eye(3), "k": 0}, "k must"),
        ({"X": np.eye(3), "k": True}, "k must"),
        ({"X": np.eye(3), "k": 2.5}, "k must"),
        ({"X": np.eye(3), "min_size": 0}, "min_size"),
        ({"X": np.eye(3), "threshold": float("nan")}, "threshold"),
        ({"X": np.eye(3), "threshold": 1.5}, "threshold"),
        ({"X": np.eye(3), "threshold": "high"}, "threshold"),
        ({}, "give descriptors"),
        ({"neighbours": (np.ones((3, 2)), np.zeros((3, 3), int))}, "same shape"),
        ({"neighbours": (np.ones((3, 2)), np.full((3, 2), 3))}, r"\[0, 3\)"),
        ({"neighbours": (np.ones((3, 2)), np.ones((3, 2)))}, "integers"),
        ({"neighbours": (np.full((3, 2), np.nan), np.ones((3, 2), int))}, "NaN"),
        ({"neighbours": np.ones((3, 2))}, "pair"),
        ({"X": np.eye(4), "neighbours": (np.ones((3, 2)), np.ones((3, 2), int))}, "rows"),
    ],
)
def test_bad_input_raises_value_error_naming_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        group_descriptors(**kwargs)


def test_unnormalised_descriptors_warn(caplog):
    with caplog.at_level("WARNING", logger="model.clustering"):
        group_descriptors(np.eye(3) * 2.0)
    assert "L2-normalised" in caplog.text


# --- scores on hand-made groupings -----------------------------------------------------------

TRUTH = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 3])  # scene sizes 4, 3, 2, 1


def test_scores_of_a_perfect_grouping():
    scores = cluster_scores(np.array([7, 7, 7, 7, 3, 3, 3, 5, 5, 9]), TRUTH)
    assert scores == {
        "purity": 1.0,
        "recall": 1.0,
        "pair_precision": 1.0,
        "pair_recall": 1.0,
        "n_groups": 4,
        "n_scenes": 4,
        "n_images": 10,
        "n_unassigned": 0,
    }


def test_scores_of_one_big_group():
    scores = cluster_scores(np.zeros(10, int), TRUTH)
    assert scores["recall"] == 1.0 and scores["pair_recall"] == 1.0
    assert scores["purity"] == pytest.approx(4 / 10)  # the largest scene's share
    assert scores["pair_precision"] == pytest.approx((6 + 3 + 1) / 45)
    assert scores["n_groups"] == 1


def test_scores_of_all_singletons():
    scores = cluster_scores(np.arange(10), TRUTH)
    assert scores["purity"] == 1.0 and scores["pair_precision"] == 1.0  # no pairs claimed
    assert scores["recall"] == pytest.approx(4 / 10)  # one image per scene is "in place"
    assert scores["pair_recall"] == 0.0
    assert scores["n_groups"] == 10
    # Unassigned (-1) images are singletons too.
    assert cluster_scores(-np.ones(10, int), TRUTH) == {**scores, "n_unassigned": 10}


def test_scores_of_a_mixed_grouping():
    # Scene 0 split 3 + 1; the 1 sits with scene 1; scenes 2 and 3 share a group.
    pred = np.array(["a", "a", "a", "b", "b", "b", "b", "c", "c", "c"])
    scores = cluster_scores(pred, TRUTH)
    assert scores["purity"] == pytest.approx((3 + 3 + 2) / 10)
    assert scores["recall"] == pytest.approx((3 + 3 + 2 + 1) / 10)
    assert scores["pair_precision"] == pytest.approx((3 + 3 + 1) / (3 + 6 + 3))
    assert scores["pair_recall"] == pytest.approx((3 + 3 + 1) / (6 + 3 + 1))


@pytest.mark.parametrize(
    ("pred", "truth", "message"),
    [
        (np.zeros(3), np.zeros(4), "length"),
        (np.zeros((2, 2)), np.zeros(4), "1-D"),
        (np.array([0.0, np.nan]), np.zeros(2), "NaN"),
        (np.zeros(0), np.zeros(0), "empty"),
    ],
)
def test_scores_reject_bad_labels(pred, truth, message):
    with pytest.raises(ValueError, match=message):
        cluster_scores(pred, truth)


# --- real photos ---------------------------------------------------------------------------


def test_default_grouping_recovers_the_real_scenes(real_photo_set, lite0_real_descriptors):
    """The issue's check: 17 real scenes, no scene column, default parameters, both >= 0.9."""
    labels = group_descriptors(lite0_real_descriptors)
    scores = cluster_scores(labels, real_photo_set.db_labels)
    print(
        f"\ngroup_descriptors(k={DEFAULT_K}, threshold={DEFAULT_THRESHOLD}) on "
        f"{scores['n_images']} real photos of {scores['n_scenes']} scenes: "
        f"purity {scores['purity']:.3f}, recall {scores['recall']:.3f}, "
        f"pair precision {scores['pair_precision']:.3f}, pair recall {scores['pair_recall']:.3f}, "
        f"{scores['n_groups']} groups"
    )
    assert scores["n_scenes"] == 17
    assert scores["purity"] >= 0.9, scores
    assert scores["recall"] >= 0.9, scores
