"""Learned (Lw) and PCA whitening: the algebra they promise, degenerate inputs, the file format."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest

from model.evaluation import cluster_map
from model.whitening import (
    apply_whitening,
    learn_pca_whitening,
    learn_whitening,
    load_whitening,
    save_whitening,
    select_whitening,
    whitening_dims,
)


def paired_data(seed: int = 0, n_pairs: int = 300, D: int = 8):
    """Images with anisotropic spread, each with a match that differs by anisotropic noise."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n_pairs, D)) * np.linspace(3.0, 0.5, D) + 2.0
    mix = rng.normal(size=(D, D)) * 0.3 + np.eye(D)
    matches = base + rng.normal(size=(n_pairs, D)) @ mix * 0.2
    extra = rng.normal(size=(50, D)) * 2.0  # images in no pair still count in C_D
    X = np.concatenate([base, matches, extra])
    qidxs = np.arange(n_pairs)
    pidxs = np.arange(n_pairs, 2 * n_pairs)
    return X, qidxs, pidxs


def whiten_raw(X, m, P):
    """(X - m) @ P.T: the whitened space before L2 normalisation."""
    return (X - m) @ P.T


class TestLearnWhitening:
    def test_pair_differences_become_isotropic(self):
        X, q, p = paired_data()
        m, P = learn_whitening(X, q, p)
        Z = whiten_raw(X, m, P)
        diff = Z[q] - Z[p]
        assert np.allclose(diff.T @ diff / len(q), np.eye(X.shape[1]), atol=1e-8)

    def test_scatter_becomes_diagonal_with_decreasing_entries(self):
        X, q, p = paired_data()
        m, P = learn_whitening(X, q, p)
        Z = whiten_raw(X, m, P)  # already centred on m, as C_D is
        C = Z.T @ Z / len(X)
        off = C - np.diag(np.diag(C))
        assert np.abs(off).max() < 1e-8 * np.abs(C).max()
        assert (np.diff(np.diag(C)) < 0).all()

    def test_mean_is_the_mean_of_the_query_rows(self):
        X, q, p = paired_data()
        m, P = learn_whitening(X, q, p)
        assert m.shape == (X.shape[1],) and P.shape == (X.shape[1], X.shape[1])
        assert np.allclose(m, X[q].mean(axis=0))

    def test_matches_the_symmetric_square_root_definition_up_to_row_signs(self):
        # DESIGN.md: P = V^T C_S^-1/2 with the symmetric root; the inverse Cholesky factor
        # must give the same rows (eigenvectors carry no sign).
        X, q, p = paired_data(seed=1)
        m, P = learn_whitening(X, q, p)
        diff = X[q] - X[p]
        C_S = diff.T @ diff / len(q)
        C_D = (X - m).T @ (X - m) / len(X)
        lam, U = np.linalg.eigh(C_S)
        root_inv = U @ np.diag(lam**-0.5) @ U.T
        _, V = np.linalg.eigh(root_inv @ C_D @ root_inv)
        P_ref = V[:, ::-1].T @ root_inv
        signs = np.sign((P_ref * P).sum(axis=1))
        assert np.allclose(P_ref * signs[:, None], P, atol=1e-8)

    def test_is_deterministic_and_accepts_float32_and_lists(self):
        X, q, p = paired_data()
        m1, P1 = learn_whitening(X.astype(np.float32), q, p)
        m2, P2 = learn_whitening(X.astype(np.float32).tolist(), q.tolist(), p.tolist())
        assert m1.dtype == np.float64
        assert np.array_equal(P1, P2) and np.array_equal(m1, m2)

    def test_fewer_pairs_than_dimensions_uses_a_diagonal_load(self, caplog):
        rng = np.random.default_rng(2)
        X = rng.normal(size=(40, 16))
        q, p = np.arange(5), np.arange(5, 10)  # C_S has rank 5 < 16
        with caplog.at_level(logging.WARNING, logger="model.whitening"):
            m, P = learn_whitening(X, q, p)
        assert "diagonal load" in caplog.text
        assert np.isfinite(P).all()
        # P (C_S + load I) P^T = I, so the pair covariance in whitened space is at most I.
        diff = X[q] - X[p]
        eig = np.linalg.eigvalsh(P @ (diff.T @ diff / len(q)) @ P.T)
        assert eig.max() <= 1 + 1e-8 and eig.min() >= -1e-8
        out = apply_whitening(X, m, P, dim=4)
        assert np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)

    def test_identical_pairs_do_not_crash(self):
        # Every pair is an image with itself: C_S is all zeros, so its trace gives no scale.
        X = np.random.default_rng(3).normal(size=(20, 4))
        m, P = learn_whitening(X, [0, 1, 2], [0, 1, 2])
        assert np.isfinite(m).all() and np.isfinite(P).all()

    def test_nan_rows_are_counted(self):
        X, q, p = paired_data()
        X[[3, 7], 0] = np.nan
        X[9, 1] = np.inf
        with pytest.raises(ValueError, match=r"3 of \d+ row\(s\) with NaN or inf"):
            learn_whitening(X, q, p)

    def test_bad_indices(self):
        X, q, p = paired_data()
        with pytest.raises(ValueError, match="same length"):
            learn_whitening(X, q, p[:-1])
        with pytest.raises(ValueError, match=r"pidxs must index rows of X in \[0, 650\)"):
            learn_whitening(X, q, p + 1000)
        with pytest.raises(ValueError, match="qidxs"):
            learn_whitening(X, q - 1, p)  # -1 would silently wrap to the last row
        with pytest.raises(ValueError, match="at least one"):
            learn_whitening(X, [], [])

    def test_descriptors_must_be_rows(self):
        with pytest.raises(ValueError, match="2-D"):
            learn_whitening(np.zeros(5), [0], [1])


