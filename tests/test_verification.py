"""Spatial verification and re-ranking: real photos warped by known maps, and exact metrics."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.datasets.sets import RetrievalSet
from model.evaluation import evaluate_revisited
from model.local_features import LocalFeatureOptions, extract_local_features
from model.reranking import QueryRerank, RerankSettings, promoted_positions, rerank_query
from model.retrieval import l2_normalize
from model.scoring import score_reranked
from model.verification import VerifyOptions, rerank_order, verify_pair

OPTIONS = LocalFeatureOptions(local_max_features=1024, local_max_size=640)


def _photo(photos_dir: Path, scene: str, index: int = 0) -> Image.Image:
    image = Image.open(sorted((photos_dir / scene).iterdir())[index]).convert("RGB")
    image.thumbnail((640, 640))
    return image


def _warp(image: Image.Image, H: np.ndarray) -> Image.Image:
    """``image`` moved by the homography ``H`` (source pixel -> target pixel)."""
    inverse = np.linalg.inv(H)
    inverse /= inverse[2, 2]
    return image.transform(
        image.size,
        Image.Transform.PERSPECTIVE,
        tuple(inverse.ravel()[:8]),
        Image.Resampling.BILINEAR,
    )


def _known_homography(width: int, height: int) -> np.ndarray:
    """A turn of 12 degrees, a zoom of 0.85 about the centre and a little perspective."""
    angle = np.deg2rad(12)
    centre = np.array([[1, 0, width / 2], [0, 1, height / 2], [0, 0, 1]])
    turn = np.array(
        [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    )
    zoom = np.diag([0.85, 0.85, 1.0])
    tilt = np.array([[1, 0, 0], [0, 1, 0], [2e-4, 1e-4, 1]])
    return centre @ tilt @ turn @ zoom @ np.linalg.inv(centre)


def _apply(H: np.ndarray, points: np.ndarray) -> np.ndarray:
    moved = np.c_[points, np.ones(len(points))] @ H.T
    return moved[:, :2] / moved[:, 2:]


@pytest.mark.parametrize("model", ["homography", "affine"])
def test_a_photo_warped_by_a_known_map_is_verified_by_it(photos_dir: Path, model: str) -> None:
    photo = _photo(photos_dir, "herzjesu_p8")
    H = _known_homography(*photo.size)
    if model == "affine":
        H[2] = [0, 0, 1]
    warped = _warp(photo, H)
    a = extract_local_features(np.asarray(photo), OPTIONS)
    b = extract_local_features(np.asarray(warped), OPTIONS)
    options = VerifyOptions(rerank_model=model)
    found = verify_pair(a, b, options)
    assert found.inliers >= 100, found.inliers
    # every inlier is a true correspondence of the known map
    src = a.keypoints[found.matches[:, 0], :2]
    tgt = b.keypoints[found.matches[:, 1], :2]
    error = np.linalg.norm(_apply(H, src) - tgt, axis=1)
    assert np.median(error) < 1.5 and np.mean(error < 2 * options.rerank_max_error) > 0.98
    # another scene is not verified, however alike its global look
    other = extract_local_features(np.asarray(_photo(photos_dir, "fountain_p11")), OPTIONS)
    assert verify_pair(a, other, options).inliers < options.rerank_min_inliers


def test_a_second_orientation_at_one_place_counts_once(photos_dir: Path) -> None:
    photo = np.asarray(_photo(photos_dir, "entry-P10"))
    features = extract_local_features(photo, OPTIONS)
    found = verify_pair(features, features, VerifyOptions())
    places = {tuple(np.round(p * 10)) for p in features.keypoints[found.matches[:, 0], :2]}
    assert found.inliers == len(places) < len(found.matches)
    every = verify_pair(features, features, VerifyOptions(rerank_count="matches"))
    assert every.inliers == len(every.matches) == len(found.matches)


@pytest.mark.parametrize("image", [np.zeros((480, 640, 3), np.uint8), np.zeros((8, 8), np.uint8)])
def test_a_blank_or_tiny_photo_has_no_features_and_no_inliers(photos_dir, image) -> None:
    empty = extract_local_features(image, OPTIONS)
    assert len(empty) == 0 and empty.descriptors.dtype == np.uint8
    real = extract_local_features(np.asarray(_photo(photos_dir, "statue")), OPTIONS)
    assert verify_pair(empty, real, VerifyOptions()).inliers == 0
    assert verify_pair(real, empty, VerifyOptions()).inliers == 0


def test_features_are_capped_at_the_largest_scales(photos_dir: Path) -> None:
    photo = np.asarray(_photo(photos_dir, "lund"))
    many = extract_local_features(photo, LocalFeatureOptions(local_max_size=640))
    few = extract_local_features(
        photo, LocalFeatureOptions(local_max_features=100, local_max_size=640)
    )
    assert len(few) == 100 < len(many)
    assert few.keypoints[:, 2].min() >= np.sort(many.keypoints[:, 2])[-100]
    assert few.size == many.size == (photo.shape[1], photo.shape[0])
    small = extract_local_features(photo, LocalFeatureOptions(local_max_size=320))
    assert max(small.size) == 320 and small.keypoints[:, :2].max() < 320


def test_verified_candidates_go_first_by_inliers_the_rest_keep_their_order() -> None:
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    inliers = np.array([3, 40, 12, 40, 0])
    order = rerank_order(scores, inliers, min_inliers=12)
    assert order.tolist() == [1, 3, 2, 0, 4]
    # the rest keep the order given, which an earlier re-ranking may have made
    scores, inliers = np.array([0.5, 0.9, 0.7, 0.8]), np.array([0, 0, 20, 20])
    assert rerank_order(scores, inliers, min_inliers=12).tolist() == [3, 2, 0, 1]


def test_bad_settings_are_named_in_one_error() -> None:
    with pytest.raises(ValueError) as err:
        VerifyOptions(rerank_ratio=1.5, rerank_model="fundamental", rerank_max_error=0)
    lines = str(err.value).splitlines()
    assert len(lines) == 3 and all(line.startswith("--rerank-") for line in lines)
    with pytest.raises(ValueError, match="--rerank must be 0"):
        RerankSettings(rerank=-1)


def _revisited_set(n_db: int, n_q: int, rng: np.random.Generator) -> RetrievalSet:
    gnd = []
    for _ in range(n_q):
        rows = rng.permutation(n_db)
        gnd.append({"easy": rows[:4], "hard": rows[4:7], "junk": rows[7:9]})
    paths = [Path(f"{i}.jpg") for i in range(n_db)]
    return RetrievalSet("random", paths, paths[:n_q], "revisited", False, gnd)


def test_promoted_positions_are_those_of_the_explicit_ranking() -> None:
    rng = np.random.default_rng(0)
    base = rng.permutation(50)  # base[p] is the row at position p
    where = np.argsort(base)
    promoted = np.array([base[30], base[2], base[45]])
    explicit = np.concatenate([promoted, base[~np.isin(base, promoted)]])
    items = rng.choice(50, 12, replace=False)
    found = promoted_positions(items, where[items], promoted=promoted, promoted_at=where[promoted])
    assert found.tolist() == [int(np.flatnonzero(explicit == i)[0]) for i in items]


@pytest.mark.parametrize("head", [0, 25, 60], ids=["by-vector", "a-head-of-25", "whole-orders"])
def test_reranked_metrics_equal_the_protocol_on_the_explicit_ranking(head: int) -> None:
    rng = np.random.default_rng(1)
    db = l2_normalize(rng.normal(size=(60, 8)).astype(np.float32))
    queries = l2_normalize(rng.normal(size=(5, 8)).astype(np.float32))
    rset = _revisited_set(60, 5, rng)
    reranked = [
        QueryRerank(
            rng.choice(60, int(rng.integers(0, 6)), replace=False),
            {},
            q,
            0,
            order=rng.permutation(60)[:head] if head and j % 2 else None,
        )
        for j, q in enumerate(queries)
    ]
    scored = score_reranked(db, queries, rset, reranked=reranked, kappas=(1, 5))
    columns = []
    for r in reranked:
        by_vector = np.argsort(-(db @ r.query), kind="stable")
        first = np.zeros(0, np.int64) if r.order is None else r.order
        base = np.concatenate([first, by_vector[~np.isin(by_vector, first)]])
        columns.append(np.concatenate([r.promoted, base[~np.isin(base, r.promoted)]]))
    expected = evaluate_revisited(np.stack(columns, axis=1), rset.gnd, kappas=(1, 5))
    for protocol in ("easy", "medium", "hard"):
        assert scored.metrics[protocol]["map"] == pytest.approx(expected[protocol]["map"])
    assert scored.ranks.tolist() == [c[: scored.ranks.shape[1]].tolist() for c in columns]


def test_a_query_promotes_its_verified_photos_and_expands_over_them(photos_dir: Path) -> None:
    photo = _photo(photos_dir, "herzjesu_p8")
    views = [_warp(photo, _known_homography(*photo.size) @ np.diag([s, s, 1])) for s in (1, 0.95)]
    others = [_photo(photos_dir, scene) for scene in ("lund", "fountain_p11", "statue")]
    db_photos = [others[0], views[0], others[1], views[1], others[2]]
    db_features = [extract_local_features(np.asarray(p), OPTIONS) for p in db_photos]
    query_features = extract_local_features(np.asarray(photo), OPTIONS)
    rng = np.random.default_rng(2)
    db = l2_normalize(rng.normal(size=(5, 16)).astype(np.float32))
    query = db[0].copy()  # globally, a look-alike of another scene comes first
    candidates = np.argsort(-(db @ query))
    calls: list[list[int]] = []

    def features_of(rows):
        calls.append(list(rows))
        return [db_features[r] for r in rows]

    plain = rerank_query(
        query,
        db,
        candidates,
        query_features=query_features,
        features_of=features_of,
        settings=RerankSettings(5),
    )
    assert sorted(plain.promoted.tolist()) == [1, 3]
    assert plain.inliers[plain.promoted[0]] >= plain.inliers[plain.promoted[1]]
    assert np.array_equal(plain.query, query) and plain.pairs_verified == 5
    calls.clear()
    expanded = rerank_query(
        query,
        db,
        candidates[:2],
        query_features=query_features,
        features_of=features_of,
        settings=RerankSettings(2, rerank_qe_k=1),
    )
    assert not np.allclose(expanded.query, query)
    assert 1 in expanded.promoted or 3 in expanded.promoted
    asked = [row for call in calls for row in call]
    assert len(asked) == len(set(asked)) == expanded.pairs_verified  # no pair verified twice
    assert set(calls[0]) == {int(r) for r in candidates[:2]}


def test_a_small_photo_gets_its_finest_octave(photos_dir: Path) -> None:
    """Under 3/4 of --local-max-size a side, SIFT starts from the doubled image: more features
    than its own size gives, up to the cap; a large photo starts at its own size."""
    small = np.asarray(_photo(photos_dir, "statue").resize((320, 240)))
    auto = extract_local_features(small, LocalFeatureOptions(local_max_size=640))
    own = extract_local_features(
        small, LocalFeatureOptions(local_max_size=640, local_first_octave=0)
    )
    doubled = extract_local_features(
        small, LocalFeatureOptions(local_max_size=640, local_first_octave=-1)
    )
    assert len(auto) == len(doubled) > len(own)
    large = np.asarray(_photo(photos_dir, "statue"))
    options = LocalFeatureOptions(local_max_size=640)
    assert np.array_equal(
        extract_local_features(large, options).keypoints,
        extract_local_features(
            large, LocalFeatureOptions(local_max_size=640, local_first_octave=0)
        ).keypoints,
    )
