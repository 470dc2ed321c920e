"""Learned discriminative whitening (Lw) and PCA whitening of global descriptors (NumPy only).

Both learners return ``(m, P)``: a mean ``m`` of shape ``[D]`` and a projection ``P`` of shape
``[D_out, D]`` whose rows come by decreasing importance, so ``apply_whitening(X, m, P, dim)``
applies either and ``dim`` keeps the leading components. Descriptors are rows (``[N, D]``),
not cirtorch's columns. Learning runs in float64 (covariances of 2048-d descriptors lose
digits in float32); ``apply_whitening`` returns float32 descriptors.

Each row of ``P`` is defined up to sign by the maths; the signs are fixed (largest-magnitude
entry positive) so that a re-run or another LAPACK build gives the same file.
"""

from __future__ import annotations

import io
import json
import logging
import os
from typing import Any, BinaryIO, NamedTuple

import numpy as np
from numpy.typing import ArrayLike, NDArray

from model import storage
from model.arrays import descriptor_matrix
from model.evaluation import cluster_map
from model.retrieval import l2_normalize

__all__ = [
    "SHRINKAGES",
    "WhiteningChoice",
    "WhiteningParams",
    "apply_whitening",
    "learn_pca_whitening",
    "learn_whitening",
    "load_whitening",
    "save_whitening",
    "select_whitening",
    "whitening_dims",
]

logger = logging.getLogger(__name__)

# Format tag written into every whitening file, checked on load.
_FORMAT = "cirray.whitening/1"


class WhiteningParams(NamedTuple):
    """What ``load_whitening`` returns; unpacks as ``m, P, meta``."""

    m: NDArray[np.float64]
    P: NDArray[np.float64]
    meta: dict[str, Any]


def _index_array(name: str, idx: ArrayLike, n: int) -> NDArray[np.int64]:
    arr = np.asarray(idx)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must hold integer row indices, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and (arr.min() < 0 or arr.max() >= n):
        raise ValueError(
            f"{name} must index rows of X in [0, {n}), got values in [{arr.min()}, {arr.max()}]"
        )
    return arr


def _fix_signs(P: NDArray[np.float64]) -> NDArray[np.float64]:
    """Flip rows so each row's largest-magnitude entry is positive (eigenvectors have no sign)."""
    lead = P[np.arange(P.shape[0]), np.abs(P).argmax(axis=1)]
    return P * np.where(lead < 0, -1.0, 1.0)[:, None]


def _inverse_cholesky(
    C: NDArray[np.float64], fallback_scale: float, log: bool = True
) -> NDArray[np.float64]:
    """``W = L⁻¹`` with ``L Lᵀ = C + λI``; ``λ = 0`` when ``C`` is comfortably positive definite.

    ``W C' Wᵀ = I``, so ``W`` stands in for ``C'^-1/2``. A factorisation counts as failed when
    LAPACK rejects it or when its smallest pivot is at rounding level (below 1e-10 of the mean
    variance): such a ``C`` is singular in all but name and its inverse would be noise. The load
    starts at 1e-6 · trace(C) / D and grows ×10 per retry; ``fallback_scale`` sets it when ``C``
    is all zeros.
    """
    D = C.shape[0]
    scale = float(np.trace(C)) / D
    if not scale > 0:
        scale = fallback_scale if fallback_scale > 0 else 1.0
    eye = np.eye(D)
    load = 0.0
    for attempt in range(16):
        try:
            L = np.linalg.cholesky(C + load * eye)
        except np.linalg.LinAlgError:
            L = None
        if L is not None and np.min(np.diag(L)) ** 2 > 1e-10 * scale:
            if load > 0 and log:
                logger.warning(
                    "C_S is not positive definite (rank-deficient: fewer pairs than dimensions, "
                    "or duplicate pairs?); used diagonal load %.3g (= %.0e x mean variance) "
                    "after %d attempt(s)",
                    load,
                    load / scale,
                    attempt + 1,
                )
            return np.linalg.solve(L, eye)
        load = 1e-6 * scale if load == 0 else load * 10.0
    raise np.linalg.LinAlgError(  # unreachable for finite C: by now λ exceeds C's eigenvalues
        f"could not make C_S positive definite with a diagonal load up to {load:.3g}"
    )