class TestShrinkage:
    def test_whitens_the_shrunk_pair_covariance(self):
        X, q, p = paired_data(n_pairs=40)
        D = X.shape[1]
        _, P = learn_whitening(X, q, p, shrinkage=0.4)
        diff = X[q] - X[p]
        C_S = diff.T @ diff / len(q)
        shrunk = 0.6 * C_S + 0.4 * np.trace(C_S) / D * np.eye(D)
        assert np.allclose(P @ shrunk @ P.T, np.eye(D), atol=1e-8)
        assert not np.allclose(P @ C_S @ P.T, np.eye(D), atol=1e-3)  # not the paper's Lw

    def test_zero_is_the_papers_lw_and_shares_outside_zero_one_are_refused(self):
        X, q, p = paired_data()
        assert np.array_equal(
            learn_whitening(X, q, p)[1], learn_whitening(X, q, p, shrinkage=0.0)[1]
        )
        for bad in (-0.1, 1.5):
            with pytest.raises(ValueError, match="shrinkage is a share in"):
                learn_whitening(X, q, p, shrinkage=bad)


def scenes_in_few_directions(seed: int, n_clusters: int, views: int = 5, D: int = 48):
    """Scenes that differ in 6 directions; their views vary in every direction, and strongly
    in 4 others (light, viewpoint). Pairs: each scene's first view with each other one."""
    rng = np.random.default_rng(seed)
    centres = np.zeros((n_clusters, D))
    centres[:, :6] = 3.0 * rng.normal(size=(n_clusters, 6))
    noise = rng.normal(size=(n_clusters * views, D))
    noise[:, 6:10] *= 5.0
    x = centres.repeat(views, axis=0) + noise
    clusters = np.arange(n_clusters).repeat(views)
    q = np.arange(0, len(x), views).repeat(views - 1)
    p = q + np.tile(np.arange(1, views), n_clusters)
    return x, clusters, q, p


class TestSelectWhitening:
    def test_the_choice_of_left_out_clusters_holds_on_new_scenes(self):
        """Few pairs per dimension: the paper's Lw whitens noise it cannot estimate; the
        cross-validation prefers a shrunk, short Lw, and new scenes rank better with it."""
        x, clusters, q, p = scenes_in_few_directions(0, 30)
        choice = select_whitening(x, clusters, q, pidxs=p, dims=(48, 6))
        assert choice.dim == 6 and choice.shrinkage > 0 and choice.folds == 3  # the 6 that matter
        assert len(choice.table) == 8 and choice.score == max(choice.table.values())
        assert choice.score > choice.table["0/48"] + 0.1 and choice.score > choice.plain + 0.3
        new, new_clusters, _, _ = scenes_in_few_directions(1, 20)
        everyone = np.arange(len(new))

        def new_scenes_map(shrinkage: float, dim: int) -> float:
            m, P = learn_whitening(x, q, p, shrinkage=shrinkage)
            return cluster_map(apply_whitening(new, m, P, dim), new_clusters, everyone)

        assert new_scenes_map(choice.shrinkage, choice.dim) > new_scenes_map(0.0, 48) + 0.1

    def test_no_cut_past_the_rank_of_the_photos_scatter(self):
        """Fewer photos than dimensions: a cut past the rank of ``C_D`` would keep directions
        ordered by rounding noise, so only cuts within it (and all D) are tried, and the
        choice and its figure stand under 1e-7 noise on the descriptors."""
        assert whitening_dims(600, 1000) == (600, 512, 256, 128)
        assert whitening_dims(600, 200) == (600, 128) and whitening_dims(600, 100) == (600,)
        x, clusters, q, p = scenes_in_few_directions(0, 60, D=600)  # 300 photos, 600 dims
        choice = select_whitening(x, clusters, q, pidxs=p)
        assert {k.split("/")[1] for k in choice.table} == {"600", "128"}  # folds see ~200
        noisy = x + 1e-7 * np.random.default_rng(1).normal(size=x.shape)
        again = select_whitening(noisy, clusters, q, pidxs=p)
        assert (again.shrinkage, again.dim) == (choice.shrinkage, choice.dim)
        assert again.score == pytest.approx(choice.score, abs=1e-6)

    def test_too_few_clusters_leave_the_papers_lw(self, caplog):
        x, clusters, q, p = scenes_in_few_directions(0, 4)
        one = clusters[q] == 0
        with caplog.at_level(logging.WARNING, logger="model.whitening"):
            choice = select_whitening(x, clusters, q[one], pidxs=p[one])
        assert (choice.shrinkage, choice.dim, choice.folds) == (0.0, 48, 0)
        assert "no cross-validation" in caplog.text

    def test_bad_arguments_are_named(self):
        x, clusters, q, p = scenes_in_few_directions(0, 6)
        with pytest.raises(ValueError, match="one entry per row"):
            select_whitening(x, clusters[:-1], q, pidxs=p)
        with pytest.raises(ValueError, match="dims must lie in"):
            select_whitening(x, clusters, q, pidxs=p, dims=(49,))
        with pytest.raises(ValueError, match="shrinkages are shares"):
            select_whitening(x, clusters, q, pidxs=p, shrinkages=(2.0,))


class TestPcaWhitening:
    def test_identity_covariance_on_training_data(self):
        rng = np.random.default_rng(4)
        X = rng.normal(size=(2000, 6)) @ rng.normal(size=(6, 6)) + 5.0
        m, P = learn_pca_whitening(X)
        Z = whiten_raw(X, m, P)
        assert np.allclose(Z.mean(axis=0), 0.0, atol=1e-10)
        assert np.allclose(Z.T @ Z / len(X), np.eye(6), atol=1e-8)

    def test_components_come_by_decreasing_variance(self):
        rng = np.random.default_rng(5)
        X = rng.normal(size=(500, 3)) * [1.0, 10.0, 0.1]
        _, P = learn_pca_whitening(X)
        # Leading row follows the widest axis (1), the last the narrowest (2).
        assert np.argmax(np.abs(P[0])) == 1 and np.argmax(np.abs(P[-1])) == 2

    def test_rank_deficient_data_stays_finite(self):
        X = np.random.default_rng(6).normal(size=(3, 10))  # N < D
        _, P = learn_pca_whitening(X)
        assert np.isfinite(P).all()

    def test_constant_data_is_rejected(self):
        with pytest.raises(ValueError, match="no variance"):
            learn_pca_whitening(np.ones((5, 3)))