def _pair_whitening(
    x: NDArray[np.floating],
    q: NDArray[np.int64],
    p: NDArray[np.int64],
    *,
    shrinkage: float,
    log: bool,
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """``(m, W, X - m)``: Lw's mean and ``W`` (the inverse Cholesky factor of the shrunk
    ``C_S``) before the rotation that orders its directions."""
    D = x.shape[1]
    m = x[q].mean(axis=0)
    diff = x[q] - x[p]
    C_S = diff.T @ diff / q.size
    if shrinkage:
        C_S = (1.0 - shrinkage) * C_S + shrinkage * (np.trace(C_S) / D) * np.eye(D)
    centred = x - m
    scatter = float(np.einsum("ij,ij->", centred, centred)) / x.shape[0]  # trace of C_D
    return m, _inverse_cholesky(C_S, fallback_scale=scatter / D, log=log), centred


def learn_whitening(
    X: ArrayLike, qidxs: ArrayLike, pidxs: ArrayLike, *, shrinkage: float = 0.0, log: bool = True
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Learn discriminative whitening (Lw) from matching pairs ``(X[qidxs[i]], X[pidxs[i]])``.

    Returns ``m`` ``[D]`` (the mean of ``X[qidxs]``) and ``P = Vᵀ W`` ``[D, D]`` where ``W`` is
    the inverse Cholesky factor of ``C_S`` (mean of ``(x_q - x_p)(x_q - x_p)ᵀ`` over pairs) and
    ``V`` the eigenvectors, by decreasing eigenvalue, of ``W C_D Wᵀ`` with ``C_D`` the scatter of
    all rows of ``X`` around ``m``. This ``W`` stands for ``C_S^-1/2``: it gives the same ``P`` up
    to row signs, since any two such factors differ by a rotation that ``V`` absorbs.

    After ``(X - m) @ P.T`` the pair differences have identity covariance and ``C_D`` is
    diagonal with decreasing variances: the leading rows of ``P`` separate non-matching images
    most relative to how much matching ones differ. A ``C_S`` that is not positive definite
    gets a small, growing diagonal load (logged) rather than an error.

    ``shrinkage`` α in [0, 1] learns from ``(1 - α) C_S + α (tr C_S / D) I`` instead: with fewer
    pairs than dimensions ``C_S`` is singular, and its inverse square root blows up the
    directions no pair happened to vary in (noise on other photos). The paper's Lw is α = 0;
    :func:`select_whitening` picks α from held-out clusters (its many trials with ``log``
    False).
    """
    x = descriptor_matrix(X, dtype=np.float64)
    n, D = x.shape
    q = _index_array("qidxs", qidxs, n)
    p = _index_array("pidxs", pidxs, n)
    if q.shape != p.shape:
        raise ValueError(
            f"qidxs and pidxs must have the same length (one entry per pair), "
            f"got {q.size} and {p.size}"
        )
    if q.size == 0:
        raise ValueError("learn_whitening needs at least one matching pair, got none")
    if not 0.0 <= shrinkage <= 1.0:
        raise ValueError(f"shrinkage is a share in [0, 1], not {shrinkage!r}")

    m, W, centred = _pair_whitening(x, q, p, shrinkage=shrinkage, log=log)
    V, eigvals = _scatter_directions(W, centred)
    P = V.T @ W
    if not log:
        return m, _fix_signs(P)
    logger.info(
        "learned whitening from %d pairs over %d images, D=%d, shrinkage %g; top eigenvalues %s",
        q.size,
        n,
        D,
        shrinkage,
        np.array2string(eigvals[:5], precision=3),
    )
    return m, _fix_signs(P)


def _scatter_directions(
    W: NDArray[np.float64], centred: NDArray[np.float64]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """``(V, λ)``: the eigenvectors of ``W C_D Wᵀ`` as columns by decreasing eigenvalue ``λ``.

    With fewer photos than dimensions the scatter has rank below ``D``: its leading directions
    are the left singular vectors of ``W (X - m)ᵀ`` (a thin SVD), and the rest, of eigenvalue
    zero, any orthonormal completion (their order is rounding noise in a full
    eigendecomposition too), which a QR factorisation gives for far less than ``eigh``."""
    n, D = centred.shape
    if n >= D:
        M = W @ (centred.T @ centred / n) @ W.T
        eigvals, V = np.linalg.eigh((M + M.T) / 2)  # symmetrise away rounding; ascending order
        order = np.argsort(eigvals)[::-1]
        return V[:, order], eigvals[order]
    U, s, _ = np.linalg.svd(W @ centred.T, full_matrices=False)
    V, _ = np.linalg.qr(U, mode="complete")  # its first n columns span U's
    V[:, :n] = U
    return V, np.concatenate([s**2 / n, np.zeros(D - n)])


SHRINKAGES = (0.0, 0.3, 0.6, 0.9)
"""The shrinkages :func:`select_whitening` tries; 0 is the paper's Lw."""

REDUCED_DIMS = (512, 256, 128)
"""Output sizes it tries besides the full one (Lw's leading rows separate scenes most)."""


class WhiteningChoice(NamedTuple):
    """What :func:`select_whitening` found: the Lw settings and the figures behind them."""

    shrinkage: float
    dim: int
    score: float
    """Cross-validated mAP of the choice."""
    plain: float
    """The same folds' mAP without whitening."""
    table: dict[str, float]
    """Every candidate's cross-validated mAP, keyed ``"shrinkage/dim"``."""
    folds: int


def whitening_dims(D: int, rows: int) -> tuple[int, ...]:
    """The output sizes worth trying for an Lw learned from ``rows`` photos: all ``D``, and
    the reduced sizes no larger than the rank of their scatter ``C_D`` (``rows - 1``).

    Past that rank ``C_D`` has no variance to order the remaining directions by, so which of
    them a cut keeps is rounding noise (a tiny perturbation of the descriptors changes it);
    all ``D`` is a rotation and so does not depend on that order."""
    return tuple(sorted({D, *(d for d in REDUCED_DIMS if d < D and d <= rows - 1)}, reverse=True))


def select_whitening(
    X: ArrayLike,
    clusters: ArrayLike,
    qidxs: ArrayLike,
    *,
    pidxs: ArrayLike,
    shrinkages: tuple[float, ...] = SHRINKAGES,
    dims: tuple[int, ...] | None = None,
    folds: int = 3,
    seed: int = 0,
) -> WhiteningChoice:
    """Lw's shrinkage and output size, chosen by cross-validation over whole clusters.

    The paper learns Lw from thousands of 3D models; from a few hundred pairs the plain Lw can
    lower retrieval on unseen scenes (``bench/whitening.py`` measures it), while a shrunk or
    shorter one raises it. Which one is a property of the data, so it is measured:
    the clusters holding pairs' queries are split into ``folds`` groups (seeded); each group in
    turn is left out, Lw is learned from the other clusters' pairs with their photos as the
    scatter, and the group's queries are ranked against every row of ``X`` (the other
    clusters' photos as distractors), their own cluster's rows positive. The best mean mAP
    wins; on a tie the earlier candidate (less shrinkage, more dimensions). Fewer than two
    clusters with pairs leave nothing to validate on: the paper's Lw, ``folds`` 0.
    """

    x = descriptor_matrix(X, dtype=np.float64)
    n, D = x.shape
    labels = np.asarray(clusters)
    if labels.shape != (n,):
        raise ValueError(f"clusters must have one entry per row of X ({n}), got {labels.shape}")
    q = _index_array("qidxs", qidxs, n)
    p = _index_array("pidxs", pidxs, n)
    if q.shape != p.shape or q.size == 0:
        raise ValueError(f"qidxs and pidxs must be pairs: {q.size} and {p.size} entries")
    if any(not 0.0 <= a <= 1.0 for a in shrinkages) or not shrinkages:
        raise ValueError(f"shrinkages are shares in [0, 1], not {shrinkages}")
    if dims is not None and any(not 1 <= d <= D for d in dims):
        raise ValueError(f"dims must lie in [1, {D}], not {dims}")
    groups = np.unique(labels[q])
    if len(groups) < 2 or folds < 2:
        logger.warning("%d cluster(s) with pairs: no cross-validation, the paper's Lw", len(groups))
        return WhiteningChoice(0.0, D, float("nan"), float("nan"), {}, 0)
    rng = np.random.default_rng(seed)
    parts = np.array_split(rng.permutation(groups), min(folds, len(groups)))
    if dims is None:
        dims = whitening_dims(D, min(int((~np.isin(labels, g)).sum()) for g in parts))
    candidates = [(a, d) for a in shrinkages for d in dims]
    found: dict[tuple[float, int], list[float]] = {c: [] for c in candidates}
    plain = []
    unit = l2_normalize(x).astype(np.float32)
    for left_out in parts:
        held = np.isin(labels[q], left_out)
        queries = np.unique(q[held])
        plain.append(cluster_map(unit, labels, queries))
        seen = np.flatnonzero(~np.isin(labels, left_out))  # the rows Lw may learn from
        fq, fp = np.searchsorted(seen, q[~held]), np.searchsorted(seen, p[~held])
        for a in shrinkages:
            m, P = learn_whitening(x[seen], fq, fp, shrinkage=a, log=False)
            for d in dims:
                found[(a, d)].append(cluster_map(apply_whitening(x, m, P, d), labels, queries))
    score = {c: float(np.mean(v)) for c, v in found.items()}
    best = max(candidates, key=score.__getitem__)
    logger.info(
        "Lw by %d-fold cross-validation over %d clusters: shrinkage %g, dim %d, mAP "
        "%.4f (paper's Lw %.4f, none %.4f)",
        len(parts),
        len(groups),
        *best,
        score[best],
        score.get((0.0, D), np.nan),
        np.mean(plain),
    )
    table = {f"{a:g}/{d}": v for (a, d), v in score.items()}
    return WhiteningChoice(best[0], best[1], score[best], float(np.mean(plain)), table, len(parts))


def learn_pca_whitening(
    X: ArrayLike, eps: float = 1e-6
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """PCA whitening: ``m`` the mean of ``X``, ``P = Λ^-1/2 Uᵀ`` by decreasing eigenvalue.

    ``Λ, U`` are the eigenpairs of the covariance of ``X`` (divided by N). Eigenvalues below
    ``eps`` times the largest are raised to that floor: directions with (almost) no variance,
    e.g. when N < D, would otherwise be blown up from rounding noise. They sort last, so
    ``apply_whitening(..., dim=...)`` can drop them.
    """
    x = descriptor_matrix(X, dtype=np.float64)
    if x.shape[0] < 2:
        raise ValueError(f"PCA whitening needs at least 2 rows of X, got {x.shape[0]}")
    if not 0 < eps < 1:
        raise ValueError(f"eps must be in (0, 1), got {eps!r}")
    m = x.mean(axis=0)
    centred = x - m
    C = centred.T @ centred / x.shape[0]
    eigvals, U = np.linalg.eigh(C)
    order = np.argsort(eigvals)[::-1]
    eigvals, U = eigvals[order], U[:, order]
    if not eigvals[0] > 0:
        raise ValueError("X has no variance (all rows equal); PCA whitening is undefined")
    floor = eps * float(eigvals[0])
    n_floored = int((eigvals < floor).sum())
    if n_floored:
        logger.info("PCA whitening: %d eigenvalue(s) below %.3g raised to it", n_floored, floor)
    P = U.T / np.sqrt(np.maximum(eigvals, floor))[:, None]
    return m, _fix_signs(P)


def apply_whitening(
    X: ArrayLike, m: ArrayLike, P: ArrayLike, dim: int | None = None
) -> NDArray[np.float32]:
    """L2-normalised rows of ``(X - m) @ P[:dim].T``: float32 ``[N, dim]``.

    ``dim=None`` keeps every row of ``P``. Float32 input is projected in float32 (no float64
    copy of a large descriptor matrix); float64 input in float64.
    """
    arr = np.asarray(X)
    x = descriptor_matrix(arr)
    D = x.shape[1]
    mean = np.asarray(m, dtype=np.float64)
    proj = np.asarray(P, dtype=np.float64)
    if mean.size != D or (mean.ndim > 1 and max(mean.shape) != mean.size):
        raise ValueError(f"m must have shape [D] = [{D}], got {mean.shape}")
    if proj.ndim != 2 or proj.shape[1] != D:
        raise ValueError(
            f"P must have shape [D_out, {D}] to project X of shape {x.shape}, got {proj.shape}"
        )
    if dim is None:
        dim = proj.shape[0]
    elif isinstance(dim, bool) or int(dim) != dim or not 1 <= dim <= proj.shape[0]:
        raise ValueError(f"dim must be an integer in [1, {proj.shape[0]}], got {dim!r}")
    proj = proj[: int(dim)].astype(x.dtype)
    out = (x - mean.reshape(-1).astype(x.dtype)) @ proj.T
    return l2_normalize(out).astype(np.float32, copy=False)


def save_whitening(
    path: str | os.PathLike[str] | BinaryIO, m: ArrayLike, P: ArrayLike, **meta: Any
) -> None:
    """Write ``m``, ``P`` and JSON-serialisable ``meta`` to a small ``.npz`` (no pickle).

    ``path`` is a local path or an ``s3://`` URI (written whole or not at all, through the
    storage layer), or an open binary file object.
    """
    mean = np.asarray(m, dtype=np.float64).reshape(-1)
    proj = np.asarray(P, dtype=np.float64)
    if proj.ndim != 2 or proj.shape[1] != mean.size:
        raise ValueError(f"P must have shape [D_out, {mean.size}] to match m, got {proj.shape}")
    try:
        meta_json = json.dumps(meta, sort_keys=True)
    except TypeError as exc:
        raise TypeError(f"whitening meta must be JSON-serialisable: {exc}") from exc
    arrays = {"format": np.array(_FORMAT), "m": mean, "P": proj, "meta": np.array(meta_json)}
    # numpy's stub lets a ``**dict`` fill ``allow_pickle: bool`` too, so arrays are "not bool".
    if hasattr(path, "write"):
        np.savez(path, **arrays)  # type: ignore[arg-type]
        return
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    storage.write_bytes(path, buffer.getvalue())


def whitening_bytes(m: ArrayLike, P: ArrayLike, **meta: Any) -> bytes:
    """What ``save_whitening`` writes, as bytes (to hash or to store elsewhere)."""
    buffer = io.BytesIO()
    save_whitening(buffer, m, P, **meta)
    return buffer.getvalue()


def load_whitening(path: str | os.PathLike[str] | BinaryIO) -> WhiteningParams:
    """Read what ``save_whitening`` wrote (a path, an ``s3://`` URI or a binary file object)."""
    if hasattr(path, "read"):
        source = io.BytesIO(path.read())  # np.load needs a seekable file
    else:
        source = io.BytesIO(storage.read_bytes(path))
    try:
        data = np.load(source, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path!r} is not a whitening file: {err}") from err
    with data:
        missing = {"format", "m", "P", "meta"} - set(data.files)
        if missing:
            raise ValueError(f"{path!r} is not a whitening file: missing {sorted(missing)}")
        fmt = str(data["format"])
        if fmt != _FORMAT:
            raise ValueError(f"{path!r} has whitening format {fmt!r}, expected {_FORMAT!r}")
        m, P, meta = data["m"], data["P"], json.loads(str(data["meta"]))
    if P.ndim != 2 or m.shape != (P.shape[1],):
        raise ValueError(f"{path!r} is corrupt: m has shape {m.shape}, P has shape {P.shape}")
    return WhiteningParams(m, P, meta)