class TestApplyWhitening:
    def test_rows_are_unit_norm_float32(self):
        X, q, p = paired_data()
        m, P = learn_whitening(X, q, p)
        out = apply_whitening(X, m, P)
        assert out.dtype == np.float32 and out.shape == X.shape
        assert np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)

    def test_dim_keeps_the_leading_components(self):
        X, q, p = paired_data()
        m, P = learn_whitening(X, q, p)
        raw = whiten_raw(X, m, P)[:, :3]
        expected = raw / np.linalg.norm(raw, axis=1, keepdims=True)
        out = apply_whitening(X.astype(np.float32), m, P, dim=3)
        assert out.shape == (len(X), 3)
        assert np.allclose(out, expected, atol=1e-5)

    @pytest.mark.parametrize("dim", [0, -1, 9])
    def test_dim_out_of_range(self, dim):
        X, q, p = paired_data()
        m, P = learn_whitening(X, q, p)
        with pytest.raises(ValueError, match=r"dim must be an integer in \[1, 8\]"):
            apply_whitening(X, m, P, dim=dim)

    def test_shape_mismatch_and_nan(self):
        X, q, p = paired_data()
        m, P = learn_whitening(X, q, p)
        with pytest.raises(ValueError, match="P must have shape"):
            apply_whitening(X[:, :5], m[:5], P)
        with pytest.raises(ValueError, match="m must have shape"):
            apply_whitening(X, m[:5], P)
        X[0, 0] = np.nan
        with pytest.raises(ValueError, match="1 of"):
            apply_whitening(X, m, P)


class TestSaveLoad:
    def test_round_trip_with_meta(self, tmp_path):
        X, q, p = paired_data()
        m, P = learn_whitening(X, q, p)
        path = tmp_path / "ckpt" / "whiten.npz"
        save_whitening(path, m, P, kind="lw", n_pairs=len(q))
        loaded = load_whitening(path)
        assert np.array_equal(loaded.m, m) and np.array_equal(loaded.P, P)
        assert loaded.meta == {"kind": "lw", "n_pairs": len(q)}
        m2, P2, meta = load_whitening(str(path))  # unpacks as a tuple too
        assert np.array_equal(m2, m) and np.array_equal(P2, P) and meta["kind"] == "lw"
        assert [f.name for f in path.parent.iterdir()] == ["whiten.npz"]  # no temp file left

    def test_round_trip_through_s3(self, s3_bucket):
        X, q, p = paired_data()
        m, P = learn_whitening(X, q, p)
        uri = f"s3://{s3_bucket}/ckpt/whitening.npz"
        save_whitening(uri, m, P, kind="lw")
        loaded = load_whitening(uri)
        assert np.array_equal(loaded.m, m) and np.array_equal(loaded.P, P)
        assert loaded.meta == {"kind": "lw"}
        with pytest.raises(FileNotFoundError, match=r"absent\.npz"):
            load_whitening(f"s3://{s3_bucket}/ckpt/absent.npz")

    def test_file_objects(self):
        buf = io.BytesIO()
        save_whitening(buf, np.zeros(2), np.eye(2))
        buf.seek(0)
        assert load_whitening(buf).P.shape == (2, 2)

    def test_mismatched_shapes_and_unserialisable_meta(self, tmp_path):
        with pytest.raises(ValueError, match="P must have shape"):
            save_whitening(tmp_path / "w.npz", np.zeros(3), np.eye(2))
        with pytest.raises(TypeError, match="JSON"):
            save_whitening(tmp_path / "w.npz", np.zeros(2), np.eye(2), bad=object())
        assert not list(tmp_path.iterdir())

    def test_foreign_npz_is_rejected(self, tmp_path):
        np.savez(tmp_path / "other.npz", a=np.zeros(2))
        with pytest.raises(ValueError, match="not a whitening file"):
            load_whitening(tmp_path / "other.npz")
